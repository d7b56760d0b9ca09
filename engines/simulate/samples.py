"""Seeded 3-D ground-truth samples as weighted point clouds in the mirror frame ``(a, y, h)`` (µm).

Point clouds rather than voxel grids keep positions exact: the same sample can be rendered onto the raw,
deskewed or a finer ground-truth grid, mirrored (``h → −h``) and moved between timepoints without
resampling. Weights are relative emitter brightness; the microscope scales them to photons.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engines.simulate.config import SimConfig, SimulationError, Structure
from engines.simulate.geometry import Geometry

MIN_HEIGHT_UM = 0.05  # emitters cannot sit inside the mirror


@dataclass(frozen=True)
class Sample:
    """A structure as points; ``group`` ties points that move together (one filament, one punctum, one bead)."""

    structure: Structure
    points_um: np.ndarray  # (N, 3) mirror frame (a, y, h)
    weights: np.ndarray  # (N,)
    group: np.ndarray  # (N,) int
    n_groups: int
    seed: int
    # (t, cumulative walk) of the latest timepoint: a series asks for t, t+1, … so each costs one step
    _walk: dict = field(default_factory=dict, compare=False, repr=False)

    def at(self, timepoint: int, cfg: SimConfig) -> np.ndarray:
        """Point positions at ``timepoint`` (0 = as generated): common drift plus a random walk per group.

        The walk at timepoint ``t`` is the sum of steps ``1..t`` drawn from generators seeded by
        ``(seed, t)``, so any timepoint can be produced alone and always equals the sequential run.
        """
        if timepoint < 0:
            raise SimulationError(f"timepoint must be ≥ 0, got {timepoint}")
        disp = np.zeros((self.n_groups, 3))
        # Beads are stuck to the coverslip: they share the stage drift but do not diffuse.
        jitter = 0.0 if self.structure is Structure.beads else cfg.jitter_um
        if jitter > 0:
            t0, walk = self._walk.get(jitter, (0, disp))
            if t0 > timepoint:
                t0, walk = 0, disp
            walk = walk.copy()
            for t in range(t0 + 1, timepoint + 1):
                step = np.random.default_rng([self.seed, 104729, t]).normal(0.0, jitter, (self.n_groups, 3))
                step[:, 2] *= 0.3  # cells spread along the coverslip more than they climb
                walk += step
            self._walk[jitter] = (timepoint, walk)
            disp = walk.copy()
        disp += np.asarray(cfg.drift_um_per_timepoint) * timepoint
        pts = self.points_um + disp[self.group]
        pts[:, 2] = np.maximum(pts[:, 2], MIN_HEIGHT_UM)
        return pts


def _field(geom: Geometry, cfg: SimConfig) -> tuple[tuple[float, float], tuple[float, float], float]:
    a_rng = geom.mirror_range_um(cfg.height_range_um)
    y_rng = (0.0, (geom.ny - 1) * geom.dx_um)
    area = (a_rng[1] - a_rng[0]) * (y_rng[1] - y_rng[0])
    return a_rng, y_rng, area


def make_sample(cfg: SimConfig, seed: int, geom: Geometry | None = None, *, mirrored: bool = True) -> Sample:
    """Generate the configured structure for the stack geometry (deterministic in ``seed``).

    ``mirrored=False`` is for fields without a mirror image in view (training pairs): beads then need only
    their real image inside the stack.

    Raises
    ------
    SimulationError
        If the scanned volume cannot hold the sample (e.g. the height range lies outside the field of view).
    """
    geom = geom or Geometry.from_config(cfg)
    rng = np.random.default_rng([seed, 31337])
    a_rng, y_rng, area = _field(geom, cfg)
    h_max_visible = float(abs(geom.height_of_raw_column(0 if geom.virtual_high else geom.nx - 1)))
    if cfg.height_range_um[0] >= h_max_visible:
        raise SimulationError(
            f"height range {cfg.height_range_um} µm starts above the highest imaged height ({h_max_visible:.2f} µm "
            f"at mirror_position {cfg.mirror_position}); lower the heights or move the mirror"
        )
    kind = Structure(cfg.structure)
    if kind is Structure.beads:
        pts, w, g, n = _beads(rng, cfg, geom, area, mirrored)
    else:
        pts, w, g, n = _GENERATORS[kind](rng, cfg, a_rng, y_rng, area)
    return Sample(kind, pts, w, g, n, seed)


def _filaments(rng: np.random.Generator, cfg: SimConfig, a_rng: tuple[float, float], y_rng: tuple[float, float],
               area: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    n = cfg.n_objects or max(3, int(round(area / 6.0)))
    lo, hi = cfg.height_range_um
    ds = 0.04  # µm between points: finer than any grid, so a filament renders as a continuous line
    persistence = 15.0  # µm, stiff like actin bundles in a lamella
    chunks, weights, groups = [], [], []
    for i in range(n):
        length = rng.uniform(6.0, 25.0)
        start = np.array([rng.uniform(*a_rng), rng.uniform(*y_rng), rng.uniform(lo, lo + 0.6 * (hi - lo))])
        path = _chain(rng, start, length, ds, persistence, (lo, hi))
        chunks.append(path)
        weights.append(np.full(len(path), ds * rng.uniform(0.5, 1.0)))
        groups.append(np.full(len(path), i))
    return np.concatenate(chunks), np.concatenate(weights), np.concatenate(groups), n


def _puncta(rng: np.random.Generator, cfg: SimConfig, a_rng: tuple[float, float], y_rng: tuple[float, float],
            area: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    n = cfg.n_objects or max(5, int(round(area / 2.5)))
    lo, hi = cfg.height_range_um
    # Coated pits sit on the membranes: most on the basal one just above the coverslip, the rest higher up.
    basal = rng.random(n) < 0.7
    h = np.where(basal, rng.uniform(lo, min(hi, lo + 0.3), n), rng.uniform(lo, hi, n))
    centres = np.stack([rng.uniform(*a_rng, n), rng.uniform(*y_rng, n), h], 1)
    # Each pit is a hollow shell of 40–90 nm radius (sub-resolution but not a point), 16 emitters on it.
    k = 16
    u = rng.normal(size=(n, k, 3))
    u /= np.linalg.norm(u, axis=2, keepdims=True)
    radius = rng.uniform(0.04, 0.09, (n, 1, 1))
    pts = (centres[:, None, :] + radius * u).reshape(-1, 3)
    bright = rng.lognormal(0.0, 0.35, n)
    w = np.repeat(bright / k, k)
    return pts, w, np.repeat(np.arange(n), k), n


def _chain(rng: np.random.Generator, start: np.ndarray, length: float, ds: float, persistence: float,
           span: tuple[float, float]) -> np.ndarray:
    """A worm-like chain along the coverslip from ``start``, folded back into the height range ``span``."""
    m = max(2, int(length / ds))
    phi = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, np.sqrt(ds / persistence), m))
    elev = np.clip(rng.normal(0, 0.06) + np.cumsum(rng.normal(0, 0.004, m)), -0.25, 0.25)
    step = ds * np.stack([np.cos(phi) * np.cos(elev), np.sin(phi) * np.cos(elev), np.sin(elev)], 1)
    path = start + np.cumsum(step, 0)
    lo, hi = span
    rel = np.mod(path[:, 2] - lo, 2 * (hi - lo))
    path[:, 2] = lo + np.where(rel > hi - lo, 2 * (hi - lo) - rel, rel)
    return path


def _tubules(rng: np.random.Generator, cfg: SimConfig, a_rng: tuple[float, float], y_rng: tuple[float, float],
             area: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    n = cfg.n_objects or max(2, int(round(area / 12.0)))
    lo, hi = cfg.height_range_um
    ds = 0.03
    chunks, weights, groups = [], [], []
    for i in range(n):
        start = np.array([rng.uniform(*a_rng), rng.uniform(*y_rng), rng.uniform(lo, hi)])
        axis = _chain(rng, start, rng.uniform(3.0, 12.0), ds, persistence=4.0, span=(lo, hi))
        # Membrane of a tube: emitters on a cylinder around the axis (isotropic offsets of the radius are
        # close enough below the resolution, and keep the tube round in every view).
        radius = rng.uniform(0.06, 0.18)
        per = 4  # emitters per axis step: enough that the membrane renders smooth, not beaded
        u = rng.normal(size=(len(axis), per, 3))
        u /= np.linalg.norm(u, axis=2, keepdims=True)
        chunks.append((axis[:, None, :] + radius * u).reshape(-1, 3))
        weights.append(np.full(len(axis) * per, ds * rng.uniform(0.6, 1.0) * (radius / 0.06) / per))
        groups.append(np.full(len(axis) * per, i))
    return np.concatenate(chunks), np.concatenate(weights), np.concatenate(groups), n


def _rings(rng: np.random.Generator, cfg: SimConfig, a_rng: tuple[float, float], y_rng: tuple[float, float],
           area: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    n = cfg.n_objects or max(3, int(round(area / 6.0)))
    lo, hi = cfg.height_range_um
    k = 48
    centres = np.stack([rng.uniform(*a_rng, n), rng.uniform(*y_rng, n),
                        rng.uniform(lo, min(hi, lo + 0.5), n)], 1)
    radius = rng.uniform(0.15, 0.5, n)
    t = rng.uniform(0, 2 * np.pi, (n, k))
    # Rings lie on the membrane, parallel to the coverslip.
    pts = np.stack([centres[:, 0:1] + radius[:, None] * np.cos(t), centres[:, 1:2] + radius[:, None] * np.sin(t),
                    np.repeat(centres[:, 2:3], k, 1)], 2).reshape(-1, 3)
    w = np.repeat(rng.uniform(0.5, 1.0, n) * radius / k, k)
    return pts, w, np.repeat(np.arange(n), k), n


def _meshwork(rng: np.random.Generator, cfg: SimConfig, a_rng: tuple[float, float], y_rng: tuple[float, float],
              area: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    n = cfg.n_objects or max(5, int(round(area / 1.5)))
    lo, hi = cfg.height_range_um
    ds = 0.04
    lengths = rng.uniform(0.6, 2.0, n)
    m = np.maximum(2, (lengths / ds).astype(int))
    group = np.repeat(np.arange(n), m)
    s = np.concatenate([np.arange(mi) * ds for mi in m])
    # Cortical mesh: just above the basal membrane, straight, any direction in the plane.
    p0 = np.stack([rng.uniform(*a_rng, n), rng.uniform(*y_rng, n), rng.uniform(lo, min(hi, lo + 0.4), n)], 1)
    ang = rng.uniform(0, np.pi, n)
    d = np.stack([np.cos(ang), np.sin(ang), rng.normal(0, 0.05, n)], 1)
    pts = p0[group] + s[:, None] * d[group]
    w = np.repeat(ds * rng.uniform(0.3, 0.8, n), m)
    return pts, w, group, n


def _beads(rng: np.random.Generator, cfg: SimConfig, geom: Geometry, area: float,
           mirrored: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    n = cfg.n_objects or max(3, int(round(area / 15.0)))
    lo, hi = cfg.height_range_um
    # Keep each bead's image whole inside the raw stack, so that its centroid is unbiased: the sheet's main
    # lobe spans ``mk`` planes either side, and on the raw grid the PSF slides ``shear`` columns per plane.
    mk = min(max(2, int(np.ceil(1.2 * cfg.sheet_fwhm_um / geom.dz_deskewed_um))), (geom.nz - 1) // 3)
    mv = max(4, int(np.ceil(0.8 / geom.dx_um)))
    mu = int(np.ceil(abs(geom.shear) * mk)) + mv
    u_a, u_b = sorted((float(geom.raw_column_of_height(lo)), float(geom.raw_column_of_height(hi))))
    u_lo, u_hi = max(mu, u_a), min(geom.nx - 1 - mu, u_b)
    if geom.nz - 1 - 2 * mk <= 0 or geom.ny - 1 - 2 * mv <= 0 or u_hi <= u_lo:
        raise SimulationError(
            f"stack {geom.nz}×{geom.ny}×{geom.nx} cannot hold whole beads at heights {lo}–{hi} µm: a bead needs "
            f"{mk} planes and {mu} columns of margin; widen the stack or lower the heights"
        )
    min_sep = 1.5  # µm: farther apart than the PSF so each bead can be measured on its own
    chosen: list[np.ndarray] = []
    for _ in range(200 * n):
        if len(chosen) == n:
            break
        raw = np.array([rng.uniform(mk, geom.nz - 1 - mk), rng.uniform(mv, geom.ny - 1 - mv), rng.uniform(u_lo, u_hi)])
        p = geom.raw_to_mirror(raw)
        # The mirror image appears in other planes (the tilted detection plane meets it at another stage
        # position); keep only beads whose virtual image is whole too, so both views can measure them.
        kv, _, uv = geom.mirror_to_raw(geom.reflect(p))
        if mirrored and not (mk <= kv <= geom.nz - 1 - mk and mu <= uv <= geom.nx - 1 - mu):
            continue
        if all(np.linalg.norm(p - q) >= min_sep for q in chosen):
            chosen.append(p)
    if not chosen:
        raise SimulationError(
            f"no bead fits with both its real and mirror image inside the {geom.nz}-plane stack at heights "
            f"{lo}–{hi} µm; use more planes or lower heights"
        )
    pts = np.array(chosen)
    return pts, np.ones(len(pts)), np.arange(len(pts)), len(pts)


def make_box_sample(cfg: SimConfig, seed: int, extent_um: tuple[float, float, float],
                    margin_um: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Sample:
    """The structure filling a box ``(a, y, h)`` of ``extent_um`` with the coverslip parallel to ``(a, y)``.

    For fields without a mirror (training pairs): the box is the deskewed stack itself, so structures lie in
    its planes, as in the slabs a VSI-SR network is trained on. ``margin_um`` keeps beads that far from the
    faces of the box (their blurred image stays whole).
    """
    rng = np.random.default_rng([seed, 31337])
    a_rng, y_rng, h_rng = (0.0, extent_um[2]), (0.0, extent_um[1]), (0.0, extent_um[0])
    area = extent_um[1] * extent_um[2]
    box_cfg = cfg.model_copy(update={"height_range_um": h_rng})
    kind = Structure(cfg.structure)
    if kind is not Structure.beads:
        pts, w, g, n = _GENERATORS[kind](rng, box_cfg, a_rng, y_rng, area)
    else:
        n = cfg.n_objects or max(3, int(round(area / 15.0)))
        lo = np.array([margin_um[2], margin_um[1], margin_um[0]])
        hi = np.array([extent_um[2], extent_um[1], extent_um[0]]) - lo
        if np.any(hi <= lo):
            raise SimulationError(f"box {extent_um} µm is too small for whole beads (margins {margin_um} µm)")
        chosen: list[np.ndarray] = []
        for _ in range(200 * n):
            if len(chosen) == n:
                break
            p = rng.uniform(lo, hi)
            if all(np.linalg.norm(p - q) >= 1.5 for q in chosen):
                chosen.append(p)
        pts = np.array(chosen)
        w, g, n = np.ones(len(pts)), np.arange(len(pts)), len(pts)
    return Sample(kind, pts, w, g, n, seed)


_GENERATORS = {
    Structure.filaments: _filaments,
    Structure.puncta: _puncta,
    Structure.tubules: _tubules,
    Structure.rings: _rings,
    Structure.meshwork: _meshwork,
}
