"""sCMOS camera model: Poisson shot noise, gain, Gaussian read noise, offset, 16-bit digitisation.

``counts = round(gain · Poisson(photons) + Normal(0, σ_read) + offset)`` clipped to [0, 65535], so a pixel
receiving ``s`` photons reads on average ``offset + gain·s`` counts with variance ``gain²·s + σ_read²``
(plus 1/12 from rounding). The reconstruction's first step subtracts the offset (~100 counts).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from engines.simulate.config import SimulationError

UINT16_MAX = 65535
NOISE_CHUNKS = 16


def expected_counts(photons: np.ndarray | float, offset: float, gain: float) -> np.ndarray | float:
    """Mean camera reading for an expected photon count."""
    return offset + gain * np.asarray(photons)


def expected_variance(photons: np.ndarray | float, gain: float, read_noise: float) -> np.ndarray | float:
    """Variance of the camera reading (before rounding) for an expected photon count."""
    return gain * gain * np.asarray(photons) + read_noise * read_noise


def camera(photons: np.ndarray, rng: np.random.Generator, *, offset: float, gain: float = 1.0,
           read_noise: float = 2.0) -> np.ndarray:
    """Digitise an expected-photon image into uint16 camera counts.

    Parameters
    ----------
    photons
        Expected detected photons per pixel (≥ 0), any shape.
    rng
        Source of the shot and read noise (seed it for reproducible stacks).
    offset, gain, read_noise
        Camera offset (counts), counts per photon, σ of the read noise (counts).

    Raises
    ------
    SimulationError
        If the image holds negative or non-finite photon counts.
    """
    lam = np.asarray(photons, dtype=np.float32)
    if lam.size and (not np.isfinite(lam).all() or lam.min() < 0):
        raise SimulationError("photon image must be finite and ≥ 0 (a negative expected count has no meaning)")
    if gain <= 0 or read_noise < 0 or offset < 0:
        raise SimulationError(
            f"camera needs gain > 0, read noise ≥ 0, offset ≥ 0; got {gain}, {read_noise}, {offset}"
        )
    out = np.empty(lam.shape, dtype=np.uint16)
    flat_in, flat_out = lam.reshape(-1), out.reshape(-1)
    # Fixed chunking (independent of the thread count) with one child generator per chunk: the result depends
    # only on ``rng``, while numpy's generators release the GIL so the chunks run in parallel.
    n_chunks = max(1, min(NOISE_CHUNKS, flat_in.size // 65536))
    bounds = np.linspace(0, flat_in.size, n_chunks + 1).astype(np.int64)
    children = rng.spawn(n_chunks)

    def work(i: int) -> None:
        g = children[i]
        sl = slice(bounds[i], bounds[i + 1])
        x = g.poisson(flat_in[sl]).astype(np.float32)
        if gain != 1.0:
            x *= np.float32(gain)
        if read_noise > 0:
            x += g.standard_normal(x.shape, dtype=np.float32) * np.float32(read_noise)
        x += np.float32(offset)
        np.rint(x, out=x)
        np.clip(x, 0, UINT16_MAX, out=x)
        flat_out[sl] = x

    workers = min(n_chunks, os.cpu_count() or 1)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, range(n_chunks)))
    else:
        for i in range(n_chunks):
            work(i)
    return out
