"""Fused instrument-signature-removal pixel pass of one amplifier.

:func:`isr_amp` takes one amplifier's data pixels from the raw frame and, in
one pass, subtracts the per-row overscan level, flags saturation, corrects
non-linearity, converts to electrons, subtracts the master bias, computes the
variance, divides by the flat and ORs in the defect mask, writing the results
at the amplifier's place (with flips) in the assembled detector's image,
variance and mask.  :func:`isr_amp_ref` is the plain NumPy reference; the
kernel reproduces it exactly (same floating-point operations in the same
order).
"""

from __future__ import annotations

import numba
import numpy as np

from .. import masks
from ..runtime import set_threads

__all__ = ["isr_amp", "isr_amp_ref"]

_SAT = masks.SAT
_NODATA_BAD = masks.NO_DATA | masks.BAD


# -- kernels ----------------------------------------------------------------------

@numba.njit(cache=True, nogil=True)
def _isr_row(j, raw, osrow, dy0, dx0, ny, nx, oy0, ox0, flip_x, flip_y, gain, rn2, saturation,
             lin, bias, use_bias, flat, use_flat, defects, use_defects, img, var, msk):
    nlin = lin.shape[0]
    y = oy0 + (ny - 1 - j if flip_y else j)
    o = osrow[j]
    for i in range(nx):
        x = ox0 + (nx - 1 - i if flip_x else i)
        r = np.float64(raw[dy0 + j, dx0 + i])
        m = 0
        if r >= saturation:
            m |= _SAT
        a = r - o
        if nlin > 0:
            p = lin[nlin - 1]
            for k in range(nlin - 2, -1, -1):
                p = p * a + lin[k]
            a = a + a * a * p
        e = a * gain
        if use_bias:
            e = e - np.float64(bias[y, x])
        f = 1.0
        if use_flat:
            f = np.float64(flat[y, x])
        if np.isfinite(e) and f > 0.0 and np.isfinite(f):
            v = (e if e > 0.0 else 0.0) + rn2
            if use_flat:
                img[y, x] = e / f
                var[y, x] = v / (f * f)
            else:
                img[y, x] = e
                var[y, x] = v
        else:
            img[y, x] = 0.0
            var[y, x] = 0.0
            m |= _NODATA_BAD
        if use_defects:
            m |= defects[y, x]
        msk[y, x] |= m


@numba.njit(cache=True, nogil=True)
def _isr_amp_serial(raw, osrow, dy0, dx0, ny, nx, oy0, ox0, flip_x, flip_y, gain, rn2, saturation,
                    lin, bias, use_bias, flat, use_flat, defects, use_defects, img, var, msk):
    for j in range(ny):
        _isr_row(j, raw, osrow, dy0, dx0, ny, nx, oy0, ox0, flip_x, flip_y, gain, rn2, saturation,
                 lin, bias, use_bias, flat, use_flat, defects, use_defects, img, var, msk)


@numba.njit(cache=True, nogil=True, parallel=True)
def _isr_amp_parallel(raw, osrow, dy0, dx0, ny, nx, oy0, ox0, flip_x, flip_y, gain, rn2, saturation,
                      lin, bias, use_bias, flat, use_flat, defects, use_defects, img, var, msk):
    for j in numba.prange(ny):
        _isr_row(np.int64(j), raw, osrow, dy0, dx0, ny, nx, oy0, ox0, flip_x, flip_y, gain, rn2, saturation,
                 lin, bias, use_bias, flat, use_flat, defects, use_defects, img, var, msk)


# -- wrapper ----------------------------------------------------------------------

def _int(name, value, minimum):
    if int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _prepare(raw, overscan_rows, data_y0, data_x0, ny, nx, out_y0, out_x0, gain, read_noise,
             saturation, linearity, bias, flat, defects, out_image, out_variance, out_mask,
             *, convert_raw=True):
    """Validate the arguments of :func:`isr_amp`; return the kernel's arguments."""
    raw = np.asarray(raw)
    if raw.ndim != 2:
        raise ValueError(f"raw must be 2-D, got shape {raw.shape}")
    if not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)):
        raise TypeError(f"raw must hold real numbers, got dtype {raw.dtype}")
    data_y0 = _int("data_y0", data_y0, 0)
    data_x0 = _int("data_x0", data_x0, 0)
    ny = _int("ny", ny, 0)
    nx = _int("nx", nx, 0)
    out_y0 = _int("out_y0", out_y0, 0)
    out_x0 = _int("out_x0", out_x0, 0)
    if data_y0 + ny > raw.shape[0] or data_x0 + nx > raw.shape[1]:
        raise ValueError(
            f"amplifier data region rows {data_y0}:{data_y0 + ny}, columns {data_x0}:{data_x0 + nx} "
            f"lies outside the raw frame of shape {raw.shape}"
        )
    for name, arr, dtype in (("out_image", out_image, np.float32), ("out_variance", out_variance, np.float32),
                             ("out_mask", out_mask, np.int32)):
        if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.ndim != 2:
            raise TypeError(f"{name} must be a 2-D {np.dtype(dtype).name} numpy array")
        if not arr.flags.c_contiguous or not arr.flags.writeable:
            raise ValueError(f"{name} must be C-contiguous and writeable (it is written in place)")
    shape = out_image.shape
    if out_variance.shape != shape or out_mask.shape != shape:
        raise ValueError(
            f"out_image {shape}, out_variance {out_variance.shape} and out_mask {out_mask.shape} differ in shape"
        )
    if out_y0 + ny > shape[0] or out_x0 + nx > shape[1]:
        raise ValueError(
            f"output region rows {out_y0}:{out_y0 + ny}, columns {out_x0}:{out_x0 + nx} "
            f"lies outside the outputs of shape {shape}"
        )
    if overscan_rows is None:
        osrow = np.zeros(ny, dtype=np.float64)
    else:
        osrow = np.ascontiguousarray(overscan_rows, dtype=np.float64)
        if osrow.shape != (ny,):
            raise ValueError(f"overscan_rows must have shape ({ny},), got {osrow.shape}")
    gain = float(gain)
    read_noise = float(read_noise)
    saturation = float(saturation)
    if not (gain > 0 and np.isfinite(gain)):
        raise ValueError(f"gain must be positive and finite, got {gain}")
    if not (read_noise >= 0 and np.isfinite(read_noise)):
        raise ValueError(f"read_noise must be >= 0 and finite, got {read_noise}")
    if np.isnan(saturation):
        raise ValueError("saturation must not be NaN")
    lin = np.ascontiguousarray(() if linearity is None else linearity, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(lin)):
        raise ValueError("linearity coefficients must be finite")

    def plane(name, arr, dtype):
        if arr is None:
            return np.zeros((1, 1), dtype=dtype), False
        a = np.asarray(arr)
        if a.shape != shape:
            raise ValueError(f"{name} must have the outputs' shape {shape}, got {a.shape}")
        return np.ascontiguousarray(a, dtype=dtype), True

    bias_a, use_bias = plane("bias", bias, np.float32)
    flat_a, use_flat = plane("flat", flat, np.float32)
    if defects is not None and not np.issubdtype(np.asarray(defects).dtype, np.integer) \
            and np.asarray(defects).dtype != np.bool_:
        raise TypeError(f"defects must be an integer mask array, got dtype {np.asarray(defects).dtype}")
    def_a, use_def = plane("defects", defects, np.int32)
    if convert_raw and not (raw.dtype == np.float32 and raw.flags.c_contiguous):
        # convert only this amplifier's pixels
        raw = np.ascontiguousarray(raw[data_y0:data_y0 + ny, data_x0:data_x0 + nx], dtype=np.float32)
        data_y0 = data_x0 = 0
    return (raw, osrow, data_y0, data_x0, ny, nx, out_y0, out_x0, gain, read_noise ** 2, saturation, lin,
            bias_a, use_bias, flat_a, use_flat, def_a, use_def)


def isr_amp(raw, overscan_rows, *, data_y0, data_x0, ny, nx, out_y0, out_x0, flip_x, flip_y,
            gain, read_noise, saturation, linearity=(), bias=None, flat=None, defects=None,
            out_image, out_variance, out_mask, threads=1):
    """Instrument signature removal of one amplifier, in place in the detector outputs.

    Parameters
    ----------
    raw : numpy.ndarray, 2-D
        The whole raw HDU array (any integer or float dtype).  The amplifier's
        data are ``raw[data_y0:data_y0 + ny, data_x0:data_x0 + nx]``.  A
        C-contiguous float32 array is used as is; anything else has only the
        amplifier's pixels converted to float32 (convert the frame once with
        ``np.ascontiguousarray(raw, np.float32)`` when calling per amplifier
        is frequent).
    overscan_rows : array_like, shape (ny,), or None
        Level subtracted from each data row, in ADU (see
        :func:`surveyred.kernels.row_statistic`); ``None`` for none.
    data_y0, data_x0, ny, nx : int
        0-based origin and size of the data region in ``raw``.
    out_y0, out_x0 : int
        0-based origin of the amplifier's box in the assembled outputs.
    flip_x, flip_y : bool
        Whether the amplifier is read out reversed along x / y.
    gain : float
        e-/ADU (positive).
    read_noise : float
        Read noise in electrons.
    saturation : float
        Raw value (ADU, before overscan subtraction) at or above which a pixel
        is saturated.
    linearity : array_like of float, optional
        Coefficients :math:`c_0, c_1, \\ldots` of :math:`a^2, a^3, \\ldots`;
        empty for no correction.
    bias : numpy.ndarray, optional
        Assembled master bias in electrons, the outputs' shape (float32;
        other dtypes are converted); ``None`` (or zeros) for none.
    flat : numpy.ndarray, optional
        Assembled normalised master flat, the outputs' shape (float32);
        ``None`` (or ones) for none.
    defects : numpy.ndarray, optional
        Assembled defect mask bit planes, the outputs' shape (int32);
        ``None`` (or zeros) for none.
    out_image, out_variance : numpy.ndarray, float32, C-contiguous
        Assembled detector image (electrons) and variance (electrons^2),
        written in place in the amplifier's box.
    out_mask : numpy.ndarray, int32, C-contiguous
        Assembled detector mask; this amplifier's bits are ORed in (start
        from zeros).
    threads : int
        Numba threads (rows are split between threads).

    Returns
    -------
    None

    Notes
    -----
    For the amplifier pixel :math:`(j, i)` with raw value :math:`r`, written
    at :math:`(y, x) = (y_0 + (n_y - 1 - j \\text{ if flip\\_y else } j),\\;
    x_0 + (n_x - 1 - i \\text{ if flip\\_x else } i))`:

    .. math::

        a &= r - o_j, \\qquad
        a_\\mathrm{lin} = a + a^2 (c_0 + a (c_1 + a (c_2 + \\ldots)))
        = a + \\textstyle\\sum_k c_k a^{k+2}\\\\
        e &= g\\,a_\\mathrm{lin} - B_{yx}, \\qquad
        v = \\max(e, 0) + \\sigma_\\mathrm{read}^2\\\\
        I_{yx} &= e / F_{yx}, \\qquad V_{yx} = v / F_{yx}^2

    in float64, stored as float32.  ``SAT`` is set where
    :math:`r \\geq` ``saturation`` and the defect bits are ORed in.  Where
    :math:`F \\le 0`, :math:`F` or :math:`e` is not finite (e.g. a NaN raw
    value or master bias), :math:`I = V = 0` and ``NO_DATA | BAD`` are set.
    Results do not depend on ``threads`` (bit-identical).
    """
    args = _prepare(raw, overscan_rows, data_y0, data_x0, ny, nx, out_y0, out_x0, gain, read_noise,
                    saturation, linearity, bias, flat, defects, out_image, out_variance, out_mask)
    (raw_a, osrow, dy0, dx0, ny, nx, oy0, ox0, gain, rn2, saturation, lin,
     bias_a, use_bias, flat_a, use_flat, def_a, use_def) = args
    if ny == 0 or nx == 0:
        return
    n = set_threads(threads)
    kernel = _isr_amp_parallel if n > 1 else _isr_amp_serial
    kernel(raw_a, osrow, dy0, dx0, ny, nx, oy0, ox0, bool(flip_x), bool(flip_y), gain, rn2, saturation,
           lin, bias_a, use_bias, flat_a, use_flat, def_a, use_def, out_image, out_variance, out_mask)
    return


# -- reference ----------------------------------------------------------------------

def isr_amp_ref(raw, overscan_rows, *, data_y0, data_x0, ny, nx, out_y0, out_x0, flip_x, flip_y,
                gain, read_noise, saturation, linearity=(), bias=None, flat=None, defects=None,
                out_image, out_variance, out_mask):
    """NumPy reference of :func:`isr_amp` (same arguments, no threads)."""
    (raw_a, osrow, dy0, dx0, ny, nx, oy0, ox0, gain, rn2, saturation, lin,
     bias_a, use_bias, flat_a, use_flat, def_a, use_def) = _prepare(
        raw, overscan_rows, data_y0, data_x0, ny, nx, out_y0, out_x0, gain, read_noise,
        saturation, linearity, bias, flat, defects, out_image, out_variance, out_mask)
    r = raw_a[dy0:dy0 + ny, dx0:dx0 + nx].astype(np.float64)
    m = np.where(r >= saturation, _SAT, 0).astype(np.int32)
    a = r - osrow[:, None]
    if lin.size:
        p = np.full_like(a, lin[-1])
        for c in lin[-2::-1]:
            p = p * a + c
        a = a + a * a * p
    e = a * gain
    box = (slice(oy0, oy0 + ny), slice(ox0, ox0 + nx))

    def amp_view(plane):
        # the plane's values in amplifier (j, i) order
        v = plane[box]
        if flip_y:
            v = v[::-1]
        if flip_x:
            v = v[:, ::-1]
        return v

    if use_bias:
        e = e - amp_view(bias_a).astype(np.float64)
    f = amp_view(flat_a).astype(np.float64) if use_flat else np.ones_like(e)
    with np.errstate(invalid="ignore", divide="ignore"):
        good = np.isfinite(e) & (f > 0) & np.isfinite(f)
        v = np.where(e > 0, e, 0.0) + rn2
        img = np.where(good, e / f if use_flat else e, 0.0)
        var = np.where(good, v / (f * f) if use_flat else v, 0.0)
    m |= np.where(good, 0, _NODATA_BAD).astype(np.int32)
    if use_def:
        m |= amp_view(def_a)

    def put(plane, values):
        if flip_y:
            values = values[::-1]
        if flip_x:
            values = values[:, ::-1]
        return values

    out_image[box] = put(out_image, img).astype(np.float32)
    out_variance[box] = put(out_variance, var).astype(np.float32)
    out_mask[box] |= put(out_mask, m)
