"""``rllsm reconstruct``: the four steps chained on raw TIFF stacks, intermediates kept on request."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path

from streamer.cli.geometry_io import read_stack, write_stack
from streamer.cli.options import add_memory_budget_arg, add_optics_args, optics_from_args

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reconstruct",
        help="raw sample-scan stack(s) → fused volume(s): preprocess, lateral SR, split views, fuse",
        description="Run the four Meta-rLLS-VSIM steps on one raw TIFF stack or on the raw stacks of a folder "
        "(--pattern; the simulator's ground_truth_* files and our own outputs are skipped). "
        "Mode 'full' needs a VSI-SR checkpoint, OTFs and RL-DFN weights; 'sr-rl' a VSI-SR checkpoint (the "
        "shipped demo weights, trained on simulated data only, are used when none are given); 'classical' no "
        "network. The default 'auto' picks the best that the available weights support: full with --checkpoint "
        "and --model, sr-rl with --checkpoint or the demo weights, else classical. Outputs record their voxel "
        "size; existing outputs are never replaced without --overwrite.",
    )
    p.add_argument("input", type=Path, metavar="IN", help="raw stack (3-D TIFF) or a folder of them")
    p.add_argument("output", type=Path, metavar="OUT", help="output TIFF (for one input) or folder")
    from engines.support import Mode

    p.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.AUTO.value,
                   help="full: VSI-SR + RL-DFN; sr-rl: VSI-SR + joint Richardson–Lucy fusion (no RL-DFN weights "
                   "needed); classical: joint Richardson–Lucy fusion, no network; single-view: ordinary LLSM data "
                   "without a mirror — deskew, VSI-SR when --checkpoint is given, single-view Richardson–Lucy with "
                   "--psf or a computed PSF (the dual-view modes stop and name it when a stack holds no mirror "
                   "image); auto: the best that the available weights support")
    from streamer.cli.paths import DEFAULT_PATTERN, add_overwrite_arg

    p.add_argument("--pattern", default=DEFAULT_PATTERN, metavar="GLOB",
                   help="folder input: which files are raw stacks (ground_truth_* and our outputs are always skipped)")
    add_overwrite_arg(p)
    from streamer.cli.model_options import add_model_args

    # the model-source flags of serve and replay too, generated from one model (engines.sources.ReconSources)
    add_model_args(p, exclude=("weights",), title="model sources", dest_prefix="")
    p.add_argument("--iterations", type=int, default=30, metavar="K",
                   help="Richardson–Lucy iterations (sr-rl, classical, single-view; full: of the estimate that "
                   "replaces RL-DFN where only one view has data; measured against simulated truth in BENCHMARKS.md)")
    p.add_argument("--tile", default="auto", metavar="none|auto|N",
                   help="RL-DFN tiling (default auto); none = the whole volume through the reference's own math "
                   "(its RL step, no alignment, no one-view fill)")
    p.add_argument("--overlap", type=int, default=24, metavar="N", help="RL-DFN tile overlap in voxels")
    add_memory_budget_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stride", type=int, choices=[1, 3], default=1, help="VSI-SR window stride (3: faster)")
    p.add_argument("--keep-intermediates", action="store_true",
                   help="also write preprocessed, lateral-SR and view A/B stacks beside each output")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: CUDA if present)")
    p.add_argument("--float32", action="store_true",
                   help="write float32 in the fusion's own units instead of uint16 (uint16: one gain per run, set "
                   "so the first volume's 99.99th percentile is 16384 counts; see docs/fusion.md)")
    p.add_argument("--gain", type=float, default=None, metavar="G",
                   help="fixed uint16 counts per unit of intensity (default: from the first volume)")
    add_optics_args(p)
    from streamer.distributed.cli import add_cluster_args

    add_cluster_args(p, "one task per stack on a Dask cluster, all written to one OME-Zarr (OUT, or "
                     "OUT/reconstructed.ome.zarr), resumable; docs/distributed.md")
    from streamer.cli.backend_options import add_backend_args

    add_backend_args(p, device=False)  # both networks; --checkpoint/--model may then be `rllsm export` folders
    p.set_defaults(func=run)


def _tile(value: str) -> str | int:
    from streamer.cli import CLIError

    if value in ("none", "auto"):
        return value
    try:
        n = int(value)
    except ValueError:
        raise CLIError(f"--tile must be none, auto or a size in voxels, got {value!r}") from None
    if n < 16:
        raise CLIError(f"--tile {n} is too small; use at least 16 voxels")
    return n


def output_paths(src: Path, dst: Path, keep: bool) -> list[Path]:
    """Every file :func:`reconstruct_file` writes for *src* into *dst*."""
    names = [dst, dst.with_suffix(".json")]
    if keep:
        names += [dst.with_name(f"{dst.stem}.{n}.tif") for n in ("preprocessed", "lateral_sr", "view_a", "view_b")]
    return names


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from engines.config import describe_validation_error
    from engines.support import resolve_mode
    from streamer.cli import CLIError
    from streamer.cli.paths import check_input_file, check_output_dir, check_output_file, folder_inputs

    optics = optics_from_args(args)
    args.mode = resolve_mode(args.mode, vsisr=args.checkpoint is not None, rldfn=args.model is not None)
    many = args.input.is_dir()
    inputs = folder_inputs(args.input, args.pattern) if many else [check_input_file(args.input, "raw stack")]
    from streamer.cli.geometry_io import read_voxel
    from streamer.cli.options import optics_with_voxel

    optics = optics_with_voxel(args, optics, read_voxel(inputs[0]), str(inputs[0]))  # stated values win
    if args.workers is not None or args.scheduler is not None:  # one OME-Zarr on a Dask cluster
        from streamer.distributed.cli import run_reconstruct

        return run_reconstruct(args, inputs, optics)
    # Every output is checked before any weights load or any stack is read: nothing computed is then lost.
    if many:
        if args.output.is_dir() and args.output.samefile(args.input):
            raise CLIError(f"output folder {args.output} is the input folder; choose another folder for the results")
        check_output_dir(args.output, [p.name for src in inputs
                                       for p in output_paths(src, args.output / f"{src.stem}.tif",
                                                             args.keep_intermediates)],
                         inputs=inputs, overwrite=args.overwrite)
    else:
        for out in output_paths(args.input, args.output, args.keep_intermediates):
            check_output_file(out, inputs=inputs, overwrite=args.overwrite)
    try:
        rec = build_reconstructor(args, optics)
    except ValidationError as err:  # a ValueError too, but pydantic's own text spans several lines
        raise CLIError(describe_validation_error(err, "reconstruct")) from None
    except (ValueError, FileNotFoundError) as err:  # every engine error is a ValueError subclass
        raise CLIError(str(err)) from None
    from engines.scaling import OutputScaling

    try:
        scaling = OutputScaling(dtype="float32" if args.float32 else "uint16", gain=args.gain)
    except ValidationError as err:
        raise CLIError(describe_validation_error(err, "reconstruct")) from None
    scalers: dict = {}  # one gain per kind of volume for the whole run: timepoints stay comparable
    from tqdm import tqdm

    with tqdm(total=len(inputs), unit="stack", desc=f"reconstruct ({args.mode})", disable=args.no_progress,
              leave=False) as bar:
        for path in inputs:
            out = args.output / f"{path.stem}.tif" if many else args.output

            def step(name: str, stack: str = path.name) -> None:
                bar.set_postfix_str(f"{stack}: {name}")

            reconstruct_file(rec, path, out, keep=args.keep_intermediates, float32=args.float32,
                             progress=None if args.no_progress else step, scalers=scalers, scaling=scaling)
            bar.update(1)
    return 0


def build_reconstructor(args: argparse.Namespace, optics):
    """Resolve mode, weights (explicit, else demo) and PSFs into an :class:`engines.reconstruct.Reconstructor`."""
    from engines.reconstruct import (ReconModels, Reconstructor, ReconstructParams, demo_models, load_models,
                                     uses_lateral_sr)
    from engines.vsisr.lateral import LateralSRParams
    from streamer.cli import CLIError
    from streamer.cli.backend_options import backend_config_from_args

    networks = uses_lateral_sr(args.mode)
    single_sr = args.mode == "single-view" and args.checkpoint is not None
    backend = backend_config_from_args(args) if networks or single_sr else None
    lateral = LateralSRParams(stride=args.stride, wavelength_nm=optics.wavelength_nm)
    models = ReconModels()
    need_rldfn = args.mode == "full"
    if networks:
        if args.checkpoint is None and args.model is None:
            found = demo_models(optics, backend)
            if found is None:
                raise CLIError(f"mode '{args.mode}' needs --checkpoint{' and --model' if need_rldfn else ''} "
                               "(no demo weights are installed); or use --mode classical")
            log.warning("using the shipped DEMO weights, trained on simulated data only: not for real specimens")
            models = found
        elif args.checkpoint is None or (need_rldfn and args.model is None):
            raise CLIError("mode 'full' needs both --checkpoint (VSI-SR) and --model (RL-DFN)" if need_rldfn
                           else "mode 'sr-rl' needs --checkpoint (VSI-SR)")
        else:
            models = load_models(vsisr_checkpoint=args.checkpoint, otf_dir=args.otf_dir,
                                 rldfn_weights=args.model if need_rldfn else None, optics=optics, backend=backend)
    if single_sr:
        models = load_models(vsisr_checkpoint=args.checkpoint, otf_dir=args.otf_dir, optics=optics, backend=backend)
    extra = load_models(psf=args.psf, psf_voxel_um=tuple(args.psf_voxel_um) if args.psf_voxel_um else None,
                        psf_a=args.psf_a, psf_b=args.psf_b, optics=optics)
    models.psf, models.psf_voxel_um, models.psf_a, models.psf_b = extra.psf, extra.psf_voxel_um, extra.psf_a, extra.psf_b
    if networks and args.otf_dir is not None and models.otfs is None:
        models.otfs = load_models(otf_dir=args.otf_dir, optics=optics).otfs
    models.lateral = lateral
    params = ReconstructParams(mode=args.mode, iterations=args.iterations, tile=_tile(args.tile), overlap=args.overlap,
                               memory_budget_mib=getattr(args, "memory_budget", None))
    return Reconstructor(optics, params, models, device=args.device)


def reconstruct_file(rec, src: Path, dst: Path, keep: bool = False, float32: bool = False,
                     progress: Callable[[str], None] | None = None, scalers: dict | None = None,
                     scaling=None) -> dict:
    """Reconstruct one raw TIFF into ``dst``; writes ``<dst>.json`` with reports and per-step timings.

    ``scalers`` (one :class:`engines.scaling.VolumeScaler` per kind of volume) carries the uint16 gain from the
    first file of a run to the next; ``scaling`` (:class:`engines.scaling.OutputScaling`) is the rule.

    The raw stack is checked first (3-D, numeric, finite, not blank, enough planes for the mode). The fused volume
    and the intermediates record their voxel size.
    """
    from engines.errors import RllsmError
    from engines.scaling import OutputScaling, ScalingError, VolumeScaler
    from engines.support import min_planes, planes_reason
    from streamer.cli import CLIError

    mode = rec.params.mode
    sr = getattr(rec.models, "vsisr", None) is not None  # single-view runs VSI-SR only when it was given
    raw = read_stack(src, "raw stack", min_planes=min_planes(mode, sr), needed_by=planes_reason(mode, sr))
    try:
        res = rec(raw, keep_intermediates=keep, progress=progress)
    except RllsmError as err:
        raise CLIError(f"{src}: {err}") from None
    dtype = "float32" if float32 else "uint16"
    scaling = scaling or OutputScaling(dtype=dtype)
    scalers = {} if scalers is None else scalers

    def scaled(name: str, v):
        try:
            return scalers.setdefault(name, VolumeScaler(scaling))(v)
        except ScalingError as err:
            raise CLIError(f"{src.name}: {name}: {err}") from None

    v = float(res.voxel_um)
    write_stack(dst, scaled("fused", res.fused), dtype, voxel_um=res.voxel_zyx_um or (v, v, v))
    for name, vol in res.intermediates.items():
        # Views share the fused voxel; the stacks before the split keep the deskewed frame's own spacing.
        dz = rec.optics.deskewed_pixel_z_um
        dx = rec.optics.pixel_size_um / (1.5 if name == "lateral_sr" else 1.0)
        voxel = (v, v, v) if name.startswith("view") else (dz, dx, dx)
        write_stack(dst.with_name(f"{dst.stem}.{name}.tif"), scaled(name, vol), dtype, voxel_um=voxel)
    summary = {
        "input": str(src),
        "output": str(dst),
        "mode": rec.params.mode,
        "voxel_um": res.voxel_um,
        "voxel_zyx_um": list(res.voxel_zyx_um) if res.voxel_zyx_um else [res.voxel_um] * 3,
        "shape": list(res.fused.shape),
        "timings_s": res.timings_s,
        "uint16_gain": None if float32 else scalers["fused"].gain,
        "reports": {k: v.model_dump(mode="json") for k, v in res.reports.items()},
    }
    try:
        dst.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    except OSError as err:
        raise CLIError(f"cannot write {dst.with_suffix('.json')}: {err.strerror or err}") from None
    print(f"{src.name} → {dst} {'×'.join(map(str, res.fused.shape))} voxel {res.voxel_um * 1000:.1f} nm "
          + " ".join(f"{k} {v:.2f}s" for k, v in res.timings_s.items()))
    return summary
