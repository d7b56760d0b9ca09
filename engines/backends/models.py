"""The networks the backends know: their I/O description and how torch loads their weights.

Network code is imported lazily (only when a model of that kind is loaded), so choosing a backend, reading a
manifest or running an exported ONNX model never imports the training-side modules.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.backends.base import ModelSpec
from engines.backends.errors import ModelSourceError
from engines.backends.manifest import Normalisation, ShapeRange, TensorInfo


@dataclass(frozen=True)
class ModelKind:
    """A network known to the backends.

    Attributes
    ----------
    spec
        I/O description.
    load
        ``path -> torch.nn.Module`` in eval mode; raises the network's own typed checkpoint error.
    build_random
        ``seed -> torch.nn.Module`` with reproducible random weights (tests, benchmarks, CI export).
    save
        ``(module, path) -> None`` writing a checkpoint that :attr:`load` reads back.
    normalisation
        What the caller does to the data around the network.
    """

    spec: ModelSpec
    load: Callable[[Path], Any]
    build_random: Callable[[int], Any]
    save: Callable[[Any, Path], None]
    normalisation: Normalisation


_REGISTRY: dict[str, ModelKind] = {}


def register_model(kind: ModelKind) -> None:
    """Make *kind* available to :func:`get_model` (used for the two networks and for test networks)."""
    _REGISTRY[kind.spec.kind] = kind


def get_model(name: str) -> ModelKind:
    """Return the registered model *name*; the error lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelSourceError(f"unknown model '{name}'; known models: {', '.join(sorted(_REGISTRY))}") from None


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (sorted names and contents) for folder checkpoints."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# -- VSI-SR -------------------------------------------------------------------------------------------------
def _vsisr_load(path: Path) -> Any:
    from engines.vsisr.checkpoint import load_checkpoint

    return load_checkpoint(path).eval()


def _vsisr_random(seed: int) -> Any:
    import torch

    from engines.vsisr.network import VSISR

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VSISR().eval()


def _vsisr_save(module: Any, path: Path) -> None:
    from engines.vsisr.checkpoint import save_checkpoint

    save_checkpoint(module, path)


VSISR_SPEC = ModelSpec(
    kind="vsi-sr",
    inputs=(TensorInfo(name="planes", layout="NCHW", shape=["N", 7, "H", "W"]),),
    outputs=(TensorInfo(name="components", layout="NCHW", shape=["N", 3, "floor(1.5*H)", "floor(1.5*W)"]),),
    divisibility={},
    default_ranges={"planes": ShapeRange(min=[1, 7, 16, 16], opt=[1, 7, 256, 256], max=[2, 7, 768, 768])},
    # floor(1.5·size), as torch and ONNX Resize both compute it
    output_shapes=lambda s: [(s[0][0], 3, int(s[0][2] * 1.5), int(s[0][3] * 1.5))],
)

register_model(ModelKind(
    spec=VSISR_SPEC, load=_vsisr_load, build_random=_vsisr_random, save=_vsisr_save,
    normalisation=Normalisation(
        input="seven adjacent deskewed planes (centre ± 3) of one orientation, float32, scaled by the caller "
              "(Step 2) to roughly 0–1; no normalisation inside the graph",
        output="three virtual-SIM orientation components on a 1.5× finer y/x grid, same scale as the input",
    ),
))


# -- RL-DFN -------------------------------------------------------------------------------------------------
def _rldfn_load(path: Path) -> Any:
    from engines.rldfn.checkpoint import load_rldfn

    return load_rldfn(path).eval()


def _rldfn_random(seed: int) -> Any:
    import torch

    from engines.rldfn.network import DualViewFusionNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DualViewFusionNet().eval()


def _rldfn_save(module: Any, path: Path) -> None:
    from engines.rldfn.checkpoint import save_rldfn

    save_rldfn(module, path)


RLDFN_SPEC = ModelSpec(
    kind="rl-dfn",
    inputs=(TensorInfo(name="correction_a", layout="NCDHW", shape=["N", 1, "D", "H", "W"]),
            TensorInfo(name="correction_b", layout="NCDHW", shape=["N", 1, "D", "H", "W"])),
    outputs=(TensorInfo(name="fused", layout="NCDHW", shape=["N", 1, "D", "H", "W"]),),
    # The U-Net pools twice, so every spatial size must survive two halvings.
    divisibility={"D": 4, "H": 4, "W": 4},
    output_shapes=lambda s: [tuple(s[0])],
    default_ranges={
        name: ShapeRange(min=[1, 1, 8, 32, 32], opt=[1, 1, 32, 128, 128], max=[1, 1, 64, 128, 128])
        for name in ("correction_a", "correction_b")
    },
)

register_model(ModelKind(
    spec=RLDFN_SPEC, load=_rldfn_load, build_random=_rldfn_random, save=_rldfn_save,
    normalisation=Normalisation(
        input="the two Richardson–Lucy correction volumes of one patch (computed in torch by "
              "engines.rldfn from views divided by their maximum), float32",
        output="the fused, deconvolved patch, same scale as the views",
    ),
))
