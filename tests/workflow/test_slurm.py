"""The tiny survey through ``snakemake --profile profiles/slurm`` on a real Slurm.

Jobs really go through sbatch to a one-node Slurm 22.05 with accounting
(tests/slurm/up.sh: munged, MariaDB, slurmdbd, slurmctld, slurmd). The profile is
used as users get it, except the options in ``slurm_support.TEST_ARGS``. The
sbatch job ids are printed into the test log.

Skipped when Slurm is not installed, unless SURVEYRED_REQUIRE_SLURM=1 (CI), which
makes that a failure; daemons that do not start are always a failure.
"""

from __future__ import annotations

import pandas as pd
import pytest
from astropy.io import fits

import slurm_support as ss

pytestmark = [pytest.mark.workflow, pytest.mark.slurm]


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory, tiny_survey):
    ref = ss.reference_run(tmp_path_factory, tiny_survey)
    yield ref


def test_profile_run_goes_through_sbatch(slurm_run, capsys):
    proc = slurm_run["proc"]
    text = proc.stdout + proc.stderr
    subs = ss.submissions(text)
    ids = [jobid for _, jobid, _ in subs]
    sacct = ss.slurm("sacct", "-X", "-P", "-n", "-j", ",".join(ids), "-o", "JobID,JobName,State,Elapsed,ReqCPUS,ReqMem")
    with capsys.disabled():
        print(f"\n[slurm] bring-up: {ss._state.get('up_log', '')}")
        print(f"[slurm] tiny survey (up to isr) through sbatch in {slurm_run['seconds']:.0f} s, "
              f"{len(ids)} submissions, sbatch job ids: {' '.join(ids)}")
        for line in sacct.strip().splitlines():
            print(f"[slurm] sacct {line}")
    assert subs, f"no sbatch submission in the output:\n{ss.show(proc)}"
    states = {line.split("|")[0]: line.split("|")[2] for line in sacct.strip().splitlines()}
    assert set(states) == set(ids), f"sacct does not know every job: {states} vs {ids}"
    assert all(state == "COMPLETED" for state in states.values()), states
    # grouping (profile): one calib group job per calibration night (the tiny survey
    # has two), one visit group job for its 8 visits (10 per group), one ingest job
    kinds = sorted(log.split("/slurm_logs/")[1].split("/")[0] for _, _, log in subs)
    assert len(subs) == 4, kinds
    assert [k.split("_")[1] if k.startswith("group_") else k for k in kinds] == [
        "calib", "calib", "visit", "rule_ingest"], kinds


def test_profile_run_products(slurm_run):
    results = slurm_run["results"]
    inv = pd.read_parquet(results / "inventory.parquet")
    sci = inv[inv.obstype == "science"]
    assert sci.visit.nunique() == 8
    for row in sci.itertuples():
        path = results / "calexp" / row.night / row.visit / f"{row.visit}_{row.detector}.fits"
        with fits.open(path) as hdul:
            assert [h.name for h in hdul][1:4] == ["IMAGE", "MASK", "VARIANCE"], path
    # logs where the README says: rule logs under results/logs, Slurm's under .snakemake/slurm_logs
    assert (results / "logs" / "ingest.log").stat().st_size > 0
    assert len(list((results / "benchmarks" / "isr").rglob("*.tsv"))) == 8


def test_profile_second_run_has_nothing_to_do(slurm_run):
    targets = ss.calexp_targets(slurm_run["results"])
    proc = ss.run(slurm_run["workdir"], slurm_run["configfile"], "-n", *targets, timeout=300)
    assert proc.returncode == 0, ss.show(proc)
    assert "Nothing to be done" in proc.stdout + proc.stderr, ss.show(proc)


def test_profile_dry_run_lists_groups(slurm_run, tmp_path):
    """`snakemake -n --profile profiles/slurm` before any job: ingest only (a checkpoint)."""
    workdir, configfile = ss.make_workdir(tmp_path, slurm_run["raw"])
    proc = ss.run(workdir, configfile, "-n", timeout=300)
    assert proc.returncode == 0, ss.show(proc)
    assert "ingest" in proc.stdout + proc.stderr


@pytest.fixture(scope="module", autouse=True)
def _stop_slurm_after_module():
    yield
    ss.stop()
