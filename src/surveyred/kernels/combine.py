"""Sigma-clipped mean combination of a stack of frames (master bias/flat).

:func:`clipped_mean` combines an in-memory stack ``(n, ny, nx)`` pixel by
pixel; :func:`combine_files_chunked` combines FITS files by reading blocks of
rows from every file in turn, so that memory holds one block of all frames
plus the outputs, never the whole stack.  :func:`clipped_mean_ref` is the
plain NumPy reference the tests compare the kernels with.

The kernels gather a pixel's finite values with their mean and standard
deviation.  Most pixels of a bias or flat stack lose nothing to clipping, and
that can usually be proven without the median: if fewer than half of the
values lie below ``max - high*sigma`` and fewer than half above
``min + low*sigma``, the median lies between the two, so no value is rejected
(the test keeps a small margin so that it never disagrees with the exact
floating-point comparisons).  Other pixels are sorted (insertion sort: ``n``
is a few tens) and clipped by moving the ends of the kept run of the sorted
values, which gives the median of the kept values directly.  Every pixel is
computed by the same code in the same order whatever the thread count
(threads split the rows), so results are bit-identical for any ``threads``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence

import numba
import numpy as np

from ..errors import CorruptInput, InsufficientData
from ..runtime import set_threads

__all__ = ["CENTERS", "clipped_mean", "clipped_mean_ref", "combine_files_chunked"]

#: Accepted values of ``center``.
CENTERS = ("median", "mean")

_MAX_FRAMES = np.iinfo(np.int16).max


# -- kernels ----------------------------------------------------------------------
#
# The stack reaches the kernels as a 2-D C-contiguous array ``planes`` of shape
# (n, L), pixel (y, x) of frame k being ``planes[k, y * nx + x]`` (L >= ny*nx).
# ``clipped_mean`` passes a reshaped view of the caller's stack;
# ``combine_files_chunked`` passes a buffer whose frame stride is padded so
# that the n values of a pixel do not all fall into the same cache set (a
# power-of-two frame size otherwise makes the gather several times slower).


@numba.njit(cache=True, nogil=True)
def _sorted_stats(buf, lo, hi):
    """Mean and population std of ``buf[lo:hi]`` (summed in sorted order)."""
    cnt = hi - lo
    s = 0.0
    for k in range(lo, hi):
        s += buf[k]
    mean = s / cnt
    ss = 0.0
    for k in range(lo, hi):
        d = buf[k] - mean
        ss += d * d
    return mean, np.sqrt(ss / cnt)


@numba.njit(cache=True, nogil=True)
def _model_sigma(c, v0, poisson, sbar):
    """Expected sigma of a (scaled) value at level ``c``: sqrt(v0 + max(c*sbar, 0)) / sbar."""
    v = v0
    if poisson and c > 0.0:
        v += c * sbar
    return np.sqrt(v) / sbar


@numba.njit(cache=True, nogil=True)
def _pixel(planes, p, scales, use_scales, low, high, maxiters, use_median, buf, noise):
    """Clipped mean, count and std of pixel index ``p``; see :func:`clipped_mean`.

    ``noise = (use_model, var0, var0_is_map, poisson, sbar)`` selects clipping
    against the expected noise instead of the sample scatter.
    """
    use_model, var0, var0_is_map, poisson, sbar = noise
    v0 = var0[p] if var0_is_map else var0[0]
    n = planes.shape[0]
    # gather the finite (scaled) values in frame order, with their sum, min, max
    m = 0
    s = 0.0
    vmin = np.inf
    vmax = -np.inf
    for k in range(n):
        fv = np.float64(planes[k, p])
        if use_scales:
            fv = fv / scales[k]
        if np.isfinite(fv):
            buf[m] = fv
            m += 1
            s += fv
            vmin = min(vmin, fv)
            vmax = max(vmax, fv)
    if m == 0:
        return np.nan, 0, np.nan
    mean = s / m
    ss = 0.0
    for k in range(m):
        d = buf[k] - mean
        ss += d * d
    sigma = np.sqrt(ss / m)
    if maxiters == 0 or vmin == vmax:
        return mean, m, sigma
    scatter = sigma
    if use_model:
        # sigma(c) grows with the centre c >= vmin, so sigma(vmin) is a lower
        # bound: the proof below stays valid with it.
        sigma = _model_sigma(vmin, v0, poisson, sbar)
    # Fast path: prove that the first iteration rejects nothing, without the
    # median.  Nothing is rejected iff  vmax - high*sigma <= c <= vmin + low*sigma.
    # For the median c: if fewer than half of the values lie below A, then
    # c >= A (and likewise above B).  The margin eps makes the proof hold for
    # the floating-point comparisons of the exact path too, so both paths
    # always take the same decisions.
    eps = 1e-9 * (np.abs(vmin) + np.abs(vmax) + (low + high) * sigma)
    a = vmax - high * sigma + eps
    b = vmin + low * sigma - eps
    if use_median:
        below = 0
        above = 0
        for k in range(m):
            below += buf[k] < a
            above += buf[k] > b
        half = (m - 1) // 2
        if below <= half and above <= half:
            return mean, m, scatter
    elif a <= mean <= b:
        return mean, m, scatter
    # Exact path: sort, then clip by moving the ends of the kept sorted run.
    for i in range(1, m):
        v = buf[i]
        j = i - 1
        while j >= 0 and buf[j] > v:
            buf[j + 1] = buf[j]
            j -= 1
        buf[j + 1] = v
    lo = 0
    hi = m
    for _ in range(maxiters):
        cnt = hi - lo
        mean, sigma = _sorted_stats(buf, lo, hi)
        if use_median:
            mid = lo + cnt // 2
            if cnt % 2 == 1:
                centre = buf[mid]
            else:
                centre = (buf[mid - 1] + buf[mid]) / 2.0
        else:
            centre = mean
        if use_model:
            sigma = _model_sigma(centre, v0, poisson, sbar)
        lower = centre - low * sigma
        upper = centre + high * sigma
        nlo = lo
        while nlo < hi and buf[nlo] < lower:
            nlo += 1
        nhi = hi
        while nhi > nlo and buf[nhi - 1] > upper:
            nhi -= 1
        if nlo == lo and nhi == hi:
            break
        lo = nlo
        hi = nhi
        if hi == lo:
            return np.nan, 0, np.nan
    mean, sigma = _sorted_stats(buf, lo, hi)
    return mean, hi - lo, sigma


@numba.njit(cache=True, nogil=True)
def _row(planes, y, nx, scales, use_scales, low, high, maxiters, use_median,
         out_mean, out_count, out_std, buf, noise):
    for x in range(nx):
        mean, cnt, std = _pixel(planes, y * nx + x, scales, use_scales, low, high, maxiters, use_median, buf, noise)
        out_mean[y, x] = mean
        out_count[y, x] = cnt
        out_std[y, x] = std


@numba.njit(cache=True, nogil=True)
def _clipped_mean_serial(planes, ny, nx, scales, use_scales, low, high, maxiters, use_median,
                         out_mean, out_count, out_std, noise):
    buf = np.empty(planes.shape[0] + 1, dtype=np.float64)
    for y in range(ny):
        _row(planes, y, nx, scales, use_scales, low, high, maxiters, use_median, out_mean, out_count, out_std,
             buf, noise)


@numba.njit(cache=True, nogil=True, parallel=True)
def _clipped_mean_parallel(planes, ny, nx, scales, use_scales, low, high, maxiters, use_median,
                           out_mean, out_count, out_std, noise):
    for y in numba.prange(ny):
        buf = np.empty(planes.shape[0] + 1, dtype=np.float64)
        _row(planes, np.int64(y), nx, scales, use_scales, low, high, maxiters, use_median, out_mean, out_count,
             out_std, buf, noise)


# -- wrappers ---------------------------------------------------------------------

def _check_options(low, high, maxiters, center):
    low = float(low)
    high = float(high)
    if not (low > 0 and high > 0):
        raise ValueError(f"low and high must be positive, got low={low}, high={high}")
    if int(maxiters) != maxiters or maxiters < 0:
        raise ValueError(f"maxiters must be a non-negative integer, got {maxiters!r}")
    if center not in CENTERS:
        raise ValueError(f"center must be one of {CENTERS}, got {center!r}")
    return low, high, int(maxiters), center == "median"


def _check_scales(scales, n):
    if scales is None:
        return np.ones(1, dtype=np.float64), False
    s = np.ascontiguousarray(scales, dtype=np.float64)
    if s.shape != (n,):
        raise ValueError(f"scales must have shape ({n},) (one per frame), got {s.shape}")
    if not (np.all(np.isfinite(s)) and np.all(s != 0)):
        raise ValueError("scales must be finite and non-zero")
    return s, True


_NO_NOISE = (False, np.zeros(1, dtype=np.float64), False, False, 1.0)


def _check_noise(noise, shape, scales, use_scales):
    """Kernel tuple for ``noise=(var0, poisson)`` (see :func:`clipped_mean`)."""
    if noise is None:
        return _NO_NOISE
    try:
        var0, poisson = noise
    except (TypeError, ValueError):
        raise ValueError("noise must be (var0, poisson): read-noise variance and a Poisson flag") from None
    v = np.asarray(var0, dtype=np.float64)
    if v.ndim == 0:
        v, is_map = v.reshape(1), False
    elif v.shape == tuple(shape):
        v, is_map = np.ascontiguousarray(v).reshape(-1), True
    else:
        raise ValueError(f"noise var0 must be a scalar or of shape {tuple(shape)}, got {v.shape}")
    if not (np.all(np.isfinite(v)) and np.all(v > 0)):
        raise ValueError("noise var0 must be finite and positive")
    sbar = float(np.median(np.abs(scales))) if use_scales else 1.0
    return (True, v, is_map, bool(poisson), sbar)


def _kernel(threads):
    n = set_threads(threads)
    return _clipped_mean_parallel if n > 1 else _clipped_mean_serial


def clipped_mean(stack, *, low=3.0, high=3.0, maxiters=5, center="median", scales=None, noise=None, threads=1):
    """Sigma-clipped mean of a stack of frames, pixel by pixel.

    Parameters
    ----------
    stack : array_like, shape (n, ny, nx)
        The frames (converted to float32 C order if they are not already;
        pass float32 to avoid a copy).  NaN and infinite values are ignored.
    low, high : float
        Rejection thresholds below/above the centre, in standard deviations
        (positive).
    maxiters : int
        Maximum number of clipping iterations (0: plain mean of the finite
        values).
    center : {"median", "mean"}
        Centre the thresholds are measured from.
    scales : array_like, shape (n,), optional
        Each frame is divided by its scale before combining (flats); the
        stack is not copied for this.  Finite and non-zero.
    noise : (var0, poisson), optional
        Clip against the *expected* noise rather than the scatter of the
        values (IRAF imcombine's ``ccdclip``): ``var0`` is the read-noise
        variance of one frame in the stack's units (scalar or an (ny, nx)
        map), ``poisson`` adds the Poisson variance of the level (stack in
        electrons).  Robust with few frames, where one cosmic ray inflates
        the sample scatter so much that it is never rejected.
    threads : int
        Numba threads (rows are split between threads).

    Returns
    -------
    mean : numpy.ndarray, float32, shape (ny, nx)
        Mean of the kept values; NaN where no value is kept.
    count : numpy.ndarray, int16, shape (ny, nx)
        Number of values kept.
    std : numpy.ndarray, float32, shape (ny, nx)
        Population standard deviation (ddof=0) of the kept values; NaN where
        none is kept.

    Notes
    -----
    For each pixel, with :math:`x_k = s_k^{-1} \\cdot \\mathrm{stack}_{k}` the
    finite (scaled) values, start with all of them kept and repeat up to
    ``maxiters`` times:

    .. math::

        c = \\operatorname{median}(x_\\mathrm{kept})\\ \\text{(or mean)},\\quad
        \\sigma = \\sqrt{\\tfrac{1}{N}\\textstyle\\sum (x - \\bar x)^2},\\quad
        \\text{reject } x < c - \\mathrm{low}\\,\\sigma
        \\text{ or } x > c + \\mathrm{high}\\,\\sigma

    over the kept values, stopping when nothing is rejected.  Rejected values
    stay rejected.  With ``noise``, :math:`\sigma = \sqrt{v_0 + \max(c\,\bar s, 0)}/\bar s`
    (the Poisson term only when requested) with :math:`\bar s` the median
    scale (1 without scales).  The outputs are the mean, number and population standard
    deviation of the values kept, computed in float64 and rounded to float32.
    Results do not depend on ``threads`` (bit-identical).
    """
    low, high, maxiters, use_median = _check_options(low, high, maxiters, center)
    arr = np.asarray(stack)
    if arr.ndim != 3:
        raise ValueError(f"stack must be 3-D (n, ny, nx), got shape {arr.shape}")
    n = arr.shape[0]
    if n < 1:
        raise InsufficientData("clipped_mean needs at least one frame")
    if n > _MAX_FRAMES:
        raise ValueError(f"at most {_MAX_FRAMES} frames can be combined (int16 count), got {n}")
    data = np.ascontiguousarray(arr, dtype=np.float32)
    s, use_scales = _check_scales(scales, n)
    ny, nx = data.shape[1:]
    model = _check_noise(noise, (ny, nx), s, use_scales)
    mean = np.empty((ny, nx), dtype=np.float32)
    count = np.empty((ny, nx), dtype=np.int16)
    std = np.empty((ny, nx), dtype=np.float32)
    if data.size:
        planes = data.reshape(n, ny * nx)
        _kernel(threads)(planes, ny, nx, s, use_scales, low, high, maxiters, use_median, mean, count, std, model)
    return mean, count, std


def _padded_length(npix):
    """Frame stride (in float32) for ``npix`` pixels: an odd multiple of 64 bytes."""
    lines = -(-npix // 16)
    if lines % 2 == 0:
        lines += 1
    return lines * 16


def _section_rows(ext, y0, y1, path, hdu):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ext.section[y0:y1, :]
    except (OSError, ValueError, TypeError, EOFError, IndexError) as exc:
        cause = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CorruptInput(f"HDU {hdu!r} rows {y0}:{y1} unreadable ({cause})", path=path) from exc


def combine_files_chunked(
    paths: Sequence[str | os.PathLike],
    *,
    hdu: int | str = 0,
    chunk_rows: int = 256,
    scales=None,
    low: float = 3.0,
    high: float = 3.0,
    maxiters: int = 5,
    center: str = "median",
    threads: int = 1,
    preprocess: Callable[[int, slice, np.ndarray], np.ndarray] | None = None,
):
    """:func:`clipped_mean` of the same image HDU of many FITS files, by row blocks.

    Parameters
    ----------
    paths : sequence of path-like
        The frames, one FITS file each.
    hdu : int or str
        Index or EXTNAME of the image HDU to combine (the same in every file).
    chunk_rows : int
        Rows read from every file per block.  Memory use is about
        ``4 * n * chunk_rows * width`` bytes for the block, plus the outputs
        (10 bytes per output pixel) and one frame's block being read.
    scales, low, high, maxiters, center, threads
        As in :func:`clipped_mean`.
    preprocess : callable, optional
        ``preprocess(i, rows, block) -> block``, called for frame ``i`` with
        the row slice ``rows`` of the HDU and the rows read from the file
        (BSCALE/BZERO applied, dtype as stored).  It must return an array of
        ``rows.stop - rows.start`` rows and the same number of columns for
        every call (it may drop or change columns, e.g. subtract a per-row
        overscan level and cut the overscan away).  Because the combination is
        pixel by pixel, row-reordering steps (trimming rows, flips, amplifier
        assembly) are applied to the combined result instead.

    Returns
    -------
    mean : numpy.ndarray, float32
    count : numpy.ndarray, int16
    std : numpy.ndarray, float32
        As in :func:`clipped_mean`, of shape ``(rows of the HDU, width)``.

    Raises
    ------
    InsufficientData
        If ``paths`` is empty.
    CorruptInput
        Naming the file, if one cannot be opened or read, lacks the HDU, holds
        no 2-D image, or has a shape different from the first file.

    Notes
    -----
    Files are opened without memory mapping and only the requested rows are
    read (``ImageHDU.section``): a memory map would keep every page touched
    resident in the process for as long as the file stays open, so the
    process would end up holding the whole stack.  All files stay open during
    the combination (one file descriptor each).
    """
    from ..fitsio import open_fits

    paths = [os.fspath(p) for p in paths]
    n = len(paths)
    if n == 0:
        raise InsufficientData("no files to combine")
    if n > _MAX_FRAMES:
        raise ValueError(f"at most {_MAX_FRAMES} frames can be combined (int16 count), got {n}")
    low, high, maxiters, use_median = _check_options(low, high, maxiters, center)
    s, use_scales = _check_scales(scales, n)
    if int(chunk_rows) != chunk_rows or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    chunk_rows = int(chunk_rows)

    hduls = []
    exts = []
    try:
        shape = None
        for path in paths:
            hdul = open_fits(path)
            hduls.append(hdul)
            try:
                ext = hdul[hdu]
            except (KeyError, IndexError) as exc:
                raise CorruptInput(f"has no HDU {hdu!r} (file has {len(hdul)})", path=path) from exc
            if not getattr(ext, "is_image", False) or len(ext.shape) != 2:
                raise CorruptInput(f"HDU {hdu!r} holds no 2-D image (shape {ext.shape})", path=path)
            if shape is None:
                shape = tuple(ext.shape)
            elif tuple(ext.shape) != shape:
                raise CorruptInput(
                    f"HDU {hdu!r} has shape {tuple(ext.shape)}, but {paths[0]} has {shape}", path=path
                )
            exts.append(ext)

        ny, nx_in = shape
        kernel = _kernel(threads)
        rows_max = max(1, min(chunk_rows, ny))
        width = None
        planes = out_mean = out_count = out_std = None
        for y0 in range(0, ny, rows_max):
            y1 = min(ny, y0 + rows_max)
            rows = y1 - y0
            for k, (path, ext) in enumerate(zip(paths, exts)):
                data = _section_rows(ext, y0, y1, path, hdu)
                if preprocess is not None:
                    data = np.asarray(preprocess(k, slice(y0, y1), data))
                    if data.ndim != 2 or data.shape[0] != rows:
                        raise ValueError(
                            f"preprocess returned shape {data.shape} for rows {y0}:{y1} of {path}; "
                            f"expected ({rows}, width)"
                        )
                if width is None:
                    width = data.shape[1]
                    planes = np.empty((n, _padded_length(rows_max * width)), dtype=np.float32)
                    out_mean = np.empty((ny, width), dtype=np.float32)
                    out_count = np.empty((ny, width), dtype=np.int16)
                    out_std = np.empty((ny, width), dtype=np.float32)
                elif data.shape[1] != width:
                    raise ValueError(
                        f"preprocess returned {data.shape[1]} columns for {path}, earlier blocks had {width}"
                    )
                planes[k, : rows * width].reshape(rows, width)[...] = data
                del data
            if width:
                kernel(planes, rows, width, s, use_scales, low, high, maxiters, use_median,
                       out_mean[y0:y1], out_count[y0:y1], out_std[y0:y1], _NO_NOISE)
        if out_mean is None:  # zero-row images
            width = nx_in if width is None else width
            out_mean = np.empty((ny, width), dtype=np.float32)
            out_count = np.empty((ny, width), dtype=np.int16)
            out_std = np.empty((ny, width), dtype=np.float32)
        return out_mean, out_count, out_std
    finally:
        for hdul in hduls:
            hdul.close()


# -- reference ----------------------------------------------------------------------

def clipped_mean_ref(stack, *, low=3.0, high=3.0, maxiters=5, center="median", scales=None, noise=None):
    """NumPy reference of :func:`clipped_mean` (vectorised, same arguments, no threads)."""
    low, high, maxiters, use_median = _check_options(low, high, maxiters, center)
    data = np.array(stack, dtype=np.float32).astype(np.float64)
    if data.ndim != 3 or data.shape[0] < 1:
        raise ValueError(f"stack must be 3-D (n, ny, nx) with n >= 1, got shape {data.shape}")
    n = data.shape[0]
    s, use_scales = _check_scales(scales, n)
    use_model, var0, is_map, poisson, sbar = _check_noise(noise, data.shape[1:], s, use_scales)
    var0 = var0.reshape(data.shape[1:]) if is_map else var0[0]
    if scales is not None:
        data = data / s[:, None, None]
    data[~np.isfinite(data)] = np.nan
    keep = np.isfinite(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels
        for _ in range(maxiters):
            kept = np.where(keep, data, np.nan)
            centre = np.nanmedian(kept, axis=0) if use_median else np.nanmean(kept, axis=0)
            sigma = np.nanstd(kept, axis=0)
            if use_model:
                level = np.maximum(centre * sbar, 0.0) if poisson else 0.0
                sigma = np.sqrt(var0 + level) / sbar
            new = keep & ~(data < centre - low * sigma) & ~(data > centre + high * sigma)
            if np.array_equal(new, keep):
                break
            keep = new
        kept = np.where(keep, data, np.nan)
        count = keep.sum(axis=0)
        mean = np.nanmean(kept, axis=0)
        std = np.nanstd(kept, axis=0)
    mean[count == 0] = np.nan
    std[count == 0] = np.nan
    return mean.astype(np.float32), count.astype(np.int16), std.astype(np.float32)
