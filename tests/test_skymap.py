"""Tests of the skymap: tract/patch geometry, overlap, stable ids, exposure -> patches."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS

from surveyred.errors import ConfigError
from surveyred.skymap import SkymapConfig, make_tracts, patches_for_exposure

CFG = SkymapConfig(pixel_scale=0.2, patch_size=1000, patch_overlap=50, n_patches=4)


def exposure_wcs(tract, x, y, shape, *, rot=0.0, scale=0.2, sip=False):
    """An exposure WCS whose pixel centre lies at tract pixel (x, y)."""
    ra, dec = tract.wcs.pixel_to_world_values(x, y)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [float(ra), float(dec)]
    w.wcs.crpix = [(shape[1] + 1) / 2, (shape[0] + 1) / 2]
    c, s = np.cos(np.radians(rot)), np.sin(np.radians(rot))
    w.wcs.cd = scale / 3600 * np.array([[-c, s], [s, c]])
    if sip:
        from astropy.wcs import Sip

        a = np.zeros((4, 4))
        b = np.zeros((4, 4))
        a[3, 0] = 4e-7  # strong pincushion-like distortion: +3.2 px at the edges of 400 px
        b[0, 3] = 4e-7
        w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.wcs.set()
    return w


@pytest.fixture(scope="module")
def tract():
    return make_tracts([(150.1, 2.2)], config=CFG)[0]


def test_tract_geometry(tract):
    assert tract.id == 0 and tract.shape == (4000, 4000)
    # tangent point at the tract centre, north up, east left, 0.2"/px
    ra, dec = tract.wcs.pixel_to_world_values(1999.5, 1999.5)
    assert ra == pytest.approx(150.1, abs=1e-10) and dec == pytest.approx(2.2, abs=1e-10)
    r2, d2 = tract.wcs.pixel_to_world_values(1999.5, 2999.5)
    assert d2 - dec == pytest.approx(1000 * 0.2 / 3600, rel=1e-6)
    r3, _ = tract.wcs.pixel_to_world_values(2999.5, 1999.5)
    assert r3 < ra
    assert len(tract.patch_ids) == 16 and tract.patch_ids[0] == "0,0" and tract.patch_ids[5] == "1,1"


def test_patch_boxes_overlap_and_common_grid(tract):
    p = tract.patch("1,2")
    assert p.id == "1,2" and p.tract_id == 0
    assert (p.inner.x0, p.inner.y0, p.inner.x1, p.inner.y1) == (1000, 2000, 2000, 3000)
    assert (p.outer.x0, p.outer.y0, p.outer.x1, p.outer.y1) == (950, 1950, 2050, 3050)
    assert p.shape == (1100, 1100)
    # the patch grid is the tract grid shifted: same sky at corresponding pixels
    for tx, ty in [(950.0, 1950.0), (1500.3, 2400.7), (2049.0, 3049.0)]:
        a = tract.wcs.pixel_to_world_values(tx, ty)
        b = p.wcs.pixel_to_world_values(tx - p.outer.x0, ty - p.outer.y0)
        assert np.allclose(a, b, atol=1e-12, rtol=0)
    # neighbours share 2 * overlap pixels; inner boxes tile the tract without overlap
    q = tract.patch("2,2")
    assert p.outer.x1 - q.outer.x0 == 2 * CFG.patch_overlap
    assert p.inner.x1 == q.inner.x0
    cover = np.zeros(tract.shape, np.int16)
    for patch in tract.patches():
        cover[patch.inner.slices] += 1
    assert np.all(cover == 1)


def test_ids_are_stable():
    t1 = make_tracts({7: (10.0, -30.0), 3: (150.1, 2.2)}, config=CFG)
    t2 = make_tracts({3: (150.1, 2.2), 7: (10.0, -30.0)}, config=CFG)
    assert [t.id for t in t1] == [3, 7] == [t.id for t in t2]
    assert t1[0].patch_ids == t2[0].patch_ids
    assert t1[0].patch("3,1").wcs.to_header() == t2[0].patch("3,1").wcs.to_header()
    # same inputs -> same tract WCS; independent of other fields
    t3 = make_tracts({3: (150.1, 2.2)}, config=CFG)
    assert t3[0].wcs.to_header() == t1[0].wcs.to_header()


def test_config_validation():
    with pytest.raises(ConfigError, match="patch_overlap"):
        SkymapConfig(patch_size=100, patch_overlap=60).validate()
    with pytest.raises(ConfigError, match="pixel_scale"):
        SkymapConfig(pixel_scale=0).validate()
    with pytest.raises(ConfigError, match="not a sky position"):
        make_tracts([(10.0, 95.0)], config=CFG)


def test_exposure_inside_one_patch(tract):
    shape = (300, 400)
    w = exposure_wcs(tract, 1500.0, 2500.0, shape)  # centre of patch 1,2; 400 px wide
    assert patches_for_exposure(tract, w, shape) == ["1,2"]


def test_exposure_straddling_four(tract):
    shape = (300, 400)
    w = exposure_wcs(tract, 2000.0, 2000.0, shape, rot=30.0)
    assert patches_for_exposure(tract, w, shape) == ["1,1", "2,1", "1,2", "2,2"]


def test_exposure_outside(tract):
    shape = (300, 400)
    w = exposure_wcs(tract, 6000.0, 2000.0, shape)
    assert patches_for_exposure(tract, w, shape) == []
    # another side of the sky (no gnomonic projection)
    far = exposure_wcs(tract, 2000.0, 2000.0, shape)
    far.wcs.crval = [330.0, -2.2]
    far.wcs.set()
    assert patches_for_exposure(tract, far, shape) == []


def test_overlap_region_counts(tract):
    shape = (60, 60)
    # inside patch 1,1's inner box but within the overlap of patch 2,1 (x in 1950..2000)
    w = exposure_wcs(tract, 1970.0, 1500.0, shape)
    assert patches_for_exposure(tract, w, shape) == ["1,1", "2,1"]
    # just beyond the overlap of 2,1 (x max = 1880 + 30 < 1949.5)
    w = exposure_wcs(tract, 1880.0, 1500.0, shape)
    assert patches_for_exposure(tract, w, shape) == ["1,1"]
    # margin widens the test
    assert patches_for_exposure(tract, w, shape, margin=50) == ["1,1", "2,1"]


def test_rotated_exposure_corner_only(tract):
    # a 45-deg rotated square whose bounding box reaches patch 2,2 but whose outline does not
    shape = (400, 400)
    w = exposure_wcs(tract, 1800.0, 1800.0, shape, rot=45.0)
    ids = patches_for_exposure(tract, w, shape)
    # diamond with half-diagonal 283 px centred at 1800: reaches x = 2083 on the row y=1800 only
    assert "2,1" in ids and "1,2" in ids and "1,1" in ids
    assert "2,2" not in ids  # corner (1950, 1950) lies outside the diamond (|dx|+|dy| = 300 > 283)


def test_distorted_exposure(tract):
    shape = (400, 400)
    # with distortion the edges move outwards by 4e-7 * 200^3 = 3.2 px
    w = exposure_wcs(tract, 1500.0, 1500.0, shape, sip=True)
    xs = np.array([-0.5, 399.5])
    tx, _ = tract.wcs.world_to_pixel_values(*w.pixel_to_world_values(xs, np.array([-0.5, -0.5])))
    assert tx[1] - tx[0] > 400.5
    assert patches_for_exposure(tract, w, shape) == ["1,1"]
    # moved so that only the distorted edge reaches into patch 2,1's overlap (x >= 1949.5)
    edge = float(tx[1] - 1500.0)
    w2 = exposure_wcs(tract, 1949.0 - edge + 0.8, 1500.0, shape, sip=True)
    assert patches_for_exposure(tract, w2, shape) == ["1,1", "2,1"]
    w3 = exposure_wcs(tract, 1949.0 - edge - 0.8, 1500.0, shape, sip=True)
    assert patches_for_exposure(tract, w3, shape) == ["1,1"]
