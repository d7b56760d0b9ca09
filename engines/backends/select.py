"""Choosing a backend and building a predictor: explicit choice → config → best available.

Every candidate that cannot run is asked *why*, and when none fits the user gets one error listing each
backend and its reason (the ndv pattern), instead of the first import error that happened to fire.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engines.backends.base import Backend
from engines.backends.errors import (
    BackendUnavailableError,
    EngineFileError,
    EngineMismatchError,
    ModelSourceError,
)
from engines.backends.manifest import MANIFEST_NAME, Manifest, Precision, read_manifest
from engines.backends.models import get_model
from engines.support import BackendName, StrictModel  # the one module of allowed values

log = logging.getLogger(__name__)



#: Best-first order used by ``auto``.  With a GPU the compiled engines come first; on the CPU ONNX Runtime is
#: 1.1–1.4× ahead of eager torch for VSI-SR and level for RL-DFN (docs/benchmarks/backends.md).
AUTO_ORDER_GPU = ("tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "torch", "onnxruntime")
AUTO_ORDER_CPU = ("tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "onnxruntime", "torch")


class BackendConfig(StrictModel):
    """How networks are run; the ``backend`` section of a pipeline config, or ``--backend`` & co."""

    version: Literal[1] = 1
    backend: BackendName = Field(BackendName.AUTO, description="Which runtime runs the networks.")
    precision: Precision = Field(Precision.FP32, description="Network precision (torch backend; exported models "
                                                             "carry their own).")
    allow_fallback: bool = Field(False, description="Use the best available backend when the requested one "
                                                    "cannot run, instead of stopping with an error.")
    device: str | None = Field(None, description="torch device, e.g. 'cuda:0'; default: CUDA when present.")
    device_id: int = Field(0, ge=0, le=63, description="CUDA device of ONNX Runtime / TensorRT.")
    torch_compile: bool = Field(False, description="torch backend: torch.compile the network.")
    cuda_graphs: bool = Field(False, description="torch backend: replay CUDA graphs (CUDA only).")
    threads: int = Field(0, ge=0, le=512, description="CPU threads for ONNX Runtime (0 = all cores).")
    rebuild_engine: bool = Field(False, description="Rebuild a damaged or mismatching TensorRT engine from the "
                                                    "ONNX model beside it instead of stopping.")
    onnx_cache: str | None = Field(None, description="Folder for ONNX models exported on the fly when an ONNX "
                                                     "Runtime backend is asked to run a torch checkpoint "
                                                     "(default: $RLLSM_ONNX_CACHE, else ~/.cache/rllsm/onnx).")


class ModelSources(BaseModel):
    """What was found at the path given for a model: a checkpoint, an ONNX file, an engine, a manifest."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    checkpoint: Path | None = None
    onnx: Path | None = None
    engine: Path | None = None
    manifest: Manifest | None = None


def find_sources(source: str | Path) -> ModelSources:
    """Classify *source*: an export directory, a ``.onnx``/``.engine`` file, or a checkpoint (file or folder)."""
    path = Path(source)
    if not path.exists():
        raise ModelSourceError(f"model not found: {path} (give a checkpoint, an .onnx/.engine file, or the "
                               "directory written by `rllsm export`)")
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        man = read_manifest(path)
        onnx = path / (man.onnx_file or man.model_file) if man.format == "engine" else path / man.model_file
        # Prefer the engine of the manifest's precision: an earlier export at another precision may have left
        # its engine here too (it is refused anyway, being built from another ONNX, but should not be picked).
        own = path / f"{man.model_kind}.{man.precision.value}.engine"
        engines = [own] if own.is_file() else sorted(path.glob("*.engine"))
        return ModelSources(onnx=onnx if onnx.is_file() else None, engine=engines[0] if engines else None,
                            manifest=man)
    if path.suffix == ".onnx":
        man = read_manifest(path.parent) if (path.parent / MANIFEST_NAME).is_file() else None
        return ModelSources(onnx=path, manifest=man)
    if path.suffix in (".engine", ".plan", ".trt"):
        beside = path.parent / MANIFEST_NAME
        man = read_manifest(beside) if beside.is_file() else None
        onnx = path.parent / man.model_file if man is not None and man.format == "onnx" else None
        return ModelSources(engine=path, onnx=onnx if onnx is not None and onnx.is_file() else None, manifest=man)
    return ModelSources(checkpoint=path)


@dataclass(frozen=True)
class BackendProvider:
    """One runtime backend, registered as data: its name, why it cannot run (or None), and how to build it.

    ``unavailable(kind, sources, config)`` returns a reason a user can act on, or None when the backend can run;
    ``factory(kind, sources, config, strict, enforce_ranges)`` builds the :class:`Backend` (and may still raise
    :class:`BackendUnavailableError`, e.g. for an engine built for another GPU).
    """

    name: str
    unavailable: Callable[[str, ModelSources, BackendConfig], str | None]
    factory: Callable[[str, ModelSources, BackendConfig, bool, bool], Backend]


def _torch_unavailable(kind: str, src: ModelSources, cfg: BackendConfig) -> str | None:
    if src.checkpoint is None:
        return "needs the torch checkpoint (.pth/.pt or weights folder); an exported model was given"
    return None


def _torch_factory(kind: str, src: ModelSources, cfg: BackendConfig, strict: bool, enforce: bool) -> Backend:
    from engines.backends.torch_backend import TorchBackend

    model = get_model(kind)
    assert src.checkpoint is not None
    return TorchBackend(model.load(src.checkpoint), model.spec, precision=cfg.precision, device=cfg.device,
                        compile=cfg.torch_compile, cuda_graphs=cfg.cuda_graphs)


def _ort_unavailable(kind: str, src: ModelSources, cfg: BackendConfig) -> str | None:
    if src.onnx is None:
        return f"needs an exported ONNX model; create one with `rllsm export --model {kind} --format onnx`"
    return None


def _ort_factory(name: str) -> Callable[[str, ModelSources, BackendConfig, bool, bool], Backend]:
    def build(kind: str, src: ModelSources, cfg: BackendConfig, strict: bool, enforce: bool) -> Backend:
        from engines.backends.ort_backend import OnnxRuntimeBackend

        assert src.onnx is not None
        ranges = src.manifest.shape_ranges if src.manifest is not None and enforce else None
        precision = src.manifest.precision if src.manifest is not None else Precision.FP32
        return OnnxRuntimeBackend(src.onnx, get_model(kind).spec, ranges, precision=precision, backend=name,
                                  threads=cfg.threads, device_id=cfg.device_id)

    return build


def _trt_unavailable(kind: str, src: ModelSources, cfg: BackendConfig) -> str | None:
    from engines.backends.trt_build import import_tensorrt

    try:
        import_tensorrt()  # "not installed, here is how" comes before "no engine file"
    except BackendUnavailableError as err:
        return "; ".join(err.reasons.values()) or str(err)
    if src.engine is None:
        return f"needs a TensorRT engine; build one with `rllsm export --model {kind} --format engine` on this GPU"
    return None


def _trt_factory(kind: str, src: ModelSources, cfg: BackendConfig, strict: bool, enforce: bool) -> Backend:
    from engines.backends.trt_backend import TensorRTBackend

    assert src.engine is not None
    rebuild = _engine_rebuilder(src, cfg) if cfg.rebuild_engine else None
    try:
        return TensorRTBackend(src.engine, get_model(kind).spec, device_id=cfg.device_id, rebuild=rebuild,
                               onnx_sha256=src.manifest.onnx_sha256 if src.manifest is not None else None)
    except (EngineFileError, EngineMismatchError) as err:
        if strict:
            raise  # asked for TensorRT, no fallback: the message says how to rebuild
        raise BackendUnavailableError({"tensorrt": str(err)}) from None


#: Every runtime backend, by ``--backend`` name; :func:`make_backend` asks each why it cannot run.
PROVIDERS: dict[str, BackendProvider] = {
    p.name: p for p in (
        BackendProvider("torch", _torch_unavailable, _torch_factory),
        *(BackendProvider(n, _ort_unavailable, _ort_factory(n))
          for n in ("onnxruntime", "onnxruntime-cuda", "onnxruntime-tensorrt")),
        BackendProvider("tensorrt", _trt_unavailable, _trt_factory),
    )
}


def _try_backend(name: str, kind: str, src: ModelSources, cfg: BackendConfig, strict: bool = False,
                 enforce_ranges: bool = True) -> Backend:
    """Instantiate backend *name* through its provider or raise :class:`BackendUnavailableError` with one reason.

    *strict* (an explicit choice without fallback) lets a damaged/stale engine raise its own error, which says how
    to rebuild; otherwise it is one more reason to try the next backend.
    """
    get_model(kind)  # an unknown network name is the first thing to say
    if src.manifest is not None and src.manifest.model_kind != kind:
        raise ModelSourceError(f"the exported model is a '{src.manifest.model_kind}', not a '{kind}'")
    provider = PROVIDERS.get(name)
    if provider is None:
        raise BackendUnavailableError({name: f"unknown backend; known: {', '.join(PROVIDERS)}"})
    reason = provider.unavailable(kind, src, cfg)
    if reason is not None:
        raise BackendUnavailableError({name: reason})
    backend = provider.factory(kind, src, cfg, strict, enforce_ranges)
    if not isinstance(backend, Backend):  # one backend type, whatever the provider
        raise TypeError(f"backend provider {name!r} returned {type(backend).__name__}, not an engines Backend")
    return backend


def _engine_rebuilder(src: ModelSources, cfg: BackendConfig) -> Any:
    def rebuild(reason: str) -> None:
        from engines.backends.engine_file import read_engine_header
        from engines.backends.manifest import EngineInfo
        from engines.backends.models import sha256_of
        from engines.backends.trt_build import build_engine_file

        if src.onnx is None or src.engine is None:
            raise BackendUnavailableError({"tensorrt": f"{reason}; and no ONNX model beside it to rebuild from"})
        try:
            old = EngineInfo.model_validate(read_engine_header(src.engine)[0]["engine"])
            profile, precision = old.profile, old.precision
        except Exception:  # noqa: BLE001 - damaged header: fall back to the ONNX manifest's validated ranges
            if src.manifest is None:
                raise BackendUnavailableError({"tensorrt": f"{reason}; no manifest to rebuild from"}) from None
            profile = src.manifest.shape_ranges
        if src.manifest is not None:
            # The build is strongly typed: precision is the ONNX graph's (its manifest's), whatever an engine left
            # over from an export at another precision says.
            precision = src.manifest.precision
        log.warning("rebuilding TensorRT engine %s: %s", src.engine, reason)
        # The export's timing cache (export/engine.py writes it beside the engine) spares most of the auto-tuning.
        build_engine_file(src.onnx, src.engine, profile, precision, sha256_of(src.onnx),
                          manifest=src.manifest.model_dump(mode="json") if src.manifest else None,
                          timing_cache=src.engine.parent / "timing.cache", device_id=cfg.device_id)

    return rebuild


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def make_backend(model_kind: str, source: str | Path, backend: str | BackendName | None = None,
                 config: BackendConfig | None = None, enforce_ranges: bool = True) -> Backend:
    """Open the network *model_kind* from *source* on a backend.

    Parameters
    ----------
    model_kind
        ``"vsi-sr"`` or ``"rl-dfn"``.
    source
        Checkpoint (torch), ``.onnx`` (ONNX Runtime), ``.engine`` (TensorRT) or an export directory (all
        exported formats found in it).
    backend
        Explicit choice; overrides ``config.backend``.  ``None``/``"auto"`` → config → best available.
    config
        Further options (precision, fallback, device, compile, CUDA graphs, threads).
    enforce_ranges
        Refuse inputs outside the manifest's validated shape range (default).  ``False`` for models exported on
        the fly (:func:`engines.backends.networks.open_network`), whose graph is dynamic and whose validation ran
        at small shapes only; a TensorRT engine's profile binds regardless.

    Raises
    ------
    BackendUnavailableError
        Nothing can run it; the message lists every backend tried and why it was refused.
    """
    cfg = config or BackendConfig()
    choice = BackendName(backend) if backend is not None else cfg.backend
    src = find_sources(source)
    reasons: dict[str, str] = {}
    if choice is not BackendName.AUTO:
        try:
            return _try_backend(choice.value, model_kind, src, cfg, strict=not cfg.allow_fallback,
                                enforce_ranges=enforce_ranges)
        except BackendUnavailableError as err:
            reasons.update(err.reasons)
            if not cfg.allow_fallback:
                raise BackendUnavailableError(
                    reasons, headline=f"backend '{choice.value}' cannot run {model_kind} "
                                      "(add --allow-fallback to use the best available backend instead)") from None
            log.warning("backend %s unavailable (%s); falling back", choice.value, reasons[choice.value])
    order = AUTO_ORDER_GPU if _cuda_available() else AUTO_ORDER_CPU
    for name in order:
        if name in reasons:
            continue
        try:
            chosen = _try_backend(name, model_kind, src, cfg, enforce_ranges=enforce_ranges)
        except BackendUnavailableError as err:
            reasons.update(err.reasons)
            continue
        log.info("running %s on %s", model_kind, chosen.describe())
        return chosen
    raise BackendUnavailableError(reasons, headline=f"no inference backend can run {model_kind} from {source}")


def make_predictor(model_kind: str, source: str | Path, backend: str | BackendName | None = None,
                   config: BackendConfig | None = None) -> Backend:
    """A callable ``predict(*inputs) -> output`` for Step 2 (VSI-SR) and RL-DFN.

    VSI-SR: ``predict(x)`` with ``x`` of shape ``(N, 7, H, W)`` float32 returns ``(N, 3, ⌊1.5H⌋, ⌊1.5W⌋)``.
    RL-DFN: ``predict(correction_a, correction_b)`` with ``(N, 1, D, H, W)`` returns the fused ``(N, 1, D, H, W)``.
    numpy in → numpy out; torch in → torch out on the same device.  Inputs are checked (shape, dtype, range
    against the model's profile) before anything runs.  See :func:`make_backend` for the arguments; call
    ``.unload()`` (or use it as a context manager) to free device memory.
    """
    return make_backend(model_kind, source, backend, config)
