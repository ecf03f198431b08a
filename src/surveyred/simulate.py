"""A simulated raw survey with its truth: ``surveyred simulate``.

Writes, for an instrument description (:mod:`surveyred.instrument`, SimCam by
default), a small but realistic survey of raw multi-extension FITS frames -
biases, dome flats and science exposures of one field over several nights -
and everything that is true about them, so that every pipeline stage can be
scored against the truth.

Layout of the output directory::

    OUTDIR/raw/<night>/<expname>.fits      one file per exposure (night = YYYYMMDD of the evening)
    OUTDIR/truth/...                       truth files, described in OUTDIR/truth/README.md
                                           (text in :data:`TRUTH_README`)
    OUTDIR/refcat/sim/                     the reference catalog as a surveyred.refcat store

The simulation is deterministic: the same instrument, preset, seed, nights and
detector selection give bit-identical files.  Nothing is taken from the clock;
every random draw comes from a generator seeded by ``(seed, label...)`` so that
a frame does not depend on which other frames or detectors are simulated.

Physics (per detector, assembled orientation, electrons unless stated)::

    expected = R(x, y) * (S(u, v) + stars + transient + host)       science
    expected = L * R(x, y)                                           dome flat
    e        = Poisson(expected) + cosmic rays, then charge above full well
               bled along the column (up and down)
    raw ADU  = e / gain + bias(x, y) + drift + row_jitter(raw row) + N(0, rn / gain)
    overscan = offset + drift + row_jitter(raw row) + N(0, rn / gain)
    raw      = clip(rint(raw ADU), 0, saturation)                     uint16 (BZERO 32768)

with ``R`` the pixel response (vignetting x PRNU x band colour term x dust
rings, dead columns at 0.05), ``S`` the sky, stars rendered with a
double-Gaussian PSF integrated over pixels through the *true* WCS
(TAN + radial cubic distortion, exactly a TAN-SIP), ``bias`` the fixed 2-D bias
(per-amp offset ~1000 ADU + smooth gradient + hot columns/pixels).  The header
WCS is a plain TAN that is deliberately off by a few arcsec and a small
rotation and ignores the distortion.

The science functions (:func:`render_stars`, :func:`make_bias`,
:func:`make_defects`, :func:`make_flat_response`, :func:`cosmic_ray_hits`,
:func:`bleed_columns`, :func:`electrons_to_raw`, :func:`raw_to_assembled`,
:func:`transient_mag`, ...) are I/O free.  :func:`simulate_detector_frame`
builds one raw detector frame with its truth in memory;
:func:`simulate_survey` writes a whole preset to disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import threading
import time
import warnings
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import yaml
from astropy.io import fits
from scipy.special import ndtr

from . import __version__, masks
from .errors import ConfigError, InstrumentError
from .fitsio import atomic_path
from .instrument import Amplifier, Detector, Instrument, load_instrument
from .provenance import add_provenance
from .runtime import common_arguments, run, setup_logging
from .sky import tan_deproject, tan_project

log = logging.getLogger("surveyred.simulate")

# -- constants of the simulated sky and camera ---------------------------------------

FIELD_RA = 150.1  #: deg, field centre (COSMOS-like)
FIELD_DEC = 2.2  #: deg
FIRST_EVENING = datetime(2024, 2, 20)  #: evening date of the first night
NIGHT_SPACING_DAYS = 3.5  #: night k is the evening FIRST_EVENING + int(k * 3.5) days
CAL_START_UTC_H = 20.0  #: calibrations start at 20:00 UTC of the evening date
TRANSIT_UTC_H = 28.5  #: the field transits at 04:30 UTC of the next date (science centred on it)
CAL_OVERHEAD_S = 40.0
SCI_OVERHEAD_S = 60.0
READOUT_S = 5.0  #: extra cosmic-ray exposure during readout

BANDS = ("u", "g", "r", "i", "z", "y")
#: mag that gives 1 e-/s with response 1, above the atmosphere
DEFAULT_ZEROPOINT = {"u": 26.2, "g": 27.6, "r": 27.7, "i": 27.4, "z": 26.9, "y": 26.0}
#: dark-sky level, e-/s/pixel
DEFAULT_SKY_RATE = {"u": 3.0, "g": 10.0, "r": 16.0, "i": 25.0, "z": 32.0, "y": 38.0}
#: extinction, mag per airmass
EXTINCTION = {"u": 0.45, "g": 0.20, "r": 0.12, "i": 0.08, "z": 0.06, "y": 0.06}
#: dome-flat exposure time, s
FLAT_EXPTIME = {"u": 30.0, "g": 12.0, "r": 8.0, "i": 6.0, "z": 8.0, "y": 10.0}
BAND_WAVELENGTH = {"u": 3600.0, "g": 4800.0, "r": 6250.0, "i": 7700.0, "z": 9000.0, "y": 9800.0}

FLAT_LEVEL_E = 25000.0  #: mean dome-flat level, e-/pixel at response 1 (varies +-8% per band/night)
VIGNETTING = 0.12  #: response falls by this fraction at the mosaic's corner (quadratic in radius)
PRNU_RMS = 0.01  #: pixel response non-uniformity, white part
DEAD_RESPONSE = 0.05
HOT_COLUMN_ADU = 500.0
BIAS_OFFSET_ADU = 1000.0  #: nominal bias offset; each amp differs by up to +-120 ADU
BIAS_DRIFT_ADU = 1.5  #: rms of the per-exposure, per-amp bias level change
BIAS_ROW_JITTER_ADU = 2.5  #: rms of the per-row bias jitter (data and overscan of a row alike)
FULL_WELL_MARGIN_ADU = 40.0  #: full well = (saturation - offset + margin) * gain
CR_RATE = 2.5e-6  #: cosmic rays per pixel per second
CR_MIN_E, CR_MAX_E = 500.0, 20000.0
STAR_DENSITY = 60000.0  #: stars per deg^2 between MAG_MIN and MAG_MAX (r band)
MAG_MIN, MAG_MAX = 14.0, 25.0
MAG_SLOPE = 0.25  #: dN/dm ~ 10**(MAG_SLOPE * m)
CELL_DEG = 0.02  #: catalog cell size: stars are drawn per cell, so any region is reproducible
WING_FRAC = 0.1  #: PSF = (1 - f) G(sigma) + f G(WING_RATIO * sigma)
WING_RATIO = 2.0
DEFAULT_DISTORTION = 1.5e-9  #: radial cubic distortion coefficient, per pixel^2
REFCAT_EPOCH = 2016.0

# -- small helpers ---------------------------------------------------------------------


def _rng(seed: int, *labels: Any) -> np.random.Generator:
    """A generator that depends only on ``seed`` and the labels."""
    key = tuple(zlib.crc32(str(label).encode()) for label in labels)
    return np.random.default_rng(np.random.SeedSequence(entropy=int(seed), spawn_key=key))


_MJD0 = datetime(1858, 11, 17)


def mjd_of(when: datetime) -> float:
    """Modified Julian Date of a naive UTC datetime."""
    return (when - _MJD0).total_seconds() / 86400.0


def iso_of(when: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.sss`` of a naive UTC datetime."""
    ms = int(round(when.microsecond / 1000.0))
    base = when.replace(microsecond=0)
    if ms == 1000:
        base, ms = base + timedelta(seconds=1), 0
    return base.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms:03d}"


def format_ra(ra_deg: float) -> str:
    """RA in sexagesimal hours ``HH:MM:SS.sss``."""
    ms = int(round((ra_deg % 360.0) / 15.0 * 3600.0 * 1000.0)) % (24 * 3600 * 1000)
    h, rem = divmod(ms, 3600 * 1000)
    m, rem = divmod(rem, 60 * 1000)
    return f"{h:02d}:{m:02d}:{rem // 1000:02d}.{rem % 1000:03d}"


def format_dec(dec_deg: float) -> str:
    """Dec in sexagesimal degrees ``+DD:MM:SS.ss``."""
    sign = "-" if dec_deg < 0 else "+"
    cs = int(round(abs(dec_deg) * 3600.0 * 100.0))
    d, rem = divmod(cs, 3600 * 100)
    m, rem = divmod(rem, 60 * 100)
    return f"{sign}{d:02d}:{m:02d}:{rem // 100:02d}.{rem % 100:02d}"


def _orient(block: np.ndarray, amp: Amplifier) -> np.ndarray:
    """Assembled (detsec) orientation -> raw (datasec) orientation, or back (an involution)."""
    if amp.detsec.flip_x != amp.datasec.flip_x:
        block = block[:, ::-1]
    if amp.detsec.flip_y != amp.datasec.flip_y:
        block = block[::-1, :]
    return block


def raw_to_assembled(det: Detector, raw: np.ndarray) -> np.ndarray:
    """Place every amp's data section at its ``detsec`` (flips applied); no overscan correction.

    The inverse of what :func:`electrons_to_raw` does with the data sections,
    used by the tests to compare raw pixels with assembled truth.
    """
    out = np.empty(det.shape, dtype=raw.dtype)
    for amp in det.amps:
        out[amp.detsec.slices] = _orient(raw[amp.datasec.slices], amp)
    return out


def _check_fixed_sections(det: Detector, source: str) -> None:
    if any(a.needs_header for a in det.amps):
        raise InstrumentError(
            f"detector {det.name}: the simulator needs fixed sections, not header:KEY ones", path=source
        )


# -- presets and the survey plan -----------------------------------------------------


@dataclass(frozen=True)
class TrailSpec:
    """A satellite trail: a straight line across one detector of one science exposure.

    The exposure is the ``visit_in_band``-th (0-based) science visit in ``band``
    of night ``night_index``; the line runs from ``start`` to ``end``, given as
    fractions ``(x / nx, y / ny)`` of the detector's assembled size (points
    outside [0, 1] let it cross the whole detector).  Its cross-section is a
    Gaussian of sigma ``width_px`` pixels with ``peak_e`` electrons per pixel on
    its centre line (before the pixel response, like the sky and the stars),
    sampled at pixel centres:  ``T(x, y) = peak_e exp(-d^2 / (2 width_px^2))``
    with ``d`` the distance of the pixel centre from the segment.  Its photons
    are drawn from their own random stream, ``Poisson(R T)`` added to the
    frame's electrons, so every other pixel value of the frame is unchanged.
    """

    night_index: int = 0
    band: str = "g"
    visit_in_band: int = 0
    detector: int = 0
    start: tuple[float, float] = (-0.05, 0.15)
    end: tuple[float, float] = (1.05, 0.8)
    peak_e: float = 250.0
    width_px: float = 1.3

    def matches(self, spec: "ExposureSpec", det: Detector, bands: Sequence[str]) -> bool:
        """True for the science exposure and detector that carry the trail."""
        if spec.obstype != "science" or spec.band != self.band or spec.night_index != self.night_index:
            return False
        if int(det.id) != int(self.detector) or self.band not in bands:
            return False
        return spec.visit_in_night // len(bands) == self.visit_in_band and \
            spec.visit_in_night % len(bands) == list(bands).index(self.band)


def trail_image(shape: tuple[int, int], trail: TrailSpec) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """The trail's expected electrons per pixel (before the response) and its endpoints in pixels.

    Returns ``(image, (x0, y0, x1, y1))`` with 0-based assembled pixel
    coordinates of the endpoints.  Distance ``d`` of each pixel centre from the
    segment (from the nearer endpoint beyond its ends); see :class:`TrailSpec`.
    """
    ny, nx = shape
    x0, y0 = trail.start[0] * nx - 0.5, trail.start[1] * ny - 0.5
    x1, y1 = trail.end[0] * nx - 0.5, trail.end[1] * ny - 0.5
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    dx, dy = x1 - x0, y1 - y0
    length2 = dx * dx + dy * dy
    t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / length2, 0.0, 1.0)
    d2 = (xx - (x0 + t * dx)) ** 2 + (yy - (y0 + t * dy)) ** 2
    img = trail.peak_e * np.exp(-0.5 * d2 / (trail.width_px ** 2))
    return img.astype(np.float32), (float(x0), float(y0), float(x1), float(y1))


@dataclass(frozen=True)
class Preset:
    """What a preset simulates.

    ``calib_every``: calibrations (``n_bias`` biases, ``n_flat`` flats per
    band) are taken on nights whose 0-based index is a multiple of it.
    """

    name: str
    nights: int
    bands: tuple[str, ...]
    visits_per_band: int
    n_bias: int
    n_flat: int
    calib_every: int = 1
    science_exptime: float = 60.0
    description: str = ""
    trail: TrailSpec | None = None


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", 2, ("g", "r"), 2, 5, 3, 1, 60.0,
                   "2 nights; g, r; 2 visits per band per night; 5 biases + 3 flats per band every night"),
    "demo": Preset("demo", 3, ("g", "r", "i"), 3, 5, 3, 2, 60.0,
                   "3 nights; g, r, i; 3 visits per band per night; 5 biases + 3 flats per band "
                   "on nights 1 and 3 only (night 2 must borrow calibrations); a satellite trail across "
                   "detector 1 of the second r visit of night 2",
                   trail=TrailSpec(night_index=1, band="r", visit_in_band=1, detector=1)),
    "smoke": Preset("smoke", 1, ("g",), 1, 1, 1, 1, 30.0,
                    "1 night; g; 1 bias, 1 flat, 1 science exposure (layout tests of big cameras)"),
    "coadd": Preset("coadd", 2, ("g",), 3, 3, 3, 1, 60.0,
                    "2 nights; g; 3 visits per night; 3 biases + 3 flats every night; a satellite trail "
                    "across detector 1 of the second visit of night 2 (coadd truth tests)",
                    trail=TrailSpec(night_index=1, band="g", visit_in_band=1, detector=1)),
}


def get_preset(name: str | Preset) -> Preset:
    if isinstance(name, Preset):
        return name
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown simulation preset {name!r}; known: {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class ExposureSpec:
    """Everything about one exposure that does not depend on the detector.

    Angles in degrees, times UTC, ``sky0`` in e-/pixel over the exposure at the
    boresight (before the response), ``zp`` the magnitude giving 1 e-/s at
    response 1 (extinction and transparency included), PSF FWHM in pixels.
    """

    expnum: int
    expname: str
    night: str
    night_index: int
    obstype: str  # canonical: bias, flat, science
    band: str
    physical_filter: str
    exptime: float
    mjd: float  # start of exposure
    date_obs: str
    ra_tel: float  # commanded boresight, written to the header
    dec_tel: float
    ra_true: float  # true boresight (= true WCS CRVAL)
    dec_true: float
    rot_true_deg: float  # true rotation of the camera on the sky; the header assumes 0
    airmass: float
    fwhm0: float = float("nan")
    psf_radial: float = 0.0
    psf_tilt_x: float = 0.0
    psf_tilt_y: float = 0.0
    psf_e0: float = 0.0
    psf_e1: float = 0.0
    sky0: float = 0.0
    sky_grad_x: float = 0.0
    sky_grad_y: float = 0.0
    zp: float = float("nan")
    flat_level: float = 0.0
    visit_in_night: int = -1

    @property
    def mjd_mid(self) -> float:
        return self.mjd + 0.5 * self.exptime / 86400.0

    @property
    def epoch(self) -> float:
        """Julian-year epoch of mid-exposure (for proper motions)."""
        return 2000.0 + (self.mjd_mid - 51544.5) / 365.25


def _filter_for_band(instrument: Instrument, band: str) -> str:
    preferred = (instrument.extra.get("simulation") or {}).get("filters") or {}
    if band in preferred:
        if instrument.band_of(preferred[band]) is None:
            raise InstrumentError(f"simulation.filters.{band}: {preferred[band]!r} is not a filter",
                                  path=instrument.source)
        return str(preferred[band])
    for name, info in instrument.filters.items():
        if info.band == band:
            return name
    raise ConfigError(f"instrument {instrument.name} has no filter for band {band!r}", path=instrument.source)


def _obstype_value(instrument: Instrument, canonical: str) -> str:
    values = instrument.obstypes.get(canonical)
    if not values:
        raise InstrumentError(f"obstypes has no value for {canonical!r}", path=instrument.source)
    return values[0]


def _site_latitude(instrument: Instrument) -> float:
    return float(((instrument.extra.get("simulation") or {}).get("site") or {}).get("latitude", -30.17))


def airmass_at(mjd: float, *, transit_mjd: float, dec: float, latitude: float) -> float:
    """Plane-parallel airmass ``sec z`` at hour angle ``(mjd - transit) * 1.0027 * 360`` deg."""
    ha = math.radians((mjd - transit_mjd) * 1.00273790935 * 360.0)
    phi, delta = math.radians(latitude), math.radians(dec)
    cosz = math.sin(phi) * math.sin(delta) + math.cos(phi) * math.cos(delta) * math.cos(ha)
    return float(1.0 / max(cosz, 0.2))


def plan_survey(instrument: Instrument, preset: str | Preset = "tiny", seed: int = 1, *,
                nights: int | None = None) -> list[ExposureSpec]:
    """The exposures of a preset, in time order (pure; no pixels).

    Night ``k`` (0-based) is the evening ``FIRST_EVENING + int(3.5 k)`` days.
    Calibration nights: biases from 20:00 UTC, then flats per band; science
    visits cycle through the bands (g, r, [i], g, r, ...) centred on 04:30 UTC
    of the next date.  Exposure numbers are ``1000 (k + 1) + sequence``.
    """
    p = get_preset(preset)
    n_nights = p.nights if nights is None else int(nights)
    if n_nights < 1:
        raise ConfigError(f"--nights must be at least 1, got {n_nights}")
    filters = {b: _filter_for_band(instrument, b) for b in p.bands}
    for b in p.bands:
        if b not in BANDS:
            raise ConfigError(f"simulator has no sky model for band {b!r}")
    latitude = _site_latitude(instrument)
    specs: list[ExposureSpec] = []
    for k in range(n_nights):
        evening = FIRST_EVENING + timedelta(days=int(k * NIGHT_SPACING_DAYS))
        night = evening.strftime("%Y%m%d")
        seq = 0
        transit = evening + timedelta(hours=TRANSIT_UTC_H)

        def base(obstype: str, band: str, exptime: float, when: datetime, k: int = k,
                 night: str = night) -> dict[str, Any]:
            nonlocal seq
            seq += 1
            expnum = 1000 * (k + 1) + seq
            return dict(expnum=expnum, expname=f"sim_{expnum:07d}", night=night, night_index=k,
                        obstype=obstype, band=band, physical_filter=filters[band], exptime=float(exptime),
                        mjd=mjd_of(when), date_obs=iso_of(when))

        if k % p.calib_every == 0:
            t = evening + timedelta(hours=CAL_START_UTC_H)
            for _ in range(p.n_bias):
                specs.append(ExposureSpec(**base("bias", p.bands[0], 0.0, t), ra_tel=FIELD_RA, dec_tel=FIELD_DEC,
                                          ra_true=FIELD_RA, dec_true=FIELD_DEC, rot_true_deg=0.0, airmass=1.0))
                t += timedelta(seconds=CAL_OVERHEAD_S)
            for band in p.bands:
                level = FLAT_LEVEL_E * float(_rng(seed, "flatlevel", night, band).uniform(0.92, 1.08))
                for _ in range(p.n_flat):
                    exptime = FLAT_EXPTIME[band]
                    specs.append(ExposureSpec(**base("flat", band, exptime, t), ra_tel=FIELD_RA, dec_tel=FIELD_DEC,
                                              ra_true=FIELD_RA, dec_true=FIELD_DEC, rot_true_deg=0.0,
                                              airmass=1.0, flat_level=level))
                    t += timedelta(seconds=exptime + CAL_OVERHEAD_S)
        n_sci = p.visits_per_band * len(p.bands)
        step = p.science_exptime + SCI_OVERHEAD_S
        t = transit - timedelta(seconds=0.5 * n_sci * step)
        visit = 0
        for _ in range(p.visits_per_band):
            for band in p.bands:
                fields = base("science", band, p.science_exptime, t)
                rng = _rng(seed, "exposure", fields["expnum"])
                r_dither = rng.uniform(10.0, 30.0) / 3600.0
                ang = rng.uniform(0.0, 2.0 * math.pi)
                cosd = math.cos(math.radians(FIELD_DEC))
                ra_tel = FIELD_RA + r_dither * math.cos(ang) / cosd
                dec_tel = FIELD_DEC + r_dither * math.sin(ang)
                err = rng.normal(0.0, 2.5, 2) / 3600.0
                mid = fields["mjd"] + 0.5 * p.science_exptime / 86400.0
                am = airmass_at(mid, transit_mjd=mjd_of(transit), dec=dec_tel, latitude=latitude)
                zp = (_zeropoint(instrument, band) - EXTINCTION[band] * am - abs(rng.normal(0.0, 0.02)))
                specs.append(ExposureSpec(
                    **fields, ra_tel=ra_tel, dec_tel=dec_tel,
                    ra_true=ra_tel + err[0] / cosd, dec_true=dec_tel + err[1],
                    rot_true_deg=float(rng.normal(0.0, 0.02)), airmass=am,
                    fwhm0=float(rng.uniform(2.6, 3.3)), psf_radial=float(rng.uniform(0.06, 0.14)),
                    psf_tilt_x=float(rng.normal(0.0, 0.03)), psf_tilt_y=float(rng.normal(0.0, 0.03)),
                    psf_e0=float(rng.normal(0.0, 0.015)), psf_e1=float(rng.normal(0.0, 0.02)),
                    sky0=DEFAULT_SKY_RATE[band] * p.science_exptime * float(rng.uniform(0.85, 1.25)),
                    sky_grad_x=float(rng.normal(0.0, 0.02)), sky_grad_y=float(rng.normal(0.0, 0.02)),
                    zp=float(zp), visit_in_night=visit,
                ))
                visit += 1
                t += timedelta(seconds=step)
    return specs


def _zeropoint(instrument: Instrument, band: str) -> float:
    zps = (instrument.extra.get("simulation") or {}).get("zeropoints") or {}
    return float(zps.get(band, DEFAULT_ZEROPOINT[band]))


# -- the camera model: focal plane, WCS, fixed detector structure --------------------


@dataclass
class DetectorTruth:
    """The fixed (night-independent) truth of one detector, assembled orientation."""

    det: Detector
    bias_adu: np.ndarray  # float32: amp offset + structure + hot columns/pixels
    amp_offsets: dict[str, float]
    defects: np.ndarray  # bool: dead columns, hot columns, hot pixels
    dead: np.ndarray  # bool: pixels with response DEAD_RESPONSE
    prnu: np.ndarray  # float32, mean 1
    dust: tuple[tuple[float, float, float, float], ...]  # (x, y, radius, width) px
    full_well_amp: dict[str, float]  # e- per amp: (saturation - offset + margin) * gain

    def full_well_map(self) -> np.ndarray:
        out = np.empty(self.det.shape, dtype=np.float32)
        for amp in self.det.amps:
            out[amp.detsec.slices] = self.full_well_amp[amp.name]
        return out

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.bias_adu, self.defects, self.dead, self.prnu))


class CameraModel:
    """An instrument's simulated camera for one seed: geometry, WCS, fixed structure.

    Focal-plane coordinates ``(u, v)`` are pixels from the boresight along the
    detector axes: ``u = x - (nx - 1) / 2 + dx`` with ``(dx, dy)`` the
    detector's centre offset from ``simulation.focal_plane`` and ``x`` the
    0-based assembled column.
    """

    def __init__(self, instrument: Instrument, seed: int = 1, *, cache_bytes: float = 3e9):
        self.instrument = instrument
        self.seed = int(seed)
        sim = instrument.extra.get("simulation") or {}
        if instrument.pixel_scale is None:
            raise InstrumentError("the simulator needs pixel_scale", path=instrument.source)
        self.scale_deg = instrument.pixel_scale / 3600.0
        fp = sim.get("focal_plane") or {}
        self.centres: dict[int, tuple[float, float]] = {}
        for det in instrument.detectors:
            _check_fixed_sections(det, instrument.source)
            entry = fp.get(det.id, fp.get(str(det.id), fp.get(det.name)))
            if entry is None or len(entry) < 2:
                raise InstrumentError(
                    f"simulation.focal_plane lacks detector {det.id} ({det.name})", path=instrument.source
                )
            self.centres[det.id] = (float(entry[0]), float(entry[1]))
        self.distortion = float(sim.get("distortion", DEFAULT_DISTORTION))
        corners = []
        for det in instrument.detectors:
            dx, dy = self.centres[det.id]
            ny, nx = det.shape
            corners.append(math.hypot(abs(dx) + nx / 2.0, abs(dy) + ny / 2.0))
        self.rmax = max(corners)
        self.radec_format = str(sim.get("radec_format", "degrees"))
        self._cache: OrderedDict[Any, Any] = OrderedDict()
        self._cache_bytes = 0
        self._cache_budget = float(cache_bytes)
        self._lock = threading.Lock()

    # geometry ------------------------------------------------------------------------
    def crpix(self, det: Detector) -> tuple[float, float]:
        """1-based FITS CRPIX of the boresight in the detector's assembled pixel grid."""
        dx, dy = self.centres[det.id]
        ny, nx = det.shape
        return (nx + 1) / 2.0 - dx, (ny + 1) / 2.0 - dy

    def fp_axes(self, det: Detector) -> tuple[np.ndarray, np.ndarray]:
        """Focal-plane ``u`` of each column and ``v`` of each row (pixels)."""
        c1, c2 = self.crpix(det)
        ny, nx = det.shape
        return np.arange(nx) + 1.0 - c1, np.arange(ny) + 1.0 - c2

    def cd(self, rot_deg: float) -> np.ndarray:
        """CD matrix (deg/pixel): north up, east left, rotated by ``rot_deg``."""
        t = math.radians(rot_deg)
        s = self.scale_deg
        return s * np.array([[-math.cos(t), math.sin(t)], [math.sin(t), math.cos(t)]])

    def sky_to_pixel(self, det: Detector, ra: np.ndarray, dec: np.ndarray, *, ra0: float, dec0: float,
                     rot_deg: float, distortion: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """0-based assembled pixel positions of sky positions through the true WCS."""
        k = self.distortion if distortion is None else distortion
        xi, eta = tan_project(ra, dec, ra0, dec0)
        cdinv = np.linalg.inv(self.cd(rot_deg))
        up = cdinv[0, 0] * xi + cdinv[0, 1] * eta
        vp = cdinv[1, 0] * xi + cdinv[1, 1] * eta
        u, v = up.copy(), vp.copy()
        for _ in range(30):  # invert u' = u (1 + k r^2) by fixed-point iteration
            f = 1.0 + k * (u * u + v * v)
            u, v = up / f, vp / f
        c1, c2 = self.crpix(det)
        return u + c1 - 1.0, v + c2 - 1.0

    def pixel_to_sky(self, det: Detector, x: np.ndarray, y: np.ndarray, *, ra0: float, dec0: float,
                     rot_deg: float, distortion: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Sky positions of 0-based assembled pixels through the true WCS."""
        k = self.distortion if distortion is None else distortion
        c1, c2 = self.crpix(det)
        u = np.asarray(x, float) + 1.0 - c1
        v = np.asarray(y, float) + 1.0 - c2
        f = 1.0 + k * (u * u + v * v)
        cd = self.cd(rot_deg)
        xi = cd[0, 0] * u * f + cd[0, 1] * v * f
        eta = cd[1, 0] * u * f + cd[1, 1] * v * f
        return tan_deproject(xi, eta, ra0, dec0)

    def wcs_cards(self, det: Detector, *, ra0: float, dec0: float, rot_deg: float,
                  sip: bool) -> list[tuple[str, Any, str]]:
        """FITS WCS cards for the assembled grid (TAN, or TAN-SIP with the true distortion)."""
        c1, c2 = self.crpix(det)
        cd = self.cd(rot_deg)
        suffix = "-SIP" if sip else ""
        cards = [
            ("WCSAXES", 2, "number of WCS axes"),
            ("CTYPE1", "RA---TAN" + suffix, ""),
            ("CTYPE2", "DEC--TAN" + suffix, ""),
            ("CUNIT1", "deg", ""),
            ("CUNIT2", "deg", ""),
            ("CRVAL1", float(ra0), "[deg] boresight RA"),
            ("CRVAL2", float(dec0), "[deg] boresight Dec"),
            ("CRPIX1", float(c1), "boresight in assembled pixels (1-based)"),
            ("CRPIX2", float(c2), "boresight in assembled pixels (1-based)"),
            ("CD1_1", float(cd[0, 0]), ""),
            ("CD1_2", float(cd[0, 1]), ""),
            ("CD2_1", float(cd[1, 0]), ""),
            ("CD2_2", float(cd[1, 1]), ""),
            ("RADESYS", "ICRS", ""),
        ]
        if sip:
            k = float(self.distortion)
            cards += [("A_ORDER", 3, ""), ("A_3_0", k, ""), ("A_1_2", k, ""),
                      ("B_ORDER", 3, ""), ("B_0_3", k, ""), ("B_2_1", k, "")]
        return cards

    # fixed structure -------------------------------------------------------------------
    def _cached(self, key: Any, make):
        """Least-recently-used cache of fixed structures within a byte budget."""
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        value = make()
        size = int(value.nbytes)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = value
                self._cache_bytes += size
                while self._cache_bytes > self._cache_budget and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._cache_bytes -= int(old.nbytes)
        return value

    def detector_truth(self, det: Detector) -> DetectorTruth:
        return self._cached(("det", det.id), lambda: self._make_detector_truth(det))

    def _make_detector_truth(self, det: Detector) -> DetectorTruth:
        rng = _rng(self.seed, "detector", det.id)
        bias, offsets, hot = make_bias(det, rng)
        dead, hotmask = make_defects(det, rng)
        defects = dead | hotmask | hot
        prnu = make_prnu(det.shape, rng)
        ny, nx = det.shape
        n_dust = 2
        dust = tuple((float(rng.uniform(0.1, 0.9) * nx), float(rng.uniform(0.1, 0.9) * ny),
                      float(rng.uniform(6.0, 14.0)), float(rng.uniform(1.5, 3.0))) for _ in range(n_dust))
        # hot columns from make_defects go into the bias as +HOT_COLUMN_ADU
        bias[hotmask] += np.float32(HOT_COLUMN_ADU)
        full_well = {a.name: float((a.saturation - offsets[a.name] + FULL_WELL_MARGIN_ADU) * a.gain) for a in det.amps}
        return DetectorTruth(det, bias, offsets, defects, dead, prnu, dust, full_well)

    def response(self, det: Detector, band: str) -> np.ndarray:
        """Pixel response (not normalised; ~1 at the boresight) in ``band``."""
        return self._cached(("resp", det.id, band), lambda: self._make_response(det, band))

    def _make_response(self, det: Detector, band: str) -> np.ndarray:
        t = self.detector_truth(det)
        u, v = self.fp_axes(det)
        return make_flat_response(u, v, rmax=self.rmax, band=band, prnu=t.prnu, dead=t.dead, dust=t.dust)




# -- fixed detector structure (pure functions) ----------------------------------------


def make_bias(det: Detector, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, float], np.ndarray]:
    """Fixed 2-D bias in ADU (assembled): per-amp offset + smooth gradient + hot pixels.

    Returns ``(bias, offsets, hot_pixels)``; hot columns are added by the
    caller from :func:`make_defects`.

    Notes
    -----
    ``bias = offset_amp + gx (x/nx - 1/2) + gy (y/ny - 1/2) + c (x/nx - 1/2)^2``
    with ``offset_amp ~ 1000 + U(-120, 120)`` ADU and ``gx, gy, c ~ N(0, 3)`` ADU
    per amp; 8 hot pixels with ``+U(100, 3000)`` ADU.
    """
    ny, nx = det.shape
    bias = np.empty(det.shape, dtype=np.float32)
    offsets: dict[str, float] = {}
    xs = (np.arange(nx) / nx - 0.5).astype(np.float32)
    ys = (np.arange(ny) / ny - 0.5).astype(np.float32)
    for amp in det.amps:
        off = round(BIAS_OFFSET_ADU + float(rng.uniform(-120.0, 120.0)), 2)
        offsets[amp.name] = off
        gx, gy, c = (np.float32(v) for v in rng.normal(0.0, 3.0, 3))
        sy, sx = amp.detsec.slices
        bias[sy, sx] = (np.float32(off) + gx * xs[sx] + c * xs[sx] ** 2)[None, :] + (gy * ys[sy])[:, None]
    hot = np.zeros(det.shape, dtype=bool)
    iy = rng.integers(0, ny, 8)
    ix = rng.integers(0, nx, 8)
    bias[iy, ix] += rng.uniform(100.0, 3000.0, 8).astype(np.float32)
    hot[iy, ix] = True
    return bias, offsets, hot


def make_defects(det: Detector, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Dead columns (response ``DEAD_RESPONSE``) and hot columns (bias + 500 ADU).

    Two dead and two hot columns per detector; one of each runs the full
    height, the other starts at a random row and runs to the top.
    """
    ny, nx = det.shape
    cols = rng.choice(np.arange(4, nx - 4), size=4, replace=False)
    starts = [0, int(rng.integers(0, ny // 2)), 0, int(rng.integers(0, ny // 2))]
    dead = np.zeros(det.shape, dtype=bool)
    hot = np.zeros(det.shape, dtype=bool)
    for i, (c, s) in enumerate(zip(cols, starts, strict=True)):
        (dead if i < 2 else hot)[s:, c] = True
    return dead, hot


def make_prnu(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Pixel response non-uniformity: 1% white + a 0.3% smooth ripple, mean 1."""
    ny, nx = shape
    prnu = rng.standard_normal(shape, dtype=np.float32)
    prnu *= np.float32(PRNU_RMS)
    prnu += np.float32(1.0)
    for _ in range(3):
        kx, ky = rng.uniform(0.5, 3.0, 2) * 2.0 * math.pi
        phx, phy = rng.uniform(0.0, 2.0 * math.pi, 2)
        ry = (0.001 * np.sin(ky * np.arange(ny) / ny + phy)).astype(np.float32)
        rx = np.sin(kx * np.arange(nx) / nx + phx).astype(np.float32)
        prnu += ry[:, None] * rx[None, :]
    prnu /= np.float32(prnu.mean(dtype=np.float64))
    return prnu


def make_flat_response(u: np.ndarray, v: np.ndarray, *, rmax: float, band: str, prnu: np.ndarray,
                       dead: np.ndarray, dust: Sequence[tuple[float, float, float, float]] = ()) -> np.ndarray:
    """Pixel response of one detector in one band (float32, ~1 at the boresight).

    Notes
    -----
    ``R = (1 - a (r/rmax)^2) (1 + c_b u/rmax + d_b (v/rmax)^2) PRNU prod_dust(1 - depth_b ring)``,
    ``a`` = :data:`VIGNETTING`, ``c_b, d_b`` proportional to ``(lambda_b - 6250 A)/2000 A``
    (a ~1% colour term), dust rings deeper in the blue; dead pixels x ``DEAD_RESPONSE``.
    """
    uu = (u / rmax).astype(np.float32)[None, :]
    vv = (v / rmax).astype(np.float32)[:, None]
    col = np.float32((BAND_WAVELENGTH.get(band, 6250.0) - 6250.0) / 2000.0)
    vig = np.float32(VIGNETTING)
    one = np.float32(1.0)
    resp = (one - vig * (uu * uu + vv * vv)) * (one + np.float32(0.01) * col * uu + np.float32(0.008) * col * vv * vv)
    resp *= prnu
    depth = 0.025 * (6250.0 / BAND_WAVELENGTH.get(band, 6250.0)) ** 2
    ny, nx = resp.shape
    for (xd, yd, r0, w) in dust:
        h = int(r0 + 4 * w) + 1
        y0, y1 = max(0, int(yd) - h), min(ny, int(yd) + h + 1)
        x0, x1 = max(0, int(xd) - h), min(nx, int(xd) + h + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        d = np.hypot(xx - xd, yy - yd)
        resp[y0:y1, x0:x1] *= (1.0 - depth * np.exp(-0.5 * ((d - r0) / w) ** 2)).astype(np.float32)
    resp[dead] *= np.float32(DEAD_RESPONSE)
    return resp


# -- PSF and rendering --------------------------------------------------------------


def _profile_fwhm_factor(wing_frac: float = WING_FRAC, wing_ratio: float = WING_RATIO) -> float:
    """FWHM of the double Gaussian in units of the core sigma (bisection)."""
    f = wing_frac
    w2 = wing_ratio ** 2

    def prof(r: float) -> float:
        return (1 - f) * math.exp(-0.5 * r * r) + f / w2 * math.exp(-0.5 * r * r / w2)

    half = 0.5 * prof(0.0)
    lo, hi = 0.0, 10.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if prof(mid) > half else (lo, mid)
    return 2.0 * lo


FWHM_PER_SIGMA = _profile_fwhm_factor()


def psf_at(spec: ExposureSpec, u, v, rmax: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PSF of ``spec`` at focal-plane ``(u, v)``: ``(fwhm, sigma_x, sigma_y)`` of the core, pixels.

    Notes
    -----
    ``fwhm = fwhm0 (1 + radial (r/rmax)^2 + tilt_x u/rmax + tilt_y v/rmax)``;
    ellipticity ``e = e0 + e1 u/rmax`` along the axes: ``sigma_x = s (1 + e)``,
    ``sigma_y = s (1 - e)`` with ``s = fwhm / FWHM_PER_SIGMA``.  ``fwhm`` is
    that of the whole double-Gaussian profile (core + 10% wing of twice the width).
    """
    uu = np.asarray(u, float) / rmax
    vv = np.asarray(v, float) / rmax
    fwhm = spec.fwhm0 * (1.0 + spec.psf_radial * (uu * uu + vv * vv) + spec.psf_tilt_x * uu + spec.psf_tilt_y * vv)
    e = spec.psf_e0 + spec.psf_e1 * uu
    s = fwhm / FWHM_PER_SIGMA
    return fwhm, s * (1.0 + e), s * (1.0 - e)


_HALF_SIZES = np.array([5, 7, 9, 12, 16, 20, 28, 40, 56, 80])


def _stamps(shape: tuple[int, int], x, y, flux, sigma_x, sigma_y, wing_frac: float, wing_ratio: float):
    """Yield ``(index, flat pixel index, in-bounds mask, stamp values)`` per cut-out size group."""
    ny, nx = shape
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    flux = np.broadcast_to(np.asarray(flux, float), x.shape)
    sx = np.broadcast_to(np.asarray(sigma_x, float), x.shape)
    sy = np.broadcast_to(np.asarray(sigma_y, float), x.shape)
    if x.size == 0:
        return
    sw = wing_ratio * np.maximum(sx, sy)
    arg = np.maximum(np.abs(flux) * max(wing_frac, 1e-3) / (2 * math.pi * sw * sw * 0.3), 1.0)
    need = np.maximum(3.5 * sw, sw * np.sqrt(2.0 * np.log(arg)))
    which = np.minimum(np.searchsorted(_HALF_SIZES, need), len(_HALF_SIZES) - 1)

    def axis(d, s):
        s = s[:, None]
        return ndtr((d + 1.0) / s) - ndtr(d / s)

    for b in np.unique(which):
        idx = np.nonzero(which == b)[0]
        h = int(_HALF_SIZES[b])
        offs = np.arange(-h, h + 1)
        px = np.floor(x[idx] + 0.5).astype(np.int64)[:, None] + offs[None, :]
        py = np.floor(y[idx] + 0.5).astype(np.int64)[:, None] + offs[None, :]
        dxl = px - 0.5 - x[idx, None]
        dyl = py - 0.5 - y[idx, None]
        pxc, pyc = axis(dxl, sx[idx]), axis(dyl, sy[idx])
        pxw, pyw = axis(dxl, wing_ratio * sx[idx]), axis(dyl, wing_ratio * sy[idx])
        stamps = flux[idx, None, None] * ((1 - wing_frac) * pyc[:, :, None] * pxc[:, None, :]
                                          + wing_frac * pyw[:, :, None] * pxw[:, None, :])
        ok = ((py >= 0) & (py < ny))[:, :, None] & ((px >= 0) & (px < nx))[:, None, :]
        lin = py[:, :, None] * nx + px[:, None, :]
        yield idx, lin, ok, stamps


def render_stars(shape: tuple[int, int], x, y, flux, sigma_x, sigma_y, *, wing_frac: float = WING_FRAC,
                 wing_ratio: float = WING_RATIO, out: np.ndarray | None = None) -> np.ndarray:
    """Add point sources integrated over pixels to an image (float64 unless ``out`` says otherwise).

    Parameters
    ----------
    shape : (ny, nx)
    x, y : array
        0-based positions; pixel ``i`` covers ``[i - 0.5, i + 0.5]``.
    flux : array
        Total flux of each source (any unit; electrons here).
    sigma_x, sigma_y : array
        Core Gaussian widths (pixels).
    out : ndarray, optional
        Image to add to (modified in place); a new zero image otherwise.

    Notes
    -----
    The profile is ``(1 - f) G(sx, sy) + f G(w sx, w sy)`` and each pixel gets
    the exact integral, per axis ``Phi((i + 1/2 - x)/s) - Phi((i - 1/2 - x)/s)``
    (separable).  Each source is drawn in a square cut-out of half-size ``h``
    large enough for its wing to fall below ~0.3 per pixel (at least
    ``3.5 w max(sx, sy)``), grouped by size so the work is vectorised.
    """
    if out is None:
        out = np.zeros(shape, dtype=np.float64)
    flat_out = out.reshape(-1)
    for _, lin, ok, stamps in _stamps(shape, x, y, flux, sigma_x, sigma_y, wing_frac, wing_ratio):
        np.add.at(flat_out, lin[ok], stamps[ok].astype(out.dtype, copy=False))
    return out


def psf_weighted(image: np.ndarray, x, y, sigma_x, sigma_y, *, wing_frac: float = WING_FRAC,
                 wing_ratio: float = WING_RATIO) -> np.ndarray:
    """PSF-weighted sum of ``image`` at each source: ``sum_ij PSF_ij image_ij`` (same PSF as :func:`render_stars`).

    With ``image`` the pixel response this is the fraction of a source's
    photons that become electrons (pixels off the detector count 0).
    """
    x = np.atleast_1d(np.asarray(x, float))
    out = np.zeros(x.shape, dtype=np.float64)
    flat = image.reshape(-1)
    for idx, lin, ok, stamps in _stamps(image.shape, x, y, 1.0, sigma_x, sigma_y, wing_frac, wing_ratio):
        vals = np.where(ok, flat[np.where(ok, lin, 0)], 0.0)
        out[idx] = (stamps * vals).sum(axis=(1, 2))
    return out


def cosmic_ray_hits(shape: tuple[int, int], n: int, rng: np.random.Generator) -> pd.DataFrame:
    """``n`` cosmic rays: one table row per hit pixel (``event``, ``x``, ``y``, ``deposit_e``).

    Half single pixels, 15% small spots (2x2), 35% straight tracks of 2-15
    pixels at a random angle; amplitude per event log-uniform in
    500-20000 e-, per pixel x U(0.6, 1.4) (never below 500 e-).
    """
    ny, nx = shape
    rows: list[tuple[int, int, int, float]] = []
    for ev in range(n):
        x0, y0 = rng.uniform(0, nx), rng.uniform(0, ny)
        kind = rng.uniform()
        amp = math.exp(rng.uniform(math.log(CR_MIN_E), math.log(CR_MAX_E)))
        if kind < 0.5:
            pix = np.array([[int(x0), int(y0)]])
        elif kind < 0.65:
            pix = np.array([[int(x0), int(y0)], [int(x0) + 1, int(y0)], [int(x0), int(y0) + 1],
                            [int(x0) + 1, int(y0) + 1]])
        else:
            length = rng.uniform(2.0, 15.0)
            ang = rng.uniform(0.0, math.pi)
            t = np.linspace(0.0, length, int(length * 3) + 2)
            pts = np.stack([x0 + t * math.cos(ang), y0 + t * math.sin(ang)], axis=1)
            pix = np.unique(np.floor(pts).astype(np.int64), axis=0)
        keep = (pix[:, 0] >= 0) & (pix[:, 0] < nx) & (pix[:, 1] >= 0) & (pix[:, 1] < ny)
        pix = pix[keep]
        if len(pix) == 0:
            continue
        dep = np.maximum(amp * rng.uniform(0.6, 1.4, len(pix)), CR_MIN_E)
        rows.extend((ev, int(px), int(py), float(d)) for (px, py), d in zip(pix, dep, strict=True))
    return pd.DataFrame(rows, columns=["event", "x", "y", "deposit_e"])


def bleed_columns(electrons: np.ndarray, full_well: np.ndarray, *,
                  inplace: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Spill charge above full well up and down its column.

    Returns the image (a copy unless ``inplace``) and a boolean mask of the
    pixels that were over full well or received bled charge.  Each over-full
    run keeps ``full_well`` and its excess fills the pixels below and above
    (half each way) up to full well, nearest first; charge that reaches the
    edge of the detector is lost.
    """
    e = electrons if inplace else np.array(electrons, copy=True)
    touched = np.zeros(e.shape, dtype=bool)
    over_cols = np.nonzero((e > full_well).any(axis=0))[0]
    for c in over_cols:
        col = e[:, c].astype(np.float64)
        fw = np.asarray(full_well[:, c], dtype=np.float64)
        for _ in range(1000):
            over = np.nonzero(col > fw)[0]
            if over.size == 0:
                break
            a = b = int(over[0])  # first contiguous over-full run [a, b]
            while b + 1 < col.size and col[b + 1] > fw[b + 1]:
                b += 1
            excess = float(np.sum(col[a:b + 1] - fw[a:b + 1]))
            col[a:b + 1] = fw[a:b + 1]
            touched[a:b + 1, c] = True
            for idx in (np.arange(a - 1, -1, -1), np.arange(b + 1, col.size)):
                if idx.size == 0:
                    continue
                share = 0.5 * excess
                cum = np.cumsum(np.maximum(fw[idx] - col[idx], 0.0))
                n_full = int(np.searchsorted(cum, share))
                col[idx[:n_full]] = fw[idx[:n_full]]
                touched[idx[:n_full], c] = True
                if n_full < idx.size:
                    rest = share - (cum[n_full - 1] if n_full > 0 else 0.0)
                    if rest > 0:
                        col[idx[n_full]] += rest
                        touched[idx[n_full], c] = True
        e[:, c] = col
    return e, touched


def electrons_to_raw(det: Detector, electrons: np.ndarray, bias_adu: np.ndarray, offsets: Mapping[str, float],
                     levels: Mapping[str, float], rng: np.random.Generator, *,
                     row_jitter: float = BIAS_ROW_JITTER_ADU) -> np.ndarray:
    """Digitise an assembled electron image into the raw amplifier layout (uint16).

    ``levels[amp]`` is the amp's bias level of this exposure (offset + drift);
    ``bias_adu`` the fixed bias (with offsets).  Each amp gets one jitter value
    per raw row, added to its data, serial and parallel overscan pixels of that
    row.  Data pixels are clipped at the amp's saturation; everything at
    ``[0, 65535]``.  Raw pixels outside every section (prescan) read the mean
    bias level plus noise.

    Notes
    -----
    ``data = e / gain + bias + (level - offset) + jitter[row] + N(0, rn / gain)``,
    ``overscan = level + jitter[row] + N(0, rn / gain)``, rounded to integers.
    """
    f32 = np.float32
    raw = np.empty(det.raw_shape, dtype=np.float32)
    covered = np.zeros(det.raw_shape, dtype=bool)
    for amp in det.amps:
        for sec in (amp.datasec, amp.biassec, amp.pbiassec):
            if sec is not None:
                covered[sec.slices] = True
    n_free = int(covered.size - np.count_nonzero(covered))
    if n_free:
        rn0 = float(np.mean([a.read_noise / a.gain for a in det.amps]))
        raw[~covered] = f32(np.mean(list(levels.values()))) + f32(rn0) * rng.standard_normal(n_free, dtype=f32)
    for amp in det.amps:
        rn = f32(amp.read_noise / amp.gain)
        level = float(levels[amp.name])
        jitter = (row_jitter * rng.standard_normal(det.raw_shape[0])).astype(f32)
        block = electrons[amp.detsec.slices] * f32(1.0 / amp.gain)
        block += bias_adu[amp.detsec.slices]
        block += f32(level - offsets[amp.name])
        block = _orient(block, amp)
        ds = amp.datasec.slices
        noise = rng.standard_normal(block.shape, dtype=f32)
        noise *= rn
        noise += block
        noise += jitter[ds[0]][:, None]
        np.minimum(noise, f32(amp.saturation), out=noise)
        raw[ds] = noise
        for sec in (amp.biassec, amp.pbiassec):
            if sec is None:
                continue
            sl = sec.slices
            raw[sl] = f32(level) + jitter[sl[0]][:, None] + rn * rng.standard_normal(sec.shape, dtype=f32)
    np.rint(raw, out=raw)
    np.clip(raw, 0, 65535, out=raw)
    return raw.astype(np.uint16)


# -- the sky: reference catalog and transient -----------------------------------------


def _cell_stars(seed: int, i: int, j: int) -> pd.DataFrame:
    """The stars of one catalog cell (tangent-plane square about the field centre)."""
    rng = _rng(seed, "cell", i, j)
    n = int(rng.poisson(STAR_DENSITY * CELL_DEG * CELL_DEG))
    xi = (i + rng.uniform(0, 1, n)) * CELL_DEG
    eta = (j + rng.uniform(0, 1, n)) * CELL_DEG
    lo, hi = 10 ** (MAG_SLOPE * MAG_MIN), 10 ** (MAG_SLOPE * MAG_MAX)
    r = np.log10(lo + rng.uniform(0, 1, n) * (hi - lo)) / MAG_SLOPE
    blue = rng.uniform(0, 1, n) < 0.3
    gr = np.where(blue, rng.uniform(0.0, 0.6, n), rng.uniform(0.3, 1.5, n))
    pm_kind = rng.uniform(0, 1, n)
    pm_sig = np.where(pm_kind < 0.5, 0.0, np.where(pm_kind < 0.98, 4.0, 40.0))
    pm = rng.normal(0.0, 1.0, (2, n)) * pm_sig
    ri = np.clip(0.45 * gr - 0.05 + rng.normal(0, 0.05, n), -0.3, 1.5)
    iz = 0.3 * ri + 0.02 + rng.normal(0, 0.03, n)
    ids = ((i + 1000) * 2000 + (j + 1000)) * 10000 + np.arange(n)
    ra, dec = tan_deproject(xi, eta, FIELD_RA, FIELD_DEC)
    return pd.DataFrame({
        "id": ids.astype(np.int64), "ra": ra, "dec": dec, "r": r, "gr": gr, "ri": ri, "iz": iz,
        "pm_ra": pm[0], "pm_dec": pm[1], "bright": np.zeros(n, dtype=bool),
    })


def _finish_catalog(cat: pd.DataFrame) -> pd.DataFrame:
    r, gr, ri, iz = cat["r"].to_numpy(), cat["gr"].to_numpy(), cat["ri"].to_numpy(), cat["iz"].to_numpy()
    out = pd.DataFrame({
        "id": cat["id"].to_numpy(np.int64),
        "ra": cat["ra"].to_numpy(float), "dec": cat["dec"].to_numpy(float),
        "u": r + gr + 1.2 * gr + 0.6, "g": r + gr, "r": r, "i": r - ri, "z": r - ri - iz,
        "y": r - ri - iz - 0.1 * iz - 0.05,
        "pm_ra": cat["pm_ra"].to_numpy(float), "pm_dec": cat["pm_dec"].to_numpy(float),
        "epoch": np.full(len(cat), REFCAT_EPOCH), "bright": cat["bright"].to_numpy(bool),
    })
    return out.sort_values("id", kind="stable").reset_index(drop=True)


def make_catalog(model: CameraModel, detectors: Sequence[Detector], *, margin_arcsec: float = 80.0) -> pd.DataFrame:
    """The simulated reference catalog covering ``detectors`` (plus dithers and margin).

    Stars are drawn per :data:`CELL_DEG` cell of the tangent plane about the
    field centre with seeds from the cell index, so the catalog of a region is
    the same whichever detectors are simulated.  One very bright star
    (r = 11.5-13) sits in the lower third of every detector of the instrument.
    Magnitudes are AB-like true magnitudes; ``pm_ra`` includes ``cos(dec)``
    (mas/yr); positions at epoch 2016.0.
    """
    xs, ys = [], []
    for det in detectors:
        ny, nx = det.shape
        x = np.array([-0.5, nx - 0.5, -0.5, nx - 0.5])
        y = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
        ra, dec = model.pixel_to_sky(det, x, y, ra0=FIELD_RA, dec0=FIELD_DEC, rot_deg=0.0)
        xi, eta = tan_project(ra, dec, FIELD_RA, FIELD_DEC)
        xs.extend(xi), ys.extend(eta)
    m = margin_arcsec / 3600.0
    i0, i1 = int(math.floor((min(xs) - m) / CELL_DEG)), int(math.floor((max(xs) + m) / CELL_DEG))
    j0, j1 = int(math.floor((min(ys) - m) / CELL_DEG)), int(math.floor((max(ys) + m) / CELL_DEG))
    parts = [_cell_stars(model.seed, i, j) for i in range(i0, i1 + 1) for j in range(j0, j1 + 1)]
    # very bright stars, one per detector of the instrument (independent of the selection)
    bright = []
    for det in model.instrument.detectors:
        rng = _rng(model.seed, "bright", det.id)
        ny, nx = det.shape
        x, y = rng.uniform(0.15, 0.85) * nx, rng.uniform(0.1, 0.35) * ny
        ra, dec = model.pixel_to_sky(det, np.array([x]), np.array([y]), ra0=FIELD_RA, dec0=FIELD_DEC, rot_deg=0.0)
        bright.append(dict(id=900_000_000 + det.id, ra=float(ra[0]), dec=float(dec[0]),
                           r=float(rng.uniform(11.5, 13.0)), gr=float(rng.uniform(0.3, 1.0)), ri=0.2, iz=0.1,
                           pm_ra=0.0, pm_dec=0.0, bright=True))
    bt = pd.DataFrame(bright)
    xi, eta = tan_project(bt["ra"].to_numpy(), bt["dec"].to_numpy(), FIELD_RA, FIELD_DEC)
    inside = ((xi >= i0 * CELL_DEG) & (xi < (i1 + 1) * CELL_DEG) & (eta >= j0 * CELL_DEG) & (eta < (j1 + 1) * CELL_DEG))
    parts.append(bt[inside])
    return _finish_catalog(pd.concat(parts, ignore_index=True))


def star_mag(catalog: pd.DataFrame, band: str) -> np.ndarray:
    if band not in catalog.columns:
        raise ConfigError(f"simulated catalog has no magnitudes in band {band!r}")
    return catalog[band].to_numpy(float)


def positions_at_epoch(catalog: pd.DataFrame, epoch: float) -> tuple[np.ndarray, np.ndarray]:
    """RA, Dec (deg) at ``epoch`` (Julian years) from the 2016.0 positions and proper motions."""
    dt = epoch - catalog["epoch"].to_numpy(float)
    dec0 = catalog["dec"].to_numpy(float)
    dec = dec0 + catalog["pm_dec"].to_numpy(float) * dt / 3.6e6
    ra = catalog["ra"].to_numpy(float) + catalog["pm_ra"].to_numpy(float) * dt / 3.6e6 / np.cos(np.radians(dec0))
    return ra, dec


@dataclass(frozen=True)
class Transient:
    """A supernova-like point source (Bazin light curve) with a faint Gaussian host.

    ``m(t) = m_peak - 2.5 log10(f(t) / f(t_peak))`` with
    ``f(t) = exp(-(t - t0)/tau_fall) / (1 + exp(-(t - t0)/tau_rise))``.
    """

    ra: float
    dec: float
    detector: int
    host_ra: float
    host_dec: float
    host_sigma_arcsec: float = 0.8
    mjd_peak: float = 0.0
    tau_rise: float = 2.0
    # per band (u, g, r, i, z, y): peak magnitude, decline time (days), peak offset (days), host magnitude
    peak_mag: tuple[tuple[str, float], ...] = tuple(zip(BANDS, (19.8, 19.0, 19.1, 19.4, 19.6, 19.8), strict=True))
    tau_fall: tuple[tuple[str, float], ...] = tuple(zip(BANDS, (8.0, 12.0, 18.0, 24.0, 26.0, 28.0), strict=True))
    peak_shift: tuple[tuple[str, float], ...] = tuple(zip(BANDS, (-1.5, -1.0, 0.0, 0.7, 1.0, 1.2), strict=True))
    host_mag: tuple[tuple[str, float], ...] = tuple(zip(BANDS, (23.0, 21.8, 21.2, 20.9, 20.7, 20.6), strict=True))

    def params(self, band: str) -> dict[str, float]:
        get = lambda pairs: dict(pairs)[band]  # noqa: E731
        return dict(peak_mag=get(self.peak_mag), tau_rise=self.tau_rise, tau_fall=get(self.tau_fall),
                    mjd_peak=self.mjd_peak + get(self.peak_shift), host_mag=get(self.host_mag))

    def mag(self, mjd, band: str) -> np.ndarray:
        p = self.params(band)
        return transient_mag(mjd, **{k: p[k] for k in ("peak_mag", "tau_rise", "tau_fall", "mjd_peak")})


def transient_mag(mjd, *, peak_mag: float, tau_rise: float, tau_fall: float, mjd_peak: float) -> np.ndarray:
    """Bazin light curve in magnitudes, peaking at ``peak_mag`` at ``mjd_peak``.

    Notes
    -----
    ``f(t) = exp(-(t - t0)/tau_fall) / (1 + exp(-(t - t0)/tau_rise))`` has its
    maximum at ``t0 + tau_rise ln(tau_fall/tau_rise - 1)``; ``t0`` is chosen so
    that this is ``mjd_peak``.  ``m = peak_mag - 2.5 log10(f(t)/f(mjd_peak))``.
    """
    t = np.asarray(mjd, float)
    t0 = mjd_peak - tau_rise * math.log(tau_fall / tau_rise - 1.0)

    def f(tt):
        return np.exp(-(tt - t0) / tau_fall) / (1.0 + np.exp(-(tt - t0) / tau_rise))

    return peak_mag - 2.5 * np.log10(f(t) / f(mjd_peak))


def make_transient(model: CameraModel, detector: Detector) -> Transient:
    """The transient, inside ``detector`` at (0.62 nx, 0.6 ny) at the nominal pointing."""
    ny, nx = detector.shape
    ra, dec = model.pixel_to_sky(detector, np.array([0.62 * nx]), np.array([0.6 * ny]),
                                 ra0=FIELD_RA, dec0=FIELD_DEC, rot_deg=0.0)
    cosd = math.cos(math.radians(float(dec[0])))
    return Transient(ra=float(ra[0]), dec=float(dec[0]), detector=detector.id,
                     host_ra=float(ra[0]) - 0.5 / 3600.0 / cosd, host_dec=float(dec[0]) - 0.3 / 3600.0,
                     mjd_peak=mjd_of(FIRST_EVENING) + 5.0)


# -- one detector frame --------------------------------------------------------------


@dataclass
class Frame:
    """One simulated raw detector frame and its truth.

    ``raw``: uint16 raw layout (``det.raw_shape``); ``header``: the detector
    HDU header; ``expected``: noise-free electrons (assembled, float32);
    ``electrons``: electrons after Poisson noise, cosmic rays and bleeding
    (assembled, float32); ``mask``: truth bits (uint8, assembled,
    BAD=1 SAT=2 CR=4); ``stars``/``cosmics``/``amps``: tables; ``info``: the
    ``exposures.parquet`` row; ``transient``: its row or ``None``; ``trail``:
    the satellite trail's ``trail.parquet`` row or ``None``.
    """

    det: Detector
    spec: ExposureSpec
    raw: np.ndarray
    header: fits.Header
    expected: np.ndarray | None
    electrons: np.ndarray | None
    mask: np.ndarray
    stars: pd.DataFrame
    cosmics: pd.DataFrame
    amps: pd.DataFrame
    info: dict[str, Any]
    transient: dict[str, Any] | None = None
    trail: dict[str, Any] | None = None


def _amp_levels(seed: int, spec: ExposureSpec, det: Detector, offsets: Mapping[str, float]) -> dict[str, float]:
    rng = _rng(seed, "drift", spec.expnum, det.id)
    return {a.name: float(offsets[a.name] + rng.normal(0.0, BIAS_DRIFT_ADU)) for a in det.amps}


def render_frame(model: CameraModel, spec: ExposureSpec, det: Detector, catalog: pd.DataFrame | None = None,
                 transient: Transient | None = None, *, keep_images: bool = True,
                 trail: TrailSpec | None = None) -> Frame:
    """Simulate one detector of one exposure (pure apart from the model's cache).

    ``keep_images=False`` drops the ``expected``/``electrons`` truth images
    (``None`` in the :class:`Frame`), as the survey writer does to save memory.
    ``trail`` (science frames only) adds a satellite trail (:class:`TrailSpec`)
    whose photons come from their own random stream: the frame's other pixel
    values are those of the same frame without the trail plus the trail's
    Poisson electrons.
    """
    inst = model.instrument
    dt = model.detector_truth(det)
    ny, nx = det.shape
    f32 = np.float32
    rng = _rng(model.seed, "frame", spec.expnum, det.id)
    star_rows = pd.DataFrame()
    tr_row = None
    trail_row = None
    trail_px = None
    info: dict[str, Any] = {}
    full_well = dt.full_well_map()
    if spec.obstype == "bias":
        expected = np.zeros(det.shape, dtype=f32)
        e = np.zeros(det.shape, dtype=f32)
    elif spec.obstype == "flat":
        expected = model.response(det, spec.band) * f32(spec.flat_level)
        e = rng.poisson(expected).astype(f32)
    elif spec.obstype == "science":
        resp = model.response(det, spec.band)
        u, v = model.fp_axes(det)
        c1, c2 = model.crpix(det)
        sky_x = (1.0 + spec.sky_grad_x * u / model.rmax).astype(f32)
        sky_y = (spec.sky0 * (1.0 + spec.sky_grad_y * v / model.rmax)).astype(f32)
        top = np.zeros(det.shape, dtype=np.float64)  # sources, e- before the response
        if catalog is None:
            catalog = make_catalog(model, [det])
        ra, dec = positions_at_epoch(catalog, spec.epoch)
        x, y = model.sky_to_pixel(det, ra, dec, ra0=spec.ra_true, dec0=spec.dec_true, rot_deg=spec.rot_true_deg)
        near = (x > -60) & (x < nx + 60) & (y > -60) & (y < ny + 60)
        sel = np.nonzero(near)[0]
        mags = star_mag(catalog, spec.band)[sel]
        flux = 10.0 ** (-0.4 * (mags - spec.zp)) * spec.exptime
        fwhm, sx, sy = psf_at(spec, x[sel] + 1.0 - c1, y[sel] + 1.0 - c2, model.rmax)
        render_stars(det.shape, x[sel], y[sel], flux, sx, sy, out=top)
        if transient is not None:
            tx, ty = model.sky_to_pixel(det, np.array([transient.ra, transient.host_ra]),
                                        np.array([transient.dec, transient.host_dec]),
                                        ra0=spec.ra_true, dec0=spec.dec_true, rot_deg=spec.rot_true_deg)
            if -0.5 <= tx[0] < nx - 0.5 and -0.5 <= ty[0] < ny - 0.5:
                p = transient.params(spec.band)
                mag = float(transient.mag(spec.mjd_mid, spec.band))
                tflux = 10.0 ** (-0.4 * (mag - spec.zp)) * spec.exptime
                hflux = 10.0 ** (-0.4 * (p["host_mag"] - spec.zp)) * spec.exptime
                tf, tsx, tsy = psf_at(spec, tx + 1.0 - c1, ty + 1.0 - c2, model.rmax)
                gal = transient.host_sigma_arcsec / inst.pixel_scale
                render_stars(det.shape, tx[:1], ty[:1], tflux, tsx[:1], tsy[:1], out=top)
                render_stars(det.shape, tx[1:], ty[1:], hflux, np.hypot(tsx[1:], gal), np.hypot(tsy[1:], gal), out=top)
                r_t = float(psf_weighted(resp, tx[:1], ty[:1], tsx[:1], tsy[:1])[0])
                r_h = float(psf_weighted(resp, tx[1:], ty[1:], np.hypot(tsx[1:], gal), np.hypot(tsy[1:], gal))[0])
                tr_row = dict(mjd=spec.mjd_mid, band=spec.band, mag=mag, flux_top_e=tflux, flux_e=tflux * r_t,
                              response=r_t, x=float(tx[0]), y=float(ty[0]), ra=transient.ra, dec=transient.dec,
                              fwhm_px=float(tf[0]), zp=spec.zp, exptime=spec.exptime,
                              host_mag=p["host_mag"], host_flux_e=hflux * r_h,
                              host_x=float(tx[1]), host_y=float(ty[1]), host_sigma_px=gal)
        expected = top.astype(f32)
        expected += sky_y[:, None] * sky_x[None, :]
        expected *= resp
        del top
        e = rng.poisson(expected).astype(f32)
        xs, ys = x[sel], y[sel]
        inside = (xs >= -0.5) & (xs < nx - 0.5) & (ys >= -0.5) & (ys < ny - 0.5)
        ix = np.clip(np.floor(xs + 0.5).astype(int), 0, nx - 1)
        iy = np.clip(np.floor(ys + 0.5).astype(int), 0, ny - 1)
        r_at = psf_weighted(resp, xs, ys, sx, sy)  # electrons per source photon
        star_rows = pd.DataFrame({
            "star_id": catalog["id"].to_numpy()[sel], "x": xs, "y": ys,
            "ra_obs": ra[sel], "dec_obs": dec[sel], "mag": mags, "flux_top_e": flux, "flux_e": flux * r_at,
            "response": r_at, "fwhm_px": fwhm, "sigma_x_px": sx, "sigma_y_px": sy,
            "saturated": expected[iy, ix] > full_well[iy, ix],
        })[inside].reset_index(drop=True)
        cf, _, _ = psf_at(spec, np.array([(nx - 1) / 2.0 + 1.0 - c1]), np.array([(ny - 1) / 2.0 + 1.0 - c2]),
                          model.rmax)
        mean_resp = float(resp.mean(dtype=np.float64))
        sky_mean = float(np.mean((resp * sky_y[:, None]) * sky_x[None, :], dtype=np.float64))
        info.update(psf_fwhm_px=float(cf[0]), sky_e=sky_mean, zp=spec.zp,
                    zp_calexp=spec.zp + 2.5 * math.log10(mean_resp), n_stars=int(len(star_rows)))
        if trail is not None:
            timg, (x0, y0, x1, y1) = trail_image(det.shape, trail)
            texp = timg * resp
            # own stream: the frame's draws (and so every other pixel) stay what they were
            e += _rng(model.seed, "trail", spec.expnum, det.id).poisson(texp).astype(f32)
            expected += texp
            trail_px = timg >= np.float32(trail.peak_e * math.exp(-4.5))  # within 3 sigma of the line
            ra_e, dec_e = model.pixel_to_sky(det, np.array([x0, x1]), np.array([y0, y1]), ra0=spec.ra_true,
                                             dec0=spec.dec_true, rot_deg=spec.rot_true_deg)
            pix_area = float(inst.pixel_scale) ** 2
            trail_row = dict(
                x0=x0, y0=y0, x1=x1, y1=y1, ra0=float(ra_e[0]), dec0=float(dec_e[0]), ra1=float(ra_e[1]),
                dec1=float(dec_e[1]), width_px=float(trail.width_px), peak_e=float(trail.peak_e),
                line_flux_e=float(trail.peak_e * math.sqrt(2.0 * math.pi) * trail.width_px),
                sb_mag_arcsec2=float(spec.zp - 2.5 * math.log10(trail.peak_e / spec.exptime / pix_area)),
                mean_response=float(np.mean(resp[trail_px], dtype=np.float64)),
                n_trail_px=int(np.count_nonzero(trail_px)), zp=spec.zp, exptime=spec.exptime)
    else:
        raise ConfigError(f"cannot simulate obstype {spec.obstype!r}")
    n_cr = int(rng.poisson(CR_RATE * nx * ny * (spec.exptime + READOUT_S)))
    cosmics = cosmic_ray_hits(det.shape, n_cr, rng)
    cr_pix = (cosmics["y"].to_numpy(int), cosmics["x"].to_numpy(int))
    np.add.at(e, cr_pix, cosmics["deposit_e"].to_numpy(f32))
    e, bled = bleed_columns(e, full_well, inplace=True)
    levels = _amp_levels(model.seed, spec, det, dt.amp_offsets)
    raw = electrons_to_raw(det, e, dt.bias_adu, dt.amp_offsets, levels, rng)
    mask = np.zeros(det.shape, dtype=np.uint8)
    mask[dt.defects] |= masks.BAD
    for amp in det.amps:
        sat = _orient(raw[amp.datasec.slices] >= math.floor(min(amp.saturation, 65535.0)), amp)
        mask[amp.detsec.slices][sat] |= masks.SAT
    mask[cr_pix] |= masks.CR
    if trail_px is not None:
        mask[trail_px] |= masks.TRAIL
    if len(star_rows):
        sy_i = np.clip(np.floor(star_rows["y"].to_numpy() + 0.5).astype(int), 0, ny - 1)
        sx_i = np.clip(np.floor(star_rows["x"].to_numpy() + 0.5).astype(int), 0, nx - 1)
        star_rows["saturated"] = star_rows["saturated"].to_numpy() | ((mask[sy_i, sx_i] & masks.SAT) > 0)
    header = detector_header(model, spec, det)
    amps = pd.DataFrame([dict(amp=a.name, bias_offset_adu=dt.amp_offsets[a.name], bias_level_adu=levels[a.name],
                              gain=a.gain, read_noise_e=a.read_noise, saturation_adu=a.saturation,
                              full_well_e=dt.full_well_amp[a.name])
                         for a in det.amps])
    info.update(n_cosmic_pixels=int(len(cosmics)), n_saturated_px=int(np.count_nonzero(mask & masks.SAT)),
                n_bleed_px=int(np.count_nonzero(bled)))
    return Frame(det=det, spec=spec, raw=raw, header=header, expected=expected if keep_images else None,
                 electrons=e if keep_images else None, mask=mask, stars=star_rows, cosmics=cosmics, amps=amps,
                 info=info, transient=tr_row, trail=trail_row)


# -- headers ---------------------------------------------------------------------------


def primary_header(model: CameraModel, spec: ExposureSpec, *, preset: str = "", seed: int | None = None) -> fits.Header:
    """Exposure-level cards through the instrument's keyword map (plus DATE, MJD-OBS, UTC-OBS)."""
    inst = model.instrument
    kw = inst.keywords
    h = fits.Header()
    obj = {"bias": "bias", "flat": f"dome flat {spec.band}", "science": "COSMOS"}[spec.obstype]
    sexa = model.radec_format == "sexagesimal"
    values: dict[str, tuple[Any, str]] = {
        "obstype": (_obstype_value(inst, spec.obstype), "observation type"),
        "filter": (spec.physical_filter, "filter in the beam"),
        "exptime": (float(spec.exptime), "[s] exposure time"),
        "date": (spec.date_obs, "UTC start of exposure"),
        "ra": (format_ra(spec.ra_tel) if sexa else float(spec.ra_tel), "telescope RA (commanded)"),
        "dec": (format_dec(spec.dec_tel) if sexa else float(spec.dec_tel), "telescope Dec (commanded)"),
        "airmass": (round(float(spec.airmass), 4), "airmass at mid-exposure"),
        "object": (obj, "object"),
        "visit": (int(spec.expnum), "exposure number"),
    }
    h["DATE"] = (spec.date_obs, "= start of exposure (simulated)")
    for field_name in ("obstype", "filter", "exptime", "date", "ra", "dec", "airmass", "object", "visit"):
        if field_name in kw:
            value, comment = values[field_name]
            h[kw[field_name]] = (value, comment)
    for key, value, comment in (
        ("RA", format_ra(spec.ra_tel), "telescope RA (sexagesimal)"),
        ("DEC", format_dec(spec.dec_tel), "telescope Dec (sexagesimal)"),
    ):
        if key not in h:
            h[key] = (value, comment)
    h["MJD-OBS"] = (round(spec.mjd, 8), "MJD (UTC) of start of exposure")
    h["UTC-OBS"] = (spec.date_obs.split("T")[1], "UTC start of exposure")
    h["INSTRUME"] = (inst.name, "instrument")
    h["TELESCOP"] = ("SIMULATED", "surveyred simulation")
    h["ORIGIN"] = ("surveyred simulate", "")
    h["SIMSEED"] = (int(model.seed if seed is None else seed), "simulation seed")
    if preset:
        h["SIMPRSET"] = (preset, "simulation preset")
    add_provenance(h, step="simulate", params={"preset": preset, "seed": int(model.seed), "instrument": inst.name})
    return h


def detector_header(model: CameraModel, spec: ExposureSpec, det: Detector) -> fits.Header:
    """Detector HDU cards: identity, per-amp electronics and sections, header WCS (science)."""
    h = fits.Header()
    h["EXTNAME"] = (det.name, "detector name")
    h["CCDNUM"] = (int(det.id), "detector id")
    h["CCDNAME"] = (det.name, "")
    h["BUNIT"] = ("adu", "")
    for amp in det.amps:
        for key, value, comment in (
            (f"GAIN{amp.name}", amp.gain, "[e-/adu] gain"),
            (f"RDNOISE{amp.name}", amp.read_noise, "[e-] read noise"),
            (f"SATURAT{amp.name}", amp.saturation, "[adu] saturation"),
            (f"DATASEC{amp.name}", str(amp.datasec), "data section"),
            (f"BIASSEC{amp.name}", None if amp.biassec is None else str(amp.biassec), "serial overscan"),
            (f"CCDSEC{amp.name}", str(amp.detsec), "amp place in the assembled detector"),
        ):
            if value is not None and len(key) <= 8:
                h[key] = (value, comment)
    if spec.obstype == "science":
        dra = spec.ra_tel  # header WCS: commanded pointing, no rotation, no distortion
        for key, value, comment in model.wcs_cards(det, ra0=dra, dec0=spec.dec_tel, rot_deg=0.0, sip=False):
            h[key] = (value, comment)
        h["EQUINOX"] = (2000.0, "")
        h["WCSNOTE"] = ("approximate; WCS of the assembled (trimmed) detector grid", "")
    return h


def wcs_header_string(model: CameraModel, spec: ExposureSpec, det: Detector, *, true: bool) -> str:
    """The true (TAN-SIP) or header (TAN) WCS of a detector as FITS header text."""
    h = fits.Header()
    if true:
        cards = model.wcs_cards(det, ra0=spec.ra_true, dec0=spec.dec_true, rot_deg=spec.rot_true_deg, sip=True)
    else:
        cards = model.wcs_cards(det, ra0=spec.ra_tel, dec0=spec.dec_tel, rot_deg=0.0, sip=False)
    for key, value, comment in cards:
        h[key] = (value, comment)
    h["NAXIS1"] = det.shape[1]
    h["NAXIS2"] = det.shape[0]
    return h.tostring(sep="\n")


# -- public conveniences -----------------------------------------------------------------


def _as_instrument(instrument: str | Instrument) -> Instrument:
    return instrument if isinstance(instrument, Instrument) else load_instrument(instrument)


def select_detectors(instrument: Instrument, detectors: str | Iterable[int | str] | None) -> list[Detector]:
    """Detectors to simulate: given ids/names (``"0,1"`` or a list) or all good detectors."""
    if detectors is None:
        return list(instrument.good_detectors)
    if isinstance(detectors, str):
        detectors = [d.strip() for d in detectors.split(",") if d.strip()]
    out = []
    for key in detectors:
        try:
            det = instrument.detector(key)
        except KeyError as exc:
            raise ConfigError(str(exc.args[0]), path=instrument.source) from None
        if det not in out:
            out.append(det)
    if not out:
        raise ConfigError("no detectors selected")
    return sorted(out, key=lambda d: d.id)


def simulate_detector_frame(instrument: str | Instrument = "simcam", detector: int | str = 0, *,
                            obstype: str = "science", band: str = "r", seed: int = 1, expnum: int = 1001,
                            exptime: float | None = None, with_transient: bool = True) -> Frame:
    """Simulate one raw detector frame with its truth, in memory.

    The exposure follows the survey recipe: it is the first ``obstype``
    exposure of a one-night plan in ``band`` (science exposures last
    ``exptime``, default 60 s), renumbered ``expnum`` and, for science, pointed
    with a dither drawn from ``(seed, expnum)``.  Science frames show the
    simulated sky through the true WCS and, with ``with_transient``, the
    supernova placed in this detector.

    Returns
    -------
    Frame
        ``raw`` in the raw amplifier layout (uint16), truth arrays
        (``expected``, ``electrons``, ``mask``) in the assembled orientation,
        tables ``stars``, ``cosmics``, ``amps`` and the ``info`` row.
    """
    if obstype not in ("bias", "flat", "science"):
        raise ConfigError(f"cannot simulate obstype {obstype!r}; use bias, flat or science")
    inst = _as_instrument(instrument)
    det = select_detectors(inst, [detector])[0]
    model = CameraModel(inst, seed)
    plan = plan_survey(inst, Preset("frame", 1, (band,), 1, 1, 1, 1, float(exptime or 60.0)), seed)
    spec = next(s for s in plan if s.obstype == obstype)
    if obstype == "science":
        rng = _rng(seed, "exposure", expnum)
        ra_tel = FIELD_RA + rng.normal(0, 20.0) / 3600.0
        dec_tel = FIELD_DEC + rng.normal(0, 20.0) / 3600.0
        spec = dataclasses.replace(spec, ra_tel=ra_tel, dec_tel=dec_tel,
                                   ra_true=ra_tel + (spec.ra_true - spec.ra_tel),
                                   dec_true=dec_tel + (spec.dec_true - spec.dec_tel))
    elif exptime is not None:
        spec = dataclasses.replace(spec, exptime=float(exptime))
    spec = dataclasses.replace(spec, expnum=expnum, expname=f"sim_{expnum:07d}")
    transient = make_transient(model, det) if (with_transient and obstype == "science") else None
    catalog = make_catalog(model, [det]) if obstype == "science" else None
    return render_frame(model, spec, det, catalog, transient)


# -- writing the survey ---------------------------------------------------------------


def truth_tag(det: Detector) -> str:
    """Detector tag used in truth file names: the id, two digits (``00``, ``61``)."""
    return f"{det.id:02d}"


def _write_fits(hdul: fits.HDUList, path: Path) -> None:
    # checksum=False: astropy's CHECKSUM comment carries the wall-clock time,
    # which would break bit-identical reruns.
    with atomic_path(path) as tmp:
        hdul.writeto(tmp, overwrite=True, checksum=False)


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False, engine="pyarrow")


def _write_text(text: str, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _raw_hdulist(inst: Instrument, primary: fits.Header, frames: Sequence[Frame]) -> fits.HDUList:
    hdus: list[fits.hdu.base.ExtensionHDU | None] = []
    by_int = [f for f in frames if isinstance(f.det.hdu, int)]
    if by_int:
        n = max(f.det.hdu for f in by_int)
        hdus = [None] * n
        for f in by_int:
            hdus[f.det.hdu - 1] = fits.ImageHDU(f.raw, header=f.header)
        for i, h in enumerate(hdus):
            if h is None:  # a detector not simulated: keep HDU numbering with an empty placeholder
                det = next((d for d in inst.detectors if d.hdu == i + 1), None)
                ph = fits.Header()
                ph["EXTNAME"] = det.name if det else f"EMPTY{i + 1}"
                if det:
                    ph["CCDNUM"] = det.id
                ph["SIMSKIP"] = (True, "detector not simulated (placeholder, no data)")
                hdus[i] = fits.ImageHDU(header=ph)
    for f in frames:
        if not isinstance(f.det.hdu, int):
            hdus.append(fits.ImageHDU(f.raw, header=f.header))
    return fits.HDUList([fits.PrimaryHDU(header=primary), *hdus])


TRUTH_README = """\
# Truth of a surveyred simulation

Written by `surveyred simulate` ({version}); instrument `{instrument}`, preset `{preset}`, seed {seed}.
Detectors simulated: {detectors}.  `<det>` in file names is the detector id, two digits.

## Conventions
* **Assembled orientation**: every truth image is in the assembled (trimmed) detector
  orientation: amp data sections placed at their `detsec` with the flips of the
  instrument file applied; array `[y, x]`, 0-based pixel centres at integers
  (pixel i covers [i-0.5, i+0.5]).  FITS WCS cards use 1-based pixels of the
  same grid.  The WCS cards written in the raw detector HDUs also refer to this
  assembled grid (like DECam's trimmed-coordinate CRPIX), not to raw pixels.
* Electrons (e-) unless marked ADU.  Magnitudes are true AB-like magnitudes.
* Zero-point `zp` (mag): a source of magnitude `zp` gives 1 e-/s at pixel
  response 1; it includes extinction (k per airmass) and transparency.
  `zp_calexp = zp + 2.5 log10(mean response of the detector)` is the zero-point
  of an image flat-fielded with the truth flat (normalised to mean 1 per detector).
* Raw model: `e = Poisson(R * (sky + stars + transient + host))` + cosmic rays, charge
  above full well bled along columns; `ADU = e/gain + bias + drift + row_jitter + N(0, rn/gain)`,
  clipped at the amp saturation (ADU).  Overscan pixels: `level + row_jitter + noise`
  where `level = offset + drift` (`amps.parquet`).  Full well per amp:
  `(saturation - offset + {margin}) * gain`, so saturated and bled pixels read
  exactly the saturation value.

## Files
* `../transients.csv` - the transient's name (`SN-sim`), RA and Dec, as the CSV
  of user positions for forced photometry (config `forced.positions`).
* `manifest.yaml` - preset, seed, instrument, software version, detectors, file counts,
  the calibration nights and the transient's parameters.
* `gain.yaml` - per detector and amp: gain (e-/ADU), read_noise (e-), saturation (ADU),
  bias_offset_adu, full_well_e.  Gains and read noise are the instrument file's values.
* `exposures.parquet` - one row per (exposure, detector): `file` (relative to OUTDIR),
  `expname`, `visit` (= EXPNUM), `night` (YYYYMMDD of the evening), `night_index`,
  `obstype` (bias/flat/science), `obstype_header`, `band`, `physical_filter`, `exptime` (s),
  `date_obs` (ISO UTC start), `mjd_obs` (start), `mjd_mid`, `airmass`, `detector` (id),
  `detector_name`, `hdu`, `ra_tel`/`dec_tel` (deg, header pointing), `ra_true`/`dec_true`
  (deg, true boresight = CRVAL of the true WCS), `rot_true_deg` (true camera rotation;
  the header WCS assumes 0), `hdr_dra_arcsec`/`hdr_ddec_arcsec` (header minus true CRVAL,
  RA offset times cos dec), `flat_level_e` (flats: illumination at response 1),
  and for science: `sky_e` (mean sky e-/pix in the raw frame, i.e. times response),
  `sky0_e` (sky at the boresight before the response), `zp`, `zp_calexp`, `psf_fwhm_px`
  (FWHM at the detector centre), PSF parameters `psf_fwhm0`, `psf_radial`, `psf_tilt_x`,
  `psf_tilt_y`, `psf_e0`, `psf_e1` (see `surveyred.simulate.psf_at`), `n_stars`,
  `n_cosmic_pixels`, `n_saturated_px`, `n_bleed_px`, `wcs_true` (FITS header text,
  RA---TAN-SIP with A_3_0 = A_1_2 = B_0_3 = B_2_1 = k = {distortion:g} per px^2, i.e. the radial
  distortion x' = x (1 + k r^2) about the boresight), `wcs_header` (the TAN written in the raw header).
* `amps.parquet` - one row per (exposure, detector, amp): `bias_offset_adu` (fixed),
  `bias_level_adu` (this exposure's overscan level = offset + drift), gain, read noise,
  saturation, full well.  Row jitter rms is {jitter} ADU, drift rms {drift} ADU.
* `refcat.parquet` - the simulated reference catalog: `id`, `ra`, `dec` (deg, ICRS, epoch 2016.0),
  `u g r i z y` (true mags), `pm_ra` (mas/yr, includes cos dec), `pm_dec` (mas/yr), `epoch`,
  `bright` (the very bright star placed in every detector).  The transient and its host
  are not in it.
* `stars.parquet` - one row per (science exposure, detector, star whose centre is on the
  detector): `expname`, `visit`, `detector`, `band`, `star_id`, `x`, `y` (0-based assembled,
  through the true WCS at the epoch of the exposure), `ra_obs`, `dec_obs`, `mag`,
  `flux_top_e` (e- before the response), `response` (the PSF-weighted pixel response at the
  star; pixels off the detector count 0), `flux_e` (= flux_top_e * response: the expected
  electrons deposited in the raw frame), `fwhm_px`, `sigma_x_px`, `sigma_y_px`
  (core sigmas of the PSF: (1-f) G(s) + f G(2 s), f = {wing}), `saturated`.
* `transient.parquet` - one row per science exposure/detector holding the transient:
  `mjd` (mid-exposure), `band`, `mag`, `zp`, `exptime`, `flux_top_e` (= 10**(-0.4 (mag - zp)) exptime),
  `response`, `flux_e` (= flux_top_e * response), `x`, `y`, `ra`, `dec`, `fwhm_px`,
  host galaxy (`host_mag`, `host_flux_e`, `host_x`, `host_y`, `host_sigma_px`: a Gaussian
  convolved with the PSF).  Light curve: `surveyred.simulate.transient_mag` with the
  parameters in `manifest.yaml`.
* `trail.parquet` - the satellite trail (presets with one; otherwise no rows): one row per
  exposure and detector it crosses: `expname`, `visit`, `night`, `band`, `detector`, `mjd`,
  segment endpoints `x0, y0, x1, y1` (0-based assembled pixels) and `ra0, dec0, ra1, dec1`
  (deg, through the true WCS), `width_px` (Gaussian sigma of the cross-section), `peak_e`
  (e- per pixel on the centre line before the response), `line_flux_e` (= peak_e sqrt(2 pi)
  width_px: e- per pixel of length), `sb_mag_arcsec2` (centre-line surface brightness, mag per
  arcsec^2 with the exposure's zp), `mean_response` (pixel response on the trail),
  `n_trail_px` (pixels flagged TRAIL in the truth mask), `zp`, `exptime`.  Profile:
  `T = peak_e exp(-d^2 / (2 width_px^2))`, `d` the distance of the pixel centre from the
  segment; its photons `Poisson(R T)` come from their own random stream.
* `cosmics.parquet` - one row per cosmic-ray pixel of every frame (calibrations too):
  `expname`, `detector`, `event`, `x`, `y` (assembled), `deposit_e`.
* `bias_<det>.fits` - the fixed bias in ADU (assembled, overscan-free): per-amp offset +
  smooth structure + hot columns (+{hot} ADU) + hot pixels.  Header `OFFSET<amp>` = amp offset
  (the mean overscan level apart from the per-exposure drift).  A master bias made
  after overscan subtraction should equal `bias - offset` of each amp.
* `flat_<band>_<det>.fits` - the true pixel response (assembled), normalised to mean 1 over
  the detector; header `RESPMEAN` = the mean of the unnormalised response (1 at the boresight).
* `defects_<det>.fits` - uint8 (assembled): 1 = defect (dead columns with response
  {dead}, hot columns, hot pixels).
* `truthmask_<expname>_<det>.fits` - science exposures only, uint8 (assembled) with
  surveyred.masks bits: BAD=1 (defects), SAT=2 (raw value at saturation: saturated cores and
  bleed trails), CR=4 (pixels hit by cosmic rays), TRAIL=8 (within 3 sigma of a satellite
  trail's centre line).

## Schedule
Night k (0-based) is the evening 2024-02-20 + int(3.5 k) days.  Calibrations (when the
preset takes them that night) run from 20:00 UTC of the evening date; science visits are
centred on 04:30 UTC of the next date; so `night` = UTC date of (time - 12 h).
{calibration_note}
"""


def simulate_survey(outdir: str | Path, *, preset: str = "tiny", seed: int = 1,
                    instrument: str | Instrument = "simcam", detectors: str | Iterable[int | str] | None = None,
                    nights: int | None = None, threads: int = 1) -> dict[str, Any]:
    """Write a simulated survey and its truth under ``outdir``.

    Parameters
    ----------
    outdir : path
        Output directory (``raw/`` and ``truth/`` are created in it).
    preset : {"tiny", "demo", "smoke"}
        See :data:`PRESETS`.
    seed : int
        Same seed, same bits.
    instrument : str or Instrument
        Instrument name or description (default SimCam).
    detectors : list of ids/names or "0,1", optional
        Detectors to simulate (default: all good detectors).  For integer-HDU
        instruments, detectors not simulated but below the highest HDU written
        are header-only placeholder HDUs (``SIMSKIP = T``) so HDU numbers stay.
    nights : int, optional
        Number of nights instead of the preset's.
    threads : int
        Detectors of an exposure simulated in parallel.

    Returns
    -------
    dict
        ``outdir``, ``raw`` (list of raw paths), ``truth`` (name -> path),
        ``counts`` ({night: {obstype or "science_<band>": n}}), ``n_exposures``.
    """
    t0 = time.perf_counter()
    inst = _as_instrument(instrument)
    p = get_preset(preset)
    dets = select_detectors(inst, detectors)
    out = Path(outdir)
    truth_dir = out / "truth"
    model = CameraModel(inst, seed)
    plan = plan_survey(inst, p, seed, nights=nights)
    bands = sorted({s.band for s in plan if s.obstype != "bias"}, key=BANDS.index)
    catalog = make_catalog(model, dets) if any(s.obstype == "science" for s in plan) else _finish_catalog(
        pd.DataFrame(columns=["id", "ra", "dec", "r", "gr", "ri", "iz", "pm_ra", "pm_dec", "bright"]))
    transient = make_transient(model, dets[0])
    exp_rows, amp_rows, star_tabs, cr_tabs, tr_rows, trail_rows = [], [], [], [], [], []
    raw_paths: list[str] = []
    truth: dict[str, str] = {}
    counts: dict[str, dict[str, int]] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, int(threads))) if threads and threads > 1 else None
    try:
        for spec in plan:
            def one(det: Detector, spec=spec) -> Frame:
                tr = p.trail if p.trail is not None and p.trail.matches(spec, det, p.bands) else None
                return render_frame(model, spec, det, catalog, transient, keep_images=False, trail=tr)

            frames = list(pool.map(one, dets)) if pool else [one(d) for d in dets]
            rel = Path("raw") / spec.night / f"{spec.expname}.fits"
            _write_fits(_raw_hdulist(inst, primary_header(model, spec, preset=p.name), frames), out / rel)
            raw_paths.append(str(out / rel))
            key = spec.obstype if spec.obstype != "science" else f"science_{spec.band}"
            if spec.obstype == "flat":
                key = f"flat_{spec.band}"
            counts.setdefault(spec.night, {}).setdefault(key, 0)
            counts[spec.night][key] += 1
            for f in frames:
                row = _exposure_row(model, spec, f, str(rel))
                exp_rows.append(row)
                a = f.amps.copy()
                a.insert(0, "detector", f.det.id)
                a.insert(0, "expname", spec.expname)
                amp_rows.append(a)
                if len(f.cosmics):
                    c = f.cosmics.copy()
                    c.insert(0, "detector", f.det.id)
                    c.insert(0, "expname", spec.expname)
                    cr_tabs.append(c)
                if spec.obstype == "science":
                    s = f.stars.copy()
                    for i, (k, v) in enumerate((("expname", spec.expname), ("visit", spec.expnum),
                                                ("detector", f.det.id), ("band", spec.band))):
                        s.insert(i, k, v)
                    star_tabs.append(s)
                    mpath = truth_dir / f"truthmask_{spec.expname}_{truth_tag(f.det)}.fits"
                    mh = fits.Header()
                    mh["EXPNAME"], mh["CCDNUM"], mh["EXTNAME"] = spec.expname, f.det.id, "TRUTHMASK"
                    with warnings.catch_warnings():  # MP_SUSPECT/MP_CLIPPED become HIERARCH cards
                        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
                        masks.write_planes(mh)
                    _write_fits(fits.HDUList([fits.PrimaryHDU(f.mask, header=mh)]), mpath)
                    if f.transient is not None:
                        tr_rows.append(dict(expname=spec.expname, visit=spec.expnum, night=spec.night,
                                            detector=f.det.id, **f.transient))
                    if f.trail is not None:
                        trail_rows.append(dict(expname=spec.expname, visit=spec.expnum, night=spec.night,
                                               band=spec.band, detector=f.det.id, mjd=spec.mjd_mid, **f.trail))
            log.info("%s %s %-7s %-3s %d detector(s) -> %s", spec.night, spec.expname, spec.obstype,
                     spec.band if spec.obstype != "bias" else "", len(frames), rel)
    finally:
        if pool:
            pool.shutdown()

    # fixed truth images
    for det in dets:
        dt = model.detector_truth(det)
        h = fits.Header()
        h["EXTNAME"], h["CCDNUM"], h["BUNIT"] = "BIAS", det.id, "adu"
        for amp in det.amps:
            if len(f"OFFSET{amp.name}") <= 8:
                h[f"OFFSET{amp.name}"] = (dt.amp_offsets[amp.name], "[adu] amp bias offset (overscan level)")
        path = truth_dir / f"bias_{truth_tag(det)}.fits"
        _write_fits(fits.HDUList([fits.PrimaryHDU(dt.bias_adu.astype(np.float32), header=h)]), path)
        truth[f"bias_{truth_tag(det)}"] = str(path)
        dh = fits.Header()
        dh["EXTNAME"], dh["CCDNUM"] = "DEFECTS", det.id
        path = truth_dir / f"defects_{truth_tag(det)}.fits"
        _write_fits(fits.HDUList([fits.PrimaryHDU(dt.defects.astype(np.uint8), header=dh)]), path)
        truth[f"defects_{truth_tag(det)}"] = str(path)
        for band in bands:
            resp = model.response(det, band)
            mean = float(resp.mean(dtype=np.float64))
            fh = fits.Header()
            fh["EXTNAME"], fh["CCDNUM"], fh["BAND"] = "FLAT", det.id, band
            fh["RESPMEAN"] = (mean, "mean unnormalised response")
            path = truth_dir / f"flat_{band}_{truth_tag(det)}.fits"
            _write_fits(fits.HDUList([fits.PrimaryHDU((resp / np.float32(mean)).astype(np.float32), header=fh)]), path)
            truth[f"flat_{band}_{truth_tag(det)}"] = str(path)

    tables = {
        "exposures": pd.DataFrame(exp_rows),
        "amps": pd.concat(amp_rows, ignore_index=True) if amp_rows else pd.DataFrame(),
        "stars": pd.concat(star_tabs, ignore_index=True) if star_tabs else pd.DataFrame(),
        "cosmics": pd.concat(cr_tabs, ignore_index=True) if cr_tabs else pd.DataFrame(
            columns=["expname", "detector", "event", "x", "y", "deposit_e"]),
        "transient": pd.DataFrame(tr_rows),
        "trail": pd.DataFrame(trail_rows, columns=_TRAIL_COLUMNS),
        "refcat": catalog,
    }
    for name, df in tables.items():
        path = truth_dir / f"{name}.parquet"
        _write_parquet(df, path)
        truth[name] = str(path)

    # the reference catalog also as a local store (surveyred.refcat): OUTDIR/refcat/sim
    from .refcat import write_simulated_refcat

    write_simulated_refcat(catalog, out / "refcat", name="sim")
    truth["refcat_store"] = str(out / "refcat" / "sim")

    # the transient's position as a user-position list for forced photometry
    # (config forced.positions), as a survey team would supply known supernovae
    _write_text(f"name,ra,dec\nSN-sim,{transient.ra:.8f},{transient.dec:.8f}\n", out / "transients.csv")
    truth["transients_csv"] = str(out / "transients.csv")

    gains = {"instrument": inst.name, "detectors": {}}
    for det in dets:
        dt = model.detector_truth(det)
        gains["detectors"][int(det.id)] = {
            "name": det.name,
            "amps": {a.name: {"gain": a.gain, "read_noise": a.read_noise, "saturation": a.saturation,
                              "bias_offset_adu": float(dt.amp_offsets[a.name]),
                              "full_well_e": dt.full_well_amp[a.name]} for a in det.amps},
        }
    _write_text(yaml.safe_dump(gains, sort_keys=False), truth_dir / "gain.yaml")
    truth["gain"] = str(truth_dir / "gain.yaml")

    cal_nights = sorted({s.night for s in plan if s.obstype in ("bias", "flat")})
    all_nights = sorted({s.night for s in plan})
    cal_note = ("Calibrations on every night." if cal_nights == all_nights else
                f"Calibrations only on nights {', '.join(cal_nights)}; other nights "
                f"({', '.join(n for n in all_nights if n not in cal_nights)}) must use the nearest valid ones.")
    _write_text(TRUTH_README.format(
        version=__version__, instrument=inst.name, preset=p.name, seed=seed,
        detectors=", ".join(f"{d.id} ({d.name})" for d in dets), margin=FULL_WELL_MARGIN_ADU,
        distortion=model.distortion, jitter=BIAS_ROW_JITTER_ADU, drift=BIAS_DRIFT_ADU, wing=WING_FRAC,
        hot=HOT_COLUMN_ADU, dead=DEAD_RESPONSE, calibration_note=cal_note), truth_dir / "README.md")
    truth["readme"] = str(truth_dir / "README.md")

    manifest = {
        "software": "surveyred", "version": __version__, "preset": p.name, "preset_description": p.description,
        "seed": int(seed), "instrument": inst.name, "instrument_file": Path(inst.source).name,
        "detectors": [int(d.id) for d in dets], "nights": all_nights, "calibration_nights": cal_nights,
        "bands": bands, "n_exposures": len(plan), "counts": counts,
        "field": {"ra": FIELD_RA, "dec": FIELD_DEC},
        "distortion_k_per_px2": model.distortion,
        "transient": {"ra": transient.ra, "dec": transient.dec, "detector": int(transient.detector),
                      "host_ra": transient.host_ra, "host_dec": transient.host_dec,
                      "host_sigma_arcsec": transient.host_sigma_arcsec,
                      "model": "bazin", "bands": {b: transient.params(b) for b in bands}},
        "trail": None if p.trail is None else {k: (list(v) if isinstance(v, tuple) else v)
                                               for k, v in dataclasses.asdict(p.trail).items()},
    }
    _write_text(yaml.safe_dump(manifest, sort_keys=False), truth_dir / "manifest.yaml")
    truth["manifest"] = str(truth_dir / "manifest.yaml")
    log.info("simulated %d exposures x %d detector(s) in %.1f s", len(plan), len(dets), time.perf_counter() - t0)
    return {"outdir": str(out), "raw": raw_paths, "truth": truth, "counts": counts, "n_exposures": len(plan),
            "detectors": [d.id for d in dets], "nights": all_nights, "calibration_nights": cal_nights}


_TRAIL_COLUMNS = ["expname", "visit", "night", "band", "detector", "mjd", "x0", "y0", "x1", "y1", "ra0", "dec0",
                  "ra1", "dec1", "width_px", "peak_e", "line_flux_e", "sb_mag_arcsec2", "mean_response",
                  "n_trail_px", "zp", "exptime"]


def _exposure_row(model: CameraModel, spec: ExposureSpec, f: Frame, rel: str) -> dict[str, Any]:
    cosd = math.cos(math.radians(spec.dec_true))
    row = dict(
        file=rel, expname=spec.expname, visit=spec.expnum, night=spec.night, night_index=spec.night_index,
        obstype=spec.obstype, obstype_header=_obstype_value(model.instrument, spec.obstype), band=spec.band,
        physical_filter=spec.physical_filter, exptime=spec.exptime, date_obs=spec.date_obs, mjd_obs=spec.mjd,
        mjd_mid=spec.mjd_mid, airmass=spec.airmass, detector=f.det.id, detector_name=f.det.name,
        hdu=str(f.det.hdu), ra_tel=spec.ra_tel, dec_tel=spec.dec_tel, ra_true=spec.ra_true, dec_true=spec.dec_true,
        rot_true_deg=spec.rot_true_deg, hdr_dra_arcsec=(spec.ra_tel - spec.ra_true) * cosd * 3600.0,
        hdr_ddec_arcsec=(spec.dec_tel - spec.dec_true) * 3600.0, flat_level_e=spec.flat_level,
        sky_e=np.nan, sky0_e=spec.sky0 if spec.obstype == "science" else np.nan, zp=np.nan, zp_calexp=np.nan,
        psf_fwhm_px=np.nan, psf_fwhm0=spec.fwhm0, psf_radial=spec.psf_radial, psf_tilt_x=spec.psf_tilt_x,
        psf_tilt_y=spec.psf_tilt_y, psf_e0=spec.psf_e0, psf_e1=spec.psf_e1, n_stars=0,
    )
    row.update(f.info)
    if spec.obstype == "science":
        row["wcs_true"] = wcs_header_string(model, spec, f.det, true=True)
        row["wcs_header"] = wcs_header_string(model, spec, f.det, true=False)
    else:
        row["wcs_true"] = row["wcs_header"] = ""
    return row


# -- command line -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="surveyred simulate",
        description="Write a simulated raw survey (OUTDIR/raw/<night>/*.fits) and its truth (OUTDIR/truth/).",
    )
    parser.add_argument("outdir", help="output directory")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                        help="; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()))
    parser.add_argument("--seed", type=int, default=1, help="random seed (same seed, same bits)")
    parser.add_argument("--instrument", default="simcam", help="instrument name or YAML path (default simcam)")
    parser.add_argument("--detectors", default=None,
                        help="comma-separated detector ids or names (default: all good detectors)")
    parser.add_argument("--nights", type=int, default=None, help="number of nights (default: the preset's)")
    common_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log)

    def body() -> None:
        simulate_survey(args.outdir, preset=args.preset, seed=args.seed, instrument=args.instrument,
                        detectors=args.detectors, nights=args.nights, threads=args.threads)

    return run(body, what=f"simulate {args.preset} {args.instrument} -> {args.outdir}")
