"""VSI-SR network and checkpoint: parity with the published generator, both checkpoint layouts, export."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.vsisr.checkpoint import CheckpointError, load_checkpoint, model_from_object, save_checkpoint
from engines.vsisr.network import VSISR, VSISRConfig

FIX = Path(__file__).parent / "fixtures" / "vsisr"


def _seeded():
    spec = importlib.util.spec_from_file_location("vsisr_seeded", FIX / "seeded.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def parity():
    data = np.load(FIX / "network_parity.npz")
    shapes = [tuple(int(v) for v in row[:nd]) for row, nd in zip(data["shapes"], data["ndims"])]
    state = _seeded().reference_state(shapes, int(data["seed"]))
    return state, data["input"], data["expected"]


def test_parameter_layout_matches_reference(parity):
    state, _, _ = parity
    ours = VSISR().reference_parameters()
    assert len(ours) == len(state) == 134
    assert [tuple(p.shape) for p in ours] == [tuple(state[f"vars.{i}"].shape) for i in range(134)]


def test_output_matches_reference_generator(parity):
    state, x, expected = parity
    model = model_from_object(state).eval()
    with torch.inference_mode():
        y = model(torch.from_numpy(x)).numpy()
    assert y.shape == expected.shape == (2, 3, 30, 33)
    assert np.abs(expected).max() > 1e-2  # the fixture is not a trivially flat output
    assert np.abs(y - expected).max() <= 1e-4


@pytest.mark.parametrize("layout", ["reference", "rllsm"])
def test_save_load_roundtrip_both_layouts(parity, layout, tmp_path):
    state, x, expected = parity
    model = model_from_object(state)
    path = tmp_path / f"w_{layout}.pth"
    save_checkpoint(model, path, layout=layout)
    raw = torch.load(path, weights_only=True)
    if layout == "reference":
        assert sorted(raw, key=lambda k: int(k.split(".")[1])) == [f"vars.{i}" for i in range(134)]
    else:
        assert raw["format"] == "rllsm-vsisr" and raw["version"] == 1 and "config" in raw
    again = load_checkpoint(path)
    with torch.inference_mode():
        y = again(torch.from_numpy(x)).numpy()
    assert np.abs(y - expected).max() <= 1e-4


def test_training_snapshot_and_dataparallel_prefix_accepted(parity):
    state, x, expected = parity
    wrapped = {"model": {f"module.{k}": v for k, v in state.items()}, "step": 7}
    model = model_from_object(wrapped).eval()
    with torch.inference_mode():
        assert np.abs(model(torch.from_numpy(x)).numpy() - expected).max() <= 1e-4


def test_unknown_layout_names_expected_keys(tmp_path):
    bad = {"conv1.weight": torch.zeros(1), "conv1.bias": torch.zeros(1)}
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "vars.0" in msg and "vars.133" in msg and "format" in msg and "conv1.weight" in msg


def test_wrong_shape_and_missing_tensor_are_named(parity):
    state, _, _ = parity
    short = {k: v for k, v in state.items() if k != "vars.133"}
    with pytest.raises(CheckpointError, match="133"):
        model_from_object(short)
    wrong = dict(state)
    wrong["vars.5"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="vars.5"):
        model_from_object(wrong)


def test_missing_file_and_garbage_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(junk)


def test_rllsm_version_mismatch_rejected(parity):
    state, _, _ = parity
    buf = io.BytesIO()
    save_checkpoint(model_from_object(state), buf)
    buf.seek(0)
    obj = torch.load(buf, weights_only=True)
    obj["version"] = 99
    with pytest.raises(CheckpointError, match="version 99"):
        model_from_object(obj)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_has_constant_scale_resize(tmp_path, dynamo):
    """The 1.5× upsampling must be a Resize with constant scales so one graph serves every image size."""
    onnx = pytest.importorskip("onnx")
    model = VSISR(VSISRConfig(n_groups=1, n_blocks=1)).eval()
    path = tmp_path / "m.onnx"
    x0 = (torch.randn(1, 7, 16, 16),)
    if dynamo:
        dim = torch.export.Dim
        prog = torch.onnx.export(
            model, x0, dynamo=True, dynamic_shapes={"x": {0: dim("n"), 2: dim("h"), 3: dim("w")}}
        )
        prog.save(str(path))
    else:
        torch.onnx.export(
            model, x0, str(path), input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}}, opset_version=17, dynamo=False,
        )
    graph = onnx.load(str(path)).graph
    resizes = [n for n in graph.node if n.op_type == "Resize"]
    assert len(resizes) == 1
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    scales = consts.get(resizes[0].input[2]) if len(resizes[0].input) > 2 else None
    assert scales is not None and np.allclose(scales, [1, 1, 1.5, 1.5])
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((2, 7, 12, 14), dtype=np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert got.shape == (2, 3, 18, 21)
    assert np.abs(got - ref).max() < 1e-4
