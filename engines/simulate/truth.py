"""The simulator's truth in the frames the reconstruction works in: where the mirror plane lands after step 3."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from engines.simulate.geometry import Geometry


def mirror_plane_rotated(g: Geometry, crop_start: int, volume_shape: tuple[int, ...], report: Any) -> dict[str, float]:
    """The true mirror plane in the rotated volume of a step-3 ``report`` (:class:`engines.views.ViewsReport`).

    ``volume_shape`` and ``crop_start`` describe the step-1 volume the split ran on (no lateral SR). Points of the
    mirror plane (height 0 in the simulator's mirror frame) across the field are carried onto the cropped grid
    and through the rotation step 3 chose; a plane ``z = z0 + by·(y − yc) + bx·(x − xc)`` is fitted to them.
    Returns ``z0`` (slices of the rotated volume, comparable with ``report.split_index``) and the plane's
    remaining tilts about x and y in degrees (0 when step 3 found the true rotation).
    """
    from engines.rotate3d import rot_x, rot_y

    a = np.linspace(-0.4, 0.4, 9) * g.nz * g.dz_deskewed_um / max(math.sin(math.radians(g.angle_deg)), 1e-6)
    y = np.linspace(0.1, 0.9, 9) * g.ny * g.dx_um
    pts = np.stack(np.meshgrid(a, y, [0.0], indexing="ij"), -1).reshape(-1, 3)
    idx = g.mirror_to_deskewed(pts)
    idx[:, 2] -= crop_start
    idx = idx[((idx >= 0) & (idx <= np.array(volume_shape) - 1)).all(1)]
    if len(idx) < 3:
        raise ValueError("the mirror plane does not cross the volume")
    r = report
    rot = rot_y(r.angle_y_correction_deg) @ rot_x(r.angle_x_deg) @ rot_y(r.angle_y_deg - r.angle_y_correction_deg)
    spacing = np.array([g.dz_deskewed_um, g.dx_um, g.dx_um])
    c_in, c_out = (np.array(volume_shape) - 1) / 2, (np.array(r.rotated_shape) - 1) / 2
    p = (rot @ ((idx - c_in) * spacing).T).T / r.voxel_um + c_out
    design = np.stack([np.ones(len(p)), p[:, 1] - c_out[1], p[:, 2] - c_out[2]], 1)
    (z0, by, bx), *_ = np.linalg.lstsq(design, p[:, 0], rcond=None)
    return {"z0": float(z0), "tilt_x_deg": math.degrees(math.atan(by)), "tilt_y_deg": math.degrees(math.atan(bx))}
