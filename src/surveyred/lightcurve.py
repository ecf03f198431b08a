"""Light curves from forced photometry: ``surveyred lightcurve``.

Reads the per-visit forced-photometry tables (:mod:`surveyred.forced`) and
writes one table holding every object's and user position's light curve:
one row per (position, visit), sorted by ``kind`` (objects first), ``object_id``,
``name``, ``mjd``, ``band``, ``visit``.

Columns: ``lc_id`` (the light curve's key: the user position's name, or the
object id as a decimal string), ``kind``, ``object_id``, ``name``, ``ra``,
``dec``, ``mjd`` (d), ``band``, ``visit``, ``night``, ``detector``, ``x``, ``y`` (px),
``psf_flux``, ``psf_flux_err``, ``ap_flux``, ``ap_flux_err`` (nJy),
``zero_point_err`` (mag), ``flags`` (the forced-photometry bit mask) and
``flagged`` (unusable, see :data:`surveyred.forced.FLAGS_UNUSABLE`).

``--plot NAME_OR_ID ...`` draws, for each named light curve, a PNG (matplotlib,
Agg backend) of the PSF flux against MJD per band with 1-sigma error bars;
flagged measurements are drawn as open markers (and a cross when their flux
is not finite, at zero flux); file ``PLOT_DIR/lc_<key>.png`` (characters
other than letters, digits, ``-``, ``_``, ``.`` replaced by ``_``).  The PNG
carries no timestamp, so reruns give identical bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ConfigError, CorruptInput

log = logging.getLogger("surveyred.lightcurve")

COLUMNS = ("lc_id", "kind", "object_id", "name", "ra", "dec", "mjd", "band", "visit", "night", "detector", "x", "y",
           "psf_flux", "psf_flux_err", "ap_flux", "ap_flux_err", "zero_point_err", "flags", "flagged")
BAND_COLOURS = {"u": "tab:purple", "g": "tab:green", "r": "tab:red", "i": "tab:orange", "z": "tab:brown",
                "y": "tab:gray"}


def read_forced(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Concatenate forced tables; a visit given twice (two files) is an error."""
    import pyarrow.parquet as pq

    need = ("kind", "object_id", "name", "ra", "dec", "mjd", "band", "visit", "detector", "x", "y", "psf_flux",
            "psf_flux_err", "ap_flux", "ap_flux_err", "flags", "flagged")
    parts, seen = [], {}
    for p in paths:
        try:
            t = pq.read_table(p)
        except (OSError, ValueError) as exc:
            raise CorruptInput(f"not a readable forced-photometry table ({exc})", path=p) from exc
        missing = [c for c in need if c not in t.column_names]
        if missing:
            raise CorruptInput(f"not a forced-photometry table: no column(s) {', '.join(missing)}", path=p)
        df = t.to_pandas()
        for v in sorted(set(df["visit"].astype(str))):
            if v in seen:
                raise ConfigError(f"visit {v} is in both {seen[v]} and {p}")
            seen[v] = str(p)
        parts.append(df)
    if not parts:
        raise ConfigError("lightcurve needs at least one forced-photometry table")
    return pd.concat(parts, ignore_index=True)


def build_lightcurves(forced: pd.DataFrame) -> pd.DataFrame:
    """The light-curve table (see the module docstring) from concatenated forced tables."""
    df = forced.copy()
    df["lc_id"] = np.where(df["kind"].to_numpy() == "user", df["name"].astype(str).to_numpy(),
                           df["object_id"].astype(np.int64).astype(str).to_numpy())
    if "night" not in df:
        df["night"] = ""
    if "zero_point_err" not in df:
        df["zero_point_err"] = np.nan
    df["visit"] = df["visit"].astype(str)
    df["is_user"] = df["kind"].to_numpy() == "user"
    df = df.sort_values(["is_user", "object_id", "name", "mjd", "band", "visit"], kind="stable")
    return df[list(COLUMNS)].reset_index(drop=True)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(name))


def plot_lightcurve(lc: pd.DataFrame, path: str | os.PathLike, *, title: str) -> None:
    """PNG of one light curve: PSF flux vs MJD per band, flagged points open (atomically written)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fitsio import atomic_path

    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=100)
    for band in sorted(set(lc["band"])):
        d = lc[lc["band"] == band]
        col = BAND_COLOURS.get(band, "k")
        good = ~d["flagged"].to_numpy(bool)
        t, f, e = d["mjd"].to_numpy(float), d["psf_flux"].to_numpy(float), d["psf_flux_err"].to_numpy(float)
        if good.any():
            ax.errorbar(t[good], f[good], yerr=e[good], fmt="o", color=col, ms=5, capsize=2, label=f"{band}")
        fin = ~good & np.isfinite(f)
        if fin.any():
            ax.errorbar(t[fin], f[fin], yerr=np.where(np.isfinite(e[fin]), e[fin], 0), fmt="o", mfc="none",
                        color=col, ms=6, capsize=2, label=f"{band} flagged")
        nan = ~good & ~np.isfinite(f)
        if nan.any():
            ax.plot(t[nan], np.zeros(nan.sum()), "x", color=col, ms=7, label=f"{band} no flux")
    ax.axhline(0.0, color="0.7", lw=0.8)
    ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    ax.set_xlabel("MJD")
    ax.set_ylabel("PSF flux (nJy)")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)


def run_lightcurve(forced_paths, *, output, plots: Sequence[str] = (), plot_dir=None) -> pd.DataFrame:

    from . import __version__
    from .fitsio import write_parquet
    from .provenance import git_revision

    lcs = build_lightcurves(read_forced(forced_paths))
    keys = set(lcs["lc_id"])
    missing = [p for p in plots if str(p) not in keys]
    if missing:
        raise ConfigError(f"--plot {', '.join(missing)}: no such object id or user position name in the "
                          f"{len(forced_paths)} forced table(s)")
    if plots and plot_dir is None:
        plot_dir = Path(output).parent / "plots"
    meta = {"software_version": __version__, "git_revision": git_revision(), "step": "lightcurve",
            "inputs": ",".join(sorted(Path(p).name for p in forced_paths)),
            "units": json.dumps({"mjd": "d", "psf_flux": "nJy", "psf_flux_err": "nJy", "ap_flux": "nJy",
                                 "ap_flux_err": "nJy", "ra": "deg", "dec": "deg", "zero_point_err": "mag"})}
    for key in plots:  # the plots first: the table (the rule's main output) appears last
        lc = lcs[lcs["lc_id"] == str(key)]
        dest = Path(plot_dir) / f"lc_{_safe(key)}.png"
        plot_lightcurve(lc, dest, title=f"{key} ({len(lc)} visits, {int(lc['flagged'].sum())} flagged)")
        log.info("plot %s -> %s", key, dest)
    write_parquet(lcs, output, meta)
    log.info("%d light curves, %d measurements -> %s", len(keys), len(lcs), output)
    return lcs


def main(argv: list[str] | None = None) -> int:
    from .runtime import common_arguments, run, setup_logging

    p = argparse.ArgumentParser(prog="surveyred lightcurve", description=(
        "Light curves (one table) from per-visit forced photometry, with optional PNG plots."))
    p.add_argument("--forced", nargs="+", required=True, help="forced/<night>/<visit>.parquet")
    p.add_argument("--output", required=True, help="lightcurves/lightcurves.parquet")
    p.add_argument("--plot", nargs="*", default=[], help="object ids or user position names to plot")
    p.add_argument("--plot-dir", default=None, help="directory of the PNGs (default: OUTPUT's dir/plots)")
    common_arguments(p, threads=False)
    args = p.parse_args(argv)
    setup_logging(args.log)

    def body():
        run_lightcurve(args.forced, output=args.output, plots=args.plot, plot_dir=args.plot_dir)

    return run(body, what=f"lightcurve of {len(args.forced)} forced table(s)")
