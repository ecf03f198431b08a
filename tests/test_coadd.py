"""Tests of coadd assembly: kernel vs reference, weighting, sqrt(N), artifacts, streaming."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS

from surveyred import masks
from surveyred.coadd import (
    ArrayWarp,
    CoaddConfig,
    coadd,
    select_best_seeing,
    write_coadd,
)
from surveyred.errors import ConfigError, InsufficientData
from surveyred.kernels.stack import stack_band, stack_band_ref
from surveyred.warp import Warp, write_warp

SHAPE = (160, 180)
SIGMA = 2.0  # per-pixel noise of one warp


def scene(shape=SHAPE, seed=0, nstars=25):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[0], : shape[1]]
    img = np.zeros(shape)
    for _ in range(nstars):
        x0, y0 = rng.uniform(10, shape[1] - 10), rng.uniform(10, shape[0] - 10)
        flux = rng.uniform(200, 5000)
        img += flux * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * 1.5**2)) / (2 * np.pi * 1.5**2)
    return img


def noisy_warps(truth, n, seed=1, sigma=SIGMA):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = (truth + rng.normal(0, sigma, truth.shape)).astype(np.float32)
        out.append(ArrayWarp(img, np.full(truth.shape, sigma**2, np.float32), np.zeros(truth.shape, np.int32)))
    return out


def add_trail(img, amplitude, width=1.3, slope=0.37, intercept=20.0):
    y, x = np.mgrid[: img.shape[0], : img.shape[1]]
    d = (y - (slope * x + intercept)) / np.hypot(1, slope)
    img += (amplitude * np.exp(-0.5 * (d / width) ** 2)).astype(img.dtype)
    return np.abs(d) < 2 * width


# -- kernel ------------------------------------------------------------------------------

@pytest.mark.parametrize("pixel_weights", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_stack_kernel_matches_reference(pixel_weights, threads):
    rng = np.random.default_rng(4)
    n, rows, nx = 9, 20, 30
    img = rng.normal(100, 3, (n, rows, nx)).astype(np.float32)
    var = rng.uniform(4, 16, (n, rows, nx)).astype(np.float32)
    msk = np.zeros((n, rows, nx), np.int32)
    img[rng.random(img.shape) < 0.05] += 200
    msk[rng.random(img.shape) < 0.05] |= masks.NO_DATA
    msk[rng.random(img.shape) < 0.03] |= masks.CLIPPED
    msk[rng.random(img.shape) < 0.05] |= masks.SUSPECT
    msk[:, 0, 0] = masks.NO_DATA
    img[2, 3, 4] = np.nan
    w = rng.uniform(0.5, 2.0, n)
    kw = dict(weights=w, pixel_weights=pixel_weights, bad_mask=masks.NO_DATA | masks.CLIPPED,
              clip_sigma=3.0, maxiters=5, mismatch=0.01)
    k = stack_band(img, var, msk, threads=threads, **kw)
    r = stack_band_ref(img, var, msk, **kw)
    np.testing.assert_allclose(k[0], r[0], rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(k[1], r[1], rtol=1e-5, equal_nan=True)
    for a, b in zip(k[2:], r[2:]):
        np.testing.assert_array_equal(a, b)
    assert k[2][0, 0] == masks.NO_DATA and k[3][0, 0] == 0 and np.isnan(k[0][0, 0])
    assert (k[2] & masks.CLIPPED).any() and (k[2] & masks.SUSPECT).any()
    k1 = stack_band(img, var, msk, threads=1, **kw)
    for a, b in zip(k, k1):
        np.testing.assert_array_equal(a, b)


# -- weighting and selection ---------------------------------------------------------------

@pytest.mark.parametrize("weighting", ["input", "pixel"])
def test_inverse_variance_weighted_mean(weighting):
    shape = (20, 25)
    vals, variances = [10.0, 20.0, 40.0], [1.0, 4.0, 16.0]
    warps = [ArrayWarp(np.full(shape, v, np.float32), np.full(shape, s, np.float32), np.zeros(shape, np.int32))
             for v, s in zip(vals, variances)]
    cfg = CoaddConfig(weighting=weighting, do_clip=False, do_artifact_rejection=False)
    res = coadd(warps, config=cfg)
    w = 1.0 / np.array(variances)
    expect = (w * vals).sum() / w.sum()
    np.testing.assert_allclose(res.image, expect, rtol=1e-6)
    np.testing.assert_allclose(res.variance, 1.0 / w.sum(), rtol=1e-6)
    assert np.all(res.nimage == 3) and np.all(res.mask == 0)
    np.testing.assert_allclose(res.inputs["weight_fraction"], w / w.sum(), rtol=1e-6)
    np.testing.assert_allclose(res.inputs["weight"], w, rtol=1e-6)


def test_best_seeing_selection():
    fwhm = [1.0, 2.0, 0.8, 3.0, 1.5]
    sel = select_best_seeing(fwhm, 0.4)
    np.testing.assert_array_equal(sel, [True, False, True, False, False])
    assert select_best_seeing(fwhm, 0.01).sum() == 1
    assert select_best_seeing([1.0, np.nan, 2.0], 1.0).tolist() == [True, False, True]
    shape = (10, 10)
    warps = [ArrayWarp(np.full(shape, float(k), np.float32), np.ones(shape, np.float32), np.zeros(shape, np.int32))
             for k in range(5)]
    res = coadd(warps, config=CoaddConfig(best_seeing_fraction=0.4, do_clip=False, do_artifact_rejection=False),
                psf_fwhm=fwhm)
    np.testing.assert_allclose(res.image, 1.0)  # mean of inputs 0 and 2
    assert res.inputs["selected"].tolist() == sel.tolist()
    assert res.inputs["n_used"].tolist() == [100, 0, 100, 0, 0]
    with pytest.raises(ConfigError, match="psf_fwhm"):
        coadd(warps, config=CoaddConfig(best_seeing_fraction=0.4))
    with pytest.raises(InsufficientData):
        coadd([])
    with pytest.raises(ConfigError, match="weighting"):
        CoaddConfig(weighting="median").validate()


# -- noise -----------------------------------------------------------------------------------

def test_noise_decreases_as_sqrt_n():
    truth = scene(nstars=0)
    warps = noisy_warps(truth, 16, seed=2)
    single = np.std(warps[0].image)
    for n in (4, 16):
        res = coadd(warps[:n])
        measured = np.std(res.image - truth)
        ratio = measured / single
        assert ratio == pytest.approx(1 / np.sqrt(n), rel=0.15)
        # the variance plane predicts it
        assert np.sqrt(np.median(res.variance)) == pytest.approx(measured, rel=0.05)
        # false clipping is rare with a 4-sigma noise clip
        assert np.mean(res.nimage == n) > 0.99


# -- artifacts ---------------------------------------------------------------------------------

def _artifact_case(band_rows=None, fits_dir=None):
    truth = scene(seed=3)
    warps = noisy_warps(truth, 8, seed=5)
    on_trail = add_trail(warps[3].image, amplitude=12 * SIGMA)
    cr = (slice(100, 102), slice(140, 143))
    warps[6].image[cr] += 60 * SIGMA
    if fits_dir is not None:
        wcs = WCS(naxis=2)
        paths = []
        for k, w in enumerate(warps):
            p = fits_dir / f"warp{k}.fits"
            write_warp(p, Warp(w.image, w.variance, w.mask, wcs, 1.0, 0.0, 16))
            paths.append(p)
        warps = paths
    res = coadd(warps, config=CoaddConfig(band_rows=band_rows))
    return truth, res, on_trail, cr


def test_satellite_trail_and_cosmic_ray_rejected():
    truth, res, on_trail, cr = _artifact_case()
    chi = (res.image - truth) / np.sqrt(res.variance)
    # the trail's integrated residual is below 3 sigma; no pixel on it stands out beyond noise
    n_on = on_trail.sum()
    trail_sigma = chi[on_trail].mean() * np.sqrt(n_on)
    print(f"trail: {n_on} pixels, integrated residual {trail_sigma:.2f} sigma, max |chi| {np.abs(chi[on_trail]).max():.2f}")
    assert abs(trail_sigma) < 3.0
    assert np.max(np.abs(chi[on_trail])) < 4.5
    assert np.all(res.mask[on_trail] & masks.CLIPPED)
    assert np.all(res.nimage[on_trail] <= 7) and np.mean(res.nimage[on_trail] == 7) > 0.98
    assert np.max(np.abs(chi[cr])) < 3.0 and np.all(res.mask[cr] & masks.CLIPPED)
    t = res.inputs
    assert t["n_artifacts"][3] >= 1 and t["n_artifact_pixels"][3] >= on_trail.sum()
    assert t["n_artifacts"][6] >= 1
    # nothing else is flagged as an artifact: stars are in every warp
    others = [k for k in range(8) if k not in (3, 6)]
    assert all(t["n_artifacts"][k] == 0 for k in others)
    # elsewhere the coadd is clean
    assert abs(np.median(chi[~on_trail])) < 0.1 and np.std(chi[~on_trail]) < 1.1
    # without rejection and clipping the trail shows
    truth2 = scene(seed=3)
    warps = noisy_warps(truth2, 8, seed=5)
    add_trail(warps[3].image, amplitude=12 * SIGMA)
    plain = coadd(warps, config=CoaddConfig(do_clip=False, do_artifact_rejection=False))
    chi2 = (plain.image - truth2) / np.sqrt(plain.variance)
    assert chi2[on_trail].mean() * np.sqrt(n_on) > 20


def test_streaming_from_fits_matches_memory(tmp_path):
    # bands of 7 rows: the trail and the cosmic ray cross band edges
    _, mem, _, _ = _artifact_case(band_rows=None)
    _, disk, _, _ = _artifact_case(band_rows=7, fits_dir=tmp_path)
    np.testing.assert_array_equal(mem.image, disk.image)
    np.testing.assert_array_equal(mem.mask, disk.mask)
    np.testing.assert_array_equal(mem.nimage, disk.nimage)
    assert list(disk.inputs["name"]) == [f"warp{k}.fits" for k in range(8)]
    out = tmp_path / "coadd.fits"
    write_coadd(out, disk, WCS(naxis=2))
    from astropy.io import fits
    from astropy.table import Table

    with fits.open(out) as h:
        assert [x.name for x in h] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE", "NIMAGE", "INPUTS"]
        assert len(Table.read(h["INPUTS"])) == 8


def test_no_data_and_masks_propagate():
    shape = (30, 40)
    a = ArrayWarp(np.ones(shape, np.float32), np.ones(shape, np.float32), np.zeros(shape, np.int32))
    m = np.zeros(shape, np.int32)
    m[:, 20:] = masks.NO_DATA
    m[5, 5] = masks.SUSPECT
    m[6, 6] = masks.SAT  # bad plane: not used, bit not propagated
    b = ArrayWarp(np.full(shape, 3.0, np.float32), np.ones(shape, np.float32), m)
    res = coadd([a, b], config=CoaddConfig(do_clip=False, do_artifact_rejection=False))
    assert res.image[0, 0] == pytest.approx(2.0) and res.nimage[0, 0] == 2
    assert res.image[0, 30] == pytest.approx(1.0) and res.nimage[0, 30] == 1
    assert res.mask[5, 5] == masks.SUSPECT and res.mask[6, 6] == 0 and res.nimage[6, 6] == 1
    m2 = m.copy()
    m2[:, :] = masks.NO_DATA
    c = ArrayWarp(np.ones(shape, np.float32), np.ones(shape, np.float32), m2)
    res = coadd([b, c], config=CoaddConfig(do_clip=False, do_artifact_rejection=False))
    assert np.all(res.mask[:, 25] == masks.NO_DATA) and np.all(np.isnan(res.image[:, 25]))
    assert np.all(res.nimage[:, 25] == 0)


def test_noise_clip_option_removes_single_pixel_outliers():
    truth = scene(nstars=0)
    warps = noisy_warps(truth, 6, seed=7)
    warps[2].image[50, 60] += 15 * SIGMA  # one pixel: below artifact_min_pixels
    default = coadd(warps)
    assert default.nimage[50, 60] == 6  # not an artifact region, and no per-pixel clip by default
    clipped = coadd(warps, config=CoaddConfig(do_clip=True))
    assert clipped.nimage[50, 60] == 5 and clipped.mask[50, 60] & masks.CLIPPED
    assert clipped.inputs["n_clipped"][2] >= 1
    assert abs(clipped.image[50, 60] - truth[50, 60]) < 4 * np.sqrt(clipped.variance[50, 60])


def test_varying_seeing_does_not_bias_star_fluxes():
    """Stars in warps of different seeing are not clipped as artifacts (fluxes unbiased)."""
    rng = np.random.default_rng(0)
    shape = (200, 200)
    y, x = np.mgrid[: shape[0], : shape[1]]
    stars = [(rng.uniform(12, 188), rng.uniform(12, 188), 10 ** rng.uniform(3.5, 5.0)) for _ in range(30)]
    warps = []
    for s in rng.uniform(1.0, 2.2, 10):  # Gaussian sigma in px: FWHM varies by 2x
        t = sum(f * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * s**2)) / (2 * np.pi * s**2) for x0, y0, f in stars)
        var = t + 100.0
        warps.append(ArrayWarp((t + rng.normal(0, 1, shape) * np.sqrt(var)).astype(np.float32),
                               var.astype(np.float32), np.zeros(shape, np.int32)))
    res = coadd(warps)
    plain = coadd(warps, config=CoaddConfig(do_artifact_rejection=False))
    r = 8.0
    ratios = []
    for x0, y0, f in stars:
        ap = (x - x0) ** 2 + (y - y0) ** 2 <= r**2
        ratios.append(np.nansum(res.image[ap]) / np.nansum(plain.image[ap]))
    print(f"seeing: median coadd/plain-mean flux ratio {np.median(ratios):.5f}, "
          f"artifact regions {int(res.inputs['n_artifacts'].sum())}")
    assert abs(np.median(ratios) - 1) < 0.002 and np.min(ratios) > 0.99


# -- real frames: 2MASS M17 Ks tiles -------------------------------------------------------------

@pytest.mark.real
def test_2mass_tiles_skymap_warp_and_coadd(shared_real_dir):
    """Skymap -> patches per tile -> warps -> coadd of the real overlapping 2MASS tiles."""
    import warnings

    from astropy.io import fits

    from surveyred.skymap import SkymapConfig, make_tracts, patches_for_exposure
    from surveyred.warp import warp_exposure

    files = sorted((shared_real_dir / "twomass_m17_ks").glob("*.fits.gz"))
    tract = make_tracts([(275.19, -16.14)], config=SkymapConfig(pixel_scale=1.0, patch_size=500,
                                                                 patch_overlap=25, n_patches=5))[0]
    tiles = []
    for f in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(f) as h:
                data = h[0].data.astype(np.float32)
                hdr = h[0].header
                wcs = WCS(hdr)
        tiles.append((f.name, data - np.float32(hdr["SKYVAL"]), float(hdr["SKYSIG"]), float(hdr["MAGZP"]), wcs))
    lists = {name: patches_for_exposure(tract, wcs, data.shape) for name, data, _, _, wcs in tiles}
    # every tile touches a 2 x 3 block of patches; the listing is exact: a warp onto a listed
    # patch has data, onto any other patch none
    name, data, noise, zp, wcs = tiles[0]
    var = np.full(data.shape, noise**2, np.float32)
    msk = np.zeros(data.shape, np.int32)
    for pid in tract.patch_ids:
        p = tract.patch(pid)
        w = warp_exposure(data, var, msk, wcs, p.wcs, p.shape)
        has = bool(np.any((w.mask & masks.NO_DATA) == 0))
        assert has == (pid in lists[name]), pid
    # the coadd of patch 3,2 from the tiles that touch it, on a common zero-point
    patch = tract.patch("3,2")
    inputs = [t for t in tiles if "3,2" in lists[t[0]]]
    assert len(inputs) == 4
    warps = []
    for name, data, noise, zp, wcs in inputs:
        var = np.full(data.shape, noise**2, np.float32)
        w = warp_exposure(data, var, np.zeros(data.shape, np.int32), wcs, patch.wcs, patch.shape,
                          zp_exposure=zp, zp_common=20.0)
        warps.append(ArrayWarp(w.image, w.variance, w.mask, name=name))
    res = coadd(warps)
    valid = [(w.mask & masks.NO_DATA) == 0 for w in warps]
    n_valid = np.sum(valid, axis=0)
    assert n_valid.max() >= 2
    # n-image map: every covered pixel has data; overlaps have several inputs
    assert np.all(res.nimage[n_valid > 0] >= 1)
    assert np.all((res.mask[n_valid == 0] & masks.NO_DATA) != 0)
    assert np.all(res.nimage <= n_valid)
    # where two tiles overlap, the warps agree within the noise (median difference of the sky-subtracted images)
    pairs = [(i, k) for i in range(4) for k in range(i + 1, 4) if (valid[i] & valid[k]).sum() > 5000]
    a, b = pairs[0]
    both = valid[a] & valid[b] & (res.mask & masks.CLIPPED == 0)
    d = warps[a].image[both] - warps[b].image[both]
    sig = np.sqrt(warps[a].variance[both] + warps[b].variance[both])
    z = d / sig
    offset = float(np.median(z))
    spread = float(1.4826 * np.median(np.abs(z - offset)))
    print(f"2MASS coadd: {len(inputs)} tiles on patch 3,2, overlap of {both.sum()} px between "
          f"{inputs[a][0]} and {inputs[b][0]}: median difference {offset:+.3f} sigma, robust scatter "
          f"{spread:.3f} sigma; max n-image {res.nimage.max()}, "
          f"artifact regions {int(res.inputs['n_artifacts'].sum())}")
    # measured +0.65 sigma (the tiles' SKYVAL sky levels differ by ~3 ADU under the nebula) and a
    # scatter of 0.027 sigma: overlapping Atlas tiles are resampled from the same survey frames, so
    # their noise is shared and two differently placed tiles warped onto one grid must agree far
    # better than their noise: a test of the warps' registration and flux scaling
    assert abs(offset) < 1.0
    assert spread < 0.06
    # the coadd lies between the inputs: weighted mean where nothing was clipped
    clean = both & (res.nimage == 2) & (n_valid == 2)
    wa, wb = res.inputs["weight"][a], res.inputs["weight"][b]
    expect = (wa * warps[a].image[clean] + wb * warps[b].image[clean]) / (wa + wb)
    np.testing.assert_allclose(res.image[clean], expect, rtol=1e-4, atol=1e-3)
