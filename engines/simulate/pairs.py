"""Training pairs for VSI-SR: an LLSM stack and its LLS-SIM ground truth of the same sample."""

from __future__ import annotations

import numpy as np

from engines.simulate.config import SimConfig, SimulationError, Structure
from engines.simulate.geometry import splat
from engines.simulate.noise import camera
from engines.simulate.optics import FFTConvolver, lls_sim_psf, system_psf
from engines.simulate.samples import make_box_sample

GT_SCALE = 1.5  # the LLS-SIM ground truth is sampled 1.5× finer laterally, as the VSI-SR network upsamples


def simulate_training_pair(structure: str | Structure, seed: int, shape: tuple[int, int, int] = (16, 96, 96),
                           config: SimConfig | None = None, *, photons: float | None = None,
                           ) -> tuple[np.ndarray, np.ndarray]:
    """An LLSM stack and its matching LLS-SIM ground truth, both deskewed, float32 in [0, 1].

    Parameters
    ----------
    structure
        ``filaments``, ``puncta``, ``beads``, ``tubules``, ``rings`` or ``meshwork``.
    seed
        Seeds the sample and the noise; the same seed gives the same pair.
    shape
        LLSM stack (planes, rows, columns) on the deskewed grid; rows and columns must be even.
    config
        Optics, sheet, camera and ``sr_factor``/``sr_axis``; ``structure`` and ``shape`` here take precedence.
    photons
        Peak photons of the LLSM stack (default ``config.peak_photons`` or its SNR).

    Returns
    -------
    llsm : (Z, Y, X) float32
        Offset-subtracted, clipped, min–max normalised noisy LLSM stack (what Step 1 hands VSI-SR).
    gt : (Z, 1.5·Y, 1.5·X) float32
        Noise-free LLS-SIM ground truth: the same emitters, resolution extended ``sr_factor``× along ``sr_axis``
        only; fine pixel ``j`` is centred on coarse coordinate ``(j − 0.25)/1.5`` (the network's 1.5× resize).
    """
    nz, ny, nx = (int(s) for s in shape)
    if ny % 2 or nx % 2:
        raise SimulationError(f"LLSM rows and columns must be even so that 1.5× is a whole grid, got {ny}×{nx}")
    try:
        kind = Structure(structure)
    except ValueError:
        raise SimulationError(
            f"unknown structure {structure!r}; choose one of {', '.join(s.value for s in Structure)}"
        ) from None
    base = config or SimConfig()
    cfg = base.model_copy(update={"structure": kind})
    o = cfg.optics
    dzp, dx = o.deskewed_pixel_z_um, o.pixel_size_um
    # LLS-SIM training stacks are ordinary (non-mirrored) acquisitions and VSI-SR sees them slab by slab, so the
    # sample fills the deskewed box with its coverslip parallel to the planes.
    margin = (min(1.2 * cfg.sheet_fwhm_um, 0.25 * nz * dzp), 0.8, 0.8)  # thin slabs: beads may be cut in z
    sample = make_box_sample(cfg, seed, (nz * dzp, ny * dx, nx * dx), margin)
    pts = sample.points_um
    idx = np.stack([pts[:, 2] / dzp, pts[:, 1] / dx, pts[:, 0] / dx], 1)
    w = sample.weights

    llsm_img = FFTConvolver(system_psf(cfg, dzp, dx), (nz, ny, nx))(splat((nz, ny, nx), idx, w))
    np.maximum(llsm_img, 0, out=llsm_img)
    peak = float(llsm_img.max())
    if peak <= 0:
        raise SimulationError("no emitter fell inside the stack; enlarge it or change the seed")
    llsm_img *= np.float32((photons or cfg.effective_peak_photons()) / peak)
    rng = np.random.default_rng([seed, 3])
    off = cfg.optics.camera_offset
    counts = camera(llsm_img, rng, offset=off, gain=cfg.gain, read_noise=cfg.read_noise_counts)
    llsm = np.clip(counts.astype(np.float32) - np.float32(off), 0, None)

    fshape = (nz, int(ny * GT_SCALE), int(nx * GT_SCALE))
    fidx = idx.copy()
    fidx[:, 1:] = fidx[:, 1:] * GT_SCALE + 0.25
    gt = FFTConvolver(lls_sim_psf(cfg, dzp, dx / GT_SCALE), fshape)(splat(fshape, fidx, w))
    np.maximum(gt, 0, out=gt)
    return _unit(llsm), _unit(gt)


def _unit(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return ((x - lo) / (hi - lo)).astype(np.float32) if hi > lo else np.zeros_like(x, dtype=np.float32)
