"""Object catalog of one patch from its coadds: ``surveyred coadd-catalog``.

Steps
-----
1. **Per band** (the coadds sorted by ``BAND``, so that the result does not
   depend on the order of the inputs): the characterisation of a single frame
   (:func:`surveyred.characterize.characterize_detector`: sep background,
   detection and deblending, windowed centroids, shapes, aperture fluxes, a
   double-Gaussian :class:`surveyred.psf.PsfModel` fitted on the coadd's stars,
   PSF fluxes with neighbour subtraction and an aperture correction) on the
   coadd's IMAGE (nJy per pixel at the common zero-point 31.4), VARIANCE and
   MASK.  A band whose PSF cannot be fitted (too few stars) contributes
   detections but no fluxes (``{band}_psf_flux`` NaN).
2. **Merge** (all coadds of a patch share its pixel grid): the bands are taken
   in sorted order; each band's detections are matched one-to-one to the
   objects found so far (pairs closer than ``match_radius_arcsec``, closest
   pairs first); unmatched detections become new objects.  An object's
   reference position is the centroid of its detection with the highest S/N
   (``ref_band``).
3. **Measurement at the reference positions** in every band (detected there
   or not, as forced photometry on the coadds): PSF flux with that band's
   model and aperture correction (``psf_photometry``, ``neighbours``
   iterations) and aperture flux within ``aperture_radius`` px.
4. **Ids**: ``object_id = tract * 10^14 + ix * 10^11 + iy * 10^8 + rank``, with
   ``(ix, iy)`` the patch index (patch id ``"ix,iy"``) and ``rank`` the index of
   the object in the catalog sorted by reference position (``y``, then ``x``,
   rounded to 1e-4 px).  The same inputs and configuration give the same ids
   (whatever the input order); a patch holds at most 10^8 objects.
5. **inner**: the reference position lies in the patch's inner box (the patch
   grid is the outer box; the inner box starts ``patch_overlap`` px in), so
   that every object of the tract is ``inner`` in exactly one patch.

Inputs are the coadds of ``surveyred coadd`` (IMAGE in nJy per pixel, sky
subtracted before warping; a residual background is estimated again here),
one per band, all on the patch's grid.

Patch geometry: from ``--skymap-json`` (``patch_size``, ``patch_overlap``; the
other skymap keys are checked when given) or, when absent, from the coadd
header cards ``PATCHSZ`` and ``PATCHOVL``.  With ``--tract-json`` the coadd's
WCS is checked against the patch's.

Columns (Parquet, one row per object)
-------------------------------------
=============================  ======  =============================================
column                         unit    meaning
=============================  ======  =============================================
object_id                      -       int64, see step 4
tract, patch                   -       tract id (int) and patch id ``"x,y"``
x, y                           px      reference position, 0-based patch pixels
x_err, y_err                   px      its 1-sigma errors
ra, dec                        deg     reference position through the coadd WCS
ref_band                       -       band of the reference detection
inner                          bool    in the patch's inner box
n_bands_detected               -       bands with a detection
a, b, theta, fwhm              px/rad  shape of the reference detection (characterize)
{band}_detected                bool    detected in that band's coadd
{band}_psf_flux, _err          nJy     PSF flux at the reference position
{band}_ap_flux, _err           nJy     flux within ``aperture_radius`` px
{band}_snr                     -       ``psf_flux / psf_flux_err``
{band}_nimage                  -       coadd inputs at the reference pixel
{band}_flags                   -       int32: bit i = ``FLAG_NAMES[i]`` of the band's
                                       detection (characterize flags) plus
                                       ``no_data`` (reference pixel without data)
=============================  ======  =============================================

Schema metadata: ``tract``, ``patch``, ``bands``, ``inner_box``,
``psf_fwhm_{band}`` (px), ``apcorr_{band}``, ``n_detected_{band}``,
``status_{band}``, ``flag_names``, ``id_scheme``, ``units``, ``match_radius_arcsec``,
provenance (``software_version``, ``git_revision``, ``config_hash``,
``config``, ``inputs``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import masks
from .characterize import (
    FLAG_COLUMNS,
    CharacterizeConfig,
    DetectionConfig,
    ap_name,
    characterize_detector,
    psf_photometry,
)
from .errors import ConfigError, CorruptInput

log = logging.getLogger("surveyred.coaddcat")

#: Bits of ``{band}_flags``: the characterize flags, then ``no_data``.
FLAG_NAMES = tuple(c[len("flag_"):] for c in FLAG_COLUMNS) + ("no_data",)
#: Default aperture radii (px) on coadds.  The aperture correction is fitted against the largest: 8 px
#: (2.7 FWHM) holds > 99% of the flux, and on a coadd (few PSF stars per patch, neighbours, seams of the
#: inputs) a 12-px aperture gave corrections off by up to 7% against the truth.
COADD_APERTURE_RADII = (3.0, 5.0, 8.0)
#: Default detection threshold (sigma of the VARIANCE plane) on coadds.  The warps' Lanczos resampling
#: correlates the noise, so the per-pixel variance underestimates the noise of the filtered image that
#: detection thresholds.  On the tiny survey's sky-subtracted coadds (patches of 450x450 px): at 3 sigma
#: 114 and 140 detections of which 23 and 14 have no truth counterpart (12 and 10 of them below S/N 5);
#: at 4 sigma 95 and 124, of which only 7 and 2 (the supernova, pieces of a saturated star's halo).
COADD_DETECTION_THRESH = 4.0
ID_SCHEME = "object_id = tract*10^14 + ix*10^11 + iy*10^8 + rank (rank in (y, x) order of reference positions)"


@dataclass(frozen=True)
class CoaddCatalogConfig:
    """``coadd_catalog`` section of the configuration.

    ``characterize`` holds the keys of characterize's configuration
    (``background``, ``detection``, ``psf``, ``apcorr``, ``aperture_radii``,
    ``max_centroid_shift``) applied to the coadds; ``aperture_radius`` (px,
    any positive value) is the radius of ``{band}_ap_flux``; the default radii are
    :data:`COADD_APERTURE_RADII` and the default detection threshold
    :data:`COADD_DETECTION_THRESH`.
    """

    characterize: CharacterizeConfig = field(default_factory=lambda: CharacterizeConfig(
        detection=DetectionConfig(thresh=COADD_DETECTION_THRESH), aperture_radii=COADD_APERTURE_RADII,
        pool_visit=False))
    match_radius_arcsec: float = 0.6
    aperture_radius: float = 5.0
    neighbours: int = 2

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any] | None) -> CoaddCatalogConfig:
        doc = dict(doc or {})
        ch_keys = ("background", "detection", "psf", "apcorr", "aperture_radii", "max_centroid_shift")
        ch_doc = {k: doc.pop(k) for k in ch_keys if k in doc}
        ch_doc["pool_visit"] = False
        ch_doc.setdefault("aperture_radii", list(COADD_APERTURE_RADII))
        ch_doc["detection"] = {"thresh": COADD_DETECTION_THRESH, **dict(ch_doc.get("detection") or {})}
        try:
            return cls(characterize=CharacterizeConfig.from_dict(ch_doc), **doc).validate()
        except TypeError as exc:
            raise ConfigError(f"coadd_catalog configuration: {exc}") from exc

    def validate(self) -> CoaddCatalogConfig:
        self.characterize.validate()
        if not (self.match_radius_arcsec > 0 and math.isfinite(self.match_radius_arcsec)):
            raise ConfigError(f"coadd_catalog.match_radius_arcsec must be > 0, got {self.match_radius_arcsec!r}")
        if not (self.aperture_radius > 0 and math.isfinite(self.aperture_radius)):
            raise ConfigError(f"coadd_catalog.aperture_radius must be > 0, got {self.aperture_radius!r}")
        if int(self.neighbours) != self.neighbours or self.neighbours < 0:
            raise ConfigError(f"coadd_catalog.neighbours must be an integer >= 0, got {self.neighbours!r}")
        return self


@dataclass
class BandCoadd:
    """One band's coadd of the patch (arrays in nJy per pixel)."""

    band: str
    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    nimage: np.ndarray | None = None
    name: str = ""


# -- science (I/O free) --------------------------------------------------------------------


def object_ids(tract: int, patch: tuple[int, int], x, y) -> tuple[np.ndarray, np.ndarray]:
    """``(order, ids)``: the (y, x) sort order of the positions and the ids in that order (step 4)."""
    ix, iy = int(patch[0]), int(patch[1])
    if not (0 <= ix < 1000 and 0 <= iy < 1000 and 0 <= int(tract) < 90000):
        raise ConfigError(f"tract {tract} / patch {ix},{iy} out of the id scheme's range")
    xr = np.round(np.asarray(x, float), 4)
    yr = np.round(np.asarray(y, float), 4)
    order = np.lexsort((xr, yr))
    if len(order) >= 10**8:
        raise ConfigError(f"{len(order)} objects in one patch exceed the id scheme (10^8)")
    base = np.int64(tract) * np.int64(10**14) + np.int64(ix) * np.int64(10**11) + np.int64(iy) * np.int64(10**8)
    return order, base + np.arange(len(order), dtype=np.int64)


def merge_detections(dets: Sequence[dict], radius_px: float):
    """Match the bands' detections into objects (step 2).

    ``dets``: per band (in merge order) a dict with ``x``, ``y``, ``snr``.
    Returns ``members``: array ``(n_objects, n_bands)`` of detection indices
    (-1 where the band has none), and the reference band index per object.
    """
    from scipy.spatial import cKDTree

    nb = len(dets)
    members = np.zeros((0, nb), np.int64)
    ref_x = np.zeros(0)
    ref_y = np.zeros(0)
    ref_snr = np.zeros(0)
    ref_band = np.zeros(0, np.int64)
    for b, d in enumerate(dets):
        x, y = np.asarray(d["x"], float), np.asarray(d["y"], float)
        snr = np.where(np.isfinite(d["snr"]), np.asarray(d["snr"], float), -np.inf)
        matched = np.full(len(x), -1, np.int64)
        if len(ref_x) and len(x):
            tree = cKDTree(np.column_stack([ref_x, ref_y]))
            pairs = tree.query_ball_point(np.column_stack([x, y]), r=radius_px)
            cand = [(math.hypot(x[i] - ref_x[j], y[i] - ref_y[j]), i, j) for i, js in enumerate(pairs) for j in js]
            cand.sort()
            used_obj = set()
            for _, i, j in cand:  # closest pairs first, one-to-one
                if matched[i] < 0 and j not in used_obj:
                    matched[i] = j
                    used_obj.add(j)
        new = np.nonzero(matched < 0)[0]
        members = np.vstack([members, np.full((len(new), nb), -1, np.int64)])
        matched[new] = len(ref_x) + np.arange(len(new))
        ref_x = np.concatenate([ref_x, x[new]])
        ref_y = np.concatenate([ref_y, y[new]])
        ref_snr = np.concatenate([ref_snr, np.full(len(new), -np.inf)])
        ref_band = np.concatenate([ref_band, np.full(len(new), b, np.int64)])
        members[matched, b] = np.arange(len(x))
        better = snr > ref_snr[matched]
        j = matched[better]
        ref_x[j], ref_y[j], ref_snr[j], ref_band[j] = x[better], y[better], snr[better], b
    return members, ref_band


def _detections_without_psf(c: BandCoadd, failed, cfg: CharacterizeConfig):
    """A band whose PSF cannot be fitted: its detections (centroids, shapes, apertures) without PSF fluxes."""
    from .characterize import DetectorResult, detect_and_measure

    bkg, _sub, _var, _objs, seg, cols = detect_and_measure(c.image, c.mask, c.variance, cfg=cfg)
    r = min(cfg.aperture_radii, key=lambda r: abs(r - 5.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = cols[ap_name(r)] / cols[ap_name(r) + "_err"]
    n = len(cols["x"])
    cols["snr"] = np.where(np.isfinite(snr), snr, 0.0)
    cols["flag_psf_failed"] = np.ones(n, bool)
    return DetectorResult(cols, bkg, (seg > 0).astype(np.uint8), None, dict(failed.summary, nsource=n),
                          "no_psf", failed.failure_class, failed.failure_message)


def coadd_catalog(coadds: Sequence[BandCoadd], *, wcs, tract: int, patch: tuple[int, int], inner_box,
                  config: CoaddCatalogConfig = CoaddCatalogConfig(), pixel_scale_arcsec: float,
                  threads: int = 1) -> tuple[pd.DataFrame, dict]:
    """The object table of one patch and a per-band summary (see the module docstring).

    ``wcs``: astropy WCS of the patch grid; ``inner_box``: :class:`surveyred.skymap.BBox` in patch pixels.
    """
    from concurrent.futures import ThreadPoolExecutor

    import sep

    cfg = config.characterize
    coadds = sorted(coadds, key=lambda c: c.band)
    bands = [c.band for c in coadds]
    if len(set(bands)) != len(bands):
        raise ConfigError(f"two coadds of one band among {bands}")
    shape = coadds[0].image.shape
    for c in coadds:
        if c.image.shape != shape:
            raise ConfigError(f"coadd {c.name} has shape {c.image.shape}, {coadds[0].name} has {shape}")

    def char(c: BandCoadd):
        res = characterize_detector(c.image, c.mask, c.variance, visit="0", detector=0, cfg=cfg, path=c.name)
        if res.status != "ok" and res.failure_class == "TooFewStars":
            res = _detections_without_psf(c, res, cfg)
        return res

    if threads > 1 and len(coadds) > 1:
        with ThreadPoolExecutor(max_workers=int(threads)) as pool:
            results = list(pool.map(char, coadds))
    else:
        results = [char(c) for c in coadds]
    summary = {}
    dets = []
    for c, res in zip(coadds, results):
        cat = res.catalog
        s = res.summary
        summary[c.band] = dict(status=res.status, failure=res.failure_message, n_detected=len(cat["x"]),
                               psf_fwhm=s["psf_fwhm"], apcorr=s["apcorr"], n_psf_stars=s["npsfstar"])
        if res.status != "ok":
            log.warning("%s (band %s): %s: %s - %s", c.name, c.band, res.failure_class, res.failure_message,
                        "detections without PSF fluxes" if res.status == "no_psf" else "no detection in this band")
        log.info("band %s: %d detections, PSF FWHM %.3f px from %d stars, apcorr %.4f", c.band, len(cat["x"]),
                 s["psf_fwhm"], s["npsfstar"], s["apcorr"])
        dets.append(dict(x=cat["x"], y=cat["y"], snr=cat["snr"]))
    members, ref_b = merge_detections(dets, config.match_radius_arcsec / pixel_scale_arcsec)
    n = len(members)
    rx, ry, rxe, rye = (np.full(n, np.nan) for _ in range(4))
    shape_cols = {k: np.full(n, np.nan) for k in ("a", "b", "theta", "fwhm")}
    for b, res in enumerate(results):
        sel = np.nonzero(ref_b == b)[0]
        k = members[sel, b]
        cat = res.catalog
        rx[sel], ry[sel] = cat["x"][k], cat["y"][k]
        rxe[sel], rye[sel] = cat["x_err"][k], cat["y_err"][k]
        for col in shape_cols:
            shape_cols[col][sel] = cat[col][k]
    order, ids = object_ids(tract, patch, rx, ry)
    members, ref_b = members[order], ref_b[order]
    rx, ry, rxe, rye = rx[order], ry[order], rxe[order], rye[order]
    shape_cols = {k: v[order] for k, v in shape_cols.items()}
    ra, dec = wcs.pixel_to_world_values(rx, ry) if n else (np.zeros(0), np.zeros(0))
    table = {"object_id": ids, "tract": np.full(n, int(tract), np.int32),
             "patch": np.array([f"{int(patch[0])},{int(patch[1])}"] * n, dtype=object),
             "x": rx, "y": ry, "x_err": rxe, "y_err": rye,
             "ra": np.asarray(ra, float) % 360.0, "dec": np.asarray(dec, float),
             "ref_band": np.array([bands[b] for b in ref_b], dtype=object),
             "inner": np.asarray(inner_box.contains(rx, ry), bool),
             "n_bands_detected": (members >= 0).sum(axis=1).astype(np.int16), **shape_cols}
    for b, (c, res) in enumerate(zip(coadds, results)):
        k = members[:, b]
        det = k >= 0
        image = np.ascontiguousarray(c.image, np.float32)
        var = np.ascontiguousarray(c.variance, np.float32)
        mask = np.ascontiguousarray(c.mask, masks.MASK_DTYPE)
        good = np.isfinite(image) & np.isfinite(var) & (var >= 0)
        back = res.background.back if res.background is not None else np.zeros(shape, np.float32)
        sub = np.where(good, image - back, np.float32(0)).astype(np.float32)
        var = np.where(good, var, np.float32(0)).astype(np.float32)
        mask = mask | np.where(good, 0, masks.NO_DATA).astype(masks.MASK_DTYPE)
        pf = pe = np.full(n, np.nan)
        if res.psf is not None and n:
            pf, pe = psf_photometry(sub, var, mask, res.psf, rx, ry, radius=cfg.psf.fit_radius,
                                    neighbours=int(config.neighbours))
            ac = float(res.summary["apcorr"]) if math.isfinite(res.summary["apcorr"]) else 1.0
            pf, pe = ac * pf, ac * pe
        af = ae = np.full(n, np.nan)
        if n:
            af, ae, _ = sep.sum_circle(sub, rx, ry, config.aperture_radius, var=var, subpix=5)
        ix = np.clip(np.rint(rx).astype(np.int64), 0, shape[1] - 1) if n else np.zeros(0, np.int64)
        iy = np.clip(np.rint(ry).astype(np.int64), 0, shape[0] - 1) if n else np.zeros(0, np.int64)
        flags = np.zeros(n, np.int32)
        cat = res.catalog
        for i, col in enumerate(FLAG_COLUMNS):
            if len(cat[col]):
                flags[det] |= np.where(cat[col][k[det]], 1 << i, 0).astype(np.int32)
        flags |= np.where((mask[iy, ix] & masks.NO_DATA) != 0, 1 << (len(FLAG_NAMES) - 1), 0).astype(np.int32)
        with np.errstate(invalid="ignore", divide="ignore"):
            snr = pf / pe
        table[f"{c.band}_detected"] = det
        table[f"{c.band}_psf_flux"] = np.asarray(pf, float)
        table[f"{c.band}_psf_flux_err"] = np.asarray(pe, float)
        table[f"{c.band}_ap_flux"] = np.asarray(af, float)
        table[f"{c.band}_ap_flux_err"] = np.asarray(ae, float)
        table[f"{c.band}_snr"] = np.asarray(snr, float)
        table[f"{c.band}_nimage"] = (c.nimage[iy, ix].astype(np.int32) if c.nimage is not None
                                     else np.full(n, -1, np.int32))
        table[f"{c.band}_flags"] = flags
    return pd.DataFrame(table), summary


# -- I/O ------------------------------------------------------------------------------------


def read_coadd(path: str | os.PathLike):
    """``(BandCoadd, primary header, image header)`` of a coadd FITS file (:func:`surveyred.coadd.write_coadd`)."""
    from . import fitsio

    image, mask, variance, primary, img_h = fitsio.read_exposure(path)
    nimage = None
    with fitsio.open_fits(path) as hdul:
        if "NIMAGE" in hdul:
            nimage = np.asarray(hdul["NIMAGE"].data, np.int32)
    band = str(primary.get("BAND", "")).strip()
    if not band:
        raise CorruptInput("coadd header has no BAND", path=path)
    return BandCoadd(band, image, variance, mask, nimage, name=str(path)), primary, img_h


def patch_geometry(primary, skymap_doc: Mapping | None, path) -> tuple[int, int]:
    """``(patch_size, patch_overlap)`` from ``--skymap-json`` or the coadd header (PATCHSZ, PATCHOVL)."""
    if skymap_doc:
        from .skymap import SkymapConfig

        try:
            sc = SkymapConfig(**dict(skymap_doc)).validate()
        except TypeError as exc:
            raise ConfigError(f"--skymap-json: {exc}") from exc
        return int(sc.patch_size), int(sc.patch_overlap)
    if "PATCHSZ" in primary and "PATCHOVL" in primary:
        return int(primary["PATCHSZ"]), int(primary["PATCHOVL"])
    raise ConfigError("the patch geometry is unknown: give --skymap-json '{\"patch_size\": .., "
                      "\"patch_overlap\": ..}' (the coadd header has no PATCHSZ/PATCHOVL)", path=path)


def run_coadd_catalog(paths: Sequence[str], *, tract: int, patch: str, output: str,
                      config: CoaddCatalogConfig = CoaddCatalogConfig(), skymap_doc=None, tract_doc=None,
                      threads: int = 1, config_doc=None) -> pd.DataFrame:
    """Read the coadds, build the catalog and write it (the command's body)."""
    import warnings

    from astropy.wcs import WCS, FITSFixedWarning

    from . import __version__
    from .fitsio import write_parquet
    from .provenance import config_hash, git_revision
    from .skymap import BBox, SkymapConfig, _parse_patch_id, make_tracts

    try:
        pidx = _parse_patch_id(str(patch))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not paths:
        raise ConfigError("coadd-catalog needs at least one coadd")
    coadds, wcs0, geom = [], None, None
    for p in paths:
        c, prim, img_h = read_coadd(p)
        for key, want in (("TRACT", int(tract)), ("PATCH", f"{pidx[0]},{pidx[1]}")):
            if key in prim and str(prim[key]).strip() != str(want):
                raise ConfigError(f"coadd is of {key.lower()} {prim[key]!r}, not {want!r}", path=p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            w = WCS(img_h).celestial
        if not w.has_celestial:
            raise CorruptInput("coadd IMAGE header has no celestial WCS", path=p)
        if wcs0 is None:
            wcs0, geom = w, patch_geometry(prim, skymap_doc, p)
        elif not (np.allclose(w.wcs.crpix, wcs0.wcs.crpix, atol=1e-6) and np.allclose(w.wcs.crval, wcs0.wcs.crval,
                                                                                      atol=1e-10)):
            raise ConfigError(f"coadd is not on the grid of {paths[0]} (another patch?)", path=p)
        coadds.append(c)
    size, overlap = geom
    shape = coadds[0].image.shape
    if shape != (size + 2 * overlap, size + 2 * overlap):
        raise ConfigError(f"coadd shape {shape} is not that of a patch of size {size} + 2 x {overlap} overlap",
                          path=paths[0])
    if tract_doc:
        sc = SkymapConfig(**dict(skymap_doc or {"patch_size": size, "patch_overlap": overlap}))
        t = make_tracts({int(tract_doc.get("id", tract)): (float(tract_doc["ra"]), float(tract_doc["dec"]))},
                        config=sc)[0]
        pw = t.patch(pidx).wcs
        if not (np.allclose(pw.wcs.crpix, wcs0.wcs.crpix, atol=1e-6) and np.allclose(pw.wcs.crval, wcs0.wcs.crval,
                                                                                     atol=1e-10)):
            raise ConfigError(f"the coadds' WCS is not that of patch {patch} of tract {tract}", path=paths[0])
    inner = BBox(overlap, overlap, overlap + size, overlap + size)
    scale = float(np.sqrt(abs(np.linalg.det(wcs0.pixel_scale_matrix))) * 3600.0)
    log.info("tract %s patch %s: %d coadd(s) (%s), %dx%d px at %.3f arcsec/px", tract, patch, len(coadds),
             ",".join(sorted(c.band for c in coadds)), shape[1], shape[0], scale)
    table, summary = coadd_catalog(coadds, wcs=wcs0, tract=int(tract), patch=pidx, inner_box=inner, config=config,
                                   pixel_scale_arcsec=scale, threads=threads)
    units = {"x": "pix", "y": "pix", "x_err": "pix", "y_err": "pix", "ra": "deg", "dec": "deg", "a": "pix",
             "b": "pix", "theta": "rad", "fwhm": "pix"}
    for b in summary:
        for k in ("psf_flux", "psf_flux_err", "ap_flux", "ap_flux_err"):
            units[f"{b}_{k}"] = "nJy"
    meta = {"tract": str(int(tract)), "patch": f"{pidx[0]},{pidx[1]}", "bands": ",".join(sorted(summary)),
            "inner_box": json.dumps([inner.x0, inner.y0, inner.x1, inner.y1]),
            "flag_names": json.dumps(list(FLAG_NAMES)), "id_scheme": ID_SCHEME,
            "units": json.dumps(units, sort_keys=True), "match_radius_arcsec": repr(config.match_radius_arcsec),
            "software_version": __version__, "git_revision": git_revision(), "config_hash": config_hash(config_doc),
            "config": json.dumps(asdict(config), sort_keys=True, default=str),
            "inputs": ",".join(sorted(Path(p).name for p in paths)), "step": "coadd-catalog"}
    for b, s in summary.items():
        meta[f"psf_fwhm_{b}"] = repr(float(s["psf_fwhm"]))
        meta[f"apcorr_{b}"] = repr(float(s["apcorr"]))
        meta[f"n_detected_{b}"] = str(s["n_detected"])
        meta[f"status_{b}"] = s["status"]
    write_parquet(table, output, meta)
    log.info("tract %s patch %s: %d objects (%d inner) -> %s", tract, patch, len(table), int(table["inner"].sum()),
             output)
    return table


def main(argv: list[str] | None = None) -> int:
    from .runtime import common_arguments, json_arg, run, set_threads, setup_logging

    p = argparse.ArgumentParser(prog="surveyred coadd-catalog", description=(
        "Detection and measurement on every band's coadd of one patch, merged into one object table "
        "(PSF and aperture fluxes in nJy per band, stable object ids, inner flag)."))
    p.add_argument("--coadd", nargs="+", required=True, help="coadd/<tract>/<patch>/<band>.fits, one per band")
    p.add_argument("--tract", required=True, type=int)
    p.add_argument("--patch", required=True, help='patch id "x,y"')
    p.add_argument("--output", required=True, help="coadd_cat/<tract>/<patch>.parquet")
    p.add_argument("--skymap-json", default=None,
                   help='{"pixel_scale":..,"patch_size":..,"patch_overlap":..,"n_patches":..} (patch geometry; '
                        "default: the coadd header's PATCHSZ/PATCHOVL)")
    p.add_argument("--tract-json", default=None, help='{"id":0,"ra":..,"dec":..}: check the coadd WCS against it')
    p.add_argument("--config-json", default=None, help='{"coadd_catalog": {...}} as JSON')
    common_arguments(p)
    args = p.parse_args(argv)
    setup_logging(args.log)

    def body():
        set_threads(args.threads)
        doc = json_arg(args.config_json)
        cfg = CoaddCatalogConfig.from_dict(doc.get("coadd_catalog"))
        run_coadd_catalog(args.coadd, tract=args.tract, patch=args.patch, output=args.output, config=cfg,
                          skymap_doc=json_arg(args.skymap_json) or None,
                          tract_doc=json_arg(args.tract_json) or None, threads=args.threads, config_doc=doc)

    return run(body, what=f"coadd-catalog tract {args.tract} patch {args.patch}")
