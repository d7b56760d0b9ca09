"""``rllsm preprocess``: Step 1 on a TIFF stack — mid-plane band removal, deskew, normalisation, crop."""

from __future__ import annotations

import argparse
from pathlib import Path

from streamer.cli.options import add_optics_args, optics_from_args


def register(sub: argparse._SubParsersAction) -> None:
    from engines.background import PRESETS, BackgroundParams
    from streamer.cli.geometry_io import add_model_args

    p = sub.add_parser(
        "preprocess",
        help="Step 1: remove the mirror's mid-plane band, deskew, subtract the offset, normalise, crop",
        description="Read a raw sample-scan (z, y, x) TIFF stack, fit and attenuate the mirror's mid-plane "
        "fluorescence band, subtract what the mask leaves of it (--no-residual-band: the reference's math only), "
        "boost the virtual image, deskew, subtract the camera offset, clip at 0, normalise "
        "to [0, 1] and crop the deskewed axis to the other camera axis. Writes uint16 (×65535) like the "
        "reference, or float32. The geometry comes from the optics flags/config (pixel size, stage step, "
        "skew angle and axis, camera offset).",
    )
    p.add_argument("input", type=Path, metavar="IN", help="raw stack, 3-D TIFF (z, y, x)")
    p.add_argument("output", type=Path, metavar="OUT", help="output TIFF")
    p.add_argument("--preset", choices=sorted(PRESETS), default="lifeact",
                   help="band-removal parameters of the reference for this structure (default lifeact); "
                   "the flags below override single values")
    p.add_argument("--report", type=Path, metavar="JSON", help="also write the fit (band position, tilt, drift, "
                   "intensity ratio) as JSON")
    p.add_argument("--float32", action="store_true", help="write float32 in [0, 1] instead of uint16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: CUDA if present)")
    p.add_argument("--no-progress", action="store_true", help="no progress messages")
    add_model_args(p, BackgroundParams, "band removal")
    add_optics_args(p)
    from streamer.cli.paths import add_overwrite_arg

    add_overwrite_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from engines.background import PRESETS, BackgroundError, BackgroundParams, preprocess  # torch loads lazily
    from streamer.cli.geometry_io import (engine_errors, model_from_args, progress_printer, read_stack,
                                          write_report, write_stack)

    from streamer.cli.geometry_io import read_voxel
    from streamer.cli.options import optics_with_voxel
    from streamer.cli.paths import check_input_file, check_output_file

    check_input_file(args.input, "raw stack")
    check_output_file(args.output, inputs=[args.input], overwrite=args.overwrite)
    if args.report is not None:
        check_output_file(args.report, inputs=[args.input], overwrite=args.overwrite, what="--report")
    optics = optics_with_voxel(args, optics_from_args(args), read_voxel(args.input), str(args.input))
    params = model_from_args(args, BackgroundParams, dict(PRESETS[args.preset]), source="preprocess")

    say = progress_printer("preprocess", args.no_progress)
    raw = read_stack(args.input, "raw stack")
    say(f"read {args.input} {raw.shape} {raw.dtype}; fitting the band and deskewing")
    with engine_errors(args.input, BackgroundError):
        vol, report = preprocess(raw, optics, params, device=args.device)
    if report.band is not None:
        b = report.band
        say(f"band at {b.position_px:.1f} px, tilt {b.tilt_deg:.2f}°, drift {b.drift_px_per_plane:.3f} px/plane "
            f"({b.groups_used} groups); real/virtual ratio {report.intensity_ratio:.3f}")
    data = vol if args.float32 else np.round(vol * 65535.0)
    dx = optics.pixel_size_um
    write_stack(args.output, data, "float32" if args.float32 else "uint16",
                voxel_um=(optics.deskewed_pixel_z_um, dx, dx))
    if args.report is not None:
        write_report(args.report, report)
    print(f"wrote {args.output} ({vol.shape[0]}×{vol.shape[1]}×{vol.shape[2]}, "
          f"{'float32' if args.float32 else 'uint16'})")
    return 0
