"""RL-DFN network, Richardson–Lucy step and checkpoints: parity with the reference, export, loading."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.rldfn.checkpoint import load_rldfn, save_reference_folder, save_rldfn
from engines.rldfn.errors import CheckpointError, VolumeShapeError
from engines.rldfn.model import RLDFN
from engines.rldfn.network import DualViewFusionNet
from engines.rldfn.rl import align_center, psf_to_otf

PARTS = (("net_FA.pth", "feature_a"), ("net_FB.pth", "feature_b"), ("net_G.pth", "unet"))
FIXTURES = Path(__file__).parent / "fixtures" / "rldfn"
sys.path.insert(0, str(FIXTURES))
from seeded_weights import seed_module, seeded_state_dict  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _seeded_net(seed: int, **kw) -> DualViewFusionNet:
    net = DualViewFusionNet(**kw)
    for fname, part in PARTS:
        seed_module(getattr(net, part), seed, fname)
    return net.eval()


def _nrmse(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - ref) ** 2)) / (ref.max() - ref.min()))


@pytest.fixture(scope="module", params=["a", "b"])
def case(request):
    return dict(np.load(FIXTURES / f"parity_{request.param}.npz"))


@pytest.fixture(scope="module")
def reference_ckpt(tmp_path_factory, case) -> Path:
    """A checkpoint folder exactly as the reference's training writes it (plain state dicts, netD_* too)."""
    folder = tmp_path_factory.mktemp("ckpt")
    template = DualViewFusionNet()
    seed = int(case["weight_seed"])
    for fname, part in PARTS:
        torch.save(seeded_state_dict(getattr(template, part).state_dict(), seed, fname), folder / fname)
    for fname in ("netD_A.pth", "netD_B.pth"):
        torch.save({"model.0.weight": torch.zeros(4, 1, 4, 4)}, folder / fname)
    return folder


def test_parity_with_reference_forward(case, reference_ckpt):
    """Reference weights loaded from its folder layout reproduce its RL step and fused output."""
    torch.set_num_threads(1)
    model = RLDFN(load_rldfn(reference_ckpt), case["psf_a"], case["psf_b"])
    va, vb = torch.from_numpy(case["view_a"]), torch.from_numpy(case["view_b"])
    with torch.no_grad():
        corr_a, corr_b = model.corrections(va[None, None], vb[None, None])
        fused = model(va, vb).numpy()
    np.testing.assert_allclose(corr_a[0, 0].numpy(), case["corr_a"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(corr_b[0, 0].numpy(), case["corr_b"], atol=1e-5, rtol=1e-5)
    r = np.corrcoef(fused.ravel(), case["fused"].ravel())[0, 1]
    assert r >= 0.999 and _nrmse(fused, case["fused"]) <= 0.01
    np.testing.assert_allclose(fused, case["fused"], atol=1e-5)


def test_view_b_features_would_change_the_result(case):
    """The reference applies the view-A feature net to both views; using F_B is measurably different."""
    net = _seeded_net(int(case["weight_seed"]), share_view_a_features=False)
    with torch.no_grad():
        fused = RLDFN(net, case["psf_a"], case["psf_b"])(torch.from_numpy(case["view_a"]),
                                                          torch.from_numpy(case["view_b"])).numpy()
    assert np.abs(fused - case["fused"]).max() > 1e-3


def test_align_center_rounds_halves_to_even():
    """Centring offsets follow Python's round (half to even): a 11→16 pad puts the PSF at offset 2, not 3."""
    psf = np.zeros((3, 11, 3), np.float32)
    psf[1, 0, 1] = 1.0
    out = align_center(psf, (3, 16, 3)).numpy()
    assert out[1, 2, 1] == 1.0 and out.sum() == 1.0
    cropped = align_center(np.arange(15, dtype=np.float32).reshape(15, 1, 1), (12, 1, 1)).numpy().ravel()
    assert cropped[0] == 2.0  # 15→12 crops round(1.5) = 2 voxels from the start


def test_psf_to_otf_rejects_empty_psf():
    with pytest.raises(ValueError, match="sums to 0"):
        psf_to_otf(np.zeros((5, 5, 5), np.float32), (8, 8, 8))


def test_rllsm_file_round_trip(tmp_path, case):
    net = _seeded_net(int(case["weight_seed"]))
    path = save_rldfn(net, tmp_path / "w.pt")
    again = load_rldfn(path)
    for k, v in net.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    folder = save_reference_folder(again, tmp_path / "ref")
    assert sorted(p.name for p in folder.iterdir()) == ["net_FA.pth", "net_FB.pth", "net_G.pth"]
    assert torch.equal(load_rldfn(folder).unet.one_by_one.weight, net.unet.one_by_one.weight)


def test_unknown_layouts_are_typed_errors(tmp_path):
    with pytest.raises(CheckpointError, match="net_FB.pth, net_G.pth"):
        (tmp_path / "half").mkdir()
        torch.save({}, tmp_path / "half" / "net_FA.pth")
        load_rldfn(tmp_path / "half")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="Expected either an rllsm RL-DFN file"):
        load_rldfn(tmp_path / "other.pt")
    (tmp_path / "bad").mkdir()
    net = DualViewFusionNet()
    for fname, part in (("net_FA.pth", "feature_a"), ("net_FB.pth", "feature_b"), ("net_G.pth", "unet")):
        sd = getattr(net, part).state_dict()
        torch.save({("x" + k if part == "unet" else k): v for k, v in sd.items()}, tmp_path / "bad" / fname)
    with pytest.raises(CheckpointError, match=r"Expected keys: \['double_conv1.convolution.0.weight'"):
        load_rldfn(tmp_path / "bad")
    (tmp_path / "text.pt").write_text("not weights")
    with pytest.raises(CheckpointError, match="not a readable PyTorch weights file"):
        load_rldfn(tmp_path / "text.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_rldfn(tmp_path / "nowhere")


def test_patch_sizes_must_be_multiples_of_four(case):
    model = RLDFN(DualViewFusionNet(width=4).eval(), case["psf_a"], case["psf_b"])
    with pytest.raises(VolumeShapeError, match="multiple of 4"):
        model(torch.zeros(8, 10, 8), torch.zeros(8, 10, 8))
    with pytest.raises(VolumeShapeError, match="differ in shape"):
        model(torch.zeros(8, 8, 8), torch.zeros(8, 8, 12))


def test_network_exports_to_onnx_and_matches(tmp_path):
    """The learned part (no FFT) exports to ONNX with dynamic patch size; onnxruntime gives the same numbers."""
    ort = pytest.importorskip("onnxruntime")
    net = _seeded_net(3, width=8)
    a, b = torch.rand(1, 1, 8, 12, 16), torch.rand(1, 1, 8, 12, 16)
    path = tmp_path / "rldfn.onnx"
    torch.onnx.export(net, (a, b), str(path), input_names=["corr_a", "corr_b"], output_names=["fused"],
                      dynamic_axes={n: {2: "z", 3: "y", 4: "x"} for n in ("corr_a", "corr_b", "fused")},
                      dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    a2, b2 = torch.rand(1, 1, 12, 8, 8), torch.rand(1, 1, 12, 8, 8)
    for x, y in ((a, b), (a2, b2)):
        got = sess.run(None, {"corr_a": x.numpy(), "corr_b": y.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, net(x, y).numpy(), atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_matches_cpu(case):
    net = _seeded_net(int(case["weight_seed"]))
    va, vb = torch.from_numpy(case["view_a"]), torch.from_numpy(case["view_b"])
    with torch.no_grad():
        gpu = RLDFN(net.cuda(), case["psf_a"], case["psf_b"]).cuda()(va.cuda(), vb.cuda()).cpu().numpy()
    np.testing.assert_allclose(gpu, case["fused"], atol=1e-4)
