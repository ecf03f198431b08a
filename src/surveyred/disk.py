"""Disk bookkeeping of a results tree: ``surveyred disk RESULTS_DIR``.

Per product type, the number of files and the bytes on disk, which
intermediate products can be deleted safely because they are reproducible from
what remains and nothing still needs them, and which expected products are
missing.

Bytes
-----
Two figures, matching ``du`` on the results tree exactly:

* ``apparent`` = ``du -sb``: the sum of ``st_size`` of every entry
  (directories and symbolic links included, links not followed);
* ``allocated`` = ``du -s -B1``: the sum of ``st_blocks * 512`` (what sparse
  files really occupy).

Like ``du``, a file with several hard links inside the tree is counted once
(the first path met in sorted order).  Every entry belongs to one product type
by its path under RESULTS_DIR: ``calexp``, ``src``, ``psf``, ``calsrc``, ``wcs``,
``visit_summary``, ``calib/bias``, ``calib/flat``, ``jointcal``, ``warp``,
``coadd``, ``coadd_cat``, ``forced``, ``lightcurves``, ``qa``, ``logs``,
``benchmarks``, ``inventory`` (``inventory*.parquet``) and ``other`` (everything
else, RESULTS_DIR itself and the ``calib`` directory included), so the types
add up to the total.

Deletable (reproducible, and no missing product needs them)
----------------------------------------------------------
* ``warp/{night}/{visit}/{tract}_{patch}.fits``: once the coadd it feeds,
  ``coadd/{tract}/{patch}/{band}.fits``, exists and is newer than the warp (a
  warp is only an input of its coadd; the workflow marks warps ``temp()``).  A
  visit's ``manifest.json`` goes with its last warp.
* ``calexp/{night}/{visit}/``: reproducible by ISR while the raw file and the
  masters that served it exist; deletable only when every product that reads it
  exists: ``src``, ``psf``, ``calsrc``, ``wcs`` of every detector, the visit
  summary, the forced photometry ``forced/{batch}/{visit}.parquet`` and the
  coadds of its band (no warp of the visit left over).  Otherwise the reason
  names what still needs it (typically forced photometry).
* ``calib/bias/{group}``, ``calib/flat/{group}/{band}``: reproducible from the
  raw calibration frames while they all exist; deletable when every calexp of
  every exposure they serve exists (the calibration plan is rebuilt from the
  inventory with ``calib.validity`` of ``--config-json``).

Catalogs, summaries, coadds, light curves, QA, logs and benchmarks are never
proposed: they are final products or the record of the run.

Missing
-------
Expected from the inventory (like ``surveyred status``): per science exposure
and detector ``calexp``, ``src``, ``psf``, ``calsrc``, ``wcs``; per exposure the
visit summary and, when the tree has a ``forced/`` directory, the forced
photometry; per calibration group the master of every detector.  Coadds are not
counted (the patch list depends on the skymap).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import pandas as pd

from .status import _inventory, check_results_dir, format_table, index_ccd_products

log = logging.getLogger("surveyred.disk")

PRODUCT_TYPES = ("inventory", "calib/bias", "calib/flat", "calexp", "src", "psf", "calsrc", "wcs",
                 "visit_summary", "jointcal", "warp", "coadd", "coadd_cat", "forced", "lightcurves", "qa",
                 "logs", "benchmarks", "other")
_TOP = {t for t in PRODUCT_TYPES if "/" not in t and t not in ("inventory", "other")}


def product_type(rel: tuple[str, ...]) -> str:
    """The product type of a path given as its parts relative to RESULTS_DIR."""
    if not rel:
        return "other"
    top = rel[0]
    if top == "calib":
        return f"calib/{rel[1]}" if len(rel) >= 2 and rel[1] in ("bias", "flat") else "other"
    if top in _TOP:
        return top
    if len(rel) == 1 and top.startswith("inventory") and top.endswith(".parquet"):
        return "inventory"
    return "other"


@dataclass
class Usage:
    files: int = 0
    dirs: int = 0
    apparent: int = 0
    allocated: int = 0


@dataclass
class DiskReport:
    root: Path
    usage: dict[str, Usage]
    total: Usage
    files: dict[str, tuple[int, int]] = field(default_factory=dict)  # rel path -> (apparent, allocated), counted
    deletable: pd.DataFrame = None  # type, night, visit, path, files, apparent, allocated, reason
    kept: pd.DataFrame = None  # intermediates that are not deletable, with the reason
    missing: pd.DataFrame = None  # type, path


def disk_usage(root: str | os.PathLike) -> tuple[dict[str, Usage], Usage, dict[str, tuple[int, int]]]:
    """Per type usage, the total (= du), and per file path (relative) its counted bytes."""
    root = Path(root)
    usage = {t: Usage() for t in PRODUCT_TYPES}
    total = Usage()
    seen: set[tuple[int, int]] = set()
    per_file: dict[str, tuple[int, int]] = {}

    def account(path: Path, st: os.stat_result, rel: tuple[str, ...]) -> None:
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in seen:
                return
            seen.add(key)
        u = usage[product_type(rel)]
        app, alloc = int(st.st_size), int(st.st_blocks) * 512
        for x in (u, total):
            x.apparent += app
            x.allocated += alloc
            if stat.S_ISDIR(st.st_mode):
                x.dirs += 1
            else:
                x.files += 1
        if not stat.S_ISDIR(st.st_mode):
            per_file["/".join(rel)] = (app, alloc)

    account(root, os.lstat(root), ())
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as exc:
            log.warning("cannot list %s: %s", d, exc)
            continue
        subdirs = []
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            p = Path(e.path)
            rel = p.relative_to(root).parts
            account(p, st, rel)
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(p)
        stack.extend(reversed(subdirs))
    return usage, total, per_file


def _resolve_raw(path: str, root: Path) -> Path:
    p = Path(path)
    if p.is_absolute():
        return p
    for base in (root.resolve().parent, Path.cwd()):
        if (base / p).exists():
            return base / p
    return root.resolve().parent / p


def _split_warp_name(stem: str) -> tuple[str, str] | None:
    if "_" not in stem:
        return None
    tract, patch = stem.split("_", 1)
    return tract, patch


def analyse(results: str | os.PathLike, *, config: Mapping[str, Any] | None = None) -> DiskReport:
    """Usage per type, deletable intermediates and missing products (see the module docstring)."""
    root = check_results_dir(results)
    config = dict(config or {})
    usage, total, per_file = disk_usage(root)
    log.info("disk: %d files, %d bytes apparent, %d bytes allocated under %s", total.files, total.apparent,
             total.allocated, root)
    inv, _rej, _ = _inventory(root)
    sci = inv[inv.obstype == "science"] if len(inv) else inv
    detectors = sorted(int(d) for d in inv["detector"].unique()) if len(inv) else []
    band_of = {(str(r.night), str(r.visit)): str(r.band) for r in sci.drop_duplicates(["night", "visit"])
               .itertuples(index=False)} if len(sci) else {}
    raw_of = {(str(r.night), str(r.visit)): str(r.path) for r in sci.drop_duplicates(["night", "visit"])
              .itertuples(index=False)} if len(sci) else {}

    def size_of(paths) -> tuple[int, int, int]:
        n = a = b = 0
        for p in paths:
            rel = "/".join(Path(p).relative_to(root).parts)
            if rel in per_file:
                n += 1
                a += per_file[rel][0]
                b += per_file[rel][1]
        return n, a, b

    deletable, kept = [], []

    # warps
    warp_root = root / "warp"
    warps_left: set[tuple[str, str]] = set()  # visits with a warp whose coadd is not made yet
    if warp_root.is_dir():
        for vdir in sorted(p for p in warp_root.glob("*/*") if p.is_dir()):
            night, visit = vdir.parent.name, vdir.name
            band = band_of.get((night, visit))
            files = sorted(f for f in vdir.iterdir() if f.is_file() and f.suffix == ".fits")
            ok_all = True
            for f in files:
                parsed = _split_warp_name(f.stem)
                b = band
                if b is None:
                    try:
                        from astropy.io import fits

                        b = str(fits.getheader(f, 0).get("BAND", "")) or None
                    except Exception:  # noqa: BLE001 - unreadable warp: keep it
                        b = None
                coadd = root / "coadd" / parsed[0] / parsed[1] / f"{b}.fits" if parsed and b else None
                n, a, al = size_of([f])
                if coadd is not None and coadd.exists() and coadd.stat().st_mtime >= f.stat().st_mtime:
                    deletable.append(dict(type="warp", night=night, visit=visit, path=str(f.relative_to(root)),
                                          files=n, apparent=a, allocated=al,
                                          reason=f"its coadd {coadd.relative_to(root)} exists and is newer"))
                else:
                    ok_all = False
                    warps_left.add((night, visit))
                    kept.append(dict(type="warp", night=night, visit=visit, path=str(f.relative_to(root)),
                                     files=n, apparent=a, allocated=al,
                                     reason="its coadd " + (str(coadd.relative_to(root)) if coadd is not None
                                                            else "(band unknown)") + " is missing or older"))
            man = vdir / "manifest.json"
            if man.exists():
                n, a, al = size_of([man])
                (deletable if ok_all else kept).append(dict(
                    type="warp", night=night, visit=visit, path=str(man.relative_to(root)), files=n, apparent=a,
                    allocated=al, reason="manifest of deletable warps" if ok_all else "manifest of kept warps"))

    # calexps, per visit
    calexps = index_ccd_products(root, "calexp", ".fits")
    by_visit: dict[tuple[str, str], list[Path]] = {}
    for (night, visit, _det), p in calexps.items():
        by_visit.setdefault((night, visit), []).append(p)
    srcs = index_ccd_products(root, "src", ".parquet")
    psfs = index_ccd_products(root, "psf", ".fits")
    calsrcs = index_ccd_products(root, "calsrc", ".parquet")
    wcss = index_ccd_products(root, "wcs", ".fits")
    plan = None
    if len(inv):
        try:
            from .calib import plan_calibrations

            plan = plan_calibrations(inv, (config.get("calib") or {}).get("validity") or {"mode": "night"})
        except Exception as exc:  # noqa: BLE001
            log.warning("cannot rebuild the calibration plan (%s): masters not assessed", exc)
    sci_plan = {}
    if plan is not None:
        sci_plan = {(str(r.night), str(r.visit)): r for r in plan.science.itertuples(index=False)}

    def master_dirs(night: str, visit: str) -> list[Path]:
        r = sci_plan.get((night, visit))
        if r is None:
            return []
        out = []
        if r.bias_group is not None and not (isinstance(r.bias_group, float) and pd.isna(r.bias_group)):
            out.append(root / "calib" / "bias" / str(r.bias_group))
        if r.flat_group is not None and not (isinstance(r.flat_group, float) and pd.isna(r.flat_group)):
            out.append(root / "calib" / "flat" / str(r.flat_group) / str(r.band))
        return out

    # forced photometry: forced/{batch}/{visit}.parquet, batch = the first night of the job's window
    forced_visits = {p.stem for p in (root / "forced").glob("*/*.parquet")}
    coadd_bands = {p.stem for p in (root / "coadd").glob("*/*/*.fits")} if (root / "coadd").is_dir() else set()
    for (night, visit), paths in sorted(by_visit.items()):
        dets = sorted(int(Path(p).stem.rsplit("_", 1)[1]) for p in paths)
        needs = []
        for name, index in (("src", srcs), ("psf", psfs), ("calsrc", calsrcs), ("wcs", wcss)):
            miss = [d for d in dets if (night, visit, d) not in index]
            if miss:
                needs.append(f"{name} (detectors {','.join(map(str, miss))}) missing")
        if not (root / "visit_summary" / night / f"{visit}.parquet").exists():
            needs.append("visit_summary missing")
        if visit not in forced_visits:
            needs.append(f"forced photometry forced/*/{visit}.parquet missing")
        band = band_of.get((night, visit))
        if (night, visit) in warps_left or (band is not None and band not in coadd_bands):
            needs.append("coadd of its band not made yet")
        raw = raw_of.get((night, visit))
        reproducible = raw is not None and _resolve_raw(raw, root).exists()
        mdirs = master_dirs(night, visit)
        if plan is None or any(not d.is_dir() or not any(d.iterdir()) for d in mdirs):
            reproducible = False
        n, a, al = size_of(paths)
        vdir = Path(paths[0]).parent
        path = str(vdir.relative_to(root)) + ("/" if vdir.name == visit else f"/{visit}_*.fits")
        rec = dict(type="calexp", night=night, visit=visit, path=path, files=n, apparent=a, allocated=al)
        if reproducible and not needs:
            deletable.append(dict(rec, reason="reproducible from raw + masters; src, psf, calsrc, wcs, summary, "
                                              "forced and coadds exist"))
        else:
            why = [] if reproducible else ["not reproducible (raw file or masters missing)"]
            if needs:
                why.append("needed: " + "; ".join(needs))
            kept.append(dict(rec, reason="; ".join(why)))

    # masters
    if plan is not None:
        served: dict[Path, list[tuple[str, str]]] = {}
        for key in sci_plan:
            for d in master_dirs(*key):
                served.setdefault(d, []).append(key)
        groups = [(root / "calib" / "bias" / g, files) for g, files in plan.bias_groups.items()]
        groups += [(root / "calib" / "flat" / g / b, files) for (g, b), files in plan.flat_groups.items()]
        for d, raw_files in sorted(groups, key=lambda x: str(x[0])):
            if not d.is_dir():
                continue
            paths = sorted(p for p in d.iterdir() if p.is_file())
            n, a, al = size_of(paths)
            raw_ok = all(_resolve_raw(f, root).exists() for f in raw_files)
            users = served.get(d, [])
            pending = [k for k in users if not all((k[0], k[1], det) in calexps for det in detectors)]
            rec = dict(type="calib/" + d.relative_to(root / "calib").parts[0], night="", visit="",
                       path=str(d.relative_to(root)) + "/", files=n, apparent=a, allocated=al)
            if raw_ok and not pending:
                deletable.append(dict(rec, reason=f"reproducible from {len(raw_files)} raw frames; all "
                                                  f"{len(users)} exposures it serves have calexps"))
            else:
                why = [] if raw_ok else ["raw calibration frames missing"]
                if pending:
                    why.append(f"{len(pending)} exposures it serves still lack calexps")
                kept.append(dict(rec, reason="; ".join(why)))

    # missing
    missing = []
    if len(sci):
        for night, visit in sorted(band_of):
            for det in detectors:
                for name, index, ext in (("calexp", calexps, ".fits"), ("src", srcs, ".parquet"),
                                         ("psf", psfs, ".fits"), ("calsrc", calsrcs, ".parquet"),
                                         ("wcs", wcss, ".fits")):
                    if (night, visit, det) not in index:
                        missing.append(dict(type=name, path=f"{name}/{night}/{visit}/{visit}_{det}{ext}"))
            if not (root / "visit_summary" / night / f"{visit}.parquet").exists():
                missing.append(dict(type="visit_summary", path=f"visit_summary/{night}/{visit}.parquet"))
            if (root / "forced").is_dir() and visit not in forced_visits:
                missing.append(dict(type="forced", path=f"forced/*/{visit}.parquet"))
    if plan is not None:
        for g in sorted(plan.bias_groups):
            for det in detectors:
                if not (root / "calib" / "bias" / g / f"bias_{det}.fits").exists():
                    missing.append(dict(type="calib/bias", path=f"calib/bias/{g}/bias_{det}.fits"))
        for g, b in sorted(plan.flat_groups):
            for det in detectors:
                if not (root / "calib" / "flat" / g / b / f"flat_{det}.fits").exists():
                    missing.append(dict(type="calib/flat", path=f"calib/flat/{g}/{b}/flat_{det}.fits"))

    cols = ["type", "night", "visit", "path", "files", "apparent", "allocated", "reason"]
    return DiskReport(root=root, usage=usage, total=total, files=per_file,
                      deletable=pd.DataFrame(deletable, columns=cols), kept=pd.DataFrame(kept, columns=cols),
                      missing=pd.DataFrame(missing, columns=["type", "path"]))


def _human(n: int) -> str:
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return str(n)


def report_json(rep: DiskReport) -> dict[str, Any]:
    del_by = rep.deletable.groupby("type")[["files", "apparent", "allocated"]].sum() if len(rep.deletable) else None
    miss_by = rep.missing.groupby("type").size() if len(rep.missing) else None
    types = []
    for t in PRODUCT_TYPES:
        u = rep.usage[t]
        d = del_by.loc[t] if del_by is not None and t in del_by.index else None
        types.append(dict(type=t, files=u.files, dirs=u.dirs, apparent_bytes=u.apparent,
                          allocated_bytes=u.allocated,
                          deletable_files=int(d["files"]) if d is not None else 0,
                          deletable_apparent_bytes=int(d["apparent"]) if d is not None else 0,
                          deletable_allocated_bytes=int(d["allocated"]) if d is not None else 0,
                          missing=int(miss_by.get(t, 0)) if miss_by is not None else 0))
    return {
        "results_dir": str(rep.root),
        "total": dict(files=rep.total.files, dirs=rep.total.dirs, apparent_bytes=rep.total.apparent,
                      allocated_bytes=rep.total.allocated),
        "types": types,
        "deletable": json.loads(rep.deletable.to_json(orient="records")),
        "kept_intermediates": json.loads(rep.kept.to_json(orient="records")),
        "missing": json.loads(rep.missing.to_json(orient="records")),
    }


def render(rep: DiskReport, *, max_list: int = 40) -> str:
    js = report_json(rep)
    rows = []
    for t in js["types"]:
        if t["files"] == 0 and t["dirs"] == 0 and t["missing"] == 0:
            continue
        rows.append([t["type"], t["files"], t["apparent_bytes"], _human(t["apparent_bytes"]),
                     t["allocated_bytes"], _human(t["allocated_bytes"]), t["deletable_files"],
                     _human(t["deletable_allocated_bytes"]), t["missing"]])
    tot = js["total"]
    rows.append(["total", tot["files"], tot["apparent_bytes"], _human(tot["apparent_bytes"]),
                 tot["allocated_bytes"], _human(tot["allocated_bytes"]),
                 sum(t["deletable_files"] for t in js["types"]),
                 _human(sum(t["deletable_allocated_bytes"] for t in js["types"])),
                 sum(t["missing"] for t in js["types"])])
    lines = [f"disk usage of {rep.root} (apparent = du -sb, allocated = du -s -B1)"]
    lines += format_table(rows, ["type", "files", "apparent", "", "allocated", "", "deletable", "frees",
                                 "missing"], right=range(1, 9))
    for title, df in (("deletable", rep.deletable), ("kept intermediates", rep.kept)):
        lines.append("")
        lines.append(f"{title}: {len(df)}")
        for r in df.head(max_list).itertuples(index=False):
            lines.append(f"  {r.path}  ({_human(int(r.allocated))})  {r.reason}")
        if len(df) > max_list:
            lines.append(f"  ... {len(df) - max_list} more (--json lists all)")
    lines.append("")
    lines.append(f"missing: {len(rep.missing)}")
    for r in rep.missing.head(max_list).itertuples(index=False):
        lines.append(f"  {r.path}")
    if len(rep.missing) > max_list:
        lines.append(f"  ... {len(rep.missing) - max_list} more (--json lists all)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``surveyred disk RESULTS_DIR [--json]``."""
    from .runtime import common_arguments, json_arg, run, setup_logging

    p = argparse.ArgumentParser(prog="surveyred disk", description=(
        "Files and bytes per product type (apparent = du -sb, allocated = du -s -B1), the intermediate "
        "products that can be deleted safely, and the expected products that are missing."))
    p.add_argument("results_dir", metavar="RESULTS_DIR")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--config-json", default=None, help='workflow config keys used: {"calib": {"validity": ...}}')
    common_arguments(p, threads=False)
    args = p.parse_args(argv)
    setup_logging(args.log)

    def body() -> None:
        rep = analyse(args.results_dir, config=json_arg(args.config_json))
        if args.json:
            sys.stdout.write(json.dumps(report_json(rep), indent=1, sort_keys=True) + "\n")
        else:
            sys.stdout.write(render(rep))

    return run(body, what=f"disk {args.results_dir}")
