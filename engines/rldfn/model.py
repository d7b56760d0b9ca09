"""RL-DFN as one module: Richardson–Lucy step (FFT) + fusion network, on one patch."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from engines.rldfn.errors import VolumeShapeError
from engines.rldfn.network import DualViewFusionNet, check_patch_shape
from engines.rldfn.rl import exact_otf, psf_to_otf, rl_corrections, rl_corrections_registered


class RLDFN(nn.Module):
    """RL-DFN test-time forward on one patch, as the reference computes it.

    ``estimate = (A + B) / 2`` → one dual-view Richardson–Lucy step with each view's PSF (FFT, float32)
    → correction volumes → :class:`~engines.rldfn.network.DualViewFusionNet` (which, like the reference at
    test time, applies the view-A feature net to both views).

    Parameters
    ----------
    net
        The fusion network (e.g. from :func:`engines.rldfn.checkpoint.load_rldfn`), or any callable with its
        signature ``net(correction_a, correction_b) -> fused`` on ``(N, 1, D, H, W)`` float32 tensors — e.g. an
        ONNX Runtime or TensorRT predictor from :func:`engines.backends.make_predictor`, which takes torch
        tensors and returns them on the same device.  The Richardson–Lucy step always stays here, in torch FP32.
    psf_a, psf_b
        PSFs of view A and view B, 3-D (Z, Y, X), any size: each patch gets them centred, cropped or
        zero-padded to its own size and normalised to unit sum, as in the reference.

    Notes
    -----
    Inputs are not rescaled here. The reference's reconstruction script divides each view patch by its own
    maximum before calling the model; :func:`engines.rldfn.fuse.fuse_rldfn` divides each whole view by its
    maximum instead, as the reference's training does, so that tiles agree with each other.
    """

    def __init__(self, net: DualViewFusionNet | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 psf_a: np.ndarray | torch.Tensor, psf_b: np.ndarray | torch.Tensor) -> None:
        super().__init__()
        for name, psf in (("view-A PSF", psf_a), ("view-B PSF", psf_b)):
            if np.ndim(psf) != 3:
                raise VolumeShapeError(f"{name} must be a 3-D stack (Z, Y, X), got shape {tuple(np.shape(psf))}")
        if not callable(net):
            raise TypeError(f"RL-DFN's fusion network must be an nn.Module or a callable, got {type(net).__name__}")
        # An nn.Module becomes a sub-module (moved by .to()); a predictor stays a plain attribute, on its own device.
        self.net = net
        self.register_buffer("psf_a", torch.as_tensor(np.asarray(psf_a, dtype=np.float32)), persistent=False)
        self.register_buffer("psf_b", torch.as_tensor(np.asarray(psf_b, dtype=np.float32)), persistent=False)
        self._otf_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        #: False: the reference's RL step, bit for bit (it moves the result by about a voxel on even patch
        #: axes); True: the registered step of :func:`~engines.rldfn.rl.rl_corrections_registered`.
        self.registered = False

    def otfs(self, shape: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """OTFs of both views for patches of ``shape`` (cached: tiles mostly share one size)."""
        key = (tuple(shape), str(device), self.registered)
        if key not in self._otf_cache:
            if len(self._otf_cache) > 16:  # edge tiles add a few sizes; never let the cache grow without bound
                self._otf_cache.clear()
            make = exact_otf if self.registered else psf_to_otf
            self._otf_cache[key] = (make(self.psf_a, shape, device), make(self.psf_b, shape, device))
        return self._otf_cache[key]

    def corrections(self, view_a: torch.Tensor, view_b: torch.Tensor,
                    weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The Richardson–Lucy correction volumes fed to the network (same shape as the views).

        ``weights`` (coverage of each view, see :mod:`engines.rldfn.coverage`) apply in the registered step only.
        """
        otf_a, otf_b = self.otfs(tuple(view_a.shape[-3:]), view_a.device)
        if self.registered:
            wa, wb = weights if weights is not None else (None, None)
            return rl_corrections_registered(view_a, view_b, otf_a, otf_b, wa, wb)
        return rl_corrections(view_a, view_b, (view_a + view_b) / 2, otf_a, otf_b)

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor,
                weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Fuse one patch.

        Parameters
        ----------
        view_a, view_b
            float32 tensors ``(Z, Y, X)`` or ``(N, 1, Z, Y, X)``, same shape, each size a multiple of 4.

        Returns
        -------
        torch.Tensor
            The fused patch, same shape as the inputs.
        """
        if view_a.shape != view_b.shape:
            raise VolumeShapeError(f"view A {tuple(view_a.shape)} and view B {tuple(view_b.shape)} differ in shape")
        if view_a.ndim not in (3, 5) or (view_a.ndim == 5 and view_a.shape[1] != 1):
            raise VolumeShapeError(f"a patch must be (Z, Y, X) or (N, 1, Z, Y, X), got {tuple(view_a.shape)}")
        try:
            check_patch_shape(tuple(view_a.shape))
        except ValueError as err:
            raise VolumeShapeError(str(err)) from None
        squeeze = view_a.ndim == 3
        if squeeze:
            view_a, view_b = view_a[None, None], view_b[None, None]
            if weights is not None:
                weights = (weights[0][None, None], weights[1][None, None])
        corr_a, corr_b = self.corrections(view_a.float(), view_b.float(), weights)
        out = self.net(corr_a, corr_b)
        return out[0, 0] if squeeze else out
