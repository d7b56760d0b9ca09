"""VSI-SR training: data preparation, fine-tuning and MAML meta-training, as real short runs on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from engines.training.common import TrainingError
from engines.training.data import (
    TrainingDataError,
    load_finetune,
    load_tasks,
    read_index,
)
from engines.training.discriminator import DiscriminatorConfig, VSIDiscriminator
from engines.training.finetune import FinetuneConfig, finetune
from engines.training.losses import VSISRLoss, foreground_mask, masked_psnr
from engines.training.meta import MetaConfig, evaluate_adaptation, meta_train
from engines.training.prepare import PrepareConfig, SyntheticSource, prepare_synthetic
from engines.training.synthetic import make_pair
from engines.vsisr.checkpoint import load_checkpoint
from engines.vsisr.network import VSISR, VSISRConfig
from streamer.cli import main

TINY = VSISRConfig(features=16, n_groups=1, n_blocks=2, reduction=4, head_features=32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("data")
    prepare_synthetic(out, PrepareConfig(patch=16, patches_per_task=48, finetune_patches=48, val_crop=48,
                                         shard_size=20),
                      SyntheticSource(task_structures=("filaments", "puncta", "meshwork"), cells_per_structure=3,
                                      planes=10, size=48))
    return out


def test_loss_is_zero_for_identical_images_and_grows_with_blur() -> None:
    rng = np.random.default_rng(0)
    _, gt = make_pair("filaments", 3, 32, 32, rng)
    t = torch.from_numpy(gt)[None]
    loss = VSISRLoss()
    assert float(loss(t, t)) < 1e-6
    blurred = torch.nn.functional.avg_pool2d(t, 3, 1, 1)
    more = torch.nn.functional.avg_pool2d(t, 7, 1, 3)
    assert 0 < float(loss(blurred, t)) < float(loss(more, t))


def test_masked_psnr_counts_only_foreground() -> None:
    gt = np.zeros((64, 64), np.float32)
    gt[30:34, 10:54] = 1.0
    mask = foreground_mask(gt)
    assert mask[31, 30] and not mask[0, 0]
    pred = gt.copy()
    pred[0:5, 0:5] = 0.5  # error outside the mask does not count
    assert masked_psnr(pred, gt, mask) == 100.0
    pred[31, 30] += 0.1
    assert 20 < masked_psnr(pred, gt, mask) < 100


def test_prepare_synthetic_writes_index_and_shards(dataset: Path) -> None:
    index = read_index(dataset)
    assert set(index["tasks"]) == {"filaments", "puncta", "meshwork"}
    assert index["gt_filtered"] and index["gt_sigma"] == 0.6
    tasks = load_tasks(dataset)
    assert len(tasks["puncta"]) == 48 and len(index["tasks"]["puncta"]["shards"]) == 3
    assert tasks["puncta"].inputs.shape[1:] == (7, 16, 16) and tasks["puncta"].gts.shape[1:] == (3, 24, 24)
    train, val = load_finetune(dataset)
    # split by cell: no validation cell contributes a training patch
    assert {c[0] for c in val}.isdisjoint(set(train.cells.tolist()))
    assert val[0][1].shape[0] == 10 and val[0][2].shape[1:] == (72, 72)


def test_prepare_data_from_folder_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for s in ("Actin", "CCP"):
        for c in range(2):
            d = tmp_path / "src" / s / f"Cell{c}"
            d.mkdir(parents=True)
            llsm, gt = make_pair("filaments" if s == "Actin" else "rings", 9, 32, 32, rng)
            tifffile.imwrite(d / "snr1.tif", (llsm * 3000 + 100).astype(np.uint16))
            tifffile.imwrite(d / "gt.tif", (gt * 20000).astype(np.uint16))
    rc = main(["prepare-data", str(tmp_path / "out"), "--from-folder", str(tmp_path / "src"), "--patch", "16",
               "--patches-per-task", "10", "--finetune-patches", "6", "--finetune-structure", "CCP"])
    assert rc == 0
    index = read_index(tmp_path / "out")
    assert list(index["tasks"]) == ["Actin-snr1"] and index["finetune"]["structure"] == "CCP"
    train, val = load_finetune(tmp_path / "out")
    assert len(train) == 6 and len(val) == 1 and float(train.inputs.max()) <= 1.0


def test_prepare_data_rejects_mismatched_gt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "src" / "Actin" / "Cell0"
    d.mkdir(parents=True)
    tifffile.imwrite(d / "snr1.tif", np.ones((9, 32, 32), np.uint16))
    tifffile.imwrite(d / "gt.tif", np.ones((9, 32, 32), np.uint16))
    rc = main(["prepare-data", str(tmp_path / "out"), "--from-folder", str(tmp_path / "src"), "--patch", "16"])
    assert rc == 2
    assert "1.5×" in capsys.readouterr().err
    with pytest.raises(TrainingDataError, match="index.json"):
        read_index(tmp_path / "nowhere")


def test_finetune_raises_validation_psnr_and_resumes(dataset: Path, tmp_path: Path) -> None:
    train, val = load_finetune(dataset)
    torch.manual_seed(0)
    model = VSISR(TINY)
    cfg = FinetuneConfig(iterations=20, batch_size=8, val_every=10)
    res = finetune(model, train, val, cfg, tmp_path / "ft")
    assert res.val_psnr[-1][1] > res.val_psnr[0][1] + 1.0
    assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5])
    # both layouts written and loadable
    for name in ("finetuned.pth", "g_model_0010.pth"):
        assert load_checkpoint(tmp_path / "ft" / name).config == TINY
    # the published layout has no room for the architecture; it holds the flat parameter list in order
    ref = torch.load(tmp_path / "ft" / "finetuned_reference.pth", weights_only=True)
    assert [tuple(v.shape) for v in ref.values()] == [tuple(p.shape) for p in model.reference_parameters()]
    # a resume with other hyper-parameters is refused rather than silently mixing two recipes
    with pytest.raises(TrainingError, match="different configuration"):
        finetune(VSISR(TINY), train, val, cfg.model_copy(update={"lr": 0.1}), tmp_path / "ft")


def test_finetune_interrupted_run_resumes_identically(dataset: Path, tmp_path: Path) -> None:
    train, _ = load_finetune(dataset)
    cfg = FinetuneConfig(iterations=6, batch_size=4, val_every=3)
    torch.manual_seed(0)
    init = VSISR(TINY).state_dict()
    straight = VSISR(TINY)
    straight.load_state_dict(init)
    ref = finetune(straight, train, [], cfg, tmp_path / "a")
    # simulate an interruption after the checkpoint at 3 by running 3 iterations with the same schedule
    part = VSISR(TINY)
    part.load_state_dict(init)
    state = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        finetune(part, _Interrupting(train, after=4), [], cfg, state)
    resumed = VSISR(TINY)
    res = finetune(resumed, train, [], cfg, state)
    assert res.losses == pytest.approx(ref.losses, rel=1e-5)
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


class _Interrupting:
    """A patch set that raises KeyboardInterrupt on its n-th draw (like Ctrl-C during a run)."""

    def __init__(self, inner, after: int) -> None:
        self.inner, self.after, self.n = inner, after, 0

    def __len__(self) -> int:
        return len(self.inner)

    def sample(self, n, rng):
        self.n += 1
        if self.n == self.after:
            raise KeyboardInterrupt
        return self.inner.sample(n, rng)


def test_meta_training_improves_adapted_loss_and_resumes(dataset: Path, tmp_path: Path) -> None:
    tasks = load_tasks(dataset)
    cfg = MetaConfig(steps=8, network=TINY, discriminator=DiscriminatorConfig(base=4), save_every=4,
                     g_lr_outer=1e-3, d_lr_outer=2e-4, task_iters=1, g_steps=2)
    torch.manual_seed(0)
    g0, d0 = VSISR(TINY), VSIDiscriminator(cfg.discriminator)
    before = evaluate_adaptation(g0, d0, tasks, cfg)
    init = VSISR(TINY)
    init.load_state_dict(g0.state_dict())
    res = meta_train(tasks, cfg, tmp_path / "meta", init=init)
    after = evaluate_adaptation(res.generator, res.discriminator, tasks, cfg)
    assert after < before
    # published-layout meta-model, loadable as a starting point for fine-tuning
    ref = torch.load(tmp_path / "meta" / "meta_model.pth", weights_only=True)
    assert all(k.startswith("vars.") for k in ref)
    assert load_checkpoint(tmp_path / "meta" / "meta_model_rllsm.pth").config == TINY
    # extending the run resumes at step 8 instead of starting over
    longer = meta_train(tasks, cfg.model_copy(update={"steps": 10}), tmp_path / "meta")
    assert len(longer.post) == 10 and longer.post[:8] == res.post
    with pytest.raises(TrainingError, match="different configuration"):
        meta_train(tasks, cfg.model_copy(update={"g_lr_inner": 0.5}), tmp_path / "meta")


def test_cli_meta_then_finetune(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["train-meta", str(dataset), "--out", str(tmp_path / "m"), "--steps", "2", "--features", "16",
               "--groups", "1", "--blocks", "1", "--head-features", "32", "--disc-base", "4", "--task-iters", "1",
               "--g-steps", "1", "--no-progress", "--device", "cpu"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 2
    rc = main(["finetune", str(dataset), "--meta-model", str(tmp_path / "m" / "meta_model_rllsm.pth"), "--out",
               str(tmp_path / "f"), "--iterations", "4", "--batch-size", "4", "--val-every", "2",
               "--no-progress", "--device", "cpu"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [s for s, _ in out["val_psnr"]] == [0, 2, 4]
    assert out["val_psnr"][-1][1] > out["val_psnr"][0][1]
    rc = main(["finetune", str(dataset), "--meta-model", str(tmp_path / "missing.pth"), "--out",
               str(tmp_path / "g"), "--no-progress"])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_finetune_starts_from_published_meta_model_layout(dataset: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from engines.vsisr.checkpoint import save_checkpoint

    torch.manual_seed(3)
    full = VSISR()  # the published architecture; its flat vars.N file is what meta_model.pth holds
    save_checkpoint(full, tmp_path / "meta_model.pth", layout="reference")
    rc = main(["finetune", str(dataset), "--meta-model", str(tmp_path / "meta_model.pth"), "--out",
               str(tmp_path / "f"), "--iterations", "2", "--batch-size", "2", "--val-every", "2", "--lr", "0.01",
               "--no-progress", "--device", "cpu"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["iterations"] == 2 and np.isfinite(out["loss_last"])
    tuned = load_checkpoint(tmp_path / "f" / "finetuned_reference.pth")
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), full.parameters()))


def test_prepare_data_from_the_simulator(tmp_path: Path) -> None:
    rc = main(["prepare-data", str(tmp_path / "sim"), "--simulator", "--structures", "puncta", "--photon-levels",
               "100", "--finetune-structure", "puncta", "--cells", "2", "--planes", "8", "--size", "48",
               "--patch", "16", "--patches-per-task", "8", "--finetune-patches", "4"])
    assert rc == 0
    index = read_index(tmp_path / "sim")
    assert list(index["tasks"]) == ["puncta-p100"] and index["provenance"]["source"] == "simulator"
    train, val = load_finetune(tmp_path / "sim")
    assert train.gts.shape[1:] == (3, 24, 24) and val[0][2].shape == (8, 72, 72)


def _ddp_worker(rank: int, world: int, init: str, data: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        cfg = MetaConfig(steps=2, network=TINY, discriminator=DiscriminatorConfig(base=2), task_iters=1, g_steps=1,
                         meta_batch=1, save_every=2)
        res = meta_train(load_tasks(Path(data)), cfg, Path(out) if rank == 0 else None)
        torch.save({k: v.detach() for k, v in res.generator.state_dict().items()}, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters: ~10 s of CPU, more wall time on a busy machine
def test_meta_training_across_processes_keeps_ranks_in_step(dataset: Path, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    (tmp_path / "out").mkdir()
    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path / 'pg'}", str(dataset), str(tmp_path / "out")), nprocs=2)
    a, b = (torch.load(tmp_path / "out" / f"rank{r}.pt") for r in (0, 1))
    # each rank adapted different tasks; the all-reduced outer gradient leaves identical weights everywhere
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "out" / "meta_model.pth").is_file()


def test_tensorboard_log_is_optional(tmp_path: Path) -> None:
    import importlib.util

    from engines.training.common import Monitor

    mon = Monitor(2, 0, "t", tmp_path / "log", show=False)
    mon.scalar("loss", 1.0, 1)
    mon.close()
    if importlib.util.find_spec("tensorboard") is None:
        assert mon.writer is None  # skipped cleanly, training goes on
    else:
        assert any((tmp_path / "log").glob("events.out.tfevents.*"))


def test_prepare_data_deskews_raw_pairs_to_matching_grids(tmp_path: Path) -> None:
    from engines.config import OpticsConfig
    from engines.deskew import skew
    from engines.training.prepare import preprocess_cell

    optics = OpticsConfig()
    llsm, gt = make_pair("puncta", 10, 40, 40, np.random.default_rng(3))
    kw = {"dz_um": optics.stage_step_um, "angle_deg": optics.skew_angle_deg}
    raw_l = skew(llsm, optics.pixel_size_um, **kw) * 1000 + optics.camera_offset
    raw_g = skew(gt, optics.pixel_size_um / 1.5, **kw)
    a, b = preprocess_cell(raw_l, raw_g, optics, deskew=True)
    assert b.shape == (a.shape[0], a.shape[1] * 3 // 2, a.shape[2] * 3 // 2)
    # the GT sampled at the LLSM pixel centres correlates best with the LLSM at zero shift along the skew axis
    from scipy.ndimage import map_coordinates

    z, y, x = np.meshgrid(np.arange(b.shape[0]), 1.5 * np.arange(a.shape[1]) + 0.25,
                          1.5 * np.arange(a.shape[2]) + 0.25, indexing="ij")
    score = {sh: np.corrcoef(a.ravel(), map_coordinates(b, [z, y, x + 1.5 * sh], order=1).ravel())[0, 1]
             for sh in range(-3, 4)}
    assert max(score, key=score.get) == 0 and score[0] > 0.8
