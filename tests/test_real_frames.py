"""Real telescope frames through overscan, trim and master calibrations.

Uses ../shared/data/real (see its PROVENANCE.md); every test skips when that
directory is absent (a user's fresh checkout).
"""

import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from surveyred import calib, cli, masks
from surveyred.instrument import load_instrument

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(not REAL.is_dir(), reason=f"real frames not available ({REAL} absent)"),
]
ccdproc = pytest.importorskip("ccdproc")
SAAO = REAL / "overscan" / "SAAO1m_STE3_object_a8280271.fits"
CAHA = REAL / "caha_cafos_ngc2420"
TRIM = "[3:1024,2:1024]"  # cafos.yaml datasec: junk row 1 and columns 1-2 removed


def test_saao_overscan_and_trim_from_own_cards():
    from astropy.nddata import CCDData

    inst = load_instrument("saao_ste3")
    with fits.open(SAAO) as hdul:
        raw, header = hdul[0].data, hdul[0].header
        det = inst.detectors[0].resolved(header, where=str(SAAO))
        # the frame's own cards drive the geometry
        assert str(det.amps[0].datasec) == "[17:528,1:520]"
        assert str(det.amps[0].biassec) == "[4:13,1:520]"
        cfg = calib.OverscanConfig(mode="median_per_row", columns=(0, None))
        image, variance, mask = calib.assemble_detector(raw, det, overscan=cfg, linearity=False)
        gain = det.amps[0].gain
        assert image.shape == (520, 512)

        ccd = CCDData(raw.astype(np.float64), unit="adu")
        ref = ccdproc.subtract_overscan(ccd, fits_section=header["BIASSEC"].replace(" ", ""),
                                        median=True, overscan_axis=1)
        ref = ccdproc.trim_image(ref, fits_section=header["TRIMSEC"].replace(" ", "")).data
    np.testing.assert_allclose(image / gain, ref, rtol=0, atol=2e-3)
    # the overscan level (~hundreds of ADU) is gone: what remains is sky + stars
    over = raw[:, 3:13].astype(float)
    assert np.median(over) > 100
    assert abs(np.median(image / gain) - (np.median(raw[:, 16:528]) - np.median(over))) < 1.0
    # variance = signal + read noise^2 + the per-row overscan estimate's variance (electrons^2)
    expected = np.maximum(image, 0) + det.amps[0].read_noise ** 2 + calib.overscan_variance(det.amps[0], cfg)
    np.testing.assert_allclose(variance, expected, rtol=1e-5)


def _cafos_files(kind, band=None):
    base = CAHA / "calib" / kind
    if band:
        base = base / band
    return sorted(str(p) for p in base.glob("*.fits"))


def test_cafos_master_bias_and_flats(tmp_path):
    from astropy.nddata import CCDData

    inst = load_instrument("cafos")
    det = inst.detectors[0]
    biases = _cafos_files("bias")
    assert len(biases) == 2
    cfg = {"combine": {"min_frames": 1}, "validity": {"mode": "night", "max_days": 15}}
    rc = cli.main(["master-bias", *biases, "--instrument", "cafos", "--outdir", str(tmp_path / "bias"),
                   "--group", "20210318", "--config-json", json.dumps(cfg)])
    assert rc == 0
    with fits.open(tmp_path / "bias" / "bias_0.fits") as h:
        master_bias = h["IMAGE"].data.astype(np.float64)
        assert h[0].header["VALSTART"] == "20210303" and h[0].header["VALEND"] == "20210402"
        assert h[0].header["NCOMBINE"] == 2 and h[0].header["SRSTEP"] == "master-bias"
    # peer: ccdproc average of the trimmed biases (two frames: clipping rejects nothing)
    trimmed = [ccdproc.trim_image(CCDData.read(f, unit="adu"), fits_section=TRIM) for f in biases]
    ref = ccdproc.combine(trimmed, method="average").data
    gain = det.amps[0].gain
    np.testing.assert_allclose(master_bias / gain, ref, rtol=1e-5, atol=1e-3)
    # the instrument file's read noise is what the bias pair shows (robust sigma of the difference / sqrt 2)
    d = (trimmed[0].data.astype(np.float64) - trimmed[1].data.astype(np.float64)) * gain
    rn = 1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2)
    assert rn == pytest.approx(det.amps[0].read_noise, rel=0.05)

    for band, physical in (("B", "JohnsonB"), ("V", "JohnsonV")):
        flats = _cafos_files("flat", band)
        rc = cli.main(["master-flat", *flats, "--band", band, "--bias-dir", str(tmp_path / "bias"),
                       "--instrument", "cafos", "--outdir", str(tmp_path / "flat" / band),
                       "--group", "20210318", "--config-json", json.dumps(cfg)])
        assert rc == 0
        with fits.open(tmp_path / "flat" / band / "flat_0.fits") as h:
            flat = h["IMAGE"].data.astype(np.float64)
            defects = h["DEFECTS"].data
            assert h[0].header["BAND"] == band
        assert flat.shape == (1023, 1022)
        lit = flat > 0  # normalisation uses the pixels that saw light
        assert np.mean(flat[lit]) == pytest.approx(1.0, abs=1e-6)
        # peer: bias-subtracted flat normalised to its mean, with ccdproc
        fl = ccdproc.trim_image(CCDData.read(flats[0], unit="adu"), fits_section=TRIM)
        ref_flat = fl.data.astype(np.float64) - ref
        ref_flat /= ref_flat[lit].mean()
        np.testing.assert_allclose(flat, ref_flat, rtol=2e-4, atol=2e-4)
        # a sane dome flat: few defects, response within a plausible range
        assert (defects != 0).mean() < 0.01
        assert 0.5 < np.percentile(flat[lit], 1) and np.percentile(flat, 99) < 1.5
        # every unlit pixel (e.g. the B flat's zero row) is in the defect mask
        assert (defects[~lit] & masks.BAD).all()
