"""Fine-tuning VSI-SR from a meta-model on a few patches of a new structure (``rllsm finetune``).

Defaults are the published recipe: plain SGD at lr 0.25, halved at iterations 10, 20 and 30, batches of
20 patches, 30 iterations, loss MSE + 0.1·(1 − SSIM) + 1.0·spectrum. Validation is the masked PSNR of whole
held-out cells, measured before the first step and every ``val_every`` steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

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
from engines.training.losses import VSISRLoss
from engines.training.validate import mean_psnr
from engines.vsisr.checkpoint import save_checkpoint
from engines.vsisr.network import VSISR

STATE_NAME = "finetune_state.pt"


class FinetuneConfig(StrictModel):
    """Hyper-parameters of fine-tuning (defaults: the published ones)."""

    version: Literal[1] = 1
    iterations: int = Field(30, ge=1, le=1_000_000)
    batch_size: int = Field(20, ge=1, le=4096)
    lr: float = Field(0.25, gt=0, le=10)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr_milestones: tuple[int, ...] = (10, 20, 30)
    lr_decay: float = Field(0.5, gt=0, le=1)
    ssim_weight: float = Field(0.1, ge=0, le=100)
    fft_weight: float = Field(1.0, ge=0, le=100)
    val_every: int = Field(5, ge=1, le=1_000_000, description="Validate (and checkpoint) every N iterations.")
    mask_thresh: float = Field(0.01, ge=0, le=1)
    seed: int = 0


@dataclass
class FinetuneResult:
    """What a run measured: per-iteration loss and validation PSNR (dB) at ``(iteration, psnr)``."""

    losses: list[float] = field(default_factory=list)
    val_psnr: list[tuple[int, float]] = field(default_factory=list)
    model: VSISR | None = None


def _optimizer(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr)


def save_weights(model: VSISR, out_dir: Path, stem: str) -> None:
    """Weights in our layout (``<stem>.pth``) and the published one (``<stem>_reference.pth``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for layout, suffix in (("rllsm", ""), ("reference", "_reference")):
        tmp = out_dir / f".{stem}{suffix}.tmp"
        save_checkpoint(model, tmp, layout=layout)
        tmp.replace(out_dir / f"{stem}{suffix}.pth")


def finetune(model: VSISR, train: PatchSet, val_cells: list[tuple[str, np.ndarray, np.ndarray]],
             cfg: FinetuneConfig | None = None, out_dir: Path | None = None, *, device: torch.device | str = "cpu",
             resume: bool = True, progress: bool = False) -> FinetuneResult:
    """Fine-tune ``model`` in place on ``train`` patches, validating on ``val_cells``.

    Parameters
    ----------
    model
        Starting weights (the meta-model, or a fresh network for a from-scratch baseline).
    train
        Patches of the target structure (``rllsm prepare-data --finetune``).
    val_cells
        Whole held-out cells ``(name, LLSM, GT)``; may be empty (no PSNR is then reported).
    cfg
        Hyper-parameters; default the published recipe.
    out_dir
        Where checkpoints (ours and the published layout), the resume state and the TensorBoard log go;
        None keeps everything in memory.
    resume
        Continue from ``out_dir/finetune_state.pt`` if present (same config required).
    progress
        Show a progress bar.
    """
    cfg = cfg or FinetuneConfig()
    device = torch.device(device)
    rng = seed_everything(cfg.seed)
    model.to(device).train()
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.lr_milestones), gamma=cfg.lr_decay)
    loss_fn = VSISRLoss(cfg.ssim_weight, cfg.fft_weight)
    result = FinetuneResult(model=model)
    step = 0
    state_path = out_dir / STATE_NAME if out_dir is not None else None
    if resume and (st := load_resume_state(state_path, cfg, "iterations")) is not None:
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        restore_rng(rng, st["rng"])
        step, result.losses, result.val_psnr = st["step"], st["losses"], st["val_psnr"]

    def checkpoint() -> None:
        if state_path is None:
            return
        atomic_save({"config": cfg.model_dump(), "step": step, "model": model.state_dict(),
                     "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(rng),
                     "losses": result.losses, "val_psnr": result.val_psnr}, state_path)

    mon = Monitor(cfg.iterations, step, "finetune", out_dir / "log" if out_dir else None, progress)
    try:
        if step == 0 and val_cells:
            psnr = mean_psnr(model, val_cells, device, cfg.mask_thresh)
            result.val_psnr.append((0, psnr))
            mon.scalar("val_psnr", psnr, 0)
        while step < cfg.iterations:
            x, y = train.sample(cfg.batch_size, rng)
            x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            if not torch.isfinite(loss):
                raise TrainingError(f"fine-tuning loss became {loss.item()} at iteration {step + 1}; "
                                    f"lower the learning rate (now {opt.param_groups[0]['lr']})")
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            result.losses.append(float(loss.item()))
            mon.step(loss=result.losses[-1])
            mon.scalar("finetune_loss", result.losses[-1], step)
            mon.scalar("lr", opt.param_groups[0]["lr"], step)
            if step % cfg.val_every == 0 or step == cfg.iterations:
                if val_cells:
                    psnr = mean_psnr(model, val_cells, device, cfg.mask_thresh)
                    result.val_psnr.append((step, psnr))
                    mon.scalar("val_psnr", psnr, step)
                if out_dir is not None:
                    save_weights(model, out_dir, f"g_model_{step:04d}")
                checkpoint()
    finally:
        # An interruption loses at most the iterations since the last checkpoint; a rerun resumes there.
        mon.close()
    if out_dir is not None:
        save_weights(model, out_dir, "finetuned")
    return result
