"""Helpers of the workflow tests (imported by conftest.py and the test modules).

Every run happens in a temporary working directory (``snakemake --directory``)
with the repository's Snakefile, so the checkout is not touched.  ``tiny_run``
(session scope) runs the workflow once to completion on a copy of the tiny
simulated survey; the workflow, status and report tests share it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SNAKEFILE = REPO / "Snakefile"
RUN_TIMEOUT = 1500  # s, a full run of the tiny survey
SHORT_TIMEOUT = 300  # s, dry runs and lint


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # the rules call the `surveyred` command installed beside this interpreter
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def snakemake(*args: str, cwd: Path, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``python -m snakemake ARGS`` in ``cwd``; output captured as text."""
    cmd = [sys.executable, "-m", "snakemake", *args]
    try:
        return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s:\n{exc.stdout}\n{exc.stderr}")


def workflow(*args: str, workdir: Path, configfile: Path, timeout: float = RUN_TIMEOUT):
    return snakemake("-s", str(SNAKEFILE), "--directory", str(workdir), "--configfile", str(configfile),
                     *args, cwd=workdir, timeout=timeout)


def planned_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> job count from the "Job stats" table of a (dry) run."""
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    jobs: dict[str, int] = {}
    for i, line in enumerate(lines):
        if line.strip() == "Job stats:":
            for row in lines[i + 3:]:
                parts = row.split()
                if len(parts) != 2 or parts[0] == "total":
                    break
                jobs[parts[0]] = int(parts[1])
            break
    return jobs


def show(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-12000:]}"


def tiny_config(survey: Path, raw: Path, **extra) -> dict:
    """Workflow configuration for the tiny simulated survey at ``survey`` (raw frames in ``raw``).

    Its own reference catalog, and a skymap of 2 x 2 patches of 1000 pixels at
    0.4"/pixel (the tiny field is about 7.5' square, so every exposure touches all
    four patches); the simulated supernova as a user position, its light curve plotted.
    """
    cfg = {
        "raw_dir": str(raw),
        "results_dir": "results",
        "refcat": {"store": str(survey / "refcat"), "astrometric": "sim", "photometric": "sim"},
        "skymap": {"pixel_scale": 0.4, "patch_size": 1000, "patch_overlap": 50, "n_patches": 2},
        "forced": {"positions": str(survey / "transients.csv")},
        "lightcurves": {"plot": ["SN-sim"]},
    }
    cfg.update(extra)
    return cfg
