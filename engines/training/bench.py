"""Benchmark: wall time of one fine-tuning iteration and one meta-training step, side by side.

``python -m engines.training.bench [--threads 1] [--repeats 2]`` times, on random patches:

* one fine-tuning iteration with the published settings (full VSI-SR, batch 20, 64×64 LLSM patches, SGD);
* one meta-training step with the published network, discriminator and inner loop (3 × (1 D + 3 G) steps,
  task batch 8 = 4 support + 4 query) on ONE task at 32×32 patches — the published 3-task 64×64 step costs
  about 3 × 4 = 12× this (convolution cost scales with pixels and tasks); the full step is also timed with
  ``--full-meta`` where hours of CPU are acceptable;
* the reduced configuration used for the simulated-data claim and the demo weights (32 ch, 2×2 RCABs,
  discriminator base 4, 1 × (1 D + 3 G) inner steps, 3 tasks, 32×32 patches) for both operations.

Each line prints the median of ``--repeats`` runs after one warm-up; ratios are against the fine-tuning
iteration of the same run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from engines.training.discriminator import DiscriminatorConfig, VSIDiscriminator
from engines.training.losses import VSISRLoss
from engines.training.meta import MetaConfig, meta_step
from engines.vsisr.network import VSISR, VSISRConfig


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def finetune_iteration(net: VSISRConfig, batch: int, patch: int):
    model = VSISR(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = VSISRLoss()
    x, y = torch.rand(batch, 7, patch, patch), torch.rand(batch, 3, patch * 3 // 2, patch * 3 // 2)

    def run() -> None:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return run


def meta_iteration(cfg: MetaConfig, tasks: int, patch: int):
    gen, disc = VSISR(cfg.network), VSIDiscriminator(cfg.discriminator)
    g_opt, d_opt = torch.optim.Adam(gen.parameters(), 1e-4), torch.optim.Adam(disc.parameters(), 2e-5)
    loss_fn = VSISRLoss()
    batches = [(torch.rand(cfg.task_batch, 7, patch, patch),
                torch.rand(cfg.task_batch, 3, patch * 3 // 2, patch * 3 // 2)) for _ in range(tasks)]
    return lambda: meta_step(gen, disc, g_opt, d_opt, batches, cfg, loss_fn)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engines.training.bench")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--full-meta", action="store_true", help="also time the published 3-task 64×64 meta-step")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# {platform.machine()}, {args.threads} thread(s), torch {torch.__version__}, "
          f"cuda={torch.cuda.is_available()}")
    small = VSISRConfig(features=32, n_groups=2, n_blocks=2, head_features=64)
    rows = [
        ("finetune iteration, published (64ch 4x4 RCAB, batch 20, 64x64)", finetune_iteration(VSISRConfig(), 20, 64)),
        ("meta step, published net+disc+inner loop, 1 task, 32x32",
         meta_iteration(MetaConfig(), 1, 32)),
        ("finetune iteration, reduced (32ch 2x2 RCAB, batch 20, 32x32)", finetune_iteration(small, 20, 32)),
        ("meta step, reduced (disc base 4, 1x(1D+3G), 3 tasks, 32x32)",
         meta_iteration(MetaConfig(network=small, discriminator=DiscriminatorConfig(base=4), task_iters=1), 3, 32)),
    ]
    if args.full_meta:
        rows.append(("meta step, published, 3 tasks, 64x64", meta_iteration(MetaConfig(), 3, 64)))
    base = None
    for name, fn in rows:
        t = _time(fn, args.repeats)
        base = base or t
        print(f"{name:70s} {t:9.3f} s   ratio {t / base:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
