"""``rllsm deskew``: deskew a raw sample-scan TIFF stack (cudaDecon geometry)."""

from __future__ import annotations

import argparse
from pathlib import Path

from streamer.cli.options import add_optics_args, optics_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deskew",
        help="deskew a raw sample-scan stack (cudaDecon output geometry)",
        description="Read a raw (z, y, x) sample-scan TIFF stack and write it deskewed: the skew axis widens by "
        "floor(nz·dz·|cos θ|/dx) pixels, centred on the middle plane; voxels outside the raw frame get --pad. "
        "--dx/--dz/--angle override --pixel-size-um/--stage-step-um/--skew-angle-deg and the config file.",
    )
    p.add_argument("input", type=Path, metavar="IN", help="raw stack, 3-D TIFF (z, y, x)")
    p.add_argument("output", type=Path, metavar="OUT", help="output TIFF")
    p.add_argument("--dx", type=float, metavar="UM", help="camera pixel size in the sample (µm)")
    p.add_argument("--dz", type=float, metavar="UM", help="stage step between planes (µm)")
    p.add_argument("--angle", type=float, metavar="DEG", help="skew angle (degrees; negative: other scan direction)")
    p.add_argument("--interp", choices=["linear", "cubic"], default="cubic",
                   help="linear (as cudaDecon) or cubic (as the reference's MATLAB deskew); default cubic")
    p.add_argument("--pad", type=float, default=0.0, metavar="VALUE",
                   help="value outside the raw frame (cudaDecon uses the camera background); default 0")
    from engines.support import OutputDType

    p.add_argument("--dtype", choices=[d.value for d in OutputDType], default=OutputDType.FLOAT32.value,
                   help="output type; uint16 clips to 0–65535 and truncates, as cudaDecon (default float32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: CUDA if present)")
    add_optics_args(p)  # brings --skew-axis x|y among the optics flags
    from streamer.cli.paths import add_overwrite_arg

    add_overwrite_arg(p)
    p.set_defaults(func=run)


def deskew_file(input_path: Path, output_path: Path, dx: float, dz: float, angle: float, *, skew_axis: str = "x",
                interp: str = "cubic", pad: float = 0.0, dtype: str = "float32",
                device: str | None = None, overwrite: bool = False) -> tuple[int, int, int]:
    """Deskew a TIFF file into another; returns the output shape. User errors raise :class:`CLIError`.

    The output records its voxel size (plane spacing dz·|sin θ|, pixel dx) for the next step.
    """
    import math

    from streamer.cli.geometry_io import engine_errors, read_stack, write_stack
    from streamer.cli.paths import check_output_file

    check_output_file(output_path, inputs=[input_path], overwrite=overwrite)
    raw = read_stack(input_path, "raw stack")
    from engines.deskew import DeskewError, deskew  # after reading: a bad file fails before torch loads

    with engine_errors(input_path, DeskewError):
        out = deskew(raw, dx, dz, angle, skew_axis=skew_axis, interp=interp, pad=pad,  # type: ignore[arg-type]
                     device=device)
    write_stack(output_path, out, dtype, voxel_um=(dz * abs(math.sin(math.radians(angle))), dx, dx))
    return tuple(out.shape)  # type: ignore[return-value]


def run(args: argparse.Namespace) -> int:
    from streamer.cli.geometry_io import read_voxel
    from streamer.cli.options import optics_with_voxel
    from streamer.cli.paths import check_input_file, check_output_file

    check_input_file(args.input, "raw stack")
    check_output_file(args.output, inputs=[args.input], overwrite=args.overwrite)
    optics = optics_with_voxel(args, optics_from_args(args), read_voxel(args.input), str(args.input))
    dx = args.dx if args.dx is not None else optics.pixel_size_um
    dz = args.dz if args.dz is not None else optics.stage_step_um
    angle = args.angle if args.angle is not None else optics.skew_angle_deg
    shape = deskew_file(args.input, args.output, dx, dz, angle, skew_axis=optics.skew_axis.value,
                        interp=args.interp, pad=args.pad, dtype=args.dtype, device=args.device,
                        overwrite=args.overwrite)
    print(f"wrote {args.output} ({shape[0]}×{shape[1]}×{shape[2]} {args.dtype}; dx {dx} µm, dz {dz} µm, "
          f"angle {angle}°, skew axis {optics.skew_axis.value}, {args.interp})")
    return 0
