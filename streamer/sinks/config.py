"""Versioned settings of the outputs: OME-Zarr, OME-TIFF and the live display stream."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from engines.support import StrictModel

SINK_CONFIG_VERSION = 1


class ZarrCompression(StrEnum):
    """Chunk compression of the OME-Zarr store (``none`` is fastest; ``lz4`` shrinks sparse fluorescence ~2–4×)."""

    none = "none"
    lz4 = "lz4"
    zstd = "zstd"


class TiffCompression(StrEnum):
    none = "none"
    zlib = "zlib"


class _Base(StrictModel):

    version: Literal[1] = SINK_CONFIG_VERSION


class OmeZarrConfig(_Base):
    """Fused volumes appended along t to one OME-Zarr (NGFF 0.5, Zarr v3) dataset."""

    path: Path = Field(description="Dataset to create, e.g. /data/run1.ome.zarr.")
    overwrite: bool = Field(False, description="Replace an existing dataset at 'path'.")
    resume: bool = Field(
        False, description="Continue an existing dataset of the same acquisition and geometry (a restarted service): "
        "the volumes it holds are kept, each volume is stored once. A dataset of another acquisition or geometry is "
        "refused.",
    )
    chunk_zyx: tuple[int, int, int] | None = Field(
        None, description="Chunk shape (z, y, x); default: the whole volume in one shard of ≤64×256×256 chunks."
    )
    shard: bool = Field(True, description="Group the chunks of one volume into one shard file (fewer, larger files).")
    compression: ZarrCompression = ZarrCompression.none
    backend: Literal["auto", "tensorstore", "zarr-python", "direct"] = Field(
        "auto", description="Who writes the chunks: tensorstore when installed (faster, see docs/benchmarks/"
        "writers.md), else zarr-python; 'direct' writes uncompressed z-slab chunks straight from the volume's memory "
        "(fastest; needs shard=False, no compression, chunks of whole planes). Metadata is the same in all cases.",
    )
    queue_size: int = Field(4, ge=1, le=1024, description="Volumes that may wait for the disk before one is dropped.")

    @field_validator("chunk_zyx")
    @classmethod
    def _positive(cls, v: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if v is not None and any(c < 1 for c in v):
            raise ValueError(f"chunk sizes must be ≥ 1, got {v}")
        return v

    @model_validator(mode="after")
    def _one_policy(self) -> OmeZarrConfig:
        if self.overwrite and self.resume:
            raise ValueError("choose overwrite (replace an existing dataset) or resume (continue it), not both")
        return self


class OmeTiffConfig(_Base):
    """One OME-TIFF per timepoint and channel, written under a temporary name and renamed when complete."""

    directory: Path = Field(description="Folder for the files <acquisition>_t00000_c0.ome.tif.")
    overwrite: bool = Field(False, description="Replace files that already exist (a restarted service rewrites "
                            "the volumes it reprocesses, each file atomically).")
    compression: TiffCompression = TiffCompression.none
    queue_size: int = Field(4, ge=1, le=1024)


class NpyConfig(_Base):
    """One ``.npy`` file per volume under ``<directory>/<acquisition>/``, written under a temporary name and renamed."""

    directory: Path = Field(description="Folder; each acquisition gets a sub-folder.")


class DisplayConfig(_Base):
    """The live display stream: ZMQ PUB of each fused volume and its three MIPs, latest wins."""

    endpoint: str = Field(
        "tcp://127.0.0.1:5556", pattern=r"^(tcp|ipc|inproc)://\S+$",
        description="Where the publisher binds; tcp://127.0.0.1:0 picks a free port.",
    )
    send_volume: bool = Field(True, description="Publish the full volume (large) as well as the MIPs.")
    send_mips: bool = Field(True, description="Publish the z, y and x maximum-intensity projections.")
    sndhwm: int = Field(
        4, ge=1, le=10_000,
        description="Messages queued per subscriber; beyond it newer messages replace waiting ones (latest wins).",
    )
    queue_size: int = Field(1, ge=1, le=64, description="Volumes waiting for MIP computation; older ones are replaced.")
