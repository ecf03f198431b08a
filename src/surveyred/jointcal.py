"""Joint astrometry across the exposures of one field and band (in the spirit of LSST jointcal).

Model
-----
All exposure-detectors ("frames") ``k`` of a field and band are fitted at
once in the gnomonic tangent plane about a common point ``T`` (the mean
position of the reference stars).  With focal-plane pixel coordinates
``(u, v) = (x + 1 - CRPIX1, y + 1 - CRPIX2)`` of the frame's header WCS (for
a mosaic the CRPIX is the boresight, so ``(u, v)`` is shared by all
detectors), an observation of star ``i`` in frame ``k`` obeys::

    xi_k(u, v)  = a_k0 + a_k1 u + a_k2 v + sum_{2<=p+q<=N} c_pq u^p v^q  = X_i + mu_x,i (t_k - t0)
    eta_k(u, v) = b_k0 + b_k1 u + b_k2 v + sum_{2<=p+q<=N} d_pq u^p v^q  = Y_i + mu_y,i (t_k - t0)

with a per-frame affine transform ``(a_k, b_k)``, a distortion polynomial
``(c, d)`` shared by every frame, and the star positions ``(X_i, Y_i)`` at
the mean epoch ``t0`` as free parameters tied to the reference catalog by
``X_i = X_ref,i +- sigma_ref`` (proper motions ``mu`` from the catalog, held
fixed).  Every star measured in several frames therefore constrains the
frames' relative geometry through its repeated measurements, while the
catalog fixes the absolute frame; the distortion is measured once from all
frames together.  The model is linear in all parameters, and xi and eta
share the design matrix, so one sparse weighted least-squares solve gives
both (normal equations, ``scipy.sparse``).  Observations beyond ``nsigma``
robust sigmas are rejected and the fit repeated.

Each frame's solution is finally written as a TAN-SIP (order ``N``) by a
noise-free :func:`surveyred.astrometry.fit_tan_sip` of the model on a pixel
grid (the representation error is far below a mas).

Stars are those matched to the reference catalog by the single-frame fits
(``ref_id`` of the calibrated source catalogs); stars absent from the catalog
are not used (a limitation: jointcal also uses them).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from .astrometry import MAS_PER_DEG, SipWcs, fit_tan_sip, monomials, tan_deproject, tan_project
from .errors import ConfigError, TooFewMatches

log = logging.getLogger("surveyred.jointcal")

_NORM = 1000.0  #: pixel normalisation of the polynomial terms


@dataclass(frozen=True)
class JointcalConfig:
    """Options of :func:`joint_astrometry`."""

    order: int = 3
    nsigma: float = 4.0
    max_iter: int = 5
    ref_err_floor_mas: float = 1.0
    centroid_err_floor_px: float = 0.005
    min_obs_per_frame: int = 10

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any] | None) -> "JointcalConfig":
        try:
            return cls(**dict(doc or {})).validate()
        except TypeError as exc:
            raise ConfigError(f"calibrate.jointcal: {exc}") from exc

    def validate(self) -> "JointcalConfig":
        if not 1 <= self.order <= 7 or self.nsigma <= 0 or self.max_iter < 1 or self.min_obs_per_frame < 3:
            raise ConfigError("calibrate.jointcal: order 1..7, nsigma > 0, max_iter >= 1, min_obs_per_frame >= 3")
        return self


@dataclass
class JointFrame:
    """One exposure-detector: its sources, their reference ids, its geometry.

    ``sources`` needs ``x``, ``y`` (0-based) and optionally ``x_err``,
    ``y_err`` (px); ``ref_id`` (int, -1 = unmatched) gives the star of each
    source; ``crpix`` is the focal-plane origin (1-based, the header CRPIX);
    ``scale_arcsec`` the pixel scale; ``epoch`` the Julian year.
    """

    key: Hashable
    sources: pd.DataFrame
    ref_id: np.ndarray
    crpix: tuple[float, float]
    epoch: float
    shape: tuple[int, int]
    scale_arcsec: float


@dataclass
class JointResult:
    """Per-frame TAN-SIP solutions and fit statistics."""

    wcs: dict
    rms_mas: float
    n_obs: int
    n_stars: int
    n_frames: int
    tangent_point: tuple[float, float]
    distortion: dict = field(default_factory=dict)
    residuals: pd.DataFrame | None = None


def joint_astrometry(frames: Sequence[JointFrame], refcat: pd.DataFrame, *,
                     config: JointcalConfig = JointcalConfig()) -> JointResult:
    """Simultaneous fit of per-frame affine transforms, a shared distortion and star positions.

    Parameters
    ----------
    frames : sequence of JointFrame
        Frames of one field and band (any number of detectors and visits).
    refcat : DataFrame
        ``id``, ``ra``, ``dec``, ``epoch``, ``pm_ra``, ``pm_dec`` (mas/yr),
        ``ra_err``, ``dec_err`` (mas) at the catalog epoch.

    Returns
    -------
    JointResult
        ``wcs[key]`` is the frame's fitted :class:`SipWcs`.

    Raises
    ------
    TooFewMatches
        A frame has fewer than ``min_obs_per_frame`` matched stars.
    """
    cfg = config.validate()
    ref = refcat.set_index("id")
    t0 = float(np.mean([f.epoch for f in frames]))
    # observations
    rows = []
    for k, f in enumerate(frames):
        rid = np.asarray(f.ref_id, dtype=np.int64)
        ok = (rid >= 0) & np.isin(rid, ref.index.to_numpy())
        ok &= np.isfinite(f.sources["x"].to_numpy(float)) & np.isfinite(f.sources["y"].to_numpy(float))
        if ok.sum() < cfg.min_obs_per_frame:
            raise TooFewMatches(f"jointcal frame {f.key}: {int(ok.sum())} matched stars "
                                f"(need {cfg.min_obs_per_frame})")
        s = f.sources[ok]
        ex = s["x_err"].to_numpy(float) if "x_err" in s else np.full(len(s), 0.05)
        ey = s["y_err"].to_numpy(float) if "y_err" in s else ex
        err = np.sqrt(0.5 * (ex ** 2 + ey ** 2))
        err = np.sqrt(np.nan_to_num(err, nan=0.1) ** 2 + cfg.centroid_err_floor_px ** 2)
        rows.append(pd.DataFrame({"frame": k, "ref_id": rid[ok], "u": s["x"].to_numpy(float) + 1.0 - f.crpix[0],
                                  "v": s["y"].to_numpy(float) + 1.0 - f.crpix[1],
                                  "sigma_mas": err * f.scale_arcsec * 1000.0, "dt": f.epoch - t0,
                                  "src_index": np.nonzero(ok)[0]}))
    obs = pd.concat(rows, ignore_index=True)
    star_ids = np.unique(obs["ref_id"].to_numpy())
    star_of = {sid: i for i, sid in enumerate(star_ids)}
    obs["star"] = obs["ref_id"].map(star_of).to_numpy()
    r = ref.loc[star_ids]
    # reference positions at t0 in the tangent plane about T
    dt_ref = t0 - r["epoch"].to_numpy(float)
    dec_c = r["dec"].to_numpy(float)
    dec_t0 = dec_c + np.nan_to_num(r["pm_dec"].to_numpy(float)) * dt_ref / MAS_PER_DEG
    ra_t0 = r["ra"].to_numpy(float) + np.nan_to_num(r["pm_ra"].to_numpy(float)) * dt_ref / MAS_PER_DEG / np.cos(
        np.radians(dec_c))
    tp = (float(np.mean(ra_t0)), float(np.mean(dec_t0)))
    xr, yr = tan_project(ra_t0, dec_t0, *tp)
    xr, yr = xr * MAS_PER_DEG, yr * MAS_PER_DEG  # mas
    ref_sig = np.sqrt(0.5 * (np.nan_to_num(r.get("ra_err", 0.0) * 1.0) ** 2
                             + np.nan_to_num(r.get("dec_err", 0.0) * 1.0) ** 2) + cfg.ref_err_floor_mas ** 2)
    ref_sig = np.broadcast_to(np.asarray(ref_sig, float), (len(star_ids),))
    pm_x = np.nan_to_num(r["pm_ra"].to_numpy(float))[obs["star"].to_numpy()]
    pm_y = np.nan_to_num(r["pm_dec"].to_numpy(float))[obs["star"].to_numpy()]

    nf, ns = len(frames), len(star_ids)
    terms = monomials(cfg.order, min_order=2)
    nt = len(terms)
    n_par = 3 * nf + nt + ns
    no = len(obs)
    fr = obs["frame"].to_numpy()
    u = obs["u"].to_numpy() / _NORM
    v = obs["v"].to_numpy() / _NORM
    st = obs["star"].to_numpy()
    # design: [affine(3 per frame) | shared poly (nt) | -star (ns)] . p = pm dt  (obs rows); star = ref (prior rows)
    cols, vals, rws = [], [], []
    for j, col in enumerate((np.ones(no), u, v)):
        rws.append(np.arange(no)); cols.append(3 * fr + j); vals.append(col)
    for j, (p, q) in enumerate(terms):
        rws.append(np.arange(no)); cols.append(np.full(no, 3 * nf + j)); vals.append(u ** p * v ** q)
    rws.append(np.arange(no)); cols.append(3 * nf + nt + st); vals.append(-np.ones(no))
    rws.append(no + np.arange(ns)); cols.append(3 * nf + nt + np.arange(ns)); vals.append(np.ones(ns))
    a_full = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rws), np.concatenate(cols))),
                           shape=(no + ns, n_par))
    rhs_x = np.concatenate([pm_x * obs["dt"].to_numpy(), xr])
    rhs_y = np.concatenate([pm_y * obs["dt"].to_numpy(), yr])
    sig = np.concatenate([obs["sigma_mas"].to_numpy(), ref_sig])
    keep = np.ones(no + ns, bool)
    for it in range(cfg.max_iter):
        w = np.where(keep, 1.0 / sig ** 2, 0.0)
        aw = a_full.multiply(w[:, None]).tocsr()
        normal = (a_full.T @ aw).tocsc()
        px = spla.spsolve(normal, aw.T @ rhs_x)
        py = spla.spsolve(normal, aw.T @ rhs_y)
        rx, ry = a_full @ px - rhs_x, a_full @ py - rhs_y
        chi = np.hypot(rx, ry) / sig / math.sqrt(2)
        obs_chi = chi[:no]
        robust = 1.4826 * np.median(obs_chi[keep[:no]]) / 0.8326
        new = keep.copy()
        new[:no] = obs_chi < cfg.nsigma * max(robust, 1e-6)
        if np.array_equal(new, keep):
            break
        keep = new
    res_x, res_y = rx[:no][keep[:no]], ry[:no][keep[:no]]
    rms = float(np.sqrt(np.mean(np.concatenate([res_x, res_y]) ** 2)))
    log.info("jointcal: %d frames, %d stars, %d observations kept of %d, rms %.1f mas", nf, ns,
             int(keep[:no].sum()), no, rms)
    # per-frame TAN-SIP from the model on a grid
    out = {}
    cpoly_x, cpoly_y = px[3 * nf:3 * nf + nt], py[3 * nf:3 * nf + nt]
    for k, f in enumerate(frames):
        ny, nx = f.shape
        gx, gy = np.meshgrid(np.linspace(-0.5, nx - 0.5, 30), np.linspace(-0.5, ny - 0.5, 30))
        gx, gy = gx.ravel(), gy.ravel()
        gu, gv = (gx + 1.0 - f.crpix[0]) / _NORM, (gy + 1.0 - f.crpix[1]) / _NORM
        mono = np.stack([gu ** p * gv ** q for p, q in terms], axis=1)
        xi = px[3 * k] + px[3 * k + 1] * gu + px[3 * k + 2] * gv + mono @ cpoly_x
        eta = py[3 * k] + py[3 * k + 1] * gu + py[3 * k + 2] * gv + mono @ cpoly_y
        ra, dec = tan_deproject(xi / MAS_PER_DEG, eta / MAS_PER_DEG, *tp)
        # frame epoch: the model gives positions of stars at t_k in the same frame (pm term handled above)
        out[f.key] = fit_tan_sip(gx, gy, ra, dec, crpix=f.crpix, crval=(float(ra[0]), float(dec[0])),
                                 order=max(cfg.order, 1), shape=f.shape)
    resid = obs.assign(dxi_mas=rx[:no], deta_mas=ry[:no], kept=keep[:no])
    return JointResult(wcs=out, rms_mas=rms, n_obs=int(keep[:no].sum()), n_stars=ns, n_frames=nf,
                       tangent_point=tp, distortion={"xi": dict(zip(terms, cpoly_x)), "eta": dict(zip(terms, cpoly_y))},
                       residuals=resid)


# -- command line: one field and band ------------------------------------------------------


def _frame_from_products(calsrc_path, wcs_path, *, min_obs: int):
    """A :class:`JointFrame` from a calibrated catalog and its WCS product (``None`` when unusable)."""
    from astropy.io import fits

    from .calibrate import read_src

    df, meta = read_src(calsrc_path)
    h = fits.getheader(wcs_path)
    if not h.get("ABSCAL", False) or "ref_id" not in df or int((df["ref_id"] >= 0).sum()) < min_obs:
        return None, h, meta
    wcs = SipWcs.from_header(h)
    mjd = h.get("MJD-AVG")  # mid-exposure, written by calibrate
    if mjd is None:
        raise ConfigError(f"{wcs_path}: no MJD-AVG card (epoch of the exposure)")
    epoch = 2000.0 + (float(mjd) - 51544.5) / 365.25
    rid = np.where(df.get("astrom_used", df["ref_id"] >= 0).to_numpy(bool), df["ref_id"].to_numpy(np.int64), -1)
    key = (str(h.get("VISIT", meta.get("visit", ""))), int(h.get("DETECTOR", meta.get("detector", -1))))
    return JointFrame(key=key, sources=df, ref_id=rid, crpix=wcs.crpix, epoch=epoch,
                      shape=(int(h.get("IMAGEH", 0)), int(h.get("IMAGEW", 0))),
                      scale_arcsec=wcs.pixel_scale_arcsec), h, meta


TABLE_COLUMNS = ["visit", "night", "band", "detector", "status", "n_obs", "joint_rms_mas", "single_rms_mas",
                 "wcs_header", "ref_visit", "rel_a11", "rel_a12", "rel_a21", "rel_a22", "rel_dx", "rel_dy",
                 "rel_rms_px"]


def relative_rows(items) -> list[dict]:
    """Relative astrometry of frames without an absolute solution, per detector.

    ``items``: ``(calsrc path, wcs header)``.  Frames of the same detector are
    registered onto the deepest one (:func:`surveyred.astrometry.register_exposures`);
    each row gets the affine ``(x_ref, y_ref) = A (x, y) + (dx, dy)`` and status
    ``relative`` (or ``failed`` when the frame cannot be registered).
    """
    from .astrometry import register_exposures
    from .calibrate import read_src
    from .errors import SurveyredError

    by_det: dict[int, list] = {}
    for cpath, h in items:
        by_det.setdefault(int(h.get("DETECTOR", -1)), []).append((str(h.get("VISIT", "")), cpath, h))
    rows = []
    for det, group in sorted(by_det.items()):
        group.sort(key=lambda t: t[0])
        cats = [read_src(c)[0] for _, c, _ in group]
        # the reference: the frame with the most sources of S/N >= 10 (the deepest exposure)
        depth = [int((np.nan_to_num(c["snr"].to_numpy(float)) >= 10).sum()) if "snr" in c else len(c) for c in cats]
        ref = int(np.argmax(depth))
        ref_visit = group[ref][0]
        for k, ((visit, cpath, h), cat) in enumerate(zip(group, cats)):
            row = dict(visit=visit, night=str(h.get("NIGHT", "")), band=str(h.get("BAND", "")), detector=det,
                       ref_visit=ref_visit, joint_rms_mas=np.nan, single_rms_mas=np.nan, wcs_header="")
            try:
                t = register_exposures([cats[ref], cat])[1] if k != ref else register_exposures([cat])[0]
            except SurveyredError as exc:
                log.warning("%s: %s", cpath, exc.one_line())
                rows.append({**row, "status": "failed", "n_obs": 0})
                continue
            rows.append({**row, "status": "relative", "n_obs": int(t.n_match), "rel_a11": t.matrix[0, 0],
                         "rel_a12": t.matrix[0, 1], "rel_a21": t.matrix[1, 0], "rel_a22": t.matrix[1, 1],
                         "rel_dx": t.offset[0], "rel_dy": t.offset[1], "rel_rms_px": t.rms_px})
            log.info("%s: registered onto visit %s: %d stars, rms %.3f px", cpath, ref_visit, t.n_match, t.rms_px)
    return rows


def main(argv: list[str] | None = None) -> int:
    """``surveyred jointcal``: joint astrometry of one field and band -> one table of frame WCSs."""
    import argparse

    from . import refcat as rc
    from .fitsio import atomic_path
    from .runtime import common_arguments, json_arg, run, setup_logging

    p = argparse.ArgumentParser(prog="surveyred jointcal", description=(
        "Joint astrometry (per-frame affine + shared distortion + star positions) of one field and band."))
    p.add_argument("--calsrc", nargs="+", required=True, help="calsrc/<night>/<visit>_<det>.parquet")
    p.add_argument("--wcs", nargs="+", required=True, help="wcs/<night>/<visit>_<det>.fits, same order")
    p.add_argument("--refcat-astrom", required=True, help="STORE/NAME of the astrometric catalog")
    p.add_argument("--output", required=True, help="jointcal/<field>/<band>.parquet")
    p.add_argument("--config-json", default=None, help='the "calibrate.jointcal" section as JSON')
    common_arguments(p)
    args = p.parse_args(argv)
    setup_logging(args.log)

    def body() -> None:
        cfg = JointcalConfig.from_dict(json_arg(args.config_json))
        if len(args.calsrc) != len(args.wcs):
            raise ConfigError("--calsrc and --wcs must list the same frames in the same order")
        frames, heads, relative = [], {}, []
        for cpath, wpath in zip(args.calsrc, args.wcs):
            frame, h, meta = _frame_from_products(cpath, wpath, min_obs=cfg.min_obs_per_frame)
            if frame is None:
                if h.get("STATUS") == "not_absolutely_calibrated":
                    relative.append((cpath, h))
                else:
                    log.warning("%s: status %s or too few matches; left out of the joint fit", wpath,
                                h.get("STATUS"))
                continue
            frames.append(frame)
            heads[frame.key] = (h, meta)
        rows = relative_rows(relative)
        if len(frames) >= 2:
            ras = np.concatenate([f.sources["ra"].to_numpy(float) for f in frames])
            decs = np.concatenate([f.sources["dec"].to_numpy(float) for f in frames])
            ok = np.isfinite(ras) & np.isfinite(decs)
            ra0, dec0 = float(np.median(ras[ok])), float(np.median(decs[ok]))
            from .refcat import angular_distance

            radius = float(np.max(angular_distance(ra0, dec0, ras[ok], decs[ok]))) + 0.01
            ref = rc.load_region(args.refcat_astrom, ra0, dec0, radius)
            result = joint_astrometry(frames, ref, config=cfg)
            res = result.residuals
            for k, f in enumerate(frames):
                h, meta = heads[f.key]
                r = res[(res["frame"] == k) & res["kept"]]
                rms = float(np.sqrt(np.mean(np.concatenate([r["dxi_mas"], r["deta_mas"]]) ** 2))) if len(r) else np.nan
                rows.append(dict(visit=f.key[0], night=str(h.get("NIGHT", "")), band=str(h.get("BAND", "")),
                                 detector=f.key[1], status="ok", n_obs=int(len(r)), joint_rms_mas=rms,
                                 single_rms_mas=float(h.get("ASTRMS") or np.nan),
                                 wcs_header=result.wcs[f.key].to_header().tostring(sep="\n")))
        elif frames:
            log.warning("fewer than two absolutely calibrated frames: nothing to fit jointly")
        table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
        with atomic_path(args.output) as tmp:
            table.to_parquet(tmp, index=False)

    return run(body, what=f"jointcal {args.output}")


# -- grouping of visits (used by rules/calibrate.smk) ------------------------------------------


def field_name(value) -> str:
    """A field name usable as a path component and wildcard: the OBJECT with other characters as ``_``."""
    import re

    text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text.strip()) or "field"


def group_visits(science: Mapping[tuple[str, str], str], inventory: pd.DataFrame) -> dict:
    """``{(field, band): [(night, visit), ...]}`` from ``{(night, visit): band}`` and the inventory.

    The field is the ``object`` of the visit's science rows in the inventory
    (:func:`field_name`), ``"field"`` when it has none.
    """
    objects = {}
    if len(inventory):
        sci = inventory[inventory["obstype"] == "science"]
        for night, visit, obj in zip(sci["night"].astype(str), sci["visit"].astype(str), sci["object"]):
            objects[(night, visit)] = field_name(obj)
    groups: dict = {}
    for (night, visit), band in sorted(science.items()):
        key = (objects.get((str(night), str(visit)), "field"), str(band))
        groups.setdefault(key, []).append((str(night), str(visit)))
    return groups
