"""Demo weights shipped with the package (trained on simulated data only; see MODEL_CARD.md).

``demo_weights_path("vsi-sr")`` is a VSI-SR checkpoint in the rllsm layout (load it with
:func:`engines.vsisr.checkpoint.load_checkpoint`); ``demo_weights_path("rl-dfn")`` an RL-DFN file in the rllsm
layout (:func:`engines.rldfn.checkpoint.load_rldfn`). Tensors are stored as float16 to keep the package small;
both loaders cast them to the network's float32 parameters.

These weights are for demonstrations and tests on *simulated* rLLSM data. They were never trained on, nor
validated against, real microscope data and must not be used to draw conclusions from real images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from engines.errors import RllsmFileNotFoundError

__all__ = ["DEMO_FILES", "DemoWeightsError", "demo_weights_path"]

#: File of each kind of demo weights, inside this package.
DEMO_FILES: dict[str, str] = {"vsi-sr": "vsisr_demo.pt", "rl-dfn": "rldfn_demo.pt"}


class DemoWeightsError(RllsmFileNotFoundError):
    """The requested demo weights are unknown or missing from this installation."""


def demo_weights_path(kind: Literal["vsi-sr", "rl-dfn"]) -> Path:
    """Path of the shipped demo weights of ``kind`` (``"vsi-sr"`` or ``"rl-dfn"``).

    Raises
    ------
    DemoWeightsError
        Unknown kind, or the file is absent (e.g. a source checkout where they were not generated; run
        ``engines/weights/make_demo_weights.sh``).
    """
    if kind not in DEMO_FILES:
        raise DemoWeightsError(f"unknown demo weights '{kind}'; choose one of {', '.join(DEMO_FILES)}")
    path = Path(__file__).with_name(DEMO_FILES[kind])
    if not path.is_file():
        raise DemoWeightsError(
            f"demo {kind} weights not found at {path}; regenerate them with engines/weights/make_demo_weights.sh")
    return path
