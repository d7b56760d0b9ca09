"""Distributed runs on a real Dask scheduler with two worker processes on loopback.

The properties: the volumes equal the in-process run's byte for byte; a worker killed mid-run loses nothing and
duplicates nothing; a resumed run makes only what is missing or damaged; a volume that cannot be made is reported by
timepoint/channel while the rest completes; the live service on a cluster writes what it writes in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

distributed = pytest.importorskip("distributed")

from streaming_util import end_msg, pusher, send_all, stack_frames, start_msg

from streamer.cli import build_parser, main
from streamer.distributed import DistributedError, Ledger, cache_info, open_client, read_volume
from streamer.distributed.offline import reconstruct_distributed, replay_distributed, timepoint_channel
from streamer.distributed.recipe import Recipe, hash_sources
from streamer.replay import replay_offline
from streamer.service import Service, ServiceConfig, wait_for

SHAPE = (24, 48, 64)  # z, y, x of the raw stacks: small enough for a few seconds per volume on two shared cores
N_VOLUMES = 4
ARGS = ["--mode", "classical", "--iterations", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def cluster():
    """A real scheduler and two single-threaded worker processes (nanny-supervised, as in production)."""
    import dask

    from streamer.distributed.cluster import worker_environ

    dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ()})
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                                  silence_logs=50) as lc, distributed.Client(lc) as client:
        client.wait_for_workers(2, timeout=120)
        yield lc, client


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    from engines.simulate.config import make_sim_config
    from engines.simulate.microscope import simulate_stack

    d = tmp_path_factory.mktemp("raw")
    cfg = make_sim_config(shape=SHAPE, structure="filaments", n_objects=4)
    for t in range(N_VOLUMES):
        stack, _ = simulate_stack(cfg, seed=100 + t)
        tifffile.imwrite(d / f"cell_t{t:04d}.tif", stack.raw)
    return d


@pytest.fixture(scope="module")
def in_process(raw_dir, tmp_path_factory):
    """The single-process ``rllsm reconstruct`` of the same stacks: the reference, volume by volume."""
    out = tmp_path_factory.mktemp("inproc")
    assert main(["reconstruct", str(raw_dir), str(out), *ARGS]) == 0
    return {t: tifffile.imread(out / f"cell_t{t:04d}.tif") for t in range(N_VOLUMES)}


def _reconstruct(raw_dir: Path, out: Path, address: str, *extra: str):
    args = build_parser().parse_args(["reconstruct", str(raw_dir), str(out), *ARGS, "--scheduler", address, *extra])
    return reconstruct_distributed(args, sorted(raw_dir.glob("*.tif")), progress=False, say=lambda s: None)


def _assert_same(store: Path, reference: dict[int, np.ndarray]) -> None:
    for t, ref in reference.items():
        got = read_volume(store, t, 0)
        assert got.dtype == ref.dtype and got.shape == ref.shape, t
        assert got.tobytes() == ref.tobytes(), f"volume t={t} differs from the in-process run"


def _counts(store: Path) -> dict[tuple[int, int], int]:
    out: dict[tuple[int, int], int] = {}
    for e in Ledger(store).entries:
        out[(e.t, e.c)] = out.get((e.t, e.c), 0) + 1
    return out


@pytest.fixture(scope="module")
def full_run(cluster, raw_dir, tmp_path_factory):
    lc, _ = cluster
    out = tmp_path_factory.mktemp("dist")
    summary = _reconstruct(raw_dir, out, lc.scheduler_address)
    return out / "reconstructed.ome.zarr", summary


def test_distributed_reconstruct_is_byte_identical_to_in_process(cluster, full_run, in_process):
    _, client = cluster
    store, summary = full_run
    assert summary.failed == {} and summary.computed == N_VOLUMES and summary.resumed == 0
    assert sum(summary.per_worker.values()) == N_VOLUMES
    _assert_same(store, in_process)
    assert _counts(store) == {(t, 0): 1 for t in range(N_VOLUMES)}
    # the chain (PSFs, models) was built at most once per worker process, not once per task
    infos = client.run(cache_info)
    assert all(all(n == 1 for n in i["loads"].values()) for i in infos.values())
    assert sum(len(i["loads"]) for i in infos.values()) >= 1
    import zarr

    g = zarr.open_group(str(store), mode="r")
    assert g.attrs["ome"]["version"] == "0.5" and g.attrs["rllsm"]["complete"] is True
    assert g["0"].shape[:2] == (N_VOLUMES, 1)
    # chunks and shards never span two volumes
    assert g["0"].chunks[:2] == (1, 1) and g["0"].shards[:2] == (1, 1)


def test_resumed_run_makes_only_missing_or_damaged_volumes(cluster, full_run, raw_dir, in_process, tmp_path):
    lc, _ = cluster
    src, _ = full_run
    store = tmp_path / "reconstructed.ome.zarr"
    shutil.copytree(src, store)
    ledger = store / "rllsm-ledger.jsonl"
    lines = ledger.read_text().splitlines()
    # as if the driver died after three volumes were recorded, the last line torn in half
    kept = lines[:4]
    ledger.write_text("\n".join(kept) + "\n" + lines[4][: len(lines[4]) // 2])
    recorded = [(json.loads(x)["t"], json.loads(x)["c"]) for x in kept[1:]]
    damaged = recorded[0]
    shard = next((store / "0" / "c" / str(damaged[0]) / str(damaged[1])).rglob("*"))
    while shard.is_dir():
        shard = next(shard.iterdir())
    shard.write_bytes(b"\0" * 100)  # a torn shard: the ledger says done, the data say otherwise

    summary = _reconstruct(raw_dir, store, lc.scheduler_address)
    assert summary.failed == {}
    assert summary.resumed == len(recorded) - 1
    assert summary.computed == N_VOLUMES - len(recorded) + 1
    runs = [e for e in Ledger(store).entries if e.run == summary.run]
    made = sorted((e.t, e.c) for e in runs)
    assert made == sorted({(t, 0) for t in range(N_VOLUMES)} - set(recorded[1:])), "an intact volume was made again"
    _assert_same(store, in_process)
    again = _reconstruct(raw_dir, store, lc.scheduler_address)
    assert (again.computed, again.resumed) == (0, N_VOLUMES)


@pytest.mark.slow
def test_killing_a_worker_mid_run_still_yields_every_volume_exactly_once(cluster, raw_dir, in_process, tmp_path):
    lc, client = cluster
    result: dict = {}
    run = threading.Thread(target=lambda: result.update(s=_reconstruct(raw_dir, tmp_path, lc.scheduler_address)))
    run.start()
    store = tmp_path / "reconstructed.ome.zarr"
    victim = None
    deadline = time.monotonic() + 120
    # wait until the output exists (the first volume is in) and a worker is busy with another volume, then kill it
    while victim is None and run.is_alive() and time.monotonic() < deadline:
        busy = {w: keys for w, keys in client.processing().items() if any("compute_volume" in k for k in keys)}
        if store.exists() and busy:
            victim = next(iter(busy))
        else:
            time.sleep(0.02)
    assert victim is not None, "the run ended before a worker could be killed mid-run"
    pid = client.run(os.getpid, workers=[victim])[victim]
    os.kill(pid, signal.SIGKILL)
    run.join(180)
    summary = result["s"]
    assert summary.failed == {}
    assert _counts(store) == {(t, 0): 1 for t in range(N_VOLUMES)}, "a volume recorded twice or not at all"
    _assert_same(store, in_process)
    client.wait_for_workers(2, timeout=120)  # the nanny restarted the killed worker for the tests after this one


@pytest.mark.slow
def test_reconstruct_command_with_embedded_workers_then_resumes(raw_dir, in_process, tmp_path, capsys):
    out = tmp_path / "night.ome.zarr"
    assert main(["reconstruct", str(raw_dir), str(out), *ARGS, "--workers", "2", "--no-progress"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["computed"] == N_VOLUMES and not first["failed"]
    assert sum(first["per_worker"].values()) == N_VOLUMES
    _assert_same(out, in_process)
    assert main(["reconstruct", str(raw_dir), str(out), *ARGS, "--workers", "1", "--no-progress"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["computed"], again["resumed"]) == (0, N_VOLUMES)
    assert _counts(out) == {(t, 0): 1 for t in range(N_VOLUMES)}


@pytest.mark.slow
def test_a_volume_that_fails_every_try_is_reported_and_the_rest_completes(cluster, raw_dir, in_process, tmp_path):
    lc, _ = cluster
    raw = tmp_path / "raw"
    shutil.copytree(raw_dir, raw)
    (raw / "cell_t0002.tif").write_bytes(b"not a tiff at all")
    out = tmp_path / "out.ome.zarr"
    code = main(["reconstruct", str(raw), str(out), *ARGS, "--scheduler", lc.scheduler_address])
    assert code == 1
    done = _counts(out)
    assert set(done) == {(t, 0) for t in range(N_VOLUMES)} - {(2, 0)}
    _assert_same(out, {t: v for t, v in in_process.items() if t != 2})
    import zarr

    skipped = zarr.open_group(str(out), mode="r").attrs["rllsm"]["skipped"]
    assert list(skipped) == ["t=2 c=0"] and "cell_t0002.tif" in skipped["t=2 c=0"]


def test_lost_input_is_retried_a_bounded_number_of_times_then_reported(cluster, tmp_path):
    from streamer.distributed.runner import VolumeJob, run_volumes
    from streamer.distributed.tasks import RecordedInput
    from streamer.sinks.base import VolumeMeta

    _, client = cluster
    recipe = Recipe.make("streamer.distributed.recipe:service_stages", {"mode": "none", "optics": None})
    jobs = [VolumeJob(0, 0, RecordedInput(str(tmp_path / "gone"), (0,)))]
    summary = run_volumes(client, recipe, jobs, tmp_path / "o.ome.zarr",
                          lambda shape, dtype, voxel: VolumeMeta("a", shape, dtype, (1.0, 1.0, 1.0)), retries=1,
                          progress=False, say=lambda s: None)
    assert list(summary.failed) == ["t=0 c=0"] and "gone" in summary.failed["t=0 c=0"]


# --- live and replay ----------------------------------------------------------------------------------------------


def _simulated_messages(n: int) -> list:
    from engines.simulate.config import make_sim_config
    from engines.simulate.microscope import simulate_stack

    cfg = make_sim_config(shape=SHAPE, structure="filaments", n_objects=4)
    rng = np.random.default_rng(3)
    base, _ = simulate_stack(cfg, seed=200)
    msgs = [start_msg("acq", SHAPE[0], SHAPE[1:], optics=cfg.optics, n_timepoints=n)]
    for t in range(n):
        # one sample with fresh camera noise per timepoint: the mirror, hence the fused shape, stays put, as the
        # service's outputs (fixed at the first volume) need
        raw = base.raw + rng.poisson(3.0, base.raw.shape).astype(base.raw.dtype)
        msgs += stack_frames("acq", t, raw, rng, len(msgs))
    return msgs + [end_msg("acq", len(msgs), len(msgs))]


@pytest.mark.slow
def test_serve_on_a_scheduler_writes_what_the_in_process_replay_writes(cluster, tmp_path):
    lc, _ = cluster
    n = 3
    cfg = ServiceConfig(ingest="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0", recording=tmp_path / "rec",
                        output=tmp_path / "live", output_format="npy", mode="classical", device="cpu",
                        stack_timeout_s=30.0, scheduler=lc.scheduler_address, max_in_flight=2)
    msgs = _simulated_messages(n)
    with Service(cfg) as svc:
        with pusher(svc.ingest_endpoint) as sock:
            send_all(sock, msgs)
        # the cluster holds up processing, never ingest: every message is recorded while volumes are still out
        assert wait_for(lambda: svc.metrics.snapshot()["counters"].get("messages_received", 0) == len(msgs), 60)
        assert wait_for(lambda: svc.metrics.snapshot()["counters"].get("volumes_output", 0) >= n, 180)
    live = sorted((tmp_path / "live" / "acq").glob("*.npy"))
    assert [p.name for p in live] == [f"t{t:05d}_c0.npy" for t in range(n)]
    # results reached the outputs in timepoint order, each once
    order = [json.loads(x)[1] for x in (tmp_path / "rec" / "done.log").read_text().splitlines()]
    assert order == list(range(n))
    replay_offline(tmp_path / "rec", tmp_path / "ref", mode="classical", device="cpu", timeout_s=30.0)
    for p in live:
        assert np.load(p).tobytes() == np.load(tmp_path / "ref" / "acq" / p.name).tobytes(), p.name

    # the same recording replayed offline on the cluster: one OME-Zarr, the same volumes
    report = replay_distributed(tmp_path / "rec", tmp_path / "dist", scheduler=lc.scheduler_address,
                                mode="classical", device="cpu", progress=False, say=lambda s: None)
    assert report["acquisitions"]["acq"]["computed"] == n and not report["acquisitions"]["acq"]["failed"]
    for t in range(n):
        ref = np.load(tmp_path / "ref" / "acq" / f"t{t:05d}_c0.npy")
        assert read_volume(tmp_path / "dist" / "acq.ome.zarr", t, 0).tobytes() == ref.tobytes()


@pytest.mark.gpu
def test_gpu_workers_match_the_in_process_gpu_run(raw_dir, tmp_path, capsys):
    """One worker per GPU (LocalCUDACluster with dask-cuda, else a LocalCluster on the default GPU)."""
    gpu_args = [a if a != "cpu" else "cuda" for a in ARGS]
    assert main(["reconstruct", str(raw_dir), str(tmp_path / "ref"), *gpu_args]) == 0
    out = tmp_path / "gpu.ome.zarr"
    assert main(["reconstruct", str(raw_dir), str(out), *gpu_args, "--workers", "2", "--no-progress"]) == 0
    assert not json.loads(capsys.readouterr().out)["failed"]
    for t in range(N_VOLUMES):
        ref = tifffile.imread(tmp_path / "ref" / f"cell_t{t:04d}.tif")
        assert read_volume(out, t, 0).tobytes() == ref.tobytes(), t


# --- small pieces ---------------------------------------------------------------------------------------------------


def test_timepoint_and_channel_come_from_names_or_order():
    assert timepoint_channel(["a_t0003_ch1.tif", "a_t0003_ch0.tif", "a_t0001_ch0.tif"]) == [(3, 1), (3, 0), (1, 0)]
    assert timepoint_channel(["x.tif", "y.tif"]) == [(0, 0), (1, 0)]
    assert timepoint_channel(["s_t1.tif", "s_t1.tif.bak"]) == [(0, 0), (1, 0)]  # ambiguous: file order


def test_recipe_fingerprint_follows_model_contents(tmp_path):
    w = tmp_path / "weights.pt"
    w.write_bytes(b"one")
    a = Recipe.make("m:f", {"x": 1}, [w])
    assert Recipe.make("m:f", {"x": 1}, [w], torch_threads=3).fingerprint == a.fingerprint
    w.write_bytes(b"two")
    assert Recipe.make("m:f", {"x": 1}, [w]).fingerprint != a.fingerprint
    assert Recipe.make("m:f", {"x": 2}, [w]).fingerprint != Recipe.make("m:f", {"x": 1}, [w]).fingerprint
    with pytest.raises(DistributedError, match="not found"):
        hash_sources([tmp_path / "missing.pt"])


def test_cluster_arguments_are_checked():
    with pytest.raises(DistributedError, match="either"), open_client():
        pass
    with pytest.raises(DistributedError, match="cannot reach"), open_client(scheduler="tcp://127.0.0.1:1",
                                                                            timeout_s=1.0):
        pass
    assert main(["replay", "rec", "--connect", "tcp://127.0.0.1:1", "--workers", "2"]) == 2


@pytest.mark.slow
def test_resume_refuses_an_output_made_by_another_reconstruction(cluster, full_run, raw_dir, tmp_path):
    lc, _ = cluster
    store = tmp_path / "reconstructed.ome.zarr"
    shutil.copytree(full_run[0], store)
    args = build_parser().parse_args(["reconstruct", str(raw_dir), str(store), "--mode", "classical",
                                      "--iterations", "5", "--scheduler", lc.scheduler_address])
    with pytest.raises(DistributedError, match="another reconstruction"):
        reconstruct_distributed(args, sorted(raw_dir.glob("*.tif")), progress=False, say=lambda s: None)
    args.overwrite = True  # replaced as a whole: nothing of the other reconstruction is kept
    summary = reconstruct_distributed(args, sorted(raw_dir.glob("*.tif")), progress=False, say=lambda s: None)
    assert (summary.computed, summary.resumed) == (N_VOLUMES, 0)
    assert {e.run for e in Ledger(store).entries} == {summary.run}
