"""The per-visit calibrate job: astrometry and photometry of every detector's sources.

``surveyred calibrate`` reads, for one visit, each detector's source catalog
(``results/src/{night}/{visit}_{det}.parquet`` from characterize), its
calexp headers (the header WCS, exposure time, date) and optionally its PSF
product, loads the astrometric and photometric reference catalogs
(:mod:`surveyred.refcat`) around the detector, and writes

* ``calsrc/{night}/{visit}_{det}.parquet``: every ``src`` column plus

  ==================  ====================================================
  ``ra``, ``dec``     deg (ICRS, exposure epoch), through the fitted WCS
                      (the header WCS when the detector is not absolutely calibrated)
  ``mag``, ``mag_err``  calibrated AB magnitude ``-2.5 log10(psf_flux_apcorr / exptime) + ZP``
  ``flux_njy``, ``flux_njy_err``  ``psf_flux_apcorr`` in nJy (``10**(-0.4 (mag - 31.4))``)
  ``ref_id``          int64 id of the matched astrometric reference star (-1: none)
  ``ref_sep_mas``     distance to it after the fit (mas; NaN: none)
  ``astrom_used``     bool, kept in the final astrometric fit
  ``photom_ref_id``   int64 id of the photometric reference star (-1: none)
  ``photom_used``     bool, kept in the zero-point fit
  ==================  ====================================================

  with the src schema metadata plus ``epoch`` (Julian year of mid-exposure),
  ``zero_point``, ``zero_point_err``, ``colour_term``, ``astrom_rms_mas``,
  ``n_match``, ``abscal``, ``calibrate_status``, ``calibrate_failure_class``
  (status ``ok``, ``not_absolutely_calibrated`` or ``failed``) and provenance
  (``calibrate_software_version``, ``calibrate_git_revision``,
  ``calibrate_config_hash``, ``calibrate_inputs``);
* ``wcs/{night}/{visit}_{det}.fits``: a data-less PRIMARY HDU with the fitted
  TAN-SIP (``CTYPE``, ``CRVAL``, ``CRPIX``, ``CD``, ``A_*``/``B_*``,
  ``AP_*``/``BP_*``) and ``ZP``, ``ZPERR``, ``COLTERM``, ``ASTRMS`` (mas),
  ``NMATCH``, ``NPHOTREF``, ``STATUS``, ``FAILCLS``, ``ABSCAL`` (T/F),
  ``VISIT``, ``NIGHT``, ``DETECTOR``, ``BAND``, ``REFBAND``, ``MJD-AVG``
  (mid-exposure), ``IMAGEW``, ``IMAGEH`` and provenance;
* ``visit_summary/{night}/{visit}.parquet``: one row per detector: ``visit``,
  ``night``, ``band``, ``detector``, ``psf_fwhm`` (px), ``sky`` (e-/px),
  ``zero_point``, ``zero_point_err``, ``colour_term``, ``astrom_rms_mas``,
  ``n_match``, ``n_sources``, ``abscal``, ``status``, ``failure_class``, ``cause``.

A detector that fails (its characterize status, or a calibration error) is
recorded with its failure class; the job exits non-zero (one line
``FailureClass: file: cause``) only when every detector failed.  A field that
no reference star reaches (e.g. CAHA NGC 2420 offline, or ``--refcat-astrom
none``) is not a failure: the header WCS is kept, ``ABSCAL = F`` and status
``not_absolutely_calibrated``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits

from . import fitsio, refcat
from .astrometry import AstrometryConfig, SipWcs, calibrate_astrometry, nn_match, tan_project
from .errors import ConfigError, CorruptInput, NoReferenceMatch, SurveyredError
from .photometry import PhotometryConfig, calibrated_magnitudes, fit_zero_point, instrumental_mag
from . import __version__
from .provenance import add_provenance, config_hash, git_revision
from .runtime import common_arguments, json_arg, run, set_threads, setup_logging

log = logging.getLogger("surveyred.calibrate")

STATUS_OK = "ok"
STATUS_RELATIVE = "not_absolutely_calibrated"
STATUS_FAILED = "failed"


@dataclass(frozen=True)
class CalibrateConfig:
    """``calibrate`` section of the configuration."""

    do_photometry: bool = True
    photometry_match_arcsec: float = 1.0
    astrometry: AstrometryConfig = field(default_factory=AstrometryConfig)
    photometry: PhotometryConfig = field(default_factory=PhotometryConfig)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any] | None) -> "CalibrateConfig":
        doc = dict(doc or {})
        astro = AstrometryConfig.from_dict(doc.pop("astrometry", None))
        phot = PhotometryConfig.from_dict(doc.pop("photometry", None))
        doc.pop("jointcal", None)
        doc.pop("do_jointcal", None)
        try:
            return cls(astrometry=astro, photometry=phot, **doc).validate()
        except TypeError as exc:
            raise ConfigError(f"calibrate configuration: {exc}") from exc

    def validate(self) -> "CalibrateConfig":
        if self.photometry_match_arcsec <= 0:
            raise ConfigError("calibrate.photometry_match_arcsec must be > 0")
        self.astrometry.validate()
        self.photometry.validate()
        return self


# -- science (I/O free) --------------------------------------------------------------------


@dataclass
class DetectorCalibration:
    """Everything calibrate produces for one detector."""

    calsrc: pd.DataFrame
    wcs: SipWcs
    zero_point: float = float("nan")
    zero_point_err: float = float("nan")
    colour_term: float = float("nan")
    astrom_rms_mas: float = float("nan")
    n_match: int = 0
    n_photref: int = 0
    abscal: bool = False
    status: str = STATUS_OK
    failure_class: str = ""
    cause: str = ""


def calibrate_detector(sources: pd.DataFrame, header_wcs: SipWcs, *, shape: tuple[int, int], exptime: float,
                       astrom_ref: pd.DataFrame | None, photom_ref: pd.DataFrame | None, refcat_band: str,
                       config: CalibrateConfig = CalibrateConfig(), what: str = "detector") -> DetectorCalibration:
    """Astrometric and photometric calibration of one detector's sources (no I/O).

    ``astrom_ref``/``photom_ref`` are reference stars at the exposure epoch
    (``None`` or empty: no reference catalog reaches the field, giving a
    ``not_absolutely_calibrated`` result on the header WCS).  Errors of the
    astrometric fit (:class:`NoReferenceMatch` with stars present,
    :class:`TooFewMatches`, :class:`PoorAstrometricFit`) propagate.
    """
    out = sources.copy().reset_index(drop=True)
    n = len(out)
    out["ref_id"] = np.full(n, -1, np.int64)
    out["ref_sep_mas"] = np.full(n, np.nan)
    out["astrom_used"] = np.zeros(n, bool)
    out["photom_ref_id"] = np.full(n, -1, np.int64)
    out["photom_used"] = np.zeros(n, bool)
    result = DetectorCalibration(calsrc=out, wcs=header_wcs)
    if astrom_ref is None or len(astrom_ref) == 0:
        result.status, result.failure_class = STATUS_RELATIVE, "NoReferenceMatch"
        result.cause = f"{what}: no astrometric reference stars in the field; header WCS kept"
        wcs = header_wcs
    else:
        ast = calibrate_astrometry(sources.reset_index(drop=True), astrom_ref, header_wcs, shape=shape,
                                   config=config.astrometry, ref_band=refcat_band, what=what)
        wcs = ast.wcs
        result.wcs, result.astrom_rms_mas, result.n_match = wcs, ast.rms_mas, ast.n_match
        m = ast.matches
        out.loc[m["src_index"].to_numpy(), "ref_id"] = m["ref_id"].to_numpy(np.int64)
        out.loc[m["src_index"].to_numpy(), "ref_sep_mas"] = np.hypot(m["dxi_mas"], m["deta_mas"]).to_numpy()
        out.loc[m["src_index"].to_numpy(), "astrom_used"] = True
        result.abscal = True
    ra, dec = wcs.pixel_to_sky(out["x"].to_numpy(float), out["y"].to_numpy(float))
    out["ra"], out["dec"] = ra, dec
    flux_col = "psf_flux_apcorr" if "psf_flux_apcorr" in out else "psf_flux"
    ferr_col = flux_col + "_err"
    flux = out[flux_col].to_numpy(float) if flux_col in out else np.full(n, np.nan)
    ferr = out[ferr_col].to_numpy(float) if ferr_col in out else np.full(n, np.nan)
    for c in ("mag", "mag_err", "flux_njy", "flux_njy_err"):
        out[c] = np.nan
    if result.abscal and config.do_photometry and photom_ref is not None and len(photom_ref):
        col = f"{refcat_band}_mag"
        if col not in photom_ref:
            raise ConfigError(f"{what}: photometric reference catalog has no {col!r} column "
                              f"(bands: {[c[:-4] for c in photom_ref.columns if c.endswith('_mag')]})")
        xi_s, eta_s = tan_project(ra, dec, *wcs.crval)
        xi_r, eta_r = tan_project(photom_ref["ra"].to_numpy(float), photom_ref["dec"].to_numpy(float), *wcs.crval)
        good = np.isfinite(xi_s) & np.isfinite(eta_s)
        gi = np.nonzero(good)[0]
        i1, i2, _ = nn_match(xi_s[gi] * 3600, eta_s[gi] * 3600, xi_r * 3600, eta_r * 3600,
                             config.photometry_match_arcsec)
        i1 = gi[i1]
        usable = np.ones(len(i1), bool)
        for c in out.columns:
            if c.startswith("flag_"):
                usable &= ~out[c].to_numpy(bool)[i1]
        i1, i2 = i1[usable], i2[usable]
        im, ie = instrumental_mag(flux[i1], ferr[i1], exptime)
        colour = None
        pc = config.photometry.colour
        if len(pc) == 2 and f"{pc[0]}_mag" in photom_ref and f"{pc[1]}_mag" in photom_ref:
            colour = (photom_ref[f"{pc[0]}_mag"].to_numpy(float) - photom_ref[f"{pc[1]}_mag"].to_numpy(float))[i2]
        ref_err = photom_ref[f"{col}_err"].to_numpy(float)[i2] if f"{col}_err" in photom_ref else None
        zp = fit_zero_point(im, ie, photom_ref[col].to_numpy(float)[i2], ref_err, colour,
                            config=config.photometry, what=what)
        ids = photom_ref["id"].to_numpy(np.int64)
        out.loc[i1, "photom_ref_id"] = ids[i2]
        out.loc[i1, "photom_used"] = zp.used
        cal = calibrated_magnitudes(flux, ferr, exptime, zp)
        for c in cal.columns:
            out[c] = cal[c].to_numpy()
        result.zero_point, result.zero_point_err = zp.zp, zp.zp_err
        result.colour_term, result.n_photref = zp.colour_term, zp.n_used
    elif result.abscal and config.do_photometry:
        # positions are absolute, fluxes are not: no photometric reference star reaches the field
        result.abscal = False
        result.status, result.failure_class = STATUS_RELATIVE, "NoReferenceMatch"
        result.cause = f"{what}: no photometric reference stars in the field"
    result.calsrc = out
    return result


def relative_only(sources: pd.DataFrame, *, cause: str) -> DetectorCalibration:
    """The result for a detector without any celestial WCS: pixel catalog only, NaN sky positions."""
    out = sources.copy().reset_index(drop=True)
    n = len(out)
    for c, v in (("ra", np.nan), ("dec", np.nan), ("mag", np.nan), ("mag_err", np.nan), ("flux_njy", np.nan),
                 ("flux_njy_err", np.nan)):
        out[c] = np.full(n, v)
    out["ref_id"] = np.full(n, -1, np.int64)
    out["ref_sep_mas"] = np.full(n, np.nan)
    out["astrom_used"] = np.zeros(n, bool)
    out["photom_ref_id"] = np.full(n, -1, np.int64)
    out["photom_used"] = np.zeros(n, bool)
    return DetectorCalibration(calsrc=out, wcs=None, status=STATUS_RELATIVE, failure_class="NoReferenceMatch",
                               cause=cause)


# -- I/O ---------------------------------------------------------------------------------


def read_src(path: str | Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """A characterize source catalog and its schema metadata (str -> str)."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise CorruptInput(f"not a readable source catalog ({exc})", path=path) from exc
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if not k.startswith(b"pandas")}
    return table.to_pandas(), meta


def _detector_of(path: str | Path, meta: Mapping[str, str] | None = None) -> int:
    if meta and "detector" in meta:
        try:
            return int(meta["detector"])
        except ValueError:
            pass
    m = re.search(r"_(\d+)\.(?:parquet|fits)$", str(path))
    if not m:
        raise ConfigError(f"cannot tell the detector of {path} (expected <visit>_<det>.parquet)")
    return int(m.group(1))


def _epoch(primary: fits.Header, exptime: float) -> float:
    from astropy.time import Time

    if "MJD-OBS" in primary:
        mjd = float(primary["MJD-OBS"])
    else:
        date = primary.get("DATE-OBS")
        if not date:
            raise CorruptInput("calexp has neither MJD-OBS nor DATE-OBS")
        mjd = float(Time(str(date), scale="utc").mjd)
    return 2000.0 + (mjd + 0.5 * exptime / 86400.0 - 51544.5) / 365.25


def usable_catalog(catdir: str | None) -> str | None:
    """``catdir`` when it holds a reference catalog; ``None`` for ``none`` or a missing catalog.

    A missing catalog is not an error: the visit is then calibrated relative
    only (``not_absolutely_calibrated``) and the log says why.
    """
    if catdir is None or str(catdir).lower() == "none":
        return None
    if not (Path(catdir) / "manifest.yaml").exists():
        log.warning("reference catalog %s does not exist (no manifest.yaml): relative calibration only", catdir)
        return None
    return str(catdir)


def _load_ref(catdir: str | None, wcs: SipWcs, shape, epoch: float, margin_arcsec: float) -> pd.DataFrame | None:
    if catdir is None:
        return None
    ny, nx = shape
    ra, dec = wcs.pixel_to_sky(np.array([(nx - 1) / 2.0]), np.array([(ny - 1) / 2.0]))
    radius = 0.5 * math.hypot(nx, ny) * wcs.pixel_scale_arcsec / 3600.0 + margin_arcsec / 3600.0
    return refcat.load_region(catdir, float(ra[0]), float(dec[0]), radius, epoch=epoch)


_write_parquet = fitsio.write_parquet


def calibrate_visit(src_paths: Sequence[str], calexp_paths: Sequence[str], *, astrom_catdir: str | None,
                    photom_catdir: str | None, outdir_calsrc: str, outdir_wcs: str, summary_path: str,
                    config: CalibrateConfig, psf_paths: Sequence[str] = (), instrument: str | None = None,
                    threads: int = 1, config_doc: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Calibrate every detector of one visit and write calsrc, wcs and the visit summary.

    Returns the summary.  Raises the first detector's error when every
    detector failed.
    """
    calexps = {}
    for p in calexp_paths:
        headers = fitsio.read_headers(p)
        prim = headers[0]
        img = next((h for h in headers[1:] if h.get("EXTNAME") == "IMAGE"), headers[1] if len(headers) > 1 else prim)
        det = int(prim.get("DETECTOR", _detector_of(p)))
        calexps[det] = (p, prim, img)
    psfs = {}
    for p in psf_paths:
        try:
            psfs[_detector_of(p)] = fitsio.read_headers(p)[0]
        except SurveyredError as exc:
            log.warning("%s", exc.one_line())
    astrom_catdir, photom_catdir = usable_catalog(astrom_catdir), usable_catalog(photom_catdir)
    inst = None
    if instrument:
        from .instrument import load_instrument

        inst = load_instrument(instrument)
    jobs = []
    src_meta = {}
    for p in src_paths:
        df, meta = read_src(p)
        src_meta[p] = meta
        det = _detector_of(p, meta)
        if det not in calexps:
            raise ConfigError(f"no calexp given for detector {det} of {p}")
        jobs.append((p, det, df, meta))

    def one(job):
        p, det, df, meta = job
        cpath, prim, img = calexps[det]
        band = str(meta.get("band") or prim.get("BAND", ""))
        filt = prim.get("FILTER")
        refband = band
        if inst is not None and filt is not None and inst.band_of(str(filt)) is not None:
            refband = inst.band_of(str(filt)).refcat_band
        exptime = float(prim.get("EXPTIME", meta.get("exptime", "nan")))
        shape = (int(img.get("NAXIS2", 0)), int(img.get("NAXIS1", 0)))
        psf_h = psfs.get(det)
        psf_fwhm = float(meta.get("psf_fwhm", psf_h.get("PSFFWHM", np.nan) if psf_h is not None else np.nan) or np.nan)
        sky = float(np.nanmedian(df["sky"])) if "sky" in df and len(df) else float("nan")
        base = dict(visit=str(meta.get("visit", prim.get("VISIT", ""))),
                    night=str(meta.get("night", prim.get("NIGHT", ""))), band=band, detector=det,
                    psf_fwhm=psf_fwhm, sky=sky, n_sources=int(len(df)), refband=refband, shape=shape)
        what = f"{cpath}"
        upstream = str(meta.get("status", STATUS_OK) or STATUS_OK)
        try:
            if upstream not in (STATUS_OK, ""):
                raise _Upstream(meta.get("failure_class") or "CharacterizeFailed",
                                f"{p}: characterize status {upstream}")
            epoch = _epoch(prim, exptime)
            base["epoch"] = epoch
            try:
                wcs0 = SipWcs.from_header(img)
            except ConfigError:
                wcs0 = None  # e.g. CAFOS: CTYPE = PIXEL; nothing to start an absolute solution from
            if wcs0 is None:
                res = relative_only(df, cause=f"{what}: the calexp has no celestial (TAN) WCS")
            else:
                margin = config.astrometry.max_offset_arcsec + 5.0
                aref = _load_ref(astrom_catdir, wcs0, shape, epoch, margin)
                pref = aref if photom_catdir == astrom_catdir else _load_ref(photom_catdir, wcs0, shape, epoch,
                                                                             margin)
                res = calibrate_detector(df, wcs0, shape=shape, exptime=exptime, astrom_ref=aref,
                                         photom_ref=pref, refcat_band=refband, config=config, what=what)
        except (SurveyredError, _Upstream) as exc:
            fc = exc.failure_class if isinstance(exc, SurveyredError) else exc.failure_class
            log.warning("detector %d failed: %s", det, exc.one_line())
            try:
                wcs0 = SipWcs.from_header(img)
            except SurveyredError:
                wcs0 = None
            res = DetectorCalibration(calsrc=df.copy(), wcs=wcs0, status=STATUS_FAILED, failure_class=fc,
                                      cause=exc.one_line())
            for c, v in (("ra", np.nan), ("dec", np.nan), ("mag", np.nan), ("mag_err", np.nan),
                         ("flux_njy", np.nan), ("flux_njy_err", np.nan), ("ref_id", -1), ("ref_sep_mas", np.nan),
                         ("astrom_used", False), ("photom_ref_id", -1), ("photom_used", False)):
                res.calsrc[c] = v
        return p, det, cpath, prim, res, base

    if threads > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = list(pool.map(one, jobs))
    else:
        results = [one(j) for j in jobs]

    rows = []
    fits_items = []
    parquet_items = []
    for p, det, cpath, prim, res, base in results:
        row = {k: v for k, v in base.items() if k not in ("refband", "shape", "epoch")}
        row.update(zero_point=res.zero_point, zero_point_err=res.zero_point_err, colour_term=res.colour_term,
                   astrom_rms_mas=res.astrom_rms_mas, n_match=res.n_match, abscal=res.abscal, status=res.status,
                   failure_class=res.failure_class, cause=res.cause)
        rows.append(row)
        name = Path(p).name
        h = fits.Header()
        if res.wcs is not None:
            res.wcs.to_header(h)
        for key, value, comment in (
            ("VISIT", base["visit"], "visit"), ("NIGHT", base["night"], "observing night"),
            ("DETECTOR", det, "detector id"), ("BAND", base["band"], "band"),
            ("REFBAND", base["refband"], "reference-catalog band of the zero-point"),
            ("ZP", _fin(res.zero_point), "[mag] mag = -2.5 log10(e-/s) + ZP"),
            ("ZPERR", _fin(res.zero_point_err), "[mag] zero-point error"),
            ("COLTERM", _fin(res.colour_term), "colour term c: ref - inst = ZP + c colour"),
            ("ASTRMS", _fin(res.astrom_rms_mas), "[mas] per-coordinate rms of astrometric matches"),
            ("NMATCH", int(res.n_match), "astrometric matches kept"),
            ("NPHOTREF", int(res.n_photref), "photometric reference stars kept"),
            ("STATUS", res.status, "ok / not_absolutely_calibrated / failed"),
            ("FAILCLS", res.failure_class, "failure class"),
            ("ABSCAL", bool(res.abscal), "absolutely calibrated against a reference catalog"),
            ("MJD-AVG", _fin((base["epoch"] - 2000.0) * 365.25 + 51544.5) if "epoch" in base else None,
             "[d] MJD of mid-exposure (epoch of the positions)"),
            ("IMAGEW", int(base["shape"][1]), "detector width (px) the WCS applies to"),
            ("IMAGEH", int(base["shape"][0]), "detector height (px)"),
        ):
            h[key] = (value, comment)
        add_provenance(h, step="calibrate", inputs=[p, cpath], config=config_doc,
                       params={"refcat_astrom": str(astrom_catdir), "refcat_photom": str(photom_catdir)})
        wpath = Path(outdir_wcs) / (Path(p).stem + ".fits")
        fits_items.append((wpath, fits.HDUList([fits.PrimaryHDU(header=h)])))
        meta = dict(src_meta[p])
        meta.update({"calibrate_software_version": __version__, "calibrate_git_revision": git_revision(),
                     "calibrate_config_hash": config_hash(config_doc), "calibrate_inputs": f"{name},{Path(cpath).name}"})
        meta.update({"epoch": base.get("epoch", float("nan")), "zero_point": res.zero_point, "zero_point_err": res.zero_point_err, "colour_term": res.colour_term,
                "astrom_rms_mas": res.astrom_rms_mas, "n_match": res.n_match, "abscal": res.abscal,
                "calibrate_status": res.status, "calibrate_failure_class": res.failure_class})
        parquet_items.append((Path(outdir_calsrc) / name, res.calsrc, meta))
    summary = pd.DataFrame(rows).sort_values("detector").reset_index(drop=True)
    failed = summary["status"] == STATUS_FAILED
    if len(summary) and failed.all():
        first = next(r for r in results if r[4].status == STATUS_FAILED)[4]
        raise _AllFailed(first.failure_class, first.cause)
    fitsio.write_all(fits_items)
    for path, df, meta in parquet_items:
        _write_parquet(df, path, meta)
    _write_parquet(summary, Path(summary_path), {})
    for r in rows:
        log.info("detector %s: %s %s zp=%.4f rms=%.1f mas n=%d", r["detector"], r["status"], r["failure_class"],
                 r["zero_point"], r["astrom_rms_mas"], r["n_match"])
    return summary


def _fin(v):
    """A float for a header card; ``None`` (undefined value) for NaN, which FITS cannot hold."""
    return float(v) if v is not None and np.isfinite(v) else None


class _Upstream(Exception):
    def __init__(self, failure_class: str, message: str):
        super().__init__(message)
        self.failure_class = failure_class

    def one_line(self) -> str:
        return f"{self.failure_class}: {' '.join(str(self).split())}"


class _AllFailed(SurveyredError):
    """Every detector of the visit failed; carries the first detector's failure class."""

    def __init__(self, failure_class: str, line: str):
        prefix = f"{failure_class}: "
        super().__init__(line[len(prefix):] if line.startswith(prefix) else line)
        self._fc = failure_class

    @property
    def failure_class(self) -> str:
        return self._fc


# -- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="surveyred calibrate", description=(
        "Astrometric (TAN-SIP) and photometric (zero-point) calibration of one visit's source catalogs."))
    p.add_argument("--src", nargs="+", required=True, help="src/<night>/<visit>_<det>.parquet, one per detector")
    p.add_argument("--calexp", nargs="+", required=True, help="calexp/<night>/<visit>_<det>.fits")
    p.add_argument("--psf", nargs="*", default=[], help="psf/<night>/<visit>_<det>.fits (optional)")
    p.add_argument("--refcat-astrom", required=True, help="STORE/NAME of the astrometric catalog, or 'none'")
    p.add_argument("--refcat-photom", required=True, help="STORE/NAME of the photometric catalog, or 'none'")
    p.add_argument("--instrument", default=None, help="instrument (filter -> refcat_band); default: band itself")
    p.add_argument("--outdir-calsrc", required=True)
    p.add_argument("--outdir-wcs", required=True)
    p.add_argument("--summary", required=True)
    p.add_argument("--config-json", default=None, help='the "calibrate" configuration section as JSON')
    common_arguments(p)
    args = p.parse_args(argv)
    setup_logging(args.log)

    def body() -> None:
        doc = json_arg(args.config_json)
        cfg = CalibrateConfig.from_dict(doc)
        set_threads(args.threads)
        calibrate_visit(args.src, args.calexp, astrom_catdir=args.refcat_astrom, photom_catdir=args.refcat_photom,
                        outdir_calsrc=args.outdir_calsrc, outdir_wcs=args.outdir_wcs, summary_path=args.summary,
                        config=cfg, psf_paths=args.psf, instrument=args.instrument, threads=args.threads,
                        config_doc=doc)

    return run(body, what=f"calibrate {args.summary}")
