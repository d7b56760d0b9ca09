"""``rllsm split-views``: Step 3 on a TIFF stack — rotate to the mirror frame and cut views A and B."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from streamer.cli.options import add_optics_args, optics_from_args


def register(sub: argparse._SubParsersAction) -> None:
    from engines.views import ViewsParams
    from streamer.cli.geometry_io import add_model_args

    p = sub.add_parser(
        "split-views",
        help="Step 3: rotate a deskewed volume so the mirror is horizontal and cut views A and B",
        description="Read a deskewed (z, y, x) TIFF volume, rotate it about y by the objective angle onto an "
        "isotropic grid, search the small rotation about x (and optionally y) and the mirror position that "
        "best overlay the volume with its mirror image, and write OUT_DIR/view_A.tif, view_B.tif (B flipped "
        "along z) and report.json. --angle defaults to the objective angle with the sign of the skew angle; "
        "--dx and --dz to the voxel size IN records (every rllsm step writes it; after lateral-sr that is pixel/1.5), "
        "else to the pixel size and stage step × sin(skew angle).",
    )
    p.add_argument("input", type=Path, metavar="IN", help="deskewed volume, 3-D TIFF (z, y, x); its deskewed axis is --skew-axis (default x)")
    p.add_argument("output_dir", type=Path, metavar="OUT_DIR", help="folder for view_A.tif, view_B.tif, report.json")
    p.add_argument("--dx", type=float, metavar="UM", help="lateral voxel size of IN (µm)")
    p.add_argument("--dz", type=float, metavar="UM", help="plane spacing of IN (µm)")
    p.add_argument("--float32", action="store_true",
                   help="write float32 values; default uint16, each view scaled to 0–65535 (as the reference)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: CUDA if present)")
    p.add_argument("--no-progress", action="store_true", help="no progress messages")
    # --angle-deg would be the generated name; the documented flag is --angle.
    add_model_args(p, ViewsParams, "rotation and split", exclude=("version", "angle_deg"))
    p.add_argument("--angle", type=float, metavar="DEG", dest="p_angle_deg",
                   help="rotation about y (degrees); default the optics objective angle (30.8) signed like the "
                   "skew angle")
    add_optics_args(p)
    from streamer.cli.paths import add_overwrite_arg

    add_overwrite_arg(p)
    p.set_defaults(func=run)


def _scaled(view):  # noqa: ANN001, ANN202 - numpy in, numpy out
    import numpy as np

    lo, hi = float(view.min()), float(view.max())
    return np.round((view - lo) / (hi - lo) * 65535.0) if hi > lo else np.zeros_like(view)


def run(args: argparse.Namespace) -> int:
    from engines.views import ViewsError, ViewsParams, split_views
    from engines.support import SPLIT_MIN_PLANES
    from streamer.cli.geometry_io import (engine_errors, model_from_args, progress_printer, read_stack, read_voxel,
                                          voxel_from, write_report, write_stack)
    from streamer.cli.paths import check_input_file, check_output_dir

    check_input_file(args.input, "deskewed volume")
    check_output_dir(args.output_dir, ("view_A.tif", "view_B.tif", "report.json"), inputs=[args.input],
                     overwrite=args.overwrite)
    optics = optics_from_args(args)
    default_angle = math.copysign(optics.objective_angle_deg, optics.skew_angle_deg)
    params = model_from_args(args, ViewsParams, {"angle_deg": default_angle}, source="split-views")
    recorded = read_voxel(args.input)  # every rllsm step records it: no hand-computed --dx after lateral-sr
    base = recorded or (optics.deskewed_pixel_z_um, optics.pixel_size_um, optics.pixel_size_um)
    voxel = base
    if args.dx is not None or args.dz is not None:
        dz_, dx_ = (args.dz if args.dz is not None else base[0]), (args.dx if args.dx is not None else base[2])
        voxel = voxel_from((dz_, dx_, dx_), recorded, str(args.input)) or base
    dz, dx = voxel[0], voxel[2]

    say = progress_printer("split-views", args.no_progress)
    vol = read_stack(args.input, "deskewed volume", min_planes=SPLIT_MIN_PLANES, needed_by="the view split")
    say(f"read {args.input} {vol.shape}; rotating by {params.angle_deg}° and searching the mirror")
    with engine_errors(args.input, ViewsError):
        view_a, view_b, report = split_views(vol, dx, dz, params, skew_axis=optics.skew_axis.value, device=args.device)
    say(f"x tilt {report.angle_x_deg:.2f}°, y {report.angle_y_deg:.2f}°, mirror at slice "
        f"{report.split_index:.1f} of {report.rotated_shape[0]}, depth {report.depth}")
    out = args.output_dir
    v = float(report.voxel_um)
    for name, view in (("view_A.tif", view_a), ("view_B.tif", view_b)):
        write_stack(out / name, view if args.float32 else _scaled(view), "float32" if args.float32 else "uint16",
                    voxel_um=(v, v, v))
    write_report(out / "report.json", report)
    print(f"wrote {out}/view_A.tif, view_B.tif ({view_a.shape[0]}×{view_a.shape[1]}×{view_a.shape[2]}) "
          f"and report.json")
    return 0
