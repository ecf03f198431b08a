"""Science metrics (surveyred.metrics) on synthetic matched catalogs with known injected scatter."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from surveyred import metrics as M

PIX_ARCSEC = 0.2
RA0, DEC0 = 150.0, 2.0


def synthetic(n_stars=600, n_visits=6, sigma_mmag=10.0, sigma_mas=8.0, field_arcmin=12.0, band="r", seed=3,
              n_galaxies=0):
    """Calibrated sources of ``n_visits`` visits of one field: Gaussian magnitude and position noise.

    Every star is measured in every visit with ``mag = true + N(0, sigma_mmag)``
    and each coordinate displaced by ``N(0, sigma_mas)``; ``mag_err`` and the
    centroid errors state exactly that noise.  Galaxies (twice the PSF size)
    get 10x the scatter: the metrics must ignore them.
    """
    rng = np.random.default_rng(seed)
    n = n_stars + n_galaxies
    half = field_arcmin / 2.0 / 60.0
    dec_t = DEC0 + rng.uniform(-half, half, n)
    ra_t = RA0 + rng.uniform(-half, half, n) / math.cos(math.radians(DEC0))
    mag_t = rng.uniform(16.0, 19.0, n)
    galaxy = np.arange(n) >= n_stars
    rows = []
    for v in range(n_visits):
        s_m = np.where(galaxy, 10 * sigma_mmag, sigma_mmag) / 1000.0
        s_p = np.where(galaxy, 10 * sigma_mas, sigma_mas) / 3.6e6
        dra = rng.normal(0, 1, n) * s_p / math.cos(math.radians(DEC0))
        ddec = rng.normal(0, 1, n) * s_p
        x = (ra_t - RA0) * math.cos(math.radians(DEC0)) * 3600 / PIX_ARCSEC + 2000
        y = (dec_t - DEC0) * 3600 / PIX_ARCSEC + 2000
        rows.append(pd.DataFrame({
            "source_id": np.arange(n) + v * 10**6, "ra": ra_t + dra, "dec": dec_t + ddec,
            "mag": mag_t + rng.normal(0, 1, n) * s_m, "mag_err": s_m, "snr": 200.0 * np.ones(n),
            "x": x, "y": y, "x_err": s_p * 3600 / PIX_ARCSEC, "y_err": s_p * 3600 / PIX_ARCSEC,
            "fwhm": np.where(galaxy, 6.0, 3.0), "psf_fwhm": 3.0, "visit": str(1000 + v), "band": band,
            "detector": 0, "zero_point": 27.0 + 0.01 * v, "zero_point_err": 0.0,
            "flag_saturated": False, "flag_edge": False,
        }))
    return pd.concat(rows, ignore_index=True)


def row(table, band, metric):
    r = table[(table["band"] == band) & (table["metric"] == metric)]
    assert len(r) == 1, (band, metric)
    return r.iloc[0]


@pytest.fixture(scope="module")
def table():
    cfg = M.MetricsConfig()
    return M.compute_metrics(synthetic(n_galaxies=60), cfg)


def test_pa1_recovers_injected_per_visit_scatter(table):
    # PA1 is the rms of random-pair differences / sqrt(2): it estimates the per-visit sigma (10 mmag).
    # 600 stars: the statistical error of an rms is 1/sqrt(2 n) ~ 3 %; tolerance 8 %.
    pa1 = row(table, "r", "PA1")
    # the 60 galaxies (2x PSF size, 10x scatter) are not "unresolved"; a few random close pairs
    # (< 1 arcsec, ~1 expected among 660 objects on 144 arcmin^2) are ambiguous and dropped
    assert 590 <= pa1["n"] <= 600
    assert pa1["value"] == pytest.approx(10.0, rel=0.08)
    assert row(table, "r", "PA1_iqr")["value"] == pytest.approx(10.0, rel=0.10)
    # the expectation from the stated errors is exactly sigma
    assert pa1["expected"] == pytest.approx(10.0, rel=1e-9)
    assert pa1["grade"] == "fail"  # 10 mmag is worse than the 8-mmag minimum


def test_pf1_matches_gaussian_tail(table):
    # |d| > PA2 = 15 mmag for sigma = 10 mmag: 200 (1 - Phi(1.5)) = 13.4 %; binomial sd for 600 stars 1.4 %
    pf1 = row(table, "r", "PF1")
    truth = 200.0 * (1.0 - stats.norm.cdf(1.5))
    assert pf1["value"] == pytest.approx(truth, abs=3.5)
    assert pf1["expected"] == pytest.approx(truth, rel=1e-6)


def test_am1_recovers_injected_centroid_noise(table):
    # per-coordinate noise 8 mas, 6 visits: median distance rms = 8 sqrt(2 median(chi2_5) / 6) = 9.63 mas
    truth = M.expected_amx(8.0, 6)
    assert truth == pytest.approx(8.0 * math.sqrt(2.0 * stats.chi2.median(5) / 6.0))
    am1 = row(table, "r", "AM1")
    assert am1["n"] > 1000  # pairs separated by 5 +- 1 arcmin
    assert am1["value"] == pytest.approx(truth, rel=0.06)
    # the Monte-Carlo expectation from the stated centroid errors through the fitted pixel scale
    assert am1["expected"] == pytest.approx(truth, rel=0.04)
    # AF1: fraction of pairs with rms > AM1 + 20 mas; Gaussian noise this small gives none
    assert row(table, "r", "AF1")["value"] == pytest.approx(0.0, abs=0.5)
    # AD1: 90th percentile of the rms distribution minus AM1; chi distribution: 90th/50th percentile ratio
    ad1 = row(table, "r", "AD1")["value"]
    ratio = math.sqrt(stats.chi2.ppf(0.9, 5) / stats.chi2.median(5))
    assert ad1 == pytest.approx(truth * (ratio - 1.0), rel=0.2)


def test_am2_am3_nan_with_reason_on_small_footprint(table):
    for m in ("AM2", "AF2", "AD2", "AM3"):
        r = row(table, "r", m)
        assert np.isnan(r["value"]) and r["grade"] == "n/a"
        assert "no pair of bright stars separated by" in r["reason"]
        assert "arcmin" in r["reason"]


def test_astrometric_scatter_scales_linearly():
    # doubling the noise doubles AM1 (within the statistics of ~thousands of correlated pairs)
    cfg = M.MetricsConfig()
    a = M.compute_metrics(synthetic(sigma_mas=5.0, seed=11), cfg)
    b = M.compute_metrics(synthetic(sigma_mas=20.0, seed=11), cfg)
    am_a, am_b = row(a, "r", "AM1")["value"], row(b, "r", "AM1")["value"]
    assert am_b / am_a == pytest.approx(4.0, rel=0.02)  # same draws scaled: ratio exact up to position-dependent terms
    assert am_a == pytest.approx(M.expected_amx(5.0, 6), rel=0.06)
    assert row(a, "r", "AM1")["grade"] == "design"  # 6 mas: better than 10, not 5


def test_zero_point_scatter():
    df = synthetic(n_stars=50, n_visits=5)
    zp = M.zero_points_from_calsrc(df)
    table = M.compute_metrics(df, M.MetricsConfig(), zero_points=zp)
    # per-visit zero points 27.00 ... 27.04: sample sd of 0, 10, 20, 30, 40 mmag = 15.81 mmag
    assert row(table, "r", "zp_visit_scatter")["value"] == pytest.approx(np.std([0, 10, 20, 30, 40], ddof=1), rel=1e-6)
    assert np.isnan(row(table, "r", "zp_detector_scatter")["value"])  # one detector per visit


def test_one_visit_gives_nan_with_reason():
    table = M.compute_metrics(synthetic(n_stars=100, n_visits=1), M.MetricsConfig())
    for m in ("PA1", "PF1", "AM1", "AM2"):
        r = row(table, "r", m)
        assert np.isnan(r["value"])
        assert "1 visit" in r["reason"]
    assert row(table, "r", "n_visits")["value"] == 1


def test_faint_stars_and_flags_are_excluded():
    df = synthetic(n_stars=200, n_visits=4)
    cfg = M.MetricsConfig(bright_snr_min=500.0)  # every star has snr 200
    r = row(M.compute_metrics(df, cfg), "r", "PA1")
    assert np.isnan(r["value"]) and "no bright" in r["reason"]
    # saturated sources with wild magnitudes do not enter
    df2 = df.copy()
    sat = df2.index % 7 == 0
    df2.loc[sat, "mag"] += 1.0
    df2.loc[sat, "flag_saturated"] = True
    a = row(M.compute_metrics(df2, M.MetricsConfig()), "r", "PA1")["value"]
    assert a == pytest.approx(10.0, rel=0.15)


def test_matching_drops_ambiguous_groups():
    # two sources of one visit within the radius make a group ambiguous
    ra = np.array([10.0, 10.0 + 0.3 / 3600, 10.0, 20.0, 20.0])
    dec = np.array([0.0, 0.0, 0.0, 0.0, 0.0])
    visit = np.array(["1", "1", "2", "1", "2"])
    labels = M.match_groups(ra, dec, visit, 1.0)
    assert list(labels[:3]) == [-1, -1, -1]
    assert labels[3] == labels[4] >= 0


def test_thresholds_are_the_srd_table():
    assert M.thresholds("PA1", "g") == (5.0, 8.0, 3.0)
    assert M.thresholds("PA1", "z") == (7.5, 12.0, 4.5)
    assert M.thresholds("PA2", "r") == (15.0, 15.0, 10.0)
    assert M.thresholds("PF1", "i") == (10.0, 20.0, 5.0)
    assert M.thresholds("AM1", "r") == (10.0, 20.0, 5.0)
    assert M.thresholds("AD1", "r") == (20.0, 40.0, 10.0)
    assert M.thresholds("AM3", "r") == (15.0, 30.0, 10.0)
    assert M.grade("PA1", 4.0, 5.0, 8.0, 3.0) == "design"
    assert M.grade("PA1", 9.0, 5.0, 8.0, 3.0) == "fail"


def test_psf_flux_error_against_pixel_sums():
    # numeric sums of the double-Gaussian PSF on a 0.05-px grid (pixel integration negligible at this scale)
    s, f = 1.4, 0.1
    h = 0.05
    g = np.arange(-30, 30, h)
    xx, yy = np.meshgrid(g, g)
    r2 = xx ** 2 + yy ** 2
    p = (1 - f) * np.exp(-r2 / (2 * s * s)) / (2 * np.pi * s * s) + f * np.exp(-r2 / (8 * s * s)) / (8 * np.pi * s * s)
    p2, p3 = np.sum(p ** 2) * h * h, np.sum(p ** 3) * h * h
    flux, sky, rn = 1e5, 500.0, 6.0
    want = math.sqrt((sky + rn ** 2) / p2 + flux * p3 / p2 ** 2)
    assert M.psf_flux_error(flux, sky, rn, s) == pytest.approx(want, rel=1e-4)
    # single Gaussian, sky limited: var = 4 pi s^2 B
    assert M.psf_flux_error(0.0, 100.0, 0.0, 2.0, wing_frac=0.0) == pytest.approx(math.sqrt(4 * math.pi * 4 * 100), rel=1e-12)


def _write_calsrc(df, outdir):
    """One parquet per (visit, detector) with visit/band/detector in the schema metadata, like calibrate."""
    paths = []
    for (visit, det), g in df.groupby(["visit", "detector"]):
        meta_cols = ["visit", "band", "detector", "psf_fwhm", "zero_point", "zero_point_err"]
        t = pa.Table.from_pandas(g.drop(columns=meta_cols), preserve_index=False)
        meta = dict(t.schema.metadata or {})
        meta.update({b"visit": str(visit).encode(), b"band": g["band"].iloc[0].encode(), b"detector": str(det).encode(),
                     b"psf_fwhm": b"3.0", b"zero_point": str(g["zero_point"].iloc[0]).encode(),
                     b"zero_point_err": b"0.0"})
        path = outdir / f"{visit}_{det}.parquet"
        pq.write_table(t.replace_schema_metadata(meta), path)
        paths.append(str(path))
    return paths


def test_cli_writes_reproducible_table_and_markdown(tmp_path):
    df = pd.concat([synthetic(n_stars=150, n_visits=3, band="g", seed=5),
                    synthetic(n_stars=150, n_visits=1, band="r", seed=6)], ignore_index=True)
    df["visit"] = np.where(df["band"] == "g", df["visit"], "2000")
    (tmp_path / "calsrc").mkdir()
    paths = _write_calsrc(df, tmp_path / "calsrc")
    out1, out2, md = tmp_path / "m1.parquet", tmp_path / "m2.parquet", tmp_path / "m.md"
    assert M.main(["--calsrc", *paths, "--output", str(out1), "--thresholds-table", str(md)]) == 0
    assert M.main(["--calsrc", *reversed(paths), "--output", str(out2)]) == 0
    t = pd.read_parquet(out1)
    assert t.equals(pd.read_parquet(out2))  # input order does not matter
    assert row(t, "g", "PA1")["value"] == pytest.approx(10.0, rel=0.2)
    assert np.isnan(row(t, "r", "PA1")["value"]) and "1 visit" in row(t, "r", "PA1")["reason"]
    text = md.read_text()
    assert "| g | PA1 |" in text and "| 5.0 | 8.0 | 3.0 |" in text
    html = tmp_path / "m.html"
    assert M.main(["--calsrc", str(tmp_path / "calsrc"), "--output", str(tmp_path / "m4.parquet"),
                   "--thresholds-table", str(html)]) == 0  # a directory stands for its catalogs
    assert pd.read_parquet(tmp_path / "m4.parquet").equals(t)
    assert html.read_text().count("<tr") == len(t) + 1
    meta = pq.read_schema(out1).metadata
    assert b"metrics_git_revision" in meta and b"LPM-17" in meta[b"reference"]
    # bit-identical on a rerun
    out3 = tmp_path / "m3.parquet"
    assert M.main(["--calsrc", *paths, "--output", str(out3)]) == 0
    assert out3.read_bytes() == out1.read_bytes()


def test_cli_truth_dir_must_be_a_simulation(tmp_path, capsys):
    (tmp_path / "calsrc").mkdir()
    paths = _write_calsrc(synthetic(n_stars=20, n_visits=2), tmp_path / "calsrc")
    out = tmp_path / "m.parquet"
    assert M.main(["--calsrc", *paths, "--output", str(out), "--truth", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"MissingInput: {tmp_path}: ") and "stars.parquet" in err
    assert not out.exists()


def test_cli_corrupt_input_one_line_error(tmp_path, capsys):
    bad = tmp_path / "1000_0.parquet"
    bad.write_bytes(b"not parquet")
    out = tmp_path / "m.parquet"
    assert M.main(["--calsrc", str(bad), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("CorruptInput: ") and str(bad) in err
    assert not out.exists()


def test_reference_stars_only_drops_a_transient():
    # a variable source (1 mag swing) not in the reference catalog must not enter PA1
    df = synthetic(n_stars=300, n_visits=5, seed=8)
    df["ref_id"] = df["source_id"] % 10**6
    sn = df["source_id"] % 10**6 == 7
    df.loc[sn, "ref_id"] = -1
    df.loc[sn, "mag"] += np.linspace(0.0, 1.0, int(sn.sum()))
    with_ref = row(M.compute_metrics(df, M.MetricsConfig()), "r", "PA1")
    everyone = row(M.compute_metrics(df, M.MetricsConfig(reference_stars_only=False)), "r", "PA1")
    assert with_ref["n"] == everyone["n"] - 1
    assert with_ref["value"] == pytest.approx(10.0, rel=0.1)
    assert everyone["value"] > 1.5 * with_ref["value"]  # one variable among 300 stars inflates the rms


def test_centroid_error_against_fisher_information():
    # numeric Fisher information of x for a Gaussian star on a fine grid, variance B + F P per unit area
    s, h = 1.3, 0.02
    g = np.arange(-12, 12, h)
    xx, yy = np.meshgrid(g, g)
    p = np.exp(-(xx ** 2 + yy ** 2) / (2 * s * s)) / (2 * np.pi * s * s)
    dpdx = -xx / (s * s) * p
    for flux, sky in ((1e7, 1.0), (300.0, 500.0), (2e4, 500.0)):
        info = np.sum((flux * dpdx) ** 2 / (sky + flux * p)) * h * h
        exact = 1 / math.sqrt(info)
        got = M.centroid_error(flux, sky, 0.0, s)
        # exact in the source- and background-limited limits, within 15 % between
        assert got == pytest.approx(exact, rel=0.02 if flux in (1e7, 300.0) else 0.15)


def test_tiny_survey_pa1_am1_agree_with_simulated_noise(tiny_reduced, tiny_survey):
    """The pipeline's PA1 and AM1 on the tiny simulated survey against the simulated noise.

    ``expected_from_simulation`` gives each matched star the photon + read noise
    of a PSF-fit flux and of an optimal centroid from the simulation's true
    flux, sky, PSF and read noise (plus the pipeline's zero-point error); the
    measured metrics must agree within the statistics of a few dozen stars
    (rms of n values: ~1/sqrt(2n)) plus what the pipeline adds (WCS and
    zero-point fits): 35 % for PA1; AM1 (hundreds of pairs) within 20 %.
    Measured on seed 3: g PA1 17.6 vs 14.6 mmag, PF1 26.6 vs 26.7 %, AM1 5.11 vs
    5.21 mas; r PA1 13.3 vs 13.1 mmag, PF1 19.4 vs 21.4 %, AM1 4.51 vs 4.43 mas.
    """
    paths = sorted(str(p) for p in (tiny_reduced / "calsrc").rglob("*.parquet"))
    calsrc = M.read_calsrc(paths)
    sim = M.expected_from_simulation(calsrc, tiny_survey / "truth", M.MetricsConfig())
    for band in sorted(calsrc["band"].unique()):
        pa1, am1 = row(sim, band, "PA1"), row(sim, band, "AM1")
        print(f"{band}: PA1 {pa1['value']:.2f} mmag (expected {pa1['expected']:.2f}, {pa1['n']} stars); "
              f"AM1 {am1['value']:.2f} mas (expected {am1['expected']:.2f}, {am1['n']} pairs)")
        assert pa1["n"] >= 15 and am1["n"] >= 20
        assert pa1["value"] == pytest.approx(pa1["expected"], rel=0.35)
        assert am1["value"] == pytest.approx(am1["expected"], rel=0.20)
        # PF1: binomial scatter of ~100 stars is ~5 points
        pf1 = row(sim, band, "PF1")
        assert pf1["value"] == pytest.approx(pf1["expected"], abs=12.0)


def test_uncalibrated_magnitudes_say_so():
    df = synthetic(n_stars=50, n_visits=3)
    df["mag"] = np.nan  # relative calibration only: no zero point
    table = M.compute_metrics(df, M.MetricsConfig())
    for m in ("PA1", "AM1"):
        assert "no calibrated magnitude" in row(table, "r", m)["reason"]
