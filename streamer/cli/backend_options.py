"""Shared CLI options for choosing how the networks run (``--backend`` & co.)."""

from __future__ import annotations

import argparse

from engines.backends.manifest import Precision
from engines.backends.select import BackendConfig, BackendName


def add_backend_args(parser: argparse.ArgumentParser, *, device: bool = True, precision: bool = True) -> None:
    """Add ``--backend``, ``--precision``, ``--allow-fallback``, ``--onnx-cache`` and the backend tuning flags.

    Commands that already have their own ``--device`` or ``--precision`` pass ``device=False`` /
    ``precision=False``; :func:`backend_config_from_args` reads those attributes all the same.
    """
    g = parser.add_argument_group("inference backend")
    g.add_argument("--backend", choices=[b.value for b in BackendName], default=None,
                   help="what runs the networks (default: the config's choice, else the best available: "
                        "tensorrt > onnxruntime-tensorrt > onnxruntime-cuda > torch/onnxruntime). With a .pth/.pt "
                        "checkpoint, onnxruntime* exports it to ONNX once (validated against torch) into "
                        "--onnx-cache; tensorrt needs an engine from `rllsm export --format engine`")
    if precision:
        g.add_argument("--precision", choices=[p.value for p in Precision], default=None,
                       help="network precision for the torch backend (exported models carry their own)")
    g.add_argument("--allow-fallback", action="store_true", default=None,
                   help="if the requested backend cannot run, use the best available one instead of stopping")
    if device:
        g.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: CUDA when present)")
    g.add_argument("--torch-compile", action="store_true", default=None, help="torch backend: torch.compile")
    g.add_argument("--cuda-graphs", action="store_true", default=None, help="torch backend: CUDA graphs")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="ONNX Runtime CPU threads (0 = all)")
    g.add_argument("--rebuild-engine", action="store_true", default=None,
                   help="rebuild a damaged or mismatching TensorRT engine from the ONNX model beside it")
    g.add_argument("--onnx-cache", default=None, metavar="DIR",
                   help="where checkpoints exported on the fly for ONNX Runtime are kept "
                        "(default: $RLLSM_ONNX_CACHE, else ~/.cache/rllsm/onnx)")


def backend_config_from_args(args: argparse.Namespace, base: BackendConfig | None = None) -> BackendConfig:
    """Merge the flags over *base* (e.g. the ``backend`` section of a config file): flag → config → default."""
    from pydantic import ValidationError

    from engines.config import describe_validation_error
    from streamer.cli import CLIError
    from streamer.pipeline import install_exporter

    install_exporter()  # a checkpoint asked to run on ONNX Runtime is exported on first use

    data = (base or BackendConfig()).model_dump()
    for field, attr in (("backend", "backend"), ("precision", "precision"), ("allow_fallback", "allow_fallback"),
                        ("device", "device"), ("torch_compile", "torch_compile"), ("cuda_graphs", "cuda_graphs"),
                        ("threads", "threads"), ("rebuild_engine", "rebuild_engine"), ("onnx_cache", "onnx_cache")):
        value = getattr(args, attr, None)
        if value is not None:
            data[field] = value
    if data.get("onnx_cache") is not None:
        data["onnx_cache"] = str(data["onnx_cache"])
    try:
        return BackendConfig.model_validate(data)
    except ValidationError as err:
        raise CLIError(describe_validation_error(err, "backend options")) from None
