"""Disk outputs: one contract every disk sink passes, then what each format must get right for napari and Fiji."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import importlib.util

import numpy as np
import pytest
import tifffile
import zarr

from engines.config import OpticsConfig
from streamer.sinks import (
    OmeTiffConfig,
    OmeZarrConfig,
    SinkSetupError,
    SinkStateError,
    VolumeIndex,
    VolumeMeta,
    ZarrCompression,
    open_sink,
)
from streamer.sinks.tiff_sink import tiff_name

HAS_TS = importlib.util.find_spec("tensorstore") is not None
TS = pytest.param("tensorstore", marks=pytest.mark.skipif(not HAS_TS, reason="tensorstore not installed"))
SHAPE = (6, 20, 24)
VOXEL = (0.1032, 0.0926, 0.0926)


def meta(**kw) -> VolumeMeta:
    args = dict(acquisition_id="cell-07", shape=SHAPE, dtype="uint16", voxel_size_um=VOXEL, channels=("488",),
                time_interval_s=2.5, optics=OpticsConfig(), metadata={"Camera": "Orca", "Exposure-ms": 5.0})
    args.update(kw)
    return VolumeMeta(**args)


def volume(t: int, c: int = 0, dtype: str = "uint16") -> np.ndarray:
    rng = np.random.default_rng(100 * t + c)
    return rng.integers(0, 4000, SHAPE).astype(dtype)


def make_config(kind: str, tmp_path: Path, **kw):
    if kind.startswith("zarr"):
        backend = kind.removeprefix("zarr-") if "-" in kind else "zarr-python"
        if backend == "direct":
            kw.setdefault("shard", False)
        return OmeZarrConfig(path=tmp_path / "run.ome.zarr", backend=backend, **kw)
    return OmeTiffConfig(directory=tmp_path / "tiffs", **kw)


def read_back(kind: str, tmp_path: Path, m: VolumeMeta, index: VolumeIndex) -> np.ndarray | None:
    if kind.startswith("zarr"):
        arr = zarr.open_group(tmp_path / "run.ome.zarr", mode="r")["0"]
        return None if index.timepoint >= arr.shape[0] else arr[index.timepoint, index.channel]
    p = tmp_path / "tiffs" / tiff_name(m.acquisition_id, index)
    return tifffile.imread(p) if p.exists() else None


# --- the contract every disk sink keeps -------------------------------------------------------------------------

KINDS = ["zarr", pytest.param("zarr-tensorstore", marks=TS.marks), "zarr-direct", "tiff"]
ZARR_BACKENDS = ["zarr-python", TS]


@pytest.mark.parametrize("kind", KINDS)
def test_roundtrip_with_skip(kind: str, tmp_path: Path) -> None:
    m = meta()
    sink = open_sink(make_config(kind, tmp_path))
    sink.setup(m)
    for t in (0, 2, 1):  # the pipeline may finish volumes out of order
        sink.append(volume(t), VolumeIndex(t))
    sink.skip(VolumeIndex(3), "reconstruction failed: stack t=3 incomplete")
    sink.close()
    sink.close()  # idempotent
    for t in range(3):
        np.testing.assert_array_equal(read_back(kind, tmp_path, m, VolumeIndex(t)), volume(t))
    assert sink.stats.written == 3
    assert sink.stats.bytes_written == 3 * m.nbytes
    assert sink.stats.skipped == {VolumeIndex(3): "reconstruction failed: stack t=3 incomplete"}


@pytest.mark.parametrize("kind", KINDS)
def test_misuse_is_a_typed_error(kind: str, tmp_path: Path) -> None:
    sink = open_sink(make_config(kind, tmp_path))
    with pytest.raises(SinkStateError, match="before setup"):
        sink.append(volume(0), VolumeIndex(0))
    sink.setup(meta(n_timepoints=2))
    with pytest.raises(SinkStateError, match=r"6×20×24 float32.*set up for 6×20×24 uint16"):
        sink.append(volume(0, dtype="float32"), VolumeIndex(0))
    with pytest.raises(SinkStateError, match="channel 1"):
        sink.append(volume(0), VolumeIndex(0, 1))
    with pytest.raises(SinkStateError, match="beyond the 2 planned"):
        sink.append(volume(0), VolumeIndex(2))
    sink.close()
    with pytest.raises(SinkStateError, match="after close"):
        sink.append(volume(0), VolumeIndex(0))


@pytest.mark.parametrize("kind", KINDS)
def test_existing_output_is_not_overwritten_unless_asked(kind: str, tmp_path: Path) -> None:
    first = open_sink(make_config(kind, tmp_path))
    first.setup(meta())
    first.append(volume(0), VolumeIndex(0))
    first.close()
    with pytest.raises(SinkSetupError, match="already exists"):
        open_sink(make_config(kind, tmp_path)).setup(meta())
    again = open_sink(make_config(kind, tmp_path, overwrite=True))
    again.setup(meta())
    again.append(volume(5), VolumeIndex(0))
    again.close()
    np.testing.assert_array_equal(read_back(kind, tmp_path, meta(), VolumeIndex(0)), volume(5))


@pytest.mark.parametrize("kind", KINDS)
def test_unwritable_location_fails_at_setup(kind: str, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should be")
    cfg = (OmeZarrConfig(path=blocker / "run.ome.zarr") if kind.startswith("zarr")
           else OmeTiffConfig(directory=blocker / "tiffs"))
    with pytest.raises(SinkSetupError, match="cannot create"):
        open_sink(cfg).setup(meta())


def test_bad_geometry_is_refused() -> None:
    with pytest.raises(SinkSetupError, match="voxel size"):
        meta(voxel_size_um=(0.0, 0.1, 0.1))
    with pytest.raises(SinkSetupError, match="shape"):
        meta(shape=(0, 4, 4))


# --- OME-Zarr: NGFF 0.5 that napari-ome-zarr and Fiji's readers understand ---------------------------------------


@pytest.mark.parametrize("backend", ZARR_BACKENDS)
def test_zarr_ngff05_metadata(tmp_path: Path, backend: str) -> None:
    m = meta(channels=("488", "560"))
    sink = open_sink(OmeZarrConfig(path=tmp_path / "run.ome.zarr", compression=ZarrCompression.lz4, backend=backend))
    sink.setup(m)
    assert sink.backend == backend
    for t in range(2):
        for c in range(2):
            sink.append(volume(t, c), VolumeIndex(t, c))
    sink.close()

    root = tmp_path / "run.ome.zarr"
    doc = json.loads((root / "zarr.json").read_text())
    assert doc["zarr_format"] == 3 and doc["node_type"] == "group"
    ome = doc["attributes"]["ome"]
    assert ome["version"] == "0.5"
    (ms,) = ome["multiscales"]
    assert [a["name"] for a in ms["axes"]] == ["t", "c", "z", "y", "x"]
    assert [a["type"] for a in ms["axes"]] == ["time", "channel", "space", "space", "space"]
    assert [a.get("unit") for a in ms["axes"]] == ["second", None, "micrometer", "micrometer", "micrometer"]
    (ds,) = ms["datasets"]
    assert ds["path"] == "0"
    (scale,) = ds["coordinateTransformations"]
    assert scale["type"] == "scale"
    assert scale["scale"] == pytest.approx([2.5, 1.0, *VOXEL])
    assert [ch["label"] for ch in ome["omero"]["channels"]] == ["488", "560"]
    # the display window is the data's range (estimated on a 1/64 subsample), so a viewer opens it with sensible
    # contrast: inside the true range, and close to it for this uniform random data
    lo = min(volume(t, 0).min() for t in range(2))
    hi = max(volume(t, 0).max() for t in range(2))
    win = ome["omero"]["channels"][0]["window"]
    assert lo <= win["start"] < lo + 0.05 * (hi - lo)
    assert hi - 0.05 * (hi - lo) < win["end"] <= hi

    arr = zarr.open_group(root, mode="r")["0"]
    assert arr.metadata.dimension_names == ("t", "c", "z", "y", "x")
    assert arr.shape == (2, 2, *SHAPE)
    np.testing.assert_array_equal(arr[1, 1], volume(1, 1))
    prov = doc["attributes"]["rllsm"]
    assert prov["acquisition_id"] == "cell-07" and prov["complete"] is True
    assert prov["optics"]["pixel_size_um"] == pytest.approx(0.0926)
    assert prov["metadata"]["Camera"] == "Orca"


@pytest.mark.parametrize("backend", ZARR_BACKENDS)
@pytest.mark.parametrize("shard", [False, True])
def test_zarr_grows_along_t_and_trims_at_close(tmp_path: Path, backend: str, shard: bool) -> None:
    sink = open_sink(OmeZarrConfig(path=tmp_path / "run.ome.zarr", shard=shard, chunk_zyx=(3, 8, 8), backend=backend))
    sink.setup(meta(n_timepoints=None))
    for t in range(5):
        sink.append(volume(t), VolumeIndex(t))
    sink.skip(VolumeIndex(5), "dropped: writer queue full")
    sink.close()
    g = zarr.open_group(tmp_path / "run.ome.zarr", mode="r")
    arr = g["0"]
    assert arr.shape == (6, 1, *SHAPE)  # t=5 skipped but announced: the axis covers it, its chunks stay empty
    assert arr.chunks == (1, 1, 3, 8, 8)
    np.testing.assert_array_equal(arr[4, 0], volume(4))
    assert not arr[5, 0].any()
    assert g.attrs["rllsm"]["skipped"] == {"t=5 c=0": "dropped: writer queue full"}


# --- OME-TIFF: physical sizes Fiji's Bio-Formats reads --------------------------------------------------------------


def test_tiff_ome_physical_sizes(tmp_path: Path) -> None:
    m = meta()
    sink = open_sink(OmeTiffConfig(directory=tmp_path / "tiffs"))
    sink.setup(m)
    sink.append(volume(3), VolumeIndex(3))
    sink.skip(VolumeIndex(4), "disk writer queue full")
    sink.close()
    files = sorted(p.name for p in (tmp_path / "tiffs").iterdir())
    assert files == ["cell-07_skipped.txt", "cell-07_t00003_c0.ome.tif"]  # no .partial left behind
    assert "t=4 c=0\tdisk writer queue full" in (tmp_path / "tiffs" / "cell-07_skipped.txt").read_text()
    with tifffile.TiffFile(tmp_path / "tiffs" / "cell-07_t00003_c0.ome.tif") as tf:
        assert tf.is_ome
        np.testing.assert_array_equal(tf.asarray(), volume(3))
        root = ET.fromstring(tf.ome_metadata)
    ns = {"ome": root.tag.split("}")[0].strip("{")}
    pixels = root.find("ome:Image/ome:Pixels", ns)
    assert pixels is not None
    assert (pixels.get("SizeC"), pixels.get("SizeT")) == ("1", "1")
    assert (int(pixels.get("SizeZ")), int(pixels.get("SizeY")), int(pixels.get("SizeX"))) == SHAPE
    for axis, value in zip("ZYX", VOXEL):
        assert float(pixels.get(f"PhysicalSize{axis}")) == pytest.approx(value)
        assert pixels.get(f"PhysicalSize{axis}Unit") == "µm"
    assert float(pixels.get("TimeIncrement")) == pytest.approx(2.5)
    channel = pixels.find("ome:Channel", ns)
    assert channel.get("Name") == "488"
    assert float(channel.get("ExcitationWavelength")) == pytest.approx(488.0)


@pytest.mark.parametrize("backend", [*ZARR_BACKENDS, "direct"])
def test_zarr_store_validates_against_ngff05_models(tmp_path: Path, backend: str) -> None:
    """An independent reader's check: yaozarrs (the OME-Zarr spec as pydantic models, used by ome-writers)."""
    yaozarrs = pytest.importorskip("yaozarrs", reason="yaozarrs (comes with ome-writers) not installed")
    root = tmp_path / "run.ome.zarr"
    sink = open_sink(OmeZarrConfig(path=root, backend=backend, shard=backend != "direct"))
    sink.setup(meta(channels=("488", "560"), n_timepoints=None))
    for t in range(3):
        sink.append(volume(t), VolumeIndex(t, t % 2))
    sink.close()
    yaozarrs.validate_zarr_store(root)  # group document, multiscales, and the array it points to
    # negative control: the same document with the spatial axes out of order must be refused
    doc = json.loads((root / "zarr.json").read_text())
    axes = doc["attributes"]["ome"]["multiscales"][0]["axes"]
    axes[2], axes[0] = axes[0], axes[2]
    with pytest.raises(Exception, match="(?i)axes|time|order"):
        yaozarrs.validate_ome_json(json.dumps(doc))


def test_ome_tiff_metadata_parses_with_ome_types(tmp_path: Path) -> None:
    """An independent reader's check: ome-types validates the OME-XML against the OME data model."""
    ome_types = pytest.importorskip("ome_types", reason="ome-types (comes with ome-writers) not installed")
    sink = open_sink(OmeTiffConfig(directory=tmp_path))
    sink.setup(meta())
    sink.append(volume(0), VolumeIndex(0))
    sink.close()
    with tifffile.TiffFile(tmp_path / "cell-07_t00000_c0.ome.tif") as tf:
        ome = ome_types.from_xml(tf.ome_metadata)
    px = ome.images[0].pixels
    assert (px.size_z, px.size_y, px.size_x) == SHAPE
    assert (px.physical_size_z, px.physical_size_y, px.physical_size_x) == pytest.approx(VOXEL)
    assert px.physical_size_x_unit.value == "µm"
    assert px.channels[0].name == "488" and px.channels[0].excitation_wavelength == pytest.approx(488.0)
    assert px.time_increment == pytest.approx(2.5)


def test_direct_backend_grows_pads_edge_chunks_and_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    sink = open_sink(OmeZarrConfig(path=tmp_path / "run.ome.zarr", backend="direct", shard=False,
                                   chunk_zyx=(4, 20, 24)))  # 6 planes in chunks of 4: the last chunk is padded
    sink.setup(meta(n_timepoints=None))
    assert sink.backend == "direct"
    for t in (1, 0, 2):
        sink.append(volume(t), VolumeIndex(t))
    sink.close()
    arr = zarr.open_group(tmp_path / "run.ome.zarr", mode="r")["0"]
    assert arr.shape == (3, 1, *SHAPE) and arr.chunks == (1, 1, 4, 20, 24)
    for t in range(3):
        np.testing.assert_array_equal(arr[t, 0], volume(t))
    assert not list((tmp_path / "run.ome.zarr").rglob("*.partial"))
    for bad, why in (({"shard": True}, "shard is on"), ({"shard": False, "compression": ZarrCompression.zstd},
                                                        "compression is zstd"),
                     ({"shard": False, "chunk_zyx": (4, 8, 8)}, "whole planes")):
        with pytest.raises(SinkSetupError, match=why):
            open_sink(OmeZarrConfig(path=tmp_path / "bad.ome.zarr", backend="direct", **bad)).setup(meta())
