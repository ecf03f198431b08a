"""Reference catalogs: a local HEALPix-sharded store, readable offline.

Store layout
------------
A *store* is a directory holding one sub-directory per catalog::

    <store>/<name>/manifest.yaml
    <store>/<name>/hpx<order>_<pixel>.parquet     one shard per HEALPix pixel

Shards are the pixels of a **nested** HEALPix grid of order ``order``
(``nside = 2**order``, ICRS longitude/latitude = RA/Dec; order 7 gives pixels
of about 0.46 deg) computed with :mod:`astropy_healpix`.  A star belongs to the
shard of its catalog position (at the catalog's epoch).  Every shard has the
columns

==========================  ==============================================
``id``                      int64, the source catalog's identifier
``ra``, ``dec``             float64, deg, ICRS, at ``epoch``
``ra_err``, ``dec_err``     float64, mas (``ra_err`` includes cos dec)
``pm_ra``, ``pm_dec``       float64, mas/yr (``pm_ra`` includes cos dec); 0 when unknown
``epoch``                   float64, Julian year of ``ra``/``dec``
``<band>_mag``              float64, magnitude in ``<band>`` (NaN when absent)
``<band>_mag_err``          float64, its error (mag)
==========================  ==============================================

``manifest.yaml`` records ``name``, ``scheme: healpix-nested``, ``order``,
``bands``, ``source`` (``gaia_dr3``, ``ps1``, ``sdss``, ``sim``, ``ingest``),
``shards`` (the pixels present), ``complete`` (pixels known to hold every star
of the source catalog: fully inside a fetched region, or every pixel for an
ingested table) and ``regions`` (the cones fetched, ``[ra, dec, radius]``).
:func:`fetch` only queries a service when the requested cone is not covered by
complete shards, so a second fetch of the same region makes no query.

Which catalog serves what is configuration: ``refcat.astrometric`` names the
catalog for positions (Gaia DR3 in production, ``sim`` for the simulator) and
``refcat.photometric`` the one for fluxes (PS1 or SDSS); the instrument file
maps each physical filter to its ``refcat_band``.

Functions: :func:`load_region` (cone with proper motions applied to an
epoch), :func:`write_store` / :func:`ingest_table` (tables -> store),
:func:`fetch` (astroquery -> store), converters from the services' own column
names (:func:`from_gaia`, :func:`from_ps1`, :func:`from_sdss`), and
:func:`main` (``surveyred refcat fetch|ingest``).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pandas as pd
import yaml

from .errors import ConfigError, CorruptInput
from .fitsio import atomic_path
from .runtime import common_arguments, run, setup_logging

log = logging.getLogger("surveyred.refcat")

DEFAULT_ORDER = 7
BASE_COLUMNS = ("id", "ra", "dec", "ra_err", "dec_err", "pm_ra", "pm_dec", "epoch")
MAS_PER_DEG = 3.6e6
CATALOGS = ("gaia_dr3", "ps1", "sdss")


# -- geometry -------------------------------------------------------------------------


def _hpx(order: int):
    from astropy_healpix import HEALPix

    return HEALPix(nside=2 ** int(order), order="nested")


def healpix_pixels(ra, dec, order: int) -> np.ndarray:
    """Nested HEALPix pixel index (int64) of each position (deg)."""
    import astropy.units as u

    if np.size(ra) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(_hpx(order).lonlat_to_healpix(np.asarray(ra, float) * u.deg,
                                                    np.asarray(dec, float) * u.deg), dtype=np.int64)


def cone_pixels(ra: float, dec: float, radius_deg: float, order: int) -> np.ndarray:
    """Pixels that intersect the cone (astropy_healpix's inclusive cone search)."""
    import astropy.units as u

    pix = _hpx(order).cone_search_lonlat(ra * u.deg, dec * u.deg, radius_deg * u.deg)
    return np.unique(np.asarray(pix, dtype=np.int64))


def angular_distance(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Great-circle distance (deg), haversine formula."""
    r1, d1, r2, d2 = (np.radians(np.asarray(v, float)) for v in (ra1, dec1, ra2, dec2))
    h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1))))


def pixels_inside(ra: float, dec: float, radius_deg: float, order: int) -> list[int]:
    """Pixels lying entirely inside the cone (all boundary samples within it)."""
    pix = cone_pixels(ra, dec, radius_deg, order)
    if len(pix) == 0:
        return []
    lon, lat = _hpx(order).boundaries_lonlat(pix, step=4)
    d = angular_distance(ra, dec, lon.to_value("deg"), lat.to_value("deg"))
    return [int(p) for p, row in zip(pix, d) if np.all(row <= radius_deg)]


# -- proper motions -------------------------------------------------------------------


def apply_proper_motion(table: pd.DataFrame, epoch: float) -> pd.DataFrame:
    """A copy of ``table`` with ``ra``/``dec`` moved to ``epoch`` (Julian years).

    Notes
    -----
    Linear propagation in the tangent plane, exact enough for decades at the
    mas level away from the poles::

        dt   = epoch - epoch_i
        dec  = dec_i + pm_dec dt / 3.6e6
        ra   = ra_i + pm_ra dt / 3.6e6 / cos(dec_i)

    (``pm_ra`` includes cos dec, mas/yr; unknown motions count as 0.)  The
    original values are kept as ``ra_cat``/``dec_cat``/``epoch_cat`` and
    ``epoch`` becomes the requested epoch.
    """
    out = table.copy()
    if len(out) == 0:
        for c in ("ra_cat", "dec_cat", "epoch_cat"):
            out[c] = pd.Series(dtype=float)
        return out
    ep = out["epoch"].to_numpy(float)
    dt = np.where(np.isfinite(ep), float(epoch) - ep, 0.0)
    pmr = np.nan_to_num(out["pm_ra"].to_numpy(float))
    pmd = np.nan_to_num(out["pm_dec"].to_numpy(float))
    dec0 = out["dec"].to_numpy(float)
    out["ra_cat"], out["dec_cat"], out["epoch_cat"] = out["ra"].to_numpy(float), dec0, ep
    out["dec"] = dec0 + pmd * dt / MAS_PER_DEG
    out["ra"] = np.mod(out["ra_cat"].to_numpy() + pmr * dt / MAS_PER_DEG / np.cos(np.radians(dec0)), 360.0)
    out["epoch"] = float(epoch)
    return out


# -- the store ----------------------------------------------------------------------


def _manifest_path(catdir: Path) -> Path:
    return Path(catdir) / "manifest.yaml"


def read_manifest(catdir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a catalog directory ``<store>/<name>``.

    Raises
    ------
    ConfigError
        When the directory holds no manifest (not a catalog of a store).
    """
    path = _manifest_path(Path(catdir))
    if not path.exists():
        raise ConfigError(f"not a reference catalog (no manifest.yaml): {catdir}")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CorruptInput(f"manifest unreadable ({exc})", path=path) from exc
    doc.setdefault("order", DEFAULT_ORDER)
    doc.setdefault("shards", [])
    doc.setdefault("complete", [])
    doc.setdefault("regions", [])
    doc.setdefault("bands", [])
    return doc


def _write_manifest(catdir: Path, doc: Mapping[str, Any]) -> None:
    with atomic_path(_manifest_path(catdir)) as tmp:
        tmp.write_text(yaml.safe_dump(dict(doc), sort_keys=False))


def shard_path(catdir: str | os.PathLike, order: int, pixel: int) -> Path:
    return Path(catdir) / f"hpx{int(order)}_{int(pixel)}.parquet"


def normalise(table: pd.DataFrame, bands: Iterable[str] = ()) -> pd.DataFrame:
    """Columns in store order and types; missing base columns filled (errors 0, pm 0)."""
    t = pd.DataFrame(table).reset_index(drop=True)
    out = pd.DataFrame({"id": t["id"].to_numpy(np.int64)})
    for c in BASE_COLUMNS[1:]:
        if c in t:
            out[c] = t[c].to_numpy(float)
        elif c == "epoch":
            raise ConfigError("reference table needs an 'epoch' column (Julian year)")
        else:
            out[c] = 0.0
    bands = list(bands) or sorted({c[:-4] for c in t.columns if c.endswith("_mag")})
    for b in bands:
        out[f"{b}_mag"] = t[f"{b}_mag"].to_numpy(float) if f"{b}_mag" in t else np.nan
        out[f"{b}_mag_err"] = t[f"{b}_mag_err"].to_numpy(float) if f"{b}_mag_err" in t else np.nan
    return out


def write_store(table: pd.DataFrame, store: str | os.PathLike, name: str, *, order: int = DEFAULT_ORDER,
                source: str = "ingest", complete: bool | Iterable[int] = True,
                region: tuple[float, float, float] | None = None) -> Path:
    """Add ``table`` (store columns, see module docstring) to catalog ``name``.

    Rows are merged into existing shards (a star already there, same ``id``,
    is replaced).  ``complete=True`` marks every pixel touched as complete;
    an iterable marks those pixels; ``region`` is recorded in the manifest.
    Returns the catalog directory.
    """
    catdir = Path(store) / name
    catdir.mkdir(parents=True, exist_ok=True)
    try:
        doc = read_manifest(catdir)
        if int(doc["order"]) != int(order):
            order = int(doc["order"])  # an existing catalog keeps its order
    except ConfigError:
        doc = {"name": name, "scheme": "healpix-nested", "order": int(order), "source": source,
               "bands": [], "shards": [], "complete": [], "regions": []}
    t = normalise(table)
    bands = sorted(set(doc["bands"]) | {c[:-4] for c in t.columns if c.endswith("_mag")})
    t = normalise(t, bands)
    pix = healpix_pixels(t["ra"], t["dec"], order)
    touched = set(int(p) for p in np.unique(pix))
    for p in sorted(touched):
        part = t[pix == p]
        path = shard_path(catdir, order, p)
        if path.exists():
            old = normalise(pd.read_parquet(path), bands)
            part = pd.concat([old[~old["id"].isin(part["id"])], part], ignore_index=True)
        part = part.sort_values("id", kind="stable").reset_index(drop=True)
        with atomic_path(path) as tmp:
            part.to_parquet(tmp, index=False, engine="pyarrow")
    if complete is True:
        new_complete = touched
    elif complete is False:
        new_complete = set()
    else:
        new_complete = {int(p) for p in complete}
    doc["bands"] = bands
    doc["shards"] = sorted(set(int(s) for s in doc["shards"]) | touched)
    doc["complete"] = sorted(set(int(s) for s in doc["complete"]) | new_complete)
    if region is not None:
        doc["regions"] = list(doc["regions"]) + [[float(v) for v in region]]
    _write_manifest(catdir, doc)
    return catdir


def load_region(store: str | os.PathLike, ra: float, dec: float, radius_deg: float, *,
                epoch: float | None = None, name: str | None = None) -> pd.DataFrame:
    """Reference stars within ``radius_deg`` of ``(ra, dec)`` from a local catalog.

    Parameters
    ----------
    store : path
        The catalog directory ``<store>/<name>`` (or the store, with ``name``).
    ra, dec, radius_deg : float
        Cone (deg).  Stars are selected on their position at ``epoch``.
    epoch : float, optional
        Julian year; when given, proper motions are applied
        (:func:`apply_proper_motion`).

    Returns
    -------
    pandas.DataFrame
        Store columns (empty when no shard covers the cone), sorted by id.
    """
    catdir = Path(store) / name if name else Path(store)
    doc = read_manifest(catdir)
    order = int(doc["order"])
    present = set(int(s) for s in doc["shards"])
    parts = []
    # pad the cone by the largest plausible proper-motion displacement (1 arcsec)
    for p in cone_pixels(ra, dec, radius_deg + 1.0 / 3600.0, order):
        if int(p) in present:
            path = shard_path(catdir, order, int(p))
            try:
                parts.append(pd.read_parquet(path))
            except (OSError, ValueError) as exc:
                raise CorruptInput(f"reference shard unreadable ({exc})", path=path) from exc
    bands = doc["bands"]
    if parts:
        t = normalise(pd.concat(parts, ignore_index=True), bands)
    else:
        t = normalise(pd.DataFrame({c: pd.Series(dtype=float) for c in BASE_COLUMNS}), bands)
    if epoch is not None:
        t = apply_proper_motion(t, epoch)
    if len(t):
        t = t[angular_distance(ra, dec, t["ra"], t["dec"]) <= radius_deg]
    return t.sort_values("id", kind="stable").reset_index(drop=True)


def covered(catdir: str | os.PathLike, ra: float, dec: float, radius_deg: float) -> bool:
    """True when every pixel meeting the cone is complete, or a fetched region contains it."""
    try:
        doc = read_manifest(catdir)
    except ConfigError:
        return False
    for r0, d0, rad in doc["regions"]:
        if float(angular_distance(ra, dec, r0, d0)) + radius_deg <= rad + 1e-12:
            return True
    need = set(int(p) for p in cone_pixels(ra, dec, radius_deg, int(doc["order"])))
    return need <= set(int(p) for p in doc["complete"])


# -- converters from the services' own formats ---------------------------------------


def _col(t, *names, default=np.nan) -> np.ndarray:
    for n in names:
        if n in t.columns:
            v = t[n]
            if hasattr(v, "filled"):
                v = v.filled(np.nan) if v.dtype.kind == "f" else v.filled(0)
            return np.asarray(v, dtype=float)
    return np.full(len(t), default, dtype=float)


def _as_frame(table) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame):
        return table
    from astropy.table import Table

    t = Table(table, masked=True)
    data = {}
    for name in t.colnames:
        col = t[name]
        if col.dtype.kind in "fc":
            data[name] = np.asarray(col.filled(np.nan) if hasattr(col, "filled") else col, dtype=float)
        elif col.dtype.kind in "iu":
            data[name] = np.asarray(col.filled(0) if hasattr(col, "filled") else col)
        else:
            data[name] = np.asarray(col.filled("") if hasattr(col, "filled") else col).astype(str)
    return pd.DataFrame(data)


def _mag_err_from_snr(snr: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return 2.5 / math.log(10) / snr


def from_gaia(table) -> pd.DataFrame:
    """Gaia DR3 ``gaia_source`` rows (its column names) -> store columns.

    ``source_id, ra, dec, ra_error, dec_error (mas), pmra, pmdec (mas/yr),
    ref_epoch, phot_{g,bp,rp}_mean_mag`` and, when present,
    ``phot_*_mean_flux_over_error`` (mag errors ``1.0857 / (S/N)``).  Bands
    are named ``G``, ``BP``, ``RP``.
    """
    t = _as_frame(table)
    t.columns = [c.lower() for c in t.columns]
    out = pd.DataFrame({
        "id": np.asarray(t["source_id"], dtype=np.int64),
        "ra": _col(t, "ra"), "dec": _col(t, "dec"),
        "ra_err": _col(t, "ra_error", default=0.0), "dec_err": _col(t, "dec_error", default=0.0),
        "pm_ra": np.nan_to_num(_col(t, "pmra", default=0.0)),
        "pm_dec": np.nan_to_num(_col(t, "pmdec", default=0.0)),
        "epoch": _col(t, "ref_epoch", default=2016.0),
    })
    for band, key in (("G", "g"), ("BP", "bp"), ("RP", "rp")):
        out[f"{band}_mag"] = _col(t, f"phot_{key}_mean_mag")
        out[f"{band}_mag_err"] = _mag_err_from_snr(_col(t, f"phot_{key}_mean_flux_over_error"))
    return out


def from_ps1(table) -> pd.DataFrame:
    """Pan-STARRS1 DR2 ``mean`` rows -> store columns.

    ``objID, raMean, decMean, raMeanErr, decMeanErr`` (arcsec), ``epochMean``
    (MJD) and ``{g,r,i,z,y}MeanPSFMag[Err]``; -999 means missing (NaN here).
    PS1 has no proper motions (0).
    """
    t = _as_frame(table)

    def clean(v):
        return np.where(v <= -900, np.nan, v)

    epoch_mjd = clean(_col(t, "epochMean", default=np.nan))
    epoch = np.where(np.isfinite(epoch_mjd), 2000.0 + (epoch_mjd - 51544.5) / 365.25, 2012.0)
    out = pd.DataFrame({
        "id": np.asarray(t["objID"], dtype=np.int64),
        "ra": _col(t, "raMean"), "dec": _col(t, "decMean"),
        "ra_err": np.nan_to_num(clean(_col(t, "raMeanErr", default=0.0))) * 1000.0,
        "dec_err": np.nan_to_num(clean(_col(t, "decMeanErr", default=0.0))) * 1000.0,
        "pm_ra": 0.0, "pm_dec": 0.0, "epoch": epoch,
    })
    for b in "grizy":
        out[f"{b}_mag"] = clean(_col(t, f"{b}MeanPSFMag"))
        out[f"{b}_mag_err"] = clean(_col(t, f"{b}MeanPSFMagErr"))
    return out[np.isfinite(out["ra"]) & np.isfinite(out["dec"])].reset_index(drop=True)


SDSS_FIELDS = ["objID", "ra", "dec", "raErr", "decErr"] + [f"psfMag_{b}" for b in "ugriz"] + \
    [f"psfMagErr_{b}" for b in "ugriz"]


def from_sdss(table, *, epoch: float = 2000.0) -> pd.DataFrame:
    """SDSS ``PhotoObj`` rows (``objID, ra, dec, raErr, decErr`` arcsec,
    ``psfMag_<b>``, ``psfMagErr_<b>``) -> store columns; no proper motions,
    ``epoch`` (default 2000.0) for every row."""
    t = _as_frame(table)
    out = pd.DataFrame({
        "id": np.asarray(t["objID"], dtype=np.int64),
        "ra": _col(t, "ra"), "dec": _col(t, "dec"),
        "ra_err": _col(t, "raErr", default=0.0) * 1000.0, "dec_err": _col(t, "decErr", default=0.0) * 1000.0,
        "pm_ra": 0.0, "pm_dec": 0.0, "epoch": float(epoch),
    })
    for b in "ugriz":
        m = _col(t, f"psfMag_{b}")
        out[f"{b}_mag"] = np.where(m <= -900, np.nan, m)
        out[f"{b}_mag_err"] = _col(t, f"psfMagErr_{b}")
    return out.drop_duplicates("id").reset_index(drop=True)


def from_simulator(table: pd.DataFrame) -> pd.DataFrame:
    """The simulator's ``truth/refcat.parquet`` (``id, ra, dec, u..y, pm_ra, pm_dec, epoch``)
    -> store columns with exact (zero-error) positions and magnitudes."""
    t = pd.DataFrame(table)
    out = pd.DataFrame({"id": t["id"].to_numpy(np.int64), "ra": t["ra"].to_numpy(float),
                        "dec": t["dec"].to_numpy(float), "ra_err": 0.0, "dec_err": 0.0,
                        "pm_ra": t["pm_ra"].to_numpy(float), "pm_dec": t["pm_dec"].to_numpy(float),
                        "epoch": t["epoch"].to_numpy(float)})
    for b in "ugrizy":
        if b in t:
            out[f"{b}_mag"] = t[b].to_numpy(float)
            out[f"{b}_mag_err"] = 0.0
    return out


# -- querying the services ---------------------------------------------------------------


GAIA_ADQL = (
    "SELECT source_id, ra, dec, ra_error, dec_error, pmra, pmdec, ref_epoch, "
    "phot_g_mean_mag, phot_g_mean_flux_over_error, phot_bp_mean_mag, phot_bp_mean_flux_over_error, "
    "phot_rp_mean_mag, phot_rp_mean_flux_over_error FROM gaiadr3.gaia_source "
    "WHERE 1 = CONTAINS(POINT('ICRS', ra, dec), CIRCLE('ICRS', {ra:.8f}, {dec:.8f}, {radius:.8f}))"
)


def query_gaia(ra: float, dec: float, radius_deg: float):
    """Gaia DR3 cone through ``astroquery.gaia.Gaia.launch_job_async`` (ADQL)."""
    from astroquery.gaia import Gaia

    job = Gaia.launch_job_async(GAIA_ADQL.format(ra=ra, dec=dec, radius=radius_deg))
    return job.get_results()


def query_ps1(ra: float, dec: float, radius_deg: float):
    """PS1 DR2 mean table through ``astroquery.mast.Catalogs.query_region``."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord
    from astroquery.mast import Catalogs

    return Catalogs.query_region(SkyCoord(ra, dec, unit="deg"), radius=radius_deg * u.deg,
                                 catalog="Panstarrs", data_release="dr2", table="mean")


def query_sdss(ra: float, dec: float, radius_deg: float):
    """SDSS PhotoObj cone through ``astroquery.sdss.SDSS.query_region``."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord
    from astroquery.sdss import SDSS

    return SDSS.query_region(SkyCoord(ra, dec, unit="deg"), radius=radius_deg * u.deg,
                             photoobj_fields=SDSS_FIELDS)


QUERIES: dict[str, tuple[Callable, Callable]] = {
    "gaia_dr3": (query_gaia, from_gaia),
    "ps1": (query_ps1, from_ps1),
    "sdss": (query_sdss, from_sdss),
}


def fetch(ra: float, dec: float, radius_deg: float, *, catalog: str, store: str | os.PathLike,
          name: str | None = None, order: int = DEFAULT_ORDER) -> dict[str, Any]:
    """Fill ``<store>/<name>`` (default name = ``catalog``) with a cone from a service.

    Nothing is queried when the cone is already covered (:func:`covered`).
    After a query, the pixels lying entirely inside the cone become complete
    and the cone is recorded in the manifest.

    Returns
    -------
    dict
        ``queried`` (bool), ``n`` (rows received), ``catdir``.
    """
    if catalog not in QUERIES:
        raise ConfigError(f"unknown reference catalog {catalog!r}; known: {', '.join(QUERIES)}")
    if not (0 < radius_deg <= 10):
        raise ConfigError(f"--radius must be in (0, 10] deg, got {radius_deg}")
    name = name or catalog
    catdir = Path(store) / name
    if covered(catdir, ra, dec, radius_deg):
        log.info("%s: cone (%.5f, %.5f, %.4f deg) already in the store; no query", catdir, ra, dec, radius_deg)
        return {"queried": False, "n": 0, "catdir": str(catdir)}
    query, convert = QUERIES[catalog]
    log.info("querying %s: cone (%.5f, %.5f) radius %.4f deg", catalog, ra, dec, radius_deg)
    rows = convert(query(ra, dec, radius_deg))
    try:
        order = int(read_manifest(catdir)["order"])
    except ConfigError:
        pass
    write_store(rows, store, name, order=order, source=catalog,
                complete=pixels_inside(ra, dec, radius_deg, order), region=(ra, dec, radius_deg))
    log.info("%s: %d stars stored", catdir, len(rows))
    return {"queried": True, "n": int(len(rows)), "catdir": str(catdir)}


def ingest_table(path: str | os.PathLike, *, store: str | os.PathLike, name: str,
                 order: int = DEFAULT_ORDER) -> Path:
    """Convert a Parquet table to a store catalog.

    Accepts the store's own columns, or the simulator's truth refcat
    (``u g r i z y`` magnitude columns; see :func:`from_simulator`).
    """
    path = Path(path)
    try:
        t = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise CorruptInput(f"not a readable Parquet table ({exc})", path=path) from exc
    if not {"id", "ra", "dec"} <= set(t.columns):
        raise CorruptInput("needs columns id, ra, dec", path=path)
    if not any(c.endswith("_mag") for c in t.columns):
        t = from_simulator(t)
    return write_store(t, store, name, order=order, source="ingest", complete=True)


def write_simulated_refcat(catalog: pd.DataFrame, store: str | os.PathLike, *, name: str = "sim",
                           order: int = DEFAULT_ORDER) -> Path:
    """The simulator's reference catalog as store catalog ``<store>/<name>`` (all shards complete)."""
    return write_store(from_simulator(catalog), store, name, order=order, source="sim", complete=True)


# -- command line -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="surveyred refcat", description="local reference-catalog store")
    sub = p.add_subparsers(dest="action", required=True)
    f = sub.add_parser("fetch", help="fill the store from Gaia DR3, PS1 DR2 or SDSS (network)")
    f.add_argument("--ra", type=float, required=True)
    f.add_argument("--dec", type=float, required=True)
    f.add_argument("--radius", type=float, required=True, help="deg")
    f.add_argument("--catalog", choices=CATALOGS, required=True)
    f.add_argument("--store", required=True)
    f.add_argument("--name", default=None, help="catalog name in the store (default: --catalog)")
    f.add_argument("--order", type=int, default=DEFAULT_ORDER, help="HEALPix order of new catalogs")
    common_arguments(f, threads=False)
    g = sub.add_parser("ingest", help="convert a Parquet table (e.g. the simulator's refcat) to a store catalog")
    g.add_argument("table")
    g.add_argument("--name", required=True)
    g.add_argument("--store", required=True)
    g.add_argument("--order", type=int, default=DEFAULT_ORDER)
    common_arguments(g, threads=False)
    args = p.parse_args(argv)
    setup_logging(args.log)

    def body() -> None:
        if args.action == "fetch":
            fetch(args.ra, args.dec, args.radius, catalog=args.catalog, store=args.store, name=args.name,
                  order=args.order)
        else:
            ingest_table(args.table, store=args.store, name=args.name, order=args.order)

    return run(body, what=f"refcat {args.action}")
