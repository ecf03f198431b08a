"""Which sky patches each exposure touches, known before any pixel is processed.

The workflow must know, when it builds its job graph, which coadd patches each
science exposure feeds: a coadd job then depends only on the exposures that
overlap its patch, and removing one exposure (the exclusion list) re-runs only
the coadds it touched.  At that point the calibrated WCS does not exist yet, so
the assignment uses the raw frames' header WCS, recorded by ingest as the sky
corners of every detector (inventory columns ``corner_ra``/``corner_dec``),
grown by a margin that covers the header WCS's pointing error and the warp
kernel's reach.  An exposure listed for a patch that its calibrated footprint
misses after all gets an "empty" entry in its warp manifest, and the coadd skips
it; an exposure whose calibrated footprint reaches a patch that the header WCS
did not predict (pointing error beyond the margin) is missing from that coadd, so
the margin is generous by default (``skymap.footprint_margin_arcsec``).

Tracts: one per field (the ``object`` of the science frames, as jointcal
groups them), centred on the median boresight of the field's science
exposures rounded to 1 arcmin (so that adding a few exposures does not move the
tract), unless pinned in the configuration.  Tract ids are the fields' positions
in sorted order unless pinned; pin ``skymap.tracts`` in production so that ids
and centres never change when fields are added.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .errors import ConfigError
from .jointcal import field_name
from .skymap import SkymapConfig, Tract, make_tracts, patch_id

__all__ = ["field_tracts", "skymap_config", "visit_patches"]


def skymap_config(cfg: Mapping) -> SkymapConfig:
    """The tract/patch geometry from the workflow's ``skymap`` configuration section."""
    keys = ("pixel_scale", "patch_size", "patch_overlap", "n_patches")
    return SkymapConfig(**{k: cfg[k] for k in keys if k in cfg}).validate()


def _round_arcmin(value: float) -> float:
    return round(float(value) * 60.0) / 60.0


def field_tracts(science: pd.DataFrame, geometry: SkymapConfig,
                 pinned: Sequence[Mapping] = ()) -> dict[str, Tract]:
    """``{field: Tract}`` for every field of the science rows of an inventory.

    ``pinned`` entries ``{field, id, ra, dec}`` fix a field's tract; the other
    fields get the median boresight (rounded to 1 arcmin) and the lowest ids
    not pinned, in sorted field order.
    """
    fields = sorted({field_name(o) for o in science["object"]}) if len(science) else []
    pins: dict[str, Mapping] = {}
    for entry in pinned or ():
        try:
            pins[str(entry["field"])] = entry
            int(entry["id"]), float(entry["ra"]), float(entry["dec"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"skymap tracts: each entry needs field, id, ra and dec; got {entry!r}") from None
    used = {int(p["id"]) for p in pins.values()}
    if len(used) != len(pins):
        raise ConfigError("skymap tracts: two pinned fields share a tract id")
    centres: dict[int, tuple[float, float]] = {}
    ids: dict[str, int] = {}
    next_id = 0
    obj = science["object"].map(field_name) if len(science) else pd.Series(dtype=str)
    for name in fields:
        if name in pins:
            tid, ra, dec = int(pins[name]["id"]), float(pins[name]["ra"]), float(pins[name]["dec"])
        else:
            while next_id in used:
                next_id += 1
            tid = next_id
            used.add(tid)
            rows = science[obj == name]
            ra0 = float(np.nanmedian(rows["ra"]))
            # the median RA around the first exposure's RA, so that fields at RA 0 work
            dra = ((rows["ra"].to_numpy(float) - ra0 + 180.0) % 360.0) - 180.0
            ra = _round_arcmin((ra0 + float(np.nanmedian(dra))) % 360.0)
            dec = _round_arcmin(float(np.nanmedian(rows["dec"])))
            if not (math.isfinite(ra) and math.isfinite(dec)):
                raise ConfigError(
                    f"field {name!r}: no boresight RA/Dec in the inventory; pin its tract in skymap.tracts"
                )
        centres[tid] = (ra, dec)
        ids[name] = tid
    tracts = {t.id: t for t in make_tracts(centres, config=geometry)}
    return {name: tracts[tid] for name, tid in ids.items()}


def visit_patches(science: pd.DataFrame, tracts: Mapping[str, Tract], *,
                  margin_arcsec: float) -> dict[tuple[str, str], tuple[int, list[str]]]:
    """``{(night, visit): (tract id, [patch id, ...])}`` from the header-WCS corners.

    A detector touches a patch when the bounding box of its four corners in the
    tract's pixel grid, grown by ``margin_arcsec``, intersects the patch's outer
    box.  Detectors without corners (no header WCS) fall back to the boresight
    of their exposure, grown by the margin.  Visits touching no patch map to an
    empty list.
    """
    out: dict[tuple[str, str], tuple[int, list[str]]] = {}
    if not len(science):
        return out
    fields = science["object"].map(field_name).to_numpy()
    for name in np.unique(fields):
        tract = tracts[name]
        rows = science[fields == name]
        geo = tract.config
        margin = float(margin_arcsec) / geo.pixel_scale
        cra = np.stack([np.asarray(c, float) for c in rows["corner_ra"]]) if "corner_ra" in rows else None
        cdec = np.stack([np.asarray(c, float) for c in rows["corner_dec"]]) if "corner_dec" in rows else None
        n = len(rows)
        if cra is None or cra.shape != (n, 4):
            cra = np.full((n, 4), np.nan)
            cdec = np.full((n, 4), np.nan)
        no_wcs = ~np.all(np.isfinite(cra) & np.isfinite(cdec), axis=1)
        cra[no_wcs] = rows["ra"].to_numpy(float)[no_wcs, None]
        cdec[no_wcs] = rows["dec"].to_numpy(float)[no_wcs, None]
        x, y = _tract_pixels(tract, cra.ravel(), cdec.ravel())
        x, y = x.reshape(n, 4), y.reshape(n, 4)
        ok = np.all(np.isfinite(x) & np.isfinite(y), axis=1)
        grow = geo.patch_overlap + margin
        s, npatch = geo.patch_size, geo.n_patches
        # patch ix touches [x0, x1] when ix*s - grow - 0.5 <= x1 and (ix+1)*s + grow - 0.5 >= x0
        ix0 = np.ceil((x.min(axis=1) + 0.5 - grow) / s - 1.0)
        ix1 = np.floor((x.max(axis=1) + 0.5 + grow) / s)
        iy0 = np.ceil((y.min(axis=1) + 0.5 - grow) / s - 1.0)
        iy1 = np.floor((y.max(axis=1) + 0.5 + grow) / s)
        keys = list(zip(rows["night"].astype(str), rows["visit"].astype(str)))
        touched: dict[tuple[str, str], set] = {k: set() for k in keys}
        for k, good, a0, a1, b0, b1 in zip(keys, ok, ix0, ix1, iy0, iy1):
            if not good:
                continue
            a0, a1 = max(int(a0), 0), min(int(a1), npatch - 1)
            b0, b1 = max(int(b0), 0), min(int(b1), npatch - 1)
            for iy in range(b0, b1 + 1):
                for ix in range(a0, a1 + 1):
                    touched[k].add((iy, ix))
        for k, cells in touched.items():
            out[k] = (tract.id, [patch_id(ix, iy) for iy, ix in sorted(cells)])
    return out


def _tract_pixels(tract: Tract, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tract pixel coordinates; NaN beyond 90 degrees of the tract centre."""
    r0, d0 = math.radians(tract.ra), math.radians(tract.dec)
    r, d = np.radians(ra), np.radians(dec)
    cosc = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(r - r0)
    with np.errstate(all="ignore"):
        x, y = tract.wcs.wcs_world2pix(ra, dec, 0)
    bad = ~(cosc > 0)
    x, y = np.asarray(x, float), np.asarray(y, float)
    x[bad] = np.nan
    y[bad] = np.nan
    return x, y
