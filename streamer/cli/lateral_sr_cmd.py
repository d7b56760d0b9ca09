"""``rllsm lateral-sr``: Step 2 on a TIFF stack — laterally isotropic SR with the VSI-SR network."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from streamer.cli.geometry_io import engine_errors, read_stack_voxel, write_stack

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lateral-sr",
        help="Step 2: laterally isotropic SR of a deskewed stack (VSI-SR network + Wiener recombination)",
        description="Read a deskewed (z, y, x) TIFF stack, predict the 0/60/120° virtual-SIM components with "
        "the VSI-SR network, recombine them with the OTFs, and write a (z-6, 1.5y, 1.5x) TIFF.",
    )
    p.add_argument("input", type=Path, metavar="IN", help="deskewed stack, 3-D TIFF (z, y, x)")
    p.add_argument("output", type=Path, metavar="OUT", help="output TIFF")
    p.add_argument("--checkpoint", type=Path, default=None, metavar="PTH",
                   help="VSI-SR weights: the published .pth (vars.N keys), an rllsm checkpoint, or (with "
                        "--backend onnxruntime/tensorrt) an `rllsm export` folder; default: the shipped demo "
                        "weights (trained on simulated data only), as `rllsm reconstruct`")
    otf = p.add_mutually_exclusive_group()
    otf.add_argument("--otf-dir", type=Path, metavar="DIR",
                     help="folder with OTF0.tif, OTF1.tif, apo_0.9_1.5.tif (or with 488/ 560/ 642/ sub-folders)")
    otf.add_argument("--synthetic-otf", action="store_true",
                     help="no measured OTFs: approximate them from NA, emission wavelength and pixel size "
                     "(--config file, else defaults; the pixel size IN records wins over the default). "
                     "This is the default when --otf-dir is not given")
    p.add_argument("--config", type=Path, metavar="FILE", help="optics config used by --synthetic-otf")
    p.add_argument("--wavelength", type=float, default=488.0, metavar="NM",
                   help="excitation wavelength in nm; picks the OTF sub-folder (default 488)")
    p.add_argument("--otf-weight", type=float, default=8.0, help="side-band OTF weight (default 8)")
    p.add_argument("--wiener", type=float, default=0.1, help="Wiener constant (default 0.1)")
    p.add_argument("--apo-factor", type=float, default=2.0, help="apodisation power (default 2)")
    p.add_argument("--adjust-intensity", action=argparse.BooleanOptionalAction, default=True,
                   help="restore the raw stack's brightness trend along z (default on)")
    p.add_argument("--adjust-threshold", type=float, default=99.0, metavar="PCT",
                   help="percentile above which plane brightness is measured (default 99)")
    p.add_argument("--stride", type=int, choices=[1, 3], default=1,
                   help="1: average 3 predictions per plane (published); 3: predict each plane once, ~3x faster")
    p.add_argument("--batch-size", type=int, default=4, metavar="N", help="7-plane windows per network call (default 4)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="network arithmetic: fp32 (published numbers), bf16 (~2x faster on CPUs with AVX512-BF16), "
                   "fp16 (CUDA only)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: CUDA if present)")
    p.add_argument("--float32", action="store_true", help="write float32 in [0, 1] instead of uint16")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from streamer.cli.paths import add_overwrite_arg

    add_overwrite_arg(p)
    from streamer.cli.backend_options import add_backend_args

    add_backend_args(p, device=False, precision=False)
    p.set_defaults(func=run)


def lateral_sr_file(
    input_path: Path, output_path: Path, checkpoint: Path, otf_dir: Path | None, params: object,
    device: str | None = None, float32: bool = False, progress: bool = True, optics_config: Path | None = None,
    backend: object = None, overwrite: bool = False,
) -> tuple[int, int, int]:
    """Run Step 2 on a TIFF file and write the result; returns the output shape.

    ``backend`` (:class:`engines.backends.BackendConfig`, default: the torch module) chooses what runs the
    network (:func:`engines.backends.networks.open_network`); the Wiener recombination stays in torch.

    The output records its voxel size: the input's plane spacing and its pixel / 1.5 (the SR factor).

    Raises :class:`streamer.cli.CLIError` with a readable message for every user error.
    """
    from engines.config import ConfigError, load_optics, read_optics_mapping
    from engines.vsisr.checkpoint import CheckpointError, load_checkpoint
    from engines.vsisr.lateral import LateralSRError, lateral_sr
    from engines.support import LATERAL_SR_MIN_PLANES
    from engines.vsisr.network import SCALE
    from engines.vsisr.otf import OTFError, generate_otfs, load_otfs
    from streamer.cli import CLIError
    from streamer.cli.paths import check_output_file

    check_output_file(output_path, inputs=[input_path], overwrite=overwrite)
    volume, voxel = read_stack_voxel(input_path, "input stack", min_planes=LATERAL_SR_MIN_PLANES,
                                     needed_by="lateral SR (7-plane windows)")
    if checkpoint is None:
        from engines.weights import demo_weights_path

        checkpoint = demo_weights_path("vsi-sr")
        log.warning("using the shipped DEMO VSI-SR weights, trained on simulated data only: not for real specimens")
    from engines.backends import BackendError
    from engines.backends.networks import open_network
    from streamer.pipeline import install_exporter

    install_exporter()  # --backend onnxruntime with a checkpoint: export it on first use

    try:
        model = load_checkpoint(checkpoint) if backend is None else open_network("vsi-sr", checkpoint, backend)
        if otf_dir is not None:
            otfs = load_otfs(otf_dir, params.wavelength_nm)
        else:
            stated = {"wavelength_nm": params.wavelength_nm}
            if voxel is not None and "pixel_size_um" not in (
                    read_optics_mapping(optics_config) if optics_config is not None else {}):
                stated["pixel_size_um"] = voxel[2]  # the OTF's cut-off follows the pixel the input records
            otfs = generate_otfs(load_optics(optics_config, stated))
    except (CheckpointError, OTFError, ConfigError, BackendError, FileNotFoundError) as err:
        raise CLIError(str(err)) from None

    bar = None
    callback = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=volume.shape[0] - 6, unit="plane", desc="lateral-sr")

        def callback(done: int, total: int) -> None:
            bar.n = done
            bar.refresh()

    try:
        with engine_errors(input_path, LateralSRError, device_words=("CUDA", "device")):
            out = lateral_sr(volume, model, otfs, params, device=device, progress=callback)
    finally:
        if bar is not None:
            bar.close()
    data = out if float32 else np.round(out * 65535.0)
    out_voxel = None if voxel is None else (voxel[0], voxel[1] / SCALE, voxel[2] / SCALE)
    write_stack(output_path, data, "float32" if float32 else "uint16", voxel_um=out_voxel)
    return tuple(out.shape)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from engines.config import describe_validation_error
    from engines.vsisr.lateral import LateralSRParams
    from streamer.cli import CLIError

    from streamer.cli.paths import check_input_file, check_output_file

    if args.config is not None and args.otf_dir is not None:
        raise CLIError("--config is only used for synthetic OTFs; drop it or drop --otf-dir")
    check_input_file(args.input, "input stack")
    check_output_file(args.output, inputs=[args.input], overwrite=args.overwrite)
    try:
        params = LateralSRParams(
            otf_weight=args.otf_weight, wiener=args.wiener, apo_factor=args.apo_factor,
            adjust_intensity=args.adjust_intensity, adjust_threshold=args.adjust_threshold, stride=args.stride,
            batch_size=args.batch_size, wavelength_nm=args.wavelength, precision=args.precision,
        )
    except ValidationError as err:
        raise CLIError(describe_validation_error(err, "lateral-sr")) from None
    from streamer.cli.backend_options import backend_config_from_args

    backend = backend_config_from_args(args)
    if backend.backend in ("auto", "torch"):
        # The torch path applies --precision itself (LateralSRParams); the backend's copy would cast the module twice.
        backend = backend.model_copy(update={"precision": "fp32"})
    shape = lateral_sr_file(
        args.input, args.output, args.checkpoint, args.otf_dir, params, device=args.device,
        float32=args.float32, progress=not args.no_progress, optics_config=args.config, backend=backend,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.output} ({shape[0]}×{shape[1]}×{shape[2]}, {'float32' if args.float32 else 'uint16'})")
    return 0
