"""Per-row statistics of an amplifier's serial overscan.

:func:`row_statistic` reduces the overscan pixels of one amplifier,
``region[j, :]`` for every data row ``j``, to one value per row (mean, median
or sigma-clipped mean), ignoring NaN and infinite values.  The numba kernels
work row by row; the parallel variant distributes rows over threads, so every
row is computed by the same code in the same order whatever the thread count
and the result is bit-identical.  :func:`row_statistic_ref` is the plain NumPy
reference the tests compare the kernels with.
"""

from __future__ import annotations

import numba
import numpy as np

from ..runtime import set_threads

__all__ = ["STATISTICS", "row_statistic", "row_statistic_ref"]

#: Accepted values of ``stat`` and the code the kernels use for them.
STATISTICS = {"mean": 0, "median": 1, "clipped_mean": 2}


# -- kernels ----------------------------------------------------------------------

@numba.njit(cache=True, nogil=True)
def _sort(buf, m):
    """Sort ``buf[:m]`` in place: Shell sort (Knuth gaps), i.e. insertion sort
    for short rows, which are the rule for an overscan."""
    h = 1
    while h < m // 3:
        h = 3 * h + 1
    while h >= 1:
        for i in range(h, m):
            v = buf[i]
            k = i - h
            while k >= 0 and buf[k] > v:
                buf[k + h] = buf[k]
                k -= h
            buf[k + h] = v
        h //= 3


@numba.njit(cache=True, nogil=True)
def _median_sorted(buf, lo, hi):
    """Median of the sorted values ``buf[lo:hi]`` (``hi > lo``)."""
    cnt = hi - lo
    mid = lo + cnt // 2
    if cnt % 2 == 1:
        return buf[mid]
    return (buf[mid - 1] + buf[mid]) / 2.0


@numba.njit(cache=True, nogil=True)
def _row_value(region, j, code, nsigma, maxiters, buf):
    ncol = region.shape[1]
    m = 0
    total = 0.0
    for i in range(ncol):
        v = region[j, i]
        if np.isfinite(v):
            buf[m] = v
            total += v
            m += 1
    if m == 0:
        return np.nan
    if code == 0:
        return total / m
    _sort(buf, m)
    if code == 1:
        return _median_sorted(buf, 0, m)
    # iteratively sigma-clipped mean about the median; the kept values are a
    # contiguous run buf[lo:hi] of the sorted row
    lo = 0
    hi = m
    for _ in range(maxiters):
        cnt = hi - lo
        s = 0.0
        for k in range(lo, hi):
            s += buf[k]
        mean = s / cnt
        ss = 0.0
        for k in range(lo, hi):
            dv = buf[k] - mean
            ss += dv * dv
        limit = nsigma * np.sqrt(ss / cnt)
        med = _median_sorted(buf, lo, hi)
        nlo = lo
        while nlo < hi and np.abs(buf[nlo] - med) > limit:
            nlo += 1
        nhi = hi
        while nhi > nlo and np.abs(buf[nhi - 1] - med) > limit:
            nhi -= 1
        if nlo == lo and nhi == hi:
            break
        lo = nlo
        hi = nhi
        if hi == lo:
            return np.nan
    s = 0.0
    for k in range(lo, hi):
        s += buf[k]
    return s / (hi - lo)


@numba.njit(cache=True, nogil=True)
def _row_statistic_serial(region, code, nsigma, maxiters, out):
    buf = np.empty(region.shape[1], dtype=np.float64)
    for j in range(region.shape[0]):
        out[j] = _row_value(region, j, code, nsigma, maxiters, buf)


@numba.njit(cache=True, nogil=True, parallel=True)
def _row_statistic_parallel(region, code, nsigma, maxiters, out):
    for j in numba.prange(region.shape[0]):
        buf = np.empty(region.shape[1], dtype=np.float64)
        out[j] = _row_value(region, np.int64(j), code, nsigma, maxiters, buf)


# -- wrapper ----------------------------------------------------------------------

def _check(region, stat, nsigma, maxiters):
    arr = np.asarray(region)
    if arr.ndim != 2:
        raise ValueError(f"region must be 2-D (rows, overscan columns), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
            or arr.dtype == np.bool_):
        raise TypeError(f"region must hold real numbers, got dtype {arr.dtype}")
    if stat not in STATISTICS:
        raise ValueError(f"stat must be one of {sorted(STATISTICS)}, got {stat!r}")
    nsigma = float(nsigma)
    if not nsigma > 0:
        raise ValueError(f"nsigma must be positive, got {nsigma}")
    if int(maxiters) != maxiters or maxiters < 0:
        raise ValueError(f"maxiters must be a non-negative integer, got {maxiters!r}")
    return arr, nsigma, int(maxiters)


def row_statistic(region, *, stat="median", nsigma=3.0, maxiters=3, threads=1):
    """One overscan value per row of an amplifier's overscan region.

    Parameters
    ----------
    region : array_like, shape (ny, ncol)
        Overscan pixels of one amplifier, one row per data row (any real
        dtype; NaN and infinite values are ignored).
    stat : {"median", "mean", "clipped_mean"}
        Per-row statistic.
    nsigma : float
        Clipping threshold of ``"clipped_mean"`` (in standard deviations).
    maxiters : int
        Maximum clipping iterations of ``"clipped_mean"``.
    threads : int
        Numba threads (rows are distributed over threads).

    Returns
    -------
    numpy.ndarray, float64, shape (ny,)
        The statistic of each row; NaN for a row without a finite value.

    Notes
    -----
    With :math:`x_{j,1..m}` the finite values of row :math:`j`:

    * ``mean``: :math:`\\bar x_j = \\frac{1}{m}\\sum_i x_{j,i}`;
    * ``median``: the middle value of the sorted row, or the mean of the two
      middle values when :math:`m` is even;
    * ``clipped_mean``: starting with all finite values kept, repeat up to
      ``maxiters`` times: :math:`c` = median of the kept values,
      :math:`\\sigma` = population standard deviation (ddof=0) of the kept
      values about their mean, reject kept values with
      :math:`|x - c| > n_\\sigma \\sigma`; stop early when nothing is
      rejected.  The result is the mean of the values kept (NaN if an
      iteration rejects every value, which needs a pathological ``nsigma``).

    Results do not depend on ``threads`` (bit-identical).
    """
    arr, nsigma, maxiters = _check(region, stat, nsigma, maxiters)
    data = np.ascontiguousarray(arr, dtype=np.float64)
    out = np.empty(data.shape[0], dtype=np.float64)
    if data.shape[0] == 0:
        return out
    n = set_threads(threads)
    kernel = _row_statistic_parallel if n > 1 else _row_statistic_serial
    kernel(data, STATISTICS[stat], nsigma, maxiters, out)
    return out


# -- reference ----------------------------------------------------------------------

def row_statistic_ref(region, *, stat="median", nsigma=3.0, maxiters=3):
    """NumPy reference of :func:`row_statistic` (same arguments, no threads)."""
    arr, nsigma, maxiters = _check(region, stat, nsigma, maxiters)
    data = np.array(arr, dtype=np.float64)
    data[~np.isfinite(data)] = np.nan
    ny = data.shape[0]
    empty = ~np.isfinite(data).any(axis=1) if data.shape[1] else np.ones(ny, bool)
    out = np.full(ny, np.nan)
    good = ~empty
    if stat == "mean":
        out[good] = np.nanmean(data[good], axis=1)
        return out
    if stat == "median":
        out[good] = np.nanmedian(data[good], axis=1)
        return out
    for j in np.flatnonzero(good):
        row = data[j][np.isfinite(data[j])]
        keep = np.ones(row.size, dtype=bool)
        for _ in range(maxiters):
            kept = row[keep]
            centre = np.median(kept)
            sigma = np.std(kept)
            new = keep & ~(np.abs(row - centre) > nsigma * sigma)
            if new.sum() == keep.sum():
                break
            keep = new
            if not keep.any():
                break
        out[j] = row[keep].mean() if keep.any() else np.nan
    return out
