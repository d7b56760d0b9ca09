"""``rllsm fuse``: step 4, fuse the two registered views into one volume (RL-DFN or classical joint RL)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)


def _tile_arg(text: str) -> str | int:
    if text in ("none", "auto"):
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tile must be 'none', 'auto' or a number of voxels, got {text!r}") from None
    if n <= 0 or n % 4:
        raise argparse.ArgumentTypeError(f"--tile {n}: must be a positive multiple of 4 (the network pools twice)")
    return n


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fuse",
        help="fuse the two views of a stack into one isotropic volume (step 4)",
        description="Fuse view A and view B (registered onto one grid, TIFF Z×Y×X) into one volume, either with "
        "RL-DFN (one Richardson–Lucy step + trained network; needs --model) or by classical joint "
        "Richardson–Lucy deconvolution (no network). Without measured PSFs the detection PSF is computed from "
        "the optics (as `rllsm reconstruct` does) on the views' voxel, which the view files record. Writes a "
        "float32 TIFF recording the same voxel size.",
    )
    p.add_argument("view_a", type=Path, metavar="VIEW_A", help="view A, TIFF (Z, Y, X)")
    p.add_argument("view_b", type=Path, metavar="VIEW_B", help="view B, TIFF (Z, Y, X), same grid as view A")
    p.add_argument("out", type=Path, metavar="OUT", help="output TIFF (float32)")
    p.add_argument("--mode", choices=["auto", "rldfn", "classical"], default="auto",
                   help="rldfn: trained network; classical: joint RL deconvolution, no weights needed; auto: rldfn "
                   "when --model is given, else classical (the rule every command uses, see README)")
    p.add_argument("--model", type=Path, metavar="PATH",
                   help="RL-DFN weights: a reference checkpoint folder (net_FA.pth, net_FB.pth, net_G.pth), an "
                        "rllsm .pt file, or (with --backend onnxruntime/tensorrt) an `rllsm export` folder")
    psfs = p.add_argument_group("PSFs (--psf-a and --psf-b, or --psf to be rotated into both; "
                                "default: computed from the optics)")
    psfs.add_argument("--psf-a", type=Path, metavar="TIF", help="PSF of view A on the views' grid")
    psfs.add_argument("--psf-b", type=Path, metavar="TIF", help="PSF of view B on the views' grid")
    psfs.add_argument("--psf", type=Path, metavar="TIF",
                      help="one measured detection PSF (bead stack); background removed, centred, then rotated by "
                           "±--angle into view A's and view B's PSFs")
    psfs.add_argument("--angle", type=float, default=None, metavar="DEG",
                      help="objective angle for --psf or the computed PSF (degrees; default: the optics' "
                      "--objective-angle-deg, 30.8)")
    psfs.add_argument("--psf-voxel", type=float, nargs=3, metavar=("DZ", "DY", "DX"),
                      help="voxel size of --psf in µm (default: --view-voxel)")
    psfs.add_argument("--view-voxel", type=float, nargs=3, default=None, metavar=("DZ", "DY", "DX"),
                      help="voxel size of the views in µm (default: what the view files record)")
    p.add_argument("--tile", type=_tile_arg, default="none", metavar="none|auto|N",
                   help="rldfn: 'none' = whole volume in one pass (default); N = tiles of N³ voxels (multiple of 4); "
                        "'auto' = largest tile within --memory-budget (default: as rllsm reconstruct, from the "
                        "device's memory)")
    p.add_argument("--overlap", type=int, default=None, metavar="N",
                   help="rldfn: voxels shared by neighbouring tiles (default 24; rounded up to a multiple of 4)")
    from streamer.cli.options import add_memory_budget_arg

    add_memory_budget_arg(p)
    p.add_argument("--batch", type=int, default=1, metavar="N",
                   help="rldfn: tiles run together (faster on a GPU, N× the memory; default 1)")
    p.add_argument("--iterations", type=int, default=30, metavar="K",
                   help="classical: joint RL iterations (default 30); rldfn with --tile auto/N: iterations of the "
                   "coverage-weighted RL estimate that replaces the network where only one view has data (the "
                   "network itself always does one RL step; --tile none keeps the reference's math, no fill)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: CUDA when present)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from streamer.cli.backend_options import add_backend_args

    add_backend_args(p, device=False)  # --backend runs the network; the RL step stays in torch (FFT, FP32)
    from streamer.cli.options import add_optics_args
    from streamer.cli.paths import add_overwrite_arg

    add_optics_args(p)  # emission wavelength, NA, refractive index of the computed PSF
    add_overwrite_arg(p)
    p.set_defaults(func=run)


def _read_volume(path: Path, what: str, check_values: bool = True):
    import numpy as np

    from streamer.cli.geometry_io import read_stack

    return read_stack(path, what, check_values=check_values).astype(np.float32, copy=False)


def psfs_from_args(args: argparse.Namespace, view_voxel: tuple[float, float, float] | None = None):
    """The two views' PSFs from ``--psf-a/--psf-b``, from one ``--psf`` rotated by ±angle, or computed.

    Computed (no PSF given): the widefield detection PSF of the optics (emission, NA, refractive index) on the
    views' voxel, rotated into both views exactly as :func:`engines.reconstruct.view_psfs` does.
    """
    from engines.rldfn.errors import FusionError
    from engines.rldfn.psf import clean_psf, computed_psf, dual_view_psfs
    from streamer.cli import CLIError
    from streamer.cli.options import optics_from_args

    optics = optics_from_args(args)
    angle = args.angle if args.angle is not None else optics.objective_angle_deg
    pair = args.psf_a is not None, args.psf_b is not None
    if args.psf is not None:
        if any(pair):
            raise CLIError("give either --psf-a and --psf-b, or --psf, not both")
        view_voxel = tuple(args.view_voxel) if args.view_voxel else view_voxel
        view_voxel = view_voxel or (tuple(args.psf_voxel) if args.psf_voxel else (1.0, 1.0, 1.0))
        psf_voxel = tuple(args.psf_voxel) if args.psf_voxel else view_voxel
        try:
            return dual_view_psfs(clean_psf(_read_volume(args.psf, "PSF", check_values=False)), angle, psf_voxel,
                                  view_voxel)
        except FusionError as err:
            raise CLIError(f"--psf {args.psf}: {err}") from None
    if any(pair) and not all(pair):
        raise CLIError("give both --psf-a and --psf-b (or one --psf to rotate, or none to compute them)")
    if all(pair):
        return _read_volume(args.psf_a, "PSF A", False), _read_volume(args.psf_b, "PSF B", False)
    from engines.reconstruct import PSF_BOX

    voxel = tuple(args.view_voxel) if args.view_voxel else view_voxel
    if voxel is None:
        raise CLIError("the view files record no voxel size: give --view-voxel DZ DY DX to compute the PSFs, "
                       "or measured ones (--psf-a/--psf-b or --psf)")
    v = float(voxel[2])
    box = (PSF_BOX, PSF_BOX, PSF_BOX)
    psf = computed_psf(box, (v, v, v), optics.emission_nm, optics.na_detection, optics.refractive_index,
                       sheet_fwhm_um=optics.sheet_fwhm_um)
    return dual_view_psfs(psf, angle, (v, v, v), (v, v, v), box)


def fuse_files(
    view_a: Path,
    view_b: Path,
    out: Path,
    psf_a: Path | np.ndarray,
    psf_b: Path | np.ndarray,
    mode: str = "rldfn",
    model: Path | None = None,
    tile: str | int = "none",
    overlap: int | None = None,
    memory_budget_mib: float | None = None,
    iterations: int = 30,
    device: str | None = None,
    progress: bool = True,
    batch: int = 1,
    backend: object = None,
    overwrite: bool = False,
) -> Path:
    """Read the views (and PSFs given as paths), fuse them, write ``out`` as a float32 TIFF; returns ``out``.

    ``backend`` (:class:`engines.backends.BackendConfig`, default: the torch module) chooses what runs the
    fusion network (:func:`engines.backends.networks.open_network`).

    Raises :class:`streamer.cli.CLIError` for anything the user can fix (missing files, wrong shapes,
    unknown checkpoint layout, memory budget too small, a backend that cannot run here).
    """
    import numpy as np
    import torch
    from tqdm import tqdm

    from engines.device import pick_device
    from engines.rldfn.errors import FusionError
    from engines.support import mib_to_bytes, parse_memory_budget
    from streamer.cli import CLIError
    from streamer.cli.geometry_io import read_stack, write_stack

    memory_budget_mib = parse_memory_budget(memory_budget_mib)  # MiB (engines.support.MemoryBudgetMiB) or None: auto
    if mode not in ("rldfn", "classical"):
        raise CLIError(f"--mode must be rldfn or classical, got {mode!r}")
    if mode == "auto":
        mode = "rldfn" if model is not None else "classical"
    if mode == "rldfn" and model is None:
        raise CLIError("--mode rldfn needs --model (RL-DFN weights); without weights use --mode classical")
    try:
        dev = pick_device(device)
    except (RuntimeError, ValueError) as err:
        raise CLIError(str(err)) from None
    from streamer.cli.geometry_io import read_stack_voxel
    from streamer.cli.paths import check_output_file

    check_output_file(out, inputs=[view_a, view_b], overwrite=overwrite)
    a, voxel = read_stack_voxel(view_a, "view A")
    b = read_stack(view_b, "view B")
    a, b = a.astype(np.float32, copy=False), b.astype(np.float32, copy=False)
    pa = _read_volume(psf_a, "PSF A", False) if isinstance(psf_a, Path) else psf_a
    pb = _read_volume(psf_b, "PSF B", False) if isinstance(psf_b, Path) else psf_b
    bar = tqdm(total=None, desc=f"fuse ({mode})", unit="step", disable=not progress, leave=False)

    def tick(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    t0 = time.perf_counter()
    try:
        if mode == "classical":
            from engines.device import default_memory_budget_mib
            from engines.rldfn.classical import classical_fuse

            mib = default_memory_budget_mib(dev) if memory_budget_mib is None else memory_budget_mib
            fused = classical_fuse(a, b, pa, pb, iterations=iterations, device=dev, progress=tick,
                                   memory_budget_bytes=mib_to_bytes(mib))
        else:
            from engines.rldfn.checkpoint import load_rldfn
            from engines.rldfn.fuse import DEFAULT_OVERLAP, fuse_rldfn
            from engines.rldfn.model import RLDFN

            if backend is None:
                net = load_rldfn(model)  # type: ignore[arg-type]
            else:
                from engines.backends import BackendError
                from engines.backends.networks import open_network
                from streamer.pipeline import install_exporter

                install_exporter()  # --backend onnxruntime with a checkpoint: export it on first use
                try:
                    net = open_network("rl-dfn", model, backend)  # type: ignore[arg-type]
                except BackendError as err:
                    raise CLIError(f"--model {model}: {err}") from None
            if memory_budget_mib is None and tile == "auto":
                from engines.device import default_memory_budget_mib

                memory_budget_mib = default_memory_budget_mib(dev)
            budget = None if memory_budget_mib is None else mib_to_bytes(memory_budget_mib)
            reports: dict = {}
            with torch.inference_mode():
                fused = fuse_rldfn(a, b, RLDFN(net, pa, pb), tile=tile,  # type: ignore[arg-type]
                                   overlap=DEFAULT_OVERLAP if overlap is None else overlap, device=dev,
                                   memory_budget_bytes=budget, progress=tick, batch_size=batch,
                                   one_view_iterations=iterations, reports=reports)
            if (reg := reports.get("registration")) is not None and reg.spread_voxels is not None:
                log.info("network output against its views: %s voxel removed, spread %.2f voxel over the volume",
                         "/".join(f"{s:+.2f}" for s in reg.removed_voxels), reg.spread_voxels)
    except FusionError as err:
        raise CLIError(str(err)) from None
    finally:
        bar.close()
    log.info("fused %s in %.2f s on %s", "×".join(map(str, fused.shape)), time.perf_counter() - t0, dev)
    write_stack(out, fused, "float32", voxel_um=voxel)
    return out


def run(args: argparse.Namespace) -> int:
    from streamer.cli import CLIError

    if args.mode == "auto":  # the one default rule: the network when its weights are given
        args.mode = "rldfn" if args.model is not None else "classical"
    if args.mode == "classical" and (args.tile != "none" or args.overlap is not None or args.model is not None
                                     or args.batch != 1):
        raise CLIError("--tile, --overlap, --batch and --model apply to --mode rldfn only")
    if args.mode == "rldfn" and args.model is None:
        raise CLIError("--mode rldfn needs --model (RL-DFN weights); without weights use --mode classical")
    if args.batch < 1:
        raise CLIError(f"--batch must be ≥ 1, got {args.batch}")
    if args.iterations < 1:
        raise CLIError(f"--iterations must be ≥ 1, got {args.iterations}")
    from streamer.cli.backend_options import backend_config_from_args
    from streamer.cli.geometry_io import read_voxel
    from streamer.cli.paths import check_input_file, check_output_file

    for path, what in ((args.view_a, "view A"), (args.view_b, "view B")):
        check_input_file(path, what)
    psf_a, psf_b = psfs_from_args(args, read_voxel(args.view_a))  # flag mistakes first; a PSF is small
    check_output_file(args.out, inputs=[args.view_a, args.view_b], overwrite=args.overwrite)
    backend = backend_config_from_args(args) if args.mode != "classical" and args.model is not None else None
    out = fuse_files(args.view_a, args.view_b, args.out, psf_a, psf_b, mode=args.mode, model=args.model,
                     tile=args.tile, overlap=args.overlap, memory_budget_mib=args.memory_budget,
                     iterations=args.iterations, device=args.device, progress=not args.no_progress,
                     batch=args.batch, backend=backend, overwrite=args.overwrite)
    print(out)
    return 0
