"""uint16 output scaling: one robust gain per acquisition, outliers never crush the data."""

from __future__ import annotations

import numpy as np
import pytest

from engines.scaling import OutputScaling, ScalingError, VolumeScaler, robust_level, to_uint16, uint16_gain


def _volume(seed: int, brightness: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.gamma(2.0, 0.05, (24, 48, 48)).astype(np.float32)
    v[:, 20:24, :] += 1.0  # a "structure" well above the background
    return v * brightness


def test_hot_voxels_do_not_crush_the_structure() -> None:
    v = _volume(0)
    hot = v.copy()
    hot[3, 4, 5] = 500.0 * float(v.max())  # one outlier, as a diverging deconvolution makes
    out = VolumeScaler()(hot)
    structure = out[:, 20:24, :]
    # by the per-volume maximum the structure would get < 200 counts; here it keeps thousands
    assert np.median(structure) > 5000
    assert out[3, 4, 5] == 65535


def test_gain_is_fixed_per_acquisition_so_timepoints_compare() -> None:
    scaler = VolumeScaler()
    first = scaler(_volume(1))
    second = scaler(_volume(2, brightness=0.5))  # the sample bleached to half
    ratio = np.median(second[:, 20:24, :].astype(float)) / np.median(first[:, 20:24, :].astype(float))
    assert abs(ratio - 0.5) < 0.03
    assert scaler.gain == pytest.approx(uint16_gain(_volume(1)))


def test_level_lands_at_a_quarter_of_the_range() -> None:
    v = _volume(3)
    out, clipped = to_uint16(v, uint16_gain(v))
    assert abs(np.percentile(out[out > 0], 99.99) / 16384 - 1) < 0.02
    assert clipped < v.size * 2e-4


def test_float32_keeps_units_and_bad_inputs_are_clear_errors() -> None:
    v = _volume(4)
    np.testing.assert_array_equal(VolumeScaler(OutputScaling(dtype="float32"))(v), v)
    with pytest.raises(ScalingError, match="no finite positive voxel"):
        robust_level(np.zeros((4, 4, 4), np.float32))
    with pytest.raises(ScalingError, match="gain"):
        to_uint16(v, float("nan"))
    nan = v.copy()
    nan[0, 0, 0] = np.nan
    assert VolumeScaler(OutputScaling(gain=100.0))(nan)[0, 0, 0] == 0
