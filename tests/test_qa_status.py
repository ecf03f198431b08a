"""Production status and per-CCD summary (surveyred.status) on small results trees.

The trees are made with the real writers where one exists: ``surveyred ingest``
on a copy of the tiny simulated survey with one truncated science file, failure
lines written by running the real ``surveyred isr`` / ``surveyred master-flat``
commands on inputs they must refuse, a real Snakemake run whose job is
SIGKILLed, and visit summaries / catalogs written with calibrate's Parquet
writer.  Every assertion is an exact classification or an analytic value.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales

from surveyred import cli, runtime, status
from surveyred.calibrate import _write_parquet
from surveyred.errors import CorruptInput
from surveyred.fitsio import write_hdulist

DETS = [0, 1, 2, 3]  # SimCam's detectors (all good)


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_tree(tiny_survey, tmp_path_factory):
    """A copy of the tiny survey's raw frames with the first g science file truncated, ingested."""
    base = tmp_path_factory.mktemp("status_base")
    raw = base / "raw"
    shutil.copytree(tiny_survey / "raw", raw)
    science = []
    for f in sorted(raw.rglob("*.fits")):
        h = fits.getheader(f)
        if h["OBSTYPE"] == "object":
            science.append((f, h))
    bad = next(f for f, h in science if h["FILTER"] == "SIM-G")
    os.truncate(bad, bad.stat().st_size // 2)
    results = base / "results"
    rc = cli.main(["ingest", str(raw), "--instrument", "simcam", "--output", str(results / "inventory.parquet"),
                   "--rejects", str(results / "inventory_rejects.parquet")])
    assert rc == 0
    # the truth, from the raw headers (not from the inventory): science exposures per band and night
    # (SimCam: visit = EXPNUM, band = last letter of FILTER, night = date of UTC - 12 h)
    truth = {}
    for f, h in science:
        utc = datetime.fromisoformat(h["DATE-OBS"])
        night = (utc - timedelta(hours=12)).strftime("%Y%m%d")
        truth[f] = dict(visit=str(h["EXPNUM"]), band=h["FILTER"][-1].lower(), night=night)
    return dict(base=base, raw=raw, bad=bad, truth=truth)


@pytest.fixture
def tree(base_tree, tmp_path):
    """A fresh copy of the ingested results tree (raw frames shared, read only)."""
    results = tmp_path / "results"
    shutil.copytree(base_tree["base"] / "results", results)
    inv = pd.read_parquet(results / "inventory.parquet")
    return dict(base_tree, results=results, inv=inv, sci=inv[inv.obstype == "science"])


def _visits(sci, band=None, night=None):
    s = sci
    if band is not None:
        s = s[s.band == band]
    if night is not None:
        s = s[s.night == night]
    return sorted({(str(r.night), str(r.visit)) for r in s.itertuples()})


def _ccd(table, night, visit, det):
    hit = table[(table.kind == "ccd") & (table.night == night) & (table.visit == visit) & (table.detector == det)]
    assert len(hit) == 1, (night, visit, det, hit)
    return hit.iloc[0]


# -- runtime: the one failure line also lands in the log file ------------------------------------------


@pytest.mark.parametrize("exc, cls, code", [
    (CorruptInput("truncated", path="x.fits"), "CorruptInput", 2),
    (MemoryError(), "OutOfMemory", 3),
    (ZeroDivisionError("division by zero"), "InternalError", 1),
])
def test_run_writes_the_failure_line_into_the_log(tmp_path, capsys, exc, cls, code):
    logfile = tmp_path / "logs" / "job.log"
    runtime.setup_logging(str(logfile))

    def body():
        raise exc

    assert runtime.run(body, what="thing 42") == code
    logging.getLogger("surveyred").handlers[-1].flush()
    stderr_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert stderr_line.startswith(f"{cls}: ")
    assert status.read_failure_line(logfile) == (cls, stderr_line[len(cls) + 2:])
    runtime.setup_logging(None)


# -- status ----------------------------------------------------------------------------------------------


def test_status_expected_pending_and_rejected(tree):
    """No job has run: every inventory CCD pending; every detector of the truncated file CorruptInput."""
    rep = status.collect_status(tree["results"])
    t = tree["truth"]
    bad = t[tree["bad"]]
    n_expected = {}
    for info in t.values():
        key = (info["band"], info["night"])
        n_expected[key] = n_expected.get(key, 0) + len(DETS)
    got = {(r.band, r.night): r for r in rep.summary.itertuples()}
    assert set(got) == set(n_expected)
    for key, n in n_expected.items():
        r = got[key]
        n_bad = len(DETS) if key == (bad["band"], bad["night"]) else 0
        assert (r.expected, r.failed, r.pending, r.ok, r.running) == (n, n_bad, n - n_bad, 0, 0), key
    fails = rep.failures
    assert len(fails) == len(DETS)
    assert set(fails.failure_class) == {"CorruptInput"} and set(fails.stage) == {"ingest"}
    assert sorted(fails.detector) == DETS
    assert set(fails.visit) == {bad["visit"]} and set(fails.night) == {bad["night"]}
    assert all("truncated" in m for m in fails.message)


def test_status_isr_failure_from_the_real_command_and_running_job(tree, capsys):
    """`surveyred isr` without masters: MissingCalibration for every CCD of that visit; a log
    without a failure line is a running job; the others stay pending."""
    sci, results = tree["sci"], tree["results"]
    (n1, v1), (n2, v2) = _visits(sci, band="r")[:2]
    raw = sci[(sci.night == n1) & (sci.visit == v1)].path.iloc[0]
    log1 = results / "logs" / "isr" / n1 / f"{v1}.log"
    rc = cli.main(["isr", raw, "--instrument", "simcam", "--visit", v1, "--night", n1, "--band", "r",
                   "--bias-dir", "none", "--flat-dir", "none", "--outdir", str(results / "calexp" / n1 / v1),
                   "--log", str(log1)])
    assert rc == 2
    assert not (results / "calexp" / n1 / v1).exists()
    running_log = results / "logs" / "characterize" / n2 / f"{v2}.log"
    running_log.parent.mkdir(parents=True)
    running_log.write_text("2026-01-01T00:00:00 INFO surveyred.characterize: reading 4 calexps\n")
    # characterize runs only after isr: give visit 2 its calexps (names are what count)
    for det in DETS:
        write_hdulist(fits.HDUList([fits.PrimaryHDU()]), results / "calexp" / n2 / v2 / f"{v2}_{det}.fits")

    rep = status.collect_status(results)
    for det in DETS:
        r = _ccd(rep.table, n1, v1, det)
        assert (r.state, r.stage, r.failure_class, r.source) == ("failed", "isr", "MissingCalibration", "log")
        assert "no master bias valid" in r.message and r.file.endswith(f"logs/isr/{n1}/{v1}.log")
        r = _ccd(rep.table, n2, v2, det)
        assert (r.state, r.stage) == ("running", "characterize")
    fails = rep.failures
    assert sorted(fails.failure_class.value_counts().items()) == [("CorruptInput", 4), ("MissingCalibration", 4)]
    assert (rep.table.kind == "job").sum() == 0
    tot = status.status_json(rep)["totals"]
    assert tot == dict(expected=len(sci) + 4, processed=8, ok=0, failed=8, running=4, pending=len(sci) + 4 - 12)

    # the command line: exit 0 (a report), a readable table, the failures listed
    assert status.main([str(results)]) == 0
    out = capsys.readouterr().out
    assert "MissingCalibration" in out and "CorruptInput" in out
    header = next(line for line in out.splitlines() if line.startswith("band"))
    assert header.split() == ["band", "night", "expected", "processed", "ok", "failed", "running", "pending"]


def _summary_row(visit, night, band, det, status_, cls="", cause=""):
    return dict(visit=visit, night=night, band=band, detector=det, psf_fwhm=3.1, sky=400.0, zero_point=28.1,
                zero_point_err=0.003, colour_term=0.0, astrom_rms_mas=12.0, n_match=40, n_sources=200,
                abscal=status_ == "ok", status=status_, failure_class=cls, cause=cause)


def _write_src(path, visit, night, band, det, status_="ok", cls="", msg="", n=17, fwhm=3.5, apcorr=1.02):
    df = pd.DataFrame({"source_id": np.arange(n, dtype="int64"), "x": np.linspace(0, 100, n),
                       "y": np.linspace(0, 50, n)})
    _write_parquet(df, path, dict(visit=visit, night=night, detector=det, band=band, exptime=60.0,
                                  status=status_, failure_class=cls, failure_message=msg, psf_fwhm=repr(fwhm),
                                  apcorr=repr(apcorr), n_psf_stars="9", sky_level="400.0"))


def test_status_from_products_and_product_wins_over_a_stale_log(tree):
    """Per-detector statuses from the src metadata and the visit summary (calibrate's writer)."""
    sci, results = tree["sci"], tree["results"]
    night, visit = _visits(sci, band="g")[-1]
    band = "g"
    for det in DETS:
        write_hdulist(fits.HDUList([fits.PrimaryHDU()]), results / "calexp" / night / visit / f"{visit}_{det}.fits")
        st = ("failed", "TooFewStars", "3 PSF stars, 5 required") if det == 1 else ("ok", "", "")
        _write_src(results / "src" / night / visit / f"{visit}_{det}.parquet", visit, night, band, det, *st)
    rows = [_summary_row(visit, night, band, 0, "failed", "NoReferenceMatch", "NoReferenceMatch: no pattern match"),
            _summary_row(visit, night, band, 1, "failed", "TooFewStars", "TooFewStars: characterize status failed"),
            _summary_row(visit, night, band, 2, "ok"),
            _summary_row(visit, night, band, 3, "not_absolutely_calibrated", "NoReferenceMatch", "no refcat")]
    _write_parquet(pd.DataFrame(rows), results / "visit_summary" / night / f"{visit}.parquet", {})
    # a stale failure line from an earlier attempt of isr: the calexps exist, so isr is done
    stale = results / "logs" / "isr" / night / f"{visit}.log"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text(f"2026-01-01T00:00:00 ERROR surveyred: isr {visit} failed: CorruptInput: x: truncated\n")

    rep = status.collect_status(results)
    exp = {0: ("failed", "calibrate", "NoReferenceMatch"), 1: ("failed", "characterize", "TooFewStars"),
           2: ("ok", "calibrate", ""), 3: ("ok", "calibrate", "NoReferenceMatch")}
    for det, want in exp.items():
        r = _ccd(rep.table, night, visit, det)
        assert (r.state, r.stage, r.failure_class) == want, det
        assert r.source == "product"
    assert _ccd(rep.table, night, visit, 1).message == "3 PSF stars, 5 required"
    assert _ccd(rep.table, night, visit, 3).message.startswith("not_absolutely_calibrated")
    assert not ((rep.failures.stage == "isr") & (rep.failures.visit == visit)).any()


def test_status_killed_job_from_a_real_snakemake_log(tree, tmp_path):
    """A job SIGKILLed under Snakemake leaves a log without a failure line; Snakemake's own log
    says how it died: the CCDs are failed with class Killed."""
    sci, results = tree["sci"], tree["results"]
    night, visit = _visits(sci, band="g")[0]
    for det in DETS:
        write_hdulist(fits.HDUList([fits.PrimaryHDU()]), results / "calexp" / night / visit / f"{visit}_{det}.fits")
    workdir = results.parent
    snakefile = workdir / "Snakefile"
    snakefile.write_text(textwrap.dedent(f"""
        rule characterize:
            output: "results/src/{{night}}/{{visit}}/done"
            log: "results/logs/characterize/{{night}}/{{visit}}.log"
            shell: "echo 'INFO surveyred.characterize: start' > {{log}}; "
                   "{sys.executable} -c 'import os, signal; os.kill(os.getpid(), signal.SIGKILL)' --log {{log}}"
    """))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(snakefile), "--cores", "1",
                           f"results/src/{night}/{visit}/done"], cwd=workdir, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0, proc.stderr
    rep = status.collect_status(results)
    for det in DETS:
        r = _ccd(rep.table, night, visit, det)
        assert (r.state, r.stage, r.failure_class, r.source) == ("failed", "characterize", "Killed", "snakemake"), \
            (r.to_dict(), proc.stderr[-3000:])
        assert r.file.startswith(".snakemake/log/") or "/.snakemake/log/" in r.file
    # a retry that started after the kill rewrote the log: that evidence is stale, the job is running
    retry = results / "logs" / "characterize" / night / f"{visit}.log"
    retry.write_text("2026-01-01T00:00:00 INFO surveyred.characterize: attempt 2\n")
    later = retry.stat().st_mtime + 5
    os.utime(retry, (later, later))
    rep = status.collect_status(results)
    assert {(_ccd(rep.table, night, visit, d).state, _ccd(rep.table, night, visit, d).failure_class)
            for d in DETS} == {("running", "")}


def test_status_out_of_memory_from_slurm_log_and_memory_error(tree):
    """Slurm's OOM message in .snakemake/slurm_logs -> OutOfMemory; a MemoryError inside the command
    (runtime.run) -> the OutOfMemory line in the rule log."""
    sci, results = tree["sci"], tree["results"]
    (n1, v1), (n2, v2) = _visits(sci, band="r")[-2:]
    for night, visit in ((n1, v1), (n2, v2)):
        for det in DETS:
            write_hdulist(fits.HDUList([fits.PrimaryHDU()]),
                          results / "calexp" / night / visit / f"{visit}_{det}.fits")
    # (a) a rule log that only says the job started, and Slurm's record of the kill (the format of
    #     slurmstepd and of the Snakemake job step inside the Slurm job)
    log1 = results / "logs" / "characterize" / n1 / f"{v1}.log"
    log1.parent.mkdir(parents=True, exist_ok=True)
    log1.write_text("2026-01-01T00:00:00 INFO surveyred.characterize: reading 4 calexps\n")
    slurm_log = results.parent / ".snakemake" / "slurm_logs" / "rule_characterize" / n1 / "4242.log"
    slurm_log.parent.mkdir(parents=True)
    slurm_log.write_text(
        "rule characterize:\n"
        f"    log: results/logs/characterize/{n1}/{v1}.log\n"
        "    jobid: 0\n"
        "slurmstepd: error: Detected 1 oom_kill event in StepId=4242.0. Some of the step tasks have been "
        "OOM Killed.\n"
        "srun: error: node1: task 0: Out Of Memory\n")
    # (b) the command itself ran out of memory (MemoryError), through the real runtime
    log2 = results / "logs" / "characterize" / n2 / f"{v2}.log"
    runtime.setup_logging(str(log2))

    def body():
        raise MemoryError

    assert runtime.run(body, what=f"characterize {v2}") == 3
    runtime.setup_logging(None)

    rep = status.collect_status(results)
    for det in DETS:
        a = _ccd(rep.table, n1, v1, det)
        assert (a.state, a.stage, a.failure_class, a.source) == ("failed", "characterize", "OutOfMemory", "slurm")
        b = _ccd(rep.table, n2, v2, det)
        assert (b.state, b.stage, b.failure_class, b.source) == ("failed", "characterize", "OutOfMemory", "log")


def test_status_failed_master_blocks_the_exposures_it_serves(tree):
    """`surveyred master-flat` refusing its frames (no bias): every exposure that flat group serves
    is failed at master_flat with that class, and the job itself is listed."""
    results, inv = tree["results"], tree["inv"]
    flats = inv[(inv.obstype == "flat") & (inv.band == "g")].drop_duplicates("path")
    night = sorted(flats.night)[0]
    paths = sorted(flats[flats.night == night].path)
    log = results / "logs" / "master_flat" / night / "g.log"
    rc = cli.main(["master-flat", *paths, "--band", "g", "--bias-dir", "none", "--instrument", "simcam",
                   "--detectors", "0,1,2,3", "--outdir", str(results / "calib" / "flat" / night / "g"),
                   "--group", night, "--log", str(log)])
    assert rc == 2
    rep = status.collect_status(results, config={"calib": {"validity": {"mode": "night", "max_days": 3}}})
    from surveyred.calib import plan_calibrations

    plan = plan_calibrations(inv, {"mode": "night", "max_days": 3})
    served = sorted((str(r.night), str(r.visit)) for r in plan.science.itertuples()
                    if r.flat_group == night and r.band == "g")
    assert served, "the tiny survey's first g flat group serves at least one exposure"
    assert all(n == night for n, _ in served)  # tiny: flats every night, each night its own group
    for n, v in served:
        for det in DETS:
            r = _ccd(rep.table, n, v, det)
            assert (r.state, r.stage, r.failure_class) == ("failed", "master_flat", "MissingCalibration")
            assert r.message.startswith("upstream master_flat failed: ")
    jobs = rep.table[rep.table.kind == "job"]
    assert list(zip(jobs.stage, jobs.failure_class, jobs.band)) == [("master_flat", "MissingCalibration", "g")]
    # everything else is untouched
    others = rep.failures[(rep.failures.kind == "ccd") & (rep.failures.stage != "master_flat")]
    assert set(others.failure_class) == {"CorruptInput"}


def test_status_outputs_are_machine_readable_and_reproducible(tree, tmp_path, capsys):
    results = tree["results"]
    out1, out2 = tmp_path / "a" / "status.parquet", tmp_path / "b" / "status.parquet"
    txt = tmp_path / "a" / "status.txt"
    assert status.main([str(results), "--output", str(out1), "--summary", str(txt), "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert status.main([str(results), "--output", str(out2)]) == 0
    capsys.readouterr()
    assert out1.read_bytes() == out2.read_bytes()
    table = pd.read_parquet(out1)
    assert list(table.columns) == list(status.STATUS_COLUMNS)
    assert js["totals"]["expected"] == (table.kind == "ccd").sum() == len(tree["sci"]) + 4
    assert js["totals"]["failed"] == len(js["failures"]) == 4
    meta = pq.read_schema(out1).metadata
    assert b"software_version" in meta and b"config_hash" in meta
    assert json.loads(meta[b"status_summary"])["failed"] == 4
    text = txt.read_text()
    assert "CCDs per band and night" in text and "CorruptInput=4" in text


def test_status_refuses_what_is_not_a_results_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "absent"):
        proc = subprocess.run([sys.executable, "-m", "surveyred.cli", "status", str(target)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1].startswith(f"ConfigError: {target}: ")


# -- ccd-summary --------------------------------------------------------------------------------------------


def test_ccd_summary_from_headers_and_metadata(tree, tmp_path):
    """Values read back exactly; FWHM in arcsec from the fitted WCS scale (astropy as the peer)."""
    sci, results = tree["sci"], tree["results"]
    night, visit = _visits(sci, band="r")[0]
    rng = np.random.default_rng(5)
    expect = {}
    for det in DETS:
        scale = 0.18 + 0.01 * det  # arcsec/px, different per detector
        rot = np.deg2rad(rng.uniform(0, 360))
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [150.0, 2.0]
        w.wcs.crpix = [264.0, 280.0]
        w.wcs.cd = scale / 3600.0 * np.array([[-np.cos(rot), np.sin(rot)], [np.sin(rot), np.cos(rot)]])
        prim = fits.PrimaryHDU()
        prim.header.update(EXPTIME=60.0 + det, BAND="r", VISIT=visit, NIGHT=night, DETECTOR=det, **{"MJD-OBS": 60361.2})
        img = fits.ImageHDU(np.zeros((4, 4), np.float32), name="IMAGE")
        img.header.update(WCS(naxis=2).to_header())  # header WCS: none useful (CTYPE pixel); the fit gives the scale
        write_hdulist(fits.HDUList([prim, img]), results / "calexp" / night / visit / f"{visit}_{det}.fits")
        n, fwhm = 10 + det, 3.0 + 0.25 * det
        _write_src(results / "src" / night / visit / f"{visit}_{det}.parquet", visit, night, "r", det, n=n,
                   fwhm=fwhm, apcorr=1.01 + 0.001 * det)
        wh = w.to_header()
        wh.update(NMATCH=30 + det, NPHOTREF=20 + det, ASTRMS=8.5 + det, ZP=28.0 + 0.01 * det, ABSCAL=True,
                  STATUS="ok", FAILCLS="")
        write_hdulist(fits.HDUList([fits.PrimaryHDU(header=wh)]), results / "wcs" / night / visit / f"{visit}_{det}.fits")
        expect[det] = dict(n=n, fwhm=fwhm, scale=float(np.mean(proj_plane_pixel_scales(w)) * 3600.0))
    rows = [_summary_row(visit, night, "r", det, "ok") | dict(zero_point=28.0 + 0.01 * det, astrom_rms_mas=8.5 + det)
            for det in DETS]
    _write_parquet(pd.DataFrame(rows), results / "visit_summary" / night / f"{visit}.parquet", {})

    out = tmp_path / "ccd_summary.parquet"
    assert status.main_ccd_summary([str(results), "--output", str(out), "--quiet"]) == 0
    df = pd.read_parquet(out)
    assert list(df.columns) == list(status.SUMMARY_COLUMNS)
    assert len(df) == len(DETS)  # only calexps on disk are calibrated exposures
    for det in DETS:
        r = df[df.detector == det].iloc[0]
        e = expect[det]
        assert (r.visit, r.night, r.band, r.status) == (visit, night, "r", "ok")
        assert r.exptime == 60.0 + det and r.mjd == 60361.2
        assert r.n_detected == e["n"] and r.n_psf_stars == 9
        assert r.n_astrom == 30 + det and r.n_photom == 20 + det
        assert r.psf_fwhm_px == pytest.approx(e["fwhm"], abs=1e-12)
        assert r.pixel_scale_arcsec == pytest.approx(e["scale"], rel=1e-9)
        assert r.psf_fwhm_arcsec == pytest.approx(e["fwhm"] * e["scale"], rel=1e-9)
        assert r.apcorr == pytest.approx(1.01 + 0.001 * det, abs=1e-12)
        assert r.zero_point == pytest.approx(28.0 + 0.01 * det, abs=1e-12)
        assert r.astrom_rms_mas == pytest.approx(8.5 + det, abs=1e-12)


def test_a_later_successful_command_in_the_same_log_clears_the_failure(tmp_path):
    logfile = tmp_path / "job.log"
    runtime.setup_logging(str(logfile))

    def fail():
        raise CorruptInput("bad", path="a.fits")

    assert runtime.run(fail, what="first") == 2
    assert status.read_failure_line(logfile) == ("CorruptInput", "a.fits: bad")
    assert runtime.run(lambda: None, what="second") == 0
    runtime.setup_logging(None)
    assert status.read_failure_line(logfile) is None
