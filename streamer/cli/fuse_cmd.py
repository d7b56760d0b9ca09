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
        "Richardson–Lucy deconvolution (no network). Writes a float32 TIFF.",
    )
    p.add_argument("view_a", type=Path, metavar="VIEW_A", help="view A, TIFF (Z, Y, X)")
    p.add_argument("view_b", type=Path, metavar="VIEW_B", help="view B, TIFF (Z, Y, X), same grid as view A")
    p.add_argument("out", type=Path, metavar="OUT", help="output TIFF (float32)")
    p.add_argument("--mode", choices=["rldfn", "classical"], default="rldfn",
                   help="rldfn: trained network (default); classical: joint RL deconvolution, no weights needed")
    p.add_argument("--model", type=Path, metavar="PATH",
                   help="RL-DFN weights: a reference checkpoint folder (net_FA.pth, net_FB.pth, net_G.pth), an "
                        "rllsm .pt file, or (with --backend onnxruntime/tensorrt) an `rllsm export` folder")
    psfs = p.add_argument_group("PSFs (either --psf-a and --psf-b, or --psf to be rotated into both)")
    psfs.add_argument("--psf-a", type=Path, metavar="TIF", help="PSF of view A on the views' grid")
    psfs.add_argument("--psf-b", type=Path, metavar="TIF", help="PSF of view B on the views' grid")
    psfs.add_argument("--psf", type=Path, metavar="TIF",
                      help="one measured detection PSF (bead stack); background removed, centred, then rotated by "
                           "±--angle into view A's and view B's PSFs")
    psfs.add_argument("--angle", type=float, default=30.8, metavar="DEG",
                      help="objective angle for --psf (degrees, default 30.8)")
    psfs.add_argument("--psf-voxel", type=float, nargs=3, metavar=("DZ", "DY", "DX"),
                      help="voxel size of --psf in µm (default: --view-voxel)")
    psfs.add_argument("--view-voxel", type=float, nargs=3, default=None, metavar=("DZ", "DY", "DX"),
                      help="voxel size of the views in µm (needed with --psf when it differs from --psf-voxel)")
    p.add_argument("--tile", type=_tile_arg, default="none", metavar="none|auto|N",
                   help="rldfn: 'none' = whole volume in one pass (default); N = tiles of N³ voxels (multiple of 4); "
                        "'auto' = largest tile within --memory-budget")
    p.add_argument("--overlap", type=int, default=None, metavar="N",
                   help="rldfn: voxels shared by neighbouring tiles (default 24; rounded up to a multiple of 4)")
    p.add_argument("--memory-budget", type=float, default=None, metavar="MiB",
                   help="rldfn: refuse (or, with --tile auto, size tiles for) patches estimated above this memory")
    p.add_argument("--batch", type=int, default=1, metavar="N",
                   help="rldfn: tiles run together (faster on a GPU, N× the memory; default 1)")
    p.add_argument("--iterations", type=int, default=10, metavar="K",
                   help="classical: joint RL iterations (default 10); RL-DFN always does one RL step")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: CUDA when present)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from streamer.cli.backend_options import add_backend_args

    add_backend_args(p, device=False)  # --backend runs the network; the RL step stays in torch (FFT, FP32)
    p.set_defaults(func=run)


def _read_volume(path: Path, what: str):
    import numpy as np
    import tifffile

    from streamer.cli import CLIError

    if not path.is_file():
        raise CLIError(f"{what} file not found: {path}")
    try:
        arr = np.squeeze(tifffile.imread(path))
    except Exception as err:  # tifffile raises many types for non-TIFF or truncated files
        raise CLIError(f"{what} {path}: not a readable TIFF ({type(err).__name__}: {err})") from None
    if arr.ndim != 3:
        raise CLIError(f"{what} {path}: need a 3-D stack (Z, Y, X), the file holds shape {arr.shape}")
    return arr.astype(np.float32, copy=False)


def psfs_from_args(args: argparse.Namespace):
    """The two views' PSFs from ``--psf-a/--psf-b`` or from one ``--psf`` rotated by ±``--angle``."""
    from streamer.cli import CLIError

    pair = args.psf_a is not None, args.psf_b is not None
    if args.psf is not None:
        if any(pair):
            raise CLIError("give either --psf-a and --psf-b, or --psf, not both")
        from engines.rldfn.errors import FusionError
        from engines.rldfn.psf import clean_psf, dual_view_psfs

        view_voxel = args.view_voxel or args.psf_voxel or (1.0, 1.0, 1.0)
        psf_voxel = args.psf_voxel or view_voxel
        try:
            return dual_view_psfs(clean_psf(_read_volume(args.psf, "PSF")), args.angle, psf_voxel, view_voxel)
        except FusionError as err:
            raise CLIError(f"--psf {args.psf}: {err}") from None
    if not all(pair):
        raise CLIError("the views' PSFs are needed: --psf-a TIF and --psf-b TIF, or one --psf TIF to rotate")
    return _read_volume(args.psf_a, "PSF A"), _read_volume(args.psf_b, "PSF B")


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
    iterations: int = 10,
    device: str | None = None,
    progress: bool = True,
    batch: int = 1,
    backend: object = None,
) -> Path:
    """Read the views (and PSFs given as paths), fuse them, write ``out`` as a float32 TIFF; returns ``out``.

    ``backend`` (:class:`engines.backends.BackendConfig`, default: the torch module) chooses what runs the
    fusion network (:func:`engines.backends.networks.open_network`).

    Raises :class:`streamer.cli.CLIError` for anything the user can fix (missing files, wrong shapes,
    unknown checkpoint layout, memory budget too small, a backend that cannot run here).
    """
    import torch
    from tqdm import tqdm

    from engines.device import pick_device
    from engines.rldfn.errors import FusionError
    from streamer.cli import CLIError
    from streamer.cli.geometry_io import write_stack

    if mode not in ("rldfn", "classical"):
        raise CLIError(f"--mode must be rldfn or classical, got {mode!r}")
    if mode == "rldfn" and model is None:
        raise CLIError("--mode rldfn needs --model (RL-DFN weights); without weights use --mode classical")
    try:
        dev = pick_device(device)
    except (RuntimeError, ValueError) as err:
        raise CLIError(str(err)) from None
    a, b = _read_volume(view_a, "view A"), _read_volume(view_b, "view B")
    pa = _read_volume(psf_a, "PSF A") if isinstance(psf_a, Path) else psf_a
    pb = _read_volume(psf_b, "PSF B") if isinstance(psf_b, Path) else psf_b
    bar = tqdm(total=None, desc=f"fuse ({mode})", unit="step", disable=not progress, leave=False)

    def tick(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    t0 = time.perf_counter()
    try:
        if mode == "classical":
            from engines.rldfn.classical import classical_fuse

            fused = classical_fuse(a, b, pa, pb, iterations=iterations, device=dev, progress=tick)
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
            budget = None if memory_budget_mib is None else int(memory_budget_mib * 2**20)
            with torch.inference_mode():
                fused = fuse_rldfn(a, b, RLDFN(net, pa, pb), tile=tile,  # type: ignore[arg-type]
                                   overlap=DEFAULT_OVERLAP if overlap is None else overlap, device=dev,
                                   memory_budget_bytes=budget, progress=tick, batch_size=batch)
    except FusionError as err:
        raise CLIError(str(err)) from None
    finally:
        bar.close()
    log.info("fused %s in %.2f s on %s", "×".join(map(str, fused.shape)), time.perf_counter() - t0, dev)
    write_stack(out, fused, "float32")
    return out


def run(args: argparse.Namespace) -> int:
    from streamer.cli import CLIError

    if args.mode == "classical" and (args.tile != "none" or args.overlap is not None or args.model is not None
                                     or args.batch != 1):
        raise CLIError("--tile, --overlap, --batch and --model apply to --mode rldfn only")
    if args.batch < 1:
        raise CLIError(f"--batch must be ≥ 1, got {args.batch}")
    if args.iterations < 1:
        raise CLIError(f"--iterations must be ≥ 1, got {args.iterations}")
    if args.tile == "auto" and args.memory_budget is None:
        raise CLIError("--tile auto needs --memory-budget MiB")
    from streamer.cli.backend_options import backend_config_from_args

    backend = backend_config_from_args(args) if args.mode == "rldfn" else None
    psf_a, psf_b = psfs_from_args(args)
    out = fuse_files(args.view_a, args.view_b, args.out, psf_a, psf_b, mode=args.mode, model=args.model,
                     tile=args.tile, overlap=args.overlap, memory_budget_mib=args.memory_budget,
                     iterations=args.iterations, device=args.device, progress=not args.no_progress,
                     batch=args.batch, backend=backend)
    print(out)
    return 0
