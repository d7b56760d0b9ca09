"""Export a checkpoint to ONNX on first use and keep it in a cache folder (``--backend onnxruntime`` with a .pth).

The cache entry is an ordinary ``rllsm export`` output folder (ONNX model, golden data, manifest), written by
:func:`export.api.export_model` and therefore validated against torch FP32 before it is used.  It is keyed by the
checkpoint's SHA-256, the network and the precision, so a changed checkpoint gets a fresh export and an unchanged
one is exported once.  Validation runs at small shapes (:data:`VALIDATION_RANGES`) to keep the first start short;
the graph's N/H/W (VSI-SR) and N/D/H/W (RL-DFN) axes stay dynamic, so the runtime does not bind to that range.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from engines.backends.manifest import (
    MANIFEST_NAME,
    Precision,
    ShapeRange,
    read_manifest,
)
from engines.backends.models import get_model, sha256_of

log = logging.getLogger(__name__)

#: Shapes the on-the-fly export validates at (min/opt/max + an odd case): small, so that a first start costs
#: seconds, not minutes, on a CPU.
VALIDATION_RANGES: dict[str, dict[str, tuple[list[int], list[int], list[int]]]] = {
    "vsi-sr": {"planes": ([1, 7, 16, 16], [1, 7, 64, 64], [2, 7, 96, 96])},
    "rl-dfn": {name: ([1, 1, 8, 16, 16], [1, 1, 16, 32, 32], [1, 1, 24, 48, 48])
               for name in ("correction_a", "correction_b")},
}


def default_cache_dir() -> Path:
    """``$RLLSM_ONNX_CACHE``, else ``~/.cache/rllsm/onnx`` (``$XDG_CACHE_HOME`` honoured)."""
    env = os.environ.get("RLLSM_ONNX_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rllsm" / "onnx"


def cached_export(kind: str, checkpoint: str | Path, cache_dir: str | Path | None = None,
                  precision: Precision | str = Precision.FP32) -> Path:
    """The export folder for *checkpoint*, exporting (and validating) it first if the cache has none.

    Parameters
    ----------
    kind
        ``"vsi-sr"`` or ``"rl-dfn"``.
    checkpoint
        A torch checkpoint the network's loader reads.
    cache_dir
        Cache root (default :func:`default_cache_dir`).
    precision
        Precision inside the exported graph.

    Returns
    -------
    Path
        A folder with ``manifest.json``, usable as a model source by :func:`engines.backends.make_backend`.

    Raises
    ------
    export.validate.ExportValidationError
        The exported graph disagrees with torch; nothing is cached.
    """
    precision = Precision(precision)
    checkpoint = Path(checkpoint)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    sha = sha256_of(checkpoint)
    folder = root / f"{kind}-{sha[:16]}-{precision.value}"
    # Two processes (the service and a CLI run) may want the same entry: one exports, the other waits and reuses.
    with open(root / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _usable(folder, sha, kind):
            log.info("using cached ONNX export %s", folder)
            return folder
        log.warning("exporting %s (%s) to ONNX in %s; later runs reuse it", checkpoint, kind, folder)
        ranges = {name: ShapeRange(min=lo, opt=mid, max=hi)
                  for name, (lo, mid, hi) in VALIDATION_RANGES[get_model(kind).spec.kind].items()}
        from export.api import export_model

        export_model(kind, checkpoint, folder, "onnx", precision, ranges=ranges)
    return folder


def _usable(folder: Path, sha: str, kind: str) -> bool:
    if not (folder / MANIFEST_NAME).is_file():
        return False
    try:
        man = read_manifest(folder)
    except Exception:  # noqa: BLE001 - a damaged entry, whatever the error, is simply exported again
        return False
    model = folder / man.model_file
    # The ONNX file must still be the one that was validated: a damaged or replaced file is exported again
    # rather than handed to ONNX Runtime (hashing a few MB is cheap next to a session start).
    return (man.checkpoint_sha256 == sha and man.model_kind == kind and man.format == "onnx"
            and man.validation.passed and model.is_file() and sha256_of(model) == man.onnx_sha256)


def onnx_exporter(kind: str, checkpoint: Path, cache_dir: str | None, precision: Precision) -> Path:
    """:func:`cached_export` in the shape of :class:`engines.backends.networks.Exporter`.

    Export and validation failures become :class:`engines.backends.errors.ExportFailedError`, which the runtime
    side understands without importing this package.
    """
    from engines.backends.errors import ExportFailedError
    from export.onnx_export import ExportError
    from export.validate import ExportValidationError

    try:
        return cached_export(kind, checkpoint, cache_dir, precision)
    except (ExportError, ExportValidationError) as err:
        raise ExportFailedError(str(err)) from err


def install() -> None:
    """Let ``--backend onnxruntime`` run a torch checkpoint by exporting it on first use (idempotent).

    Called by the command line and the service: the runtime (``engines``) never imports ``export``; the side that
    has both wires them together.
    """
    from engines.backends.networks import set_default_exporter

    set_default_exporter(onnx_exporter)
