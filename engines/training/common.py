"""Shared plumbing of the training loops: progress display, optional TensorBoard, atomic resumable state."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ValidationError

from engines.errors import RllsmRuntimeError

log = logging.getLogger(__name__)


class TrainingError(RllsmRuntimeError):
    """A training run cannot start or continue (bad checkpoint, incompatible resume state, …)."""


def seed_everything(seed: int) -> np.random.Generator:
    """Seed torch / python / numpy and return the numpy generator that draws the batches."""
    torch.manual_seed(seed)
    random.seed(seed)
    return np.random.default_rng(seed)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary name then rename, so an interrupted write never replaces a good file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    tmp.replace(path)


def load_state(path: Path) -> dict[str, Any] | None:
    """A resume state written by :func:`atomic_save`, or None when there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        # weights_only=False: the state holds the numpy generator's state dict (plain Python types only).
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - torch.load raises many unrelated types for a damaged file
        raise TrainingError(f"resume state {path} is unreadable ({err}); delete it to start over") from None


def load_resume_state(path: Path | None, config: BaseModel, length_field: str) -> dict[str, Any] | None:
    """The resume state at *path* when there is one, after checking it was written with *config*.

    Only *length_field* (the number of steps or iterations) may differ, so a finished run can be extended;
    any other change would silently mix two recipes in one model.

    Raises
    ------
    TrainingError
        The state is unreadable or was written with another configuration.
    """
    st = load_state(path) if path is not None else None
    if st is None:
        return None
    length = {length_field: getattr(config, length_field)}
    try:
        # Validating the stored dict makes a state written as Python (tuples) or JSON (lists) compare alike.
        same = type(config).model_validate({**st["config"], **length}) == config
    except (ValidationError, KeyError, TypeError):
        same = False
    if not same:
        raise TrainingError(f"{path} was written with a different configuration; use a new output folder or "
                            "delete the state file to start over")
    return st


class Monitor:
    """Progress bar plus, when the ``tensorboard`` package is installed, a TensorBoard event log.

    TensorBoard is optional: without it scalars still go to the progress bar and the history the
    training function returns.
    """

    def __init__(self, total: int, initial: int, desc: str, log_dir: Path | None, show: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not show, dynamic_ncols=True)
        self.writer = None
        if log_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard not installed; no event log written (pip install tensorboard)")
            else:
                self.writer = SummaryWriter(str(log_dir))

    def step(self, n: int = 1, **scalars: float) -> None:
        self.bar.update(n)
        if scalars:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in scalars.items()}, refresh=False)

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(), "python": random.getstate()}


def restore_rng(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
