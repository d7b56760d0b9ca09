"""``rllsm status``: ask a running service for queue depths, per-stage latency, throughput, drops and errors."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show a running service's queues, stage latencies, drops and errors")
    p.add_argument("--control", default="tcp://127.0.0.1:5557", help="the service's control endpoint (%(default)s)")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.add_argument("--stop", action="store_true", help="ask the service to finish what it received and stop")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    p.set_defaults(func=run)


def format_status(s: dict[str, Any]) -> str:
    """Human-readable status table."""
    lines = [f"state: {s.get('state')}   ingest: {s.get('ingest')}   uptime: {s.get('uptime_s', 0):.0f} s"]
    if s.get("error"):
        lines.append(f"ERROR: {s['error']}")
    q = s.get("queues", {})
    lines.append("queues: " + "  ".join(f"{k}={v}" for k, v in q.items()))
    c = s.get("counters", {})
    keys = ["messages_received", "bytes_received", "messages_rejected", "stacks_complete", "stacks_incomplete",
            "volumes_output", "messages_spilled", "display_errors", "stage_errors", "quarantined",
            "quarantine_skipped"]
    lines.append("counters: " + "  ".join(f"{k}={c[k]:g}" for k in keys if k in c))
    for name, st in s.get("stages", {}).items():
        lines.append(f"  stage {name:<20} n={st['count']:<6} p50={st['p50_ms']:.1f} ms  p99={st['p99_ms']:.1f} ms")
    for name, r in s.get("throughput", {}).items():
        lines.append(f"  throughput {name}: {r['items_per_s']:.1f}/s  {r['bytes_per_s'] / 1e6:.1f} MB/s")
    drops = s.get("output_drops", {})
    if drops:
        lines.append("output drops: " + "  ".join(f"{k}={v}" for k, v in drops.items()))
    errs = s.get("errors", {})
    if errs.get("by_type"):
        lines.append("errors: " + "  ".join(f"{k}={v}" for k, v in errs["by_type"].items()))
    if errs.get("last"):
        lines.append("last errors:")
        lines.extend(f"  {e}" for e in errs["last"][-10:])
    n_q = s.get("quarantined_total", 0)
    if n_q:
        lines.append(f"quarantined ({n_q}; skipped on restart and replay, see quarantine.log in the recording):")
        for q in s.get("quarantined", [])[-10:]:
            what = q.get("stack") or (f"acquisition {q['acquisition']}" if q.get("acquisition") else
                                      f"record {q.get('record')}")
            lines.append(f"  {what}: {q.get('reason')}")
    inc = s.get("incomplete_stacks", [])
    if inc:
        lines.append(f"incomplete stacks ({s.get('incomplete_total', len(inc))}):")
    for i in inc[-5:]:
        n = i.get("n_missing", len(i.get("missing_planes", [])))
        lines.append(f"  {i['stack']}: {i['reason']}, missing {n} plane{'s' * (n != 1)} "
                     f"({i.get('missing') or i.get('missing_planes')})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from streamer.cli import CLIError
    from streamer.service import ServiceError, request

    if not args.timeout > 0:
        raise CLIError(f"--timeout must be > 0 seconds, got {args.timeout}")
    try:
        reply = request(args.control, "stop" if args.stop else "status", timeout_s=args.timeout)
    except ServiceError as err:
        raise CLIError(str(err)) from None
    print(json.dumps(reply, indent=1, default=str) if args.json or args.stop else format_status(reply))
    return 0
