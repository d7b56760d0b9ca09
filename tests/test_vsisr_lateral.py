"""Step 2 (lateral isotropic SR): parity with the published pipeline, batching, back-ends, bad input."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.vsisr.checkpoint import model_from_object
from engines.vsisr.lateral import LateralSRError, LateralSRParams, lateral_sr, window_centres
from engines.vsisr.network import VSISR, VSISRConfig
from engines.vsisr.otf import OTFError, OTFSet, load_otfs

FIX = Path(__file__).parent / "fixtures" / "vsisr"


def _seeded():
    spec = importlib.util.spec_from_file_location("vsisr_seeded", FIX / "seeded.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _scaled(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return (a - a.min()) / (a.max() - a.min())


def pearson_nrmse(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Pearson r and RMS error (fraction of the range) after min–max scaling both to [0, 1]."""
    a, b = _scaled(a), _scaled(b)
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1]), float(np.sqrt(np.mean((a - b) ** 2)))


@pytest.fixture(scope="module")
def otfs(shared_data) -> OTFSet:
    return load_otfs(shared_data / "otf-meta-rlls-vsim", 488)


@pytest.fixture(scope="module")
def parity():
    data = np.load(FIX / "lateral_parity.npz")
    shapes = [tuple(int(v) for v in row[:nd]) for row, nd in zip(data["shapes"], data["ndims"])]
    model = model_from_object(_seeded().reference_state(shapes, int(data["seed"])))
    return model, data


@pytest.fixture(scope="module")
def tiny_model() -> VSISR:
    torch.manual_seed(3)
    return VSISR(VSISRConfig(n_groups=1, n_blocks=1)).eval()


@pytest.mark.parametrize("adjust", [True, False], ids=["adjust-intensity", "no-adjust"])
def test_matches_published_step2(parity, otfs, adjust):
    """Seeded random network, 18×64×64 seeded stack, 488 nm OTFs: the published script's volume."""
    model, data = parity
    torch.set_num_threads(1)
    got = lateral_sr(data["input"], model, otfs, LateralSRParams(adjust_intensity=adjust, batch_size=5), device="cpu")
    expected = data["expected_adjust" if adjust else "expected_noadjust"]
    assert got.shape == expected.shape == (12, 96, 96)
    assert got.dtype == np.float32 and got.min() >= 0.0 and got.max() <= 1.0
    r, nrmse = pearson_nrmse(got, expected)
    assert r >= 0.999, r
    assert nrmse <= 0.01, nrmse
    # every plane matches on its own, so no plane is swapped or shifted in z
    for z in range(got.shape[0]):
        assert pearson_nrmse(got[z], expected[z])[0] >= 0.999


def test_batch_size_does_not_change_result(tiny_model, otfs):
    vol = _seeded().seeded_volume((11, 24, 28), 5)
    a = lateral_sr(vol, tiny_model, otfs, LateralSRParams(batch_size=1), device="cpu")
    b = lateral_sr(vol, tiny_model, otfs, LateralSRParams(batch_size=64), device="cpu")
    assert a.shape == (5, 36, 42)
    assert np.abs(a - b).max() < 1e-5


def test_callable_backend_gives_same_numbers(tiny_model, otfs):
    """A non-torch runtime plugs in as a callable on (N, 7, H, W) float32 arrays."""
    vol = _seeded().seeded_volume((9, 20, 20), 6)
    calls = []

    def numpy_backend(x: np.ndarray) -> np.ndarray:
        calls.append(x.shape)
        assert x.dtype == np.float32 and x.ndim == 4 and x.shape[1] == 7
        with torch.inference_mode():
            return tiny_model(torch.from_numpy(x)).numpy()

    a = lateral_sr(vol, tiny_model, otfs, LateralSRParams(batch_size=2), device="cpu")
    b = lateral_sr(vol, numpy_backend, otfs, LateralSRParams(batch_size=2), device="cpu")
    assert np.abs(a - b).max() < 1e-5
    # 3 windows × 3 orientations in batches of ≤ 2
    assert sum(s[0] for s in calls) == 9 and max(s[0] for s in calls) == 2


def plane_upsampler(x: np.ndarray) -> torch.Tensor:
    """Stand-in for a trained network: the three centre planes, bilinearly enlarged 1.5×.

    A trained VSI-SR predicts planes z−1, z, z+1 consistently from window to window; a random-weight
    network does not, so only a consistent predictor says anything about what stride 3 costs.
    """
    t = torch.from_numpy(x[:, 2:5])
    return torch.nn.functional.interpolate(t, scale_factor=1.5, mode="bilinear", align_corners=False)


def test_stride3_predicts_each_plane_once_and_stays_close(otfs):
    assert window_centres(18, 1) == list(range(3, 15))
    assert window_centres(18, 3) == [4, 7, 10, 13]
    for nz in range(7, 40):
        cs = window_centres(nz, 3)
        covered = {c + d for c in cs for d in (-1, 0, 1)}
        assert set(range(3, nz - 3)) <= covered, nz
        assert len(cs) <= (nz - 6 + 2) // 3 + 1, nz
    vol = _seeded().seeded_volume((15, 24, 24), 8)
    calls = {1: 0, 3: 0}

    def counted(stride):
        def f(x):
            calls[stride] += x.shape[0]
            return plane_upsampler(x)
        return f

    full = lateral_sr(vol, counted(1), otfs, LateralSRParams(stride=1), device="cpu")
    fast = lateral_sr(vol, counted(3), otfs, LateralSRParams(stride=3), device="cpu")
    assert calls == {1: 3 * 9, 3: 3 * 3}
    assert fast.shape == full.shape == (9, 36, 36)
    r, nrmse = pearson_nrmse(fast, full)
    assert r > 0.99 and nrmse < 0.03, (r, nrmse)


def test_output_geometry_odd_sizes(tiny_model, otfs):
    vol = np.random.default_rng(1).random((7, 17, 23)).astype(np.float32)
    out = lateral_sr(vol, tiny_model, otfs, device="cpu")
    assert out.shape == (1, 25, 34)
    assert np.isfinite(out).all()


def test_progress_reports_every_plane(tiny_model, otfs):
    seen = []
    lateral_sr(np.random.default_rng(2).random((10, 16, 16)), tiny_model, otfs,
               LateralSRParams(batch_size=2), device="cpu", progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (4, 4) and [d for d, _ in seen] == sorted(d for d, _ in seen)


@pytest.mark.parametrize(
    "shape, match",
    [((16, 16), "3-D"), ((2, 8, 16, 16), "3-D"), ((6, 16, 16), "at least 7"), ((9, 4, 16), "too small")],
)
def test_bad_stacks_rejected(tiny_model, otfs, shape, match):
    with pytest.raises(LateralSRError, match=match):
        lateral_sr(np.zeros(shape, np.float32), tiny_model, otfs, device="cpu")


def test_nan_and_wrong_backend_output_rejected(tiny_model, otfs):
    vol = np.ones((8, 16, 16), np.float32)
    vol[3, 2, 2] = np.nan
    with pytest.raises(LateralSRError, match="NaN"):
        lateral_sr(vol, tiny_model, otfs, device="cpu")
    with pytest.raises(LateralSRError, match="expected"):
        lateral_sr(np.ones((8, 16, 16), np.float32), lambda x: np.zeros((x.shape[0], 3, 16, 16)), otfs, device="cpu")


def test_params_validated():
    with pytest.raises(ValueError):
        LateralSRParams(stride=2)
    with pytest.raises(ValueError):
        LateralSRParams(bogus=1)
    with pytest.raises(ValueError):
        LateralSRParams(batch_size=0)


def test_missing_otf_files_named(tmp_path):
    (tmp_path / "488").mkdir()
    with pytest.raises(OTFError, match="OTF0.tif"):
        load_otfs(tmp_path, 488)
    with pytest.raises(OTFError, match="not found"):
        load_otfs(tmp_path / "nope", 488)


def test_otf_folder_layouts(shared_data):
    base = shared_data / "otf-meta-rlls-vsim"
    a = load_otfs(base, 561)  # nearest shipped line
    assert a.source.endswith("560")
    b = load_otfs(base / "642", 642)  # the line folder itself; apodisation found in the parent
    assert b.apo.shape == (768, 768) and b.otf0.max() <= 2.0 + 1e-9


@pytest.mark.gpu
def test_cuda_matches_cpu(parity, otfs):
    """Same numbers on the GPU: network on CUDA, recombination FFTs on CUDA, rotations via CuPy if installed."""
    model, data = parity
    cpu = lateral_sr(data["input"], model, otfs, LateralSRParams(batch_size=4), device="cpu")
    gpu = lateral_sr(data["input"], model, otfs, LateralSRParams(batch_size=4), device="cuda")
    r, nrmse = pearson_nrmse(gpu, cpu)
    assert r >= 0.9999 and nrmse <= 0.002
    r, _ = pearson_nrmse(gpu, data["expected_adjust"])
    assert r >= 0.999


def test_bf16_close_to_fp32_and_fp16_needs_cuda(tiny_model, otfs):
    vol = _seeded().seeded_volume((9, 24, 24), 9)
    a = lateral_sr(vol, tiny_model, otfs, LateralSRParams(), device="cpu")
    b = lateral_sr(vol, tiny_model, otfs, LateralSRParams(precision="bf16"), device="cpu")
    r, nrmse = pearson_nrmse(a, b)
    assert r > 0.99 and 0 < nrmse < 0.05
    with pytest.raises(LateralSRError, match="CUDA"):
        lateral_sr(vol, tiny_model, otfs, LateralSRParams(precision="fp16"), device="cpu")


def test_onnxruntime_session_plugs_in(tiny_model, otfs, tmp_path):
    """An exported graph run by ONNX Runtime is a drop-in predictor (how engines/backends/ plug in)."""
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "vsisr.onnx"
    torch.onnx.export(
        tiny_model, (torch.zeros(1, 7, 16, 16),), str(path), input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}}, opset_version=17, dynamo=False,
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    vol = _seeded().seeded_volume((10, 20, 24), 12)
    a = lateral_sr(vol, tiny_model, otfs, LateralSRParams(batch_size=3), device="cpu")
    b = lateral_sr(vol, lambda x: sess.run(None, {"x": x})[0], otfs, LateralSRParams(batch_size=3), device="cpu")
    assert np.abs(a - b).max() < 1e-4


@pytest.mark.parametrize("adjust", [True, False])
def test_blank_stack_gives_finite_output(tiny_model, otfs, adjust):
    """A flat stack (shutter closed) must not turn into NaN through the min–max and brightness steps."""
    out = lateral_sr(np.full((8, 16, 16), 100, np.uint16), tiny_model, otfs,
                     LateralSRParams(adjust_intensity=adjust), device="cpu")
    assert out.shape == (2, 24, 24) and np.isfinite(out).all()
