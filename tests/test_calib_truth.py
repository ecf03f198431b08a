"""Master calibrations and ISR scored against the simulator's truth.

The tiny simulated survey (2 nights; per night 5 biases, 3 flats in g and r,
4 science exposures; 4 detectors of 2 amps) is reduced once per module through
the package API: ingest -> plan -> master bias/flat -> ISR.  Every tolerance
below is derived from the noise the simulator put in, and stated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from surveyred import masks
from surveyred.calib import CalibConfig, build_master_bias, build_master_flat, plan_calibrations, ptc_gain
from surveyred.ingest import build_inventory, find_raw_files
from surveyred.instrument import load_instrument
from surveyred.isr import IsrConfig, isr_exposure

INST = load_instrument("simcam")


@pytest.fixture(scope="module")
def reduced(tiny_survey, tmp_path_factory):
    out = tmp_path_factory.mktemp("reduced")
    inv, rej = build_inventory(find_raw_files(tiny_survey / "raw"), INST)
    inv = inv.to_pandas()
    assert rej.num_rows == 0
    plan = plan_calibrations(inv, {"mode": "night", "max_days": 3})
    cfg = CalibConfig.from_dict({})
    for group, paths in plan.bias_groups.items():
        build_master_bias(paths, INST, INST.detectors, out / "bias" / group, cfg, group=group,
                          valid=plan.validity[group])
    for (group, band), paths in plan.flat_groups.items():
        build_master_flat(paths, INST, INST.detectors, out / "flat" / group / band, cfg, band=band,
                          bias_dir=out / "bias" / plan.flat_bias[(group, band)], group=group,
                          valid=plan.validity[(group, band)])
    for row in plan.science.itertuples():
        isr_exposure(row.path, INST, visit=row.visit, band=row.band, night=row.night,
                     bias_dir=out / "bias" / row.bias_group, flat_dir=out / "flat" / row.flat_group / row.band,
                     detectors=INST.detectors, outdir=out / "calexp" / row.night, cfg=IsrConfig(),
                     calib_cfg=cfg)
    truth = tiny_survey / "truth"
    return dict(out=out, inv=inv, plan=plan, truth=truth, exposures=pd.read_parquet(truth / "exposures.parquet"),
                amps=pd.read_parquet(truth / "amps.parquet"), stars=pd.read_parquet(truth / "stars.parquet"),
                transient=pd.read_parquet(truth / "transient.parquet"),
                cosmics_present=(truth / "cosmics.parquet").exists())


def _image(path, ext="IMAGE"):
    with fits.open(path) as h:
        return h[ext].data.astype(np.float64)


def _truth_defects(truth: Path, det: int) -> np.ndarray:
    return _image(truth / f"defects_{det:02d}.fits", 0) != 0


@pytest.mark.parametrize("det", [d.id for d in INST.detectors])
def test_master_bias_matches_truth_within_frame_noise(reduced, det):
    """Master bias (e-) = truth bias structure above each amp's offset, within read noise / sqrt(N)."""
    truth = reduced["truth"]
    nframes = len(next(iter(reduced["plan"].bias_groups.values())))
    tb = fits.open(truth / f"bias_{det:02d}.fits")
    truth_adu, hdr = tb[0].data.astype(np.float64), tb[0].header
    d = INST.detector(det)
    for night in reduced["plan"].bias_groups:
        master = _image(reduced["out"] / "bias" / night / f"bias_{det}.fits")
        for amp in d.amps:
            sl = amp.detsec.slices
            expected = (truth_adu[sl] - hdr[f"OFFSET{amp.name}"]) * amp.gain
            resid = master[sl] - expected
            # per-pixel noise of a mean of N biases, plus the per-row overscan estimate
            # (median of 22 columns, efficiency 1/1.25^2) averaged over the same N frames
            sigma = amp.read_noise * np.sqrt(1 / nframes + 1.25**2 / 22 / nframes)
            rms = np.std(resid)
            assert abs(np.mean(resid)) < 0.2 * sigma, (night, amp.name)
            assert 0.85 * sigma < rms < 1.15 * sigma, (night, amp.name, rms, sigma)


@pytest.mark.parametrize("det", [d.id for d in INST.detectors])
def test_master_flat_matches_truth_within_photon_noise(reduced, det):
    truth = reduced["truth"]
    bad = _truth_defects(truth, det)
    for (night, band), paths in reduced["plan"].flat_groups.items():
        master = _image(reduced["out"] / "flat" / night / band / f"flat_{det}.fits")
        level = fits.getheader(reduced["out"] / "flat" / night / band / f"flat_{det}.fits")["FLATLVL"]
        true_flat = _image(truth / f"flat_{band}_{det:02d}.fits", 0)
        ratio = master[~bad] / true_flat[~bad]
        # each pixel: Poisson of N flats at `level` e- (x response), read noise negligible
        sigma = 1 / np.sqrt(len(paths) * level * true_flat[~bad])
        pull = (ratio - np.median(ratio)) / sigma
        assert abs(np.median(ratio) - 1) < 2e-3  # normalisation: mean 1 over the same detector
        assert np.std(pull) == pytest.approx(1.0, abs=0.1), (night, band)


def test_ptc_gain_within_3_percent_of_truth(reduced):
    """Photon-transfer gain of every amplifier from a pair of flats and a pair of biases."""
    inv = reduced["inv"].drop_duplicates("path")
    night = sorted(inv.night.unique())[0]
    flats = inv[(inv.obstype == "flat") & (inv.band == "r") & (inv.night == night)].path.tolist()[:2]
    biases = inv[(inv.obstype == "bias") & (inv.night == night)].path.tolist()[:2]
    amps = reduced["amps"].drop_duplicates(["detector", "amp"]).set_index(["detector", "amp"])
    errors = []
    for d in INST.detectors:
        f1, f2, b1, b2 = (fits.getdata(p, d.hdu).astype(np.float64) for p in (*flats, *biases))
        for amp in d.amps:
            gain, rn = ptc_gain(f1, f2, b1, b2, amp)
            true_gain = amps.loc[(d.id, amp.name), "gain"]
            errors.append(gain / true_gain - 1)
            assert gain == pytest.approx(true_gain, rel=0.03), (d.name, amp.name)
            assert rn == pytest.approx(amps.loc[(d.id, amp.name), "read_noise_e"], rel=0.08)
    print(f"PTC gain error: max |{max(np.abs(errors)) * 100:.2f}|%")


def _calexps(reduced):
    exps = reduced["exposures"]
    sci = exps[exps.obstype == "science"]
    for row in sci.itertuples():
        path = reduced["out"] / "calexp" / row.night / f"{row.visit}_{row.detector}.fits"
        yield row, path


def _star_free(reduced, row, shape, *, floor_e=3.0, border=16):
    """Pixels where no true source adds more than ``floor_e`` electrons, off saturated stars' columns.

    The simulated PSF is a double Gaussian whose wing (10% of the flux, twice
    the core's sigma) sets the radius: r = s_w sqrt(2 ln(0.1 F / (2 pi s_w^2 floor))).
    The truth lists the stars *on* the detector only, so a ``border`` strip
    (where wings of stars beyond the edge land) is left out, and so is the
    transient with its host galaxy.
    """
    stars = reduced["stars"]
    s = stars[(stars.visit.astype(str) == str(row.visit)) & (stars.detector == row.detector)]
    tr = reduced["transient"]
    tr = tr[(tr.visit.astype(str) == str(row.visit)) & (tr.detector == row.detector)]
    free = np.zeros(shape, dtype=bool)
    free[border:-border, border:-border] = True
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    for t in tr.itertuples():
        free &= (yy - t.host_y) ** 2 + (xx - t.host_x) ** 2 > (10 * t.host_sigma_px + 5 * t.fwhm_px) ** 2
    for st in s.itertuples():
        sw = 2.0 * st.fwhm_px / 2.3548
        peak = 0.1 * st.flux_e / (2 * np.pi * sw * sw)
        r = max(2.0 * st.fwhm_px, sw * np.sqrt(2 * np.log(max(peak / floor_e, 1.0))) + st.fwhm_px)
        if st.saturated:
            free[:, max(0, int(st.x - r)):int(st.x + r) + 1] = False  # the bleed runs along the column
        y0, y1 = max(0, int(st.y - r)), min(shape[0], int(st.y + r) + 1)
        x0, x1 = max(0, int(st.x - r)), min(shape[1], int(st.x + r) + 1)
        sub = (yy[y0:y1, x0:x1] - st.y) ** 2 + (xx[y0:y1, x0:x1] - st.x) ** 2 < r * r
        free[y0:y1, x0:x1] &= ~sub
    return free


def test_calexp_sky_and_variance_consistent_with_truth(reduced):
    """Star-free pixels equal the true sky within noise; variance plane matches the scatter within 5%."""
    pulls, ratios, outliers = [], [], []
    for row, path in _calexps(reduced):
        image, var = _image(path), _image(path, "VARIANCE")
        mask = fits.getdata(path, "MASK")
        free = _star_free(reduced, row, image.shape) & (mask == 0)
        assert free.sum() > 0.4 * image.size
        sky = row.sky_e
        # outliers: > 6 sigma of the variance plane (a Gaussian gives 2e-9 of them), e.g. a
        # cosmic ray running along a bad column, where the neighbour test has no usable pair
        z = (image - sky) / np.sqrt(var)
        out = free & (np.abs(z) > 6)
        outliers.append(out.sum() / free.sum())
        free &= ~out
        # mean: Poisson noise of the mean plus 0.1% for the master flat's normalisation
        err = np.sqrt(sky / free.sum() + (1e-3 * sky) ** 2)
        pulls.append((image[free].mean() - sky) / err)
        ratios.append(np.var(image[free]) / np.mean(var[free]))
    pulls, ratios, outliers = np.array(pulls), np.array(ratios), np.array(outliers)
    print(f"sky pulls: max |{np.max(np.abs(pulls)):.2f}|; variance ratio {ratios.min():.3f}..{ratios.max():.3f}; "
          f"outlier fraction max {outliers.max():.1e}")
    assert np.all(np.abs(pulls) < 4)
    assert np.all(np.abs(ratios - 1) < 0.05)
    assert np.all(outliers < 1e-4)


def test_masks_flag_defects_saturation_and_cosmic_rays(reduced):
    """Completeness and false-positive rates of the BAD, SAT and CR planes against truth masks."""
    tot = {k: np.zeros(2) for k in ("bad", "sat", "cr")}  # [truth pixels found, truth pixels]
    fp = {k: np.zeros(2) for k in ("bad", "sat", "cr")}  # [flagged without truth, pixels without truth]
    cr_on_stars = 0
    stars = reduced["stars"]
    for row, path in _calexps(reduced):
        mask = fits.getdata(path, "MASK").astype(np.int64)
        tm = fits.getdata(reduced["truth"] / f"truthmask_{row.expname}_{row.detector:02d}.fits").astype(np.int64)
        image, var = _image(path), _image(path, "VARIANCE")
        for key, bit in (("bad", masks.BAD), ("sat", masks.SAT)):
            t, f = (tm & bit) != 0, (mask & bit) != 0
            tot[key] += (np.sum(t & f), np.sum(t))
            fp[key] += (np.sum(f & ~t), np.sum(~t))
        # cosmic rays: score those that stand out, > 10 sigma above the local noise, off bad/saturated pixels
        t_cr = ((tm & masks.CR) != 0) & ((tm & (masks.BAD | masks.SAT)) == 0)
        bright = t_cr & (image - row.sky_e > 10 * np.sqrt(var))
        f_cr = (mask & masks.CR) != 0
        # truth CR grown by 3 px (detection grown by 1, second pass, grown again): flags there
        # are the CR's own halo; flags farther away are false positives
        near = np.zeros_like(t_cr)
        ys, xs = np.nonzero(t_cr)
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                near[np.clip(ys + dy, 0, mask.shape[0] - 1), np.clip(xs + dx, 0, mask.shape[1] - 1)] = True
        tot["cr"] += (np.sum(bright & f_cr), np.sum(bright))
        fp["cr"] += (np.sum(f_cr & ~near), np.sum(~near))
        s = stars[(stars.visit.astype(str) == str(row.visit)) & (stars.detector == row.detector) & ~stars.saturated]
        for st in s[s.flux_e > 2000].itertuples():
            y, x = int(round(st.y)), int(round(st.x))
            if 1 <= y < mask.shape[0] - 1 and 1 <= x < mask.shape[1] - 1 and not near[y, x]:
                cr_on_stars += int(np.any(mask[y - 1:y + 2, x - 1:x + 2] & masks.CR))
    comp = {k: v[0] / v[1] for k, v in tot.items()}
    fpr = {k: v[0] / v[1] for k, v in fp.items()}
    print("completeness", {k: f"{v:.4f}" for k, v in comp.items()}, "false-positive rate",
          {k: f"{v:.2e}" for k, v in fpr.items()}, "CR flags on star cores", cr_on_stars)
    assert tot["bad"][1] > 0 and tot["sat"][1] > 0 and tot["cr"][1] > 50
    assert comp["bad"] > 0.99 and fpr["bad"] < 2e-3
    assert comp["sat"] > 0.99 and fpr["sat"] < 1e-4
    assert comp["cr"] > 0.95 and fpr["cr"] < 2e-4
    assert cr_on_stars == 0
