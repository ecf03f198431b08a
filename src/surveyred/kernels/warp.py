"""Lanczos resampling of an exposure (image, variance, mask) onto an output grid.

:func:`lanczos_warp` takes the input planes and a *coarse coordinate grid*: for
output pixels on a regular grid of spacing ``step`` (output pixel ``(j, i)``
with ``i, j`` multiples of ``step``) the input pixel coordinates ``gx, gy``
(0-based, pixel centres at integers) and the pixel-area ratio ``gj`` (input
pixels per output pixel).  The kernel interpolates the three maps bilinearly to
every output pixel and does the separable Lanczos sum there.  The coarse grid
and its interpolation error are computed by :mod:`surveyred.warp`.

:func:`lanczos_warp_ref` is the plain NumPy reference (vectorised over output
pixels, looping over the kernel footprint); the kernel agrees with it to
floating-point rounding (the sums are accumulated in a different order) and
its masks agree exactly.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .. import masks
from ..runtime import set_threads

__all__ = ["kernel_table", "lanczos1d_ref", "lanczos_warp", "lanczos_warp_ref"]

_NO_DATA = masks.NO_DATA
_EDGE = masks.EDGE
#: A footprint pixel whose 1-D weights are both below this in magnitude carries no weight.
_EPS = 1e-6
#: Below this sum of the weights of usable input pixels, an output pixel is NO_DATA.
_MIN_WEIGHT_SUM = 0.1
#: Samples per pixel of the tabulated kernel (linear interpolation between them:
#: largest weight error about 3e-8, see kernel_table).
TABLE_SAMPLES = 4096


def kernel_table(order: int, linear: bool = True, samples: int = TABLE_SAMPLES) -> np.ndarray:
    """Tabulated Lanczos tap weights: ``(samples + 1, 2 order)`` array.

    Row ``i`` holds the weights of taps ``floor(x) - a + 1 .. floor(x) + a``
    at the fractional offset :math:`f = i / samples`, i.e.
    :math:`L_a(f + a - 1 - k)` for ``k = 0 .. 2a - 1``, with ``linear``
    corrected as in :func:`lanczos_warp`.  Interpolating linearly between rows
    errs by at most :math:`\\max|w''| / (8 \\cdot samples^2)`, about 3e-8 for
    4096 samples, and keeps the sum and the first moment exact.
    """
    f = np.arange(samples + 1) / samples
    x = f + 10.0  # any integer part: the weights depend on the fraction only
    x0 = np.full(f.shape, 10 - order + 1)
    return np.ascontiguousarray(np.stack(_weights_ref(x, x0, order, linear), axis=1))


# -- kernels ----------------------------------------------------------------------

@numba.njit(cache=True, nogil=True)
def _weights(x, order, table, w):
    """1-D weights of taps floor(x) - order + 1 .. floor(x) + order at x, returning their sum.

    Interpolated linearly in the tabulated kernel ``table`` (row ``i`` holds
    the tap weights at the fractional offset ``i / (rows - 1)``, see
    :func:`kernel_table`).  Linear interpolation between rows that each sum
    to 1 with zero first moment keeps both properties exactly.
    """
    nt = table.shape[0] - 1
    p = (x - math.floor(x)) * nt
    ip = int(p)
    if ip >= nt:
        ip = nt - 1
    fp = p - ip
    s0 = 0.0
    for k in range(2 * order):
        wk = table[ip, k] + (table[ip + 1, k] - table[ip, k]) * fp
        w[k] = wk
        s0 += wk
    return s0


@numba.njit(cache=True, nogil=True)
def _bilinear(g, jv, fv, iu, fu):
    return ((1.0 - fv) * ((1.0 - fu) * g[jv, iu] + fu * g[jv, iu + 1])
            + fv * ((1.0 - fu) * g[jv + 1, iu] + fu * g[jv + 1, iu + 1]))


@numba.njit(cache=True, nogil=True)
def _warp_row(j, image, variance, mask, gx, gy, gj, step, order, table, mthresh, scale,
              out_img, out_var, out_msk):
    ny_in, nx_in = image.shape
    nx_out = out_img.shape[1]
    gny, gnx = gx.shape
    n = 2 * order
    wx = np.empty(n)
    wy = np.empty(n)
    v = j / step
    jv = int(v)
    jv = min(jv, gny - 2)
    fv = v - jv
    nan = np.nan
    for i in range(nx_out):
        u = i / step
        iu = int(u)
        iu = min(iu, gnx - 2)
        fu = u - iu
        x = _bilinear(gx, jv, fv, iu, fu)
        y = _bilinear(gy, jv, fv, iu, fu)
        jac = _bilinear(gj, jv, fv, iu, fu)
        # nearest input pixel must exist and hold data
        if not (x >= -0.5 and x < nx_in - 0.5 and y >= -0.5 and y < ny_in - 0.5 and jac > 0.0):
            out_img[j, i] = nan
            out_var[j, i] = nan
            out_msk[j, i] = _NO_DATA
            continue
        xn = int(math.floor(x + 0.5))
        yn = int(math.floor(y + 0.5))
        if mask[yn, xn] & _NO_DATA:
            out_img[j, i] = nan
            out_var[j, i] = nan
            out_msk[j, i] = _NO_DATA
            continue
        fx = math.floor(x)
        fy = math.floor(y)
        x0 = int(fx) - order + 1
        y0 = int(fy) - order + 1
        sx = _weights(x, order, table, wx)
        sy = _weights(y, order, table, wy)
        thresh = mthresh * abs(sx * sy)
        sw = 0.0
        s = 0.0
        s2 = 0.0
        m = 0
        inside = x0 >= 0 and x0 + n <= nx_in and y0 >= 0 and y0 + n <= ny_in
        for ky in range(n):
            yy = y0 + ky
            wyk = wy[ky]
            if not inside and (yy < 0 or yy >= ny_in):
                for kx in range(n):
                    if abs(wyk * wx[kx]) > _EPS:
                        m |= _EDGE
                continue
            rsw = 0.0
            rs = 0.0
            rs2 = 0.0
            for kx in range(n):
                xx = x0 + kx
                wxk = wx[kx]
                if not inside and (xx < 0 or xx >= nx_in):
                    if abs(wyk * wxk) > _EPS:
                        m |= _EDGE
                    continue
                mk = mask[yy, xx]
                if mk != 0:
                    if mk & _NO_DATA:
                        if abs(wyk * wxk) > _EPS:
                            m |= _EDGE
                        continue
                    if abs(wyk * wxk) >= thresh:
                        m |= mk
                rsw += wxk
                rs += wxk * image[yy, xx]
                rs2 += wxk * wxk * variance[yy, xx]
            sw += wyk * rsw
            s += wyk * rs
            s2 += wyk * wyk * rs2
        if sw < _MIN_WEIGHT_SUM:
            out_img[j, i] = nan
            out_var[j, i] = nan
            out_msk[j, i] = _NO_DATA
            continue
        f = scale * jac / sw
        out_img[j, i] = s * f
        out_var[j, i] = s2 * f * f
        out_msk[j, i] = m


@numba.njit(cache=True, nogil=True)
def _warp_serial(image, variance, mask, gx, gy, gj, step, order, table, mthresh, scale, out_img, out_var, out_msk):
    for j in range(out_img.shape[0]):
        _warp_row(j, image, variance, mask, gx, gy, gj, step, order, table, mthresh, scale, out_img, out_var, out_msk)


@numba.njit(cache=True, nogil=True, parallel=True)
def _warp_parallel(image, variance, mask, gx, gy, gj, step, order, table, mthresh, scale, out_img, out_var, out_msk):
    for j in numba.prange(out_img.shape[0]):
        _warp_row(np.int64(j), image, variance, mask, gx, gy, gj, step, order, table, mthresh, scale,
                  out_img, out_var, out_msk)


# -- wrapper ----------------------------------------------------------------------

_TABLES: dict[tuple[int, bool], np.ndarray] = {}


def _table(order: int, linear: bool) -> np.ndarray:
    if (order, linear) not in _TABLES:
        _TABLES[(order, linear)] = kernel_table(order, linear)
    return _TABLES[(order, linear)]


def _check_grid(gx, gy, gj, step, out_shape):
    gx = np.ascontiguousarray(gx, dtype=np.float64)
    gy = np.ascontiguousarray(gy, dtype=np.float64)
    gj = np.ascontiguousarray(gj, dtype=np.float64)
    if gx.ndim != 2 or gx.shape != gy.shape or gx.shape != gj.shape:
        raise ValueError(f"gx {gx.shape}, gy {gy.shape}, gj {gj.shape} must be 2-D of one shape")
    if int(step) != step or step < 1:
        raise ValueError(f"step must be an integer >= 1, got {step!r}")
    step = int(step)
    gny, gnx = gx.shape
    ny, nx = out_shape
    if gny < 2 or gnx < 2 or (gny - 1) * step < ny - 1 or (gnx - 1) * step < nx - 1:
        raise ValueError(
            f"coarse grid {gx.shape} with step {step} does not cover the output of shape {out_shape}"
        )
    return gx, gy, gj, step


def lanczos_warp(image, variance, mask, gx, gy, gj, step, out_shape, *, order=3, linear=True,
                 mask_weight_threshold=0.05, scale=1.0, threads=1):
    """Resample image, variance and mask with a Lanczos kernel (numba).

    Parameters
    ----------
    image, variance : (ny_in, nx_in) array
        Input planes (converted to float32 contiguous).
    mask : (ny_in, nx_in) integer array
        Input mask bit planes (converted to int32).
    gx, gy, gj : (gny, gnx) array
        Coarse coordinate grid: input x, y (0-based) and input pixels per
        output pixel at output pixels ``(k * step, l * step)``; must cover the
        output (``(gny - 1) * step >= ny - 1``, same in x).  NaN marks output
        nodes with no input coordinate.
    step : int
        Grid spacing in output pixels.
    out_shape : (int, int)
        Output shape ``(ny, nx)``.
    order : int
        Lanczos order ``a`` (footprint ``2a x 2a`` input pixels).
    linear : bool
        Correct the 1-D weights to reproduce linear functions exactly (sum 1,
        zero first moment).  The truncated Lanczos-3 kernel alone shifts
        positions by up to 0.02 px (0.011 px for Lanczos-5) at quarter-pixel
        offsets; the correction removes that bias.
    mask_weight_threshold : float
        An input pixel's mask bits are ORed into the output when its weight is
        at least this fraction of the kernel's total weight.
    scale : float
        Extra multiplicative scale of the image (``scale**2`` on the variance),
        e.g. the zero-point scale.
    threads : int
        Numba threads (rows are split between threads; results do not depend
        on it).

    Returns
    -------
    image, variance : (ny, nx) float32
    mask : (ny, nx) int32

    Notes
    -----
    With bilinearly interpolated input position ``(x, y)`` and area ratio
    ``J`` at an output pixel, 1-D weights
    :math:`w_k = L_a(x - x_k)`, :math:`L_a(t) = \\mathrm{sinc}(t)\\,\\mathrm{sinc}(t/a)`
    for :math:`|t| < a`, over the footprint
    :math:`x_k = \\lfloor x \\rfloor - a + 1 \\ldots \\lfloor x \\rfloor + a`
    (same in y); with ``linear`` each 1-D set is corrected,
    :math:`w_k \\leftarrow w_k + |w_k| (\\alpha + \\beta d_k)`, :math:`d_k = x_k - x`,
    with :math:`G_0 \\alpha + G_1 \\beta = 1 - S_0` and
    :math:`G_1 \\alpha + G_2 \\beta = -S_1`,
    :math:`S_p = \\sum_k w_k d_k^p`, :math:`G_p = \\sum_k |w_k| d_k^p`, so that
    :math:`\\sum w_k = 1` and :math:`\\sum w_k d_k = 0` (zero weights stay zero:
    integer shifts remain exact; the correction changes a weight by at most a
    few per cent).
    Then :math:`w_{kl} = w_k w_l`, and the sums over usable input
    pixels (inside the input, not NO_DATA):

    .. math::

        I' = s J \\frac{\\sum w_{kl} I_{kl}}{\\sum w_{kl}}, \\qquad
        V' = (s J)^2 \\frac{\\sum w_{kl}^2 V_{kl}}{(\\sum w_{kl})^2}

    The kernel takes the 1-D weights from :func:`kernel_table` (linear
    interpolation, error < 1e-7); the NumPy reference evaluates them exactly.

    Mask: OR of the bits of usable pixels with
    :math:`|w_{kl}| \\ge t \\,|\\sum_k w_k \\sum_l w_l|`; EDGE when a pixel with
    weight (:math:`|w_{kl}| > 10^{-6}`) lies outside the input or is NO_DATA.
    NO_DATA (and NaN image and variance) when the nearest input pixel is
    outside the input or NO_DATA, or the usable weights sum below 0.1.
    """
    image = np.ascontiguousarray(image, dtype=np.float32)
    variance = np.ascontiguousarray(variance, dtype=np.float32)
    mask = np.ascontiguousarray(mask, dtype=np.int32)
    if image.ndim != 2 or variance.shape != image.shape or mask.shape != image.shape:
        raise ValueError(
            f"image {image.shape}, variance {variance.shape} and mask {mask.shape} must be 2-D of one shape"
        )
    ny, nx = (int(s) for s in out_shape)
    if ny < 1 or nx < 1:
        raise ValueError(f"out_shape must be positive, got {out_shape!r}")
    gx, gy, gj, step = _check_grid(gx, gy, gj, step, (ny, nx))
    if int(order) != order or not 1 <= order <= 8:
        raise ValueError(f"order must be an integer in 1..8, got {order!r}")
    if not 0.0 <= mask_weight_threshold <= 1.0:
        raise ValueError(f"mask_weight_threshold must be in [0, 1], got {mask_weight_threshold}")
    scale = float(scale)
    if not (scale > 0 and np.isfinite(scale)):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    out_img = np.empty((ny, nx), np.float32)
    out_var = np.empty((ny, nx), np.float32)
    out_msk = np.empty((ny, nx), np.int32)
    n = set_threads(threads)
    kernel = _warp_parallel if n > 1 else _warp_serial
    table = _table(int(order), bool(linear))
    kernel(image, variance, mask, gx, gy, gj, step, int(order), table, float(mask_weight_threshold), scale,
           out_img, out_var, out_msk)
    return out_img, out_var, out_msk


# -- NumPy reference ----------------------------------------------------------------

def lanczos1d_ref(t, a):
    """Lanczos kernel :math:`\\mathrm{sinc}(t)\\mathrm{sinc}(t/a)` for ``|t| < a``, else 0."""
    t = np.asarray(t, dtype=np.float64)
    out = np.sinc(t) * np.sinc(t / a)
    return np.where(np.abs(t) < a, out, 0.0)


def _bilinear_ref(g, step, ny, nx):
    gny, gnx = g.shape
    v = np.arange(ny) / step
    u = np.arange(nx) / step
    jv = np.minimum(v.astype(np.int64), gny - 2)
    iu = np.minimum(u.astype(np.int64), gnx - 2)
    fv = (v - jv)[:, None]
    fu = (u - iu)[None, :]
    J, I = jv[:, None], iu[None, :]
    return ((1 - fv) * ((1 - fu) * g[J, I] + fu * g[J, I + 1])
            + fv * ((1 - fu) * g[J + 1, I] + fu * g[J + 1, I + 1]))


def _weights_ref(x, x0, order, linear):
    d = [(x0 + k) - x for k in range(2 * order)]
    w = [lanczos1d_ref(-dk, order) for dk in d]
    if linear:
        s0 = sum(w)
        s1 = sum(wk * dk for wk, dk in zip(w, d))
        g0 = sum(np.abs(wk) for wk in w)
        g1 = sum(np.abs(wk) * dk for wk, dk in zip(w, d))
        g2 = sum(np.abs(wk) * dk * dk for wk, dk in zip(w, d))
        det = g0 * g2 - g1 * g1
        ok = det > 1e-12
        sdet = np.where(ok, det, 1.0)
        ca = np.where(ok, (g2 * (1 - s0) + g1 * s1) / sdet, 0.0)
        cb = np.where(ok, (-g0 * s1 - g1 * (1 - s0)) / sdet, 0.0)
        w = [wk + np.abs(wk) * (ca + cb * dk) for wk, dk in zip(w, d)]
    return w


def lanczos_warp_ref(image, variance, mask, gx, gy, gj, step, out_shape, *, order=3, linear=True,
                     mask_weight_threshold=0.05, scale=1.0):
    """NumPy reference of :func:`lanczos_warp` (same arguments, no threads)."""
    image = np.asarray(image, dtype=np.float64)
    variance = np.asarray(variance, dtype=np.float64)
    mask = np.asarray(mask, dtype=np.int32)
    ny_in, nx_in = image.shape
    ny, nx = out_shape
    x = _bilinear_ref(np.asarray(gx, float), step, ny, nx)
    y = _bilinear_ref(np.asarray(gy, float), step, ny, nx)
    jac = _bilinear_ref(np.asarray(gj, float), step, ny, nx)
    with np.errstate(invalid="ignore"):
        nodata = ~((x >= -0.5) & (x < nx_in - 0.5) & (y >= -0.5) & (y < ny_in - 0.5) & (jac > 0))
    xs = np.where(nodata, 0.0, x)
    ys = np.where(nodata, 0.0, y)
    xn = np.floor(xs + 0.5).astype(np.int64)
    yn = np.floor(ys + 0.5).astype(np.int64)
    nodata |= (mask[yn, xn] & _NO_DATA) != 0
    x0 = np.floor(xs).astype(np.int64) - order + 1
    y0 = np.floor(ys).astype(np.int64) - order + 1
    n = 2 * order
    wx = _weights_ref(xs, x0, order, linear)
    wy = _weights_ref(ys, y0, order, linear)
    thresh = mask_weight_threshold * np.abs(sum(wx) * sum(wy))
    sw = np.zeros((ny, nx))
    s = np.zeros((ny, nx))
    s2 = np.zeros((ny, nx))
    m = np.zeros((ny, nx), np.int32)
    for ky in range(n):
        yy = y0 + ky
        for kx in range(n):
            xx = x0 + kx
            w = wy[ky] * wx[kx]
            inside = (yy >= 0) & (yy < ny_in) & (xx >= 0) & (xx < nx_in)
            yc = np.clip(yy, 0, ny_in - 1)
            xc = np.clip(xx, 0, nx_in - 1)
            mk = np.where(inside, mask[yc, xc], _NO_DATA)
            usable = (mk & _NO_DATA) == 0
            m |= np.where(~usable & (np.abs(w) > _EPS), _EDGE, 0).astype(np.int32)
            wu = np.where(usable, w, 0.0)
            sw += wu
            s += wu * image[yc, xc]
            s2 += wu * wu * variance[yc, xc]
            m |= np.where(usable & (np.abs(w) >= thresh), mk, 0).astype(np.int32)
    nodata |= sw < _MIN_WEIGHT_SUM
    with np.errstate(invalid="ignore", divide="ignore"):
        f = scale * jac / sw
        out_img = np.where(nodata, np.nan, s * f).astype(np.float32)
        out_var = np.where(nodata, np.nan, s2 * f * f).astype(np.float32)
    out_msk = np.where(nodata, _NO_DATA, m).astype(np.int32)
    return out_img, out_var, out_msk
