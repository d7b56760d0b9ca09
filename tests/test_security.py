"""Security: loopback by default, non-loopback refused without keys, CURVE really authenticates on loopback."""

from __future__ import annotations

import numpy as np
import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from streamer.security import InsecureBindError, SecurityError, check_bind, generate_keys, is_loopback
from streamer.service import Service, ServiceConfig, wait_for
from streaming_util import stack_frames, start_msg


@pytest.mark.parametrize("ep", ["tcp://127.0.0.1:5555", "tcp://localhost:1", "tcp://[::1]:5555", "ipc:///tmp/x"])
def test_loopback_endpoints_need_no_keys(ep):
    assert is_loopback(ep)
    check_bind(ep, None)


@pytest.mark.parametrize("ep", ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.0.2.10:5555", "tcp://[::]:5555"])
def test_non_loopback_bind_without_keys_is_refused_before_binding(tmp_path, ep):
    with pytest.raises(InsecureBindError, match="refusing to listen on .* no CURVE keys.*--gen-keys"):
        check_bind(ep, None)
    svc = Service(ServiceConfig(ingest=ep, control="tcp://127.0.0.1:0", recording=tmp_path / "rec"))
    with pytest.raises(InsecureBindError):
        svc.start()
    assert not (tmp_path / "rec").exists()  # refused before anything was opened


def test_cli_refuses_non_loopback(tmp_path, capsys):
    from streamer.cli import main

    assert main(["serve", "--ingest", "tcp://0.0.0.0:5599", "-r", str(tmp_path / "r")]) == 2
    assert "refusing to listen on tcp://0.0.0.0:5599" in capsys.readouterr().err


def _client(ctx, endpoint, secret, server_pub):
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 0)
    pub, sec = zmq.auth.load_certificate(secret)
    s.curve_publickey, s.curve_secretkey = pub, sec
    s.curve_serverkey = zmq.auth.load_certificate(server_pub)[0]
    mon = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                               | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    s.connect(endpoint)
    return s, mon


def _handshake(mon, timeout_s=10.0) -> int:
    if not mon.poll(int(timeout_s * 1000)):
        raise AssertionError("no handshake event")
    return recv_monitor_message(mon)["event"]


def test_curve_accepts_allowed_key_and_rejects_unknown(tmp_path):
    keys = generate_keys(tmp_path / "keys")
    stranger_pub, stranger_sec = zmq.auth.create_certificates(tmp_path, "stranger")  # not in the allow-list
    with pytest.raises(SecurityError, match="already holds a server key"):
        generate_keys(tmp_path / "keys")
    cfg = ServiceConfig(ingest="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0", recording=tmp_path / "rec",
                        keys=tmp_path / "keys", mode="none")
    ctx = zmq.Context()
    with Service(cfg) as svc:
        bad, bad_mon = _client(ctx, svc.ingest_endpoint, stranger_sec, keys["server_public"])
        assert _handshake(bad_mon) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        good, good_mon = _client(ctx, svc.ingest_endpoint, keys["client_acquisition_secret"], keys["server_public"])
        assert _handshake(good_mon) == zmq.EVENT_HANDSHAKE_SUCCEEDED
        s = np.ones((2, 4, 4), np.uint16)
        msgs = [start_msg("a", 2, (4, 4))] + stack_frames("a", 0, s, None, 1)
        for m in msgs:  # the stranger tries first; nothing of it may arrive
            try:
                bad.send_multipart(m, flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
        for m in msgs:
            good.send_multipart(m)
        assert wait_for(lambda: svc.metrics.counter("stacks_complete") == 1, 10)
        assert svc.metrics.counter("messages_received") == len(msgs)
        for sock in (bad, good, bad_mon, good_mon):
            sock.close(0)
    ctx.term()


def test_control_socket_stays_on_loopback_even_with_keys(tmp_path):
    generate_keys(tmp_path / "keys")
    cfg = ServiceConfig(ingest="tcp://127.0.0.1:0", control="tcp://0.0.0.0:0", recording=tmp_path / "rec",
                        keys=tmp_path / "keys", mode="none")
    with pytest.raises(InsecureBindError, match="tcp://0.0.0.0:0"):
        Service(cfg).start()


def _handshake_result(ctx, endpoint, secret, server_pub) -> int:
    s, mon = _client(ctx, endpoint, secret, server_pub)
    try:
        return _handshake(mon)
    finally:
        s.close(0)
        mon.close(0)


def test_allow_list_reloads_when_clients_folder_changes(tmp_path):
    keys = generate_keys(tmp_path / "keys")
    new_pub, new_sec = zmq.auth.create_certificates(tmp_path, "newcomer")
    cfg = ServiceConfig(ingest="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0", recording=tmp_path / "rec",
                        keys=tmp_path / "keys", mode="none")
    ctx = zmq.Context()
    with Service(cfg) as svc:
        ep = svc.ingest_endpoint
        ok = zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert _handshake_result(ctx, ep, keys["client_acquisition_secret"], keys["server_public"]) == ok
        assert _handshake_result(ctx, ep, new_sec, keys["server_public"]) != ok
        import shutil

        shutil.copyfile(new_pub, tmp_path / "keys" / "clients" / "newcomer.key")  # allowed from now on
        keys["client_acquisition_allowed"].unlink()  # and this one revoked
        assert wait_for(lambda: _handshake_result(ctx, ep, new_sec, keys["server_public"]) == ok, 15, 0.2)
        assert wait_for(lambda: _handshake_result(ctx, ep, keys["client_acquisition_secret"],
                                                  keys["server_public"]) != ok, 15, 0.2)
    ctx.term()


def test_keys_with_non_loopback_control_says_what_is_wrong(tmp_path, capsys):
    from streamer.cli import main

    generate_keys(tmp_path / "keys")
    code = main(["serve", "--ingest", "tcp://127.0.0.1:0", "--control", "tcp://0.0.0.0:0", "--keys",
                 str(tmp_path / "keys"), "-r", str(tmp_path / "r"), "--mode", "none", "--display", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "tcp://0.0.0.0:0" in err and "never encrypted" in err and "ingest socket only" in err
    assert "no CURVE keys are configured" not in err
