"""``rllsm serve``: run the live streaming service until stopped (Ctrl-C, SIGTERM or ``rllsm status --stop``)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engines.config import describe_validation_error


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def use_json_logs() -> None:
    root = logging.getLogger()
    for h in root.handlers:
        h.setFormatter(JsonFormatter())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the live service: ingest, record, reconstruct, output")
    p.add_argument("--ingest", default="tcp://127.0.0.1:5555", help="PULL endpoint to bind (default %(default)s)")
    p.add_argument("--control", default="tcp://127.0.0.1:5557", help="status/control REP endpoint (%(default)s)")
    p.add_argument("--recording", "-r", type=Path, help="recording folder (every message is appended here first)")
    p.add_argument("--out", "-o", type=Path, help="folder for the fused volumes")
    p.add_argument("--format", dest="output_format", choices=["zarr", "tiff", "npy"], default="zarr",
                   help="OME-Zarr, OME-TIFF or .npy files (default %(default)s)")
    p.add_argument("--display", metavar="ENDPOINT", default="tcp://127.0.0.1:5556",
                   help="PUB endpoint of the live display stream: volumes + MIPs, latest wins (default %(default)s; "
                   "'none' turns it off)")
    p.add_argument("--mode", choices=["auto", "full", "sr-rl", "classical", "deskew", "none"], default="auto",
                   help="what to do with each stack (default %(default)s: the best that the available weights "
                   "support, as every command; docs/streaming.md)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA if present)")
    p.add_argument("--fused-depth", type=int, metavar="N",
                   help="planes of the fused output grid (default: fixed from the optics and the first stack)")
    p.add_argument("--stack-timeout", type=float, default=5.0, metavar="S",
                   help="flag a stack incomplete after S seconds without a plane (default %(default)s)")
    p.add_argument("--process-incomplete", action="store_true", help="also reconstruct incomplete stacks")
    p.add_argument("--fsync-every", type=int, default=0, metavar="N", help="fsync the recording every N messages")
    p.add_argument("--keys", type=Path, help="CURVE key folder; required for a non-loopback --ingest")
    p.add_argument("--gen-keys", type=Path, metavar="DIR", help="create server/client CURVE keys in DIR and exit")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this loopback port")
    p.add_argument("--json-logs", action="store_true", help="log one JSON object per line")
    p.add_argument("--max-message-mb", type=float, default=2048.0, metavar="MB",
                   help="largest message part accepted; ZMQ refuses a bigger one before allocating it (%(default)s)")
    p.add_argument("--cache-mb", type=float, default=64.0, metavar="MB",
                   help="received messages kept in memory for the processor; the rest is read back from the "
                   "recording (%(default)s)")
    from streamer.cli.options import add_memory_budget_arg

    add_memory_budget_arg(p, deprecated_gb=True)
    p.add_argument("--max-acquisitions", type=int, default=16, metavar="N",
                   help="acquisitions open at once; one more closes the one idle longest (%(default)s)")
    p.add_argument("--rcvhwm", type=int, default=1000, metavar="N",
                   help="messages ZMQ may queue before ingest records them; with big messages, N × their size is "
                   "the memory a burst may take (%(default)s)")
    p.add_argument("--writer-threads", type=int, default=4, metavar="N",
                   help="threads writing the outputs of all acquisitions: a fixed pool (%(default)s)")
    p.add_argument("--acquisition-idle", type=float, default=600.0, metavar="S",
                   help="close an acquisition's outputs after S seconds without a message (%(default)s)")
    from streamer.distributed.cli import add_cluster_args

    add_cluster_args(p, "", workers=False)
    p.add_argument("--max-in-flight", type=int, default=4, metavar="N",
                   help="with --scheduler: stacks out on the cluster at most (default %(default)s)")
    from streamer.cli.backend_options import add_backend_args
    from streamer.cli.model_options import add_model_args

    add_model_args(p)  # the same model sources as `rllsm reconstruct` (plus a --weights folder)
    add_backend_args(p, device=False)  # mode full: what runs VSI-SR and RL-DFN
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engines.support import resolve_mode
    from streamer.cli import CLIError
    from streamer.security import SecurityError, generate_keys
    from streamer.service import Service, ServiceConfig, ServiceError

    if args.json_logs:
        use_json_logs()
    # the end-of-acquisition summary is for the person at the microscope: shown at normal verbosity
    summary_log = logging.getLogger("streamer.summary")
    if summary_log.getEffectiveLevel() > logging.INFO:
        summary_log.setLevel(logging.INFO)
    if args.gen_keys:
        try:
            paths = generate_keys(args.gen_keys)
        except SecurityError as err:
            raise CLIError(str(err)) from None
        for name, path in paths.items():
            print(f"{name}: {path}")
        print("Copy client-acquisition.key_secret and server.key to the acquisition PC; start with --keys "
              f"{args.gen_keys}. Allow more clients by putting their public .key in {args.gen_keys}/clients/.")
        return 0
    if args.recording is None:
        raise CLIError("--recording DIR is required (every received message is recorded there)")
    from streamer.cli.backend_options import backend_config_from_args
    from streamer.cli.model_options import sources_from_args

    backend = backend_config_from_args(args)
    sources = sources_from_args(args)
    try:
        cfg = ServiceConfig(
            ingest=args.ingest, control=args.control, recording=args.recording, output=args.out,
            output_format=args.output_format, display=None if args.display == "none" else args.display,
            mode=resolve_mode(args.mode, vsisr=sources.checkpoint is not None or sources.weights is not None,
                              rldfn=sources.model is not None or sources.weights is not None),
            device=args.device,
            sources=sources, fused_depth=args.fused_depth, backend=backend,
            stack_timeout_s=args.stack_timeout, process_incomplete=args.process_incomplete,
            fsync_every=args.fsync_every, keys=args.keys, metrics_port=args.metrics_port,
            max_message_mb=args.max_message_mb, cache_mb=args.cache_mb, memory_budget_mib=args.memory_budget,
            max_acquisitions=args.max_acquisitions, acquisition_idle_s=args.acquisition_idle,
            writer_threads=args.writer_threads, rcvhwm=args.rcvhwm,
            scheduler=args.scheduler, max_in_flight=args.max_in_flight,
        )
    except ValidationError as err:
        raise CLIError(describe_validation_error(err, "serve settings")) from None
    try:
        svc = Service(cfg).start()
    except (ServiceError, SecurityError) as err:
        raise CLIError(str(err)) from None
    # Scripts (and the kill -9 tests) read this line to learn the bound endpoints.
    print(json.dumps({"ingest": svc.ingest_endpoint, "control": svc.control_endpoint,
                      "display": svc.display_endpoint or None}), flush=True)

    def _term(signum: int, frame: Any) -> None:
        svc._stop.set()

    signal.signal(signal.SIGTERM, _term)
    try:
        while not svc.wait(0.5):
            pass
    except KeyboardInterrupt:
        svc.stop()
    summary = svc.final_summary or {}
    print(json.dumps({"summary": summary}, default=str), flush=True)
    if svc.error is not None:
        print(f"rllsm serve: stopped: {svc.error}", file=sys.stderr)
        return 1
    return 0
