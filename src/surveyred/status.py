"""Production status and the per-CCD summary of a results tree.

``surveyred status RESULTS_DIR`` answers "which CCDs are done, which failed and
why" for a run that is finished, partial (``snakemake --keep-going``) or still
going.  ``surveyred ccd-summary RESULTS_DIR`` tabulates one row per calibrated
exposure CCD (the anchor pipelines' log-file analysis table).  Both read only
what is on disk: the inventory and rejects tables, product files (Parquet
metadata and FITS headers, never pixels), the rule logs and, when present,
Snakemake's and Slurm's own logs.  Nothing is modified.

What is expected
----------------
One CCD per (science exposure, detector) of the inventory, plus every detector
of each rejected raw science file (ingest rejects a file whole).  A rejected file
whose headers cannot be read at all is one row with night/band ``?`` and
detector ``-1``.

The state of a CCD
------------------
The CCD goes through the per-CCD stages ``isr`` -> ``characterize`` ->
``calibrate``; for each stage in turn:

1. the stage's product exists: read its status (characterize: Parquet metadata
   ``status``/``failure_class``/``failure_message``; calibrate: the visit
   summary's row ``status``/``failure_class``/``cause``).  ``failed`` there means
   the CCD failed at that stage; otherwise go on to the next stage;
2. no product, and the job's log (``logs/<rule>/<night>/<visit>.log``) holds the
   failure line that :func:`surveyred.runtime.run` writes (``<what> failed:
   FailureClass: message``): failed with that class;
3. no product, no failure line, but Snakemake or Slurm recorded that the job was
   killed (``.snakemake/log/*.snakemake.log``: ``exit status 137``, ``SIGKILL``,
   ``OUT_OF_MEMORY``, ``TIMEOUT``; ``.snakemake/slurm_logs/**.log``: ``oom-kill``,
   ``OUT_OF_MEMORY``, ``DUE TO TIME LIMIT``) after the job's log was last
   written: failed with class ``OutOfMemory``, ``Timeout`` or ``Killed``;
4. ISR only: a master calibration job that serves this exposure failed (its log,
   e.g. ``logs/master_flat/<group>/<band>.log``): failed at that stage with its
   class (ISR will not run);
5. otherwise ``running`` when the job's log exists (a job in progress, or one
   killed without a trace) and ``pending`` when it does not.

A CCD is ``ok`` when calibrate's status is ``ok`` or
``not_absolutely_calibrated`` (the latter is noted in ``message``).  A product
always wins over a log: a job that failed and was re-run successfully is ok.

Outputs
-------
``--output status.parquet``: one row per expected CCD (``kind = "ccd"``) plus one
row per failed job that is not a per-CCD stage (``kind = "job"``: masters,
jointcal, coadd, forced, ... with ``detector = -1``).  Columns: ``kind``,
``night``, ``band``, ``visit``, ``detector``, ``state`` (ok / failed / running /
pending), ``stage`` (the stage reached, or that failed), ``failure_class``,
``message``, ``file`` (the log or product that says so), ``source`` (``product``,
``log``, ``rejects``, ``snakemake``, ``slurm``), ``raw_path``.  The schema
metadata holds the per band and night summary as JSON (``status_summary``) and
provenance.  ``--summary status.txt``: the terminal table.  ``--json``: summary
and failures as JSON on stdout.

Per-CCD summary columns
-----------------------
``visit``, ``night``, ``band``, ``detector``, ``exptime`` (s), ``mjd``,
``n_detected`` (sources in the src catalog), ``n_psf_stars``, ``psf_fwhm_px``,
``psf_fwhm_arcsec`` (``psf_fwhm_px`` times the pixel scale of the fitted WCS, else
of the calexp's header WCS, else of the instrument; NaN when none is known),
``pixel_scale_arcsec``, ``apcorr``, ``sky`` (e-/px), ``n_astrom`` (astrometric
matches kept), ``n_photom`` (photometric reference stars kept), ``astrom_rms_mas``
(per-coordinate rms of the astrometric matches), ``zero_point``,
``zero_point_err``, ``abscal``, ``status`` (calibrate's status, else
characterize's when calibrate has not run, else ``pending``), ``failure_class``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from .errors import ConfigError

log = logging.getLogger("surveyred.status")

#: Per-CCD stages in processing order: (rule, product directory).
CCD_STAGES = ("isr", "characterize", "calibrate")
STATE_ORDER = ("ok", "failed", "running", "pending")
OK_STATUSES = ("ok", "not_absolutely_calibrated")

#: The failure line of a rule log (see surveyred.runtime.FAILURE_LINE).
_FAILURE_RE = re.compile(r"\sERROR\s+\S+:\s+(?P<what>.*?) failed: (?P<cls>[A-Za-z][A-Za-z0-9_]*): ?(?P<msg>.*)$")
_DONE_RE = re.compile(r"\sINFO\s+surveyred: .* done in [0-9.]+ s$")
_NIGHT_RE = re.compile(r"^\d{8}$")
_DET_FILE_RE = re.compile(r"^(?P<visit>.+)_(?P<det>\d+)$")

#: Evidence that the batch system or the OS killed a job, most specific first.
_KILL_PATTERNS = (
    ("OutOfMemory", re.compile(r"OUT_OF_MEMORY|oom[-_ ]kill|Out Of Memory|OOM Killed|MemoryError", re.I)),
    ("Timeout", re.compile(r"DUE TO TIME LIMIT|\bTIMEOUT\b|time limit", re.I)),
    ("Killed", re.compile(r"exit status 137|exit code 137|SIGKILL|Signals\.SIGKILL|CANCELLED|NODE_FAIL|"
                          r"exit status -9\b|killed", re.I)),
)


# -- reading the tree ---------------------------------------------------------------------


def check_results_dir(results: str | os.PathLike) -> Path:
    """``results`` as a Path, or a ConfigError when it is not a surveyred results directory."""
    root = Path(results)
    if not root.is_dir():
        raise ConfigError(f"{root}: not a directory (expected a surveyred results directory)")
    markers = ("inventory.parquet", "inventory_rejects.parquet", "logs", "calexp")
    if not any((root / m).exists() for m in markers):
        raise ConfigError(f"{root}: not a surveyred results directory (no inventory.parquet, logs/ or calexp/)")
    return root


def index_ccd_products(root: Path, kind: str, suffix: str) -> dict[tuple[str, str, int], Path]:
    """``(night, visit, detector) -> path`` of ``root/kind``'s per-detector files.

    Accepts both layouts: ``kind/{night}/{visit}/{visit}_{det}{suffix}`` (one
    directory per visit) and ``kind/{night}/{visit}_{det}{suffix}``.
    """
    out: dict[tuple[str, str, int], Path] = {}
    base = root / kind
    if not base.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        rel = Path(dirpath).relative_to(base).parts
        if not rel or not _NIGHT_RE.match(rel[0]) or len(rel) > 2:
            continue
        for name in sorted(filenames):
            if not name.endswith(suffix) or name.startswith("."):
                continue
            m = _DET_FILE_RE.match(name[: -len(suffix)])
            if not m:
                continue
            visit = m.group("visit")
            if len(rel) == 2 and rel[1] != visit:
                continue
            out[(rel[0], visit, int(m.group("det")))] = Path(dirpath) / name
    return out


@dataclass
class JobLog:
    """One rule log: ``logs/<rule>/...``."""

    rule: str
    key: tuple[str, ...]  # (night, visit) for per-visit rules, else the path parts
    path: Path
    mtime: float
    failure_class: str | None = None
    message: str = ""


def read_failure_line(path: str | os.PathLike, *, tail_bytes: int = 1 << 20) -> tuple[str, str] | None:
    """``(FailureClass, message)`` of the last failure line in a rule log, or None."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - tail_bytes))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return None
    found = None
    for line in text.splitlines():
        m = _FAILURE_RE.search(line)
        if m:
            found = (m.group("cls"), m.group("msg").strip())
        elif found and _DONE_RE.search(line):
            found = None  # a later command in the same log finished (runtime.run's "done in")
    return found


def scan_logs(root: Path) -> dict[tuple[str, tuple[str, ...]], JobLog]:
    """Every rule log under ``root/logs`` with its failure line (if any)."""
    out: dict[tuple[str, tuple[str, ...]], JobLog] = {}
    base = root / "logs"
    if not base.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.endswith(".log") or name.startswith("."):
                continue
            path = Path(dirpath) / name
            parts = path.relative_to(base).parts
            if len(parts) == 1:
                rule, key = parts[0][:-4], ()
            else:
                rule, key = parts[0], tuple(parts[1:-1]) + (parts[-1][:-4],)
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            job = JobLog(rule=rule, key=key, path=path, mtime=mtime)
            hit = read_failure_line(path)
            if hit:
                job.failure_class, job.message = hit
            out[(rule, key)] = job
    return out


def _snakemake_dirs(root: Path, snakemake_dir: str | os.PathLike | None) -> list[Path]:
    if snakemake_dir is not None:
        return [Path(snakemake_dir)]
    seen, out = set(), []
    for cand in (root / ".snakemake", root.resolve().parent / ".snakemake", Path.cwd() / ".snakemake"):
        try:
            key = cand.resolve()
        except OSError:
            continue
        if cand.is_dir() and key not in seen:
            seen.add(key)
            out.append(cand)
    return out


_STAMP_RE = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")


def _stamp(line: str) -> float | None:
    """Epoch seconds of a Snakemake time-stamp line ``[Sat Nov 21 19:18:45 2026]`` (local time)."""
    m = _STAMP_RE.match(line.strip())
    if not m:
        return None
    try:
        return time.mktime(time.strptime(m.group(1), "%a %b %d %H:%M:%S %Y"))
    except (ValueError, OverflowError):
        return None


def _classify_kill(text: str) -> str | None:
    for cls, pattern in _KILL_PATTERNS:
        if pattern.search(text):
            return cls
    return None


def _log_key(path_text: str, workdir: Path, logs_dir: Path) -> tuple[str, tuple[str, ...]] | None:
    p = Path(path_text)
    if not p.is_absolute():
        p = workdir / p
    try:
        parts = p.resolve().relative_to(logs_dir.resolve()).parts
    except (ValueError, OSError):
        return None
    if not parts or not parts[-1].endswith(".log"):
        return None
    if len(parts) == 1:
        return parts[0][:-4], ()
    return parts[0], tuple(parts[1:-1]) + (parts[-1][:-4],)


_LOGPATH_RE = re.compile(r"[^\s,'\"()]+\.log\b")


def scan_kill_evidence(root: Path, snakemake_dir: str | os.PathLike | None = None
                       ) -> dict[tuple[str, tuple[str, ...]], tuple[str, str, Path, float]]:
    """Jobs that Snakemake or Slurm recorded as killed.

    Returns ``(rule, key) -> (class, evidence line, evidence file, its mtime)``.
    Snakemake's run logs are split into ``Error in rule`` blocks (each names the
    rule log); Slurm's per-submission logs are searched for out-of-memory and
    time-limit messages and attributed to every rule log they mention.
    """
    logs_dir = root / "logs"
    out: dict[tuple[str, tuple[str, ...]], tuple[str, str, Path, float]] = {}
    for smk in _snakemake_dirs(root, snakemake_dir):
        workdir = smk.parent
        for path in sorted((smk / "log").glob("*.snakemake.log")):
            try:
                text = path.read_text(errors="replace")
                mtime = path.stat().st_mtime
            except OSError:
                continue
            lines = text.splitlines()
            # (a) a line that says how the job's command ended ("Command '... --log X' returned
            #     non-zero exit status 137", "died with <Signals.SIGKILL: 9>"): its own log paths;
            # (b) an "Error in rule" block (the Slurm executor's "SLURM status is: 'OUT_OF_MEMORY'"):
            #     the block's "log:" paths
            # When: the time stamp Snakemake prints after the kill (its "[Sat Nov 21 19:18:45 2026]"
            # before "Error in rule"), else the file's mtime; evidence older than the rule log's last
            # write belongs to an earlier attempt (see job_state).
            stamps = [_stamp(ln) for ln in lines]
            after = [mtime] * (len(lines) + 1)
            for k in range(len(lines) - 1, -1, -1):
                after[k] = stamps[k] if stamps[k] is not None else after[k + 1]
            for k, line in enumerate(lines):
                cls = _classify_kill(line)
                if cls:
                    for lp in _LOGPATH_RE.findall(line):
                        key = _log_key(lp, workdir, logs_dir)
                        if key:
                            out[key] = (cls, " ".join(line.split())[:300], path, after[k])
            i = 0
            while i < len(lines):
                if not lines[i].startswith("Error in rule"):
                    i += 1
                    continue
                j = i + 1
                while j < len(lines) and lines[j][:1] in (" ", "\t"):
                    j += 1
                block = lines[i:j]
                cls = _classify_kill("\n".join(block))
                if cls:
                    evidence = next((ln.strip() for ln in block if _classify_kill(ln)), cls)
                    when = next((stamps[k] for k in range(i - 1, max(-1, i - 3), -1) if stamps[k] is not None), mtime)
                    for ln in block:
                        if ln.strip().startswith("log:"):
                            for lp in _LOGPATH_RE.findall(ln):
                                key = _log_key(lp, workdir, logs_dir)
                                if key:
                                    out.setdefault(key, (cls, evidence, path, when))
                i = j
        slurm = smk / "slurm_logs"
        if slurm.is_dir():
            for path in sorted(slurm.rglob("*.log")):
                try:
                    text = path.read_text(errors="replace")
                    mtime = path.stat().st_mtime
                except OSError:
                    continue
                cls = _classify_kill(text)
                if cls is None or cls == "Killed" and "slurmstepd" not in text and "CANCELLED" not in text:
                    continue
                evidence = next((ln.strip() for ln in text.splitlines() if _classify_kill(ln)), cls)
                for lp in _LOGPATH_RE.findall(text):
                    key = _log_key(lp, workdir, logs_dir)
                    if key and key[0] != path.stem:
                        out.setdefault(key, (cls, evidence, path, mtime))
    return out


def _read_parquet_meta(path: Path) -> tuple[dict[str, str], int]:
    import pyarrow.parquet as pq

    md = pq.read_metadata(path)
    meta = {k.decode(): v.decode(errors="replace") for k, v in (md.metadata or {}).items()
            if not k.startswith(b"ARROW") and k != b"pandas"}
    return meta, int(md.num_rows)


def _inventory(root: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    import pyarrow.parquet as pq

    inv_path, rej_path = root / "inventory.parquet", root / "inventory_rejects.parquet"
    inv = pd.read_parquet(inv_path) if inv_path.exists() else pd.DataFrame(
        columns=["path", "detector", "visit", "obstype", "band", "night", "exptime"])
    rej = pd.read_parquet(rej_path) if rej_path.exists() else pd.DataFrame(
        columns=["path", "hdu", "failure_class", "message"])
    meta = {}
    if inv_path.exists():
        meta = {k.decode(): v.decode() for k, v in (pq.read_schema(inv_path).metadata or {}).items()
                if k.startswith(b"surveyred")}
    return inv, rej, meta


@functools.lru_cache(maxsize=4)
def _instrument(name: str):
    from .instrument import load_instrument

    return load_instrument(name)


def _rejected_metadata(path: str, instrument_name: str | None, offset_hours: float) -> dict[str, Any]:
    """Best effort: obstype, band, night, visit of a rejected raw file from whatever headers it has."""
    import warnings

    from astropy.io import fits

    from .ingest import _detector_metadata, file_stem, sanitize_visit
    out: dict[str, Any] = {"visit": sanitize_visit(file_stem(path))}
    if not instrument_name:
        return out
    try:
        inst = _instrument(instrument_name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(path, lazy_load_hdus=True, ignore_missing_end=True, memmap=False) as hdul:
                primary = hdul[0].header.copy()
                try:
                    det_header = hdul[1].header.copy()
                except Exception:  # noqa: BLE001 - the extension may be what is damaged
                    det_header = primary
        out.update(_detector_metadata(inst, primary, det_header, where=path, night_offset_hours=offset_hours))
    except Exception:  # noqa: BLE001 - a rejected file may be unreadable in any way
        pass
    return out


# -- the status -------------------------------------------------------------------------------------


@dataclass
class StatusReport:
    """Per-CCD states, failed jobs and the per band and night summary."""

    table: pd.DataFrame  # kind, night, band, visit, detector, state, stage, failure_class, message, file, ...
    summary: pd.DataFrame  # band, night, expected, processed, ok, failed, running, pending

    @property
    def failures(self) -> pd.DataFrame:
        return self.table[self.table.state == "failed"].reset_index(drop=True)


STATUS_COLUMNS = ("kind", "night", "band", "visit", "detector", "state", "stage", "failure_class", "message",
                  "file", "source", "raw_path")


def _rel(path: Path | str | None, root: Path) -> str:
    if path is None or path == "":
        return ""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(root.resolve().parent))
    except (ValueError, OSError):
        return str(p)


def collect_status(results: str | os.PathLike, *, config: Mapping[str, Any] | None = None,
                   snakemake_dir: str | os.PathLike | None = None) -> StatusReport:
    """The production status of a results tree (see the module docstring).

    ``config`` is the workflow configuration (or the part of it that matters):
    ``night_utc_offset_hours`` (to date rejected files) and ``calib.validity``
    (to attribute failed master jobs to the exposures they serve).
    """
    root = check_results_dir(results)
    config = dict(config or {})
    inv, rej, inv_meta = _inventory(root)
    logs = scan_logs(root)
    kills = scan_kill_evidence(root, snakemake_dir)
    products = {
        "isr": index_ccd_products(root, "calexp", ".fits"),
        "characterize": index_ccd_products(root, "src", ".parquet"),
    }
    summaries_dir = root / "visit_summary"
    rows: list[dict[str, Any]] = []
    used_logs: set[tuple[str, tuple[str, ...]]] = set()

    sci = inv[inv.obstype == "science"] if len(inv) else inv
    detectors = sorted(int(d) for d in inv["detector"].unique()) if len(inv) else []

    # master calibration jobs that failed, and which science visits they serve
    blocked: dict[tuple[str, str], tuple[str, JobLog]] = {}
    failed_masters = {k: j for k, j in logs.items() if k[0] in ("master_bias", "master_flat") and j.failure_class}
    if failed_masters and len(inv):
        try:
            from .calib import plan_calibrations

            plan = plan_calibrations(inv, (config.get("calib") or {}).get("validity") or {"mode": "night"})
            for r in plan.science.itertuples(index=False):
                for rule, key in (("master_bias", (str(r.bias_group),)),
                                  ("master_flat", (str(r.flat_group), str(r.band)))):
                    job = failed_masters.get((rule, key))
                    if job is not None and (str(r.night), str(r.visit)) not in blocked:
                        blocked[(str(r.night), str(r.visit))] = (rule, job)
        except Exception as exc:  # noqa: BLE001 - the plan is a refinement; report without it
            log.warning("cannot rebuild the calibration plan (%s): failed masters not attributed", exc)

    visit_summaries: dict[tuple[str, str], pd.DataFrame | None] = {}

    def visit_summary(night: str, visit: str) -> tuple[pd.DataFrame | None, Path]:
        path = summaries_dir / night / f"{visit}.parquet"
        if (night, visit) not in visit_summaries:
            visit_summaries[(night, visit)] = pd.read_parquet(path) if path.exists() else None
        return visit_summaries[(night, visit)], path

    def job_state(rule: str, night: str, visit: str) -> dict[str, Any] | None:
        """Failed/running state of a per-visit job without product, or None (pending)."""
        key = (rule, (night, visit))
        job = logs.get(key)
        if job is not None:
            used_logs.add(key)
        if job is not None and job.failure_class:
            return dict(state="failed", stage=rule, failure_class=job.failure_class, message=job.message,
                        file=_rel(job.path, root), source="log")
        kill = kills.get(key)
        if kill is not None and (job is None or kill[3] >= job.mtime - 1.0):
            return dict(state="failed", stage=rule, failure_class=kill[0], message=kill[1],
                        file=_rel(kill[2], root), source="slurm" if "slurm_logs" in str(kill[2]) else "snakemake")
        if rule == "isr" and (night, visit) in blocked:
            mrule, mjob = blocked[(night, visit)]
            return dict(state="failed", stage=mrule, failure_class=mjob.failure_class,
                        message=f"upstream {mrule} failed: {mjob.message}", file=_rel(mjob.path, root), source="log")
        if job is not None:
            return dict(state="running", stage=rule, failure_class="", message="log without a failure line",
                        file=_rel(job.path, root), source="log")
        return None

    log.info("status of %s: %d science CCDs expected, %d rejected files, %d rule logs", root, len(sci), len(rej),
             len(logs))
    for i, r in enumerate(sci.sort_values(["night", "visit", "detector"]).itertuples(index=False), start=1):
        if i % 5000 == 0:
            log.info("status: %d/%d CCDs", i, len(sci))
        night, visit, det = str(r.night), str(r.visit), int(r.detector)
        row = dict(kind="ccd", night=night, band=str(r.band), visit=visit, detector=det, state="pending",
                   stage="isr", failure_class="", message="", file="", source="", raw_path=str(r.path))
        for stage in CCD_STAGES:
            if stage == "calibrate":
                summ, spath = visit_summary(night, visit)
                if summ is not None:
                    used_logs.add(("calibrate", (night, visit)))
                    hit = summ[summ.detector.astype(int) == det]
                    if len(hit):
                        s = hit.iloc[0]
                        status = str(s.get("status", ""))
                        ok = status in OK_STATUSES
                        row.update(state="ok" if ok else "failed", stage=stage,
                                   failure_class=str(s.get("failure_class", "") or ""),
                                   message=str(s.get("cause", "") or "") if not ok or status != "ok" else "",
                                   file=_rel(spath, root), source="product")
                        if ok and status != "ok":
                            row["message"] = status + (f" ({row['message']})" if row["message"] else "")
                    else:
                        row.update(state="failed", stage=stage, failure_class="MissingProduct",
                                   message=f"detector {det} absent from the visit summary",
                                   file=_rel(spath, root), source="product")
                    break
            else:
                path = products[stage].get((night, visit, det))
                if path is not None:
                    used_logs.add((stage, (night, visit)))
                    if stage == "characterize":
                        try:
                            meta, _ = _read_parquet_meta(path)
                        except Exception as exc:  # noqa: BLE001 - a damaged product is a failure
                            row.update(state="failed", stage=stage, failure_class="CorruptInput",
                                       message=f"{path}: unreadable source catalog ({exc})",
                                       file=_rel(path, root), source="product")
                            break
                        if meta.get("status", "ok") not in ("ok", ""):
                            row.update(state="failed", stage=stage, failure_class=meta.get("failure_class", ""),
                                       message=meta.get("failure_message", ""), file=_rel(path, root),
                                       source="product")
                            break
                    continue
            st = job_state(stage, night, visit)
            if st is None:
                row.update(state="pending", stage=stage)
            else:
                row.update(st)
            break
        rows.append(row)

    # rejected raw files: every detector of a rejected science file is a failed CCD
    if len(rej):
        instrument_name = inv_meta.get("surveyred.instrument")
        offset = float(config.get("night_utc_offset_hours", 0) or 0)
        for path, grp in rej.groupby("path", sort=True):
            grp = grp.sort_values("hdu", na_position="first")
            first = grp.iloc[0]
            cls = str(first.failure_class)
            msg = str(first.message)
            md = _rejected_metadata(str(path), instrument_name, offset)
            obstype = md.get("obstype")
            base = dict(kind="ccd", night=str(md.get("night") or "?"), band=str(md.get("band") or "?"),
                        visit=str(md.get("visit") or ""), state="failed", stage="ingest", failure_class=cls,
                        message=msg, file=str(path), source="rejects", raw_path=str(path))
            if obstype == "science" and detectors:
                rows.extend(dict(base, detector=d) for d in detectors)
            elif obstype is None:
                rows.append(dict(base, detector=-1))
            else:
                rows.append(dict(base, kind="job", detector=-1, message=f"{obstype} frame: {msg}"))

    # failed jobs that are not a per-CCD stage (masters, jointcal, coadd, forced, ...) and
    # failed per-CCD-stage jobs not matched to an inventory exposure
    for key, job in sorted(logs.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        rule, parts = key
        if rule in CCD_STAGES and key in used_logs:
            continue
        kill = kills.get(key)
        if job.failure_class:
            cls, msg, src, fpath = job.failure_class, job.message, "log", job.path
        elif kill is not None and kill[3] >= job.mtime - 1.0:
            cls, msg, src, fpath = kill[0], kill[1], "slurm" if "slurm_logs" in str(kill[2]) else "snakemake", kill[2]
        else:
            continue
        night = parts[0] if len(parts) == 2 and _NIGHT_RE.match(parts[0]) else ""
        visit = parts[1] if night else ""
        band = parts[-1] if rule == "master_flat" and len(parts) == 2 else ""
        if night:
            hit = sci[(sci.night.astype(str) == night) & (sci.visit.astype(str) == visit)] if len(sci) else sci
            band = str(hit.band.iloc[0]) if len(hit) else band
        rows.append(dict(kind="job", night=night or "-", band=band or "-", visit=visit or "/".join(parts),
                         detector=-1, state="failed", stage=rule, failure_class=cls, message=msg,
                         file=_rel(fpath, root), source=src, raw_path=""))

    table = pd.DataFrame(rows, columns=list(STATUS_COLUMNS))
    if len(table):
        table["detector"] = table["detector"].astype("int64")
        table = table.sort_values(["kind", "night", "band", "visit", "detector", "stage"],
                                  kind="mergesort").reset_index(drop=True)
    else:
        table = table.astype({"detector": "int64"})
    return StatusReport(table=table, summary=summarize(table))


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per band and night: expected, processed (ok + failed), ok, failed, running, pending CCDs."""
    ccd = table[table.kind == "ccd"]
    cols = ["band", "night", "expected", "processed", "ok", "failed", "running", "pending"]
    if not len(ccd):
        return pd.DataFrame(columns=cols)
    counts = ccd.groupby(["band", "night", "state"]).size().unstack("state", fill_value=0)
    for s in STATE_ORDER:
        if s not in counts:
            counts[s] = 0
    counts = counts[list(STATE_ORDER)].reset_index()
    counts["expected"] = counts[list(STATE_ORDER)].sum(axis=1)
    counts["processed"] = counts["ok"] + counts["failed"]
    out = counts[cols].sort_values(["band", "night"]).reset_index(drop=True)
    for c in cols[2:]:
        out[c] = out[c].astype("int64")
    return out


def format_table(rows: list[list[Any]], header: list[str], *, right: Iterable[int] = ()) -> list[str]:
    """Aligned text columns (``right``: indices of right-aligned columns)."""
    right = set(right)
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for r in cells:
        out.append("  ".join(c.rjust(w) if i in right else c.ljust(w)
                             for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def render_status(report: StatusReport, *, max_message: int = 110) -> str:
    """The terminal report: the per band and night table, totals, then every failure."""
    s = report.summary
    nums = ["expected", "processed", "ok", "failed", "running", "pending"]
    rows = [[r.band, r.night, *[int(getattr(r, c)) for c in nums]] for r in s.itertuples(index=False)]
    if len(s):
        rows.append(["total", "", *[int(s[c].sum()) for c in nums]])
    lines = ["CCDs per band and night"]
    lines += format_table(rows, ["band", "night", *nums], right=range(2, 8))
    fails = report.failures
    lines.append("")
    if not len(fails):
        lines.append("failures: none")
    else:
        by_class = fails.groupby("failure_class").size().sort_index()
        lines.append(f"failures: {len(fails)} (" + ", ".join(f"{k}={v}" for k, v in by_class.items()) + ")")
        frows = []
        for f in fails.itertuples(index=False):
            msg = f.message if len(f.message) <= max_message else f.message[: max_message - 3] + "..."
            frows.append([f.stage, f.night, f.band, f.visit, "-" if f.detector < 0 else f.detector,
                          f.failure_class, f.file, msg])
        lines += format_table(frows, ["stage", "night", "band", "visit", "det", "class", "file", "message"],
                              right=[4])
    return "\n".join(lines) + "\n"


def _jsonable(df: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(df.to_json(orient="records"))


def status_json(report: StatusReport) -> dict[str, Any]:
    s = report.summary
    totals = {c: int(s[c].sum()) for c in ("expected", "processed", "ok", "failed", "running", "pending")}
    return {"totals": totals, "summary": _jsonable(s), "failures": _jsonable(report.failures)}


def _write_parquet(df: pd.DataFrame, path: str | os.PathLike, meta: Mapping[str, Any],
                   config: Mapping[str, Any] | None, step: str) -> None:
    from . import __version__
    from .fitsio import write_parquet
    from .provenance import config_hash, git_revision

    write_parquet(df, path, {"software_version": __version__, "git_revision": git_revision(),
                             "config_hash": config_hash(config), "step": step, **meta})


def _write_text(text: str, path: str | os.PathLike) -> None:
    from .fitsio import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


# -- the per-CCD summary ------------------------------------------------------------------------------


def _pixel_scale_from_header(h) -> float:
    """arcsec/px from a CD (or CDELT/PC) matrix, NaN when the header has no celestial WCS."""
    try:
        if "CD1_1" in h:
            cd = np.array([[float(h.get("CD1_1", 0)), float(h.get("CD1_2", 0))],
                           [float(h.get("CD2_1", 0)), float(h.get("CD2_2", 0))]])
        elif "CDELT1" in h and "RA" in str(h.get("CTYPE1", "")).upper():
            pc = np.array([[float(h.get("PC1_1", 1)), float(h.get("PC1_2", 0))],
                           [float(h.get("PC2_1", 0)), float(h.get("PC2_2", 1))]])
            cd = pc * np.array([[float(h["CDELT1"])], [float(h["CDELT2"])]])
        else:
            return float("nan")
        if "RA" not in str(h.get("CTYPE1", "RA")).upper():
            return float("nan")
        return float(math.sqrt(abs(np.linalg.det(cd))) * 3600.0)
    except (TypeError, ValueError, KeyError):
        return float("nan")


def _f(v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return x


SUMMARY_COLUMNS = ("visit", "night", "band", "detector", "exptime", "mjd", "n_detected", "n_psf_stars",
                   "psf_fwhm_px", "psf_fwhm_arcsec", "pixel_scale_arcsec", "apcorr", "sky", "n_astrom",
                   "n_photom", "astrom_rms_mas", "zero_point", "zero_point_err", "abscal", "status",
                   "failure_class")


def collect_ccd_summary(results: str | os.PathLike, *, instrument: str | None = None) -> pd.DataFrame:
    """One row per calibrated exposure CCD (a calexp on disk); see the module docstring.

    Reads calexp and wcs primary/IMAGE headers (no pixels), src and calsrc
    Parquet metadata and the visit summaries.  ``instrument`` (name or YAML)
    supplies a fallback pixel scale.
    """
    from .fitsio import read_headers

    root = check_results_dir(results)
    calexps = index_ccd_products(root, "calexp", ".fits")
    srcs = index_ccd_products(root, "src", ".parquet")
    wcss = index_ccd_products(root, "wcs", ".fits")
    inst_scale = float("nan")
    if instrument:
        from .instrument import load_instrument

        ps = load_instrument(instrument).pixel_scale
        inst_scale = float(ps) if ps else float("nan")
    summaries: dict[tuple[str, str], pd.DataFrame | None] = {}
    rows = []
    for (night, visit, det), cpath in sorted(calexps.items()):
        row: dict[str, Any] = dict(visit=visit, night=night, band="", detector=det, status="pending", failure_class="")
        try:
            headers = read_headers(cpath)
            prim = headers[0]
            img = next((h for h in headers[1:] if h.get("EXTNAME") == "IMAGE"), prim)
        except Exception as exc:  # noqa: BLE001 - a damaged calexp is reported, not fatal
            log.warning("%s: unreadable calexp headers (%s)", cpath, exc)
            prim = img = {}
            row.update(status="failed", failure_class="CorruptInput")
        row["band"] = str(prim.get("BAND", "") or "")
        row["exptime"] = _f(prim.get("EXPTIME"))
        mjd = prim.get("MJD-OBS", prim.get("MJD"))
        row["mjd"] = _f(mjd)
        scale = _pixel_scale_from_header(img)
        spath = srcs.get((night, visit, det))
        if spath is not None:
            try:
                meta, nrows = _read_parquet_meta(spath)
            except Exception:  # noqa: BLE001
                meta, nrows = {}, 0
            row["n_detected"] = nrows
            row["n_psf_stars"] = int(_f(meta.get("n_psf_stars")) if np.isfinite(_f(meta.get("n_psf_stars"))) else -1)
            row["psf_fwhm_px"] = _f(meta.get("psf_fwhm"))
            row["apcorr"] = _f(meta.get("apcorr"))
            row["sky"] = _f(meta.get("sky_level"))
            row["band"] = row["band"] or meta.get("band", "")
            if np.isnan(row["exptime"]):
                row["exptime"] = _f(meta.get("exptime"))
            row["status"] = meta.get("status", "ok") or "ok"
            row["failure_class"] = meta.get("failure_class", "") or ""
        wpath = wcss.get((night, visit, det))
        if wpath is not None:
            try:
                wh = read_headers(wpath)[0]
                wscale = _pixel_scale_from_header(wh)
                if np.isfinite(wscale) and bool(wh.get("ABSCAL", True)):
                    scale = wscale
                row["n_photom"] = int(wh.get("NPHOTREF", -1))
                row["n_astrom"] = int(wh.get("NMATCH", -1))
            except Exception as exc:  # noqa: BLE001
                log.warning("%s: unreadable wcs header (%s)", wpath, exc)
        if (night, visit) not in summaries:
            p = root / "visit_summary" / night / f"{visit}.parquet"
            summaries[(night, visit)] = pd.read_parquet(p) if p.exists() else None
        summ = summaries[(night, visit)]
        if summ is not None:
            hit = summ[summ.detector.astype(int) == det]
            if len(hit):
                s = hit.iloc[0]
                row.update(zero_point=_f(s.get("zero_point")), zero_point_err=_f(s.get("zero_point_err")),
                           astrom_rms_mas=_f(s.get("astrom_rms_mas")), abscal=bool(s.get("abscal", False)),
                           status=str(s.get("status", "")), failure_class=str(s.get("failure_class", "") or ""))
                row.setdefault("n_astrom", int(s.get("n_match", -1)))
                if np.isnan(row.get("psf_fwhm_px", np.nan)):
                    row["psf_fwhm_px"] = _f(s.get("psf_fwhm"))
        if not np.isfinite(scale):
            scale = inst_scale
        row["pixel_scale_arcsec"] = scale
        row["psf_fwhm_arcsec"] = row.get("psf_fwhm_px", np.nan) * scale
        rows.append(row)
    df = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    ints = ("detector", "n_detected", "n_psf_stars", "n_astrom", "n_photom")
    for c in ints:
        df[c] = df[c].fillna(-1).astype("int64")
    for c in SUMMARY_COLUMNS:
        if c not in ints and c not in ("visit", "night", "band", "status", "failure_class", "abscal"):
            df[c] = df[c].astype("float64")
    df["abscal"] = df["abscal"].fillna(False).astype(bool)
    return df


def render_ccd_summary(df: pd.DataFrame) -> str:
    def fmt(v, spec):
        return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)

    rows = [[r.visit, r.night, r.band, r.detector, fmt(r.exptime, ".0f"), r.n_detected,
             fmt(r.psf_fwhm_px, ".2f"), fmt(r.psf_fwhm_arcsec, ".2f"), fmt(r.apcorr, ".4f"),
             r.n_astrom, r.n_photom, fmt(r.astrom_rms_mas, ".1f"), fmt(r.zero_point, ".4f"),
             fmt(r.zero_point_err, ".4f"), r.status, r.failure_class] for r in df.itertuples(index=False)]
    head = ["visit", "night", "band", "det", "exptime", "ndet", "fwhm_px", "fwhm_as", "apcorr", "nastrom",
            "nphotom", "rms_mas", "zp", "zp_err", "status", "class"]
    return "\n".join(format_table(rows, head, right=range(3, 14))) + "\n"


# -- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``surveyred status RESULTS_DIR``."""
    from .runtime import common_arguments, json_arg, run, setup_logging

    p = argparse.ArgumentParser(prog="surveyred status", description=(
        "Production status of a results tree: per band and night the expected, processed, ok, failed and "
        "pending CCDs, and every failure with its classified cause. Works during a run and after a partial "
        "(--keep-going) run; exits 0 (it is a report) unless RESULTS_DIR is not a results directory."))
    p.add_argument("results_dir", metavar="RESULTS_DIR")
    p.add_argument("--output", default=None, help="write the per-CCD status table (Parquet)")
    p.add_argument("--summary", default=None, help="write the terminal report to this text file")
    p.add_argument("--json", action="store_true", help="print summary and failures as JSON instead of the table")
    p.add_argument("--snakemake-dir", default=None,
                   help="the run's .snakemake directory (default: RESULTS_DIR/.., RESULTS_DIR, the current dir)")
    p.add_argument("--config-json", default=None,
                   help='workflow config keys used: {"night_utc_offset_hours": 0, "calib": {"validity": {...}}}')
    common_arguments(p)
    args = p.parse_args(argv)
    setup_logging(args.log)

    def body() -> None:
        cfg = json_arg(args.config_json)
        report = collect_status(args.results_dir, config=cfg, snakemake_dir=args.snakemake_dir)
        text = render_status(report)
        if args.output:
            _write_parquet(report.table, args.output,
                           {"status_summary": json.dumps(status_json(report)["totals"] | {
                               "per_band_night": _jsonable(report.summary)}, sort_keys=True),
                            "results_dir": os.path.basename(os.path.abspath(args.results_dir))},
                           cfg, "status")
        if args.summary:
            _write_text(text, args.summary)
        if args.json:
            sys.stdout.write(json.dumps(status_json(report), indent=1, sort_keys=True) + "\n")
        else:
            sys.stdout.write(text)
        t = status_json(report)["totals"]
        log.info("status: %d expected, %d ok, %d failed, %d running, %d pending CCDs", t["expected"], t["ok"],
                 t["failed"], t["running"], t["pending"])

    return run(body, what=f"status {args.results_dir}")


def main_ccd_summary(argv: list[str] | None = None) -> int:
    """``surveyred ccd-summary RESULTS_DIR --output ccd_summary.parquet``."""
    from .runtime import common_arguments, json_arg, run, setup_logging

    p = argparse.ArgumentParser(prog="surveyred ccd-summary", description=(
        "One row per calibrated exposure CCD: exposure time, detections, PSF FWHM, aperture correction, "
        "sources used, astrometric scatter, zero-point and status (headers and metadata only)."))
    p.add_argument("results_dir", metavar="RESULTS_DIR")
    p.add_argument("--output", default=None, help="Parquet file to write (else only the table is printed)")
    p.add_argument("--instrument", default=None, help="instrument (name or YAML) for a fallback pixel scale")
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    p.add_argument("--config-json", default=None, help="recorded in the provenance only")
    common_arguments(p)
    args = p.parse_args(argv)
    setup_logging(args.log)

    def body() -> None:
        cfg = json_arg(args.config_json)
        df = collect_ccd_summary(args.results_dir, instrument=args.instrument)
        if args.output:
            _write_parquet(df, args.output, {"units": json.dumps({
                "exptime": "s", "mjd": "d", "psf_fwhm_px": "pix", "psf_fwhm_arcsec": "arcsec",
                "pixel_scale_arcsec": "arcsec/pix", "sky": "electron/pix", "astrom_rms_mas": "mas",
                "zero_point": "mag", "zero_point_err": "mag"}, sort_keys=True)}, cfg, "ccd-summary")
        if not args.quiet:
            sys.stdout.write(render_ccd_summary(df))
        log.info("ccd-summary: %d CCDs", len(df))

    return run(body, what=f"ccd-summary {args.results_dir}")
