"""Tests of surveyred.ingest on small hand-built SimCam frames (and real frames when present)."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from astropy.io import fits

from surveyred import ingest
from surveyred.instrument import find_instrument_file, instrument_from_dict, load_instrument

SIMCAM = load_instrument("simcam")
RAW_SHAPE = SIMCAM.detectors[0].raw_shape  # (528, 560)


def write_frame(
    path: Path,
    *,
    obstype: str | None = "object",
    filt: str | None = "SIM-G",
    exptime: float | str | None = 30.0,
    date: str | None = "2025-03-01T23:30:00",
    expnum: int | None = 1000,
    ra: object = "10:30:00",
    dec: object = "-05:30:00",
    shapes: dict[int, tuple[int, int]] | None = None,
    n_ext: int = 4,
    filter_in: str = "primary",
    dtype=np.uint16,
) -> Path:
    """A SimCam multi-extension raw frame; ``None`` leaves a keyword out."""
    primary = fits.PrimaryHDU()
    h = primary.header
    for key, value in (("OBSTYPE", obstype), ("EXPTIME", exptime), ("DATE-OBS", date), ("EXPNUM", expnum),
                       ("RA", ra), ("DEC", dec), ("AIRMASS", 1.2), ("OBJECT", "field1")):
        if value is not None:
            h[key] = value
    if filt is not None and filter_in == "primary":
        h["FILTER"] = filt
    hdus = [primary]
    for i in range(n_ext):
        shape = (shapes or {}).get(i + 1, RAW_SHAPE)
        ext = fits.ImageHDU(np.full(shape, 1000, dtype=dtype), name=f"S{i}")
        if filt is not None and filter_in == "extension":
            ext.header["FILTER"] = filt
        hdus.append(ext)
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


def run_ingest(raw_dir: Path, tmp_path: Path, **kw) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    out, rej = tmp_path / "out" / "inventory.parquet", tmp_path / "out" / "rejects.parquet"
    argv = [str(raw_dir), "--instrument", kw.pop("instrument", "simcam"), "--output", str(out),
            "--rejects", str(rej), "--log", str(tmp_path / "out" / "ingest.log")]
    for key, value in kw.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    status = ingest.main(argv)
    return pd.read_parquet(out), pd.read_parquet(rej), status


@pytest.fixture
def raw_dir(tmp_path) -> Path:
    """Three good frames (bias, flat, science) and six bad ones."""
    raw = tmp_path / "raw"
    write_frame(raw / "20250301" / "bias_001.fits", obstype="zero", filt=None, exptime=0.0, expnum=1,
                date="2025-03-01T18:00:00", ra=None, dec=None)
    write_frame(raw / "20250301" / "flat_001.fits", obstype="dome flat", filt="SIM-R", exptime=5.0, expnum=2,
                date="2025-03-01T19:00:00")
    write_frame(raw / "20250301" / "sci_001.fits", expnum=3, date="2025-03-02T03:15:00")
    # truncated: cut in the middle of the last HDU's data
    good = write_frame(raw / "20250301" / "sci_trunc.fits", expnum=4)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) - 50_000])
    write_frame(raw / "20250301" / "sci_noexp.fits", exptime=None, expnum=5)
    write_frame(raw / "20250301" / "sci_badfilt.fits", filt="SIM-Z", expnum=6)
    write_frame(raw / "20250301" / "sci_shape.fits", expnum=7, shapes={3: (528, 540)})
    (raw / "20250301" / "notes.fits").write_text("this is not a FITS file\n" * 200)
    write_frame(raw / "20250301" / "sci_dup.fits", expnum=3)  # same EXPNUM as sci_001, sorts after it
    (raw / "20250301" / "README.txt").write_text("ignored: not a FITS suffix")
    return raw


def test_find_raw_files_sorted_and_filtered(tmp_path):
    raw = tmp_path / "raw"
    for name in ("b/z.fits", "a/y.FITS", "a/x.fit", "c/w.fits.fz", "c/v.fits.gz", "c/u.txt", ".hidden/t.fits",
                 "a/.s.fits", "a/r.fits.tmp"):
        (raw / name).parent.mkdir(parents=True, exist_ok=True)
        (raw / name).write_bytes(b"")
    found = ingest.find_raw_files(raw)
    names = [os.path.relpath(p, raw) for p in found]
    assert names == ["a/x.fit", "a/y.FITS", "b/z.fits", "c/v.fits.gz", "c/w.fits.fz"]
    assert all(p.startswith(str(raw)) for p in found)
    assert ingest.find_raw_files(tmp_path / "missing") == []


def test_good_frames_and_rejects(raw_dir, tmp_path):
    inv, rej, status = run_ingest(raw_dir, tmp_path)
    assert status == 0

    # inventory: one row per detector of each good exposure
    assert sorted(inv.file.unique()) == ["bias_001.fits", "flat_001.fits", "sci_001.fits"]
    assert len(inv) == 3 * len(SIMCAM.good_detectors)
    assert list(inv.columns) == [f.name for f in ingest.INVENTORY_SCHEMA]
    sci = inv[inv.file == "sci_001.fits"].sort_values("detector")
    assert sci.detector.tolist() == [0, 1, 2, 3]
    assert sci.detector_name.tolist() == ["S00", "S01", "S10", "S11"]
    assert sci.hdu.tolist() == [1, 2, 3, 4]
    row = sci.iloc[0]
    assert row.visit == "3"
    assert row.obstype == "science"
    assert row.physical_filter == "SIM-G" and row.band == "g"
    assert row.exptime == pytest.approx(30.0)
    assert row.date_obs == "2025-03-02T03:15:00.000"
    assert row.mjd == pytest.approx(60736.135416667, abs=1e-6)
    assert row.night == "20250301"  # 03:15 UTC belongs to the night that started on March 1
    assert row.ra == pytest.approx(157.5, abs=1e-9)
    assert row.dec == pytest.approx(-5.5, abs=1e-9)
    assert row.airmass == pytest.approx(1.2)
    assert row.object == "field1"
    assert (row.raw_ny, row.raw_nx) == RAW_SHAPE
    assert row.path == str(raw_dir / "20250301" / "sci_001.fits")

    bias = inv[inv.file == "bias_001.fits"].iloc[0]
    assert bias.obstype == "bias" and pd.isna(bias.band)
    assert pd.isna(bias.ra) and pd.isna(bias.dec)
    flat = inv[inv.file == "flat_001.fits"].iloc[0]
    assert flat.obstype == "flat" and flat.band == "r"

    # rejects: the right class, the file named in the message
    assert list(rej.columns) == ["path", "hdu", "failure_class", "message"]
    by_file = {Path(p).name: r for p, r in zip(rej.path, rej.itertuples())}
    expected = {
        "sci_trunc.fits": ("CorruptInput", "truncat"),
        "sci_noexp.fits": ("MissingKeyword", "EXPTIME"),
        "sci_badfilt.fits": ("UnknownFilter", "SIM-Z"),
        "sci_shape.fits": ("ShapeMismatch", "(528, 540)"),
        "notes.fits": ("CorruptInput", "not a readable FITS"),
        "sci_dup.fits": ("CorruptInput", "duplicate visit"),
    }
    assert set(by_file) == set(expected)
    assert len(rej) == len(expected)
    for name, (cls, text) in expected.items():
        r = by_file[name]
        assert r.failure_class == cls, (name, r.message)
        assert name in r.message and text in r.message, r.message
    # a problem in one HDU names it; whole-file problems have no HDU
    assert by_file["sci_shape.fits"].hdu == 3
    assert pd.isna(by_file["sci_noexp.fits"].hdu)
    assert pd.isna(by_file["sci_trunc.fits"].hdu)
    assert "sci_001.fits" in by_file["sci_dup.fits"].message

    log = (tmp_path / "out" / "ingest.log").read_text()
    assert "rejects by class: CorruptInput=3, MissingKeyword=1, ShapeMismatch=1, UnknownFilter=1" in log
    assert "by obstype: bias=1, flat=1, science=1" in log


def test_deterministic(raw_dir, tmp_path):
    inv1, rej1, _ = run_ingest(raw_dir, tmp_path / "a")
    inv2, rej2, _ = run_ingest(raw_dir, tmp_path / "b")
    pd.testing.assert_frame_equal(inv1, inv2)
    pd.testing.assert_frame_equal(rej1, rej2)
    for name in ("inventory.parquet", "rejects.parquet"):
        assert (tmp_path / "a" / "out" / name).read_bytes() == (tmp_path / "b" / "out" / name).read_bytes()


def test_missing_hdu_and_unclassifiable(tmp_path):
    raw = tmp_path / "raw"
    write_frame(raw / "three_ext.fits", n_ext=3, expnum=1)
    write_frame(raw / "weird.fits", obstype="focus", expnum=2)
    write_frame(raw / "nodate.fits", date="  ", expnum=3)
    write_frame(raw / "baddate.fits", date="yesterday", expnum=4)
    write_frame(raw / "nofilter.fits", filt=None, expnum=5)
    inv, rej, status = run_ingest(raw, tmp_path)
    assert status == 0 and len(inv) == 0
    got = {Path(p).name: (c, m) for p, c, m in zip(rej.path, rej.failure_class, rej.message)}
    assert got["three_ext.fits"][0] == "CorruptInput" and "S11" in got["three_ext.fits"][1]
    assert got["weird.fits"][0] == "Unclassifiable" and "'focus'" in got["weird.fits"][1]
    assert got["nodate.fits"][0] == "MissingKeyword" and "DATE-OBS" in got["nodate.fits"][1]
    assert got["baddate.fits"][0] == "MissingKeyword" and "yesterday" in got["baddate.fits"][1]
    assert got["nofilter.fits"][0] == "MissingKeyword" and "FILTER" in got["nofilter.fits"][1]
    assert all(name in msg for name, (_, msg) in got.items())


def test_keywords_from_extension_and_compressed_files(tmp_path):
    raw = tmp_path / "raw"
    write_frame(raw / "ext_filter.fits", filter_in="extension", expnum=11)
    # tile-compressed and gzip-compressed copies of good frames
    src = write_frame(tmp_path / "src.fits", expnum=12)
    with fits.open(src) as hdul:
        comp = [fits.PrimaryHDU(header=hdul[0].header)] + [
            fits.CompImageHDU(h.data, header=h.header, name=h.name) for h in hdul[1:]]
        fits.HDUList(comp).writeto(raw / "tile.fits.fz")
    import gzip
    import shutil

    src2 = write_frame(tmp_path / "src2.fits", expnum=13)
    with open(src2, "rb") as fin, gzip.open(raw / "whole.fits.gz", "wb") as fout:
        shutil.copyfileobj(fin, fout)
    gz = (raw / "whole.fits.gz").read_bytes()
    write_frame(tmp_path / "src3.fits", expnum=14)
    with open(tmp_path / "src3.fits", "rb") as fin, gzip.open(raw / "cut.fits.gz", "wb") as fout:
        shutil.copyfileobj(fin, fout)
    cut = (raw / "cut.fits.gz").read_bytes()
    (raw / "cut.fits.gz").write_bytes(cut[: len(cut) - 300])
    assert gz  # written

    inv, rej, _ = run_ingest(raw, tmp_path)
    assert sorted(inv.visit.unique()) == ["11", "12", "13"]
    assert set(inv[inv.visit == "11"].band) == {"g"}
    assert set(inv[inv.visit == "12"].raw_nx) == {RAW_SHAPE[1]}
    assert rej.failure_class.tolist() == ["CorruptInput"]
    assert "cut.fits.gz" in rej.message.iloc[0] and "truncated" in rej.message.iloc[0]


def test_braces_in_file_name_rejected(tmp_path):
    raw = tmp_path / "raw"
    write_frame(raw / "we{ird}.fits", expnum=1)
    inv, rej, _ = run_ingest(raw, tmp_path)
    assert inv.empty
    assert rej.failure_class.tolist() == ["CorruptInput"]
    assert "we{ird}.fits" in rej.message.iloc[0] and "rename" in rej.message.iloc[0]


def test_visit_from_file_name_and_night_offset(tmp_path):
    raw = tmp_path / "raw"
    write_frame(raw / "my frame#1.fits", expnum=None, date="2025-03-02T01:00:00")
    inv, rej, _ = run_ingest(raw, tmp_path, night_offset_hours=-10)
    assert rej.empty
    assert set(inv.visit) == {"my_frame_1"}
    # 01:00 UTC = 15:00 local on March 1 (UTC-10): after local noon -> the night starting March 1
    assert set(inv.night) == {"20250301"}
    inv, _, _ = run_ingest(raw, tmp_path / "east", night_offset_hours=+13)
    # 01:00 UTC = 14:00 local on March 2 -> the night starting March 2
    assert set(inv.night) == {"20250302"}


def test_detector_hdus_by_extname(tmp_path):
    doc = yaml.safe_load(find_instrument_file("simcam").read_text())
    for i, det in enumerate(doc["detectors"]):
        det["hdu"] = f"S{3 - i}"  # EXTNAMEs in the opposite order of the HDUs
    (tmp_path / "named.yaml").write_text(yaml.safe_dump(doc))
    raw = tmp_path / "raw"
    write_frame(raw / "a.fits", expnum=1)
    write_frame(raw / "b.fits", expnum=2, n_ext=3)  # no S3 -> detector 0 missing
    inv, rej, _ = run_ingest(raw, tmp_path, instrument=str(tmp_path / "named.yaml"))
    assert inv.sort_values("detector").hdu.tolist() == [4, 3, 2, 1]
    assert rej.failure_class.tolist() == ["CorruptInput"]
    assert "'S3' missing" in rej.message.iloc[0] and "b.fits" in rej.message.iloc[0]


def test_detector_subset(tmp_path):
    raw = tmp_path / "raw"
    write_frame(raw / "a.fits", expnum=1, shapes={4: (10, 10)})  # detector 3 broken
    inv, rej, _ = run_ingest(raw, tmp_path, detectors="0,1")
    assert rej.empty and sorted(inv.detector) == [0, 1]


def test_missing_raw_dir_fails(tmp_path, capsys):
    status = ingest.main([str(tmp_path / "nowhere"), "--instrument", "simcam", "--output",
                          str(tmp_path / "i.parquet"), "--rejects", str(tmp_path / "r.parquet")])
    assert status != 0
    assert "ConfigError" in capsys.readouterr().err
    assert not (tmp_path / "i.parquet").exists()


def test_empty_raw_dir_gives_empty_tables(tmp_path):
    (tmp_path / "raw").mkdir()
    inv, rej, status = run_ingest(tmp_path / "raw", tmp_path)
    assert status == 0 and inv.empty and rej.empty
    assert list(inv.columns) == [f.name for f in ingest.INVENTORY_SCHEMA]


@pytest.mark.parametrize(
    "value,hours,expected",
    [
        ("10:30:00", True, 157.5),
        ("-00:30:00", False, -0.5),
        ("+37:13:47.6", False, 37 + 13 / 60 + 47.6 / 3600),
        ("22 04 08", True, (22 + 4 / 60 + 8 / 3600) * 15),
        (41.329271, True, 41.329271),
        ("41.5", False, 41.5),
        ("12:30", True, 187.5),
        ("garbage", False, None),
        ("", True, None),
        (None, True, None),
    ],
)
def test_parse_angle(value, hours, expected):
    got = ingest.parse_angle(value, hours=hours)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize(
    "utc,offset,night",
    [
        ("2025-03-01T23:59:00", 0, "20250301"),
        ("2025-03-02T11:59:00", 0, "20250301"),
        ("2025-03-02T12:00:00", 0, "20250302"),
        ("2025-03-02T03:00:00", -4, "20250301"),
        ("2025-03-01T14:00:00", 10, "20250301"),  # local midnight starting March 2
        ("2025-03-02T02:00:00", 10, "20250302"),  # local noon March 2
    ],
)
def test_night_of(utc, offset, night):
    assert ingest.night_of(dt.datetime.fromisoformat(utc), offset) == night


def test_sanitize_visit():
    assert ingest.sanitize_visit(1234) == "1234"
    assert ingest.sanitize_visit(1234.0) == "1234"
    assert ingest.sanitize_visit(" a/b c:d ") == "a_b_c_d"
    assert ingest.file_stem("x/y.fits.fz") == "y"


def test_hierarch_filter_keyword_and_header_sections(tmp_path):
    doc = yaml.safe_load(find_instrument_file("simcam").read_text())
    doc["keywords"]["filter"] = "HIERARCH CAHA INS FILT1 NAME"
    inst_file = tmp_path / "hier.yaml"
    inst_file.write_text(yaml.safe_dump(doc))
    raw = tmp_path / "raw"
    path = write_frame(raw / "h.fits", filt=None, expnum=1)
    with fits.open(path, mode="update") as hdul:
        hdul[0].header["HIERARCH CAHA INS FILT1 NAME"] = "sim-i"
    inv, rej, _ = run_ingest(raw, tmp_path, instrument=str(inst_file))
    assert rej.empty
    assert set(inv.physical_filter) == {"SIM-I"} and set(inv.band) == {"i"}

    # one detector whose sections come from the frame's own header
    single = {
        "name": "onechip", "detectors": [{"id": 0, "name": "C0", "hdu": 0}],
        "layout": {"raw_shape": [64, 80], "amps": [{"name": "A", "datasec": "header:TRIMSEC",
                                                     "biassec": "header:BIASSEC"}]},
        "keywords": {"obstype": "IMAGETYP", "exptime": "EXPTIME", "date": "DATE-OBS", "filter": "FILTER"},
        "obstypes": {"bias": ["zero"], "science": ["object"]}, "filters": {"V": "V"},
    }
    instrument_from_dict(single)  # valid description
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(single))
    raw1 = tmp_path / "raw1"
    raw1.mkdir()
    for name, trimsec in (("ok.fits", "[17:80,1:64]"), ("bad.fits", "[5:80,1:64]"), ("none.fits", None)):
        hdu = fits.PrimaryHDU(np.zeros((64, 80), np.uint16))
        hdu.header.update({"IMAGETYP": "object", "EXPTIME": 1.0, "DATE-OBS": "2025-01-01", "FILTER": "V",
                           "BIASSEC": "[2:12,1:64]"})
        if trimsec:
            hdu.header["TRIMSEC"] = trimsec
        hdu.writeto(raw1 / name)
    inv, rej, _ = run_ingest(raw1, tmp_path / "one", instrument=str(tmp_path / "one.yaml"))
    assert inv.file.tolist() == ["ok.fits"] and inv.hdu.tolist() == [0]
    assert inv.date_obs.tolist() == ["2025-01-01T00:00:00.000"]
    got = dict(zip(rej.path.map(lambda p: Path(p).name), rej.failure_class))
    assert got == {"bad.fits": "ShapeMismatch", "none.fits": "ShapeMismatch"}
    assert "TRIMSEC" in rej[rej.path.str.endswith("none.fits")].message.iloc[0]


@pytest.mark.real
def test_real_cafos_frames(shared_real_dir, tmp_path):
    raw = shared_real_dir / "caha_cafos_ngc2420"
    if not (raw.is_dir() and find_instrument_file("cafos").exists()):
        pytest.skip("CAFOS frames or instrument file absent")
    inv, rej, status = run_ingest(raw, tmp_path, instrument="cafos")
    assert status == 0 and rej.empty
    counts = inv.groupby("obstype").size().to_dict()
    assert counts == {"bias": 2, "flat": 2, "science": 11}
    sci = inv[inv.obstype == "science"]
    assert set(sci.band) == {"B", "V"} and set(sci.night) == {"20210328"}
    assert set(inv[inv.obstype == "bias"].night) == {"20210318"}
    assert sci.ra.between(114.9, 115.0).all() and sci.dec.between(21.5, 21.6).all()
    assert set(inv.visit) == {p.name[: -len(".fits")] for p in raw.rglob("*.fits")}


@pytest.mark.real
def test_real_saao_frame_sexagesimal_and_header_sections(shared_real_dir, tmp_path):
    frame = shared_real_dir / "overscan" / "SAAO1m_STE3_object_a8280271.fits"
    if not frame.exists():
        pytest.skip("SAAO frame absent")
    inst = load_instrument("saao_ste3")
    rows, rejects = ingest.inspect_file(str(frame), inst, inst.good_detectors)
    # SAAO's FILTERS card holds wheel positions with no shipped band mapping: an object
    # frame is therefore an UnknownFilter reject, with the value in the message
    assert not rows
    assert [r["failure_class"] for r in rejects] == ["UnknownFilter"]
    assert frame.name in rejects[0]["message"] and "48" in rejects[0]["message"]
    # with a mapping, the sexagesimal RA (hours) / Dec and the date-only DATE-OBS parse
    doc = yaml.safe_load(find_instrument_file("saao_ste3").read_text())
    doc["filters"] = {"48": "V"}
    doc["keywords"]["ra"], doc["keywords"]["dec"] = "RA", "DEC"
    inst2 = instrument_from_dict(doc)
    rows, rejects = ingest.inspect_file(str(frame), inst2, inst2.good_detectors)
    assert not rejects
    assert rows[0]["ra"] == pytest.approx((22 + 4 / 60 + 8 / 3600) * 15)
    assert rows[0]["dec"] == pytest.approx(-(55 / 60 + 31 / 3600))
    assert rows[0]["date_obs"].startswith("2013-07-13T00:00:00")
