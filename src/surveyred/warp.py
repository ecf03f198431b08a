"""Warping: resample a calibrated exposure onto a patch grid (Lanczos, flux-conserving).

Science functions (arrays and WCSs in, arrays out):

* :func:`coordinate_grid` - output-pixel -> input-pixel coordinates and pixel-area
  ratio on a coarse grid, refined until bilinear interpolation of it is accurate
  to ``max_error`` pixels;
* :func:`warp_exposure` - image, variance and mask resampled onto the output grid
  and scaled to a common zero-point;
* :func:`zero_point_scale` - the photometric scale factor.

FITS helpers: :func:`write_warp`, :func:`read_warp`, :func:`read_warp_rows`.

Conventions
-----------
*Flux*: the input image is in flux units per input pixel (electrons, or any
linear unit).  The warp is in the same units per **output** pixel: the Lanczos
interpolant of the input (a surface brightness per input pixel) is multiplied by
the Jacobian determinant :math:`J = |\\partial(x_{in}, y_{in}) / \\partial(x_{out},
y_{out})|` (input pixels per output pixel, from the two WCSs), so the sum over a
source is conserved.  A constant sky of level ``c`` per input pixel becomes
``c * J`` per output pixel (constant when ``J`` is, e.g. equal pixel scales).
Then the zero-point scale ``s = 10**(0.4 * (zp_common - zp_exposure))`` is applied
(``s`` on the image, ``s**2`` on the variance): fluxes are then on the common
zero-point, ``mag = zp_common - 2.5 log10(flux)``.

*Kernel*: Lanczos of order ``a`` (default 3) on a ``2a x 2a`` footprint,
separable, its 1-D weights corrected to sum to 1 with zero first moment (the
truncated Lanczos-3 kernel alone displaces sources by up to 0.02 px at
quarter-pixel offsets; corrected, centroids are preserved to < 1e-4 px), taken
from a table of 4096 samples per pixel (error < 1e-7).  The output -> input
coordinate map is evaluated with the WCSs on a coarse grid (16 px) and
interpolated bilinearly; its error is measured at the cell centres and the
grid refined until it is below ``max_map_error`` (0.01 px).

*Variance*: :math:`V' = (sJ)^2 \\sum w^2 V / (\\sum w)^2` - the exact variance
of each output pixel for independent input pixels.  The covariance between
neighbouring output pixels that resampling introduces is **not** tracked; the
coadd's per-pixel variance is therefore right per pixel, while the noise of sums
over many pixels (aperture fluxes) is underestimated by the usual correlated-noise
factor (about 1.2-1.5 in variance for Lanczos-3 at similar pixel scales).

*Mask*: OR of the bits of input pixels whose kernel weight is at least
``mask_weight_threshold`` (default 5 %) of the total; EDGE where part of the
kernel footprint with weight falls outside the input or on NO_DATA pixels (the
remaining weights are renormalised); NO_DATA (image and variance NaN) where the
nearest input pixel is outside the input or NO_DATA.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from . import masks
from .errors import ConfigError, CorruptInput
from .kernels.warp import lanczos_warp

__all__ = [
    "CoordinateGrid",
    "Warp",
    "WarpConfig",
    "coordinate_grid",
    "read_warp",
    "read_warp_rows",
    "warp_exposure",
    "warp_layout",
    "warp_shape",
    "write_warp",
    "zero_point_scale",
]


@dataclass(frozen=True)
class WarpConfig:
    """Options of :func:`warp_exposure`.

    Attributes
    ----------
    order : int
        Lanczos order (3 = Lanczos-3, footprint 6 x 6 input pixels).
    linear_correction : bool
        Rescale the 1-D Lanczos weights to reproduce linear functions (removes
        the truncated kernel's position bias of up to 0.02 px; see
        :func:`surveyred.kernels.lanczos_warp`).
    grid_step : int
        Initial spacing (output pixels) of the coarse coordinate grid.
    max_map_error : float
        Largest allowed error (input pixels) of the bilinearly interpolated
        coordinate map; the grid is refined (step halved) until met.
    mask_weight_threshold : float
        Fraction of the kernel weight above which an input pixel's mask bits
        propagate.
    """

    order: int = 3
    linear_correction: bool = True
    grid_step: int = 16
    max_map_error: float = 0.01
    mask_weight_threshold: float = 0.05

    def validate(self) -> WarpConfig:
        if int(self.order) != self.order or not 1 <= self.order <= 8:
            raise ConfigError(f"warp order must be an integer in 1..8, got {self.order!r}")
        if int(self.grid_step) != self.grid_step or self.grid_step < 1:
            raise ConfigError(f"warp grid_step must be an integer >= 1, got {self.grid_step!r}")
        if not self.max_map_error > 0:
            raise ConfigError(f"warp max_map_error must be > 0, got {self.max_map_error!r}")
        if not 0.0 <= self.mask_weight_threshold <= 1.0:
            raise ConfigError(
                f"warp mask_weight_threshold must be in [0, 1], got {self.mask_weight_threshold!r}"
            )
        return self


@dataclass(frozen=True)
class CoordinateGrid:
    """Coarse output -> input coordinate map (see :func:`coordinate_grid`)."""

    x: np.ndarray
    y: np.ndarray
    jacobian: np.ndarray
    step: int
    max_error: float


@dataclass(frozen=True)
class Warp:
    """A warped exposure on an output grid."""

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    wcs: WCS
    scale: float
    map_error: float
    grid_step: int


def zero_point_scale(zp_exposure: float | None, zp_common: float | None) -> float:
    """Flux scale to a common zero-point.

    Notes
    -----
    :math:`s = 10^{0.4 (zp_{common} - zp_{exposure})}`; 1 when either is None.
    """
    if zp_exposure is None or zp_common is None:
        return 1.0
    zp_exposure = float(zp_exposure)
    zp_common = float(zp_common)
    if not (np.isfinite(zp_exposure) and np.isfinite(zp_common)):
        raise ValueError(f"zero-points must be finite, got {zp_exposure}, {zp_common}")
    return float(10.0 ** (0.4 * (zp_common - zp_exposure)))


def _out_to_in(out_wcs: WCS, in_wcs: WCS, x: np.ndarray, y: np.ndarray):
    """Input pixel coordinates (0-based) of output pixel coordinates; NaN where undefined."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        # far outside a distorted input the SIP inversion may not converge: astropy then
        # warns and returns its best solution, which lies far outside the input anyway
        warnings.simplefilter("ignore")
        world = out_wcs.pixel_to_world_values(x, y)
        try:
            xi, yi = in_wcs.world_to_pixel_values(*world)
        except Exception:  # noqa: BLE001 - SIP inversion can fail far outside: go point by point
            xi = np.full(x.shape, np.nan)
            yi = np.full(x.shape, np.nan)
            flat = [np.ravel(w) for w in world]
            for k in range(flat[0].size):
                try:
                    a, b = in_wcs.world_to_pixel_values(flat[0][k], flat[1][k])
                    xi.flat[k], yi.flat[k] = a, b
                except Exception:  # noqa: BLE001, S110 - no input coordinate: stays NaN
                    pass
    return np.asarray(xi, float), np.asarray(yi, float)


def _grid_once(out_wcs, in_wcs, out_shape, step, h=0.5):
    ny, nx = out_shape
    gnx = max(2, -(-(nx - 1) // step) + 1)
    gny = max(2, -(-(ny - 1) // step) + 1)
    X, Y = np.meshgrid(np.arange(gnx) * float(step), np.arange(gny) * float(step))
    # one WCS evaluation for the nodes, the four Jacobian offsets and the cell midpoints
    mX, mY = np.meshgrid((np.arange(gnx - 1) + 0.5) * step, (np.arange(gny - 1) + 0.5) * step)
    allx = np.concatenate([X.ravel(), (X + h).ravel(), (X - h).ravel(), X.ravel(), X.ravel(), mX.ravel()])
    ally = np.concatenate([Y.ravel(), Y.ravel(), Y.ravel(), (Y + h).ravel(), (Y - h).ravel(), mY.ravel()])
    xi, yi = _out_to_in(out_wcs, in_wcs, allx, ally)
    n = X.size
    parts_x = [xi[k * n:(k + 1) * n].reshape(X.shape) for k in range(5)]
    parts_y = [yi[k * n:(k + 1) * n].reshape(X.shape) for k in range(5)]
    gx, gy = parts_x[0], parts_y[0]
    dxdx = (parts_x[1] - parts_x[2]) / (2 * h)
    dydx = (parts_y[1] - parts_y[2]) / (2 * h)
    dxdy = (parts_x[3] - parts_x[4]) / (2 * h)
    dydy = (parts_y[3] - parts_y[4]) / (2 * h)
    gj = np.abs(dxdx * dydy - dxdy * dydx)
    # error of the bilinear interpolation at the cell midpoints (where it is largest)
    mx_true = xi[5 * n:].reshape(mX.shape)
    my_true = yi[5 * n:].reshape(mX.shape)
    mx = 0.25 * (gx[:-1, :-1] + gx[1:, :-1] + gx[:-1, 1:] + gx[1:, 1:])
    my = 0.25 * (gy[:-1, :-1] + gy[1:, :-1] + gy[:-1, 1:] + gy[1:, 1:])
    err = np.hypot(mx - mx_true, my - my_true)
    err = err[np.isfinite(err)]
    max_err = float(err.max()) if err.size else 0.0
    return gx, gy, gj, max_err


def coordinate_grid(out_wcs: WCS, out_shape, in_wcs: WCS, *, step: int = 16,
                    max_error: float = 0.01) -> CoordinateGrid:
    """Output -> input pixel coordinates and area ratio on a coarse grid.

    Parameters
    ----------
    out_wcs, in_wcs : astropy.wcs.WCS
        Celestial WCSs of the output grid and of the input exposure (SIP and
        other distortions are honoured: ``pixel_to_world_values`` /
        ``world_to_pixel_values``).
    out_shape : (int, int)
        Output shape ``(ny, nx)``.
    step : int
        Initial grid spacing in output pixels.
    max_error : float
        Required accuracy (input pixels) of the bilinear interpolation of the
        grid; the step is halved until the error measured at the cell
        midpoints is below it (or the step is 1).

    Returns
    -------
    CoordinateGrid
        ``x, y`` (0-based input pixel coordinates), ``jacobian`` (input pixels
        per output pixel), the final ``step`` and the measured ``max_error``.

    Notes
    -----
    The grid nodes are output pixels ``(k s, l s)`` for ``k = 0 .. ceil((n-1)/s)``.
    The area ratio is :math:`J = |\\det \\partial(x_{in}, y_{in}) /
    \\partial(x_{out}, y_{out})|` by central differences of +-0.5 px.  The
    interpolation error of a bilinear map is largest near the cell centres,
    :math:`\\approx s^2 |\\partial^2 x_{in}| / 8`, so it is measured there
    against the exact WCS transform; the measured maximum is returned.
    """
    ny, nx = (int(v) for v in out_shape)
    step = int(step)
    while True:
        gx, gy, gj, err = _grid_once(out_wcs, in_wcs, (ny, nx), step)
        if err <= max_error or step == 1:
            return CoordinateGrid(gx, gy, gj, step, err)
        step = max(1, step // 2)


def warp_exposure(image, variance, mask, in_wcs: WCS, out_wcs: WCS, out_shape, *,
                  config: WarpConfig = WarpConfig(), zp_exposure: float | None = None,
                  zp_common: float | None = None, threads: int = 1) -> Warp:
    """Resample an exposure onto an output grid (Lanczos, flux-conserving).

    Parameters
    ----------
    image, variance : (ny, nx) array
        Calibrated image (flux per input pixel) and its variance.
    mask : (ny, nx) integer array
        Mask bit planes (:mod:`surveyred.masks`); pixels with a non-finite
        image or variance are treated as NO_DATA.
    in_wcs, out_wcs : astropy.wcs.WCS
        WCS of the exposure (the fitted one, with distortion) and of the
        output grid (a patch's).
    out_shape : (int, int)
        Output shape.
    config : WarpConfig
    zp_exposure, zp_common : float, optional
        Zero-points of the exposure and of the coadd; the image is scaled by
        :func:`zero_point_scale` (1 when either is None).
    threads : int
        Numba threads.

    Returns
    -------
    Warp

    Notes
    -----
    See the module docstring for the conventions and
    :func:`surveyred.kernels.lanczos_warp` for the formula:
    :math:`I' = s J \\sum w I / \\sum w`, :math:`V' = (sJ)^2 \\sum w^2 V / (\\sum w)^2`.
    """
    config.validate()
    image = np.asarray(image)
    if image.ndim != 2 or np.shape(variance) != image.shape or np.shape(mask) != image.shape:
        raise ValueError(
            f"image {image.shape}, variance {np.shape(variance)} and mask {np.shape(mask)} "
            "must be 2-D of one shape"
        )
    s = zero_point_scale(zp_exposure, zp_common)
    bad = ~(np.isfinite(image) & np.isfinite(variance))
    if bad.any():  # non-finite pixels carry no data
        mask = np.asarray(mask, dtype=masks.MASK_DTYPE) | np.where(bad, masks.NO_DATA, 0).astype(masks.MASK_DTYPE)
    grid = coordinate_grid(out_wcs, out_shape, in_wcs, step=config.grid_step, max_error=config.max_map_error)
    img, var, msk = lanczos_warp(
        image, variance, mask, grid.x, grid.y, grid.jacobian, grid.step, out_shape,
        order=config.order, linear=config.linear_correction, mask_weight_threshold=config.mask_weight_threshold, scale=s, threads=threads,
    )
    return Warp(img, var, msk, out_wcs, s, grid.max_error, grid.step)


# -- FITS ----------------------------------------------------------------------------

def write_warp(path: str | os.PathLike, warp: Warp, *, header: fits.Header | None = None,
               bunit: str | None = None) -> None:
    """Write a warp as PRIMARY, IMAGE (with the output WCS), MASK, VARIANCE (atomically).

    ``bunit``: the image unit (e.g. ``"nJy"`` on the 31.4 zero-point; the
    variance gets ``bunit + "2"``); ``""`` removes the unit; None keeps the
    calexp's ``electron``.  ``WARPSCL`` records ``warp.scale`` (for a warp of
    several detectors, the command records their median).
    """
    from .fitsio import exposure_hdus, write_hdulist

    primary = fits.Header() if header is None else header.copy()
    primary["WARPSCL"] = (warp.scale, "zero-point flux scale applied")
    primary["WARPMERR"] = (warp.map_error, "max coordinate-map error [input px]")
    primary["WARPSTEP"] = (warp.grid_step, "coordinate grid step [output px]")
    img_header = warp.wcs.to_header(relax=True)
    hdul = exposure_hdus(warp.image, warp.mask, warp.variance, primary_header=primary,
                         image_header=img_header)
    for name in ("IMAGE", "MASK", "VARIANCE"):
        hdul[name].header.update(img_header)
    _set_bunit(hdul, bunit)
    write_hdulist(hdul, path)


def _set_bunit(hdul, bunit: str | None) -> None:
    if bunit is None:
        return
    for name, unit in (("IMAGE", bunit), ("VARIANCE", f"{bunit}2" if bunit else "")):
        if unit:
            hdul[name].header["BUNIT"] = unit
        else:
            hdul[name].header.remove("BUNIT", ignore_missing=True)


def read_warp(path: str | os.PathLike) -> Warp:
    """Read a warp written by :func:`write_warp`."""
    from .fitsio import read_exposure

    image, mask, variance, primary, img_header = read_exposure(path)
    return Warp(image, variance, mask, WCS(img_header), float(primary.get("WARPSCL", 1.0)),
                float(primary.get("WARPMERR", 0.0)), int(primary.get("WARPSTEP", 0)))


def warp_shape(path: str | os.PathLike) -> tuple[int, int]:
    """Shape of a warp file's IMAGE HDU, from its header."""
    try:
        h = fits.getheader(path, "IMAGE")
    except (OSError, KeyError) as exc:
        raise CorruptInput(f"not a warp ({exc})", path=path) from exc
    return int(h["NAXIS2"]), int(h["NAXIS1"])


def warp_layout(path: str | os.PathLike) -> dict:
    """Byte layout of a warp file's IMAGE, VARIANCE and MASK data, for positional reads.

    Returns ``{name: (data_offset, shape, dtype)}`` for uncompressed planes
    without scaling (as :func:`write_warp` writes them); an empty dict when the
    file is compressed or scaled (then :func:`read_warp_rows` falls back to
    astropy sections).
    """
    layout = {}
    if str(path).endswith((".gz", ".bz2", ".fz")):
        return layout
    try:
        with fits.open(path, memmap=False, lazy_load_hdus=False) as hdul:
            for name in ("IMAGE", "VARIANCE", "MASK"):
                k = hdul.index_of(name)
                h = hdul[k].header
                if h.get("BSCALE", 1) != 1 or h.get("BZERO", 0) != 0 or h.get("XTENSION") != "IMAGE":
                    return {}
                bitpix = int(h["BITPIX"])
                dtype = {-32: ">f4", -64: ">f8", 32: ">i4", 16: ">i2"}.get(bitpix)
                if dtype is None:
                    return {}
                offset = hdul[k]._data_offset
                layout[name] = (int(offset), (int(h["NAXIS2"]), int(h["NAXIS1"])), dtype)
    except (OSError, KeyError, ValueError) as exc:
        raise CorruptInput(f"not a warp ({exc})", path=path) from exc
    return layout


def read_warp_rows(path: str | os.PathLike, y0: int, y1: int, layout: dict | None = None):
    """Rows ``y0:y1`` of a warp's image, variance and mask, read by position.

    With ``layout`` (:func:`warp_layout`) the rows are read with plain
    positional reads (``seek`` + ``read``) from a file opened and closed per
    call; otherwise through astropy (``ImageHDU.section``, no memory map).
    Only the requested rows are read, so reading a band of every input holds
    one band per input in memory.
    """
    if layout:
        out = []
        try:
            with open(path, "rb") as fh:
                for name, dtype_out in (("IMAGE", np.float32), ("VARIANCE", np.float32),
                                        ("MASK", masks.MASK_DTYPE)):
                    offset, (ny, nx), dtype = layout[name]
                    if not 0 <= y0 <= y1 <= ny:
                        raise OSError(f"rows {y0}:{y1} outside the {ny} rows of {name}")
                    item = np.dtype(dtype).itemsize
                    fh.seek(offset + y0 * nx * item)
                    n = (y1 - y0) * nx
                    buf = fh.read(n * item)
                    if len(buf) != n * item:
                        raise OSError(f"short read of {name} rows {y0}:{y1}")
                    out.append(np.frombuffer(buf, dtype=dtype).reshape(y1 - y0, nx).astype(dtype_out))
        except OSError as exc:
            raise CorruptInput(f"cannot read rows {y0}:{y1} of a warp ({exc})", path=path) from exc
        return tuple(out)
    try:
        with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
            img = np.asarray(hdul["IMAGE"].section[y0:y1, :], dtype=np.float32)
            var = np.asarray(hdul["VARIANCE"].section[y0:y1, :], dtype=np.float32)
            msk = np.asarray(hdul["MASK"].section[y0:y1, :], dtype=masks.MASK_DTYPE)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise CorruptInput(f"cannot read rows {y0}:{y1} of a warp ({exc})", path=path) from exc
    return img, var, msk
