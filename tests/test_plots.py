"""QA plots (surveyred.plots): layout, values drawn, stretch, reproducible PNGs, the results-tree command."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from matplotlib.collections import PatchCollection
from matplotlib.image import imread

from surveyred import plots as P
from surveyred.instrument import load_instrument

SCALE = 0.4  # arcsec / px (SimCam)
RA0, DEC0 = 150.1, 2.2


EPOCH = 2024.14
PM_RA, PM_DEC = 30.0, -20.0  # mas/yr of every reference star


def _simcam_tree(results, *, bands=("g", "r"), n_visits=3, seed=2, shift_det3_mas=0.0):
    """A results tree with visit summaries and calsrc catalogs of a SimCam survey of point sources.

    Detector d has PSF FWHM 3 + 0.25 d px and zero point 27 + 0.01 d mag in every
    visit; stars carry 10 mmag and 10 mas noise; detector 3's positions are
    shifted east by ``shift_det3_mas``.  ``results/refcat/sim`` is the reference
    catalog of the true positions at epoch 2016.0 with proper motions.
    """
    from surveyred import refcat
    rng = np.random.default_rng(seed)
    inst = load_instrument("simcam")
    fp = inst.extra["simulation"]["focal_plane"]
    n = 400
    u, v = rng.uniform(-560, 560, n), rng.uniform(-560, 560, n)
    mag = rng.uniform(16, 21, n)
    ra_t = RA0 + u * SCALE / 3600 / math.cos(math.radians(DEC0))
    dec_t = DEC0 + v * SCALE / 3600
    dt = EPOCH - 2016.0
    refcat.write_store(pd.DataFrame({
        "id": np.arange(n), "ra": ra_t - PM_RA * dt / 3.6e6 / math.cos(math.radians(DEC0)),
        "dec": dec_t - PM_DEC * dt / 3.6e6, "pm_ra": PM_RA, "pm_dec": PM_DEC, "epoch": 2016.0, "r_mag": mag}),
        results / "refcat", "sim")
    k = 0
    for band in bands:
        for j in range(n_visits):
            visit = str(1000 + 100 * bands.index(band) + j)
            rows = []
            for det in inst.detectors:
                cx, cy = fp[det.id]
                x, y = u - cx + 255.5, v - cy + 255.5
                on = (x >= 0) & (x < 512) & (y >= 0) & (y < 512)
                m = on.sum()
                err = (0.01 * 10 ** (0.4 * (mag[on] - 19))).clip(0.003)
                df = pd.DataFrame({
                    "source_id": np.arange(m), "x": x[on], "y": y[on], "x_err": np.full(m, 0.025),
                    "y_err": np.full(m, 0.025), "fwhm": np.full(m, 3.0 + 0.25 * det.id), "snr": 1.0857 / err,
                    "ra": ra_t[on] + (rng.normal(0, 10, m) + (shift_det3_mas if det.id == 3 else 0.0))
                    / 3.6e6 / math.cos(math.radians(DEC0)),
                    "dec": dec_t[on] + rng.normal(0, 10, m) / 3.6e6,
                    "mag": mag[on] + rng.normal(0, 1, m) * np.hypot(err, 0.01), "mag_err": err,
                    "ref_sep_mas": np.abs(rng.normal(0, 15, m)), "astrom_used": np.ones(m, bool),
                    "ref_id": np.flatnonzero(on).astype(np.int64),
                    "flag_saturated": np.zeros(m, bool),
                })
                t = pa.Table.from_pandas(df, preserve_index=False)
                meta = dict(t.schema.metadata)
                meta.update({b"visit": visit.encode(), b"band": band.encode(), b"detector": str(det.id).encode(),
                             b"psf_fwhm": str(3.0 + 0.25 * det.id).encode(), b"zero_point": b"27.0",
                             b"epoch": str(EPOCH).encode()})
                out = results / "calsrc" / "20240220" / visit / f"{visit}_{det.id}.parquet"
                out.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(t.replace_schema_metadata(meta), out)
                rows.append({"visit": visit, "night": "20240220", "band": band, "detector": det.id,
                             "psf_fwhm": 3.0 + 0.25 * det.id, "zero_point": 27.0 + 0.01 * det.id + 0.05 * j,
                             "status": "ok"})
                k += 1
            out = results / "visit_summary" / "20240220" / f"{visit}.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(rows).to_parquet(out, index=False)
    return results


def test_simcam_layout_from_instrument():
    layout = P.detector_layout(load_instrument("simcam"), [0, 1, 2, 3])
    # centres (+-276, +-276) px, 512x512 detectors: lower-left corners at -532 and 20, 40-px gaps
    assert layout[0] == (-532.0, -532.0, 512.0, 512.0)
    assert layout[3] == (20.0, 20.0, 512.0, 512.0)
    assert layout[1][0] - (layout[0][0] + layout[0][2]) == pytest.approx(40.0)
    # without an instrument: a grid with no overlaps
    grid = P.detector_layout(None, [5, 7, 9])
    boxes = sorted(grid.values())
    assert len(boxes) == 3 and all(b[0] + b[2] <= c[0] or b[1] + b[3] <= c[1] for b, c in zip(boxes, boxes[1:]))


def test_focal_plane_maps_draw_the_detector_medians(tmp_path):
    results = _simcam_tree(tmp_path / "results", bands=("g",))
    summary = pd.concat([pd.read_parquet(p) for p in sorted((results / "visit_summary").rglob("*.parquet"))])
    layout = P.detector_layout(load_instrument("simcam"), [0, 1, 2, 3])
    fwhm_fig, zp_fig = P.focal_plane_plots(summary, layout, pixel_scale=SCALE)
    (coll,) = [c for c in fwhm_fig.axes[0].collections if isinstance(c, PatchCollection)]
    # FWHM (3 + 0.25 d) px x 0.4 arcsec/px, detectors in id order
    np.testing.assert_allclose(coll.get_array(), [(3.0 + 0.25 * d) * SCALE for d in range(4)], rtol=1e-12)
    (coll,) = [c for c in zp_fig.axes[0].collections if isinstance(c, PatchCollection)]
    # median over visits of 27 + 0.01 d + 0.05 j is 27.05 + 0.01 d; minus the band median (27.065): mmag
    np.testing.assert_allclose(coll.get_array(), [10.0 * d - 15.0 for d in range(4)], atol=1e-6)


def test_asinh_stretch_is_asinh_of_sky_subtracted_image():
    rng = np.random.default_rng(0)
    img = 100.0 + rng.normal(0, 2.0, (200, 200))
    img[100, 100] = 1e5
    img[0, 0] = np.nan
    out = P.asinh_stretch(img, softening_sigma=3.0)
    assert out[0, 0] == 0.0 and out.min() >= 0 and out.max() == 1.0
    # 0 at one sigma below the sky, 1 at the 99.8th percentile of a = asinh((I - sky) / (3 sigma))
    sky = np.nanmedian(img)
    sigma = 1.4826 * np.nanmedian(np.abs(img - sky))
    a = np.arcsinh((img - sky) / (3.0 * sigma))
    lo, top = np.arcsinh(-1.0 / 3.0), np.percentile(a[np.isfinite(a)], 99.8)
    probe = (slice(50, 60), slice(50, 60))
    np.testing.assert_allclose(out[probe], np.clip((a[probe] - lo) / (top - lo), 0, 1), rtol=1e-12)
    # Gaussian noise: 1 sigma below the sky and lower is black, ~16 % of the pixels
    assert np.mean(out[np.isfinite(img)] == 0.0) == pytest.approx(0.159, abs=0.01)


def test_png_is_reproducible_and_has_no_software_stamp(tmp_path):
    fig = P.message_figure("t", "hello")
    P.save_png(fig, tmp_path / "a.png")
    P.save_png(P.message_figure("t", "hello"), tmp_path / "b.png")
    a = (tmp_path / "a.png").read_bytes()
    assert a == (tmp_path / "b.png").read_bytes()
    assert b"Software" not in a and b"Matplotlib" not in a
    assert imread(tmp_path / "a.png").shape == (250, 600, 4)  # 6 x 2.5 in at 100 dpi


def test_coadd_thumbnail_shows_the_star_where_it_is(tmp_path):
    ny, nx = 300, 500
    yy, xx = np.mgrid[:ny, :nx]
    img = 5.0 + np.random.default_rng(1).normal(0, 1, (ny, nx)) + 5e3 * np.exp(-((xx - 400) ** 2 + (yy - 60) ** 2) / 8.0)
    hdul = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(img.astype(np.float32), name="IMAGE")])
    hdul[0].header.update(TRACT=0, PATCH="1,2", BAND="r", NINPUTS=4)
    path = tmp_path / "coadd.fits"
    hdul.writeto(path)
    fig = P.coadd_thumbnail_figure(path, pixels=250)  # block-averaged by 2
    shown = np.ma.filled(fig.axes[0].images[0].get_array(), 0.0)
    assert shown.shape == (150, 250)
    # the star (x 400, y 60 -> 200, 30 after 2x2 binning) is at the top of the stretch; the stretch clips
    # at the 99.8th percentile, so at most 0.2 % of the pixels are white, and the sky stays dark
    assert shown[30, 199] == 1.0 and shown[29, 200] == 1.0
    assert np.mean(shown == 1.0) <= 0.002 + 1e-9
    assert 0.05 < np.median(shown[80:, :150]) < 0.4  # the sky: dark grey (1 sigma below it is black)
    assert "patch 1,2 band r (4 inputs)" in fig.axes[0].get_title()
    out = tmp_path / "t.png"
    assert P.main(["--coadd", str(path), "--output", str(out), "--config-json", '{"plots": {"thumbnail_pixels": 250}}']) == 0
    assert imread(out).shape[0] > 100
    # a patch's bands side by side, in band order whatever the argument order
    hdul[0].header["BAND"] = "g"
    path_g = tmp_path / "coadd_g.fits"
    hdul.writeto(path_g)
    fig2 = P.coadd_thumbnail_figure([path, path_g], pixels=250)
    assert [ax.get_title().split(" band ")[1][0] for ax in fig2.axes] == ["g", "r"]
    assert fig2.axes[0].get_position().x1 <= fig2.axes[1].get_position().x0
    out2 = tmp_path / "t2.png"
    assert P.main(["--coadd", str(path), str(path_g), "--output", str(out2)]) == 0
    assert imread(out2).shape[1] > imread(out).shape[1]


def test_corrupt_coadd_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "c.fits"
    bad.write_bytes(b"SIMPLE  = nonsense")
    assert P.main(["--coadd", str(bad), "--output", str(tmp_path / "t.png")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"CorruptInput: {bad}")
    assert not (tmp_path / "t.png").exists()


def test_lightcurves_tolerant_of_missing_table_and_columns():
    fig = P.lightcurve_figure(None, reason="light-curve table not found: x.parquet")
    assert "not found" in fig.axes[0].texts[0].get_text()
    bad = pd.DataFrame({"name": ["a"], "mjd": [1.0], "flux": [2.0]})
    assert "lacks" in P.lightcurve_figure(bad).axes[0].texts[0].get_text()
    lc = pd.DataFrame({"name": ["sn", "sn", "sn", "star"], "mjd": [1.0, 2.0, 3.0, 1.0], "band": ["g", "g", "r", "g"],
                       "flux_njy": [10.0, 20.0, 15.0, 5.0], "flux_njy_err": [1.0, 1.0, 1.0, 1.0], "flags": [0, 0, 1, 0]})
    fig = P.lightcurve_figure(lc, objects=["sn"])
    assert len(fig.axes) == 1 and fig.axes[0].get_title() == "sn"
    # g: 2 unflagged points; r: its single point is flagged (hollow)
    lines = [line for line in fig.axes[0].lines if len(line.get_xdata())]
    assert sorted(len(line.get_xdata()) for line in lines) == [1, 2]
    # the `surveyred lightcurve` flavour: lc_id, kind, psf_flux (nJy), flagged; user positions by default
    lc2 = pd.DataFrame({"lc_id": ["SN1", "SN1", "17", "17"], "kind": ["user", "user", "object", "object"],
                        "object_id": [-1, -1, 17, 17], "name": ["SN1", "SN1", "", ""], "mjd": [1.0, 2.0, 1.0, 2.0],
                        "band": ["r"] * 4, "psf_flux": [100.0, 300.0, 5.0, 5.0], "psf_flux_err": [3.0] * 4,
                        "flags": [0, 4, 0, 0], "flagged": [False, False, False, False]})
    fig = P.lightcurve_figure(lc2)
    assert [ax.get_title() for ax in fig.axes] == ["SN1"]
    (line,) = [ln for ln in fig.axes[0].lines if len(ln.get_xdata())]
    np.testing.assert_array_equal(line.get_ydata(), [100.0, 300.0])  # `flagged` wins over informational flags
    assert [ax.get_title() for ax in P.lightcurve_figure(lc2, objects=["17"]).axes] == ["17"]


def test_status_table_counts():
    status = pd.DataFrame({
        "kind": ["ccd"] * 6 + ["job"], "night": ["1"] * 4 + ["2"] * 2 + ["1"], "band": ["g"] * 6 + ["r"],
        "visit": ["a", "a", "b", "b", "c", "c", ""], "detector": [0, 1, 0, 1, 0, 1, -1],
        "state": ["ok", "failed", "ok", "ok", "pending", "pending", "failed"], "stage": ["calibrate"] * 7,
        "failure_class": ["", "TooFewStars", "", "", "", "", "MissingCalibration"],
        "message": ["", "3 stars", "", "", "", "", "no flat"]})
    fig = P.status_figure(status)
    cells = {(i, j): c.get_text().get_text() for (i, j), c in fig.axes[0].tables[0].get_celld().items()}
    # band g night 1: 3 ok, 1 failed; night 2: 2 pending
    assert [cells[(1, j)] for j in range(6)] == ["g", "1", "3", "1", "0", "0"]
    assert [cells[(2, j)] for j in range(6)] == ["g", "2", "0", "0", "0", "2"]
    fails = {(i, j): c.get_text().get_text() for (i, j), c in fig.axes[1].tables[0].get_celld().items()}
    assert {fails[(1, 6)], fails[(2, 6)]} == {"TooFewStars", "MissingCalibration"}


def test_qa_plots_command_on_a_results_tree(tmp_path):
    results = _simcam_tree(tmp_path / "results")
    out1, out2 = tmp_path / "p1", tmp_path / "p2"
    for out in (out1, out2):
        assert P.main([str(results), "--outdir", str(out), "--instrument", "simcam",
                       "--refcat-astrom", str(results / "refcat" / "sim"), "--lightcurves", str(results / "lightcurves" / "lightcurves.parquet")]) == 0
    for name in P.PLOT_FILES:
        img = imread(out1 / name)
        assert img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.01  # not blank
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name


def test_repeatability_plot_bright_sample_matches_metrics(tmp_path):
    from surveyred import metrics as M

    results = _simcam_tree(tmp_path / "results", bands=("r",), n_visits=4)
    calsrc = M.read_calsrc(sorted(str(p) for p in (results / "calsrc").rglob("*.parquet")))
    fig = P.repeatability_figure(calsrc)
    ax = fig.axes[0]
    bright = np.asarray(ax.collections[1].get_offsets())
    stars = M.build_star_set(calsrc, "r", M.MetricsConfig())
    n_bright = int((stars.stars["bright"] & (stars.stars["n_visits"] >= 2)).sum())
    assert len(bright) == n_bright > 50
    # the bright stars' rms scatter about the injected floor: 10 mmag (+ photon part), median within 30 %
    assert np.median(bright[:, 1]) == pytest.approx(10.0 * math.sqrt(1 + 0.5), rel=0.3)


def test_reference_residuals_recover_an_injected_detector_shift(tmp_path):
    from surveyred import metrics as M

    results = _simcam_tree(tmp_path / "results", bands=("r",), shift_det3_mas=40.0)
    calsrc = M.read_calsrc(sorted(str(p) for p in (results / "calsrc").rglob("*.parquet")))
    res = P.reference_residuals(calsrc, str(results / "refcat" / "sim"))
    assert len(res) == len(calsrc)
    per_det = res.groupby("detector")[["dra_mas", "ddec_mas"]].mean()
    n = res.groupby("detector").size()
    # 10 mas noise per coordinate: the mean over n sources has sigma 10/sqrt(n) < 1.5 mas; 5 sigma
    tol = 5 * 10 / np.sqrt(n.min())
    assert per_det.loc[3, "dra_mas"] == pytest.approx(40.0, abs=tol)
    assert np.all(np.abs(per_det.loc[[0, 1, 2], "dra_mas"]) < tol)
    assert np.all(np.abs(per_det["ddec_mas"]) < tol)  # the proper motion (-20 mas/yr over 8 yr) was applied
    # the figure's binned vectors: cells over detector 3 point east by ~40 mas
    layout = P.detector_layout(load_instrument("simcam"), [0, 1, 2, 3])
    fig = P.astrometric_residual_figure(calsrc, layout, bins=4, refcat_dir=str(results / "refcat" / "sim"))
    q = fig.axes[0].collections[0]
    east = q.U[(q.X > 20) & (q.Y > 20)]
    assert np.median(east) == pytest.approx(40.0, abs=5.0)
    assert np.median(np.abs(q.U[(q.X < 0) & (q.Y < 0)])) < 5.0
