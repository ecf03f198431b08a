"""Time ``snakemake -n`` on a survey of CFHT-D3 size (no pixels).

A synthetic MegaCam survey: 2,736 science visits x 36 detectors (98,496
CCD-exposures) in 5 bands over 5 seasons of 40 nights, with 5 biases every night
and 5 twilight flats in two bands every night (bands rotate, so each band has a
flat within the default validity of +-3 nights). The script writes

* an empty placeholder file for every raw exposure (``raw/<night>/<visit>.fits``):
  the ISR and master jobs list them as inputs, and Snakemake only checks that an
  input exists;
* after them, ``results/inventory.parquet`` (with the MegaCam CCD corners of every
  science row, dithered by up to 2 arcmin around D3, so that the coadd rules see
  the real patch overlaps) (``surveyred.ingest.INVENTORY_SCHEMA``,
  one row per exposure and detector) and an empty rejects table, exactly what the
  ingest checkpoint writes.

The checkpoint's outputs are then newer than its inputs (the placeholders), so
Snakemake treats ingest as done (output files without Snakemake metadata trigger
no rerun) and builds the whole job graph behind the checkpoint, as after a real
ingest. No ``--touch`` and no change to the workflow is needed.

It then times ``snakemake -n --profile profiles/slurm`` (the profile's groups
apply) and prints::

    dag_seconds: S        wall time of the dry run (Snakemake start to exit)
    dag_peak_mb: M        peak RSS of the Snakemake process
    jobs: J               jobs in the graph ("Job stats" total)
    slurm_submissions: K  sbatch calls the run would make: group jobs + ungrouped
                          jobs (local rules such as `all` are not submitted),
                          from the job counts and the profile's groups (see
                          count_submissions)

Targets (issue 5): S <= 120, M <= 4000, K <= J / 20.

    python benchmarks/bench_dag.py [--workdir DIR] [--keep] [--profile-python] [--scale F]

``--profile-python`` runs the dry run under cProfile and prints the functions
that take the most cumulative time (to find slow input functions in
rules/common.smk).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from surveyred.ingest import INVENTORY_SCHEMA, REJECTS_SCHEMA  # noqa: E402

N_VISITS = 2736
N_DETECTORS = 36
BANDS = ["u", "g", "r", "i", "z"]
FILTERS = {"u": "u.MP9302", "g": "g.MP9402", "r": "r.MP9602", "i": "i.MP9703", "z": "z.MP9901"}
SEASONS = 5
NIGHTS_PER_SEASON = 40
BIAS_PER_NIGHT = 5
FLATS_PER_BAND = 5
FLAT_BANDS_PER_NIGHT = 2
# MegaCam: 9 x 4 CCDs of 2048 x 4612 pixels at 0.187"/pixel, about 80-pixel gaps;
# D3 centred at (214.9, 52.7) with dithers of up to 2 arcmin.
FIELD = (214.9, 52.7)
PIXEL_SCALE = 0.187
CCD = (2048, 4612)
GAP = 80
DITHER_ARCMIN = 2.0
# the tract/patch geometry the README recommends for MegaCam
SKYMAP = {"pixel_scale": 0.2, "patch_size": 4000, "patch_overlap": 100, "n_patches": 9}
# forced photometry of a week of nights per job, as the README recommends for surveys
# of hundreds of nights (one job per night would be 200 Slurm submissions)
FORCED = {"nights_per_job": 7}


def ccd_corners(det: int, ra0: float, dec0: float) -> tuple[list[float], list[float]]:
    """Sky corners of MegaCam CCD ``det`` (9 columns x 4 rows) for boresight (ra0, dec0)."""
    import numpy as np

    from surveyred.sky import tan_deproject

    col, row = det % 9, det // 9
    cx = (col - 4) * (CCD[0] + GAP)
    cy = (row - 1.5) * (CCD[1] + GAP)
    hx, hy = CCD[0] / 2.0, CCD[1] / 2.0
    x = np.array([cx - hx, cx + hx, cx + hx, cx - hx])
    y = np.array([cy - hy, cy - hy, cy + hy, cy + hy])
    ra, dec = tan_deproject(-x * PIXEL_SCALE / 3600.0, y * PIXEL_SCALE / 3600.0, ra0, dec0)
    return [float(v) for v in np.atleast_1d(ra)], [float(v) for v in np.atleast_1d(dec)]


def build_survey(root: Path, scale: float = 1.0) -> dict:
    """Placeholders and inventory under ``root``; returns counts.

    ``scale`` < 1 shrinks the number of nights and visits (quick experiments).
    """
    raw = root / "raw"
    rows = []
    nights = []
    n_visits = max(1, round(N_VISITS * scale))
    per_season = max(1, round(NIGHTS_PER_SEASON * scale))
    for season in range(SEASONS):
        start = dt.date(2004 + season, 2, 1)
        nights += [start + dt.timedelta(days=d) for d in range(per_season)]
    per_night = [n_visits // len(nights) + (1 if i < n_visits % len(nights) else 0) for i in range(len(nights))]
    odometer = 700000
    n_files = 0

    import random

    rng = random.Random(3)
    nan4 = [float("nan")] * 4

    def exposure(night: dt.date, obstype: str, band: str | None, k: int, exptime: float):
        nonlocal odometer, n_files
        odometer += 1
        science = obstype == "science"
        if science:
            import math

            ra0 = FIELD[0] + rng.uniform(-DITHER_ARCMIN, DITHER_ARCMIN) / 60.0 / math.cos(math.radians(FIELD[1]))
            dec0 = FIELD[1] + rng.uniform(-DITHER_ARCMIN, DITHER_ARCMIN) / 60.0
        visit = str(odometer)
        night_s = night.strftime("%Y%m%d")
        path = raw / night_s / f"{visit}o.fits"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        n_files += 1
        t = dt.datetime.combine(night, dt.time(22, 0)) + dt.timedelta(minutes=4 * k)
        mjd = (t - dt.datetime(1858, 11, 17)).total_seconds() / 86400.0
        for det in range(N_DETECTORS):
            rows.append({
                "path": str(path), "file": path.name, "hdu": det + 1, "detector": det,
                "detector_name": f"ccd{det:02d}", "visit": visit, "obstype": obstype,
                "physical_filter": FILTERS[band] if band else None, "band": band,
                "exptime": exptime, "date_obs": t.isoformat(), "mjd": mjd, "night": night_s,
                "ra": ra0 if science else None, "dec": dec0 if science else None,
                "airmass": 1.2, "object": "D3" if science else obstype.upper(),
                "raw_ny": 4644, "raw_nx": 2112,
                **(dict(zip(("corner_ra", "corner_dec"), ccd_corners(det, ra0, dec0))) if science
                   else {"corner_ra": nan4, "corner_dec": nan4}),
            })

    for i, night in enumerate(nights):
        k = 0
        for _ in range(BIAS_PER_NIGHT):
            exposure(night, "bias", None, k, 0.0)
            k += 1
        for j in range(FLAT_BANDS_PER_NIGHT):
            band = BANDS[(i * FLAT_BANDS_PER_NIGHT + j) % len(BANDS)]
            for _ in range(FLATS_PER_BAND):
                exposure(night, "flat", band, k, 5.0)
                k += 1
        for v in range(per_night[i]):
            exposure(night, "science", BANDS[(i + v) % len(BANDS)], k, 360.0)
            k += 1
    results = root / "work" / "results"
    results.mkdir(parents=True, exist_ok=True)
    # written after every placeholder: the checkpoint's outputs are newer than its inputs
    time.sleep(0.05)
    pq.write_table(pa.Table.from_pylist(rows, schema=INVENTORY_SCHEMA), results / "inventory.parquet")
    pq.write_table(pa.Table.from_pylist([], schema=REJECTS_SCHEMA), results / "inventory_rejects.parquet")
    return {"files": n_files, "rows": len(rows), "nights": len(nights)}


def job_counts(text: str) -> dict[str, int]:
    """Rule -> jobs, from the dry run's "Job stats" table."""
    stats = text[text.index("Job stats:"):]
    counts = {}
    for line in stats.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def count_submissions(counts: dict[str, int], inventory: Path, profile: Path,
                      local: set[str] = frozenset({"all"})) -> tuple[int, dict[str, int]]:
    """sbatch calls of the run: per group, ceil(connected components / group-components);
    plus one per ungrouped job; local rules (`all`) are not submitted.

    (A dry run prints only the first round of group jobs, so the number is derived
    from the job counts and the profile, as Snakemake forms groups: jobs of the
    rules in a group that are connected in the DAG form one component.)
    Components: group `visit` has one per visit (isr -> characterize -> calibrate
    of a visit are connected; different visits are not); group `calib` has one
    per set of master jobs connected by the bias a flat uses.
    """
    import math

    import pandas as pd
    import yaml

    from surveyred.calib import plan_calibrations

    prof = yaml.safe_load((profile / "config.yaml").read_text())
    groups = prof.get("groups", {}) or {}
    sizes = prof.get("group-components", {}) or {}
    plan = plan_calibrations(pd.read_parquet(inventory), {"mode": "night", "max_days": 3})
    # union-find over master jobs: a flat is connected to the bias group it uses
    parent = {("bias", g): ("bias", g) for g in plan.bias_groups}
    parent.update({("flat", k): ("flat", k) for k in plan.flat_groups})

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for key, bgroup in plan.flat_bias.items():
        if bgroup is not None:
            parent[find(("flat", key))] = find(("bias", bgroup))
    components = {}
    members = {}
    for rule, group in groups.items():
        if counts.get(rule):
            members.setdefault(group, []).append(rule)
    for group, rules in members.items():
        if set(rules) <= {"master_bias", "master_flat"}:
            components[group] = len({find(x) for x in parent})
        elif set(rules) <= {"coadd", "coadd_catalog"}:  # one component per patch
            components[group] = counts.get("coadd_catalog", 0)
        else:  # per-visit rules: one component per visit
            components[group] = max(counts[r] for r in rules)
    by_kind = {f"group {g} ({components[g]} components / {sizes.get(g, 1)})":
               math.ceil(components[g] / int(sizes.get(g, 1))) for g in components}
    for rule, n in counts.items():
        if rule not in groups and rule not in local:
            by_kind[rule] = n
    return sum(by_kind.values()), by_kind


def local_rules(rules_dir: Path) -> set[str]:
    """Rules declared ``localrule: True`` in the workflow's rule files."""
    local = set()
    for smk in sorted(rules_dir.glob("*.smk")):
        for block in re.split(r"^(?=(?:rule|checkpoint) )", smk.read_text(), flags=re.M):
            m = re.match(r"(?:rule|checkpoint) (\w+):", block)
            if m and re.search(r"^\s+localrule: True", block, flags=re.M):
                local.add(m.group(1))
    return local


def job_total(text: str) -> int:
    m = re.search(r"^total\s+(\d+)\s*$", text, flags=re.M)
    if not m:
        raise SystemExit("no 'Job stats' total in the dry run output")
    return int(m.group(1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, help="build the survey here (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--profile-python", action="store_true", help="run the dry run under cProfile")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="fraction of the visits and nights (quick experiments; targets apply at 1)")
    args = ap.parse_args(argv)

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_dag_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.monotonic()
        counts = build_survey(root, args.scale)
        print(f"survey: {counts['files']} raw placeholders, {counts['rows']} inventory rows, "
              f"{counts['nights']} nights ({time.monotonic() - t0:.1f} s to write)", flush=True)
        work = root / "work"
        cfg = root / "config.yaml"
        import yaml

        cfg.write_text(yaml.safe_dump({"instrument": "megacam", "raw_dir": str(root / "raw"),
                                       "results_dir": "results", "skymap": SKYMAP,
                                       "forced": FORCED}))
        smk = [sys.executable, "-m", "snakemake"]
        if args.profile_python:
            smk = [sys.executable, "-m", "cProfile", "-o", str(root / "dag.prof"), "-m", "snakemake"]
        cmd = [*smk, "-n", "-s", str(REPO / "Snakefile"), "--directory", str(work), "--configfile", str(cfg),
               "--profile", str(REPO / "profiles" / "slurm")]
        out = root / "dryrun.log"
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        t0 = time.monotonic()
        with open(out, "w") as fh:
            proc = subprocess.run(cmd, cwd=work, stdout=fh, stderr=subprocess.STDOUT, env=env)
        seconds = time.monotonic() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
        text = out.read_text()
        if proc.returncode != 0:
            print(text[-5000:])
            print(f"snakemake -n failed with exit {proc.returncode}")
            return 1
        jobs = job_total(text)
        # local rules (`localrule: True`, and `all`) run in the Snakemake process, not through sbatch
        local = local_rules(REPO / "rules") | {"all"}
        subs, by_kind = count_submissions(job_counts(text), work / "results" / "inventory.parquet",
                                          REPO / "profiles" / "slurm", local)
        stats = text[text.index("Job stats:"):].split("\n\n")[0]
        print(stats)
        print("submissions by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items())))
        if args.profile_python:
            import pstats
            pstats.Stats(str(root / "dag.prof")).sort_stats("cumulative").print_stats(35)
        print(f"dag_seconds: {seconds:.1f}")
        print(f"dag_peak_mb: {peak_mb:.0f}")
        print(f"jobs: {jobs}")
        print(f"slurm_submissions: {subs}")
        ok = seconds <= 120 and peak_mb <= 4000 and subs <= jobs / 20
        print(f"targets (S <= 120, M <= 4000, K <= J/20 = {jobs / 20:.0f}): {'met' if ok else 'NOT met'}")
        return 0 if ok else 2
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
