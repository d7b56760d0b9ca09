"""Validation of VSI-SR on whole cells: sliding 7-plane windows, overlap averaging, masked PSNR."""

from __future__ import annotations

import numpy as np
import torch

from engines.training.losses import affine_match, foreground_mask, masked_psnr, percentile_norm


@torch.no_grad()
def predict_cell(model: torch.nn.Module, llsm: np.ndarray, gt: np.ndarray | None = None,
                 device: torch.device | str = "cpu", batch: int = 8) -> np.ndarray:
    """Super-resolve planes ``3 … Z−4`` of one cell; each plane is the mean of the (up to three) windows
    that predict it. With ``gt``, every prediction is first percentile-normalised and affinely matched to
    its GT plane (the published evaluation), so the network's arbitrary intensity scale does not count.
    """
    nz = llsm.shape[0]
    centres = list(range(3, nz - 3))
    if not centres:
        raise ValueError(f"cell has {nz} planes; at least 7 are needed for one VSI-SR window")
    windows = np.stack([llsm[c - 3:c + 4] for c in centres]).astype(np.float32)
    was_training = model.training
    model.eval()
    outs = []
    for i in range(0, len(windows), batch):
        outs.append(model(torch.from_numpy(windows[i:i + batch]).to(device)).float().cpu().numpy())
    model.train(was_training)
    pred = np.concatenate(outs)  # (n_centres, 3, Y', X')
    acc = np.zeros((nz, *pred.shape[2:]), np.float64)
    cnt = np.zeros(nz)
    for j, c in enumerate(centres):
        for k in range(3):
            z = c - 1 + k
            if 3 <= z < nz - 3:  # only planes that are also window centres are evaluated
                p = pred[j, k]
                if gt is not None:
                    p = affine_match(percentile_norm(p), gt[z])
                acc[z] += p
                cnt[z] += 1
    return (acc[3:nz - 3] / cnt[3:nz - 3, None, None]).astype(np.float32)


def cell_psnr(model: torch.nn.Module, llsm: np.ndarray, gt: np.ndarray, device: torch.device | str = "cpu",
              mask_thresh: float = 0.01) -> float:
    """Masked PSNR (dB) of the model's prediction of one cell against its ground truth."""
    pred = predict_cell(model, llsm, gt, device)
    ref = gt[3:gt.shape[0] - 3]
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {ref.shape} differ; is GT 1.5× the LLSM size?")
    mask = np.stack([foreground_mask(percentile_norm(p), mask_thresh) for p in ref])
    return masked_psnr(pred, ref, mask)


def mean_psnr(model: torch.nn.Module, cells: list[tuple[str, np.ndarray, np.ndarray]],
              device: torch.device | str = "cpu", mask_thresh: float = 0.01) -> float:
    """Mean masked PSNR over validation cells."""
    return float(np.mean([cell_psnr(model, l, g, device, mask_thresh) for _, l, g in cells]))
