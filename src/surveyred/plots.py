"""Quality-assurance plots (PNG, matplotlib Agg) for the report: ``surveyred qa-plots``.

Two modes::

    surveyred qa-plots RESULTS_DIR --outdir results/qa/plots [--instrument simcam]
        [--metrics results/qa/metrics.parquet] [--status results/qa/status.parquet]
        [--lightcurves results/lightcurves/lightcurves.parquet] [--objects NAME ...]
    surveyred qa-plots --coadd coadd/{tract}/{patch}/*.fits --output thumb.png

The first writes a fixed set of files (so a rule can declare them), each a
figure with one panel per band where that applies:

======================================  ==============================================================
``focal_plane_psf_fwhm.png``            median PSF FWHM (arcsec when the pixel scale is known) of
                                        every detector over the visits of a band, drawn at the
                                        detector's place in the focal plane (instrument YAML
                                        ``simulation.focal_plane``; else detectors on a grid)
``focal_plane_zero_point.png``          median zero point of every detector relative to the
                                        band's median (mmag), same layout
``astrometric_residuals.png``           per band: astrometric residual vectors (mas), median in
                                        focal-plane bins: against the reference stars of the fit
                                        with ``--refcat-astrom``, else each bright star's
                                        measurement minus its mean position over visits; below, the
                                        histogram of the distance to the matched reference star
                                        (``ref_sep_mas``)
``photometric_repeatability.png``       per band: rms of each star's magnitudes over visits (mmag)
                                        against its mean magnitude, binned medians, the median
                                        reported error, and the PA1 of ``metrics.parquet`` with the
                                        SRD design threshold
``lightcurves.png``                     flux (nJy) against MJD per band of the requested objects
                                        (``--objects``; default the objects of the table, at most
                                        ``max_lightcurves``), flagged points hollow
``status_table.png``                    the production status per band and night (ok / failed /
                                        running / pending CCDs) and the failures with their class
======================================  ==============================================================

A plot whose inputs are absent (no light curves yet, no status table) is still
written and says so in the figure, so the set of outputs does not change; the
log says it too.  The second mode writes an asinh-stretched thumbnail of one
coadd's IMAGE HDU (nJy per pixel).

Every PNG is reproducible: the Agg backend, fixed sizes and DPI, sorted inputs,
and no ``Software`` or date metadata in the file.
"""

from __future__ import annotations

import argparse
import glob
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .errors import ConfigError, CorruptInput
from .fitsio import atomic_path
from .runtime import common_arguments, json_arg, run, setup_logging

log = logging.getLogger("surveyred.plots")

DPI = 100
PNG_METADATA = {"Software": None}
BAND_COLOURS = {"u": "#56b4e9", "g": "#009e73", "r": "#d55e00", "i": "#cc79a7", "z": "#7f7f7f", "y": "#000000"}

#: fixed output names of the results-tree mode
PLOT_FILES = ("focal_plane_psf_fwhm.png", "focal_plane_zero_point.png", "astrometric_residuals.png",
              "photometric_repeatability.png", "lightcurves.png", "status_table.png")


@dataclass(frozen=True)
class PlotsConfig:
    """``qa.plots`` section of the configuration."""

    max_lightcurves: int = 9
    residual_bins: int = 8
    thumbnail_pixels: int = 600
    asinh_softening: float = 3.0  # in units of the image's robust sky sigma

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any] | None) -> "PlotsConfig":
        try:
            cfg = cls(**dict(doc or {}))
        except TypeError as exc:
            raise ConfigError(f"qa.plots configuration: {exc}") from exc
        if cfg.max_lightcurves < 1 or cfg.residual_bins < 1 or cfg.thumbnail_pixels < 16 or cfg.asinh_softening <= 0:
            raise ConfigError("qa.plots: max_lightcurves, residual_bins >= 1, thumbnail_pixels >= 16, "
                              "asinh_softening > 0")
        return cfg


# -- figure helpers ------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI)


def save_png(fig, path: str | Path) -> None:
    """Write ``fig`` as PNG atomically, without Software/date metadata (reproducible bytes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata=PNG_METADATA)


def message_figure(title: str, text: str):
    """A figure that states why a plot has no content."""
    fig = _figure(6, 2.5)
    ax = fig.add_subplot(111)
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10, transform=ax.transAxes)
    return fig


def _grid(n: int) -> tuple[int, int]:
    ncol = min(n, 3)
    return int(math.ceil(n / ncol)), ncol


# -- focal-plane layout -----------------------------------------------------------------------


def detector_layout(instrument, detectors: Sequence[int]) -> dict[int, tuple[float, float, float, float]]:
    """``{det: (x0, y0, width, height)}`` in focal-plane pixels.

    From the instrument's ``simulation.focal_plane`` (detector centre offsets
    from the boresight, pixels) and each detector's shape; detectors without a
    place (or no instrument) go on a square grid in id order.
    """
    fp = {}
    shapes = {}
    if instrument is not None:
        fp = ((instrument.extra or {}).get("simulation") or {}).get("focal_plane") or {}
        for det in instrument.detectors:
            shapes[det.id] = det.shape
    out = {}
    missing = []
    for d in sorted(set(int(x) for x in detectors)):
        ny, nx = shapes.get(d, (1.0, 1.0))
        entry = fp.get(d, fp.get(str(d)))
        if entry is None and instrument is not None:
            try:
                entry = fp.get(instrument.detector(d).name)
            except Exception:  # noqa: BLE001 - an unknown detector goes on the grid
                entry = None
        if entry is not None and len(entry) >= 2:
            out[d] = (float(entry[0]) - nx / 2.0, float(entry[1]) - ny / 2.0, float(nx), float(ny))
        else:
            missing.append(d)
    if missing:
        side = int(math.ceil(math.sqrt(len(missing))))
        size = max([w for (_, _, w, _) in out.values()] + [1.0])
        base = max([x + w for (x, _, w, _) in out.values()] + [0.0]) + size * 0.2 if out else 0.0
        for k, d in enumerate(missing):
            ny, nx = shapes.get(d, (size, size))
            out[d] = (base + (k % side) * nx * 1.1, (k // side) * ny * 1.1, float(nx), float(ny))
    return out


def focal_plane_figure(values: pd.DataFrame, layout: Mapping[int, tuple[float, float, float, float]], *,
                       title: str, unit: str, cmap: str = "viridis", centred: bool = False):
    """One panel per band: each detector a rectangle coloured by ``values`` (columns band, detector, value)."""
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle
    from matplotlib.patheffects import withStroke

    bands = sorted(values["band"].unique())
    nrow, ncol = _grid(len(bands))
    fig = _figure(4.2 * ncol, 3.8 * nrow)
    fig.suptitle(title)
    for k, band in enumerate(bands):
        ax = fig.add_subplot(nrow, ncol, k + 1)
        sub = values[values["band"] == band].sort_values("detector")
        v = sub["value"].to_numpy(float)
        finite = v[np.isfinite(v)]
        if len(finite) == 0:
            lo, hi = -1.0, 1.0
        elif centred:
            m = max(float(np.max(np.abs(finite))), 1e-6)
            lo, hi = -m, m
        else:
            lo, hi = float(finite.min()), float(finite.max())
            if hi - lo < 1e-9:
                lo, hi = lo - 0.5, hi + 0.5
        norm = Normalize(lo, hi)
        patches, colours = [], []
        for det, val in zip(sub["detector"].astype(int), v):
            if det not in layout:
                continue
            x0, y0, w, h = layout[det]
            patches.append(Rectangle((x0, y0), w, h))
            colours.append(val)
            ax.text(x0 + w / 2, y0 + h / 2, f"{det}\n{val:.2f}" if np.isfinite(val) else f"{det}\nn/a",
                    ha="center", va="center", fontsize=8, path_effects=[withStroke(linewidth=2.5, foreground="w")])
        coll = PatchCollection(patches, cmap=cmap, norm=norm, edgecolor="k")
        coll.set_array(np.asarray(colours, float))
        ax.add_collection(coll)
        xs = [layout[d][0] for d in layout] + [layout[d][0] + layout[d][2] for d in layout]
        ys = [layout[d][1] for d in layout] + [layout[d][1] + layout[d][3] for d in layout]
        if xs:
            pad = 0.05 * (max(xs) - min(xs) + 1)
            ax.set_xlim(min(xs) - pad, max(xs) + pad)
            ax.set_ylim(min(ys) - pad, max(ys) + pad)
        ax.set_aspect("equal")
        ax.set_title(f"band {band}")
        ax.set_xlabel("focal plane x (px)")
        ax.set_ylabel("focal plane y (px)")
        fig.colorbar(coll, ax=ax, label=unit, shrink=0.8)
    fig.tight_layout()
    return fig


def focal_plane_plots(summary: pd.DataFrame, layout, *, pixel_scale: float | None):
    """(PSF FWHM figure, zero-point figure) from visit-summary rows."""
    if len(summary) == 0:
        why = "no visit summaries (calibrate has not run)"
        return message_figure("PSF FWHM", why), message_figure("Zero point", why)
    s = summary.copy()
    if "status" in s.columns:
        s = s[s["status"].astype(str) != "failed"]
    g = s.groupby(["band", "detector"], as_index=False)
    fwhm = g["psf_fwhm"].median().rename(columns={"psf_fwhm": "value"})
    unit = "FWHM (px)"
    if pixel_scale:
        fwhm["value"] = fwhm["value"] * pixel_scale
        unit = "FWHM (arcsec)"
    zp = g["zero_point"].median().rename(columns={"zero_point": "value"})
    zp["value"] = (zp["value"] - zp.groupby("band")["value"].transform("median")) * 1000.0
    fig1 = focal_plane_figure(fwhm, layout, title="PSF FWHM per detector (median over visits)", unit=unit)
    if not np.any(np.isfinite(zp["value"].to_numpy(float))):
        fig2 = message_figure("Zero point", "no detector has a zero point (no photometric reference catalog?)")
    else:
        fig2 = focal_plane_figure(zp, layout, title="Zero point per detector minus the band median",
                                  unit="mmag", cmap="coolwarm", centred=True)
    return fig1, fig2


# -- astrometric residuals -----------------------------------------------------------------


def reference_residuals(calsrc: pd.DataFrame, refcat_dir: str) -> pd.DataFrame:
    """Residuals (mas) of the sources kept in the astrometric fit against their reference stars.

    Each source with ``astrom_used`` and a ``ref_id`` is compared with its
    reference star moved to the catalog's epoch (``epoch`` metadata).  Returns
    the sources with columns ``dra_mas`` (times cos dec) and ``ddec_mas``.
    """
    from . import refcat

    need = {"ref_id", "ra", "dec"}
    if len(calsrc) == 0 or not need <= set(calsrc.columns):
        return calsrc.iloc[0:0].assign(dra_mas=[], ddec_mas=[])
    use = calsrc["ref_id"].to_numpy(np.int64) >= 0
    if "astrom_used" in calsrc.columns:
        use &= calsrc["astrom_used"].to_numpy(bool)
    src = calsrc[use]
    if len(src) == 0:
        return src.assign(dra_mas=[], ddec_mas=[])
    xyz = np.column_stack([np.cos(np.radians(src["dec"])) * np.cos(np.radians(src["ra"])),
                           np.cos(np.radians(src["dec"])) * np.sin(np.radians(src["ra"])), np.sin(np.radians(src["dec"]))])
    c = xyz.mean(axis=0)
    c /= np.linalg.norm(c)
    ra0, dec0 = math.degrees(math.atan2(c[1], c[0])) % 360.0, math.degrees(math.asin(c[2]))
    radius = float(np.degrees(np.arccos(np.clip(xyz @ c, -1, 1))).max()) + 2.0 / 3600.0
    ref = refcat.load_region(refcat_dir, ra0, dec0, radius).set_index("id")
    parts = []
    for epoch, g in src.groupby(src["epoch"] if "epoch" in src.columns else pd.Series(np.nan, index=src.index),
                                dropna=False, sort=True):
        ids = g["ref_id"].to_numpy(np.int64)
        known = np.isin(ids, ref.index.to_numpy())
        g = g[known]
        r = ref.loc[ids[known]].reset_index()
        if np.isfinite(epoch):
            r = refcat.apply_proper_motion(r, float(epoch))
        dra = (g["ra"].to_numpy(float) - r["ra"].to_numpy(float) + 180.0) % 360.0 - 180.0
        dra *= np.cos(np.radians(g["dec"].to_numpy(float))) * 3.6e6
        ddec = (g["dec"].to_numpy(float) - r["dec"].to_numpy(float)) * 3.6e6
        parts.append(g.assign(dra_mas=dra, ddec_mas=ddec))
    return pd.concat(parts, ignore_index=True) if parts else src.iloc[0:0].assign(dra_mas=[], ddec_mas=[])


def mean_position_residuals(calsrc: pd.DataFrame, band: str, metrics_config) -> pd.DataFrame:
    """Residuals (mas) of bright stars' measurements from their mean position over visits (no reference)."""
    from . import metrics as M

    stars = M.build_star_set(calsrc, band, metrics_config)
    bright = stars.stars.index[stars.stars["bright"] & (stars.stars["n_visits"] >= 2)]
    src = stars.sources[stars.sources["star"].isin(bright)]
    mean = stars.stars.loc[src["star"].to_numpy(), ["ra", "dec"]].to_numpy(float).reshape(-1, 2)
    return src.assign(dra_mas=(src["ra"].to_numpy(float) - mean[:, 0]) * np.cos(np.radians(mean[:, 1])) * 3.6e6,
                      ddec_mas=(src["dec"].to_numpy(float) - mean[:, 1]) * 3.6e6)


def binned_vectors(fx, fy, dx, dy, bins: int, extent=None, min_count: int = 3):
    """Median vector per cell of a ``bins`` x ``bins`` grid: (cx, cy, median dx, median dy, count) of cells
    holding at least ``min_count`` vectors."""
    fx, fy, dx, dy = (np.asarray(a, float) for a in (fx, fy, dx, dy))
    x0, x1, y0, y1 = extent if extent is not None else (fx.min(), fx.max() + 1e-6, fy.min(), fy.max() + 1e-6)
    xe, ye = np.linspace(x0, x1, bins + 1), np.linspace(y0, y1, bins + 1)
    ix = np.clip(np.digitize(fx, xe) - 1, 0, bins - 1)
    iy = np.clip(np.digitize(fy, ye) - 1, 0, bins - 1)
    cell = iy * bins + ix
    n = np.bincount(cell, minlength=bins * bins)
    med = pd.DataFrame({"c": cell, "x": dx, "y": dy}).groupby("c").median()
    mx = np.zeros(bins * bins)
    my = np.zeros(bins * bins)
    mx[med.index.to_numpy()] = med["x"].to_numpy()
    my[med.index.to_numpy()] = med["y"].to_numpy()
    gx, gy = np.meshgrid(0.5 * (xe[:-1] + xe[1:]), 0.5 * (ye[:-1] + ye[1:]))
    use = n >= min_count
    return gx.ravel()[use], gy.ravel()[use], mx[use], my[use], n[use]


def astrometric_residual_figure(calsrc: pd.DataFrame, layout, *, bins: int = 8, metrics_config=None,
                                refcat_dir: str | None = None):
    """Binned astrometric residual vectors in the focal plane, and the ``ref_sep_mas`` histograms.

    With ``refcat_dir`` the residuals are against the reference stars used in
    the fit (moved to each exposure's epoch), for sources with
    ``snr >= bright_snr_min``; without it, against each bright star's mean
    position over the visits (dithers make this sensitive to distortion
    residuals).  Each cell shows the median vector; vectors point along +RA
    (east) and +Dec.
    """
    from . import metrics as M

    cfg = metrics_config or M.MetricsConfig()
    if len(calsrc) == 0:
        return message_figure("Astrometric residuals", "no calibrated source catalogs")
    bands = sorted(calsrc["band"].astype(str).unique())
    what = "measured minus reference position" if refcat_dir else "measurement minus the star's mean over visits"
    fig = _figure(4.6 * len(bands), 8.2)
    fig.suptitle(f"Astrometric residuals ({what}), binned in the focal plane")
    xs = [v[0] for v in layout.values()] + [v[0] + v[2] for v in layout.values()]
    ys = [v[1] for v in layout.values()] + [v[1] + v[3] for v in layout.values()]
    extent = (min(xs), max(xs), min(ys), max(ys)) if xs else None
    for k, band in enumerate(bands):
        ax = fig.add_subplot(2, len(bands), k + 1)
        ax.set_title(f"band {band}")
        sub = calsrc[calsrc["band"].astype(str) == band]
        if refcat_dir:
            res = reference_residuals(sub, refcat_dir)
            if "snr" in res.columns:  # bright sources only: the faint ones' centroid noise hides the pattern
                res = res[res["snr"].to_numpy(float) >= cfg.bright_snr_min]
        else:
            res = mean_position_residuals(calsrc, band, cfg)
        if len(res) == 0 or not {"x", "y", "detector"} <= set(res.columns):
            ax.text(0.5, 0.5, "no residuals (no reference matches / repeat visits)", ha="center",
                    transform=ax.transAxes, fontsize=8)
        else:
            off = np.array([layout.get(int(d), (0.0, 0.0, 0.0, 0.0))[:2] for d in res["detector"].astype(int)])
            fx = res["x"].to_numpy(float) + off[:, 0]
            fy = res["y"].to_numpy(float) + off[:, 1]
            dx, dy = res["dra_mas"].to_numpy(float), res["ddec_mas"].to_numpy(float)
            cx, cy, mx, my, n = binned_vectors(fx, fy, dx, dy, bins, extent)
            cell = (extent[1] - extent[0]) / bins if extent else 1.0
            length = max(float(np.max(np.hypot(mx, my))) if len(mx) else 1.0, 0.5)
            key = float(f"{length:.1g}")
            q = ax.quiver(cx, cy, mx, my, angles="xy", scale_units="xy", scale=length / (0.9 * cell),
                          color=BAND_COLOURS.get(band, "C0"))
            ax.quiverkey(q, 0.72, 1.02, key, f"{key:g} mas", labelpos="E", coordinates="axes")
            rms = float(np.sqrt(np.mean(dx ** 2 + dy ** 2) / 2.0))
            ax.text(0.02, 0.02, f"{len(res)} sources (snr >= {cfg.bright_snr_min:g}); per-coordinate rms "
                    f"{rms:.1f} mas",
                    transform=ax.transAxes, fontsize=8)
        for det, (x0, y0, w, h) in sorted(layout.items()):
            ax.add_patch(_rect(x0, y0, w, h))
        if extent:
            ax.set_xlim(extent[0] - 20, extent[1] + 20)
            ax.set_ylim(extent[2] - 20, extent[3] + 20)
        ax.set_aspect("equal")
        ax.set_xlabel("focal plane x (px)")
        ax.set_ylabel("focal plane y (px)")
        ax2 = fig.add_subplot(2, len(bands), len(bands) + k + 1)
        if "ref_sep_mas" in sub.columns:
            used = sub["astrom_used"].to_numpy(bool) if "astrom_used" in sub.columns else np.ones(len(sub), bool)
            v = sub["ref_sep_mas"].to_numpy(float)[used]
            v = v[np.isfinite(v)]
        else:
            v = np.zeros(0)
        if len(v):
            ax2.hist(v, bins=40, color=BAND_COLOURS.get(band, "C0"))
            ax2.axvline(float(np.median(v)), color="k", ls="--", label=f"median {np.median(v):.1f} mas")
            ax2.legend(fontsize=8)
        else:
            ax2.text(0.5, 0.5, "no reference matches", ha="center", transform=ax2.transAxes)
        ax2.set_xlabel("distance to the reference star after the fit (mas)")
        ax2.set_ylabel("sources")
    fig.tight_layout()
    return fig


def _rect(x0, y0, w, h):
    from matplotlib.patches import Rectangle

    return Rectangle((x0, y0), w, h, fill=False, lw=0.6, ec="0.5")


# -- photometric repeatability --------------------------------------------------------------


def repeatability_figure(calsrc: pd.DataFrame, metrics_table: pd.DataFrame | None = None, *, metrics_config=None):
    """Per band: per-star magnitude rms over visits against mean magnitude."""
    from . import metrics as M

    cfg = metrics_config or M.MetricsConfig()
    if len(calsrc) == 0:
        return message_figure("Photometric repeatability", "no calibrated source catalogs")
    bands = sorted(calsrc["band"].astype(str).unique())
    fig = _figure(4.5 * len(bands), 4.0)
    fig.suptitle("Photometric repeatability: rms of each star's magnitudes over visits")
    for k, band in enumerate(bands):
        ax = fig.add_subplot(1, len(bands), k + 1)
        stars = M.build_star_set(calsrc, band, cfg)
        st = stars.stars[(stars.stars["n_visits"] >= 2) & np.isfinite(stars.stars["mag_rms_mmag"])]
        ax.set_title(f"band {band}")
        if len(st) == 0:
            ax.text(0.5, 0.5, "no star measured in 2+ visits", ha="center", transform=ax.transAxes)
            continue
        rms = np.maximum(st["mag_rms_mmag"].to_numpy(float), 0.1)
        mag = st["mag"].to_numpy(float)
        bright = st["bright"].to_numpy(bool)
        ax.scatter(mag[~bright], rms[~bright], s=4, c="0.6", label="stars")
        ax.scatter(mag[bright], rms[bright], s=6, c=BAND_COLOURS.get(band, "C0"), label="bright (PA1 sample)")
        edges = np.arange(math.floor(mag.min()), math.ceil(mag.max()) + 0.5, 0.5)
        if len(edges) >= 2:
            idx = np.digitize(mag, edges)
            cen, med = [], []
            for i in range(1, len(edges)):
                sel = idx == i
                if sel.sum() >= 3:
                    cen.append(0.5 * (edges[i - 1] + edges[i]))
                    med.append(float(np.median(rms[sel])))
            ax.plot(cen, med, "k-", lw=1.5, label="median rms")
            # median reported error per bin
            src = stars.sources
            if "mag_err" in src.columns:
                m_src = stars.stars.loc[src["star"].to_numpy(), "mag"].to_numpy(float)
                e = src["mag_err"].to_numpy(float) * 1000.0
                idx2 = np.digitize(m_src, edges)
                ce, me = [], []
                for i in range(1, len(edges)):
                    sel = (idx2 == i) & np.isfinite(e)
                    if sel.sum() >= 3:
                        ce.append(0.5 * (edges[i - 1] + edges[i]))
                        me.append(float(np.median(e[sel])))
                ax.plot(ce, me, "k:", lw=1.2, label="median reported error")
        design = M.thresholds("PA1", band)[0]
        ax.axhline(design, color="g", ls="--", lw=1, label=f"PA1 design {design:g} mmag")
        if metrics_table is not None and len(metrics_table):
            r = metrics_table[(metrics_table["band"].astype(str) == band) & (metrics_table["metric"] == "PA1")]
            if len(r) and np.isfinite(r["value"].iloc[0]):
                ax.axhline(float(r["value"].iloc[0]), color="r", lw=1, label=f"PA1 = {r['value'].iloc[0]:.1f} mmag")
        ax.set_yscale("log")
        ax.set_xlabel("mean magnitude (AB)")
        ax.set_ylabel("rms over visits (mmag)")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


# -- light curves --------------------------------------------------------------------------

_OBJECT_COLUMNS = ("lc_id", "name", "object", "object_name", "object_id", "id")
_FLUX_COLUMNS = (("flux_njy", "flux_njy_err"), ("psf_flux", "psf_flux_err"))


def lightcurve_figure(lc: pd.DataFrame | None, *, objects: Sequence[str] = (), max_objects: int = 9,
                      reason: str = ""):
    """Flux against MJD per band for each requested object (at most ``max_objects``).

    Tolerant of the table's flavour: the light curve's key is the first of
    ``lc_id``, ``name``, ``object``, ``object_name``, ``object_id``, ``id``; the
    flux ``flux_njy`` (or ``psf_flux``) with its ``_err``; a measurement is
    flagged by a true ``flagged`` or a non-zero ``flags``.  ``objects`` are
    matched against the key, ``name`` and ``object_id``; without them the
    user positions (``kind == "user"``, or a true ``requested``) are shown, else
    the first light curves in key order.
    """
    if lc is None or len(lc) == 0:
        return message_figure("Light curves", reason or "no light curves")
    col = next((c for c in _OBJECT_COLUMNS if c in lc.columns), None)
    flux_col, err_col = next(((f, e) for f, e in _FLUX_COLUMNS if f in lc.columns), (None, None))
    if col is None or flux_col is None or not {"mjd", "band"} <= set(lc.columns):
        have = ", ".join(map(str, lc.columns))
        return message_figure("Light curves", "light-curve table lacks a key, mjd, band or flux column; "
                                              f"columns: {have}")
    keys = lc[col].astype(str)
    if objects:
        wanted = []
        for o in objects:
            hit = keys == str(o)
            for alt in ("name", "object_id"):
                if alt in lc.columns:
                    hit |= lc[alt].astype(str) == str(o)
            wanted += [k for k in sorted(set(keys[hit])) if k not in wanted]
        if not wanted:
            return message_figure("Light curves", f"none of the requested objects {list(objects)} is in the table")
    else:
        req = pd.Series(False, index=lc.index)
        if "kind" in lc.columns:
            req |= lc["kind"].astype(str) == "user"
        if "requested" in lc.columns:
            req |= lc["requested"].astype(bool)
        wanted = sorted(set(keys[req])) or sorted(set(keys))
    wanted = wanted[:max_objects]
    nrow, ncol = _grid(len(wanted))
    fig = _figure(4.2 * ncol, 3.2 * nrow)
    fig.suptitle("Light curves (forced photometry)")
    for k, name in enumerate(wanted):
        ax = fig.add_subplot(nrow, ncol, k + 1)
        sub = lc[keys == name]
        for band in sorted(sub["band"].astype(str).unique()):
            b = sub[sub["band"].astype(str) == band].sort_values("mjd")
            err = b[err_col].to_numpy(float) if err_col in b.columns else None
            if "flagged" in b.columns:
                flagged = b["flagged"].to_numpy(bool)
            elif "flags" in b.columns:
                flagged = b["flags"].to_numpy() != 0
            else:
                flagged = np.zeros(len(b), bool)
            colour = BAND_COLOURS.get(band, None)
            x, y = b["mjd"].to_numpy(float), b[flux_col].to_numpy(float)
            ax.errorbar(x[~flagged], y[~flagged], yerr=None if err is None else err[~flagged], fmt="o", ms=4,
                        color=colour, label=band)
            if flagged.any():
                ax.errorbar(x[flagged], y[flagged], yerr=None if err is None else err[flagged], fmt="o", ms=4,
                            mfc="none", color=colour)
        ax.set_title(str(name), fontsize=9)
        ax.ticklabel_format(axis="x", useOffset=False, style="plain")
        ax.set_xlabel("MJD")
        ax.set_ylabel("flux (nJy)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# -- status table ---------------------------------------------------------------------------


def status_figure(status: pd.DataFrame | None, *, reason: str = "", max_failures: int = 25):
    """The production status per band and night and the list of failures, as a table figure."""
    if status is None or len(status) == 0:
        return message_figure("Production status", reason or "no status table")
    s = status.copy()
    ccd = s[s["kind"] == "ccd"] if "kind" in s.columns else s
    states = ["ok", "failed", "running", "pending"]
    counts = (ccd.groupby(["band", "night", "state"]).size().unstack(fill_value=0)
              .reindex(columns=states, fill_value=0).reset_index())
    counts = counts.sort_values(["band", "night"])
    fails = s[s["state"] == "failed"].sort_values([c for c in ("kind", "night", "visit", "detector") if c in s.columns])
    nf = min(len(fails), max_failures)
    row_in = 0.24  # inches per table row
    top_in = 0.45 + row_in * (len(counts) + 1)
    bottom_in = 0.45 + (row_in * (nf + 1) if nf else 0.3)
    height = top_in + bottom_in + 0.1
    fig = _figure(11, height)
    ax = fig.add_axes([0.02, 1.0 - top_in / height, 0.96, (top_in - 0.3) / height])
    ax.set_axis_off()
    ax.set_title("CCDs per band and night", fontsize=10)
    cells = [[str(r.band), str(r.night)] + [str(int(getattr(r, st))) for st in states] for r in counts.itertuples()]
    if cells:
        t = ax.table(cellText=cells, colLabels=["band", "night"] + states, loc="upper center", cellLoc="center")
        t.auto_set_font_size(False)
        t.set_fontsize(8)
        for (i, j), cell in t.get_celld().items():
            if i > 0 and j == 3 and cells[i - 1][3] != "0":
                cell.set_facecolor("#f4cccc")
    ax2 = fig.add_axes([0.02, 0.05 / height, 0.96, (bottom_in - 0.3) / height])
    ax2.set_axis_off()
    if nf:
        ax2.set_title(f"failures ({len(fails)}{', first ' + str(nf) if len(fails) > nf else ''})", fontsize=10)
        rows = []
        for r in fails.head(nf).itertuples():
            msg = str(getattr(r, "message", ""))
            rows.append([str(getattr(r, "kind", "")), str(getattr(r, "night", "")), str(getattr(r, "band", "")),
                         str(getattr(r, "visit", "")), str(getattr(r, "detector", "")), str(getattr(r, "stage", "")),
                         str(getattr(r, "failure_class", "")), msg if len(msg) <= 70 else msg[:67] + "..."])
        t2 = ax2.table(cellText=rows, colLabels=["kind", "night", "band", "visit", "det", "stage", "class", "cause"],
                       loc="upper center", cellLoc="left", colWidths=[0.05, 0.08, 0.05, 0.07, 0.04, 0.1, 0.15, 0.46])
        t2.auto_set_font_size(False)
        t2.set_fontsize(7)
    else:
        ax2.text(0.5, 0.8, "no failures", ha="center", transform=ax2.transAxes)
    return fig


# -- coadd thumbnail --------------------------------------------------------------------------


def asinh_stretch(image: np.ndarray, *, softening_sigma: float = 3.0) -> np.ndarray:
    """Map an image to [0, 1] with ``a = asinh((I - sky) / (k sigma))``, linearly from ``a`` at one sigma
    below the sky (0) to the 99.8th percentile of ``a`` (1), clipped.

    ``sky`` and ``sigma`` are the median and the MAD-based sigma of the finite
    pixels; ``k`` is ``softening_sigma``.  NaN pixels map to 0.
    """
    img = np.asarray(image, float)
    finite = img[np.isfinite(img)]
    if finite.size == 0:
        return np.zeros_like(img)
    sky = float(np.median(finite))
    sigma = float(1.4826 * np.median(np.abs(finite - sky))) or float(np.std(finite)) or 1.0
    a = np.arcsinh((img - sky) / (softening_sigma * sigma))
    lo, hi = math.asinh(-1.0 / softening_sigma), float(np.percentile(a[np.isfinite(a)], 99.8))
    if hi <= lo:
        hi = lo + 1.0
    out = np.clip((a - lo) / (hi - lo), 0.0, 1.0)
    return np.where(np.isfinite(out), out, 0.0)


def _thumbnail_image(path: str | Path, pixels: int, softening_sigma: float):
    """A coadd's IMAGE block-averaged to at most ``pixels`` a side and asinh-stretched, and its title."""
    from astropy.io import fits

    try:
        with fits.open(path) as hdul:
            image = np.asarray(hdul["IMAGE"].data, float)
            head = hdul[0].header
            tract, patch, band = head.get("TRACT", "?"), head.get("PATCH", "?"), head.get("BAND", "?")
            ninputs = head.get("NINPUTS", "?")
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise CorruptInput(f"not a readable coadd (IMAGE HDU): {exc}", path=str(path)) from exc
    if image.ndim != 2:
        raise CorruptInput(f"coadd IMAGE is {image.ndim}-D", path=str(path))
    step = max(1, int(math.ceil(max(image.shape) / pixels)))
    if step > 1:  # block-average down to at most `pixels` on a side
        ny, nx = (image.shape[0] // step) * step, (image.shape[1] // step) * step
        with np.errstate(invalid="ignore"):
            image = np.nanmean(image[:ny, :nx].reshape(ny // step, step, nx // step, step), axis=(1, 3))
    shown = np.ma.masked_where(~np.isfinite(image), asinh_stretch(image, softening_sigma=softening_sigma))
    return shown, f"tract {tract} patch {patch} band {band} ({ninputs} inputs)", str(band)


def coadd_thumbnail_figure(paths: str | Path | Sequence[str | Path], *, pixels: int = 600,
                           softening_sigma: float = 3.0):
    """Thumbnails of a patch's coadds, one panel per band (in band order), asinh stretch."""
    import matplotlib

    if isinstance(paths, (str, Path)):
        paths = [paths]
    panels = sorted((_thumbnail_image(p, pixels, softening_sigma) for p in paths), key=lambda t: t[2])
    h, w = panels[0][0].shape
    pw, ph = max(3.0, 6.0 * w / max(h, w)), max(3.0, 6.0 * h / max(h, w))
    n = len(panels)
    fig = _figure(pw * n + 0.2, ph + 0.5)
    cmap = matplotlib.colormaps["gray"].with_extremes(bad="#27364a")  # no data: slate blue, not black
    for i, (shown, title, _) in enumerate(panels):
        ax = fig.add_axes([(i + 0.02) / n, 0.02, 0.96 / n, 0.9])
        ax.imshow(shown, origin="lower", cmap=cmap, interpolation="nearest", vmin=0.0, vmax=1.0)
        ax.set_axis_off()
        ax.set_title(f"{title}, asinh stretch" if n == 1 else title, fontsize=9 if n == 1 else 7)
    return fig


# -- reading a results tree -------------------------------------------------------------------


def _sorted_glob(*patterns: str) -> list[str]:
    out = set()
    for p in patterns:
        out.update(glob.glob(p, recursive=True))
    return sorted(out)


def _read_parquets(paths: Sequence[str], what: str) -> pd.DataFrame:
    frames = []
    for p in paths:
        try:
            frames.append(pd.read_parquet(p))
        except Exception as exc:  # noqa: BLE001 - reported as CorruptInput
            raise CorruptInput(f"cannot read {what}: {exc}", path=p) from exc
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    for c in ("visit", "band", "night"):
        if c in df.columns:
            df[c] = df[c].astype(str)
    return df


def _optional_table(path: str | None, what: str) -> tuple[pd.DataFrame | None, str]:
    if not path:
        return None, f"no {what} given"
    if not os.path.exists(path):
        return None, f"{what} not found: {path}"
    try:
        return pd.read_parquet(path), ""
    except Exception as exc:  # noqa: BLE001
        raise CorruptInput(f"cannot read {what}: {exc}", path=path) from exc


def qa_plots(results: str | Path, outdir: str | Path, *, instrument: str | None = None,
             metrics_path: str | None = None, status_path: str | None = None,
             lightcurves_path: str | None = None, objects: Sequence[str] = (),
             config: PlotsConfig = PlotsConfig(), metrics_config_doc: Mapping[str, Any] | None = None,
             refcat_astrom: str | None = None) -> list[Path]:
    """Write :data:`PLOT_FILES` for the results tree ``results`` into ``outdir``; returns the paths."""
    from . import metrics as M
    from .instrument import load_instrument

    results = Path(results)
    outdir = Path(outdir)
    inst = load_instrument(instrument) if instrument else None
    mcfg = M.MetricsConfig.from_dict(metrics_config_doc)
    summaries = _sorted_glob(str(results / "visit_summary" / "**" / "*.parquet"))
    calsrc_paths = _sorted_glob(str(results / "calsrc" / "**" / "*.parquet"))
    log.info("%d visit summaries, %d calsrc catalogs", len(summaries), len(calsrc_paths))
    summary = _read_parquets(summaries, "visit summary")
    calsrc = M.read_calsrc(calsrc_paths)
    dets = set(summary["detector"].astype(int)) if len(summary) else set()
    if len(calsrc):
        dets |= set(calsrc["detector"].astype(int))
    if inst is not None:
        dets |= {d.id for d in inst.good_detectors}
    layout = detector_layout(inst, sorted(dets))
    scale = inst.pixel_scale if inst is not None else None
    figs: dict[str, Any] = {}
    figs["focal_plane_psf_fwhm.png"], figs["focal_plane_zero_point.png"] = focal_plane_plots(
        summary, layout, pixel_scale=scale)
    log.info("focal-plane maps done")
    refdir = refcat_astrom if refcat_astrom and str(refcat_astrom).lower() != "none" else None
    if refdir and not os.path.isdir(refdir):
        log.warning("astrometric reference catalog %s not found: residuals against mean positions", refdir)
        refdir = None
    figs["astrometric_residuals.png"] = astrometric_residual_figure(calsrc, layout, bins=config.residual_bins,
                                                                    metrics_config=mcfg, refcat_dir=refdir)
    log.info("astrometric residuals done")
    mt, _ = _optional_table(metrics_path, "metrics table")
    figs["photometric_repeatability.png"] = repeatability_figure(calsrc, mt, metrics_config=mcfg)
    log.info("photometric repeatability done")
    lc, why = _optional_table(lightcurves_path, "light-curve table")
    if why:
        log.warning("light curves: %s", why)
    figs["lightcurves.png"] = lightcurve_figure(lc, objects=objects, max_objects=config.max_lightcurves, reason=why)
    st, why = _optional_table(status_path, "status table")
    if why:
        log.warning("status: %s", why)
    figs["status_table.png"] = status_figure(st, reason=why)
    out = []
    for name in PLOT_FILES:
        save_png(figs[name], outdir / name)
        out.append(outdir / name)
        log.info("wrote %s", outdir / name)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="surveyred qa-plots", description=(
        "QA plots (PNG) of a results tree: focal-plane PSF FWHM and zero-point maps, astrometric residuals, "
        "photometric repeatability, light curves, status table; or (--coadd) one coadd thumbnail."))
    p.add_argument("results", nargs="?", default=None, help="the results directory (RESULTS_DIR)")
    p.add_argument("--outdir", default=None, help="directory of the plots (" + ", ".join(PLOT_FILES) + ")")
    p.add_argument("--instrument", default=None, help="instrument name or YAML (detector layout, pixel scale)")
    p.add_argument("--metrics", default=None, help="metrics.parquet (PA1 line on the repeatability plot)")
    p.add_argument("--status", default=None, help="status.parquet of `surveyred status`")
    p.add_argument("--lightcurves", default=None, help="lightcurves.parquet")
    p.add_argument("--refcat-astrom", default=None, help="STORE/NAME of the astrometric reference catalog "
                   "(residual vectors against it; default or 'none': against mean positions over visits)")
    p.add_argument("--objects", nargs="*", default=[], help="objects whose light curves to plot")
    p.add_argument("--coadd", nargs="+", default=None,
                   help="a patch's coadds (one per band): write their thumbnails, one panel per band, to --output")
    p.add_argument("--output", default=None, help="the thumbnail PNG (with --coadd)")
    p.add_argument("--config-json", default=None, help='the "qa" section: {"plots": {...}, "metrics": {...}, "lightcurve_objects": [...]}')
    common_arguments(p)
    args = p.parse_args(argv)
    setup_logging(args.log)

    def body() -> None:
        doc = json_arg(args.config_json)
        cfg = PlotsConfig.from_dict(doc.get("plots"))
        if args.coadd:
            if not args.output:
                raise ConfigError("--coadd needs --output")
            fig = coadd_thumbnail_figure(args.coadd, pixels=cfg.thumbnail_pixels,
                                         softening_sigma=cfg.asinh_softening)
            save_png(fig, args.output)
            log.info("wrote %s", args.output)
            return
        if not args.results or not args.outdir:
            raise ConfigError("give RESULTS_DIR and --outdir (or --coadd F --output P)")
        if not os.path.isdir(args.results):
            raise ConfigError(f"results directory {args.results} does not exist")
        qa_plots(args.results, args.outdir, instrument=args.instrument, metrics_path=args.metrics,
                 status_path=args.status, lightcurves_path=args.lightcurves,
                 objects=args.objects or [str(o) for o in doc.get("lightcurve_objects", [])], config=cfg,
                 metrics_config_doc=doc.get("metrics"), refcat_astrom=args.refcat_astrom)

    return run(body, what="qa-plots")
