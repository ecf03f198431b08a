"""``surveyred warp``: one visit, all its detectors, onto patches of one tract.

Usage (one Snakemake job per visit)::

    surveyred warp --calexp C_0.fits C_1.fits ... --wcs W_0.fits ... [--psf P_0.fits ...]
        --tract-json '{"id": 0, "ra": 150.1, "dec": 2.2}'
        --skymap-json '{"pixel_scale": 0.2, "patch_size": 4000, "patch_overlap": 100, "n_patches": 9}'
        --patches 0,0 1,0 ... --zero-point 31.4 --outdir DIR
        [--config-json '{"warp": {...}}'] [--threads N] [--log FILE]

Inputs are matched by detector (primary header ``DETECTOR``): every calexp
needs the fitted-WCS product of its detector (``wcs/{night}/{visit}/{visit}_{det}.fits``
from ``surveyred calibrate``: TAN-SIP cards, ``ZP``, ``STATUS``); PSF products
(``PSFFWHM``, px) are optional and only give the seeing recorded for
best-seeing selection.  Detectors whose calibrate ``STATUS`` is ``failed`` or
``not_absolutely_calibrated`` (no absolute zero-point, or an uncalibrated WCS),
or whose ``ZP`` is undefined, are skipped and the reason is logged and recorded
in the manifest.

Photometric scale
-----------------
A calexp is in electrons over the exposure and its zero-point is defined by
``mag = -2.5 log10(e / EXPTIME) + ZP``.  The warp is put on the common
zero-point ``zp_c`` (``--zero-point``, 31.4 = nJy):
:math:`f = e \\cdot 10^{0.4 (zp_c - ZP)} / EXPTIME`, i.e. the effective
exposure zero-point handed to :func:`surveyred.warp.warp_exposure` is
``ZP + 2.5 log10(EXPTIME)``.  Warp pixels are then nJy per tract pixel (the
Lanczos warp conserves flux) and the variance nJy^2.

Outputs
-------
* ``DIR/{tract}_{patch}.fits`` for every requested patch that receives at least
  one valid (not NO_DATA) pixel: :func:`surveyred.warp.write_warp` format
  (PRIMARY, IMAGE with the patch WCS, MASK, VARIANCE), all detectors of the
  visit in one image (detectors do not overlap on the sky; should two ever
  claim one pixel, the lower detector id wins).  Primary header: ``VISIT``,
  ``NIGHT``, ``BAND``, ``MJD`` (mid-exposure), ``EXPTIME``, ``PSFFWHM``
  (arcsec, median over the contributing detectors), ``ZPCOMMON``, ``TRACT``,
  ``PATCH``, ``NDETECT`` and ``DETLIST`` (contributing detectors), ``NVALID``
  (valid pixels), ``BUNIT`` and provenance (inputs: calexps, wcs and psf files).
* ``DIR/manifest.json`` (written last): ``visit``, ``night``, ``band``,
  ``mjd``, ``exptime``, ``psf_fwhm_arcsec``, ``zero_point`` (the common one),
  ``tract``, ``skymap``, ``patches`` - for **every** requested patch
  ``{"status": "written", "file": ..., "detectors": [...], "n_valid": ...}`` or
  ``{"status": "empty"}`` -, ``detectors`` (per detector: ``status`` used or
  skipped, ``reason``, ``zp``, ``psf_fwhm_px``) and provenance.  A stale warp
  file of a patch that is now empty is removed.

Memory: one patch at a time (the patch's image, variance and mask, plus one
detector's calexp and its warp).

Background
----------
Calexps keep their sky; before warping, the background is re-estimated as
characterize does (sep mesh, the ``BKGMESH``/``BKGFILT`` of the detector's PSF
product, else ``background_mesh``/``background_filter``) and subtracted, so
warps of visits with different sky levels agree pixel by pixel (the coadd's
artifact rejection compares them) and the coadd is sky-subtracted.  The
calexp variance is kept (the background estimate's own noise is negligible).

Configuration (``--config-json '{"warp": {...}}'``): the fields of
:class:`surveyred.warp.WarpConfig` - ``order`` (Lanczos order, 3),
``linear_correction`` (true), ``grid_step`` (16 output px),
``max_map_error`` (0.01 input px), ``mask_weight_threshold`` (0.05) - and
``subtract_background`` (true), ``background_mesh`` (64 px),
``background_filter`` (3 meshes), see :class:`BackgroundOptions`.
``--tract-json`` gives the tract (``id``, centre ``ra``, ``dec`` in deg) and
``--skymap-json`` the :class:`surveyred.skymap.SkymapConfig` (``pixel_scale``
arcsec, ``patch_size`` and ``patch_overlap`` px, ``n_patches`` per side).
Which patches to ask for is the workflow's choice
(:func:`surveyred.skymap.patches_for_exposure` over the visit's detectors);
any patch the visit does not reach is simply recorded as ``empty``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from . import __version__, fitsio, masks
from .errors import ConfigError, CorruptInput, InconsistentInput, MissingInput
from .provenance import add_provenance, config_hash, git_revision
from .skymap import SkymapConfig, Tract, make_tracts, patches_for_exposure
from .warp import WarpConfig, warp_exposure, write_warp

log = logging.getLogger("surveyred.warp")

#: calibrate statuses whose detectors are warped
USABLE_STATUS = ("ok",)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class BackgroundOptions:
    """Background subtraction before warping (``warp`` section keys ``subtract_background``,
    ``background_mesh``, ``background_filter``).

    The background is re-estimated exactly as characterize does
    (:func:`surveyred.characterize.estimate_background`: sep mesh background,
    BAD/SAT/NO_DATA masked) with the mesh and filter recorded in the PSF
    product (``BKGMESH``, ``BKGFILT``) when one is given, else these values; it
    is subtracted from the calexp before warping, so warps of visits with
    different sky levels agree (artifact rejection compares warps pixel by
    pixel) and coadd pixels are sky-subtracted.
    """

    subtract: bool = True
    mesh: int = 64
    filter: int = 3


def warp_config_from_dict(doc: Mapping[str, Any] | None) -> tuple[WarpConfig, BackgroundOptions]:
    """:class:`WarpConfig` and :class:`BackgroundOptions` from the ``warp`` section (unknown keys: error)."""
    doc = dict(doc or {})
    bg = BackgroundOptions(subtract=bool(doc.pop("subtract_background", True)),
                           mesh=int(doc.pop("background_mesh", 64)), filter=int(doc.pop("background_filter", 3)))
    if bg.mesh < 8 or bg.filter < 1:
        raise ConfigError(f"warp background_mesh must be >= 8 and background_filter >= 1, got {bg.mesh}, {bg.filter}")
    try:
        return WarpConfig(**doc).validate(), bg
    except TypeError as exc:
        raise ConfigError(f"warp configuration: {exc}") from None


def tract_from_json(tract_doc: Mapping[str, Any], skymap_doc: Mapping[str, Any]) -> Tract:
    """The tract described by ``--tract-json`` and ``--skymap-json``."""
    try:
        cfg = SkymapConfig(**dict(skymap_doc or {}))
    except TypeError as exc:
        raise ConfigError(f"skymap configuration: {exc}") from None
    try:
        tid, ra, dec = int(tract_doc["id"]), float(tract_doc["ra"]), float(tract_doc["dec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"--tract-json needs integer 'id' and numeric 'ra', 'dec': {exc}") from None
    return make_tracts({tid: (ra, dec)}, config=cfg)[0]


def _card(h, *keys, default=None):
    for k in keys:
        if k in h and h[k] is not None and h[k] != "":
            return h[k]
    return default


def _wcs_of(header: fits.Header, path) -> WCS:
    import warnings

    from astropy.wcs import FITSFixedWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            w = WCS(header, relax=True)
    except Exception as exc:
        raise CorruptInput(f"unreadable WCS ({exc})", path=path) from exc
    if not w.has_celestial or "TAN" not in (w.wcs.ctype[0] + w.wcs.ctype[1]):
        raise CorruptInput("holds no TAN celestial WCS", path=path)
    return w


def _detector(h: fits.Header, path) -> int:
    if "DETECTOR" not in h:
        raise CorruptInput("primary header has no DETECTOR", path=path)
    try:
        return int(h["DETECTOR"])
    except (TypeError, ValueError):
        raise CorruptInput(f"DETECTOR {h['DETECTOR']!r} is not an integer", path=path) from None


def _by_detector(paths: Sequence[str], what: str) -> dict[int, tuple[str, list[fits.Header]]]:
    out: dict[int, tuple[str, list[fits.Header]]] = {}
    for p in paths:
        headers = fitsio.read_headers(p)
        det = _detector(headers[0], p)
        if det in out:
            raise InconsistentInput(f"two {what} files for detector {det}: {out[det][0]} and {p}", path=p)
        out[det] = (str(p), headers)
    return out


def warp_visit(calexp_paths: Sequence[str], wcs_paths: Sequence[str], *, tract: Tract, patches: Sequence[str],
               outdir: str | os.PathLike, zero_point: float = 31.4, psf_paths: Sequence[str] = (),
               config: WarpConfig = WarpConfig(), background: BackgroundOptions = BackgroundOptions(),
               threads: int = 1, config_doc: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Warp one visit's detectors onto ``patches`` of ``tract``; write the warps and the manifest.

    Returns the manifest (also written to ``outdir/manifest.json``).  See the
    module docstring for inputs, outputs and units.
    """
    config.validate()
    if not math.isfinite(zero_point):
        raise ConfigError(f"--zero-point must be finite, got {zero_point}")
    patches = list(dict.fromkeys(patches))
    for pid in patches:
        try:
            tract.patch(pid)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"patch {pid!r}: {exc.args[0]}") from None
    calexps = _by_detector(calexp_paths, "calexp")
    wcss = _by_detector(wcs_paths, "wcs")
    psfs = _by_detector(psf_paths, "psf") if psf_paths else {}
    for det, (p, _) in calexps.items():
        if det not in wcss:
            raise MissingInput(f"no fitted-WCS product given for detector {det}", path=p)
    for det, (p, _) in list(wcss.items()) + list(psfs.items()):
        if det not in calexps:
            raise InconsistentInput(f"detector {det} has no calexp among the inputs", path=p)

    # one visit, one band
    visits = {str(h[0].get("VISIT", "")) for _, h in calexps.values()}
    bands = {str(h[0].get("BAND", "")) for _, h in calexps.values()}
    if len(visits) != 1 or len(bands) != 1:
        raise InconsistentInput(f"calexps of more than one visit/band: visits {sorted(visits)}, bands {sorted(bands)}",
                                path=calexp_paths[0])
    visit, band = visits.pop(), bands.pop()
    for det, (p, hs) in wcss.items():
        v = str(hs[0].get("VISIT", visit))
        if v != visit:
            raise InconsistentInput(f"WCS of visit {v} given with calexps of visit {visit}", path=p)
    first = calexps[min(calexps)][1][0]
    night = str(first.get("NIGHT", ""))

    # which detectors are usable, and where they land
    dets: dict[int, dict[str, Any]] = {}
    info: dict[str, dict[str, Any]] = {}
    mjds, fwhms_arcsec, exptimes = [], [], []
    for det in sorted(calexps):
        cpath, chs = calexps[det]
        wpath, whs = wcss[det]
        wh = whs[0]
        prim = chs[0]
        img_h = next((h for h in chs[1:] if h.get("EXTNAME") == "IMAGE"), None)
        if img_h is None:
            raise CorruptInput("not a calibrated exposure (no IMAGE HDU)", path=cpath)
        status = str(wh.get("STATUS", "")).strip()
        zp = _card(wh, "ZP")
        exptime = _card(prim, "EXPTIME")
        fwhm_px = float("nan")
        mesh, filt = background.mesh, background.filter
        if det in psfs:
            ph = psfs[det][1][0]
            try:
                fwhm_px = float(_card(ph, "PSFFWHM", default=float("nan")))
            except (TypeError, ValueError):
                fwhm_px = float("nan")
            mesh, filt = int(_card(ph, "BKGMESH", default=mesh)), int(_card(ph, "BKGFILT", default=filt))
        entry = {"status": "used", "reason": "", "zp": None if zp is None else float(zp),
                 "psf_fwhm_px": None if not math.isfinite(fwhm_px) else fwhm_px,
                 "calexp": Path(cpath).name, "wcs": Path(wpath).name}
        info[str(det)] = entry
        reason = ""
        if status not in USABLE_STATUS:
            reason = f"calibrate STATUS {status or 'missing'} ({wh.get('FAILCLS', '') or 'no failure class'})"
        elif zp is None or not math.isfinite(float(zp)):
            reason = "no zero-point (ZP undefined)"
        elif exptime is None or not float(exptime) > 0:
            reason = f"EXPTIME {exptime!r} is not positive"
        if reason:
            entry.update(status="skipped", reason=reason)
            log.warning("visit %s detector %d skipped: %s (%s)", visit, det, reason, wpath)
            continue
        wcs = _wcs_of(wh, wpath)
        shape = (int(img_h["NAXIS2"]), int(img_h["NAXIS1"]))
        touched = patches_for_exposure(tract, wcs, shape, margin=float(config.order))
        exptime = float(exptime)
        dets[det] = dict(calexp=cpath, wcs=wcs, shape=shape, zp=float(zp), exptime=exptime, touched=set(touched),
                         mesh=mesh, filter=filt)
        exptimes.append(exptime)
        mjd = _card(wh, "MJD-AVG")
        if mjd is None:
            m0 = _card(prim, "MJD-OBS", "MJD")
            mjd = None if m0 is None else float(m0) + 0.5 * exptime / 86400.0
        if mjd is not None:
            mjds.append(float(mjd))
        if math.isfinite(fwhm_px):
            scale = math.sqrt(abs(np.linalg.det(wcs.celestial.pixel_scale_matrix))) * 3600.0
            fwhms_arcsec.append(fwhm_px * scale)
        log.info("visit %s detector %d: ZP %.4f, EXPTIME %.1f s, touches patches %s", visit, det, float(zp),
                 exptime, ", ".join(touched) or "none")
    mjd = float(np.median(mjds)) if mjds else float("nan")
    fwhm = float(np.median(fwhms_arcsec)) if fwhms_arcsec else float("nan")
    exptime = float(np.median(exptimes)) if exptimes else float("nan")

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    inputs = [calexps[d][0] for d in sorted(calexps)] + [wcss[d][0] for d in sorted(wcss)] + \
        [psfs[d][0] for d in sorted(psfs)]
    params = {"zero_point": zero_point, "tract": tract.id, "tract_ra": tract.ra, "tract_dec": tract.dec,
              "skymap": {k: getattr(tract.config, k) for k in ("pixel_scale", "patch_size", "patch_overlap",
                                                               "n_patches")},
              "warp": {k: getattr(config, k) for k in config.__dataclass_fields__},
              "background": asdict(background)}
    patch_rows: dict[str, dict[str, Any]] = {}
    for pid in patches:
        patch = tract.patch(pid)
        fname = f"{tract.id}_{pid}.fits"
        target = outdir / fname
        users = [d for d in sorted(dets) if pid in dets[d]["touched"]]
        image = variance = mask = None
        contributed = []
        map_err, step, scales = 0.0, 0, []
        for det in users:
            d = dets[det]
            im, msk, var, _, _ = fitsio.read_exposure(d["calexp"])
            if background.subtract:
                from .characterize import BackgroundConfig, estimate_background

                bkg = estimate_background(im, msk, cfg=BackgroundConfig(mesh=d["mesh"], filter=d["filter"]))
                im = im - bkg.back.astype(np.float32)
                del bkg
            w = warp_exposure(im, var, msk, d["wcs"], patch.wcs, patch.shape, config=config,
                              zp_exposure=d["zp"] + 2.5 * math.log10(d["exptime"]), zp_common=zero_point,
                              threads=threads)
            del im, msk, var
            valid = (w.mask & masks.NO_DATA) == 0
            if not valid.any():
                continue
            if image is None:
                image = np.full(patch.shape, np.nan, np.float32)
                variance = np.full(patch.shape, np.nan, np.float32)
                mask = np.full(patch.shape, masks.NO_DATA, masks.MASK_DTYPE)
            free = valid & ((mask & masks.NO_DATA) != 0)
            clash = int(np.count_nonzero(valid & ~free))
            if clash:
                log.warning("patch %s: %d pixels of detector %d already covered by another detector; kept the "
                            "first", pid, clash, det)
            image[free] = w.image[free]
            variance[free] = w.variance[free]
            mask[free] = w.mask[free]
            contributed.append(det)
            map_err, step = max(map_err, w.map_error), max(step, w.grid_step)
            scales.append(w.scale)
            log.info("visit %s detector %d -> patch %s: %d valid pixels (scale %.6g, map error %.2g px)", visit,
                     det, pid, int(valid.sum()), w.scale, w.map_error)
            del w, valid, free
        if image is None:
            patch_rows[pid] = {"status": "empty"}
            if target.exists():
                target.unlink()
            log.info("visit %s patch %s: empty", visit, pid)
            continue
        n_valid = int(np.count_nonzero((mask & masks.NO_DATA) == 0))
        h = fits.Header()
        for key, value, comment in (
            ("VISIT", visit, "visit"), ("NIGHT", night, "observing night"), ("BAND", band, "band"),
            ("MJD", mjd if math.isfinite(mjd) else None, "[d] MJD of mid-exposure"),
            ("EXPTIME", exptime if math.isfinite(exptime) else None, "[s] exposure time"),
            ("PSFFWHM", fwhm if math.isfinite(fwhm) else None, "[arcsec] PSF FWHM, median over detectors"),
            ("ZPCOMMON", float(zero_point), "[mag] common zero-point (31.4: nJy)"),
            ("TRACT", int(tract.id), "tract id"), ("PATCH", pid, "patch id x,y"),
            ("NDETECT", len(contributed), "detectors in this warp"),
            ("DETLIST", ",".join(str(d) for d in contributed), "detector ids in this warp"),
            ("NVALID", n_valid, "pixels with data"),
            ("BKGSUB", bool(background.subtract), "calexp background subtracted before warping"),
        ):
            h[key] = (value, comment)
        add_provenance(h, step="warp", inputs=inputs, params=params, config=config_doc)
        from .warp import Warp

        write_warp(target, Warp(image, variance, mask, patch.wcs, float(np.median(scales)), map_err, step),
                   header=h, bunit="nJy" if zero_point == 31.4 else "")
        patch_rows[pid] = {"status": "written", "file": fname, "detectors": contributed, "n_valid": n_valid}
        log.info("visit %s patch %s: wrote %s (%d detectors, %d valid pixels)", visit, pid, target,
                 len(contributed), n_valid)
        del image, variance, mask

    manifest = {
        "visit": visit, "night": night, "band": band,
        "mjd": mjd if math.isfinite(mjd) else None,
        "exptime": exptime if math.isfinite(exptime) else None,
        "psf_fwhm_arcsec": fwhm if math.isfinite(fwhm) else None,
        "zero_point": float(zero_point), "tract": int(tract.id),
        "tract_center": [tract.ra, tract.dec],
        "skymap": params["skymap"],
        "patches": patch_rows, "detectors": info,
        "software_version": __version__, "git_revision": git_revision(),
        "config_hash": config_hash(config_doc),
        "inputs": {"calexp": [Path(calexps[d][0]).name for d in sorted(calexps)],
                   "wcs": [Path(wcss[d][0]).name for d in sorted(wcss)],
                   "psf": [Path(psfs[d][0]).name for d in sorted(psfs)]},
    }
    text = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False)
    with fitsio.atomic_path(outdir / MANIFEST) as tmp:
        tmp.write_text(text + "\n")
    n_written = sum(1 for r in patch_rows.values() if r["status"] == "written")
    log.info("visit %s: %d of %d patches written, %d of %d detectors used", visit, n_written, len(patches),
             len(dets), len(calexps))
    return manifest


def main(argv: list[str] | None = None) -> int:
    from .runtime import common_arguments, json_arg, run, set_threads, setup_logging

    p = argparse.ArgumentParser(prog="surveyred warp", description=(
        "Warp one visit's calibrated detectors onto patches of one tract (Lanczos, flux-conserving, common "
        "zero-point): DIR/{tract}_{patch}.fits per patch with data, and DIR/manifest.json."))
    p.add_argument("--calexp", nargs="+", required=True, help="calexp files of the visit (one per detector)")
    p.add_argument("--wcs", nargs="+", required=True, help="fitted-WCS products (calibrate), one per detector")
    p.add_argument("--psf", nargs="*", default=[], help="PSF products (characterize), optional")
    p.add_argument("--tract-json", required=True, help='{"id": int, "ra": deg, "dec": deg}')
    p.add_argument("--skymap-json", required=True,
                   help='{"pixel_scale": arcsec, "patch_size": px, "patch_overlap": px, "n_patches": n}')
    p.add_argument("--patches", nargs="+", required=True, help='patch ids "x,y"')
    p.add_argument("--zero-point", type=float, default=31.4, help="common zero-point (31.4: nJy)")
    p.add_argument("--outdir", required=True)
    p.add_argument("--config-json", default=None, help='{"warp": {...}} as JSON')
    common_arguments(p)
    args = p.parse_args(argv)
    setup_logging(args.log)

    def body() -> None:
        doc = json_arg(args.config_json)
        cfg, bg = warp_config_from_dict(doc.get("warp"))
        try:
            tdoc, sdoc = json.loads(args.tract_json), json.loads(args.skymap_json)
        except ValueError as exc:
            raise ConfigError(f"--tract-json/--skymap-json is not JSON: {exc}") from None
        tract = tract_from_json(tdoc, sdoc)
        n = set_threads(args.threads)
        warp_visit(args.calexp, args.wcs, tract=tract, patches=args.patches, outdir=args.outdir,
                   zero_point=args.zero_point, psf_paths=args.psf, config=cfg, background=bg, threads=n,
                   config_doc={"warp": doc.get("warp", {}), "skymap": sdoc, "tract": tdoc})

    return run(body, what=f"warp -> {args.outdir}")
