"""Building blocks of Step 2: bicubic resize, crop, z smoothing, intensity profile, generated OTFs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.config import OpticsConfig
from engines.vsisr.lateral import LateralSRParams, lateral_sr
from engines.vsisr.network import VSISR, VSISRConfig
from engines.vsisr.otf import OTFError, generate_otfs
from engines.vsisr.recombine import intensity_profile, smooth_matlab
from engines.vsisr.rotate import crop_window, resize_cubic, rotate_back_and_crop, rotate_planes, rotated_shape


@pytest.mark.parametrize("src, dst", [((512, 512), (96, 96)), ((768, 768), (97, 130)), ((40, 52), (60, 78))])
def test_resize_matches_opencv_bicubic(src, dst):
    cv2 = pytest.importorskip("cv2", reason="OpenCV is only a fixture-time dependency")
    img = np.random.default_rng(0).random(src)
    ref = cv2.resize(img, dsize=(dst[1], dst[0]), interpolation=cv2.INTER_CUBIC)
    assert np.abs(resize_cubic(img, *dst).numpy() - ref).max() < 1e-12


def _keys(x: float, a: float = -0.75) -> float:
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def test_resize_matches_keys_kernel_by_definition():
    """Independent of OpenCV: half-pixel centres, Keys a = -0.75, edges replicated."""
    assert np.allclose(resize_cubic(np.full((10, 12), 3.0), 15, 18).numpy(), 3.0)
    col = np.random.default_rng(2).random(9)
    out = resize_cubic(col[:, None] * np.ones((1, 4)), 14, 4).numpy()[:, 0]
    for i in range(14):
        pos = (i + 0.5) * 9 / 14 - 0.5
        base = int(np.floor(pos))
        want = sum(_keys(pos - j) * col[min(max(j, 0), 8)] for j in range(base - 1, base + 3))
        assert out[i] == pytest.approx(want, abs=1e-6)


def test_crop_window_is_centred_like_published():
    sy, sx = crop_window(161, 149, 96, 97)
    assert (sy.start, sy.stop) == (32, 128) and (sx.start, sx.stop) == (25, 122)
    assert crop_window(96, 96, 96, 96) == (slice(None), slice(None))
    with pytest.raises(ValueError):
        crop_window(10, 10, 12, 10)


def test_rotate_there_and_back_recovers_the_centre():
    """Square planes come back in place.  (Non-square planes come back shifted by up to half a pixel:
    the published canvas rounding, which we reproduce on purpose; see docs/lateral-sr.md.)"""
    rng = np.random.default_rng(1)
    from scipy import ndimage

    img = ndimage.gaussian_filter(rng.random((48, 48)), 3)
    for angle in (60.0, 120.0):
        rot = rotate_planes(img[None], angle)
        assert rot.shape[1:] == rotated_shape(48, 48, angle) == (66, 66)
        back = rotate_back_and_crop(rot, angle, 48, 48)[0]
        assert back.shape == img.shape
        inner = (slice(8, -8), slice(8, -8))
        assert np.abs(back[inner] - img[inner]).max() < 1e-3


def _smooth_direct(a: np.ndarray, w: int) -> np.ndarray:
    """MATLAB smooth by definition: symmetric window shrinking near the ends."""
    n, h = len(a), w // 2
    return np.array([a[i - min(h, i, n - 1 - i): i + min(h, i, n - 1 - i) + 1].mean() for i in range(n)])


@pytest.mark.parametrize("n", [11, 12, 30, 5, 4, 1])
def test_smooth_matches_definition(n):
    a = np.random.default_rng(n).random(n)
    assert np.allclose(smooth_matlab(a, 11), _smooth_direct(a, min(11, n if n % 2 else n - 1)))


def test_intensity_profile_follows_bleaching():
    rng = np.random.default_rng(4)
    decay = np.linspace(1.0, 0.4, 20)
    stack = rng.random((20, 32, 32)) * decay[:, None, None]
    prof = intensity_profile(stack, 99.0)
    assert prof.max() == pytest.approx(1.0)
    assert np.all(np.diff(prof) < 0.01) and prof[-1] / prof[0] == pytest.approx(0.4 * 1.05, rel=0.15)
    # Known truth: each plane's top-1 % mean scales with its decay factor, then the profile is smoothed.
    truth = _smooth_direct(decay, 11)
    np.testing.assert_allclose(prof, truth / truth.max(), rtol=0.02)
    assert np.isfinite(intensity_profile(np.ones((12, 8, 8)), 99.0)).all()


def test_generated_otfs_basic_properties():
    optics = OpticsConfig(na_detection=1.1, emission_nm=525.0, pixel_size_um=0.0926)
    o = generate_otfs(optics, (256, 256))
    c = 128
    assert o.otf0[c, c] == pytest.approx(2.0) and o.otf0.min() >= 0.0
    # radial symmetry of the order-0 OTF and a hard cut-off at 2 NA / λ
    assert o.otf0[c + 40, c] == pytest.approx(o.otf0[c, c + 40])
    dk = 1.0 / (256 * 0.0926 / 1.5)
    kc_px = (2 * 1.1 / 0.525) / dk
    assert o.otf0[c, c + int(kc_px) - 1] > 0 and o.otf0[c, c + int(kc_px) + 1] == 0
    # the side-band OTF reaches 1.5× further along rows than along columns
    support_rows = np.nonzero(o.otf1[:, c] > 1e-6)[0]
    support_cols = np.nonzero(o.otf1[c, :] > 1e-6)[0]
    assert (support_rows.max() - c) == pytest.approx(1.5 * (support_cols.max() - c), rel=0.05)
    assert 0.0 <= o.apo.min() and o.apo.max() == pytest.approx(1.0)
    # a longer emission wavelength shrinks the pass band
    red = generate_otfs(optics.model_copy(update={"emission_nm": 680.0}), (256, 256))
    assert (red.otf0 > 0).sum() < (o.otf0 > 0).sum()
    with pytest.raises(OTFError):
        generate_otfs(optics, (4, 4))


def test_lateral_sr_runs_with_generated_otfs():
    torch.manual_seed(0)
    model = VSISR(VSISRConfig(n_groups=1, n_blocks=1)).eval()
    vol = np.random.default_rng(5).random((9, 16, 16)).astype(np.float32)
    out = lateral_sr(vol, model, generate_otfs(OpticsConfig()), LateralSRParams(), device="cpu")
    assert out.shape == (3, 24, 24) and np.isfinite(out).all() and out.max() == pytest.approx(1.0, abs=1e-6)
