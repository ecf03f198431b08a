"""Master calibrations: overscan, amp assembly, master bias and flat, defects.

Science functions (arrays in, arrays out; inputs never modified):

* :func:`overscan_vector` -- the per-row level to subtract from one amplifier;
* :func:`assemble_detector` -- overscan-correct, trim, linearise, apply the
  gain and assemble the amplifiers of one raw detector (electrons, variance,
  mask), the first half of ISR;
* :func:`combine_stack` -- sigma-clipped mean of a stack of frames, processed
  in row chunks so memory stays bounded;
* :func:`find_defects` -- bad-pixel mask from a master bias and a master flat;
* :func:`ptc_gain` -- per-amplifier gain and read noise from a pair of flats
  and a pair of biases (photon transfer);
* :func:`plan_calibrations` -- validity date ranges of the masters and, for
  every science visit, the master whose range contains its date.

Command-line entry points :func:`main_bias` and :func:`main_flat` do the I/O:
``surveyred master-bias`` and ``surveyred master-flat``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from astropy.io import fits

from . import fitsio, masks
from .errors import ConfigError, CorruptInput, InsufficientData, MissingCalibration
from .instrument import Amplifier, Detector, Instrument, load_instrument
from .kernels import clipped_mean, isr_amp, row_statistic
from .provenance import add_provenance

log = logging.getLogger("surveyred.calib")

OVERSCAN_MODES = ("mean", "median", "median_per_row", "poly", "spline")


# -- configuration -------------------------------------------------------------------

@dataclass(frozen=True)
class OverscanConfig:
    """How the serial (and optionally parallel) overscan is used.

    ``mode``: ``mean``/``median`` subtract one sigma-clipped mean / median of
    the whole overscan region; ``median_per_row`` subtracts each row's median;
    ``poly`` and ``spline`` fit the row medians along the rows with a Legendre
    polynomial of ``order`` or a cubic least-squares spline with ``knots``
    interior knots (both with outlier-row rejection) and subtract the fit.
    ``columns = [start, stop]`` selects overscan columns counted from the edge
    next to the data (``stop`` None: to the far edge), e.g. ``[5, 25]`` skips
    the five columns that carry charge-transfer trails.
    """

    mode: str = "median_per_row"
    order: int = 3
    knots: int = 16
    columns: tuple[int, int | None] = (2, None)
    nsigma: float = 3.0
    parallel: bool = False

    def validate(self) -> "OverscanConfig":
        if self.mode not in OVERSCAN_MODES:
            raise ConfigError(f"overscan mode {self.mode!r} not one of {OVERSCAN_MODES}")
        start, stop = self.columns
        if start < 0 or (stop is not None and stop <= start):
            raise ConfigError(f"overscan columns {list(self.columns)} must satisfy 0 <= start < stop")
        if self.order < 0 or self.knots < 1 or self.nsigma <= 0:
            raise ConfigError("overscan order >= 0, knots >= 1 and nsigma > 0 required")
        return self


@dataclass(frozen=True)
class CombineConfig:
    """Sigma-clipped combination of calibration frames.

    ``clip = "noise"`` measures deviations against each pixel's expected noise
    (read noise + Poisson, as IRAF's ccdclip), which rejects a cosmic ray even
    among three to five frames; ``"scatter"`` uses the sample standard
    deviation (ccdproc's default), which needs many frames to do so.
    """

    low_sigma: float = 3.0
    high_sigma: float = 3.0
    maxiters: int = 5
    min_frames: int = 3
    clip: str = "noise"

    def validate(self) -> "CombineConfig":
        if self.low_sigma <= 0 or self.high_sigma <= 0 or self.maxiters < 1 or self.min_frames < 1:
            raise ConfigError("combine: sigmas > 0, maxiters >= 1, min_frames >= 1 required")
        if self.clip not in ("noise", "scatter"):
            raise ConfigError(f"combine.clip must be 'noise' or 'scatter', got {self.clip!r}")
        return self


@dataclass(frozen=True)
class DefectConfig:
    """Thresholds of the bad-pixel mask (see :func:`find_defects`)."""

    flat_low: float = 0.8
    flat_high: float = 1.2
    bias_nsigma: float = 8.0
    column_fraction: float = 0.3
    smooth: int = 15

    def validate(self) -> "DefectConfig":
        if not 0 < self.flat_low < 1 < self.flat_high:
            raise ConfigError("defects: need 0 < flat_low < 1 < flat_high")
        if self.bias_nsigma <= 0 or not 0 < self.column_fraction <= 1 or self.smooth < 3:
            raise ConfigError("defects: bias_nsigma > 0, 0 < column_fraction <= 1, smooth >= 3 required")
        return self


@dataclass(frozen=True)
class CalibConfig:
    overscan: OverscanConfig = field(default_factory=OverscanConfig)
    combine: CombineConfig = field(default_factory=CombineConfig)
    defects: DefectConfig = field(default_factory=DefectConfig)
    flat_normalise: str = "detector"  # detector | amp
    validity: Mapping[str, Any] = field(default_factory=lambda: {"mode": "night", "max_days": 3, "ranges": []})

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any] | None) -> "CalibConfig":
        doc = dict(doc or {})
        try:
            ov = dict(doc.get("overscan") or {})
            if "columns" in ov:
                cols = list(ov["columns"]) + [None] * (2 - len(ov["columns"]))
                ov["columns"] = (int(cols[0] or 0), None if cols[1] is None else int(cols[1]))
            cfg = cls(
                overscan=OverscanConfig(**ov),
                combine=CombineConfig(**(doc.get("combine") or {})),
                defects=DefectConfig(**(doc.get("defects") or {})),
                flat_normalise=str((doc.get("flat") or {}).get("normalise", "detector")),
                validity=dict(doc.get("validity") or {"mode": "night", "max_days": 3, "ranges": []}),
            )
        except TypeError as exc:
            raise ConfigError(f"calib configuration: {exc}") from exc
        return cfg.validate()

    def validate(self) -> "CalibConfig":
        self.overscan.validate(), self.combine.validate(), self.defects.validate()
        if self.flat_normalise not in ("detector", "amp"):
            raise ConfigError(f"flat.normalise must be 'detector' or 'amp', got {self.flat_normalise!r}")
        return self

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- overscan ------------------------------------------------------------------------

def overscan_columns(amp: Amplifier, columns: tuple[int, int | None]) -> slice:
    """Raw-frame column slice of the overscan columns to use.

    Columns are counted from the overscan edge next to the amplifier's data:
    for an overscan right of the data, from its left edge; otherwise from its
    right edge.
    """
    bs, ds = amp.biassec.slices[1], amp.datasec.slices[1]
    width = bs.stop - bs.start
    start, stop = columns
    stop = width if stop is None else min(stop, width)
    if start >= stop:
        raise ConfigError(
            f"amplifier {amp.name}: overscan columns {list(columns)} leave nothing of its {width} columns"
        )
    if bs.start >= ds.stop:  # overscan to the right of the data
        return slice(bs.start + start, bs.start + stop)
    return slice(bs.stop - stop, bs.stop - start)


def _fit_rows(values: np.ndarray, cfg: OverscanConfig) -> np.ndarray:
    """Fit row medians along the rows (poly or spline) with outlier rejection."""
    y = np.arange(values.size, dtype=np.float64)
    good = np.isfinite(values)
    fit = np.full_like(values, np.nanmedian(values))
    for _ in range(5):
        if good.sum() < max(cfg.order + 2, 8):
            break
        if cfg.mode == "poly":
            x = 2.0 * y / max(values.size - 1, 1) - 1.0
            coef = np.polynomial.legendre.legfit(x[good], values[good], cfg.order)
            fit = np.polynomial.legendre.legval(x, coef)
        else:
            from scipy.interpolate import LSQUnivariateSpline

            nk = min(cfg.knots, max(1, good.sum() // 8))
            knots = np.linspace(y[good][0], y[good][-1], nk + 2)[1:-1]
            fit = LSQUnivariateSpline(y[good], values[good], knots, k=3)(y)
        resid = values - fit
        sigma = 1.4826 * np.nanmedian(np.abs(resid[good] - np.nanmedian(resid[good])))
        new = np.isfinite(values) & (np.abs(resid) <= cfg.nsigma * max(sigma, 1e-12))
        if np.array_equal(new, good):
            break
        good = new
    return fit


def overscan_vector(raw: np.ndarray, amp: Amplifier, cfg: OverscanConfig, *, threads: int = 1) -> np.ndarray:
    """Level (ADU) to subtract from each data row of ``amp``.

    Parameters
    ----------
    raw : ndarray
        The raw detector HDU.
    amp : Amplifier
        With resolved sections; an amplifier without ``biassec`` gives zeros.
    cfg : OverscanConfig

    Returns
    -------
    ndarray of float64, one value per data row (in raw row order).

    Notes
    -----
    With ``parallel`` the per-column median of the parallel overscan (minus its
    overall median) is not included here; see :func:`parallel_overscan_vector`.
    """
    ny = amp.datasec.ny
    if amp.biassec is None:
        return np.zeros(ny)
    region = raw[amp.datasec.slices[0], overscan_columns(amp, cfg.columns)]
    if cfg.mode == "median":
        return np.full(ny, float(np.nanmedian(region)))
    if cfg.mode == "mean":
        rows = row_statistic(region.reshape(1, -1), stat="clipped_mean", nsigma=cfg.nsigma, threads=threads)
        return np.full(ny, float(rows[0]))
    rows = row_statistic(region, stat="median", threads=threads)
    if not np.all(np.isfinite(rows)):
        bad = np.flatnonzero(~np.isfinite(rows))
        raise CorruptInput(f"amplifier {amp.name}: overscan rows {bad[:5].tolist()} hold no finite value")
    if cfg.mode == "median_per_row":
        return rows
    return _fit_rows(rows, cfg)


def overscan_variance(amp: Amplifier, cfg: OverscanConfig | None) -> float:
    """Variance (e^2) that subtracting the overscan estimate adds to each data pixel.

    Notes
    -----
    With ``n`` overscan columns of read noise ``r`` (e-) over ``N`` rows: the
    median of a row has variance ``(pi/2) r^2 / n``; a constant from the whole
    region ``r^2 / (n N)`` (mean) or ``(pi/2) r^2 / (n N)`` (median); a fit
    with ``k`` free parameters to the row medians ``(pi/2) r^2 k / (n N)``
    (``k = order + 1`` for a polynomial, ``knots + 4`` for a cubic spline).
    """
    if cfg is None or amp.biassec is None:
        return 0.0
    n = overscan_columns(amp, cfg.columns)
    ncols, nrows = n.stop - n.start, amp.datasec.ny
    per_row = 0.5 * np.pi * amp.read_noise ** 2 / ncols
    if cfg.mode == "median_per_row":
        return per_row
    if cfg.mode == "mean":
        return amp.read_noise ** 2 / (ncols * nrows)
    if cfg.mode == "median":
        return per_row / nrows
    k = cfg.order + 1 if cfg.mode == "poly" else cfg.knots + 4
    return per_row * min(1.0, k / nrows)


def parallel_overscan_vector(raw: np.ndarray, amp: Amplifier, serial_level: float) -> np.ndarray:
    """Per-column residual level (ADU) from the parallel overscan, or zeros."""
    if amp.pbiassec is None:
        return np.zeros(amp.datasec.nx)
    region = raw[amp.pbiassec.slices].astype(np.float64)
    cols = np.nanmedian(region, axis=0) - serial_level
    return cols - np.nanmedian(cols)


# -- assembly (first half of ISR) ----------------------------------------------------

def assemble_detector(
    raw: np.ndarray,
    det: Detector,
    *,
    overscan: OverscanConfig | None = OverscanConfig(),
    linearity: bool = True,
    bias: np.ndarray | None = None,
    flat: np.ndarray | None = None,
    defects: np.ndarray | None = None,
    saturation: bool = True,
    bias_variance: np.ndarray | None = None,
    flat_variance: np.ndarray | None = None,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Overscan-correct, trim and assemble a raw detector into electrons.

    Parameters
    ----------
    raw : ndarray
        Raw pixels of one detector HDU (ADU), shape ``det.raw_shape``.
    det : Detector
        With resolved sections.
    overscan : OverscanConfig or None
        None skips overscan correction.
    linearity : bool
        Apply each amplifier's linearity polynomial.
    bias, flat : ndarray, optional
        Assembled master bias (electrons) and master flat (unitless).
    defects : ndarray of int32, optional
        Mask planes ORed into the output mask.
    saturation : bool
        Flag SAT where the raw value reaches the amplifier's saturation level.
    bias_variance, flat_variance : ndarray, optional
        Variances of the master bias (e^2) and master flat (unitless), added
        to the variance plane.

    Returns
    -------
    image, variance, mask : ndarray
        Electrons (divided by the flat), electrons squared, int32 mask planes.

    Notes
    -----
    Per pixel of an amplifier with gain ``g`` and read noise ``r`` (e-):
    ``a = raw - o_row``; ``a' = a + sum_k c_k a^(k+2)`` (linearity);
    ``e = g a' - b``; ``var = max(e, 0) + r^2``; then ``e / f`` and
    ``var / f^2``.  Pixels where ``f <= 0`` get NO_DATA|BAD and infinite
    variance.  The calibrations' own noise is then propagated:
    ``var += (v_o + v_b) / f^2 + I^2 v_f / f^2`` with ``v_o`` the overscan
    estimate's variance (:func:`overscan_variance`), ``v_b`` and ``v_f`` the
    master bias and flat variances and ``I`` the calibrated image.
    """
    ny, nx = det.shape
    rawf = np.ascontiguousarray(raw, dtype=np.float32)
    out_image = np.zeros((ny, nx), dtype=np.float32)
    out_var = np.zeros((ny, nx), dtype=np.float32)
    out_mask = np.zeros((ny, nx), dtype=masks.MASK_DTYPE)
    zeros = np.zeros((ny, nx), dtype=np.float32)
    bias_ = zeros if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    flat_ = np.ones((ny, nx), dtype=np.float32) if flat is None else np.ascontiguousarray(flat, dtype=np.float32)
    defects_ = (np.zeros((ny, nx), dtype=masks.MASK_DTYPE) if defects is None
                else np.ascontiguousarray(defects, dtype=masks.MASK_DTYPE))
    for arr, what in ((bias_, "bias"), (flat_, "flat"), (defects_, "defects")):
        if arr.shape != (ny, nx):
            raise ConfigError(f"{what} shape {arr.shape} differs from detector {det.name} shape {(ny, nx)}")
    for amp in det.amps:
        rows = np.zeros(amp.datasec.ny)
        if overscan is not None and amp.biassec is not None:
            rows = overscan_vector(rawf, amp, overscan, threads=threads)
        cols = None
        if overscan is not None and overscan.parallel and amp.pbiassec is not None:
            cols = parallel_overscan_vector(rawf, amp, float(np.median(rows)))
        src = rawf
        if cols is not None:  # parallel overscan: subtract per-column residual before the fused pass
            src = rawf.copy()
            src[amp.datasec.slices] -= cols[None, :].astype(np.float32)
        ys, xs = amp.datasec.slices
        isr_amp(
            src, rows,
            data_y0=ys.start, data_x0=xs.start, ny=amp.datasec.ny, nx=amp.datasec.nx,
            out_y0=amp.detsec.slices[0].start, out_x0=amp.detsec.slices[1].start,
            flip_x=amp.datasec.flip_x != amp.detsec.flip_x, flip_y=amp.datasec.flip_y != amp.detsec.flip_y,
            gain=amp.gain, read_noise=amp.read_noise,
            saturation=amp.saturation if saturation else np.inf,
            linearity=np.asarray(amp.linearity if linearity else (), dtype=np.float64),
            bias=bias_, flat=flat_, defects=defects_,
            out_image=out_image, out_variance=out_var, out_mask=out_mask, threads=threads,
        )
    extra = np.zeros((ny, nx), dtype=np.float32)
    for amp in det.amps:
        extra[amp.detsec.slices] = overscan_variance(amp, overscan)
    if bias is not None and bias_variance is not None:
        extra += np.asarray(bias_variance, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_f2 = np.float32(1.0) / np.square(flat_)
        out_var += extra * inv_f2
        if flat is not None and flat_variance is not None:
            out_var += np.square(out_image) * np.asarray(flat_variance, dtype=np.float32) * inv_f2
    nodata = (out_mask & masks.NO_DATA) != 0
    if nodata.any():
        out_var[nodata] = np.inf
    return out_image, out_var, out_mask


# -- combination ---------------------------------------------------------------------

def combine_stack(
    stack: np.ndarray,
    cfg: CombineConfig = CombineConfig(),
    *,
    scales: np.ndarray | None = None,
    read_noise: np.ndarray | float | None = None,
    chunk_rows: int = 256,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sigma-clipped mean of ``stack`` (n, ny, nx, electrons), in row chunks.

    ``stack`` may be a :class:`DiskStack`: only ``chunk_rows`` rows of every
    frame are read at a time.  ``scales`` divides each frame before combining.
    ``read_noise`` (electrons, scalar or (ny, nx) map) is required for
    ``cfg.clip == "noise"``: then a value is clipped when it deviates from the
    median by more than ``k sqrt(rn^2 + level)``.

    Returns
    -------
    mean, count, std : ndarray
        Clipped mean, number of frames kept and their standard deviation.
    """
    n, ny, nx = stack.shape
    if n < cfg.min_frames:
        raise InsufficientData(f"{n} frames to combine, at least {cfg.min_frames} required")
    maxiters = cfg.maxiters
    if n < 3:  # two values are clipped together or not at all: no outlier can be told apart
        log.warning("combining %d frames: too few to reject outliers, taking the plain mean", n)
        maxiters = 0
    if cfg.clip == "noise" and read_noise is None:
        raise ConfigError("combine.clip 'noise' needs the read noise of the frames")
    rn2 = None if cfg.clip != "noise" else np.broadcast_to(np.square(np.asarray(read_noise, dtype=np.float64)),
                                                           (ny, nx))
    mean = np.empty((ny, nx), dtype=np.float32)
    count = np.empty((ny, nx), dtype=np.int16)
    std = np.empty((ny, nx), dtype=np.float32)
    for y0 in range(0, ny, chunk_rows):
        sl = slice(y0, min(ny, y0 + chunk_rows))
        chunk = stack.rows(sl) if isinstance(stack, DiskStack) else np.ascontiguousarray(stack[:, sl, :],
                                                                                           dtype=np.float32)
        m, c, s = clipped_mean(
            chunk, low=cfg.low_sigma, high=cfg.high_sigma, maxiters=maxiters,
            center="median", scales=scales, threads=threads,
            noise=None if rn2 is None else (rn2[sl], True),
        )
        mean[sl], count[sl], std[sl] = m, c, s
    return mean, count, std


class DiskStack:
    """A float32 stack of ``n`` frames kept in a file, read back in row chunks.

    Frames are written whole (:meth:`__setitem__`) and read as ``(n, rows, nx)``
    blocks with positional reads (:meth:`rows`), never memory-mapped: pages of
    a memory map stay resident while it is open, so a mapped stack would end up
    counting whole against the job's memory.  Peak memory is one frame plus
    one block.
    """

    def __init__(self, n: int, shape: tuple[int, int], directory: str | os.PathLike):
        self.shape = (n, *shape)
        self._frame_bytes = shape[0] * shape[1] * 4
        fd, self._path = tempfile.mkstemp(prefix=".stack-", suffix=".f32", dir=directory)
        self._fd = fd

    def __setitem__(self, i: int, frame: np.ndarray) -> None:
        data = np.ascontiguousarray(frame, dtype=np.float32)
        if data.shape != self.shape[1:]:
            raise ValueError(f"frame shape {data.shape} differs from stack frame shape {self.shape[1:]}")
        os.pwrite(self._fd, data.tobytes(), i * self._frame_bytes)

    def rows(self, sl: slice) -> np.ndarray:
        n, ny, nx = self.shape
        out = np.empty((n, sl.stop - sl.start, nx), dtype=np.float32)
        nbytes = out[0].nbytes
        for k in range(n):
            buf = os.pread(self._fd, nbytes, k * self._frame_bytes + sl.start * nx * 4)
            out[k] = np.frombuffer(buf, dtype=np.float32).reshape(out[k].shape)
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)


@contextlib.contextmanager
def disk_stack(n: int, shape: tuple[int, int], directory: str | os.PathLike):
    """A temporary :class:`DiskStack` under ``directory``, removed afterwards."""
    stack = DiskStack(n, shape, directory)
    try:
        yield stack
    finally:
        stack.close()


# -- defects -------------------------------------------------------------------------

def _large_scale(image: np.ndarray, box: int) -> np.ndarray:
    """Smooth large-scale structure: median of ``box``-sized blocks, interpolated."""
    from scipy.ndimage import map_coordinates

    ny, nx = image.shape
    by, bx = max(1, ny // box), max(1, nx // box)
    ey, ex = np.linspace(0, ny, by + 1).astype(int), np.linspace(0, nx, bx + 1).astype(int)
    grid = np.empty((by, bx))
    for i in range(by):
        for j in range(bx):
            block = image[ey[i]:ey[i + 1], ex[j]:ex[j + 1]]
            grid[i, j] = np.nanmedian(block) if np.isfinite(block).any() else np.nan
    if np.isnan(grid).any():
        grid[np.isnan(grid)] = np.nanmedian(grid)
    cy, cx = (ey[:-1] + ey[1:] - 1) / 2.0, (ex[:-1] + ex[1:] - 1) / 2.0
    yy = np.interp(np.arange(ny), cy, np.arange(by))
    xx = np.interp(np.arange(nx), cx, np.arange(bx))
    Y, X = np.meshgrid(yy, xx, indexing="ij")
    return map_coordinates(grid, [Y, X], order=1, mode="nearest")


def _robust_sigma(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def find_defects(
    *,
    master_bias: np.ndarray | None = None,
    master_flat: np.ndarray | None = None,
    cfg: DefectConfig = DefectConfig(),
) -> np.ndarray:
    """Bad-pixel mask (BAD plane) from a master bias and/or master flat.

    Notes
    -----
    Flat: a pixel is bad when ``F / S(F)`` lies outside
    ``[flat_low, flat_high]``, with ``S`` the block-median large-scale
    smoothing (``smooth`` pixels), i.e. dead, low-response or hot-response
    pixels relative to their neighbourhood.  Bias: a pixel is bad when
    ``B - S(B)`` exceeds ``bias_nsigma`` robust standard deviations (hot
    pixels and columns).  A column in which more than ``column_fraction`` of
    the pixels are bad is flagged whole (bad columns).
    """
    shape = (master_flat if master_flat is not None else master_bias).shape
    bad = np.zeros(shape, dtype=bool)
    if master_flat is not None:
        smooth = _large_scale(master_flat, cfg.smooth * 4)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = master_flat / smooth
        bad |= ~np.isfinite(ratio) | (ratio < cfg.flat_low) | (ratio > cfg.flat_high)
    if master_bias is not None:
        resid = master_bias - _large_scale(master_bias, cfg.smooth * 4)
        sigma = _robust_sigma(resid)
        if sigma > 0:
            bad |= np.abs(resid) > cfg.bias_nsigma * sigma
    col_bad = bad.mean(axis=0) > cfg.column_fraction
    bad[:, col_bad] = True
    return np.where(bad, masks.BAD, 0).astype(masks.MASK_DTYPE)


# -- photon transfer -----------------------------------------------------------------

def _clipped_var(x: np.ndarray, nsigma: float = 4.0) -> float:
    x = x[np.isfinite(x)].astype(np.float64)
    for _ in range(5):
        med, sig = np.median(x), 1.4826 * np.median(np.abs(x - np.median(x)))
        keep = np.abs(x - med) <= nsigma * sig
        if keep.all():
            break
        x = x[keep]
    # correct the truncation of a Gaussian at +-nsigma
    from scipy.stats import norm

    trunc = 1 - 2 * nsigma * norm.pdf(nsigma) / (2 * norm.cdf(nsigma) - 1)
    return float(np.var(x) / trunc)


def ptc_gain(
    flat1: np.ndarray, flat2: np.ndarray, bias1: np.ndarray, bias2: np.ndarray, amp: Amplifier,
    *, overscan: OverscanConfig = OverscanConfig(), border: int = 10,
) -> tuple[float, float]:
    """Gain (e-/ADU) and read noise (e-) of one amplifier by photon transfer.

    Parameters
    ----------
    flat1, flat2 : ndarray
        Two raw flats of equal exposure level (raw detector HDUs).
    bias1, bias2 : ndarray
        Two raw biases.
    amp : Amplifier

    Notes
    -----
    With overscan-corrected data regions, ``S`` the mean flat signal above
    bias (ADU) and differences cancelling fixed pattern (bias structure and
    pixel response):

    ``sigma_r^2 = var(b1 - b2) / 2`` (ADU^2),
    ``var(f1 - k f2) / 2 = S / g + sigma_r^2``, hence
    ``g = S / (var(f1 - k f2)/2 - sigma_r^2)`` and ``r = g sigma_r``,
    where ``k = <f1>/<f2>`` matches the two flat levels.  Variances are
    sigma-clipped (4 sigma) with the Gaussian truncation corrected.
    """
    def region(raw):
        rows = overscan_vector(raw.astype(np.float32), amp, overscan)
        data = raw[amp.datasec.slices].astype(np.float64) - rows[:, None]
        return data[border:-border or None, border:-border or None]

    f1, f2, b1, b2 = (region(a) for a in (flat1, flat2, bias1, bias2))
    bias_level = 0.5 * (np.median(b1) + np.median(b2))
    m1, m2 = np.mean(f1) - bias_level, np.mean(f2) - bias_level
    var_r = _clipped_var(b1 - b2) / 2.0
    var_f = _clipped_var((f1 - bias_level) - (m1 / m2) * (f2 - bias_level)) / 2.0
    signal = 0.5 * (m1 + m2)
    shot = var_f - var_r
    if not (signal > 0 and shot > 0):
        raise InsufficientData(f"amplifier {amp.name}: flat signal {signal:.1f} ADU too low for photon transfer")
    gain = signal / shot
    return float(gain), float(gain * np.sqrt(var_r))


# -- validity planning ---------------------------------------------------------------

def _night_date(night: str) -> dt.date:
    return dt.datetime.strptime(str(night), "%Y%m%d").date()


def _night_str(d: dt.date) -> str:
    return d.strftime("%Y%m%d")


@dataclass
class CalibPlan:
    """Which raw calibration frames make which master, and which master serves which visit.

    Attributes
    ----------
    bias_groups : dict
        group -> raw bias file paths.
    flat_groups : dict
        (group, band) -> raw flat file paths.
    flat_bias : dict
        (group, band) -> bias group that debiases those flats (None if none valid).
    validity : dict
        bias group or (group, band) -> (first, last) valid night, inclusive, as
        ``YYYYMMDD`` strings (``ranges`` mode: ISO dates, end exclusive).
    science : pandas.DataFrame
        One row per science visit: ``visit, night, band, path, bias_group, flat_group``.
    """

    bias_groups: dict[str, list[str]]
    flat_groups: dict[tuple[str, str], list[str]]
    flat_bias: dict[tuple[str, str], str | None]
    validity: dict[Any, tuple[str, str]]
    science: Any


def _night_ranges(nights: Sequence[str], max_days: int) -> dict[str, tuple[str, str]]:
    """Validity of masters built on ``nights``: +-max_days, split midway between neighbours.

    A science night exactly midway between two calibration nights goes to the
    earlier one.
    """
    days = sorted({_night_date(n) for n in nights})
    out = {}
    for i, d in enumerate(days):
        lo, hi = d - dt.timedelta(days=max_days), d + dt.timedelta(days=max_days)
        if i > 0:
            gap = (d - days[i - 1]).days
            lo = max(lo, days[i - 1] + dt.timedelta(days=gap // 2 + 1))
        if i + 1 < len(days):
            gap = (days[i + 1] - d).days
            hi = min(hi, d + dt.timedelta(days=gap // 2))
        out[_night_str(d)] = (_night_str(lo), _night_str(hi))
    return out


def _find_range(ranges: Mapping[Any, tuple[str, str]], night: str) -> Any:
    for key, (lo, hi) in ranges.items():
        if lo <= night <= hi:
            return key
    return None


def plan_calibrations(inventory, validity: Mapping[str, Any]) -> CalibPlan:
    """Group calibration frames into masters with validity ranges; assign them.

    Parameters
    ----------
    inventory : pandas.DataFrame
        The ingest inventory (one row per exposure and detector).
    validity : dict
        ``{"mode": "night", "max_days": N}``: a master is built from one
        night's frames and is valid for nights within ``N`` days, ranges split
        midway between consecutive calibration nights.  ``{"mode": "ranges",
        "ranges": [{"name", "start", "end"}, ...]}``: explicit date ranges
        (ISO dates, ``end`` exclusive); a master is built from the frames
        inside a range and serves the science frames inside it.

    Returns
    -------
    CalibPlan
    """
    import pandas as pd

    mode = validity.get("mode", "night")
    files = inventory.drop_duplicates("path").sort_values(["date_obs", "path"])
    bias = files[files.obstype == "bias"]
    flat = files[files.obstype == "flat"]
    sci = files[files.obstype == "science"]

    bias_groups: dict[str, list[str]] = {}
    flat_groups: dict[tuple[str, str], list[str]] = {}
    validity_of: dict[Any, tuple[str, str]] = {}

    if mode == "night":
        max_days = int(validity.get("max_days", 3))
        for night, rows in bias.groupby("night", sort=True):
            bias_groups[str(night)] = rows.path.tolist()
        validity_of.update(_night_ranges(list(bias_groups), max_days))
        for band, rows_b in flat.groupby("band", sort=True):
            ranges = _night_ranges(sorted(rows_b.night.astype(str).unique()), max_days)
            for night, rows in rows_b.groupby("night", sort=True):
                flat_groups[(str(night), str(band))] = rows.path.tolist()
                validity_of[(str(night), str(band))] = ranges[str(night)]

        def pick_bias(night):
            return _find_range({k: v for k, v in validity_of.items() if isinstance(k, str)}, night)

        def pick_flat(night, band):
            key = _find_range({k: v for k, v in validity_of.items() if isinstance(k, tuple) and k[1] == band}, night)
            return None if key is None else key[0]

        when_sci = sci.night.astype(str)
        when_flat = {key: key[0] for key in flat_groups}
    elif mode == "ranges":
        ranges = validity.get("ranges") or []
        if not ranges:
            raise ConfigError("calib.validity.mode 'ranges' needs calib.validity.ranges")
        spans = {}
        for r in ranges:
            name, start, end = str(r["name"]), str(r["start"]), str(r["end"])
            if end <= start:
                raise ConfigError(f"validity range {name!r}: end {end} is not after start {start}")
            for other, (s, e) in spans.items():
                if start < e and s < end:
                    raise ConfigError(f"validity ranges {other!r} and {name!r} overlap")
            spans[name] = (start, end)

        def in_range(date):
            for name, (s, e) in spans.items():
                if s <= str(date)[: len(s)] < e or (s <= str(date) < e):
                    return name
            return None

        for path, date in zip(bias.path, bias.date_obs):
            g = in_range(date)
            if g is not None:
                bias_groups.setdefault(g, []).append(path)
        for path, date, band in zip(flat.path, flat.date_obs, flat.band):
            g = in_range(date)
            if g is not None:
                flat_groups.setdefault((g, str(band)), []).append(path)
        for g in bias_groups:
            validity_of[g] = spans[g]
        for key in flat_groups:
            validity_of[key] = spans[key[0]]

        def pick_bias(date):
            g = in_range(date)
            return g if g in bias_groups else None

        def pick_flat(date, band):
            g = in_range(date)
            return g if (g, band) in flat_groups else None

        when_sci = sci.date_obs.astype(str)
        when_flat = {key: spans[key[0]][0] for key in flat_groups}
    else:
        raise ConfigError(f"calib.validity.mode must be 'night' or 'ranges', got {mode!r}")

    flat_bias = {key: pick_bias(when) for key, when in when_flat.items()}
    science = pd.DataFrame({
        "visit": sci.visit.astype(str).to_numpy(),
        "night": sci.night.astype(str).to_numpy(),
        "band": sci.band.astype(str).to_numpy(),
        "path": sci.path.astype(str).to_numpy(),
        # object dtype keeps None (no valid master) as None rather than NaN
        "bias_group": pd.Series([pick_bias(w) for w in when_sci], dtype=object),
        "flat_group": pd.Series([pick_flat(w, str(b)) for w, b in zip(when_sci, sci.band)], dtype=object),
    })
    return CalibPlan(bias_groups, flat_groups, flat_bias, validity_of, science.reset_index(drop=True))


# -- I/O: building masters -----------------------------------------------------------

def _read_detector(hdul: fits.HDUList, det: Detector, path: str) -> tuple[np.ndarray, Detector, fits.Header]:
    data, header = fitsio.read_image(hdul, det.hdu, path)
    resolved = det.resolved(header, where=str(path))
    resolved.check_raw_shape(data.shape, where=str(path))
    return data, resolved, header


def _master_header(kind: str, det: Detector, group: str, valid: tuple[str, str], nframes: int) -> fits.Header:
    h = fits.Header()
    h["SRKIND"] = (kind, "master calibration type")
    h["DETECTOR"] = (det.id, "detector id")
    h["DETNAME"] = (det.name, "detector name")
    h["CALGROUP"] = (group, "calibration group")
    h["VALSTART"] = (valid[0], "first night/date this master is valid for")
    h["VALEND"] = (valid[1], "last night (night mode) or end (ranges, excl.)")
    h["NCOMBINE"] = (nframes, "frames combined")
    return h


def _process_stack(
    paths: Sequence[str], det: Detector, instrument: Instrument, cfg: CalibConfig, stack: np.ndarray,
    *, bias: np.ndarray | None = None, threads: int = 1, medians: list[float] | None = None,
) -> list[fits.Header]:
    """Assemble every raw frame of ``det`` into ``stack`` (electrons); return their headers.

    The median of each assembled frame is appended to ``medians`` when given.
    """
    headers = []
    medians = [] if medians is None else medians
    for i, path in enumerate(paths):
        with fitsio.open_fits(path) as hdul:
            raw, rdet, header = _read_detector(hdul, det, path)
            image, _, _ = assemble_detector(raw, rdet, overscan=cfg.overscan, bias=bias, saturation=False,
                                            threads=threads)
            headers.append(hdul[0].header.copy())
        stack[i] = image
        medians.append(float(np.median(image)))
    return headers


def build_master_bias(
    paths: Sequence[str], instrument: Instrument, detectors: Iterable[Detector], outdir: str | os.PathLike,
    cfg: CalibConfig, *, group: str, valid: tuple[str, str], threads: int = 1, config: Mapping | None = None,
) -> list[Path]:
    """Master bias per detector: sigma-clipped mean of overscan-corrected biases (electrons).

    Writes ``bias_<det>.fits`` with HDUs PRIMARY (provenance, validity),
    IMAGE (electrons), STD (per-pixel scatter of the inputs), NCOMBINE,
    DEFECTS (hot pixels/columns, BAD plane) and VARIANCE (model variance of
    the master: read noise and overscan estimate over the frames kept).
    """
    outdir = Path(outdir)
    written = []
    for det in detectors:
        log.info("master bias %s detector %s from %d frames", group, det.name, len(paths))
        with disk_stack(len(paths), det.shape, outdir.parent if outdir.parent.exists() else ".") as stack:
            _process_stack(paths, det, instrument, cfg, stack, threads=threads)
            mean, count, std = combine_stack(stack, cfg.combine, read_noise=det.read_noise_map(), threads=threads)
        defects = find_defects(master_bias=mean, cfg=cfg.defects)
        # model variance of the mean of `count` frames: read noise + overscan estimate
        per_frame = det.read_noise_map() ** 2
        for amp in det.amps:
            per_frame[amp.detsec.slices] += overscan_variance(amp, cfg.overscan)
        variance = (per_frame / np.maximum(count, 1)).astype(np.float32)
        h = _master_header("bias", det, group, valid, len(paths))
        add_provenance(h, step="master-bias", inputs=paths, params=cfg.as_dict(), config=config)
        h["NDEFECT"] = (int((defects != 0).sum()), "pixels flagged as defects")
        hdul = fits.HDUList([
            fits.PrimaryHDU(header=h),
            fits.ImageHDU(mean, name="IMAGE"),
            fits.ImageHDU(std, name="STD"),
            fits.ImageHDU(count, name="NCOMBINE"),
            fits.ImageHDU(defects, name="DEFECTS"),
            fits.ImageHDU(variance, name="VARIANCE"),
        ])
        hdul["IMAGE"].header["BUNIT"] = "electron"
        hdul["VARIANCE"].header["BUNIT"] = "electron2"
        written.append((outdir / f"bias_{det.id}.fits", hdul))
    fitsio.write_all(written)
    return [p for p, _ in written]


def _normalise(image: np.ndarray, det: Detector, per: str, valid: np.ndarray) -> np.ndarray:
    out = image.astype(np.float64)
    if per == "amp":
        for amp in det.amps:
            sl = amp.detsec.slices
            out[sl] /= np.mean(out[sl][valid[sl]])
    else:
        out /= np.mean(out[valid])
    return out.astype(np.float32)


def build_master_flat(
    paths: Sequence[str], instrument: Instrument, detectors: Iterable[Detector], outdir: str | os.PathLike,
    cfg: CalibConfig, *, band: str, bias_dir: str | os.PathLike | None, group: str, valid: tuple[str, str],
    threads: int = 1, config: Mapping | None = None,
) -> list[Path]:
    """Master flat per detector for one band.

    Each flat is overscan-corrected, assembled to electrons, bias-subtracted,
    divided by its own median (per-frame normalisation), then the frames are
    combined with sigma clipping and the result normalised to mean 1 over the
    detector (or per amplifier).  The DEFECTS HDU holds the bad-pixel mask from
    the flat and the master bias.
    """
    outdir = Path(outdir)
    written = []
    for det in detectors:
        bias = bias_defects = bias_var = None
        if bias_dir is not None:
            bias, bias_defects, bias_var = read_master(Path(bias_dir) / f"bias_{det.id}.fits", kind="bias", det=det)
        log.info("master flat %s band %s detector %s from %d frames", group, band, det.name, len(paths))
        with disk_stack(len(paths), det.shape, outdir.parent if outdir.parent.exists() else ".") as stack:
            frame_medians: list[float] = []
            _process_stack(paths, det, instrument, cfg, stack, bias=bias, threads=threads, medians=frame_medians)
            scales = np.array(frame_medians, dtype=np.float64)
            if not np.all(scales > 0):
                bad = [paths[i] for i in np.flatnonzero(~(scales > 0))]
                raise CorruptInput(f"flat frame(s) with no signal for detector {det.name}: {bad}")
            mean, count, std = combine_stack(stack, cfg.combine, scales=scales, read_noise=det.read_noise_map(),
                                             threads=threads)
        good = np.isfinite(mean) & (mean > 0)
        flat = _normalise(mean, det, cfg.flat_normalise, good)
        # model variance of the normalised flat: each frame x_k = e_k / s_k with
        # var(e_k) = e_k + rn^2 + v_overscan + v_bias, averaged over `count` frames
        sbar = float(np.median(scales))
        per_frame = det.read_noise_map() ** 2 + (0.0 if bias_var is None else bias_var)
        for amp in det.amps:
            per_frame[amp.detsec.slices] += overscan_variance(amp, cfg.overscan)
        with np.errstate(divide="ignore", invalid="ignore"):
            norm = np.where(good, flat / mean, 0.0)  # 1 / normalisation, per pixel (detector or amp)
            variance = ((np.maximum(mean, 0) * sbar + per_frame) / (sbar ** 2 * np.maximum(count, 1))
                        * np.square(norm)).astype(np.float32)
        defects = find_defects(master_flat=flat, cfg=cfg.defects)
        if bias_defects is not None:
            defects |= bias_defects
        h = _master_header("flat", det, group, valid, len(paths))
        h["BAND"] = (band, "band")
        h["FLATLVL"] = (float(np.median(scales)), "median flat level (electrons)")
        inputs = [*paths, str(Path(bias_dir) / f"bias_{det.id}.fits")] if bias_dir else list(paths)
        add_provenance(h, step="master-flat", inputs=inputs, params=cfg.as_dict(), config=config)
        h["NDEFECT"] = (int((defects != 0).sum()), "pixels flagged as defects")
        hdul = fits.HDUList([
            fits.PrimaryHDU(header=h),
            fits.ImageHDU(flat, name="IMAGE"),
            fits.ImageHDU(std / np.float32(np.mean(mean[good])), name="STD"),
            fits.ImageHDU(count, name="NCOMBINE"),
            fits.ImageHDU(defects, name="DEFECTS"),
            fits.ImageHDU(variance, name="VARIANCE"),
        ])
        written.append((outdir / f"flat_{det.id}.fits", hdul))
    fitsio.write_all(written)
    return [p for p, _ in written]


def read_master(path: str | os.PathLike, *, kind: str, det: Detector, night: str | None = None,
                date: str | None = None):
    """Read a master calibration: (image, defects, variance); check type, detector and validity.

    Raises
    ------
    MissingCalibration
        If the file is missing, is for another detector, or the frame lies
        outside its validity range: its ``night`` (``YYYYMMDD``) for a
        night-mode master, its ISO ``date`` for a ranges-mode master.
    """
    path = Path(path)
    if not path.exists():
        raise MissingCalibration(f"master {kind} for detector {det.name} not found", path=path)
    with fitsio.open_fits(path) as hdul:
        h = hdul[0].header
        if h.get("SRKIND") != kind or int(h.get("DETECTOR", -1)) != det.id:
            raise MissingCalibration(
                f"is a {h.get('SRKIND')} for detector {h.get('DETECTOR')}, not a {kind} for {det.id}", path=path
            )
        lo, hi = str(h.get("VALSTART", "")), str(h.get("VALEND", ""))
        when = night if len(lo) == 8 else date
        if when is not None:
            if not (lo <= when <= hi or (len(lo) == 10 and lo <= when < hi)):
                raise MissingCalibration(f"valid {lo}..{hi}, not for {when}", path=path)
        image = hdul["IMAGE"].data.astype(np.float32)
        defects = hdul["DEFECTS"].data.astype(masks.MASK_DTYPE) if "DEFECTS" in hdul else None
        variance = hdul["VARIANCE"].data.astype(np.float32) if "VARIANCE" in hdul else None
    return image, defects, variance


# -- command line --------------------------------------------------------------------

def _detectors(instrument: Instrument, spec: str | None) -> list[Detector]:
    if not spec:
        return list(instrument.good_detectors)
    try:
        return [instrument.detector(int(s)) for s in spec.split(",") if s.strip()]
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"--detectors {spec!r}: {exc}") from exc


def _valid_range(args, cfg: CalibConfig) -> tuple[str, str]:
    if args.valid_from and args.valid_to:
        return (args.valid_from, args.valid_to)
    if cfg.validity.get("mode", "night") == "night":
        try:
            d = _night_date(args.group)
        except ValueError:
            raise ConfigError(f"group {args.group!r} is not a night YYYYMMDD; pass --valid-from/--valid-to") from None
        k = dt.timedelta(days=int(cfg.validity.get("max_days", 3)))
        return (_night_str(d - k), _night_str(d + k))
    for r in cfg.validity.get("ranges") or []:
        if str(r["name"]) == args.group:
            return (str(r["start"]), str(r["end"]))
    raise ConfigError(f"group {args.group!r} is not among calib.validity.ranges")


def _parser(prog: str, flat: bool) -> argparse.ArgumentParser:
    from .runtime import common_arguments

    p = argparse.ArgumentParser(prog=f"surveyred {prog}", description=(
        "Build master flats (one file per detector) for one validity group and band." if flat else
        "Build master biases (one file per detector) for one validity group."))
    p.add_argument("raw", nargs="+", help="raw calibration files of the group")
    p.add_argument("--instrument", required=True)
    p.add_argument("--outdir", required=True)
    p.add_argument("--group", required=True, help="validity group name (night YYYYMMDD or range name)")
    p.add_argument("--valid-from", default=None, help="first night/date of validity (default from config)")
    p.add_argument("--valid-to", default=None, help="last night (or exclusive end date) of validity")
    p.add_argument("--detectors", default=None, help="comma-separated detector ids (default: good detectors)")
    p.add_argument("--config-json", default=None, help="the calib section of the config, as JSON")
    if flat:
        p.add_argument("--band", required=True)
        p.add_argument("--bias-dir", required=True, help="directory of the master biases, or 'none'")
    common_arguments(p)
    return p


def _main(argv, flat: bool) -> int:
    from .runtime import json_arg, run, set_threads, setup_logging

    args = _parser("master-flat" if flat else "master-bias", flat).parse_args(argv)
    setup_logging(args.log)

    def body():
        set_threads(args.threads)
        doc = json_arg(args.config_json)
        cfg = CalibConfig.from_dict(doc)
        instrument = load_instrument(args.instrument)
        dets = _detectors(instrument, args.detectors)
        valid = _valid_range(args, cfg)
        raw = sorted(args.raw)
        if flat:
            bias_dir = None if args.bias_dir.lower() == "none" else args.bias_dir
            if bias_dir is None:
                raise MissingCalibration(
                    f"no master bias valid for the {args.band} flats of group {args.group}", path=raw[0])
            build_master_flat(raw, instrument, dets, args.outdir, cfg, band=args.band, bias_dir=bias_dir,
                              group=args.group, valid=valid, threads=args.threads, config=doc)
        else:
            build_master_bias(raw, instrument, dets, args.outdir, cfg, group=args.group, valid=valid,
                              threads=args.threads, config=doc)

    return run(body, what=f"master-{'flat' if flat else 'bias'} {args.group}")


def main_bias(argv: list[str] | None = None) -> int:
    return _main(argv, flat=False)


def main_flat(argv: list[str] | None = None) -> int:
    return _main(argv, flat=True)
