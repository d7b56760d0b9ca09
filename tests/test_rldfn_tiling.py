"""Tiled RL-DFN inference: coverage, agreement with one-patch inference, memory-budget errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter
from scipy.signal import fftconvolve

from engines.rldfn.errors import MemoryBudgetError, VolumeShapeError
from engines.rldfn.fuse import fuse_rldfn
from engines.rldfn.model import RLDFN
from engines.rldfn.network import DualViewFusionNet
from engines.rldfn.tiling import blend_weights, estimate_patch_bytes, plan_tiles, tile_for_budget

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "rldfn"))
from seeded_weights import seed_module  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tilted_psf(angle: float, n: int = 11) -> np.ndarray:
    z, y, x = np.meshgrid(*[np.arange(n) - (n - 1) / 2] * 3, indexing="ij")
    u, v = np.cos(angle) * z + np.sin(angle) * x, -np.sin(angle) * z + np.cos(angle) * x
    return np.exp(-(u**2) / 8 - v**2 / 2 - y**2 / 2).astype(np.float32)


@pytest.fixture(scope="module")
def model() -> RLDFN:
    torch.set_num_threads(1)
    # narrow network: tiling does not depend on the channel count, and the U-Net's reach (what tiles must
    # overlap) is the same as at the reference's width 64
    net = DualViewFusionNet(width=8)
    for fname, part in (("net_FA.pth", "feature_a"), ("net_FB.pth", "feature_b"), ("net_G.pth", "unet")):
        seed_module(getattr(net, part), 5, fname)
    return RLDFN(net.eval(), _tilted_psf(0.54), _tilted_psf(-0.54))


@pytest.fixture(scope="module")
def views() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (26, 62, 66)  # not multiples of 4: exercises the end padding
    obj = (rng.random(shape) > 0.995) * 100.0 + gaussian_filter(rng.random(shape), 3)
    a = fftconvolve(obj, _tilted_psf(0.54), mode="same") + 0.01
    b = fftconvolve(obj, _tilted_psf(-0.54), mode="same") + 0.01
    return a.astype(np.float32), b.astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(st.tuples(*[st.integers(1, 40).map(lambda k: 4 * k)] * 3), st.integers(2, 16).map(lambda k: 4 * k),
       st.integers(0, 6).map(lambda k: 4 * k))
def test_plan_covers_every_voxel_on_the_pooling_grid(shape, tile, overlap):
    if overlap >= tile:
        with pytest.raises(VolumeShapeError):
            plan_tiles(shape, tile, overlap)
        return
    tiles = plan_tiles(shape, tile, overlap)
    cover = np.zeros(shape, np.int32)
    wsum = np.zeros(shape, np.float32)
    for t in tiles:
        assert all(s % 4 == 0 and n % 4 == 0 for s, n in zip(t.start, t.size))
        assert all(s + n <= dim for s, n, dim in zip(t.start, t.size, shape))
        cover[t.slices] += 1
        wsum[t.slices] += blend_weights(t, shape, overlap)
    assert cover.min() >= 1
    assert wsum.min() > 0


def _reference_style(a: np.ndarray, b: np.ndarray, model: RLDFN, core: int, margin: int = 8) -> np.ndarray:
    """The reference script's stitching: zero-pad Y/X by ``margin``, run (core + 2·margin)² patches over the
    full Z, cut the margins off and butt the cores together (normalisation kept per volume, so only the
    stitching differs)."""
    pad = ((0, 0), (margin, margin), (margin, margin))
    a, b = np.pad(a / a.max(), pad), np.pad(b / b.max(), pad)
    out = np.zeros((a.shape[0], a.shape[1] - 2 * margin, a.shape[2] - 2 * margin), np.float32)
    with torch.no_grad():
        for y in range(0, out.shape[1], core):
            for x in range(0, out.shape[2], core):
                sl = (slice(None), slice(y, y + core + 2 * margin), slice(x, x + core + 2 * margin))
                patch = model(torch.from_numpy(np.ascontiguousarray(a[sl])), torch.from_numpy(np.ascontiguousarray(b[sl])))
                out[:, y:y + core, x:x + core] = patch.numpy()[:, margin:-margin, margin:-margin]
    return out


def test_tiled_matches_untiled_away_from_border(model, views):
    a, b = (v[:24, :60, :60] for v in views)
    whole = fuse_rldfn(a, b, model, tile="none")
    tiled = fuse_rldfn(a, b, model, tile=48, overlap=24, registered=False)  # the same RL math as "none"
    assert whole.shape == tiled.shape == a.shape
    # the registered RL step tiles just as well
    reg_whole = fuse_rldfn(a, b, model, tile="none", registered=True)
    reg_tiled = fuse_rldfn(a, b, model, tile=48, overlap=24)
    assert np.sqrt(np.mean((reg_tiled - reg_whole)[6:-6, 6:-6, 6:-6] ** 2)) / np.ptp(reg_whole) <= 0.01
    inner = (slice(6, -6),) * 3

    def nrmse(x: np.ndarray) -> float:
        return float(np.sqrt(np.mean((x[inner] - whole[inner]) ** 2)) / np.ptp(whole[inner]))

    ours, theirs = nrmse(tiled), nrmse(_reference_style(a, b, model, core=20))
    print(f"tiled vs untiled NRMSE: ours {ours:.4f}, reference-style stitching {theirs:.4f}")
    assert ours <= 0.01
    assert theirs > 2 * ours  # the reference's trimmed-and-butted patches leave seams


def test_none_is_one_patch_exactly(model, views):
    a, b = (v[:24, :60, :64] for v in views)
    with torch.no_grad():
        direct = model(torch.from_numpy(a / a.max()), torch.from_numpy(b / b.max())).numpy()
    np.testing.assert_allclose(fuse_rldfn(a, b, model, tile="none"), direct, rtol=1e-5, atol=1e-6)


def test_progress_and_bad_inputs(model, views):
    calls = []
    fuse_rldfn(views[0][:12, :40, :40], views[1][:12, :40, :40], model, tile=24, overlap=8,
               progress=lambda d, n: calls.append((d, n)))
    assert calls == [(i, 4) for i in range(1, 5)]
    with pytest.raises(VolumeShapeError, match="registered onto one grid"):
        fuse_rldfn(views[0], views[1][:-1], model)
    with pytest.raises(VolumeShapeError, match="multiple of 4"):
        fuse_rldfn(*views, model, tile=30)
    with pytest.raises(VolumeShapeError, match="no positive voxel"):
        fuse_rldfn(np.zeros((8, 8, 8)), np.ones((8, 8, 8)), model)


def test_memory_budget(model, views):
    padded = (28, 64, 68)
    whole_need = estimate_patch_bytes(padded, 8)
    with pytest.raises(MemoryBudgetError, match="whole volume as one patch"):
        fuse_rldfn(*views, model, tile="none", memory_budget_bytes=whole_need // 2)
    with pytest.raises(MemoryBudgetError, match="one tile of 28×64×64"):
        fuse_rldfn(*views, model, tile=64, memory_budget_bytes=estimate_patch_bytes((28, 48, 48), 8))
    with pytest.raises(MemoryBudgetError, match="not even one"):
        fuse_rldfn(*views, model, tile="auto", overlap=24, memory_budget_bytes=10_000)
    edge = tile_for_budget(padded, estimate_patch_bytes((28, 48, 48), 8), 8, 8)
    assert edge == 48
    a, b = views[0][:16, :40, :40], views[1][:16, :40, :40]
    out = fuse_rldfn(a, b, model, tile="auto", overlap=8, memory_budget_bytes=estimate_patch_bytes((16, 24, 24), 8))
    assert out.shape == (16, 40, 40) and np.isfinite(out).all()
    # "auto" is the largest tile that fits: 24 here (the whole 40² volume does not), and nothing else changes
    np.testing.assert_array_equal(out, fuse_rldfn(a, b, model, tile=24, overlap=8))


@pytest.mark.gpu
def test_tiled_cuda_matches_cpu(model, views):
    cpu = fuse_rldfn(*views, model, tile=48, overlap=24, device="cpu")
    gpu = fuse_rldfn(*views, model, tile=48, overlap=24, device="cuda")
    np.testing.assert_allclose(gpu, cpu, atol=1e-4 * float(np.ptp(cpu)))


class _SmallMemoryNet(DualViewFusionNet):
    """Fault injection: behaves like a device that runs out of memory on patches above ``limit`` voxels."""

    def __init__(self, limit: int) -> None:
        super().__init__(width=4)
        self.limit = limit

    def forward(self, corr_a: torch.Tensor, corr_b: torch.Tensor) -> torch.Tensor:
        if corr_a[0, 0].numel() > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().forward(corr_a, corr_b)


def test_device_out_of_memory_is_a_budget_error(views):
    model = RLDFN(_SmallMemoryNet(limit=16 * 24 * 24).eval(), _tilted_psf(0.54), _tilted_psf(-0.54))
    a, b = (v[:16, :40, :40] for v in views)
    with pytest.raises(MemoryBudgetError, match="16×40×40 patch did not fit in CPU memory"):
        fuse_rldfn(a, b, model, tile="none")
    assert fuse_rldfn(a, b, model, tile=24, overlap=8).shape == (16, 40, 40)


def test_batched_tiles_give_the_same_result(model, views):
    a, b = (v[:12, :40, :40] for v in views)
    one = fuse_rldfn(a, b, model, tile=24, overlap=8, batch_size=1)
    calls = []
    three = fuse_rldfn(a, b, model, tile=24, overlap=8, batch_size=3, progress=lambda d, n: calls.append((d, n)))
    assert calls == [(3, 4), (4, 4)]
    np.testing.assert_allclose(three, one, rtol=1e-5, atol=1e-6)
    with pytest.raises(MemoryBudgetError, match="of a batch of 3"):
        fuse_rldfn(a, b, model, tile=24, overlap=8, batch_size=3,
                   memory_budget_bytes=2 * estimate_patch_bytes((12, 24, 24), 8))
