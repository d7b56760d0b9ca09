"""``rllsm view``: napari on the live display stream or on an OME-Zarr dataset being written, following it."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "view", help="napari on the live stream or a dataset being written: newest volume in 3D + MIPs, in µm",
        description="Open napari on a service's display stream (default: the local service) or on an OME-Zarr "
        "dataset that may still be written, and follow it: the newest fused volume in 3D with its three MIPs, in "
        "micrometres, auto contrast with a lock, follow latest / pause, timepoint, channel, latency and dropped "
        "volumes shown. Runs in its own process; the service never waits for it. Needs the 'viewer' extra "
        "(pip install 'rllsm-vsim[viewer]').",
    )
    p.add_argument("target", nargs="?", default=None, metavar="ENDPOINT | DATASET.ome.zarr",
                   help="display endpoint (tcp://HOST:PORT or HOST:PORT; default tcp://127.0.0.1:5556) or an "
                   "OME-Zarr folder")
    p.add_argument("--control", metavar="ENDPOINT", default=None,
                   help="also dock the service panel on this control endpoint (status, follow, open dataset); "
                   "e.g. tcp://127.0.0.1:5557")
    p.add_argument("--screenshot", metavar="PNG", default=None,
                   help="save the window as PNG after --after volumes were shown, then exit")
    p.add_argument("--after", type=int, default=1, metavar="N", help="volumes to show before --screenshot")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="close after S seconds (with --screenshot: fail if N volumes did not arrive by then)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from streamer.cli import CLIError
    from streamer.viewer.model import ViewerError, resolve_target

    if args.after < 1:
        raise CLIError(f"--after must be ≥ 1 volume, got {args.after}")
    if args.timeout is not None and not args.timeout > 0:
        raise CLIError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.screenshot is not None and not args.screenshot.lower().endswith(".png"):
        raise CLIError(f"--screenshot must name a .png file, got {args.screenshot!r}")
    try:
        target = resolve_target(args.target)
        from streamer.viewer.napari_app import open_viewer

        result = open_viewer(target, screenshot=args.screenshot, after=args.after, timeout=args.timeout,
                             control=args.control, on_ready=lambda: print(json.dumps({"following": target.label()}),
                                                                         flush=True))
    except ViewerError as err:
        raise CLIError(str(err)) from None
    print(json.dumps(result), flush=True)
    return 0
