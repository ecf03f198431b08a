"""Tests of the numba pixel kernels against their NumPy references and analytic truths."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from surveyred import masks
from surveyred.errors import CorruptInput, InsufficientData
from surveyred.kernels import (
    clipped_mean,
    combine_files_chunked,
    find_cosmic_rays,
    isr_amp,
    row_statistic,
)
from surveyred.kernels.combine import clipped_mean_ref
from surveyred.kernels.cosmic import find_cosmic_rays_ref
from surveyred.kernels.isr import isr_amp_ref
from surveyred.kernels.overscan import row_statistic_ref

STATS = ("mean", "median", "clipped_mean")


# -- row_statistic ------------------------------------------------------------------

def _overscan_region(seed=0, ny=120, ncol=32):
    rng = np.random.default_rng(seed)
    region = rng.normal(1000.0, 4.0, (ny, ncol))
    region[rng.random(region.shape) < 0.02] += rng.uniform(50, 500)  # hot / CR pixels
    region[rng.random(region.shape) < 0.02] = np.nan
    region[3] = np.nan  # row with no finite value
    region[4] = 1000.25  # constant row
    region[5, :-1] = np.nan  # one finite value
    region[5, -1] = 1003.0
    region[6, 2] = np.inf
    return region


@pytest.mark.parametrize("stat", STATS)
@pytest.mark.parametrize("ncol", [7, 32, 80])
def test_row_statistic_matches_reference(stat, ncol):
    region = _overscan_region(ncol=ncol)
    ref = row_statistic_ref(region, stat=stat, nsigma=2.5, maxiters=4)
    for threads in (1, 2):
        got = row_statistic(region, stat=stat, nsigma=2.5, maxiters=4, threads=threads)
        assert got.dtype == np.float64 and got.shape == (region.shape[0],)
        np.testing.assert_allclose(got, ref, rtol=1e-12, equal_nan=True)
    assert np.isnan(got[3])
    assert got[4] == 1000.25
    assert got[5] == region[5, -1]


@pytest.mark.parametrize("stat", STATS)
def test_row_statistic_thread_count_independent(stat):
    region = _overscan_region(seed=3, ny=2000)
    a = row_statistic(region, stat=stat, threads=1)
    b = row_statistic(region, stat=stat, threads=2)
    assert np.array_equal(a, b, equal_nan=True)


def test_row_statistic_known_rows():
    region = np.array([[1, 2, 3, 4, 100], [5, 1, 4, 2, 3], [np.nan, 7, 1, 3, 9]], dtype=np.float32)
    np.testing.assert_array_equal(row_statistic(region, stat="median"), [3.0, 3.0, 5.0])
    np.testing.assert_allclose(row_statistic(region, stat="mean"), [22.0, 3.0, 5.0])
    # integer input is accepted
    assert row_statistic(np.array([[2, 4, 6]], dtype=np.uint16))[0] == 4.0


def test_row_statistic_clipped_mean_rejects_outlier():
    rng = np.random.default_rng(7)
    rest = rng.normal(500.0, 3.0, 31)
    row = np.concatenate([rest[:10], [5000.0], rest[10:]])[None, :]
    got = row_statistic(row, stat="clipped_mean", nsigma=3.0, maxiters=5)[0]
    kept = rest[np.abs(rest - np.median(rest)) <= 3 * rest.std()]
    assert got == pytest.approx(kept.mean(), rel=1e-12)
    assert abs(got - 500.0) < 3.0
    assert row_statistic(row, stat="mean")[0] > 600


def test_row_statistic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="2-D"):
        row_statistic(np.zeros(5))
    with pytest.raises(ValueError, match="stat must be one of"):
        row_statistic(np.zeros((2, 3)), stat="mode")
    with pytest.raises(ValueError, match="nsigma"):
        row_statistic(np.zeros((2, 3)), stat="clipped_mean", nsigma=0)


# -- clipped_mean ---------------------------------------------------------------------

def _stack(seed=0, n=9, ny=40, nx=33):
    rng = np.random.default_rng(seed)
    stack = rng.normal(1000.0, 5.0, (n, ny, nx)).astype(np.float32)
    hits = rng.random(stack.shape) < 0.01
    stack[hits] += rng.uniform(30, 3000, hits.sum()).astype(np.float32)
    stack[rng.random(stack.shape) < 0.03] = np.nan
    stack[:, 0, 0] = np.nan  # all-NaN pixel
    stack[:, 0, 1] = 7.5  # constant pixel
    stack[: n - 1, 0, 2] = np.nan  # single finite value
    stack[0, 0, 3] = np.inf
    return stack


def _assert_combine_close(got, ref):
    mean, count, std = got
    rmean, rcount, rstd = ref
    assert mean.dtype == np.float32 and count.dtype == np.int16 and std.dtype == np.float32
    np.testing.assert_array_equal(count, rcount)
    np.testing.assert_allclose(mean, rmean, rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(std, rstd, rtol=1e-5, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("center", ["median", "mean"])
@pytest.mark.parametrize("n", [1, 2, 9, 25])
def test_clipped_mean_matches_reference(center, n):
    stack = _stack(seed=n, n=n)
    kw = dict(low=2.5, high=3.0, maxiters=5, center=center)
    ref = clipped_mean_ref(stack, **kw)
    for threads in (1, 2):
        _assert_combine_close(clipped_mean(stack, threads=threads, **kw), ref)
    mean, count, std = clipped_mean(stack, **kw)
    assert np.isnan(mean[0, 0]) and count[0, 0] == 0 and np.isnan(std[0, 0])
    assert mean[0, 1] == 7.5 and count[0, 1] == n and std[0, 1] == 0.0
    assert count[0, 2] == 1 and std[0, 2] == 0.0


def test_clipped_mean_with_scales_matches_reference():
    stack = _stack(seed=11, n=7)
    scales = np.array([1.0, 2.0, 0.5, 1.5, 3.0, 0.8, 1.1])
    stack *= scales[:, None, None].astype(np.float32)
    ref = clipped_mean_ref(stack, scales=scales)
    got = clipped_mean(stack, scales=scales, threads=2)
    _assert_combine_close(got, ref)
    assert np.nanmedian(got[0]) == pytest.approx(1000.0, abs=2.0)


def test_clipped_mean_maxiters_zero_is_nanmean():
    stack = _stack(seed=5, n=6)
    stack[np.isinf(stack)] = np.nan
    mean, count, _std = clipped_mean(stack, maxiters=0)
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        np.testing.assert_allclose(mean, np.nanmean(stack.astype(np.float64), axis=0), rtol=1e-6)
    np.testing.assert_array_equal(count, np.isfinite(stack).sum(axis=0))


def test_clipped_mean_rejects_injected_outlier():
    rng = np.random.default_rng(2)
    rest = rng.normal(200.0, 2.0, (20, 3, 4)).astype(np.float32)
    stack = np.concatenate([rest[:5], np.full((1, 3, 4), 1e4, np.float32), rest[5:]])
    mean, count, std = clipped_mean(stack)
    r64 = rest.astype(np.float64)
    # the outlier goes, nothing of the Gaussian rest is within 3 sigma of being clipped
    assert (np.abs(r64 - np.median(r64, axis=0)) < 3 * r64.std(axis=0)).all()
    np.testing.assert_array_equal(count, 20)
    np.testing.assert_allclose(mean, r64.mean(axis=0), rtol=1e-7)
    np.testing.assert_allclose(std, r64.std(axis=0), rtol=1e-6)


def test_clipped_mean_thread_count_independent():
    stack = _stack(seed=9, n=15, ny=300, nx=64)
    a = clipped_mean(stack, threads=1)
    b = clipped_mean(stack, threads=2)
    for x, y in zip(a, b):
        assert np.array_equal(x, y, equal_nan=True)


def test_clipped_mean_rejects_bad_arguments():
    with pytest.raises(ValueError, match="3-D"):
        clipped_mean(np.zeros((4, 5)))
    with pytest.raises(InsufficientData):
        clipped_mean(np.zeros((0, 4, 5)))
    with pytest.raises(ValueError, match="scales must have shape"):
        clipped_mean(np.zeros((3, 4, 5)), scales=[1.0, 2.0])
    with pytest.raises(ValueError, match="finite and non-zero"):
        clipped_mean(np.zeros((2, 4, 5)), scales=[1.0, 0.0])
    with pytest.raises(ValueError, match="center"):
        clipped_mean(np.zeros((2, 4, 5)), center="mode")
    with pytest.raises(ValueError, match="positive"):
        clipped_mean(np.zeros((2, 4, 5)), low=0)


# -- combine_files_chunked -------------------------------------------------------------

def _write_stack(tmp_path, stack, *, as_int=False):
    paths = []
    for i, frame in enumerate(stack):
        path = tmp_path / f"frame{i:02d}.fits"
        if as_int:
            hdu = fits.ImageHDU(np.round(frame).astype(np.int16), name="SCI")
            hdu.scale("int16", bzero=0, bscale=1)
        else:
            hdu = fits.ImageHDU(frame, name="SCI")
        fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("chunk_rows", [1, 7, 64])
def test_combine_files_chunked_equals_in_memory(tmp_path, chunk_rows):
    stack = _stack(seed=4, n=6, ny=37, nx=23)
    paths = _write_stack(tmp_path, stack)
    scales = np.linspace(0.5, 1.5, 6)
    got = combine_files_chunked(paths, hdu="SCI", chunk_rows=chunk_rows, scales=scales, threads=2)
    want = clipped_mean(stack, scales=scales)
    for a, b in zip(got, want):
        assert np.array_equal(a, b, equal_nan=True)


def test_combine_files_chunked_preprocess_hook(tmp_path):
    rng = np.random.default_rng(8)
    level = rng.normal(1000, 10, (5, 30, 1))
    raw = (level + rng.normal(0, 3, (5, 30, 20))).round()
    paths = _write_stack(tmp_path, raw, as_int=True)
    seen = []

    def preprocess(i, rows, block):
        seen.append((i, rows.start, rows.stop))
        over = np.median(block[:, 16:], axis=1, keepdims=True)  # 4 overscan columns
        return block[:, :16] - over

    got = combine_files_chunked(paths, hdu=1, chunk_rows=8, preprocess=preprocess)
    data = np.round(raw).astype(np.int16).astype(np.float64)
    want = clipped_mean(data[:, :, :16] - np.median(data[:, :, 16:], axis=2, keepdims=True))
    assert got[0].shape == (30, 16)
    for a, b in zip(got, want):
        assert np.array_equal(a, b, equal_nan=True)
    assert seen[:6] == [(0, 0, 8), (1, 0, 8), (2, 0, 8), (3, 0, 8), (4, 0, 8), (0, 8, 16)]


def test_combine_files_chunked_errors_name_the_file(tmp_path):
    stack = _stack(seed=1, n=3, ny=10, nx=8)
    paths = _write_stack(tmp_path, stack)
    odd = tmp_path / "odd.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((10, 9), np.float32), name="SCI")]).writeto(odd)
    with pytest.raises(CorruptInput, match="odd.fits.*shape"):
        combine_files_chunked([*paths, odd], hdu="SCI")
    junk = tmp_path / "junk.fits"
    junk.write_bytes(b"this is not FITS" * 200)
    with pytest.raises(CorruptInput, match="junk.fits"):
        combine_files_chunked([*paths, junk], hdu="SCI")
    truncated = tmp_path / "trunc.fits"
    truncated.write_bytes(paths[0].read_bytes()[:-2880])
    with pytest.raises(CorruptInput, match="trunc.fits"):
        combine_files_chunked([*paths, truncated], hdu="SCI")
    with pytest.raises(CorruptInput, match="frame00.fits.*no HDU"):
        combine_files_chunked(paths, hdu="NOPE")
    with pytest.raises(CorruptInput, match="missing.fits"):
        combine_files_chunked([*paths, tmp_path / "missing.fits"], hdu="SCI")
    with pytest.raises(InsufficientData):
        combine_files_chunked([], hdu="SCI")


# -- isr_amp --------------------------------------------------------------------------

def _isr_case(seed=0, raw_dtype=np.uint16):
    rng = np.random.default_rng(seed)
    raw = rng.normal(2000, 300, (70, 100))
    raw[rng.random(raw.shape) < 0.01] = 65535  # saturated
    raw = raw.clip(0, 65535).astype(raw_dtype)
    shape = (64, 96)
    bias = rng.normal(20, 3, shape).astype(np.float32)
    flat = rng.normal(1, 0.05, shape).astype(np.float32)
    flat[10, 45] = 0.0
    flat[11, 46] = np.nan
    flat[12, 47] = -1.0
    defects = np.where(rng.random(shape) < 0.01, masks.BAD, 0).astype(np.int32)
    return raw, bias, flat, defects, shape


def _run_isr(fn, raw, shape, **kw):
    img = np.zeros(shape, np.float32)
    var = np.zeros(shape, np.float32)
    msk = np.zeros(shape, np.int32)
    fn(raw, out_image=img, out_variance=var, out_mask=msk, **kw)
    return img, var, msk


@pytest.mark.parametrize("flip_x", [False, True])
@pytest.mark.parametrize("flip_y", [False, True])
@pytest.mark.parametrize("raw_dtype", [np.uint16, np.float32, np.float64])
def test_isr_amp_matches_reference_exactly(flip_x, flip_y, raw_dtype):
    raw, bias, flat, defects, shape = _isr_case(raw_dtype=raw_dtype)
    if raw_dtype == np.float64:
        raw = raw[:, ::-1].copy()[:, ::-1]  # non-contiguous view
        raw[5, 9] = np.nan
    ny, nx = 50, 40
    kw = dict(data_y0=4, data_x0=9, ny=ny, nx=nx, out_y0=7, out_x0=40, flip_x=flip_x, flip_y=flip_y,
              gain=1.7, read_noise=6.5, saturation=60000.0, linearity=[2e-6, -3e-11],
              bias=bias, flat=flat, defects=defects)
    over = np.linspace(990.0, 1010.0, ny)
    ref = _run_isr(isr_amp_ref, raw, shape, overscan_rows=over, **kw)
    for threads in (1, 2):
        got = _run_isr(isr_amp, raw, shape, overscan_rows=over, threads=threads, **kw)
        for a, b in zip(got, ref):
            assert np.array_equal(a, b)
    img, var, msk = got
    assert (msk & masks.SAT).any() and (msk & masks.BAD).any()
    outside = np.ones(shape, bool)
    outside[7:57, 40:80] = False
    assert not img[outside].any() and not msk[outside].any()
    for y, x in [(10, 45), (11, 46), (12, 47)]:
        assert img[y, x] == 0 and var[y, x] == 0 and msk[y, x] & (masks.NO_DATA | masks.BAD) == 129


def test_isr_amp_analytic():
    ny, nx = 6, 5
    raw = np.zeros((10, 10), np.uint16)
    raw[2:8, 3:8] = 1500 + np.arange(nx)  # column index encoded in the value
    raw[2, 3] = 60000  # saturated (raw >= saturation)
    shape = (8, 12)
    bias = np.full(shape, 100.0, np.float32)
    flat = np.full(shape, 0.5, np.float32)
    defects = np.zeros(shape, np.int32)
    defects[1, 9] = masks.BAD
    img, var, msk = _run_isr(
        isr_amp, raw, shape, overscan_rows=np.full(ny, 500.0), data_y0=2, data_x0=3, ny=ny, nx=nx,
        out_y0=1, out_x0=6, flip_x=True, flip_y=False, gain=2.0, read_noise=5.0, saturation=60000.0,
        linearity=(), bias=bias, flat=flat, defects=defects)
    # amp pixel (j, i) lands at (1 + j, 6 + nx - 1 - i)
    for j in range(ny):
        for i in range(nx):
            y, x = 1 + j, 6 + nx - 1 - i
            if (j, i) == (0, 0):
                assert msk[y, x] & masks.SAT
                continue
            e = (1500 + i - 500) * 2.0 - 100.0
            assert img[y, x] == pytest.approx(e / 0.5, rel=1e-7)
            assert var[y, x] == pytest.approx((e + 25.0) / 0.25, rel=1e-7)
    assert msk[1, 9] == masks.BAD
    assert msk[1, 10] == masks.SAT
    # linearity: a_lin = a + c0 a^2 + c1 a^3, no bias/flat/defects
    img, var, msk = _run_isr(
        isr_amp, np.full((3, 3), 1000.0, np.float32), (3, 3), overscan_rows=None, data_y0=0, data_x0=0,
        ny=3, nx=3, out_y0=0, out_x0=0, flip_x=False, flip_y=True, gain=1.0, read_noise=0.0,
        saturation=65535.0, linearity=[1e-6, 1e-9])
    np.testing.assert_allclose(img, 1000.0 + 1.0 + 1.0, rtol=1e-7)
    np.testing.assert_allclose(var, img, rtol=1e-7)
    assert not msk.any()


def test_isr_amp_ors_into_existing_mask_and_negative_signal_variance():
    img = np.zeros((2, 2), np.float32)
    var = np.zeros((2, 2), np.float32)
    msk = np.full((2, 2), masks.EDGE, np.int32)
    isr_amp(np.full((2, 2), 90.0, np.float32), np.full(2, 100.0), data_y0=0, data_x0=0, ny=2, nx=2,
            out_y0=0, out_x0=0, flip_x=False, flip_y=False, gain=1.5, read_noise=4.0, saturation=1e5,
            out_image=img, out_variance=var, out_mask=msk)
    np.testing.assert_allclose(img, -15.0)
    np.testing.assert_allclose(var, 16.0)  # max(e, 0) + rn^2
    assert (msk == masks.EDGE).all()


def test_isr_amp_thread_count_independent():
    raw, bias, flat, defects, shape = _isr_case(seed=3)
    kw = dict(overscan_rows=np.full(64, 1000.0), data_y0=0, data_x0=0, ny=64, nx=96, out_y0=0, out_x0=0,
              flip_x=True, flip_y=True, gain=1.3, read_noise=5.0, saturation=50000.0, linearity=[1e-7],
              bias=bias, flat=flat, defects=defects)
    a = _run_isr(isr_amp, raw, shape, threads=1, **kw)
    b = _run_isr(isr_amp, raw, shape, threads=2, **kw)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_isr_amp_rejects_bad_arguments():
    raw = np.zeros((10, 10), np.float32)
    good = dict(data_y0=0, data_x0=0, ny=10, nx=10, out_y0=0, out_x0=0, flip_x=False, flip_y=False,
                gain=1.0, read_noise=1.0, saturation=1e5)
    with pytest.raises(TypeError, match="out_image must be a 2-D float32"):
        isr_amp(raw, None, out_image=np.zeros((10, 10)), out_variance=np.zeros((10, 10), np.float32),
                out_mask=np.zeros((10, 10), np.int32), **good)
    with pytest.raises(ValueError, match="outside the raw frame"):
        _run_isr(isr_amp, raw, (10, 10), overscan_rows=None, **{**good, "data_y0": 1})
    with pytest.raises(ValueError, match="outside the outputs"):
        _run_isr(isr_amp, raw, (10, 10), overscan_rows=None, **{**good, "out_x0": 2})
    with pytest.raises(ValueError, match="overscan_rows must have shape"):
        _run_isr(isr_amp, raw, (10, 10), overscan_rows=np.zeros(9), **good)
    with pytest.raises(ValueError, match="gain"):
        _run_isr(isr_amp, raw, (10, 10), overscan_rows=None, **{**good, "gain": 0.0})
    with pytest.raises(ValueError, match="bias must have the outputs' shape"):
        _run_isr(isr_amp, raw, (10, 10), overscan_rows=None, bias=np.zeros((9, 10)), **good)


# -- find_cosmic_rays -----------------------------------------------------------------

SKY, READ_NOISE = 1000.0, 5.0


def _peak_for_snr(snr):
    # p / sqrt(p + sky + rn^2) = snr
    return snr ** 2 / 2 + np.sqrt(snr ** 4 / 4 + snr ** 2 * (SKY + READ_NOISE ** 2))


def _cr_frame(seed, ny=256, nx=256, nstars=40, ncr=60):
    """Gaussian stars + sky + noise + injected cosmic rays (single pixels and short tracks)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:ny, 0:nx]
    model = np.full((ny, nx), SKY)
    stars = []
    # worst cases on a grid: the sharpest stars, centred on a pixel, at S/N 1000
    for y0, x0 in [(20, 20), (20, 60), (60, 20)]:
        stars.append((y0, x0, 1.5, 1000.0))
    for _ in range(nstars):
        stars.append((rng.uniform(8, ny - 8), rng.uniform(8, nx - 8), rng.uniform(1.5, 3.0),
                      10 ** rng.uniform(0.5, 3.0)))
    for y0, x0, s, snr in stars:
        model += _peak_for_snr(snr) * np.exp(-((yy - y0) ** 2 + (xx - x0) ** 2) / (2 * s * s))
    img = rng.poisson(model).astype(np.float64) + rng.normal(0, READ_NOISE, model.shape)
    sigma_bg = np.sqrt(SKY + READ_NOISE ** 2)
    centres = np.array([(y, x) for y, x, _, _ in stars])
    truth = np.zeros((ny, nx), bool)
    amp = np.zeros((ny, nx))
    placed = 0
    while placed < ncr:
        y, x = rng.integers(3, ny - 3), rng.integers(3, nx - 3)
        if np.min(np.hypot(centres[:, 0] - y, centres[:, 1] - x)) < 15:
            continue
        placed += 1
        length = rng.integers(1, 6)
        angle = rng.uniform(0, np.pi)
        for t in range(length):
            py, px = round(y + t * np.sin(angle)), round(x + t * np.cos(angle))
            if 1 <= py < ny - 1 and 1 <= px < nx - 1:
                a = rng.uniform(5, 150) * sigma_bg
                img[py, px] += a
                truth[py, px] = True
                amp[py, px] = max(amp[py, px], a)
    variance = np.maximum(img, 0) + READ_NOISE ** 2
    return img.astype(np.float32), variance.astype(np.float32), truth, amp / sigma_bg, centres


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_find_cosmic_rays_synthetic_frame(seed):
    img, var, truth, amp_sigma, centres = _cr_frame(seed)
    msk = np.zeros(img.shape, np.int32)
    got = find_cosmic_rays(img, var, msk, psf_sigma=1.0, threads=1)
    assert got.dtype == np.int32 and set(np.unique(got)) <= {0, masks.CR}
    assert np.array_equal(got, find_cosmic_rays(img, var, msk, psf_sigma=1.0, threads=2))
    assert np.array_equal(got, find_cosmic_rays_ref(img, var, msk, psf_sigma=1.0))
    flagged = got > 0
    strong = truth & (amp_sigma > 10)
    assert flagged[strong].mean() >= 0.95
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    near_star = np.zeros(img.shape, bool)
    for y0, x0 in centres:
        near_star |= np.hypot(yy - y0, xx - x0) <= 2
    assert not flagged[near_star].any()
    # every flag lies within the grow radius (+1) of an injected cosmic ray
    zone = np.zeros_like(truth)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            zone |= np.roll(np.roll(truth, dy, 0), dx, 1)
    assert not flagged[~zone].any()


def test_find_cosmic_rays_grow_ignore_and_background():
    rng = np.random.default_rng(5)
    img = rng.normal(100.0, 3.0, (40, 40)).astype(np.float32)
    var = np.full(img.shape, 9.0, np.float32)
    msk = np.zeros(img.shape, np.int32)
    img[10, 10] += 300  # isolated cosmic ray
    img[30, 30] += 300  # on a BAD pixel: ignored
    msk[30, 30] = masks.BAD
    img[0, 20] += 300  # on the border: never a candidate
    one = find_cosmic_rays(img, var, msk, grow=0) > 0
    assert one.sum() == 1 and one[10, 10]
    grown = find_cosmic_rays(img, var, msk, grow=1) > 0
    assert grown.sum() == 9 and grown[9:12, 9:12].all()
    # grown flags never land on ignored pixels
    msk[11, 11] = masks.SAT
    grown = find_cosmic_rays(img, var, msk, grow=1) > 0
    assert grown.sum() == 8 and not grown[11, 11]
    # an explicit background (scalar or image) gives the same answer as the default median
    bkg = float(np.median(img[msk == 0]))
    same = find_cosmic_rays(img, var, msk, background=bkg)
    assert np.array_equal(same, find_cosmic_rays(img, var, msk))
    assert np.array_equal(same, find_cosmic_rays(img, var, msk, background=np.full(img.shape, bkg)))


def test_find_cosmic_rays_second_pass_excludes_flagged_neighbours():
    img = np.zeros((11, 11), np.float32)
    var = np.ones(img.shape, np.float32)
    msk = np.zeros(img.shape, np.int32)
    # a bright track above and to the left of (5, 5): every neighbour pair of
    # (5, 5) holds one bright pixel, so only the second pass can flag it
    for y, x in [(4, 4), (4, 5), (4, 6), (5, 4)]:
        img[y, x] = 400.0
    img[5, 5] = 60.0
    kw = dict(background=0.0, grow=0, psf_sigma=1.0)
    got = find_cosmic_rays(img, var, msk, **kw) > 0
    assert got[5, 5] and got.sum() == 5
    assert np.array_equal(got, find_cosmic_rays_ref(img, var, msk, **kw) > 0)
    # without the track, (5, 5) alone is found by the first pass
    img2 = np.zeros_like(img)
    img2[5, 5] = 60.0
    assert (find_cosmic_rays(img2, var, msk, **kw) > 0).sum() == 1


def test_find_cosmic_rays_rejects_bad_arguments():
    z = np.zeros((5, 5), np.float32)
    with pytest.raises(ValueError, match="differ in shape"):
        find_cosmic_rays(z, np.zeros((5, 4)), np.zeros((5, 5), np.int32))
    with pytest.raises(ValueError, match="psf_sigma"):
        find_cosmic_rays(z, z, np.zeros((5, 5), np.int32), psf_sigma=0)
    with pytest.raises(ValueError, match="background"):
        find_cosmic_rays(z, z, np.zeros((5, 5), np.int32), background=np.zeros((4, 4)))
    assert not find_cosmic_rays(np.zeros((2, 2)), np.ones((2, 2)), np.zeros((2, 2), np.int32)).any()


# -- noise-model clipping (IRAF ccdclip-like) -----------------------------------------

@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("with_scales", [False, True])
def test_clipped_mean_noise_model_matches_reference(threads, with_scales):
    from surveyred.kernels.combine import clipped_mean, clipped_mean_ref

    rng = np.random.default_rng(21)
    n, ny, nx = 7, 23, 31
    level = 2000.0
    stack = (level + rng.normal(0, np.sqrt(level + 25.0), (n, ny, nx))).astype(np.float32)
    stack[rng.random((n, ny, nx)) < 0.02] += 5000.0  # cosmic rays
    stack[0, 3, 4] = np.nan
    scales = rng.uniform(0.9, 1.1, n) * level if with_scales else None
    var0 = rng.uniform(20.0, 30.0, (ny, nx))
    got = clipped_mean(stack, scales=scales, noise=(var0, True), threads=threads)
    ref = clipped_mean_ref(stack, scales=scales, noise=(var0, True))
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_allclose(got[0], ref[0], rtol=2e-6)
    np.testing.assert_allclose(got[2], ref[2], rtol=2e-5, atol=1e-6)


def test_clipped_mean_noise_model_validates():
    from surveyred.kernels.combine import clipped_mean

    stack = np.zeros((3, 4, 5), dtype=np.float32)
    with pytest.raises(ValueError, match="shape"):
        clipped_mean(stack, noise=(np.ones((5, 4)), True))
    with pytest.raises(ValueError, match="positive"):
        clipped_mean(stack, noise=(0.0, False))
