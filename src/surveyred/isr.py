"""Instrument signature removal (ISR).

Per detector: overscan, trim and amplifier assembly, optional linearity, gain
to electrons, master bias, master flat, saturation and defect masking,
cosmic-ray masking and a variance plane (Poisson + read noise), written as the
calibrated exposure ``{visit}_{det}.fits`` with IMAGE (float32, electrons),
MASK (int32 planes of :mod:`surveyred.masks`) and VARIANCE (float32, e-^2).

:func:`run_isr` is the I/O-free science function; :func:`isr_exposure` reads
one raw exposure and its masters and writes every detector's calexp, all or
none; :func:`main` is ``surveyred isr``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from astropy.io import fits

from . import fitsio, masks
from .calib import CalibConfig, OverscanConfig, _detectors, _large_scale, assemble_detector, read_master
from .errors import ConfigError, CorruptInput, MissingCalibration, MissingKeyword, UnknownFilter
from .instrument import Detector, Instrument, load_instrument
from .kernels import find_cosmic_rays
from .provenance import add_provenance

log = logging.getLogger("surveyred.isr")


@dataclass(frozen=True)
class CosmicRayConfig:
    """Cosmic-ray detection (see :func:`surveyred.kernels.find_cosmic_rays`).

    ``psf_sigma`` is the smallest PSF Gaussian sigma (pixels) a real source
    can have: anything sharper is a cosmic ray.
    """

    nsigma: float = 6.0
    cond: float = 3.0
    psf_sigma: float = 1.0
    grow: int = 1

    def validate(self) -> "CosmicRayConfig":
        if self.nsigma <= 0 or self.cond < 0 or self.psf_sigma <= 0 or self.grow < 0:
            raise ConfigError("cosmic_rays: nsigma > 0, cond >= 0, psf_sigma > 0, grow >= 0 required")
        return self


@dataclass(frozen=True)
class IsrConfig:
    """Which ISR steps run (``do_<step>`` switches) and their parameters."""

    do_overscan: bool = True
    do_linearity: bool = True
    do_bias: bool = True
    do_flat: bool = True
    do_saturation: bool = True
    do_defects: bool = True
    do_cosmic_rays: bool = True
    cosmic_rays: CosmicRayConfig = field(default_factory=CosmicRayConfig)
    background_box: int = 64

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any] | None) -> "IsrConfig":
        doc = dict(doc or {})
        try:
            cr = CosmicRayConfig(**(doc.pop("cosmic_rays", None) or {}))
            return cls(cosmic_rays=cr, **doc).validate()
        except TypeError as exc:
            raise ConfigError(f"isr configuration: {exc}") from exc

    def validate(self) -> "IsrConfig":
        self.cosmic_rays.validate()
        if self.background_box < 8:
            raise ConfigError("isr.background_box must be >= 8")
        return self


def run_isr(
    raw: np.ndarray,
    det: Detector,
    cfg: IsrConfig = IsrConfig(),
    *,
    overscan: OverscanConfig = OverscanConfig(),
    bias: np.ndarray | None = None,
    flat: np.ndarray | None = None,
    defects: np.ndarray | None = None,
    bias_variance: np.ndarray | None = None,
    flat_variance: np.ndarray | None = None,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Calibrate one raw detector.

    Parameters
    ----------
    raw : ndarray
        Raw detector HDU pixels (ADU).
    det : Detector
        With resolved sections.
    cfg : IsrConfig
    overscan : OverscanConfig
    bias : ndarray, optional
        Master bias (electrons), required when ``cfg.do_bias``.
    flat : ndarray, optional
        Master flat, required when ``cfg.do_flat``.
    defects : ndarray, optional
        Defect mask (BAD plane) applied when ``cfg.do_defects``.
    bias_variance, flat_variance : ndarray, optional
        The masters' variances, propagated into the variance plane.

    Returns
    -------
    image, mask, variance : ndarray
        float32 electrons, int32 mask planes, float32 electrons squared.

    Notes
    -----
    See :func:`surveyred.calib.assemble_detector` for the pixel formula.
    Cosmic rays are found on the image minus a block-median background
    (``background_box`` pixels) and flagged CR.
    """
    if cfg.do_bias and bias is None:
        raise MissingCalibration(f"detector {det.name}: ISR needs a master bias (isr.do_bias)")
    if cfg.do_flat and flat is None:
        raise MissingCalibration(f"detector {det.name}: ISR needs a master flat (isr.do_flat)")
    image, variance, mask = assemble_detector(
        raw, det,
        overscan=overscan if cfg.do_overscan else None,
        linearity=cfg.do_linearity,
        bias=bias if cfg.do_bias else None,
        flat=flat if cfg.do_flat else None,
        defects=defects if cfg.do_defects else None,
        saturation=cfg.do_saturation,
        bias_variance=bias_variance if cfg.do_bias else None,
        flat_variance=flat_variance if cfg.do_flat else None,
        threads=threads,
    )
    if cfg.do_cosmic_rays:
        ignore = masks.SAT | masks.BAD | masks.NO_DATA
        masked = np.where((mask & ignore) == 0, image, np.nan)
        background = _large_scale(masked, cfg.background_box).astype(np.float32)
        cr = find_cosmic_rays(
            image, variance, mask, background=background,
            psf_sigma=cfg.cosmic_rays.psf_sigma, nsigma=cfg.cosmic_rays.nsigma,
            cond=cfg.cosmic_rays.cond, grow=cfg.cosmic_rays.grow, ignore_bits=ignore, threads=threads,
        )
        mask |= cr
    return image, mask, variance


# -- I/O -----------------------------------------------------------------------------

def _keyword(instrument: Instrument, field_: str, headers: Sequence[fits.Header], path: str, *, required=True):
    key = instrument.keywords.get(field_)
    if key is None:
        if required:
            raise MissingKeyword(f"instrument {instrument.name} maps no keyword for {field_}", path=path)
        return None
    for h in headers:
        if key in h and str(h[key]).strip() != "":
            return h[key]
    if required:
        raise MissingKeyword(f"missing header keyword {key} ({field_})", path=path)
    return None


def _wcs_cards(header: fits.Header) -> fits.Header:
    """The celestial WCS of a raw header (with SIP), or an empty header."""
    from astropy.wcs import WCS, FITSFixedWarning

    ctype = str(header.get("CTYPE1", ""))
    if not ctype.startswith(("RA", "DEC", "GLON", "ELON")):
        return fits.Header()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        wcs = WCS(header)
        return wcs.to_header(relax=True)


EXPOSURE_CARDS = ("exptime", "date", "ra", "dec", "airmass", "object", "filter")


def isr_exposure(
    raw_path: str | os.PathLike,
    instrument: Instrument,
    *,
    visit: str,
    band: str | None,
    night: str | None,
    bias_dir: str | os.PathLike | None,
    flat_dir: str | os.PathLike | None,
    detectors: Sequence[Detector],
    outdir: str | os.PathLike,
    cfg: IsrConfig,
    calib_cfg: CalibConfig,
    threads: int = 1,
    config: Mapping | None = None,
) -> list[Path]:
    """Calibrate every listed detector of one raw exposure; write all or none.

    Raises
    ------
    MissingCalibration
        When a needed master is absent, for another detector, or not valid
        for the frame's night.
    CorruptInput, MissingKeyword, UnknownFilter, ShapeMismatch
        For a damaged or mislabelled raw file.
    """
    raw_path = str(raw_path)
    if cfg.do_bias and bias_dir is None:
        raise MissingCalibration(f"no master bias valid for night {night} (visit {visit})", path=raw_path)
    if cfg.do_flat and flat_dir is None:
        raise MissingCalibration(f"no master flat in band {band} valid for night {night} (visit {visit})",
                                 path=raw_path)
    written = []
    with fitsio.open_fits(raw_path) as hdul:
        primary = hdul[0].header
        exptime = _keyword(instrument, "exptime", [primary], raw_path)
        try:
            exptime = float(exptime)
        except (TypeError, ValueError):
            raise MissingKeyword(f"exposure time {exptime!r} is not a number", path=raw_path) from None
        date = str(_keyword(instrument, "date", [primary], raw_path))
        physical = _keyword(instrument, "filter", [primary], raw_path, required=cfg.do_flat)
        info = instrument.band_of(physical)
        if cfg.do_flat and info is None:
            raise UnknownFilter(f"filter {physical!r} is not in instrument {instrument.name}'s filter map",
                                path=raw_path)
        if band is not None and info is not None and info.band != band:
            raise CorruptInput(f"header filter {physical!r} is band {info.band}, inventory says {band}",
                               path=raw_path)
        # read and check every detector before writing anything
        frames = []
        for det in detectors:
            data, header = fitsio.read_image(hdul, det.hdu, raw_path)
            rdet = det.resolved(header, where=raw_path)
            rdet.check_raw_shape(data.shape, where=raw_path)
            frames.append((rdet, data, header))
        for rdet, data, header in frames:
            bias = flat = None
            variances = {}
            defects = np.zeros(rdet.shape, dtype=masks.MASK_DTYPE)
            inputs = [raw_path]
            for kind, directory, on in (("bias", bias_dir, cfg.do_bias), ("flat", flat_dir, cfg.do_flat)):
                if not on:
                    continue
                mpath = Path(directory) / f"{kind}_{rdet.id}.fits"
                img, dfx, variances[kind] = read_master(mpath, kind=kind, det=rdet, night=night, date=date)
                if img.shape != rdet.shape:
                    raise MissingCalibration(f"shape {img.shape} differs from detector {rdet.shape}", path=mpath)
                if dfx is not None:
                    defects |= dfx
                inputs.append(str(mpath))
                bias, flat = (img, flat) if kind == "bias" else (bias, img)
            log.info("ISR %s detector %s", visit, rdet.name)
            image, mask, variance = run_isr(
                data, rdet, cfg, overscan=calib_cfg.overscan, bias=bias, flat=flat, defects=defects,
                bias_variance=variances.get("bias"), flat_variance=variances.get("flat"), threads=threads,
            )
            ph = fits.Header()
            ph["VISIT"] = (str(visit), "visit (exposure) id")
            ph["NIGHT"] = (str(night), "observing night YYYYMMDD")
            ph["DETECTOR"] = (rdet.id, "detector id")
            ph["DETNAME"] = (rdet.name, "detector name")
            ph["INSTRUME"] = (instrument.name, "surveyred instrument")
            ph["BAND"] = (band or (info.band if info else ""), "band")
            ph["FILTER"] = (str(physical or ""), "physical filter")
            ph["EXPTIME"] = (exptime, "exposure time (s)")
            ph["DATE-OBS"] = (date, "start of exposure (UTC)")
            for field_ in ("ra", "dec", "airmass", "object"):
                value = _keyword(instrument, field_, [primary, header], raw_path, required=False)
                if value is not None:
                    ph[field_.upper()] = value
            for amp in rdet.amps:
                ph[f"GAIN{amp.name}"] = (amp.gain, f"amp {amp.name} gain (e-/ADU)")
                ph[f"RDNOIS{amp.name}"] = (amp.read_noise, f"amp {amp.name} read noise (e-)")
                ph[f"SATUR{amp.name}"] = (amp.saturation * amp.gain, f"amp {amp.name} saturation (e-)")
            ph["ISRSTEPS"] = (",".join(f.name[3:] for f in dataclasses.fields(cfg)
                                       if f.name.startswith("do_") and getattr(cfg, f.name)), "ISR steps applied")
            add_provenance(ph, step="isr", inputs=inputs,
                           params={"isr": dataclasses.asdict(cfg), "overscan": dataclasses.asdict(calib_cfg.overscan)},
                           config=config)
            ih = _wcs_cards(header) or _wcs_cards(primary)
            hdus = fitsio.exposure_hdus(image, mask, variance, primary_header=ph, image_header=ih)
            written.append((Path(outdir) / f"{visit}_{rdet.id}.fits", hdus))
    fitsio.write_all(written)
    return [p for p, _ in written]


def main(argv: list[str] | None = None) -> int:
    from .runtime import common_arguments, json_arg, run, set_threads, setup_logging

    p = argparse.ArgumentParser(prog="surveyred isr", description=(
        "Instrument signature removal of one raw exposure: writes OUTDIR/{visit}_{det}.fits "
        "(IMAGE, MASK, VARIANCE) for every detector, all or none."))
    p.add_argument("raw", help="raw exposure (multi-extension FITS)")
    p.add_argument("--instrument", required=True)
    p.add_argument("--visit", required=True)
    p.add_argument("--band", default=None)
    p.add_argument("--night", default=None, help="observing night YYYYMMDD (for master validity)")
    p.add_argument("--bias-dir", required=True, help="directory of bias_<det>.fits, or 'none'")
    p.add_argument("--flat-dir", required=True, help="directory of flat_<det>.fits, or 'none'")
    p.add_argument("--detectors", default=None)
    p.add_argument("--outdir", required=True)
    p.add_argument("--config-json", default=None, help='{"isr": {...}, "calib": {...}} as JSON')
    common_arguments(p)
    args = p.parse_args(argv)
    setup_logging(args.log)

    def body():
        set_threads(args.threads)
        doc = json_arg(args.config_json)
        cfg = IsrConfig.from_dict(doc.get("isr"))
        calib_cfg = CalibConfig.from_dict(doc.get("calib"))
        instrument = load_instrument(args.instrument)
        none = lambda v: None if v is None or v.lower() == "none" else v  # noqa: E731
        isr_exposure(
            args.raw, instrument, visit=args.visit, band=args.band, night=args.night,
            bias_dir=none(args.bias_dir), flat_dir=none(args.flat_dir),
            detectors=_detectors(instrument, args.detectors), outdir=args.outdir,
            cfg=cfg, calib_cfg=calib_cfg, threads=args.threads, config=doc,
        )

    return run(body, what=f"isr {args.visit}")
