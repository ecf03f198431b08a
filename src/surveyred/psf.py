"""Spatially varying PSF model of one detector: :class:`PsfModel`.

The model is analytic: an elliptical double Gaussian (LSST's ``DoubleGaussianPsf``
family, and the family the simulator draws from) whose core covariance varies
across the detector as a polynomial in ``(x, y)``::

    PSF(dx, dy; x, y) = (1 - f) N(d; C(x, y)) + f N(d; w^2 C(x, y))
    C = [[Cxx, Cxy], [Cxy, Cyy]],   Cxx(x, y) = sum_{i+j<=order} a_ij u^i v^j  (same for Cyy, Cxy)
    u = (x - x_c) / h_x,  v = (y - y_c) / h_y           (detector centre, half-size: u, v in [-1, 1])

``f`` (wing fraction) and ``w`` (wing/core width ratio) are constant over the
detector.  The profile is normalised to a unit integral over the plane.  Pixel
values are the profile convolved with the unit pixel box, approximated to
second order by adding ``1/12`` to the diagonal of each component's covariance
(the pixel box's variance); for core sigmas above 1 px the neglected fourth
cumulant changes the FWHM by less than 0.5%.

Fitting (:meth:`PsfModel.fit`): every PSF star's stamp is fitted by weighted
non-linear least squares (flux, centre, local sky, ``Cxx, Cyy, Cxy``, ``f``,
``w``); ``f`` and ``w`` are set to the clipped medians of the stars; the stars
are refitted with ``f, w`` fixed (or ``f, w`` are given, e.g. pooled over a
visit, and only this pass runs); stars whose reduced chi2 is an outlier of the
(iteratively clipped) distribution are dropped (blends, a transient on its host
galaxy); then each covariance term is fitted with the polynomial by weighted
least squares with 3-sigma clipping, the scale at least ``PSF_SIZE_SCATTER`` of
the median variance (stars clipped in any term are dropped from all).  The
order is lowered until there are ``STARS_PER_TERM`` stars per term.

Derived quantities: ``fwhm(x, y)`` is the full width at half maximum of the
circularised profile (core sigma ``s = det(C)^(1/4)``, i.e. the geometric mean of
the principal sigmas): ``fwhm = k(f, w) s`` with ``k`` found by bisection
(``k = 2.3548`` for ``f = 0``).  ``ellipticity(x, y) = 1 - b/a`` with ``a >= b``
the principal sigmas of ``C``.

On disk (:meth:`PsfModel.to_hdus`) the model is the binary table ``PSF``, one
row per polynomial term: ``px``, ``py`` (powers of ``u`` and ``v``), ``cxx``,
``cyy``, ``cxy`` (px^2), with header cards ``PSFMODEL = 'DGAUSS2D'``,
``POLYORD``, ``WINGFRAC``, ``WINGRAT``, ``XCENTER``, ``YCENTER``, ``XHALF``,
``YHALF``, ``DETNX``/``DETNY`` (detector shape), ``NPSFSTAR``; the table
``PSFSTARS`` (one row per star offered to the fit: ``x``, ``y``, ``flux``,
``cxx``, ``cyy``, ``cxy``, ``chi2``, ``wing_frac``, ``wing_ratio`` (of the first,
free pass; NaN for stars not in it), ``used``); and the
image ``PSFIMAGE``, the normalised 25x25 stamp at the detector centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from astropy.table import Table

from .errors import TooFewStars

#: Variance of the unit pixel box, added to each Gaussian (pixel integration to second order).
PIXEL_VAR = 1.0 / 12.0
MODEL_NAME = "DGAUSS2D"
#: Floor of the clipping scale of the stars' core covariances, as a fraction of their median
#: (3% of C is 1.5% in FWHM; 3 x 3% keeps real variation across a detector).
PSF_SIZE_SCATTER = 0.03
#: Usable stars per polynomial term below which the order is lowered (2: a linear model from
#: 6 stars; the real size variation across a detector, several %, outweighs their shape noise).
STARS_PER_TERM = 2


def poly_terms(order: int) -> list[tuple[int, int]]:
    """Powers ``(i, j)`` of ``u^i v^j`` with ``i + j <= order`` (constant first)."""
    return [(i, d - i) for d in range(order + 1) for i in range(d, -1, -1)]


def fwhm_factor(wing_frac: float, wing_ratio: float) -> float:
    """FWHM of the circular double Gaussian in units of its core sigma (bisection).

    Notes
    -----
    Solves ``p(r) = p(0)/2`` with
    ``p(r) = (1 - f) exp(-r^2/2) + f/w^2 exp(-r^2/(2 w^2))``; returns ``2 r``.
    """
    f, w2 = float(wing_frac), float(wing_ratio) ** 2

    def prof(r: float) -> float:
        return (1 - f) * math.exp(-0.5 * r * r) + f / w2 * math.exp(-0.5 * r * r / w2)

    half = 0.5 * prof(0.0)
    lo, hi = 0.0, 20.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if prof(mid) > half else (lo, mid)
    return 2.0 * lo


def _gauss2(dx, dy, cxx, cyy, cxy):
    """Normalised 2-D Gaussian with covariance ``[[cxx, cxy], [cxy, cyy]]`` (broadcasting)."""
    det = cxx * cyy - cxy * cxy
    det = np.where(det > 1e-12, det, 1e-12)
    q = (cyy * dx * dx - 2.0 * cxy * dx * dy + cxx * dy * dy) / det
    return np.exp(-0.5 * q) / (2.0 * np.pi * np.sqrt(det))


def profile_pixels(dx, dy, cxx, cyy, cxy, wing_frac, wing_ratio):
    """Pixel-integrated double-Gaussian values at offsets ``(dx, dy)`` from the centre (unit flux)."""
    w2 = wing_ratio * wing_ratio
    core = _gauss2(dx, dy, cxx + PIXEL_VAR, cyy + PIXEL_VAR, cxy)
    wing = _gauss2(dx, dy, w2 * cxx + PIXEL_VAR, w2 * cyy + PIXEL_VAR, w2 * cxy)
    return (1.0 - wing_frac) * core + wing_frac * wing


def _params_to_cov(p1, p2, p3):
    cxx, cyy = np.exp(2 * p1), np.exp(2 * p2)
    return cxx, cyy, np.tanh(p3) * np.sqrt(cxx * cyy)


def fit_star(stamp, var, ok, x0, y0, *, sigma0, wing_frac=None, wing_ratio=None):
    """Fit one star stamp with the double Gaussian (weighted least squares).

    Parameters
    ----------
    stamp, var : 2-D arrays
        Background-subtracted pixels and their variance; ``ok`` the usable pixels.
    x0, y0 : float
        Start position, in stamp pixel coordinates.
    sigma0 : float
        Start core sigma (px).
    wing_frac, wing_ratio : float, optional
        Fixed wing parameters; free (bounded to [0, 0.5] and [1.2, 4]) when ``None``.

    Returns
    -------
    dict or None
        ``flux, x, y, sky, cxx, cyy, cxy, wing_frac, wing_ratio, chi2``; ``None`` when
        the fit fails.
    """
    from scipy.optimize import least_squares

    ny, nx = stamp.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    good = ok & np.isfinite(stamp) & np.isfinite(var) & (var > 0)
    if good.sum() < 20:
        return None
    d, wt, xg, yg = stamp[good], 1.0 / np.sqrt(var[good]), xx[good].astype(float), yy[good].astype(float)
    free_wing = wing_frac is None
    flux0 = max(float(np.sum(stamp[good])), 1.0)
    ls0 = math.log(sigma0)
    p0 = [flux0, x0, y0, 0.0, ls0, ls0, 0.0]
    lo = [0.0, x0 - 2, y0 - 2, -np.inf, math.log(0.3), math.log(0.3), -3.0]
    hi = [np.inf, x0 + 2, y0 + 2, np.inf, math.log(15.0), math.log(15.0), 3.0]
    if free_wing:
        p0 += [0.1, 2.0]
        lo += [0.0, 1.2]
        hi += [0.5, 4.0]

    def resid(p):
        f, w = (p[7], p[8]) if free_wing else (wing_frac, wing_ratio)
        cxx, cyy, cxy = _params_to_cov(p[4], p[5], p[6])
        m = p[0] * profile_pixels(xg - p[1], yg - p[2], cxx, cyy, cxy, f, w) + p[3]
        return (d - m) * wt

    try:
        res = least_squares(resid, p0, bounds=(lo, hi), x_scale="jac", max_nfev=200)
    except (ValueError, np.linalg.LinAlgError):
        return None
    if not res.success or not np.all(np.isfinite(res.x)):
        return None
    p = res.x
    cxx, cyy, cxy = _params_to_cov(p[4], p[5], p[6])
    f, w = (p[7], p[8]) if free_wing else (wing_frac, wing_ratio)
    return dict(flux=p[0], x=p[1], y=p[2], sky=p[3], cxx=cxx, cyy=cyy, cxy=cxy, wing_frac=f, wing_ratio=w,
                chi2=float(np.sum(res.fun ** 2) / max(good.sum() - len(p), 1)))


def _clipped_polyfit(u, v, values, weights, terms, nsigma=3.0, iters=5, normalized=False, min_scale=0.0):
    """Weighted polynomial fit with sigma clipping; returns (coeffs, kept mask).

    The clipping scale is the MAD of the residuals, or with ``normalized`` of the
    residuals times ``sqrt(weights)`` (weights = 1/sigma^2: a precise point far off
    the fit is rejected even when imprecise points scatter more); the first pass
    then measures the residuals from the median of the values, so that one
    precise outlier cannot pull the first fit onto itself and hide.
    """
    A = np.stack([u ** i * v ** j for i, j in terms], axis=1)
    keep = np.isfinite(values) & np.isfinite(weights) & (weights > 0)
    coef = np.zeros(len(terms))
    for it in range(iters):
        sw = np.sqrt(weights[keep])
        coef, *_ = np.linalg.lstsq(A[keep] * sw[:, None], values[keep] * sw, rcond=None)
        r = values - A @ coef
        if normalized and it == 0 and terms[0] == (0, 0):
            r = values - np.median(values[keep])
        if normalized:
            r = r * np.sqrt(np.where(np.isfinite(weights), weights, 0.0))
        mad = max(1.4826 * np.median(np.abs(r[keep] - np.median(r[keep]))), min_scale)
        if not np.isfinite(mad) or mad == 0:
            break
        new = keep & (np.abs(r) < nsigma * mad)
        if new.sum() == keep.sum() or new.sum() < len(terms) + 1:
            break
        keep = new
    return coef, keep


@dataclass(frozen=True)
class PsfModel:
    """Elliptical double-Gaussian PSF with polynomial covariance across a detector.

    Attributes
    ----------
    terms : tuple of (int, int)
        Powers of ``u`` and ``v`` of each polynomial term.
    coeffs : ndarray, shape (3, nterms)
        Coefficients of ``Cxx, Cyy, Cxy`` (px^2).
    wing_frac, wing_ratio : float
        ``f`` and ``w`` of the profile.
    shape : (ny, nx)
        Detector shape; ``u, v`` are scaled to [-1, 1] over it.
    nstars : int
        Stars used in the fit.
    stars : astropy.table.Table or None
        The stars offered to the fit (see module docstring).
    """

    terms: tuple
    coeffs: np.ndarray
    wing_frac: float
    wing_ratio: float
    shape: tuple
    nstars: int = 0
    stars: Table | None = field(default=None, compare=False, repr=False)

    @property
    def order(self) -> int:
        return max(i + j for i, j in self.terms)

    def _uv(self, x, y):
        ny, nx = self.shape
        hx, hy = max((nx - 1) / 2.0, 1.0), max((ny - 1) / 2.0, 1.0)
        return (np.asarray(x, float) - (nx - 1) / 2.0) / hx, (np.asarray(y, float) - (ny - 1) / 2.0) / hy

    def covariance(self, x, y):
        """Core covariance ``(Cxx, Cyy, Cxy)`` (px^2) at detector position(s) ``(x, y)``."""
        u, v = self._uv(x, y)
        basis = [u ** i * v ** j for i, j in self.terms]
        out = [sum(c * b for c, b in zip(self.coeffs[k], basis)) for k in range(3)]
        cxx, cyy = np.maximum(out[0], 0.05), np.maximum(out[1], 0.05)
        lim = 0.99 * np.sqrt(cxx * cyy)
        return cxx, cyy, np.clip(out[2], -lim, lim)

    def fwhm(self, x, y):
        """FWHM (px) of the circularised profile at ``(x, y)``: ``k(f, w) det(C)^(1/4)``."""
        cxx, cyy, cxy = self.covariance(x, y)
        return fwhm_factor(self.wing_frac, self.wing_ratio) * (cxx * cyy - cxy * cxy) ** 0.25

    def ellipticity(self, x, y):
        """``1 - b/a`` of the core covariance at ``(x, y)``."""
        cxx, cyy, cxy = self.covariance(x, y)
        tr, det = cxx + cyy, cxx * cyy - cxy * cxy
        disc = np.sqrt(np.maximum(0.25 * tr * tr - det, 0.0))
        l1, l2 = 0.5 * tr + disc, np.maximum(0.5 * tr - disc, 1e-12)
        return 1.0 - np.sqrt(l2 / l1)

    def pixels(self, dx, dy, x, y):
        """Unit-flux pixel values at offsets ``(dx, dy)`` from a source at ``(x, y)`` (broadcasting)."""
        cxx, cyy, cxy = self.covariance(x, y)
        return profile_pixels(dx, dy, np.asarray(cxx), np.asarray(cyy), np.asarray(cxy),
                              self.wing_frac, self.wing_ratio)

    def evaluate(self, x, y, size: int = 25, *, dx: float = 0.0, dy: float = 0.0, normalize: bool = True):
        """PSF stamp ``(size, size)`` for a source at ``(x, y)``, centred on the middle pixel (+ dx, dy).

        ``normalize=True`` scales the stamp to sum 1; otherwise the values are
        those of the unit-integral profile (the stamp misses the flux beyond it).
        """
        if size < 3 or size % 2 == 0:
            raise ValueError(f"size must be odd and >= 3, not {size}")
        h = size // 2
        off = np.arange(-h, h + 1, dtype=float)
        stamp = self.pixels(off[None, :] - dx, off[:, None] - dy, float(x), float(y))
        return stamp / stamp.sum() if normalize else stamp

    # -- fitting ---------------------------------------------------------------------

    @classmethod
    def fit(cls, image, variance, usable, x, y, *, fwhm_guess: float, order: int = 2, stamp_half: int = 0,
            min_stars: int = 5, nsigma: float = 3.0, first_pass_stars: int = 30, chi2_floor: float = 0.1,
            wing_frac: float | None = None, wing_ratio: float | None = None, segmap=None, seg_ids=None,
            path: str | None = None) -> "PsfModel":
        """Fit the model to stars at ``(x, y)`` of a background-subtracted image.

        Parameters
        ----------
        image, variance : 2-D arrays
            Background-subtracted image (e-) and its variance (e^2).
        usable : 2-D bool array
            Pixels that may enter the fit (no BAD/SAT/CR/NO_DATA...).
        x, y : arrays
            Centroids of the selected PSF stars (0-based pixels).
        fwhm_guess : float
            Starting FWHM (px).
        order : int
            Polynomial order; lowered automatically to the highest order with at
            least ``STARS_PER_TERM`` stars per coefficient (at least ``min_stars`` in all).
        stamp_half : int
            Stamp half-size (px); 0 = ``max(6, ceil(2.5 fwhm_guess))``.
        min_stars : int
            Fewer usable stars than this raises :class:`TooFewStars`.
        wing_frac, wing_ratio : float, optional
            Fixed wing parameters (e.g. pooled over a visit); fitted when ``None``.
        segmap, seg_ids : optional
            Segmentation map and each star's label in it: pixels of other
            detections are left out of a star's fit.
        chi2_floor : float
            Stars whose reduced chi2 exceeds the (iteratively clipped) median by
            ``nsigma`` times ``max(1.4826 MAD, chi2_floor * median)`` are dropped
            (blends, cosmic rays, a neighbour's halo).
        first_pass_stars : int
            The brightest stars fitted with free wing parameters (their medians
            fix ``f`` and ``w`` for the second pass over all stars).

        Raises
        ------
        TooFewStars
            When fewer than ``min_stars`` stars give a successful fit.
        """
        image = np.asarray(image, dtype=np.float64)
        ny, nx = image.shape
        x, y = np.asarray(x, float), np.asarray(y, float)
        h = int(stamp_half) or max(6, int(math.ceil(2.5 * fwhm_guess)))
        sigma0 = fwhm_guess / 2.3548
        cut = []
        for xi, yi in zip(x, y):
            ix, iy = int(round(xi)), int(round(yi))
            if ix - h < 0 or iy - h < 0 or ix + h >= nx or iy + h >= ny:
                cut.append(None)
                continue
            sl = (slice(iy - h, iy + h + 1), slice(ix - h, ix + h + 1))
            cut.append((sl, xi - (ix - h), yi - (iy - h), ix - h, iy - h))

        def fit_all(wf, wr, which=None):
            rows = []
            for i, c in enumerate(cut):
                r = None
                if c is not None and (which is None or which[i]):
                    ok = usable[c[0]]
                    if segmap is not None:  # other detections' pixels stay out of this star's fit
                        lab = segmap[c[0]]
                        ok = ok & ((lab == 0) | (lab == seg_ids[i]))
                    r = fit_star(image[c[0]], variance[c[0]], ok, c[1], c[2], sigma0=sigma0,
                                 wing_frac=wf, wing_ratio=wr)
                rows.append(r)
            return rows

        # the wing parameters are global: the first pass (all free) uses the brightest stars only
        free_wf, free_wr = np.full(len(x), np.nan), np.full(len(x), np.nan)
        if wing_frac is None or wing_ratio is None:
            bright = np.array([np.nansum(image[c[0]]) if c is not None else -np.inf for c in cut])
            which = np.zeros(len(cut), bool)
            which[np.argsort(-bright)[:first_pass_stars]] = True
            first = fit_all(None, None, which)
            okf = [r for r in first if r is not None]
            if len(okf) < min(min_stars, which.sum()):
                raise TooFewStars(f"only {len(okf)} of {len(x)} PSF candidates could be fitted (need {min_stars})",
                                  path=path)
            for i, r in enumerate(first):
                if r is not None:
                    free_wf[i], free_wr[i] = r["wing_frac"], r["wing_ratio"]
            wf = float(np.median([r["wing_frac"] for r in okf]))
            wr = float(np.median([r["wing_ratio"] for r in okf]))
        else:
            wf, wr = float(wing_frac), float(wing_ratio)
        second = fit_all(wf, wr)
        good = np.array([r is not None for r in second])
        nan = np.full(len(x), np.nan)
        cols = {k: nan.copy() for k in ("flux", "cxx", "cyy", "cxy", "chi2", "xfit", "yfit")}
        for i, r in enumerate(second):
            if r is None:
                continue
            for k in ("flux", "cxx", "cyy", "cxy", "chi2"):
                cols[k][i] = r[k]
            cols["xfit"][i] = r["x"] + cut[i][3]
            cols["yfit"][i] = r["y"] + cut[i][4]
        # a blend, a cosmic ray or a neighbour's halo in the stamp shows as a poor fit (reduced chi2
        # well above the stars'); such a star drags a low-order polynomial everywhere and is masked
        # from the (non-robust) first polynomial fit, so it is rejected here
        # (iterated: when several stamps are spoiled the first median and MAD are inflated)
        chi2 = cols["chi2"]
        fine = good.copy()
        for _ in range(5 if good.sum() > min_stars else 0):
            med = float(np.median(chi2[fine]))
            scale = max(1.4826 * float(np.median(np.abs(chi2[fine] - med))), chi2_floor * med)
            new = good & (chi2 <= med + nsigma * scale)
            if new.sum() < min_stars or np.array_equal(new, fine):
                break
            fine = new
        if fine.sum() >= min_stars:
            good = fine
        n_ok = int(good.sum())
        while order > 0 and n_ok < STARS_PER_TERM * len(poly_terms(order)):
            order -= 1
        if n_ok < min_stars:
            raise TooFewStars(f"only {n_ok} of {len(x)} PSF candidates could be fitted (need {min_stars})",
                              path=path)
        terms = poly_terms(order)
        proto = cls(tuple(terms), np.zeros((3, len(terms))), wf, wr, (ny, nx))
        u, v = proto._uv(cols["xfit"], cols["yfit"])
        weights = np.where(good, np.clip(cols["flux"], 0, None), 0.0)
        weights = np.sqrt(weights)  # shape noise ~ 1/SNR ~ 1/sqrt(flux) for bright stars
        keep = good.copy()
        coeffs = np.zeros((3, len(terms)))
        # clipping scale at least PSF_SIZE_SCATTER of the median core variance: with a handful of
        # stars the MAD can be tiny and would reject real PSF variation the polynomial misses
        c_med = float(np.median(0.5 * (cols["cxx"][good] + cols["cyy"][good])))
        for _ in range(2):
            new_keep = keep.copy()
            for k, key in enumerate(("cxx", "cyy", "cxy")):
                vals = np.where(keep, cols[key], np.nan)
                coeffs[k], kk = _clipped_polyfit(np.where(keep, u, 0), np.where(keep, v, 0), vals,
                                                 np.where(keep, weights, 0.0), terms, nsigma=nsigma,
                                                 min_scale=PSF_SIZE_SCATTER * c_med)
                new_keep &= kk
            if new_keep.sum() == keep.sum() or new_keep.sum() < min_stars:
                break
            keep = new_keep
        nused = int(keep.sum())
        if nused < min_stars:
            raise TooFewStars(f"only {nused} PSF stars survive clipping (need {min_stars})", path=path)
        stars = Table(dict(x=x, y=y, flux=cols["flux"], cxx=cols["cxx"], cyy=cols["cyy"], cxy=cols["cxy"],
                           chi2=cols["chi2"], wing_frac=free_wf, wing_ratio=free_wr, used=keep))
        return cls(tuple(terms), coeffs, wf, wr, (ny, nx), nused, stars)

    # -- I/O -------------------------------------------------------------------------

    def to_hdus(self) -> list:
        """``[PSF table, PSFSTARS table, PSFIMAGE]`` HDUs (see the module docstring)."""
        ny, nx = self.shape
        px = np.array([i for i, _ in self.terms], dtype=np.int16)
        py = np.array([j for _, j in self.terms], dtype=np.int16)
        t = fits.BinTableHDU(Table(dict(px=px, py=py, cxx=self.coeffs[0], cyy=self.coeffs[1], cxy=self.coeffs[2])),
                             name="PSF")
        h = t.header
        h["PSFMODEL"] = (MODEL_NAME, "double Gaussian, polynomial covariance")
        h["POLYORD"] = (self.order, "polynomial order in u, v")
        h["WINGFRAC"] = (float(self.wing_frac), "flux fraction f of the wide Gaussian")
        h["WINGRAT"] = (float(self.wing_ratio), "width ratio w of wide/core Gaussian")
        h["XCENTER"] = ((nx - 1) / 2.0, "u = (x - XCENTER) / XHALF, x 0-based px")
        h["YCENTER"] = ((ny - 1) / 2.0, "v = (y - YCENTER) / YHALF, y 0-based px")
        h["XHALF"] = (max((nx - 1) / 2.0, 1.0), "px")
        h["YHALF"] = (max((ny - 1) / 2.0, 1.0), "px")
        h["DETNX"] = (nx, "detector NAXIS1 (px)")
        h["DETNY"] = (ny, "detector NAXIS2 (px)")
        h["NPSFSTAR"] = (int(self.nstars), "stars used in the fit")
        h["PIXVAR"] = (PIXEL_VAR, "pixel-box variance added to each Gaussian")
        stars = self.stars if self.stars is not None else Table(
            dict(x=[], y=[], flux=[], cxx=[], cyy=[], cxy=[], chi2=[], used=np.zeros(0, bool)))
        s = fits.BinTableHDU(Table(stars, copy=True), name="PSFSTARS")
        img = fits.ImageHDU(self.evaluate((nx - 1) / 2.0, (ny - 1) / 2.0, 25).astype(np.float32), name="PSFIMAGE")
        img.header["COMMENT"] = "normalised PSF stamp at the detector centre"
        return [t, s, img]

    @classmethod
    def from_hdus(cls, hdul) -> "PsfModel":
        """Rebuild a model from an HDU list holding the ``PSF`` (and ``PSFSTARS``) HDUs."""
        h = hdul["PSF"].header
        d = hdul["PSF"].data
        terms = tuple((int(i), int(j)) for i, j in zip(d["px"], d["py"]))
        coeffs = np.stack([np.asarray(d[k], float) for k in ("cxx", "cyy", "cxy")])
        stars = Table(hdul["PSFSTARS"].data) if "PSFSTARS" in hdul else None
        return cls(terms, coeffs, float(h["WINGFRAC"]), float(h["WINGRAT"]),
                   (int(h["DETNY"]), int(h["DETNX"])), int(h.get("NPSFSTAR", 0)), stars)

    def write(self, path) -> None:
        """Write the model alone (PRIMARY + PSF HDUs), atomically."""
        from .fitsio import write_hdulist

        write_hdulist(fits.HDUList([fits.PrimaryHDU(), *self.to_hdus()]), path)

    @classmethod
    def read(cls, path) -> "PsfModel":
        """Read a model from a psf product (or a file written by :meth:`write`)."""
        from .fitsio import open_fits

        with open_fits(path) as hdul:
            if "PSF" not in hdul:
                from .errors import CorruptInput

                raise CorruptInput("has no PSF HDU (characterize failed for this detector?)", path=path)
            return cls.from_hdus(hdul)
