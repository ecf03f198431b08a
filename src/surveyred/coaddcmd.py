"""``surveyred coadd``: stack the warps of one patch and band into a coadd.

Usage (one Snakemake job per tract, patch and band)::

    surveyred coadd --warp-dirs D1 D2 ... --tract T --patch P --band B --output coadd.fits
        [--config-json '{"coadd": {...}}'] [--threads N] [--log FILE]

Each ``Di`` is the output directory of one ``surveyred warp`` job (one visit).
Its ``manifest.json`` says, for every patch that job was asked for, whether
a warp was ``written`` (then ``Di/{T}_{P}.fits`` is an input) or the visit
left the patch ``empty`` (skipped, logged).  Errors, one line each:

* ``MissingInput``: a directory without ``manifest.json``, a manifest that does
  not list patch ``P`` of tract ``T`` (the warp job was not asked for it), or
  a warp file the manifest lists as written but that is missing;
* ``InconsistentInput``: a manifest or warp of another band or tract, a warp
  whose header names another patch, warps on different pixel grids, or the
  same visit twice;
* ``CorruptInput``: an unreadable manifest or warp;
* ``InsufficientData``: no input warp at all (every visit empty).

Inputs are stacked in the order of (MJD, visit), whatever the order of
``--warp-dirs``, so the coadd is bit-identical for the same set of inputs.

Output (:func:`surveyred.coadd.write_coadd` format): PRIMARY (``TRACT``,
``PATCH``, ``BAND``, ``ZPCOMMON``, ``NINPUTS``, ``NSKIPPED``, ``BUNIT``,
provenance with inputs ``visit:file``), IMAGE (nJy per pixel on the 31.4
zero-point, patch WCS), MASK (see :mod:`surveyred.coadd`; CLIPPED where an
input was rejected), VARIANCE (nJy^2), NIMAGE (int16 inputs per pixel),
INPUTS (one row per input: ``name``, ``psf_fwhm`` (arcsec, from the
manifest), ``selected``, ``weight``, ``weight_fraction``, ``n_used``,
``n_clipped``, ``n_artifact_pixels``, ``n_artifacts`` and, added by this
command, ``visit``, ``night``, ``mjd``).

Configuration (``--config-json '{"coadd": {...}}'``; ``zero_point``, when
present, must equal the warps' ``ZPCOMMON``, and ``keep_warps`` is ignored): the fields of
:class:`surveyred.coadd.CoaddConfig` - ``weighting`` ("input": inverse median
variance per warp; "pixel"), ``do_clip`` (false), ``clip_sigma`` (4),
``clip_maxiters`` (5), ``mismatch`` (0.05), ``protect_snr`` (5),
``do_artifact_rejection`` (true), ``artifact_sigma`` (4),
``artifact_min_pixels`` (5), ``artifact_max_inputs`` (1), ``artifact_grow``
(2 px), ``best_seeing_fraction`` (null = all), ``bad_mask_planes``
(NO_DATA, BAD, SAT, CR, CLIPPED), ``band_rows`` (null = automatic).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from . import fitsio
from .coadd import CoaddConfig, FitsWarp, coadd, write_coadd
from .errors import (
    ConfigError,
    CorruptInput,
    InconsistentInput,
    InsufficientData,
    MissingInput,
)
from .provenance import add_provenance
from .warpcmd import MANIFEST

log = logging.getLogger("surveyred.coadd")

_GRID_KEYS = ("NAXIS1", "NAXIS2", "CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2",
              "CD1_1", "CD1_2", "CD2_1", "CD2_2", "PC1_1", "PC1_2", "PC2_1", "PC2_2", "CDELT1", "CDELT2")


#: workflow-level keys of the ``coadd`` section that are not :class:`CoaddConfig` fields
WORKFLOW_KEYS = ("zero_point", "keep_warps")


def coadd_config_from_dict(doc: Mapping[str, Any] | None) -> CoaddConfig:
    """:class:`CoaddConfig` from the ``coadd`` configuration section (unknown keys are an error;
    the workflow keys ``zero_point`` and ``keep_warps`` are not stack options and are skipped)."""
    doc = {k: v for k, v in dict(doc or {}).items() if k not in WORKFLOW_KEYS}
    if "bad_mask_planes" in doc:
        doc["bad_mask_planes"] = tuple(doc["bad_mask_planes"])
    try:
        return CoaddConfig(**doc).validate()
    except TypeError as exc:
        raise ConfigError(f"coadd configuration: {exc}") from None


def read_manifest(warp_dir: str | Path) -> dict[str, Any]:
    path = Path(warp_dir) / MANIFEST
    if not path.is_file():
        raise MissingInput("no warp manifest (was the warp job run for this visit?)", path=path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptInput(f"unreadable warp manifest ({exc})", path=path) from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("patches"), dict):
        raise CorruptInput("warp manifest has no 'patches' mapping", path=path)
    return doc


def collect_inputs(warp_dirs: Sequence[str], *, tract: int, patch: str, band: str) -> tuple[list[dict], list[dict]]:
    """The warps of ``patch`` listed by the manifests: ``(inputs, skipped)`` (see the module docstring)."""
    inputs, skipped, seen = [], [], {}
    for d in warp_dirs:
        man = read_manifest(d)
        mpath = Path(d) / MANIFEST
        visit = str(man.get("visit", ""))
        if str(man.get("band", "")) != band:
            raise InconsistentInput(f"warps of band {man.get('band')!r} (visit {visit}) given to the {band!r} coadd",
                                    path=mpath)
        if int(man.get("tract", -1)) != int(tract):
            raise InconsistentInput(f"warps of tract {man.get('tract')} given to a coadd of tract {tract}", path=mpath)
        if visit in seen:
            raise InconsistentInput(f"visit {visit} given twice ({seen[visit]} and {d})", path=mpath)
        seen[visit] = d
        row = man["patches"].get(patch)
        if row is None:
            raise MissingInput(f"the manifest of visit {visit} does not list patch {patch} of tract {tract}",
                               path=mpath)
        status = row.get("status") if isinstance(row, dict) else None
        entry = dict(visit=visit, night=str(man.get("night", "")),
                     mjd=float(man["mjd"]) if man.get("mjd") is not None else float("nan"),
                     psf_fwhm=float(man["psf_fwhm_arcsec"]) if man.get("psf_fwhm_arcsec") is not None
                     else float("nan"), dir=str(d))
        if status == "empty":
            skipped.append(entry)
            log.info("visit %s: no data on patch %s (skipped)", visit, patch)
            continue
        if status != "written":
            raise CorruptInput(f"patch {patch} has status {status!r} (expected 'written' or 'empty')", path=mpath)
        wpath = Path(d) / str(row.get("file", f"{tract}_{patch}.fits"))
        if not wpath.is_file():
            raise MissingInput(f"warp listed as written in {mpath} is missing", path=wpath)
        entry["path"] = str(wpath)
        inputs.append(entry)
    inputs.sort(key=lambda e: (e["mjd"] if math.isfinite(e["mjd"]) else math.inf, e["visit"]))
    return inputs, skipped


def _check_grid(inputs: list[dict], *, tract: int, patch: str, band: str) -> tuple[fits.Header, set]:
    ref = None
    zps = set()
    for e in inputs:
        with fitsio.open_fits(e["path"]) as hdul:
            prim = hdul[0].header
            try:
                img = hdul["IMAGE"].header.copy()
            except KeyError:
                raise CorruptInput("not a warp (no IMAGE HDU)", path=e["path"]) from None
        for key, want in (("BAND", band), ("PATCH", patch)):
            if key in prim and str(prim[key]) != want:
                raise InconsistentInput(f"warp header {key} = {prim[key]!r}, expected {want!r}", path=e["path"])
        if "TRACT" in prim and int(prim["TRACT"]) != int(tract):
            raise InconsistentInput(f"warp header TRACT = {prim['TRACT']}, expected {tract}", path=e["path"])
        zps.add(float(prim["ZPCOMMON"]) if prim.get("ZPCOMMON") is not None else math.nan)
        grid = {k: img.get(k) for k in _GRID_KEYS}
        if ref is None:
            ref, ref_path, ref_header = grid, e["path"], img
        elif grid != ref:
            diff = [k for k in _GRID_KEYS if grid[k] != ref[k]]
            raise InconsistentInput(f"warp is on another pixel grid than {ref_path} ({', '.join(diff)} differ)",
                                    path=e["path"])
    return ref_header, zps


def coadd_patch(warp_dirs: Sequence[str], *, tract: int, patch: str, band: str, output: str,
                config: CoaddConfig = CoaddConfig(), threads: int = 1, zero_point: float | None = None,
                config_doc: Mapping[str, Any] | None = None):
    """Stack the warps of one patch and band listed by ``warp_dirs``' manifests; write ``output``.

    ``zero_point``: when given, every warp's ``ZPCOMMON`` must equal it.
    """
    config.validate()
    inputs, skipped = collect_inputs(warp_dirs, tract=tract, patch=patch, band=band)
    if not inputs:
        raise InsufficientData(f"no visit has data on tract {tract} patch {patch} in band {band} "
                               f"({len(skipped)} warp jobs, all empty)", path=output)
    img_header, zps = _check_grid(inputs, tract=tract, patch=patch, band=band)
    if len(zps) > 1:
        raise InconsistentInput(f"warps on different zero-points {sorted(zps)}", path=inputs[0]["path"])
    zp = zps.pop()
    if zero_point is not None and not zp == float(zero_point):
        raise InconsistentInput(f"warps are on zero-point {zp}, the configuration asks for {zero_point}",
                                path=inputs[0]["path"])
    log.info("coadd tract %s patch %s band %s: %d inputs, %d visits without data", tract, patch, band, len(inputs),
             len(skipped))
    sources = [FitsWarp(e["path"], name=f"{e['visit']}/{Path(e['path']).name}") for e in inputs]
    res = coadd(sources, config=config, psf_fwhm=[e["psf_fwhm"] for e in inputs], threads=threads)
    res.inputs["visit"] = [e["visit"] for e in inputs]
    res.inputs["night"] = [e["night"] for e in inputs]
    res.inputs["mjd"] = np.array([e["mjd"] for e in inputs], float)
    for row in res.inputs:
        log.info("input %s: weight fraction %.3f, %d pixels used, %d artifact regions (%d px)", row["name"],
                 row["weight_fraction"], row["n_used"], row["n_artifacts"], row["n_artifact_pixels"])
    h = fits.Header()
    for key, value, comment in (
        ("TRACT", int(tract), "tract id"), ("PATCH", patch, "patch id x,y"), ("BAND", band, "band"),
        ("ZPCOMMON", zp if math.isfinite(zp) else None, "[mag] common zero-point (31.4: nJy)"),
        ("NINPUTS", len(inputs), "warps stacked"), ("NSKIPPED", len(skipped), "visits without data on the patch"),
    ):
        h[key] = (value, comment)
    add_provenance(h, step="coadd", inputs=[f"{e['visit']}:{Path(e['path']).name}" for e in inputs],
                   params={"tract": int(tract), "patch": patch, "band": band,
                           "coadd": {k: getattr(config, k) for k in config.__dataclass_fields__}},
                   config=config_doc)
    wcs = WCS(img_header)
    write_coadd(output, res, wcs, header=h, bunit="nJy" if zp == 31.4 else "")
    log.info("wrote %s", output)
    return res


def main(argv: list[str] | None = None) -> int:
    from .runtime import common_arguments, json_arg, run, set_threads, setup_logging

    p = argparse.ArgumentParser(prog="surveyred coadd", description=(
        "Stack the warps of one patch and band (inverse-variance weights, artifact rejection) into a coadd."))
    p.add_argument("--warp-dirs", nargs="+", required=True, help="warp job directories (each with manifest.json)")
    p.add_argument("--tract", type=int, required=True)
    p.add_argument("--patch", required=True, help='patch id "x,y"')
    p.add_argument("--band", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--config-json", default=None, help='{"coadd": {...}} as JSON')
    common_arguments(p)
    args = p.parse_args(argv)
    setup_logging(args.log)

    def body() -> None:
        doc = json_arg(args.config_json)
        section = doc.get("coadd") or {}
        cfg = coadd_config_from_dict(section)
        n = set_threads(args.threads)
        zp = section.get("zero_point")
        coadd_patch(args.warp_dirs, tract=args.tract, patch=args.patch, band=args.band, output=args.output,
                    config=cfg, threads=n, zero_point=None if zp is None else float(zp),
                    config_doc={"coadd": section})

    return run(body, what=f"coadd {args.tract} {args.patch} {args.band} -> {args.output}")
