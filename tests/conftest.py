"""Shared fixtures and marker handling.

Real data lives beside the project in ``../shared/data`` (read-only, never copied in). GPU and TensorRT
tests skip with their reason where the machine lacks them; CI sets ``RLLSM_REQUIRE_SHARED=1`` so missing
shared data fails instead of skipping.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RLLSM_SHARED_DATA", REPO.parent / "shared" / "data"))


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch always importable in the test env
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = _cuda_available()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; torch sees none on this machine"))
        if "tensorrt" in item.keywords and not (has_trt and has_cuda):
            why = "TensorRT is not installed" if not has_trt else "TensorRT needs a CUDA GPU; none here"
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ``../shared/data``; skips (or fails in CI) when it is absent."""
    if not SHARED_DATA.is_dir():
        msg = f"shared test data not found at {SHARED_DATA} (set RLLSM_SHARED_DATA)"
        if os.environ.get("RLLSM_REQUIRE_SHARED") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module: on a shared 2-core machine two threads fighting other jobs run
    FFTs and convolutions several times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
