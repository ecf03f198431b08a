"""Kill-and-rerun under Slurm: products after recovery are bit-identical.

(a) A running Slurm job step is killed (``scancel --signal=KILL JOBID.STEP``)
    while it writes products; no truncated product survives under its final
    name, and a rerun with ``--rerun-incomplete`` (in the profile) gives the
    uninterrupted run's bytes.
(b) The Snakemake process itself is SIGKILLed while its Slurm job runs: the lock
    and the running job stay behind. The README's recovery (``scancel --name``
    with the run's Slurm job name, ``--unlock``, ``--rerun-incomplete``) completes
    the run, again bit-identical.

Each test starts from a copy of the uninterrupted reference run
(slurm_support.reference_run) with one night's calexps removed, so only that
night's ISR group job runs again. The pipeline writes no timestamps (FITS
without CHECKSUM cards), so bytes must match exactly.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import pytest

import slurm_support as ss
from surveyred.fitsio import open_fits

pytestmark = [pytest.mark.workflow, pytest.mark.slurm]


@pytest.fixture(scope="module")
def ref(tmp_path_factory, tiny_survey):
    yield ss.reference_run(tmp_path_factory, tiny_survey)
    ss.stop()


def _remove_first_night(results: Path) -> tuple[Path, list[Path]]:
    night = sorted(p for p in (results / "calexp").iterdir() if p.is_dir())[0]
    removed = sorted(night.rglob("*.fits"))
    assert len(removed) >= 8, removed  # >= 2 visits x 4 detectors
    for visit_dir in [p for p in night.iterdir() if p.is_dir()]:
        shutil.rmtree(visit_dir)
    return night, removed


def _group_job(log: Path) -> str | None:
    for _, jobid, slurm_log in ss.submissions(log.read_text()):
        if "/group_visit" in slurm_log:
            return jobid
    return None


def _squeue_state(jobid: str) -> str:
    return ss.slurm("squeue", "-h", "-j", jobid, "-o", "%T").strip()


def _tmp_files(night: Path) -> list[Path]:
    return sorted(night.rglob(".*.tmp"))


def _assert_identical(results: Path, ref: dict):
    got = ss.products(results)
    assert set(got) == set(ref["products"]), sorted(set(got) ^ set(ref["products"]))
    differ = sorted(k for k in got if got[k] != ref["products"][k])
    assert not differ, f"not bit-identical to the uninterrupted run: {differ}"


def test_a_scancel_mid_write_then_rerun_incomplete(ref, tmp_path, capsys):
    workdir, configfile = ss.copy_run(ref, tmp_path)
    results = workdir / "results"
    night, removed = _remove_first_night(results)
    targets = ss.calexp_targets(results)
    log = tmp_path / "interrupted.log"
    proc = ss.start(workdir, configfile, "--retries", "0", *targets, log=log)
    try:
        jobid = ss.wait_until(lambda: _group_job(log), 180, "the ISR group job's sbatch")
        # the moment the job writes its first product (temporary file or a renamed one)
        ss.wait_until(lambda: _tmp_files(night) or list(night.rglob("*.fits")), 300,
                      "the first product of the ISR group job", poll=0.02)
        # SIGKILL to the job's running step (the ISR command under its Snakemake
        # job step): the step dies mid-write and the job ends FAILED. (`scancel
        # JOBID`, with or without --signal=KILL, ends the job as "CANCELLED by
        # <uid>", which snakemake-executor-plugin-slurm 2.8 does not recognise:
        # Snakemake would wait for it for ever. See README.)
        steps = [s for s in ss.slurm("squeue", "-h", "-s", "-o", "%i").split()
                 if s.startswith(f"{jobid}.") and s.split(".")[1].isdigit()]
        assert steps, f"no running step of Slurm job {jobid}"
        ss.slurm("scancel", "--signal=KILL", steps[-1])
        proc.wait(timeout=300)
    finally:
        ss.kill_group(proc)
    text = log.read_text()
    assert proc.returncode != 0, text[-4000:]
    assert "Error in rule isr" in text, text[-4000:]
    left = sorted(night.rglob("*.fits"))
    orphans = _tmp_files(night)
    with capsys.disabled():
        print(f"\n[restart a] scancel --signal=KILL {steps[-1]}: {len(left)} of {len(removed)} calexps of {night.name} left, "
              f"{len(orphans)} orphaned temporary file(s) {[p.name for p in orphans]}")
    assert len(left) < len(removed), "the job finished before it was cancelled"
    # no truncated product under a final name: Snakemake removes the failed job's
    # output directory; any file left is complete and exactly what the
    # uninterrupted run wrote
    for path in left:
        open_fits(path).close()
        key = str(path.relative_to(results))
        assert ss.products(results)[key] == ref["products"][key], f"{path} differs from the uninterrupted run"

    rerun = ss.run(workdir, configfile, *targets)  # the profile sets rerun-incomplete
    assert rerun.returncode == 0, ss.show(rerun)
    _assert_identical(results, ref)


def test_b_snakemake_sigkilled_then_documented_recovery(ref, tmp_path, capsys):
    workdir, configfile = ss.copy_run(ref, tmp_path)
    results = workdir / "results"
    _remove_first_night(results)
    targets = ss.calexp_targets(results)
    log = tmp_path / "killed.log"
    proc = ss.start(workdir, configfile, *targets, log=log)
    try:
        jobid = ss.wait_until(lambda: _group_job(log), 180, "the ISR group job's sbatch")
        ss.wait_until(lambda: _squeue_state(jobid) == "RUNNING", 120, f"Slurm job {jobid} running")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        ss.kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    # left behind: the lock, and the Slurm job, still running
    assert list((workdir / ".snakemake" / "locks").iterdir()), "no lock left behind"
    assert _squeue_state(jobid) in ("RUNNING", "COMPLETING"), _squeue_state(jobid)
    # a new run refuses to start (a dry run would not check the lock)
    locked = ss.run(workdir, configfile, *targets, timeout=300)
    assert locked.returncode != 0 and "lock" in (locked.stdout + locked.stderr).lower(), ss.show(locked)
    assert not ss.submissions(locked.stdout + locked.stderr), ss.show(locked)

    # recovery, as README "Running on a cluster" documents it:
    # 1. cancel the run's jobs by their Slurm job name, the run ID in the run's log
    # (the log of the killed run: the refused run above wrote a newer one)
    logs = [p.read_text() for p in (workdir / ".snakemake" / "log").glob("*.snakemake.log")]
    killed_log = [t for t in logs if f"SLURM jobid {jobid} " in t]
    assert len(killed_log) == 1, f"{len(killed_log)} run logs name Slurm job {jobid}"
    run_id = re.search(r"SLURM run ID: (\S+)", killed_log[0]).group(1)
    names = ss.slurm("squeue", "-h", "-j", jobid, "-o", "%j").strip()
    assert names == run_id, (names, run_id)
    ss.slurm("scancel", "--name", run_id)
    ss.wait_until(lambda: not ss.slurm("squeue", "-h", "--name", run_id).strip(), 120,
                  f"the jobs named {run_id} to leave the queue")
    # 2. remove the stale lock
    unlock = ss.run(workdir, configfile, "--unlock", timeout=300)
    assert unlock.returncode == 0, ss.show(unlock)
    # 3. run again; the profile's rerun-incomplete redoes the interrupted jobs
    rerun = ss.run(workdir, configfile, *targets)
    assert rerun.returncode == 0, ss.show(rerun)
    with capsys.disabled():
        ids = [j for _, j, _ in ss.submissions(rerun.stdout + rerun.stderr)]
        print(f"\n[restart b] SIGKILLed snakemake while Slurm job {jobid} ran; scancel --name {run_id}, "
              f"--unlock, rerun (sbatch job ids {' '.join(ids)})")
    _assert_identical(results, ref)
