"""True physics in every output of the live service: the fused grid's voxel size, provenance, one grid per
acquisition whatever the mirror does (a drifting simulated acquisition of N timepoints gives N volumes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from engines.reconstruct import views_voxel_um
from engines.simulate import Microscope
from engines.simulate.config import make_sim_config
from streamer.service import Service, ServiceConfig, wait_for
from streaming_util import end_msg, pusher, send_all, stack_frames, start_msg

RAW = (24, 48, 48)
# the coverslip moves between stacks: where the mirror crosses the raw frame (fraction of the skew axis)
MIRROR = (0.42, 0.5, 0.58, 0.46)


def _drifting_stacks(n: int) -> tuple[list[np.ndarray], object]:
    stacks, optics = [], None
    for t in range(n):
        sim = make_sim_config(shape=RAW, mirror_position=MIRROR[t % len(MIRROR)])
        stacks.append(Microscope(sim, seed=t).acquire(t, with_ground_truth=False).raw)
        optics = sim.optics
    return stacks, optics


def _stream(tmp_path, fmt: str, n: int, acq: str = "drift"):
    stacks, optics = _drifting_stacks(n)
    cfg = ServiceConfig(ingest="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0", recording=tmp_path / "rec",
                        output=tmp_path / "out", output_format=fmt, mode="classical", device="cpu",
                        stack_timeout_s=60.0)
    with Service(cfg) as svc:
        msgs = [start_msg(acq, RAW[0], RAW[1:], optics=optics, n_timepoints=n, channels=("488",))]
        for t, s in enumerate(stacks):
            msgs += stack_frames(acq, t, s, None, seq0=len(msgs))
        msgs.append(end_msg(acq, len(msgs), len(msgs) + 1))
        with pusher(svc.ingest_endpoint) as sock:
            send_all(sock, msgs)
        assert wait_for(lambda: svc.processor.status().summary_of(acq) is not None or svc.error is not None, 240)
        status = svc.processor.status()
    assert svc.error is None, svc.error
    return optics, status


@pytest.mark.slow
def test_drifting_acquisition_gives_every_volume_in_one_grid_with_the_fused_voxel_zarr(tmp_path) -> None:
    yaozarrs = pytest.importorskip("yaozarrs", reason="yaozarrs not installed")
    import zarr

    n = 4
    optics, status = _stream(tmp_path, "zarr", n)
    root = tmp_path / "out" / "drift.ome.zarr"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["drift.ome.zarr"]  # no part2, no .partial
    yaozarrs.validate_zarr_store(root)  # an independent reader of NGFF 0.5
    group = zarr.open_group(root, mode="r")
    arr = group["0"]
    assert arr.shape[:2] == (n, 1)
    data = np.asarray(arr[:])
    assert all(data[t, 0].any() for t in range(n)), "a timepoint is missing"
    ome = group.attrs["ome"]["multiscales"][0]
    scale = ome["datasets"][0]["coordinateTransformations"][0]["scale"]
    v = views_voxel_um(optics, "classical")
    assert scale[2:] == pytest.approx([v, v, v])  # the fused grid, isotropic
    assert scale[2] != pytest.approx(optics.deskewed_pixel_z_um)  # never the raw deskewed z step
    assert [a.get("unit") for a in ome["axes"][2:]] == ["micrometer"] * 3
    r = group.attrs["rllsm"]
    assert r["provenance"]["mode"] == "classical" and r["provenance"]["software"]["version"]
    assert r["provenance"]["optics"]["pixel_size_um"] == pytest.approx(optics.pixel_size_um)
    assert sorted(map(tuple, r["stored"])) == [(t, 0) for t in range(n)]
    rows = [r["placements"][f"t={t} c=0"] for t in range(n)]
    depths = [row["native_shape"][0] for row in rows]
    assert len(set(depths)) > 1, f"the simulated drift did not move the mirror: depths {depths}"
    assert all(row["native_shape"][0] + row["pad_z"] == arr.shape[2] for row in rows)
    assert len({row["split_index"] for row in rows}) == n
    # the plane next to the mirror is data in every volume (anchor); padding only ever at the far end
    for t, row in enumerate(rows):
        assert data[t, 0, -1].any()
        if row["pad_z"] > 0:
            assert not data[t, 0, : row["pad_z"]].any()


@pytest.mark.slow
def test_drifting_acquisition_ome_tiff_carries_the_fused_voxel_and_provenance(tmp_path) -> None:
    ome_types = pytest.importorskip("ome_types", reason="ome-types not installed")
    n = 2  # mirror at 0.42 then 0.5 of the frame: two view depths
    optics, _ = _stream(tmp_path, "tiff", n)
    folder = tmp_path / "out" / "drift"
    files = sorted(folder.glob("drift_t*_c0.ome.tif"))
    assert len(files) == n and not list(folder.glob("*.partial"))
    v = views_voxel_um(optics, "classical")
    shapes = set()
    for t, f in enumerate(files):
        with tifffile.TiffFile(f) as tf:
            ome = ome_types.from_xml(tf.ome_metadata)
            shapes.add(tf.asarray().shape)
        px = ome.images[0].pixels
        assert (px.physical_size_z, px.physical_size_y, px.physical_size_x) == pytest.approx((v, v, v))
        assert px.physical_size_z_unit.value == "µm"
        (ann,) = [a for a in ome.structured_annotations.map_annotations if a.namespace == "rllsm-vsim/provenance"]
        kv = {m.k: m.value for m in ann.value.ms}
        assert kv["mode"] == "classical" and kv["software.version"]
        assert float(kv["optics.pixel_size_um"]) == pytest.approx(optics.pixel_size_um)
        assert "placement.split_index" in kv and "placement.pad_z" in kv
    assert len(shapes) == 1  # one grid


def test_provenance_json_is_plain_data(tmp_path) -> None:
    """The provenance the zarr attributes hold survives a JSON round trip (no objects, no NaN)."""
    from engines.config import OpticsConfig
    from engines.reconstruct import stage_chain

    prov = stage_chain("classical", OpticsConfig(), device="cpu").provenance
    assert json.loads(json.dumps(prov, allow_nan=False)) == prov
