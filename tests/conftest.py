"""Shared fixtures: real telescope frames (when present) and one tiny simulated survey."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"

#: Arguments of the one simulated survey the tests share.
TINY_SURVEY_ARGS = ("--preset", "tiny", "--seed", "3")


def pytest_configure(config):
    # also declared in pyproject.toml; repeated so the markers exist under any rootdir
    config.addinivalue_line("markers", "workflow: drives snakemake end to end (slower)")
    config.addinivalue_line("markers", "real: uses real telescope frames from ../shared/data/real")


def simulator_available() -> bool:
    """True when ``surveyred.simulate`` can be imported."""
    try:
        return importlib.util.find_spec("surveyred.simulate") is not None
    except ImportError:
        return False


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository checkout (holds the Snakefile and config/)."""
    return REPO


@pytest.fixture(scope="session")
def shared_real_dir() -> Path:
    """``../shared/data/real`` beside the checkout; skips when absent (fresh clones)."""
    if not SHARED_REAL.is_dir():
        pytest.skip(f"real telescope frames not available ({SHARED_REAL} is absent)")
    return SHARED_REAL


@pytest.fixture(scope="session")
def tiny_survey(tmp_path_factory) -> Path:
    """A tiny simulated survey written once per session; returns its directory.

    Raw frames are under ``<dir>/raw/<night>/``.  Skips when the simulator is
    not importable.
    """
    if not simulator_available():
        pytest.skip("surveyred.simulate is not importable (simulator not installed)")
    from surveyred import simulate

    out = tmp_path_factory.mktemp("tiny_survey") / "sim"
    status = simulate.main([str(out), *TINY_SURVEY_ARGS])
    if status:
        pytest.fail(f"surveyred simulate {out} {' '.join(TINY_SURVEY_ARGS)} exited with {status}")
    return out


# -- the tiny survey reduced through the chain, coadded and force-measured (A2: issue 4) ------

#: Skymap of the forced-photometry tests: one tract on the field centre, 3x3 patches of 400 px
#: (+25 px overlap) at the camera's 0.4"/px; patch 0,0 holds the simulated supernova.
FORCED_SKYMAP = {"pixel_scale": 0.4, "patch_size": 400, "patch_overlap": 25, "n_patches": 3}
FORCED_TRACT = {"id": 0, "ra": 150.1, "dec": 2.2}
FORCED_PATCHES = ("0,0", "1,0")


@pytest.fixture(scope="session")
def tiny_reduced(tiny_survey, tmp_path_factory) -> Path:
    """Every science visit of the tiny survey through master bias/flat (library) and the
    ``isr`` -> ``characterize`` -> ``calibrate`` commands; returns the results directory
    (``calexp/``, ``src/``, ``psf/``, ``calsrc/``, ``wcs/``, ``visit_summary/`` per night)."""
    from surveyred import cli
    from surveyred.calib import CalibConfig, build_master_bias, build_master_flat, plan_calibrations
    from surveyred.ingest import build_inventory, find_raw_files
    from surveyred.instrument import load_instrument

    inst = load_instrument("simcam")
    out = tmp_path_factory.mktemp("tiny_reduced")
    inv, _ = build_inventory(find_raw_files(tiny_survey / "raw"), inst)
    plan = plan_calibrations(inv.to_pandas(), {"mode": "night", "max_days": 3})
    sci = plan.science
    cfg = CalibConfig.from_dict({})
    for group in sorted(set(sci.bias_group)):
        build_master_bias(plan.bias_groups[group], inst, inst.detectors, out / "bias" / group, cfg, group=group,
                          valid=plan.validity[group])
    for (group, band), paths in sorted(plan.flat_groups.items()):
        if (group, band) in set(zip(sci.flat_group, sci.band)):
            build_master_flat(paths, inst, inst.detectors, out / "flat" / group / band, cfg, band=band,
                              bias_dir=out / "bias" / plan.flat_bias[(group, band)], group=group,
                              valid=plan.validity[(group, band)])
    catdir = str(tiny_survey / "refcat" / "sim")
    for row in sci.sort_values("visit").itertuples():
        night, visit = str(row.night), str(row.visit)
        assert cli.main(["isr", str(row.path), "--instrument", "simcam", "--visit", visit, "--band", row.band,
                         "--night", night, "--bias-dir", str(out / "bias" / row.bias_group), "--flat-dir",
                         str(out / "flat" / row.flat_group / row.band), "--outdir", str(out / "calexp" / night),
                         "--threads", "2"]) == 0
        names = [f"{visit}_{d.id}" for d in inst.detectors]
        calexps = [str(out / "calexp" / night / f"{n}.fits") for n in names]
        assert cli.main(["characterize", *calexps, "--outdir-src", str(out / "src" / night), "--outdir-psf",
                         str(out / "psf" / night), "--threads", "2"]) == 0
        assert cli.main(["calibrate", "--src", *[str(out / "src" / night / f"{n}.parquet") for n in names],
                         "--calexp", *calexps, "--refcat-astrom", catdir, "--refcat-photom", catdir,
                         "--instrument", "simcam", "--outdir-calsrc", str(out / "calsrc" / night), "--outdir-wcs",
                         str(out / "wcs" / night), "--summary", str(out / "visit_summary" / night / f"{visit}.parquet"),
                         "--threads", "2"]) == 0
    return out


def forced_visit_files(reduced: Path, night: str, visit: str) -> tuple[list, list, list]:
    """(calexps, wcs products, psf products) of one visit of ``tiny_reduced``, in detector order."""
    names = sorted(p.name for p in (reduced / "calexp" / night).glob(f"{visit}_*.fits"))
    return ([str(reduced / "calexp" / night / n) for n in names], [str(reduced / "wcs" / night / n) for n in names],
            [str(reduced / "psf" / night / n) for n in names])


def build_tiny_coadds(reduced: Path, out: Path) -> dict:
    """Warp every calibrated detector, background-subtracted, onto FORCED_PATCHES (library ``warp_exposure``,
    nJy at zero-point 31.4, one warp per visit and patch), coadd each band (``coadd``/``write_coadd``) into
    ``out/coadd/0/<patch>/<band>.fits``; returns ``{patch: [coadd paths]}``."""
    import warnings

    import numpy as np
    from astropy.io import fits
    from astropy.wcs import WCS

    from surveyred import fitsio, masks
    from surveyred.characterize import BackgroundConfig, estimate_background
    from surveyred.coadd import coadd, write_coadd
    from surveyred.skymap import SkymapConfig, make_tracts, patches_for_exposure
    from surveyred.warp import warp_exposure

    tract = make_tracts({0: (FORCED_TRACT["ra"], FORCED_TRACT["dec"])}, config=SkymapConfig(**FORCED_SKYMAP))[0]
    warps: dict = {}
    for night_dir in sorted((reduced / "calexp").iterdir()):
        visits = sorted({p.name.split("_")[0] for p in night_dir.glob("*.fits")})
        for visit in visits:
            acc, band = {}, None
            for cpath in sorted(night_dir.glob(f"{visit}_*.fits")):
                image, mask, var, prim, _ = fitsio.read_exposure(cpath)
                band = str(prim["BAND"]).strip()
                # sky-subtracted like `surveyred warp`: characterize's background (mesh, filter of the psf product)
                ph = fits.getheader(reduced / "psf" / night_dir.name / cpath.name)
                bkg = estimate_background(image, mask, cfg=BackgroundConfig(mesh=int(ph["BKGMESH"]),
                                                                            filter=int(ph["BKGFILT"])))
                image = image - bkg.back
                wh = fits.getheader(reduced / "wcs" / night_dir.name / cpath.name)
                if str(wh["STATUS"]).strip() != "ok":
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    w = WCS(wh)
                zp = float(wh["ZP"]) + 2.5 * np.log10(float(prim["EXPTIME"]))  # mag of 1 e- in the exposure
                for pid in patches_for_exposure(tract, w, image.shape, margin=4):
                    if pid not in FORCED_PATCHES:
                        continue
                    patch = tract.patch(pid)
                    wp = warp_exposure(image, var, mask, w, patch.wcs, patch.shape, zp_exposure=zp, zp_common=31.4,
                                       threads=2)
                    a = acc.setdefault(pid, [np.full(patch.shape, np.nan, np.float32),
                                             np.full(patch.shape, np.nan, np.float32),
                                             np.full(patch.shape, masks.NO_DATA, np.int32)])
                    use = (wp.mask & masks.NO_DATA) == 0  # detectors do not overlap
                    a[0][use], a[1][use], a[2][use] = wp.image[use], wp.variance[use], wp.mask[use]
            for pid, a in acc.items():
                warps.setdefault((pid, band), []).append(tuple(a))
    paths: dict = {}
    for (pid, band), ws in sorted(warps.items()):
        res = coadd(ws, threads=2)
        h = fits.Header()
        h["BAND"], h["TRACT"], h["PATCH"] = band, FORCED_TRACT["id"], pid
        p = out / "coadd" / str(FORCED_TRACT["id"]) / pid / f"{band}.fits"
        write_coadd(p, res, tract.patch(pid).wcs, header=h)
        paths.setdefault(pid, []).append(str(p))
    return paths


@pytest.fixture(scope="session")
def tiny_forced(tiny_reduced, tiny_survey, tmp_path_factory) -> dict:
    """``tiny_reduced`` coadded on FORCED_PATCHES, cataloged (``coadd-catalog``), force-measured per visit
    (``forced-phot``, with the objects of both patches and a user CSV: the supernova at its true position,
    a position 1 deg away, one on a BAD pixel of the first visit) and turned into light curves
    (``lightcurve``).  Returns paths and the user positions."""
    import json

    import numpy as np
    import yaml

    from surveyred import cli, fitsio, masks
    from surveyred.astrometry import SipWcs

    out = tmp_path_factory.mktemp("tiny_forced")
    coadds = build_tiny_coadds(tiny_reduced, out)
    cats = {}
    for pid in FORCED_PATCHES:
        cats[pid] = out / "coadd_cat" / "0" / f"{pid}.parquet"
        assert cli.main(["coadd-catalog", "--coadd", *coadds[pid], "--tract", "0", "--patch", pid, "--output",
                         str(cats[pid]), "--skymap-json", json.dumps(FORCED_SKYMAP), "--tract-json",
                         json.dumps(FORCED_TRACT), "--threads", "2", "--log", str(out / "logs" / f"cat_{pid}.log")]) == 0
    tr = yaml.safe_load((tiny_survey / "truth" / "manifest.yaml").read_text())["transient"]
    visits = sorted((p.parent.name, p.stem) for p in tiny_reduced.glob("visit_summary/*/*.parquet"))
    # a BAD pixel (dead column) of the first visit, away from the border, on an otherwise clean row
    night0, visit0 = visits[0]
    calexps0, wcs0, _ = forced_visit_files(tiny_reduced, night0, visit0)
    _, mask, _, _, _ = fitsio.read_exposure(calexps0[1])
    ys, xs = np.nonzero((mask & masks.BAD) != 0)
    inner = (xs > 40) & (xs < mask.shape[1] - 40) & (ys > 40) & (ys < mask.shape[0] - 40)
    bx, by = float(xs[inner][len(xs[inner]) // 2]), float(ys[inner][len(ys[inner]) // 2])
    bra, bdec = SipWcs.from_header(fitsio.read_headers(wcs0[1])[0]).pixel_to_sky(np.array([bx]), np.array([by]))
    users = {"sn": (tr["ra"], tr["dec"]), "far": (tr["ra"] + 1.0, tr["dec"]),
             "badpix": (float(bra[0]), float(bdec[0]))}
    positions = out / "positions.csv"
    positions.write_text("name,ra,dec,comment\n" + "".join(f"{k},{v[0]!r},{v[1]!r},test\n" for k, v in users.items()))
    forced = []
    for night, visit in visits:
        cal, wcs, psf = forced_visit_files(tiny_reduced, night, visit)
        dest = out / "forced" / night / f"{visit}.parquet"
        assert cli.main(["forced-phot", "--calexp", *cal, "--wcs", *wcs, "--psf", *psf, "--objects",
                         *[str(c) for c in cats.values()], "--positions", str(positions), "--output", str(dest),
                         "--threads", "2", "--log", str(out / "logs" / f"forced_{visit}.log")]) == 0
        forced.append(dest)
    lc = out / "lightcurves" / "lightcurves.parquet"
    assert cli.main(["lightcurve", "--forced", *map(str, forced), "--output", str(lc), "--plot", "sn", "far",
                     "--plot-dir", str(out / "lightcurves" / "plots")]) == 0
    return dict(out=out, reduced=tiny_reduced, coadds=coadds, catalogs=cats, forced=forced, lightcurves=lc,
                positions=positions, users=users, badpix=(visit0, 1, bx, by), visits=visits,
                truth=tiny_survey / "truth", skymap=FORCED_SKYMAP, tract=FORCED_TRACT,
                visit_files=lambda night, visit: forced_visit_files(tiny_reduced, night, visit))
