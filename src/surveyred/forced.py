"""Forced photometry of one visit at fixed sky positions: ``surveyred forced-phot``.

For every detector of a visit the calexp (IMAGE, MASK, VARIANCE), its fitted
WCS and zero-point (the ``wcs`` product of calibrate) and its PSF model (the
``psf`` product of characterize) are read; every *position* - the inner objects
of the coadd catalogs (:mod:`surveyred.coaddcat`) and the user positions of an
optional CSV file - is transformed to pixels with the fitted TAN-SIP and
measured at that fixed position.

Measurement (per detector, I/O free: :func:`measure_detector`)
--------------------------------------------------------------
1. **Background**: recomputed exactly as characterize did
   (:func:`surveyred.characterize.estimate_background` with the mesh and filter
   recorded in the PSF product, ``BKGMESH``/``BKGFILT``).
2. **PSF flux** at the fixed position with the detector's PSF model
   (:func:`surveyred.characterize.psf_photometry`, radius ``fit_radius`` x FWHM,
   BAD/SAT/NO_DATA pixels left out):
   ``F = sum P d / sum P^2``, ``var F = sum P^2 V / (sum P^2)^2``.  Objects are
   fitted together with ``neighbours`` Jacobi iterations that subtract the
   other objects' PSFs; each user position is fitted alone (a user position
   usually coincides with an object - e.g. a transient on its host - and two
   fixed PSFs a fraction of a pixel apart are degenerate).  Saturated
   positions are not subtracted from their neighbours.
   The flux is multiplied by the visit's aperture correction (``APCORR`` of
   the PSF product), as characterize's ``psf_flux_apcorr``.
3. **Aperture flux** within ``aperture_radius`` px (``sep.sum_circle``,
   variance from the VARIANCE plane; not aperture-corrected).
4. **Calibration** to nJy with the detector's zero-point (``ZP`` of the wcs
   product, ``mag = -2.5 log10(e-/s) + ZP``):
   ``f_nJy = f_e / EXPTIME * 10**(-0.4 (ZP - 31.4))``.  Detectors that are not
   absolutely calibrated (``ABSCAL = F`` or no finite ZP) keep their
   electrons (``psf_flux_e``) but have NaN nJy fluxes and the
   ``NOT_CALIBRATED`` flag.

Output (Parquet, one row per position and detector it falls on)
----------------------------------------------------------------
Objects that fall on no detector of the visit get no row; **user positions
get one row per visit in every case** (``OUTSIDE`` flag, ``detector = -1``).
A detector whose wcs product holds no celestial WCS is skipped (logged): its
positions cannot be located and count as outside.

=====================  =======  ===================================================
column                 unit     meaning
=====================  =======  ===================================================
kind                   -        ``object`` or ``user``
object_id              -        int64 coadd object id (-1 for user positions)
name                   -        user position name ("" for objects)
ra, dec                deg      the position measured (ICRS)
visit, night, band     -        of the exposure
detector               -        detector id (-1: outside every detector)
mjd                    d        MJD of mid-exposure (wcs ``MJD-AVG``)
x, y                   px       0-based pixel position on the detector (NaN outside)
psf_flux, _err         nJy      aperture-corrected PSF flux and its error
ap_flux, _err          nJy      flux within ``aperture_radius`` px and its error
psf_flux_e, _err       e-       aperture-corrected PSF flux in electrons
zero_point, _err       mag      the detector's zero-point (e-/s) and its error
apcorr                 -        aperture correction applied
psf_fwhm               px       PSF model FWHM at the position
flags                  -        int32 bit mask (below)
flagged                bool     ``flags & FLAGS_UNUSABLE != 0``
=====================  =======  ===================================================

Flag bits (:data:`FLAG_BITS`): ``OUTSIDE`` (1) on no detector of the visit;
``EDGE`` (2) the PSF-fit circle or the aperture leaves the detector;
``MASKED_CENTER`` (4) a pixel of ``bad_mask_planes`` within 1 px (the 3x3
core) of the position; ``MASKED_NEAR`` (8) such a pixel within the PSF-fit
circle (informational: those pixels are left out of or interpolated in the
fit); ``SATURATED`` (16) a SAT pixel within the PSF-fit circle;
``NOT_CALIBRATED`` (32) no absolute zero-point; ``NO_PSF`` (64) no PSF model
(characterize failed on the detector); ``FIT_FAILED`` (128) the PSF or aperture
flux is not finite.  ``FLAGS_UNUSABLE`` = every bit except ``MASKED_NEAR``.

Schema metadata: ``visit``, ``night``, ``band``, ``mjd``, ``flag_bits``
(JSON), ``units`` (JSON), ``software_version``, ``git_revision``,
``config_hash``, ``config`` (JSON of the forced options), ``inputs``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import masks
from .errors import ConfigError, CorruptInput, SurveyredError

log = logging.getLogger("surveyred.forced")

#: Zero-point (AB mag) of 1 nJy: ``m = 31.4 - 2.5 log10(f / nJy)``.
NJY_ZERO_POINT = 31.4

FLAG_BITS: dict[str, int] = {
    "OUTSIDE": 1,
    "EDGE": 2,
    "MASKED_CENTER": 4,
    "MASKED_NEAR": 8,
    "SATURATED": 16,
    "NOT_CALIBRATED": 32,
    "NO_PSF": 64,
    "FIT_FAILED": 128,
}
OUTSIDE, EDGE, MASKED_CENTER, MASKED_NEAR, SATURATED, NOT_CALIBRATED, NO_PSF, FIT_FAILED = FLAG_BITS.values()
#: Flags that make a measurement unusable for a light curve.
FLAGS_UNUSABLE = sum(FLAG_BITS.values()) & ~MASKED_NEAR

UNITS = {"ra": "deg", "dec": "deg", "mjd": "d", "x": "pix", "y": "pix", "psf_flux": "nJy", "psf_flux_err": "nJy",
         "ap_flux": "nJy", "ap_flux_err": "nJy", "psf_flux_e": "electron", "psf_flux_e_err": "electron",
         "zero_point": "mag", "zero_point_err": "mag", "psf_fwhm": "pix"}

COLUMNS = ("kind", "object_id", "name", "ra", "dec", "visit", "night", "band", "detector", "mjd", "x", "y",
           "psf_flux", "psf_flux_err", "ap_flux", "ap_flux_err", "psf_flux_e", "psf_flux_e_err", "zero_point",
           "zero_point_err", "apcorr", "psf_fwhm", "flags", "flagged")


@dataclass(frozen=True)
class ForcedConfig:
    """``forced`` section of the configuration.

    Attributes
    ----------
    fit_radius : float
        PSF-fit radius in units of the PSF FWHM (characterize's ``psf.fit_radius``).
    aperture_radius : float
        Aperture radius (px) of ``ap_flux``.
    neighbours : int
        Jacobi iterations subtracting the other objects' PSFs (0: each alone).
    bad_mask_planes : tuple of str
        Planes that flag ``MASKED_CENTER`` / ``MASKED_NEAR``.
    """

    fit_radius: float = 1.5
    aperture_radius: float = 5.0
    neighbours: int = 2
    bad_mask_planes: tuple = ("BAD", "SAT", "CR", "INTRP", "NO_DATA", "SUSPECT")

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any] | None) -> ForcedConfig:
        doc = dict(doc or {})
        if "bad_mask_planes" in doc:
            doc["bad_mask_planes"] = tuple(doc["bad_mask_planes"])
        try:
            return cls(**doc).validate()
        except TypeError as exc:
            raise ConfigError(f"forced configuration: {exc}") from exc

    def validate(self) -> ForcedConfig:
        if not (self.fit_radius > 0 and math.isfinite(self.fit_radius)):
            raise ConfigError(f"forced.fit_radius must be > 0, got {self.fit_radius!r}")
        if not (self.aperture_radius > 0 and math.isfinite(self.aperture_radius)):
            raise ConfigError(f"forced.aperture_radius must be > 0, got {self.aperture_radius!r}")
        if int(self.neighbours) != self.neighbours or self.neighbours < 0:
            raise ConfigError(f"forced.neighbours must be an integer >= 0, got {self.neighbours!r}")
        try:
            masks.bits(*self.bad_mask_planes)
        except KeyError as exc:
            raise ConfigError(f"forced.bad_mask_planes: {exc.args[0]}") from None
        return self


# -- positions ------------------------------------------------------------------------------


def read_positions_csv(path: str | os.PathLike) -> pd.DataFrame:
    """User positions from a CSV file with columns ``name, ra, dec`` (deg; extra columns ignored).

    Raises
    ------
    CorruptInput
        Naming the file and the line: missing columns, an empty or duplicate
        name, a non-numeric or out-of-range coordinate, a short row.
    """
    path = Path(path)
    try:
        fh = open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115 - closed below (a BOM is skipped)
    except OSError as exc:
        raise CorruptInput(f"cannot read the positions file ({exc.strerror or exc})", path=path) from exc
    names, ras, decs = [], [], []
    with fh:
        try:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise CorruptInput("line 1: empty file; expected a header 'name,ra,dec'", path=path)
            cols = [h.strip().lower() for h in header]
            missing = [c for c in ("name", "ra", "dec") if c not in cols]
            if missing:
                raise CorruptInput(f"line 1: header {header!r} lacks column(s) {', '.join(missing)} "
                                   "(need name, ra, dec)", path=path)
            i_name, i_ra, i_dec = cols.index("name"), cols.index("ra"), cols.index("dec")
            seen: dict[str, int] = {}
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) <= max(i_name, i_ra, i_dec):
                    raise CorruptInput(f"line {line}: {len(row)} field(s), expected at least {len(header)}",
                                       path=path)
                name = row[i_name].strip()
                if not name:
                    raise CorruptInput(f"line {line}: empty name", path=path)
                if name in seen:
                    raise CorruptInput(f"line {line}: duplicate name {name!r} (first on line {seen[name]})",
                                       path=path)
                seen[name] = line
                try:
                    ra, dec = float(row[i_ra]), float(row[i_dec])
                except ValueError:
                    raise CorruptInput(f"line {line}: ra {row[i_ra]!r} / dec {row[i_dec]!r} are not numbers "
                                       "(degrees expected)", path=path) from None
                if not (math.isfinite(ra) and math.isfinite(dec) and -90.0 <= dec <= 90.0):
                    raise CorruptInput(f"line {line}: ({ra}, {dec}) is not a sky position in degrees",
                                       path=path)
                names.append(name)
                ras.append(ra % 360.0)
                decs.append(dec)
        except csv.Error as exc:
            raise CorruptInput(f"line {reader.line_num}: not valid CSV ({exc})", path=path) from exc
        except UnicodeDecodeError as exc:
            raise CorruptInput(f"not a UTF-8 text file ({exc.reason})", path=path) from exc
    return pd.DataFrame({"name": pd.array(names, dtype=object), "ra": np.array(ras, float),
                         "dec": np.array(decs, float)})


def read_objects(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """The inner objects (``inner`` true) of coadd catalogs: ``object_id, ra, dec``, sorted by id."""
    import pyarrow.parquet as pq

    parts = []
    for p in paths:
        try:
            t = pq.read_table(p, columns=None)
        except (OSError, ValueError) as exc:
            raise CorruptInput(f"not a readable object catalog ({exc})", path=p) from exc
        missing = [c for c in ("object_id", "ra", "dec", "inner") if c not in t.column_names]
        if missing:
            raise CorruptInput(f"object catalog lacks column(s) {', '.join(missing)}", path=p)
        df = t.select(["object_id", "ra", "dec", "inner"]).to_pandas()
        parts.append(df[df["inner"].to_numpy(bool)][["object_id", "ra", "dec"]])
    if not parts:
        return pd.DataFrame({"object_id": np.zeros(0, np.int64), "ra": np.zeros(0), "dec": np.zeros(0)})
    out = pd.concat(parts, ignore_index=True)
    dup = out["object_id"].duplicated()
    if dup.any():
        raise ConfigError(f"object id {int(out['object_id'][dup].iloc[0])} is inner in two catalogs "
                          f"(the same patch given twice?): {', '.join(map(str, paths))}")
    return out.sort_values("object_id", kind="stable").reset_index(drop=True)


# -- science (I/O free) ------------------------------------------------------------------------


@dataclass
class DetectorInputs:
    """Everything measured on one detector (arrays and header values)."""

    detector: int
    image: np.ndarray
    mask: np.ndarray
    variance: np.ndarray
    wcs: Any  # surveyred.astrometry.SipWcs
    psf: Any  # surveyred.psf.PsfModel or None
    exptime: float
    zero_point: float = float("nan")
    zero_point_err: float = float("nan")
    abscal: bool = False
    apcorr: float = 1.0
    bkg_mesh: int = 64
    bkg_filter: int = 3


def _footprint_or(mask, x, y, radius, chunk: int = 8192):
    """OR of the mask bits within ``radius`` px of each position (pixel centres), and whether
    the circle leaves the image (in chunks of positions: bounded memory)."""
    if len(x) > chunk:
        parts = [_footprint_or(mask, x[i:i + chunk], y[i:i + chunk], radius, chunk) for i in range(0, len(x), chunk)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    ny, nx = mask.shape
    h = int(math.ceil(radius))
    off = np.arange(-h, h + 1)
    ix = np.rint(x).astype(np.int64)[:, None] + off[None, :]
    iy = np.rint(y).astype(np.int64)[:, None] + off[None, :]
    inside = ((iy >= 0) & (iy < ny))[:, :, None] & ((ix >= 0) & (ix < nx))[:, None, :]
    near = ((ix[:, None, :] - x[:, None, None]) ** 2 + (iy[:, :, None] - y[:, None, None]) ** 2) <= radius ** 2
    vals = mask[np.clip(iy, 0, ny - 1)[:, :, None], np.clip(ix, 0, nx - 1)[:, None, :]]
    bits = np.bitwise_or.reduce(np.where(near & inside, vals, 0).reshape(len(x), -1), axis=1)
    leaves = (near & ~inside).reshape(len(x), -1).any(axis=1)
    return bits, leaves


def measure_detector(inp: DetectorInputs, x, y, *, groups: Sequence[np.ndarray],
                     config: ForcedConfig = ForcedConfig()) -> dict[str, np.ndarray]:
    """Forced PSF and aperture photometry at pixel positions ``(x, y)`` of one detector.

    ``groups`` are index arrays into ``x``: each group is fitted together
    (with ``config.neighbours`` iterations of neighbour subtraction); every
    position must be in one group.  Returns columns ``psf_flux_e``,
    ``psf_flux_e_err``, ``ap_flux_e``, ``ap_flux_e_err``, ``psf_fwhm``, ``flags``.
    """
    import sep

    from .characterize import BackgroundConfig, estimate_background, psf_photometry

    x = np.asarray(x, float)
    y = np.asarray(y, float)
    n = len(x)
    out = {k: np.full(n, np.nan) for k in ("psf_flux_e", "psf_flux_e_err", "ap_flux_e", "ap_flux_e_err",
                                           "psf_fwhm")}
    flags = np.zeros(n, np.int32)
    if n == 0:
        out["flags"] = flags
        return out
    image = np.ascontiguousarray(inp.image, np.float32)
    mask = np.ascontiguousarray(inp.mask, masks.MASK_DTYPE)
    variance = np.ascontiguousarray(inp.variance, np.float32)
    bkg = estimate_background(image, mask, cfg=BackgroundConfig(mesh=inp.bkg_mesh, filter=inp.bkg_filter))
    sub = image - bkg.back
    finite = np.isfinite(sub) & np.isfinite(variance) & (variance >= 0)
    if not finite.all():
        sub = np.where(finite, sub, np.float32(0))
        variance = np.where(finite, variance, np.float32(0)).astype(np.float32)
        mask = mask | np.where(finite, 0, masks.NO_DATA).astype(masks.MASK_DTYPE)
    bad = masks.bits(*config.bad_mask_planes)
    if inp.psf is not None:
        fwhm = np.asarray(inp.psf.fwhm(x, y), float) * np.ones(n)
    else:
        fwhm = np.full(n, float("nan"))
        flags |= NO_PSF
    out["psf_fwhm"] = fwhm
    fit_r = config.fit_radius * np.where(np.isfinite(fwhm), fwhm, 3.0)
    near_bits = np.zeros(n, np.int64)
    leaves = np.zeros(n, bool)
    fit_q = np.ceil(fit_r * 20.0) / 20.0  # radii up to 0.05 px larger: few distinct values to loop over
    for r in np.unique(fit_q):
        k = np.nonzero(fit_q == r)[0]
        b, lv = _footprint_or(mask, x[k], y[k], float(r))
        near_bits[k], leaves[k] = b, lv
    core_bits, _ = _footprint_or(mask, x, y, 1.0)
    _, ap_leaves = _footprint_or(mask, x, y, config.aperture_radius)
    flags |= np.where(leaves | ap_leaves, EDGE, 0).astype(np.int32)
    flags |= np.where((core_bits & bad) != 0, MASKED_CENTER, 0).astype(np.int32)
    flags |= np.where((near_bits & bad) != 0, MASKED_NEAR, 0).astype(np.int32)
    flags |= np.where((near_bits & masks.SAT) != 0, SATURATED, 0).astype(np.int32)
    if inp.psf is not None:
        for idx in groups:
            idx = np.asarray(idx, np.int64)
            if len(idx) == 0:
                continue
            f, e = psf_photometry(sub, variance, mask, inp.psf, x[idx], y[idx], radius=config.fit_radius,
                                  neighbours=int(config.neighbours) if len(idx) > 1 else 0,
                                  exclude=(flags[idx] & SATURATED) != 0)  # never subtract saturated fits
            out["psf_flux_e"][idx] = inp.apcorr * f
            out["psf_flux_e_err"][idx] = inp.apcorr * e
    af, ae, _ = sep.sum_circle(sub, x, y, config.aperture_radius, var=variance, subpix=5)
    out["ap_flux_e"], out["ap_flux_e_err"] = np.asarray(af, float), np.asarray(ae, float)
    failed = ~np.isfinite(out["ap_flux_e"]) | ~np.isfinite(out["ap_flux_e_err"])
    if inp.psf is not None:
        failed |= ~np.isfinite(out["psf_flux_e"]) | ~np.isfinite(out["psf_flux_e_err"])
    flags |= np.where(failed, FIT_FAILED, 0).astype(np.int32)
    if not (inp.abscal and math.isfinite(inp.zero_point)):
        flags |= NOT_CALIBRATED
    out["flags"] = flags
    return out


def njy_scale(zero_point: float, exptime: float) -> float:
    """nJy per electron: ``10**(-0.4 (ZP - 31.4)) / EXPTIME`` (NaN when not calibrated)."""
    if not (math.isfinite(zero_point) and exptime > 0):
        return float("nan")
    return 10.0 ** (-0.4 * (zero_point - NJY_ZERO_POINT)) / exptime


def forced_visit(detectors: Sequence[DetectorInputs], objects: pd.DataFrame, users: pd.DataFrame, *,
                 visit: str, night: str, band: str, mjd: float, config: ForcedConfig = ForcedConfig(),
                 threads: int = 1) -> pd.DataFrame:
    """Forced photometry of one visit (see the module docstring); returns the table (COLUMNS order)."""
    kinds = np.array(["object"] * len(objects) + ["user"] * len(users), dtype=object)
    ids = np.concatenate([objects["object_id"].to_numpy(np.int64), np.full(len(users), -1, np.int64)])
    names = np.array([""] * len(objects) + [str(s) for s in users["name"]], dtype=object)
    ra = np.concatenate([objects["ra"].to_numpy(float), users["ra"].to_numpy(float)])
    dec = np.concatenate([objects["dec"].to_numpy(float), users["dec"].to_numpy(float)])
    is_user = kinds == "user"
    claimed = np.zeros(len(ra), bool)
    rows = []

    def one(inp: DetectorInputs):
        ny, nx = inp.image.shape
        with np.errstate(all="ignore"):
            px, py = inp.wcs.sky_to_pixel(ra, dec)
        px, py = np.asarray(px, float), np.asarray(py, float)
        on = np.isfinite(px) & np.isfinite(py) & (px >= -0.5) & (px < nx - 0.5) & (py >= -0.5) & (py < ny - 0.5)
        # the TAN projection folds at 90 deg from the tangent point: check the round trip
        k = np.nonzero(on)[0]
        if len(k):
            r2, d2 = inp.wcs.pixel_to_sky(px[k], py[k])
            dra = (np.asarray(r2) - ra[k] + 180.0) % 360.0 - 180.0
            off = np.hypot(dra * np.cos(np.radians(dec[k])), np.asarray(d2) - dec[k]) * 3600.0
            on[k[off > 1.0]] = False
        k = np.nonzero(on)[0]
        groups = [np.nonzero(~is_user[k])[0]] + [np.array([j]) for j in np.nonzero(is_user[k])[0]]
        res = measure_detector(inp, px[k], py[k], groups=groups, config=config)
        return inp, k, px[k], py[k], res

    dets = sorted(detectors, key=lambda d: d.detector)
    if threads > 1 and len(dets) > 1:
        with ThreadPoolExecutor(max_workers=int(threads)) as pool:
            results = list(pool.map(one, dets))
    else:
        results = [one(d) for d in dets]
    for inp, k, px, py, res in results:
        keep = ~claimed[k]  # a position on two detectors (overlapping WCS edges): the lower id wins
        k, px, py = k[keep], px[keep], py[keep]
        res = {c: v[keep] for c, v in res.items()}
        claimed[k] = True
        s = njy_scale(inp.zero_point, inp.exptime) if inp.abscal else float("nan")
        rows.append(pd.DataFrame({
            "kind": kinds[k], "object_id": ids[k], "name": names[k], "ra": ra[k], "dec": dec[k],
            "detector": np.full(len(k), inp.detector, np.int32), "x": px, "y": py,
            "psf_flux": res["psf_flux_e"] * s, "psf_flux_err": res["psf_flux_e_err"] * s,
            "ap_flux": res["ap_flux_e"] * s, "ap_flux_err": res["ap_flux_e_err"] * s,
            "psf_flux_e": res["psf_flux_e"], "psf_flux_e_err": res["psf_flux_e_err"],
            "zero_point": np.full(len(k), inp.zero_point), "zero_point_err": np.full(len(k), inp.zero_point_err),
            "apcorr": np.full(len(k), inp.apcorr), "psf_fwhm": res["psf_fwhm"], "flags": res["flags"],
        }))
    out_user = np.nonzero(is_user & ~claimed)[0]
    if len(out_user):
        nanv = np.full(len(out_user), np.nan)
        rows.append(pd.DataFrame({
            "kind": kinds[out_user], "object_id": ids[out_user], "name": names[out_user], "ra": ra[out_user],
            "dec": dec[out_user], "detector": np.full(len(out_user), -1, np.int32), "x": nanv, "y": nanv,
            **{c: nanv for c in ("psf_flux", "psf_flux_err", "ap_flux", "ap_flux_err", "psf_flux_e",
                                 "psf_flux_e_err", "zero_point", "zero_point_err", "apcorr", "psf_fwhm")},
            "flags": np.full(len(out_user), OUTSIDE, np.int32)}))
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame({c: [] for c in COLUMNS})
    table["visit"] = str(visit)
    table["night"] = str(night)
    table["band"] = str(band)
    table["mjd"] = float(mjd)
    table["flags"] = table["flags"].astype(np.int32)
    table["flagged"] = (table["flags"].to_numpy() & FLAGS_UNUSABLE) != 0
    table["object_id"] = table["object_id"].astype(np.int64)
    table["detector"] = table["detector"].astype(np.int32)
    order = np.lexsort((table["name"].astype(str).to_numpy(), table["object_id"].to_numpy(),
                        (table["kind"] == "user").to_numpy()))
    return table.iloc[order][list(COLUMNS)].reset_index(drop=True)


# -- I/O --------------------------------------------------------------------------------------


def _header_detector(h, path) -> int:
    if "DETECTOR" not in h:
        raise CorruptInput("header has no DETECTOR keyword", path=path)
    return int(h["DETECTOR"])


def load_detectors(calexps: Sequence[str], wcs_paths: Sequence[str], psf_paths: Sequence[str]):
    """Read and match (by header ``DETECTOR``) the calexps, wcs products and psf products of a visit.

    Returns ``(list of DetectorInputs, visit, night, band, mjd)``.
    """
    from . import fitsio
    from .astrometry import SipWcs
    from .psf import PsfModel

    wcs_h = {}
    for p in wcs_paths:
        h = fitsio.read_headers(p)[0]
        wcs_h[_header_detector(h, p)] = (p, h)
    psf_by = {}
    for p in psf_paths:
        with fitsio.open_fits(p) as hdul:
            h = hdul[0].header.copy()
            model = PsfModel.from_hdus(hdul) if "PSF" in hdul else None
        psf_by[_header_detector(h, p)] = (p, h, model)
    out = []
    visits, nights, bands, mjds = set(), set(), set(), []
    for p in calexps:
        image, mask, variance, prim, _ = fitsio.read_exposure(p)
        det = _header_detector(prim, p)
        if det not in wcs_h:
            raise ConfigError(f"{p}: no wcs product for detector {det} among --wcs")
        if det not in psf_by:
            raise ConfigError(f"{p}: no psf product for detector {det} among --psf")
        wp, wh = wcs_h[det]
        pp, ph, model = psf_by[det]
        visits.add(str(prim.get("VISIT", "")))
        nights.add(str(prim.get("NIGHT", "")))
        bands.add(str(prim.get("BAND", "")))
        exptime = float(prim.get("EXPTIME", float("nan")))
        if not exptime > 0:
            raise CorruptInput(f"EXPTIME {prim.get('EXPTIME')!r} is not a positive number", path=p)
        if "MJD-AVG" in wh and isinstance(wh["MJD-AVG"], (int, float)):
            mjds.append(float(wh["MJD-AVG"]))
        else:
            from astropy.time import Time

            try:
                mjds.append(float(Time(str(prim["DATE-OBS"]), scale="utc").mjd) + 0.5 * exptime / 86400.0)
            except (KeyError, ValueError) as exc:
                raise CorruptInput("neither the wcs product's MJD-AVG nor a DATE-OBS", path=p) from exc
        try:
            wcs = SipWcs.from_header(wh)
        except SurveyredError as exc:  # e.g. calibrate failed without a header WCS: nothing can be located
            log.warning("%s: detector %d skipped: no celestial WCS (%s); its positions count as OUTSIDE", wp,
                        det, exc.one_line())
            continue
        zp = wh.get("ZP")
        zp = float(zp) if isinstance(zp, (int, float)) else float("nan")
        zpe = wh.get("ZPERR")
        zpe = float(zpe) if isinstance(zpe, (int, float)) else float("nan")
        abscal = bool(wh.get("ABSCAL", False)) and str(wh.get("STATUS", "ok")).strip() == "ok"
        ac = ph.get("APCORR")
        apcorr = float(ac) if isinstance(ac, (int, float)) and math.isfinite(float(ac)) else 1.0
        if str(ph.get("STATUS", "ok")).strip() != "ok":
            model = None
        if not abscal:
            log.warning("%s: detector %d is not absolutely calibrated (STATUS=%s): fluxes in nJy are NaN, "
                        "flagged NOT_CALIBRATED", wp, det, str(wh.get("STATUS", "")).strip())
        if model is None:
            log.warning("%s: detector %d has no PSF model: PSF fluxes NaN, flagged NO_PSF", pp, det)
        out.append(DetectorInputs(det, image, mask, variance, wcs, model, exptime, zp, zpe, abscal, apcorr,
                                  int(ph.get("BKGMESH", 64)), int(ph.get("BKGFILT", 3))))
    for what, vals in (("VISIT", visits), ("BAND", bands)):
        if len(vals) > 1:
            raise ConfigError(f"the calexps are of more than one {what.lower()}: {sorted(vals)} "
                              f"(forced-phot measures one visit)")
    dets = [d.detector for d in out]
    if len(set(dets)) != len(dets):
        raise ConfigError(f"a detector appears twice among the calexps: {sorted(dets)}")
    return out, visits.pop(), min(nights), bands.pop(), float(np.median(mjds))


def write_forced(table: pd.DataFrame, path: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    from .fitsio import write_parquet

    write_parquet(table, path, meta)


def run_forced(calexps, wcs_paths, psf_paths, object_paths, *, output, positions=None,
               config: ForcedConfig = ForcedConfig(), threads: int = 1, config_doc=None) -> pd.DataFrame:
    """Read, measure and write one visit's forced photometry (the command's body)."""
    from . import __version__
    from .provenance import config_hash, git_revision

    users = read_positions_csv(positions) if positions else pd.DataFrame({"name": [], "ra": [], "dec": []})
    objects = read_objects(object_paths)
    dets, visit, night, band, mjd = load_detectors(calexps, wcs_paths, psf_paths)
    log.info("visit %s (%s, band %s): %d detectors, %d inner objects, %d user positions", visit, night, band,
             len(dets), len(objects), len(users))
    table = forced_visit(dets, objects, users, visit=visit, night=night, band=band, mjd=mjd, config=config,
                         threads=threads)
    inputs = [Path(p).name for p in (*calexps, *wcs_paths, *psf_paths, *object_paths)]
    if positions:
        inputs.append(Path(positions).name)
    meta = dict(visit=visit, night=night, band=band, mjd=repr(mjd), flag_bits=json.dumps(FLAG_BITS),
                flags_unusable=str(FLAGS_UNUSABLE), units=json.dumps(UNITS, sort_keys=True),
                software_version=__version__, git_revision=git_revision(), config_hash=config_hash(config_doc),
                config=json.dumps(asdict(config), sort_keys=True, default=str), inputs=",".join(inputs),
                step="forced-phot")
    write_forced(table, output, meta)
    nflag = int(table["flagged"].sum())
    log.info("visit %s: %d measurements (%d objects, %d user rows), %d flagged -> %s", visit, len(table),
             int((table["kind"] == "object").sum()), int((table["kind"] == "user").sum()), nflag, output)
    return table


def main(argv: list[str] | None = None) -> int:
    from .runtime import common_arguments, json_arg, run, set_threads, setup_logging

    p = argparse.ArgumentParser(prog="surveyred forced-phot", description=(
        "Forced PSF and aperture photometry of one visit (all its detectors) at the inner objects of coadd "
        "catalogs and at user positions; fluxes in nJy."))
    p.add_argument("--calexp", nargs="+", required=True, help="calexp/<night>/<visit>/<visit>_<det>.fits")
    p.add_argument("--wcs", nargs="+", required=True, help="wcs products (fitted TAN-SIP, ZP), one per detector")
    p.add_argument("--psf", nargs="+", required=True, help="psf products, one per detector")
    p.add_argument("--objects", nargs="*", default=[], help="coadd object catalogs (inner objects are measured)")
    p.add_argument("--positions", default=None, help="CSV with columns name, ra, dec (deg); one row per visit "
                                                     "for each, flagged when outside")
    p.add_argument("--output", required=True, help="forced/<night>/<visit>.parquet")
    p.add_argument("--config-json", default=None, help='{"forced": {...}} as JSON')
    common_arguments(p)
    args = p.parse_args(argv)
    setup_logging(args.log)

    def body():
        set_threads(args.threads)
        doc = json_arg(args.config_json)
        cfg = ForcedConfig.from_dict(doc.get("forced"))
        run_forced(args.calexp, args.wcs, args.psf, args.objects, output=args.output, positions=args.positions,
                   config=cfg, threads=args.threads, config_doc=doc)

    return run(body, what=f"forced-phot of {len(args.calexp)} calexp(s)")
