"""The four Meta-rLLS-VSIM steps chained: raw sample-scan stack in, fused volume out.

1. background removal + deskew (:mod:`engines.background`);
2. lateral SR with VSI-SR at 0°/60°/120° + Wiener recombination (:mod:`engines.vsisr.lateral`), skipped in the
   ``classical`` mode;
3. rotation by the objective angle and split at the mirror plane into views A and B (:mod:`engines.views`);
4. fusion: RL-DFN (``full``) or joint Richardson–Lucy deconvolution (``classical``, and ``sr-rl`` which keeps
   Step 2's VSI-SR but fuses without a network) (:mod:`engines.rldfn`).

``single-view`` is for ordinary LLSM data without a mirror (:mod:`engines.single_view`): deskew without band
removal, lateral SR when VSI-SR weights are given, then single-view Richardson–Lucy on the deskewed grid.

The same chain serves the offline CLI (``rllsm reconstruct``) and the streaming service, which takes it as named
stages (:func:`stage_chain`) so that it can time each one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from pydantic import Field

from engines.background import BackgroundParams, PreprocessReport, preprocess_tensor
from engines.config import OpticsConfig
from engines.device import default_memory_budget_mib, pick_device, to_device, to_host
from engines.errors import RllsmValueError
from engines.support import MemoryBudgetMiB, StrictModel
from engines.views import ViewsParams, ViewsReport, split_views_tensor

Mode = Literal["full", "sr-rl", "classical", "single-view"]
MODES: tuple[str, ...] = ("full", "sr-rl", "classical", "single-view")
SR_SCALE = 1.5
PSF_BOX = 31  # computed PSF box (voxels per axis, odd): holds the detection PSF's main lobes at ~60 nm voxels


class ReconstructError(RllsmValueError):
    """The chain cannot run with what it was given (missing weights or OTFs, unusable shapes)."""


class ReconstructParams(StrictModel):
    """Parameters of the whole chain; each step keeps its own model with the reference's defaults."""

    version: Literal[1] = 1
    mode: Mode = Field("classical", description="full: VSI-SR + RL-DFN; sr-rl: VSI-SR + joint Richardson–Lucy "
                       "fusion; classical: no network, joint Richardson–Lucy fusion; single-view: LLSM data without a "
                       "mirror, deskew (+ VSI-SR when given) + single-view Richardson–Lucy.")
    background: BackgroundParams = Field(default_factory=BackgroundParams)
    views: ViewsParams | None = Field(None, description="Step 3; default: the reference's with the objective angle.")
    iterations: int = Field(30, ge=1, le=500,
                            description="Richardson–Lucy iterations (sr-rl, classical, single-view; full: of the "
                            "estimate that fills the regions only one view sees, unless tile is none).")
    tile: Literal["none", "auto"] | int = Field("auto", description="RL-DFN tiling: none, auto (fits budget) or size.")
    overlap: int = Field(24, ge=0, le=512, description="RL-DFN tile overlap (voxels).")
    memory_budget_mib: MemoryBudgetMiB | None = Field(
        None, description="Memory one reconstruction may use, in MiB; RL-DFN tiles are sized to fit it and joint "
        "Richardson–Lucy runs in blocks where the whole volume's would not (None: from the device's free memory, "
        "engines.device.default_memory_budget_mib).")

    @property
    def memory_budget_gb(self) -> float | None:
        """The budget in GiB, as :meth:`Reconstructor.fuse_t` reads it until it takes :attr:`memory_budget_mib`."""
        return None if self.memory_budget_mib is None else self.memory_budget_mib / 1024


@dataclass
class ReconModels:
    """Everything learned or measured that the chain needs besides the data."""

    vsisr: Any = None  # nn.Module or predictor callable (N,7,H,W) → (N,3,1.5H,1.5W), e.g. an ONNX Runtime backend
    otfs: Any = None  # engines.vsisr.otf.OTFSet, or a folder to read it from
    lateral: Any = None  # engines.vsisr.lateral.LateralSRParams
    rldfn: Any = None  # DualViewFusionNet or predictor callable (corr_a, corr_b) → fused, (N,1,D,H,W) tensors
    psf: np.ndarray | None = None  # detection PSF (Z, Y, X) at psf_voxel_um, unrotated
    psf_voxel_um: tuple[float, float, float] | None = None
    psf_a: np.ndarray | None = None  # the views' PSFs on the views' grid, if measured
    psf_b: np.ndarray | None = None


@dataclass
class ReconResult:
    """Fused volume, the intermediates kept on request, each step's report and wall time."""

    fused: np.ndarray
    voxel_um: float
    voxel_zyx_um: tuple[float, float, float] | None = None  # (dz, dy, dx) when not isotropic (single-view)
    reports: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    intermediates: dict[str, np.ndarray] = field(default_factory=dict)


def views_voxel_um(optics: OpticsConfig, mode: Mode) -> float:
    """Isotropic voxel size of the views and of the fused volume (µm)."""
    return optics.pixel_size_um / SR_SCALE if uses_lateral_sr(mode) else optics.pixel_size_um


def uses_lateral_sr(mode: str) -> bool:
    """Whether ``mode`` runs Step 2 (VSI-SR)."""
    return mode in ("full", "sr-rl")


def view_psfs(optics: OpticsConfig, mode: Mode, models: ReconModels) -> tuple[np.ndarray, np.ndarray]:
    """PSFs of views A and B on the views' isotropic grid.

    Measured view PSFs win; else a given detection PSF is rotated by ± the objective angle; else the detection PSF is
    computed from NA, emission wavelength and refractive index, times the light sheet (``optics.sheet_fwhm_um``).
    A computed PSF holds no lattice side lobes and no aberrations: after lateral SR
    the data are sharper than it, so RL-DFN users should pass PSFs measured on their super-resolved views.
    """
    from engines.rldfn.psf import computed_psf, dual_view_psfs

    if models.psf_a is not None and models.psf_b is not None:
        return models.psf_a, models.psf_b
    v = views_voxel_um(optics, mode)
    if models.psf is not None:
        voxel = models.psf_voxel_um or (v, v, v)
        psf = models.psf
    else:
        voxel = (v, v, v)
        psf = computed_psf((PSF_BOX, PSF_BOX, PSF_BOX), voxel, optics.emission_nm, optics.na_detection,
                           optics.refractive_index, sheet_fwhm_um=optics.sheet_fwhm_um)
    return dual_view_psfs(psf, optics.objective_angle_deg, voxel, (v, v, v), (PSF_BOX, PSF_BOX, PSF_BOX))


class Reconstructor:
    """Holds the models on the device and runs the chain; build once, call per stack."""

    def __init__(self, optics: OpticsConfig, params: ReconstructParams | None = None,
                 models: ReconModels | None = None, device: str | torch.device | None = None) -> None:
        self.optics = optics
        self.params = params or ReconstructParams()
        self.models = models or ReconModels()
        self.device = pick_device(str(device) if device is not None else None)
        # The rotation follows the skew direction: a negative skew angle tilts the mirror the other way.
        angle = math.copysign(optics.objective_angle_deg, optics.skew_angle_deg)
        self.views_params = self.params.views or ViewsParams(angle_deg=angle)
        mode = self.params.mode
        self._single_sr = mode == "single-view" and self.models.vsisr is not None
        if self._single_sr and self.models.otfs is None:
            raise ReconstructError("lateral SR in mode 'single-view' needs OTFs with the VSI-SR checkpoint")
        if uses_lateral_sr(mode):
            needs = [("VSI-SR checkpoint", self.models.vsisr), ("OTFs", self.models.otfs)]
            if mode == "full":
                needs.append(("RL-DFN weights", self.models.rldfn))
            missing = [n for n, v in needs if v is None]
            if missing:
                raise ReconstructError(f"mode '{mode}' needs {', '.join(missing)}; give them or use mode 'classical'")
        if mode == "single-view":
            from engines.single_view import single_view_psf, single_view_voxel_um

            self.voxel_zyx_um = single_view_voxel_um(optics, self._single_sr, SR_SCALE)
            self.psf = single_view_psf(optics, self.voxel_zyx_um, self.models.psf, self.models.psf_voxel_um)
            self.psf_a = self.psf_b = self.psf
        else:
            self.psf_a, self.psf_b = view_psfs(optics, mode, self.models)
        self._vsisr = None
        if uses_lateral_sr(mode) or self._single_sr:
            from engines.vsisr.lateral import LateralSRParams, as_predictor

            if self.models.lateral is None and self.device.type == "cuda":
                # fill the GPU: as many windows per network call as the memory budget holds
                self.models.lateral = LateralSRParams(batch_size="auto")
            lat = self.models.lateral or LateralSRParams()
            # built once: moving the weights to the device per stack would be a transfer per stack
            self._vsisr = as_predictor(self.models.vsisr, self.device, lat.precision)
        self._rldfn = None
        #: mode full: the first streamed stack's registration to its views (the stage chain keeps no reports, and
        #: one check tells whether the network fits the sample; a warning is logged when it does not)
        self.registration: Any = None
        if mode == "full":
            from engines.rldfn.model import RLDFN

            self._rldfn = RLDFN(self.models.rldfn, self.psf_a, self.psf_b).to(self.device).eval()

    # --- the steps on the device: tensor in → tensor out, nothing leaves the device but small probes ----------------

    def to_device(self, x: Any) -> torch.Tensor:
        """A host array as a tensor on :attr:`device` (counted once); a tensor already there passes unchanged."""
        return to_device(x, self.device)

    def preprocess_t(self, raw: torch.Tensor) -> tuple[torch.Tensor, PreprocessReport]:
        params = self.params.background
        if self.params.mode == "single-view":
            # no mirror: no epi-fluorescence band to remove, and the deskewed axis is kept whole
            params = params.model_copy(update={"remove_band": False, "crop_square": False})
        vol, rep = preprocess_tensor(raw, self.optics, params)
        if uses_lateral_sr(self.params.mode) and self.views_params.mirror_threshold > 0:
            # whether the stack holds a mirror is judged on what the camera saw, before a network reshapes it
            from engines.views import check_mirror_tensor

            v = vol.transpose(1, 2) if self.optics.skew_axis.value == "y" else vol
            check_mirror_tensor(v, self.optics.pixel_size_um, self.optics.deskewed_pixel_z_um, self.views_params)
        return vol, rep

    def _runs_lateral(self) -> bool:
        return uses_lateral_sr(self.params.mode) or self._single_sr

    def lateral_t(self, volume: torch.Tensor, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        if not self._runs_lateral():
            return volume
        from engines.vsisr.lateral import lateral_sr_tensor

        return lateral_sr_tensor(volume, self._vsisr, self.models.otfs, self.models.lateral, progress=progress)

    def split_t(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, ViewsReport]:
        dz = self.optics.deskewed_pixel_z_um
        dx = views_voxel_um(self.optics, self.params.mode)
        if self.optics.skew_axis.value == "y":
            # The view split works with the skew axis last; a y-skewed camera is the same geometry transposed.
            volume = volume.transpose(1, 2)
        params = self.views_params
        if uses_lateral_sr(self.params.mode):  # checked before lateral SR (preprocess_t)
            params = params.model_copy(update={"mirror_threshold": 0.0})
        return split_views_tensor(volume, dx, dz, params)

    def deconvolve_t(self, volume: torch.Tensor, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """single-view: Richardson–Lucy of the deskewed volume with the single-view PSF, on the device."""
        from engines.single_view import single_view_rl

        return single_view_rl(volume, self.psf, self.params.iterations, progress=progress,
                              memory_budget_bytes=self._budget_bytes())

    def fuse_t(self, view_a: torch.Tensor, view_b: torch.Tensor,
               progress: Callable[[int, int], None] | None = None,
               reports: dict[str, Any] | None = None) -> torch.Tensor:
        """Fuse the two views; in mode full ``reports`` (when given) receives the fused volume's registration to
        its views (:class:`engines.rldfn.consistency.RegistrationReport`)."""
        if self.params.mode == "full":
            from engines.rldfn.fuse import fuse_rldfn

            mib = self.params.memory_budget_mib
            if mib is None and self.params.tile == "auto":
                mib = default_memory_budget_mib(self.device)
            budget = None if mib is None else int(mib * 2**20)
            # tensors in, a tensor out on the same device: tiles are cut and blended there, no host copy
            return fuse_rldfn(view_a, view_b, self._rldfn, tile=self.params.tile, overlap=self.params.overlap,
                              device=self.device, memory_budget_bytes=budget, progress=progress,
                              one_view_iterations=self.params.iterations, reports=reports)
        from engines.rldfn.blocked_rl import joint_rl_within

        return joint_rl_within(view_a, view_b, self.psf_a, self.psf_b, self.params.iterations, "auto",
                               self._budget_bytes(), progress)

    def _budget_bytes(self) -> int:
        """The reconstruction's memory budget in bytes (from the device's free memory when not set)."""
        mib = self.params.memory_budget_mib
        return int((default_memory_budget_mib(self.device) if mib is None else mib) * 2**20)

    # --- the same steps for host arrays: numpy in → numpy out (one copy each way) -------------------------------

    def preprocess(self, raw: np.ndarray) -> tuple[np.ndarray, PreprocessReport]:
        vol, rep = self.preprocess_t(self.to_device(raw))
        return to_host(vol), rep

    def lateral(self, volume: np.ndarray, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        if not self._runs_lateral():
            return volume
        return to_host(self.lateral_t(self.to_device(np.asarray(volume, np.float32)), progress))

    def split(self, volume: np.ndarray) -> tuple[np.ndarray, np.ndarray, ViewsReport]:
        a, b, rep = self.split_t(self.to_device(np.asarray(volume, np.float32)))
        return to_host(a), to_host(b), rep

    def deconvolve(self, volume: np.ndarray, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        return to_host(self.deconvolve_t(self.to_device(np.asarray(volume, np.float32)), progress))

    def fuse(self, view_a: np.ndarray, view_b: np.ndarray,
             progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        a, b = (self.to_device(np.asarray(v, np.float32)) for v in (view_a, view_b))
        return to_host(self.fuse_t(a, b, progress))

    def __call__(self, raw: np.ndarray | torch.Tensor, keep_intermediates: bool = False,
                 progress: Callable[[str], None] | None = None) -> ReconResult:
        """The whole chain on one stack: one copy to the device, one copy of the fused volume back.

        ``keep_intermediates`` copies each intermediate back too (for inspection, not for speed); ``progress``
        is called with the name of each step as it starts.
        """
        timings: dict[str, float] = {}
        reports: dict[str, Any] = {}
        kept: dict[str, np.ndarray] = {}

        def timed(name: str, fn: Callable[..., Any], *args: Any) -> Any:
            if progress is not None:  # names the step that starts (a CLI shows it beside its progress bar)
                progress(name)
            t0 = time.perf_counter()
            out = fn(*args)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # else the time lands on whichever step reads back first
            timings[name] = time.perf_counter() - t0
            return out

        with torch.no_grad():
            # the upload is timed with the first step and the download with the last, as the runner sees them
            vol, reports["preprocess"] = timed("preprocess", lambda: self.preprocess_t(self.to_device(raw)))
            if keep_intermediates:
                kept["preprocessed"] = to_host(vol)
            sr = timed("lateral_sr", self.lateral_t, vol)
            if keep_intermediates and self._runs_lateral():
                kept["lateral_sr"] = to_host(sr)
            del vol
            if self.params.mode == "single-view":
                out = timed("deconvolve", lambda v: to_host(self.deconvolve_t(v)), sr)
                return ReconResult(fused=out, voxel_um=self.voxel_zyx_um[2], voxel_zyx_um=self.voxel_zyx_um,
                                   reports=reports, timings_s=timings, intermediates=kept)
            view_a, view_b, reports["split_views"] = timed("split_views", self.split_t, sr)
            del sr
            if keep_intermediates:
                kept["view_a"], kept["view_b"] = to_host(view_a), to_host(view_b)
            fused = timed("fuse", lambda: to_host(self.fuse_t(view_a, view_b, reports=reports)))
        return ReconResult(fused=fused, voxel_um=views_voxel_um(self.optics, self.params.mode), reports=reports,
                           timings_s=timings, intermediates=kept)

    def stages(self) -> list[ChainStage]:
        """The chain as named device stages for the streaming pipeline (reports are dropped; timings are the runner's).

        Each stage takes and returns tensors on :attr:`device` (``kind == "torch"``); the first also accepts a host
        array and moves it to the device (counted once). The last returns the fused volume as a device tensor:
        the runner copies it back (:class:`streamer.pipeline.StageWorker`).
        """
        chain = [ChainStage("preprocess", lambda raw: self.preprocess_t(self.to_device(raw))[0])]
        if self._runs_lateral():
            chain.append(ChainStage("lateral_sr", lambda vol: self.lateral_t(self.to_device(vol))))
        if self.params.mode == "single-view":
            chain.append(ChainStage("deconvolve", lambda vol: self.deconvolve_t(self.to_device(vol))))
            return chain
        chain.append(ChainStage("split_views", lambda vol: tuple(self.split_t(self.to_device(vol))[:2])))
        chain.append(ChainStage("fuse", self._fuse_stage))
        return chain

    def _fuse_stage(self, views: tuple[Any, Any]) -> torch.Tensor:
        reports: dict[str, Any] | None = {} if self.registration is None and self.params.mode == "full" else None
        out = self.fuse_t(*(self.to_device(v) for v in views), reports=reports)
        if reports:
            self.registration = reports.get("registration")
        return out


class ChainStage(NamedTuple):
    """One named device stage: unpacks as ``(name, fn)``; :attr:`kind` tells a runner it takes device tensors."""

    name: str
    fn: Callable[[Any], Any]

    @property
    def kind(self) -> str:
        return "torch"


# --- loading ----------------------------------------------------------------------------------------------------


def load_models(
    *, vsisr_checkpoint: str | Path | None = None, otf_dir: str | Path | None = None,
    rldfn_weights: str | Path | None = None, psf: str | Path | np.ndarray | None = None,
    psf_voxel_um: tuple[float, float, float] | None = None, psf_a: str | Path | None = None,
    psf_b: str | Path | None = None, optics: OpticsConfig | None = None, lateral: Any = None,
    backend: Any = None,
) -> ReconModels:
    """Read checkpoints, OTFs and PSFs from disk into :class:`ReconModels`.

    Without ``otf_dir`` but with a VSI-SR checkpoint, OTFs are generated from the optics (documented approximation
    in :func:`engines.vsisr.otf.generate_otfs`).

    ``backend`` (:class:`engines.backends.BackendConfig`, default: the torch modules) says what runs the two
    networks; the weights may then also be ``rllsm export`` folders, ``.onnx`` or ``.engine`` files, and a torch
    checkpoint asked to run on ONNX Runtime is exported once into ``backend.onnx_cache``
    (:func:`engines.backends.networks.open_network`).
    """
    import tifffile

    models = ReconModels(lateral=lateral)
    if vsisr_checkpoint is not None:
        if backend is None:
            from engines.vsisr.checkpoint import load_checkpoint

            models.vsisr = load_checkpoint(vsisr_checkpoint).eval()
        else:
            models.vsisr = _open("vsi-sr", vsisr_checkpoint, backend)
    if otf_dir is not None:
        from engines.vsisr.otf import load_otfs

        wl = optics.wavelength_nm if optics is not None else 488.0
        models.otfs = load_otfs(otf_dir, wl)
    elif models.vsisr is not None:
        from engines.vsisr.otf import generate_otfs

        models.otfs = generate_otfs(optics or OpticsConfig())
    if rldfn_weights is not None:
        if backend is None:
            from engines.rldfn.checkpoint import load_rldfn

            models.rldfn = load_rldfn(rldfn_weights)
        else:
            models.rldfn = _open("rl-dfn", rldfn_weights, backend)
    if psf is not None:
        models.psf = tifffile.imread(psf).astype(np.float32) if not isinstance(psf, np.ndarray) else psf
        models.psf_voxel_um = psf_voxel_um
    if (psf_a is None) != (psf_b is None):
        raise ReconstructError("give both --psf-a and --psf-b, or neither")
    if psf_a is not None and psf_b is not None:
        from engines.rldfn.psf import clean_psf

        models.psf_a = clean_psf(tifffile.imread(psf_a))
        models.psf_b = clean_psf(tifffile.imread(psf_b))
    return models


def _open(kind: str, source: str | Path, backend: Any) -> Any:
    from engines.backends import BackendError
    from engines.backends.networks import open_network

    try:
        return open_network(kind, source, backend)
    except BackendError as err:
        # ReconstructError is what the CLI and the service report to the user; keep the backend's reasons.
        raise ReconstructError(f"{kind} ({source}): {err}") from None


def demo_models(optics: OpticsConfig, backend: Any = None) -> ReconModels | None:
    """The shipped demonstration weights (trained on simulated data only), or None when not installed."""
    try:
        from engines.weights import demo_weights_path
    except ImportError:
        return None
    try:
        vsisr, rldfn = demo_weights_path("vsi-sr"), demo_weights_path("rl-dfn")
    except (FileNotFoundError, KeyError, ValueError):
        return None
    if not (Path(vsisr).exists() and Path(rldfn).exists()):
        return None
    return load_models(vsisr_checkpoint=vsisr, rldfn_weights=rldfn, optics=optics, backend=backend)


class StageChain(list):
    """The named stages of one acquisition, plus what the chain declares about its output.

    ``grid`` (:class:`engines.grid.OutputGrid`) is the fused voxel size and the grid every volume is placed into;
    ``fitter`` (:class:`engines.grid.GridFitter`) records how each volume was placed; ``provenance`` names the mode,
    the model files with their SHA-256, the backend and precision, the software version and the optics.
    """

    grid: Any = None
    fitter: Any = None
    provenance: dict[str, Any]

    def __init__(self, stages: Any = (), *, grid: Any = None, fitter: Any = None,
                 provenance: dict[str, Any] | None = None) -> None:
        super().__init__(stages)
        self.grid, self.fitter, self.provenance = grid, fitter, dict(provenance or {})


def stage_chain(mode: str, optics: OpticsConfig, *, device: str | None = None, weights: str | None = None,
                memory_budget_mib: float | None = None, backend: Any = None, sources: Any = None,
                fused_depth: int | None = None, views: ViewsParams | None = None) -> StageChain:
    """Named stages for the streaming service; the fused volume leaves placed in the acquisition's fixed grid.

    ``sources`` (:class:`engines.sources.ReconSources`) names the models as for ``rllsm reconstruct``: VSI-SR
    checkpoint, OTF folder, RL-DFN weights, measured PSFs, or a ``weights`` folder holding ``vsi-sr.pt`` (or
    ``.pth``), ``rl-dfn.pt`` (or a reference RL-DFN folder ``rl-dfn/``) and optionally ``otf/`` (``weights`` here is
    the same folder, kept for callers that pass only it); without networks the shipped demo weights are used.
    ``memory_budget_mib`` (MiB) bounds RL-DFN's tiles and joint Richardson–Lucy's blocks (default:
    :func:`engines.device.default_memory_budget_mib`).
    ``backend`` (:class:`engines.backends.BackendConfig`) runs both networks on torch, ONNX Runtime or TensorRT
    (see :func:`load_models`); ``None``: the torch modules. ``fused_depth`` fixes the planes of the output grid
    (default: :func:`engines.grid.nominal_depth` of the first stack).
    ``views`` replaces Step 3's parameters (default: the reference's with the objective angle).
    """
    from engines.grid import GridFitter, OutputGrid
    from engines.sources import (
        ReconSources,
        SourcesError,
        models_from_sources,
        software_version,
        sources_provenance,
    )

    if mode not in MODES:
        raise ReconstructError(f"unknown reconstruction mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "single-view":
        # the service's output grid is the fused views' isotropic one; single-view keeps the deskewed grid
        raise ReconstructError("mode 'single-view' runs offline only (rllsm reconstruct --mode single-view)")
    if sources is None:
        sources = ReconSources(weights=Path(weights) if weights is not None else None)
    elif weights is not None and sources.weights is None and not sources.has_networks:
        sources = sources.model_copy(update={"weights": Path(weights)})
    try:
        models, used = models_from_sources(sources, mode, optics, backend=backend)
    except SourcesError as err:
        raise ReconstructError(str(err)) from None
    params = ReconstructParams(mode=mode, memory_budget_mib=memory_budget_mib, views=views)
    rec = Reconstructor(optics, params, models, device=device)
    v = views_voxel_um(optics, mode)  # the fused grid is isotropic: the views' voxel
    fitter = GridFitter(OutputGrid((v, v, v), depth=fused_depth), max_depth=rec.views_params.max_depth)
    last: dict[str, Any] = {}

    def split_keep(vol: Any) -> Any:
        # the chain runs one stack at a time, so the split report of this stack is the one the placement reads
        a, b, last["report"] = rec.split_t(rec.to_device(vol))
        return a, b

    def fuse_placed(fuse: Callable[[Any], Any]) -> Callable[[Any], Any]:
        # placed inside the fuse stage (a crop or pad on the device: negligible beside the fusion), so the stage
        # names stay
        return lambda views: fitter.place(fuse(views), last.pop("report", None))

    wrap = {"split_views": lambda fn: split_keep, "fuse": fuse_placed}
    stages = [ChainStage(name, wrap[name](fn) if name in wrap else fn) for name, fn in rec.stages()]
    bk = backend.model_dump(mode="json") if hasattr(backend, "model_dump") else None
    provenance = {
        "mode": mode, "software": {"name": "rllsm-vsim", "version": software_version()},
        "models": sources_provenance(used) if uses_lateral_sr(mode) or used else {},
        "backend": {"requested": bk, "runs": {n: type(m).__name__ for n, m in (("vsi-sr", models.vsisr),
                                                                               ("rl-dfn", models.rldfn)) if m}}
        if uses_lateral_sr(mode) else None,
        "precision": (bk or {}).get("precision", "fp32") if uses_lateral_sr(mode) else "fp32",
        "optics": optics.model_dump(mode="json"), "voxel_size_um": [v, v, v],
        "grid": {"anchor": fitter.grid.anchor, "depth": fused_depth},
    }
    return StageChain(stages, grid=fitter.grid, fitter=fitter, provenance=provenance)


def models_from_folder(root: Path, optics: OpticsConfig, backend: Any = None,
                       need_rldfn: bool = True) -> tuple[ReconModels, dict[str, Path]]:
    """Models from a weights folder (see :func:`stage_chain`) and the files they were read from."""
    def first(*names: str) -> Path | None:
        return next((root / n for n in names if (root / n).exists()), None)

    vsisr = first("vsi-sr.pt", "vsi-sr.pth", "vsisr.pt", "vsisr.pth", "vsi-sr")  # vsi-sr/: an `rllsm export` folder
    rldfn = first("rl-dfn.pt", "rl-dfn", "rldfn.pt", "rldfn")
    if vsisr is None or (rldfn is None and need_rldfn):
        raise ReconstructError(f"{root}: expected vsi-sr.pt (or .pth) and rl-dfn.pt (or an RL-DFN folder rl-dfn/)")
    otf = first("otf", "OTF")
    models = load_models(vsisr_checkpoint=vsisr, otf_dir=otf, rldfn_weights=rldfn if need_rldfn else None,
                         optics=optics, backend=backend)
    used = {"checkpoint": vsisr, **({"otf_dir": otf} if otf else {}), **({"model": rldfn} if need_rldfn else {})}
    return models, used


def _models_from_folder(root: Path, optics: OpticsConfig, backend: Any = None, need_rldfn: bool = True) -> ReconModels:
    return models_from_folder(root, optics, backend, need_rldfn)[0]
