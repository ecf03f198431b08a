"""Instrument (camera) descriptions.

An instrument file ``config/instruments/<name>.yaml`` describes a camera:

* ``detectors``: id, name and the HDU that holds each detector's raw pixels;
* a shared ``layout`` (raw shape and amplifiers) that detectors may override:
  per amplifier the data section, serial overscan section, optional parallel
  overscan section, the amplifier's place in the assembled detector
  (``detsec``), gain (e-/ADU), read noise (e-), saturation (ADU) and optional
  linearity coefficients;
* ``keywords``: the header keyword map (observation type, filter, exposure
  time, date, pointing, ...);
* ``obstypes``: header values of the observation type for bias/flat/dark/science;
* ``filters``: physical filter -> band -> reference-catalog band;
* ``bad_detectors``: detectors skipped by default.

Sections use the FITS/IRAF convention ``[x1:x2,y1:y2]``, 1-based and
inclusive, ``x`` along NAXIS1 (columns).  A section may be read from the frame's
own header by writing ``header:KEY`` (e.g. ``header:TRIMSEC``); such sections
are resolved and validated when a frame is read.

Loading validates the description and raises
:class:`~surveyred.errors.InstrumentError` naming the file and the problem
(overlapping sections, a section outside the frame, a gain that is not
positive, ...).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from .errors import InstrumentError, ShapeMismatch

INSTRUMENT_DIRS: list[Path] = [
    Path(__file__).resolve().parents[2] / "config" / "instruments",  # source checkout
    Path(__file__).resolve().parent / "instruments",  # installed copy (optional)
]

_SECTION_RE = re.compile(r"^\s*\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]\s*$")

OBSTYPES = ("bias", "flat", "dark", "science")

KEYWORD_FIELDS = (
    "obstype", "filter", "exptime", "date", "time", "ra", "dec", "airmass", "object", "visit",
)
REQUIRED_KEYWORDS = ("obstype", "exptime", "date")


@dataclass(frozen=True)
class Section:
    """A rectangular pixel region, 1-based inclusive FITS convention.

    ``x1 > x2`` (or ``y1 > y2``) marks a flipped axis, as IRAF/NOAO ``DETSEC``
    cards do for amplifiers read out from the other side.
    """

    x1: int
    x2: int
    y1: int
    y2: int

    @classmethod
    def parse(cls, text: str) -> "Section":
        m = _SECTION_RE.match(str(text))
        if not m:
            raise ValueError(f"not a FITS section [x1:x2,y1:y2]: {text!r}")
        x1, x2, y1, y2 = (int(v) for v in m.groups())
        if min(x1, x2, y1, y2) < 1:
            raise ValueError(f"section {text!r} has a coordinate below 1")
        return cls(x1, x2, y1, y2)

    @property
    def flip_x(self) -> bool:
        return self.x1 > self.x2

    @property
    def flip_y(self) -> bool:
        return self.y1 > self.y2

    @property
    def nx(self) -> int:
        return abs(self.x2 - self.x1) + 1

    @property
    def ny(self) -> int:
        return abs(self.y2 - self.y1) + 1

    @property
    def shape(self) -> tuple[int, int]:
        return (self.ny, self.nx)

    @property
    def slices(self) -> tuple[slice, slice]:
        """NumPy ``(rows, cols)`` slices of the region, ignoring flips."""
        return (
            slice(min(self.y1, self.y2) - 1, max(self.y1, self.y2)),
            slice(min(self.x1, self.x2) - 1, max(self.x1, self.x2)),
        )

    def inside(self, shape: tuple[int, int]) -> bool:
        return max(self.y1, self.y2) <= shape[0] and max(self.x1, self.x2) <= shape[1]

    def overlaps(self, other: "Section") -> bool:
        a, b = self.slices, other.slices
        return (
            a[0].start < b[0].stop and b[0].start < a[0].stop
            and a[1].start < b[1].stop and b[1].start < a[1].stop
        )

    def __str__(self) -> str:
        return f"[{self.x1}:{self.x2},{self.y1}:{self.y2}]"


@dataclass(frozen=True)
class Amplifier:
    """One amplifier: where its pixels are in the raw HDU and its electronics.

    ``datasec``/``biassec``/``pbiassec``/``detsec`` are :class:`Section` or a
    ``"header:KEY"`` string resolved per frame by :meth:`resolved`.
    """

    name: str
    datasec: Any
    detsec: Any
    biassec: Any = None
    pbiassec: Any = None
    gain: float = 1.0
    read_noise: float = 5.0
    saturation: float = 65535.0
    linearity: tuple[float, ...] = ()

    @property
    def needs_header(self) -> bool:
        return any(isinstance(s, str) for s in (self.datasec, self.detsec, self.biassec, self.pbiassec))

    def resolved(self, header: Mapping[str, Any] | None, *, where: str = "frame") -> "Amplifier":
        """A copy with ``header:KEY`` sections read from ``header``."""
        if not self.needs_header:
            return self
        values = {}
        for name in ("datasec", "detsec", "biassec", "pbiassec"):
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("header:"):
                key = value.split(":", 1)[1]
                if header is None or key not in header or not str(header[key]).strip():
                    raise ShapeMismatch(
                        f"amplifier {self.name}: section card {key} missing from the header", path=where
                    )
                try:
                    value = Section.parse(header[key])
                except ValueError as exc:
                    raise ShapeMismatch(f"amplifier {self.name}: {key} {exc}", path=where) from exc
            values[name] = value
        if values["detsec"] is None or values["detsec"] == "auto":
            values["detsec"] = Section(1, values["datasec"].nx, 1, values["datasec"].ny)
        return dataclasses.replace(self, **values)


@dataclass(frozen=True)
class Detector:
    """One CCD: identity, where its raw pixels are, and its amplifiers."""

    id: int
    name: str
    hdu: int | str
    raw_shape: tuple[int, int]  # (NAXIS2, NAXIS1) of the raw HDU
    amps: tuple[Amplifier, ...]

    def resolved(self, header=None, *, where: str = "frame") -> "Detector":
        """A copy with header-defined sections resolved and validated."""
        if not any(a.needs_header for a in self.amps):
            return self
        det = dataclasses.replace(self, amps=tuple(a.resolved(header, where=where) for a in self.amps))
        problems = _geometry_problems(det)
        if problems:
            raise ShapeMismatch("; ".join(problems), path=where)
        return det

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the assembled (trimmed) detector."""
        ny = max(max(a.detsec.y1, a.detsec.y2) for a in self.amps)
        nx = max(max(a.detsec.x1, a.detsec.x2) for a in self.amps)
        return (ny, nx)

    def check_raw_shape(self, shape: tuple[int, int], *, where: str) -> None:
        """Raise :class:`ShapeMismatch` unless ``shape`` is this detector's raw shape."""
        if tuple(shape) != tuple(self.raw_shape):
            raise ShapeMismatch(
                f"detector {self.name} (HDU {self.hdu}) has shape {tuple(shape)}, "
                f"instrument expects {tuple(self.raw_shape)}",
                path=where,
            )

    def gain_map(self) -> np.ndarray:
        """Assembled-detector image of each amp's gain (e-/ADU)."""
        out = np.empty(self.shape, dtype=np.float32)
        for amp in self.amps:
            out[amp.detsec.slices] = amp.gain
        return out

    def read_noise_map(self) -> np.ndarray:
        """Assembled-detector image of each amp's read noise (e-)."""
        out = np.empty(self.shape, dtype=np.float32)
        for amp in self.amps:
            out[amp.detsec.slices] = amp.read_noise
        return out


@dataclass(frozen=True)
class FilterInfo:
    physical: str
    band: str
    refcat_band: str


@dataclass(frozen=True)
class Instrument:
    """A camera description; see the module docstring for the file format."""

    name: str
    source: str
    detectors: tuple[Detector, ...]
    keywords: Mapping[str, str]
    obstypes: Mapping[str, tuple[str, ...]]
    filters: Mapping[str, FilterInfo]
    bad_detectors: tuple[int, ...] = ()
    pixel_scale: float | None = None  # arcsec / pixel
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    # -- look-ups -----------------------------------------------------------------
    def detector(self, key: int | str) -> Detector:
        for det in self.detectors:
            if det.id == key or det.name == key or str(det.id) == str(key):
                return det
        raise KeyError(f"instrument {self.name} has no detector {key!r}")

    @property
    def good_detectors(self) -> tuple[Detector, ...]:
        bad = set(self.bad_detectors)
        return tuple(d for d in self.detectors if d.id not in bad)

    def band_of(self, physical_filter: str | None) -> FilterInfo | None:
        """The filter entry for a header value (case and blank insensitive)."""
        if physical_filter is None:
            return None
        key = _norm(physical_filter)
        for name, info in self.filters.items():
            if _norm(name) == key:
                return info
        return None

    def classify(self, obstype_value: str | None) -> str | None:
        """Canonical observation type (bias, flat, dark, science) or None."""
        if obstype_value is None:
            return None
        key = _norm(obstype_value)
        for canonical, values in self.obstypes.items():
            if key in {_norm(v) for v in values}:
                return canonical
        return None


def _norm(text: Any) -> str:
    return " ".join(str(text).split()).lower()


# -- loading ----------------------------------------------------------------------

def find_instrument_file(name_or_path: str | Path) -> Path:
    """Resolve an instrument name (``simcam``) or path to its YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    for d in INSTRUMENT_DIRS:
        candidate = d / f"{name_or_path}.yaml"
        if candidate.exists():
            return candidate
    known = sorted({f.stem for d in INSTRUMENT_DIRS if d.is_dir() for f in d.glob("*.yaml")})
    raise InstrumentError(f"unknown instrument {name_or_path!r}; known: {', '.join(known) or 'none'}")


@lru_cache(maxsize=32)
def _load_cached(path: str) -> Instrument:
    try:
        with open(path) as fh:
            doc = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as exc:
        raise InstrumentError(f"cannot read instrument file: {exc}", path=path) from exc
    return instrument_from_dict(doc, source=path)


def load_instrument(name_or_path: str | Path) -> Instrument:
    """Load and validate an instrument description (cached per file)."""
    return _load_cached(str(find_instrument_file(name_or_path).resolve()))


def _section(value: Any, *, what: str, source: str) -> Any:
    if value is None:
        return None
    if isinstance(value, str) and value.startswith("header:"):
        return value
    if isinstance(value, str) and value == "auto":
        return value
    try:
        return Section.parse(value)
    except ValueError as exc:
        raise InstrumentError(f"{what}: {exc}", path=source) from exc


def _amp(doc: Mapping[str, Any], defaults: Mapping[str, Any], *, where: str, source: str) -> Amplifier:
    merged = {**defaults, **doc}
    unknown = set(merged) - {f.name for f in dataclasses.fields(Amplifier)}
    if unknown:
        raise InstrumentError(f"{where}: unknown amplifier keys {sorted(unknown)}", path=source)
    if "datasec" not in merged:
        raise InstrumentError(f"{where}: amplifier needs a datasec", path=source)
    try:
        amp = Amplifier(
            name=str(merged.get("name", "A")),
            datasec=_section(merged["datasec"], what=f"{where} datasec", source=source),
            detsec=_section(merged.get("detsec", "auto"), what=f"{where} detsec", source=source),
            biassec=_section(merged.get("biassec"), what=f"{where} biassec", source=source),
            pbiassec=_section(merged.get("pbiassec"), what=f"{where} pbiassec", source=source),
            gain=float(merged.get("gain", 1.0)),
            read_noise=float(merged.get("read_noise", 5.0)),
            saturation=float(merged.get("saturation", 65535.0)),
            linearity=tuple(float(c) for c in (merged.get("linearity") or ())),
        )
    except (TypeError, ValueError) as exc:
        raise InstrumentError(f"{where}: {exc}", path=source) from exc
    if amp.detsec == "auto" and isinstance(amp.datasec, Section):
        amp = dataclasses.replace(amp, detsec=Section(1, amp.datasec.nx, 1, amp.datasec.ny))
    if not amp.gain > 0:
        raise InstrumentError(f"{where}: gain must be positive, got {amp.gain}", path=source)
    if not amp.read_noise >= 0:
        raise InstrumentError(f"{where}: read_noise must be >= 0, got {amp.read_noise}", path=source)
    if not amp.saturation > 0:
        raise InstrumentError(f"{where}: saturation must be positive, got {amp.saturation}", path=source)
    return amp


def _geometry_problems(det: Detector) -> list[str]:
    """Consistency problems of a detector whose sections are all resolved."""
    problems = []
    where = f"detector {det.name}"
    raw = det.raw_shape
    raw_regions: list[tuple[str, Section]] = []
    for amp in det.amps:
        if amp.needs_header:
            continue
        for kind in ("datasec", "biassec", "pbiassec"):
            sec = getattr(amp, kind)
            if sec is None:
                continue
            if not sec.inside(raw):
                problems.append(f"{where} amp {amp.name} {kind} {sec} lies outside the raw frame {raw[1]}x{raw[0]}")
            raw_regions.append((f"amp {amp.name} {kind} {sec}", sec))
        if amp.detsec.shape != amp.datasec.shape:
            problems.append(
                f"{where} amp {amp.name} detsec {amp.detsec} size differs from datasec {amp.datasec}"
            )
        if amp.biassec is not None and amp.biassec.ny != amp.datasec.ny:
            problems.append(
                f"{where} amp {amp.name} serial overscan {amp.biassec} does not span the data rows {amp.datasec}"
            )
        if amp.pbiassec is not None and amp.pbiassec.nx != amp.datasec.nx:
            problems.append(
                f"{where} amp {amp.name} parallel overscan {amp.pbiassec} does not span the data columns"
            )
    for i, (na, a) in enumerate(raw_regions):
        for nb, b in raw_regions[i + 1:]:
            if a.overlaps(b):
                problems.append(f"{where}: {na} overlaps {nb}")
    resolved = [a for a in det.amps if not a.needs_header]
    for i, a in enumerate(resolved):
        for b in resolved[i + 1:]:
            if a.detsec.overlaps(b.detsec):
                problems.append(f"{where}: amp {a.name} detsec {a.detsec} overlaps amp {b.name} detsec {b.detsec}")
    if resolved and len(resolved) == len(det.amps):
        area = sum(a.detsec.nx * a.detsec.ny for a in resolved)
        ny, nx = det.shape
        if area != nx * ny:
            problems.append(f"{where}: amp detsecs do not tile the {nx}x{ny} detector")
    return problems


def instrument_from_dict(doc: Mapping[str, Any], *, source: str = "<dict>") -> Instrument:
    """Build and validate an :class:`Instrument` from its YAML document."""
    if not isinstance(doc, Mapping):
        raise InstrumentError("instrument file must be a mapping", path=source)
    for key in ("name", "detectors", "keywords", "filters", "obstypes"):
        if key not in doc:
            raise InstrumentError(f"missing top-level key {key!r}", path=source)
    layout = doc.get("layout") or {}
    amp_defaults = dict(doc.get("amp_defaults") or {})
    detectors = []
    seen_ids, seen_hdus, seen_names = set(), set(), set()
    for i, ddoc in enumerate(doc["detectors"]):
        if "id" not in ddoc:
            raise InstrumentError(f"detector #{i} has no id", path=source)
        did = int(ddoc["id"])
        name = str(ddoc.get("name", f"ccd{did:02d}"))
        hdu = ddoc.get("hdu", did)
        if did in seen_ids:
            raise InstrumentError(f"duplicate detector id {did}", path=source)
        if name in seen_names:
            raise InstrumentError(f"duplicate detector name {name!r}", path=source)
        if hdu in seen_hdus:
            raise InstrumentError(f"detector {name}: HDU {hdu!r} used twice", path=source)
        seen_ids.add(did), seen_names.add(name), seen_hdus.add(hdu)
        raw_shape = ddoc.get("raw_shape", layout.get("raw_shape"))
        if raw_shape is None or len(raw_shape) != 2:
            raise InstrumentError(f"detector {name}: raw_shape [ny, nx] required", path=source)
        amp_docs = ddoc.get("amps", layout.get("amps"))
        if not amp_docs:
            raise InstrumentError(f"detector {name}: no amplifiers", path=source)
        overrides = ddoc.get("amp_overrides") or {}
        amps = []
        for adoc in amp_docs:
            aname = str(adoc.get("name", "A"))
            amps.append(_amp({**adoc, **(overrides.get(aname) or {})}, amp_defaults,
                             where=f"detector {name} amp {aname}", source=source))
        if len({a.name for a in amps}) != len(amps):
            raise InstrumentError(f"detector {name}: duplicate amplifier names", path=source)
        det = Detector(id=did, name=name, hdu=hdu, raw_shape=(int(raw_shape[0]), int(raw_shape[1])), amps=tuple(amps))
        problems = _geometry_problems(det)
        if problems:
            raise InstrumentError("; ".join(problems), path=source)
        detectors.append(det)

    keywords = {str(k): str(v) for k, v in (doc.get("keywords") or {}).items()}
    unknown = set(keywords) - set(KEYWORD_FIELDS)
    if unknown:
        raise InstrumentError(f"unknown keyword-map fields {sorted(unknown)}; known: {KEYWORD_FIELDS}", path=source)
    missing = [k for k in REQUIRED_KEYWORDS if k not in keywords]
    if missing:
        raise InstrumentError(f"keyword map lacks {missing}", path=source)

    obstypes = {}
    for canonical, values in (doc.get("obstypes") or {}).items():
        if canonical not in OBSTYPES:
            raise InstrumentError(f"obstypes: {canonical!r} is not one of {OBSTYPES}", path=source)
        values = [values] if isinstance(values, str) else list(values)
        obstypes[canonical] = tuple(str(v) for v in values)

    filters = {}
    for physical, fdoc in (doc.get("filters") or {}).items():
        if isinstance(fdoc, str):
            fdoc = {"band": fdoc}
        if "band" not in fdoc:
            raise InstrumentError(f"filter {physical!r} has no band", path=source)
        filters[str(physical)] = FilterInfo(str(physical), str(fdoc["band"]), str(fdoc.get("refcat_band", fdoc["band"])))

    bad = tuple(int(b) for b in (doc.get("bad_detectors") or ()))
    unknown_bad = set(bad) - seen_ids
    if unknown_bad:
        raise InstrumentError(f"bad_detectors {sorted(unknown_bad)} are not detectors", path=source)

    known_top = {"name", "description", "detectors", "layout", "amp_defaults", "keywords", "obstypes",
                 "filters", "bad_detectors", "pixel_scale", "simulation", "notes"}
    unknown_top = set(doc) - known_top
    if unknown_top:
        raise InstrumentError(f"unknown top-level keys {sorted(unknown_top)}", path=source)

    return Instrument(
        name=str(doc["name"]),
        source=str(source),
        detectors=tuple(detectors),
        keywords=keywords,
        obstypes=obstypes,
        filters=filters,
        bad_detectors=bad,
        pixel_scale=None if doc.get("pixel_scale") is None else float(doc["pixel_scale"]),
        description=str(doc.get("description", "")),
        extra={"simulation": doc.get("simulation") or {}},
    )
