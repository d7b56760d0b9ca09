"""Where the learned and measured models of a reconstruction come from, and the provenance they leave in outputs.

:class:`ReconSources` is the one description of "which checkpoint, OTFs, RL-DFN weights and PSFs" shared by
``rllsm reconstruct``, ``serve`` and ``replay`` (their flags are generated from its fields by
:mod:`streamer.cli.model_options`), so the three commands cannot drift apart. :func:`models_from_sources` reads them
into :class:`engines.reconstruct.ReconModels`; :func:`sources_provenance` names every file with its SHA-256 so that a
fused volume says exactly which weights made it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from engines.support import StrictModel

SOURCES_VERSION = 1
_MAX_FILES_HASHED = 256  # per folder: an OTF or RL-DFN folder holds a handful; a wrong folder must not take hours


class SourcesError(ValueError):
    """A model source is missing, of the wrong kind, or not usable with the requested mode."""


class ReconSources(StrictModel):
    """Model files of a reconstruction; every field is a command-line flag (``json_schema_extra['flag']``)."""

    version: Literal[1] = SOURCES_VERSION
    checkpoint: Path | None = Field(
        None, description="VSI-SR checkpoint (the reference's published .pth, ours .pt, or an `rllsm export` folder)",
        json_schema_extra={"flag": "--checkpoint", "metavar": "PTH"})
    otf_dir: Path | None = Field(
        None, description="OTF folder in the reference layout (<wavelength>/OTF0.tif, OTF1.tif, apo_*.tif); default: "
        "OTFs generated from the optics (approximation)", json_schema_extra={"flag": "--otf-dir", "metavar": "DIR"})
    model: Path | None = Field(
        None, description="RL-DFN weights: the reference's folder or our .pt (mode full)",
        json_schema_extra={"flag": "--model", "metavar": "DIR_OR_PT"})
    psf: Path | None = Field(
        None, description="measured detection PSF (TIFF), rotated to both views",
        json_schema_extra={"flag": "--psf", "metavar": "TIF"})
    psf_voxel_um: tuple[float, float, float] | None = Field(
        None, description="voxel size (z, y, x) of --psf in µm (default: the views' voxel)",
        json_schema_extra={"flag": "--psf-voxel-um", "metavar": ("DZ", "DY", "DX")})
    psf_a: Path | None = Field(
        None, description="measured view-A PSF on the views' grid (TIFF; give --psf-b too)",
        json_schema_extra={"flag": "--psf-a", "metavar": "TIF"})
    psf_b: Path | None = Field(
        None, description="measured view-B PSF on the views' grid (TIFF; give --psf-a too)",
        json_schema_extra={"flag": "--psf-b", "metavar": "TIF"})
    weights: Path | None = Field(
        None, description="weights folder holding vsi-sr.pt (or .pth), rl-dfn.pt (or an RL-DFN folder rl-dfn/) and "
        "optionally otf/; an alternative to --checkpoint/--model/--otf-dir",
        json_schema_extra={"flag": "--weights", "metavar": "DIR"})

    @field_validator("psf_voxel_um")
    @classmethod
    def _positive(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and any(not (x > 0) for x in v):
            raise ValueError(f"PSF voxel sizes must be positive µm, got {v}")
        return v

    def check(self) -> ReconSources:
        """Raise :class:`SourcesError` for a path that does not exist or a PSF pair given by half."""
        for name in ("checkpoint", "otf_dir", "model", "psf", "psf_a", "psf_b", "weights"):
            p = getattr(self, name)
            if p is not None and not Path(p).exists():
                flag = ReconSources.model_fields[name].json_schema_extra["flag"]  # type: ignore[index]
                raise SourcesError(f"{flag} {p}: no such file or folder")
        if (self.psf_a is None) != (self.psf_b is None):
            raise SourcesError("give both --psf-a and --psf-b, or neither")
        if self.weights is not None and (self.checkpoint is not None or self.model is not None):
            raise SourcesError("give either --weights DIR or --checkpoint/--model, not both")
        return self

    @property
    def has_networks(self) -> bool:
        return any(x is not None for x in (self.checkpoint, self.model, self.weights))


def models_from_sources(sources: ReconSources, mode: str, optics: Any, *, backend: Any = None,
                        lateral: Any = None) -> tuple[Any, dict[str, Path]]:
    """Read ``sources`` into :class:`engines.reconstruct.ReconModels` for ``mode``.

    Networks: ``--checkpoint`` (+ ``--model`` in ``full``), else a ``--weights`` folder, else the shipped demo weights
    (said in the provenance as ``demo``). PSFs are used in every mode. Returns the models and the files they came
    from (name → path), for :func:`sources_provenance`.

    Raises
    ------
    SourcesError
        A file is missing, a needed model is not given and no demo weights are installed.
    """
    from engines.reconstruct import ReconModels, demo_models, load_models, models_from_folder, uses_lateral_sr

    sources.check()
    used: dict[str, Path] = {}
    models = ReconModels(lateral=lateral)
    full = mode == "full"
    if uses_lateral_sr(mode):
        if sources.checkpoint is not None:
            if full and sources.model is None:
                raise SourcesError("mode 'full' needs --model (RL-DFN weights) with --checkpoint")
            models = load_models(vsisr_checkpoint=sources.checkpoint, otf_dir=sources.otf_dir,
                                 rldfn_weights=sources.model if full else None, optics=optics, backend=backend,
                                 lateral=lateral)
            used.update(checkpoint=sources.checkpoint)
            if sources.otf_dir is not None:
                used["otf_dir"] = sources.otf_dir
            if full and sources.model is not None:
                used["model"] = sources.model
        elif sources.model is not None and full:
            raise SourcesError("mode 'full' needs --checkpoint (VSI-SR) with --model")
        elif sources.weights is not None:
            models, found = models_from_folder(Path(sources.weights), optics, backend, need_rldfn=full)
            models.lateral = lateral
            used.update(found)
        else:
            found_models = demo_models(optics, backend)
            if found_models is None:
                raise SourcesError(f"mode '{mode}' needs --checkpoint{' and --model' if full else ''} (or --weights "
                                   "DIR), and no demo weights are installed; or use mode 'classical'")
            models = found_models
            models.lateral = lateral
            from engines.weights import demo_weights_path

            used["demo_vsisr"] = Path(demo_weights_path("vsi-sr"))
            if full:
                used["demo_rldfn"] = Path(demo_weights_path("rl-dfn"))
        if sources.otf_dir is not None and "otf_dir" not in used:
            models.otfs = load_models(otf_dir=sources.otf_dir, optics=optics).otfs
            used["otf_dir"] = sources.otf_dir
    if sources.psf is not None or sources.psf_a is not None:
        extra = load_models(psf=sources.psf, psf_voxel_um=sources.psf_voxel_um, psf_a=sources.psf_a,
                            psf_b=sources.psf_b, optics=optics)
        models.psf, models.psf_voxel_um = extra.psf, extra.psf_voxel_um
        models.psf_a, models.psf_b = extra.psf_a, extra.psf_b
        for name in ("psf", "psf_a", "psf_b"):
            if getattr(sources, name) is not None:
                used[name] = getattr(sources, name)
    return models, used


_digests: dict[tuple[str, int, int], str] = {}
_digests_lock = threading.Lock()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, cached by (path, size, mtime) so a new acquisition does not re-read a large checkpoint."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    with _digests_lock:
        if key in _digests:
            return _digests[key]
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    with _digests_lock:
        _digests[key] = digest
    return digest


def path_provenance(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"path", "sha256"}`` for a file; for a folder, every file in it (sorted, at most 256) with its digest."""
    p = Path(path)
    if p.is_file():
        return {"path": str(p), "sha256": file_sha256(p)}
    files = sorted(f for f in p.rglob("*") if f.is_file())
    out: dict[str, Any] = {"path": str(p), "files": {}}
    for f in files[:_MAX_FILES_HASHED]:
        out["files"][str(f.relative_to(p))] = file_sha256(f)
    if len(files) > _MAX_FILES_HASHED:
        out["files_not_hashed"] = len(files) - _MAX_FILES_HASHED
    return out


def sources_provenance(used: dict[str, Path]) -> dict[str, Any]:
    """Provenance of the model files actually used: name → path and SHA-256 (per file inside a folder)."""
    return {name: path_provenance(path) for name, path in used.items()}


def software_version() -> str:
    """Version of the installed package (``unknown`` when run from a source tree that was never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rllsm-vsim")
    except PackageNotFoundError:
        return "unknown"
