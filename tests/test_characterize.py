"""Characterisation (background, detection, PSF, measurement) scored against simulator truth.

The first night of the tiny simulated survey (4 science visits x 4 detectors of
512x512 px, double-Gaussian PSF of FWHM ~3 px) is reduced once per module through
the package API (master bias/flat -> ISR) and characterised with the
``surveyred characterize`` command.  Every tolerance is stated with its reason.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from surveyred import characterize as ch
from surveyred import cli, masks
from surveyred.calib import CalibConfig, build_master_bias, build_master_flat, plan_calibrations
from surveyred.errors import NoSources
from surveyred.ingest import build_inventory, find_raw_files
from surveyred.instrument import load_instrument
from surveyred.isr import IsrConfig, isr_exposure
from surveyred.psf import PsfModel
from surveyred.simulate import FWHM_PER_SIGMA, WING_FRAC, WING_RATIO, render_stars

INST = load_instrument("simcam")


@pytest.fixture(scope="module")
def characterized(tiny_survey, tmp_path_factory):
    out = tmp_path_factory.mktemp("characterized")
    inv, _ = build_inventory(find_raw_files(tiny_survey / "raw"), INST)
    inv = inv.to_pandas()
    plan = plan_calibrations(inv, {"mode": "night", "max_days": 3})
    night = sorted(plan.science.night.unique())[0]
    sci = plan.science[plan.science.night == night]
    cfg = CalibConfig.from_dict({})
    groups = set(sci.bias_group)
    for group in groups:
        build_master_bias(plan.bias_groups[group], INST, INST.detectors, out / "bias" / group, cfg, group=group,
                          valid=plan.validity[group])
    for (group, band), paths in plan.flat_groups.items():
        if (group, band) in set(zip(sci.flat_group, sci.band)):
            build_master_flat(paths, INST, INST.detectors, out / "flat" / group / band, cfg, band=band,
                              bias_dir=out / "bias" / plan.flat_bias[(group, band)], group=group,
                              valid=plan.validity[(group, band)])
    for row in sci.itertuples():
        isr_exposure(row.path, INST, visit=row.visit, band=row.band, night=row.night,
                     bias_dir=out / "bias" / row.bias_group, flat_dir=out / "flat" / row.flat_group / row.band,
                     detectors=INST.detectors, outdir=out / "calexp" / row.night, cfg=IsrConfig(), calib_cfg=cfg)
        calexps = [str(out / "calexp" / row.night / f"{row.visit}_{d.id}.fits") for d in INST.detectors]
        rc = cli.main(["characterize", *calexps, "--outdir-src", str(out / "src" / row.night),
                       "--outdir-psf", str(out / "psf" / row.night), "--threads", "2",
                       "--log", str(out / "logs" / f"{row.visit}.log")])
        assert rc == 0
    truth = tiny_survey / "truth"
    exps = pd.read_parquet(truth / "exposures.parquet")
    exps = exps[(exps.obstype == "science") & (exps.night == night)]
    return dict(out=out, night=night, truth=truth, exposures=exps, stars=pd.read_parquet(truth / "stars.parquet"),
                amps=pd.read_parquet(truth / "amps.parquet"))


def _frames(c):
    for row in c["exposures"].itertuples():
        name = f"{row.visit}_{row.detector}"
        src = c["out"] / "src" / row.night / f"{name}.parquet"
        yield row, pq.read_table(src), c["out"] / "psf" / row.night / f"{name}.fits", \
            c["out"] / "calexp" / row.night / f"{name}.fits"


def _truth_stars(c, row):
    s = c["stars"]
    return s[(s.visit.astype(str) == str(row.visit)) & (s.detector == row.detector)].reset_index(drop=True)


def _expected_snr(st, sky_var):
    """PSF-optimal S/N of a truth star: F / sqrt(F + sky_var / sum P^2) for the double Gaussian."""
    s2 = st.sigma_x_px.to_numpy() * st.sigma_y_px.to_numpy() + 1 / 12
    f, w2 = WING_FRAC, WING_RATIO ** 2
    sum_p2 = ((1 - f) ** 2 / (4 * np.pi * s2) + 2 * f * (1 - f) / (2 * np.pi * s2 * (1 + w2))
              + f * f / (4 * np.pi * w2 * s2))
    flux = st.flux_e.to_numpy()
    return flux / np.sqrt(flux + sky_var / sum_p2)


def _clean_truth(st, mask, *, border=4, radius=2):
    """Truth stars off saturated stars, the border and masked pixels (within ``radius`` px)."""
    ny, nx = mask.shape
    ok = ~st.saturated.to_numpy() & (st.x > border) & (st.x < nx - 1 - border) & (st.y > border) & (
        st.y < ny - 1 - border)
    ok = np.array(ok.to_numpy(), dtype=bool)
    bad = (mask & (masks.BAD | masks.SAT | masks.CR | masks.NO_DATA)) != 0
    for i in np.nonzero(ok)[0]:
        ix, iy = int(round(st.x[i])), int(round(st.y[i]))
        if bad[max(iy - radius, 0):iy + radius + 1, max(ix - radius, 0):ix + radius + 1].any():
            ok[i] = False
    # another truth star brighter than a tenth of this one within 2 FWHM makes a blend; a
    # saturated star swallows what lies in its halo (radius where its wing exceeds 3 e-, as in
    # test_calib_truth._star_free) and along its bleed column
    xy = st[["x", "y"]].to_numpy()
    for s in st[st.saturated].itertuples():
        sw = 2.0 * s.fwhm_px / 2.3548
        r = max(4.0 * s.fwhm_px, sw * np.sqrt(2 * np.log(max(0.1 * s.flux_e / (2 * np.pi * sw * sw) / 3.0, 1.0))))
        ok &= ~((np.hypot(*(xy - (s.x, s.y)).T) < r) | (np.abs(xy[:, 0] - s.x) < 3 * s.fwhm_px))
    for i in np.nonzero(ok)[0]:
        d = np.hypot(*(xy - xy[i]).T)
        if np.any((d > 0) & (d < 2 * st.fwhm_px[i]) & (st.flux_e.to_numpy() > 0.1 * st.flux_e[i])):
            ok[i] = False
    return ok


def _match(cat, st, tol=1.5):
    from scipy.spatial import cKDTree

    if cat.num_rows == 0:
        return np.full(len(st), -1)
    tree = cKDTree(np.column_stack([cat["x"].to_numpy(), cat["y"].to_numpy()]))
    d, j = tree.query(st[["x", "y"]].to_numpy())
    return np.where(d < tol, j, -1)


def test_psf_fwhm_within_5_percent_of_truth(characterized):
    """Model FWHM at the detector centre vs truth ``psf_fwhm_px``, and per star vs ``fwhm_px``."""
    centre, per_star = [], []
    for row, cat, psf_path, _ in _frames(characterized):
        hdr = fits.getheader(psf_path)
        assert hdr["STATUS"] == "ok", (row.visit, row.detector, hdr["FAILMSG"])
        centre.append(hdr["PSFFWHM"] / row.psf_fwhm_px - 1)
        model = PsfModel.read(psf_path)
        st = _truth_stars(characterized, row)
        per_star.append(np.median(model.fwhm(st.x.to_numpy(), st.y.to_numpy()) / st.fwhm_px.to_numpy() - 1))
        assert float(cat.schema.metadata[b"psf_fwhm"]) == pytest.approx(hdr["PSFFWHM"])
    centre, per_star = np.array(centre), np.array(per_star)
    print(f"PSF FWHM error at centre: median {np.median(centre) * 100:+.2f}%, max |{np.max(np.abs(centre)) * 100:.2f}|%;"
          f" per-star median error max |{np.max(np.abs(per_star)) * 100:.2f}|%")
    assert np.all(np.abs(centre) < 0.05)
    assert np.all(np.abs(per_star) < 0.05)


def test_detection_completeness_above_95_percent_at_snr_10(characterized):
    found = total = 0
    for row, cat, _, calexp in _frames(characterized):
        mask = fits.getdata(calexp, "MASK")
        st = _truth_stars(characterized, row)
        rn = characterized["amps"]
        rn = rn[(rn.expname == row.expname) & (rn.detector == row.detector)].read_noise_e.mean()
        snr = _expected_snr(st, row.sky_e + rn ** 2)
        sel = (snr >= 10) & _clean_truth(st, mask)
        j = _match(cat, st[sel].reset_index(drop=True))
        found += int((j >= 0).sum())
        total += int(sel.sum())
    print(f"completeness at S/N >= 10: {found}/{total} = {found / total:.4f}")
    assert total > 100
    assert found / total > 0.95


def test_centroid_pulls_consistent_with_errors(characterized):
    """(x - x_true) / x_err over isolated, unflagged stars: robust rms within [0.8, 1.25].

    Truth positions are the centres the simulator rendered at (pixel i covers [i-0.5, i+0.5]),
    the same convention as the catalog.
    """
    px, py, dxs = [], [], []
    for row, cat, _, calexp in _frames(characterized):
        mask = fits.getdata(calexp, "MASK")
        st = _truth_stars(characterized, row)
        sel = _clean_truth(st, mask) & (st.flux_e.to_numpy() > 2000)
        st = st[sel].reset_index(drop=True)
        j = _match(cat, st)
        df = cat.to_pandas()
        flags = df[[c for c in df.columns if c.startswith("flag_")]].any(axis=1).to_numpy()
        ok = j >= 0
        ok[ok] &= ~flags[j[ok]]
        m = df.iloc[j[ok]]
        px.append((m.x.to_numpy() - st.x[ok].to_numpy()) / m.x_err.to_numpy())
        py.append((m.y.to_numpy() - st.y[ok].to_numpy()) / m.y_err.to_numpy())
        dxs.append(np.hypot(m.x.to_numpy() - st.x[ok].to_numpy(), m.y.to_numpy() - st.y[ok].to_numpy()))
    px, py = np.concatenate(px), np.concatenate(py)

    def rrms(a):
        return 1.4826 * np.median(np.abs(a - np.median(a)))

    print(f"centroid pulls: n={len(px)} x: median {np.median(px):+.3f} rms {rrms(px):.3f}; "
          f"y: median {np.median(py):+.3f} rms {rrms(py):.3f}; median offset {np.median(np.concatenate(dxs)):.4f} px")
    assert len(px) > 200
    assert 0.8 < rrms(px) < 1.25 and 0.8 < rrms(py) < 1.25
    # no bias: the median pull is within 3 / sqrt(n) of 0 plus 0.1 for the pixel-convention slack
    assert abs(np.median(px)) < 0.1 + 3 / np.sqrt(len(px)) and abs(np.median(py)) < 0.1 + 3 / np.sqrt(len(py))


def _calexp_flux(c, row, st):
    """Truth flux in calexp electrons: ``flux_top_e * RESPMEAN``.

    The calexp is divided by the flat (the response normalised to mean 1), so a star's
    electrons ``flux_e = flux_top_e * response`` become ``flux_top_e * mean response``.
    """
    resp = fits.getheader(c["truth"] / f"flat_{row.band}_{row.detector:02d}.fits")["RESPMEAN"]
    return st.flux_top_e.to_numpy() * resp


def test_psf_and_aperture_corrected_fluxes_match_truth(characterized):
    """Median of psf_flux_apcorr / truth within 1%; pull robust rms within [0.8, 1.3] for S/N < 100.

    Truth is the flat-fielded flux (:func:`_calexp_flux`), not ``flux_e`` (raw electrons,
    which carry the pixel response).  Above S/N ~100 a ~1% PSF-model floor dominates the
    errors (measured and printed, not asserted)."""
    ratios, ratios_raw, pulls, ratios_ap, hi_pulls = [], [], [], [], []
    for row, cat, _, calexp in _frames(characterized):
        mask = fits.getdata(calexp, "MASK")
        st = _truth_stars(characterized, row)
        sel = _clean_truth(st, mask) & (st.flux_e.to_numpy() > 3000)
        st = st[sel].reset_index(drop=True)
        j = _match(cat, st)
        df = cat.to_pandas()
        flags = df[[c for c in df.columns if c.startswith("flag_")]].any(axis=1).to_numpy()
        ok = j >= 0
        ok[ok] &= ~flags[j[ok]]
        m, t = df.iloc[j[ok]], st[ok]
        tf = _calexp_flux(characterized, row, t)
        ratios.append(m.psf_flux_apcorr.to_numpy() / tf)
        ratios_raw.append(m.psf_flux.to_numpy() / tf)
        ratios_ap.append(m.ap_flux_r12.to_numpy() / tf)
        pull = (m.psf_flux_apcorr.to_numpy() - tf) / m.psf_flux_apcorr_err.to_numpy()
        pulls.append(pull[m.snr.to_numpy() < 100])
        hi_pulls.append(pull[m.snr.to_numpy() >= 100])
    r, rr, ra, p = map(np.concatenate, (ratios, ratios_raw, ratios_ap, pulls))
    rrms = 1.4826 * np.median(np.abs(p - np.median(p)))
    hp = np.concatenate(hi_pulls)
    print(f"S/N >= 100 pull robust rms {1.4826 * np.median(np.abs(hp - np.median(hp))):.2f} (n={len(hp)})")
    print(f"flux ratios (n={len(r)}): psf_flux_apcorr/truth median {np.median(r):.4f}, psf_flux/truth "
          f"{np.median(rr):.4f}, ap_flux_r12/truth {np.median(ra):.4f}; pull robust rms {rrms:.3f} (n={len(p)})")
    assert len(r) > 100
    assert abs(np.median(r) - 1) < 0.01
    assert 0.8 < rrms < 1.3


def test_catalog_schema_metadata_and_psf_product(characterized):
    row, cat, psf_path, calexp = next(_frames(characterized))
    cfg = ch.CharacterizeConfig()
    assert cat.column_names == list(ch.catalog_dtypes(cfg))
    assert str(cat.schema.field("source_id").type) == "int64"
    ids = cat["source_id"].to_numpy()
    assert len(np.unique(ids)) == len(ids) and ids[0] == int(row.visit) * 10**9 + row.detector * 10**6
    md = {k.decode(): v.decode() for k, v in cat.schema.metadata.items()}
    for key in ("visit", "night", "detector", "band", "exptime", "mjd", "date_obs", "status", "failure_class",
                "psf_fwhm", "software_version", "config_hash", "units"):
        assert key in md
    assert md["status"] == "ok" and md["visit"] == str(row.visit) and md["band"] == row.band
    assert float(md["mjd"]) == pytest.approx(row.mjd_obs, abs=1e-6)
    with fits.open(psf_path) as h:
        names = [x.name for x in h]
        assert names == ["PRIMARY", "PSF", "PSFSTARS", "PSFIMAGE", "BACKGROUND", "BACKRMS", "DETECTED"]
        hdr = h[0].header
        for key in ("PSFFWHM", "PSFELLIP", "NPSFSTAR", "APCORR", "SKYLEVEL", "SKYRMS", "NSOURCE", "STATUS",
                    "FAILCLS", "SRSTEP"):
            assert key in hdr
        assert hdr["NSOURCE"] == cat.num_rows and hdr["NPSFSTAR"] == int(np.sum(cat["is_psf_star"].to_numpy()))
        # sky level within 1% of truth (the flat-fielded sky is the mean sky over the mean response ~1)
        assert hdr["SKYLEVEL"] == pytest.approx(row.sky_e, rel=0.02)
        det = h["DETECTED"].data
        # every catalogued source centre lies on the DETECTED plane
        xi = np.rint(cat["x"].to_numpy()).astype(int)
        yi = np.rint(cat["y"].to_numpy()).astype(int)
        assert det[yi, xi].mean() > 0.98
        assert np.abs(h["PSFIMAGE"].data.sum() - 1) < 1e-5
    # the calexp was not modified by characterisation
    assert (fits.getdata(calexp, "MASK") & masks.DETECTED).sum() == 0


# -- synthetic frames (fast, no survey needed) ---------------------------------------


def _frame(nx=400, ny=400, *, sky=500.0, n=60, flux=(2e4, 2e5), sat_level=None, seed=1, fwhm=3.0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(20, nx - 20, n)
    y = rng.uniform(20, ny - 20, n)
    f = rng.uniform(*flux, n)
    s = fwhm / FWHM_PER_SIGMA
    expected = render_stars((ny, nx), x, y, f, s, s) + sky
    image = rng.poisson(expected).astype(np.float32) + rng.normal(0, 5, (ny, nx)).astype(np.float32)
    mask = np.zeros((ny, nx), np.int32)
    if sat_level is not None:
        sat = image >= sat_level
        image[sat] = sat_level
        mask[sat] |= masks.SAT
    variance = (np.maximum(expected, 0) + 25).astype(np.float32)
    return image, mask, variance, (x, y, f)


def test_sky_only_frame_is_no_sources_or_too_few_stars():
    rng = np.random.default_rng(5)
    image = rng.normal(500, np.sqrt(525), (300, 300)).astype(np.float32)
    variance = np.full(image.shape, 525, np.float32)
    res = ch.characterize_detector(image, np.zeros(image.shape, np.int32), variance, visit="7", detector=1)
    assert res.status == "failed" and res.failure_class in ("NoSources", "TooFewStars")
    assert len(res.catalog["x"]) == 0 and res.psf is None


def test_only_saturated_stars_is_too_few_stars():
    image, mask, variance, _ = _frame(n=30, flux=(5e6, 1e7), sat_level=30000.0)
    assert (mask & masks.SAT).any()
    res = ch.characterize_detector(image, mask, variance)
    assert res.status == "failed" and res.failure_class == "TooFewStars"
    assert "PSF candidates" in res.failure_message


def test_command_fails_only_when_every_detector_fails(tmp_path):
    from surveyred.fitsio import exposure_hdus, write_hdulist

    good, gmask, gvar, _ = _frame(seed=2)
    rng = np.random.default_rng(3)
    blank = rng.normal(500, 23, good.shape).astype(np.float32)
    paths = []
    for det, (img, m, v) in enumerate([(good, gmask, gvar), (blank, np.zeros_like(gmask), gvar * 0 + 529)]):
        ph = fits.Header({"VISIT": "77", "NIGHT": "20240101", "DETECTOR": det, "BAND": "r", "EXPTIME": 30.0,
                          "DATE-OBS": "2024-01-02T03:04:05"})
        p = tmp_path / "calexp" / f"77_{det}.fits"
        p.parent.mkdir(exist_ok=True)
        write_hdulist(exposure_hdus(img, m, v, primary_header=ph), p)
        paths.append(str(p))
    args = ["--outdir-src", str(tmp_path / "src"), "--outdir-psf", str(tmp_path / "psf")]
    assert cli.main(["characterize", *paths, *args]) == 0
    bad = pq.read_table(tmp_path / "src" / "77_1.parquet")
    assert bad.num_rows == 0 and bad.schema.metadata[b"status"] == b"failed"
    assert bad.schema.metadata[b"failure_class"] in (b"NoSources", b"TooFewStars")
    assert fits.getheader(tmp_path / "psf" / "77_1.fits")["STATUS"] == "failed"
    assert pq.read_table(tmp_path / "src" / "77_0.parquet").schema.metadata[b"status"] == b"ok"
    # every detector failing: non-zero exit and the one-line failure class
    assert cli.main(["characterize", paths[1], *args]) == 2


def test_crowded_frame_needs_and_uses_the_configured_pixel_stack():
    """A dense field overflows a tiny pixel stack (named failure) and succeeds with the default."""
    image, mask, variance, _ = _frame(nx=600, ny=600, n=2500, flux=(2e3, 1e5), seed=4)
    tiny = ch.CharacterizeConfig.from_dict({"detection": {"pixstack": 10000}})
    with pytest.raises(NoSources, match="pixstack"):
        ch.detect_and_measure(image, mask, variance, cfg=tiny)
    res = ch.characterize_detector(image, mask, variance)
    assert len(res.catalog["x"]) > 1000 or res.failure_class == "TooFewStars"
    assert len(ch.detect_and_measure(image, mask, variance)[3]) > 1000


def test_nan_and_masked_regions_are_robust():
    """A quarter of the frame NaN/NO_DATA: background finite, no source there, no NaN centroid."""
    image, mask, variance, _ = _frame(seed=6)
    image[:150, :150] = np.nan
    mask[:150, :150] |= masks.NO_DATA
    bkg, sub, var, objs, seg, cols = ch.detect_and_measure(image, mask, variance)
    assert np.isfinite(bkg.back).all() and abs(np.median(bkg.back[200:, 200:]) - 500) < 5
    assert np.all(np.isfinite(cols["x"])) and not np.any((cols["x"] < 148) & (cols["y"] < 148))


def test_config_validation():
    with pytest.raises(Exception, match="aperture_radii"):
        ch.CharacterizeConfig.from_dict({"aperture_radii": [5, 3]})
    with pytest.raises(Exception, match="characterize configuration"):
        ch.CharacterizeConfig.from_dict({"nope": 1})
    assert ch.ap_name(3) == "ap_flux_r03" and ch.ap_name(12.0) == "ap_flux_r12"
    assert json.loads(json.dumps(ch.catalog_units(ch.CharacterizeConfig())))["x"] == "pix"
    assert math.isclose(ch.CharacterizeConfig().background.mesh, 64)


# -- real frames: CAHA CAFOS NGC 2420, three 60 s V exposures -------------------------


@pytest.mark.real
def test_cafos_ngc2420_repeatability(shared_real_dir, tmp_path):
    """Bright-star magnitudes agree across the three 60 s V frames.

    Masters from the 2021-03-18 biases and V flat (10 nights before the science: night-mode
    validity with max_days 15, as in test_real_frames), ISR and characterisation through the
    command line.  Frames are registered by an offset vote on bright stars; each frame's
    zero-point offset (transparency: the frames differ by ~0.05 and ~0.12 mag) is removed by the
    median difference; the scatter is that of one measurement about the three-frame mean,
    ``sqrt(3/2 mean(res^2))``.  Measured (2026-11): 71 stars with S/N > 100 unflagged in all
    frames; PSF (aperture-corrected) 0.017 mag, aperture r = 8 px 0.021 mag, against median
    statistical errors of 0.008 and 0.012 mag.
    """
    from scipy.spatial import cKDTree

    base = shared_real_dir / "caha_cafos_ngc2420"
    cfg = {"combine": {"min_frames": 1}, "validity": {"mode": "night", "max_days": 15}}
    biases = sorted(str(p) for p in (base / "calib" / "bias").glob("*.fits"))
    flats = sorted(str(p) for p in (base / "calib" / "flat" / "V").glob("*.fits"))
    assert cli.main(["master-bias", *biases, "--instrument", "cafos", "--outdir", str(tmp_path / "bias"),
                     "--group", "20210318", "--config-json", json.dumps(cfg)]) == 0
    assert cli.main(["master-flat", *flats, "--band", "V", "--bias-dir", str(tmp_path / "bias"), "--instrument",
                     "cafos", "--outdir", str(tmp_path / "flat"), "--group", "20210318",
                     "--config-json", json.dumps(cfg)]) == 0
    visits = ("0031", "0032", "0033")
    for v in visits:
        raw = base / "science" / "NGC2420" / "V" / f"uamA_{v}.fits"
        assert cli.main(["isr", str(raw), "--instrument", "cafos", "--visit", v, "--band", "V", "--night",
                         "20210328", "--bias-dir", str(tmp_path / "bias"), "--flat-dir", str(tmp_path / "flat"),
                         "--outdir", str(tmp_path / "calexp"), "--config-json", json.dumps({"calib": cfg})]) == 0
    calexps = [str(tmp_path / "calexp" / f"{v}_0.fits") for v in visits]
    char = {"characterize": {"psf": {"max_stars": 40}}}
    assert cli.main(["characterize", *calexps, "--outdir-src", str(tmp_path / "src"), "--outdir-psf",
                     str(tmp_path / "psf"), "--threads", "2", "--config-json", json.dumps(char)]) == 0
    cats = [pd.read_parquet(tmp_path / "src" / f"{v}_0.parquet") for v in visits]
    fwhm = [fits.getheader(tmp_path / "psf" / f"{v}_0.fits")["PSFFWHM"] for v in visits]
    assert all(3.0 < f < 6.0 for f in fwhm)  # ~1.4" seeing at 0.53"/px
    flag_cols = [c for c in cats[0].columns if c.startswith("flag_")]

    def offset(a, b):
        pa = a[a.snr > 50][["x", "y"]].to_numpy()
        pb = b[b.snr > 50][["x", "y"]].to_numpy()
        dx = (pb[None, :, 0] - pa[:, None, 0]).ravel()
        dy = (pb[None, :, 1] - pa[:, None, 1]).ravel()
        k = (np.abs(dx) < 40) & (np.abs(dy) < 40)
        h, xe, ye = np.histogram2d(dx[k], dy[k], bins=80, range=[[-40, 40], [-40, 40]])
        i, j = np.unravel_index(np.argmax(h), h.shape)
        guess = np.array([(xe[i] + xe[i + 1]) / 2, (ye[j] + ye[j + 1]) / 2])
        d, jj = cKDTree(pb).query(pa + guess)
        return np.median(pb[jj[d < 2]] - pa[d < 2], axis=0)

    ref = cats[0]
    bright = ref[(ref.snr > 100) & ~ref[flag_cols].any(axis=1)]
    result = {}
    for col in ("psf_flux_apcorr", "ap_flux_r08"):
        mags = np.full((len(bright), len(cats)), np.nan)
        for k, c in enumerate(cats):
            shift = offset(ref, c) if k else np.zeros(2)
            d, jj = cKDTree(c[["x", "y"]].to_numpy()).query(bright[["x", "y"]].to_numpy() + shift)
            m = c.iloc[jj]
            good = (d < 1.0) & ~m[flag_cols].any(axis=1).to_numpy() & (m[col].to_numpy() > 0)
            mags[good, k] = -2.5 * np.log10(m[col].to_numpy()[good])
        mags = mags[np.all(np.isfinite(mags), axis=1)]
        mags -= np.median(mags - mags[:, :1], axis=0)  # per-frame zero-point offset
        res = mags - mags.mean(axis=1, keepdims=True)
        result[col] = (len(mags), float(np.sqrt(1.5 * np.mean(res ** 2))))
    print("CAFOS NGC 2420 V repeatability (mag, one measurement):",
          {k: f"n={n} rms={r:.4f}" for k, (n, r) in result.items()}, "FWHM px", np.round(fwhm, 2))
    assert result["psf_flux_apcorr"][0] > 40
    assert result["psf_flux_apcorr"][1] < 0.03
    assert result["ap_flux_r08"][1] < 0.035


# -- kernel: windowed-centroid errors ---------------------------------------------------


def test_centroid_error_kernel_matches_numpy_reference_for_any_thread_count():
    from surveyred.kernels.measure import centroid_errors, centroid_errors_ref

    rng = np.random.default_rng(8)
    image = rng.normal(0, 10, (120, 150)).astype(np.float32)
    x, y = rng.uniform(-2, 152, 600), rng.uniform(-2, 122, 600)  # some off the edges
    image += render_stars(image.shape, x, y, rng.uniform(1e3, 1e5, 600), 1.3, 1.3).astype(np.float32)
    var = (np.abs(image) + 100).astype(np.float32)
    sig = rng.uniform(0.8, 3.0, 600)
    ref = centroid_errors_ref(image, var, x, y, sig)
    for threads in (1, 2):
        got = centroid_errors(image, var, x, y, sig, threads=threads)
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g, r, rtol=1e-10, equal_nan=True)
    with pytest.raises(ValueError, match="finite"):
        centroid_errors(image, var, np.array([np.nan]), np.array([1.0]), np.array([1.0]))



def test_windowed_centroid_kernel_matches_reference_and_sep_winpos():
    """Kernel == NumPy reference (to rounding, any thread count); agrees with sep.winpos (sub-pixel
    sampled window) to 1e-3 px on bright isolated stars; starts 0.7 px off converge."""
    import sep

    from surveyred.kernels.measure import windowed_centroids, windowed_centroids_ref

    rng = np.random.default_rng(12)
    n = 300
    x, y = rng.uniform(10, 290, n), rng.uniform(10, 190, n)
    model = render_stars((200, 300), x, y, rng.uniform(2e3, 2e5, n), 1.3, 1.3)
    image = (model + rng.normal(0, 10, model.shape)).astype(np.float32)
    var = (model + 100).astype(np.float32)
    x0, y0 = x + rng.uniform(-0.7, 0.7, n), y + rng.uniform(-0.7, 0.7, n)
    sig = np.full(n, 1.3)
    ref = windowed_centroids_ref(image, var, x0, y0, sig)
    for threads in (1, 2):
        got = windowed_centroids(image, var, x0, y0, sig, threads=threads)
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-9, equal_nan=True)
    xs, ys, _ = sep.winpos(image, x0, y0, sig)
    iso = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :]) + np.eye(n) * 99
    iso = iso.min(axis=1) > 12
    d = np.hypot(ref[0] - xs, ref[1] - ys)[iso]
    assert np.nanmedian(d) < 1e-3 and np.nanpercentile(d, 90) < 5e-3
    assert np.all(np.isfinite(ref[0][iso]))


def test_centroid_error_formula_predicts_windowed_centroid_scatter():
    """Monte Carlo: the scatter of sep.winpos over 400 noise draws equals the predicted error within 10%."""
    import sep

    from surveyred.kernels.measure import centroid_errors

    rng = np.random.default_rng(9)
    s = 3.0 / FWHM_PER_SIGMA
    model = render_stars((41, 41), [20.2], [19.7], [5000.0], s, s) + 0.0
    var = (model + 400.0).astype(np.float32)
    xs, ys, pred = [], [], []
    for _ in range(400):
        img = (model + rng.normal(0, np.sqrt(var))).astype(np.float32)
        xw, yw, _ = sep.winpos(img, np.array([20.2]), np.array([19.7]), np.array([1.3]), subpix=5)
        xs.append(xw[0])
        ys.append(yw[0])
        pred.append(centroid_errors(img, var, xw, yw, np.array([1.3]))[0][0])
    ratio = np.std(xs) / np.median(pred)
    print(f"winpos scatter / predicted error: x {ratio:.3f}, y {np.std(ys) / np.median(pred):.3f}")
    assert 0.9 < ratio < 1.1 and 0.9 < np.std(ys) / np.median(pred) < 1.1


def test_full_chain_zero_point_within_5_mmag_of_truth(characterized, tiny_survey):
    """ISR -> characterize -> calibrate (the commands, on the first night): per-detector zero-point
    vs truth ``zp_calexp`` (the zero-point of a calexp flat-fielded with the truth flat, i.e.
    ``zp + 2.5 log10(mean response)``), rms over detectors < 5 mmag and every detector < 12 mmag.

    The rms is the issue-3 acceptance; the per-detector bound is the measured floor with margin:
    with 5-20 PSF stars per 512x512 detector the PSF model misses part of the real size variation
    across it (up to +-4% in FWHM), which biases that detector's PSF fluxes by up to ~0.7%
    (measured: rms 3.1 mmag, max 7.7 mmag here; rms 3.0, max 7.7 over both nights' 32
    detectors; before the visit-pooled wing and aperture correction: rms 13.6, max 47.9)."""
    c = characterized
    catdir = tiny_survey / "refcat" / "sim"
    errs = []
    for (night, visit), rows in c["exposures"].groupby(["night", "visit"]):
        rows = rows.sort_values("detector")
        srcs = [str(c["out"] / "src" / night / f"{visit}_{d}.parquet") for d in rows.detector]
        calexps = [str(c["out"] / "calexp" / night / f"{visit}_{d}.fits") for d in rows.detector]
        summary = c["out"] / "visit_summary" / night / f"{visit}.parquet"
        rc = cli.main(["calibrate", "--src", *srcs, "--calexp", *calexps, "--refcat-astrom", str(catdir),
                       "--refcat-photom", str(catdir), "--instrument", "simcam",
                       "--outdir-calsrc", str(c["out"] / "calsrc" / night), "--outdir-wcs", str(c["out"] / "wcs" / night),
                       "--summary", str(summary), "--threads", "2"])
        assert rc == 0
        summ = pd.read_parquet(summary).set_index("detector")
        for row in rows.itertuples():
            assert summ.status[row.detector] == "ok", (visit, row.detector)
            errs.append(summ.zero_point[row.detector] - row.zp_calexp)
    errs = np.array(errs)
    rms = float(np.sqrt(np.mean(errs ** 2)))
    print(f"full-chain zero-point error vs truth: rms {1000 * rms:.2f} mmag, max {1000 * np.abs(errs).max():.2f} "
          f"mmag, mean {1000 * errs.mean():+.2f} mmag over {len(errs)} detectors")
    assert len(errs) == 16
    assert rms < 0.005
    assert np.all(np.abs(errs) < 0.012)
