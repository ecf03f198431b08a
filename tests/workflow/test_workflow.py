"""Drive the Snakemake workflow end to end on a tiny simulated survey.

Every run happens in a temporary working directory (``snakemake --directory``)
with the repository's Snakefile, so the checkout is not touched (except the
``.snakemake/`` bookkeeping of the dry run from the repository root, which git
ignores).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from astropy.io import fits

from wf_support import REPO, SHORT_TIMEOUT, planned_jobs, show, snakemake, workflow

pytestmark = pytest.mark.workflow

def _science(results: Path) -> pd.DataFrame:
    inv = pd.read_parquet(results / "inventory.parquet")
    return inv[inv.obstype == "science"]


def test_run_produces_calexps_with_provenance(tiny_run):
    results = tiny_run["results"]
    sci = _science(results)
    assert not sci.empty, "the tiny survey has no science exposures"
    assert pd.read_parquet(results / "inventory_rejects.parquet").empty
    for row in sci.itertuples():
        path = results / "calexp" / row.night / row.visit / f"{row.visit}_{row.detector}.fits"
        assert path.exists(), f"missing {path}"
        with fits.open(path) as hdul:
            names = [h.name for h in hdul]
            for ext in ("IMAGE", "MASK", "VARIANCE"):
                assert ext in names, f"{path} lacks {ext}: {names}"
            assert hdul["IMAGE"].data.shape == hdul["MASK"].data.shape == hdul["VARIANCE"].data.shape
            cards = {**hdul[0].header, **hdul["IMAGE"].header}
            assert "SRVERSN" in cards and "SRSTEP" in cards, f"{path} has no provenance cards"
            assert cards["SRSTEP"] == "isr", f"{path}: SRSTEP={cards['SRSTEP']!r}"
    # masters exist for at least one group, with one file per detector
    dets = sorted(pd.read_parquet(results / "inventory.parquet").detector.unique())
    bias_groups = [p for p in (results / "calib" / "bias").iterdir() if p.is_dir()]
    assert bias_groups
    for group in bias_groups:
        assert sorted(int(p.stem.split("_")[1]) for p in group.glob("bias_*.fits")) == dets
    # logs and benchmarks where the README says
    assert (results / "logs" / "ingest.log").exists()
    assert any((results / "logs" / "isr").rglob("*.log"))
    assert any((results / "benchmarks" / "isr").rglob("*.tsv"))


def test_second_dry_run_has_nothing_to_do(tiny_run):
    proc = workflow("-n", workdir=tiny_run["workdir"], configfile=tiny_run["configfile"], timeout=SHORT_TIMEOUT)
    assert proc.returncode == 0, show(proc)
    assert "Nothing to be done" in proc.stdout + proc.stderr, show(proc)


def test_coadds_forced_photometry_and_light_curves(tiny_run):
    results = tiny_run["results"]
    sci = _science(results)
    bands = sorted(sci.band.unique())
    coadds = sorted((results / "coadd").rglob("*.fits"))
    # every band on every patch of the 2 x 2 tract (the tiny field covers all four)
    assert sorted({p.stem for p in coadds}) == bands
    assert len(coadds) == 4 * len(bands)
    with fits.open(coadds[0]) as hdul:
        cards = {**hdul[0].header}
        assert "SRVERSN" in cards and cards.get("SRSTEP") == "coadd", cards.get("SRSTEP")
    assert len(list((results / "coadd_cat").rglob("*.parquet"))) == 4
    forced = sorted((results / "forced").rglob("*.parquet"))
    assert len(forced) == sci.visit.nunique()
    assert (results / "lightcurves" / "lightcurves.parquet").exists()
    # warps are temporary: gone once every coadd exists
    assert not any((results / "warp").rglob("*.fits")) if (results / "warp").exists() else True


def test_excluding_an_exposure_reruns_only_what_it_touched(tiny_run, tmp_path):
    """The exclusion list drops a visit from the coadds it touched, and only those rerun."""
    results = tiny_run["results"]
    sci = _science(results)
    g_visits = sorted(sci[sci.band == "g"].visit.unique())
    bad = g_visits[0]
    cfg = yaml.safe_load(tiny_run["configfile"].read_text())
    cfg["exclude_visits"] = [str(bad)]
    configfile = tmp_path / "exclude.yaml"
    configfile.write_text(yaml.safe_dump(cfg))
    dry = workflow("-n", "-p", workdir=tiny_run["workdir"], configfile=configfile, timeout=SHORT_TIMEOUT)
    assert dry.returncode == 0, show(dry)
    jobs = planned_jobs(dry)
    text = dry.stdout + dry.stderr
    # nothing upstream of the warps reruns, and no r-band coadd; downstream, the QA
    # plots of the re-made coadds and light curves (not the per-visit QA)
    downstream = {"coadd_catalog", "forced_photometry", "lightcurves", "qa_coadd_thumbnail", "qa_plots", "all"}
    assert set(jobs) <= {"warp", "coadd"} | downstream, jobs
    assert jobs.get("qa_coadd_thumbnail", 0) <= 4, jobs
    outputs = re.findall(r"output: (\S*coadd/\S+\.fits)", text)
    assert outputs and all(o.endswith("/g.fits") for o in outputs), outputs
    assert jobs["coadd"] == 4 and jobs["coadd_catalog"] == 4, jobs
    # the warps are temporary, so the other g visits are warped again; the bad one is not
    assert jobs["warp"] == len(g_visits) - 1, jobs
    assert f"warp/{sci[sci.visit == bad].night.iloc[0]}/{bad}" not in text
    # its forced photometry is no longer a product
    assert f"/{bad}.parquet" not in " ".join(re.findall(r"--output (\S+)", text))


def test_bad_raw_files_are_rejected_and_reingest_reruns_nothing_else(tiny_run):
    raw, workdir, results = tiny_run["raw"], tiny_run["workdir"], tiny_run["results"]
    sci_files = sorted(_science(results).path.unique())
    calexps = sorted((results / "calexp").rglob("*.fits"))
    before = {p: p.stat().st_mtime_ns for p in calexps}

    # an unknown filter on an otherwise good science frame (with a fresh visit id) ...
    src = Path(sci_files[0]) if os.path.isabs(sci_files[0]) else workdir / sci_files[0]
    bad_dir = raw / "bad"
    bad_dir.mkdir()
    with fits.open(src) as hdul:
        hdul[0].header["FILTER"] = "NOT-A-FILTER"
        hdul[0].header["EXPNUM"] = 987654321
        hdul.writeto(bad_dir / "unknown_filter.fits")
    # ... and a copy cut short in the middle of its pixel data
    data = src.read_bytes()
    (bad_dir / "truncated.fits").write_bytes(data[: len(data) * 2 // 3])

    # new raw files change the checkpoint's input set: only ingest (and the target) re-run
    dry = workflow("-n", workdir=workdir, configfile=tiny_run["configfile"], timeout=SHORT_TIMEOUT)
    assert dry.returncode == 0, show(dry)
    assert planned_jobs(dry) == {"ingest": 1, "all": 1}, show(dry)

    proc = workflow("--cores", "2", "--keep-going", workdir=workdir, configfile=tiny_run["configfile"])
    assert proc.returncode == 0, show(proc)

    rejects = pd.read_parquet(results / "inventory_rejects.parquet")
    got = {Path(p).name: (c, m) for p, c, m in zip(rejects.path, rejects.failure_class, rejects.message)}
    assert set(got) == {"unknown_filter.fits", "truncated.fits"}, got
    assert got["unknown_filter.fits"][0] == "UnknownFilter" and "NOT-A-FILTER" in got["unknown_filter.fits"][1]
    assert got["truncated.fits"][0] == "CorruptInput" and "truncated.fits" in got["truncated.fits"][1]
    # the existing calexps were not re-made
    assert {p: p.stat().st_mtime_ns for p in calexps} == before


def test_missing_calibration_still_builds_the_dag(tiny_survey, tmp_path):
    """Science frames without a valid flat still get ISR jobs, told ``--flat-dir none``."""
    raw = tmp_path / "raw"
    shutil.copytree(tiny_survey / "raw", raw)
    removed = 0
    for path in sorted(raw.rglob("*.fits")):
        header = fits.getheader(path)
        if str(header.get("OBSTYPE", "")).strip().lower().endswith("flat") and header.get("FILTER") == "SIM-R":
            path.unlink()
            removed += 1
    assert removed, "the tiny survey has no r-band flats to remove"
    workdir = tmp_path / "work"
    workdir.mkdir()
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump({"raw_dir": str(raw)}))

    ingest = workflow("--cores", "1", "results/inventory.parquet", workdir=workdir, configfile=configfile,
                      timeout=SHORT_TIMEOUT)
    assert ingest.returncode == 0, show(ingest)
    sci = _science(workdir / "results").drop_duplicates("visit")
    n_r = int((sci.band == "r").sum())
    assert n_r and n_r < len(sci)

    dry = workflow("-n", "-p", workdir=workdir, configfile=configfile, timeout=SHORT_TIMEOUT)
    assert dry.returncode == 0, show(dry)
    jobs = planned_jobs(dry)
    assert jobs.get("isr") == len(sci), show(dry)
    assert jobs.get("master_flat") == sci.night.nunique(), show(dry)  # g only
    text = dry.stdout + dry.stderr
    assert text.count("--flat-dir none") == n_r, show(dry)


def test_dry_run_from_repository_root():
    proc = snakemake("-n", cwd=REPO, timeout=SHORT_TIMEOUT)
    assert proc.returncode == 0, show(proc)
    assert "ingest" in proc.stdout or "Nothing to be done" in proc.stdout + proc.stderr, show(proc)


def test_lint_is_clean():
    proc = snakemake("--lint", cwd=REPO, timeout=SHORT_TIMEOUT)
    assert proc.returncode == 0, show(proc)
    assert "Lints for" not in proc.stdout + proc.stderr, show(proc)


def test_snakefmt_is_clean():
    exe = shutil.which("snakefmt") or shutil.which("snakefmt", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("snakefmt is not installed (pip install -e '.[test]')")
    proc = subprocess.run([exe, "--check", "Snakefile", "rules"], cwd=REPO, capture_output=True, text=True,
                          timeout=SHORT_TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
