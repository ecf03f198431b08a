"""A real one-node Slurm for the workflow tests, and Snakemake runs through it.

``cluster()`` starts the daemons with ``tests/slurm/up.sh`` once per session (and
``stop()`` stops them again if this session started them). When Slurm is not
installed the tests are skipped, unless ``SURVEYRED_REQUIRE_SLURM=1`` (set by
``.ci/run``), which turns a missing Slurm into a failure. Daemons that are
installed but do not start are always a failure, with up.sh's reason.

``reference_run()`` is the uninterrupted run of the tiny survey through
``snakemake --profile profiles/slurm`` that test_slurm.py checks and that the
restart tests compare their products with, byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SNAKEFILE = REPO / "Snakefile"
PROFILE = REPO / "profiles" / "slurm"
UP = REPO / "tests" / "slurm" / "up.sh"
DOWN = REPO / "tests" / "slurm" / "down.sh"

#: Seconds a Slurm run of the tiny survey may take (ISR stage: about 2-3 minutes).
RUN_TIMEOUT = 900
#: Options every test run adds to the unchanged profile: the CI node has 2 CPUs
#: (a group job may not ask for the profile's 8), the first status check after
#: 5 s instead of 40 s (the jobs take seconds, not hours), and only the stages up
#: to ISR: the later per-visit stages would add minutes of pixel work on 2 cores
#: and exercise nothing in Slurm that ISR does not. (`--until isr` does not work
#: here: before the ingest checkpoint has run there is no isr job to run until.)
DOWNSTREAM_OF_ISR = ("characterize", "calibrate", "jointcal")
TEST_ARGS = ("--cores", "2", "--slurm-init-seconds-before-status-checks", "5",
             "--omit-from", *DOWNSTREAM_OF_ISR)

_state: dict = {}


def required() -> bool:
    return os.environ.get("SURVEYRED_REQUIRE_SLURM", "") not in ("", "0")


def _missing(reason: str):
    if required():
        pytest.fail(f"SURVEYRED_REQUIRE_SLURM=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _env_from(env_sh: Path) -> dict[str, str]:
    """The environment after sourcing up.sh's env.sh (SLURM_CONF, PATH)."""
    out = subprocess.run(["bash", "-c", f'source "{env_sh}" && env -0'], capture_output=True, check=True)
    env = dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)
    # the rules call the `surveyred` command installed beside this interpreter
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def cluster() -> dict[str, str]:
    """Start (once) the test Slurm; return the environment that reaches it."""
    if "env" in _state:
        return _state["env"]
    if "error" in _state:
        pytest.fail(_state["error"], pytrace=False)
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [c for c in ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "sbatch")
               if shutil.which(c, path=path) is None]
    if missing:
        _missing(f"Slurm is not installed (no {', '.join(missing)}; apt-get install slurm-wlm slurmdbd munge "
                 f"mariadb-server)")
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        _missing("snakemake-executor-plugin-slurm is not installed (pip install -e '.[cluster]')")
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(UP)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        _state["error"] = f"the Slurm daemons did not start (tests/slurm/up.sh exit {proc.returncode}):\n{proc.stderr}"
        pytest.fail(_state["error"], pytrace=False)
    _state["started"] = "already running" not in proc.stderr
    _state["up_seconds"] = time.monotonic() - t0
    _state["up_log"] = proc.stderr.strip()
    _state["env"] = _env_from(Path(proc.stdout.strip().splitlines()[-1]))
    return _state["env"]


def stop() -> None:
    """Stop the daemons if this session started them."""
    if _state.pop("started", False):
        subprocess.run(["bash", str(DOWN)], capture_output=True, text=True, timeout=120)
    _state.pop("env", None)


def snakemake_cmd(workdir: Path, configfile: Path, *args: str) -> list[str]:
    # TEST_ARGS last: its --omit-from takes every word after it, targets included
    return [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir),
            "--configfile", str(configfile), "--profile", str(PROFILE), *args, *TEST_ARGS]


def run(workdir: Path, configfile: Path, *args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """``snakemake --profile profiles/slurm ...`` bounded by ``timeout -s INT``.

    Snakemake ignores SIGTERM while its jobs look unfinished; SIGINT makes it
    cancel its Slurm jobs and exit.
    """
    cmd = ["timeout", "-s", "INT", "-k", "60", str(int(timeout)),
           *snakemake_cmd(workdir, configfile, *args)]
    return subprocess.run(cmd, cwd=workdir, env=cluster(), capture_output=True, text=True, timeout=timeout + 120)


def start(workdir: Path, configfile: Path, *args: str, log: Path) -> subprocess.Popen:
    """Start snakemake in the background (no ``timeout`` wrapper: ``proc.pid`` is
    Snakemake itself, so a test can SIGKILL it), output to ``log``."""
    fh = open(log, "w")
    cmd = snakemake_cmd(workdir, configfile, *args)
    return subprocess.Popen(cmd, cwd=workdir, env=cluster(), stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)


def slurm(*args: str) -> str:
    """Run a Slurm command (squeue, sacct, scancel) against the test cluster."""
    proc = subprocess.run(list(args), env=cluster(), capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr}")
    return proc.stdout


SUBMITTED = re.compile(r"Job (\S+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


def submissions(text: str) -> list[tuple[str, str, str]]:
    """``(snakemake job or group id, Slurm job id, slurm log)`` of every sbatch."""
    return SUBMITTED.findall(text)


def show(proc) -> str:
    return (f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n"
            f"--- stderr ---\n{proc.stderr[-12000:]}")


def make_workdir(base: Path, raw: Path) -> tuple[Path, Path]:
    workdir = base / "work"
    workdir.mkdir(parents=True)
    configfile = base / "config.yaml"
    configfile.write_text(yaml.safe_dump({"raw_dir": str(raw), "results_dir": "results"}))
    return workdir, configfile


def calexp_targets(results: Path, night: str | None = None) -> list[str]:
    """The calexp directories of every science exposure (of one night), as targets.

    Runs after the first need explicit targets: `--omit-from` also drops rule
    `all`, so without targets there is nothing to do once ingest has run.
    """
    import pandas as pd

    inv = pd.read_parquet(results / "inventory.parquet")
    sci = inv[inv.obstype == "science"]
    if night is not None:
        sci = sci[sci.night == night]
    return sorted({f"{results.name}/calexp/{r.night}/{r.visit}" for r in sci.itertuples()})


def products(results: Path) -> dict[str, str]:
    """sha256 of every calibration master and calexp, keyed by relative path."""
    out = {}
    for sub in ("calib", "calexp"):
        for path in sorted((results / sub).rglob("*.fits")):
            out[str(path.relative_to(results))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def reference_run(tmp_path_factory, tiny_survey: Path) -> dict:
    """The uninterrupted Slurm run of the tiny survey (once per session)."""
    if "reference" in _state:
        return _state["reference"]
    cluster()
    base = tmp_path_factory.mktemp("slurm_reference")
    raw = base / "raw"
    shutil.copytree(tiny_survey / "raw", raw)
    workdir, configfile = make_workdir(base, raw)
    t0 = time.monotonic()
    proc = run(workdir, configfile)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        pytest.fail(f"the Slurm run of the tiny survey failed:\n{show(proc)}", pytrace=False)
    _state["reference"] = {
        "raw": raw, "workdir": workdir, "configfile": configfile, "results": workdir / "results",
        "proc": proc, "seconds": seconds, "products": products(workdir / "results"),
    }
    return _state["reference"]


def copy_run(ref: dict, base: Path) -> tuple[Path, Path]:
    """A copy of the reference working directory (products, .snakemake metadata)."""
    workdir = base / "work"
    shutil.copytree(ref["workdir"], workdir, symlinks=True)
    configfile = base / "config.yaml"
    shutil.copy2(ref["configfile"], configfile)
    shutil.rmtree(workdir / ".snakemake" / "slurm_logs", ignore_errors=True)
    return workdir, configfile


def wait_until(predicate, timeout: float, what: str, poll: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def kill_group(proc: subprocess.Popen) -> None:
    """Last resort for a test's background snakemake (its own session)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with_suppress_kill(proc)


def with_suppress_kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
