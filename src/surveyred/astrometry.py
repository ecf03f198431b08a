"""Astrometric calibration: pattern matching to a reference catalog and a TAN-SIP fit.

Steps (:func:`calibrate_astrometry`)
------------------------------------
1. **Selection**: sources with finite centroids, no ``flag_*`` set and
   ``snr >= snr_min``; the ``n_pattern`` brightest are used for the pattern
   search.  Reference stars inside the detector footprint (header WCS, padded
   by ``max_offset_arcsec``) are projected to pixels through the header WCS;
   the ``2 n_pattern`` brightest are kept.
2. **Pattern match** (:func:`match_pattern`): a search over rotations
   ``|theta| <= max_rotation_deg`` in steps of ``rotation_step_deg`` (about the
   detector centre); for each trial rotation every (detection, reference)
   pair votes for its pixel offset in a 2-D histogram of ``vote_bin_px``
   bins (counts summed over 2x2 neighbouring bins), offsets limited to
   ``max_offset_arcsec``.  The trial with the highest peak wins when that
   peak exceeds the random-coincidence level ``lambda + 6 sqrt(lambda) + 4``
   (``lambda`` = mean count per summed bin); otherwise :class:`NoReferenceMatch`.
   This is a Hough transform of the similarity (scale known from the header)
   and is robust to shifts of arcminutes and rotations of degrees: it needs
   only a handful of common stars and no triangle invariants.
3. **Iterative matching and fit**: the pattern pairs give a first linear
   (order-1) solution; then, repeatedly, every selected source is mapped to
   the tangent plane, matched to its nearest reference star (unique pairs,
   radius shrinking from ``initial_radius_arcsec`` to
   ``max(match_radius_arcsec, 5 rms)``), the TAN-SIP is refitted
   (:func:`fit_tan_sip`) and residuals beyond ``nsigma`` robust sigmas are
   rejected, until the match set stops changing.
4. **Quality**: fewer than ``min_matches`` pairs -> :class:`TooFewMatches`;
   rms above ``max_rms_mas`` -> :class:`PoorAstrometricFit`.

The TAN-SIP fit
---------------
With ``u = x + 1 - CRPIX1``, ``v = y + 1 - CRPIX2`` (``x, y`` 0-based) and
``(xi, eta)`` the gnomonic standard coordinates of the reference stars about
``CRVAL`` (deg), each coordinate is a linear least-squares fit of a full
polynomial of order ``N``::

    xi  = sum_{p+q<=N} c_pq u^p v^q ,   eta = sum_{p+q<=N} d_pq u^p v^q

``CRVAL`` is moved to the sky position of the constant term and the fit is
repeated until the constant vanishes (|c_00| < 1e-10 deg).  The linear terms
give the CD matrix, and the higher ones the SIP polynomials
``(A, B) = CD^-1 (c, d)_{p+q>=2}``, exactly the FITS SIP convention
(``intermediate = CD (u + A(u, v), v + B(u, v))``).  The inverse
polynomials ``AP``/``BP`` (order ``N + 1``) are fitted on a pixel grid so that
other software can go from sky to pixel without iterating.  The header that
:meth:`SipWcs.to_header` writes evaluates identically in ``astropy.wcs``.

Astrometric scatter ``rms_mas`` is the per-coordinate rms of the
(measured - reference) offsets of the matches kept:
``sqrt(mean(dxi^2 + deta^2) / 2)``, in mas.

:func:`register_exposures` is relative astrometry without a reference
catalog: every catalog is matched (same vote + iterative matching, in pixels)
to the first one and an affine transform is fitted.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from .errors import ConfigError, NoReferenceMatch, PoorAstrometricFit, TooFewMatches
from .sky import tan_deproject, tan_project

log = logging.getLogger("surveyred.astrometry")

MAS_PER_DEG = 3.6e6


# -- configuration ----------------------------------------------------------------------


@dataclass(frozen=True)
class AstrometryConfig:
    """Options of :func:`calibrate_astrometry` (see the module docstring)."""

    order: int = 3
    snr_min: float = 10.0
    n_pattern: int = 60
    max_offset_arcsec: float = 90.0
    max_rotation_deg: float = 1.0
    rotation_step_deg: float = 0.05
    vote_bin_px: float = 2.0
    initial_radius_arcsec: float = 3.0
    match_radius_arcsec: float = 1.0
    nsigma: float = 3.0
    max_iter: int = 10
    min_matches: int = 8
    max_rms_mas: float = 200.0
    ref_err_floor_mas: float = 1.0

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any] | None) -> "AstrometryConfig":
        try:
            return cls(**dict(doc or {})).validate()
        except TypeError as exc:
            raise ConfigError(f"calibrate.astrometry: {exc}") from exc

    def validate(self) -> "AstrometryConfig":
        if not 1 <= self.order <= 7:
            raise ConfigError(f"calibrate.astrometry.order must be 1..7, got {self.order}")
        if self.min_matches < 3 or self.n_pattern < 3:
            raise ConfigError("calibrate.astrometry: min_matches and n_pattern must be >= 3")
        for name in ("max_offset_arcsec", "rotation_step_deg", "vote_bin_px", "initial_radius_arcsec",
                     "match_radius_arcsec", "nsigma", "max_rms_mas"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"calibrate.astrometry.{name} must be > 0")
        if self.max_rotation_deg < 0 or self.max_iter < 1:
            raise ConfigError("calibrate.astrometry: max_rotation_deg >= 0 and max_iter >= 1 required")
        return self


# -- projections -------------------------------------------------------------------------




def monomials(order: int, *, min_order: int = 0) -> list[tuple[int, int]]:
    """Exponents ``(p, q)`` with ``min_order <= p + q <= order`` (by total order, then p descending)."""
    return [(n - q, q) for n in range(min_order, order + 1) for q in range(n + 1)]


def _design(u, v, terms, scale: float) -> np.ndarray:
    us, vs = np.asarray(u, float) / scale, np.asarray(v, float) / scale
    return np.stack([us ** p * vs ** q for p, q in terms], axis=1)


# -- the WCS --------------------------------------------------------------------------


@dataclass(frozen=True)
class SipWcs:
    """A TAN or TAN-SIP WCS of 0-based pixel coordinates.

    ``crpix`` is 1-based (FITS); ``a``/``b`` map ``(p, q)`` to SIP
    coefficients (pixels), ``ap``/``bp`` the inverse ones.
    """

    crval: tuple[float, float]
    crpix: tuple[float, float]
    cd: np.ndarray
    a: dict = field(default_factory=dict)
    b: dict = field(default_factory=dict)
    ap: dict = field(default_factory=dict)
    bp: dict = field(default_factory=dict)
    order: int = 1

    # pixel <-> intermediate ----------------------------------------------------------
    def _uv(self, x, y):
        return np.asarray(x, float) + 1.0 - self.crpix[0], np.asarray(y, float) + 1.0 - self.crpix[1]

    def _distort(self, u, v):
        du = sum((c * u ** p * v ** q for (p, q), c in self.a.items()), np.zeros_like(u))
        dv = sum((c * u ** p * v ** q for (p, q), c in self.b.items()), np.zeros_like(v))
        return u + du, v + dv

    def pixel_to_sky(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """RA, Dec (deg) of 0-based pixel positions."""
        u, v = self._uv(x, y)
        up, vp = self._distort(u, v)
        xi = self.cd[0, 0] * up + self.cd[0, 1] * vp
        eta = self.cd[1, 0] * up + self.cd[1, 1] * vp
        return tan_deproject(xi, eta, *self.crval)

    def sky_to_pixel(self, ra, dec) -> tuple[np.ndarray, np.ndarray]:
        """0-based pixel positions of sky positions (fixed-point inversion of the SIP)."""
        xi, eta = tan_project(ra, dec, *self.crval)
        inv = np.linalg.inv(self.cd)
        up = inv[0, 0] * xi + inv[0, 1] * eta
        vp = inv[1, 0] * xi + inv[1, 1] * eta
        u, v = up.copy(), vp.copy()
        if self.a or self.b:
            for _ in range(50):
                du, dv = self._distort(u, v)
                un, vn = u - (du - up), v - (dv - vp)
                done = np.nanmax(np.abs(np.concatenate([un - u, vn - v]))) < 1e-10 if np.size(u) else True
                u, v = un, vn
                if done:
                    break
        return u + self.crpix[0] - 1.0, v + self.crpix[1] - 1.0

    @property
    def pixel_scale_arcsec(self) -> float:
        return float(math.sqrt(abs(np.linalg.det(self.cd))) * 3600.0)

    # FITS ------------------------------------------------------------------------
    def to_header(self, header=None):
        """FITS cards (``astropy.io.fits.Header``): TAN, or TAN-SIP with A/B and AP/BP."""
        from astropy.io import fits

        h = fits.Header() if header is None else header
        sip = bool(self.a or self.b)
        suffix = "-SIP" if sip else ""
        h["WCSAXES"] = 2
        h["CTYPE1"] = "RA---TAN" + suffix
        h["CTYPE2"] = "DEC--TAN" + suffix
        h["CUNIT1"], h["CUNIT2"] = "deg", "deg"
        h["CRVAL1"], h["CRVAL2"] = float(self.crval[0]), float(self.crval[1])
        h["CRPIX1"], h["CRPIX2"] = float(self.crpix[0]), float(self.crpix[1])
        for i in range(2):
            for j in range(2):
                h[f"CD{i + 1}_{j + 1}"] = float(self.cd[i, j])
        for key in ("PC1_1", "PC1_2", "PC2_1", "PC2_2", "CDELT1", "CDELT2", "CROTA1", "CROTA2"):
            h.remove(key, ignore_missing=True, remove_all=True)
        h["RADESYS"] = "ICRS"
        for key in list(h.keys()):
            if key.split("_")[0] in ("A", "B", "AP", "BP") and ("_" in key):
                del h[key]
        if sip:
            h["A_ORDER"] = self.order
            for (p, q), c in sorted(self.a.items()):
                h[f"A_{p}_{q}"] = float(c)
            h["B_ORDER"] = self.order
            for (p, q), c in sorted(self.b.items()):
                h[f"B_{p}_{q}"] = float(c)
            if self.ap:
                h["AP_ORDER"] = max(p + q for p, q in self.ap)
                for (p, q), c in sorted(self.ap.items()):
                    h[f"AP_{p}_{q}"] = float(c)
                h["BP_ORDER"] = max(p + q for p, q in self.bp)
                for (p, q), c in sorted(self.bp.items()):
                    h[f"BP_{p}_{q}"] = float(c)
        return h

    @classmethod
    def from_header(cls, header) -> "SipWcs":
        """Read a celestial TAN/TAN-SIP WCS (CD, PC+CDELT or CROTA forms) through astropy."""
        import warnings

        from astropy.wcs import WCS, FITSFixedWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            w = WCS(header, relax=True)
        if not w.has_celestial or "TAN" not in (w.wcs.ctype[0] + w.wcs.ctype[1]):
            raise ConfigError("header holds no TAN celestial WCS")
        if w.wcs.has_cd():
            cd = np.array(w.wcs.cd)
        else:
            cd = np.array(w.wcs.get_pc()) * np.asarray(w.wcs.cdelt)[:, None]
        a, b, order = {}, {}, 1
        if w.sip is not None:
            order = int(w.sip.a_order)
            a = {(p, q): float(w.sip.a[p, q]) for p in range(order + 1) for q in range(order + 1 - p)
                 if w.sip.a[p, q] != 0}
            b = {(p, q): float(w.sip.b[p, q]) for p in range(order + 1) for q in range(order + 1 - p)
                 if w.sip.b[p, q] != 0}
        return cls(crval=(float(w.wcs.crval[0]), float(w.wcs.crval[1])),
                   crpix=(float(w.wcs.crpix[0]), float(w.wcs.crpix[1])), cd=cd, a=a, b=b, order=order)

    def rotated_shifted(self, *, dra_arcsec: float = 0.0, ddec_arcsec: float = 0.0, rot_deg: float = 0.0) -> "SipWcs":
        """A copy with CRVAL moved (RA offset times cos dec) and the CD matrix rotated (tests)."""
        t = math.radians(rot_deg)
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        ra = self.crval[0] + dra_arcsec / 3600.0 / math.cos(math.radians(self.crval[1]))
        return dataclasses.replace(self, crval=(ra, self.crval[1] + ddec_arcsec / 3600.0), cd=rot @ self.cd)


def fit_tan_sip(x, y, ra, dec, *, crpix: tuple[float, float], crval: tuple[float, float], order: int = 3,
                weights=None, shape: tuple[int, int] | None = None, fit_inverse: bool = True) -> SipWcs:
    """Linear least-squares TAN-SIP fit of 0-based pixels to sky positions.

    Parameters
    ----------
    x, y : array
        0-based pixel positions.
    ra, dec : array
        Reference positions (deg).
    crpix : (float, float)
        1-based reference pixel (kept fixed).
    crval : (float, float)
        Starting tangent point; moved so that ``crpix`` maps onto it.
    order : int
        Polynomial order (1 = plain TAN with a CD matrix).
    weights : array, optional
        Per-star weights (1 / sigma^2).
    shape : (ny, nx), optional
        Detector shape for the inverse (AP/BP) fit grid; default from the data range.

    Notes
    -----
    See the module docstring: full polynomials in ``(u, v)`` fitted to the
    standard coordinates, then ``CD`` = linear terms and
    ``(A, B) = CD^-1 (higher terms)``.
    """
    x, y, ra, dec = (np.asarray(v, float) for v in (x, y, ra, dec))
    terms = monomials(order)
    if len(x) < len(terms):
        raise TooFewMatches(f"{len(x)} stars cannot constrain an order-{order} fit ({len(terms)} terms)")
    u, v = x + 1.0 - crpix[0], y + 1.0 - crpix[1]
    scale = max(float(np.max(np.abs(np.concatenate([u, v])))), 1.0)
    w = np.ones_like(x) if weights is None else np.asarray(weights, float)
    sw = np.sqrt(w / np.mean(w))
    design = _design(u, v, terms, scale) * sw[:, None]
    ra0, dec0 = float(crval[0]), float(crval[1])
    for _ in range(10):
        xi, eta = tan_project(ra, dec, ra0, dec0)
        cx = np.linalg.lstsq(design, xi * sw, rcond=None)[0]
        cy = np.linalg.lstsq(design, eta * sw, rcond=None)[0]
        if abs(cx[0]) < 1e-10 and abs(cy[0]) < 1e-10:
            break
        ra0, dec0 = (float(t[0]) for t in tan_deproject(np.array([cx[0]]), np.array([cy[0]]), ra0, dec0))
    cx = cx / np.array([scale ** (p + q) for p, q in terms])
    cy = cy / np.array([scale ** (p + q) for p, q in terms])
    idx = {t: i for i, t in enumerate(terms)}
    cd = np.array([[cx[idx[(1, 0)]], cx[idx[(0, 1)]]], [cy[idx[(1, 0)]], cy[idx[(0, 1)]]]])
    inv = np.linalg.inv(cd)
    a, b = {}, {}
    for t in terms:
        if t[0] + t[1] >= 2:
            a[t] = float(inv[0, 0] * cx[idx[t]] + inv[0, 1] * cy[idx[t]])
            b[t] = float(inv[1, 0] * cx[idx[t]] + inv[1, 1] * cy[idx[t]])
    wcs = SipWcs(crval=(ra0, dec0), crpix=(float(crpix[0]), float(crpix[1])), cd=cd, a=a, b=b, order=order)
    if order >= 2 and fit_inverse:
        wcs = dataclasses.replace(wcs, **_fit_inverse(wcs, x, y, shape, order + 1))
    return wcs


def _fit_inverse(wcs: SipWcs, x, y, shape, order: int) -> dict:
    """AP/BP: u = U + AP(U, V) on a 40x40 grid over the detector (U, V: undistorted pixels)."""
    if shape is not None:
        x0, x1, y0, y1 = -0.5, shape[1] - 0.5, -0.5, shape[0] - 0.5
    else:
        x0, x1, y0, y1 = float(np.min(x)), float(np.max(x)), float(np.min(y)), float(np.max(y))
    gx, gy = np.meshgrid(np.linspace(x0, x1, 40), np.linspace(y0, y1, 40))
    u, v = wcs._uv(gx.ravel(), gy.ravel())
    up, vp = wcs._distort(u, v)
    terms = monomials(order)
    scale = max(float(np.max(np.abs(np.concatenate([up, vp])))), 1.0)
    m = _design(up, vp, terms, scale)
    norm = np.array([scale ** (p + q) for p, q in terms])
    ca = np.linalg.lstsq(m, u - up, rcond=None)[0] / norm
    cb = np.linalg.lstsq(m, v - vp, rcond=None)[0] / norm
    return {"ap": {t: float(c) for t, c in zip(terms, ca)}, "bp": {t: float(c) for t, c in zip(terms, cb)}}


# -- matching -----------------------------------------------------------------------------


def nn_match(x1, y1, x2, y2, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique nearest-neighbour pairs within ``radius``: indices into set 1 and 2 and distances.

    Each element of set 2 keeps only its closest element of set 1.
    """
    if len(x1) == 0 or len(x2) == 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    tree = cKDTree(np.column_stack([x2, y2]))
    d, j = tree.query(np.column_stack([x1, y1]), distance_upper_bound=radius)
    ok = np.isfinite(d)
    i1, i2, dd = np.nonzero(ok)[0], j[ok], d[ok]
    order = np.argsort(dd, kind="stable")
    _, first = np.unique(i2[order], return_index=True)
    keep = order[first]
    keep = keep[np.argsort(i1[keep])]
    return i1[keep], i2[keep], dd[keep]


@dataclass(frozen=True)
class PatternMatch:
    """The similarity found by :func:`match_pattern`: ``ref ~ R(theta) (det - centre) + centre + shift``."""

    rotation_deg: float
    shift: tuple[float, float]
    votes: int
    threshold: float
    centre: tuple[float, float]

    def apply(self, x, y):
        t = math.radians(self.rotation_deg)
        c, s = math.cos(t), math.sin(t)
        dx, dy = np.asarray(x, float) - self.centre[0], np.asarray(y, float) - self.centre[1]
        return (c * dx - s * dy + self.centre[0] + self.shift[0], s * dx + c * dy + self.centre[1] + self.shift[1])


def match_pattern(det_x, det_y, ref_x, ref_y, *, max_shift: float, max_rotation_deg: float,
                  rotation_step_deg: float, bin_size: float, centre: tuple[float, float] | None = None
                  ) -> PatternMatch | None:
    """Rotation search + 2-D offset voting (a Hough transform of the similarity).

    Returns ``None`` when no trial's peak rises above the random-coincidence
    threshold ``lambda + 6 sqrt(lambda) + 4`` (``lambda``: mean count per
    2x2-summed bin).  Units are those of the inputs (pixels).
    """
    det_x, det_y, ref_x, ref_y = (np.asarray(v, float) for v in (det_x, det_y, ref_x, ref_y))
    if len(det_x) < 3 or len(ref_x) < 3:
        return None
    if centre is None:
        centre = (float(np.mean(det_x)), float(np.mean(det_y)))
    nb = int(math.ceil(2 * max_shift / bin_size))
    edges = -max_shift + bin_size * np.arange(nb + 1)
    n_rot = int(math.floor(max_rotation_deg / rotation_step_deg + 1e-9))
    angles = rotation_step_deg * np.arange(-n_rot, n_rot + 1)
    best = None
    for ang in angles:
        pm = PatternMatch(float(ang), (0.0, 0.0), 0, 0.0, centre)
        rx, ry = pm.apply(det_x, det_y)
        dx = (ref_x[None, :] - rx[:, None]).ravel()
        dy = (ref_y[None, :] - ry[:, None]).ravel()
        ok = (np.abs(dx) < max_shift) & (np.abs(dy) < max_shift)
        h, _, _ = np.histogram2d(dx[ok], dy[ok], bins=[edges, edges])
        h2 = h[:-1, :-1] + h[1:, :-1] + h[:-1, 1:] + h[1:, 1:]
        k = int(np.argmax(h2))
        i, j = np.unravel_index(k, h2.shape)
        peak = float(h2[i, j])
        lam = 4.0 * ok.sum() / max(h.size, 1)
        if best is None or peak > best[0]:
            # refine the shift: mean of the offsets in the winning 2x2 bins
            sel = ok & (dx >= edges[i]) & (dx < edges[i + 2]) & (dy >= edges[j]) & (dy < edges[j + 2])
            best = (peak, float(ang), float(np.median(dx[sel])), float(np.median(dy[sel])), lam)
    peak, ang, sx, sy, lam = best
    threshold = lam + 6.0 * math.sqrt(lam) + 4.0
    if peak < threshold:
        return None
    return PatternMatch(ang, (sx, sy), int(peak), float(threshold), centre)


# -- the calibration -------------------------------------------------------------------


@dataclass
class AstrometryResult:
    """What :func:`calibrate_astrometry` found.

    ``matches``: one row per kept pair: ``src_index`` (row of the input
    sources), ``ref_index`` (row of the refcat), ``ref_id``, ``dxi_mas``,
    ``deta_mas`` (measured - reference, standard coordinates).
    """

    wcs: SipWcs
    matches: pd.DataFrame
    rms_mas: float
    n_match: int
    order: int
    pattern: PatternMatch | None
    n_iter: int


def select_sources(sources: pd.DataFrame, *, snr_min: float) -> np.ndarray:
    """Boolean mask of sources usable for calibration: finite centroid, no flag, S/N above ``snr_min``."""
    ok = np.isfinite(sources["x"].to_numpy(float)) & np.isfinite(sources["y"].to_numpy(float))
    for c in sources.columns:
        if c.startswith("flag_"):
            ok &= ~sources[c].to_numpy(bool)
    if "snr" in sources:
        ok &= np.nan_to_num(sources["snr"].to_numpy(float)) >= snr_min
    return ok


def _brightness(sources: pd.DataFrame) -> np.ndarray:
    for c in ("psf_flux_apcorr", "psf_flux", "ap_flux_r05", "snr", "flux"):
        if c in sources:
            return np.nan_to_num(sources[c].to_numpy(float), nan=-np.inf)
    return np.zeros(len(sources))


def ref_magnitude(refcat: pd.DataFrame, band: str | None = None) -> np.ndarray:
    """The refcat magnitude used to rank stars: ``<band>_mag`` or the first magnitude column."""
    cols = [c for c in refcat.columns if c.endswith("_mag")]
    if band and f"{band}_mag" in refcat:
        return refcat[f"{band}_mag"].to_numpy(float)
    for c in cols:
        m = refcat[c].to_numpy(float)
        if np.isfinite(m).any():
            return m
    return np.zeros(len(refcat))


def _position_sigma_mas(sources: pd.DataFrame, idx: np.ndarray, scale_arcsec: float) -> np.ndarray:
    if "x_err" in sources and "y_err" in sources:
        ex = sources["x_err"].to_numpy(float)[idx]
        ey = sources["y_err"].to_numpy(float)[idx]
        s = np.sqrt(0.5 * (ex ** 2 + ey ** 2)) * scale_arcsec * 1000.0
        good = np.isfinite(s) & (s > 0)
        if good.any():
            return np.where(good, s, np.nanmedian(s[good]))
    return np.full(len(idx), 10.0)


def calibrate_astrometry(sources: pd.DataFrame, refcat: pd.DataFrame, header_wcs: SipWcs, *,
                         shape: tuple[int, int], config: AstrometryConfig = AstrometryConfig(),
                         ref_band: str | None = None, what: str = "detector") -> AstrometryResult:
    """Fit a TAN-SIP WCS of one detector from its sources and a reference catalog.

    Parameters
    ----------
    sources : DataFrame
        ``x``, ``y`` (0-based), optionally ``x_err``, ``y_err``, ``snr``,
        ``psf_flux_apcorr`` and ``flag_*`` columns.
    refcat : DataFrame
        ``ra``, ``dec`` at the exposure epoch, ``ra_err``, ``dec_err`` (mas),
        magnitudes ``<band>_mag``.
    header_wcs : SipWcs
        The starting WCS (may be off by tens of arcsec and ~1 degree).
    shape : (ny, nx)
        Detector shape.

    Raises
    ------
    NoReferenceMatch
        No reference star in the footprint, or no pattern found.
    TooFewMatches
        Fewer than ``config.min_matches`` matched pairs.
    PoorAstrometricFit
        rms above ``config.max_rms_mas``.
    """
    cfg = config.validate()
    ny, nx = shape
    scale = header_wcs.pixel_scale_arcsec
    if len(refcat) == 0:
        raise NoReferenceMatch(f"{what}: no reference stars in the field")
    rx, ry = header_wcs.sky_to_pixel(refcat["ra"].to_numpy(float), refcat["dec"].to_numpy(float))
    pad = cfg.max_offset_arcsec / scale
    inside = (rx > -pad) & (rx < nx + pad) & (ry > -pad) & (ry < ny + pad)
    if inside.sum() < 3:
        raise NoReferenceMatch(f"{what}: {int(inside.sum())} reference stars in the detector footprint")
    usable = select_sources(sources, snr_min=cfg.snr_min)
    src_idx = np.nonzero(usable)[0]
    if len(src_idx) < cfg.min_matches:
        raise TooFewMatches(f"{what}: only {len(src_idx)} usable sources (S/N >= {cfg.snr_min}, unflagged)")
    sx, sy = sources["x"].to_numpy(float), sources["y"].to_numpy(float)
    bright = src_idx[np.argsort(-_brightness(sources)[src_idx], kind="stable")][: cfg.n_pattern]
    ref_in = np.nonzero(inside)[0]
    mag = np.nan_to_num(ref_magnitude(refcat, ref_band)[ref_in], nan=99.0)
    ref_bright = ref_in[np.argsort(mag, kind="stable")][: 2 * cfg.n_pattern]
    pm = match_pattern(sx[bright], sy[bright], rx[ref_bright], ry[ref_bright], max_shift=pad,
                       max_rotation_deg=cfg.max_rotation_deg, rotation_step_deg=cfg.rotation_step_deg,
                       bin_size=cfg.vote_bin_px, centre=((nx - 1) / 2.0, (ny - 1) / 2.0))
    if pm is None:
        raise NoReferenceMatch(f"{what}: no pattern matches {len(bright)} sources to "
                               f"{len(ref_bright)} reference stars")
    log.info("%s: pattern rotation %.3f deg, shift (%.1f, %.1f) px, %d votes (threshold %.1f)",
             what, pm.rotation_deg, pm.shift[0], pm.shift[1], pm.votes, pm.threshold)
    px, py = pm.apply(sx[bright], sy[bright])
    i1, i2, _ = nn_match(px, py, rx[ref_bright], ry[ref_bright], 2.0 * cfg.vote_bin_px)
    if len(i1) < 3:
        raise NoReferenceMatch(f"{what}: pattern found but only {len(i1)} pairs confirm it")
    crpix = header_wcs.crpix
    if math.hypot(crpix[0] - nx / 2, crpix[1] - ny / 2) > 5 * math.hypot(nx, ny):
        crpix = ((nx + 1) / 2.0, (ny + 1) / 2.0)
    ra_ref, dec_ref = refcat["ra"].to_numpy(float), refcat["dec"].to_numpy(float)
    wcs = fit_tan_sip(sx[bright[i1]], sy[bright[i1]], ra_ref[ref_bright[i2]], dec_ref[ref_bright[i2]],
                      crpix=crpix, crval=header_wcs.crval, order=1)
    ref_err = np.hypot(np.nan_to_num(refcat.get("ra_err", pd.Series(0.0, index=refcat.index)).to_numpy(float)),
                       np.nan_to_num(refcat.get("dec_err", pd.Series(0.0, index=refcat.index)).to_numpy(float)))
    ref_err = np.sqrt(0.5 * ref_err ** 2 + cfg.ref_err_floor_mas ** 2)
    sig_src = _position_sigma_mas(sources, src_idx, scale)
    radius = cfg.initial_radius_arcsec
    keep_prev = None
    order = 1
    rms = float("nan")
    it = 0
    for it in range(1, cfg.max_iter + 1):
        ra_s, dec_s = wcs.pixel_to_sky(sx[src_idx], sy[src_idx])
        xi_s, eta_s = tan_project(ra_s, dec_s, *wcs.crval)
        xi_r, eta_r = tan_project(ra_ref[ref_in], dec_ref[ref_in], *wcs.crval)
        j1, j2, _ = nn_match(xi_s * 3600, eta_s * 3600, xi_r * 3600, eta_r * 3600, radius)
        # the highest order the matches support (>= 3 stars per coefficient)
        order = cfg.order
        while order > 1 and len(j1) < 3 * len(monomials(order)):
            order -= 1
        if len(j1) < max(cfg.min_matches, len(monomials(order))):
            raise TooFewMatches(f"{what}: {len(j1)} matches within {radius:.2f} arcsec "
                                f"(need {cfg.min_matches})")
        s_i, r_i = src_idx[j1], ref_in[j2]
        sig = np.hypot(sig_src[j1], ref_err[r_i])
        keep = np.ones(len(j1), bool)
        for _ in range(5):  # fit + clip at fixed match set
            wcs = fit_tan_sip(sx[s_i[keep]], sy[s_i[keep]], ra_ref[r_i[keep]], dec_ref[r_i[keep]], crpix=crpix,
                              crval=wcs.crval, order=order, weights=1.0 / sig[keep] ** 2, shape=shape,
                              fit_inverse=False)
            ra_f, dec_f = wcs.pixel_to_sky(sx[s_i], sy[s_i])
            dxi, deta = tan_project(ra_f, dec_f, *wcs.crval)
            xr, er = tan_project(ra_ref[r_i], dec_ref[r_i], *wcs.crval)
            chi = np.hypot((dxi - xr) * MAS_PER_DEG, (deta - er) * MAS_PER_DEG) / sig / math.sqrt(2)
            robust = 1.4826 * np.median(chi[keep]) / 0.8326 if keep.sum() else 1.0  # median of a Rayleigh
            new = chi < cfg.nsigma * max(robust, 1e-6)
            if np.array_equal(new, keep) or new.sum() < len(monomials(order)):
                break
            keep = new
        res = np.concatenate([(dxi - xr)[keep], (deta - er)[keep]]) * MAS_PER_DEG
        rms = float(np.sqrt(np.mean(res ** 2)))
        radius = max(cfg.match_radius_arcsec, 5.0 * rms / 1000.0)
        key = (tuple(s_i[keep]), order)
        if key == keep_prev:
            break
        keep_prev = key
    if keep.sum() < cfg.min_matches:
        raise TooFewMatches(f"{what}: {int(keep.sum())} matches after clipping (need {cfg.min_matches})")
    wcs = fit_tan_sip(sx[s_i[keep]], sy[s_i[keep]], ra_ref[r_i[keep]], dec_ref[r_i[keep]], crpix=crpix,
                      crval=wcs.crval, order=order, weights=1.0 / sig[keep] ** 2, shape=shape)
    ra_f, dec_f = wcs.pixel_to_sky(sx[s_i[keep]], sy[s_i[keep]])
    xs_, es_ = tan_project(ra_f, dec_f, *wcs.crval)
    xr, er = tan_project(ra_ref[r_i[keep]], dec_ref[r_i[keep]], *wcs.crval)
    dxi, deta = (xs_ - xr) * MAS_PER_DEG, (es_ - er) * MAS_PER_DEG
    rms = float(np.sqrt(np.mean(np.concatenate([dxi, deta]) ** 2)))
    ids = refcat["id"].to_numpy() if "id" in refcat else np.arange(len(refcat))
    matches = pd.DataFrame({"src_index": s_i[keep], "ref_index": r_i[keep], "ref_id": ids[r_i[keep]],
                            "dxi_mas": dxi, "deta_mas": deta})
    log.info("%s: order-%d TAN-SIP from %d matches, rms %.1f mas (%d iterations)", what, order, len(matches),
             rms, it)
    if rms > cfg.max_rms_mas:
        raise PoorAstrometricFit(f"{what}: astrometric rms {rms:.0f} mas exceeds {cfg.max_rms_mas:.0f} mas "
                                 f"({len(matches)} matches)")
    return AstrometryResult(wcs=wcs, matches=matches, rms_mas=rms, n_match=len(matches), order=order, pattern=pm,
                            n_iter=it)


# -- relative astrometry (no reference catalog) --------------------------------------------


@dataclass(frozen=True)
class AffineTransform:
    """``(x', y') = M (x, y) + t`` mapping a catalog's pixels onto the reference catalog's."""

    matrix: np.ndarray
    offset: np.ndarray
    rms_px: float = float("nan")
    n_match: int = 0

    def apply(self, x, y):
        x, y = np.asarray(x, float), np.asarray(y, float)
        return (self.matrix[0, 0] * x + self.matrix[0, 1] * y + self.offset[0],
                self.matrix[1, 0] * x + self.matrix[1, 1] * y + self.offset[1])

    @property
    def rotation_deg(self) -> float:
        return math.degrees(math.atan2(self.matrix[1, 0] - self.matrix[0, 1], self.matrix[0, 0] + self.matrix[1, 1]))


def _fit_affine(x, y, xr, yr) -> tuple[np.ndarray, np.ndarray]:
    m = np.column_stack([x, y, np.ones_like(x)])
    cx = np.linalg.lstsq(m, xr, rcond=None)[0]
    cy = np.linalg.lstsq(m, yr, rcond=None)[0]
    return np.array([[cx[0], cx[1]], [cy[0], cy[1]]]), np.array([cx[2], cy[2]])


def register_catalog(cat: pd.DataFrame, ref: pd.DataFrame, *, max_shift_px: float = 300.0,
                     max_rotation_deg: float = 1.0, rotation_step_deg: float = 0.05, n_pattern: int = 60,
                     match_radius_px: float = 1.5, nsigma: float = 3.0, snr_min: float = 10.0,
                     min_matches: int = 6, what: str = "catalog") -> AffineTransform:
    """Affine transform mapping ``cat`` pixels onto ``ref`` pixels (pattern vote, then iterative NN + clipping)."""
    def pick(t):
        idx = np.nonzero(select_sources(t, snr_min=snr_min))[0]
        return idx[np.argsort(-_brightness(t)[idx], kind="stable")]

    ic, ir = pick(cat), pick(ref)
    cx, cy = cat["x"].to_numpy(float), cat["y"].to_numpy(float)
    rx, ry = ref["x"].to_numpy(float), ref["y"].to_numpy(float)
    if len(ic) < 3 or len(ir) < 3:
        raise NoReferenceMatch(f"{what}: too few usable sources to register ({len(ic)}, {len(ir)})")
    b1, b2 = ic[:n_pattern], ir[: 2 * n_pattern]
    pm = match_pattern(cx[b1], cy[b1], rx[b2], ry[b2], max_shift=max_shift_px, max_rotation_deg=max_rotation_deg,
                       rotation_step_deg=rotation_step_deg, bin_size=2.0)
    if pm is None:
        raise NoReferenceMatch(f"{what}: no pattern matches the reference exposure")
    px, py = pm.apply(cx[ic], cy[ic])
    j1, j2, _ = nn_match(px, py, rx[ir], ry[ir], 4.0)
    if len(j1) < 3:
        raise NoReferenceMatch(f"{what}: pattern not confirmed ({len(j1)} pairs)")
    mat, off = _fit_affine(cx[ic[j1]], cy[ic[j1]], rx[ir[j2]], ry[ir[j2]])
    rms = float("nan")
    keep = np.ones(len(j1), bool)
    for _ in range(10):
        t = AffineTransform(mat, off)
        px, py = t.apply(cx[ic], cy[ic])
        j1, j2, d = nn_match(px, py, rx[ir], ry[ir], match_radius_px)
        if len(j1) < min_matches:
            raise TooFewMatches(f"{what}: {len(j1)} common stars (need {min_matches})")
        keep = d < nsigma * max(1.4826 * np.median(d) / 0.8326, 1e-6)
        new = _fit_affine(cx[ic[j1[keep]]], cy[ic[j1[keep]]], rx[ir[j2[keep]]], ry[ir[j2[keep]]])
        done = np.allclose(new[0], mat, atol=1e-10) and np.allclose(new[1], off, atol=1e-7)
        mat, off = new
        if done:
            break
    t = AffineTransform(mat, off)
    px, py = t.apply(cx[ic[j1[keep]]], cy[ic[j1[keep]]])
    rms = float(np.sqrt(np.mean(np.concatenate([px - rx[ir[j2[keep]]], py - ry[ir[j2[keep]]]]) ** 2)))
    return AffineTransform(mat, off, rms, int(keep.sum()))


def register_exposures(catalogs: Sequence[pd.DataFrame], *, reference: int = 0, **kwargs) -> list[AffineTransform]:
    """Relative astrometry: the affine transform of every catalog onto catalog ``reference``.

    For fields without reference stars (e.g. CAHA NGC 2420 offline): each
    catalog (``x``, ``y``, brightness and flag columns as for
    :func:`calibrate_astrometry`) is pattern-matched to the reference
    exposure's catalog and an affine transform fitted with clipping.  The
    reference's own transform is the identity.
    """
    out = []
    for k, cat in enumerate(catalogs):
        if k == reference:
            out.append(AffineTransform(np.eye(2), np.zeros(2), 0.0, int(len(cat))))
        else:
            out.append(register_catalog(cat, catalogs[reference], what=f"catalog {k}", **kwargs))
    return out
