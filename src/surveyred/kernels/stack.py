"""Per-pixel weighted, noise-clipped stack of a band of warps.

:func:`stack_band` combines ``N`` warps' rows (``image, variance, mask`` of
shape ``(N, rows, nx)``) into the coadd's rows: an iteratively sigma-clipped
weighted mean where each input's deviation is judged against its own expected
noise (its variance plus a model-error term).  :func:`stack_band_ref` is the
plain NumPy reference; the kernel agrees to floating-point rounding and exactly
in masks and counts.
"""

from __future__ import annotations

import math
import warnings

import numba
import numpy as np

from .. import masks
from ..runtime import set_threads

__all__ = ["stack_band", "stack_band_ref"]

_NO_DATA = masks.NO_DATA
_CLIPPED = masks.CLIPPED


@numba.njit(cache=True, nogil=True)
def _median(xs, n, buf):
    """Median of xs[:n] (mean of the middle two for even n), sorting a copy in buf."""
    for q in range(n):
        v = xs[q]
        r = q - 1
        while r >= 0 and buf[r] > v:
            buf[r + 1] = buf[r]
            r -= 1
        buf[r + 1] = v
    h = n // 2
    if n % 2:
        return buf[h]
    return 0.5 * (buf[h - 1] + buf[h])


@numba.njit(cache=True, nogil=True)
def _stack_row(j, img, var, msk, weights, pixel_weights, bad, clip, maxiters, mismatch, protect,
               out_img, out_var, out_msk, out_n, used, clipped):
    n_in, _, nx = img.shape
    xs = np.empty(n_in)
    vs = np.empty(n_in)
    ws = np.empty(n_in)
    ms = np.empty(n_in, np.int32)
    idx = np.empty(n_in, np.int64)
    keep = np.empty(n_in, np.bool_)
    buf = np.empty(n_in)
    for i in range(nx):
        cnt = 0
        extra = 0
        for k in range(n_in):
            x = np.float64(img[k, j, i])
            v = np.float64(var[k, j, i])
            m = msk[k, j, i]
            if (m & bad) or not (math.isfinite(x) and math.isfinite(v) and v > 0.0):
                if (m & _CLIPPED) and not (m & _NO_DATA):
                    extra = _CLIPPED
                continue
            xs[cnt] = x
            vs[cnt] = v
            ws[cnt] = 1.0 / v if pixel_weights else weights[k]
            ms[cnt] = m
            idx[cnt] = k
            keep[cnt] = True
            cnt += 1
        if cnt == 0:
            out_img[j, i] = np.nan
            out_var[j, i] = np.nan
            out_msk[j, i] = _NO_DATA | extra
            out_n[j, i] = 0
            continue
        do_clip = clip > 0.0 and cnt >= 3
        if do_clip:
            c = _median(xs, cnt, buf)
            if protect > 0.0 and c > 0.0:
                vbar = 0.0
                for q in range(cnt):
                    vbar += vs[q]
                vbar /= cnt
                if c * c > protect * protect * vbar:
                    do_clip = False  # on a source: PSF differences are not outliers
        if do_clip:
            for it in range(maxiters):
                nk = 0
                changed = False
                for q in range(cnt):
                    d = xs[q] - c
                    tol2 = clip * clip * (vs[q] + (mismatch * c) * (mismatch * c))
                    kq = d * d <= tol2
                    if kq:
                        nk += 1
                if nk == 0:
                    break
                sw = 0.0
                s = 0.0
                for q in range(cnt):
                    d = xs[q] - c
                    tol2 = clip * clip * (vs[q] + (mismatch * c) * (mismatch * c))
                    kq = d * d <= tol2
                    if kq != keep[q]:
                        changed = True
                    keep[q] = kq
                    if kq:
                        sw += ws[q]
                        s += ws[q] * xs[q]
                c = s / sw
                if not changed and it > 0:
                    break
        sw = 0.0
        s = 0.0
        s2 = 0.0
        m = extra
        nk = 0
        for q in range(cnt):
            if keep[q]:
                sw += ws[q]
                s += ws[q] * xs[q]
                s2 += ws[q] * ws[q] * vs[q]
                m |= ms[q]
                nk += 1
                used[j, idx[q]] += 1
            else:
                m |= _CLIPPED
                clipped[j, idx[q]] += 1
        out_img[j, i] = s / sw
        out_var[j, i] = s2 / (sw * sw)
        out_msk[j, i] = m
        out_n[j, i] = nk


@numba.njit(cache=True, nogil=True)
def _stack_serial(img, var, msk, weights, pixel_weights, bad, clip, maxiters, mismatch, protect,
                  out_img, out_var, out_msk, out_n, used, clipped):
    for j in range(img.shape[1]):
        _stack_row(j, img, var, msk, weights, pixel_weights, bad, clip, maxiters, mismatch, protect,
                   out_img, out_var, out_msk, out_n, used, clipped)


@numba.njit(cache=True, nogil=True, parallel=True)
def _stack_parallel(img, var, msk, weights, pixel_weights, bad, clip, maxiters, mismatch, protect,
                    out_img, out_var, out_msk, out_n, used, clipped):
    for j in numba.prange(img.shape[1]):
        _stack_row(np.int64(j), img, var, msk, weights, pixel_weights, bad, clip, maxiters, mismatch, protect,
                   out_img, out_var, out_msk, out_n, used, clipped)


def _validate(img, var, msk, weights, pixel_weights):
    img = np.ascontiguousarray(img, dtype=np.float32)
    var = np.ascontiguousarray(var, dtype=np.float32)
    msk = np.ascontiguousarray(msk, dtype=np.int32)
    if img.ndim != 3 or var.shape != img.shape or msk.shape != img.shape:
        raise ValueError(
            f"image {img.shape}, variance {var.shape} and mask {msk.shape} must be 3-D (N, rows, nx) of one shape"
        )
    if weights is None:
        if not pixel_weights:
            raise ValueError("weights are required unless pixel_weights=True")
        weights = np.ones(img.shape[0])
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if weights.shape != (img.shape[0],) or not np.all(np.isfinite(weights)) or np.any(weights <= 0):
        raise ValueError(f"weights must be {img.shape[0]} positive finite numbers")
    return img, var, msk, weights


def stack_band(image, variance, mask, *, weights=None, pixel_weights=False, bad_mask=masks.NO_DATA,
               clip_sigma=3.0, maxiters=5, mismatch=0.0, protect_snr=0.0, threads=1):
    """Clipped weighted mean of ``N`` warps' rows (numba).

    Parameters
    ----------
    image, variance : (N, rows, nx) array
    mask : (N, rows, nx) integer array
    weights : (N,) array, optional
        Per-input weights (used unless ``pixel_weights``).
    pixel_weights : bool
        Weight each pixel by its inverse variance instead.
    bad_mask : int
        Input pixels with any of these bits are not used.
    clip_sigma : float
        Clip threshold in units of the input's expected noise; 0 disables
        clipping (also skipped with fewer than 3 inputs at a pixel).
    maxiters : int
        Clipping iterations.
    mismatch : float
        Fractional model error added to the expected noise,
        :math:`\\sigma_i^2 = V_i + (f c)^2` (PSF and astrometric mismatch on
        bright sources).
    protect_snr : float
        Pixels whose median exceeds ``protect_snr`` times the inputs' mean
        noise are not clipped (sources: seeing differences between inputs
        are not outliers); 0 disables.
    threads : int

    Returns
    -------
    image, variance : (rows, nx) float32
    mask, nimage : (rows, nx) int32
    used, clipped : (N,) int64
        Pixels each input contributed / had clipped.

    Notes
    -----
    Usable inputs at a pixel: not in ``bad_mask``, finite, variance > 0.
    Starting from the median :math:`c`, repeat: keep input ``i`` when
    :math:`|x_i - c| \\le k \\sqrt{V_i + (f c)^2}`, set
    :math:`c = \\sum_{kept} w_i x_i / \\sum_{kept} w_i`, until the kept set
    does not change (or ``maxiters``).  No clipping where
    :math:`c > p \\sqrt{\\bar V}` (``protect_snr`` p, mean input variance).  Output
    :math:`I = \\sum w_i x_i / \\sum w_i`, :math:`V = \\sum w_i^2 V_i / (\\sum w_i)^2`
    over kept inputs; mask = OR of kept inputs' bits, plus CLIPPED when an
    input was rejected here or came with CLIPPED set (artifact rejection);
    NO_DATA (NaN image and variance, nimage 0) when nothing is usable.
    """
    img, var, msk, weights = _validate(image, variance, mask, weights, pixel_weights)
    n_in, rows, nx = img.shape
    out_img = np.empty((rows, nx), np.float32)
    out_var = np.empty((rows, nx), np.float32)
    out_msk = np.empty((rows, nx), np.int32)
    out_n = np.empty((rows, nx), np.int32)
    used = np.zeros((rows, n_in), np.int64)
    clipped = np.zeros((rows, n_in), np.int64)
    nthreads = set_threads(threads)
    kernel = _stack_parallel if nthreads > 1 else _stack_serial
    kernel(img, var, msk, weights, bool(pixel_weights), int(bad_mask), float(clip_sigma), int(maxiters),
           float(mismatch), float(protect_snr), out_img, out_var, out_msk, out_n, used, clipped)
    return out_img, out_var, out_msk, out_n, used.sum(axis=0), clipped.sum(axis=0)


def stack_band_ref(image, variance, mask, *, weights=None, pixel_weights=False, bad_mask=masks.NO_DATA,
                   clip_sigma=3.0, maxiters=5, mismatch=0.0, protect_snr=0.0):
    """NumPy reference of :func:`stack_band` (vectorised over pixels)."""
    img = np.asarray(image, np.float64)
    var = np.asarray(variance, np.float64)
    msk = np.asarray(mask, np.int32)
    n_in = img.shape[0]
    if weights is None:
        weights = np.ones(n_in)
    with np.errstate(all="ignore"):
        valid = ((msk & bad_mask) == 0) & np.isfinite(img) & np.isfinite(var) & (var > 0)
        extra = np.where(np.any(~valid & ((msk & _CLIPPED) != 0) & ((msk & _NO_DATA) == 0), axis=0),
                         _CLIPPED, 0)
        w = 1.0 / var if pixel_weights else np.broadcast_to(np.asarray(weights, float)[:, None, None], img.shape)
        w = np.where(valid, w, 0.0)
        x = np.where(valid, img, 0.0)
        v = np.where(valid, var, 0.0)
        cnt = valid.sum(axis=0)
        keep = valid.copy()
        if clip_sigma > 0:
            active = cnt >= 3
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels
                c = np.nanmedian(np.where(valid, img, np.nan), axis=0)
            if protect_snr > 0:
                vbar = v.sum(axis=0) / np.maximum(cnt, 1)
                active &= ~((c > 0) & (c * c > protect_snr**2 * vbar))
            done = ~active
            for it in range(maxiters):
                tol2 = clip_sigma ** 2 * (v + (mismatch * c) ** 2)
                kn = valid & ((x - c) ** 2 <= tol2)
                nk = kn.sum(axis=0)
                upd = ~done & (nk > 0)
                changed = np.any(kn != keep, axis=0)
                keep = np.where(upd[None], kn, keep)
                sw = (w * keep).sum(axis=0)
                cn = (w * keep * x).sum(axis=0) / sw
                c = np.where(upd, cn, c)
                done |= ~upd | (~changed & (it > 0))
        sw = (w * keep).sum(axis=0)
        out_img = (w * keep * x).sum(axis=0) / sw
        out_var = (w * w * keep * v).sum(axis=0) / sw ** 2
        m = np.bitwise_or.reduce(np.where(keep, msk, 0), axis=0) | extra
        m |= np.where(np.any(valid & ~keep, axis=0), _CLIPPED, 0)
        nimg = keep.sum(axis=0)
        none = cnt == 0
        out_img = np.where(none, np.nan, out_img).astype(np.float32)
        out_var = np.where(none, np.nan, out_var).astype(np.float32)
        m = np.where(none, _NO_DATA | extra, m).astype(np.int32)
        used = (keep & valid).sum(axis=(1, 2))
        clipped = (valid & ~keep).sum(axis=(1, 2))
    return out_img, out_var, m, nimg.astype(np.int32), used, clipped
