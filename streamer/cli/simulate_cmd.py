"""``rllsm simulate``: simulated rLLSM acquisitions, written to files or streamed like a live microscope.

Files (``--out DIR``): ``raw_t0000.tif`` … (uint16 camera stacks), ``ground_truth_t0000.tif`` … (float32 real
emitters on the deskewed grid, zlib-compressed) and ``metadata.json`` (seed, SimConfig with its OpticsConfig,
mirror plane, band position per plane, bead positions per timepoint).

Stream (``--connect tcp://HOST:PORT``): AcquisitionStart, then stacks or frames (as Micro-Manager delivers
them), then AcquisitionEnd, over a ZMQ PUSH socket in the wire schema. By default every message is delivered
or the command fails with a clear error (a test signal must arrive whole); ``--drop-when-busy`` instead behaves
like the microscope-side :class:`streamer.sender.StreamSender`, which never waits and counts what it drops.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engines.config import OpticsConfig
from streamer.cli import CLIError
from streamer.cli.options import add_optics_args, optics_from_args

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate", help="simulate a reflective lattice light-sheet acquisition (files or live stream)",
        description="Forward model of the rLLSM geometry: sample above a mirror, lattice light sheet, sample-scan "
        "skew, the mirror's epi-fluorescence band, camera noise. Writes TIFF stacks or streams the wire schema.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="DIR", help="write TIFF stacks, ground truth and metadata.json here")
    where.add_argument("--connect", metavar="ENDPOINT",
                       help="stream to this ZMQ PULL endpoint, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--timepoints", type=int, default=1, metavar="N", help="stacks to simulate (default 1)")
    p.add_argument("--shape", default=None, metavar="Z,Y,X", help="raw stack size (default 64,128,128)")
    p.add_argument("--structure", choices=[s.value for s in _structures()], default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sim-config", metavar="FILE", help="SimConfig fields (.yaml/.json); flags override them")
    p.add_argument("--peak-photons", type=float, default=None, help="brightest sample voxel (photons)")
    p.add_argument("--snr", type=float, default=None, help="peak SNR (overrides --peak-photons)")
    p.add_argument("--band-photons", type=float, default=None, help="peak of the mirror's epi band (photons)")
    p.add_argument("--no-ground-truth", action="store_true", help="files: skip the ground-truth stacks")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                   help="where the convolution runs (default cpu: bit-reproducible from metadata on any machine)")
    p.add_argument("--static", action="store_true", help="no drift or motion between timepoints")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--per-frame", dest="per_frame", action="store_true", default=True,
                      help="stream one message per camera plane (default, as Micro-Manager delivers)")
    mode.add_argument("--per-stack", dest="per_frame", action="store_false", help="stream one message per stack")
    p.add_argument("--rate", type=float, default=0.0, metavar="HZ",
                   help="stream: timepoints (stacks) per second; frames are spread evenly; 0 = as fast as possible")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                   help="stream: how long to wait for a receiver before giving up (default 10 s)")
    p.add_argument("--send-timeout", type=float, default=30.0, metavar="S",
                   help="stream: how long one message may wait for a stalled receiver (default 30 s)")
    p.add_argument("--drop-when-busy", action="store_true",
                   help="stream: never wait; drop and count messages the receiver cannot take (StreamSender)")
    p.add_argument("--checksum", action="store_true", help="stream: add a CRC-32 to every payload")
    from streamer.cli.paths import add_overwrite_arg

    add_overwrite_arg(p)
    add_optics_args(p)
    p.set_defaults(func=run)


def _structures() -> list:
    # engines.simulate.config is light (pydantic only), so the choices come from the one enum, not a copy.
    from engines.simulate.config import Structure

    return list(Structure)


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        dims = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        raise CLIError(f"--shape must be three integers Z,Y,X (planes, rows, columns), got {text!r}") from None
    if len(dims) != 3:
        raise CLIError(f"--shape must be three integers Z,Y,X (planes, rows, columns), got {text!r}")
    return dims  # type: ignore[return-value]


def config_from_args(args: argparse.Namespace) -> Any:
    """Resolve ``--sim-config``, the flags and the optics into one validated SimConfig."""
    import yaml

    from engines.simulate import SimulationError, make_sim_config

    fields: dict[str, Any] = {}
    if args.sim_config:
        path = Path(args.sim_config)
        if not path.is_file():
            raise CLIError(f"simulation config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}  # YAML is a superset of JSON
        if not isinstance(data, dict):
            raise CLIError(f"{path}: top level must be a mapping of SimConfig fields")
        fields.update(data)
    # Optics, most specific last: the sim-config's optics section, then --config FILE, then the flags.
    if args.config or "optics" not in fields:
        fields["optics"] = optics_from_args(args)
    else:
        from engines.config import ConfigError, load_optics

        flags = {n: getattr(args, f"optics_{n}", None) for n in OpticsConfig.model_fields}
        section = fields["optics"]
        if not isinstance(section, dict):
            raise CLIError(f"{args.sim_config}: 'optics' must be a mapping of OpticsConfig fields")
        try:
            fields["optics"] = load_optics(None, {**section, **{k: v for k, v in flags.items() if v is not None}})
        except ConfigError as err:
            raise CLIError(f"{args.sim_config}: {err}") from None
    for flag, name in (("structure", "structure"), ("peak_photons", "peak_photons"), ("snr", "snr"),
                       ("band_photons", "band_photons")):
        value = getattr(args, flag)
        if value is not None:
            fields[name] = value
    if args.shape:
        fields["shape"] = _parse_shape(args.shape)
    if args.static:
        fields["drift_um_per_timepoint"] = (0.0, 0.0, 0.0)
        fields["jitter_um"] = 0.0
    try:
        return make_sim_config(**fields)
    except SimulationError as err:
        raise CLIError(str(err)) from None


def run(args: argparse.Namespace) -> int:
    from engines.simulate import Microscope, SimulationError

    if args.timepoints < 1:
        raise CLIError(f"--timepoints must be ≥ 1, got {args.timepoints}")
    if args.seed < 0:
        raise CLIError(f"--seed must be ≥ 0, got {args.seed}")
    cfg = config_from_args(args)
    if args.out:  # before the simulator starts: an existing simulation is not silently replaced
        from streamer.cli.paths import check_output_dir

        names = ["metadata.json"] + [f"{k}_t{t:04d}.tif" for k in ("raw", "ground_truth")
                                     for t in range(args.timepoints)]
        check_output_dir(Path(args.out), names, overwrite=args.overwrite)
    try:
        mic = Microscope(cfg, args.seed, device=args.device)
        if args.out:
            summary = write_simulation(mic, Path(args.out), args.timepoints, ground_truth=not args.no_ground_truth)
            print(f"wrote {summary['timepoints']} stack(s) of {summary['raw_shape']} to {summary['out']}")
        else:
            stats = stream_simulation(
                mic, args.connect, args.timepoints, rate_hz=args.rate, per_frame=args.per_frame,
                connect_timeout_s=args.connect_timeout, send_timeout_s=args.send_timeout,
                drop_when_busy=args.drop_when_busy, checksum=args.checksum,
            )
            print(f"sent acquisition {stats['acquisition_id']}: {stats['sent']} messages "
                  f"({stats['dropped']} dropped, {stats['late']} late) to {args.connect}")
    except SimulationError as err:
        raise CLIError(str(err)) from None
    return 0


# --- files ------------------------------------------------------------------------------------------------------


def write_simulation(mic: Any, out: Path, timepoints: int, *, ground_truth: bool = True,
                     progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Simulate ``timepoints`` stacks into ``out`` (created if needed) and return a summary.

    Files: ``raw_tNNNN.tif`` (uint16), ``ground_truth_tNNNN.tif`` (float32) and ``metadata.json``.
    """
    import tifffile

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"cannot create the output folder {out}: {err.strerror or err}") from None
    meta = mic.metadata(timepoints)
    meta["files"] = {
        "raw": [f"raw_t{t:04d}.tif" for t in range(timepoints)],
        "ground_truth": [f"ground_truth_t{t:04d}.tif" for t in range(timepoints)] if ground_truth else [],
    }
    # The metadata goes first: an interrupted run still says what it was and which files to expect.
    (out / "metadata.json").write_text(json.dumps(meta, indent=1) + "\n")
    g = mic.geometry
    # ImageJ hyperstack metadata lets Fiji open the raw stacks with the right voxel size.
    raw_res = (1.0 / g.dx_um, 1.0 / g.dx_um)
    for t, stack in enumerate(mic.series(timepoints, with_ground_truth=ground_truth)):
        tifffile.imwrite(out / meta["files"]["raw"][t], stack.raw, imagej=True, resolution=raw_res,
                         metadata={"axes": "ZYX", "spacing": g.dz_um, "unit": "um"})
        if ground_truth:
            tifffile.imwrite(out / meta["files"]["ground_truth"][t], stack.ground_truth, compression="zlib",
                             metadata={"axes": "ZYX", "frame": "deskewed"})
        log.info("simulated timepoint %d/%d into %s", t + 1, timepoints, out)
        if progress:
            progress(t)
    return {"out": str(out), "timepoints": timepoints, "raw_shape": list(meta["raw_shape"])}


# --- stream -----------------------------------------------------------------------------------------------------


def _prefetch(mic: Any, timepoints: int, depth: int = 2) -> Any:
    """Yield the stacks of ``mic.series`` while the next ones are simulated in a background thread.

    Sending (paced to the camera rate) and simulating then overlap, as on a microscope where the camera keeps
    exposing while frames travel. An error in the simulation is re-raised in the caller.
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for stack in mic.series(timepoints, with_ground_truth=False):
                while not stop.is_set():
                    try:
                        q.put(stack, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(None)
        except BaseException as err:  # handed to the consumer, which raises it
            q.put(err)

    th = threading.Thread(target=produce, name="simulate-prefetch", daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        th.join(timeout=5)


class _Pacer:
    """Releases message ``i`` no earlier than ``i / rate`` after the start; counts the ones that were late."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.t0 = time.monotonic()
        self.late = 0

    def wait(self, i: int) -> None:
        if self.rate <= 0:
            return
        due = self.t0 + i / self.rate
        now = time.monotonic()
        if now < due:
            time.sleep(due - now)
        elif now - due > 1.0 / self.rate:
            self.late += 1


class _ReliablePush:
    """A PUSH socket that delivers every message or raises: waits for a receiver, then bounded blocking sends."""

    def __init__(self, endpoint: str, connect_timeout_s: float, send_timeout_s: float, acquisition_id: str) -> None:
        import zmq

        self.zmq = zmq
        self.endpoint = endpoint
        self.acquisition_id = acquisition_id
        self.send_timeout_ms = int(send_timeout_s * 1000)
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.PUSH)
        # IMMEDIATE: queue nothing for a peer that is not connected, so the first send waits for a real receiver.
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.setsockopt(zmq.SNDTIMEO, int(connect_timeout_s * 1000))
        self.sock.setsockopt(zmq.LINGER, self.send_timeout_ms)
        self.connect_timeout_s = connect_timeout_s
        try:
            self.sock.connect(endpoint)
        except zmq.ZMQError as err:
            self.sock.close(0)
            raise CLIError(f"cannot connect to {endpoint}: {err}") from None
        self.seq = 0
        self.sent = 0
        self.dropped = 0

    def send(self, header_fn: Callable[[int], Any], payload: Any = None) -> None:
        from streamer import wire

        header = header_fn(self.seq)
        try:
            self.sock.send_multipart(wire.encode(header, payload), copy=False)
        except self.zmq.Again:
            if self.sent == 0:
                raise CLIError(
                    f"nothing is listening at {self.endpoint} (waited {self.connect_timeout_s:g} s); start the "
                    f"receiver first (e.g. `rllsm serve`) or check the address"
                ) from None
            raise CLIError(
                f"the receiver at {self.endpoint} stopped taking messages: {header.kind} seq={self.seq} waited "
                f"{self.send_timeout_ms / 1000:g} s; {self.sent} sent before it"
            ) from None
        if self.sent == 0:
            self.sock.setsockopt(self.zmq.SNDTIMEO, self.send_timeout_ms)
        self.seq += 1
        self.sent += 1

    def close(self) -> None:
        self.sock.close()


def stream_simulation(mic: Any, endpoint: str, timepoints: int, *, rate_hz: float = 0.0, per_frame: bool = True,
                      connect_timeout_s: float = 10.0, send_timeout_s: float = 30.0, drop_when_busy: bool = False,
                      checksum: bool = False, acquisition_id: str | None = None) -> dict[str, Any]:
    """Stream a simulated acquisition in the wire schema; returns the id and counts.

    Counts: ``sent`` messages, ``dropped`` frames/stacks/end (only with ``drop_when_busy``), ``late`` messages
    behind the ``rate_hz`` schedule, ``start_retries`` (start attempts refused before a receiver connected).

    Raises
    ------
    CLIError
        Nobody listening within ``connect_timeout_s``, or (reliable mode) a receiver that stalls a message
        longer than ``send_timeout_s``.
    """
    from streamer import wire
    from streamer.sender import SenderConfig, StreamSender, new_acquisition_id

    cfg = mic.cfg
    g = mic.geometry
    acq = acquisition_id or new_acquisition_id("sim")
    start_fields = dict(
        optics=cfg.optics, z_count=g.nz, frame_shape=(g.ny, g.nx), dtype="uint16", n_timepoints=timepoints,
        channels=(f"{cfg.optics.wavelength_nm:g}",), metadata={"simulation": mic.metadata(1)},
    )
    pacer = _Pacer(rate_hz * (g.nz if per_frame else 1))
    if drop_when_busy:
        sender = StreamSender(SenderConfig(endpoint=endpoint, checksum=checksum), acquisition_id=acq)
        try:
            # The microscope-side sender never waits; only the start is retried, so a receiver that comes up
            # late still gets a complete header before the first stack.
            # Each refused start still consumes a sequence number (the sender's accounting), so the receiver's
            # first seq and n_messages include them; they are reported apart from dropped pixels.
            deadline = time.monotonic() + connect_timeout_s
            start_retries = 0
            while not sender.start(**start_fields):
                start_retries += 1
                if time.monotonic() > deadline:
                    raise CLIError(f"nothing is listening at {endpoint} (waited {connect_timeout_s:g} s)")
                time.sleep(0.05)
            i = 0
            for stack in _prefetch(mic, timepoints):
                if per_frame:
                    for z in range(g.nz):
                        pacer.wait(i)
                        i += 1
                        sender.send_frame(stack.raw[z], timepoint=stack.timepoint, z_index=z, z_count=g.nz)
                else:
                    pacer.wait(i)
                    i += 1
                    sender.send_stack(stack.raw, timepoint=stack.timepoint)
            sender.end("complete")
            stats = sender.stats()
        finally:
            sender.close()
        return {"acquisition_id": acq, "sent": stats["sent"], "dropped": stats["dropped"] - start_retries,
                "late": pacer.late, "start_retries": start_retries}

    push = _ReliablePush(endpoint, connect_timeout_s, send_timeout_s, acq)
    reason = "error"
    try:
        push.send(lambda seq: wire.AcquisitionStart(acquisition_id=acq, seq=seq, **start_fields))
        i = 0
        for stack in _prefetch(mic, timepoints):
            if per_frame:
                for z in range(g.nz):
                    plane = stack.raw[z]
                    pacer.wait(i)
                    i += 1
                    push.send(lambda seq, p=plane, z=z, t=stack.timepoint: wire.pixels_header(
                        p, acquisition_id=acq, seq=seq, timepoint=t, z_index=z, z_count=g.nz,
                        with_checksum=checksum), plane)
            else:
                pacer.wait(i)
                i += 1
                push.send(lambda seq, s=stack: wire.pixels_header(
                    s.raw, acquisition_id=acq, seq=seq, timepoint=s.timepoint, with_checksum=checksum), stack.raw)
        reason = "complete"
    finally:
        # Tell the receiver how it ended even on failure, if it still listens (best effort: no raise from here).
        if push.sent:
            try:
                push.send(lambda seq: wire.AcquisitionEnd(acquisition_id=acq, seq=seq, n_messages=seq, reason=reason))
            except CLIError:
                log.warning("could not send the acquisition end to %s", endpoint)
        push.close()
    return {"acquisition_id": acq, "sent": push.sent, "dropped": 0, "late": pacer.late, "start_retries": 0}
