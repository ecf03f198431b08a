"""Cosmic-ray detection by sharpness: no PSF can make a pixel that peaked.

:func:`find_cosmic_rays` flags pixels that stand above the background by
``nsigma`` standard deviations *and* are sharper, against at least one pair of
opposite neighbours, than a Gaussian PSF of width ``psf_sigma`` can make any
pixel (in the spirit of LSST's ``findCosmicRays``; written from the
description, not the code).  The flags are grown, neighbours of the grown
flags are tested again with the flagged pixels left out of the neighbour
means (catching wide tracks and charge shared between pixels), and the
result is grown again.

Every step is a per-pixel test reading a fixed input, so the numba kernels
(parallel over rows) give the same mask for any thread count, and the
vectorised NumPy reference :func:`find_cosmic_rays_ref` gives the same mask
exactly (the same float64 operations in the same order).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .. import masks
from ..runtime import set_threads

__all__ = ["DEFAULT_IGNORE", "find_cosmic_rays", "find_cosmic_rays_ref"]

#: Mask planes whose pixels are never candidates, never used as neighbours and
#: never flagged.
DEFAULT_IGNORE = masks.SAT | masks.BAD | masks.NO_DATA
_CR = masks.CR

# opposite-neighbour pairs: (dy, dx) of one member; the other is (-dy, -dx)
_PAIRS = ((0, 1), (1, 0), (1, 1), (1, -1))


# -- kernels ----------------------------------------------------------------------

@numba.njit(cache=True, nogil=True)
def _value(img, var, mask, bkg, bkg_scalar, ignore, y, x):
    """(usable, d, variance) of pixel (y, x)."""
    if mask[y, x] & ignore:
        return False, 0.0, 0.0
    b = bkg[0, 0] if bkg_scalar else bkg[y, x]
    d = np.float64(img[y, x]) - b
    v = np.float64(var[y, x])
    if not (np.isfinite(d) and np.isfinite(v) and v >= 0.0):
        return False, 0.0, 0.0
    return True, d, v


@numba.njit(cache=True, nogil=True)
def _sharp(img, var, mask, bkg, bkg_scalar, ignore, y, x, lhs, cond, r_axis, r_diag, excl, use_excl):
    """Whether pixel (y, x) with ``lhs = d - cond*sigma`` is sharper than the PSF
    against any pair of opposite neighbours (members flagged in ``excl`` are
    left out of the pair mean when ``use_excl``)."""
    for p in range(4):
        if p == 0:
            dy, dx, r = 0, 1, r_axis
        elif p == 1:
            dy, dx, r = 1, 0, r_axis
        elif p == 2:
            dy, dx, r = 1, 1, r_diag
        else:
            dy, dx, r = 1, -1, r_diag
        oka, da, va = _value(img, var, mask, bkg, bkg_scalar, ignore, y - dy, x - dx)
        okb, db, vb = _value(img, var, mask, bkg, bkg_scalar, ignore, y + dy, x + dx)
        if not (oka and okb):
            continue
        ina = True
        inb = True
        if use_excl:
            ina = excl[y - dy, x - dx] == 0
            inb = excl[y + dy, x + dx] == 0
        if ina and inb:
            mean = (da + db) * 0.5
            s = np.sqrt(va + vb) * 0.5
        elif ina:
            mean = da
            s = np.sqrt(va)
        elif inb:
            mean = db
            s = np.sqrt(vb)
        else:
            continue
        if lhs > r * (mean + cond * s):
            return True
    return False


@numba.njit(cache=True, nogil=True)
def _first_row(y, img, var, mask, bkg, bkg_scalar, ignore, nsigma, cond, r_axis, r_diag, out):
    nx = img.shape[1]
    # cheap pre-filter: d|d| < nsigma^2 v (1 - 1e-6) rules a pixel out with room
    # to spare for rounding (and rules out d <= 0 for v > 0 without a branch
    # on the sign of d); the exact test below decides for the rest
    thr2 = nsigma * nsigma * (1.0 - 1e-6)
    b = bkg[0, 0]
    for x in range(1, nx - 1):
        if not bkg_scalar:
            b = bkg[y, x]
        d = np.float64(img[y, x]) - b
        if d * np.abs(d) < thr2 * np.float64(var[y, x]):
            continue
        ok, d, v = _value(img, var, mask, bkg, bkg_scalar, ignore, y, x)
        if not ok:
            continue
        sig = np.sqrt(v)
        if not d > nsigma * sig:
            continue
        if _sharp(img, var, mask, bkg, bkg_scalar, ignore, y, x, d - cond * sig, cond, r_axis, r_diag,
                  out, False):
            out[y, x] = 1


@numba.njit(cache=True, nogil=True)
def _or_rows(src, y, grow, acc):
    """``acc[x]`` = OR of ``src`` over rows ``y-grow..y+grow``, columns ``x-grow..x+grow``."""
    ny, nx = src.shape
    y0 = max(0, y - grow)
    y1 = min(ny, y + grow + 1)
    for x in range(nx):
        a = src[y0, x]
        for yy in range(y0 + 1, y1):
            a |= src[yy, x]
        acc[x] = a
    if grow == 0:
        return
    # horizontal dilation: a left-to-right sweep marks columns within `grow`
    # after a set column, a right-to-left sweep those within `grow` before one
    # (bit 1: set in the vertical OR, bit 2: reached by a sweep)
    last = -grow - 1
    for x in range(nx):
        if acc[x] & 1:
            last = x
        if x - last <= grow:
            acc[x] |= 2
    nxt = nx + grow
    for x in range(nx - 1, -1, -1):
        if acc[x] & 1:
            nxt = x
        if nxt - x <= grow:
            acc[x] |= 2
    for x in range(nx):
        acc[x] = acc[x] >> 1


@numba.njit(cache=True, nogil=True)
def _second_row(y, img, var, mask, bkg, bkg_scalar, ignore, nsigma, cond, r_axis, r_diag, grown, out, acc):
    nx = img.shape[1]
    _or_rows(grown, y, 1, acc)  # 8-connected neighbourhood of the grown mask
    for x in range(1, nx - 1):
        if not acc[x] or grown[y, x]:
            continue
        ok, d, v = _value(img, var, mask, bkg, bkg_scalar, ignore, y, x)
        if not ok:
            continue
        sig = np.sqrt(v)
        if not d > nsigma * sig:
            continue
        if _sharp(img, var, mask, bkg, bkg_scalar, ignore, y, x, d - cond * sig, cond, r_axis, r_diag,
                  grown, True):
            out[y, x] = 1


@numba.njit(cache=True, nogil=True)
def _grow_row(y, src, grow, mask, ignore, value, out, acc):
    """Row ``y`` of the square (8-connected) dilation of ``src`` by ``grow``:
    ``value`` where any pixel within ``grow`` is set, except on ignored pixels."""
    _or_rows(src, y, grow, acc)
    for x in range(src.shape[1]):
        out[y, x] = value if (acc[x] != 0 and (mask[y, x] & ignore) == 0) else 0


@numba.njit(cache=True, nogil=True)
def _find_serial(img, var, mask, bkg, bkg_scalar, ignore, nsigma, cond, r_axis, r_diag, grow, out):
    ny, nx = img.shape
    first = np.zeros((ny, nx), dtype=np.uint8)
    grown = np.zeros((ny, nx), dtype=np.uint8)
    acc = np.empty(nx, dtype=np.uint8)
    for y in range(1, ny - 1):
        _first_row(y, img, var, mask, bkg, bkg_scalar, ignore, nsigma, cond, r_axis, r_diag, first)
    for y in range(ny):
        _grow_row(y, first, grow, mask, 0, np.uint8(1), grown, acc)
    for y in range(1, ny - 1):
        _second_row(y, img, var, mask, bkg, bkg_scalar, ignore, nsigma, cond, r_axis, r_diag, grown, first, acc)
    for y in range(ny):
        _grow_row(y, first, grow, mask, ignore, np.int32(_CR), out, acc)


@numba.njit(cache=True, nogil=True, parallel=True)
def _find_parallel(img, var, mask, bkg, bkg_scalar, ignore, nsigma, cond, r_axis, r_diag, grow, out):
    ny, nx = img.shape
    first = np.zeros((ny, nx), dtype=np.uint8)
    grown = np.zeros((ny, nx), dtype=np.uint8)
    for y in numba.prange(1, ny - 1):
        _first_row(np.int64(y), img, var, mask, bkg, bkg_scalar, ignore, nsigma, cond, r_axis, r_diag, first)
    for y in numba.prange(ny):
        acc = np.empty(nx, dtype=np.uint8)
        _grow_row(np.int64(y), first, grow, mask, 0, np.uint8(1), grown, acc)
    # the second pass reads `grown` and adds to `first` only where `grown` is 0
    for y in numba.prange(1, ny - 1):
        acc = np.empty(nx, dtype=np.uint8)
        _second_row(np.int64(y), img, var, mask, bkg, bkg_scalar, ignore, nsigma, cond, r_axis, r_diag,
                    grown, first, acc)
    for y in numba.prange(ny):
        acc = np.empty(nx, dtype=np.uint8)
        _grow_row(np.int64(y), first, grow, mask, ignore, np.int32(_CR), out, acc)


# -- wrapper ----------------------------------------------------------------------

def _prepare(image, variance, mask, background, psf_sigma, nsigma, cond, grow, ignore_bits):
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {img.shape}")
    var = np.asarray(variance)
    msk = np.asarray(mask)
    if var.shape != img.shape or msk.shape != img.shape:
        raise ValueError(f"image {img.shape}, variance {var.shape} and mask {msk.shape} differ in shape")
    if not (np.issubdtype(msk.dtype, np.integer) or msk.dtype == np.bool_):
        raise TypeError(f"mask must hold integer bit planes, got dtype {msk.dtype}")
    psf_sigma = float(psf_sigma)
    nsigma = float(nsigma)
    cond = float(cond)
    if not (psf_sigma > 0 and np.isfinite(psf_sigma)):
        raise ValueError(f"psf_sigma must be positive, got {psf_sigma}")
    if not (nsigma > 0 and np.isfinite(nsigma)):
        raise ValueError(f"nsigma must be positive, got {nsigma}")
    if not (cond >= 0 and np.isfinite(cond)):
        raise ValueError(f"cond must be >= 0, got {cond}")
    if int(grow) != grow or grow < 0:
        raise ValueError(f"grow must be a non-negative integer, got {grow!r}")
    ignore = int(ignore_bits)
    img = np.ascontiguousarray(img, dtype=np.float32)
    var = np.ascontiguousarray(var, dtype=np.float32)
    msk = np.ascontiguousarray(msk, dtype=np.int32)
    if background is None:
        usable = img[((msk & ignore) == 0) & np.isfinite(img)]  # a copy, so partition it in place
        bkg = np.array([[float(np.median(usable, overwrite_input=True))]]) if usable.size else np.zeros((1, 1))
        scalar = True
    elif np.ndim(background) == 0:
        bkg = np.array([[float(background)]])
        scalar = True
    else:
        bkg = np.ascontiguousarray(background, dtype=np.float64)
        if bkg.shape != img.shape:
            raise ValueError(f"background must be a scalar or have the image's shape {img.shape}, got {bkg.shape}")
        scalar = False
    r_axis = math.exp(1.0 / (2.0 * psf_sigma ** 2))
    r_diag = math.exp(2.0 / (2.0 * psf_sigma ** 2))
    return img, var, msk, bkg, scalar, ignore, nsigma, cond, r_axis, r_diag, int(grow)


def find_cosmic_rays(image, variance, mask, *, background=None, psf_sigma=1.0, nsigma=6.0, cond=3.0,
                     grow=1, ignore_bits=DEFAULT_IGNORE, threads=1):
    """Cosmic-ray mask of an image: pixels sharper than the PSF allows.

    Parameters
    ----------
    image, variance : array_like, 2-D
        Image and its variance (same units, e.g. electrons and electrons^2);
        used as float32.
    mask : array_like of int, 2-D
        Mask bit planes; pixels with any of ``ignore_bits`` are neither tested
        nor used as neighbours nor flagged.
    background : float or array_like, optional
        Background subtracted before testing (scalar or the image's shape);
        default: the median of the image over pixels not in ``ignore_bits``.
    psf_sigma : float
        Gaussian sigma (pixels) of the sharpest PSF expected.
    nsigma : float
        Detection threshold of a candidate, in its own standard deviations.
    cond : float
        Noise allowance (in standard deviations) of the sharpness test.
    grow : int
        Radius (pixels, 8-connected i.e. square) by which detections are grown.
    ignore_bits : int
        Mask planes to ignore (default ``SAT | BAD | NO_DATA``).
    threads : int
        Numba threads (rows are split between threads).

    Returns
    -------
    numpy.ndarray, int32
        ``surveyred.masks.CR`` where a cosmic ray is, 0 elsewhere.

    Notes
    -----
    With :math:`d = I - B` and :math:`\\sigma = \\sqrt{V}`, a pixel :math:`p`
    (usable, not on the image border) is a candidate when
    :math:`d_p > n_\\sigma \\sigma_p`.  It is a cosmic ray when, for any pair
    :math:`(a, b)` of opposite neighbours (left/right, down/up and the two
    diagonals) that are both usable,

    .. math::

        d_p - c\\,\\sigma_p > R_s\\,(\\bar d_{ab} + c\\,\\sigma_{ab}),\\quad
        \\bar d_{ab} = \\tfrac{1}{2}(d_a + d_b),\\quad
        \\sigma_{ab} = \\tfrac{1}{2}\\sqrt{V_a + V_b},\\quad
        R_s = \\exp\\left(\\frac{s^2}{2\\sigma_\\mathrm{PSF}^2}\\right)

    with :math:`c` = ``cond``, :math:`s = 1` for the axis pairs and
    :math:`\\sqrt 2` for the diagonals: a Gaussian PSF sampled at the pixels
    gives :math:`d_p / \\bar d_{ab} \\le R_s` everywhere.  The detections are
    grown by ``grow`` pixels; then every usable candidate that is not in the
    grown mask but touches it (8-connected) is tested again with grown-mask
    members left out of the pair means (a pair with one member left out uses
    the other: :math:`\\bar d = d_b`, :math:`\\sigma_{ab} = \\sqrt{V_b}`; a
    pair with both left out is skipped).  Detections of both passes are
    grown by ``grow`` and returned, except on ignored pixels.  The result
    does not depend on ``threads``.
    """
    (img, var, msk, bkg, scalar, ignore, nsigma, cond, r_axis, r_diag, grow) = _prepare(
        image, variance, mask, background, psf_sigma, nsigma, cond, grow, ignore_bits)
    out = np.zeros(img.shape, dtype=np.int32)
    if img.size == 0:
        return out
    n = set_threads(threads)
    kernel = _find_parallel if n > 1 else _find_serial
    kernel(img, var, msk, bkg, scalar, ignore, nsigma, cond, r_axis, r_diag, grow, out)
    return out


# -- reference ----------------------------------------------------------------------

def _dilate_ref(src, r):
    out = src.copy()
    ny, nx = src.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            ys = slice(max(0, dy), ny + min(0, dy))
            yd = slice(max(0, -dy), ny + min(0, -dy))
            xs = slice(max(0, dx), nx + min(0, dx))
            xd = slice(max(0, -dx), nx + min(0, -dx))
            out[yd, xd] |= src[ys, xs]
    return out


def find_cosmic_rays_ref(image, variance, mask, *, background=None, psf_sigma=1.0, nsigma=6.0, cond=3.0,
                         grow=1, ignore_bits=DEFAULT_IGNORE):
    """Vectorised NumPy reference of :func:`find_cosmic_rays` (same arguments, no threads)."""
    (img, var, msk, bkg, scalar, ignore, nsigma, cond, r_axis, r_diag, grow) = _prepare(
        image, variance, mask, background, psf_sigma, nsigma, cond, grow, ignore_bits)
    ny, nx = img.shape
    out = np.zeros((ny, nx), dtype=np.int32)
    if ny < 3 or nx < 3:
        return out
    d = img.astype(np.float64) - (bkg[0, 0] if scalar else bkg)
    v = var.astype(np.float64)
    with np.errstate(invalid="ignore"):
        valid = ((msk & ignore) == 0) & np.isfinite(d) & np.isfinite(v) & (v >= 0)
    d = np.where(valid, d, 0.0)
    v = np.where(valid, v, 0.0)
    sig = np.sqrt(v)
    inner = np.zeros((ny, nx), dtype=bool)
    inner[1:-1, 1:-1] = True
    cand = valid & inner & (d > nsigma * sig)
    lhs = d - cond * sig

    def at(a, dy, dx, fill):
        # a[y + dy, x + dx] for interior pixels (y, x); ``fill`` on the border
        res = np.full_like(a, fill)
        res[1:-1, 1:-1] = a[1 + dy:ny - 1 + dy, 1 + dx:nx - 1 + dx]
        return res

    def sharp(candidates, excl):
        hit = np.zeros((ny, nx), dtype=bool)
        for (dy, dx) in _PAIRS:
            r = r_axis if dy == 0 or dx == 0 else r_diag
            oka, okb = at(valid, -dy, -dx, False), at(valid, dy, dx, False)
            da, db = at(d, -dy, -dx, 0.0), at(d, dy, dx, 0.0)
            va, vb = at(v, -dy, -dx, 0.0), at(v, dy, dx, 0.0)
            if excl is None:
                ina = inb = np.ones((ny, nx), dtype=bool)
            else:
                ina, inb = ~at(excl, -dy, -dx, False), ~at(excl, dy, dx, False)
            both = ina & inb
            mean = np.where(both, (da + db) * 0.5, np.where(ina, da, db))
            s = np.where(both, np.sqrt(va + vb) * 0.5, np.where(ina, np.sqrt(va), np.sqrt(vb)))
            hit |= candidates & oka & okb & (ina | inb) & (lhs > r * (mean + cond * s))
        return hit

    first = sharp(cand, None)
    grown = _dilate_ref(first, grow)
    near = _dilate_ref(grown, 1) & ~grown
    second = sharp(cand & near, grown)
    final = _dilate_ref(first | second, grow) & ((msk & ignore) == 0)
    out[final] = _CR
    return out
