"""One call from "weights the user named + backend choice" to something the reconstruction can call.

The chain (:mod:`engines.reconstruct`, the CLI commands, the service) accepts, for each network, either a torch
``nn.Module`` or a predictor callable with the module's signature.  :func:`open_network` decides which:

* ``auto``/``torch`` with a torch checkpoint → the ``nn.Module`` itself, so the default path is the one the
  parity tests pin down bit for bit (a :class:`~engines.backends.torch_backend.TorchBackend` only when
  torch-specific options — compile, CUDA graphs, reduced precision — ask for it);
* an ONNX Runtime backend with a torch checkpoint → the checkpoint is exported once into a cache folder by the
  installed :class:`Exporter` (the command line and the service install ``export.cache.cached_export``, the same
  validated export as ``rllsm export``; this package never imports ``export``) and run from there;
* an export folder, ``.onnx`` or ``.engine`` → :func:`engines.backends.select.make_backend` as given.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from engines.backends.errors import BackendUnavailableError, ExportFailedError
from engines.backends.manifest import MANIFEST_NAME, Precision
from engines.backends.models import get_model
from engines.backends.select import (
    BackendConfig,
    BackendName,
    find_sources,
    make_backend,
)

log = logging.getLogger(__name__)

#: Backends that can run a checkpoint after an on-the-fly ONNX export.  A TensorRT engine's optimisation profile
#: has to match the data, so engines are built explicitly with ``rllsm export --format engine``.
ONNX_BACKENDS = (BackendName.ONNXRUNTIME, BackendName.ONNXRUNTIME_CUDA, BackendName.ONNXRUNTIME_TENSORRT)


def is_exported(source: str | Path) -> bool:
    """Whether *source* is an exported model (``.onnx``, engine, or a folder with ``manifest.json``)."""
    path = Path(source)
    return path.suffix in (".onnx", ".engine", ".plan", ".trt") or (path / MANIFEST_NAME).is_file()


def _wants_torch_backend(cfg: BackendConfig) -> bool:
    return cfg.torch_compile or cfg.cuda_graphs or Precision(cfg.precision) is not Precision.FP32


class Exporter(Protocol):
    """Turns a torch checkpoint into an export folder (``manifest.json`` + ONNX) and returns the folder.

    Raises :class:`ExportFailedError` when the export or its validation fails. The offline tool chain
    (:func:`export.cache.cached_export`) provides one; the command line and the service install it with
    :func:`set_default_exporter`, so that this package never imports the exporter.
    """

    def __call__(self, kind: str, checkpoint: Path, cache_dir: str | None, precision: Precision) -> Path: ...


_default_exporter: Exporter | None = None


def set_default_exporter(exporter: Exporter | None) -> Exporter | None:
    """Install the exporter :func:`open_network` uses when none is passed; returns the previous one."""
    global _default_exporter
    previous, _default_exporter = _default_exporter, exporter
    return previous


def open_network(kind: str, source: str | Path, config: BackendConfig | None = None,
                 exporter: Exporter | None = None) -> Any:
    """Open network *kind* from *source* for the backend in *config*.

    Parameters
    ----------
    kind
        ``"vsi-sr"`` or ``"rl-dfn"``.
    source
        A torch checkpoint (file or RL-DFN folder), an ``rllsm export`` folder, an ``.onnx`` or ``.engine`` file.
    config
        Backend choice and options (default: ``auto``).
    exporter
        Exports a checkpoint for an ONNX Runtime backend (default: the one installed with
        :func:`set_default_exporter`; without one, such a request is refused with the command that exports).

    Returns
    -------
    torch.nn.Module or engines.backends.base.Backend
        Either is accepted by :func:`engines.vsisr.lateral.lateral_sr` and :class:`engines.rldfn.model.RLDFN`.
        A backend gets a ``width`` attribute for RL-DFN (used by the tile memory estimate).

    Raises
    ------
    BackendUnavailableError
        The backend cannot run here, or a TensorRT engine was asked for with only a checkpoint.
    ModelSourceError
        *source* does not exist or holds another network.
    """
    cfg = config or BackendConfig()
    choice = BackendName(cfg.backend)
    mk = get_model(kind)
    if choice in (BackendName.AUTO, BackendName.TORCH) and not is_exported(source):
        # The network's own loader reads (and explains a missing or foreign) checkpoint, as without --backend.
        module = mk.load(Path(source))
        if choice is BackendName.TORCH and _wants_torch_backend(cfg):
            return _with_width(make_backend(kind, source, choice, cfg), module)
        return module
    src = find_sources(source)
    if src.checkpoint is None:  # an exported model: the backends choose among what it holds
        return make_backend(kind, source, choice, cfg)
    if choice is BackendName.TENSORRT:
        raise BackendUnavailableError(
            {"tensorrt": f"needs a TensorRT engine built for your data's shapes; build one with `rllsm export "
                         f"--model {kind} --checkpoint {src.checkpoint} --format engine --out DIR` and give DIR "
                         "instead of the checkpoint"},
            headline=f"backend 'tensorrt' cannot run {kind} from a checkpoint")
    export = exporter or _default_exporter
    if export is None:
        raise BackendUnavailableError(
            {choice.value: f"needs an ONNX export of {src.checkpoint}: create one with `rllsm export --model {kind} "
                           "--format onnx --out DIR` and give DIR, or run through the rllsm command line or service, "
                           "which export on first use"},
            headline=f"backend '{choice.value}' cannot run {kind} from a checkpoint")
    try:
        folder = Path(export(kind, src.checkpoint, cfg.onnx_cache, Precision(cfg.precision)))
    except ExportFailedError as err:
        raise BackendUnavailableError({choice.value: f"exporting {src.checkpoint} to ONNX failed: {err}"},
                                      headline=f"backend '{choice.value}' cannot run {kind}") from None
    backend = make_backend(kind, folder, choice, cfg, enforce_ranges=False)
    log.info("%s: %s from %s (exported from %s)", kind, backend.describe(), folder, src.checkpoint)
    return _with_width(backend, mk.load(src.checkpoint) if kind == "rl-dfn" else None)


def _with_width(backend: Any, module: Any) -> Any:
    width = getattr(module, "width", None)
    if width is not None:
        backend.width = int(width)
    return backend
