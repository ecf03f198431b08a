"""Science metrics of a survey after calibration: ``surveyred metrics``.

Usage::

    surveyred metrics --calsrc results/calsrc/*/* [--visit-summary results/visit_summary/*/*.parquet]
        --output results/qa/metrics.parquet [--thresholds-table metrics.html|.md|.csv]
        [--truth data/demo/truth] [--bands g r] [--config-json '{...}'] [--log FILE]

``--calsrc`` takes catalogs or directories of them; zero points come from the
visit summaries (else the calsrc metadata).  ``--truth`` (simulated data only)
adds the column ``expected_sim`` (see *Expected values*).

The definitions follow the LSST Science Requirements Document (LPM-17, Ivezic
et al., "LSST Science Requirements Document", v5.2.3, tables 14 and 18) as they
are implemented by the LSST verification package ``validate_drp`` (its
``calcsrd`` modules).  What is computed here, per band, in our own words:

Matching
    Every usable calibrated source of the band (finite ``ra``, ``dec``,
    ``mag``; none of the ``flag_*`` columns set, see
    :data:`DEFAULT_REJECT_FLAGS`) is linked to every other source within
    ``match_radius_arcsec`` (1 arcsec); the connected groups are the
    *objects*.  A group holding two sources of the same visit is ambiguous
    (a blend or two stars within the radius) and is dropped.  A group is a
    *bright unresolved star* when its median ``snr`` is at least
    ``bright_snr_min`` (50, validate_drp's ``brightSnrMin``), its median
    ``fwhm`` / PSF FWHM of the detector is at most ``max_size_ratio`` (1.3)
    and, with ``reference_stars_only`` (default) and a ``ref_id`` column, it
    was matched to the astrometric reference catalog in at least one visit:
    a reference star is a known point source, and transients, asteroids and
    most galaxies are not in it (the SRD metrics are defined on non-variable
    stars; one supernova among 40 stars doubles PA1).  Saturated sources
    carry ``flag_saturated`` and never enter.

PA1, photometric repeatability (mmag)
    For every bright star seen in ``n >= 2`` visits, draw one random pair of
    its visits (``a != b``) and form ``d = (m_a - m_b) / sqrt(2)`` in mmag.  The
    division by sqrt(2) makes ``d`` an estimate of one measurement's deviation,
    so PA1 estimates the per-visit scatter ``sigma``, not the scatter of a
    difference: ``PA1 = sqrt(mean(d**2))`` over stars.  The draw is repeated
    ``n_shuffles`` (50) times with a seeded generator and the median taken (so
    the value is reproducible).  ``PA1_iqr`` is the same with the interquartile
    width ``IQR(d) / 1.349`` (robust to outliers).  SRD thresholds
    (design/minimum/stretch): 5/8/3 mmag in g, r, i and 7.5/12/4.5 mmag in u,
    z, y.

PF1, photometric outlier fraction (%)
    The percentage of those ``|d|`` that exceed PA2 (design 15 mmag in g, r, i,
    22.5 mmag in u, z, y), medianed over the shuffles like PA1.  For Gaussian
    noise of width ``sigma``, ``PF1 = 200 (1 - Phi(PA2 / sigma))``.  SRD
    thresholds 10/20/5 %; PA2 itself is 15/15/10 mmag (22.5/22.5/15 in u, z, y).
    Its expectation averages ``200 (1 - Phi(PA2 / sigma_pair))`` over the pairs,
    ``sigma_pair**2 = (s_a**2 + s_b**2) / 2``.

AMx, astrometric repeatability (mas), x = 1, 2, 3
    Take every pair of bright stars whose mean separation lies within
    ``D +- annulus`` (D = 5, 20, 200 arcmin; ``annulus_arcmin`` = 1, i.e. the
    2-arcmin wide annulus of validate_drp).  For each pair and each visit in
    which both stars were measured, compute their angular distance; the pair's
    *distance rms* is the (population) standard deviation of those distances
    over its visits (at least ``min_common_visits``, 2).  AMx is the median of
    the distance rms over pairs.  For per-coordinate position noise ``sigma``
    per star and visit, the distance of a pair varies with ``sigma sqrt(2)``
    and, over ``N`` visits, the median rms is
    ``sigma sqrt(2) sqrt(median(chi2_{N-1}) / N)`` (:func:`expected_amx`).
    SRD thresholds: AM1 and AM2 10/20/5 mas, AM3 15/30/10 mas.  Where the
    footprint holds no pair at that separation the value is NaN with the
    reason (e.g. the 7 arcmin SimCam mosaic cannot give AM2).

AFx, ADx (%, mas)
    AFx is the percentage of pairs whose distance rms exceeds ``AMx + ADx``
    with AMx the measured value and ADx the *design* ADx (20, 20, 30 mas);
    ADx (measured) is the ``100 - AFx_design`` percentile of the distance rms
    minus the measured AMx.  SRD thresholds: AF1..3 10/20/5 %, AD1 and AD2
    20/40/10 mas, AD3 30/50/20 mas.

Zero-point scatter (mmag; no SRD threshold)
    From the visit summaries (or the calsrc metadata): ``zp_visit_scatter`` is
    the standard deviation over visits of each visit's median zero point (this
    includes real changes of airmass and transparency); ``zp_detector_scatter``
    is the median over visits of the standard deviation of the detectors' zero
    points within a visit.

Expected values
    Next to PA1 and AMx the table gives ``expected``: the value the same
    definition yields if the only scatter were the pipeline's reported
    per-measurement errors (``mag_err`` plus the visit's ``zero_point_err``;
    the centroid errors ``x_err``, ``y_err`` through the local pixel scale),
    i.e. ``PA1 = sqrt(mean((s_a**2 + s_b**2) / 2))`` over the same random pairs,
    and AMx by a seeded Monte Carlo of Gaussian position noise on the same
    pairs and visits.  On simulated data, :func:`expected_from_simulation`
    (``--truth``) replaces those errors by the ones the simulation implies
    (:func:`psf_flux_error`: photon and read noise of a PSF-fit flux for the
    simulator's double-Gaussian PSF; :func:`centroid_error`: of an optimal
    centroid), so ``expected_sim`` is PA1/PF1/AMx expected from the simulated
    noise alone.

Outputs: ``metrics.parquet`` (one row per band and metric: ``band``,
``metric``, ``value``, ``unit``, ``n``, ``expected``, ``design``, ``minimum``,
``stretch``, ``grade`` (``stretch``, ``design``, ``minimum``, ``fail`` or
``n/a``), ``reason``; schema metadata with provenance and the configuration)
and optionally a Markdown table of the same (``--thresholds-table``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import stats
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from . import __version__
from .errors import ConfigError, CorruptInput, InsufficientData, MissingInput
from .fitsio import atomic_path, write_parquet
from .provenance import config_hash, git_revision
from .runtime import common_arguments, json_arg, run, setup_logging

log = logging.getLogger("surveyred.metrics")

MAS_PER_RAD = 180.0 / math.pi * 3600.0e3

#: flag columns of a calsrc catalog that exclude a source from the metrics
DEFAULT_REJECT_FLAGS = (
    "flag_saturated", "flag_edge", "flag_aperture_trunc", "flag_blended", "flag_cr", "flag_bad",
    "flag_bad_centroid", "flag_nan", "flag_psf_failed",
)

#: SRD thresholds (design, minimum, stretch), LPM-17 tables 14 and 18
_GRI = {
    "PA1": (5.0, 8.0, 3.0), "PA1_iqr": (5.0, 8.0, 3.0), "PF1": (10.0, 20.0, 5.0), "PA2": (15.0, 15.0, 10.0),
}
_UZY = {
    "PA1": (7.5, 12.0, 4.5), "PA1_iqr": (7.5, 12.0, 4.5), "PF1": (10.0, 20.0, 5.0), "PA2": (22.5, 22.5, 15.0),
}
ASTROMETRIC_THRESHOLDS = {
    "AM1": (10.0, 20.0, 5.0), "AF1": (10.0, 20.0, 5.0), "AD1": (20.0, 40.0, 10.0),
    "AM2": (10.0, 20.0, 5.0), "AF2": (10.0, 20.0, 5.0), "AD2": (20.0, 40.0, 10.0),
    "AM3": (15.0, 30.0, 10.0), "AF3": (10.0, 20.0, 5.0), "AD3": (30.0, 50.0, 20.0),
}
#: AMx separation D (arcmin)
AM_SEPARATION_ARCMIN = {1: 5.0, 2: 20.0, 3: 200.0}

UNITS = {"PA1": "mmag", "PA1_iqr": "mmag", "PF1": "%", "PA2": "mmag", "zp_visit_scatter": "mmag",
         "zp_detector_scatter": "mmag", "n_bright_stars": "", "n_visits": ""}
for _x in (1, 2, 3):
    UNITS.update({f"AM{_x}": "mas", f"AF{_x}": "%", f"AD{_x}": "mas"})


def thresholds(metric: str, band: str) -> tuple[float, float, float]:
    """(design, minimum, stretch) of ``metric`` in ``band``; NaNs when the SRD sets none."""
    if metric in ASTROMETRIC_THRESHOLDS:
        return ASTROMETRIC_THRESHOLDS[metric]
    table = _UZY if band.lower() in ("u", "z", "y") else _GRI
    return table.get(metric, (math.nan, math.nan, math.nan))


def grade(metric: str, value: float, design: float, minimum: float, stretch: float) -> str:
    """Which SRD level ``value`` reaches (all SRD metrics here are upper limits)."""
    if not np.isfinite(value) or not np.isfinite(design):
        return "n/a"
    if value <= stretch:
        return "stretch"
    if value <= design:
        return "design"
    if value <= minimum:
        return "minimum"
    return "fail"


@dataclass(frozen=True)
class MetricsConfig:
    """``qa.metrics`` section of the configuration."""

    match_radius_arcsec: float = 1.0
    bright_snr_min: float = 50.0
    max_size_ratio: float = 1.3
    n_shuffles: int = 50
    seed: int = 1
    annulus_arcmin: float = 1.0
    min_common_visits: int = 2
    am_mag_min: float | None = None
    am_mag_max: float | None = None
    n_monte_carlo: int = 20
    reference_stars_only: bool = True
    reject_flags: tuple[str, ...] = DEFAULT_REJECT_FLAGS

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any] | None) -> "MetricsConfig":
        doc = dict(doc or {})
        if "reject_flags" in doc:
            doc["reject_flags"] = tuple(doc["reject_flags"])
        try:
            return cls(**doc).validate()
        except TypeError as exc:
            raise ConfigError(f"qa.metrics configuration: {exc}") from exc

    def validate(self) -> "MetricsConfig":
        if self.match_radius_arcsec <= 0:
            raise ConfigError("qa.metrics.match_radius_arcsec must be > 0")
        if self.bright_snr_min <= 0:
            raise ConfigError("qa.metrics.bright_snr_min must be > 0")
        if self.max_size_ratio <= 0:
            raise ConfigError("qa.metrics.max_size_ratio must be > 0")
        if self.n_shuffles < 1 or self.n_monte_carlo < 1:
            raise ConfigError("qa.metrics.n_shuffles and n_monte_carlo must be >= 1")
        if self.annulus_arcmin <= 0:
            raise ConfigError("qa.metrics.annulus_arcmin must be > 0")
        if self.min_common_visits < 2:
            raise ConfigError("qa.metrics.min_common_visits must be >= 2")
        return self


# -- reading ------------------------------------------------------------------------------

_META_COLUMNS = {"visit": str, "band": str, "detector": int, "night": str, "psf_fwhm": float,
                 "zero_point": float, "zero_point_err": float, "mjd": float, "epoch": float}


def read_calsrc(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate calsrc catalogs, adding the per-file metadata as columns.

    ``visit``, ``band``, ``detector``, ``night``, ``psf_fwhm``, ``zero_point``,
    ``zero_point_err`` and ``mjd`` come from the schema metadata when the file
    has no such column.  Catalogs of failed detectors (no ``mag``) contribute
    nothing.  A file that cannot be read raises :class:`CorruptInput`.
    """
    frames = []
    for path in paths:
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise CorruptInput(f"cannot read calsrc catalog: {exc}", path=str(path)) from exc
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k != b"pandas"}
        df = table.to_pandas()
        if "mag" not in df.columns or "ra" not in df.columns or len(df) == 0:
            log.info("%s: no calibrated sources", path)
            continue
        for col, kind in _META_COLUMNS.items():
            if col in df.columns:
                continue
            text = meta.get(col)
            if text is None or text == "":
                if col in ("visit", "band"):
                    raise CorruptInput(f"calsrc catalog has no {col!r} column or metadata", path=str(path))
                df[col] = np.nan if kind is float else (-1 if kind is int else "")
                continue
            try:
                df[col] = kind(float(text)) if kind is int else kind(text)
            except ValueError:
                df[col] = np.nan if kind is float else -1
        df["visit"] = df["visit"].astype(str)
        df["band"] = df["band"].astype(str)
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["ra", "dec", "mag", "mag_err", "visit", "band", "detector"])
    out = pd.concat(frames, ignore_index=True)
    sort = [c for c in ("band", "visit", "detector", "source_id") if c in out.columns]
    return out.sort_values(sort, kind="stable").reset_index(drop=True)


# -- matching -----------------------------------------------------------------------------


def _unit_vectors(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    r, d = np.radians(ra), np.radians(dec)
    return np.column_stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)])


def usable(df: pd.DataFrame, config: MetricsConfig) -> np.ndarray:
    """Sources that may enter the metrics: finite position and magnitude, no reject flag."""
    ok = np.isfinite(df["ra"].to_numpy(float)) & np.isfinite(df["dec"].to_numpy(float))
    ok &= np.isfinite(df["mag"].to_numpy(float))
    for flag in config.reject_flags:
        if flag in df.columns:
            ok &= ~df[flag].to_numpy(bool)
    return ok


def match_groups(ra: np.ndarray, dec: np.ndarray, visit: np.ndarray, radius_arcsec: float) -> np.ndarray:
    """Object label of every source (-1: in an ambiguous group), friends-of-friends within the radius.

    Groups holding two sources of one visit are marked -1.  Labels are
    0..n_groups-1 in order of each group's first source, so they are
    reproducible for the same input order.
    """
    n = len(ra)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    xyz = _unit_vectors(np.asarray(ra, float), np.asarray(dec, float))
    chord = 2.0 * math.sin(math.radians(radius_arcsec / 3600.0) / 2.0)
    pairs = cKDTree(xyz).query_pairs(chord, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # renumber by first occurrence
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    remap = np.empty_like(order)
    remap[order] = np.arange(len(order))
    labels = remap[labels].astype(np.int64)
    # ambiguous: one visit twice in a group
    key = pd.DataFrame({"g": labels, "v": np.asarray(visit).astype(str)})
    dup = key.duplicated(["g", "v"], keep=False).to_numpy()
    bad = np.unique(labels[dup])
    labels[np.isin(labels, bad)] = -1
    return labels


def _pixel_scale_jacobians(df: pd.DataFrame) -> dict[tuple[str, int], np.ndarray]:
    """Per (visit, detector): the 2x2 Jacobian d(xi, eta)/d(x, y) in mas/px from the catalog itself."""
    out = {}
    if not {"x", "y"} <= set(df.columns):
        return out
    for (visit, det), g in df.groupby(["visit", "detector"], sort=True):
        ok = np.isfinite(g["x"].to_numpy(float)) & np.isfinite(g["ra"].to_numpy(float))
        if ok.sum() < 3:
            continue
        ra, dec = g["ra"].to_numpy(float)[ok], g["dec"].to_numpy(float)[ok]
        ra0, dec0 = np.median(ra), np.median(dec)
        xi = (ra - ra0) * math.cos(math.radians(dec0)) * 3.6e6
        eta = (dec - dec0) * 3.6e6
        design = np.column_stack([np.ones(ok.sum()), g["x"].to_numpy(float)[ok], g["y"].to_numpy(float)[ok]])
        coef, *_ = np.linalg.lstsq(design, np.column_stack([xi, eta]), rcond=None)
        out[(str(visit), int(det))] = coef[1:].T  # [[dxi/dx, dxi/dy], [deta/dx, deta/dy]]
    return out


@dataclass
class StarSet:
    """The matched sources of one band."""

    band: str
    sources: pd.DataFrame  # usable sources with a 'star' label (>= 0)
    stars: pd.DataFrame  # one row per star: n_visits, mag, mag_rms_mmag, snr, size_ratio, bright, ra, dec
    n_visits: int
    why_empty: str = ""  # why no star can be bright, when that is known


def build_star_set(df: pd.DataFrame, band: str, config: MetricsConfig) -> StarSet:
    """Match the usable sources of ``band`` across visits and summarise each star."""
    sub = df[(df["band"].astype(str) == band)]
    n_visits = int(sub["visit"].nunique()) if len(sub) else 0
    why = ""
    if len(sub) and not np.any(np.isfinite(sub["mag"].to_numpy(float))):
        why = (f"band {band}: no calibrated magnitude in {len(sub)} sources (not absolutely calibrated: "
               "no photometric reference catalog reached the field?)")
    elif config.reference_stars_only and "ref_id" in sub.columns and len(sub) and not np.any(sub["ref_id"] >= 0):
        why = (f"band {band}: no source matched to the astrometric reference catalog "
               "(qa.metrics.reference_stars_only is true)")
    sub = sub[usable(sub, config)].reset_index(drop=True)
    labels = match_groups(sub["ra"].to_numpy(float), sub["dec"].to_numpy(float), sub["visit"].to_numpy(),
                          config.match_radius_arcsec)
    sub = sub.assign(star=labels)
    sub = sub[sub["star"] >= 0].reset_index(drop=True)
    if "psf_fwhm" in sub.columns and "fwhm" in sub.columns:
        psf = sub["psf_fwhm"].to_numpy(float)
        if not np.all(np.isfinite(psf)):
            # no PSF FWHM in the metadata: the median size of the catalog's bright sources
            med = sub.groupby(["visit", "detector"])["fwhm"].transform("median").to_numpy(float)
            psf = np.where(np.isfinite(psf), psf, med)
        ratio = sub["fwhm"].to_numpy(float) / psf
    else:
        ratio = np.ones(len(sub))
    sub["size_ratio"] = ratio
    snr = sub["snr"].to_numpy(float) if "snr" in sub.columns else 1.0857 / sub["mag_err"].to_numpy(float)
    sub["snr_"] = snr
    g = sub.groupby("star", sort=True)
    stars = pd.DataFrame({
        "n_visits": g.size(),
        "mag": g["mag"].mean(),
        "mag_rms_mmag": g["mag"].std(ddof=1) * 1000.0,
        "snr": g["snr_"].median(),
        "size_ratio": g["size_ratio"].median(),
    })
    xyz = _unit_vectors(sub["ra"].to_numpy(float), sub["dec"].to_numpy(float))
    mean = pd.DataFrame(xyz, columns=["x_", "y_", "z_"]).groupby(sub["star"].to_numpy()).mean()
    stars["ra"] = np.degrees(np.arctan2(mean["y_"], mean["x_"])) % 360.0
    stars["dec"] = np.degrees(np.arctan2(mean["z_"], np.hypot(mean["x_"], mean["y_"])))
    stars["bright"] = (stars["snr"] >= config.bright_snr_min) & (stars["size_ratio"] <= config.max_size_ratio)
    if "ref_id" in sub.columns:
        stars["ref_matched"] = g["ref_id"].max() >= 0
        if config.reference_stars_only:
            stars["bright"] &= stars["ref_matched"]
    stars.index.name = "star"
    return StarSet(band=band, sources=sub.drop(columns=["snr_"]), stars=stars, n_visits=n_visits, why_empty=why)


# -- photometric repeatability -------------------------------------------------------------


@dataclass
class Result:
    value: float
    n: int = 0
    expected: float = math.nan
    reason: str = ""
    extra: dict = field(default_factory=dict)


def _random_pairs(starts: np.ndarray, counts: np.ndarray, rng: np.random.Generator):
    i = np.floor(rng.random(len(counts)) * counts).astype(np.int64)
    j = np.floor(rng.random(len(counts)) * (counts - 1)).astype(np.int64)
    j += j >= i
    return starts + i, starts + j


def photometric_repeatability(stars: StarSet, config: MetricsConfig) -> dict[str, Result]:
    """PA1, PA1_iqr and PF1 of the bright stars of one band (see the module notes)."""
    band = stars.band
    pa2 = thresholds("PA2", band)[0]
    keep = stars.stars.index[stars.stars["bright"] & (stars.stars["n_visits"] >= 2)]
    out = {}
    if stars.n_visits < 2:
        reason = f"band {band}: {stars.n_visits} visit(s); repeatability needs at least 2"
    elif len(keep) == 0 and stars.why_empty:
        reason = stars.why_empty
    elif len(keep) == 0:
        reason = (f"band {band}: no bright (snr >= {config.bright_snr_min:g}) unresolved star "
                  f"measured in 2 or more visits")
    else:
        reason = ""
    if reason:
        for m in ("PA1", "PA1_iqr", "PF1"):
            out[m] = Result(math.nan, 0, reason=reason)
        return out
    src = stars.sources[stars.sources["star"].isin(keep)].sort_values(["star", "visit"], kind="stable")
    star = src["star"].to_numpy()
    mag = src["mag"].to_numpy(float)
    var = np.square(src["mag_err"].to_numpy(float)) if "mag_err" in src.columns else np.full(len(src), np.nan)
    if "zero_point_err" in src.columns:
        zpe = src["zero_point_err"].to_numpy(float)
        var = var + np.where(np.isfinite(zpe), zpe, 0.0) ** 2
    starts = np.flatnonzero(np.r_[True, star[1:] != star[:-1]])
    counts = np.diff(np.r_[starts, len(star)])
    rng = np.random.default_rng(config.seed)
    rms, iqr, pf1, expv, exppf = [], [], [], [], []
    for _ in range(config.n_shuffles):
        a, b = _random_pairs(starts, counts, rng)
        d = (mag[a] - mag[b]) * 1000.0 / math.sqrt(2.0)
        rms.append(math.sqrt(np.mean(d * d)))
        q75, q25 = np.percentile(d, [75, 25])
        iqr.append((q75 - q25) / (2.0 * stats.norm.ppf(0.75)))
        pf1.append(100.0 * np.mean(np.abs(d) > pa2))
        pair_var = (var[a] + var[b]) / 2.0
        expv.append(math.sqrt(np.nanmean(pair_var)) * 1000.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            exppf.append(float(np.nanmean(200.0 * stats.norm.sf(pa2 / (1000.0 * np.sqrt(pair_var))))))
    n = len(starts)
    expected = float(np.median(expv)) if np.any(np.isfinite(expv)) else math.nan
    out["PA1"] = Result(float(np.median(rms)), n, expected)
    out["PA1_iqr"] = Result(float(np.median(iqr)), n, expected)
    exp_pf1 = float(np.median(exppf)) if np.any(np.isfinite(exppf)) else math.nan
    out["PF1"] = Result(float(np.median(pf1)), n, exp_pf1)
    return out


# -- astrometric repeatability -------------------------------------------------------------


def expected_amx(sigma_mas: float, n_visits: int) -> float:
    """Median distance rms of a pair with per-coordinate noise ``sigma_mas`` per star, ``n_visits`` visits.

    The distance varies with ``sigma sqrt(2)``; the population variance over
    ``N`` visits is ``2 sigma**2 chi2_{N-1} / N``, whose median gives the value.
    """
    if n_visits < 2:
        return math.nan
    return sigma_mas * math.sqrt(2.0 * stats.chi2.median(n_visits - 1) / n_visits)


def _angular_sep_rad(ra1, dec1, ra2, dec2):
    """Haversine separation (radians) of arrays in degrees."""
    r1, d1, r2, d2 = (np.radians(v) for v in (ra1, dec1, ra2, dec2))
    s = np.sin((d2 - d1) / 2.0) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2.0) ** 2
    return 2.0 * np.arcsin(np.sqrt(np.clip(s, 0.0, 1.0)))


def astrometric_repeatability(stars: StarSet, config: MetricsConfig, x: int) -> dict[str, Result]:
    """AMx, AFx and ADx of the bright stars of one band (see the module notes)."""
    band = stars.band
    sep = AM_SEPARATION_ARCMIN[x]
    lo, hi = sep - config.annulus_arcmin, sep + config.annulus_arcmin
    names = (f"AM{x}", f"AF{x}", f"AD{x}")

    def nan(reason):
        return {m: Result(math.nan, 0, reason=reason) for m in names}

    if stars.n_visits < 2:
        return nan(f"band {band}: {stars.n_visits} visit(s); repeatability needs at least 2")
    sel = stars.stars["bright"] & (stars.stars["n_visits"] >= config.min_common_visits)
    if config.am_mag_min is not None:
        sel &= stars.stars["mag"] >= config.am_mag_min
    if config.am_mag_max is not None:
        sel &= stars.stars["mag"] <= config.am_mag_max
    bright = stars.stars[sel]
    if len(bright) < 2 and stars.why_empty:
        return nan(stars.why_empty)
    if len(bright) < 2:
        return nan(f"band {band}: fewer than 2 bright stars measured in {config.min_common_visits}+ visits")
    xyz = _unit_vectors(bright["ra"].to_numpy(float), bright["dec"].to_numpy(float))
    tree = cKDTree(xyz)
    chord = lambda arcmin: 2.0 * math.sin(math.radians(arcmin / 60.0) / 2.0)  # noqa: E731
    pairs = tree.query_pairs(chord(hi), output_type="ndarray")
    centre = xyz.mean(axis=0)
    centre /= np.linalg.norm(centre)
    span = 2.0 * np.degrees(np.arccos(np.clip(xyz @ centre, -1.0, 1.0))).max() * 60.0  # arcmin, upper bound
    if len(pairs):
        d = np.degrees(_angular_sep_rad(bright["ra"].to_numpy()[pairs[:, 0]], bright["dec"].to_numpy()[pairs[:, 0]],
                                        bright["ra"].to_numpy()[pairs[:, 1]], bright["dec"].to_numpy()[pairs[:, 1]]))
        pairs = pairs[(d * 60.0 >= lo) & (d * 60.0 <= hi)]
    if len(pairs) == 0:
        return nan(f"band {band}: no pair of bright stars separated by {sep:g} +- {config.annulus_arcmin:g} arcmin "
                   f"(the bright stars span at most {span:.1f} arcmin)")
    # star x visit matrices of positions and position errors (mas, per coordinate)
    ids = bright.index.to_numpy()
    src = stars.sources[stars.sources["star"].isin(ids)]
    visits = np.unique(src["visit"].to_numpy())
    row = pd.Series(np.arange(len(ids)), index=ids)[src["star"].to_numpy()].to_numpy()
    col = np.searchsorted(visits, src["visit"].to_numpy())
    ra = np.full((len(ids), len(visits)), np.nan)
    dec = np.full_like(ra, np.nan)
    sxi = np.full_like(ra, np.nan)
    seta = np.full_like(ra, np.nan)
    ra[row, col] = src["ra"].to_numpy(float)
    dec[row, col] = src["dec"].to_numpy(float)
    jac = _pixel_scale_jacobians(src) if {"x_err", "y_err"} <= set(src.columns) else {}
    if jac:
        xe, ye = src["x_err"].to_numpy(float), src["y_err"].to_numpy(float)
        keys = list(zip(src["visit"].astype(str), src["detector"].astype(int)))
        j = np.array([jac.get(k, np.full((2, 2), np.nan)) for k in keys]).reshape(-1, 2, 2)
        sxi[row, col] = np.sqrt((j[:, 0, 0] * xe) ** 2 + (j[:, 0, 1] * ye) ** 2)
        seta[row, col] = np.sqrt((j[:, 1, 0] * xe) ** 2 + (j[:, 1, 1] * ye) ** 2)
    rms_all, exp_all = [], []
    rng = np.random.default_rng(config.seed)
    chunk = 20000
    for k in range(0, len(pairs), chunk):
        p = pairs[k:k + chunk]
        a, b = p[:, 0], p[:, 1]
        dist = _angular_sep_rad(ra[a], dec[a], ra[b], dec[b]) * MAS_PER_RAD  # pairs x visits
        nvis = np.sum(np.isfinite(dist), axis=1)
        good = nvis >= config.min_common_visits
        if not np.any(good):
            continue
        rms_all.append(np.nanstd(dist[good], axis=1))
        # expected: Gaussian noise of the reported errors projected on the pair's direction
        pa_ = np.radians(bright["ra"].to_numpy()[a[good]]), np.radians(bright["dec"].to_numpy()[a[good]])
        pb_ = np.radians(bright["ra"].to_numpy()[b[good]]), np.radians(bright["dec"].to_numpy()[b[good]])
        ux = (pb_[0] - pa_[0]) * np.cos(0.5 * (pa_[1] + pb_[1]))
        uy = pb_[1] - pa_[1]
        norm = np.hypot(ux, uy)
        ux, uy = (ux / norm)[:, None], (uy / norm)[:, None]
        s2 = (ux ** 2 * (sxi[a[good]] ** 2 + sxi[b[good]] ** 2) + uy ** 2 * (seta[a[good]] ** 2 + seta[b[good]] ** 2))
        s2 = np.where(np.isfinite(dist[good]), s2, np.nan)
        meds = []
        for _ in range(config.n_monte_carlo):
            noise = rng.standard_normal(s2.shape) * np.sqrt(s2)
            meds.append(np.nanstd(noise, axis=1))
        exp_all.append(np.median(np.array(meds), axis=0))
    if not rms_all:
        return nan(f"band {band}: no pair at {sep:g} arcmin measured together in {config.min_common_visits}+ visits")
    rms = np.concatenate(rms_all)
    expv = np.concatenate(exp_all)
    amx = float(np.median(rms))
    ad_design = thresholds(f"AD{x}", band)[0]
    af_design = thresholds(f"AF{x}", band)[0]
    afx = float(100.0 * np.mean(rms > amx + ad_design))
    adx = float(np.percentile(rms, 100.0 - af_design) - amx)
    expected = float(np.nanmedian(expv)) if np.any(np.isfinite(expv)) else math.nan
    n = len(rms)
    return {names[0]: Result(amx, n, expected, extra={"rms_mas": rms}),
            names[1]: Result(afx, n), names[2]: Result(adx, n)}


# -- zero points -----------------------------------------------------------------------------


def zero_point_scatter(zp: pd.DataFrame) -> dict[str, dict[str, Result]]:
    """Per band: scatter of the visits' median zero points and the median within-visit detector scatter.

    ``zp`` has columns ``band``, ``visit``, ``detector``, ``zero_point`` (and
    optionally ``status``; rows whose status is not ``ok`` are left out).
    """
    out: dict[str, dict[str, Result]] = {}
    if zp is None or len(zp) == 0:
        return out
    z = zp[np.isfinite(zp["zero_point"].to_numpy(float))]
    if "status" in z.columns:
        z = z[z["status"].astype(str) == "ok"]
    for band, g in z.groupby(z["band"].astype(str), sort=True):
        per_visit = g.groupby("visit")["zero_point"]
        med = per_visit.median()
        res = {}
        if len(med) >= 2:
            res["zp_visit_scatter"] = Result(float(np.std(med.to_numpy(), ddof=1) * 1000.0), len(med))
        else:
            res["zp_visit_scatter"] = Result(math.nan, len(med), reason=f"band {band}: fewer than 2 visits with a zero point")
        within = per_visit.std(ddof=1).dropna()
        if len(within):
            res["zp_detector_scatter"] = Result(float(np.median(within.to_numpy()) * 1000.0), len(within))
        else:
            res["zp_detector_scatter"] = Result(math.nan, 0, reason=f"band {band}: no visit with 2+ detector zero points")
        out[band] = res
    return out


def zero_points_from_calsrc(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (band, visit, detector) with the calsrc metadata zero point."""
    if len(df) == 0 or "zero_point" not in df.columns:
        return pd.DataFrame(columns=["band", "visit", "detector", "zero_point"])
    return df.groupby(["band", "visit", "detector"], as_index=False, sort=True)["zero_point"].first()


# -- everything --------------------------------------------------------------------------


METRIC_ORDER = ("PA1", "PA1_iqr", "PF1", "AM1", "AF1", "AD1", "AM2", "AF2", "AD2", "AM3", "AF3", "AD3",
                "zp_visit_scatter", "zp_detector_scatter")


def compute_metrics(calsrc: pd.DataFrame, config: MetricsConfig, *, zero_points: pd.DataFrame | None = None,
                    bands: Sequence[str] | None = None) -> pd.DataFrame:
    """The metrics table (one row per band and metric) of the calibrated sources ``calsrc``."""
    cfg = config.validate()
    if zero_points is None:
        zero_points = zero_points_from_calsrc(calsrc)
    all_bands = sorted(set(calsrc["band"].astype(str)) | set(zero_points["band"].astype(str))
                       if len(zero_points) else set(calsrc["band"].astype(str)))
    if bands:
        all_bands = [b for b in all_bands if b in set(bands)] + [b for b in bands if b not in all_bands]
    zps = zero_point_scatter(zero_points)
    rows = []
    for band in all_bands:
        stars = build_star_set(calsrc, band, cfg)
        n_bright = int((stars.stars["bright"] & (stars.stars["n_visits"] >= 2)).sum()) if len(stars.stars) else 0
        log.info("band %s: %d visits, %d sources matched into %d stars, %d bright in 2+ visits", band,
                 stars.n_visits, len(stars.sources), len(stars.stars), n_bright)
        results: dict[str, Result] = {}
        results.update(photometric_repeatability(stars, cfg))
        for x in (1, 2, 3):
            results.update(astrometric_repeatability(stars, cfg, x))
        results.update(zps.get(band, {
            "zp_visit_scatter": Result(math.nan, 0, reason=f"band {band}: no zero points"),
            "zp_detector_scatter": Result(math.nan, 0, reason=f"band {band}: no zero points")}))
        for metric in METRIC_ORDER:
            r = results[metric]
            design, minimum, stretch = thresholds(metric, band)
            rows.append({"band": band, "metric": metric, "value": r.value, "unit": UNITS.get(metric, ""),
                         "n": int(r.n), "expected": r.expected, "design": design, "minimum": minimum,
                         "stretch": stretch, "grade": grade(metric, r.value, design, minimum, stretch),
                         "reason": r.reason})
            if r.reason:
                log.info("%s %s: NaN (%s)", band, metric, r.reason)
            else:
                log.info("%s %s = %.3f %s (expected %.3f, n=%d)", band, metric, r.value, UNITS.get(metric, ""),
                         r.expected, r.n)
        rows.append({"band": band, "metric": "n_bright_stars", "value": float(n_bright), "unit": "", "n": n_bright,
                     "expected": math.nan, "design": math.nan, "minimum": math.nan, "stretch": math.nan,
                     "grade": "n/a", "reason": ""})
        rows.append({"band": band, "metric": "n_visits", "value": float(stars.n_visits), "unit": "",
                     "n": stars.n_visits, "expected": math.nan, "design": math.nan, "minimum": math.nan,
                     "stretch": math.nan, "grade": "n/a", "reason": ""})
    return pd.DataFrame(rows, columns=["band", "metric", "value", "unit", "n", "expected", "design", "minimum",
                                       "stretch", "grade", "reason"])


def thresholds_markdown(table: pd.DataFrame) -> str:
    """The metrics table as Markdown: value, expected, SRD design/minimum/stretch and the level reached."""

    def fmt(v, digits=2):
        return "" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"

    sim = "expected_sim" in table.columns
    lines = ["| band | metric | value | unit | expected | " + ("expected (simulated noise) | " if sim else "")
             + "design | minimum | stretch | level | n | note |",
             "|---|---|---:|---|---:|" + ("---:|" if sim else "") + "---:|---:|---:|---|---:|---|"]
    for r in table.itertuples(index=False):
        lines.append(f"| {r.band} | {r.metric} | {fmt(r.value) or 'NaN'} | {r.unit} | {fmt(r.expected)} | "
                     + (f"{fmt(r.expected_sim)} | " if sim else "")
                     + f"{fmt(r.design, 1)} | {fmt(r.minimum, 1)} | {fmt(r.stretch, 1)} | {r.grade} | {r.n} | "
                     f"{r.reason} |")
    return "\n".join(lines) + "\n"


def thresholds_html(table: pd.DataFrame) -> str:
    """The metrics table as a self-contained HTML page (for the Snakemake report)."""
    colours = {"stretch": "#b6d7a8", "design": "#d9ead3", "minimum": "#fff2cc", "fail": "#f4cccc", "n/a": "#ffffff"}

    def fmt(v, digits=2):
        return "" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"

    sim = "expected_sim" in table.columns
    head = ("band", "metric", "value", "unit", "expected") + (("expected (simulated noise)",) if sim else ()) + (
        "design", "minimum", "stretch", "level", "n", "note")
    rows = []
    for r in table.itertuples(index=False):
        cells = (r.band, r.metric, fmt(r.value) or "NaN", r.unit, fmt(r.expected)) + (
            (fmt(r.expected_sim),) if sim else ()) + (fmt(r.design, 1), fmt(r.minimum, 1), fmt(r.stretch, 1),
                                                      r.grade, str(r.n), r.reason)
        tds = "".join(f"<td>{_escape(str(c))}</td>" for c in cells)
        rows.append(f'<tr style="background:{colours.get(r.grade, "#ffffff")}">{tds}</tr>')
    ths = "".join(f"<th>{h}</th>" for h in head)
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>surveyred science metrics</title>"
            "<style>table{border-collapse:collapse;font-family:sans-serif;font-size:12px}"
            "td,th{border:1px solid #999;padding:2px 6px}</style></head><body>"
            "<p>LSST SRD metrics (LPM-17; definitions of validate_drp, see surveyred.metrics). "
            "Level: the best SRD level the value meets (all are upper limits).</p>"
            f"<table><thead><tr>{ths}</tr></thead><tbody>{''.join(rows)}</tbody></table></body></html>\n")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_table(table: pd.DataFrame, path: str | Path) -> str:
    """The thresholds table in the format of ``path``'s suffix: .html, .csv, else Markdown."""
    suffix = Path(path).suffix.lower()
    if suffix in (".html", ".htm"):
        return thresholds_html(table)
    if suffix == ".csv":
        return table.to_csv(index=False)
    return thresholds_markdown(table)


# -- noise model for expectations --------------------------------------------------------


def psf_flux_error(flux_e, sky_e, read_noise_e, sigma_px, *, wing_frac: float = 0.1, wing_ratio: float = 2.0):
    """1-sigma error (e-) of a uniformly weighted PSF-fit flux for a double-Gaussian PSF.

    ``P = (1 - f) G(s) + f G(r s)`` (unit integral); with per-pixel variance
    ``V = B + rn**2 + F P`` the estimate ``F = sum P d / sum P**2`` has
    ``var F = (B + rn**2) / sum P**2 + F sum P**3 / (sum P**2)**2``.  The sums
    are the continuous integrals (pixel integration ignored).
    """
    s = np.asarray(sigma_px, float)
    f, r = wing_frac, wing_ratio
    # integral of G(s1) G(s2) = 1 / (2 pi (s1^2 + s2^2)); of G1 G2 G3 = 1/(4 pi^2 (s1^2 s2^2 + s1^2 s3^2 + s2^2 s3^2))
    w = np.array([1.0 - f, f])
    sig = [s, r * s]
    p2 = sum(w[i] * w[j] / (2 * np.pi * (sig[i] ** 2 + sig[j] ** 2)) for i in range(2) for j in range(2))
    p3 = sum(w[i] * w[j] * w[k] / (4 * np.pi ** 2 * (sig[i] ** 2 * sig[j] ** 2 + sig[i] ** 2 * sig[k] ** 2
                                                       + sig[j] ** 2 * sig[k] ** 2))
             for i in range(2) for j in range(2) for k in range(2))
    var = (np.asarray(sky_e, float) + np.asarray(read_noise_e, float) ** 2) / p2 + np.asarray(flux_e, float) * p3 / p2 ** 2
    return np.sqrt(var)


def centroid_error(flux_e, sky_e, read_noise_e, sigma_px):
    """1-sigma per-coordinate error (px) of an optimal (PSF-weighted) centroid of a Gaussian star.

    Fisher information of the position for a Gaussian ``P`` of width ``s`` with
    per-pixel variance ``B + rn**2 + F P``: the source-limited term gives
    ``s**2 / F`` and the background-limited one ``8 pi s**4 (B + rn**2) / F**2``;
    the variance is their sum (exact in both limits, within ~10 % between).
    A windowed centroid with a Gaussian window of the PSF's width is this
    estimator.
    """
    f = np.asarray(flux_e, float)
    s = np.asarray(sigma_px, float)
    bkg = np.asarray(sky_e, float) + np.asarray(read_noise_e, float) ** 2
    return np.sqrt(s ** 2 / f + 8.0 * np.pi * s ** 4 * bkg / f ** 2)


def expected_from_simulation(calsrc: pd.DataFrame, truth_dir: str | Path, config: MetricsConfig | None = None,
                             *, pixel_scale_arcsec: float | None = None) -> pd.DataFrame:
    """PA1 and AMx expected from the *simulated* noise, for a run on ``surveyred simulate`` data.

    Every calsrc source matched to a reference star (``ref_id``, the
    simulator's ``star_id``) gets the errors the simulation implies: the
    photon + read-noise error of a PSF-fit flux (:func:`psf_flux_error` with the
    true flux ``flux_e``, the exposure's sky ``sky_e``, the mean read noise of
    the detector and the true PSF core sigma) and the centroid error
    (:func:`centroid_error`, times the pixel scale).  The visit's
    ``zero_point_err`` is kept (the zero point is estimated from the same
    stars).  The metrics are then computed as usual; the ``expected`` column of
    the result is the expectation from the simulated noise, ``value`` the
    measurement.
    """
    import yaml

    cfg = config or MetricsConfig()
    truth = Path(truth_dir)
    for name in ("stars.parquet", "exposures.parquet", "gain.yaml"):
        if not (truth / name).is_file():
            raise MissingInput(f"not the truth/ of a `surveyred simulate` survey: no {name}", path=str(truth))
    stars = pd.read_parquet(truth / "stars.parquet",
                            columns=["visit", "detector", "star_id", "flux_e", "sigma_x_px", "sigma_y_px"])
    expo = pd.read_parquet(truth / "exposures.parquet")
    expo = expo[expo["obstype"] == "science"][["visit", "detector", "sky_e"]]
    gains = yaml.safe_load((truth / "gain.yaml").read_text()) or {}
    rn = {}
    for det, info in (gains.get("detectors") or {}).items():
        vals = [float(a["read_noise"]) for a in (info.get("amps") or {}).values()]
        rn[int(det)] = float(np.sqrt(np.mean(np.square(vals)))) if vals else 0.0
    stars["visit"] = stars["visit"].astype(str)
    expo["visit"] = expo["visit"].astype(str)
    key = stars.merge(expo, on=["visit", "detector"], how="left")
    key["read_noise"] = key["detector"].map(rn).astype(float)
    sigma = np.sqrt(key["sigma_x_px"].to_numpy(float) * key["sigma_y_px"].to_numpy(float))
    flux = key["flux_e"].to_numpy(float)
    key["mag_err_sim"] = 1.0857362 * psf_flux_error(flux, key["sky_e"], key["read_noise"].fillna(0.0), sigma) / flux
    key["pos_err_sim_px"] = centroid_error(flux, key["sky_e"], key["read_noise"].fillna(0.0), sigma)
    df = calsrc.copy()
    df["visit"] = df["visit"].astype(str)
    df = df.merge(key[["visit", "detector", "star_id", "mag_err_sim", "pos_err_sim_px"]],
                  left_on=["visit", "detector", "ref_id"], right_on=["visit", "detector", "star_id"], how="left")
    matched = np.isfinite(df["mag_err_sim"].to_numpy(float))
    log.info("%d of %d calsrc sources matched to simulated stars", int(matched.sum()), len(df))
    df = df[matched].copy()
    df["mag_err"] = df["mag_err_sim"]
    df["x_err"] = df["pos_err_sim_px"]
    df["y_err"] = df["pos_err_sim_px"]
    return compute_metrics(df.drop(columns=["mag_err_sim", "pos_err_sim_px", "star_id"]), cfg)


# -- command line ----------------------------------------------------------------------------


def expand_inputs(items: Sequence[str]) -> list[str]:
    """Files as given; a directory stands for the ``*.parquet`` files in it (sorted)."""
    out = []
    for item in items:
        if Path(item).is_dir():
            out.extend(sorted(str(p) for p in Path(item).glob("*.parquet")))
        else:
            out.append(str(item))
    return out


def _read_visit_summaries(paths: Sequence[str]) -> pd.DataFrame:
    frames = []
    for p in paths:
        try:
            frames.append(pd.read_parquet(p))
        except (OSError, pa.ArrowInvalid) as exc:
            raise CorruptInput(f"cannot read visit summary: {exc}", path=str(p)) from exc
    if not frames:
        return pd.DataFrame(columns=["band", "visit", "detector", "zero_point"])
    df = pd.concat(frames, ignore_index=True)
    df["visit"] = df["visit"].astype(str)
    df["band"] = df["band"].astype(str)
    return df


def write_metrics(table: pd.DataFrame, path: str | Path, meta: Mapping[str, Any]) -> None:
    write_parquet(table, path, meta)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="surveyred metrics", description=(
        "LSST SRD science metrics (PA1, PF1, AM1/AF1/AD1, AM2, AM3, zero-point scatter) per band "
        "from calibrated source catalogs of repeat visits."))
    p.add_argument("--calsrc", nargs="+", required=True, help="calsrc catalogs ({visit}_{det}.parquet) or directories of them")
    p.add_argument("--visit-summary", nargs="*", default=[], help="visit_summary/{night}/{visit}.parquet "
                   "(zero points; default: the calsrc metadata)")
    p.add_argument("--output", required=True, help="metrics.parquet")
    p.add_argument("--thresholds-table", default=None, help="also write the table with the SRD thresholds: .html, .csv, else Markdown")
    p.add_argument("--truth", default=None, help="truth/ directory of `surveyred simulate`: add the column "
                   "expected_sim, PA1/PF1/AMx expected from the simulated noise")
    p.add_argument("--bands", nargs="*", default=None, help="bands to report (default: every band found)")
    p.add_argument("--config-json", default=None, help='the "qa.metrics" section as JSON')
    common_arguments(p)
    args = p.parse_args(argv)
    setup_logging(args.log)

    def body() -> None:
        doc = json_arg(args.config_json)
        cfg = MetricsConfig.from_dict(doc)
        paths = expand_inputs(args.calsrc)
        log.info("reading %d calsrc catalogs", len(paths))
        calsrc = read_calsrc(paths)
        if len(calsrc) == 0 and not args.visit_summary:
            raise InsufficientData(f"no calibrated source in the {len(args.calsrc)} calsrc catalogs",
                                   path=str(args.calsrc[0]))
        zp = _read_visit_summaries(args.visit_summary) if args.visit_summary else None
        table = compute_metrics(calsrc, cfg, zero_points=zp, bands=args.bands)
        if args.truth:
            sim = expected_from_simulation(calsrc, args.truth, cfg)
            table = table.merge(sim[["band", "metric", "expected"]].rename(columns={"expected": "expected_sim"}),
                                on=["band", "metric"], how="left")
        meta = {"metrics_software_version": __version__, "metrics_git_revision": git_revision(),
                "metrics_config_hash": config_hash(doc),
                "metrics_config": json.dumps(asdict(cfg), sort_keys=True, default=list),
                "metrics_inputs": ",".join(Path(x).name for x in list(paths) + list(args.visit_summary)),
                "reference": "LSST SRD LPM-17 tables 14, 18; definitions as lsst/validate_drp calcsrd"}
        if args.thresholds_table:
            with atomic_path(args.thresholds_table) as tmp:
                Path(tmp).write_text(render_table(table, args.thresholds_table))
                write_metrics(table, args.output, meta)  # both or (almost surely) neither
        else:
            write_metrics(table, args.output, meta)

    return run(body, what="metrics")
