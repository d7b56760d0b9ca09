"""Small dual-view generator for RL-DFN training tests and demos (a stand-in for :mod:`engines.simulate`).

An object (any structure of :mod:`engines.training.synthetic`) is blurred by two PSFs that are Gaussians
elongated along each view's detection axis — the normal of that view's sharp plane, which lies in the XZ
plane at ``+angle`` (view A) and ``180° − angle`` (view B) — plus Poisson and read noise.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.signal import fftconvolve

from engines.training.synthetic import render_density


def view_psf(angle_deg: float, size: int = 15, sigma_lateral: float = 1.0, sigma_axial: float = 3.0) -> np.ndarray:
    """PSF ``(size,)*3`` (Z, Y, X) of a view whose sharp plane contains y and ``(x, z) = (cos a, sin a)``."""
    a = math.radians(angle_deg)
    nx, nz = -math.sin(a), math.cos(a)  # detection axis: normal of the sharp plane within XZ
    r = np.arange(size) - size // 2
    z, y, x = np.meshgrid(r, r, r, indexing="ij")
    t = x * nx + z * nz
    rr = x**2 + y**2 + z**2
    psf = np.exp(-(t**2) / (2 * sigma_axial**2) - (rr - t**2) / (2 * sigma_lateral**2))
    return (psf / psf.sum()).astype(np.float32)


def make_dual_view(kind: str, shape: tuple[int, int, int], rng: np.random.Generator, angle_deg: float = 30.8,
                   photons: float = 200.0, psf_size: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                        np.ndarray, np.ndarray]:
    """``(view A, view B, object, PSF A, PSF B)`` float32, views scaled to [0, 1]."""
    obj = render_density(kind, shape, rng)
    obj = obj / max(obj.max(), 1e-12)
    psf_a, psf_b = view_psf(angle_deg, psf_size), view_psf(180 - angle_deg, psf_size)
    views = []
    for psf in (psf_a, psf_b):
        v = np.clip(fftconvolve(obj, psf, mode="same"), 0, None)
        v = rng.poisson(v / max(v.max(), 1e-12) * photons) + rng.normal(0, 1.0, v.shape)
        v = np.clip(v, 0, None)
        views.append((v / max(v.max(), 1e-12)).astype(np.float32))
    return views[0], views[1], obj.astype(np.float32), psf_a, psf_b
