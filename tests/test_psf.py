"""PsfModel: analytic facts, recovery of a known spatially varying PSF, I/O round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest

from surveyred.errors import TooFewStars
from surveyred.psf import PsfModel, fwhm_factor, poly_terms, profile_pixels
from surveyred.simulate import FWHM_PER_SIGMA, WING_FRAC, WING_RATIO, render_stars


def test_fwhm_factor_matches_gaussian_and_simulator():
    assert fwhm_factor(0.0, 2.0) == pytest.approx(2 * math.sqrt(2 * math.log(2)), rel=1e-9)
    assert fwhm_factor(WING_FRAC, WING_RATIO) == pytest.approx(FWHM_PER_SIGMA, rel=1e-9)


def test_profile_is_normalised_and_matches_exact_pixel_integration():
    """Sum over a large stamp is 1; pixel values agree with the simulator's exact erf integration
    to 1% of the peak for a core sigma of 1.2 px (second-order pixel-box approximation)."""
    s = 1.2
    off = np.arange(-20, 21, dtype=float)
    p = profile_pixels(off[None, :] - 0.3, off[:, None] + 0.2, s * s, s * s, 0.0, WING_FRAC, WING_RATIO)
    assert p.sum() == pytest.approx(1.0, abs=1e-6)
    exact = render_stars((41, 41), [20.3], [19.8], [1.0], s, s)
    assert np.max(np.abs(p - exact)) < 0.01 * exact.max()


def _star_field(nx=500, ny=500, n=150, seed=11):
    """Stars with a FWHM growing linearly from 2.8 px (left) to 3.4 px (right) and ellipticity 0.05."""
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(15, nx - 15, n), rng.uniform(15, ny - 15, n)
    flux = rng.uniform(3e4, 3e5, n)
    fwhm = 2.8 + 0.6 * x / nx
    s = fwhm / FWHM_PER_SIGMA
    e = 0.05
    expected = render_stars((ny, nx), x, y, flux, s * (1 + e), s * (1 - e)) + 300.0
    image = rng.poisson(expected).astype(np.float64) - 300.0
    return image, expected, x, y, fwhm, e


def test_fit_recovers_spatially_varying_fwhm_and_ellipticity():
    image, expected, x, y, fwhm, e = _star_field()
    # keep isolated stars only (as characterize does)
    d = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :]) + np.eye(len(x)) * 1e9
    iso = d.min(axis=1) > 15
    model = PsfModel.fit(image, expected, np.ones(image.shape, bool), x[iso], y[iso], fwhm_guess=3.0, order=2)
    assert model.nstars >= 0.8 * iso.sum()
    err = model.fwhm(x, y) / fwhm - 1
    print(f"FWHM error: median {np.median(err) * 100:+.2f}%, max |{np.max(np.abs(err)) * 100:.2f}|%")
    assert np.max(np.abs(err)) < 0.02
    # ellipticity 1 - b/a of sigma_x = s (1 + e), sigma_y = s (1 - e): 1 - (1 - e) / (1 + e)
    assert np.median(model.ellipticity(x, y)) == pytest.approx(1 - (1 - e) / (1 + e), abs=0.01)
    assert model.wing_frac == pytest.approx(WING_FRAC, abs=0.04)


def test_evaluate_and_round_trip(tmp_path):
    terms = tuple(poly_terms(1))
    coeffs = np.array([[1.6, 0.1, 0.0], [1.5, 0.0, 0.05], [0.1, 0.0, 0.0]])
    model = PsfModel(terms, coeffs, 0.1, 2.0, (200, 300), nstars=12)
    stamp = model.evaluate(150, 100, 25)
    assert stamp.shape == (25, 25) and stamp.sum() == pytest.approx(1.0)
    assert np.unravel_index(np.argmax(stamp), stamp.shape) == (12, 12)
    shifted = model.evaluate(150, 100, 25, dx=0.5, dy=0.0, normalize=False)
    ys, xs = np.mgrid[-12:13, -12:13]
    assert (shifted * xs).sum() / shifted.sum() == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError):
        model.evaluate(0, 0, 24)
    path = tmp_path / "psf.fits"
    model.write(path)
    back = PsfModel.read(path)
    assert back.terms == model.terms and back.shape == model.shape and back.nstars == 12
    np.testing.assert_allclose(back.coeffs, model.coeffs)
    assert back.fwhm(10, 20) == pytest.approx(model.fwhm(10, 20))
    assert back.ellipticity(10, 20) == pytest.approx(model.ellipticity(10, 20))


def test_too_few_stars_is_named():
    rng = np.random.default_rng(1)
    image = rng.normal(0, 10, (100, 100))
    with pytest.raises(TooFewStars, match="PSF candidates"):
        PsfModel.fit(image, np.full(image.shape, 100.0), np.ones(image.shape, bool), [50.0], [50.0],
                     fwhm_guess=3.0, min_stars=5)
