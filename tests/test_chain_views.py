"""Training views for RL-DFN made the way the chain makes its views (``python -m engines.weights.chain_views``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from engines.weights.chain_views import main


def test_chain_views_writes_registered_view_pairs_and_their_psfs(tmp_path: Path) -> None:
    from engines.weights import DemoWeightsError, demo_weights_path

    try:
        demo_weights_path("vsi-sr")
    except DemoWeightsError:
        pytest.skip("the demo weights are not installed")
    assert main([str(tmp_path), "--structures", "filaments", "--seeds", "7", "--shape", "48,64,64"]) == 0
    a = tifffile.imread(tmp_path / "ViewA" / "filaments_0007.tif")
    b = tifffile.imread(tmp_path / "ViewB" / "filaments_0007.tif")
    pa, pb = tifffile.imread(tmp_path / "psf_a.tif"), tifffile.imread(tmp_path / "psf_b.tif")
    assert a.shape == b.shape and a.ndim == 3 and a.dtype == np.float32
    assert a.max() > 0 and b.max() > 0 and (a == 0).any()  # data, and the regions a view does not reach
    assert pa.ndim == 3 and abs(float(pa.sum()) - 1) < 1e-3 and not np.allclose(pa, pb)  # two tilted PSFs
    from streamer.cli.geometry_io import read_voxel

    dz, dy, dx = read_voxel(tmp_path / "ViewA" / "filaments_0007.tif")  # the views' isotropic voxel, recorded
    assert dz == pytest.approx(dy, rel=1e-3) and dy == pytest.approx(dx, rel=1e-3) and 0.02 < dx < 0.2
    with pytest.raises(SystemExit):  # never writes over views already there
        main([str(tmp_path), "--structures", "filaments", "--seeds", "7", "--shape", "48,64,64"])
