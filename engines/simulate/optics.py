"""Optics of the simulated microscope: detection PSF, lattice light sheet, system kernels, FFT convolution.

The deskewed frame is aligned with the detection objective, so there the system PSF is the detection PSF
times the light-sheet profile along the detection axis, and is axis-aligned. The camera records the raw
(sheared) frame; the same PSF seen from the raw grid is sheared by ``f`` pixels per plane. Convolving the
sample with that sheared kernel directly on the raw grid gives the raw stack without interpolating the
image, so the only resampling in a simulate → deskew round trip is the deskew under test.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache

import numpy as np
import scipy.fft as sfft
from scipy.ndimage import map_coordinates
from scipy.ndimage import shift as nd_shift

from engines.simulate.config import SimConfig, SimulationError


def fft_workers() -> int:
    """Threads for scipy.fft: ``RLLSM_SIM_WORKERS`` or all cores (the machine may be shared)."""
    env = os.environ.get("RLLSM_SIM_WORKERS")
    return max(1, int(env)) if env else (os.cpu_count() or 1)


@lru_cache(maxsize=16)
def detection_psf(na: float, wavelength_um: float, n: float, dxy_um: float, dz_um: float, half_z: int,
                  half_xy: int, model: str = "vectorial") -> np.ndarray:
    """Widefield detection PSF (peak 1, float32, shape (2·half_z+1, 2·half_xy+1, 2·half_xy+1)), cached.

    Computed with psfmodels (Aguet's vectorial model by default) for a water-dipping objective imaging
    into a medium of the same index, so there is no spherical aberration and the PSF is centro-symmetric.
    The cache makes a time series pay for the PSF once.
    """
    if na >= n:
        raise SimulationError(f"detection NA {na} must be below the refractive index {n}")
    import psfmodels

    z = (np.arange(-half_z, half_z + 1) * dz_um).tolist()
    psf = psfmodels.make_psf(
        z, 2 * half_xy + 1, dxy=dxy_um, NA=na, wvl=wavelength_um, ns=n, ni=n, ni0=n, ng=n, ng0=n, model=model
    )
    psf = np.asarray(psf, dtype=np.float64)
    psf /= psf.max()
    out = psf.astype(np.float32)
    out.setflags(write=False)
    return out


def sheet_profile(z_um: np.ndarray, cfg: SimConfig) -> np.ndarray:
    """Lattice light-sheet intensity across the sheet (along the detection axis), peak 1.

    A dithered lattice sheet is a main lobe flanked by weaker side lobes; they are what makes LLSM's axial
    PSF worse than its main lobe suggests, so they are modelled rather than a plain Gaussian.
    """
    k = 4.0 * math.log(2.0)
    z = np.asarray(z_um, dtype=np.float64)
    main = np.exp(-k * (z / cfg.sheet_fwhm_um) ** 2)
    w = 0.8 * cfg.sheet_fwhm_um
    d = cfg.sheet_sidelobe_offset_um
    side = np.exp(-k * ((z - d) / w) ** 2) + np.exp(-k * ((z + d) / w) ** 2)
    prof = main + cfg.sheet_sidelobe * side
    return (prof / prof.max()).astype(np.float32)


def kernel_half_sizes(cfg: SimConfig, dz_um: float, dxy_um: float) -> tuple[int, int]:
    """Half sizes (planes, pixels) that hold the system PSF: the sheet bounds it along the detection axis."""
    reach = 1.5 * cfg.sheet_fwhm_um
    if cfg.sheet_sidelobe > 0:
        # side lobes are 0.8·FWHM wide: 1.2 of their FWHM past their centre they are below 2 % of their peak
        reach = max(reach, cfg.sheet_sidelobe_offset_um + 1.2 * 0.8 * cfg.sheet_fwhm_um)
    return max(2, int(math.ceil(reach / dz_um))), max(3, int(math.ceil(cfg.kernel_radius_um / dxy_um)))


def system_psf(cfg: SimConfig, dz_um: float, dxy_um: float, half: tuple[int, int] | None = None) -> np.ndarray:
    """Detection PSF × sheet profile on a (dz, dxy, dxy) grid aligned with the detection axis, peak 1."""
    o = cfg.optics
    hz, hxy = half or kernel_half_sizes(cfg, dz_um, dxy_um)
    det = detection_psf(o.na_detection, o.emission_nm / 1000.0, o.refractive_index, dxy_um, dz_um, hz, hxy,
                        cfg.psf_model)
    z = np.arange(-hz, hz + 1) * dz_um
    h = det * sheet_profile(z, cfg)[:, None, None]
    return (h / h.max()).astype(np.float32)


def raw_kernel(h: np.ndarray, shear: float) -> np.ndarray:
    """The system PSF as seen on the raw sample-scan grid: plane ``d`` shifted by ``−shear·d`` columns.

    Raw pixel (k, v, u) images the deskewed point ``x = u + shear·k + c``; a source ``d`` planes away is
    therefore displaced by ``shear·d`` columns on the raw grid. The kernel is flipped first so that the
    convolution is the correlation the imaging actually performs (a no-op for a symmetric PSF, kept for
    aberrated ones). Shifts use cubic splines on a PSF sampled above Nyquist.
    """
    hf = np.ascontiguousarray(h[::-1, ::-1, ::-1], dtype=np.float64)
    hz = hf.shape[0] // 2
    pad = int(math.ceil(abs(shear) * hz)) + 2
    padded = np.pad(hf, ((0, 0), (0, 0), (pad, pad)))
    out = np.empty_like(padded)
    for i in range(hf.shape[0]):
        d = i - hz
        out[i] = nd_shift(padded[i], (0.0, -shear * d), order=3, mode="constant", cval=0.0)
    out[np.abs(out) < 1e-7 * out.max()] = 0.0
    return out.astype(np.float32)


def lls_sim_psf(cfg: SimConfig, dz_um: float, dxy_um: float) -> np.ndarray:
    """PSF of the LLS-SIM ground truth: the LLSM system PSF made ``sr_factor`` times narrower along one axis.

    Structured illumination with the lattice's own periodicity extends the OTF along that direction only
    (hence three VSI-SR orientations at 0°, 60°, 120° to cover the plane); resolution along the other
    lateral axis and across the sheet stays that of LLSM.
    """
    h = system_psf(cfg, dz_um, dxy_um)
    s = cfg.sr_factor
    if s == 1.0:
        return h
    nz, ny, nx = h.shape
    zz, yy, xx = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    cy, cx = (ny - 1) / 2, (nx - 1) / 2
    if cfg.sr_axis == "x":
        xx = cx + (xx - cx) * s
    else:
        yy = cy + (yy - cy) * s
    g = map_coordinates(h.astype(np.float64), [zz, yy, xx], order=3, mode="constant", cval=0.0)
    g = np.clip(g, 0.0, None)
    return (g / g.max()).astype(np.float32)


class FFTConvolver:
    """Linear ("same"-size) convolution with one kernel, its spectrum computed once per image shape.

    ``device=None`` or ``"cpu"`` uses scipy's pocketfft (the reference path: files re-simulate bit for bit
    from their metadata on any machine); ``"cuda"`` (or ``"auto"``: :func:`engines.device.pick_device`) runs
    the same float32 FFTs with torch on the GPU, equal to float32 rounding.
    """

    def __init__(self, kernel: np.ndarray, shape: tuple[int, int, int], device: str | None = None) -> None:
        if any(k % 2 == 0 for k in kernel.shape):
            raise SimulationError(f"kernel shape {kernel.shape} must be odd along every axis")
        self.shape = tuple(int(s) for s in shape)
        self.kshape = kernel.shape
        # Padding by the kernel size makes the circular FFT convolution linear (no wrap-around between edges).
        self.fshape = tuple(sfft.next_fast_len(n + k - 1, real=True) for n, k in zip(self.shape, self.kshape))
        self.workers = fft_workers()
        self.device = None
        if device is not None and device != "cpu":
            import torch

            from engines.device import pick_device

            try:
                dev = pick_device(None if device == "auto" else device)
            except RuntimeError as err:
                raise SimulationError(str(err)) from None
            if dev.type != "cpu":
                self.device = dev
                with torch.no_grad():
                    k = torch.from_numpy(np.ascontiguousarray(kernel, dtype=np.float32)).to(dev)
                    self.spectrum = torch.fft.rfftn(k, s=self.fshape)
                return
        self.spectrum = sfft.rfftn(kernel.astype(np.float32), s=self.fshape, workers=self.workers)

    @property
    def margins(self) -> tuple[int, int, int]:
        """Half kernel sizes: how far outside the output grid a source still reaches into it."""
        return tuple(k // 2 for k in self.kshape)  # type: ignore[return-value]

    @property
    def extended_shape(self) -> tuple[int, int, int]:
        """Shape of the source grid for :meth:`extended`: the output grid plus the margins on every side."""
        return tuple(n + k - 1 for n, k in zip(self.shape, self.kshape))  # type: ignore[return-value]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """``same``-size convolution: sources outside ``image`` are taken as zero."""
        if image.shape != self.shape:
            raise SimulationError(f"image shape {image.shape} differs from the convolver's {self.shape}")
        c = [k // 2 for k in self.kshape]
        return self._run(image, tuple(slice(ci, ci + n) for ci, n in zip(c, self.shape)))

    def extended(self, sources: np.ndarray) -> np.ndarray:
        """The output grid's image of sources on :attr:`extended_shape` (``valid`` convolution).

        Sources in the margins (outside the field or the scanned planes) still blur into it, as on a real
        camera. The circular FFT of the same size is exact here: wrap-around only touches outputs the
        ``valid`` crop discards.
        """
        if sources.shape != self.extended_shape:
            raise SimulationError(f"source grid {sources.shape} differs from the convolver's {self.extended_shape}")
        return self._run(sources, tuple(slice(k - 1, k - 1 + n) for k, n in zip(self.kshape, self.shape)))

    def _run(self, image: np.ndarray, crop: tuple[slice, ...]) -> np.ndarray:
        if self.device is not None:
            import torch

            with torch.no_grad():
                t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).to(self.device)
                spec = torch.fft.rfftn(t, s=self.fshape)
                spec *= self.spectrum
                full = torch.fft.irfftn(spec, s=self.fshape)
                return np.ascontiguousarray(full[crop].cpu().numpy(), dtype=np.float32)
        spec = sfft.rfftn(image.astype(np.float32, copy=False), s=self.fshape, workers=self.workers)
        spec *= self.spectrum
        full = sfft.irfftn(spec, s=self.fshape, workers=self.workers)
        return np.ascontiguousarray(full[crop], dtype=np.float32)
