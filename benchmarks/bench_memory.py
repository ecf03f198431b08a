"""Declared ``mem_mb`` of each rule against the peak memory its jobs measured.

Every pixel rule (and ingest) writes Snakemake's benchmark table under
``results/benchmarks/<rule>/...`` with ``max_rss`` (MB) of the job. This script
runs the workflow on a simulated survey (``--preset tiny`` or ``demo``) with
``--cores 2`` in a temporary directory, or reads an existing run
(``--workdir DIR``, the directory holding ``results/``), and prints per rule the
declared memory of attempt 1 (from dry runs with ``--forcerun``, i.e. the
rule's ``resources:`` as Snakemake evaluates them, without a profile), the largest measured
``max_rss`` over the rule's jobs, and the margin::

    rule           jobs  declared_mb  max_rss_mb  ratio  ok

``ok`` is ``yes`` when declared >= 1.5 x measured (50 % margin). Exit status 1
when a rule lacks that margin or wrote no benchmark.

    python benchmarks/bench_memory.py [--preset tiny|demo] [--seed N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARGIN = 1.5


def _env():
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def snakemake(workdir: Path, configfile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(configfile), *args]
    return subprocess.run(cmd, cwd=workdir, env=_env(), capture_output=True, text=True)


def _dry_run_mem(workdir: Path, configfile: Path, *args: str) -> dict[str, int]:
    proc = snakemake(workdir, configfile, "-n", *args)
    if proc.returncode != 0:
        raise SystemExit(f"dry run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out: dict[str, int] = {}
    rule = None
    for line in (proc.stdout + proc.stderr).splitlines():
        m = re.match(r"^\s*(?:local)?(?:rule|checkpoint) (\w+):", line)
        if m:
            rule = m.group(1)
            continue
        m = re.search(r"^\s*resources: .*\bmem_mb=(\d+)", line)
        if m and rule:
            out[rule] = max(out.get(rule, 0), int(m.group(1)))
    return out


def declared(workdir: Path, configfile: Path, rules: list[str]) -> dict[str, int]:
    """Rule -> the largest mem_mb of its jobs at attempt 1, from dry runs.

    Forcing the ingest checkpoint hides every job behind it, so ingest is asked
    in a dry run of its own and the other rules with --forcerun in another.
    """
    out = _dry_run_mem(workdir, configfile, "--forcerun", "ingest")
    others = [r for r in rules if r != "ingest"]
    if others:
        out.update({k: v for k, v in _dry_run_mem(workdir, configfile, "--forcerun", *others).items()
                    if k != "ingest"})
    return out


def measured(results: Path) -> dict[str, tuple[int, float]]:
    """Rule -> (jobs, largest max_rss in MB) from results/benchmarks."""
    bench = results / "benchmarks"
    out: dict[str, tuple[int, float]] = {}
    for tsv in sorted(bench.rglob("*.tsv")):
        rel = tsv.relative_to(bench)
        rule = rel.parts[0] if len(rel.parts) > 1 else tsv.stem
        with open(tsv) as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        for row in rows:
            try:
                rss = float(row["max_rss"])
            except (KeyError, ValueError):
                continue
            n, peak = out.get(rule, (0, 0.0))
            out[rule] = (n + 1, max(peak, rss))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "demo"])
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--workdir", type=Path,
                    help="an existing run (holds results/ and config.yaml), or where to make one")
    ap.add_argument("--cores", type=int, default=2)
    args = ap.parse_args(argv)

    tmp = None
    if args.workdir and (args.workdir / "results" / "benchmarks").is_dir():
        workdir = args.workdir
        configfile = workdir / "config.yaml"
        if not configfile.exists():
            configfile = next(iter(sorted(workdir.glob("*.yaml"))), None)
        if configfile is None:
            raise SystemExit(f"{workdir}: no config.yaml beside results/")
        print(f"# reading the run in {workdir}")
    else:
        base = args.workdir or Path(tmp := tempfile.mkdtemp(prefix="bench_memory_"))
        base.mkdir(parents=True, exist_ok=True)
        sim = base / "sim"
        print(f"# simulating --preset {args.preset} --seed {args.seed} in {sim}", flush=True)
        subprocess.run([sys.executable, "-m", "surveyred.cli", "simulate", str(sim), "--preset", args.preset,
                        "--seed", str(args.seed)], check=True, env=_env(), capture_output=True)
        workdir = base / "work"
        workdir.mkdir(exist_ok=True)
        configfile = workdir / "config.yaml"
        refcat = sim / "refcat"
        configfile.write_text(f"raw_dir: {sim / 'raw'}\nresults_dir: results\n"
                              + (f"refcat:\n  store: {refcat}\n" if refcat.is_dir() else ""))
        print(f"# running the workflow with --cores {args.cores}", flush=True)
        proc = snakemake(workdir, configfile, "--cores", str(args.cores), "--keep-going")
        if proc.returncode != 0:
            print(proc.stderr[-4000:])
            print("# the run failed; reporting the jobs that finished")
    try:
        mea = measured(workdir / "results")
        dec = declared(workdir, configfile, sorted(mea))
        print(f"{'rule':14s} {'jobs':>5s} {'declared_mb':>12s} {'max_rss_mb':>11s} {'ratio':>6s}  ok")
        bad = 0
        for rule in sorted(set(dec) | set(mea)):
            if rule == "all":
                continue
            d = dec.get(rule)
            n, peak = mea.get(rule, (0, float("nan")))
            if d is None or n == 0:
                ok = "no benchmark" if n == 0 else "undeclared"
                bad += 1
                ratio = float("nan")
            else:
                ratio = d / peak if peak else float("inf")
                ok = "yes" if ratio >= MARGIN else "NO"
                bad += ok != "yes"
            print(f"{rule:14s} {n:5d} {d if d is not None else '-':>12} {peak:11.0f} {ratio:6.1f}  {ok}")
        return 1 if bad else 0
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
