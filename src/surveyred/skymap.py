"""Skymap: tangent-plane tracts and overlapping square patches covering a survey.

A *tract* is one gnomonic (TAN) pixel grid per field, centred on the field
centre, north up and east left, of a configurable pixel scale.  It is cut into
``n_patches x n_patches`` square *patches* of ``patch_size`` pixels (the inner
boxes tile the tract without overlap); each patch's outer box is its inner box
grown by ``patch_overlap`` pixels on every side, so neighbouring patches share
``2 * patch_overlap`` pixels.  Every patch lies on the tract's common pixel
grid: its WCS is the tract WCS shifted to the outer box's origin.

Ids are stable: a tract's id is given by the caller (default: its index in the
list of field centres) and a patch's id is ``"x,y"`` (column, row index in the
tract), independent of which exposures exist.

:func:`patches_for_exposure` lists the patches an exposure touches, from its
WCS (the outline of the exposure, corners plus samples along each edge,
transformed to tract pixels), so that each coadd job depends only on the
exposures that overlap its patch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from astropy.wcs import WCS

from .errors import ConfigError

__all__ = [
    "BBox",
    "Patch",
    "SkymapConfig",
    "Tract",
    "exposure_outline",
    "make_tracts",
    "patch_id",
    "patches_for_exposure",
]


@dataclass(frozen=True)
class SkymapConfig:
    """Tract and patch geometry.

    Attributes
    ----------
    pixel_scale : float
        Tract pixel scale in arcsec (at the tangent point).
    patch_size : int
        Side of a patch's inner box in pixels.
    patch_overlap : int
        Pixels added on each side of the inner box to make the outer box.
    n_patches : int
        Patches per tract side (the tract is ``n_patches * patch_size`` pixels square).
    """

    pixel_scale: float = 0.2
    patch_size: int = 4000
    patch_overlap: int = 100
    n_patches: int = 9

    def validate(self) -> SkymapConfig:
        if not (self.pixel_scale > 0 and math.isfinite(self.pixel_scale)):
            raise ConfigError(f"skymap pixel_scale must be positive, got {self.pixel_scale!r}")
        for name in ("patch_size", "n_patches"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ConfigError(f"skymap {name} must be an integer >= 1, got {v!r}")
        if int(self.patch_overlap) != self.patch_overlap or self.patch_overlap < 0:
            raise ConfigError(f"skymap patch_overlap must be an integer >= 0, got {self.patch_overlap!r}")
        if self.patch_overlap * 2 >= self.patch_size:
            raise ConfigError(
                f"skymap patch_overlap {self.patch_overlap} must be below half the patch_size {self.patch_size}"
            )
        return self


@dataclass(frozen=True)
class BBox:
    """Integer pixel box ``x0 <= x < x1``, ``y0 <= y < y1`` (0-based, pixel centres at integers)."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.y1 - self.y0, self.x1 - self.x0)

    @property
    def slices(self) -> tuple[slice, slice]:
        return (slice(self.y0, self.y1), slice(self.x0, self.x1))

    def grow(self, n: int) -> BBox:
        return BBox(self.x0 - n, self.y0 - n, self.x1 + n, self.y1 + n)

    def contains(self, x, y):
        """True where the point lies in the box's pixels (edges at -0.5 of the first, +0.5 of the last)."""
        return (x >= self.x0 - 0.5) & (x < self.x1 - 0.5) & (y >= self.y0 - 0.5) & (y < self.y1 - 0.5)


def patch_id(ix: int, iy: int) -> str:
    """The stable id ``"x,y"`` of the patch in column ``ix``, row ``iy``."""
    return f"{int(ix)},{int(iy)}"


def _parse_patch_id(pid: str) -> tuple[int, int]:
    try:
        a, b = pid.split(",")
        return int(a), int(b)
    except ValueError:
        raise ValueError(f"patch id must be 'x,y', got {pid!r}") from None


@dataclass(frozen=True)
class Patch:
    """One patch: ids, inner and outer boxes in tract pixels, and its WCS (outer box origin)."""

    tract_id: int
    index: tuple[int, int]
    inner: BBox
    outer: BBox
    wcs: WCS = field(compare=False, repr=False)

    @property
    def id(self) -> str:
        return patch_id(*self.index)

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the patch's pixel grid (the outer box)."""
        return self.outer.shape


@dataclass(frozen=True)
class Tract:
    """A tangent-plane tract centred on a field."""

    id: int
    ra: float
    dec: float
    config: SkymapConfig
    wcs: WCS = field(compare=False, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        n = self.config.n_patches * self.config.patch_size
        return (n, n)

    @property
    def bbox(self) -> BBox:
        ny, nx = self.shape
        return BBox(0, 0, nx, ny)

    @property
    def patch_ids(self) -> list[str]:
        n = self.config.n_patches
        return [patch_id(ix, iy) for iy in range(n) for ix in range(n)]

    def patch(self, pid: str | tuple[int, int]) -> Patch:
        """The patch with id ``"x,y"`` (or index tuple)."""
        ix, iy = _parse_patch_id(pid) if isinstance(pid, str) else (int(pid[0]), int(pid[1]))
        n = self.config.n_patches
        if not (0 <= ix < n and 0 <= iy < n):
            raise KeyError(f"tract {self.id} has no patch {ix},{iy} (patches 0..{n - 1} per side)")
        s = self.config.patch_size
        inner = BBox(ix * s, iy * s, (ix + 1) * s, (iy + 1) * s)
        outer = inner.grow(self.config.patch_overlap)
        w = self.wcs.deepcopy()
        w.wcs.crpix = [w.wcs.crpix[0] - outer.x0, w.wcs.crpix[1] - outer.y0]
        w.pixel_shape = (outer.shape[1], outer.shape[0])
        return Patch(self.id, (ix, iy), inner, outer, w)

    def patches(self) -> list[Patch]:
        return [self.patch(p) for p in self.patch_ids]


def _tract_wcs(ra: float, dec: float, config: SkymapConfig) -> WCS:
    n = config.n_patches * config.patch_size
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.crval = [float(ra) % 360.0, float(dec)]
    # tangent point at the tract centre: 0-based pixel (n - 1) / 2 = FITS (n + 1) / 2
    w.wcs.crpix = [(n + 1) / 2.0, (n + 1) / 2.0]
    scale = config.pixel_scale / 3600.0
    w.wcs.cd = [[-scale, 0.0], [0.0, scale]]
    w.wcs.radesys = "ICRS"
    w.pixel_shape = (n, n)
    w.wcs.set()
    return w


def make_tracts(field_centers: Sequence[tuple[float, float]] | Mapping[int, tuple[float, float]], *,
                config: SkymapConfig = SkymapConfig()) -> list[Tract]:
    """One tract per field, centred on the field.

    Parameters
    ----------
    field_centers : sequence of (ra, dec) or mapping id -> (ra, dec)
        Field centres in degrees.  With a sequence the tract ids are the
        indices; with a mapping its (integer) keys.
    config : SkymapConfig

    Returns
    -------
    list of Tract
        In the order of the ids.

    Notes
    -----
    Tract pixel ``(x, y)`` (0-based) maps to the TAN plane at
    :math:`\\xi = -p (x - c)`, :math:`\\eta = p (y - c)` with
    :math:`c = (n_p s - 1)/2` and ``p`` the pixel scale.
    """
    config.validate()
    items = field_centers.items() if isinstance(field_centers, Mapping) else enumerate(field_centers)
    tracts = []
    for tid, (ra, dec) in items:
        if int(tid) != tid:
            raise ConfigError(f"tract ids must be integers, got {tid!r}")
        if not (math.isfinite(ra) and math.isfinite(dec) and -90.0 <= dec <= 90.0):
            raise ConfigError(f"field centre of tract {tid} is not a sky position: ({ra}, {dec})")
        tracts.append(Tract(int(tid), float(ra) % 360.0, float(dec), config, _tract_wcs(ra, dec, config)))
    ids = [t.id for t in tracts]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"duplicate tract ids: {ids}")
    return sorted(tracts, key=lambda t: t.id)


def exposure_outline(wcs: WCS, shape: tuple[int, int], *, samples_per_edge: int = 16):
    """Pixel-boundary outline of an exposure: (x, y) arrays, counter-clockwise, closed implicitly.

    Corners are the outer pixel edges ``(-0.5, -0.5) .. (nx - 0.5, ny - 0.5)``;
    ``samples_per_edge`` points per edge follow distortion.
    """
    ny, nx = shape
    t = np.linspace(0.0, 1.0, samples_per_edge, endpoint=False)
    x0, x1, y0, y1 = -0.5, nx - 0.5, -0.5, ny - 0.5
    xs = np.concatenate([x0 + t * (x1 - x0), np.full_like(t, x1), x1 - t * (x1 - x0), np.full_like(t, x0)])
    ys = np.concatenate([np.full_like(t, y0), y0 + t * (y1 - y0), np.full_like(t, y1), y1 - t * (y1 - y0)])
    return xs, ys


def _point_in_polygon(px, py, xs, ys):
    """Even-odd rule for points (px, py) against the polygon (xs, ys)."""
    px = np.atleast_1d(px)[:, None]
    py = np.atleast_1d(py)[:, None]
    xa, ya = xs[None, :], ys[None, :]
    xb, yb = np.roll(xs, -1)[None, :], np.roll(ys, -1)[None, :]
    cond = (ya > py) != (yb > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        xint = xa + (py - ya) * (xb - xa) / (yb - ya)
    return (np.count_nonzero(cond & (px < xint), axis=1) % 2) == 1


def _segments_cross_box(xs, ys, bx0, by0, bx1, by1) -> bool:
    """Does any polygon edge intersect the box ``[bx0, bx1] x [by0, by1]`` (Liang-Barsky clipping)?"""
    xa, ya = xs, ys
    dx, dy = np.roll(xs, -1) - xs, np.roll(ys, -1) - ys
    t0 = np.zeros_like(xa)
    t1 = np.ones_like(xa)
    ok = np.ones(xa.shape, bool)
    for p, q in ((-dx, xa - bx0), (dx, bx1 - xa), (-dy, ya - by0), (dy, by1 - ya)):
        par = p == 0
        ok &= ~(par & (q < 0))
        with np.errstate(divide="ignore", invalid="ignore"):
            r = q / p
        t0 = np.where(~par & (p < 0), np.maximum(t0, r), t0)
        t1 = np.where(~par & (p > 0), np.minimum(t1, r), t1)
    return bool(np.any(ok & (t0 <= t1)))


def patches_for_exposure(tract: Tract, wcs: WCS, shape: tuple[int, int], *,
                         samples_per_edge: int = 16, margin: float = 0.0) -> list[str]:
    """Ids of the patches (outer boxes) of ``tract`` that an exposure touches.

    Parameters
    ----------
    tract : Tract
    wcs : astropy.wcs.WCS
        The exposure's celestial WCS (with distortion).
    shape : (int, int)
        The exposure's shape ``(ny, nx)``.
    samples_per_edge : int
        Outline points per edge (corners included), so that rotation and
        distortion are followed.
    margin : float
        Grow each patch's outer box by this many pixels before testing (e.g.
        the warp kernel's half-width, to include exposures whose kernel
        footprint just reaches the patch).

    Returns
    -------
    list of str
        Patch ids ``"x,y"``, sorted by row then column.

    Notes
    -----
    The exposure's outline is transformed pixel -> sky -> tract pixel; a patch
    is touched when its box and the outline polygon intersect (a box corner
    inside the polygon, or a polygon edge crossing the box, or the polygon
    entirely inside the box).  Outline points more than 90 degrees from the
    tract centre (no gnomonic projection) make the exposure not touch the tract.
    """
    xs, ys = exposure_outline(wcs, shape, samples_per_edge=samples_per_edge)
    with np.errstate(all="ignore"):
        ra, dec = wcs.pixel_to_world_values(xs, ys)
        ra, dec = np.asarray(ra, float), np.asarray(dec, float)
        if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
            return []
        r0, d0 = np.radians(tract.ra), np.radians(tract.dec)
        cosd = (np.sin(d0) * np.sin(np.radians(dec))
                + np.cos(d0) * np.cos(np.radians(dec)) * np.cos(np.radians(ra) - r0))
        if np.any(cosd <= 0.0):
            return []
        tx, ty = tract.wcs.world_to_pixel_values(ra, dec)
    tx, ty = np.asarray(tx, float), np.asarray(ty, float)
    if not (np.all(np.isfinite(tx)) and np.all(np.isfinite(ty))):
        return []
    n = tract.config.n_patches
    s = tract.config.patch_size
    grow = tract.config.patch_overlap + margin
    # candidate patch range from the outline's bounding box
    ix0 = max(0, int(math.floor((tx.min() + 0.5 - grow) / s)) - 1)
    ix1 = min(n - 1, int(math.floor((tx.max() + 0.5 + grow) / s)) + 1)
    iy0 = max(0, int(math.floor((ty.min() + 0.5 - grow) / s)) - 1)
    iy1 = min(n - 1, int(math.floor((ty.max() + 0.5 + grow) / s)) + 1)
    out = []
    for iy in range(iy0, iy1 + 1):
        for ix in range(ix0, ix1 + 1):
            inner = BBox(ix * s, iy * s, (ix + 1) * s, (iy + 1) * s)
            gx0 = inner.x0 - grow - 0.5
            gx1 = inner.x1 + grow - 0.5
            gy0 = inner.y0 - grow - 0.5
            gy1 = inner.y1 + grow - 0.5
            if tx.max() < gx0 or tx.min() > gx1 or ty.max() < gy0 or ty.min() > gy1:
                continue
            corners_x = np.array([gx0, gx1, gx1, gx0])
            corners_y = np.array([gy0, gy0, gy1, gy1])
            hit = (
                np.any((tx >= gx0) & (tx <= gx1) & (ty >= gy0) & (ty <= gy1))
                or np.any(_point_in_polygon(corners_x, corners_y, tx, ty))
                or _segments_cross_box(tx, ty, gx0, gy0, gx1, gy1)
            )
            if hit:
                out.append(patch_id(ix, iy))
    return out
