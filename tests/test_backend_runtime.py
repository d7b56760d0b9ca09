"""``--backend`` reaches users: the chain, ``rllsm fuse`` and the service run both networks on ONNX Runtime with
the numbers of torch (reduced-width networks, small stacks; the exports are validated by export/ itself)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from engines.backends import BackendConfig
from engines.backends.ort_backend import OnnxRuntimeBackend
from engines.reconstruct import ReconstructError, Reconstructor, ReconstructParams, load_models, stage_chain
from engines.simulate.config import make_sim_config
from engines.simulate.microscope import simulate_stack

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[1]
#: Max abs difference allowed between backends, on volumes divided by the torch result's peak.
TOL = 1e-4


def _rel_err(test: np.ndarray, ref: np.ndarray) -> float:
    peak = float(np.abs(ref).max())
    assert peak > 0, "reference volume is all zeros: the comparison would prove nothing"
    return float(np.abs(test.astype(np.float64) - ref) .max() / peak)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A weights folder as the service reads it: reduced-width VSI-SR and RL-DFN, seeded."""
    from engines.rldfn.checkpoint import save_rldfn
    from engines.rldfn.network import DualViewFusionNet
    from engines.vsisr.checkpoint import save_checkpoint
    from engines.vsisr.network import VSISR, VSISRConfig

    root = tmp_path_factory.mktemp("weights")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        save_checkpoint(VSISR(VSISRConfig(features=16, n_groups=1, n_blocks=1, reduction=4, head_features=16)),
                        root / "vsi-sr.pt")
        net = DualViewFusionNet(width=4)
        with torch.no_grad():
            # Default init gives sigmoid features ≈ 0.5 everywhere and a flat output, on which agreement would be
            # cheap; larger weights make the fused volume carry structure (std ≈ 5 % of its peak).
            for m in net.modules():
                if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
                    m.weight.mul_(5**0.5)
        save_rldfn(net, root / "rl-dfn.pt")
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def beads():
    cfg = make_sim_config(shape=(48, 64, 96), structure="beads", n_objects=20)
    stack, _ = simulate_stack(cfg, seed=5)
    return cfg.optics, stack.raw[:12]


def _any_mirror(optics):
    # reduced-width random networks scramble the mirror image: these backend tests split without the mirror check
    from engines.views import ViewsParams

    return ViewsParams(angle_deg=np.copysign(optics.objective_angle_deg, optics.skew_angle_deg), mirror_threshold=0.0)


@pytest.fixture(scope="module")
def torch_result(weights, beads):
    optics, raw = beads
    models = load_models(vsisr_checkpoint=weights / "vsi-sr.pt", rldfn_weights=weights / "rl-dfn.pt", optics=optics)
    rec = Reconstructor(optics, ReconstructParams(mode="full", tile="none", views=_any_mirror(optics)), models,
                        device="cpu")
    return rec(raw, keep_intermediates=True)


def test_reconstructor_full_mode_on_onnxruntime_matches_torch(weights, cache, beads, torch_result) -> None:
    from engines.backends.networks import set_default_exporter
    from export.cache import onnx_exporter

    optics, raw = beads
    # the engines never import export: a checkpoint asked to run on ONNX Runtime needs an installed exporter
    previous = set_default_exporter(None)
    try:
        with pytest.raises(ReconstructError, match="rllsm export --model vsi-sr"):
            load_models(vsisr_checkpoint=weights / "vsi-sr.pt", optics=optics,
                        backend=BackendConfig(backend="onnxruntime", onnx_cache=str(cache)))
        assert not list(cache.glob("*/manifest.json"))
        set_default_exporter(onnx_exporter)
        cfg = BackendConfig(backend="onnxruntime", onnx_cache=str(cache))
        models = load_models(vsisr_checkpoint=weights / "vsi-sr.pt", rldfn_weights=weights / "rl-dfn.pt",
                             optics=optics, backend=cfg)
    finally:
        set_default_exporter(previous)
    # Both networks really run on ONNX Runtime (the RL step of RL-DFN stays in torch).
    assert isinstance(models.vsisr, OnnxRuntimeBackend) and isinstance(models.rldfn, OnnxRuntimeBackend)
    assert len(list(cache.glob("*/manifest.json"))) == 2
    rec = Reconstructor(optics, ReconstructParams(mode="full", tile="none", views=_any_mirror(optics)), models,
                        device="cpu")
    assert rec._rldfn.net is models.rldfn
    res = rec(raw, keep_intermediates=True)
    assert res.fused.shape == torch_result.fused.shape
    assert _rel_err(res.intermediates["lateral_sr"], torch_result.intermediates["lateral_sr"]) <= TOL
    assert _rel_err(res.fused, torch_result.fused) <= TOL
    # and the result is a reconstruction, not a constant: the comparison above has something to compare
    assert float(torch_result.fused.std()) > 1e-2 * float(np.abs(torch_result.fused).max())


def test_tensorrt_from_a_checkpoint_says_how_to_build_an_engine(weights) -> None:
    from engines.reconstruct import ReconstructError

    with pytest.raises(ReconstructError, match="rllsm export --model rl-dfn .* --format engine"):
        load_models(rldfn_weights=weights / "rl-dfn.pt", backend=BackendConfig(backend="tensorrt"))


def _views(tmp: Path) -> list[str]:
    rng = np.random.default_rng(1)
    from scipy import ndimage

    base = ndimage.gaussian_filter(rng.random((20, 36, 40)).astype(np.float32) ** 8, 1.5)
    view_a, view_b = base, np.roll(base, 1, axis=2) * 0.8
    z, y, x = np.mgrid[-3:4, -3:4, -3:4]
    psf_a = np.exp(-(z**2 / 4.0 + y**2 / 1.5 + x**2 / 1.5)).astype(np.float32)
    psf_b = np.exp(-(z**2 / 1.5 + y**2 / 1.5 + x**2 / 4.0)).astype(np.float32)
    paths = []
    for name, arr in (("a", view_a), ("b", view_b), ("pa", psf_a), ("pb", psf_b)):
        tifffile.imwrite(tmp / f"{name}.tif", arr)
        paths.append(str(tmp / f"{name}.tif"))
    return paths


def test_fuse_command_onnxruntime_matches_torch(weights, tmp_path) -> None:
    a, b, pa, pb = _views(tmp_path)
    cache = tmp_path / "cache"  # a fresh cache: this run has to export the checkpoint itself
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    outs = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / f"fused-{backend}.tif"
        subprocess.run([sys.executable, "-m", "streamer", "fuse", a, b, str(out), "--model",
                        str(weights / "rl-dfn.pt"), "--psf-a", pa, "--psf-b", pb, "--device", "cpu", "--no-progress",
                        "--backend", backend, "--onnx-cache", str(cache), "--tile", "16", "--overlap", "4"],
                       check=True, cwd=REPO, env=env, capture_output=True, timeout=180)
        outs[backend] = tifffile.imread(out)
    assert len(list(cache.glob("rl-dfn-*/manifest.json"))) == 1  # the ONNX model that ran, validated and cached
    assert outs["torch"].shape == (20, 36, 40)
    assert _rel_err(outs["onnxruntime"], outs["torch"]) <= TOL


def test_fuse_command_explicit_unavailable_backend_is_a_clear_error(weights, tmp_path) -> None:
    a, b, pa, pb = _views(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "streamer", "fuse", a, b, str(tmp_path / "o.tif"), "--model",
                           str(weights / "rl-dfn.pt"), "--psf-a", pa, "--psf-b", pb, "--device", "cpu",
                           "--no-progress", "--backend", "tensorrt"],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--format engine" in proc.stderr


def test_service_with_onnxruntime_backend_matches_torch_chain(weights, cache, beads, tmp_path) -> None:
    from streaming_util import end_msg, pusher, send_all, stack_frames, start_msg

    from streamer.pipeline import Stage, default_budget_mib, install_exporter
    from streamer.service import Service, ServiceConfig, wait_for

    optics, raw = beads
    backend = BackendConfig(backend="onnxruntime", onnx_cache=str(cache))

    def stages(start):  # the service's chain (as build_stages wires it), split without the mirror check
        install_exporter()
        chain = stage_chain("full", start.optics, device="cpu", weights=str(weights),
                            memory_budget_mib=default_budget_mib("cpu"), backend=backend, views=_any_mirror(optics))
        chain[:] = [Stage(s[0], s[1], getattr(s, "kind", "numpy")) for s in chain]
        return chain

    cfg = ServiceConfig(ingest="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0", recording=tmp_path / "rec",
                        output=tmp_path / "out", output_format="npy", stack_timeout_s=60.0, mode="full",
                        device="cpu", weights=weights,
                        backend=backend)
    with Service(cfg, stage_factory=stages) as svc:
        msgs = [start_msg("ort", raw.shape[0], raw.shape[1:], optics=optics)]
        msgs += stack_frames("ort", 0, raw, None, seq0=1)
        msgs.append(end_msg("ort", len(msgs), len(msgs) + 1))
        with pusher(svc.ingest_endpoint) as sock:
            send_all(sock, msgs)
        assert wait_for(lambda: svc.metrics.counter("volumes_output") == 1 or svc.metrics.counter("stage_errors") > 0,
                        150)
        errors = list(svc.processor.last_errors)
    assert not errors, errors
    got = np.load(tmp_path / "out" / "ort" / "t00000_c0.npy")
    # The same chain on torch, built as the service builds it (same weights folder, same tile budget).
    vol = raw
    for _, fn in stage_chain("full", optics, device="cpu", weights=str(weights),
                             memory_budget_mib=default_budget_mib("cpu"), views=_any_mirror(optics)):
        vol = fn(vol)
    vol = np.asarray(vol)  # the stages hand device tensors along; the runner copies the last one back
    assert got.shape == vol.shape
    assert _rel_err(got, vol) <= TOL


def test_lateral_sr_file_onnxruntime_matches_torch(weights, cache, tmp_path) -> None:
    from engines.vsisr.lateral import LateralSRParams
    from streamer.cli.lateral_sr_cmd import lateral_sr_file

    rng = np.random.default_rng(2)
    tifffile.imwrite(tmp_path / "in.tif", (rng.random((10, 40, 44)) * 3000).astype(np.uint16))
    outs = {}
    for name in ("torch", "onnxruntime"):
        out = tmp_path / f"{name}.tif"
        lateral_sr_file(tmp_path / "in.tif", out, weights / "vsi-sr.pt", None, LateralSRParams(), device="cpu",
                        float32=True, progress=False, backend=BackendConfig(backend=name, onnx_cache=str(cache)))
        outs[name] = tifffile.imread(out)
    assert outs["torch"].shape == (4, 60, 66)
    assert _rel_err(outs["onnxruntime"], outs["torch"]) <= TOL
