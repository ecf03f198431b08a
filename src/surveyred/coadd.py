"""Coadd assembly: weighted, outlier-rejecting stack of warps on one patch.

:func:`coadd` combines warps (arrays in memory or warp FITS files) of one
patch into the coadd image, variance, mask, number-of-inputs map and a table
of the inputs.  Steps:

1. optional *best-seeing selection* (:func:`select_best_seeing`): keep the
   fraction of inputs with the smallest PSF FWHM;
2. *weights*: per input, the inverse of the median variance of its usable
   pixels (``weighting="input"``, the default: a pixel's weight does not depend
   on its own flux, so bright sources are not biased), or per pixel the inverse
   variance (``weighting="pixel"``);
3. optional *artifact rejection* (``do_artifact_rejection``, default on; in
   the spirit of LSST's CompareWarp): the reference is the per-pixel
   noise-clipped weighted mean (:func:`surveyred.kernels.stack.stack_band`:
   iterative, each input judged against its own expected noise, not on
   sources); in each warp, connected regions (8-connected) of at least
   ``artifact_min_pixels`` pixels where
   :math:`(W - R) / \\sqrt{V_W + V_R + (f R)^2} > n_\\sigma`, that are
   significant in at most ``artifact_max_inputs`` warps (median over the
   region of the per-pixel count of warps significant there) and not on a
   source (reference above ``protect_snr`` times the warp's noise), are
   grown by ``artifact_grow`` pixels and masked CLIPPED in that warp
   (transients: satellite trails, cosmic rays that survived ISR);
4. the *final stack*: the weighted mean of the usable, unflagged inputs, with
   per-pixel noise clipping only when ``do_clip`` (off by default: with inputs
   of different seeing, stars differ by far more than the noise between warps
   and per-pixel clipping biases their fluxes by percents, which is why
   CompareWarp replaced it; the noise clip protects pixels whose median is
   above ``protect_snr`` times the noise, but star wings are below that).

Memory (streaming design)
-------------------------
The stack never holds all inputs at once.  The reference and the final stack
run over **row bands**: for each band of ``band_rows`` rows (default
``ceil(ny / N)``, so that the band of all ``N`` inputs is about the size of one
warp) the band is read from each warp (from FITS by position, file opened and
closed per read, no memory map kept open) and combined by the numba kernel.
Artifact detection reads each warp band by band into one full-size boolean
map of significant pixels, labels its connected regions (on the whole patch,
so regions are not cut at band edges) and keeps only the candidate regions'
pixel indices (sparse) and an int16 count map.  Peak memory is therefore the
outputs (image, variance, mask, nimage: 16 B/px) + the boolean map, the labels
(int32) and the count map (7 B/px) + one band of all inputs (about one warp),
independent of ``N`` apart from the sparse region lists.

Output mask
-----------
OR of the bits of the inputs that contributed to the pixel (after clipping);
plus CLIPPED when any input was rejected there (noise clip or artifact);
NO_DATA (image and variance NaN, nimage 0) where no input contributed.
Input pixels with any bit of ``bad_mask_planes`` are not used and their bits do
not propagate (except CLIPPED).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table

from . import masks
from .errors import ConfigError, InsufficientData
from .kernels.stack import stack_band

__all__ = [
    "ArrayWarp",
    "Coadd",
    "CoaddConfig",
    "FitsWarp",
    "coadd",
    "select_best_seeing",
    "write_coadd",
]


@dataclass(frozen=True)
class CoaddConfig:
    """Options of :func:`coadd`.

    Attributes
    ----------
    weighting : {"input", "pixel"}
        Per-input weight (inverse median variance) or per-pixel inverse variance.
    do_clip : bool
        Per-pixel noise clipping of the final stack (the artifact reference is
        always clipped).  Off by default: with inputs of different seeing,
        stars differ between warps by far more than the noise and per-pixel
        clipping biases their coadd fluxes (by -2 to +3 % for FWHM varying by
        2x in the tests); artifact rejection removes transients without that
        bias (CompareWarp's reasoning).
    clip_sigma, clip_maxiters : float, int
        Threshold (expected-noise units) and iterations of the noise clip.
    mismatch : float
        Fractional model error added to the expected noise in clipping and
        artifact detection (PSF / astrometric mismatch on bright sources).
    protect_snr : float
        Source protection: no noise clipping where the per-pixel median is
        above ``protect_snr`` times the inputs' noise, and no artifact pixels
        where the reference is above ``protect_snr`` times the warp's noise
        (seeing differences between inputs make stars differ by far more than
        the noise; clipping them biases coadd photometry by percents).  0
        disables.
    do_artifact_rejection : bool
        CompareWarp-like rejection of transient artifacts.
    artifact_sigma : float
        Per-pixel significance threshold of a difference from the reference.
    artifact_min_pixels : int
        Minimum connected pixels (8-connectivity) of an artifact.
    artifact_max_inputs : int
        A region is an artifact when its pixels are significant in at most
        this many inputs (median over the region).
    artifact_grow : int
        Pixels by which artifact regions are grown before masking.
    best_seeing_fraction : float or None
        Keep this fraction (rounded up, at least one) of the inputs with the
        smallest PSF FWHM; None keeps all.
    bad_mask_planes : tuple of str
        Input pixels with these planes are not used.
    band_rows : int or None
        Rows per band (None: ``ceil(ny / N)``, at least 16).
    """

    weighting: str = "input"
    do_clip: bool = False
    clip_sigma: float = 4.0
    clip_maxiters: int = 5
    mismatch: float = 0.05
    protect_snr: float = 5.0
    do_artifact_rejection: bool = True
    artifact_sigma: float = 4.0
    artifact_min_pixels: int = 5
    artifact_max_inputs: int = 1
    artifact_grow: int = 2
    best_seeing_fraction: float | None = None
    bad_mask_planes: tuple = ("NO_DATA", "BAD", "SAT", "CR", "CLIPPED")
    band_rows: int | None = None

    def validate(self) -> CoaddConfig:
        if self.weighting not in ("input", "pixel"):
            raise ConfigError(f"coadd weighting must be 'input' or 'pixel', got {self.weighting!r}")
        for name in ("clip_sigma", "artifact_sigma"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"coadd {name} must be positive, got {v!r}")
        if not (self.protect_snr >= 0 and math.isfinite(self.protect_snr)):
            raise ConfigError(f"coadd protect_snr must be >= 0, got {self.protect_snr!r}")
        if not (self.mismatch >= 0 and math.isfinite(self.mismatch)):
            raise ConfigError(f"coadd mismatch must be >= 0, got {self.mismatch!r}")
        for name, lo in (("clip_maxiters", 1), ("artifact_min_pixels", 1), ("artifact_max_inputs", 1),
                         ("artifact_grow", 0)):
            v = getattr(self, name)
            if int(v) != v or v < lo:
                raise ConfigError(f"coadd {name} must be an integer >= {lo}, got {v!r}")
        f = self.best_seeing_fraction
        if f is not None and not (0 < f <= 1):
            raise ConfigError(f"coadd best_seeing_fraction must be in (0, 1], got {f!r}")
        if self.band_rows is not None and (int(self.band_rows) != self.band_rows or self.band_rows < 1):
            raise ConfigError(f"coadd band_rows must be a positive integer, got {self.band_rows!r}")
        try:
            masks.bits(*self.bad_mask_planes)
        except KeyError as exc:
            raise ConfigError(f"coadd bad_mask_planes: {exc.args[0]}") from None
        return self


@dataclass(frozen=True)
class Coadd:
    """A coadd: image, variance, mask, number of inputs per pixel, input table."""

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    nimage: np.ndarray
    inputs: Table


# -- inputs ---------------------------------------------------------------------------

class ArrayWarp:
    """A warp held in memory (image, variance, mask arrays)."""

    def __init__(self, image, variance, mask, name: str | None = None):
        self.image = np.asarray(image)
        self.variance = np.asarray(variance)
        self.mask = np.asarray(mask)
        if self.image.ndim != 2 or self.variance.shape != self.image.shape or self.mask.shape != self.image.shape:
            raise ValueError("a warp's image, variance and mask must be 2-D of one shape")
        self.name = name
        self.shape = self.image.shape

    def read_rows(self, y0: int, y1: int):
        return self.image[y0:y1], self.variance[y0:y1], self.mask[y0:y1]


class FitsWarp:
    """A warp FITS file (:func:`surveyred.warp.write_warp`), read by row bands."""

    def __init__(self, path: str | os.PathLike, name: str | None = None):
        from .warp import warp_layout, warp_shape

        self.path = Path(path)
        self.name = name if name is not None else self.path.name
        self.shape = warp_shape(self.path)
        self.layout = warp_layout(self.path)  # parsed once: band reads are plain positional reads

    def read_rows(self, y0: int, y1: int):
        from .warp import read_warp_rows

        return read_warp_rows(self.path, y0, y1, self.layout)


def _as_source(item, k):
    if isinstance(item, (ArrayWarp, FitsWarp)):
        return item
    if isinstance(item, (str, os.PathLike)):
        return FitsWarp(item)
    if hasattr(item, "image") and hasattr(item, "variance") and hasattr(item, "mask"):
        return ArrayWarp(item.image, item.variance, item.mask, name=f"input{k}")
    if isinstance(item, (tuple, list)) and len(item) == 3:
        return ArrayWarp(*item, name=f"input{k}")
    raise TypeError(f"input {k}: expected a warp (path, Warp, ArrayWarp or (image, variance, mask)), got {type(item)}")


def select_best_seeing(fwhm: Sequence[float], fraction: float) -> np.ndarray:
    """Boolean selection of the best-seeing ``fraction`` of inputs.

    Keeps ``max(1, ceil(fraction * N))`` inputs with the smallest finite FWHM
    (ties by input order); inputs with a non-finite FWHM are never selected.
    """
    fwhm = np.asarray(fwhm, dtype=float)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    finite = np.isfinite(fwhm)
    if not finite.any():
        raise InsufficientData("no input has a finite PSF FWHM for best-seeing selection")
    n_keep = max(1, math.ceil(fraction * fwhm.size))
    order = np.argsort(np.where(finite, fwhm, np.inf), kind="stable")
    keep = np.zeros(fwhm.size, bool)
    keep[order[:n_keep]] = True
    return keep & finite


# -- the stack --------------------------------------------------------------------------

def _input_weight(src, bad, band_rows):
    """Inverse median variance of a warp's usable pixels (read in bands, subsampled)."""
    ny = src.shape[0]
    samples = []
    for y0 in range(0, ny, band_rows):
        _, var, msk = src.read_rows(y0, min(ny, y0 + band_rows))
        v = var[:, ::3][(msk[:, ::3] & bad) == 0]
        v = v[np.isfinite(v) & (v > 0)]
        samples.append(np.asarray(v, np.float32))
    v = np.concatenate(samples) if samples else np.empty(0)
    if v.size == 0:
        return np.nan
    return 1.0 / float(np.median(v))


def _stack_all(sources, weights, cfg, bad, band_rows, artifacts, out, threads, clip):
    """Stack ``sources`` band by band into ``out`` (image, variance, mask, nimage)."""
    ny, nx = sources[0].shape
    n = len(sources)
    used = np.zeros(n, np.int64)
    clipped = np.zeros(n, np.int64)
    rows = min(band_rows, ny)
    bimg = np.empty((n, rows, nx), np.float32)
    bvar = np.empty((n, rows, nx), np.float32)
    bmsk = np.empty((n, rows, nx), np.int32)
    for y0 in range(0, ny, rows):
        y1 = min(ny, y0 + rows)
        h = y1 - y0
        for k, src in enumerate(sources):
            im, va, mk = src.read_rows(y0, y1)
            bimg[k, :h] = im
            bvar[k, :h] = va
            bmsk[k, :h] = mk
            if artifacts is not None and artifacts[k].size:
                a = artifacts[k]
                lo, hi = np.searchsorted(a, [y0 * nx, y1 * nx])
                if hi > lo:
                    flat = bmsk[k, :h].reshape(-1)
                    flat[a[lo:hi] - y0 * nx] |= masks.CLIPPED
            del im, va, mk
        oi, ov, om, on, u, c = stack_band(
            bimg[:, :h], bvar[:, :h], bmsk[:, :h], weights=weights,
            pixel_weights=cfg.weighting == "pixel", bad_mask=bad,
            clip_sigma=cfg.clip_sigma if clip else 0.0, maxiters=cfg.clip_maxiters,
            mismatch=cfg.mismatch, protect_snr=cfg.protect_snr, threads=threads,
        )
        out[0][y0:y1] = oi
        out[1][y0:y1] = ov
        out[2][y0:y1] = om
        out[3][y0:y1] = on
        used += u
        clipped += c
    return used, clipped


def _find_artifacts(sources, ref_img, ref_var, cfg, bad, band_rows):
    """Per input: sorted flat indices of artifact pixels; and region counts."""
    from scipy import ndimage

    ny, nx = ref_img.shape
    n = len(sources)
    count = np.zeros((ny, nx), np.int16)
    candidates: list[list[np.ndarray]] = []
    structure = np.ones((3, 3), bool)
    ref_ok = np.isfinite(ref_img) & np.isfinite(ref_var)
    hot = np.empty((ny, nx), bool)
    for src in sources:
        for y0 in range(0, ny, band_rows):  # significance band by band: no full warp in memory
            y1 = min(ny, y0 + band_rows)
            im, va, mk = src.read_rows(y0, y1)
            r, rv = ref_img[y0:y1], ref_var[y0:y1]
            with np.errstate(all="ignore"):
                sig = (im - r) / np.sqrt(va + rv + (cfg.mismatch * r) ** 2)
                h = (sig > cfg.artifact_sigma) & ((mk & bad) == 0) & ref_ok[y0:y1]
                if cfg.protect_snr > 0:
                    h &= ~(r > cfg.protect_snr * np.sqrt(va))
            hot[y0:y1] = h
            del im, va, mk, sig, h
        count += hot
        labels, nlab = ndimage.label(hot, structure=structure)
        regions = []
        if nlab:
            sizes = np.bincount(labels.ravel(), minlength=nlab + 1)
            big = np.flatnonzero(sizes >= cfg.artifact_min_pixels)
            big = big[big > 0]
            if big.size:
                objs = ndimage.find_objects(labels)
                for lab in big:
                    sl = objs[lab - 1]
                    yy, xx = np.nonzero(labels[sl] == lab)
                    regions.append((yy + sl[0].start) * nx + (xx + sl[1].start))
        del labels
        candidates.append(regions)
    flat_count = count.reshape(-1)
    artifacts = []
    nregions = np.zeros(n, np.int64)
    g = cfg.artifact_grow
    for k, regions in enumerate(candidates):
        keep = []
        for idx in regions:
            if np.median(flat_count[idx]) <= cfg.artifact_max_inputs:
                nregions[k] += 1
                if g > 0:
                    yy, xx = np.divmod(idx, nx)
                    y0, y1 = max(0, yy.min() - g), min(ny, yy.max() + g + 1)
                    x0, x1 = max(0, xx.min() - g), min(nx, xx.max() + g + 1)
                    sub = np.zeros((y1 - y0, x1 - x0), bool)
                    sub[yy - y0, xx - x0] = True
                    sub = ndimage.binary_dilation(sub, structure=np.ones((3, 3), bool), iterations=g)
                    sy, sx = np.nonzero(sub)
                    idx = (sy + y0) * nx + (sx + x0)
                keep.append(idx)
        artifacts.append(np.unique(np.concatenate(keep)).astype(np.int64) if keep else np.empty(0, np.int64))
    return artifacts, nregions


def coadd(warps: Sequence, *, config: CoaddConfig = CoaddConfig(), psf_fwhm: Sequence[float] | None = None,
          names: Sequence[str] | None = None, threads: int = 1) -> Coadd:
    """Stack warps of one patch into a coadd.

    Parameters
    ----------
    warps : sequence
        Warps on one grid: paths of warp FITS files (read by row bands),
        :class:`surveyred.warp.Warp` objects, :class:`ArrayWarp` or
        ``(image, variance, mask)`` tuples.  Images on a common zero-point.
    config : CoaddConfig
    psf_fwhm : sequence of float, optional
        PSF FWHM per input (any unit); required for best-seeing selection,
        recorded in the input table.
    names : sequence of str, optional
        Input names for the table (default: file names or ``input<k>``).
    threads : int
        Numba threads.

    Returns
    -------
    Coadd
        ``inputs`` has one row per input: ``name, psf_fwhm, selected, weight``
        (the per-input weight, or for pixel weighting the inverse median
        variance for reference), ``weight_fraction`` (of the selected inputs'
        total), ``n_used`` (pixels contributed), ``n_clipped`` (pixels rejected
        by the noise clip), ``n_artifact_pixels``, ``n_artifacts``.

    Notes
    -----
    Per pixel, over usable inputs that survive clipping,
    :math:`I = \\sum w_i x_i / \\sum w_i`,
    :math:`V = \\sum w_i^2 V_i / (\\sum w_i)^2` with :math:`w_i = 1/\\tilde V_i`
    (median variance of input ``i``) or :math:`w_i = 1/V_i`.  See the module
    docstring for the clipping, artifact rejection, memory and mask conventions.
    """
    config.validate()
    if len(warps) == 0:
        raise InsufficientData("coadd needs at least one input warp")
    sources = [_as_source(w, k) for k, w in enumerate(warps)]
    shape = sources[0].shape
    for k, s in enumerate(sources):
        if s.shape != shape:
            raise ValueError(f"input {k} ({s.name}) has shape {s.shape}, input 0 has {shape}")
    n_all = len(sources)
    if names is None:
        names = [s.name or f"input{k}" for k, s in enumerate(sources)]
    elif len(names) != n_all:
        raise ValueError(f"{len(names)} names for {n_all} inputs")
    fwhm = np.full(n_all, np.nan) if psf_fwhm is None else np.asarray(psf_fwhm, float)
    if fwhm.shape != (n_all,):
        raise ValueError(f"psf_fwhm must have {n_all} values, got shape {fwhm.shape}")
    if config.best_seeing_fraction is not None:
        if psf_fwhm is None:
            raise ConfigError("best_seeing_fraction needs psf_fwhm for every input")
        selected = select_best_seeing(fwhm, config.best_seeing_fraction)
    else:
        selected = np.ones(n_all, bool)
    bad = masks.bits(*config.bad_mask_planes)
    ny = shape[0]
    chosen = [s for s, k in zip(sources, selected) if k]
    n = len(chosen)
    band_rows = int(config.band_rows) if config.band_rows else max(16, -(-ny // n))

    all_weights = np.array([_input_weight(s, bad, band_rows) if k else np.nan
                            for s, k in zip(sources, selected)])
    weights = all_weights[selected]
    unusable = ~np.isfinite(weights)
    if unusable.all():
        raise InsufficientData("no selected input has usable pixels")
    weights = np.where(unusable, 1.0, weights)  # inputs without usable pixels contribute nothing anyway

    out = (np.empty(shape, np.float32), np.empty(shape, np.float32), np.empty(shape, np.int32),
           np.empty(shape, np.int32))
    art_pix = np.zeros(n, np.int64)
    nreg = np.zeros(n, np.int64)
    artifacts = None
    if config.do_artifact_rejection and n >= 2:
        # the reference: the noise-clipped stack (always clipped, whatever do_clip says)
        _stack_all(chosen, weights, config, bad, band_rows, None, out, threads, clip=True)
        artifacts, nreg = _find_artifacts(chosen, out[0], out[1], config, bad, band_rows)
        art_pix = np.array([a.size for a in artifacts], np.int64)
        if not art_pix.sum():
            artifacts = None
    used, clipped = _stack_all(chosen, weights, config, bad | masks.CLIPPED, band_rows, artifacts, out,
                               threads, clip=config.do_clip)

    tw = np.where(selected, all_weights, 0.0)
    tw = np.where(np.isfinite(tw), tw, 0.0)
    total = tw.sum()

    def spread(values):
        full = np.zeros(n_all, np.int64)
        full[selected] = values
        return full

    table = Table(
        {
            "name": [str(x) for x in names],
            "psf_fwhm": fwhm,
            "selected": selected,
            "weight": all_weights,
            "weight_fraction": tw / total if total > 0 else tw,
            "n_used": spread(used),
            "n_clipped": spread(clipped),
            "n_artifact_pixels": spread(art_pix),
            "n_artifacts": spread(nreg),
        }
    )
    table.meta["WEIGHTNG"] = config.weighting
    return Coadd(out[0], out[1], out[2], out[3], table)


def write_coadd(path: str | os.PathLike, result: Coadd, wcs=None, *, header=None, bunit: str | None = None) -> None:
    """Write a coadd: PRIMARY, IMAGE, MASK, VARIANCE, NIMAGE, INPUTS (atomically).

    ``bunit`` sets the IMAGE unit (``"nJy"`` for coadds on the 31.4 zero-point;
    VARIANCE gets ``bunit + "2"``); None keeps ``electron``.
    """
    from astropy.io import fits

    from .fitsio import exposure_hdus, write_hdulist

    img_header = wcs.to_header(relax=True) if wcs is not None else None
    hdul = exposure_hdus(result.image, result.mask, result.variance, primary_header=header,
                         image_header=img_header)
    from .warp import _set_bunit

    _set_bunit(hdul, bunit)
    hdul.append(fits.ImageHDU(result.nimage.astype(np.int16), header=img_header, name="NIMAGE"))
    hdul.append(fits.table_to_hdu(result.inputs))
    hdul[-1].name = "INPUTS"
    write_hdulist(hdul, path)
