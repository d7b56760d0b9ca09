"""``rllsm train-meta``: MAML meta-training of VSI-SR (with its discriminator) over structure tasks."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-meta", help="meta-train VSI-SR (MAML, with discriminator) on prepared tasks",
        description="Published defaults: inner lr 1e-2 (D 2e-3), 3 rounds × (1 D + 3 G) inner steps, outer Adam "
                    "1e-4 (D 2e-5), 3 tasks per meta-step, task batch 8 (4 support + 4 query), first-order. "
                    "Resumable from --out; several GPUs: torchrun --nproc-per-node N -m streamer train-meta …")
    p.add_argument("data", help="folder made by 'rllsm prepare-data' (needs tasks)")
    p.add_argument("--out", required=True, help="output folder (meta_model.pth, meta_model_rllsm.pth, state, log)")
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--meta-batch", type=int, default=3)
    p.add_argument("--task-batch", type=int, default=8)
    p.add_argument("--support", type=int, default=4)
    p.add_argument("--task-iters", type=int, default=3)
    p.add_argument("--g-steps", type=int, default=3)
    p.add_argument("--d-steps", type=int, default=1)
    p.add_argument("--g-lr-inner", type=float, default=1e-2)
    p.add_argument("--d-lr-inner", type=float, default=2e-3)
    p.add_argument("--g-lr-outer", type=float, default=1e-4)
    p.add_argument("--d-lr-outer", type=float, default=2e-5)
    p.add_argument("--adv-weight", type=float, default=0.1)
    p.add_argument("--second-order", action="store_true", help="differentiate through the inner steps")
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", type=int, default=64, help="generator width [64]")
    p.add_argument("--groups", type=int, default=4, help="residual groups [4]")
    p.add_argument("--blocks", type=int, default=4, help="RCABs per group [4]")
    p.add_argument("--head-features", type=int, default=256)
    p.add_argument("--disc-base", type=int, default=32, help="discriminator stem width [32]")
    p.add_argument("--device", default=None)
    p.add_argument("--no-resume", action="store_true")
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
    from engines.training.data import TrainingDataError, load_tasks
    from engines.training.discriminator import DiscriminatorConfig
    from engines.training.meta import MetaConfig, init_distributed_from_env, meta_train
    from engines.vsisr.network import VSISRConfig
    from streamer.cli import CLIError

    try:
        net = VSISRConfig(features=args.features, n_groups=args.groups, n_blocks=args.blocks,
                          head_features=args.head_features, reduction=min(16, args.features // 2))
        cfg = MetaConfig(steps=args.steps, meta_batch=args.meta_batch, task_batch=args.task_batch,
                         support=args.support, task_iters=args.task_iters, g_steps=args.g_steps,
                         d_steps=args.d_steps, g_lr_inner=args.g_lr_inner, d_lr_inner=args.d_lr_inner,
                         g_lr_outer=args.g_lr_outer, d_lr_outer=args.d_lr_outer, adv_weight=args.adv_weight,
                         second_order=args.second_order, save_every=args.save_every, seed=args.seed,
                         network=net, discriminator=DiscriminatorConfig(base=args.disc_base))
        rank, world = init_distributed_from_env()
        device = pick_device(args.device)
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", torch.cuda.current_device())
        tasks = load_tasks(Path(args.data))
        res = meta_train(tasks, cfg, Path(args.out), device=device, resume=not args.no_resume,
                         progress=not args.no_progress)
    except ValidationError as err:  # before ValueError, of which it is a subclass with a multi-line text
        raise CLIError(describe_validation_error(err, "train-meta settings")) from None
    except ValueError as err:
        raise CLIError(str(err)) from None
    except (TrainingDataError, TrainingError, RuntimeError) as err:
        raise CLIError(str(err)) from None
    if rank == 0:
        print(json.dumps({"out": args.out, "steps": len(res.post), "tasks": sorted(tasks),
                          "query_loss_post_first": res.post[0] if res.post else None,
                          "query_loss_post_last": res.post[-1] if res.post else None}))
    return 0
