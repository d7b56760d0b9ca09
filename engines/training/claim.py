"""The meta-learning claim on simulated data, as one reproducible run.

``python -m engines.training.claim OUT [--steps N] [--seeds 0,1,2] …`` prepares simulated tasks (several
structures) plus a fine-tuning set of a structure absent from the tasks, meta-trains VSI-SR, then for every
seed compares on the held-out cells of the unseen structure:

* the meta-model without fine-tuning,
* the meta-model after ``--ft-iterations`` fine-tuning iterations (published recipe),
* the same architecture from random initialisation after the same fine-tuning.

Results (every validation PSNR, per seed, and mean ± standard deviation) go to ``OUT/claim.json``. The run
is resumable: meta-training continues from ``OUT/meta`` and finished seeds are not redone.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engines.training.data import load_finetune, load_tasks, read_index
from engines.training.discriminator import DiscriminatorConfig
from engines.training.finetune import FinetuneConfig, finetune
from engines.training.meta import MetaConfig, meta_train
from engines.training.prepare import PrepareConfig, SyntheticSource, prepare_synthetic
from engines.vsisr.checkpoint import load_checkpoint
from engines.vsisr.network import VSISR, VSISRConfig


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "min": float(np.min(values)),
            "max": float(np.max(values))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engines.training.claim", description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=300, help="meta-training steps")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--head-features", type=int, default=64)
    p.add_argument("--disc-base", type=int, default=4)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--task-iters", type=int, default=1)
    p.add_argument("--g-steps", type=int, default=3)
    p.add_argument("--g-lr-outer", type=float, default=1e-4)
    p.add_argument("--ft-iterations", type=int, default=30)
    p.add_argument("--ft-batch", type=int, default=20)
    p.add_argument("--ft-lr", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default=None, help="use this prepared data root instead of OUT/data")
    p.add_argument("--meta-dir", default=None, help="meta-training folder (resumed if present) instead of OUT/meta")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data"
    meta_dir = Path(args.meta_dir) if args.meta_dir else out / "meta"
    t0 = time.time()
    if not (data / "index.json").is_file():
        prepare_synthetic(data, PrepareConfig(patch=args.patch, patches_per_task=600, finetune_patches=300,
                                              val_crop=96, seed=0),
                          SyntheticSource(task_structures=("filaments", "puncta", "tubules", "meshwork"),
                                          finetune_structure="rings", cells_per_structure=3, planes=12, size=96))
    t_prep = time.time() - t0
    net = VSISRConfig(features=args.features, n_groups=args.groups, n_blocks=args.blocks,
                      head_features=args.head_features, reduction=min(16, args.features // 2))
    mcfg = MetaConfig(steps=args.steps, network=net, discriminator=DiscriminatorConfig(base=args.disc_base),
                      task_iters=args.task_iters, g_steps=args.g_steps, g_lr_outer=args.g_lr_outer,
                      save_every=25, seed=0)
    t0 = time.time()
    meta = meta_train(load_tasks(data), mcfg, meta_dir, progress=True)
    t_meta = time.time() - t0
    meta_model = load_checkpoint(meta_dir / "meta_model_rllsm.pth")
    train, val = load_finetune(data)
    fcfg = FinetuneConfig(iterations=args.ft_iterations, batch_size=args.ft_batch, lr=args.ft_lr, val_every=5)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "claim.json"
    runs = json.loads(results_path.read_text())["runs"] if results_path.is_file() else {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        key = str(seed)
        if key in runs:
            continue
        t0 = time.time()
        tuned = finetune(copy.deepcopy(meta_model), train, val, fcfg.model_copy(update={"seed": seed}),
                         progress=True)
        torch.manual_seed(1000 + seed)
        scratch = finetune(VSISR(net), train, val, fcfg.model_copy(update={"seed": seed}), progress=True)
        runs[key] = {"meta_no_finetune": tuned.val_psnr[0][1], "meta_finetuned": tuned.val_psnr[-1][1],
                     "scratch_finetuned": scratch.val_psnr[-1][1], "scratch_init": scratch.val_psnr[0][1],
                     "meta_curve": tuned.val_psnr, "scratch_curve": scratch.val_psnr,
                     "meta_losses": tuned.losses, "scratch_losses": scratch.losses,
                     "seconds": time.time() - t0}
        results_path.write_text(json.dumps({"runs": runs}, indent=1))
    summary = {k: _summary([r[k] for r in runs.values()])
               for k in ("meta_no_finetune", "meta_finetuned", "scratch_finetuned", "scratch_init")}
    report = {
        "command": "python -m engines.training.claim " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} {torch.get_num_threads()} thread(s), torch {torch.__version__}",
        "network": net.model_dump(), "meta_config": mcfg.model_dump(mode="json"),
        "finetune_config": fcfg.model_dump(), "dataset": read_index(data)["provenance"],
        "tasks": sorted(load_tasks(data)), "unseen_structure": read_index(data)["finetune"]["structure"],
        "seconds": {"prepare": t_prep, "meta_train_this_session": t_meta},
        "meta_query_loss_first_last": [meta.post[:10], meta.post[-10:]],
        "summary_psnr_db": summary, "runs": runs,
    }
    results_path.write_text(json.dumps(report, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
