"""Photometric calibration: zero-point (and optional colour term) from reference stars.

Conventions
-----------
Instrumental magnitude of a source measured on a flat-fielded calexp::

    m_inst = -2.5 log10(psf_flux_apcorr / exptime)          (flux in e-, exptime in s)

The zero-point ``ZP`` is the magnitude that gives 1 e-/s on the calexp, so
``mag = m_inst + ZP``.  With a colour term ``c`` (optional) the fit is
``m_ref = m_inst + ZP + c (m_ref,1 - m_ref,2)`` and the catalog magnitude stays
in the instrument's natural system (``mag = m_inst + ZP``; ``COLTERM`` is
recorded so that users can transform).  In the simulator, a calexp
flat-fielded with the truth flat has ``ZP = zp_calexp`` of
``truth/exposures.parquet``.

Fluxes in nJy: ``flux_njy = 10**(-0.4 (mag - 31.4))`` (AB: 0 mag = 3631 Jy),
``flux_njy_err = flux_njy ln(10)/2.5 * mag_err``.

The fit (:func:`fit_zero_point`) is an iterative weighted mean (or weighted
linear fit with the colour term) of ``m_ref - m_inst`` with weights
``1 / (sigma_inst^2 + sigma_ref^2 + floor^2)`` and ``nsigma`` clipping about the
current solution with a robust (MAD) scale.  ``ZPERR`` is the larger of the
formal error and ``scatter / sqrt(N)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd

from .errors import ConfigError, TooFewMatches

AB_NJY_ZP = 31.4  #: mag of 1 nJy (AB)
_K = 2.5 / math.log(10.0)


@dataclass(frozen=True)
class PhotometryConfig:
    """Options of :func:`fit_zero_point`.

    ``colour``: the two refcat bands of the colour, e.g. ``["g", "r"]``
    (empty: no colour term); ``fit_colour_term``: fit ``c`` (else use
    ``colour_term``, default 0); stars with reference magnitudes brighter than
    ``mag_min`` or fainter than ``mag_max`` and instrumental S/N below
    ``snr_min`` are not used.
    """

    nsigma: float = 3.0
    max_iter: int = 10
    min_stars: int = 5
    snr_min: float = 10.0
    mag_min: float = 12.0
    mag_max: float = 30.0
    error_floor: float = 0.005
    colour: tuple[str, ...] = ()
    fit_colour_term: bool = False
    colour_term: float = 0.0

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any] | None) -> "PhotometryConfig":
        doc = dict(doc or {})
        if "colour" in doc:
            doc["colour"] = tuple(doc["colour"] or ())
        try:
            return cls(**doc).validate()
        except TypeError as exc:
            raise ConfigError(f"calibrate.photometry: {exc}") from exc

    def validate(self) -> "PhotometryConfig":
        if self.nsigma <= 0 or self.max_iter < 1 or self.min_stars < 2 or self.error_floor < 0:
            raise ConfigError("calibrate.photometry: nsigma > 0, max_iter >= 1, min_stars >= 2, error_floor >= 0")
        if len(self.colour) not in (0, 2):
            raise ConfigError("calibrate.photometry.colour must name two refcat bands, e.g. [g, r]")
        return self


@dataclass(frozen=True)
class ZeroPoint:
    """Result of :func:`fit_zero_point`."""

    zp: float
    zp_err: float
    colour_term: float
    n_used: int
    n_input: int
    scatter: float
    used: np.ndarray


def instrumental_mag(flux, flux_err, exptime: float) -> tuple[np.ndarray, np.ndarray]:
    """``-2.5 log10(flux / exptime)`` and its error ``1.0857 flux_err / flux`` (NaN for flux <= 0)."""
    flux = np.asarray(flux, float)
    flux_err = np.asarray(flux_err, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        good = flux > 0
        m = np.where(good, -2.5 * np.log10(np.where(good, flux, 1.0) / exptime), np.nan)
        e = np.where(good, _K * flux_err / np.where(good, flux, 1.0), np.nan)
    return m, e


def fit_zero_point(inst_mag, inst_err, ref_mag, ref_err=None, colour=None, *,
                   config: PhotometryConfig = PhotometryConfig(), what: str = "detector") -> ZeroPoint:
    """Clipped weighted zero-point (and colour term) from matched stars.

    Parameters
    ----------
    inst_mag, inst_err : array
        Instrumental magnitudes and errors.
    ref_mag, ref_err : array
        Reference magnitudes (the instrument band's ``refcat_band``) and errors.
    colour : array, optional
        Reference colour per star (needed when ``config.fit_colour_term`` or a
        fixed ``colour_term`` is used).

    Notes
    -----
    Model ``ref - inst = ZP + c colour``; weights ``1/(e_i^2 + e_r^2 + floor^2)``;
    stars beyond ``nsigma * 1.4826 MAD`` of the normalised residuals are rejected
    and the fit repeated until the kept set stops changing.

    Raises
    ------
    TooFewMatches
        Fewer than ``config.min_stars`` usable stars.
    """
    cfg = config.validate()
    inst_mag, inst_err, ref_mag = (np.asarray(v, float) for v in (inst_mag, inst_err, ref_mag))
    ref_err = np.zeros_like(ref_mag) if ref_err is None else np.nan_to_num(np.asarray(ref_err, float))
    use_colour = colour is not None and (cfg.fit_colour_term or cfg.colour_term != 0.0)
    col = np.zeros_like(ref_mag) if colour is None else np.asarray(colour, float)
    ok = np.isfinite(inst_mag) & np.isfinite(inst_err) & np.isfinite(ref_mag)
    ok &= (ref_mag >= cfg.mag_min) & (ref_mag <= cfg.mag_max)
    ok &= inst_err <= _K / cfg.snr_min
    if use_colour:
        ok &= np.isfinite(col)
    n_input = int(ok.sum())
    if n_input < cfg.min_stars:
        raise TooFewMatches(f"{what}: {n_input} reference stars usable for the zero-point "
                            f"(need {cfg.min_stars})")
    sig = np.sqrt(inst_err ** 2 + ref_err ** 2 + cfg.error_floor ** 2)
    delta = ref_mag - inst_mag
    fit_c = use_colour and cfg.fit_colour_term
    keep = ok.copy()
    zp, cterm, cov = 0.0, (cfg.colour_term if use_colour else 0.0), np.zeros((2, 2))
    for _ in range(cfg.max_iter):
        w = 1.0 / sig[keep] ** 2
        if fit_c:
            m = np.column_stack([np.ones(keep.sum()), col[keep]])
            a = (m * w[:, None]).T @ m
            cov = np.linalg.inv(a)
            zp, cterm = cov @ ((m * w[:, None]).T @ delta[keep])
        else:
            y = delta[keep] - cterm * col[keep]
            zp = float(np.sum(w * y) / np.sum(w))
            cov = np.array([[1.0 / np.sum(w), 0.0], [0.0, 0.0]])
        resid = (delta - zp - cterm * col) / sig
        mad = 1.4826 * np.median(np.abs(resid[keep] - np.median(resid[keep])))
        new = ok & (np.abs(resid) <= cfg.nsigma * max(mad, 1e-3))
        if new.sum() < cfg.min_stars:
            break
        if np.array_equal(new, keep):
            break
        keep = new
    n = int(keep.sum())
    scatter = float(np.std(delta[keep] - zp - cterm * col[keep], ddof=1)) if n > 1 else float("nan")
    zp_err = float(max(math.sqrt(cov[0, 0]), scatter / math.sqrt(n) if n > 1 else 0.0))
    return ZeroPoint(float(zp), zp_err, float(cterm), n, n_input, scatter, keep)


def calibrated_magnitudes(flux, flux_err, exptime: float, zp: ZeroPoint | float, zp_err: float = 0.0) -> pd.DataFrame:
    """``mag``, ``mag_err`` (instrumental error and ZP error in quadrature), ``flux_njy``, ``flux_njy_err``."""
    if isinstance(zp, ZeroPoint):
        zp, zp_err = zp.zp, zp.zp_err
    m, e = instrumental_mag(flux, flux_err, exptime)
    mag = m + zp
    mag_err = np.sqrt(e ** 2 + zp_err ** 2)
    # fluxes stay defined (and signed) for faint or negative measurements
    scale = 10.0 ** (-0.4 * (zp - AB_NJY_ZP)) / exptime
    flux_njy = np.asarray(flux, float) * scale
    flux_njy_err = np.sqrt((np.asarray(flux_err, float) * scale) ** 2 + (flux_njy * zp_err / _K) ** 2)
    return pd.DataFrame({"mag": mag, "mag_err": mag_err, "flux_njy": flux_njy, "flux_njy_err": flux_njy_err})


def njy_from_mag(mag) -> np.ndarray:
    """``10**(-0.4 (mag - 31.4))``."""
    return 10.0 ** (-0.4 * (np.asarray(mag, float) - AB_NJY_ZP))
