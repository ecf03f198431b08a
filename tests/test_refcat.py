"""The reference-catalog store: shards, proper motions, fetch through astroquery (recorded responses).

No network: ``tests/data/refcat/`` holds responses in the formats the services
return (Gaia DR3 ADQL -> VOTable with gaia_source column names; MAST
``Catalogs.query_region(catalog='Panstarrs', data_release='dr2',
table='mean')`` -> Table with PS1 mean columns; SDSS ``query_region`` ->
the SkyServer CSV), and astroquery's query functions are monkeypatched to
return them and to count calls.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from astropy.table import Table

from surveyred import refcat
from surveyred.errors import ConfigError

DATA = Path(__file__).parent / "data" / "refcat"


class _Job:
    def __init__(self, table):
        self._table = table

    def get_results(self):
        return self._table


@pytest.fixture
def services(monkeypatch):
    """Patch astroquery's Gaia, MAST and SDSS query functions; count the calls."""
    from astroquery.gaia import Gaia
    from astroquery.mast import Catalogs
    from astroquery.sdss import SDSS

    calls = {"gaia": [], "ps1": [], "sdss": []}

    def gaia(query, **kwargs):
        calls["gaia"].append(query)
        return _Job(Table.read(DATA / "gaia_dr3_cone.vot", format="votable"))

    def mast(coords, radius=None, catalog=None, data_release=None, table=None, **kwargs):
        calls["ps1"].append((catalog, data_release, table))
        return Table.read(DATA / "ps1_dr2_mean_cone.ecsv", format="ascii.ecsv")

    def sdss(coords, radius=None, photoobj_fields=None, **kwargs):
        calls["sdss"].append(photoobj_fields)
        return Table.read(DATA / "sdss_photoobj_cone.csv", format="ascii.csv")

    monkeypatch.setattr(Gaia, "launch_job_async", gaia)
    monkeypatch.setattr(Catalogs, "query_region", mast)
    monkeypatch.setattr(SDSS, "query_region", sdss)
    return calls


def test_gaia_fetch_store_content_and_cache(tmp_path, services):
    res = refcat.fetch(150.1, 2.2, 0.05, catalog="gaia_dr3", store=tmp_path, order=7)
    assert res["queried"] and res["n"] == 8
    assert "gaiadr3.gaia_source" in services["gaia"][0] and "CIRCLE('ICRS', 150.10000000, 2.20000000" in services["gaia"][0]
    catdir = tmp_path / "gaia_dr3"
    man = yaml.safe_load((catdir / "manifest.yaml").read_text())
    assert man["scheme"] == "healpix-nested" and man["order"] == 7 and man["source"] == "gaia_dr3"
    assert man["regions"] == [[150.1, 2.2, 0.05]]
    assert set(man["bands"]) == {"G", "BP", "RP"}
    shards = sorted(catdir.glob("hpx7_*.parquet"))
    assert [int(p.stem.split("_")[1]) for p in shards] == man["shards"]
    t = pd.concat([pd.read_parquet(p) for p in shards])
    for col in ("id", "ra", "dec", "ra_err", "dec_err", "pm_ra", "pm_dec", "epoch", "G_mag", "G_mag_err"):
        assert col in t.columns
    src = Table.read(DATA / "gaia_dr3_cone.vot", format="votable")
    t = t.set_index("id").loc[np.asarray(src["source_id"])]
    assert np.allclose(t["ra"], src["ra"]) and np.allclose(t["ra_err"], src["ra_error"])
    assert np.all(t["epoch"] == 2016.0)
    assert t["pm_ra"].iloc[-1] == 0.0  # masked (2-parameter solution) -> 0
    g_err = 2.5 / math.log(10) / np.asarray(src["phot_g_mean_flux_over_error"], float)
    assert np.allclose(t["G_mag_err"], g_err, rtol=1e-5)
    # every shard lies in the healpix pixel of its stars
    for p in shards:
        s = pd.read_parquet(p)
        assert np.all(refcat.healpix_pixels(s["ra"], s["dec"], 7) == int(p.stem.split("_")[1]))
    # second fetch of the same cone, or of a cone inside it: no query
    assert not refcat.fetch(150.1, 2.2, 0.05, catalog="gaia_dr3", store=tmp_path)["queried"]
    assert not refcat.fetch(150.11, 2.2, 0.02, catalog="gaia_dr3", store=tmp_path)["queried"]
    assert len(services["gaia"]) == 1
    # a cone reaching outside: queried again, stars not duplicated
    assert refcat.fetch(150.1, 2.2, 0.08, catalog="gaia_dr3", store=tmp_path)["queried"]
    assert len(refcat.load_region(catdir, 150.1, 2.2, 0.1)) == 8


def test_ps1_and_sdss_fetch(tmp_path, services):
    refcat.fetch(150.1, 2.2, 0.05, catalog="ps1", store=tmp_path)
    assert services["ps1"] == [("Panstarrs", "dr2", "mean")]
    t = refcat.load_region(tmp_path / "ps1", 150.1, 2.2, 0.1)
    src = Table.read(DATA / "ps1_dr2_mean_cone.ecsv", format="ascii.ecsv")
    assert len(t) == len(src)
    t = t.set_index("id").loc[np.asarray(src["objID"])]
    assert np.allclose(t["g_mag"], src["gMeanPSFMag"]) and np.allclose(t["r_mag_err"], src["rMeanPSFMagErr"])
    assert np.isnan(t["y_mag"].iloc[2])  # -999 = missing
    assert np.allclose(t["ra_err"], np.asarray(src["raMeanErr"]) * 1000.0)  # arcsec -> mas
    assert np.allclose(t["epoch"], 2000.0 + (56000.5 - 51544.5) / 365.25)
    refcat.fetch(150.1, 2.2, 0.05, catalog="sdss", store=tmp_path, name="sdss_dr16")
    assert "psfMag_r" in services["sdss"][0]
    s = refcat.load_region(tmp_path / "sdss_dr16", 150.1, 2.2, 0.1)
    assert len(s) == 5 and {"u_mag", "z_mag_err"} <= set(s.columns)


def test_proper_motion_propagation_is_analytic(tmp_path):
    """A star with pm (100, -50) mas/yr moves by exactly pm * dt; the catalog epoch is kept."""
    dec0 = 60.0
    t = pd.DataFrame({"id": [1, 2], "ra": [10.0, 10.001], "dec": [dec0, dec0], "pm_ra": [100.0, 0.0],
                      "pm_dec": [-50.0, 0.0], "epoch": [2016.0, 2016.0], "r_mag": [15.0, 16.0]})
    refcat.write_store(t, tmp_path, "pm", order=6)
    out = refcat.load_region(tmp_path / "pm", 10.0, dec0, 0.01, epoch=2026.0)
    star = out.set_index("id").loc[1]
    assert star["dec"] == pytest.approx(dec0 - 500.0 / 3.6e6, abs=1e-12)
    assert (star["ra"] - 10.0) * math.cos(math.radians(dec0)) * 3.6e6 == pytest.approx(1000.0, rel=1e-9)
    assert star["epoch"] == 2026.0 and star["epoch_cat"] == 2016.0 and star["ra_cat"] == 10.0
    assert out.set_index("id").loc[2, "ra"] == 10.001


def test_ingest_simulator_refcat_and_load_region(tmp_path):
    """`surveyred refcat ingest` converts the simulator's truth table; cone selection is exact."""
    from surveyred.cli import main as cli

    rng = np.random.default_rng(2)
    n = 400
    sim = pd.DataFrame({"id": np.arange(n, dtype=np.int64), "ra": 150.1 + rng.uniform(-1, 1, n),
                        "dec": 2.2 + rng.uniform(-1, 1, n), **{b: rng.uniform(14, 24, n) for b in "ugrizy"},
                        "pm_ra": 0.0, "pm_dec": 0.0, "epoch": 2016.0, "bright": False})
    path = tmp_path / "refcat.parquet"
    sim.to_parquet(path)
    assert cli(["refcat", "ingest", str(path), "--name", "sim", "--store", str(tmp_path / "store")]) == 0
    man = refcat.read_manifest(tmp_path / "store" / "sim")
    assert man["complete"] == man["shards"] and len(man["shards"]) > 4
    out = refcat.load_region(tmp_path / "store" / "sim", 150.1, 2.2, 0.5)
    d = refcat.angular_distance(150.1, 2.2, sim["ra"], sim["dec"])
    assert sorted(out["id"]) == sorted(sim["id"][d <= 0.5])
    assert np.allclose(out.set_index("id").loc[out["id"], "r_mag"], sim.set_index("id").loc[out["id"], "r"])
    # the store covers the region: fetch makes no query (no network needed)
    assert refcat.covered(tmp_path / "store" / "sim", 150.1, 2.2, 0.3)
    with pytest.raises(ConfigError, match="manifest"):
        refcat.load_region(tmp_path / "nothing", 150.1, 2.2, 0.1)
    # empty region: empty table with the store columns
    empty = refcat.load_region(tmp_path / "store" / "sim", 10.0, -40.0, 0.1, epoch=2024.0)
    assert len(empty) == 0 and "g_mag" in empty.columns


def test_simulator_writes_its_store(tiny_survey):
    man = refcat.read_manifest(tiny_survey / "refcat" / "sim")
    truth = pd.read_parquet(tiny_survey / "truth" / "refcat.parquet")
    t = refcat.load_region(tiny_survey / "refcat" / "sim", 150.1, 2.2, 1.0)
    assert man["source"] == "sim" and len(t) == len(truth)
    assert np.allclose(t.set_index("id").loc[truth["id"], "g_mag"], truth["g"])
