"""The reconstruction chain is device-resident: tensors on the chosen device between stages, one copy in, one out.

The transfers are counted by the real edge functions (:func:`engines.device.to_device`, :func:`to_host`), which
every stage and the pipeline worker go through; small read-backs for host-side fits are counted apart as probes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.device import probe_to_host, to_device, to_host, transfers
from engines.reconstruct import ReconModels, Reconstructor, ReconstructParams
from engines.simulate.config import make_sim_config
from engines.simulate.microscope import simulate_stack
from streamer.pipeline import Stage, StageWorker

SHAPE = (48, 96, 96)


@pytest.fixture(scope="module")
def beads():
    cfg = make_sim_config(shape=SHAPE, structure="beads", n_objects=20)
    stack, _ = simulate_stack(cfg, seed=3)
    return cfg, stack.raw


def _sr_models(cfg):
    from engines.vsisr.lateral import LateralSRParams
    from engines.vsisr.network import VSISR, VSISRConfig
    from engines.vsisr.otf import generate_otfs

    torch.manual_seed(0)
    vsisr = VSISR(VSISRConfig(features=16, n_groups=1, n_blocks=1, reduction=4, head_features=16)).eval()
    return ReconModels(vsisr=vsisr, otfs=generate_otfs(cfg.optics), lateral=LateralSRParams(batch_size=8))


def _full_models(cfg):
    from engines.rldfn.network import DualViewFusionNet

    models = _sr_models(cfg)
    torch.manual_seed(1)
    models.rldfn = DualViewFusionNet(width=4).eval()
    return models


#: RL-DFN in tiles small enough that the views are cut into several (four for :func:`_full_input`'s views of about
#: 20×72×65 voxels), so that cutting and blending are exercised
FULL_TILES = {"tile": 48, "overlap": 8}


def _full_input(raw: np.ndarray) -> np.ndarray:
    # a corner of the stack: RL-DFN's feature nets (64 channels) make whole views slow on two CPU cores
    return raw[:12, 24:72, 24:72]


def _any_mirror(cfg):
    # random-weight networks scramble the mirror image: these plumbing tests split without the mirror check
    import math

    from engines.views import ViewsParams

    o = cfg.optics
    return ViewsParams(angle_deg=math.copysign(o.objective_angle_deg, o.skew_angle_deg), mirror_threshold=0.0)


def _on(x, device: torch.device) -> bool:
    if isinstance(x, tuple):
        return len(x) > 0 and all(_on(v, device) for v in x)
    return isinstance(x, torch.Tensor) and x.device.type == device.type


def _check_chain(rec: Reconstructor, raw: np.ndarray) -> None:
    x = raw
    with transfers.measure() as got:
        for stage in rec.stages():
            assert stage.kind == "torch"
            x = stage.fn(x)
            assert _on(x, rec.device), f"stage {stage.name} returned {type(x).__name__}, not a {rec.device} tensor"
        fused = to_host(x)
    n = got()
    assert (n.h2d, n.h2d_bytes) == (1, raw.nbytes), n
    assert (n.d2h, n.d2h_bytes) == (1, fused.nbytes), n
    # what the host-side fits read back (2-D projections, profiles) is small next to the volumes: under a quarter
    # of the stack or of the fused volume as float32 (lateral SR makes the views' projections larger than the raw's)
    assert n.probe_bytes < max(raw.size, fused.size), n
    direct = rec(raw).fused
    np.testing.assert_allclose(fused, direct, rtol=1e-5, atol=1e-6)


def test_classical_chain_stays_on_the_device(beads) -> None:
    cfg, raw = beads
    rec = Reconstructor(cfg.optics, ReconstructParams(mode="classical", iterations=2), device="cpu")
    _check_chain(rec, raw)


def test_sr_rl_chain_stays_on_the_device(beads) -> None:
    cfg, raw = beads
    rec = Reconstructor(cfg.optics, ReconstructParams(mode="sr-rl", iterations=2, views=_any_mirror(cfg)),
                        _sr_models(cfg), device="cpu")
    assert [s.name for s in rec.stages()] == ["preprocess", "lateral_sr", "split_views", "fuse"]
    _check_chain(rec, raw[:16])


def test_full_chain_with_rldfn_tiles_stays_on_the_device(beads) -> None:
    cfg, raw = beads
    params = ReconstructParams(mode="full", views=_any_mirror(cfg), **FULL_TILES)
    rec = Reconstructor(cfg.optics, params, _full_models(cfg), device="cpu")
    assert [s.name for s in rec.stages()] == ["preprocess", "lateral_sr", "split_views", "fuse"]
    _check_chain(rec, _full_input(raw))
    # the network's registration to its views: checked on the first streamed stack, and on every direct call
    from engines.rldfn.consistency import RegistrationReport

    assert isinstance(rec.registration, RegistrationReport), rec.registration
    assert isinstance(rec(_full_input(raw)).reports["registration"], RegistrationReport)


def test_rldfn_fusion_takes_and_returns_device_tensors_without_copies() -> None:
    from engines.rldfn.fuse import fuse_rldfn
    from engines.rldfn.model import RLDFN
    from engines.rldfn.network import DualViewFusionNet

    rng = np.random.default_rng(4)
    a, b = rng.random((2, 11, 26, 21), dtype=np.float32)  # not multiples of 4: padded and cropped on the device
    a[:, :6] = 0  # an empty region: the registered step's coverage weights are not all one
    torch.manual_seed(2)
    psf = rng.random((5, 7, 7)).astype(np.float32)
    model = RLDFN(DualViewFusionNet(width=4).eval(), psf, psf[::-1].copy())
    for kw in ({"tile": "none"}, {"tile": 16, "overlap": 4, "batch_size": 2}):  # one patch; four tiles
        want = fuse_rldfn(a, b, model, device="cpu", **kw)
        assert isinstance(want, np.ndarray) and want.shape == a.shape
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        with transfers.measure() as got:
            out = fuse_rldfn(ta, tb, model, **kw)
        assert isinstance(out, torch.Tensor) and out.device == ta.device and out.dtype == torch.float32
        n = got()
        assert (n.h2d, n.d2h) == (0, 0), n
        assert n.probe_bytes <= 8, n  # the two views' peaks, nothing else
        np.testing.assert_array_equal(out.numpy(), want)  # same numbers, bit for bit, whichever way in


def test_rldfn_budget_on_an_accelerator_leaves_room_for_the_volume_buffers() -> None:
    from engines.rldfn.errors import MemoryBudgetError
    from engines.rldfn.fuse import _patch_budget

    padded, gpu = (32, 64, 64), torch.device("cuda")  # a device object only: nothing runs on it
    volume = 4 * 32 * 64 * 64
    assert _patch_budget(2**30, padded, torch.device("cpu"), True) == 2**30
    assert _patch_budget(None, padded, gpu, True) is None
    assert _patch_budget(2**30, padded, gpu, False) == 2**30 - 4 * volume
    assert _patch_budget(2**30, padded, gpu, True) == 2**30 - 6 * volume
    with pytest.raises(MemoryBudgetError, match="volume's own buffers"):
        _patch_budget(5 * volume, padded, gpu, True)


def test_whole_call_copies_once_each_way_unless_intermediates_are_asked_for(beads) -> None:
    cfg, raw = beads
    rec = Reconstructor(cfg.optics, ReconstructParams(mode="classical", iterations=2), device="cpu")
    with transfers.measure() as got:
        res = rec(raw)
    assert (got().h2d, got().d2h) == (1, 1)
    assert got().d2h_bytes == res.fused.nbytes
    with transfers.measure() as got:
        res = rec(raw, keep_intermediates=True)
    assert got().d2h == 1 + len(res.intermediates)


def test_stage_worker_moves_a_stack_in_once_and_the_volume_out_once(beads) -> None:
    cfg, raw = beads
    rec = Reconstructor(cfg.optics, ReconstructParams(mode="classical", iterations=2), device="cpu")
    worker = StageWorker([Stage(s.name, s.fn, s.kind) for s in rec.stages()], device="cpu")
    with transfers.measure() as got:
        (token, out), = worker.submit(raw, "t0")
    assert token == "t0" and isinstance(out, np.ndarray)
    assert (got().h2d, got().d2h) == (1, 1), got()
    np.testing.assert_allclose(out, rec(raw).fused, rtol=1e-5, atol=1e-6)


def test_edge_functions_count_and_pass_device_tensors_through() -> None:
    a = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    with transfers.measure() as got:
        t = to_device(a, "cpu")
        assert to_device(t, "cpu") is t  # already there: no copy, not counted
        back = to_host(t)
        probe_to_host(t[0, 0])
    n = got()
    assert (n.h2d, n.h2d_bytes, n.d2h, n.d2h_bytes, n.probes, n.probe_bytes) == (1, 48, 1, 48, 1, 8)
    np.testing.assert_array_equal(back, a)
    assert to_device(a, "cpu", dtype=torch.float32).dtype == torch.float32


def test_deskew_stage_of_the_service_is_a_device_stage(beads) -> None:
    from streamer.pipeline import build_stages

    cfg, raw = beads
    (stage,) = build_stages("deskew", cfg.optics, device="cpu")
    assert stage.kind == "torch"
    out = stage.fn(raw)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32


@pytest.mark.gpu
def test_cuda_chain_is_device_resident_and_matches_cpu(beads) -> None:
    cfg, raw = beads
    for mode, models, data in (("classical", None, raw), ("sr-rl", _sr_models(cfg), raw[:16]),
                               ("full", _full_models(cfg), _full_input(raw))):
        params = ReconstructParams(mode=mode, iterations=2, views=_any_mirror(cfg), **FULL_TILES)
        gpu = Reconstructor(cfg.optics, params, models, device="cuda")
        _check_chain(gpu, data)
        cpu = Reconstructor(cfg.optics, params, models, device="cpu")
        a, b = gpu(data).fused, cpu(data).fused
        assert np.abs(a - b).max() <= 1e-3 * max(float(np.abs(b).max()), 1e-6)


@pytest.mark.gpu
def test_cuda_worker_reuses_pinned_buffers_and_overlaps(beads) -> None:
    cfg, raw = beads
    rec = Reconstructor(cfg.optics, ReconstructParams(mode="classical", iterations=2), device="cuda")
    worker = StageWorker([Stage(s.name, s.fn, s.kind) for s in rec.stages()], device="cuda", depth=2)
    got = []
    with transfers.measure() as n:
        for i in range(4):
            got += worker.submit(raw, i)
        got += worker.drain()
    assert [t for t, _ in got] == [0, 1, 2, 3]
    assert (n().h2d, n().d2h) == (4, 4)
    # two stacks in flight at most: the pool never grew past two buffers of each kind
    assert sum(len(v) for v in worker._pool._free.values()) <= 4
    want = Reconstructor(cfg.optics, ReconstructParams(mode="classical", iterations=2), device="cpu")(raw).fused
    for _, out in got:
        assert np.abs(out - want).max() <= 1e-3 * float(np.abs(want).max())


@pytest.mark.gpu
def test_cuda_rldfn_on_onnxruntime_cpu_counts_a_host_copy_per_tile(tmp_path) -> None:
    # ONNX Runtime's CPU provider reads host arrays only: the one backend allowed a host round trip per tile
    from engines.backends import BackendConfig
    from engines.backends.networks import set_default_exporter
    from engines.reconstruct import load_models
    from engines.rldfn.checkpoint import save_rldfn
    from engines.rldfn.fuse import _batches, fuse_rldfn
    from engines.rldfn.model import RLDFN
    from engines.rldfn.network import DualViewFusionNet
    from engines.rldfn.tiling import plan_tiles
    from export.cache import onnx_exporter

    torch.manual_seed(2)
    save_rldfn(DualViewFusionNet(width=4), tmp_path / "rl-dfn.pt")
    previous = set_default_exporter(onnx_exporter)
    try:
        ort = load_models(rldfn_weights=tmp_path / "rl-dfn.pt",
                          backend=BackendConfig(backend="onnxruntime", onnx_cache=str(tmp_path / "cache"))).rldfn
    finally:
        set_default_exporter(previous)
    rng = np.random.default_rng(5)
    a, b = rng.random((2, 24, 48, 48), dtype=np.float32)
    psf = rng.random((5, 7, 7)).astype(np.float32)
    want = fuse_rldfn(a, b, RLDFN(load_models(rldfn_weights=tmp_path / "rl-dfn.pt").rldfn, psf, psf), tile=16,
                      overlap=4, device="cpu")
    ta, tb = (to_device(v, "cuda") for v in (a, b))
    with transfers.measure() as got:
        out = fuse_rldfn(ta, tb, RLDFN(ort, psf, psf), tile=16, overlap=4)
    groups = len(_batches(plan_tiles((24, 48, 48), 16, 4), 1))
    assert isinstance(out, torch.Tensor) and out.device.type == "cuda"
    assert (got().h2d, got().d2h) == (groups, 2 * groups), got()
    assert np.abs(to_host(out) - want).max() <= 1e-3 * float(np.abs(want).max())
