"""Single-frame characterisation: background, detection, PSF, measurement.

``surveyred characterize CALEXP... --outdir-src DIR --outdir-psf DIR`` reads the
calibrated exposures of one visit and writes, for every detector,

* ``DIR_SRC/{visit}_{det}.parquet`` - the source catalog (columns below);
* ``DIR_PSF/{visit}_{det}.fits`` - the PSF product (the calexp is never modified).

Steps (I/O free: :func:`characterize_detector`)
-----------------------------------------------
1. **Background**: ``sep.Background`` on a ``mesh`` x ``mesh`` grid with a
   ``filter`` x ``filter`` median filter of the meshes; BAD, SAT, NO_DATA and
   non-finite pixels are masked (meshes with too many masked pixels are
   interpolated from their neighbours by sep).
2. **Detection + deblending**: ``sep.extract`` on the background-subtracted image
   with the VARIANCE plane, threshold ``thresh`` (in sigma of the variance
   plane), ``minarea``, ``deblend_nthresh``, ``deblend_cont``; BAD and NO_DATA
   pixels are masked.  The pixel stack and the sub-object limit are set from
   the configuration so crowded frames do not fail.  The segmentation map
   gives the DETECTED plane.
3. **Centroids**: windowed (SExtractor's ``XWIN`` iteration in the numba kernel
   :func:`surveyred.kernels.measure.windowed_centroids`, Gaussian window of sigma
   ``2 r50 / 2.3548``, ``r50`` the half-light radius from ``sep.flux_radius``);
   the error follows from linearising the windowed-centroid equation
   ``sum w (x - xc) I = 0``:
   ``var(xc) = sum w^2 dx^2 V / (sum w I - sum w dx^2 I / s_w^2)^2``.
   A centroid that is NaN or moved more than ``max_centroid_shift`` px from the
   isophotal one is replaced by the isophotal one and flagged.
4. **Aperture fluxes** ``sep.sum_circle`` at ``aperture_radii`` with ``var=VARIANCE``.
5. **PSF model** (:class:`surveyred.psf.PsfModel`) from isolated, unflagged,
   bright (``psf.min_snr``), clean-stamp stars with a half-light radius within
   ``psf.size_tol`` of the mode of the bright sources'; the pixels of other
   detections are left out of each star's fit, and stars fitted poorly
   (reduced chi2 outliers: blends, a transient on its host) are dropped.
6. **PSF flux**: linear least squares of the PSF model at the centroid within
   ``psf_fit_radius`` x FWHM over unflagged pixels, uniformly weighted (the sky
   variance is constant over a stamp, so the estimate is unbiased; the
   variance plane gives the error):
   ``F = sum P d / sum P^2``, ``var F = sum P^2 V / (sum P^2)^2``; then two
   Jacobi iterations of the simultaneous fit subtract the neighbours' PSFs
   (out to ``NEIGHBOUR_RADIUS`` FWHM; saturated sources are not subtracted).
7. **Aperture correction**: fit of ``ap_flux_r<largest> / psf_flux`` over the
   PSF stars whose largest aperture holds no pixel of another detection
   (all PSF stars when fewer than ``apcorr.min_stars``), weights
   ``1/(err^2 + APCORR_FLOOR^2)``, clipped on normalised residuals from the
   median; a polynomial of order ``apcorr.order`` in ``(x, y)`` (0 = a
   constant); ``psf_flux_apcorr = apcorr psf_flux``.
8. **Visit pooling** (``pool_visit``, in :func:`characterize_visit`): the PSF
   wing fraction and ratio are poorly constrained by the 5-20 stars of one small
   detector and trade off against the aperture correction, and a per-detector
   correction from those stars carries ~1% of noise (the 12-px aperture's sky
   noise).  So the wing is the median of the free first-pass fits of every
   detector's stars, every detector's PSF is refitted with it, and one
   constant aperture correction is fitted to the pooled stars of the visit
   (:func:`visit_wing`, :func:`pool_apcorr`).  The characterisation runs
   twice per detector.

Source catalog columns (Parquet; one row per detection)
-------------------------------------------------------
=====================  =======  ==========================================================
column                 unit     meaning
=====================  =======  ==========================================================
source_id              -        int64: ``visit * 10^9 + detector * 10^6 + index`` for a
                                numeric visit, ``crc32(visit) * 10^9 + ...`` otherwise
x, y                   px       windowed centroid, 0-based pixel of the assembled calexp
x_err, y_err           px       1-sigma centroid errors
a, b                   px       isophotal semi-major/minor axes (second moments, sep)
theta                  rad      position angle of ``a``, counter-clockwise from +x
fwhm                   px       ``2 r50`` (half-light diameter; the FWHM for a Gaussian)
peak                   e-       highest background-subtracted pixel
sky                    e-/px    background at the source
snr                    -        ``psf_flux / psf_flux_err`` (aperture S/N at r=5 when no PSF)
ap_flux_rNN, _err      e-       aperture flux within radius NN px (e.g. ap_flux_r03) and error
psf_flux, psf_flux_err e-       PSF-fit flux (total, unit-integral model) and error
apcorr                 -        aperture correction at the source
psf_flux_apcorr, _err  e-       ``apcorr * psf_flux`` and its error
is_psf_star            bool     used in the PSF model
flag_saturated         bool     SAT pixel in the footprint or 3x3 core
flag_edge              bool     footprint touches the image border or EDGE/NO_DATA pixels
flag_aperture_trunc    bool     the largest aperture leaves the image
flag_blended           bool     deblended from a parent (sep OBJ_MERGED) or truncated
flag_cr                bool     CR or INTRP pixel in the footprint
flag_bad               bool     BAD pixel in the footprint
flag_bad_centroid      bool     windowed centroid NaN or moved too far (isophotal used)
flag_nan               bool     a NaN in a flux, shape or centroid
flag_psf_failed        bool     no PSF flux (no model, or no usable pixels)
=====================  =======  ==========================================================

Schema metadata (UTF-8 strings): ``visit``, ``night``, ``detector``, ``band``,
``exptime``, ``date_obs``, ``mjd``, ``status`` (``ok``/``failed``),
``failure_class``, ``failure_message``, ``psf_fwhm`` (px, detector centre),
``psf_ellip``, ``n_psf_stars``, ``apcorr``, ``sky_level``, ``sky_rms``,
``software_version``, ``git_revision``, ``config_hash``, ``calexp`` and
``units`` (JSON column -> unit).

PSF product ``{visit}_{det}.fits``
---------------------------------
``PRIMARY``: VISIT, NIGHT, DETECTOR, BAND, EXPTIME, DATE-OBS, PSFFWHM (px),
PSFELLIP, NPSFSTAR, APCORR, SKYLEVEL (e-), SKYRMS (e-), NSOURCE, STATUS
(``ok``/``failed``), FAILCLS, FAILMSG, BKGMESH, BKGFILT, provenance cards;
``PSF``, ``PSFSTARS``, ``PSFIMAGE`` (see :mod:`surveyred.psf`; absent when
STATUS = failed); ``BACKGROUND`` and ``BACKRMS`` (float32 mesh images: the
background and rms at the mesh centres, ``(ny // mesh) x (nx // mesh)``; sep
interpolates between mesh centres with a bicubic spline); ``DETECTED`` (uint8
image, 1 where the segmentation map holds a source, i.e. the DETECTED plane
``masks.DETECTED``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import masks
from .errors import ConfigError, NoSources, SurveyredError, TooFewStars
from .psf import PsfModel

log = logging.getLogger("surveyred.characterize")

#: Planes that make a pixel unusable for background and detection.
BAD_FOR_BACKGROUND = masks.BAD | masks.SAT | masks.NO_DATA
BAD_FOR_DETECTION = masks.BAD | masks.NO_DATA
#: Planes that exclude a star from the PSF fit when present within its stamp.
BAD_FOR_PSF = masks.BAD | masks.SAT | masks.CR | masks.INTRP | masks.NO_DATA | masks.EDGE | masks.SUSPECT
#: Planes whose pixels are left out of the PSF-flux fit.
BAD_FOR_PSF_FLUX = masks.BAD | masks.SAT | masks.NO_DATA

#: Star-to-star scatter of ``ap_flux / psf_flux`` beyond the photon noise (PSF model
#: residuals, undetected neighbours), added in quadrature to each star's error.
APCORR_FLOOR = 0.005

FLAG_COLUMNS = ("flag_saturated", "flag_edge", "flag_aperture_trunc", "flag_blended", "flag_cr", "flag_bad",
                "flag_bad_centroid", "flag_nan", "flag_psf_failed")


# -- configuration ----------------------------------------------------------------------


@dataclass(frozen=True)
class BackgroundConfig:
    mesh: int = 64
    filter: int = 3

    def validate(self):
        if self.mesh < 8 or self.filter < 1:
            raise ConfigError("characterize.background: mesh >= 8 and filter >= 1 required")
        return self


@dataclass(frozen=True)
class DetectionConfig:
    thresh: float = 3.0
    minarea: int = 5
    deblend_nthresh: int = 32
    deblend_cont: float = 0.005
    clean: bool = False
    clean_param: float = 1.0
    pixstack: int = 3_000_000
    sub_object_limit: int = 4096

    def validate(self):
        if self.thresh <= 0 or self.minarea < 1 or self.deblend_nthresh < 1 or not 0 <= self.deblend_cont <= 1:
            raise ConfigError("characterize.detection: thresh > 0, minarea >= 1, deblend_nthresh >= 1, "
                              "0 <= deblend_cont <= 1 required")
        if self.pixstack < 10000 or self.sub_object_limit < 64:
            raise ConfigError("characterize.detection: pixstack >= 10000 and sub_object_limit >= 64 required")
        return self


@dataclass(frozen=True)
class PsfConfig:
    order: int = 2
    min_stars: int = 5
    max_stars: int = 100
    min_snr: float = 25.0
    isolation: float = 3.0
    size_tol: float = 0.2
    stamp_half: int = 0
    fit_radius: float = 1.5

    def validate(self):
        if self.order < 0 or self.min_stars < 1 or self.max_stars < self.min_stars or self.min_snr <= 0:
            raise ConfigError("characterize.psf: order >= 0, 1 <= min_stars <= max_stars, min_snr > 0 required")
        if self.isolation < 0 or not 0 < self.size_tol < 1 or self.stamp_half < 0 or self.fit_radius <= 0:
            raise ConfigError("characterize.psf: isolation >= 0, 0 < size_tol < 1, stamp_half >= 0, "
                              "fit_radius > 0 required")
        return self


@dataclass(frozen=True)
class ApcorrConfig:
    order: int = 0
    nsigma: float = 3.0
    min_stars: int = 3

    def validate(self):
        if self.order < 0 or self.nsigma <= 0 or self.min_stars < 1:
            raise ConfigError("characterize.apcorr: order >= 0, nsigma > 0, min_stars >= 1 required")
        return self


@dataclass(frozen=True)
class CharacterizeConfig:
    """Parameters of every characterisation step (see the module docstring)."""

    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    psf: PsfConfig = field(default_factory=PsfConfig)
    apcorr: ApcorrConfig = field(default_factory=ApcorrConfig)
    aperture_radii: tuple = (3.0, 5.0, 8.0, 12.0)
    max_centroid_shift: float = 1.5
    pool_visit: bool = True

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any] | None) -> "CharacterizeConfig":
        doc = dict(doc or {})
        try:
            parts = dict(
                background=BackgroundConfig(**(doc.pop("background", None) or {})),
                detection=DetectionConfig(**(doc.pop("detection", None) or {})),
                psf=PsfConfig(**(doc.pop("psf", None) or {})),
                apcorr=ApcorrConfig(**(doc.pop("apcorr", None) or {})),
            )
            if "aperture_radii" in doc:
                doc["aperture_radii"] = tuple(float(r) for r in doc["aperture_radii"])
            return cls(**parts, **doc).validate()
        except TypeError as exc:
            raise ConfigError(f"characterize configuration: {exc}") from exc

    def validate(self) -> "CharacterizeConfig":
        for part in (self.background, self.detection, self.psf, self.apcorr):
            part.validate()
        r = self.aperture_radii
        if not r or any(x <= 0 for x in r) or list(r) != sorted(set(r)):
            raise ConfigError("characterize.aperture_radii: positive, increasing, distinct radii required")
        if self.max_centroid_shift <= 0:
            raise ConfigError("characterize.max_centroid_shift must be > 0")
        return self


def ap_name(r: float) -> str:
    """Column name of the aperture flux at radius ``r`` px (``ap_flux_r03``, ``ap_flux_r4p5``)."""
    return f"ap_flux_r{int(r):02d}" if float(r).is_integer() else f"ap_flux_r{str(r).replace('.', 'p')}"


# -- science ---------------------------------------------------------------------------


@dataclass
class Background:
    """Background estimate: full-resolution ``back``; the rms and the mesh values on demand."""

    back: np.ndarray
    level: float
    noise: float
    mesh: int
    filter: int
    sep_background: Any = field(default=None, repr=False)

    @property
    def rms(self) -> np.ndarray:
        """Full-resolution background rms (e-)."""
        return self.sep_background.rms()

    @property
    def mesh_back(self) -> np.ndarray:
        """Background at the mesh centres, ``(ny // mesh) x (nx // mesh)``."""
        h = self.mesh // 2
        return self.back[h::self.mesh, h::self.mesh].copy()

    @property
    def mesh_rms(self) -> np.ndarray:
        """Background rms at the mesh centres."""
        h = self.mesh // 2
        return self.rms[h::self.mesh, h::self.mesh].copy()


def estimate_background(image, mask, *, cfg: BackgroundConfig = BackgroundConfig()) -> Background:
    """Mesh background and rms with sep (masked: BAD, SAT, NO_DATA, non-finite)."""
    import sep

    data = np.ascontiguousarray(image, dtype=np.float32)
    bad = ((mask & BAD_FOR_BACKGROUND) != 0) | ~np.isfinite(data)
    if bad.all():
        raise NoSources("no usable pixel for the background (all masked or NaN)")
    if bad.any():
        data = np.where(bad, np.float32(0), data)
    ny, nx = data.shape
    mesh = min(cfg.mesh, ny, nx)
    bkg = sep.Background(data, mask=bad, bw=mesh, bh=mesh, fw=cfg.filter, fh=cfg.filter)
    return Background(bkg.back(), float(bkg.globalback), float(bkg.globalrms), mesh, cfg.filter, bkg)


def detect(sub, variance, mask, *, cfg: DetectionConfig = DetectionConfig(), bad=None):
    """Detect and deblend sources; returns ``(objects, segmentation map)``.

    ``bad`` (optional) are the pixels to ignore, when the caller has them already:
    BAD/NO_DATA, non-finite image, non-positive or non-finite variance.
    """
    import sep

    sep.set_extract_pixstack(int(cfg.pixstack))
    sep.set_sub_object_limit(int(cfg.sub_object_limit))
    if bad is None:
        bad = ((mask & BAD_FOR_DETECTION) != 0) | ~np.isfinite(sub) | ~(variance > 0)
    data = np.where(bad, np.float32(0), sub).astype(np.float32) if bad.any() else sub
    var = variance
    if bad.any():
        fill = np.float32(np.nanmedian(variance[~bad])) if (~bad).any() else np.float32(1)
        var = np.where(bad, fill, variance).astype(np.float32)
    try:
        objs, seg = sep.extract(data, cfg.thresh, var=var, mask=bad, minarea=cfg.minarea,
                                deblend_nthresh=cfg.deblend_nthresh, deblend_cont=cfg.deblend_cont,
                                clean=cfg.clean, clean_param=cfg.clean_param,
                                segmentation_map=True)
    except Exception as exc:  # sep raises a bare Exception for pixstack / deblend overflows
        raise NoSources(f"extraction failed ({exc}); raise characterize.detection.pixstack or "
                        f"sub_object_limit") from exc
    return objs, seg


def _stamp_index(shape, x, y, h):
    """Flat indices ``(n, 2h+1, 2h+1)`` of stamps around rounded positions, and their in-bounds mask."""
    ny, nx = shape
    off = np.arange(-h, h + 1)
    ix = np.rint(x).astype(np.int64)[:, None] + off[None, :]
    iy = np.rint(y).astype(np.int64)[:, None] + off[None, :]
    ok = ((iy >= 0) & (iy < ny))[:, :, None] & ((ix >= 0) & (ix < nx))[:, None, :]
    lin = np.clip(iy, 0, ny - 1)[:, :, None] * nx + np.clip(ix, 0, nx - 1)[:, None, :]
    return lin, ok, ix, iy


def windowed_centroids(sub, variance, x, y, sig, *, max_shift: float):
    """Iterated windowed centroids with errors (numba kernel, see :mod:`surveyred.kernels.measure`)."""
    from .kernels.measure import windowed_centroids as kernel

    if len(x) == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0)
    return kernel(sub, variance, x, y, sig, max_shift=max(3.0, 2 * max_shift))


def centroid_errors(sub, variance, x, y, sig, h: int = 15):
    """1-sigma errors of windowed centroids (see the module docstring, step 3).

    Thin wrapper of the numba kernel :func:`surveyred.kernels.measure.centroid_errors`.
    """
    from .kernels.measure import centroid_errors as kernel

    if len(x) == 0:
        return np.zeros(0), np.zeros(0)
    return kernel(sub, variance, x, y, sig, h=h)


def measure_sources(sub, variance, mask, objs, seg, *, cfg: CharacterizeConfig):
    """Centroids, shapes, aperture fluxes and flags of detected objects (no PSF).

    Returns
    -------
    dict of arrays
        Columns of the catalog except the PSF ones (``ap_flux_*`` included).
    """
    import sep

    n = len(objs)
    ny, nx = sub.shape
    xi, yi = objs["x"].astype(np.float64), objs["y"].astype(np.float64)
    rmax = np.clip(4.0 * objs["a"], 6.0, 20.0)  # a: isophotal sigma; 6 px hold ~97% of a 3 px FWHM star
    r50, _ = sep.flux_radius(sub, xi, yi, rmax, 0.5, subpix=2)
    sig = np.clip(2.0 / 2.3548 * np.where(np.isfinite(r50) & (r50 > 0), r50, 1.0), 0.5, 10.0)
    xw, yw, x_err, y_err = windowed_centroids(sub, variance, xi, yi, sig, max_shift=cfg.max_centroid_shift)
    moved = ~np.isfinite(xw) | ~np.isfinite(yw) | (np.hypot(xw - xi, yw - yi) > cfg.max_centroid_shift)
    x = np.where(moved, xi, xw)
    y = np.where(moved, yi, yw)
    if moved.any():  # errors at the isophotal fallback
        ex, ey = centroid_errors(sub, variance, x[moved], y[moved], sig[moved])
        x_err, y_err = x_err.copy(), y_err.copy()
        x_err[moved], y_err[moved] = ex, ey
    cols: dict[str, np.ndarray] = dict(x=x, y=y, x_err=x_err, y_err=y_err,
                                       a=objs["a"].astype(np.float64), b=objs["b"].astype(np.float64),
                                       theta=objs["theta"].astype(np.float64), fwhm=2.0 * r50,
                                       peak=objs["peak"].astype(np.float64))
    trunc = np.zeros(n, bool)
    anynan = ~np.isfinite(x) | ~np.isfinite(y) | ~np.isfinite(cols["a"]) | ~np.isfinite(cols["b"])
    for r in cfg.aperture_radii:
        f, fe, fl = sep.sum_circle(sub, x, y, r, var=variance, subpix=5)
        cols[ap_name(r)], cols[ap_name(r) + "_err"] = f, fe
        if r == cfg.aperture_radii[-1]:
            trunc = (fl & sep.APER_TRUNC) != 0
        anynan |= ~np.isfinite(f) | ~np.isfinite(fe)
    # footprint flags: one pass collects the (few) flagged pixels that lie in a footprint
    m = mask
    on = (m != 0) & (seg > 0)
    fp_ids, fp_bits = seg[on], m[on]

    def footprint_any(bits):
        ids = fp_ids[(fp_bits & bits) != 0]
        return np.bincount(ids, minlength=n + 1)[1:] > 0

    edge_ids = np.concatenate([seg[0, :], seg[-1, :], seg[:, 0], seg[:, -1]])
    on_border = np.bincount(edge_ids[edge_ids > 0], minlength=n + 1)[1:] > 0
    lin, ok, _, _ = _stamp_index(sub.shape, x, y, 1)
    core = np.where(ok, m.reshape(-1)[lin], 0)
    core_or = np.bitwise_or.reduce(core.reshape(n, -1), axis=1) if n else np.zeros(0, m.dtype)
    cols["flag_saturated"] = footprint_any(masks.SAT) | ((core_or & masks.SAT) != 0)
    cols["flag_edge"] = on_border | footprint_any(masks.EDGE | masks.NO_DATA)
    cols["flag_aperture_trunc"] = trunc
    cols["flag_blended"] = (objs["flag"] & (sep.OBJ_MERGED | sep.OBJ_TRUNC)) != 0
    cols["flag_cr"] = footprint_any(masks.CR | masks.INTRP)
    cols["flag_bad"] = footprint_any(masks.BAD) | ((core_or & masks.BAD) != 0)
    cols["flag_bad_centroid"] = moved | ~np.isfinite(x_err) | ~np.isfinite(y_err)
    cols["flag_nan"] = anynan | ~np.isfinite(cols["fwhm"])
    return cols


def select_psf_stars(cols, mask, *, cfg: CharacterizeConfig, snr):
    """Boolean selection of PSF candidates (isolated, clean, bright, stellar size) and the size mode."""
    from scipy.spatial import cKDTree

    n = len(cols["x"])
    flagged = np.zeros(n, bool)
    for k in FLAG_COLUMNS:
        if k != "flag_psf_failed":
            flagged |= cols[k]
    cand = ~flagged & (snr >= cfg.psf.min_snr) & np.isfinite(cols["fwhm"]) & (cols["fwhm"] > 0)
    if cand.sum() == 0:
        return cand, np.nan
    # size: the mode of the half-light diameters of the bright clean sources
    f = cols["fwhm"][cand]
    lo, hi = np.percentile(f, [2, 98])
    bins = np.linspace(lo, max(hi, lo + 0.1), 30)
    hist, edges = np.histogram(f, bins=bins)
    k = int(np.argmax(hist))
    near = (f >= edges[max(k - 1, 0)]) & (f <= edges[min(k + 2, len(edges) - 1)])
    mode = float(np.median(f[near])) if near.any() else float(np.median(f))
    cand &= np.abs(cols["fwhm"] - mode) < cfg.psf.size_tol * mode
    # isolation: no other detection within isolation * FWHM
    if cfg.psf.isolation > 0 and n > 1:
        tree = cKDTree(np.column_stack([cols["x"], cols["y"]]))
        d, _ = tree.query(np.column_stack([cols["x"], cols["y"]]), k=2)
        cand &= d[:, 1] > cfg.psf.isolation * mode
    # clean stamp: no BAD/SAT/CR/... pixel within the PSF stamp
    h = cfg.psf.stamp_half or max(6, int(math.ceil(2.5 * mode)))
    idx = np.nonzero(cand)[0]
    if len(idx):
        lin, ok, _, _ = _stamp_index(mask.shape, cols["x"][idx], cols["y"][idx], h)
        stamp = np.where(ok, mask.reshape(-1)[lin], masks.NO_DATA)
        clean = ((stamp & BAD_FOR_PSF) == 0).all(axis=(1, 2)) & ok.all(axis=(1, 2))
        cand[idx[~clean]] = False
    idx = np.nonzero(cand)[0]
    if len(idx) > cfg.psf.max_stars:  # keep the brightest
        order = np.argsort(-snr[idx])
        cand[idx[order[cfg.psf.max_stars:]]] = False
    return cand, mode


def psf_photometry(sub, variance, mask, model: PsfModel, x, y, *, radius: float, neighbours: int = 2,
                   exclude=None):
    """Linear PSF flux at fixed centroids; returns ``(flux, err)`` (NaN where impossible).

    With ``neighbours > 0`` the fluxes are refined that many times by
    subtracting every other source's fitted PSF (out to ``NEIGHBOUR_RADIUS``
    FWHM, where the wing of a bright star still biases a faint neighbour's fit):
    ``F_i <- F_i + sum P_i R / sum P_i^2`` with ``R = sub - sum_j F_j P_j`` (Jacobi
    iterations of the simultaneous fit).  Sources in ``exclude`` (e.g. saturated
    ones, whose fitted flux is unreliable) are never subtracted.
    """
    n = len(x)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    fw = float(model.fwhm((sub.shape[1] - 1) / 2, (sub.shape[0] - 1) / 2))
    h = max(2, int(math.ceil(radius * fw)))
    hm = max(h, int(math.ceil(NEIGHBOUR_RADIUS * fw)))
    flux, err = np.full(n, np.nan), np.full(n, np.nan)
    chunks = [slice(start, min(n, start + 4096)) for start in range(0, n, 4096)]  # bounded memory
    fit = []
    for sl in chunks:
        xs, ys = x[sl], y[sl]
        lin, ok, ix, iy = _stamp_index(sub.shape, xs, ys, h)
        d = np.where(ok, sub.reshape(-1)[lin], 0.0)
        v = np.where(ok, variance.reshape(-1)[lin], 0.0)
        good = ok & ((mask.reshape(-1)[lin] & BAD_FOR_PSF_FLUX) == 0) & np.isfinite(d) & np.isfinite(v)
        dx = (ix - xs[:, None])[:, None, :]
        dy = (iy - ys[:, None])[:, :, None]
        good &= (dx * dx + dy * dy) <= (radius * fw) ** 2
        P = model.pixels(dx, dy, xs[:, None, None], ys[:, None, None]) * good
        spp = (P * P).sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            flux[sl] = (P * np.where(good, d, 0.0)).sum(axis=(1, 2)) / spp
            err[sl] = np.sqrt((P * P * np.where(good, v, 0.0)).sum(axis=(1, 2))) / spp
        bad = ~(spp > 0)
        flux[sl][bad] = np.nan
        err[sl][bad] = np.nan
        fit.append((lin, P, spp))
    skip = np.zeros(n, bool) if exclude is None else np.asarray(exclude, bool)
    for _ in range(int(neighbours)):
        use = np.isfinite(flux) & ~skip
        if use.sum() < 2:
            break
        resid = np.asarray(sub, np.float64).copy()
        flat = resid.reshape(-1)
        for sl in chunks:  # subtract every source's PSF out to hm
            k = np.nonzero(use[sl])[0] + sl.start
            if len(k) == 0:
                continue
            xs, ys = x[k], y[k]
            lin, ok, ix, iy = _stamp_index(sub.shape, xs, ys, hm)
            dx = (ix - xs[:, None])[:, None, :]
            dy = (iy - ys[:, None])[:, :, None]
            m = model.pixels(dx, dy, xs[:, None, None], ys[:, None, None]) * flux[k][:, None, None]
            np.subtract.at(flat, lin[ok], m[ok])
        flat = np.where(np.isfinite(flat), flat, 0.0)
        for sl, (lin, P, spp) in zip(chunks, fit):
            with np.errstate(invalid="ignore", divide="ignore"):
                upd = (P * flat[lin]).sum(axis=(1, 2)) / spp
            f = flux[sl]
            flux[sl] = np.where(np.isfinite(upd), f + upd, f)
    return flux, err


#: Radius (in FWHM) out to which neighbours' PSFs are subtracted in :func:`psf_photometry`.
NEIGHBOUR_RADIUS = 4.0


def aperture_clean(seg, x, y, radius: float) -> np.ndarray:
    """True where the circle of ``radius`` px about ``(x, y)`` holds no pixel of another detection.

    ``seg`` is the segmentation map (object ``i`` has label ``i + 1``); the
    circle is taken half a pixel wider so that a pixel it overlaps counts.
    """
    n = len(x)
    if n == 0:
        return np.zeros(0, bool)
    h = int(math.ceil(radius + 0.5))
    lin, ok, ix, iy = _stamp_index(seg.shape, x, y, h)
    inside = ok & ((ix[:, None, :] - x[:, None, None]) ** 2 + (iy[:, :, None] - y[:, None, None]) ** 2
                   <= (radius + 0.5) ** 2)
    lab = np.where(inside, seg.reshape(-1)[lin], 0)
    other = (lab > 0) & (lab != np.arange(1, n + 1)[:, None, None])
    return ~other.any(axis=(1, 2))


def fit_apcorr(x, y, ratio, ratio_err, shape, *, cfg: ApcorrConfig, path: str | None = None):
    """Sigma-clipped polynomial fit of the aperture correction; returns a callable ``(x, y) -> apcorr``.

    Weights ``1 / (ratio_err^2 + APCORR_FLOOR^2)``; stars are clipped on their
    residuals in units of that error, starting from the median ratio, so that a
    bright star with a contaminated aperture (a host galaxy, a neighbour's
    wing) is rejected rather than dominating the weighted fit.
    """
    from .psf import _clipped_polyfit, poly_terms

    ok = np.isfinite(ratio) & np.isfinite(ratio_err) & (ratio_err > 0)
    if ok.sum() < cfg.min_stars:
        raise TooFewStars(f"only {int(ok.sum())} stars for the aperture correction (need {cfg.min_stars})",
                          path=path)
    ny, nx = shape
    hx, hy = max((nx - 1) / 2, 1), max((ny - 1) / 2, 1)
    order = cfg.order
    while order > 0 and ok.sum() < 3 * len(poly_terms(order)):
        order -= 1
    terms = poly_terms(order)
    u, v = (x - (nx - 1) / 2) / hx, (y - (ny - 1) / 2) / hy
    coef, _ = _clipped_polyfit(u[ok], v[ok], ratio[ok], 1.0 / (ratio_err[ok] ** 2 + APCORR_FLOOR ** 2), terms,
                               nsigma=cfg.nsigma, normalized=True)

    def apcorr(xq, yq):
        uq, vq = (np.asarray(xq, float) - (nx - 1) / 2) / hx, (np.asarray(yq, float) - (ny - 1) / 2) / hy
        return sum(c * uq ** i * vq ** j for c, (i, j) in zip(coef, terms))

    return apcorr


@dataclass
class DetectorResult:
    """Everything measured on one detector."""

    catalog: dict  # column -> array
    background: Background | None
    detected: np.ndarray | None
    psf: PsfModel | None
    summary: dict
    status: str = "ok"
    failure_class: str = ""
    failure_message: str = ""
    apcorr_stars: dict | None = None  # x, y, ratio, ratio_err of the aperture-correction stars


def empty_catalog(cfg: CharacterizeConfig) -> dict:
    """Catalog columns with no rows (the schema of a failed detector)."""
    return {name: np.zeros(0, dtype=dt) for name, dt in catalog_dtypes(cfg).items()}


def catalog_dtypes(cfg: CharacterizeConfig) -> dict:
    """Column -> numpy dtype, in catalog order."""
    out = {"source_id": np.int64}
    for k in ("x", "y", "x_err", "y_err", "a", "b", "theta", "fwhm", "peak", "sky", "snr"):
        out[k] = np.float64
    for r in cfg.aperture_radii:
        out[ap_name(r)] = np.float64
        out[ap_name(r) + "_err"] = np.float64
    for k in ("psf_flux", "psf_flux_err", "apcorr", "psf_flux_apcorr", "psf_flux_apcorr_err"):
        out[k] = np.float64
    out["is_psf_star"] = np.bool_
    for k in FLAG_COLUMNS:
        out[k] = np.bool_
    return out


def catalog_units(cfg: CharacterizeConfig) -> dict:
    units = {"x": "pix", "y": "pix", "x_err": "pix", "y_err": "pix", "a": "pix", "b": "pix", "theta": "rad",
             "fwhm": "pix", "peak": "electron", "sky": "electron/pix", "psf_flux": "electron",
             "psf_flux_err": "electron", "psf_flux_apcorr": "electron", "psf_flux_apcorr_err": "electron"}
    for r in cfg.aperture_radii:
        units[ap_name(r)] = units[ap_name(r) + "_err"] = "electron"
    return units


def source_ids(visit: str, detector: int, n: int) -> np.ndarray:
    """Deterministic int64 ids: ``V * 10^9 + detector * 10^6 + index`` (V = visit, or crc32 of it)."""
    v = int(visit) if str(visit).isdigit() and int(visit) < 9_000_000_000 else zlib.crc32(str(visit).encode())
    return (np.int64(v) * np.int64(10**9) + np.int64(detector) * np.int64(10**6)
            + np.arange(n, dtype=np.int64))


def detect_and_measure(image, mask, variance, *, cfg: CharacterizeConfig = CharacterizeConfig()):
    """Background + detection + centroids + aperture photometry + flags (no PSF).

    Returns ``(bkg, sub, objs, seg, cols)``; raises :class:`NoSources`.
    """
    image = np.ascontiguousarray(image, dtype=np.float32)
    variance = np.ascontiguousarray(variance, dtype=np.float32)
    mask = np.ascontiguousarray(mask, dtype=masks.MASK_DTYPE)
    bkg = estimate_background(image, mask, cfg=cfg.background)
    sub = image - bkg.back
    finite = np.isfinite(sub)
    if not finite.all():
        sub = np.where(finite, sub, np.float32(0))
    vpos = variance > 0  # False for NaN too
    bad = ((mask & BAD_FOR_DETECTION) != 0) | ~finite | ~vpos
    try:
        objs, seg = detect(sub, variance, mask, cfg=cfg.detection, bad=bad)
        if len(objs) == 0:
            raise NoSources(f"no source above {cfg.detection.thresh} sigma (minarea {cfg.detection.minarea})")
    except NoSources as exc:
        exc.background = bkg  # the failed detector's product still records its background
        raise
    var = variance if vpos.all() else np.where(vpos, variance, np.float32(0)).astype(np.float32)
    cols = measure_sources(sub, var, mask, objs, seg, cfg=cfg)
    return bkg, sub, var, objs, seg, cols


def characterize_detector(image, mask, variance, *, visit: str = "0", detector: int = 0,
                          cfg: CharacterizeConfig = CharacterizeConfig(), path: str | None = None,
                          wing: tuple[float, float] | None = None, apcorr: float | None = None) -> DetectorResult:
    """Run every step on one detector; failures become a ``failed`` result, never an exception.

    Only :class:`NoSources` and :class:`TooFewStars` are turned into a failed
    result (with an empty catalog); other errors propagate.  ``wing`` (the PSF
    wing fraction and ratio) and ``apcorr`` (a constant aperture correction)
    fix those quantities, e.g. at values pooled over the visit's detectors
    (:func:`characterize_visit`); the stars that would have given the aperture
    correction are kept in ``result.apcorr_stars`` either way.
    """
    bkg = None
    detected = None
    ndetected = 0
    try:
        bkg, sub, var, objs, seg, cols = detect_and_measure(image, mask, variance, cfg=cfg)
        detected = (seg > 0).astype(np.uint8)
        n = ndetected = len(objs)
        ix = np.clip(np.rint(cols["x"]).astype(int), 0, image.shape[1] - 1)
        iy = np.clip(np.rint(cols["y"]).astype(int), 0, image.shape[0] - 1)
        cols["sky"] = bkg.back[iy, ix].astype(np.float64)
        r_snr = min(cfg.aperture_radii, key=lambda r: abs(r - 5.0))
        with np.errstate(invalid="ignore", divide="ignore"):
            ap_snr = cols[ap_name(r_snr)] / cols[ap_name(r_snr) + "_err"]
        ap_snr = np.where(np.isfinite(ap_snr), ap_snr, 0.0)
        cand, mode = select_psf_stars(cols, mask, cfg=cfg, snr=ap_snr)
        if cand.sum() < cfg.psf.min_stars:
            raise TooFewStars(f"{int(cand.sum())} PSF candidates (isolated, unsaturated, unflagged, S/N >= "
                              f"{cfg.psf.min_snr:g}) among {n} sources; need {cfg.psf.min_stars}", path=path)
        idx = np.nonzero(cand)[0]
        usable = (mask & BAD_FOR_PSF) == 0
        model = PsfModel.fit(sub, var, usable, cols["x"][idx], cols["y"][idx], fwhm_guess=mode,
                             order=cfg.psf.order, stamp_half=cfg.psf.stamp_half, min_stars=cfg.psf.min_stars,
                             wing_frac=None if wing is None else wing[0], wing_ratio=None if wing is None else wing[1],
                             segmap=seg, seg_ids=idx + 1, path=path)
        is_psf = np.zeros(n, bool)
        is_psf[idx[np.asarray(model.stars["used"], bool)]] = True
        flux, ferr = psf_photometry(sub, var, mask, model, cols["x"], cols["y"], radius=cfg.psf.fit_radius,
                                    exclude=cols["flag_saturated"])
        big = ap_name(cfg.aperture_radii[-1])
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = cols[big] / flux
            rerr = ratio * np.hypot(cols[big + "_err"] / cols[big], ferr / flux)
        use = is_psf & aperture_clean(seg, cols["x"], cols["y"], cfg.aperture_radii[-1])
        if use.sum() < cfg.apcorr.min_stars:  # crowded: every PSF star, neighbours or not
            use = is_psf
        apcorr_stars = dict(x=cols["x"][use], y=cols["y"][use], ratio=ratio[use], ratio_err=rerr[use])
        if apcorr is None:
            ac = fit_apcorr(cols["x"][use], cols["y"][use], ratio[use], rerr[use], image.shape,
                            cfg=cfg.apcorr, path=path)
        else:
            def ac(xq, yq, _v=float(apcorr)):
                return np.full(np.shape(xq), _v)
        apc = np.asarray(ac(cols["x"], cols["y"]), float) * np.ones(n)
        cols.update(psf_flux=flux, psf_flux_err=ferr, apcorr=apc, psf_flux_apcorr=apc * flux,
                    psf_flux_apcorr_err=apc * ferr, is_psf_star=is_psf)
        with np.errstate(invalid="ignore", divide="ignore"):
            snr = flux / ferr
        cols["snr"] = np.where(np.isfinite(snr), snr, ap_snr)
        cols["flag_psf_failed"] = ~np.isfinite(flux) | ~np.isfinite(ferr)
        cols["flag_nan"] = cols["flag_nan"] | ~np.isfinite(cols["x_err"]) | ~np.isfinite(cols["y_err"])
        cols["source_id"] = source_ids(visit, detector, n)
        dt = catalog_dtypes(cfg)
        catalog = {k: np.asarray(cols[k]).astype(dt[k]) for k in dt}
        xc, yc = (image.shape[1] - 1) / 2.0, (image.shape[0] - 1) / 2.0
        summary = dict(nsource=n, npsfstar=int(model.nstars), psf_fwhm=float(model.fwhm(xc, yc)),
                       psf_ellip=float(model.ellipticity(xc, yc)), apcorr=float(np.asarray(ac(xc, yc))),
                       sky_level=bkg.level, sky_rms=bkg.noise)
        return DetectorResult(catalog, bkg, detected, model, summary, apcorr_stars=apcorr_stars)
    except (NoSources, TooFewStars) as exc:
        bkg = getattr(exc, "background", bkg)
        if detected is None and bkg is not None:
            detected = np.zeros(np.shape(image), np.uint8)
        summary = dict(nsource=0, npsfstar=0, psf_fwhm=float("nan"), psf_ellip=float("nan"),
                       apcorr=float("nan"), sky_level=bkg.level if bkg else float("nan"),
                       sky_rms=bkg.noise if bkg else float("nan"))
        summary["nsource"] = ndetected  # detections, although the failed catalog is empty
        msg = " ".join(str(exc).split())
        return DetectorResult(empty_catalog(cfg), bkg, detected, None, summary, "failed",
                              exc.failure_class, msg)


# -- products ------------------------------------------------------------------------------


def _mjd(date: str) -> float:
    from astropy.time import Time

    try:
        return float(Time(str(date), scale="utc").mjd)
    except (ValueError, TypeError):
        return float("nan")


def catalog_table(res: DetectorResult, meta: Mapping[str, Any], cfg: CharacterizeConfig):
    """The catalog as a ``pyarrow.Table`` with the schema metadata."""
    import pyarrow as pa

    dt = catalog_dtypes(cfg)
    table = pa.table({k: pa.array(np.asarray(res.catalog[k]).astype(dt[k])) for k in dt})
    md = {k: str(v) for k, v in meta.items()}
    md.update(status=res.status, failure_class=res.failure_class, failure_message=res.failure_message,
              psf_fwhm=repr(res.summary["psf_fwhm"]), psf_ellip=repr(res.summary["psf_ellip"]),
              n_psf_stars=str(res.summary["npsfstar"]), apcorr=repr(res.summary["apcorr"]),
              sky_level=repr(res.summary["sky_level"]), sky_rms=repr(res.summary["sky_rms"]),
              units=json.dumps(catalog_units(cfg), sort_keys=True))
    return table.replace_schema_metadata({k.encode(): v.encode() for k, v in md.items()})


def psf_product(res: DetectorResult, primary, cfg: CharacterizeConfig, *, inputs, config):
    """The PSF product HDU list (see the module docstring)."""
    from astropy.io import fits

    from .provenance import add_provenance

    ph = fits.Header()
    for key in ("VISIT", "NIGHT", "DETECTOR", "DETNAME", "INSTRUME", "BAND", "FILTER", "EXPTIME", "DATE-OBS"):
        if key in primary:
            ph[key] = (primary[key], primary.comments[key])

    def num(v):
        return float(v) if np.isfinite(v) else "nan"

    s = res.summary
    ph["PSFFWHM"] = (num(s["psf_fwhm"]), "PSF FWHM at detector centre (px)")
    ph["PSFELLIP"] = (num(s["psf_ellip"]), "PSF ellipticity 1-b/a at detector centre")
    ph["NPSFSTAR"] = (int(s["npsfstar"]), "stars used in the PSF model")
    ph["APCORR"] = (num(s["apcorr"]), "aperture correction at detector centre")
    ph["SKYLEVEL"] = (num(s["sky_level"]), "global background (e-/px)")
    ph["SKYRMS"] = (num(s["sky_rms"]), "global background rms (e-/px)")
    ph["NSOURCE"] = (int(s["nsource"]), "sources detected")
    ph["STATUS"] = (res.status, "ok or failed")
    ph["FAILCLS"] = (res.failure_class, "failure class when STATUS=failed")
    ph["FAILMSG"] = res.failure_message[:60]
    ph["BKGMESH"] = (cfg.background.mesh, "background mesh size (px)")
    ph["BKGFILT"] = (cfg.background.filter, "background mesh median filter")
    add_provenance(ph, step="characterize", inputs=inputs, params=asdict(cfg), config=config)
    hdus = [fits.PrimaryHDU(header=ph)]
    if res.psf is not None:
        hdus += res.psf.to_hdus()
    if res.background is not None:
        b = fits.ImageHDU(res.background.mesh_back.astype(np.float32), name="BACKGROUND")
        b.header["MESH"] = (res.background.mesh, "mesh size (px); values at mesh centres")
        b.header["FILTER"] = (res.background.filter, "median filter of meshes")
        b.header["BUNIT"] = "electron"
        r = fits.ImageHDU(res.background.mesh_rms.astype(np.float32), name="BACKRMS")
        r.header["MESH"] = res.background.mesh
        r.header["BUNIT"] = "electron"
        hdus += [b, r]
    if res.detected is not None:
        d = fits.ImageHDU(res.detected, name="DETECTED")
        d.header["MASKBIT"] = (masks.DETECTED, "1 here = this plane of the MASK")
        hdus.append(d)
    return fits.HDUList(hdus)


def visit_wing(results: Sequence[DetectorResult]) -> tuple[float, float] | None:
    """Median wing fraction and ratio of the free PSF fits of every detector's stars (``None``: fewer than 2
    detectors with a PSF model, nothing to pool)."""
    tabs = [r.psf.stars for r in results if r.status == "ok" and r.psf is not None and r.psf.stars is not None
            and "wing_frac" in r.psf.stars.colnames]
    if len(tabs) < 2:
        return None
    wf = np.concatenate([np.asarray(t["wing_frac"], float) for t in tabs])
    wr = np.concatenate([np.asarray(t["wing_ratio"], float) for t in tabs])
    ok = np.isfinite(wf) & np.isfinite(wr)
    if not ok.any():
        return None
    return float(np.median(wf[ok])), float(np.median(wr[ok]))


def pool_apcorr(results: Sequence[DetectorResult], *, cfg: ApcorrConfig = ApcorrConfig(),
                path: str | None = None) -> float | None:
    """One aperture correction for the visit from every detector's aperture-correction stars.

    Applied in place to the ``ok`` results (``apcorr``, ``psf_flux_apcorr``,
    ``psf_flux_apcorr_err`` columns and ``summary["apcorr"]``); returns the value,
    or ``None`` (per-detector corrections kept) when fewer than 2 detectors
    succeeded or the stars are too few.  Fitted like :func:`fit_apcorr` with
    ``order = 0`` (the detectors' stars share the visit's PSF wing, see
    :func:`visit_wing`).
    """
    ok = [r for r in results if r.status == "ok" and r.apcorr_stars is not None]
    if len(ok) < 2:
        return None
    a = {k: np.concatenate([np.asarray(r.apcorr_stars[k], float) for r in ok]) for k in ("x", "ratio", "ratio_err")}
    try:
        ac = fit_apcorr(a["x"], a["x"] * 0, a["ratio"], a["ratio_err"], (1, 1),
                        cfg=ApcorrConfig(order=0, nsigma=cfg.nsigma, min_stars=cfg.min_stars), path=path)
    except TooFewStars:
        return None
    value = float(np.asarray(ac(0.0, 0.0)))
    for r in ok:
        c = r.catalog
        c["apcorr"] = np.full(len(c["apcorr"]), value)
        c["psf_flux_apcorr"] = value * c["psf_flux"]
        c["psf_flux_apcorr_err"] = value * c["psf_flux_err"]
        r.summary["apcorr"] = value
    return value


def characterize_visit(calexps: Sequence[str | os.PathLike], *, outdir_src, outdir_psf,
                       cfg: CharacterizeConfig = CharacterizeConfig(), threads: int = 1,
                       config: Mapping | None = None) -> list[DetectorResult]:
    """Characterise every calexp of a visit and write all products, all or none.

    Raises
    ------
    NoSources, TooFewStars
        Only when every detector failed (the products are written first).
    """
    import pyarrow.parquet as pq

    from . import __version__, fitsio
    from .provenance import config_hash, git_revision

    def one(path, wing=None):
        image, mask, variance, primary, _ = fitsio.read_exposure(path)
        det = int(primary.get("DETECTOR", 0))
        res = characterize_detector(image, mask, variance, visit=str(primary.get("VISIT", "0")), detector=det,
                                    cfg=cfg, path=str(path), wing=wing)
        return path, primary, res

    paths = [str(p) for p in calexps]
    with ThreadPoolExecutor(max_workers=max(1, int(threads))) as pool:
        results = list(pool.map(one, paths))
        wing = visit_wing([r for _, _, r in results]) if cfg.pool_visit else None
        if wing is not None:  # second pass: every detector's PSF with the visit's wing
            results = list(pool.map(lambda p: one(p, wing), paths))
    if cfg.pool_visit:
        pool_apcorr([r for _, _, r in results], cfg=cfg.apcorr, path=paths[0] if paths else None)
    fits_items, tables = [], []
    for path, primary, res in results:
        stem = Path(path).name
        stem = stem[: -len(".fits")] if stem.endswith(".fits") else Path(path).stem
        date = str(primary.get("DATE-OBS", ""))
        meta = dict(visit=primary.get("VISIT", ""), night=primary.get("NIGHT", ""),
                    detector=primary.get("DETECTOR", ""), band=primary.get("BAND", ""),
                    exptime=primary.get("EXPTIME", ""), date_obs=date, mjd=repr(_mjd(date)),
                    software_version=__version__, git_revision=git_revision(),
                    config_hash=config_hash(config), calexp=Path(path).name)
        tables.append((Path(outdir_src) / f"{stem}.parquet", catalog_table(res, meta, cfg)))
        fits_items.append((Path(outdir_psf) / f"{stem}.fits", psf_product(res, primary, cfg, inputs=[path],
                                                                           config=config)))
        s = res.summary
        log.info("%s: status=%s%s nsources=%d npsfstars=%d fwhm=%.3f px ellip=%.3f apcorr=%.4f sky=%.1f rms=%.2f",
                 Path(path).name, res.status, f" ({res.failure_class}: {res.failure_message})" if res.failure_class
                 else "", s["nsource"], s["npsfstar"], s["psf_fwhm"], s["psf_ellip"], s["apcorr"],
                 s["sky_level"], s["sky_rms"])
    with contextlib.ExitStack() as stack:
        for dest, table in tables:
            tmp = stack.enter_context(fitsio.atomic_path(dest))
            pq.write_table(table, tmp)
        fitsio.write_all(fits_items)
    failed = [(p, r) for p, _, r in results if r.status != "ok"]
    if results and len(failed) == len(results):
        p, r = failed[0]
        cls = {"NoSources": NoSources, "TooFewStars": TooFewStars}.get(r.failure_class, SurveyredError)
        extra = f" (and {len(failed) - 1} more detectors)" if len(failed) > 1 else ""
        cause = r.failure_message.replace(f"{p}: ", "")
        raise cls(f"{p}: every detector failed; {cause}{extra}", path=p)
    return [r for _, _, r in results]


def main(argv: list[str] | None = None) -> int:
    from .runtime import common_arguments, json_arg, run, set_threads, setup_logging

    p = argparse.ArgumentParser(prog="surveyred characterize", description=(
        "Background, detection, PSF model and measurement of one visit's calexps: writes "
        "OUTDIR_SRC/{visit}_{det}.parquet and OUTDIR_PSF/{visit}_{det}.fits per calexp, all or none. "
        "Exits non-zero only when every detector failed."))
    p.add_argument("calexp", nargs="+", help="calibrated exposures (IMAGE, MASK, VARIANCE)")
    p.add_argument("--outdir-src", required=True)
    p.add_argument("--outdir-psf", required=True)
    p.add_argument("--config-json", default=None, help='{"characterize": {...}} as JSON')
    common_arguments(p)
    args = p.parse_args(argv)
    setup_logging(args.log)

    def body():
        set_threads(args.threads)
        doc = json_arg(args.config_json)
        cfg = CharacterizeConfig.from_dict(doc.get("characterize"))
        characterize_visit(args.calexp, outdir_src=args.outdir_src, outdir_psf=args.outdir_psf, cfg=cfg,
                           threads=args.threads, config=doc)

    return run(body, what=f"characterize {len(args.calexp)} calexp(s)")
