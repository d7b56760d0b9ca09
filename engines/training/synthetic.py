"""Small self-contained LLSM / LLS-SIM pair generator for tests and for the training recipe.

It is a stand-in for the full rLLSM simulator (:mod:`engines.simulate`) with the property that matters for
VSI-SR training: the ground truth has a resolution extended along one lateral direction (x) relative to
the LLSM input, lives on a grid 1.5× finer in y and x, and both share the same planes. Structures differ in
morphology so that each one can be a meta-learning task:

``filaments``  long smooth curves (actin-like)       ``puncta``   diffraction-limited dots
``tubules``    thicker, sparser curves (ER/mito-like) ``rings``    hollow circles (clathrin-pit-like)
``meshwork``   dense short straight segments
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

STRUCTURES: tuple[str, ...] = ("filaments", "puncta", "tubules", "rings", "meshwork")


def _splat(vol: np.ndarray, pts: np.ndarray, weight: float = 1.0) -> None:
    idx = np.round(pts).astype(int)
    ok = np.all((idx >= 0) & (idx < np.array(vol.shape)), axis=1)
    np.add.at(vol, tuple(idx[ok].T), weight)


def _curve(rng: np.random.Generator, shape: tuple[int, int, int], length: float, stiffness: float) -> np.ndarray:
    nz, ny, nx = shape
    n = int(length * 2)
    pos = np.array([rng.uniform(0, nz), rng.uniform(0, ny), rng.uniform(0, nx)])
    ang = rng.uniform(0, 2 * np.pi)
    tilt = rng.normal(0, 0.05)
    pts = np.empty((n, 3))
    for i in range(n):
        ang += rng.normal(0, 1.0 / stiffness)
        pos = pos + 0.5 * np.array([tilt, np.sin(ang), np.cos(ang)])
        pts[i] = pos
    return pts


def render_density(kind: str, shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Fluorophore density of one structure on the fine (ground-truth) grid ``(Z, Y, X)``."""
    if kind not in STRUCTURES:
        raise ValueError(f"unknown structure '{kind}'; choose one of {', '.join(STRUCTURES)}")
    nz, ny, nx = shape
    vol = np.zeros(shape, np.float64)
    area = ny * nx / 96.0**2
    if kind == "filaments":
        for _ in range(max(1, int(12 * area))):
            _splat(vol, _curve(rng, shape, rng.uniform(60, 160), stiffness=12), rng.uniform(0.5, 1.0))
    elif kind == "tubules":
        tmp = np.zeros(shape)
        for _ in range(max(1, int(5 * area))):
            _splat(tmp, _curve(rng, shape, rng.uniform(40, 120), stiffness=5), rng.uniform(0.5, 1.0))
        vol += gaussian_filter(tmp, (0.3, 1.6, 1.6)) * 8
    elif kind == "puncta":
        n = max(1, int(60 * area))
        pts = np.stack([rng.uniform(0, nz, n), rng.uniform(0, ny, n), rng.uniform(0, nx, n)], 1)
        _splat(vol, pts, 1.0)
        vol *= rng.uniform(0.3, 1.0, vol.shape) * 4
    elif kind == "rings":
        for _ in range(max(1, int(25 * area))):
            c = np.array([rng.uniform(0, nz), rng.uniform(0, ny), rng.uniform(0, nx)])
            r = rng.uniform(2.5, 5.0)
            t = np.linspace(0, 2 * np.pi, int(12 * r), endpoint=False)
            pts = np.stack([np.full_like(t, c[0]), c[1] + r * np.sin(t), c[2] + r * np.cos(t)], 1)
            _splat(vol, pts, rng.uniform(0.4, 1.0))
    elif kind == "meshwork":
        for _ in range(max(1, int(40 * area))):
            p0 = np.array([rng.uniform(0, nz), rng.uniform(0, ny), rng.uniform(0, nx)])
            ang = rng.uniform(0, np.pi)
            s = np.linspace(0, rng.uniform(8, 20), 60)[:, None]
            _splat(vol, p0 + s * np.array([0.0, np.sin(ang), np.cos(ang)]), rng.uniform(0.3, 0.8))
    return vol


def make_pair(kind: str, n_planes: int, ny: int, nx: int, rng: np.random.Generator,
              photons: float = 300.0, gt_sigma_yx: tuple[float, float] = (1.6, 0.9),
              llsm_sigma_yx: tuple[float, float] = (1.6, 1.6), sigma_z: float = 0.8,
              ) -> tuple[np.ndarray, np.ndarray]:
    """One cell: an LLSM stack ``(Z, ny, nx)`` and its LLS-SIM ground truth ``(Z, 1.5·ny, 1.5·nx)``.

    Both are float32 in [0, 1]. Blur widths are Gaussian sigmas in *fine-grid* pixels; the LLSM stack is the
    wider-blurred density sampled at the coarse pixel centres (half-pixel convention of the network's
    1.5× resize) with Poisson noise of ``photons`` at the brightest voxel plus read noise.
    """
    if ny % 2 or nx % 2:
        raise ValueError(f"LLSM lateral size must be even so that 1.5× is an integer grid (got {ny}×{nx})")
    fy, fx = ny * 3 // 2, nx * 3 // 2
    dens = render_density(kind, (n_planes, fy, fx), rng)
    gt = gaussian_filter(dens, (sigma_z, *gt_sigma_yx))
    wide = gaussian_filter(dens, (sigma_z, *llsm_sigma_yx))
    zz, yy, xx = np.meshgrid(np.arange(n_planes), 1.5 * np.arange(ny) + 0.25, 1.5 * np.arange(nx) + 0.25,
                             indexing="ij")
    coarse = map_coordinates(wide, [zz, yy, xx], order=1, mode="nearest")
    scale = max(coarse.max(), 1e-12)
    noisy = rng.poisson(np.clip(coarse / scale, 0, None) * photons).astype(np.float64)
    noisy += rng.normal(0, 2.0, noisy.shape)
    llsm = np.clip(noisy, 0, None)
    llsm = llsm / max(llsm.max(), 1e-12)
    gt = gt / max(gt.max(), 1e-12)
    return llsm.astype(np.float32), gt.astype(np.float32)
