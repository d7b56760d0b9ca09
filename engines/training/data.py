"""Training-data store for VSI-SR: patch shards plus a small JSON index.

Layout of a prepared data root::

    index.json                         what is where, and how it was made
    tasks/<structure>/shard_000.npz    meta-training patches of one task (structure)
    finetune/train/shard_000.npz       fine-tuning patches (training cells of the target structure)
    finetune/val/<cell>.npz            whole validation cells (stacks), for the masked PSNR

A patch shard holds ``input`` uint16 ``(N, 7, h, w)`` (LLSM planes z−3…z+3), ``gt`` uint16
``(N, 3, 1.5h, 1.5w)`` (LLS-SIM planes z−1…z+1, already Gaussian-filtered) and ``cell`` (N,) strings.
Intensities are stored as round(65535·value) of data normalised to [0, 1], as the published pipeline does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import RllsmValueError

INDEX_NAME = "index.json"
INDEX_VERSION = 1
IN_PLANES = 7
OUT_PLANES = 3


class TrainingDataError(RllsmValueError):
    """A prepared data root is missing, malformed, or does not contain what a command needs."""


def to_u16(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * 65535.0).astype(np.uint16)


def from_u16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 65535.0


def write_shard(path: Path, inputs: np.ndarray, gts: np.ndarray, cells: list[str]) -> None:
    """Write one patch shard atomically (a half-written shard is never visible under its final name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, input=to_u16(inputs), gt=to_u16(gts), cell=np.asarray(cells))
    tmp.replace(path)


def read_shard(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(input float32, gt float32, cell)`` of one shard."""
    try:
        with np.load(path) as z:
            return from_u16(z["input"]), from_u16(z["gt"]), z["cell"]
    except (OSError, KeyError, ValueError) as err:
        raise TrainingDataError(f"patch shard {path} is unreadable or incomplete: {err}") from None


def write_index(root: Path, index: dict[str, Any]) -> None:
    tmp = root / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(root / INDEX_NAME)


def read_index(root: Path) -> dict[str, Any]:
    """The index of a prepared data root, checked for its version."""
    p = Path(root) / INDEX_NAME
    if not p.is_file():
        raise TrainingDataError(f"{root} has no {INDEX_NAME}; create it with 'rllsm prepare-data'")
    try:
        index = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise TrainingDataError(f"{p} is not valid JSON: {err}") from None
    if index.get("version") != INDEX_VERSION:
        raise TrainingDataError(f"{p}: index version {index.get('version')!r}, this program reads {INDEX_VERSION}")
    return index


@dataclass
class PatchSet:
    """All patches of one task (or the fine-tuning training set), held in memory as float32."""

    inputs: np.ndarray
    gts: np.ndarray
    cells: np.ndarray

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` distinct patches drawn at random (with replacement only if the set is smaller than ``n``)."""
        idx = rng.choice(len(self), size=n, replace=len(self) < n)
        return self.inputs[idx], self.gts[idx]


def load_patchset(root: Path, shards: list[str]) -> PatchSet:
    if not shards:
        raise TrainingDataError(f"{root}: the index lists no patch shards for this set")
    parts = [read_shard(Path(root) / s) for s in shards]
    return PatchSet(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                    np.concatenate([p[2] for p in parts]))


def load_tasks(root: Path) -> dict[str, PatchSet]:
    """Every meta-training task of a prepared root, by structure name."""
    index = read_index(root)
    tasks = index.get("tasks") or {}
    if not tasks:
        raise TrainingDataError(f"{root}: no meta-training tasks; run 'rllsm prepare-data' with --tasks")
    return {name: load_patchset(root, entry["shards"]) for name, entry in tasks.items()}


def load_finetune(root: Path) -> tuple[PatchSet, list[tuple[str, np.ndarray, np.ndarray]]]:
    """Fine-tuning patches and validation cells ``(name, llsm (Z,Y,X), gt (Z,1.5Y,1.5X))`` of a root."""
    index = read_index(root)
    ft = index.get("finetune")
    if not ft:
        raise TrainingDataError(f"{root}: no fine-tuning set; run 'rllsm prepare-data' with --finetune")
    train = load_patchset(root, ft["train"]["shards"])
    val = []
    for cell, rel in zip(ft["val"]["cells"], ft["val"]["stacks"]):
        with np.load(Path(root) / rel) as z:
            val.append((cell, from_u16(z["input"]), from_u16(z["gt"])))
    return train, val


def iter_patches(llsm: np.ndarray, gt: np.ndarray, n: int, patch: int, rng: np.random.Generator,
                 min_foreground: float = 0.02, tries: int = 20) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Random ``(7, p, p)`` LLSM / ``(3, 1.5p, 1.5p)`` GT patch pairs from one cell.

    Patches whose ground truth has less than ``min_foreground`` of its pixels above 10 % of the cell's
    maximum are redrawn (up to ``tries`` times) so empty background does not dominate training.
    """
    nz, ny, nx = llsm.shape
    if patch % 2:
        raise TrainingDataError(f"patch size must be even so that 1.5× lands on whole pixels (got {patch})")
    if gt.shape != (nz, ny * 3 // 2, nx * 3 // 2):
        raise TrainingDataError(
            f"ground truth {gt.shape} does not match LLSM {llsm.shape}: expected same planes and 1.5× in y and x")
    if nz < IN_PLANES or ny < patch or nx < patch:
        raise TrainingDataError(f"cell {llsm.shape} is smaller than one patch ({IN_PLANES}×{patch}×{patch})")
    level = 0.1 * float(gt.max())
    fp = patch * 3 // 2
    for _ in range(n):
        for _attempt in range(tries):
            z = int(rng.integers(3, nz - 3))
            y = 2 * int(rng.integers(0, (ny - patch) // 2 + 1))
            x = 2 * int(rng.integers(0, (nx - patch) // 2 + 1))
            g = gt[z - 1:z + 2, y * 3 // 2:y * 3 // 2 + fp, x * 3 // 2:x * 3 // 2 + fp]
            if float((g > level).mean()) >= min_foreground:
                break
        yield llsm[z - 3:z + 4, y:y + patch, x:x + patch], g
