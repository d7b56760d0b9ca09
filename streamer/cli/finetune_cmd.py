"""``rllsm finetune``: adapt a VSI-SR meta-model to a new structure with a few fine-tuning iterations."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a VSI-SR meta-model on a prepared fine-tuning set",
        description="Published recipe by default: SGD lr 0.25 halved at 10/20/30, batch 20, 30 iterations, "
                    "loss MSE + 0.1·SSIM + 1.0·FFT; masked validation PSNR every --val-every iterations. "
                    "Writes checkpoints in our layout and the published one; rerun to resume.")
    p.add_argument("data", help="folder made by 'rllsm prepare-data' (needs a fine-tuning set)")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--meta-model", metavar="PTH", help="starting weights (published meta_model.pth or ours)")
    start.add_argument("--from-scratch", action="store_true", help="start from random weights (a baseline)")
    p.add_argument("--out", required=True, help="output folder for checkpoints, resume state and log")
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.25)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--lr-milestones", default="10,20,30", help="iterations at which the lr is decayed [10,20,30]")
    p.add_argument("--lr-decay", type=float, default=0.5)
    p.add_argument("--ssim-weight", type=float, default=0.1)
    p.add_argument("--fft-weight", type=float, default=1.0)
    p.add_argument("--val-every", type=int, default=5)
    p.add_argument("--mask-thresh", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", type=int, default=64, help="--from-scratch network width [64]")
    p.add_argument("--groups", type=int, default=4, help="--from-scratch residual groups [4]")
    p.add_argument("--blocks", type=int, default=4, help="--from-scratch RCABs per group [4]")
    p.add_argument("--head-features", type=int, default=256, help="--from-scratch channels after upsampling [256]")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: CUDA when present)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing resume state in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # The folder must be usable before any work (a resume state inside it is kept, by design).
    from pathlib import Path

    from streamer.cli.paths import check_output_dir

    check_output_dir(Path(args.out), ())

    import torch
    from pydantic import ValidationError

    from engines.config import describe_validation_error
    from engines.device import pick_device
    from engines.training.common import TrainingError
    from engines.training.data import TrainingDataError, load_finetune
    from engines.training.finetune import FinetuneConfig, finetune
    from engines.vsisr.checkpoint import CheckpointError, load_checkpoint
    from engines.vsisr.network import VSISR, VSISRConfig
    from streamer.cli import CLIError

    try:
        milestones = tuple(int(v) for v in args.lr_milestones.split(",") if v.strip())
        cfg = FinetuneConfig(iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
                             optimizer=args.optimizer, lr_milestones=milestones, lr_decay=args.lr_decay,
                             ssim_weight=args.ssim_weight, fft_weight=args.fft_weight, val_every=args.val_every,
                             mask_thresh=args.mask_thresh, seed=args.seed)
        device = pick_device(args.device)
        train, val = load_finetune(Path(args.data))
        if args.from_scratch:
            torch.manual_seed(args.seed)
            model = VSISR(VSISRConfig(features=args.features, n_groups=args.groups, n_blocks=args.blocks,
                                      head_features=args.head_features, reduction=min(16, args.features // 2)))
        else:
            model = load_checkpoint(args.meta_model)
        res = finetune(model, train, val, cfg, Path(args.out), device=device, resume=not args.no_resume,
                       progress=not args.no_progress)
    except ValidationError as err:  # before ValueError, of which it is a subclass with a multi-line text
        raise CLIError(describe_validation_error(err, "finetune settings")) from None
    except ValueError as err:
        raise CLIError(str(err)) from None
    except (TrainingDataError, CheckpointError, TrainingError, RuntimeError) as err:
        raise CLIError(str(err)) from None
    print(json.dumps({"out": args.out, "iterations": len(res.losses),
                      "loss_first": res.losses[0] if res.losses else None,
                      "loss_last": res.losses[-1] if res.losses else None,
                      "val_psnr": res.val_psnr}))
    return 0
