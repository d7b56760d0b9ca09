"""``rllsm prepare-data``: LLSM / LLS-SIM cell pairs → meta-training tasks and a fine-tuning set.

Per cell: (optional) averaging of the SIM phase frames into widefield planes, (optional) deskew,
subtraction of the camera offset, clipping at zero, normalisation to [0, 1]; the ground truth is
Gaussian-filtered plane by plane (σ 0.6 by default) to suppress SIM reconstruction artefacts. Random
patches are then cut (LLSM 7×p×p ↔ GT 3×1.5p×1.5p). Every structure × LLSM file is one meta task
(as in the published recipe); the fine-tuning set of one structure is split *by cell* into training
patches and whole validation cells.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field
from scipy.ndimage import gaussian_filter

from engines.config import OpticsConfig
from engines.support import StrictModel
from engines.training.data import (
    IN_PLANES,
    INDEX_VERSION,
    OUT_PLANES,
    TrainingDataError,
    iter_patches,
    to_u16,
    write_index,
    write_shard,
)

log = logging.getLogger(__name__)

Cell = tuple[str, np.ndarray, np.ndarray]  # (cell name, LLSM (Z,Y,X), GT (Z,1.5Y,1.5X)), both in [0, 1]


class PrepareConfig(StrictModel):
    """How patches are cut and stored."""

    version: Literal[1] = 1
    patch: int = Field(64, ge=8, le=512, description="LLSM patch size (the GT patch is 1.5× this).")
    patches_per_task: int = Field(3000, ge=1, le=1_000_000)
    finetune_patches: int = Field(500, ge=1, le=1_000_000)
    val_cells: int = Field(1, ge=1, le=100, description="Cells of the fine-tuning structure held out for validation.")
    val_crop: int = Field(128, ge=16, le=4096, description="Largest LLSM y/x size kept of a validation cell.")
    gt_sigma: float = Field(0.6, ge=0.0, le=5.0, description="Gaussian σ applied to each GT plane (0 = off).")
    min_foreground: float = Field(0.02, ge=0.0, le=1.0)
    shard_size: int = Field(1000, ge=1, le=100_000)
    seed: int = 0


class SyntheticSource(StrictModel):
    """Cells drawn from :mod:`engines.training.synthetic` (or the full simulator when ``simulator``)."""

    version: Literal[1] = 1
    task_structures: tuple[str, ...] = ("filaments", "puncta", "tubules", "meshwork")
    finetune_structure: str | None = "rings"
    cells_per_structure: int = Field(3, ge=1, le=1000)
    planes: int = Field(12, ge=IN_PLANES, le=512)
    size: int = Field(96, ge=16, le=4096, description="LLSM lateral size of a cell (even).")
    photons: float = Field(300.0, gt=0, le=1e6)


class SimulatorSource(StrictModel):
    """Cells from the rLLSM simulator (:mod:`engines.simulate`); one task per structure × photon level."""

    version: Literal[1] = 1
    task_structures: tuple[str, ...] = ("filaments", "beads")
    photon_levels: tuple[float, ...] = (100.0, 400.0)
    finetune_structure: str | None = "puncta"
    finetune_photons: float = Field(200.0, gt=0, le=1e6)
    cells_per_structure: int = Field(3, ge=1, le=1000)
    planes: int = Field(12, ge=IN_PLANES, le=512)
    size: int = Field(96, ge=16, le=4096, description="LLSM lateral size of a cell (even).")


def normalise(x: np.ndarray) -> np.ndarray:
    """Min–max to [0, 1] (float32); a constant stack becomes zeros."""
    x = x.astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def filter_gt(gt: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-filter each plane of the ground truth (lateral only, as the published pipeline)."""
    if sigma <= 0:
        return gt
    return np.stack([gaussian_filter(p, sigma) for p in gt]).astype(np.float32)


def preprocess_cell(llsm: np.ndarray, gt: np.ndarray, optics: OpticsConfig | None, *, deskew: bool = False,
                    average_planes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Raw LLSM and LLS-SIM stacks of one cell → normalised LLSM and (unfiltered) GT in [0, 1]."""
    llsm = np.asarray(llsm, np.float32)
    gt = np.asarray(gt, np.float32)
    if llsm.ndim != 3 or gt.ndim != 3:
        raise TrainingDataError(f"expected 3-D stacks (Z, Y, X); got LLSM {llsm.shape} and GT {gt.shape}")
    if average_planes > 1:
        nz = llsm.shape[0] // average_planes * average_planes
        if nz == 0:
            raise TrainingDataError(f"LLSM has {llsm.shape[0]} frames, fewer than --average-planes {average_planes}")
        llsm = llsm[:nz].reshape(-1, average_planes, *llsm.shape[1:]).mean(1)
    offset = optics.camera_offset if optics is not None else 0.0
    if deskew:
        if optics is None:
            raise TrainingDataError("deskewing needs the optics (pixel size, stage step, angle)")
        from engines.deskew import deskew as _deskew

        axis = optics.skew_axis.value
        llsm = _deskew(np.clip(llsm - offset, 0, None), optics.pixel_size_um, optics.stage_step_um,
                       optics.skew_angle_deg, skew_axis=axis)
        gt = _deskew(np.clip(gt, 0, None), optics.pixel_size_um / 1.5, optics.stage_step_um,
                     optics.skew_angle_deg, skew_axis=axis)
        llsm, gt = align_crop(llsm, gt)
    else:
        llsm = np.clip(llsm - offset, 0, None)
    gt = np.clip(gt, 0, None)
    return normalise(llsm), normalise(gt)


def align_crop(llsm: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop a deskewed LLSM stack and its deskewed GT to matching extents (GT exactly 1.5× in y and x).

    Deskewing widens each stack by a whole number of its own pixels, so the two widths are rarely in an exact
    3:2 ratio. Both deskews keep the raw frame's centre at the output centre, so the crops are centred on it;
    the residual misalignment is at most half a GT pixel.
    """
    sl_l, sl_g = [slice(None)], [slice(None)]
    for wl, wg in zip(llsm.shape[1:], gt.shape[1:]):
        n = min(wl, int(wg / 1.5)) // 2 * 2
        if n < 2:
            raise TrainingDataError(f"deskewed LLSM width {wl} and GT width {wg} leave nothing in common")
        s_l = (wl - n) // 2
        s_g = round(1.5 * (s_l - wl / 2) + wg / 2)
        s_g = min(max(s_g, 0), wg - n * 3 // 2)
        sl_l.append(slice(s_l, s_l + n))
        sl_g.append(slice(s_g, s_g + n * 3 // 2))
    return llsm[tuple(sl_l)], gt[tuple(sl_g)]


def _crop_pair(llsm: np.ndarray, gt: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    ny, nx = llsm.shape[1:]
    cy, cx = min(ny, size) // 2 * 2, min(nx, size) // 2 * 2
    y0, x0 = (ny - cy) // 4 * 2, (nx - cx) // 4 * 2
    return (llsm[:, y0:y0 + cy, x0:x0 + cx],
            gt[:, y0 * 3 // 2:(y0 + cy) * 3 // 2, x0 * 3 // 2:(x0 + cx) * 3 // 2])


def _patches_to_shards(root: Path, rel_dir: str, cells: list[Cell], n_total: int, cfg: PrepareConfig,
                       rng: np.random.Generator) -> dict:
    """Cut ``n_total`` patches spread evenly over ``cells`` and write them as shards under ``rel_dir``."""
    shards: list[str] = []
    buf_in: list[np.ndarray] = []
    buf_gt: list[np.ndarray] = []
    buf_cell: list[str] = []

    def flush() -> None:
        if buf_in:
            rel = f"{rel_dir}/shard_{len(shards):03d}.npz"
            write_shard(root / rel, np.stack(buf_in), np.stack(buf_gt), list(buf_cell))
            shards.append(rel)
            buf_in.clear(), buf_gt.clear(), buf_cell.clear()

    per_cell = np.diff(np.linspace(0, n_total, len(cells) + 1).round().astype(int))
    for (name, llsm, gt), n in zip(cells, per_cell):
        for a, b in iter_patches(llsm, gt, int(n), cfg.patch, rng, cfg.min_foreground):
            buf_in.append(a), buf_gt.append(b), buf_cell.append(name)
            if len(buf_in) >= cfg.shard_size:
                flush()
    flush()
    return {"shards": shards, "count": int(n_total), "cells": [c[0] for c in cells]}


def write_dataset(out: Path, tasks: dict[str, list[Cell]], finetune: tuple[str, list[Cell]] | None,
                  cfg: PrepareConfig, provenance: dict,
                  progress: Callable[[str], None] | None = None) -> dict:
    """Cut and store tasks and the fine-tuning set; returns the index written to ``out/index.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    index: dict = {
        "version": INDEX_VERSION, "kind": "rllsm-vsisr-training-data", "in_planes": IN_PLANES,
        "out_planes": OUT_PLANES, "patch": cfg.patch, "scale": 1.5, "gt_filtered": cfg.gt_sigma > 0,
        "gt_sigma": cfg.gt_sigma, "config": cfg.model_dump(), "provenance": provenance, "tasks": {},
    }
    for name, cells in tasks.items():
        if progress:
            progress(f"task {name}: {cfg.patches_per_task} patches from {len(cells)} cells")
        cells = [(c, l, filter_gt(g, cfg.gt_sigma)) for c, l, g in cells]
        index["tasks"][name] = _patches_to_shards(out, f"tasks/{name}", cells, cfg.patches_per_task, cfg, rng)
    if finetune is not None:
        name, cells = finetune
        if len(cells) <= cfg.val_cells:
            raise TrainingDataError(
                f"fine-tuning structure '{name}' has {len(cells)} cells; need more than {cfg.val_cells} "
                "so that at least one trains while the validation cells stay unseen")
        cells = [(c, l, filter_gt(g, cfg.gt_sigma)) for c, l, g in cells]
        train_cells, val_cells = cells[:-cfg.val_cells], cells[-cfg.val_cells:]
        if progress:
            progress(f"fine-tuning set {name}: {cfg.finetune_patches} patches from {len(train_cells)} cells, "
                     f"{len(val_cells)} validation cells")
        entry = {"structure": name,
                 "train": _patches_to_shards(out, "finetune/train", train_cells, cfg.finetune_patches, cfg, rng),
                 "val": {"cells": [], "stacks": []}}
        for cname, llsm, gt in val_cells:
            llsm, gt = _crop_pair(llsm, gt, cfg.val_crop)
            rel = f"finetune/val/{cname}.npz"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(out / rel, input=to_u16(llsm), gt=to_u16(gt))
            entry["val"]["cells"].append(cname)
            entry["val"]["stacks"].append(rel)
        index["finetune"] = entry
    write_index(out, index)
    return index


def synthetic_cells(structure: str, src: SyntheticSource, seed: int) -> list[Cell]:
    """Cells of one structure from the built-in generator (deterministic in ``seed``)."""
    from engines.training.synthetic import make_pair

    cells = []
    for i in range(src.cells_per_structure):
        rng = np.random.default_rng([seed, i])
        llsm, gt = make_pair(structure, src.planes, src.size, src.size, rng, photons=src.photons)
        cells.append((f"{structure}-cell{i:02d}", normalise(llsm), normalise(gt)))
    return cells


def prepare_synthetic(out: Path, cfg: PrepareConfig, src: SyntheticSource,
                      progress: Callable[[str], None] | None = None) -> dict:
    """Prepare tasks and a fine-tuning set from simulated cells."""
    stable = _stable_seed
    tasks = {s: synthetic_cells(s, src, stable(cfg.seed, s)) for s in src.task_structures}
    ft = None
    if src.finetune_structure:
        ft = (src.finetune_structure, synthetic_cells(src.finetune_structure, src,
                                                       stable(cfg.seed, src.finetune_structure)))
    return write_dataset(out, tasks, ft, cfg, {"source": "synthetic", "synthetic": src.model_dump()}, progress)


def simulator_cells(structure: str, photons: float, src: SimulatorSource, seed: int) -> list[Cell]:
    """Cells of one structure at one photon level from the rLLSM simulator (deterministic in ``seed``)."""
    from engines.simulate.pairs import simulate_training_pair

    cells = []
    for i in range(src.cells_per_structure):
        llsm, gt = simulate_training_pair(structure, seed + i, (src.planes, src.size, src.size), photons=photons)
        cells.append((f"{structure}-p{photons:g}-cell{i:02d}", normalise(llsm), normalise(gt)))
    return cells


def prepare_simulator(out: Path, cfg: PrepareConfig, src: SimulatorSource,
                      progress: Callable[[str], None] | None = None) -> dict:
    """Prepare tasks (structure × photon level) and a fine-tuning set from the rLLSM simulator."""
    tasks = {}
    for s in src.task_structures:
        for ph in src.photon_levels:
            if progress:
                progress(f"simulating {src.cells_per_structure} {s} cells at {ph:g} photons")
            tasks[f"{s}-p{ph:g}"] = simulator_cells(s, ph, src, _stable_seed(cfg.seed, f"{s}{ph}"))
    ft = None
    if src.finetune_structure:
        name = src.finetune_structure
        if progress:
            progress(f"simulating {src.cells_per_structure} {name} cells for fine-tuning")
        ft = (name, simulator_cells(name, src.finetune_photons, src, _stable_seed(cfg.seed, name)))
    return write_dataset(out, tasks, ft, cfg, {"source": "simulator", "simulator": src.model_dump()}, progress)


def _stable_seed(seed: int, name: str) -> int:
    # Python's hash() of str is salted per process; a fixed checksum keeps datasets reproducible.
    return (seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(name))) % (2**31)


def _tif_read(path: Path) -> np.ndarray:
    import tifffile

    try:
        return tifffile.imread(path)
    except Exception as err:  # noqa: BLE001 - tifffile raises several unrelated types for a corrupt file
        raise TrainingDataError(f"cannot read {path}: {err}") from None


def scan_folder(root: Path) -> dict[str, dict[str, tuple[list[Path], Path]]]:
    """``root/<Structure>/<Cell>/{*.tif, gt.tif}`` → {structure: {cell: ([LLSM files], GT file)}}."""
    root = Path(root)
    if not root.is_dir():
        raise TrainingDataError(f"data folder {root} does not exist")
    found: dict[str, dict[str, tuple[list[Path], Path]]] = {}
    for sdir in sorted(p for p in root.iterdir() if p.is_dir()):
        for cdir in sorted(p for p in sdir.iterdir() if p.is_dir()):
            gts = sorted(cdir.glob("gt*.tif")) + sorted(cdir.glob("gt*.tiff"))
            lrs = sorted(p for p in cdir.iterdir() if p.suffix in (".tif", ".tiff") and not p.name.startswith("gt"))
            if not gts or not lrs:
                raise TrainingDataError(
                    f"cell folder {cdir} needs a gt.tif (LLS-SIM) and at least one LLSM .tif; found "
                    f"{[p.name for p in cdir.iterdir()]}")
            found.setdefault(sdir.name, {})[cdir.name] = (lrs, gts[0])
    if not found:
        raise TrainingDataError(f"{root} has no <Structure>/<Cell>/ folders with gt.tif and LLSM .tif files")
    return found


def prepare_folder(src: Path, out: Path, cfg: PrepareConfig, optics: OpticsConfig, *, deskew: bool,
                   average_planes: int, finetune_structure: str | None, meta_structures: Iterable[str] | None,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Prepare tasks / fine-tuning set from the published folder layout (TIFF stacks)."""
    layout = scan_folder(src)
    wanted = list(meta_structures) if meta_structures is not None else [
        s for s in layout if s != finetune_structure]
    for s in [*wanted, *([finetune_structure] if finetune_structure else [])]:
        if s not in layout:
            raise TrainingDataError(f"structure '{s}' not found under {src}; have {sorted(layout)}")

    def load(structure: str, snr_index: int | None) -> list[Cell]:
        cells = []
        for cname, (lrs, gt_path) in layout[structure].items():
            chosen = lrs if snr_index is None else [lrs[min(snr_index, len(lrs) - 1)]]
            gt_raw = _tif_read(gt_path)
            for lr in chosen:
                llsm, gt = preprocess_cell(_tif_read(lr), gt_raw, optics, deskew=deskew,
                                           average_planes=average_planes)
                cells.append((f"{structure}-{cname}-{lr.stem}", llsm, gt))
        return cells

    tasks: dict[str, list[Cell]] = {}
    for s in wanted:
        n_snr = max(len(v[0]) for v in layout[s].values())
        for k in range(n_snr):  # one task per structure × SNR level, as in the published recipe
            tasks[f"{s}-snr{k + 1}"] = load(s, k)
    ft = (finetune_structure, load(finetune_structure, 0)) if finetune_structure else None
    prov = {"source": "folder", "path": str(src), "deskew": deskew, "average_planes": average_planes,
            "optics": optics.model_dump(mode="json")}
    return write_dataset(out, tasks, ft, cfg, prov, progress)
