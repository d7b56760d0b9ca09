"""Self-supervised RL-DFN training on dual-view volumes (``rllsm train-fusion``).

There is no ground truth. Per step, a random patch of both views goes through one dual-view
Richardson–Lucy step (no gradient, as in the published model) and the fusion network; the fused patch must

* **explain both views** (cycle loss): blurred by each view's PSF it must reproduce that view (L1);
* **look like a sharp view on oblique sections** (GAN losses): 2-D sections cut from the fused patch at
  each view's angle (plus a random jitter) and at 90° are judged by one PatchGAN per view, which learns from
  sections of its own view cut at that view's angle (where that view is sharp);
* be **smooth** (a small squared total-variation term, axial differences weighted 5×).

The Richardson–Lucy step is, by default, the one the chain runs at inference with tiling
(:func:`engines.rldfn.rl.rl_corrections_registered`: no shift, each view weighted by its coverage), and each
view's cycle term is weighted by the same coverage: a network trained behind the reference's step learned on
corrections moved by about a voxel per even axis, which the chain's unshifted corrections are not (the shipped
demo weights, trained that way, put their output 0.5–0.65 voxel off the views, removed by
:mod:`engines.rldfn.align`), and an unweighted cycle loss asks the fused volume to be dark wherever a view has no
data. ``rl_step="reference"`` trains behind the reference's step, per-patch scaling and
plain cycle loss, for networks meant for its math (``tile="none"``).

Loss weights follow the published trainer: cycle ``10 · 5000 · L1``, GAN terms ⅓ each, TV ``1e-7``;
Adam lr 1e-4, β1 0.9. Two deliberate differences, both for correctness: the discriminators return logits
(the published code applies a sigmoid before a loss that applies another), and the PSF blur is a true
(zero-padded, FFT) convolution rather than a correlation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from engines.rldfn.checkpoint import save_reference_folder, save_rldfn
from engines.rldfn.network import DualViewFusionNet
from engines.rldfn.rl import (
    exact_otf,
    psf_to_otf,
    rl_corrections,
    rl_corrections_registered,
)
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
from engines.training.losses import tv_loss

STATE_NAME = "fusion_state.pt"


class FusionTrainConfig(StrictModel):
    """RL-DFN training hyper-parameters (published values where they exist)."""

    version: Literal[1] = 1
    steps: int = Field(10_000, ge=1, le=10_000_000)
    patch: tuple[int, int, int] = Field((64, 256, 256), description="Training patch (Z, Y, X); multiples of 4.")
    batch_size: int = Field(1, ge=1, le=64)
    width: int = Field(64, ge=2, le=256, description="Feature width of the fusion network (published 64).")
    disc_width: int = Field(64, ge=2, le=256, description="PatchGAN first-layer width (published 64).")
    lr: float = Field(1e-4, gt=0, le=1)
    d_lr: float = Field(1e-4, gt=0, le=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    cycle_weight: float = Field(5e4, ge=0, description="Weight of each view's L1 cycle loss (published 10·5000).")
    gan_weight: float = Field(1 / 3, ge=0)
    tv_weight: float = Field(1e-7, ge=0)
    rl_step: Literal["registered", "reference"] = Field(
        "registered", description="RL step in front of the network: registered (the chain's tiled inference: no "
        "shift, coverage-weighted; views scaled by their volume's maximum, cycle loss weighted by coverage) or "
        "reference (the reference's step and per-patch scaling, for its tile-none math).")
    view_angle_deg: float = Field(30.8, ge=0, le=89, description="Angle of view A's sharp plane in the XZ plane.")
    jitter_deg: float = Field(30.0, ge=0, le=60, description="Random rotation added to fake sections.")
    save_every: int = Field(1000, ge=1)
    seed: int = 0


class PatchDiscriminator(nn.Module):
    """2-D PatchGAN critic (4×4 convs, first strided; BatchNorm + LeakyReLU 0.2), logits out."""

    def __init__(self, width: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(width * prev, width * mult, 4, 1, 1), nn.BatchNorm2d(width * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(width * mult, 1, 4, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def oblique_section(vol: torch.Tensor, angle_deg: float, rng: np.random.Generator) -> torch.Tensor:
    """A 2-D section ``(N, 1, H, Y)`` of ``(N, 1, Z, Y, X)`` volumes through the plane that contains the y
    axis and the direction ``(x, z) = (cos a, sin a)``, at a random position inside the volume.

    Trilinear sampling (``grid_sample``), so gradients flow back into the volume.
    """
    n, _, nz, ny, nx = vol.shape
    a = math.radians(angle_deg)
    dx, dz = math.cos(a), math.sin(a)
    lim = [(nx - 1) / abs(dx) if abs(dx) > 1e-6 else math.inf, (nz - 1) / abs(dz) if abs(dz) > 1e-6 else math.inf]
    h = int(min(lim)) + 1
    u = torch.arange(h, dtype=vol.dtype, device=vol.device)
    grids = []
    for _ in range(n):
        # the segment spans |dx|·(h−1) in x and |dz|·(h−1) in z; place it at random where it fits
        x0 = rng.uniform(0, max(nx - 1 - abs(dx) * (h - 1), 0)) + (abs(dx) * (h - 1) if dx < 0 else 0)
        z0 = rng.uniform(0, max(nz - 1 - abs(dz) * (h - 1), 0)) + (abs(dz) * (h - 1) if dz < 0 else 0)
        xs, zs = x0 + u * dx, z0 + u * dz
        ys = torch.arange(ny, dtype=vol.dtype, device=vol.device)
        gx = (2 * xs / max(nx - 1, 1) - 1)[:, None].expand(h, ny)
        gz = (2 * zs / max(nz - 1, 1) - 1)[:, None].expand(h, ny)
        gy = (2 * ys / max(ny - 1, 1) - 1)[None, :].expand(h, ny)
        grids.append(torch.stack([gx, gy, gz], dim=-1)[None])
    grid = torch.stack(grids)  # (N, 1, H, Y, 3)
    return F.grid_sample(vol, grid, mode="bilinear", align_corners=True)[:, :, 0]


def _fft_blur(vol: torch.Tensor, psf_fft: torch.Tensor, psf_shape: tuple[int, int, int]) -> torch.Tensor:
    """Linear (zero-padded) convolution of ``(N, 1, Z, Y, X)`` with a centred PSF, output cropped to ``vol``."""
    dims = (-3, -2, -1)
    full = [s + k - 1 for s, k in zip(vol.shape[-3:], psf_shape)]
    out = torch.fft.irfftn(torch.fft.rfftn(vol, s=full, dim=dims) * psf_fft, s=full, dim=dims)
    o = [k // 2 for k in psf_shape]
    z, y, x = vol.shape[-3:]
    return out[..., o[0]:o[0] + z, o[1]:o[1] + y, o[2]:o[2] + x]


@dataclass
class FusionResult:
    """Per-step losses of a run."""

    cycle: list[float] = field(default_factory=list)
    gan_g: list[float] = field(default_factory=list)
    gan_d: list[float] = field(default_factory=list)
    net: DualViewFusionNet | None = None


def _random_patch(views: list[tuple[np.ndarray, np.ndarray]], patch: tuple[int, int, int], batch: int,
                  rng: np.random.Generator, per_patch: bool = True) -> tuple[np.ndarray, np.ndarray]:
    outs_a, outs_b = [], []
    for _ in range(batch):
        a, b = views[int(rng.integers(len(views)))]
        o = [int(rng.integers(0, s - p + 1)) for s, p in zip(a.shape, patch)]
        sl = tuple(slice(q, q + p) for q, p in zip(o, patch))
        pa, pb = a[sl], b[sl]
        if per_patch:  # each view patch scaled by its own maximum, as the published reconstruction feeds it
            pa, pb = pa / max(float(pa.max()), 1e-6), pb / max(float(pb.max()), 1e-6)
        outs_a.append(pa)
        outs_b.append(pb)
    return np.stack(outs_a)[:, None].astype(np.float32), np.stack(outs_b)[:, None].astype(np.float32)


def _coverage(patch: torch.Tensor) -> torch.Tensor:
    """Coverage blend weights of an ``(N, 1, Z, Y, X)`` batch of view patches, as the chain computes them."""
    from engines.rldfn.coverage import blend_weight, coverage_mask

    return torch.stack([blend_weight(coverage_mask(p[0]))[None] for p in patch])


def _weighted_l1(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    if w is None:
        return F.l1_loss(x, y)
    return (w * (x - y).abs()).sum() / w.sum().clamp(min=1.0)


def train_fusion(views: list[tuple[np.ndarray, np.ndarray]], psf_a: np.ndarray, psf_b: np.ndarray,
                 cfg: FusionTrainConfig | None = None, out_dir: Path | None = None, *,
                 device: torch.device | str = "cpu", resume: bool = True, progress: bool = False) -> FusionResult:
    """Train RL-DFN on registered dual-view volumes.

    Parameters
    ----------
    views
        ``(view A, view B)`` volume pairs ``(Z, Y, X)``, registered to one isotropic grid, each at least
        ``cfg.patch`` in size.
    psf_a, psf_b
        The two views' PSFs on the same grid (any size ≤ the patch; normalised here).
    out_dir
        Checkpoints (``rldfn.pt`` in our layout, ``reference/`` in the published layout), resume state and
        log; None keeps everything in memory.
    """
    cfg = cfg or FusionTrainConfig()
    if not views:
        raise TrainingError("fusion training needs at least one dual-view volume pair")
    for i, (a, b) in enumerate(views):
        if a.shape != b.shape or a.ndim != 3:
            raise TrainingError(f"volume pair {i}: view A {a.shape} and view B {b.shape} must be equal 3-D shapes")
        if any(s < p for s, p in zip(a.shape, cfg.patch)):
            raise TrainingError(f"volume pair {i} {a.shape} is smaller than the training patch {cfg.patch}")
    if any(p % 4 for p in cfg.patch):
        raise TrainingError(f"patch {cfg.patch}: every size must be a multiple of 4 (two 2× poolings in the U-Net)")
    device = torch.device(device)
    registered = cfg.rl_step == "registered"
    if registered:  # the chain divides each whole view by its maximum (engines.rldfn.fuse_rldfn, normalize=True)
        views = [(a / max(float(a.max()), 1e-6), b / max(float(b.max()), 1e-6)) for a, b in views]
    rng = seed_everything(cfg.seed)
    net = DualViewFusionNet(width=cfg.width, share_view_a_features=True).to(device).train()
    d_a, d_b = PatchDiscriminator(cfg.disc_width).to(device), PatchDiscriminator(cfg.disc_width).to(device)
    # The view-B feature net gets no gradient when features are shared; it is kept (and saved) for layout parity.
    g_opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    d_opt = torch.optim.Adam([*d_a.parameters(), *d_b.parameters()], lr=cfg.d_lr, betas=(cfg.beta1, 0.999))
    make_otf = exact_otf if registered else psf_to_otf
    otf_a, otf_b = make_otf(psf_a, cfg.patch, device), make_otf(psf_b, cfg.patch, device)
    blur = []
    for psf in (psf_a, psf_b):
        p = torch.as_tensor(np.asarray(psf, np.float32))
        p = p / p.sum()
        full = [s + k - 1 for s, k in zip(cfg.patch, p.shape)]
        blur.append((torch.fft.rfftn(p.to(device), s=full), tuple(p.shape)))
    result = FusionResult(net=net)
    step = 0
    state_path = out_dir / STATE_NAME if out_dir is not None else None
    if resume and (st := load_resume_state(state_path, cfg, "steps")) is not None:
        net.load_state_dict(st["net"]), d_a.load_state_dict(st["d_a"]), d_b.load_state_dict(st["d_b"])
        g_opt.load_state_dict(st["g_opt"]), d_opt.load_state_dict(st["d_opt"])
        restore_rng(rng, st["rng"])
        step, result.cycle, result.gan_g, result.gan_d = st["step"], st["cycle"], st["gan_g"], st["gan_d"]

    def checkpoint() -> None:
        if out_dir is None:
            return
        atomic_save({"config": cfg.model_dump(mode="json"), "step": step, "net": net.state_dict(),
                     "d_a": d_a.state_dict(), "d_b": d_b.state_dict(), "g_opt": g_opt.state_dict(),
                     "d_opt": d_opt.state_dict(), "rng": rng_state(rng), "cycle": result.cycle,
                     "gan_g": result.gan_g, "gan_d": result.gan_d}, state_path)
        tmp = out_dir / ".rldfn.tmp"
        save_rldfn(net, tmp)
        tmp.replace(out_dir / "rldfn.pt")
        save_reference_folder(net, out_dir / "reference")

    def gan(logits: torch.Tensor, real: bool) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 1.0 if real else 0.0))

    theta = cfg.view_angle_deg
    mon = Monitor(cfg.steps, step, "train-fusion", out_dir / "log" if out_dir else None, progress)
    try:
        while step < cfg.steps:
            a_np, b_np = _random_patch(views, cfg.patch, cfg.batch_size, rng, per_patch=not registered)
            va, vb = torch.from_numpy(a_np).to(device), torch.from_numpy(b_np).to(device)
            wa = wb = None
            with torch.no_grad():
                if registered:
                    wa, wb = _coverage(va), _coverage(vb)
                    ca, cb = rl_corrections_registered(va, vb, otf_a, otf_b, wa, wb)
                else:
                    ca, cb = rl_corrections(va, vb, (va + vb) / 2, otf_a, otf_b)
            fused = net(ca, cb)
            jit = rng.uniform(-cfg.jitter_deg, cfg.jitter_deg)
            # generator: explain both views, fool both critics on jittered and 90° sections, stay smooth
            for d in (d_a, d_b):
                d.requires_grad_(False)
            cycle = _weighted_l1(_fft_blur(fused, *blur[0]), va, wa) + _weighted_l1(_fft_blur(fused, *blur[1]), vb, wb)
            g_gan = (gan(d_a(oblique_section(fused, theta + jit, rng)), True)
                     + gan(d_b(oblique_section(fused, 180 - theta + jit, rng)), True)
                     + gan(d_a(oblique_section(fused, 90.0, rng)), True)
                     + gan(d_b(oblique_section(fused, 90.0, rng)), True))
            g_loss = cfg.cycle_weight * cycle + cfg.gan_weight * g_gan + cfg.tv_weight * tv_loss(fused)
            if not torch.isfinite(g_loss):  # before any step, so the weights in memory stay usable
                raise TrainingError(f"fusion loss became {g_loss.item()} at step {step + 1}; lower the learning rate")
            g_opt.zero_grad(set_to_none=True)
            g_loss.backward()
            g_opt.step()
            # critics: each view's own sharp section is "real", the fused one at that angle "fake"
            for d in (d_a, d_b):
                d.requires_grad_(True)
            fd = fused.detach()
            d_loss = 0.25 * (gan(d_a(oblique_section(va, theta, rng)), True)
                             + gan(d_a(oblique_section(fd, theta + jit, rng)), False)
                             + gan(d_b(oblique_section(vb, 180 - theta, rng)), True)
                             + gan(d_b(oblique_section(fd, 180 - theta + jit, rng)), False))
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
            step += 1
            result.cycle.append(float(cycle.detach()))
            result.gan_g.append(float(g_gan.detach()))
            result.gan_d.append(float(d_loss.detach()))
            mon.step(cycle=result.cycle[-1], d=result.gan_d[-1])
            mon.scalar("cycle_l1", result.cycle[-1], step)
            mon.scalar("gan_g", result.gan_g[-1], step)
            mon.scalar("gan_d", result.gan_d[-1], step)
            if step % cfg.save_every == 0 or step == cfg.steps:
                checkpoint()
    finally:
        mon.close()
    return result
