"""Calibration science functions against analytic answers.

Truth tests against the survey simulator are in tests/test_calib_truth.py.
"""

import numpy as np
import pytest

from surveyred import masks
from surveyred.calib import (
    CombineConfig, DefectConfig, OverscanConfig, assemble_detector, combine_stack, find_defects,
    overscan_columns, overscan_variance, overscan_vector, ptc_gain,
)
from surveyred.errors import ConfigError, InsufficientData
from surveyred.instrument import load_instrument


@pytest.fixture(scope="module")
def det():
    return load_instrument("simcam").detector(0)


def _raw_frame(det, rng, *, level, rows_pattern, signal=None, noise_adu=3.0):
    """A raw simcam detector: per-amp bias level + per-row pattern in data AND overscan."""
    raw = np.zeros(det.raw_shape, dtype=np.float64)
    for k, amp in enumerate(det.amps):
        ys = amp.datasec.slices[0]
        for sec in (amp.datasec, amp.biassec, amp.pbiassec):
            sl = sec.slices
            rr = np.arange(sl[0].start, sl[0].stop)
            pattern = rows_pattern[np.clip(rr, 0, len(rows_pattern) - 1)]
            raw[sl] = level[k] + pattern[:, None]
        if signal is not None:
            raw[amp.datasec.slices] += signal[k]
    raw += rng.normal(0, noise_adu, raw.shape)
    return raw


def test_overscan_columns_counted_from_data_edge(det):
    a, b = det.amps  # A: overscan right of data [257:280]; B: left of data [281:304]
    assert overscan_columns(a, (5, 20)) == slice(256 + 5, 256 + 20)
    assert overscan_columns(b, (5, 20)) == slice(304 - 20, 304 - 5)
    assert overscan_columns(a, (2, None)) == slice(258, 280)
    with pytest.raises(ConfigError, match="leave nothing"):
        overscan_columns(a, (30, None))


@pytest.mark.parametrize("mode", ["mean", "median", "median_per_row", "poly", "spline"])
def test_overscan_modes_recover_the_level(det, mode):
    rng = np.random.default_rng(1)
    y = np.arange(det.raw_shape[0])
    pattern = 4.0 * ((y / 527.0) ** 2) - 3.0 * (y / 527.0) if mode in ("poly", "spline", "median_per_row") \
        else np.zeros(y.size)
    raw = _raw_frame(det, rng, level=(1000.0, 1100.0), rows_pattern=pattern, noise_adu=2.0)
    cfg = OverscanConfig(mode=mode, order=2, knots=4, columns=(0, None))
    for k, amp in enumerate(det.amps):
        vec = overscan_vector(raw, amp, cfg)
        truth = (1000.0, 1100.0)[k] + pattern[:512]
        # per-row medians of 24 columns carry noise ~ 1.25*2/sqrt(24) ~ 0.5 ADU; fits average it down
        tol = {"median_per_row": 2.5, "mean": 0.05, "median": 0.1, "poly": 0.3, "spline": 0.4}[mode]
        assert np.max(np.abs(vec - truth)) < tol, mode


def test_poly_overscan_rejects_a_glitched_row(det):
    rng = np.random.default_rng(2)
    raw = _raw_frame(det, rng, level=(1000.0, 1000.0), rows_pattern=np.zeros(528), noise_adu=1.0)
    amp = det.amps[0]
    raw[100, overscan_columns(amp, (0, None))] += 500.0  # a hot row in the overscan only
    vec = overscan_vector(raw, amp, OverscanConfig(mode="poly", order=1, columns=(0, None)))
    assert abs(vec[100] - 1000.0) < 0.5


def test_assemble_flips_and_converts_to_electrons(det):
    rng = np.random.default_rng(3)
    # a ramp along x in each amp's *raw* data region
    ramp = [np.tile(np.arange(256.0), (512, 1)) * 10 for _ in det.amps]
    raw = _raw_frame(det, rng, level=(1000.0, 1200.0), rows_pattern=np.zeros(528), signal=ramp, noise_adu=0.0)
    image, var, mask = assemble_detector(raw, det, overscan=OverscanConfig(columns=(0, None)), linearity=False)
    a, b = det.amps
    np.testing.assert_allclose(image[:, :256], ramp[0] * a.gain, rtol=1e-6)
    # amp B's raw data [305:560] maps to detsec [257:512] with the same orientation here
    np.testing.assert_allclose(image[:, 256:], ramp[1] * b.gain, rtol=1e-6)
    cfg = OverscanConfig(columns=(0, None))
    over = np.concatenate([np.full((512, 256), overscan_variance(a, cfg)) for a in det.amps], axis=1)
    # Poisson + read noise + the per-row overscan estimate ((pi/2) rn^2 / 24 columns)
    np.testing.assert_allclose(var, np.maximum(image, 0) + det.read_noise_map() ** 2 + over, rtol=1e-6)
    assert overscan_variance(a, cfg) == pytest.approx(np.pi / 2 * a.read_noise ** 2 / 24)
    assert not mask.any()


def test_combine_rejects_outliers():
    rng = np.random.default_rng(4)
    stack = rng.normal(100.0, 5.0, (9, 40, 30)).astype(np.float32)
    stack[3, 10, 10] = 10000.0  # cosmic ray in one frame
    stack[5, 20, :] = np.nan  # a missing row
    mean, count, std = combine_stack(stack, CombineConfig(), read_noise=5.0, chunk_rows=7)
    others = np.delete(stack[:, 10, 10], 3)
    assert mean[10, 10] == pytest.approx(others.mean(), rel=1e-5)
    assert count[10, 10] == 8 and count[20, 0] == 8
    assert abs(np.nanmean(mean) - 100.0) < 0.1
    with pytest.raises(InsufficientData, match="2 frames"):
        combine_stack(stack[:2], CombineConfig(min_frames=3))


def test_noise_clip_rejects_a_cosmic_ray_among_five_frames():
    """One cosmic ray among 5 bias frames: the scatter clip keeps it, the noise-model clip does not."""
    rng = np.random.default_rng(7)
    stack = rng.normal(0.0, 6.0, (5, 30, 30)).astype(np.float32)
    stack[1, 5, 5] += 10000.0
    by_scatter, n_scatter, _ = combine_stack(stack, CombineConfig(clip="scatter", min_frames=1))
    by_noise, n_noise, _ = combine_stack(stack, CombineConfig(clip="noise", min_frames=1), read_noise=6.0)
    assert n_scatter[5, 5] == 5 and by_scatter[5, 5] > 1000  # 10000 is only 2 sample-sigmas from the median
    assert n_noise[5, 5] == 4
    assert by_noise[5, 5] == pytest.approx(np.delete(stack[:, 5, 5], 1).mean(), rel=1e-5)
    # on clean pixels both keep everything: 3 sigma of the true noise rejects ~0.3% of values
    assert (n_noise == 5).mean() > 0.98


def test_find_defects_flags_columns_and_hot_pixels():
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:256, 0:256]
    flat = (1.0 - 0.2 * ((xx - 128) ** 2 + (yy - 128) ** 2) / 128 ** 2) * rng.normal(1, 0.01, (256, 256))
    flat[:, 40] *= 0.05  # dead column
    flat[100, 200] *= 0.5  # a weak pixel
    bias = rng.normal(0, 3.0, (256, 256))
    bias[:, 90] += 500.0  # hot column
    bias[10, 10] += 300.0
    d = find_defects(master_bias=bias, master_flat=flat, cfg=DefectConfig())
    bad = d != 0
    assert bad[:, 40].all() and bad[:, 90].all() and bad[100, 200] and bad[10, 10]
    assert set(np.unique(d)) <= {0, masks.BAD}
    # vignetting (20% across the detector) is not a defect: false-positive rate < 0.1%
    others = np.ones_like(bad)
    others[:, [40, 90]] = False
    others[100, 200] = others[10, 10] = False
    assert bad[others].mean() < 1e-3


def test_ptc_gain_analytic(det):
    rng = np.random.default_rng(6)
    amp = det.amps[0]
    gain, rn = amp.gain, amp.read_noise
    response = rng.normal(1.0, 0.01, (512, 256))  # fixed pattern, cancels in the difference

    def frame(electrons):
        raw = np.full(det.raw_shape, 1000.0)
        raw[amp.datasec.slices] += rng.poisson(electrons) / gain
        return raw + rng.normal(0, rn / gain, det.raw_shape)

    f1, f2 = frame(30000 * response), frame(30000 * response)
    b1, b2 = frame(np.zeros((512, 256))), frame(np.zeros((512, 256)))
    g, r = ptc_gain(f1, f2, b1, b2, amp, overscan=OverscanConfig(columns=(0, None)))
    assert g == pytest.approx(gain, rel=0.02)
    assert r == pytest.approx(rn, rel=0.05)
