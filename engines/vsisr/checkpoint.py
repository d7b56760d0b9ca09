"""Reading and writing VSI-SR weights.

Two layouts are understood:

``reference``
    What the published training scripts save: a bare state dict whose keys are ``vars.0`` … ``vars.133``
    (one flat parameter list; per conv, weight then bias, in network order).  Training snapshots that wrap
    it as ``{"model": state_dict, "optim": ..., "step": ...}`` and keys prefixed ``module.`` (saved from a
    data-parallel wrapper) are accepted too.
``rllsm``
    Our own: ``{"format": "rllsm-vsisr", "version": 1, "config": {...}, "state_dict": {...}}`` with the
    state dict of :class:`engines.vsisr.network.VSISR`, so the architecture travels with the weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO, Literal

import torch

from engines.errors import RllsmValueError
from engines.vsisr.network import VSISR, VSISRConfig

FORMAT_NAME = "rllsm-vsisr"
FORMAT_VERSION = 1

_REF_KEY = re.compile(r"^vars\.(\d+)$")


class CheckpointError(RllsmValueError):
    """A checkpoint file could not be read as VSI-SR weights (wrong layout, wrong shapes, unreadable)."""


def _expected_reference_keys(n: int) -> str:
    return f"'vars.0' … 'vars.{n - 1}' ({n} tensors)"


def _strip_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _load_reference_state(model: VSISR, state: Mapping[str, Any], source: str) -> None:
    params = model.reference_parameters()
    n = len(params)
    indices = {}
    for key in state:
        m = _REF_KEY.match(key)
        if m is None:
            raise CheckpointError(
                f"{source}: unexpected key '{key}' in a reference-layout checkpoint; "
                f"expected only {_expected_reference_keys(n)}"
            )
        indices[int(m.group(1))] = key
    if sorted(indices) != list(range(n)):
        missing = sorted(set(range(n)) - set(indices))
        extra = sorted(set(indices) - set(range(n)))
        raise CheckpointError(
            f"{source}: reference-layout checkpoint has {len(indices)} tensors, expected "
            f"{_expected_reference_keys(n)} for a network with {model.config.n_groups} groups × "
            f"{model.config.n_blocks} RCABs"
            + (f"; missing vars.{missing[:5]}" if missing else "")
            + (f"; unexpected vars.{extra[:5]}" if extra else "")
        )
    with torch.no_grad():
        for i, p in enumerate(params):
            t = state[indices[i]]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(p.shape):
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise CheckpointError(
                    f"{source}: 'vars.{i}' has shape {shape}, expected {tuple(p.shape)} "
                    "(is this a VSI-SR generator with 7 input and 3 output channels?)"
                )
            p.copy_(t.to(p.dtype))


def _config_from_reference(state: Mapping[str, Any]) -> VSISRConfig:
    """Infer channel counts from the first and last conv; depth is fixed by the key count check later."""
    first, last = state.get("vars.0"), None
    n = sum(1 for k in state if _REF_KEY.match(k))
    if n >= 2:
        last = state.get(f"vars.{n - 2}")
    if not isinstance(first, torch.Tensor) or not isinstance(last, torch.Tensor) or first.ndim != 4 or last.ndim != 4:
        return VSISRConfig()
    return VSISRConfig(in_channels=int(first.shape[1]), out_channels=int(last.shape[0]))


def detect_layout(obj: Any) -> Literal["reference", "rllsm"]:
    """Name the layout of an already-unpickled checkpoint, or raise :class:`CheckpointError`."""
    if isinstance(obj, Mapping):
        if obj.get("format") == FORMAT_NAME:
            return "rllsm"
        inner = obj.get("model") if isinstance(obj.get("model"), Mapping) else obj
        keys = list(_strip_prefix(inner))
        if keys and all(_REF_KEY.match(k) for k in keys):
            return "reference"
        shown = ", ".join(repr(k) for k in keys[:6]) + (" …" if len(keys) > 6 else "")
        raise CheckpointError(
            "unrecognised checkpoint layout: expected either the reference layout (keys "
            f"{_expected_reference_keys(134)}, optionally under 'model' or prefixed 'module.') or an "
            f"rllsm checkpoint (keys 'format'='{FORMAT_NAME}', 'version', 'config', 'state_dict'); "
            f"found keys {shown or '(none)'}"
        )
    raise CheckpointError(
        f"unrecognised checkpoint: expected a dict of tensors, found a {type(obj).__name__}"
    )


def model_from_object(obj: Any, source: str = "checkpoint") -> VSISR:
    """Build a :class:`VSISR` from an unpickled checkpoint object of either layout."""
    layout = detect_layout(obj)
    if layout == "rllsm":
        version = obj.get("version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: rllsm checkpoint version {version!r} is not supported (this build reads "
                f"version {FORMAT_VERSION})"
            )
        for key in ("config", "state_dict"):
            if key not in obj:
                raise CheckpointError(f"{source}: rllsm checkpoint lacks '{key}'")
        try:
            config = VSISRConfig.model_validate(obj["config"])
        except Exception as err:  # pydantic ValidationError → our typed error
            raise CheckpointError(f"{source}: invalid network config in checkpoint: {err}") from None
        model = VSISR(config)
        missing, unexpected = model.load_state_dict(obj["state_dict"], strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{source}: rllsm state_dict does not match the network; missing {list(missing)[:5]}, "
                f"unexpected {list(unexpected)[:5]}"
            )
        return model
    inner = obj["model"] if isinstance(obj.get("model"), Mapping) else obj
    state = _strip_prefix(inner)
    model = VSISR(_config_from_reference(state))
    _load_reference_state(model, state, source)
    return model


def load_checkpoint(path: str | Path | BinaryIO, map_location: str | torch.device = "cpu") -> VSISR:
    """Load VSI-SR weights saved in the reference layout or ours.

    Parameters
    ----------
    path
        ``.pth`` file (or open binary file).
    map_location
        Where tensors are placed while loading; move the model afterwards with ``.to(device)``.

    Returns
    -------
    VSISR
        In eval mode.

    Raises
    ------
    CheckpointError
        File missing or unreadable, layout unknown (the message lists the keys expected), or shapes wrong.
    """
    source = str(path) if isinstance(path, (str, Path)) else "checkpoint"
    if isinstance(path, (str, Path)) and not Path(path).is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{source}: cannot be read as a torch checkpoint ({err})") from None
    return model_from_object(obj, source).eval()


def reference_state_dict(model: VSISR) -> dict[str, torch.Tensor]:
    """State dict in the reference layout (``vars.i``), loadable by the published code."""
    return {f"vars.{i}": p.detach().clone() for i, p in enumerate(model.reference_parameters())}


def save_checkpoint(
    model: VSISR, path: str | Path | BinaryIO, layout: Literal["rllsm", "reference"] = "rllsm"
) -> None:
    """Save weights in our layout (default) or in the reference layout.

    Parameters
    ----------
    model
        The network.
    path
        Destination file or binary stream.
    layout
        ``"rllsm"``: format/version/config/state_dict; ``"reference"``: bare ``vars.i`` dict.
    """
    if layout == "reference":
        obj: dict[str, Any] = reference_state_dict(model)
    elif layout == "rllsm":
        obj = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "config": model.config.model_dump(),
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        }
    else:
        raise CheckpointError(f"unknown checkpoint layout {layout!r}; use 'rllsm' or 'reference'")
    torch.save(obj, path)
