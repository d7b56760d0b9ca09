"""Who may talk to the service: loopback by default, CURVE-authenticated clients for anything else.

A microscope PC streams raw data worth protecting, so the service refuses to listen on a non-loopback address unless
CURVE keys are configured. With keys, traffic is encrypted and only clients whose public key is in the allow-list
folder may connect (pyzmq's ``ThreadAuthenticator`` answers the ZAP requests).

Key layout made by :func:`generate_keys` (``rllsm serve --gen-keys DIR``)::

    DIR/server.key_secret          the service's key pair (keep private, stays on the processing PC)
    DIR/server.key                 the service's public key (give to every client)
    DIR/clients/<name>.key         public keys of allowed clients (the allow-list)
    DIR/client-<name>.key_secret   a client key pair (move to the acquisition PC, then delete here)
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from engines.errors import RllsmRuntimeError

log = logging.getLogger(__name__)


class SecurityError(RllsmRuntimeError):
    """The requested endpoint or key setup is not safe or not usable; the text says what to do."""


class InsecureBindError(SecurityError):
    """A non-loopback bind was requested without CURVE keys."""


def endpoint_host(endpoint: str) -> str:
    """Host part of ``tcp://HOST:PORT`` (``ipc://``/``inproc://`` return ``"local"``)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return "local"
    if not endpoint.startswith("tcp://"):
        raise SecurityError(f"endpoint {endpoint!r} must look like tcp://127.0.0.1:5555")
    host = urlsplit(endpoint).hostname
    if host is None:
        # "tcp://*:5555" does not parse as a URL host
        host = endpoint[len("tcp://"):].rsplit(":", 1)[0]
    return host


def is_loopback(endpoint: str) -> bool:
    """True if binding ``endpoint`` exposes nothing beyond this machine."""
    host = endpoint_host(endpoint)
    if host in ("local", "localhost"):
        return True
    if host in ("*", "0.0.0.0", "::", ""):
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:  # an interface or host name: loopback only if every address it resolves to is
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def check_bind(endpoint: str, keys_dir: str | os.PathLike[str] | None) -> None:
    """Refuse a non-loopback ``endpoint`` unless CURVE keys are configured.

    Raises
    ------
    InsecureBindError
        With the command that creates keys.
    """
    if is_loopback(endpoint) or keys_dir is not None:
        return
    raise InsecureBindError(
        f"refusing to listen on {endpoint}: that address is reachable from other machines and no CURVE keys are "
        "configured. Bind 127.0.0.1, or create keys with `rllsm serve --gen-keys DIR`, copy the client key to the "
        "acquisition PC and start with `--keys DIR`."
    )


def check_local_bind(endpoint: str, role: str, keys_dir: str | os.PathLike[str] | None) -> None:
    """Refuse a non-loopback ``endpoint`` for a socket that is never encrypted (control, display), keys or not.

    Raises
    ------
    InsecureBindError
        Saying that CURVE keys protect the ingest socket only, so this one must stay on this machine.
    """
    if is_loopback(endpoint):
        return
    if keys_dir is not None:
        raise InsecureBindError(
            f"refusing to listen on {endpoint} for {role}: that address is reachable from other machines, and the "
            f"{role} socket is never encrypted (the CURVE keys in {keys_dir} protect the ingest socket only). "
            f"Bind {role} to 127.0.0.1 and reach it through an SSH tunnel if needed."
        )
    raise InsecureBindError(
        f"refusing to listen on {endpoint} for {role}: that address is reachable from other machines and the "
        f"{role} socket is never encrypted. Bind it to 127.0.0.1 (use an SSH tunnel to reach it from elsewhere)."
    )


def generate_keys(directory: str | os.PathLike[str], clients: tuple[str, ...] = ("acquisition",)) -> dict[str, Path]:
    """Create the server key pair, one key pair per client and the allow-list folder; returns the paths."""
    d = Path(directory)
    (d / "clients").mkdir(parents=True, exist_ok=True)
    if (d / "server.key_secret").exists():
        raise SecurityError(f"{d} already holds a server key; remove it or choose another folder")
    out: dict[str, Path] = {}
    pub, sec = zmq.auth.create_certificates(d, "server")
    out["server_public"], out["server_secret"] = Path(pub), Path(sec)
    for name in clients:
        cpub, csec = zmq.auth.create_certificates(d, f"client-{name}")
        allowed = d / "clients" / f"{name}.key"
        shutil.copyfile(cpub, allowed)
        os.chmod(csec, 0o600)
        out[f"client_{name}_secret"] = Path(csec)
        out[f"client_{name}_allowed"] = allowed
    os.chmod(sec, 0o600)
    return out


def _allow_list_state(allowed: Path) -> tuple[tuple[str, int, int], ...]:
    try:
        return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in allowed.glob("*.key")))
    except OSError:
        return ()


@dataclass
class CurveServer:
    """A running authenticator; ``close()`` stops it, ``refresh()`` re-reads the allow-list if it changed."""

    authenticator: ThreadAuthenticator
    allowed: Path | None = None
    _state: tuple[tuple[str, int, int], ...] = ()

    def refresh(self) -> bool:
        """Re-read ``clients/`` if a key was added, removed or replaced; True if it was.

        A removed key is refused from the next handshake on (a connection already made stays until it closes).
        """
        if self.allowed is None:
            return False
        state = _allow_list_state(self.allowed)
        if state == self._state:
            return False
        self._state = state
        # configure_curve replaces the domain's key set in one assignment: the authenticator thread sees either set
        self.authenticator.configure_curve(domain="*", location=str(self.allowed))
        log.warning("CURVE allow-list %s reloaded: %d client key(s)", self.allowed, len(state))
        return True

    def close(self) -> None:
        self.authenticator.stop()


def secure_server_socket(
    ctx: zmq.Context, sock: zmq.Socket, keys_dir: str | os.PathLike[str]
) -> CurveServer:
    """Make ``sock`` (not yet bound) a CURVE server accepting only the keys in ``keys_dir/clients``."""
    d = Path(keys_dir)
    secret = d / "server.key_secret"
    allowed = d / "clients"
    if not secret.exists():
        raise SecurityError(f"no server key at {secret}; create keys with `rllsm serve --gen-keys {d}`")
    if not allowed.is_dir() or not any(allowed.glob("*.key")):
        raise SecurityError(f"no allowed client keys in {allowed}; copy each client's public .key file there")
    # the key is read before the authenticator thread starts, so an unreadable key leaves no thread behind
    pub, sec = zmq.auth.load_certificate(secret)
    auth = ThreadAuthenticator(ctx)
    auth.start()
    state = _allow_list_state(allowed)
    auth.configure_curve(domain="*", location=str(allowed))
    sock.curve_secretkey = sec
    sock.curve_publickey = pub
    sock.curve_server = True
    return CurveServer(auth, allowed, state)


def secure_client_socket(
    sock: zmq.Socket, client_secret: str | os.PathLike[str], server_public: str | os.PathLike[str]
) -> None:
    """Configure a client socket (before ``connect``) with its key pair and the server's public key."""
    pub, sec = zmq.auth.load_certificate(client_secret)
    if sec is None:
        raise SecurityError(f"{client_secret} holds no secret key (use the .key_secret file)")
    server_pub, _ = zmq.auth.load_certificate(server_public)
    sock.curve_secretkey = sec
    sock.curve_publickey = pub
    sock.curve_serverkey = server_pub


def describe(keys_dir: Any) -> str:
    return "CURVE (allow-listed keys)" if keys_dir else "none (loopback only)"
