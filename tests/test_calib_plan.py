"""Validity ranges of master calibrations and their assignment to science visits."""

import pandas as pd
import pytest

from surveyred.calib import plan_calibrations
from surveyred.errors import ConfigError


def _inventory(rows):
    out = []
    for i, (obstype, night, band) in enumerate(rows):
        date = f"{night[:4]}-{night[4:6]}-{night[6:]}T{20 + i % 4:02d}:00:00.000"
        for det in (0, 1):
            out.append(dict(path=f"raw/{night}/f{i:03d}.fits", obstype=obstype, night=night, band=band,
                            date_obs=date, visit=f"v{i:03d}", detector=det))
    return pd.DataFrame(out)


@pytest.fixture()
def inventory():
    rows = [("bias", "20250301", None)] * 3 + [("bias", "20250305", None)] * 3
    rows += [("flat", "20250301", "g")] * 2 + [("flat", "20250301", "r")] * 2 + [("flat", "20250305", "r")] * 2
    for night in ("20250301", "20250303", "20250304", "20250305", "20250307", "20250309"):
        rows += [("science", night, "g"), ("science", night, "r")]
    return _inventory(rows)


def test_night_mode_ranges_split_midway(inventory):
    plan = plan_calibrations(inventory, {"mode": "night", "max_days": 3})
    assert sorted(plan.bias_groups) == ["20250301", "20250305"]
    assert all(len(v) == 3 for v in plan.bias_groups.values())  # one path per file, not per detector
    # +-3 days, split midway (gap 4 days: 0301 keeps up to 0303, 0305 starts at 0304)
    assert plan.validity["20250301"] == ("20250226", "20250303")
    assert plan.validity["20250305"] == ("20250304", "20250308")
    # a band with flats on one night only keeps the full +-3 days
    assert plan.validity[("20250301", "g")] == ("20250226", "20250304")
    sci = plan.science.set_index(["night", "band"])
    assert sci.loc[("20250303", "g"), "bias_group"] == "20250301"
    assert sci.loc[("20250304", "g"), "bias_group"] == "20250305"
    assert sci.loc[("20250304", "g"), "flat_group"] == "20250301"
    assert sci.loc[("20250304", "r"), "flat_group"] == "20250305"
    # out of every range: no master, so ISR will fail with MissingCalibration
    assert sci.loc[("20250309", "g"), "bias_group"] is None
    assert sci.loc[("20250305", "g"), "flat_group"] is None
    assert plan.flat_bias[("20250305", "r")] == "20250305"


def test_every_science_night_in_at_most_one_range(inventory):
    plan = plan_calibrations(inventory, {"mode": "night", "max_days": 10})
    ranges = [v for k, v in plan.validity.items() if isinstance(k, str)]
    nights = pd.date_range("2025-02-15", "2025-03-20").strftime("%Y%m%d")
    for night in nights:
        assert sum(lo <= night <= hi for lo, hi in ranges) <= 1


def test_ranges_mode(inventory):
    validity = {"mode": "ranges", "ranges": [
        {"name": "run1", "start": "2025-03-01", "end": "2025-03-04"},
        {"name": "run2", "start": "2025-03-04", "end": "2025-03-08"},
    ]}
    plan = plan_calibrations(inventory, validity)
    assert set(plan.bias_groups) == {"run1", "run2"}
    assert set(plan.flat_groups) == {("run1", "g"), ("run1", "r"), ("run2", "r")}
    sci = plan.science.set_index(["night", "band"])
    assert sci.loc[("20250303", "r"), "flat_group"] == "run1"
    assert sci.loc[("20250307", "r"), "flat_group"] == "run2"
    assert sci.loc[("20250307", "g"), "flat_group"] is None  # no g flats in run2
    assert sci.loc[("20250309", "r"), "bias_group"] is None  # after the last range


def test_overlapping_ranges_rejected(inventory):
    validity = {"mode": "ranges", "ranges": [
        {"name": "a", "start": "2025-03-01", "end": "2025-03-05"},
        {"name": "b", "start": "2025-03-04", "end": "2025-03-08"},
    ]}
    with pytest.raises(ConfigError, match="'a' and 'b' overlap"):
        plan_calibrations(inventory, validity)


def test_unknown_mode_rejected(inventory):
    with pytest.raises(ConfigError, match="must be 'night' or 'ranges'"):
        plan_calibrations(inventory, {"mode": "weekly"})
