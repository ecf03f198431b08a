"""`surveyred disk`: bytes per product type against du, deletable and missing products."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from surveyred import cli, disk

DETS = [0, 1, 2, 3]


def du(path: Path, *args: str) -> int:
    out = subprocess.run(["du", "-s", *args, str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


@pytest.fixture(scope="module")
def ingested(tiny_survey, tmp_path_factory):
    base = tmp_path_factory.mktemp("disk_base")
    results = base / "results"
    rc = cli.main(["ingest", str(tiny_survey / "raw"), "--instrument", "simcam",
                   "--output", str(results / "inventory.parquet"),
                   "--rejects", str(results / "inventory_rejects.parquet")])
    assert rc == 0
    return results


@pytest.fixture
def results(ingested, tmp_path):
    out = tmp_path / "work" / "results"
    shutil.copytree(ingested, out)
    return out


def _write(path: Path, nbytes: int, *, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(nbytes) if seed else bytes((i * 7 + 3) % 251 for i in range(nbytes)))
    return path


def test_bytes_match_du_with_sparse_files_hard_links_and_symlinks(results):
    sizes = {
        "calexp/20240220/1014/1014_0.fits": 123_457,
        "calexp/20240220/1014/1014_1.fits": 5,
        "src/20240220/1014/1014_0.parquet": 4096,
        "logs/isr/20240220/1014.log": 777,
        "benchmarks/isr/20240220/1014.tsv": 0,
        "qa/status.txt": 1,
        "notes/readme.txt": 3000,
    }
    for rel, n in sizes.items():
        _write(results / rel, n, seed=1)
    sparse = results / "warp" / "20240220" / "1014" / "0_1,1.fits"
    sparse.parent.mkdir(parents=True)
    with open(sparse, "wb") as fh:  # 64 MiB apparent, one 4 KiB block of data at the end
        fh.seek(64 * 2**20 - 4096)
        fh.write(b"x" * 4096)
    # a hard link inside one type (counted once) and one across types (counted once in the total)
    os.link(results / "calexp/20240220/1014/1014_0.fits", results / "calexp/20240220/1014/copy.fits")
    os.link(results / "src/20240220/1014/1014_0.parquet", results / "qa/linked.parquet")
    os.symlink("../inventory.parquet", results / "qa" / "inventory_link.parquet")

    usage, total, _ = disk.disk_usage(results)
    assert total.apparent == du(results, "-b")
    assert total.allocated == du(results, "-B1")
    assert sparse.stat().st_size == 64 * 2**20
    assert usage["warp"].allocated < usage["warp"].apparent / 100  # the sparse file occupies ~nothing
    # per type = du of its directory (no hard link leaves these trees)
    for kind in ("calexp", "warp", "logs", "benchmarks"):
        assert usage[kind].apparent == du(results / kind, "-b"), kind
        assert usage[kind].allocated == du(results / kind, "-B1"), kind
    assert usage["calexp"].files == 2  # the hard link is the same file: counted once, like du
    assert usage["inventory"].files == 2
    assert usage["inventory"].apparent == sum((results / n).stat().st_size
                                              for n in ("inventory.parquet", "inventory_rejects.parquet"))
    assert sum(u.apparent for u in usage.values()) == total.apparent
    assert sum(u.allocated for u in usage.values()) == total.allocated
    assert usage["other"].files == 1  # notes/readme.txt

    proc = subprocess.run([sys.executable, "-m", "surveyred.cli", "disk", str(results), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    js = json.loads(proc.stdout)
    assert js["total"]["apparent_bytes"] == du(results, "-b")
    assert js["total"]["allocated_bytes"] == du(results, "-B1")
    by_type = {t["type"]: t for t in js["types"]}
    assert by_type["warp"]["apparent_bytes"] == du(results / "warp", "-b")


def _visit_products(results: Path, night: str, visit: str, *, forced: bool = True) -> None:
    for det in DETS:
        for kind, ext in (("calexp", "fits"), ("src", "parquet"), ("psf", "fits"), ("calsrc", "parquet"),
                          ("wcs", "fits")):
            _write(results / kind / night / visit / f"{visit}_{det}.{ext}", 1000 + det)
    _write(results / "visit_summary" / night / f"{visit}.parquet", 500)
    if forced:
        _write(results / "forced" / night / f"{visit}.parquet", 700)


def test_deletable_and_missing(results, tiny_survey):
    inv = pd.read_parquet(results / "inventory.parquet")
    sci = inv[inv.obstype == "science"].drop_duplicates(["night", "visit"]).sort_values(["night", "visit"])
    g = sci[sci.band == "g"]
    (n1, v1), (n2, v2) = [(str(r.night), str(r.visit)) for r in g.itertuples()][:2]
    # masters of every group in the plan (names are what count)
    from surveyred.calib import plan_calibrations

    plan = plan_calibrations(inv, {"mode": "night", "max_days": 3})
    for grp in plan.bias_groups:
        for det in DETS:
            _write(results / "calib" / "bias" / grp / f"bias_{det}.fits", 2000)
    for grp, band in plan.flat_groups:
        for det in DETS:
            _write(results / "calib" / "flat" / grp / band / f"flat_{det}.fits", 2000)
    _visit_products(results, n1, v1, forced=True)
    _visit_products(results, n2, v2, forced=False)
    # warps of visit 1: patch 1,1 has its (newer) coadd, patch 2,1 has none
    w_done = _write(results / "warp" / n1 / v1 / "0_1,1.fits", 3000)
    w_open = _write(results / "warp" / n1 / v1 / "0_2,1.fits", 3000)
    _write(results / "warp" / n1 / v1 / "manifest.json", 100)
    past = time.time() - 100
    os.utime(w_done, (past, past))
    _write(results / "coadd" / "0" / "1,1" / "g.fits", 9000)

    rep = disk.analyse(results)
    dele = rep.deletable
    kept = rep.kept
    assert list(dele[dele.type == "warp"].path) == [f"warp/{n1}/{v1}/0_1,1.fits"]
    assert set(kept[kept.type == "warp"].path) == {f"warp/{n1}/{v1}/0_2,1.fits", f"warp/{n1}/{v1}/manifest.json"}
    assert "coadd/0/2,1/g.fits is missing" in kept[kept.path.str.endswith("0_2,1.fits")].reason.iloc[0]
    # calexps: visit 1 still has a warp waiting for its coadd; visit 2 lacks forced photometry
    reasons = {r.visit: r.reason for r in kept[kept.type == "calexp"].itertuples()}
    assert set(reasons) == {v1, v2} and dele[dele.type == "calexp"].empty
    assert "coadd of its band not made yet" in reasons[v1] and "forced" not in reasons[v1]
    assert f"forced photometry forced/*/{v2}.parquet missing" in reasons[v2]
    # once the last warp's coadd exists, visit 1's calexps are deletable (raw + masters exist)
    w_open.unlink()
    rep = disk.analyse(results)
    got = rep.deletable[rep.deletable.type == "calexp"]
    assert list(got.visit) == [v1]
    assert got.files.iloc[0] == 4 and got.apparent.iloc[0] == sum(1000 + d for d in DETS)
    # a master is deletable when every exposure it serves has its calexps (here: visits 1 and 2 only)
    have = {(n1, v1), (n2, v2)}
    served: dict[str, set] = {}
    for r in plan.science.itertuples():
        served.setdefault(f"calib/bias/{r.bias_group}/", set()).add((str(r.night), str(r.visit)))
        served.setdefault(f"calib/flat/{r.flat_group}/{r.band}/", set()).add((str(r.night), str(r.visit)))
    want = sorted(k for k, v in served.items() if v <= have)
    assert want, "the tiny survey has a flat group serving only the two g exposures of night 1"
    assert sorted(rep.deletable[rep.deletable.type.str.startswith("calib")].path) == want
    assert (rep.kept.type.str.startswith("calib")).sum() == len(plan.bias_groups) + len(plan.flat_groups) - len(want)

    # missing: 5 per-detector products of every other science exposure, their summaries,
    # and forced photometry of every exposure but visit 1
    n_vis = len(sci)
    miss = rep.missing.groupby("type").size().to_dict()
    assert miss == {"calexp": (n_vis - 2) * 4, "src": (n_vis - 2) * 4, "psf": (n_vis - 2) * 4,
                    "calsrc": (n_vis - 2) * 4, "wcs": (n_vis - 2) * 4, "visit_summary": n_vis - 2,
                    "forced": n_vis - 1}
    assert f"forced/*/{v2}.parquet" in set(rep.missing.path)

    # the terminal report lists the same
    proc = subprocess.run([sys.executable, "-m", "surveyred.cli", "disk", str(results)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"warp/{n1}/{v1}/0_1,1.fits" in proc.stdout and f"missing: {len(rep.missing)}" in proc.stdout


def test_disk_refuses_a_non_results_dir(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "surveyred.cli", "disk", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"ConfigError: {tmp_path}: not a surveyred results")
