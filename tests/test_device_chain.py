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
    # what the host-side fits read back (projections, profiles) is small next to the stack
    assert n.probe_bytes < raw.size * 4 / 4, n
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
    for mode, models, data in (("classical", None, raw), ("sr-rl", _sr_models(cfg), raw[:16])):
        params = ReconstructParams(mode=mode, iterations=2, views=_any_mirror(cfg))
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
