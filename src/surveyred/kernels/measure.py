"""Windowed centroids and their errors: numba kernels and NumPy references.

:func:`windowed_centroids` iterates the Gaussian-windowed centroid (SExtractor's
``XWIN_IMAGE`` recipe, without sub-pixel sampling of the window)::

    xc <- xc + 2 sum_i w_i (x_i - xc) I_i / sum_i w_i I_i,    w_i = exp(-r_i^2 / (2 s^2))

over pixels within ``4 s`` of ``xc`` (and within the ``(2h+1)^2`` box around the
rounded centroid), until the step is below ``tol`` px or ``maxiter`` steps; a
non-positive ``sum w I`` or a walk farther than ``max_shift`` px from the start
gives NaN.  Its fixed point solves ``sum w (x - xc) I = 0``; the factor 2 speeds
convergence (exact for a Gaussian source of the window's width).  It then
returns the errors below at the converged centroid.

The windowed centroid ``xc`` solves ``g(xc) = sum_i w_i (x_i - xc) I_i = 0`` with
``w_i = exp(-r_i^2 / (2 s^2))`` centred on ``xc``.  Linearising in the pixel noise
``dI_i`` (variance ``V_i``)::

    dg/dxc = -(sum w I - sum w dx^2 I / s^2) = -D_x
    var(xc) = sum w^2 dx^2 V / D_x^2

(and the same in y).  For a Gaussian source of the window's width ``D_x = sum w I / 2``,
the factor 4 of SExtractor's ``ERRX2WIN``.  Pixels enter when they lie within the
``(2h + 1)^2`` box around the rounded centroid (``floor(x + 0.5)``), inside the image,
and within ``4 s`` of the centroid.  A non-positive ``D`` gives NaN.

The kernel loops over sources (``prange`` in the parallel variant); each source's
sums are accumulated in the same order in every variant, so results do not depend
on the thread count, and agree with the vectorised reference to float64 rounding.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ..runtime import set_threads

__all__ = ["centroid_errors", "centroid_errors_ref", "windowed_centroids", "windowed_centroids_ref"]


def _one(sub, var, x, y, s, h, out_x, out_y, k):
    ny, nx = sub.shape
    h = min(h, int(math.ceil(4.0 * s)))  # pixels beyond 4 s never count
    cx = int(math.floor(x + 0.5))
    cy = int(math.floor(y + 0.5))
    s2 = s * s
    rmax2 = 16.0 * s2
    wi = 0.0
    wxx = 0.0
    wyy = 0.0
    vx = 0.0
    vy = 0.0
    for iy in range(max(cy - h, 0), min(cy + h + 1, ny)):
        dy = iy - y
        for ix in range(max(cx - h, 0), min(cx + h + 1, nx)):
            dx = ix - x
            r2 = dx * dx + dy * dy
            if r2 >= rmax2:
                continue
            w = math.exp(-0.5 * r2 / s2)
            v = sub[iy, ix]
            wi += w * v
            wxx += w * dx * dx * v
            wyy += w * dy * dy * v
            vv = var[iy, ix]
            vx += w * w * dx * dx * vv
            vy += w * w * dy * dy * vv
    dxx = wi - wxx / s2
    dyy = wi - wyy / s2
    out_x[k] = math.sqrt(vx) / dxx if dxx > 0 else np.nan
    out_y[k] = math.sqrt(vy) / dyy if dyy > 0 else np.nan


_one_jit = numba.njit(cache=True, inline="always")(_one)


@numba.njit(cache=True)
def _errors_serial(sub, var, x, y, sig, h, out_x, out_y):
    for k in range(x.shape[0]):
        _one_jit(sub, var, x[k], y[k], sig[k], h, out_x, out_y, k)


@numba.njit(cache=True, parallel=True)
def _errors_parallel(sub, var, x, y, sig, h, out_x, out_y):
    for k in numba.prange(x.shape[0]):
        _one_jit(sub, var, x[k], y[k], sig[k], h, out_x, out_y, k)


def _iterate(sub, x0, y0, s, h, maxiter, tol, max_shift):
    ny, nx = sub.shape
    h = min(h, int(math.ceil(4.0 * s)))
    xc = x0
    yc = y0
    s2 = s * s
    rmax2 = 16.0 * s2
    for _ in range(maxiter):
        cx = int(math.floor(xc + 0.5))
        cy = int(math.floor(yc + 0.5))
        wi = 0.0
        wx = 0.0
        wy = 0.0
        for iy in range(max(cy - h, 0), min(cy + h + 1, ny)):
            dy = iy - yc
            for ix in range(max(cx - h, 0), min(cx + h + 1, nx)):
                dx = ix - xc
                r2 = dx * dx + dy * dy
                if r2 >= rmax2:
                    continue
                wv = math.exp(-0.5 * r2 / s2) * sub[iy, ix]
                wi += wv
                wx += wv * dx
                wy += wv * dy
        if not wi > 0:
            return np.nan, np.nan
        stepx = 2.0 * wx / wi
        stepy = 2.0 * wy / wi
        xc += stepx
        yc += stepy
        if (xc - x0) ** 2 + (yc - y0) ** 2 > max_shift * max_shift:
            return np.nan, np.nan
        if stepx * stepx + stepy * stepy < tol * tol:
            break
    return xc, yc


_iterate_jit = numba.njit(cache=True, inline="always")(_iterate)


@numba.njit(cache=True)
def _winpos_serial(sub, var, x, y, sig, h, maxiter, tol, max_shift, ox, oy, ex, ey):
    for k in range(x.shape[0]):
        xc, yc = _iterate_jit(sub, x[k], y[k], sig[k], h, maxiter, tol, max_shift)
        ox[k] = xc
        oy[k] = yc
        if xc == xc and yc == yc:
            _one_jit(sub, var, xc, yc, sig[k], h, ex, ey, k)
        else:
            ex[k] = np.nan
            ey[k] = np.nan


@numba.njit(cache=True, parallel=True)
def _winpos_parallel(sub, var, x, y, sig, h, maxiter, tol, max_shift, ox, oy, ex, ey):
    for k in numba.prange(x.shape[0]):
        xc, yc = _iterate_jit(sub, x[k], y[k], sig[k], h, maxiter, tol, max_shift)
        ox[k] = xc
        oy[k] = yc
        if xc == xc and yc == yc:
            _one_jit(sub, var, xc, yc, sig[k], h, ex, ey, k)
        else:
            ex[k] = np.nan
            ey[k] = np.nan


def _prepare(sub, variance, x, y, sig):
    sub = np.ascontiguousarray(sub, dtype=np.float32)
    variance = np.ascontiguousarray(variance, dtype=np.float32)
    if sub.shape != variance.shape or sub.ndim != 2:
        raise ValueError(f"image {sub.shape} and variance {variance.shape} must be the same 2-D shape")
    x = np.ascontiguousarray(x, dtype=np.float64)
    y = np.ascontiguousarray(y, dtype=np.float64)
    sig = np.ascontiguousarray(np.broadcast_to(sig, x.shape), dtype=np.float64)
    if not (x.shape == y.shape == sig.shape) or x.ndim != 1:
        raise ValueError("x, y and sig must be 1-D arrays of one length")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(sig > 0)):
        raise ValueError("centroids must be finite and window sigmas positive")
    return sub, variance, x, y, sig


def windowed_centroids(sub, variance, x, y, sig, *, h: int = 15, maxiter: int = 16, tol: float = 2e-4,
                       max_shift: float = 3.0, threads: int = 1):
    """Iterated windowed centroids and their errors: ``(x, y, x_err, y_err)`` (NaN where it fails).

    Parameters as :func:`centroid_errors`; ``x, y`` are the starting positions
    (e.g. isophotal barycentres).  See the module docstring.
    """
    sub, variance, x, y, sig = _prepare(sub, variance, x, y, sig)
    out = [np.empty(x.shape, np.float64) for _ in range(4)]
    n = set_threads(threads)
    kernel = _winpos_parallel if n > 1 and x.size > 256 else _winpos_serial
    kernel(sub, variance, x, y, sig, int(h), int(maxiter), float(tol), float(max_shift), *out)
    return tuple(out)


def windowed_centroids_ref(sub, variance, x, y, sig, *, h: int = 15, maxiter: int = 16, tol: float = 2e-4,
                           max_shift: float = 3.0):
    """NumPy reference of :func:`windowed_centroids` (a Python loop over sources)."""
    sub = np.asarray(sub, dtype=np.float64)
    ny, nx = sub.shape
    xs, ys = np.full(len(x), np.nan), np.full(len(x), np.nan)
    for k, (x0, y0, s) in enumerate(zip(np.asarray(x, float), np.asarray(y, float),
                                        np.broadcast_to(np.asarray(sig, float), np.shape(x)))):
        xc, yc = x0, y0
        ok = True
        for _ in range(maxiter):
            cx, cy = int(np.floor(xc + 0.5)), int(np.floor(yc + 0.5))
            yy, xx = np.mgrid[max(cy - h, 0):min(cy + h + 1, ny), max(cx - h, 0):min(cx + h + 1, nx)]
            dx, dy = xx - xc, yy - yc
            r2 = dx * dx + dy * dy
            wv = np.where(r2 < 16 * s * s, np.exp(-0.5 * r2 / (s * s)), 0.0) * sub[yy, xx]
            wi = wv.sum()
            if not wi > 0:
                ok = False
                break
            stepx, stepy = 2 * (wv * dx).sum() / wi, 2 * (wv * dy).sum() / wi
            xc, yc = xc + stepx, yc + stepy
            if (xc - x0) ** 2 + (yc - y0) ** 2 > max_shift ** 2:
                ok = False
                break
            if stepx * stepx + stepy * stepy < tol * tol:
                break
        if ok:
            xs[k], ys[k] = xc, yc
    good = np.isfinite(xs)
    ex, ey = np.full(len(xs), np.nan), np.full(len(xs), np.nan)
    if good.any():
        ex[good], ey[good] = centroid_errors_ref(sub, variance, xs[good], ys[good],
                                                 np.broadcast_to(np.asarray(sig, float), np.shape(x))[good], h=h)
    return xs, ys, ex, ey


def centroid_errors(sub, variance, x, y, sig, *, h: int = 15, threads: int = 1):
    """1-sigma errors ``(x_err, y_err)`` of windowed centroids (see the module docstring).

    Parameters
    ----------
    sub, variance : 2-D arrays
        Background-subtracted image and its variance.
    x, y : 1-D arrays
        Windowed centroids (0-based pixels); must be finite.
    sig : 1-D array
        Window sigma of each source (px).
    h : int
        Largest half-size of the box searched around each centroid (pixels
        beyond ``min(h, ceil(4 s))`` of the rounded centroid never count).
    threads : int
        numba threads (> 1 chooses the parallel kernel).
    """
    sub, variance, x, y, sig = _prepare(sub, variance, x, y, sig)
    out_x = np.empty(x.shape, np.float64)
    out_y = np.empty(x.shape, np.float64)
    n = set_threads(threads)
    kernel = _errors_parallel if n > 1 and x.size > 256 else _errors_serial
    kernel(sub, variance, x, y, sig, int(h), out_x, out_y)
    return out_x, out_y


def centroid_errors_ref(sub, variance, x, y, sig, *, h: int = 15):
    """Vectorised NumPy reference of :func:`centroid_errors`."""
    sub = np.asarray(sub, dtype=np.float64)
    variance = np.asarray(variance, dtype=np.float64)
    x, y = np.asarray(x, float), np.asarray(y, float)
    sig = np.broadcast_to(np.asarray(sig, float), x.shape)
    if x.size == 0:
        return np.zeros(0), np.zeros(0)
    ny, nx = sub.shape
    off = np.arange(-h, h + 1)
    ix = np.floor(x + 0.5).astype(np.int64)[:, None] + off[None, :]
    iy = np.floor(y + 0.5).astype(np.int64)[:, None] + off[None, :]
    ok = ((iy >= 0) & (iy < ny))[:, :, None] & ((ix >= 0) & (ix < nx))[:, None, :]
    lin = np.clip(iy, 0, ny - 1)[:, :, None] * nx + np.clip(ix, 0, nx - 1)[:, None, :]
    img = np.where(ok, sub.reshape(-1)[lin], 0.0)
    var = np.where(ok, variance.reshape(-1)[lin], 0.0)
    dx = (ix - x[:, None])[:, None, :]
    dy = (iy - y[:, None])[:, :, None]
    s2 = (sig * sig)[:, None, None]
    r2 = dx * dx + dy * dy
    w = np.exp(-0.5 * r2 / s2) * ok * (r2 < 16 * s2)
    wi = (w * img).sum(axis=(1, 2))
    dxx = wi - (w * dx * dx * img).sum(axis=(1, 2)) / s2[:, 0, 0]
    dyy = wi - (w * dy * dy * img).sum(axis=(1, 2)) / s2[:, 0, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        ex = np.sqrt((w * w * dx * dx * var).sum(axis=(1, 2))) / dxx
        ey = np.sqrt((w * w * dy * dy * var).sum(axis=(1, 2))) / dyy
    ex[~(dxx > 0)] = np.nan
    ey[~(dyy > 0)] = np.nan
    return ex, ey
