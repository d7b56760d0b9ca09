"""``rllsm train-fusion``: self-supervised RL-DFN training on registered dual-view volumes."""

from __future__ import annotations

import argparse
import json


def _triple(text: str) -> tuple[int, int, int]:
    parts = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected Z,Y,X (three integers), got '{text}'")
    return parts[0], parts[1], parts[2]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-fusion", help="train RL-DFN (dual-view fusion) without ground truth",
        description="Cycle loss through each view's PSF, PatchGAN losses on oblique sections cut at the view "
                    "angles, TV loss. Data: ROOT/ViewA/*.tif and ROOT/ViewB/*.tif (registered, same names "
                    "sorted) with --psf-a/--psf-b, or --synthetic. Rerun with the same --out to resume.")
    p.add_argument("--out", required=True, help="output folder (rldfn.pt, reference/, state, log)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-folder", metavar="ROOT", help="folder with ViewA/ and ViewB/ TIFF volumes")
    src.add_argument("--synthetic", action="store_true", help="simulate dual-view volumes")
    p.add_argument("--psf-a", help="view-A PSF (TIFF, Z,Y,X on the volumes' grid)")
    p.add_argument("--psf-b", help="view-B PSF (TIFF)")
    p.add_argument("--structure", default="filaments", help="--synthetic structure [filaments]")
    p.add_argument("--volumes", type=int, default=2, help="--synthetic volume pairs [2]")
    p.add_argument("--size", type=_triple, default=(32, 96, 96), help="--synthetic volume Z,Y,X [32,96,96]")
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--patch", type=_triple, default=(64, 256, 256), help="training patch Z,Y,X [64,256,256]")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--width", type=int, default=64, help="fusion network width [64]")
    p.add_argument("--disc-width", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--d-lr", type=float, default=1e-4)
    p.add_argument("--angle", type=float, default=30.8, help="view angle in degrees [30.8]")
    p.add_argument("--rl-step", choices=["registered", "reference"], default="registered",
                   help="RL step the network is trained behind: registered = the one `rllsm reconstruct`/`fuse` run "
                   "with tiling (no shift, coverage-weighted, cycle loss weighted by coverage); reference = the "
                   "reference's own step (for --tile none) [registered]")
    p.add_argument("--jitter", type=float, default=30.0)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _read(path: str):
    import numpy as np
    import tifffile

    from streamer.cli import CLIError

    try:
        return np.asarray(tifffile.imread(path), np.float32)
    except Exception as err:  # noqa: BLE001 - tifffile raises several unrelated types for a bad file
        raise CLIError(f"cannot read {path}: {err}") from None


def run(args: argparse.Namespace) -> int:
    # The folder must be usable before any work (a resume state inside it is kept, by design).
    from pathlib import Path

    from streamer.cli.paths import check_output_dir

    check_output_dir(Path(args.out), ())

    import numpy as np
    from pydantic import ValidationError

    from engines.config import describe_validation_error
    from engines.device import pick_device
    from engines.training.common import TrainingError
    from engines.training.fusion import FusionTrainConfig, train_fusion
    from streamer.cli import CLIError

    try:
        cfg = FusionTrainConfig(steps=args.steps, patch=args.patch, batch_size=args.batch_size, width=args.width,
                                disc_width=args.disc_width, lr=args.lr, d_lr=args.d_lr, view_angle_deg=args.angle,
                                jitter_deg=args.jitter, save_every=args.save_every, seed=args.seed,
                                rl_step=args.rl_step)
        if args.synthetic:
            from engines.training.synthetic_dual import make_dual_view

            rng = np.random.default_rng(args.seed)
            views = []
            for _ in range(args.volumes):
                a, b, _, psf_a, psf_b = make_dual_view(args.structure, args.size, rng, angle_deg=args.angle)
                views.append((a, b))
        else:
            if not (args.psf_a and args.psf_b):
                raise CLIError("--from-folder needs --psf-a and --psf-b (each view's PSF as a TIFF)")
            root = Path(args.from_folder)
            fa, fb = sorted((root / "ViewA").glob("*.tif*")), sorted((root / "ViewB").glob("*.tif*"))
            if not fa or len(fa) != len(fb):
                raise CLIError(f"{root}: need the same number (≥ 1) of TIFFs in ViewA/ and ViewB/; "
                               f"found {len(fa)} and {len(fb)}")
            views = [(_read(str(x)), _read(str(y))) for x, y in zip(fa, fb)]
            views = [(a / max(float(a.max()), 1e-6), b / max(float(b.max()), 1e-6)) for a, b in views]
            psf_a, psf_b = _read(args.psf_a), _read(args.psf_b)
        res = train_fusion(views, psf_a, psf_b, cfg, Path(args.out), device=pick_device(args.device),
                           resume=not args.no_resume, progress=not args.no_progress)
    except ValidationError as err:  # before ValueError, of which it is a subclass with a multi-line text
        raise CLIError(describe_validation_error(err, "train-fusion settings")) from None
    except ValueError as err:
        raise CLIError(str(err)) from None
    except (TrainingError, RuntimeError) as err:
        raise CLIError(str(err)) from None
    print(json.dumps({"out": args.out, "steps": len(res.cycle), "cycle_first": res.cycle[0] if res.cycle else None,
                      "cycle_last": res.cycle[-1] if res.cycle else None}))
    return 0
