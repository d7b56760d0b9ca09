"""One shared suite run by every backend importable here (torch, ONNX Runtime CPU; GPU ones where present).

The same VSI-SR and RL-DFN weights go to every backend; all must give the torch numbers (≤ 1e-4), check their
inputs with the same typed errors, and plug into Step 2 as its ``predict`` callable.
"""

from __future__ import annotations

import argparse
import importlib.util

import numpy as np
import pytest
import torch

from engines.backends import (
    TENSORRT_INSTALL_HINT,
    BackendConfig,
    BackendUnavailableError,
    InputDtypeError,
    InputShapeError,
    InputValueError,
    ModelSourceError,
    make_backend,
    make_predictor,
)
from engines.backends.models import get_model
from export.api import export_model, resolve_ranges

HAS_TRT = importlib.util.find_spec("tensorrt") is not None

# (backend name, where the model comes from, marks)
BACKENDS = [
    pytest.param("torch", "checkpoint", id="torch-cpu"),
    pytest.param("onnxruntime", "export", id="onnxruntime-cpu"),
    pytest.param("torch-cuda", "checkpoint", marks=pytest.mark.gpu, id="torch-cuda"),
    pytest.param("onnxruntime-cuda", "export", marks=pytest.mark.gpu, id="onnxruntime-cuda"),
    pytest.param("tensorrt", "export", marks=pytest.mark.tensorrt, id="tensorrt"),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Random-init checkpoints of both networks and their validated ONNX exports (once per module)."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("backends")
    fmt = "engine" if HAS_TRT and torch.cuda.is_available() else "onnx"
    out = {}
    # VSI-SR range wide enough for Step 2 on a 9×20×20 stack: rotated planes grow to ≤ 28 px, batches ≤ 4.
    for kind, (lo, mid, hi) in {"vsi-sr": ([1, 7, 8, 8], [2, 7, 16, 16], [4, 7, 32, 32]),
                                 "rl-dfn": ([1, 1, 4, 8, 8], [1, 1, 8, 8, 8], [2, 1, 8, 16, 16])}.items():
        mk = get_model(kind)
        ckpt = tmp / f"{kind}.pt"
        mk.save(mk.build_random(3), ckpt)
        export_model(kind, ckpt, tmp / kind, fmt=fmt, ranges=resolve_ranges(kind, lo, mid, hi))
        out[kind] = (ckpt, tmp / kind)
    return out


def _open(models, kind: str, backend: str):
    ckpt, folder = models[kind]
    if backend == "torch-cuda":
        return make_backend(kind, ckpt, "torch", BackendConfig(device="cuda"))
    if backend == "torch":
        return make_backend(kind, ckpt, "torch", BackendConfig(device="cpu"))
    return make_backend(kind, folder, backend)


def _reference(models, kind: str, *xs: np.ndarray) -> np.ndarray:
    net = get_model(kind).load(models[kind][0])
    with torch.inference_mode():
        return net(*(torch.from_numpy(x) for x in xs)).numpy()


# -- the shared suite ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, source", BACKENDS)
def test_vsisr_numbers_match_torch(models, backend, source):
    rng = np.random.default_rng(1)
    x = rng.random((3, 7, 13, 22), dtype=np.float32)
    with _open(models, "vsi-sr", backend) as b:
        y = b(x)
        assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (3, 3, 19, 33)
        assert np.abs(y - _reference(models, "vsi-sr", x)).max() <= 1e-4
        # torch in → torch out, same numbers
        yt = b(torch.from_numpy(x))
        assert isinstance(yt, torch.Tensor) and yt.device.type == "cpu"
        assert np.abs(yt.numpy() - y).max() <= 1e-5


@pytest.mark.parametrize("backend, source", BACKENDS)
def test_rldfn_numbers_match_torch(models, backend, source):
    rng = np.random.default_rng(2)
    a, b_ = rng.random((2, 2, 1, 8, 12, 16), dtype=np.float32)
    with _open(models, "rl-dfn", backend) as b:
        y = b(a, b_)
        assert y.shape == (2, 1, 8, 12, 16)
        assert np.abs(y - _reference(models, "rl-dfn", a, b_)).max() <= 1e-4


@pytest.mark.parametrize("backend, source", BACKENDS)
def test_inputs_are_checked_before_running(models, backend, source):
    with _open(models, "vsi-sr", backend) as b:
        x = np.zeros((1, 7, 12, 12), np.float32)
        with pytest.raises(InputShapeError, match="axis C must be 7"):
            b(np.zeros((1, 5, 12, 12), np.float32))
        with pytest.raises(InputShapeError, match="expected 4 axes"):
            b(np.zeros((7, 12, 12), np.float32))
        with pytest.raises(InputDtypeError, match="expected float32, got uint16"):
            b(x.astype(np.uint16))
        with pytest.raises(InputDtypeError, match="numpy array or torch tensor"):
            b(x.tolist())
        bad = x.copy()
        bad[0, 3, 2, 2] = np.nan
        with pytest.raises(InputValueError, match="NaN"):
            b(bad)
        with pytest.raises(InputShapeError, match="takes 1 input"):
            b.forward(x, x)
    with _open(models, "rl-dfn", backend) as b:
        with pytest.raises(InputShapeError, match="axis H = 10 is not a multiple of 4"):
            b(*[np.zeros((1, 1, 8, 10, 8), np.float32)] * 2)
        with pytest.raises(InputShapeError, match="same shape"):
            b(np.zeros((1, 1, 8, 8, 8), np.float32), np.zeros((1, 1, 8, 8, 12), np.float32))


@pytest.mark.parametrize("backend, source", [p for p in BACKENDS if p.values[1] == "export"])
def test_shape_outside_exported_range_names_the_valid_range(models, backend, source):
    with _open(models, "vsi-sr", backend) as b:
        with pytest.raises(InputShapeError) as err:
            b(np.zeros((1, 7, 40, 16), np.float32))
        msg = str(err.value)
        assert "axis H = 40 is outside" in msg and "8–32" in msg and "N 1–4" in msg and "--max-shape" in msg


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_torch_reduced_precision_keeps_float32_io_and_50db(models, precision):
    from export.validate import psnr_db

    ckpt, _ = models["vsi-sr"]
    x = np.random.default_rng(4).random((1, 7, 16, 16), dtype=np.float32)
    with make_backend("vsi-sr", ckpt, "torch", BackendConfig(device="cpu", precision=precision)) as b:
        y = b(x)
    assert y.dtype == np.float32
    assert psnr_db(_reference(models, "vsi-sr", x), y) >= 50.0


@pytest.mark.gpu
@pytest.mark.parametrize("options", [dict(cuda_graphs=True), dict(torch_compile=True)], ids=["cuda-graphs", "compile"])
def test_torch_cuda_graphs_and_compile_match_eager(models, options):
    ckpt, _ = models["vsi-sr"]
    x = torch.rand(2, 7, 24, 20, device="cuda")
    with make_backend("vsi-sr", ckpt, "torch", BackendConfig(device="cuda")) as eager, \
            make_backend("vsi-sr", ckpt, "torch", BackendConfig(device="cuda", **options)) as fast:
        want = eager(x)
        for _ in range(3):  # graphs are captured on the first call and replayed after; replays must not alias
            got = fast(x)
            assert got.device.type == "cuda" and torch.abs(got - want).max().item() <= 1e-4
        assert torch.abs(fast(x * 2) - eager(x * 2)).max().item() <= 1e-4


def test_flop_counter_matches_analytic_vsisr_count():
    """Bench FLOPs (torch.utils.flop_counter) = the layer-by-layer count of VSI-SR (multiply-add = 2 FLOPs)."""
    from export.bench import count_flops

    n, h, w = 2, 10, 14
    net = get_model("vsi-sr").build_random(0)
    px, up = n * h * w, n * int(1.5 * h) * int(1.5 * w)
    conv3 = lambda cin, cout, pixels: 2 * cin * cout * 9 * pixels  # noqa: E731
    trunk = conv3(7, 64, px) + 16 * 2 * conv3(64, 64, px)
    attention = 16 * n * 2 * (64 * 4 + 4 * 64)  # two 1×1 convs on the pooled vector per RCAB
    tail = conv3(64, 256, up) + conv3(256, 3, up)
    assert count_flops(net, torch.rand(n, 7, h, w)) == trunk + attention + tail


def test_step2_through_onnxruntime_matches_torch(models):
    """Full Step 2 (three orientations, batching, Wiener recombination) with ONNX Runtime as `predict`."""
    from engines.config import OpticsConfig
    from engines.vsisr.lateral import LateralSRParams, lateral_sr
    from engines.vsisr.otf import generate_otfs

    ckpt, folder = models["vsi-sr"]
    vol = np.random.default_rng(5).random((9, 20, 20), dtype=np.float32) * 1000
    otfs = generate_otfs(OpticsConfig(), (32, 32))
    params = LateralSRParams(batch_size=2)
    want = lateral_sr(vol, get_model("vsi-sr").load(ckpt), otfs, params, device="cpu")
    with make_predictor("vsi-sr", folder, backend="onnxruntime") as predict:
        got = lateral_sr(vol, predict, otfs, params, device="cpu")
    assert got.shape == want.shape == (3, 30, 30)
    assert np.abs(got - want).max() <= 1e-4


def test_onnx_cache_reuses_its_entry_and_reexports_a_damaged_one(tmp_path):
    from engines.rldfn.checkpoint import save_rldfn
    from engines.rldfn.network import DualViewFusionNet
    from export.cache import cached_export

    torch.manual_seed(0)
    save_rldfn(DualViewFusionNet(width=2), tmp_path / "rl-dfn.pt")
    folder = cached_export("rl-dfn", tmp_path / "rl-dfn.pt", tmp_path / "cache")
    onnx_file = folder / "rl-dfn.onnx"
    first = onnx_file.stat().st_mtime_ns
    assert cached_export("rl-dfn", tmp_path / "rl-dfn.pt", tmp_path / "cache") == folder
    assert onnx_file.stat().st_mtime_ns == first, "an unchanged entry is reused, not exported again"
    good = onnx_file.read_bytes()
    onnx_file.write_bytes(good[: len(good) // 2])  # damaged after it was validated
    assert cached_export("rl-dfn", tmp_path / "rl-dfn.pt", tmp_path / "cache") == folder
    from engines.backends.manifest import read_manifest
    from engines.backends.models import sha256_of

    assert sha256_of(onnx_file) == read_manifest(folder).onnx_sha256, "replaced by a fresh, validated export"
    with make_backend("rl-dfn", folder, "onnxruntime") as b:
        assert b(*[np.ones((1, 1, 8, 16, 16), np.float32)] * 2).shape == (1, 1, 8, 16, 16)


# -- choosing a backend --------------------------------------------------------------------------------------
def test_auto_picks_by_what_the_source_is(models):
    ckpt, folder = models["vsi-sr"]
    with make_backend("vsi-sr", ckpt) as b:
        assert b.name == "torch"
    if not torch.cuda.is_available():
        with make_backend("vsi-sr", folder) as b:
            assert b.name == "onnxruntime"
        with make_backend("vsi-sr", folder / "vsi-sr.onnx") as b:
            assert b.name == "onnxruntime"


def test_explicit_choice_is_not_silently_replaced(models):
    ckpt, folder = models["vsi-sr"]
    with pytest.raises(BackendUnavailableError) as err:
        make_backend("vsi-sr", ckpt, "onnxruntime")
    assert "needs an exported ONNX model" in str(err.value) and "--allow-fallback" in str(err.value)
    with make_backend("vsi-sr", ckpt, "onnxruntime", BackendConfig(allow_fallback=True)) as b:
        assert b.name == "torch"


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_missing_tensorrt_says_how_to_install_and_falls_back_only_if_allowed(models):
    _, folder = models["vsi-sr"]
    with pytest.raises(BackendUnavailableError) as err:
        make_backend("vsi-sr", folder, "tensorrt")
    assert TENSORRT_INSTALL_HINT in str(err.value) and "tensorrt" in err.value.reasons
    with make_backend("vsi-sr", folder, "tensorrt", BackendConfig(allow_fallback=True)) as b:
        assert b.name.startswith("onnxruntime")


def test_no_backend_fits_gives_one_error_listing_each(tmp_path):
    fake = tmp_path / "model.engine"
    fake.write_bytes(b"not an engine")
    with pytest.raises(BackendUnavailableError) as err:
        make_backend("vsi-sr", fake)
    reasons = err.value.reasons
    assert {"tensorrt", "onnxruntime", "torch"} <= set(reasons)
    assert "needs the torch checkpoint" in reasons["torch"]
    text = str(err.value)
    assert all(f"- {name}:" in text for name in reasons)


def test_bad_sources_are_typed_errors(models, tmp_path):
    _, folder = models["rl-dfn"]
    with pytest.raises(ModelSourceError, match="not found"):
        make_backend("vsi-sr", tmp_path / "nothing.onnx")
    with pytest.raises(ModelSourceError, match="is a 'rl-dfn', not a 'vsi-sr'"):
        make_backend("vsi-sr", folder, "onnxruntime")
    with pytest.raises(ModelSourceError, match="unknown model 'nope'"):
        make_backend("nope", folder)


def test_cli_backend_options_merge_flags_over_config():
    from streamer.cli.backend_options import add_backend_args, backend_config_from_args

    p = argparse.ArgumentParser()
    add_backend_args(p)
    base = BackendConfig(backend="onnxruntime", threads=2)
    cfg = backend_config_from_args(p.parse_args(["--backend", "torch", "--allow-fallback"]), base)
    assert (cfg.backend.value, cfg.allow_fallback, cfg.threads) == ("torch", True, 2)
    assert backend_config_from_args(p.parse_args([]), base) == base
    with pytest.raises(Exception, match="extra"):
        BackendConfig.model_validate({"backend": "torch", "bogus": 1})


def test_bench_measures_every_backend_side_by_side(capsys):
    """`rllsm bench` on a tiny stack: each backend gets a row per step, the ratio line and the FLOP figures."""
    from streamer.cli import main

    rc = main(["bench", "--model", "vsi-sr", "--volume", "7x12x12", "--batch", "2", "--repeats", "2",
               "--warmup", "0", "--threads", "1", "--backends", "torch,onnxruntime"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [line for line in out.splitlines() if line.startswith("| network") or line.startswith("| step2")]
    assert len(rows) == 4 and sum("onnxruntime" in r for r in rows) == 2
    assert all("FLOP/s" in r and "%" in r for r in rows)
    assert "as fast as torch cpu (fp32)" in out and "peak measured in this run" in out


def test_bench_bad_arguments_are_user_errors(capsys):
    from streamer.cli import main

    assert main(["bench", "--volume", "9x32"]) == 2
    assert "Z×Y×X" in capsys.readouterr().err
    assert main(["bench", "--volume", "7x12x12", "--backends", "torch,warp-drive", "--no-end-to-end"]) == 2
    assert "warp-drive" in capsys.readouterr().err
