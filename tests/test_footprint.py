"""Patches per exposure before any pixel is processed (surveyred.footprint).

The workflow assigns each exposure to the patches it touches from the header-WCS
corners that ingest records; the assignment must contain every patch the
exposure's *true* footprint touches (otherwise a coadd would silently miss
data), and must not degenerate into "every patch".
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from surveyred import ingest
from surveyred.errors import ConfigError
from surveyred.footprint import field_tracts, skymap_config, visit_patches
from surveyred.skymap import SkymapConfig, patches_for_exposure
from surveyred.sky import tan_deproject

#: a fine grid (80"-wide patches) so that the test discriminates
FINE = SkymapConfig(pixel_scale=0.4, patch_size=200, patch_overlap=10, n_patches=12)


@pytest.fixture(scope="module")
def tiny_inventory(tiny_survey, tmp_path_factory):
    out = tmp_path_factory.mktemp("footprint")
    status = ingest.main([str(tiny_survey / "raw"), "--instrument", "simcam",
                          "--output", str(out / "inv.parquet"), "--rejects", str(out / "rej.parquet")])
    assert status == 0
    return pd.read_parquet(out / "inv.parquet")


def test_header_corners_recorded_for_science_not_for_bias(tiny_inventory):
    sci = tiny_inventory[tiny_inventory.obstype == "science"]
    bias = tiny_inventory[tiny_inventory.obstype == "bias"]
    assert all(np.all(np.isfinite(np.asarray(c, float))) for c in sci.corner_ra)
    assert all(np.all(np.isnan(np.asarray(c, float))) for c in bias.corner_ra)


def test_predicted_patches_contain_every_patch_of_the_true_footprint(tiny_survey, tiny_inventory):
    sci = tiny_inventory[tiny_inventory.obstype == "science"]
    tracts = field_tracts(sci, FINE)
    (tract,) = tracts.values()
    predicted = visit_patches(sci, tracts, margin_arcsec=60.0)
    truth = pd.read_parquet(tiny_survey / "truth" / "exposures.parquet")
    truth = truth[truth.obstype == "science"]
    n_total = FINE.n_patches ** 2
    for (night, visit), rows in truth.groupby(["night", "visit"]):
        true_patches = set()
        for row in rows.itertuples():
            header = fits.Header.fromstring(row.wcs_true, sep="\n")
            wcs = WCS(header)
            true_patches |= set(patches_for_exposure(tract, wcs, (header["NAXIS2"], header["NAXIS1"])))
        tid, pids = predicted[(str(night), str(visit))]
        assert tid == tract.id
        missing = true_patches - set(pids)
        assert not missing, f"visit {visit}: true footprint touches {sorted(missing)}, not predicted"
        # the prediction adds at most the margin's ring: far from all patches
        assert len(true_patches) < len(pids) < 0.75 * n_total


def _synthetic(rows):
    cols = ["night", "visit", "detector", "band", "object", "ra", "dec", "corner_ra", "corner_dec"]
    return pd.DataFrame(rows, columns=cols)


def _square(ra0, dec0, half_arcsec):
    h = half_arcsec / 3600.0
    ra, dec = tan_deproject(np.array([-h, h, h, -h]), np.array([-h, -h, h, h]), ra0, dec0)
    return list(np.atleast_1d(ra)), list(np.atleast_1d(dec))


def test_exposures_in_different_corners_touch_different_patches():
    geo = SkymapConfig(pixel_scale=1.0, patch_size=100, patch_overlap=5, n_patches=4)
    # tract centred on (10, 0) after rounding; one exposure per quadrant plus one at the centre
    rows = []
    offsets = {"ne": (150, 150), "sw": (-150, -150), "c": (0, 0)}
    for visit, (dx, dy) in offsets.items():
        ra0, dec0 = tan_deproject(np.array([-dx / 3600.0]), np.array([dy / 3600.0]), 10.0, 0.0)
        cra, cdec = _square(float(ra0[0]), float(dec0[0]), 20.0)
        rows.append(["20240101", visit, 0, "r", "F", float(ra0[0]), float(dec0[0]), cra, cdec])
    sci = _synthetic(rows)
    tracts = field_tracts(sci, geo, [{"field": "F", "id": 7, "ra": 10.0, "dec": 0.0}])
    assert tracts["F"].id == 7
    got = visit_patches(sci, tracts, margin_arcsec=0.0)
    # tract pixel x grows to the east-west flip: +dx (west in xi) -> larger x; y with dec
    assert got[("20240101", "c")][1] == ["1,1", "2,1", "1,2", "2,2"]
    assert got[("20240101", "ne")][1] == ["3,3"]
    assert got[("20240101", "sw")][1] == ["0,0"]
    # a margin grows the footprint into the neighbours
    grown = visit_patches(sci, tracts, margin_arcsec=30.0)
    assert set(got[("20240101", "ne")][1]) < set(grown[("20240101", "ne")][1])


def test_missing_header_wcs_falls_back_to_the_boresight_and_far_fields_touch_nothing():
    geo = SkymapConfig(pixel_scale=1.0, patch_size=100, patch_overlap=5, n_patches=4)
    nan = [math.nan] * 4
    rows = [["20240101", "a", 0, "r", "F", 10.0, 0.0, nan, nan]]
    sci = _synthetic(rows)
    tracts = field_tracts(sci, geo)
    # the boresight is the tract centre, on the corner of the four central patches
    assert visit_patches(sci, tracts, margin_arcsec=0.0)[("20240101", "a")][1] == ["1,1", "2,1", "1,2", "2,2"]
    far = _synthetic([["20240101", "b", 0, "r", "F", 190.0, 0.0, nan, nan]])
    assert visit_patches(far, tracts, margin_arcsec=0.0)[("20240101", "b")][1] == []


def test_tract_centres_are_rounded_stable_and_pins_are_validated():
    geo = SkymapConfig(pixel_scale=1.0, patch_size=100, patch_overlap=5, n_patches=4)
    nan = [math.nan] * 4
    rows = [["20240101", str(i), 0, "r", "F", 10.0 + 0.001 * i, 0.2 + 0.001 * i, nan, nan] for i in range(5)]
    t1 = field_tracts(_synthetic(rows), geo)["F"]
    t2 = field_tracts(_synthetic(rows[:4]), geo)["F"]
    assert (t1.ra, t1.dec) == (t2.ra, t2.dec) == (10.0, 0.2)
    with pytest.raises(ConfigError, match="field, id, ra and dec"):
        field_tracts(_synthetic(rows), geo, [{"field": "F", "id": 1}])
    with pytest.raises(ConfigError):
        skymap_config({"pixel_scale": 0.2, "patch_size": 100, "patch_overlap": 60})
