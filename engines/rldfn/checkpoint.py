"""Loading and saving RL-DFN weights.

Two layouts are read:

* **reference folder** — what the reference's training writes: a directory holding ``net_FA.pth``,
  ``net_FB.pth`` and ``net_G.pth`` (state dicts of the view-A feature net, view-B feature net and U-Net).
  ``netD_A.pth`` / ``netD_B.pth`` (GAN discriminators, used only in training) may be present and are ignored.
* **rllsm file** — our single file (:func:`save_rldfn`): a ``torch.save`` dict
  ``{"format": "rllsm-vsim/rldfn", "version": 1, "width": int, "share_view_a_features": bool,
  "state_dict": DualViewFusionNet.state_dict()}``.

Both are read with ``torch.load(weights_only=True)``: a checkpoint cannot run code on load.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from engines.rldfn.errors import CheckpointError
from engines.rldfn.network import DualViewFusionNet

FORMAT = "rllsm-vsim/rldfn"
FORMAT_VERSION = 1

#: Files of a reference checkpoint folder and the sub-network each one fills.
REFERENCE_FILES: dict[str, str] = {"net_FA.pth": "feature_a", "net_FB.pth": "feature_b", "net_G.pth": "unet"}


def _expected_keys(net: DualViewFusionNet, part: str) -> list[str]:
    return list(getattr(net, part).state_dict().keys())


def _strip_data_parallel(sd: Mapping[str, Any]) -> dict[str, Any]:
    # Weights saved from a DataParallel wrapper carry a "module." prefix on every key.
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # pickle errors, truncated files, non-torch files
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({type(err).__name__}: {err})") from None


def _load_part(net: DualViewFusionNet, part: str, sd: Mapping[str, Any], source: str) -> None:
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{source}: expected a state dict (parameter name → tensor), got {type(sd).__name__}")
    sd = _strip_data_parallel(sd)
    expected = _expected_keys(net, part)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: layout does not match the RL-DFN {part} network. "
            f"Missing keys: {missing[:8]}{' …' if len(missing) > 8 else ''}; "
            f"unexpected keys: {unexpected[:8]}{' …' if len(unexpected) > 8 else ''}. "
            f"Expected keys: {expected}"
        )
    module = getattr(net, part)
    own = module.state_dict()
    bad = [f"{k}: file {tuple(v.shape)} vs network {tuple(own[k].shape)}" for k, v in sd.items()
           if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(f"{source}: tensor shapes differ from the RL-DFN {part} network: {bad[:6]}")
    module.load_state_dict(sd, strict=True)


def _width_of(fa: Mapping[str, Any], source: str) -> int:
    sd = _strip_data_parallel(fa)
    w = sd.get("last_conv.weight")
    if not isinstance(w, torch.Tensor) or w.ndim != 5:
        raise CheckpointError(
            f"{source}: no 5-D 'last_conv.weight' in the view-A feature net; this is not an RL-DFN net_FA.pth "
            f"(keys found: {list(sd)[:8]})"
        )
    return int(w.shape[0])


def load_reference_folder(folder: str | Path, share_view_a_features: bool = True) -> DualViewFusionNet:
    """Build a :class:`DualViewFusionNet` from a reference checkpoint folder.

    Parameters
    ----------
    folder
        Directory with ``net_FA.pth``, ``net_FB.pth`` and ``net_G.pth``.
    share_view_a_features
        See :class:`DualViewFusionNet`; ``True`` matches the reference's reconstruction script.

    Raises
    ------
    CheckpointError
        A file is missing, unreadable, or its keys/shapes do not match the RL-DFN networks.
    """
    folder = Path(folder)
    missing = [name for name in REFERENCE_FILES if not (folder / name).is_file()]
    if missing:
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise CheckpointError(
            f"{folder}: an RL-DFN checkpoint folder needs {', '.join(REFERENCE_FILES)}; missing {', '.join(missing)} "
            f"(found: {', '.join(present) or 'nothing'})"
        )
    sds = {part: _torch_load(folder / name) for name, part in REFERENCE_FILES.items()}
    net = DualViewFusionNet(width=_width_of(sds["feature_a"], str(folder / "net_FA.pth")),
                            share_view_a_features=share_view_a_features)
    for name, part in REFERENCE_FILES.items():
        _load_part(net, part, sds[part], str(folder / name))
    return net.eval()


def save_rldfn(net: DualViewFusionNet, path: str | Path) -> Path:
    """Write ``net`` as one rllsm RL-DFN file (see the module docstring for the layout)."""
    path = Path(path)
    torch.save(
        {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "width": int(net.width),
            "share_view_a_features": bool(net.share_view_a_features),
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        },
        path,
    )
    return path


def save_reference_folder(net: DualViewFusionNet, folder: str | Path) -> Path:
    """Write ``net`` in the reference's folder layout (``net_FA.pth``, ``net_FB.pth``, ``net_G.pth``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in REFERENCE_FILES.items():
        torch.save({k: v.detach().cpu() for k, v in getattr(net, part).state_dict().items()}, folder / name)
    return folder


def _load_rllsm_file(path: Path) -> DualViewFusionNet:
    blob = _torch_load(path)
    need = ("format", "version", "width", "state_dict")
    if not isinstance(blob, Mapping) or blob.get("format") != FORMAT:
        keys = list(blob)[:8] if isinstance(blob, Mapping) else type(blob).__name__
        raise CheckpointError(
            f"{path}: unknown weights layout (top-level keys {keys}). Expected either an rllsm RL-DFN file with keys "
            f"{list(need)} and format '{FORMAT}', or a reference checkpoint folder holding {', '.join(REFERENCE_FILES)}"
        )
    if blob.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: RL-DFN file version {blob.get('version')!r}; this build reads {FORMAT_VERSION}")
    net = DualViewFusionNet(width=int(blob["width"]), share_view_a_features=bool(blob.get("share_view_a_features", True)))
    sd = blob["state_dict"]
    for part in REFERENCE_FILES.values():
        prefix = part + "."
        _load_part(net, part, {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, f"{path} [{part}]")
    leftover = [k for k in sd if not k.startswith(tuple(p + "." for p in REFERENCE_FILES.values()))]
    if leftover:
        raise CheckpointError(f"{path}: keys that belong to no RL-DFN sub-network: {leftover[:8]}")
    return net.eval()


def load_rldfn(path: str | Path, share_view_a_features: bool | None = None) -> DualViewFusionNet:
    """Load RL-DFN weights from a reference folder or an rllsm file, in eval mode on the CPU.

    Parameters
    ----------
    path
        A reference checkpoint folder or a file written by :func:`save_rldfn`.
    share_view_a_features
        Override the stored choice (reference folders default to ``True``, as the reference reconstructs).

    Raises
    ------
    CheckpointError
        Nothing at ``path``, or a layout we do not know; the message names the expected files/keys.
    """
    path = Path(path)
    if path.is_dir():
        net = load_reference_folder(path, True if share_view_a_features is None else share_view_a_features)
    elif path.is_file():
        net = _load_rllsm_file(path)
        if share_view_a_features is not None:
            net.share_view_a_features = share_view_a_features
    else:
        raise CheckpointError(
            f"RL-DFN weights not found at {path}: give a folder with {', '.join(REFERENCE_FILES)} or an rllsm .pt file"
        )
    return net
