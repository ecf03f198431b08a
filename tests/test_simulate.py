"""Tests of the survey simulator against its own truth (surveyred.simulate)."""

from __future__ import annotations

import hashlib
import math
import re
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from astropy.coordinates import Angle
from astropy.io import fits
from astropy.wcs import WCS

from surveyred import masks, simulate as sim
from surveyred.fitsio import open_fits
from surveyred.instrument import instrument_from_dict, load_instrument

SEED = 3


def _shared_tiny(request) -> Path | None:
    """The session's shared tiny survey (tests/conftest.py) when it is this module's survey."""
    try:
        out = Path(request.getfixturevalue("tiny_survey"))
    except pytest.FixtureLookupError:
        return None
    man = yaml.safe_load((out / "truth" / "manifest.yaml").read_text())
    same = (man["preset"], man["seed"], man["instrument"], man["detectors"]) == ("tiny", SEED, "simcam", [0, 1, 2, 3])
    return out if same else None


@pytest.fixture(scope="module")
def tiny(request, tmp_path_factory):
    """The tiny preset on SimCam (seed 3): the session's shared survey, or simulated here."""
    out = _shared_tiny(request)
    if out is None:
        out = tmp_path_factory.mktemp("tiny")
        sim.simulate_survey(out, preset="tiny", seed=SEED)
    truth = Path(out) / "truth"
    return {
        "out": Path(out),
        "inst": load_instrument("simcam"),
        "exposures": pd.read_parquet(truth / "exposures.parquet"),
        "amps": pd.read_parquet(truth / "amps.parquet"),
        "stars": pd.read_parquet(truth / "stars.parquet"),
        "cosmics": pd.read_parquet(truth / "cosmics.parquet"),
        "transient": pd.read_parquet(truth / "transient.parquet"),
        "refcat": pd.read_parquet(truth / "refcat.parquet"),
        "manifest": yaml.safe_load((truth / "manifest.yaml").read_text()),
    }


def _raw(tiny, expname: str, det) -> np.ndarray:
    row = tiny["exposures"].query("expname == @expname").iloc[0]
    with open_fits(tiny["out"] / row["file"]) as hdul:
        return hdul[det.hdu].data.astype(np.float64)


def _overscan_corrected(det, raw: np.ndarray) -> np.ndarray:
    """Assembled data minus each row's serial-overscan mean (per amp)."""
    out = np.empty(det.shape)
    for amp in det.amps:
        rows = raw[amp.biassec.slices].mean(axis=1)
        block = raw[amp.datasec.slices] - rows[:, None]
        out[amp.detsec.slices] = sim._orient(block, amp)
    return out


def _truth_image(tiny, name: str) -> tuple[np.ndarray, fits.Header]:
    with fits.open(tiny["out"] / "truth" / name) as hdul:
        return hdul[0].data.astype(np.float64), hdul[0].header.copy()


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# -- plan and layout -------------------------------------------------------------------


def test_plan_counts_per_preset():
    inst = load_instrument("simcam")
    tiny = pd.DataFrame([vars(s) for s in sim.plan_survey(inst, "tiny", 1)])
    assert sorted(tiny["night"].unique()) == ["20240220", "20240223"]
    for _, night in tiny.groupby("night"):
        assert (night["obstype"] == "bias").sum() == 5
        assert night.query("obstype == 'flat'").groupby("band").size().to_dict() == {"g": 3, "r": 3}
        assert night.query("obstype == 'science'").groupby("band").size().to_dict() == {"g": 2, "r": 2}
    demo = pd.DataFrame([vars(s) for s in sim.plan_survey(inst, "demo", 1)])
    assert demo.query("obstype == 'science'").groupby("night").size().tolist() == [9, 9, 9]
    assert sorted(demo.query("obstype == 'bias'")["night"].unique()) == ["20240220", "20240227"]
    assert demo.query("obstype == 'flat'").groupby(["night", "band"]).size().eq(3).all()
    assert set(demo["band"]) == {"g", "r", "i"}
    # flats of a band and night share one level (photon-transfer pairs)
    assert tiny.query("obstype == 'flat'").groupby(["night", "band"])["flat_level"].nunique().eq(1).all()
    with pytest.raises(sim.ConfigError, match="unknown simulation preset"):
        sim.plan_survey(inst, "huge", 1)


def test_raw_files_match_instrument(tiny):
    inst, exps = tiny["inst"], tiny["exposures"]
    assert len(exps) == 30 * 4
    kw = inst.keywords
    for rel, rows in exps.groupby("file"):
        path = tiny["out"] / rel
        assert path.parent.name == rows["night"].iloc[0]
        with open_fits(path) as hdul:
            assert len(hdul) == 1 + len(inst.detectors)
            ph = hdul[0].header
            assert hdul[0].data is None
            assert inst.classify(ph[kw["obstype"]]) == rows["obstype"].iloc[0]
            assert inst.band_of(ph[kw["filter"]]).band == rows["band"].iloc[0]
            assert isinstance(ph[kw["visit"]], int) and ph[kw["visit"]] == rows["visit"].iloc[0]
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}", ph[kw["date"]])
            when = datetime.strptime(ph[kw["date"]], "%Y-%m-%dT%H:%M:%S.%f")
            assert (when - timedelta(hours=12)).strftime("%Y%m%d") == rows["night"].iloc[0]
            assert ph["DATE"] == ph[kw["date"]]
            for det in inst.detectors:
                hdu = hdul[det.hdu]
                assert hdu.name == det.name and hdu.header["CCDNUM"] == det.id
                assert hdu.data.dtype == np.uint16 and hdu.data.shape == det.raw_shape
                assert hdu.header["BZERO"] == 32768 or hdul[det.hdu]._orig_bzero == 32768


def test_same_seed_same_bits_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed, threads in ((a, 7, 1), (b, 7, 2), (c, 8, 1)):
        sim.simulate_survey(out, preset="smoke", seed=seed, threads=threads)
    ha, hb, hc = _tree_hashes(a), _tree_hashes(b), _tree_hashes(c)
    assert ha == hb
    raws = [k for k in ha if k.startswith("raw/")]
    assert len(raws) == 3
    assert all(ha[k] != hc[k] for k in raws)


# -- calibration truth -------------------------------------------------------------------


def test_bias_overscan_matches_truth_levels(tiny):
    inst, exps, amps = tiny["inst"], tiny["exposures"], tiny["amps"]
    biases = exps.query("obstype == 'bias' and night == '20240220'")["expname"].unique()
    assert len(biases) == 5
    for det in inst.detectors:
        truth_bias, hdr = _truth_image(tiny, f"bias_{det.id:02d}.fits")
        per_amp = {a.name: [] for a in det.amps}
        for name in biases:
            raw = _raw(tiny, name, det)
            for amp in det.amps:
                os_pix = raw[amp.biassec.slices]
                level = amps.query("expname == @name and detector == @det.id and amp == @amp.name")
                level = float(level["bias_level_adu"].iloc[0])
                rn = amp.read_noise / amp.gain
                tol = 5 * math.sqrt(rn ** 2 / os_pix.size + sim.BIAS_ROW_JITTER_ADU ** 2 / os_pix.shape[0])
                assert abs(os_pix.mean() - level) < tol
                # per-row jitter: overscan row means scatter more than read noise alone allows
                row_sd = os_pix.mean(axis=1).std()
                assert row_sd > 2 * rn / math.sqrt(os_pix.shape[1])
                per_amp[amp.name].append(os_pix.mean())
        for amp in det.amps:
            offset = hdr[f"OFFSET{amp.name}"]
            tol = 5 * math.sqrt(sim.BIAS_DRIFT_ADU ** 2 / len(biases) + 1e-2)
            assert abs(np.mean(per_amp[amp.name]) - offset) < tol
            assert abs(np.median(truth_bias[amp.detsec.slices]) - offset) < 5.0


def test_master_bias_recovers_truth_structure(tiny):
    inst, exps = tiny["inst"], tiny["exposures"]
    biases = exps.query("obstype == 'bias' and night == '20240223'")["expname"].unique()
    det = inst.detector(1)
    truth_bias, hdr = _truth_image(tiny, "bias_01.fits")
    stack = np.median([_overscan_corrected(det, _raw(tiny, n, det)) for n in biases], axis=0)
    expect = truth_bias.copy()
    for amp in det.amps:
        expect[amp.detsec.slices] -= hdr[f"OFFSET{amp.name}"]
    resid = stack - expect
    mad = 1.4826 * np.median(np.abs(resid - np.median(resid)))
    rn = max(a.read_noise / a.gain for a in det.amps)
    assert abs(np.median(resid)) < 0.3
    assert mad < 1.3 * rn / math.sqrt(len(biases)) * 1.25  # median of 5 has ~80% efficiency
    with fits.open(tiny["out"] / "truth" / "defects_01.fits") as d:
        defects = d[0].data.astype(bool)
    hot_cols = np.nonzero((expect > 300).sum(axis=0) > 50)[0]
    assert len(hot_cols) == 2 and defects[:, hot_cols].any(axis=0).all()
    assert np.all(stack[:, hot_cols][expect[:, hot_cols] > 300] > 300)


def test_flat_pair_gives_instrument_gain_and_truth_response(tiny):
    inst, exps = tiny["inst"], tiny["exposures"]
    flats = exps.query("obstype == 'flat' and night == '20240220' and band == 'r' and detector == 2")
    det = inst.detector(2)
    truth_bias, hdr = _truth_image(tiny, "bias_02.fits")
    names = flats["expname"].tolist()
    f1, f2 = (_overscan_corrected(det, _raw(tiny, n, det)) for n in names[:2])
    for amp in det.amps:
        sl = amp.detsec.slices
        s1 = f1[sl] - (truth_bias[sl] - hdr[f"OFFSET{amp.name}"])
        s2 = f2[sl] - (truth_bias[sl] - hdr[f"OFFSET{amp.name}"])
        diff = (s1 - s2)[20:-20, 20:-20]
        mean = 0.5 * (s1 + s2)[20:-20, 20:-20]
        ok = np.abs(diff - np.median(diff)) < 6 * 1.4826 * np.median(np.abs(diff - np.median(diff)))
        rn_adu = amp.read_noise / amp.gain
        # photon transfer: var(f1 - f2) = 2 <S> / g + 2 rn^2 (ADU)
        gain = 2 * mean[ok].mean() / (diff[ok].var() - 2 * rn_adu ** 2)
        assert gain == pytest.approx(amp.gain, rel=0.03)
    # flat-fielded ratio against the truth response (normalised per detector)
    truth_flat, fh = _truth_image(tiny, "flat_r_02.fits")
    assert truth_flat.mean() == pytest.approx(1.0, abs=1e-5)
    e = np.empty(det.shape)
    for amp in det.amps:
        sl = amp.detsec.slices
        e[sl] = (0.5 * (f1[sl] + f2[sl]) - (truth_bias[sl] - hdr[f"OFFSET{amp.name}"])) * amp.gain
    ratio = e / truth_flat
    with fits.open(tiny["out"] / "truth" / "defects_02.fits") as d:
        good = ~d[0].data.astype(bool)
    ratio = ratio[good] / np.median(ratio[good])
    level = flats["flat_level_e"].iloc[0] * fh["RESPMEAN"]
    assert 1.4826 * np.median(np.abs(ratio - 1)) < 1.5 / math.sqrt(level / 2) + 0.002
    dead = truth_flat < 0.2
    assert dead.sum() > 100 and not good[dead].any()


# -- science truth ------------------------------------------------------------------------


def _box_fraction(x, y, sx, sy, half):
    """Fraction of the PSF inside the (2 half + 1)^2 box centred on the star's pixel."""
    n = 2 * half + 41
    img = sim.render_stars((n, n), [x % 1 + n // 2], [y % 1 + n // 2], 1.0, sx, sy)
    cx, cy = int(np.floor(x % 1 + n // 2 + 0.5)), int(np.floor(y % 1 + n // 2 + 0.5))
    return img[cy - half:cy + half + 1, cx - half:cx + half + 1].sum()


def test_star_flux_in_raw_matches_truth(tiny):
    """Aperture flux of isolated stars in the raw pixels (bias, overscan, gain from truth)."""
    inst, exps, stars = tiny["inst"], tiny["exposures"], tiny["stars"]
    h = 8  # box half-size
    npix = (2 * h + 1) ** 2
    pulls = []
    for expname in exps.query("obstype == 'science'")["expname"].unique()[:4]:
        for det in inst.detectors:
            s = stars.query("expname == @expname and detector == @det.id")
            bias, hdr = _truth_image(tiny, f"bias_{det.id:02d}.fits")
            with fits.open(tiny["out"] / "truth" / f"truthmask_{expname}_{det.id:02d}.fits") as m:
                tmask = m[0].data
            img = _overscan_corrected(det, _raw(tiny, expname, det))
            e = np.empty(det.shape)
            for amp in det.amps:
                sl = amp.detsec.slices
                e[sl] = (img[sl] - (bias[sl] - hdr[f"OFFSET{amp.name}"])) * amp.gain
            ny, nx = det.shape
            sky_e = exps.query("expname == @expname and detector == @det.id")["sky_e"].iloc[0]
            cand = s.query("16.5 < mag < 19.5 and not saturated and 21 < x < @nx - 22 and 21 < y < @ny - 22")
            for _, star in cand.iterrows():
                cx, cy = int(np.floor(star.x + 0.5)), int(np.floor(star.y + 0.5))
                amp = next(a for a in det.amps if a.detsec.slices[1].start <= cx < a.detsec.slices[1].stop)
                if not (amp.detsec.slices[1].start + h <= cx < amp.detsec.slices[1].stop - h):
                    continue  # keep the box inside one amp
                near = s[(np.hypot(s.x - star.x, s.y - star.y) < 28) & (s.star_id != star.star_id)]
                if (near.flux_e > 0.003 * star.flux_e).any():
                    continue
                box = (slice(cy - h, cy + h + 1), slice(cx - h, cx + h + 1))
                if tmask[box].any():
                    continue
                big = (slice(cy - 20, cy + 21), slice(cx - 20, cx + 21))
                ann = np.where(tmask[big] == 0, e[big], np.nan)
                ann[20 - h - 3:20 + h + 4, 20 - h - 3:20 + h + 4] = np.nan
                n_ann = np.isfinite(ann).sum()
                flux = e[box].sum() - npix * np.nanmedian(ann)
                expect = star.flux_e * _box_fraction(star.x, star.y, star.sigma_x_px, star.sigma_y_px, h)
                rn = amp.read_noise
                var = (expect + npix * (sky_e + rn ** 2 + amp.gain ** 2 / 12)  # Poisson, read noise, rounding
                       + npix ** 2 * 1.57 * (sky_e + rn ** 2) / n_ann  # median background
                       + (2 * h + 1) * ((2 * h + 1) * rn / math.sqrt(24)) ** 2)  # overscan row means
                pulls.append((flux - expect) / math.sqrt(var))
    pulls = np.array(pulls)
    assert len(pulls) >= 8
    assert np.all(np.abs(pulls) < 5), pulls
    assert abs(np.mean(pulls)) < 4 / math.sqrt(len(pulls))
    assert 0.5 < np.std(pulls) < 1.6


def test_true_wcs_maps_stars_and_header_wcs_is_off_by_arcsec(tiny):
    exps, stars, inst = tiny["exposures"], tiny["stars"], tiny["inst"]
    sci = exps.query("obstype == 'science'")
    for _, row in sci.iloc[[0, 5, 13]].iterrows():
        s = stars.query("expname == @row.expname and detector == @row.detector")
        w = WCS(fits.Header.fromstring(row["wcs_true"], sep="\n"))
        assert w.sip is not None
        ra, dec = w.all_pix2world(s.x + 1, s.y + 1, 1)
        err = np.hypot((ra - s.ra_obs) * np.cos(np.radians(s.dec_obs)), dec - s.dec_obs) * 3.6e6
        assert err.max() < 1.0  # mas
        det = inst.detector(int(row.detector))
        with open_fits(tiny["out"] / row["file"]) as hdul:
            hw = WCS(hdul[det.hdu].header)
        hra, hdec = hw.all_pix2world(s.x + 1, s.y + 1, 1)
        sep = np.hypot((hra - s.ra_obs) * np.cos(np.radians(s.dec_obs)), hdec - s.dec_obs) * 3600
        assert 0.05 < np.median(sep) < 15.0
        assert math.hypot(row.hdr_dra_arcsec, row.hdr_ddec_arcsec) < 12.0


def test_truth_masks_match_raw_pixels(tiny):
    inst, exps, cos = tiny["inst"], tiny["exposures"], tiny["cosmics"]
    sci = exps.query("obstype == 'science'")
    n_bleed_runs = 0
    for _, row in sci.iloc[:8].iterrows():
        det = inst.detector(int(row.detector))
        with fits.open(tiny["out"] / "truth" / f"truthmask_{row.expname}_{det.id:02d}.fits") as m:
            tmask = m[0].data
            assert m[0].header["MP_CR"] == 2
        raw = _raw(tiny, row.expname, det)
        assembled = sim.raw_to_assembled(det, raw)
        sat_value = np.empty(det.shape)
        for amp in det.amps:
            sat_value[amp.detsec.slices] = amp.saturation
        sat = (tmask & masks.SAT) > 0
        assert np.array_equal(sat, assembled >= sat_value)
        c = cos.query("expname == @row.expname and detector == @det.id")
        crmask = (tmask & masks.CR) > 0
        assert crmask.sum() == len(c.drop_duplicates(["x", "y"])) > 0
        # CR pixels stand out above the local level by > 500 e- / gain - noise
        med = np.median(assembled)
        assert np.median(assembled[crmask & ~sat] - med) > 200
        with fits.open(tiny["out"] / "truth" / f"defects_{det.id:02d}.fits") as d:
            assert np.array_equal((tmask & masks.BAD) > 0, d[0].data.astype(bool))
        # bleed trails: long vertical runs of saturated pixels
        runs = [np.diff(np.flatnonzero(np.diff(np.r_[0, col, 0]))) for col in sat.T if col.any()]
        n_bleed_runs += sum(int((r[::2] >= 10).sum()) for r in runs)
    assert n_bleed_runs >= 2


def test_transient_follows_its_light_curve(tiny):
    tr, man, exps = tiny["transient"], tiny["manifest"], tiny["exposures"]
    n_sci = exps.query("obstype == 'science' and detector == 0")["expname"].nunique()
    assert len(tr) == n_sci == 8
    assert (tr["detector"] == 0).all()
    for _, row in tr.iterrows():
        p = man["transient"]["bands"][row.band]
        mag = sim.transient_mag(row.mjd, peak_mag=p["peak_mag"], tau_rise=p["tau_rise"],
                                tau_fall=p["tau_fall"], mjd_peak=p["mjd_peak"])
        assert row.mag == pytest.approx(float(mag), abs=1e-9)
        assert row.flux_top_e == pytest.approx(10 ** (-0.4 * (row.mag - row.zp)) * row.exptime, rel=1e-9)
        assert row.flux_e == pytest.approx(row.flux_top_e * row.response, rel=1e-9)
    # the peak magnitude is reached at mjd_peak, and the supernova rises between the two nights
    p = man["transient"]["bands"]["r"]
    lc = {k: p[k] for k in ("peak_mag", "tau_rise", "tau_fall", "mjd_peak")}
    assert float(sim.transient_mag(p["mjd_peak"], **lc)) == pytest.approx(19.1)
    assert float(sim.transient_mag(p["mjd_peak"] + 0.3, **lc)) > 19.1
    for _, g in tr.groupby("band"):
        nights = g.sort_values("mjd")
        assert nights["mag"].iloc[-1] < nights["mag"].iloc[0] - 0.1
    assert 18.5 < tr["mag"].min() < 20.5


def test_refcat_and_stars_are_realistic(tiny):
    ref, stars, exps = tiny["refcat"], tiny["stars"], tiny["exposures"]
    assert {"id", "ra", "dec", "g", "r", "i", "pm_ra", "pm_dec", "epoch"} <= set(ref.columns)
    assert ref["id"].is_unique
    hist = np.histogram(ref["r"], bins=[20, 21, 24, 25])[0]
    assert hist[2] > 5 * hist[0]
    moving = (ref["pm_ra"] != 0) | (ref["pm_dec"] != 0)
    assert 0.3 < moving.mean() < 0.7
    assert (ref["bright"] & (ref["r"] < 13.5)).sum() >= 4
    per_frame = stars.groupby(["expname", "detector"]).size()
    assert per_frame.between(100, 300).all()
    assert stars["saturated"].any()
    assert stars["fwhm_px"].between(2.4, 4.1).all()
    sci = exps.query("obstype == 'science'")
    assert sci["psf_fwhm_px"].between(2.5, 4.0).all()
    assert sci.groupby("expname")["psf_fwhm_px"].first().nunique() == 8
    assert sci["sky_e"].between(400, 2000).all()
    # dithers: a star lands on different pixels in different visits
    one = stars.groupby("star_id").filter(lambda g: len(g) >= 4)
    spread = one.groupby("star_id")["x"].agg(lambda x: x.max() - x.min())
    assert spread.median() > 20


# -- other cameras and layouts ------------------------------------------------------------


def test_megacam_and_decam_descriptions_load():
    mc = load_instrument("megacam")
    assert len(mc.detectors) == 36 and mc.pixel_scale == pytest.approx(0.187)
    d0 = mc.detector(0)
    assert d0.name == "ccd00" and d0.hdu == 1 and d0.raw_shape == (4644, 2112) and d0.shape == (4612, 2048)
    assert mc.detector(35).name == "ccd35" and mc.detector(35).hdu == 36
    assert mc.band_of("r.MP9602").band == "r" and mc.band_of("z.MP9901").refcat_band == "z"
    assert mc.classify("OBJECT") == "science" and mc.classify("BIAS") == "bias"
    dc = load_instrument("decam")
    assert len(dc.detectors) == 62 and set(dc.bad_detectors) == {31, 61}
    assert dc.detector(61).name == "N30" and dc.detector(31).name == "S7" and dc.detector(25).name == "S1"
    s1, n4 = dc.detector(25), dc.detector(35)
    assert s1.raw_shape == (4146, 2160) and s1.shape == (4096, 2048)
    a = {amp.name: amp for amp in s1.amps}
    assert str(a["A"].datasec) == "[1081:2104,51:4146]" and str(a["A"].biassec) == "[2105:2154,51:4146]"
    assert str(a["B"].datasec) == "[57:1080,51:4146]" and str(a["B"].biassec) == "[7:56,51:4146]"
    assert str({amp.name: amp for amp in n4.amps}["A"].datasec) == "[57:1080,1:4096]"
    assert dc.band_of("g DECam SDSS c0001 4720.0 1520.0").band == "g"
    assert dc.band_of("N708 DECam c0012 7080.0 400.0").band == "N708"
    assert dc.classify("dome flat") == "flat" and dc.classify("zero") == "bias"
    for inst in (mc, dc):
        fp = inst.extra["simulation"]["focal_plane"]
        assert all(d.id in fp for d in inst.detectors)


@pytest.mark.parametrize("instrument,detector", [("megacam", "ccd00"), ("decam", "N4")])
def test_big_camera_writes_valid_frames(tmp_path, instrument, detector):
    inst = load_instrument(instrument)
    det = inst.detector(detector)
    sim.simulate_survey(tmp_path, preset="smoke", seed=2, instrument=instrument, detectors=[detector])
    exps = pd.read_parquet(tmp_path / "truth" / "exposures.parquet")
    amps = pd.read_parquet(tmp_path / "truth" / "amps.parquet")
    assert sorted(exps["obstype"]) == ["bias", "flat", "science"]
    for _, row in exps.iterrows():
        with open_fits(tmp_path / row["file"]) as hdul:
            hdu = hdul[det.hdu]
            assert hdu.name == det.name and hdu.header["CCDNUM"] == det.id
            assert hdu.data.shape == det.raw_shape and hdu.data.dtype == np.uint16
            raw = hdu.data.astype(float)
            ph = hdul[0].header
            ra = ph[inst.keywords["ra"]]
            ra_deg = Angle(ra, unit="hourangle").deg if isinstance(ra, str) else ra
            assert ra_deg == pytest.approx(row.ra_tel, abs=1e-5)
            assert inst.band_of(ph[inst.keywords["filter"]]).band == "g"
        for amp in det.amps:
            level = amps.query("expname == @row.expname and amp == @amp.name")["bias_level_adu"].iloc[0]
            assert raw[amp.biassec.slices].mean() == pytest.approx(level, abs=0.2)
            assert raw[amp.pbiassec.slices].mean() == pytest.approx(level, abs=0.5)
            data = np.median(raw[amp.datasec.slices])
            if row.obstype == "bias":
                assert abs(data - level) < 10
            elif row.obstype == "flat":
                assert (data - level) * amp.gain == pytest.approx(row.flat_level_e, rel=0.2)
            else:
                assert (data - level) * amp.gain == pytest.approx(row.sky_e, rel=0.2)
    sci_name = exps.loc[exps.obstype == "science", "expname"].iloc[0]
    assert (tmp_path / "truth" / f"truthmask_{sci_name}_{det.id:02d}.fits").exists()


def _flipped_instrument():
    doc = {
        "name": "flipcam", "pixel_scale": 0.4,
        "layout": {"raw_shape": [136, 152], "amps": [
            {"name": "A", "datasec": "[1:64,1:128]", "biassec": "[65:76,1:128]", "pbiassec": "[1:64,129:136]",
             "detsec": "[1:64,1:128]", "gain": 1.3},
            {"name": "B", "datasec": "[89:152,9:136]", "biassec": "[77:88,9:136]", "pbiassec": "[89:152,1:8]",
             "detsec": "[128:65,128:1]", "gain": 2.1},
        ]},
        "amp_defaults": {"read_noise": 5.0, "saturation": 60000.0},
        "detectors": [{"id": 0, "name": "F0", "hdu": 1}],
        "keywords": {"obstype": "OBSTYPE", "filter": "FILTER", "exptime": "EXPTIME", "date": "DATE-OBS",
                     "visit": "EXPNUM"},
        "obstypes": {"bias": ["bias"], "flat": ["flat"], "science": ["object"]},
        "filters": {"G": "g", "R": "r"},
        "simulation": {"focal_plane": {0: [0, 0]}},
    }
    return instrument_from_dict(doc)


def test_flipped_amplifier_layout_round_trips():
    inst = _flipped_instrument()
    det = inst.detectors[0]
    f = sim.simulate_detector_frame(inst, 0, band="r", seed=4)
    raw = f.raw.astype(float)
    e = np.empty(det.shape)
    dt = sim.CameraModel(inst, 4).detector_truth(det)
    for amp in det.amps:
        rows = raw[amp.biassec.slices].mean(axis=1)
        block = sim._orient(raw[amp.datasec.slices] - rows[:, None], amp)
        sl = amp.detsec.slices
        e[sl] = (block - (dt.bias_adu[sl] - dt.amp_offsets[amp.name])) * amp.gain
    resid = e - f.electrons
    unsat = (f.mask & masks.SAT) == 0
    # residual = read noise + overscan-row noise + rounding, in e- (gain up to 2.1)
    assert np.std(resid[unsat]) < 1.3 * 5.0 + 2.1
    # the stars' peaks are where the truth says, in the plain and in the flipped amp
    checked = set()
    for _, star in f.stars.query("flux_e > 3000 and not saturated").iterrows():
        cx, cy = int(np.floor(star.x + 0.5)), int(np.floor(star.y + 0.5))
        if not (3 <= cx < 125 and 3 <= cy < 125) or abs(star.x - 63.5) < 4:
            continue
        cut = e[cy - 2:cy + 3, cx - 2:cx + 3]
        py, px = np.unravel_index(np.argmax(cut), cut.shape)
        assert abs(px - 2) <= 1 and abs(py - 2) <= 1
        checked.add("B" if cx >= 64 else "A")
    assert checked == {"A", "B"}
    # the bright star's bleed trail runs along the assembled column, through the flipped amp
    bright = f.stars.sort_values("flux_e").iloc[-1]
    col = int(np.floor(bright.x + 0.5))
    assert bright.saturated and ((f.mask[:, col] & masks.SAT) > 0).sum() > 20


# -- pure functions --------------------------------------------------------------------------


def test_render_stars_conserves_flux_and_centroid():
    img = sim.render_stars((61, 61), [30.3], [29.8], 1e5, 1.3, 1.1)
    assert img.sum() == pytest.approx(1e5, rel=1e-4)
    yy, xx = np.mgrid[:61, :61]
    assert (img * xx).sum() / img.sum() == pytest.approx(30.3, abs=1e-3)
    assert (img * yy).sum() / img.sum() == pytest.approx(29.8, abs=1e-3)
    # FWHM of the double Gaussian is what psf_at reports
    # (area above half maximum = pi FWHM^2 / 4 for a well-sampled round source)
    big = sim.render_stars((301, 301), [150.0], [150.0], 1.0, 20.0, 20.0)
    fwhm = 2 * math.sqrt(np.count_nonzero(big >= big.max() / 2) / math.pi)
    assert fwhm == pytest.approx(20.0 * sim.FWHM_PER_SIGMA, rel=0.01)
    spec = sim.ExposureSpec(1, "x", "n", 0, "science", "r", "R", 60.0, 0.0, "", 0, 0, 0, 0, 0, 1.0, fwhm0=3.0)
    f, sx, sy = sim.psf_at(spec, np.array([0.0]), np.array([0.0]), 1000.0)
    assert f[0] == pytest.approx(3.0) and sx[0] * sim.FWHM_PER_SIGMA == pytest.approx(3.0)


def test_bleed_conserves_charge_and_caps_at_full_well():
    e = np.full((200, 5), 100.0, dtype=np.float32)
    e[100, 2] = 50_000.0
    fw = np.full(e.shape, 9_000.0, dtype=np.float32)
    out, touched = sim.bleed_columns(e, fw)
    assert out.max() <= 9_000.0 + 1e-3
    assert out.sum() == pytest.approx(e.sum(), rel=1e-6)
    assert touched[:, 2].sum() >= 5 and not touched[:, [0, 1, 3, 4]].any()
    assert np.array_equal(e[100, 2], 50_000.0)  # input untouched


def test_sexagesimal_and_dates():
    assert sim.format_ra(150.1) == "10:00:24.000"
    assert sim.format_dec(2.2) == "+02:12:00.00"
    assert sim.format_dec(-0.5) == "-00:30:00.00"
    assert sim.format_ra(359.999999) == "00:00:00.000"
    assert Angle(sim.format_dec(-2.123456), unit="deg").deg == pytest.approx(-2.123456, abs=3e-6)
    assert Angle(sim.format_ra(150.1), unit="hourangle").deg == pytest.approx(150.1, abs=1e-5)
    assert sim.iso_of(datetime(2024, 2, 21, 4, 30, 0, 999_600)) == "2024-02-21T04:30:01.000"
    assert sim.mjd_of(datetime(2024, 2, 21)) == pytest.approx(60361.0)


# -- command line ------------------------------------------------------------------------------


def test_cli_runs_and_fails_cleanly(tmp_path, capsys):
    assert sim.main([str(tmp_path / "ok"), "--preset", "smoke", "--seed", "5", "--detectors", "0,S01"]) == 0
    with open_fits(next((tmp_path / "ok" / "raw").rglob("*.fits"))) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "S00", "S01"]
    man = yaml.safe_load((tmp_path / "ok" / "truth" / "manifest.yaml").read_text())
    assert man["seed"] == 5 and man["instrument"] == "simcam" and man["detectors"] == [0, 1]
    assert (tmp_path / "ok" / "truth" / "README.md").read_text().startswith("# Truth")
    assert sim.main([str(tmp_path / "bad"), "--instrument", "nosuchcam", "--preset", "smoke"]) == 2
    assert "InstrumentError" in capsys.readouterr().err
    assert sim.main([str(tmp_path / "bad2"), "--detectors", "9", "--preset", "smoke"]) == 2
    assert "ConfigError" in capsys.readouterr().err
    assert not (tmp_path / "bad2" / "raw").exists()


def test_placeholder_hdus_keep_hdu_numbers(tmp_path):
    sim.simulate_survey(tmp_path, preset="smoke", seed=1, detectors=[2])
    with open_fits(next((tmp_path / "raw").rglob("*.fits"))) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "S00", "S01", "S10"]
        assert hdul[1].header["SIMSKIP"] is True and hdul[1].data is None
        assert hdul[3].data.shape == (528, 560)


# -- satellite trail -----------------------------------------------------------------------------


def test_satellite_trail_pixels_truth_and_own_random_stream():
    """A trail leaves every other electron of its frame unchanged (own random stream) and adds
    Poisson(R T) electrons: the excess along it matches the truth profile within noise."""
    inst = load_instrument("simcam")
    plan = sim.plan_survey(inst, "coadd", 2)
    p = sim.get_preset("coadd")
    spec = next(s for s in plan if s.obstype == "science" and p.trail.matches(s, inst.detector(1), p.bands))
    assert (spec.night_index, spec.band, spec.visit_in_night) == (1, "g", 1)
    assert not any(p.trail.matches(s, inst.detector(0), p.bands) for s in plan)
    assert sum(p.trail.matches(s, inst.detector(1), p.bands) for s in plan) == 1
    model = sim.CameraModel(inst, 2)
    det = inst.detector(1)
    cat = sim.make_catalog(model, [det])
    plain = sim.render_frame(model, spec, det, cat)
    with_trail = sim.render_frame(model, spec, det, cat, trail=p.trail)
    assert plain.trail is None and with_trail.trail is not None
    timg, (x0, y0, x1, y1) = sim.trail_image(det.shape, p.trail)
    tmask = (with_trail.mask & masks.TRAIL) != 0
    off = timg * model.response(det, spec.band) < 1e-3  # no trail electron expected there
    # away from the trail the electrons are those of the frame without it, bit for bit
    assert np.array_equal(with_trail.electrons[off], plain.electrons[off])
    assert np.array_equal(with_trail.mask & ~np.uint8(masks.TRAIL), plain.mask)
    assert np.array_equal(tmask, timg >= p.trail.peak_e * np.exp(-4.5))
    # the excess electrons (off saturated pixels) are Poisson(R T): sum and per-pixel scatter
    sat = ((with_trail.mask | plain.mask) & masks.SAT) != 0
    sel = tmask & ~sat
    excess = (with_trail.electrons - plain.electrons)[sel].astype(np.float64)
    expect = (timg * model.response(det, spec.band))[sel].astype(np.float64)
    pull = (excess.sum() - expect.sum()) / np.sqrt(expect.sum())
    chi2 = np.mean((excess - expect) ** 2 / expect)
    print(f"trail: {sel.sum()} px, excess {excess.sum():.0f} e- vs {expect.sum():.0f} expected (pull {pull:+.2f}), "
          f"per-pixel chi2 {chi2:.3f}")
    assert abs(pull) < 4 and abs(chi2 - 1) < 0.1
    row = with_trail.trail
    assert (row["x0"], row["y0"], row["x1"], row["y1"]) == (x0, y0, x1, y1)
    assert row["n_trail_px"] == tmask.sum() and row["line_flux_e"] == pytest.approx(250 * np.sqrt(2 * np.pi) * 1.3)
    # the endpoints on the sky lie on the true WCS
    w = WCS(fits.Header.fromstring(sim.wcs_header_string(model, spec, det, true=True), sep="\n"))
    ra, dec = w.all_pix2world([x0, x1], [y0, y1], 0)
    assert np.allclose([row["ra0"], row["ra1"]], ra, atol=1e-9) and np.allclose([row["dec0"], row["dec1"]], dec,
                                                                                  atol=1e-9)
    # the centre line's surface brightness is peak_e over exptime per pixel area, on the exposure's zp
    assert row["sb_mag_arcsec2"] == pytest.approx(spec.zp - 2.5 * np.log10(250 / 60 / 0.16))


def test_presets_without_trail_write_an_empty_trail_table(tiny):
    t = pd.read_parquet(tiny["out"] / "truth" / "trail.parquet")
    assert len(t) == 0 and {"visit", "detector", "x0", "ra0", "peak_e"} <= set(t.columns)
    assert sim.get_preset("tiny").trail is None and sim.get_preset("demo").trail is not None
