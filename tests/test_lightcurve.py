"""Light curves (``surveyred lightcurve``) from the tiny survey's forced photometry (fixture ``tiny_forced``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from surveyred import cli
from surveyred import lightcurve as lcmod
from surveyred.errors import ConfigError


def test_table_holds_every_forced_measurement_sorted(tiny_forced):
    """One row per forced measurement, keyed by object id or user name, sorted by key then MJD; the fluxes
    are the forced ones unchanged."""
    c = tiny_forced
    lc = pd.read_parquet(c["lightcurves"])
    forced = pd.concat([pd.read_parquet(p) for p in c["forced"]], ignore_index=True)
    assert len(lc) == len(forced)
    sn = lc[lc.lc_id == "sn"]
    assert len(sn) == 8 and np.all(np.diff(sn.mjd.to_numpy()) > 0) and set(sn.band) == {"g", "r"}
    objs = lc[lc.kind == "object"]
    assert np.all(np.diff(objs.object_id.to_numpy()) >= 0)
    assert (objs.lc_id == objs.object_id.astype(str)).all()
    for key, d in objs.groupby("object_id"):
        assert np.all(np.diff(d.mjd.to_numpy()) >= 0)
    assert lc.index[lc.kind == "user"].min() > lc.index[lc.kind == "object"].max()  # objects first
    m = lc.merge(forced, on=["kind", "object_id", "name", "visit"], suffixes=("", "_f"))
    assert len(m) == len(lc)
    assert np.array_equal(m.psf_flux.to_numpy(), m.psf_flux_f.to_numpy(), equal_nan=True)
    assert (m["flags"] == m["flags_f"]).all()


def test_plots_written_reproducibly(tiny_forced, tmp_path):
    """PNGs of the requested light curves (the supernova's, and 'far' whose every point is flagged and
    flux-less); a rerun gives identical bytes."""
    import matplotlib.image as mpimg

    c = tiny_forced
    plots = c["out"] / "lightcurves" / "plots"
    for name in ("sn", "far"):
        img = mpimg.imread(plots / f"lc_{name}.png")
        assert img.shape[0] > 200 and img.shape[1] > 300
        # not a blank canvas: the points and axes make the image vary
        assert img[..., :3].std() > 0.05
    rc = cli.main(["lightcurve", "--forced", *map(str, c["forced"]), "--output", str(tmp_path / "lc.parquet"),
                   "--plot", "sn", "--plot-dir", str(tmp_path / "plots")])
    assert rc == 0
    assert (tmp_path / "plots" / "lc_sn.png").read_bytes() == (plots / "lc_sn.png").read_bytes()
    assert (tmp_path / "lc.parquet").read_bytes() != b""
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "lc.parquet"), pd.read_parquet(c["lightcurves"]))


def test_unknown_plot_name_and_duplicate_visit_are_errors(tiny_forced, tmp_path, capsys):
    c = tiny_forced
    out = tmp_path / "lc.parquet"
    rc = cli.main(["lightcurve", "--forced", *map(str, c["forced"]), "--output", str(out), "--plot", "nosuch"])
    err = capsys.readouterr().err
    assert rc == 2 and "ConfigError" in err and "nosuch" in err and not out.exists()
    rc = cli.main(["lightcurve", "--forced", str(c["forced"][0]), str(c["forced"][0]), "--output", str(out)])
    assert rc == 2 and "is in both" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ConfigError):
        lcmod.read_forced([])
