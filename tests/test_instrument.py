"""Instrument descriptions: shipped files load; inconsistent ones are rejected clearly."""

import copy

import pytest
import yaml

from surveyred.errors import InstrumentError, ShapeMismatch
from surveyred.instrument import INSTRUMENT_DIRS, Section, instrument_from_dict, load_instrument

SHIPPED = sorted(p.stem for p in INSTRUMENT_DIRS[0].glob("*.yaml"))


@pytest.fixture()
def simcam_doc():
    with open(INSTRUMENT_DIRS[0] / "simcam.yaml") as fh:
        return yaml.safe_load(fh)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_instruments_load(name):
    inst = load_instrument(name)
    assert inst.name == name
    assert inst.detectors
    for det in inst.detectors:
        if not any(a.needs_header for a in det.amps):
            ny, nx = det.shape
            # amplifiers tile the detector exactly once
            assert sum(a.detsec.nx * a.detsec.ny for a in det.amps) == nx * ny


def test_anchor_cameras_geometry():
    if "megacam" in SHIPPED:
        mc = load_instrument("megacam")
        assert len(mc.detectors) == 36
        assert all(len(d.amps) == 2 for d in mc.detectors)
    if "decam" in SHIPPED:
        dc = load_instrument("decam")
        assert len(dc.detectors) == 62
        assert all(len(d.amps) == 2 for d in dc.detectors)
        assert {31, 61} <= set(dc.bad_detectors)
        assert len(dc.good_detectors) == 60


def test_section_parse_and_flip():
    s = Section.parse("[10:1, 5:8]")
    assert s.flip_x and not s.flip_y
    assert s.shape == (4, 10)
    assert s.slices == (slice(4, 8), slice(0, 10))
    with pytest.raises(ValueError, match="not a FITS section"):
        Section.parse("10:1,5:8")
    with pytest.raises(ValueError, match="below 1"):
        Section.parse("[0:10,1:8]")


def test_simcam_lookups():
    inst = load_instrument("simcam")
    assert inst.classify(" Object ") == "science"
    assert inst.classify("dome  flat") == "flat"
    assert inst.classify("arc") is None
    assert inst.band_of("sim-r").band == "r"
    assert inst.band_of("SIM-Z") is None
    det = inst.detector(1)
    assert det.shape == (512, 512)
    gains = det.gain_map()
    assert gains[0, 0] == pytest.approx(1.62) and gains[0, -1] == pytest.approx(1.41)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["layout"]["amps"][0].update(biassec="[250:280,1:512]"), "overlaps"),
        (lambda d: d["layout"]["amps"][1].update(datasec="[305:600,1:512]"), "outside the raw frame"),
        (lambda d: d["layout"]["amps"][1].update(detsec="[200:455,1:512]"), r"amp A detsec \[1:256,1:512\] overlaps amp B"),
        (lambda d: d["layout"]["amps"][0].update(detsec="[1:255,1:512]"), "size differs"),
        (lambda d: d["layout"]["amps"][0].update(biassec="[257:280,1:500]"), "does not span the data rows"),
        (lambda d: d["detectors"][2]["amp_overrides"]["B"].update(gain=-1.5), "S10 amp B: gain must be positive"),
        (lambda d: d["detectors"].append(dict(d["detectors"][0], hdu=9, name="X")), "duplicate detector id"),
        (lambda d: d["detectors"][1].update(hdu=1), "HDU 1 used twice"),
        (lambda d: d.update(bad_detectors=[7]), "are not detectors"),
        (lambda d: d["keywords"].pop("exptime"), "lacks"),
        (lambda d: d["filters"].update({"X": {"refcat_band": "g"}}), "has no band"),
        (lambda d: d.update(colour="blue"), "unknown top-level keys"),
        (lambda d: d["layout"]["amps"][0].update(datasec="1:256,1:512"), "not a FITS section"),
    ],
)
def test_inconsistent_instrument_rejected(simcam_doc, mutate, message):
    doc = copy.deepcopy(simcam_doc)
    mutate(doc)
    with pytest.raises(InstrumentError, match=message) as info:
        instrument_from_dict(doc, source="bad.yaml")
    assert "bad.yaml" in str(info.value)


def test_unknown_instrument_names_known_ones():
    with pytest.raises(InstrumentError, match="unknown instrument 'nosuch'.*simcam"):
        load_instrument("nosuch")


def test_header_sections_resolved_and_checked():
    inst = load_instrument("saao_ste3")
    det = inst.detectors[0]
    header = {"TRIMSEC": "[  17: 528,   1: 520]", "BIASSEC": "[   4:  13,   1: 520]"}
    r = det.resolved(header, where="f.fits")
    assert r.shape == (520, 512)
    assert str(r.amps[0].biassec) == "[4:13,1:520]"
    with pytest.raises(ShapeMismatch, match="f.fits.*BIASSEC missing"):
        det.resolved({"TRIMSEC": header["TRIMSEC"]}, where="f.fits")
    with pytest.raises(ShapeMismatch, match="overlaps"):
        det.resolved({"TRIMSEC": "[10:528,1:520]", "BIASSEC": header["BIASSEC"]}, where="f.fits")
