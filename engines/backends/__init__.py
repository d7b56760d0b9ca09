"""Runtime backends for the two networks: torch, ONNX Runtime (CPU/CUDA/TensorRT providers) and TensorRT.

Use :func:`make_predictor`; it picks a backend (explicit → config → best available), checks every input against
the model's shape rules and returns a plain callable.  Backend modules are imported lazily: importing this
package imports neither onnxruntime nor TensorRT.
"""

from engines.backends.base import Backend, ModelSpec, check_shape
from engines.backends.errors import (
    TENSORRT_INSTALL_HINT,
    BackendError,
    BackendUnavailableError,
    EngineFileError,
    EngineMismatchError,
    InputDtypeError,
    InputShapeError,
    InputValueError,
    ModelSourceError,
)
from engines.backends.manifest import Manifest, Precision, ShapeRange, read_manifest
from engines.backends.models import get_model, model_names
from engines.backends.select import BackendConfig, BackendName, make_backend, make_predictor

__all__ = [
    "TENSORRT_INSTALL_HINT", "Backend", "BackendConfig", "BackendError", "BackendName", "BackendUnavailableError",
    "EngineFileError", "EngineMismatchError", "InputDtypeError", "InputShapeError", "InputValueError", "Manifest",
    "ModelSourceError", "ModelSpec", "Precision", "ShapeRange", "check_shape", "get_model", "make_backend",
    "make_predictor", "model_names", "read_manifest",
]
