"""Acceptance (issue 6): a partial `--keep-going` run and `surveyred status` on it.

On a copy of a simulated survey with ONE truncated raw science file and ONE band
whose flat frames are deleted, ``snakemake --cores 2 --keep-going`` makes every
product that does not depend on them (and exits non-zero because of them), and
``surveyred status`` reports exactly those failures with the right causes:
``CorruptInput`` (stage ingest) for every detector of the truncated file and
``MissingCalibration`` (stage isr) for every CCD of the flat-less band; nothing
else failed and nothing is left pending.  ``ccd-summary`` and ``disk`` are run on
the same tree and checked against the simulator truth and ``du``.

The preset is a parameter: the issue names the demo preset, which takes about
6 minutes on 2 cores; the default is the tiny preset (the session's shared
``tiny_survey``).  ``SURVEYRED_STATUS_PRESET=demo`` runs the demo instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from surveyred import simulate
from surveyred.status import index_ccd_products
from wf_support import show, tiny_config, workflow

pytestmark = pytest.mark.workflow

PRESET = os.environ.get("SURVEYRED_STATUS_PRESET", "tiny")


@pytest.fixture(scope="module")
def survey(request, tmp_path_factory):
    if PRESET == "tiny":
        return request.getfixturevalue("tiny_survey")
    out = tmp_path_factory.mktemp(f"{PRESET}_survey") / "sim"
    assert simulate.main([str(out), "--preset", PRESET, "--seed", "1"]) == 0
    return out


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    return subprocess.run([sys.executable, "-m", "surveyred.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def partial_run(survey, tmp_path_factory):
    base = tmp_path_factory.mktemp("status_run")
    raw = base / "raw"
    shutil.copytree(survey / "raw", raw)
    truth = pd.read_parquet(survey / "truth" / "exposures.parquet")
    sci = truth[truth.obstype == "science"]
    bands = sorted(sci.band.unique())
    corrupt_band, flatless_band = bands[0], bands[-1]
    assert corrupt_band != flatless_band
    # one truncated science file (its headers stay readable, its pixels are cut)
    victim = sorted(sci[sci.band == corrupt_band].file.unique())[0]
    path = raw / Path(victim).relative_to("raw")
    os.truncate(path, path.stat().st_size // 2)
    # no flats at all in one band
    flats = truth[(truth.obstype == "flat") & (truth.band == flatless_band)].file.unique()
    assert len(flats) > 0
    for f in flats:
        (raw / Path(f).relative_to("raw")).unlink()
    workdir = base / "work"
    workdir.mkdir()
    configfile = base / "config.yaml"
    if PRESET == "tiny":
        cfg = tiny_config(survey, raw)  # its own refcat, a skymap for the tiny field, forced positions
    else:
        cfg = {"raw_dir": str(raw), "results_dir": "results",
               "refcat": {"store": str(survey / "refcat"), "astrometric": "sim", "photometric": "sim"}}
    configfile.write_text(yaml.safe_dump(cfg))
    proc = workflow("--cores", "2", "--keep-going", workdir=workdir, configfile=configfile)
    victim_row = sci[sci.file == victim].iloc[0]
    return dict(proc=proc, workdir=workdir, results=workdir / "results", truth=truth, sci=sci,
                corrupt=(str(victim_row.night), str(victim_row.visit)), flatless_band=flatless_band,
                detectors=sorted(int(d) for d in sci.detector.unique()))


def test_keep_going_makes_everything_else(partial_run):
    run = partial_run
    proc, results, sci = run["proc"], run["results"], run["sci"]
    assert proc.returncode != 0, "the failures must make snakemake exit non-zero\n" + show(proc)
    good = sci[(sci.band != run["flatless_band"])
               & ~((sci.night.astype(str) == run["corrupt"][0]) & (sci.visit.astype(str) == run["corrupt"][1]))]
    assert len(good), "some exposures must be processable"
    products = {kind: index_ccd_products(results, kind, ext) for kind, ext in
                (("calexp", ".fits"), ("src", ".parquet"), ("psf", ".fits"), ("calsrc", ".parquet"),
                 ("wcs", ".fits"))}
    for r in good.itertuples():
        key = (str(r.night), str(r.visit), int(r.detector))
        for kind, index in products.items():
            assert key in index, (kind, key, show(proc))
        assert (results / "visit_summary" / key[0] / f"{key[1]}.parquet").exists(), key
    # and nothing of the failed exposures
    bad = sci.drop(good.index)
    for r in bad.itertuples():
        assert (str(r.night), str(r.visit), int(r.detector)) not in products["calexp"]


def test_status_reports_exactly_the_failures(partial_run, tmp_path):
    run = partial_run
    results, sci, dets = run["results"], run["sci"], run["detectors"]
    out = tmp_path / "status.parquet"
    proc = _cli("status", str(results), "--json", "--output", str(out), "--summary", str(tmp_path / "status.txt"),
                cwd=run["workdir"])
    assert proc.returncode == 0, proc.stderr
    js = json.loads(proc.stdout)
    print(f"\n[status] preset {PRESET}: totals {js['totals']}")
    print((tmp_path / "status.txt").read_text())
    failures = pd.DataFrame(js["failures"])
    got = {(f.night, f.visit, int(f.detector)): (f.stage, f.failure_class) for f in failures.itertuples()}
    want = {}
    for det in dets:
        want[(run["corrupt"][0], run["corrupt"][1], det)] = ("ingest", "CorruptInput")
    for r in sci[sci.band == run["flatless_band"]].itertuples():
        want[(str(r.night), str(r.visit), int(r.detector))] = ("isr", "MissingCalibration")
    assert got == want
    assert set(failures.kind) == {"ccd"}  # no other job failed
    flatless = failures[failures.failure_class == "MissingCalibration"]
    assert all(f"no master flat in band {run['flatless_band']}" in m for m in flatless.message)
    assert all("truncated" in m for m in failures[failures.failure_class == "CorruptInput"].message)
    n = len(sci)
    assert js["totals"] == dict(expected=n, processed=n, ok=n - len(want), failed=len(want), running=0, pending=0)
    table = pd.read_parquet(out)
    assert (table.state == "ok").sum() == n - len(want)


def test_ccd_summary_and_disk_on_the_partial_run(partial_run, tmp_path):
    run = partial_run
    results, truth = run["results"], run["truth"]
    out = tmp_path / "ccd_summary.parquet"
    proc = _cli("ccd-summary", str(results), "--output", str(out), "--instrument", "simcam", cwd=run["workdir"])
    assert proc.returncode == 0, proc.stderr
    df = pd.read_parquet(out)
    ok = df[df.status.isin(["ok", "not_absolutely_calibrated"])]
    assert len(ok) == len(df) > 0
    t = {(str(x.night), str(x.visit), int(x.detector)): x for x in truth[truth.obstype == "science"].itertuples()}
    rows = [t[(r.night, r.visit, int(r.detector))] for r in ok.itertuples()]
    fwhm_err = ok.psf_fwhm_px.to_numpy() / np.array([x.psf_fwhm_px for x in rows]) - 1
    zp_err = ok.zero_point.to_numpy() - np.array([x.zp_calexp for x in rows])
    print(f"\n[ccd-summary] {len(ok)} CCDs: FWHM/truth - 1 max |{np.abs(fwhm_err).max():.4f}|, "
          f"ZP - truth max |{np.abs(zp_err).max() * 1000:.1f}| mmag, scale {ok.pixel_scale_arcsec.median():.4f}\"/px, "
          f"astrometric rms median {ok.astrom_rms_mas.median():.1f} mas")
    assert np.all(np.abs(fwhm_err) < 0.05)
    assert np.all(np.abs(zp_err) < 0.01)
    assert np.allclose(ok.pixel_scale_arcsec, 0.4, rtol=0.01)  # SimCam: 0.4"/px
    assert np.allclose(ok.psf_fwhm_arcsec, ok.psf_fwhm_px * ok.pixel_scale_arcsec)
    assert (ok.n_detected > ok.n_astrom).all() and (ok.n_astrom > 0).all() and (ok.n_photom > 0).all()
    assert np.all(np.isfinite(ok.astrom_rms_mas) & (ok.astrom_rms_mas > 0))

    proc = _cli("disk", str(results), "--json", cwd=run["workdir"])
    assert proc.returncode == 0, proc.stderr
    js = json.loads(proc.stdout)
    du_b = int(subprocess.run(["du", "-sb", str(results)], capture_output=True, text=True).stdout.split()[0])
    du_k = int(subprocess.run(["du", "-s", "-B1", str(results)], capture_output=True, text=True).stdout.split()[0])
    print(f"[disk] {js['total']['files']} files, {js['total']['apparent_bytes']} B apparent (du -sb {du_b}), "
          f"{js['total']['allocated_bytes']} B allocated (du -s -B1 {du_k}); missing {len(js['missing'])}")
    assert js["total"]["apparent_bytes"] == du_b and js["total"]["allocated_bytes"] == du_k
    missing = pd.DataFrame(js["missing"])
    # the failed exposures' products are the missing ones: 5 per CCD and a summary per visit
    n_bad_ccd = len(run["detectors"]) + int((run["sci"].band == run["flatless_band"]).sum())
    n_missing_ccd = int(missing.type.isin(["calexp", "src", "psf", "calsrc", "wcs"]).sum())
    # the corrupted file is not in the inventory, so only the flat-less band's CCDs are expected
    assert n_missing_ccd == 5 * (n_bad_ccd - len(run["detectors"]))
