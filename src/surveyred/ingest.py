"""Ingest: scan a directory of raw frames into the inventory.

The inventory (``results/inventory.parquet``) has one row per (exposure,
detector) for the detectors being processed; every later stage reads it and no
other job writes it.  Files that cannot be used are listed in the rejects table
(``results/inventory_rejects.parquet``) with a failure class and a message that
names the file and the cause; they never stop the scan.

Only headers are read (pixel data stay on disk), but a file whose HDUs declare
more data than the file holds is caught as truncated
(:func:`surveyred.fitsio.read_headers`).

A file is taken whole or rejected whole: if any processed detector's HDU is
missing, has the wrong shape or lacks a required keyword, the file is rejected
(one reject row per distinct problem; ``hdu`` is set when the problem concerns
one HDU only).  Later stages work per exposure, so a partly usable exposure
would fail there instead.

Inventory columns
-----------------
``path`` (as found under the raw directory as given), ``file`` (base name),
``hdu`` (index of the detector's HDU in the file), ``detector`` (id),
``detector_name``, ``visit`` (the instrument's ``visit`` keyword, else the
file name without its FITS suffix; characters outside ``[A-Za-z0-9_.-]``
become ``_``), ``obstype`` (bias, flat, dark, science), ``physical_filter``,
``band`` (null when unknown for bias/dark), ``exptime`` (s), ``date_obs``
(ISO UTC), ``mjd``, ``night`` (``YYYYMMDD``, see :func:`night_of`), ``ra``,
``dec`` (deg), ``airmass``, ``object``, ``raw_ny``, ``raw_nx``, ``corner_ra``,
``corner_dec`` (deg: the four corners of the raw HDU's pixel grid through its
header WCS, counter-clockwise from pixel (0, 0); NaN without a celestial WCS).
The corners let the workflow assign each exposure to the sky patches it touches
before any pixel is processed (:mod:`surveyred.footprint`).

Rejects columns: ``path``, ``hdu`` (null for whole-file problems),
``failure_class``, ``message``.
"""

from __future__ import annotations

import argparse
import collections
import logging
import math
import os
import re
import warnings
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits
from astropy.wcs import WCS

from . import __version__, fitsio
from .errors import (
    ConfigError,
    CorruptInput,
    MissingKeyword,
    SurveyredError,
    ShapeMismatch,
    Unclassifiable,
    UnknownFilter,
)
from .instrument import Detector, Instrument, load_instrument
from .runtime import common_arguments, run, setup_logging

log = logging.getLogger("surveyred.ingest")

#: File-name endings recognised as raw frames (case-insensitive).
RAW_SUFFIXES: tuple[str, ...] = (".fits.fz", ".fits.gz", ".fits", ".fit")

INVENTORY_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("file", pa.string()),
        ("hdu", pa.int64()),
        ("detector", pa.int64()),
        ("detector_name", pa.string()),
        ("visit", pa.string()),
        ("obstype", pa.string()),
        ("physical_filter", pa.string()),
        ("band", pa.string()),
        ("exptime", pa.float64()),
        ("date_obs", pa.string()),
        ("mjd", pa.float64()),
        ("night", pa.string()),
        ("ra", pa.float64()),
        ("dec", pa.float64()),
        ("airmass", pa.float64()),
        ("object", pa.string()),
        ("raw_ny", pa.int64()),
        ("raw_nx", pa.int64()),
        ("corner_ra", pa.list_(pa.float64(), 4)),
        ("corner_dec", pa.list_(pa.float64(), 4)),
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("hdu", pa.int64()),
        ("failure_class", pa.string()),
        ("message", pa.string()),
    ]
)

_VISIT_BAD_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
_OLD_FITS_DATE = re.compile(r"^\s*(\d{2})/(\d{2})/(\d{2})\s*$")  # dd/mm/yy (pre-2000 FITS)


# -- finding raw files ---------------------------------------------------------------

def raw_suffix(name: str) -> str | None:
    """The raw-frame suffix ``name`` ends with (case-insensitive), or None."""
    lower = name.lower()
    for suffix in RAW_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    return None


def find_raw_files(raw_dir: str | os.PathLike) -> list[str]:
    """Raw frames under ``raw_dir``, recursively, sorted by path.

    Paths are ``raw_dir`` as given joined with the path below it, so a
    relative ``raw_dir`` gives paths relative to the working directory.
    Hidden files and directories (names starting with ``.``) are skipped.
    Symbolic links to directories are followed.  A missing directory gives
    an empty list.
    """
    found: list[str] = []
    for root, dirs, files in os.walk(raw_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and raw_suffix(name) is not None:
                found.append(os.path.join(root, name))
    return sorted(found)


def file_stem(path: str | os.PathLike) -> str:
    """File name without its raw-frame suffix (``a.fits.fz`` -> ``a``)."""
    name = Path(path).name
    suffix = raw_suffix(name)
    return name[: -len(suffix)] if suffix else Path(name).stem


def sanitize_visit(text: Any) -> str:
    """A visit id safe in file names and wildcards: ``[A-Za-z0-9_.-]+``."""
    if isinstance(text, float) and text.is_integer():
        text = int(text)
    value = _VISIT_BAD_CHARS.sub("_", str(text).strip())
    return value or "_"


# -- parsing header values -------------------------------------------------------------

def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def parse_angle(value: Any, *, hours: bool = False) -> float | None:
    """Degrees from a number of degrees or a sexagesimal string.

    Sexagesimal strings (``hh:mm:ss.s``, ``dd mm ss``, ``-00:55:31``) are
    hours when ``hours`` is true (right ascension), degrees otherwise.  Plain
    numbers, and numeric strings, are degrees.  Returns None for a value that
    cannot be parsed (the inventory also drops RA outside [0, 360] and Dec
    outside [-90, 90]).

    Notes
    -----
    ``deg = sign * (|a| + b/60 + c/3600) * (15 if hours else 1)``, the sign
    taken from the text so that ``-00:30:00`` is -0.5.
    """
    if not _present(value) or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        deg = float(value)
    else:
        text = str(value).strip()
        parts = text.replace(":", " ").split()
        try:
            if len(parts) in (2, 3) and (":" in text or len(parts) == 3):
                nums = [abs(float(p)) for p in parts]
                sign = -1.0 if text.startswith("-") else 1.0
                deg = sign * (nums[0] + nums[1] / 60.0 + (nums[2] if len(nums) == 3 else 0.0) / 3600.0)
                if hours:
                    deg *= 15.0
            elif len(parts) == 1:
                deg = float(parts[0])
            else:
                return None
        except ValueError:
            return None
    return deg if math.isfinite(deg) else None


def _check_ra(deg: float | None) -> float | None:
    if deg is None or not 0.0 <= deg <= 360.0:
        return None
    return deg % 360.0


def _check_dec(deg: float | None) -> float | None:
    return deg if deg is not None and -90.0 <= deg <= 90.0 else None


def parse_float(value: Any) -> float | None:
    """A finite float, or None."""
    if not _present(value) or isinstance(value, bool):
        return None
    try:
        out = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


@lru_cache(maxsize=4096)
def _parse_date_cached(value: Any) -> tuple[str, float, Any]:
    import warnings

    from astropy.time import Time

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # erfa "dubious year" and the like
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            t = Time(float(value), format="mjd", scale="utc")
        else:
            text = str(value).strip()
            m = _OLD_FITS_DATE.match(text)
            if m:
                dd, mm, yy = m.groups()
                text = f"19{yy}-{mm}-{dd}"
            t = Time(text, scale="utc")
        t.precision = 3
        return t.isot, float(t.mjd), t.to_datetime()


def parse_date(value: Any) -> tuple[str, float, Any]:
    """``(iso_utc, mjd, datetime)`` from a FITS date (ISO, date only, or an MJD number).

    Raises ``ValueError`` when the value cannot be parsed.
    """
    if not _present(value):
        raise ValueError("empty date")
    try:
        return _parse_date_cached(value)
    except Exception as exc:  # astropy raises ValueError and friends
        raise ValueError(f"cannot parse date {value!r}") from exc


def night_of(when, offset_hours: float = 0.0) -> str:
    """The observing night ``YYYYMMDD`` of a UTC datetime.

    Notes
    -----
    ``night = date(UTC + offset_hours - 12 h)``: with ``offset_hours`` the
    site's offset from UTC (e.g. -4 for Chile in winter), every exposure from
    local noon to the next local noon belongs to the night that started on
    the first date.
    """
    shifted = when + timedelta(hours=float(offset_hours) - 12.0)
    return shifted.strftime("%Y%m%d")


# -- one file ----------------------------------------------------------------------------

class _Lookup:
    """Keyword look-up: the primary header first, then the detector's header."""

    def __init__(self, instrument: Instrument, primary, det_header, *, where: str):
        self.keywords = instrument.keywords
        self.headers = (primary,) if det_header is primary else (primary, det_header)
        self.where = where

    def key(self, field: str) -> str | None:
        key = self.keywords.get(field)
        if key and key.upper().startswith("HIERARCH "):
            key = key[len("HIERARCH "):]
        return key

    def get(self, field: str) -> Any:
        key = self.key(field)
        if not key:
            return None
        for header in self.headers:
            if key in header and _present(header[key]):
                value = header[key]
                return value.strip() if isinstance(value, str) else value
        return None

    def require(self, field: str) -> Any:
        value = self.get(field)
        if value is None:
            raise MissingKeyword(
                f"required keyword {self.key(field)} ({field}) missing or empty "
                "in the primary and detector headers",
                path=self.where,
            )
        return value


def _detector_metadata(
    instrument: Instrument, primary, det_header, *, where: str, night_offset_hours: float
) -> dict[str, Any]:
    """Exposure metadata seen from one detector (raises a classified error)."""
    lk = _Lookup(instrument, primary, det_header, where=where)

    raw_type = lk.require("obstype")
    obstype = instrument.classify(str(raw_type))
    if obstype is None:
        known = ", ".join(f"{k}: {list(v)}" for k, v in instrument.obstypes.items())
        raise Unclassifiable(
            f"observation type {lk.key('obstype')}={raw_type!r} is not known to instrument "
            f"{instrument.name} ({known})",
            path=where,
        )

    raw_exptime = lk.require("exptime")
    exptime = parse_float(raw_exptime)
    if exptime is None or exptime < 0:
        raise MissingKeyword(
            f"keyword {lk.key('exptime')} (exptime) = {raw_exptime!r} is not a non-negative number",
            path=where,
        )

    raw_date = lk.require("date")
    try:
        date_obs, mjd, when = parse_date(raw_date)
    except ValueError as exc:
        raise MissingKeyword(f"keyword {lk.key('date')} (date) = {raw_date!r}: {exc}", path=where) from exc

    raw_filter = lk.get("filter")
    info = instrument.band_of(None if raw_filter is None else str(raw_filter))
    if obstype in ("flat", "science"):
        if raw_filter is None:
            raise MissingKeyword(
                f"required keyword {lk.key('filter') or '(no filter keyword in the instrument map)'} "
                f"(filter) missing or empty for a {obstype} frame",
                path=where,
            )
        if info is None:
            raise UnknownFilter(
                f"filter {lk.key('filter')}={raw_filter!r} of a {obstype} frame is not in instrument "
                f"{instrument.name}'s filter map (known: {', '.join(instrument.filters)})",
                path=where,
            )
    physical = info.physical if info is not None else (None if raw_filter is None else str(raw_filter))

    visit_value = lk.get("visit")
    obj = lk.get("object")
    return {
        "visit": sanitize_visit(visit_value if visit_value is not None else file_stem(where)),
        "obstype": obstype,
        "physical_filter": physical,
        "band": info.band if info is not None else None,
        "exptime": exptime,
        "date_obs": date_obs,
        "mjd": mjd,
        "night": night_of(when, night_offset_hours),
        "ra": _check_ra(parse_angle(lk.get("ra"), hours=True)),
        "dec": _check_dec(parse_angle(lk.get("dec"), hours=False)),
        "airmass": parse_float(lk.get("airmass")),
        "object": None if obj is None else str(obj),
    }


def _hdu_index(headers: Sequence, hdu: int | str) -> int | None:
    if isinstance(hdu, int) or str(hdu).isdigit():
        i = int(hdu)
        return i if 0 <= i < len(headers) else None
    wanted = str(hdu).strip().upper()
    for i, header in enumerate(headers):
        if str(header.get("EXTNAME", "")).strip().upper() == wanted:
            return i
    return None


def _raw_shape(header) -> tuple[int, int] | None:
    if int(header.get("NAXIS", 0) or 0) != 2:
        return None
    return int(header["NAXIS2"]), int(header["NAXIS1"])


def _header_corners(header, primary, shape: tuple[int, int]) -> dict[str, list[float]]:
    """Sky corners of a raw HDU through its header WCS (NaN when it has none)."""
    nan = [math.nan] * 4
    merged = fits.Header(primary)
    merged.update(header)
    if not str(merged.get("CTYPE1", "")).startswith("RA-"):
        return {"corner_ra": nan, "corner_dec": nan}
    ny, nx = shape
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wcs = WCS(merged, naxis=2, relax=True, fix=False)
            ra, dec = wcs.all_pix2world([0.0, nx - 1.0, nx - 1.0, 0.0], [0.0, 0.0, ny - 1.0, ny - 1.0], 0)
    except Exception:  # noqa: BLE001 - a broken header WCS only loses the footprint
        return {"corner_ra": nan, "corner_dec": nan}
    ra, dec = [float(v) for v in ra], [float(v) for v in dec]
    if not all(math.isfinite(v) for v in ra + dec):
        return {"corner_ra": nan, "corner_dec": nan}
    return {"corner_ra": ra, "corner_dec": dec}


def _reject(path: str, hdu: int | None, exc: SurveyredError) -> dict[str, Any]:
    return {"path": path, "hdu": hdu, "failure_class": exc.failure_class, "message": " ".join(str(exc).split())}


def inspect_file(
    path: str,
    instrument: Instrument,
    detectors: Sequence[Detector],
    *,
    night_offset_hours: float = 0.0,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inventory rows and reject rows of one raw file (never raises SurveyredError).

    Returns ``(rows, rejects)``; exactly one of them is empty.
    """
    if "{" in path or "}" in path:
        exc = CorruptInput(
            "path contains '{' or '}', which the workflow cannot use as an input "
            "file name (Snakemake reads braces as wildcards); rename the file",
            path=path,
        )
        return [], [_reject(path, None, exc)]
    try:
        headers = fitsio.read_headers(path)
    except CorruptInput as exc:
        return [], [_reject(path, None, exc)]
    primary = headers[0]

    rows: list[dict[str, Any]] = []
    failures: list[tuple[Detector, int | None, SurveyredError]] = []
    for det in detectors:
        idx = _hdu_index(headers, det.hdu)
        if idx is None:
            failures.append((det, None, CorruptInput(
                f"detector {det.name} (id {det.id}): HDU {det.hdu!r} missing, the file has "
                f"{len(headers)} HDU(s); truncated or not a {instrument.name} frame?",
                path=path,
            )))
            continue
        header = headers[idx]
        try:
            shape = _raw_shape(header)
            if shape is None:
                raise ShapeMismatch(
                    f"detector {det.name} (HDU {idx}) is not a 2-D image (NAXIS={header.get('NAXIS')})", path=path
                )
            det.check_raw_shape(shape, where=path)
            det.resolved(collections.ChainMap(header, primary), where=path)
            meta = _detector_metadata(instrument, primary, header, where=path,
                                      night_offset_hours=night_offset_hours)
        except SurveyredError as exc:
            failures.append((det, idx, exc))
            continue
        rows.append({
            "path": path,
            "file": Path(path).name,
            "hdu": idx,
            "detector": det.id,
            "detector_name": det.name,
            **meta,
            "raw_ny": shape[0],
            "raw_nx": shape[1],
            **_header_corners(header, primary, shape),
        })

    if failures:
        # one reject per distinct problem; hdu only when it concerns some HDUs, not all
        groups: dict[tuple[str, str], list[int | None]] = {}
        excs: dict[tuple[str, str], SurveyredError] = {}
        for _det, idx, exc in failures:
            key = (exc.failure_class, str(exc))
            groups.setdefault(key, []).append(idx)
            excs.setdefault(key, exc)
        rejects = []
        for key, idxs in groups.items():
            if len(idxs) == len(detectors) and len(detectors) > 1:
                rejects.append(_reject(path, None, excs[key]))
            else:
                rejects.extend(_reject(path, i, excs[key]) for i in idxs)
        return [], rejects

    # exposure-level values must agree across detectors; the first detector wins
    first = rows[0]
    for row in rows[1:]:
        row["visit"] = first["visit"]
    return rows, []


# -- many files ----------------------------------------------------------------------

def build_inventory(
    paths: Iterable[str],
    instrument: Instrument,
    detectors: Sequence[Detector] | None = None,
    *,
    night_offset_hours: float = 0.0,
    progress_every: int = 500,
) -> tuple[pa.Table, pa.Table]:
    """Inspect ``paths`` (in the order given) into the inventory and rejects tables.

    A visit id already taken by an earlier file is rejected as
    :class:`~surveyred.errors.CorruptInput` naming both files.
    """
    detectors = tuple(instrument.good_detectors if detectors is None else detectors)
    if not detectors:
        raise ConfigError(f"instrument {instrument.name}: no detectors to ingest")
    paths = list(paths)
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    visit_owner: dict[str, str] = {}
    n_ok = 0
    for i, path in enumerate(paths, start=1):
        file_rows, file_rejects = inspect_file(path, instrument, detectors, night_offset_hours=night_offset_hours)
        if file_rows:
            visit = file_rows[0]["visit"]
            if visit in visit_owner:
                exc = CorruptInput(
                    f"duplicate visit id {visit!r}: already ingested from {visit_owner[visit]}; "
                    "this later file is skipped",
                    path=path,
                )
                file_rows, file_rejects = [], [_reject(path, None, exc)]
            else:
                visit_owner[visit] = path
        for rej in file_rejects:
            log.warning("rejected %s: %s: %s", path if rej["hdu"] is None else f"{path}[{rej['hdu']}]",
                        rej["failure_class"], rej["message"])
        n_ok += bool(file_rows)
        rows.extend(file_rows)
        rejects.extend(file_rejects)
        if progress_every and (i % progress_every == 0 or i == len(paths)):
            log.info("ingest: %d/%d files read, %d accepted, %d rejected", i, len(paths), n_ok, i - n_ok)
    return (
        pa.Table.from_pylist(rows, schema=INVENTORY_SCHEMA),
        pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA),
    )


def summarize(inventory: pa.Table, rejects: pa.Table) -> list[str]:
    """Human-readable summary lines: exposures per obstype, band and night; rejects by class."""
    exposures = {}
    for row in inventory.select(["path", "obstype", "band", "night"]).to_pylist():
        exposures[row["path"]] = row
    lines = [f"{len(exposures)} exposures accepted ({inventory.num_rows} detector rows), "
             f"{len(set(rejects.column('path').to_pylist()))} files rejected"]
    by_type = collections.Counter(r["obstype"] for r in exposures.values())
    lines.append("by obstype: " + (", ".join(f"{k}={v}" for k, v in sorted(by_type.items())) or "none"))
    by_band = collections.Counter(
        (r["obstype"], r["band"]) for r in exposures.values() if r["obstype"] in ("flat", "science")
    )
    lines.append("by obstype/band: " + (", ".join(f"{t}/{b}={v}" for (t, b), v in sorted(by_band.items())) or "none"))
    by_night = collections.Counter(r["night"] for r in exposures.values())
    lines.append("by night: " + (", ".join(f"{k}={v}" for k, v in sorted(by_night.items())) or "none"))
    by_class = collections.Counter(rejects.column("failure_class").to_pylist())
    lines.append("rejects by class: " + (", ".join(f"{k}={v}" for k, v in sorted(by_class.items())) or "none"))
    return lines


def write_table(table: pa.Table, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None) -> None:
    """Write a parquet file atomically (deterministic: no timestamps)."""
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    with fitsio.atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def parse_detectors(text: str | None, instrument: Instrument) -> tuple[Detector, ...]:
    """Detectors from ``"0,1,3"`` (ids or names); all good detectors for None/``all``."""
    if text is None or str(text).strip().lower() in ("", "all", "none", "null"):
        return instrument.good_detectors
    out = []
    for item in str(text).split(","):
        try:
            out.append(instrument.detector(item.strip()))
        except KeyError as exc:
            raise ConfigError(str(exc.args[0])) from exc
    return tuple(out)


def ingest(
    raw_dir: str,
    *,
    instrument: str,
    output: str,
    rejects: str,
    night_offset_hours: float = 0.0,
    detectors: str | None = None,
    progress_every: int = 500,
) -> tuple[pa.Table, pa.Table]:
    """Scan ``raw_dir`` and write the inventory and rejects parquet files."""
    inst = load_instrument(instrument)
    dets = parse_detectors(detectors, inst)
    if not os.path.isdir(raw_dir):
        raise ConfigError(f"raw directory {raw_dir} does not exist or is not a directory")
    paths = find_raw_files(raw_dir)
    log.info("ingest: %d raw files under %s; instrument %s, detectors %s", len(paths), raw_dir, inst.name,
             ",".join(str(d.id) for d in dets))
    if not paths:
        log.warning("ingest: no raw files (%s) under %s", ", ".join(f"*{s}" for s in RAW_SUFFIXES), raw_dir)
    inv, rej = build_inventory(paths, inst, dets, night_offset_hours=night_offset_hours,
                               progress_every=progress_every)
    meta = {"surveyred.version": __version__, "surveyred.instrument": inst.name}
    write_table(inv, output, metadata=meta)
    write_table(rej, rejects, metadata=meta)
    for line in summarize(inv, rej):
        log.info("ingest: %s", line)
    return inv, rej


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="surveyred ingest",
        description="Scan RAW_DIR (recursively) for raw FITS frames and write the inventory "
        "(one row per exposure and detector) and the rejects table.",
    )
    parser.add_argument("raw_dir", metavar="RAW_DIR")
    parser.add_argument("--instrument", required=True, help="instrument name or YAML path")
    parser.add_argument("--output", required=True, help="inventory parquet to write")
    parser.add_argument("--rejects", required=True, help="rejects parquet to write")
    parser.add_argument("--night-offset-hours", type=float, default=0.0,
                        help="site offset from UTC in hours; night = date(UTC + offset - 12 h)")
    parser.add_argument("--detectors", default=None,
                        help="comma-separated detector ids (default: the instrument's good detectors)")
    parser.add_argument("--progress-every", type=int, default=500, help="log progress every N files")
    common_arguments(parser, threads=False)
    args = parser.parse_args(argv)
    setup_logging(args.log)
    return run(
        lambda: ingest(
            args.raw_dir,
            instrument=args.instrument,
            output=args.output,
            rejects=args.rejects,
            night_offset_hours=args.night_offset_hours,
            detectors=args.detectors,
            progress_every=args.progress_every,
        ),
        what="ingest",
    )
