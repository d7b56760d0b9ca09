"""Layering: ``export`` (offline tools) depends on ``engines`` (runtime compute), never the other way round."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports_of(tree: ast.AST) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            # importlib.import_module("export...") / __import__("export...") count as imports too
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def test_no_engines_source_imports_export() -> None:
    offenders = []
    files = sorted((ROOT / "engines").rglob("*.py"))
    assert len(files) > 30  # the walk really covers the package
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, name in _imports_of(tree):
            if name == "export" or name.startswith("export."):
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not offenders, "engines must not import export:\n" + "\n".join(offenders)


def test_importing_every_engines_module_loads_no_export_module() -> None:
    code = r"""
import importlib, pkgutil, sys
import engines
skipped, loaded = [], 0
for info in pkgutil.walk_packages(engines.__path__, "engines."):
    try:
        importlib.import_module(info.name)
        loaded += 1
    except ImportError as err:  # optional third-party dependencies (TensorRT, CuPy, ...) only
        if (err.name or "").split(".")[0] in ("engines", "export"):
            raise
        skipped.append(info.name)
bad = sorted(m for m in sys.modules if m == "export" or m.startswith("export."))
print(loaded, len(skipped), bad)
assert loaded > 30, loaded
assert not bad, bad
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_open_network_without_an_exporter_names_the_export_command(tmp_path) -> None:
    import pytest

    from engines.backends import BackendConfig, BackendUnavailableError
    from engines.backends.networks import open_network, set_default_exporter
    from engines.vsisr.checkpoint import save_checkpoint
    from engines.vsisr.network import VSISR, VSISRConfig

    ckpt = tmp_path / "v.pt"
    save_checkpoint(VSISR(VSISRConfig(features=16, n_groups=1, n_blocks=1, reduction=4, head_features=16)), ckpt)
    previous = set_default_exporter(None)
    try:
        with pytest.raises(BackendUnavailableError, match="rllsm export --model vsi-sr --format onnx"):
            open_network("vsi-sr", ckpt, BackendConfig(backend="onnxruntime", onnx_cache=str(tmp_path / "c")))
        calls = []

        def exporter(kind, checkpoint, cache_dir, precision):
            calls.append((kind, Path(checkpoint).name))
            from engines.backends.errors import ExportFailedError

            raise ExportFailedError("graph disagrees with torch")

        with pytest.raises(BackendUnavailableError, match="exporting .* failed: graph disagrees"):
            open_network("vsi-sr", ckpt, BackendConfig(backend="onnxruntime"), exporter=exporter)
        assert calls == [("vsi-sr", "v.pt")]
    finally:
        set_default_exporter(previous)
