"""One output geometry per acquisition (engines.grid) and what the stage chain declares about its output."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from engines.config import OpticsConfig
from engines.grid import GridError, GridFitter, OutputGrid, fit_to_grid, nominal_depth
from engines.reconstruct import ReconstructError, stage_chain, views_voxel_um
from engines.views import view_indices


def _ramp(shape: tuple[int, int, int]) -> np.ndarray:
    # every voxel distinct, so a misplaced plane or row shows
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1.0


@pytest.mark.parametrize("depth_in, depth_out", [(9, 12), (12, 9), (10, 10), (1, 5), (7, 1)])
@pytest.mark.parametrize("yx_in, yx_out", [((8, 11), (8, 11)), ((6, 9), (10, 7))])
def test_fit_to_grid_keeps_the_mirror_plane_last_and_centres_y_x(depth_in, depth_out, yx_in, yx_out) -> None:
    vol = _ramp((depth_in, *yx_in))
    out, pads = fit_to_grid(vol, (depth_out, *yx_out))
    assert out.shape == (depth_out, *yx_out) and out.dtype == vol.dtype
    assert pads == (depth_out - depth_in, yx_out[0] - yx_in[0], yx_out[1] - yx_in[1])
    n = min(depth_in, depth_out)
    ny, nx = min(yx_in[0], yx_out[0]), min(yx_in[1], yx_out[1])
    sy, sx = (yx_in[0] - ny) // 2, (yx_in[1] - nx) // 2
    dy, dx = (yx_out[0] - ny) // 2, (yx_out[1] - nx) // 2
    # the planes nearest the mirror (the last ones) are kept, in order, on the grid's last planes
    np.testing.assert_array_equal(out[depth_out - n:, dy:dy + ny, dx:dx + nx],
                                  vol[depth_in - n:, sy:sy + ny, sx:sx + nx])
    # whatever is not data is zero (a viewer shows it empty), and nothing else is
    assert np.count_nonzero(out) == n * ny * nx


def test_fit_to_grid_refuses_what_it_cannot_place() -> None:
    with pytest.raises(GridError, match="3-D|\\(z, y, x\\)"):
        fit_to_grid(np.zeros((4, 4)), (4, 4, 4))
    with pytest.raises(GridError, match="positive"):
        fit_to_grid(np.zeros((4, 4, 4)), (0, 4, 4))
    with pytest.raises(GridError, match="voxel"):
        OutputGrid((0.1, 0.0, 0.1))


@pytest.mark.parametrize("n_rot", [2, 3, 40, 41, 300])
def test_nominal_depth_is_the_centred_mirror_depth(n_rot: int) -> None:
    assert nominal_depth(n_rot, 101) == len(view_indices(n_rot, 0.0, 101)[0])
    assert nominal_depth(n_rot, 5) <= 5


class _Report:
    def __init__(self, n_rot: int, offset: float) -> None:
        self.rotated_shape = (n_rot, 8, 9)
        self.split_offset = offset
        self.split_index = (n_rot - 1 + offset) / 2.0


def test_grid_is_fixed_by_the_optics_not_by_where_the_first_mirror_was() -> None:
    """Two services seeing the same acquisition from different first stacks (a restart) fix the same grid."""
    n_rot = 40
    shapes = {}
    for first in (-7.0, 0.0, 5.5):
        f = GridFitter(OutputGrid((0.06, 0.06, 0.06)))
        for off in (first, 3.0, -2.5, 9.0):
            a, _ = view_indices(n_rot, off, 101)
            out = f.place(_ramp((len(a), 8, 9)), _Report(n_rot, off))
            assert out.shape == f.shape
        shapes[first] = f.shape
        rows = [f.pop() for _ in range(4)]
        assert f.pop() is None
        assert [r.split_offset for r in rows] == [first, 3.0, -2.5, 9.0]
        assert len({r.native_shape[0] for r in rows}) > 1  # the drift really changed the depth
        assert all(r.native_shape[0] + r.pad_z == f.shape[0] for r in rows)
        assert {r.mirror_gap for r in rows} <= {0.5, 1.0}
    assert len(set(shapes.values())) == 1
    fixed = GridFitter(OutputGrid((0.06, 0.06, 0.06), depth=7))
    assert fixed.place(_ramp((12, 8, 9)), _Report(n_rot, 0.0)).shape == (7, 8, 9)


def test_stage_chain_declares_the_fused_voxel_and_provenance() -> None:
    optics = OpticsConfig(pixel_size_um=0.1032)
    chain = stage_chain("classical", optics, device="cpu")
    v = views_voxel_um(optics, "classical")
    assert chain.grid.voxel_size_um == pytest.approx((v, v, v))
    assert v == pytest.approx(0.1032)  # isotropic, the lateral pixel: never the deskewed z step
    assert chain.provenance["mode"] == "classical" and chain.provenance["software"]["version"]
    assert chain.provenance["optics"]["pixel_size_um"] == pytest.approx(0.1032)
    assert [name for name, _ in chain] == ["preprocess", "split_views", "fuse"]


def test_sr_rl_chain_declares_the_super_resolved_voxel_and_the_weights_sha256() -> None:
    from engines.weights import demo_weights_path

    optics = OpticsConfig()
    try:
        chain = stage_chain("sr-rl", optics, device="cpu")
    except ReconstructError as err:
        pytest.skip(f"no demo weights installed: {err}")
    assert chain.grid.voxel_size_um[0] == pytest.approx(optics.pixel_size_um / 1.5)
    assert chain.grid.voxel_size_um[0] * 1000 == pytest.approx(61.7, abs=0.05)
    (entry,) = chain.provenance["models"].values()
    want = hashlib.sha256(open(demo_weights_path("vsi-sr"), "rb").read()).hexdigest()
    assert entry["sha256"] == want
    assert chain.provenance["backend"]["runs"]["vsi-sr"]


def test_stage_chain_takes_the_sources_reconstruct_takes(tmp_path) -> None:
    import tifffile

    from engines.rldfn.psf import computed_psf
    from engines.sources import ReconSources

    psf = computed_psf((15, 15, 15), (0.1, 0.1, 0.1), 525.0, 1.1, 1.33).astype(np.float32)
    tifffile.imwrite(tmp_path / "a.tif", psf)
    tifffile.imwrite(tmp_path / "b.tif", psf[::-1])
    chain = stage_chain("classical", OpticsConfig(), device="cpu",
                        sources=ReconSources(psf_a=tmp_path / "a.tif", psf_b=tmp_path / "b.tif"))
    models = chain.provenance["models"]
    assert set(models) == {"psf_a", "psf_b"}
    assert models["psf_a"]["sha256"] == hashlib.sha256((tmp_path / "a.tif").read_bytes()).hexdigest()
    with pytest.raises(ReconstructError, match="--psf-b"):
        stage_chain("classical", OpticsConfig(), device="cpu", sources=ReconSources(psf_a=tmp_path / "a.tif"))
    with pytest.raises(ReconstructError, match="no such file"):
        stage_chain("sr-rl", OpticsConfig(), device="cpu", sources=ReconSources(checkpoint=tmp_path / "none.pth"))
