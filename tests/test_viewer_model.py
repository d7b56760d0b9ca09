"""The viewer's pure part and its GUI-free sources: no napari, no Qt needed (real files and sockets only)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from streamer.display import DisplayConfig, DisplayPublisher
from streamer.sinks import OmeZarrConfig, open_sink
from streamer.sinks.base import VolumeIndex, VolumeMeta
from streamer.viewer.model import (
    ContrastState,
    Follower,
    Frame,
    ViewerError,
    auto_contrast,
    frame_from_volume,
    frame_text,
    resolve_layers,
    resolve_target,
    service_status_view,
)
from streamer.viewer.sources import DatasetSource, StreamSource, ngff_voxel_size_um

REPO = Path(__file__).resolve().parents[1]


def _frame(shape=(5, 7, 9), vox=(0.4, 0.11, 0.13), t=3, c=1, seed=0) -> Frame:
    vol = np.random.default_rng(seed).random(shape, dtype=np.float32)
    return frame_from_volume(vol, acquisition_id="acq", timepoint=t, channel=c, voxel_size_um=vox, made_at=None)


# --- targets ---------------------------------------------------------------------------------------------------------


def test_resolve_target_endpoints_and_datasets(tmp_path):
    assert resolve_target(None).endpoint == "tcp://127.0.0.1:5556"
    assert resolve_target("tcp://10.0.0.2:7000").endpoint == "tcp://10.0.0.2:7000"
    assert resolve_target("scope-pc:6000").endpoint == "tcp://scope-pc:6000"
    ds = tmp_path / "a.ome.zarr"
    ds.mkdir()
    (ds / "zarr.json").write_text("{}")
    t = resolve_target(str(ds))
    assert t.kind == "dataset" and t.path == ds
    for bad, words in [("tcp://nohost", "host and a port"), ("localhost:99999", "between 1 and 65535"),
                       (str(tmp_path / "missing.ome.zarr"), "neither"), (str(tmp_path), "not an OME-Zarr")]:
        with pytest.raises(ViewerError, match=words):
            resolve_target(bad)


# --- frames and layers -----------------------------------------------------------------------------------------------


def test_frame_refuses_mips_that_do_not_belong_to_the_volume():
    vol = np.zeros((4, 5, 6), np.float32)
    good = {"z": np.zeros((5, 6)), "y": np.zeros((4, 6)), "x": np.zeros((4, 5))}
    Frame(vol, good, acquisition_id="a", timepoint=0)
    with pytest.raises(ViewerError, match="MIP y .* must be \\(4, 6\\)"):
        Frame(vol, {**good, "y": np.zeros((6, 4))}, acquisition_id="a", timepoint=0)
    with pytest.raises(ViewerError, match="voxel size"):
        Frame(vol, good, acquisition_id="a", timepoint=0, voxel_size_um=(0.1, 0.0, 0.1))
    with pytest.raises(ViewerError, match="\\(z, y, x\\) volume"):
        frame_from_volume(np.zeros((4, 5)), acquisition_id="a", timepoint=0)


@pytest.mark.parametrize("shape,vox", [((5, 7, 9), (0.4, 0.11, 0.13)), ((16, 3, 40), (1.0, 0.5, 0.25))])
def test_layers_hold_the_frame_at_its_voxel_size_with_mips_as_walls_outside_the_volume(shape, vox):
    f = _frame(shape, vox)
    specs = {s.name: s for s in resolve_layers(f, (0.0, 1.0))}
    assert set(specs) == {"fused c1", "MIP z c1", "MIP y c1", "MIP x c1"}
    vol = specs["fused c1"]
    assert vol.data is f.volume and vol.scale == vox and vol.unit == "µm" and vol.translate == (0, 0, 0)
    extent = np.array(shape) * np.array(vox)
    for i, ax in enumerate("zyx"):
        s = specs[f"MIP {ax} c1"]
        assert s.data.shape[i] == 1 and np.array_equal(s.data.squeeze(i), f.volume.max(axis=i))
        assert s.scale == vox
        # the wall lies beyond the volume along its own axis and within it along the others
        assert s.translate[i] > extent[i] and all(s.translate[j] == 0 for j in range(3) if j != i)


def test_unknown_voxel_size_is_shown_in_voxels_not_guessed():
    f = _frame(vox=None)
    specs = resolve_layers(f, (0.0, 1.0))
    assert all(s.scale == (1.0, 1.0, 1.0) and s.unit == "voxel" for s in specs)
    assert "voxel size unknown" in frame_text(f)


# --- contrast, follow, text -----------------------------------------------------------------------------------------


def test_auto_contrast_uses_percentiles_and_never_an_empty_range():
    img = np.arange(10_000, dtype=np.float32).reshape(100, 100)
    lo, hi = auto_contrast(img, 1, 99)
    assert lo == pytest.approx(np.percentile(img, 1)) and hi == pytest.approx(np.percentile(img, 99))
    assert auto_contrast(np.full((4, 4), 7.0)) [1] > 7.0
    assert auto_contrast(np.full((4, 4), np.nan)) == (0.0, 1.0)
    assert auto_contrast(np.array([np.inf, 1.0, 2.0])) == pytest.approx((1.001, 1.999))


def test_contrast_follows_each_frame_until_locked():
    a, b = _frame(seed=1), frame_from_volume(_frame(seed=2).volume * 50, acquisition_id="acq", timepoint=4)
    s = ContrastState().update(a)
    assert s.limits == auto_contrast(a.mips["z"])
    assert s.update(b).limits == auto_contrast(b.mips["z"])  # unlocked: follows
    locked = s.lock((0.2, 0.7))
    assert locked.update(b).limits == (0.2, 0.7)  # locked: stays where the user put it
    assert locked.unlock().update(b).limits == auto_contrast(b.mips["z"])
    with pytest.raises(ViewerError, match="increasing"):
        s.lock((3.0, 1.0))


def test_follower_pauses_holds_the_newest_and_shows_it_on_resume():
    frames = [_frame(t=t) for t in range(5)]
    st, shown = Follower().offer(frames[0])
    assert shown is frames[0] and st.shown == frames[0].key
    st = st.pause()
    for f in frames[1:4]:
        st, shown = st.offer(f)
        assert shown is None
    assert st.shown == frames[0].key and st.held == 2 and st.received == 4
    st, shown = st.toggle()  # resume
    assert shown is frames[3] and st.following and st.shown == frames[3].key
    st, shown = st.offer(frames[4])
    assert shown is frames[4]


def test_frame_text_names_timepoint_channel_latency_dropped_and_state():
    f = Frame(**{**_frame().__dict__, "made_at": 100.0})
    text = frame_text(f, following=False, dropped=7, received=12, now=100.25)
    for part in ("acq", "t=3 c=1", "5×7×9 at 0.4×0.11×0.13 µm", "latency 0.25 s", "dropped 7", "received 12",
                 "paused"):
        assert part in text


def test_service_status_view_refuses_error_answers():
    with pytest.raises(ViewerError, match="ask again"):
        service_status_view({"ok": False, "error": "status unavailable this instant; ask again"})
    with pytest.raises(ViewerError, match="not a status"):
        service_status_view({"stopping": True})


# --- sources ---------------------------------------------------------------------------------------------------------


def _meta(vox=(0.3, 0.1, 0.1), shape=(6, 10, 12), acq="ds", channels=("488", "560")) -> VolumeMeta:
    return VolumeMeta(acquisition_id=acq, shape=shape, dtype="uint16", voxel_size_um=vox, channels=channels,
                      n_timepoints=None)


def test_ngff_voxel_size_multiplies_both_scales_and_converts_units():
    ome = {"multiscales": [{
        "axes": [{"name": "t", "type": "time", "unit": "second"}, {"name": "z", "unit": "nanometer"},
                 {"name": "y", "unit": "micrometer"}, {"name": "x", "unit": "millimeter"}],
        "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [2, 300, 0.1, 1e-4]}]}],
        "coordinateTransformations": [{"type": "scale", "scale": [1, 2, 2, 2]}],
    }]}
    names, vox, path = ngff_voxel_size_um(ome)
    assert names == ("t", "z", "y", "x") and path == "s0" and vox == pytest.approx((0.6, 0.2, 0.2))
    ome["multiscales"][0]["axes"][1].pop("unit")
    assert ngff_voxel_size_um(ome)[1] is None
    with pytest.raises(ViewerError, match="last three axes"):
        ngff_voxel_size_um({"multiscales": [{"axes": [{"name": "y"}, {"name": "x"}], "datasets": [{"path": "0"}]}]})


def test_dataset_source_follows_a_dataset_while_it_is_written(tmp_path):
    rng = np.random.default_rng(4)
    meta = _meta()
    path = tmp_path / "live.ome.zarr"
    src = DatasetSource(path, settle_s=0.2)  # named before it exists, as the service's status does
    assert src.poll(0.05) == []
    sink = open_sink(OmeZarrConfig(path=path))
    sink.setup(meta)
    assert src.poll(0.05) == []  # created, nothing written yet
    if not path.exists():  # built under a partial name until its first volume: the target already resolves
        assert resolve_target(str(path)).path == path
    vols = {}
    for t in range(3):
        for c in range(2):
            vols[t, c] = rng.integers(1, 4000, meta.shape, dtype=np.uint16)
            sink.append(vols[t, c], VolumeIndex(t, c))
        frames = src.poll(5.0)
        assert src.voxel_size_um == pytest.approx((0.3, 0.1, 0.1)) and src.acquisition_id == "ds"
        got = {(f.timepoint, f.channel): f for f in frames}
        assert set(got) == {(t, 0), (t, 1)}, "the newest timepoint of every channel, once written"
        for (tt, c), f in got.items():
            assert np.array_equal(f.volume, vols[tt, c]) and f.voxel_size_um == pytest.approx((0.3, 0.1, 0.1))
            assert np.array_equal(f.mips["y"], vols[tt, c].max(axis=1)) and f.source == "dataset"
        assert src.poll(0.3) == []  # nothing new: nothing shown again
    sink.close()


def test_dataset_source_follows_another_writers_dataset_by_its_chunks(tmp_path):
    import zarr

    path = tmp_path / "other.zarr"
    group = zarr.open_group(store=str(path), mode="w", zarr_format=3)
    arr = group.create_array(name="s0", shape=(3, 4, 6, 8), chunks=(1, 2, 3, 8), dtype="float32", fill_value=0)
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": "t", "type": "time"}, {"name": "z", "unit": "nanometer"}, {"name": "y", "unit": "nanometer"},
                 {"name": "x", "unit": "nanometer"}],
        "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [1, 500, 100, 100]}]}],
    }]}
    src = DatasetSource(resolve_target(str(path)).path, settle_s=60)  # never settles by time here
    assert src.voxel_size_um == pytest.approx((0.5, 0.1, 0.1)) and src.axes == ("t", "z", "y", "x")
    rng = np.random.default_rng(6)
    vols = [rng.random((4, 6, 8), dtype=np.float32) + 1 for _ in range(3)]
    arr[0, :2] = vols[0][:2]  # 2 of t=0's 4 chunks
    assert src.poll(0.2) == [], "half a timepoint is not shown"
    arr[0, 2:] = vols[0][2:]
    (first,) = src.poll(5.0)  # all its chunks: whole
    assert first.timepoint == 0 and np.array_equal(first.volume, vols[0])
    arr[1] = vols[1]
    (second,) = src.poll(5.0)
    assert second.timepoint == 1 and np.array_equal(second.volume, vols[1])
    # a volume whose last chunks equal the fill value is never "complete" by count: shown once it stops changing
    vols[2][2:] = 0
    arr[2] = vols[2]
    assert src.poll(0.2) == []
    settling = DatasetSource(path, settle_s=0.3)
    frames = []
    deadline = time.monotonic() + 10
    while not frames or frames[-1].timepoint != 2:
        assert time.monotonic() < deadline, "the unchanged timepoint was never shown"
        frames += settling.poll(0.5)
    assert np.array_equal(frames[-1].volume, vols[2])


def test_stream_source_gives_published_volumes_with_their_mips_and_counts_what_it_skipped():
    pub = DisplayPublisher(DisplayConfig(endpoint="tcp://127.0.0.1:0"))
    src = StreamSource(pub.endpoint, mip_wait_s=2.0)
    try:
        probe = np.zeros((3, 4, 5), np.float32)
        deadline = time.monotonic() + 10
        while not src.poll(0.1):  # a SUB joins asynchronously: publish until it hears something
            assert time.monotonic() < deadline, "the stream source never connected"
            pub.publish(probe, VolumeIndex(0, 0), acquisition_id="warm", voxel_size_um=(1, 1, 1))
        rng = np.random.default_rng(5)
        vols = [rng.random((3, 4, 5), dtype=np.float32) for _ in range(4)]
        for t, v in enumerate(vols):
            pub.publish(v, VolumeIndex(t, 0), acquisition_id="acq", voxel_size_um=(0.5, 0.2, 0.1))
        assert pub.flush(5)
        skipped0 = src.volumes_skipped
        frames = []
        while not frames or frames[-1].timepoint != 3:
            frames += src.poll(2.0)
        last = frames[-1]
        assert np.array_equal(last.volume, vols[3]) and last.voxel_size_um == (0.5, 0.2, 0.1)
        for i, ax in enumerate("zyx"):
            assert np.array_equal(last.mips[ax], vols[3].max(axis=i))
        # every volume after the warm-up was either shown or counted as skipped / missed
        shown = [f for f in frames if f.acquisition_id == "acq"]
        assert len(shown) + (src.volumes_skipped - skipped0) + src.volumes_missed == 4
    finally:
        src.close()
        pub.close()


# --- the core never imports the GUI ----------------------------------------------------------------------------------


def test_core_modules_and_cli_parser_never_import_napari_or_qt():
    code = (
        "import sys, importlib, pkgutil\n"
        "import streamer, engines, export\n"
        "for pkg in (streamer, engines, export):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if m.name.split('.')[-1] in ('napari_app', 'plugin', '__main__'):  # the GUI half; the CLI's runner\n"
        "            continue\n"
        "        importlib.import_module(m.name)\n"
        "from streamer.cli import build_parser\n"
        "p = build_parser()\n"
        "p.parse_args(['status']); p.parse_args(['view', 'tcp://127.0.0.1:5556', '--after', '2'])\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2',"
        " 'PySide6', 'vispy'))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"')) == []
