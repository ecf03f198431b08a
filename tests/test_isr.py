"""ISR on synthetic simcam frames: analytic results and the bad-input contract.

Truth tests against the survey simulator are in tests/test_calib_truth.py.
"""

import json
import os

import numpy as np
import pytest
from astropy.io import fits

from surveyred import cli, masks
from surveyred.calib import CalibConfig, build_master_bias, build_master_flat
from surveyred.instrument import load_instrument
from surveyred.isr import IsrConfig, run_isr

INST = load_instrument("simcam")
BIAS_LEVEL = (1000.0, 1150.0)


def _raw_detector(det, rng, electrons, *, level=BIAS_LEVEL):
    """Raw ADU for one simcam detector given assembled electrons (Poisson + read noise added)."""
    electrons = np.broadcast_to(np.asarray(electrons, dtype=float), det.shape)
    raw = np.zeros(det.raw_shape)
    for k, amp in enumerate(det.amps):
        e = rng.poisson(np.clip(electrons[amp.detsec.slices], 0, None)).astype(float)
        e = e[:, ::-1] if amp.datasec.flip_x != amp.detsec.flip_x else e
        raw[amp.datasec.slices] = e / amp.gain
        for sec in (amp.datasec, amp.biassec, amp.pbiassec):
            raw[sec.slices] += level[k] + rng.normal(0, amp.read_noise / amp.gain, sec.shape)
    return np.clip(np.round(raw), 0, 65535).astype(np.uint16)


def write_raw(path, rng, *, obstype="object", filt="SIM-G", exptime=30.0, electrons=None, drop=(), shape=None):
    prim = fits.PrimaryHDU()
    cards = {"OBSTYPE": obstype, "FILTER": filt, "EXPTIME": exptime, "DATE-OBS": "2025-03-01T03:00:00.000",
             "RA": 150.1, "DEC": 2.2, "AIRMASS": 1.1, "OBJECT": "field", "EXPNUM": 7}
    for k, v in cards.items():
        if k not in drop:
            prim.header[k] = v
    hdus = [prim]
    for det in INST.detectors:
        data = _raw_detector(det, rng, 0.0 if electrons is None else electrons)
        if shape is not None and det.id == 2:
            data = data[: shape[0], : shape[1]]
        hdus.append(fits.ImageHDU(data, name=det.name))
    fits.HDUList(hdus).writeto(path)
    return str(path)


@pytest.fixture(scope="module")
def masters(tmp_path_factory):
    """Master bias and g flat for simcam built from synthetic frames (flat = 1 + 5% gradient)."""
    root = tmp_path_factory.mktemp("masters")
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[0:512, 0:512]
    response = 1.0 + 0.05 * (xx / 511.0 - 0.5)
    biases = [write_raw(root / f"b{i}.fits", rng, obstype="bias", exptime=0.0) for i in range(5)]
    flats = [write_raw(root / f"f{i}.fits", rng, obstype="flat", electrons=20000.0 * response) for i in range(5)]
    cfg = CalibConfig.from_dict({})
    build_master_bias(biases, INST, INST.detectors, root / "bias", cfg, group="20250228",
                      valid=("20250226", "20250303"))
    build_master_flat(flats, INST, INST.detectors, root / "flat", cfg, band="g", bias_dir=root / "bias",
                      group="20250228", valid=("20250226", "20250303"))
    return root, response


def test_isr_flat_sky_recovered_with_consistent_variance(masters):
    root, response = masters
    rng = np.random.default_rng(12)
    sky = 800.0
    det = INST.detector(0)
    raw = _raw_detector(det, rng, sky * response)
    with fits.open(root / "bias" / "bias_0.fits") as b, fits.open(root / "flat" / "flat_0.fits") as f:
        bias, flat = b["IMAGE"].data, f["IMAGE"].data
        defects = b["DEFECTS"].data | f["DEFECTS"].data
    image, mask, var = run_isr(raw, det, IsrConfig(), bias=bias, flat=flat, defects=defects)
    good = mask == 0
    assert good.mean() > 0.99
    # flat-fielded sky is flat and equal to the input sky (mean normalised flat => same mean level)
    level = sky * response.mean()
    assert abs(np.mean(image[good]) - level) < 3 * np.sqrt(level / good.sum()) + 0.5
    left, right = image[:, :50][good[:, :50]].mean(), image[:, -50:][good[:, -50:]].mean()
    assert abs(left - right) < 2.0  # the 5% gradient (40 e-) is gone
    # pixel scatter matches the variance plane (ratio within 5%)
    ratio = np.var(image[good]) / np.mean(var[good])
    assert ratio == pytest.approx(1.0, abs=0.05)


def _isr_cli(raw, outdir, root, *, flat_dir=None, night="20250301", extra=()):
    return cli.main([
        "isr", str(raw), "--instrument", "simcam", "--visit", "v7", "--band", "g", "--night", night,
        "--bias-dir", str(root / "bias"), "--flat-dir", str(flat_dir or root / "flat"),
        "--outdir", str(outdir), "--config-json", json.dumps({"isr": {"do_cosmic_rays": True}}), *extra,
    ])


def test_isr_cli_writes_all_detectors_with_provenance(masters, tmp_path):
    root, _ = masters
    raw = write_raw(tmp_path / "sci.fits", np.random.default_rng(13), electrons=500.0)
    assert _isr_cli(raw, tmp_path / "out", root) == 0
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == [f"v7_{d.id}.fits" for d in INST.detectors]
    with fits.open(tmp_path / "out" / "v7_1.fits") as h:
        assert [x.name for x in h] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]
        assert h["IMAGE"].header["BITPIX"] == -32 and h["MASK"].header["BITPIX"] == 32
        ph = h[0].header
        assert ph["SRSTEP"] == "isr" and ph["BAND"] == "g" and ph["DETECTOR"] == 1
        assert ph["SRIN0001"] == "sci.fits" and ph["SRIN0002"] == "bias_1.fits"
        assert h["MASK"].header["MP_SAT"] == 1


@pytest.mark.parametrize(
    "make, failure, cause",
    [
        ("truncated", "CorruptInput", "truncated"),
        ("no_exptime", "MissingKeyword", "EXPTIME"),
        ("unknown_filter", "UnknownFilter", "SIM-Q"),
        ("bad_shape", "ShapeMismatch", "shape"),
        ("not_fits", "CorruptInput", "not a readable FITS"),
    ],
)
def test_bad_input_one_line_error_no_output(masters, tmp_path, capfd, make, failure, cause):
    root, _ = masters
    rng = np.random.default_rng(14)
    path = tmp_path / f"{make}.fits"
    if make == "truncated":
        write_raw(path, rng)
        size = path.stat().st_size
        with open(path, "r+b") as fh:
            fh.truncate(size - 100_000)
    elif make == "no_exptime":
        write_raw(path, rng, drop=("EXPTIME",))
    elif make == "unknown_filter":
        write_raw(path, rng, filt="SIM-Q")
    elif make == "bad_shape":
        write_raw(path, rng, shape=(500, 560))
    else:
        path.write_text("SIMPLE = this is not a FITS file\n")
    before = path.read_bytes()
    out = tmp_path / "out"
    assert _isr_cli(path, out, root) == 2
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"{failure}: ") and str(path) in err and cause in err
    assert not out.exists() or os.listdir(out) == []  # nothing written, not even temporaries
    assert path.read_bytes() == before  # the input is never modified


def test_missing_or_expired_master_is_missing_calibration(masters, tmp_path, capfd):
    root, _ = masters
    raw = write_raw(tmp_path / "sci.fits", np.random.default_rng(15))
    assert _isr_cli(raw, tmp_path / "o1", root, flat_dir="none") == 2
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("MissingCalibration: ") and "sci.fits" in err and "no master flat in band g" in err
    # a master whose validity range (20250226..20250303) does not contain the night
    assert _isr_cli(raw, tmp_path / "o2", root, night="20250310") == 2
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("MissingCalibration: ") and "not for 20250310" in err
    assert not (tmp_path / "o2").exists() or os.listdir(tmp_path / "o2") == []


def test_provenance_command_prints_what_made_a_calexp(masters, tmp_path, capsys):
    root, _ = masters
    raw = write_raw(tmp_path / "sci.fits", np.random.default_rng(16))
    assert _isr_cli(raw, tmp_path / "out", root) == 0
    capsys.readouterr()
    assert cli.main(["provenance", "--json", str(tmp_path / "out" / "v7_2.fits")]) == 0
    rec = json.loads(capsys.readouterr().out)[str(tmp_path / "out" / "v7_2.fits")]
    assert rec["SRSTEP"] == "isr" and rec["inputs"] == ["sci.fits", "bias_2.fits", "flat_2.fits"]
    assert rec["params"]["isr"]["do_cosmic_rays"] is True and len(rec["SRCFGHSH"]) == 16
    # a file without provenance is a one-line error
    assert cli.main(["provenance", str(raw)]) == 2
    assert "records no surveyred provenance" in capsys.readouterr().err


def test_rerun_clears_temporaries_of_a_killed_writer(masters, tmp_path):
    """A writer killed mid-write leaves `.<name>.*.tmp`; the next write of that product removes it."""
    root, _ = masters
    raw = write_raw(tmp_path / "sci.fits", np.random.default_rng(17))
    out = tmp_path / "out"
    out.mkdir()
    debris = out / ".v7_0.fits.abc123.tmp"
    debris.write_bytes(b"half a FITS file")
    unrelated = out / ".other.fits.abc123.tmp"
    unrelated.write_bytes(b"not ours")
    assert _isr_cli(raw, out, root) == 0
    assert not debris.exists() and unrelated.exists()
    assert (out / "v7_0.fits").exists()
