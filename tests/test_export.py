"""`rllsm export`: validated ONNX models + manifests for both networks (random-init checkpoints), bad input.

Each network is exported once per module (a few seconds each) on tiny shape ranges; the tests then check the
files, the graph, the recorded figures and that the golden data reproduce independently.
"""

from __future__ import annotations

import importlib.util
import shlex

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from engines.backends.errors import InputShapeError
from engines.backends.manifest import Precision, read_manifest
from engines.backends.models import get_model, sha256_of
from export.api import GOLDEN_NAME
from export.onnx_export import ExportError
from export.validate import (
    FP32_MAX_ABS,
    ExportValidationError,
    check_constant_resize,
    golden_shapes,
    load_golden,
    psnr_db,
)
from streamer.cli import build_parser, main

RANGES = {
    "vsi-sr": ("1x7x8x8", "1x7x12x12", "2x7x16x16"),
    "rl-dfn": ("1x1x4x8x8", "1x1x8x8x8", "1x1x8x16x12"),
}


def _export(tmp, kind: str, precision: str = "fp32", extra: tuple[str, ...] = ()) -> tuple[int, object]:
    mk = get_model(kind)
    ckpt = tmp / f"{kind}.pt"
    if not ckpt.exists():
        mk.save(mk.build_random(7), ckpt)
    out = tmp / f"{kind}-{precision}"
    lo, mid, hi = RANGES[kind]
    rc = main(["export", "--model", kind, "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out),
               "--precision", precision, "--min-shape", lo, "--opt-shape", mid, "--max-shape", hi, *extra])
    return rc, out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("export")
    out = {}
    for kind in ("vsi-sr", "rl-dfn"):
        rc, folder = _export(tmp, kind)
        assert rc == 0
        out[kind] = (tmp / f"{kind}.pt", folder)
    return out


@pytest.mark.parametrize("kind", ["vsi-sr", "rl-dfn"])
def test_export_writes_validated_model_and_manifest(exported, kind):
    ckpt, folder = exported[kind]
    man = read_manifest(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{kind}.onnx", GOLDEN_NAME, "manifest.json"])
    assert man.version == 1 and man.model_kind == kind and man.format == "onnx"
    assert man.checkpoint_sha256 == sha256_of(ckpt)
    assert man.onnx_sha256 == sha256_of(folder / man.model_file)
    assert man.opset >= 18 and man.precision is Precision.FP32
    assert man.versions.torch == torch.__version__ and man.versions.onnxruntime == ort.__version__
    assert [c.label for c in man.validation.cases] == ["min", "opt", "max", "odd"]
    assert man.validation.passed and all(c.passed and c.max_abs_error <= FP32_MAX_ABS for c in man.validation.cases)
    odd = man.validation.cases[3].shapes[man.inputs[0].name]
    assert odd not in [man.validation.cases[i].shapes[man.inputs[0].name] for i in range(3)]
    assert odd[-1] != odd[-2], "the odd case must be non-square"
    # the recorded rebuild command parses back into the same export
    args = build_parser().parse_args(shlex.split(man.rebuild_command)[1:])
    assert (args.model, args.checkpoint, args.format) == (kind, str(ckpt), "onnx")
    assert args.max_shape == RANGES[kind][2]


def test_engine_rebuild_command_keeps_streams_and_workspace(tmp_path):
    from export.api import rebuild_command, resolve_ranges

    ranges = resolve_ranges("vsi-sr", [1, 7, 16, 16], [1, 7, 32, 32], [2, 7, 64, 64])
    cmd = rebuild_command("vsi-sr", tmp_path / "v.pt", tmp_path / "e", "engine", Precision.FP16, ranges, 3, None,
                          n_profiles=2, workspace_gib=1.5)
    args = build_parser().parse_args(shlex.split(cmd)[1:])
    assert (args.format, args.precision, args.streams, args.workspace_gib, args.seed) == ("engine", "fp16", 2, 1.5, 3)
    assert (args.min_shape, args.opt_shape, args.max_shape) == ("1x7x16x16", "1x7x32x32", "2x7x64x64")


@pytest.mark.parametrize("kind", ["vsi-sr", "rl-dfn"])
def test_onnx_graph_named_dynamic_and_self_contained(exported, kind):
    _, folder = exported[kind]
    man = read_manifest(folder)
    model = onnx.load(str(folder / man.model_file))
    assert [i.name for i in model.graph.input] == [t.name for t in man.inputs]
    assert [o.name for o in model.graph.output] == [t.name for t in man.outputs]
    for vi, info in zip(model.graph.input, man.inputs):
        dims = vi.type.tensor_type.shape.dim
        rng = man.shape_ranges[info.name]
        for i, (d, want) in enumerate(zip(dims, info.shape)):
            if isinstance(want, int):
                assert d.dim_value == want
            elif rng.min[i] != rng.max[i]:  # an axis is dynamic exactly when its range allows several sizes
                assert d.dim_param and not d.dim_value, f"axis {want} must be dynamic"
            else:
                assert d.dim_value == rng.min[i]
    if kind == "vsi-sr":
        assert all(d.dim_param for i, d in enumerate(model.graph.input[0].type.tensor_type.shape.dim) if i != 1)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer)
    assert (folder / man.model_file).stat().st_size < 2 * 1024**3
    if kind == "vsi-sr":
        assert "constant scales [1, 1, 1.5, 1.5]" in man.validation.resize_check
        check_constant_resize(model, 1.5)
    else:
        assert not [n for n in model.graph.node if n.op_type == "Resize"]


@pytest.mark.parametrize("kind", ["vsi-sr", "rl-dfn"])
def test_golden_data_reproduce_from_checkpoint_and_onnx(exported, kind):
    ckpt, folder = exported[kind]
    man = read_manifest(folder)
    mk = get_model(kind)
    golden = load_golden(folder / GOLDEN_NAME)
    assert set(golden) == {"min", "opt", "max", "odd"}
    net = mk.load(ckpt)
    sess = ort.InferenceSession(str(folder / man.model_file), providers=["CPUExecutionProvider"])
    for label, arrs in golden.items():
        xs = [arrs[n] for n in mk.spec.input_names]
        assert list(xs[0].shape) == {c.label: c for c in man.validation.cases}[label].shapes[mk.spec.input_names[0]]
        with torch.inference_mode():
            ref = net(*(torch.from_numpy(x) for x in xs)).numpy()
        np.testing.assert_allclose(ref, arrs[mk.spec.output_names[0]], atol=1e-6, rtol=0)
        got = sess.run(None, dict(zip(mk.spec.input_names, xs)))[0]
        assert np.abs(got - ref).max() <= FP32_MAX_ABS


def test_vsisr_output_is_floor_of_one_and_a_half(exported):
    _, folder = exported["vsi-sr"]
    golden = load_golden(folder / GOLDEN_NAME)
    for arrs in golden.values():
        n, _, h, w = arrs["planes"].shape
        assert arrs["components"].shape == (n, 3, int(1.5 * h), int(1.5 * w))


def test_fp16_export_keeps_float32_io_and_meets_psnr(tmp_path):
    rc, folder = _export(tmp_path, "vsi-sr", "fp16")
    assert rc == 0
    man = read_manifest(folder)
    assert man.precision is Precision.FP16 and man.validation.min_psnr_db == 50.0
    assert all(c.passed and c.psnr_db >= 50.0 for c in man.validation.cases)
    model = onnx.load(str(folder / man.model_file))
    assert {vi.type.tensor_type.elem_type for vi in [*model.graph.input, *model.graph.output]} == {
        onnx.TensorProto.FLOAT}
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    dtypes = {t.data_type for t in model.graph.initializer if t.name in conv_weights}
    assert dtypes == {onnx.TensorProto.FLOAT16}


def _tiny_conv_kind():
    """A one-conv model registered like the real ones: the BF16 path is generic, so a tiny net tests it fast."""
    from engines.backends.base import ModelSpec
    from engines.backends.manifest import Normalisation, ShapeRange, TensorInfo
    from engines.backends.models import ModelKind, register_model

    def build(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Conv2d(2, 3, 3, padding=1).eval()

    spec = ModelSpec(kind="tiny-conv", inputs=(TensorInfo(name="x", layout="NCHW", shape=["N", 2, "H", "W"]),),
                     outputs=(TensorInfo(name="y", layout="NCHW", shape=["N", 3, "H", "W"]),),
                     default_ranges={"x": ShapeRange(min=[1, 2, 4, 4], opt=[1, 2, 8, 8], max=[2, 2, 16, 16])})
    register_model(ModelKind(spec=spec, load=lambda p: torch.load(p, weights_only=False), build_random=build,
                             save=lambda m, p: torch.save(m, p),
                             normalisation=Normalisation(input="test", output="test")))
    return spec.kind


def test_bf16_onnx_refused_without_engine_and_nothing_written(tmp_path):
    from export.api import export_model

    kind = _tiny_conv_kind()
    get_model(kind).save(get_model(kind).build_random(0), tmp_path / "t.pt")
    with pytest.raises(ExportValidationError) as err:
        export_model(kind, tmp_path / "t.pt", tmp_path / "out", precision="bf16")
    assert "bfloat16" in str(err.value) and "--format engine" in str(err.value)
    assert not (tmp_path / "out").exists(), "nothing may be left behind, not even the folder it created"
    # the same tiny model exports fine in FP32, at opset 18, with a manifest
    man = export_model(kind, tmp_path / "t.pt", tmp_path / "out", precision="fp32")
    assert man.opset == 18 and (tmp_path / "out" / "manifest.json").is_file()
    # without overwrite a second export refuses before moving any file, even one that would not clash
    (tmp_path / "out" / GOLDEN_NAME).unlink()
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    with pytest.raises(ExportError, match="exist"):
        export_model(kind, tmp_path / "t.pt", tmp_path / "out", precision="fp32", seed=1, overwrite=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()} == before


def test_export_that_disagrees_with_torch_is_refused_and_nothing_written(tmp_path):
    """A graph that computes something else than eager torch (here: +0.01 only while exporting) must fail
    validation with its figures, and leave no manifest behind."""
    from engines.backends.base import ModelSpec
    from engines.backends.manifest import Normalisation, ShapeRange, TensorInfo
    from engines.backends.models import ModelKind, register_model
    from export.api import export_model

    class Drifting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + (0.01 if torch.onnx.is_in_onnx_export() else 0.0)

    def load(path):
        net = Drifting().eval()
        net.load_state_dict(torch.load(path, weights_only=True))
        return net

    spec = ModelSpec(kind="tiny-drift", inputs=(TensorInfo(name="x", layout="NCHW", shape=["N", 2, "H", "W"]),),
                     outputs=(TensorInfo(name="y", layout="NCHW", shape=["N", 3, "H", "W"]),),
                     default_ranges={"x": ShapeRange(min=[1, 2, 4, 4], opt=[1, 2, 8, 8], max=[2, 2, 16, 16])})
    register_model(ModelKind(spec=spec, load=load, build_random=lambda seed: Drifting().eval(),
                             save=lambda m, p: torch.save(m.state_dict(), p),
                             normalisation=Normalisation(input="test", output="test")))
    torch.save(Drifting().state_dict(), tmp_path / "d.pt")
    with pytest.raises(ExportValidationError, match="failed validation against torch FP32") as err:
        export_model("tiny-drift", tmp_path / "d.pt", tmp_path / "out")
    assert "max abs error 0.01" in str(err.value)
    assert not (tmp_path / "out").exists(), "nothing may be left behind, not even the folder it created"


def test_psnr_and_golden_shapes_properties():
    ref = np.linspace(0, 1, 1000, dtype=np.float32)
    assert psnr_db(ref, ref) == float("inf")
    assert 39.9 < psnr_db(ref, ref + 0.01) < 40.1  # peak 1, rms error 0.01 → 40 dB
    spec = get_model("rl-dfn").spec
    from export.api import resolve_ranges

    shapes = golden_shapes(spec, resolve_ranges("rl-dfn", [1, 1, 4, 8, 8], None, [1, 1, 16, 32, 32]))
    d, h, w = shapes["odd"]["correction_a"][2:]
    assert all(s % 4 == 0 for s in (d, h, w)) and h != w


def test_non_finite_output_fails_its_case_and_empty_golden_is_refused():
    from export.validate import compare, validate_against_golden

    ref = [np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)]
    for bad in (np.nan, np.inf):
        out = ref[0].copy()
        out[3, 3] = bad
        for precision in Precision:
            case = compare("odd", {"x": [8, 8]}, "test", ref, [out], precision)
            assert not case.passed and case.max_abs_error == float("inf")
    assert compare("odd", {"x": [8, 8]}, "test", ref, [ref[0].copy()], Precision.FP32).passed
    with pytest.raises(ExportValidationError, match="no golden cases"):
        validate_against_golden(get_model("vsi-sr").spec, {}, lambda xs: xs, "test", Precision.FP32)


def test_constant_resize_check_rejects_size_computed_resize(tmp_path):
    class SizeResize(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.interpolate(x, size=(x.shape[2] * 3 // 2, x.shape[3] * 3 // 2),
                                                   mode="bilinear", align_corners=False)

    h = torch.export.Dim("H", min=4, max=64)
    prog = torch.onnx.export(SizeResize(), (torch.rand(1, 1, 8, 8),), dynamo=True, opset_version=18,
                             dynamic_shapes=({2: h, 3: h},))
    with pytest.raises(ExportValidationError, match="sizes|constant"):
        check_constant_resize(prog.model_proto, 1.5)


# -- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, expected", [("vsi-sr", "vars.0"), ("rl-dfn", "state_dict")])
def test_unknown_checkpoint_layout_names_expected_keys(tmp_path, capsys, kind, expected):
    bad = tmp_path / "bad.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, bad)
    rc = main(["export", "--model", kind, "--checkpoint", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and "encoder.weight" in err
    assert not (tmp_path / "o" / "manifest.json").exists()


@pytest.mark.parametrize("flags, words", [
    (["--min-shape", "1x5x8x8"], "axis C must be 7"),
    (["--min-shape", "1x7x8"], "expected 4 axes"),
    (["--min-shape", "1x7x32x32", "--max-shape", "1x7x16x16"], "min ≤ opt ≤ max"),
    (["--max-shape", "1x7xbigx8"], "sizes joined by 'x'"),
])
def test_bad_shape_ranges_are_user_errors(tmp_path, capsys, flags, words):
    (tmp_path / "x.pth").write_bytes(b"")  # present (a missing checkpoint is refused first), never read
    rc = main(["export", "--model", "vsi-sr", "--checkpoint", str(tmp_path / "x.pth"), "--out",
               str(tmp_path / "o"), *flags])
    assert rc == 2 and words in capsys.readouterr().err


def test_rldfn_shape_must_be_multiple_of_four(tmp_path, capsys):
    (tmp_path / "x").write_bytes(b"")  # present (a missing checkpoint is refused first), never read
    rc = main(["export", "--model", "rl-dfn", "--checkpoint", str(tmp_path / "x"), "--out", str(tmp_path / "o"),
               "--min-shape", "1x1x4x10x8"])
    assert rc == 2 and "not a multiple of 4" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available(),
                    reason="TensorRT and a GPU are present; the engine is built instead")
def test_engine_without_tensorrt_says_how_to_install(exported, tmp_path, capsys):
    ckpt, _ = exported["vsi-sr"]
    rc = main(["export", "--model", "vsi-sr", "--checkpoint", str(ckpt), "--format", "engine",
               "--out", str(tmp_path / "e"), "--max-shape", "1x7x16x16"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "pip install tensorrt --extra-index-url https://pypi.nvidia.com" in err or "CUDA GPU" in err
    assert not (tmp_path / "e" / "manifest.json").exists()


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_engine_export_builds_and_validates(tmp_path, precision):
    from engines.backends.engine_file import read_engine_file
    from engines.backends.select import make_predictor

    mk = get_model("vsi-sr")
    mk.save(mk.build_random(7), tmp_path / "v.pt")
    out = tmp_path / "eng"
    rc = main(["export", "--model", "vsi-sr", "--checkpoint", str(tmp_path / "v.pt"), "--format", "engine",
               "--out", str(out), "--precision", precision, "--min-shape", "1x7x16x16", "--opt-shape",
               "1x7x64x64", "--max-shape", "2x7x96x96"])
    assert rc == 0
    info, embedded, plan = read_engine_file(out / f"vsi-sr.{precision}.engine")
    assert embedded["engine"]["cache_key"] == info.cache_key and len(plan) > 0
    assert (out / "timing.cache").stat().st_size > 0
    pred = make_predictor("vsi-sr", out, backend="tensorrt")
    golden = load_golden(out / GOLDEN_NAME)
    y = pred(golden["odd"]["planes"])
    ref = golden["odd"]["components"]
    if precision == "fp32":
        assert np.abs(y - ref).max() <= FP32_MAX_ABS
    else:
        assert psnr_db(ref, y) >= 50
    with pytest.raises(InputShapeError, match="outside"):
        pred(np.zeros((1, 7, 128, 128), np.float32))
    pred.unload()


@pytest.mark.tensorrt
def test_corrupt_engine_is_rebuilt_or_refused_never_deserialised(tmp_path):
    from engines.backends.errors import EngineFileError
    from engines.backends.select import BackendConfig, make_predictor

    mk = get_model("vsi-sr")
    mk.save(mk.build_random(7), tmp_path / "v.pt")
    out = tmp_path / "eng"
    assert main(["export", "--model", "vsi-sr", "--checkpoint", str(tmp_path / "v.pt"), "--format", "engine",
                 "--out", str(out), "--min-shape", "1x7x16x16", "--opt-shape", "1x7x32x32",
                 "--max-shape", "1x7x64x64"]) == 0
    engine = out / "vsi-sr.fp32.engine"
    raw = engine.read_bytes()
    engine.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(EngineFileError, match="truncated"):
        make_predictor("vsi-sr", out, backend="tensorrt")
    pred = make_predictor("vsi-sr", out, backend="tensorrt", config=BackendConfig(rebuild_engine=True))
    golden = load_golden(out / GOLDEN_NAME)
    assert np.abs(pred(golden["opt"]["planes"]) - golden["opt"]["components"]).max() <= FP32_MAX_ABS
