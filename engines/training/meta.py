"""MAML meta-training of VSI-SR together with its discriminator (``rllsm train-meta``).

Each meta-step draws ``meta_batch`` tasks (structures); a task batch of ``task_batch`` patches is split into
a support set (first ``support``) and a query set. On the support set the discriminator and the generator
are adapted with plain gradient steps on *copies* of their weights (``torch.func.functional_call``):
``task_iters`` rounds of ``d_steps`` discriminator steps then ``g_steps`` generator steps (published: 3
rounds × (1 + 3)). The adapted weights are scored on the query set; the mean query losses over the tasks
update the starting weights with Adam (generator 1e-4, discriminator 2e-5). By default the inner gradients
are treated as constants (first-order MAML, as the published default); ``second_order`` back-propagates
through them.

With several processes (``torchrun --nproc-per-node N -m streamer train-meta …``) each rank adapts its
own tasks and the outer gradients are averaged with an all-reduce, the same arithmetic as
DistributedDataParallel, which cannot wrap a ``functional_call`` inner loop.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch.func import functional_call

from engines.support import StrictModel
from engines.training.common import (
    Monitor,
    TrainingError,
    atomic_save,
    load_resume_state,
    restore_rng,
    rng_state,
    seed_everything,
)
from engines.training.data import PatchSet
from engines.training.discriminator import (
    DiscriminatorConfig,
    VSIDiscriminator,
    adversarial_loss,
)
from engines.training.losses import VSISRLoss
from engines.vsisr.checkpoint import reference_state_dict, save_checkpoint
from engines.vsisr.network import VSISR, VSISRConfig

STATE_NAME = "meta_state.pt"
Params = dict[str, torch.Tensor]


class MetaConfig(StrictModel):
    """Meta-training hyper-parameters (defaults: the published ones)."""

    version: Literal[1] = 1
    steps: int = Field(100_000, ge=1, le=10_000_000, description="Meta (outer) steps.")
    meta_batch: int = Field(3, ge=1, le=64, description="Tasks per meta-step (per process).")
    task_batch: int = Field(8, ge=2, le=4096, description="Patches drawn per task (support + query).")
    support: int = Field(4, ge=1, le=4096, description="Patches of the task batch used for adaptation.")
    task_iters: int = Field(3, ge=1, le=100, description="Adaptation rounds per task.")
    g_steps: int = Field(3, ge=1, le=100, description="Generator inner steps per round.")
    d_steps: int = Field(1, ge=0, le=100, description="Discriminator inner steps per round.")
    g_lr_inner: float = Field(1e-2, gt=0, le=10)
    d_lr_inner: float = Field(2e-3, gt=0, le=10)
    g_lr_outer: float = Field(1e-4, gt=0, le=1)
    d_lr_outer: float = Field(2e-5, gt=0, le=1)
    adv_weight: float = Field(0.1, ge=0, le=100, description="Weight of the adversarial term of the G loss.")
    ssim_weight: float = Field(0.1, ge=0, le=100)
    fft_weight: float = Field(1.0, ge=0, le=100)
    second_order: bool = False
    save_every: int = Field(1000, ge=1, le=10_000_000)
    seed: int = 0
    network: VSISRConfig = VSISRConfig()
    discriminator: DiscriminatorConfig = DiscriminatorConfig()


@dataclass
class MetaResult:
    """Per-step mean query losses before and after adaptation (generator, incl. adversarial term)."""

    pre: list[float] = field(default_factory=list)
    post: list[float] = field(default_factory=list)
    generator: VSISR | None = None
    discriminator: VSIDiscriminator | None = None


def _params(m: torch.nn.Module) -> Params:
    return dict(m.named_parameters())


def _sgd(params: Params, loss: torch.Tensor, lr: float, create_graph: bool) -> Params:
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
    return {k: p - lr * g for (k, p), g in zip(params.items(), grads)}


def adapt(gen: VSISR, disc: VSIDiscriminator, xs: torch.Tensor, ys: torch.Tensor, cfg: MetaConfig,
          loss_fn: VSISRLoss, g: Params | None = None, d: Params | None = None,
          create_graph: bool = False) -> tuple[Params, Params]:
    """Adapt copies of the generator and discriminator weights to one task's support set."""
    g = dict(g) if g is not None else _params(gen)
    d = dict(d) if d is not None else _params(disc)
    for _ in range(cfg.task_iters):
        for _ in range(cfg.d_steps):
            fake = functional_call(gen, g, (xs,)).detach()
            d_loss = 0.5 * (adversarial_loss(functional_call(disc, d, (ys,)), True)
                            + adversarial_loss(functional_call(disc, d, (fake,)), False))
            d = _sgd(d, d_loss, cfg.d_lr_inner, create_graph)
        for _ in range(cfg.g_steps):
            fake = functional_call(gen, g, (xs,))
            g_loss = loss_fn(fake, ys) + cfg.adv_weight * adversarial_loss(functional_call(disc, d, (fake,)), True)
            g = _sgd(g, g_loss, cfg.g_lr_inner, create_graph)
    return g, d


def query_losses(gen: VSISR, disc: VSIDiscriminator, g: Params, d: Params, xq: torch.Tensor, yq: torch.Tensor,
                 cfg: MetaConfig, loss_fn: VSISRLoss) -> tuple[torch.Tensor, torch.Tensor]:
    """Generator and discriminator losses of (adapted) weights on a query set."""
    fake = functional_call(gen, g, (xq,))
    g_loss = loss_fn(fake, yq) + cfg.adv_weight * adversarial_loss(functional_call(disc, d, (fake,)), True)
    d_loss = 0.5 * (adversarial_loss(functional_call(disc, d, (yq,)), True)
                    + adversarial_loss(functional_call(disc, d, (fake.detach(),)), False))
    return g_loss, d_loss


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _allreduce_grads(modules: list[torch.nn.Module]) -> None:
    _, world = _dist()
    if world == 1:
        return
    for m in modules:
        for p in m.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
                p.grad /= world


def meta_step(gen: VSISR, disc: VSIDiscriminator, g_opt: torch.optim.Optimizer, d_opt: torch.optim.Optimizer,
              batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: MetaConfig, loss_fn: VSISRLoss,
              ) -> tuple[float, float]:
    """One outer update from a list of task batches; returns mean query G loss before and after adaptation."""
    g_total, d_total, pre = 0.0, 0.0, 0.0
    for x, y in batches:
        xs, ys, xq, yq = x[:cfg.support], y[:cfg.support], x[cfg.support:], y[cfg.support:]
        with torch.no_grad():
            pre += float(query_losses(gen, disc, _params(gen), _params(disc), xq, yq, cfg, loss_fn)[0])
        g, d = adapt(gen, disc, xs, ys, cfg, loss_fn, create_graph=cfg.second_order)
        gl, dl = query_losses(gen, disc, g, d, xq, yq, cfg, loss_fn)
        g_total = g_total + gl / len(batches)
        d_total = d_total + dl / len(batches)
    g_grads = torch.autograd.grad(g_total, list(gen.parameters()), retain_graph=True, allow_unused=True)
    d_grads = torch.autograd.grad(d_total, list(disc.parameters()), allow_unused=True)
    for ps, grads in ((gen.parameters(), g_grads), (disc.parameters(), d_grads)):
        for p, gr in zip(ps, grads):
            p.grad = torch.zeros_like(p) if gr is None else gr
    _allreduce_grads([gen, disc])
    g_opt.step()
    d_opt.step()
    return pre / len(batches), float(g_total.detach())


def sample_tasks(tasks: Mapping[str, PatchSet], cfg: MetaConfig, rng: np.random.Generator,
                 device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    names = sorted(tasks)
    chosen = rng.choice(len(names), size=cfg.meta_batch, replace=len(names) < cfg.meta_batch)
    out = []
    for i in chosen:
        x, y = tasks[names[i]].sample(cfg.task_batch, rng)
        out.append((torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)))
    return out


def evaluate_adaptation(gen: VSISR, disc: VSIDiscriminator, tasks: Mapping[str, PatchSet], cfg: MetaConfig,
                        seed: int = 12345, device: torch.device | str = "cpu") -> float:
    """Mean content loss (no adversarial term) on query sets after adapting to fixed support sets.

    The draws depend only on ``seed``, so two models are compared on identical data: a meta-trained
    model should score lower than its initialisation.
    """
    rng = np.random.default_rng(seed)
    loss_fn = VSISRLoss(cfg.ssim_weight, cfg.fft_weight)
    vals = []
    for name in sorted(tasks):
        x, y = tasks[name].sample(cfg.task_batch, rng)
        x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        g, _ = adapt(gen, disc, x[:cfg.support], y[:cfg.support], cfg, loss_fn)
        with torch.no_grad():
            vals.append(float(loss_fn(functional_call(gen, g, (x[cfg.support:],)), y[cfg.support:])))
    return float(np.mean(vals))


def save_meta_outputs(gen: VSISR, disc: VSIDiscriminator, g_opt: torch.optim.Optimizer,
                      d_opt: torch.optim.Optimizer, step: int, out_dir: Path) -> None:
    """``meta_model.pth`` (published layout, what the published fine-tuning loads), ``meta_model_rllsm.pth``
    (ours), and the published trainer's resumable ``g_latest.pth`` / ``d_latest.pth``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_save(reference_state_dict(gen), out_dir / "meta_model.pth")
    tmp = out_dir / ".meta_model_rllsm.tmp"
    save_checkpoint(gen, tmp, layout="rllsm")
    tmp.replace(out_dir / "meta_model_rllsm.pth")
    d_ref = {f"vars.{i}": p.detach().clone() for i, p in enumerate(disc.parameters())}
    # Both optimizers are built over the parameters in published order, so their state indices line up.
    atomic_save({"model": reference_state_dict(gen), "optim": g_opt.state_dict(), "step": step},
                out_dir / "g_latest.pth")
    atomic_save({"model": d_ref, "optim": d_opt.state_dict(), "step": step}, out_dir / "d_latest.pth")


def meta_train(tasks: Mapping[str, PatchSet], cfg: MetaConfig | None = None, out_dir: Path | None = None, *,
               device: torch.device | str = "cpu", resume: bool = True, progress: bool = False,
               init: VSISR | None = None) -> MetaResult:
    """Meta-train VSI-SR on ``tasks`` (one :class:`PatchSet` per structure).

    Parameters
    ----------
    tasks
        Meta-training tasks (``rllsm prepare-data --tasks``); at least one.
    cfg
        Hyper-parameters; defaults are the published ones (expensive: use fewer steps and a smaller network
        on a CPU).
    out_dir
        Checkpoints and the resume state (``meta_state.pt``, written every ``save_every`` steps); None keeps
        everything in memory.
    resume
        Continue from ``out_dir/meta_state.pt`` when present.
    init
        Starting generator (default: a fresh one of ``cfg.network``).
    """
    cfg = cfg or MetaConfig()
    if not tasks:
        raise TrainingError("meta-training needs at least one task")
    if cfg.support >= cfg.task_batch:
        raise TrainingError(f"support ({cfg.support}) must be smaller than the task batch ({cfg.task_batch}) "
                            "so that every task has a query set")
    for name, ps in tasks.items():
        if len(ps) < cfg.task_batch:
            raise TrainingError(f"task '{name}' has {len(ps)} patches, fewer than the task batch {cfg.task_batch}")
    device = torch.device(device)
    rank, world = _dist()
    rng = seed_everything(cfg.seed + rank)
    gen = (init or VSISR(cfg.network)).to(device).train()
    disc = VSIDiscriminator(cfg.discriminator).to(device).train()
    g_opt = torch.optim.Adam(gen.reference_parameters(), lr=cfg.g_lr_outer)
    d_opt = torch.optim.Adam(disc.parameters(), lr=cfg.d_lr_outer)
    loss_fn = VSISRLoss(cfg.ssim_weight, cfg.fft_weight)
    result = MetaResult(generator=gen, discriminator=disc)
    step = 0
    state_path = out_dir / STATE_NAME if out_dir is not None else None
    if resume and (st := load_resume_state(state_path, cfg, "steps")) is not None:
        gen.load_state_dict(st["generator"])
        disc.load_state_dict(st["discriminator"])
        g_opt.load_state_dict(st["g_opt"])
        d_opt.load_state_dict(st["d_opt"])
        step, result.pre, result.post = st["step"], st["pre"], st["post"]
        if rank == 0:
            restore_rng(rng, st["rng"])
        else:  # only rank 0 saves its generator; the others draw fresh, distinct task streams
            rng = np.random.default_rng([cfg.seed, rank, step])

    if world > 1:  # start every rank from rank 0's weights, as DistributedDataParallel does
        for t in [*gen.parameters(), *disc.parameters()]:
            torch.distributed.broadcast(t.data, src=0)

    def checkpoint() -> None:
        if state_path is None or rank != 0:
            return
        atomic_save({"config": cfg.model_dump(mode="json"), "step": step, "generator": gen.state_dict(),
                     "discriminator": disc.state_dict(), "g_opt": g_opt.state_dict(), "d_opt": d_opt.state_dict(),
                     "rng": rng_state(rng), "pre": result.pre, "post": result.post}, state_path)
        save_meta_outputs(gen, disc, g_opt, d_opt, step, out_dir)

    mon = Monitor(cfg.steps, step, "train-meta", out_dir / "log" if out_dir and rank == 0 else None,
                  progress and rank == 0)
    try:
        while step < cfg.steps:
            pre, post = meta_step(gen, disc, g_opt, d_opt, sample_tasks(tasks, cfg, rng, device), cfg, loss_fn)
            if not np.isfinite(post):
                raise TrainingError(f"meta-training loss became {post} at step {step + 1}; lower the learning rates")
            step += 1
            result.pre.append(pre)
            result.post.append(post)
            mon.step(pre=pre, post=post)
            mon.scalar("query_loss_pre_adaptation", pre, step)
            mon.scalar("query_loss_post_adaptation", post, step)
            if step % cfg.save_every == 0 or step == cfg.steps:
                checkpoint()
    finally:
        mon.close()
    return result


def init_distributed_from_env() -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (NCCL on CUDA, gloo otherwise); (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()
