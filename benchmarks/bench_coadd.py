"""Ratio benchmark of surveyred's warping and coaddition against reproject and SWarp.

Run ``python benchmarks/bench_coadd.py`` (``--quick`` for small frames).  It
simulates one 2048 x 4096 exposure (stars on a sky of 1000 e-, TAN WCS,
0.2"/px) and an output grid rotated by 7 degrees and shifted by a fraction of a
pixel, and measures in the same run:

* ``warp_speedup_vs_reproject``: ``reproject.reproject_interp(order="bilinear")``
  (image only) vs our Lanczos-3 :func:`surveyred.warp.warp_exposure` (image,
  variance and mask), numba threads 2, JIT warm, best of 3;
* ``warp_speedup_vs_swarp``: Debian's ``SWarp`` (LANCZOS3, the same output grid
  from a ``.head`` file, ``COMBINE N``, ``SUBTRACT_BACK N``, 2 threads) vs ours,
  both from a FITS file on disk to a FITS file on disk, and the median relative
  pixel difference of the two resampled images;
* ``coadd_peak_mb``: peak resident memory above baseline of
  :func:`surveyred.coadd.coadd` of 20 warp FITS files of one patch (clipping
  and artifact rejection on), measured in a child process, and the same for 5
  inputs, with the size of one warp and of the output.

Prints ``name: value`` lines (``#`` lines are progress notes).  See
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_calib import current_rss_mb, peak_rss_mb, reset_peak_rss

SIZES = {
    "full": dict(frame=(4096, 2048), patch=(2100, 2100), ninputs=(5, 20)),
    "quick": dict(frame=(1024, 512), patch=(500, 500), ninputs=(5, 20)),
}
SEED = 20261121
SKY = 1000.0
PIXEL_SCALE = 0.2


def log(msg: str) -> None:
    print(f"# {msg}", flush=True)


def tan_wcs(crval, crpix, scale_arcsec, rot_deg=0.0, shape=None):
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(crval)
    w.wcs.crpix = list(crpix)
    c, s = np.cos(np.radians(rot_deg)), np.sin(np.radians(rot_deg))
    w.wcs.cd = scale_arcsec / 3600.0 * np.array([[-c, s], [s, c]])
    w.wcs.radesys = "ICRS"
    w.wcs.equinox = 2000.0
    if shape is not None:
        w.pixel_shape = (shape[1], shape[0])
    w.wcs.set()
    return w


def simulate_frame(shape, rng, nstars=3000, fwhm=3.5):
    """Sky + Gaussian stars + noise, in electrons; variance and mask planes."""
    ny, nx = shape
    img = np.full(shape, SKY, np.float64)
    sig = fwhm / 2.3548
    r = int(5 * sig) + 1
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    for _ in range(nstars):
        x0, y0 = rng.uniform(r, nx - r - 1), rng.uniform(r, ny - r - 1)
        flux = 10 ** rng.uniform(2.5, 5.0)
        ix, iy = int(x0), int(y0)
        stamp = flux * np.exp(-((xx - (x0 - ix)) ** 2 + (yy - (y0 - iy)) ** 2) / (2 * sig**2)) / (2 * np.pi * sig**2)
        img[iy - r:iy + r + 1, ix - r:ix + r + 1] += stamp
    var = img + 25.0
    img = img + rng.normal(0, 1, shape) * np.sqrt(var)
    mask = np.zeros(shape, np.int32)
    mask[rng.random(shape) < 1e-4] = 1  # a few BAD pixels
    return img.astype(np.float32), var.astype(np.float32), mask


# -- warping -------------------------------------------------------------------------

def geometry(frame_shape):
    ny, nx = frame_shape
    in_wcs = tan_wcs((150.0, 2.2), ((nx + 1) / 2, (ny + 1) / 2), PIXEL_SCALE, 0.0, frame_shape)
    # output: rotated by 7 deg, shifted by (13.3, 7.7) px, same scale and shape
    out_wcs = tan_wcs((150.0, 2.2), ((nx + 1) / 2 + 13.3, (ny + 1) / 2 + 7.7), PIXEL_SCALE, 7.0, frame_shape)
    return in_wcs, out_wcs


def best_of(fn, n=3):
    times = []
    out = None
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), times, out


def bench_warp(size, threads, rng, workdir: Path):
    from astropy.io import fits
    from reproject import reproject_interp

    from surveyred.warp import WarpConfig, warp_exposure, write_warp

    shape = size["frame"]
    log(f"simulating a {shape[1]}x{shape[0]} frame")
    img, var, msk = simulate_frame(shape, rng, nstars=3000 if shape[0] > 2000 else 300)
    in_wcs, out_wcs = geometry(shape)
    cfg = WarpConfig(order=3)
    warp_exposure(img[:64, :64], var[:64, :64], msk[:64, :64], in_wcs, out_wcs, (64, 64), config=cfg,
                  threads=threads)  # JIT warm-up
    ours_s, ours_runs, w = best_of(lambda: warp_exposure(img, var, msk, in_wcs, out_wcs, shape, config=cfg,
                                                          threads=threads))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep_s, rep_runs, (rep, foot) = best_of(
            lambda: reproject_interp((img, in_wcs), out_wcs, shape_out=shape, order="bilinear"))
    good = (w.mask == 0) & (foot > 0)
    rel_rep = float(np.median(np.abs(w.image[good] - rep[good]) / np.abs(rep[good])))

    # file to file, for SWarp
    in_path = workdir / "frame.fits"
    hdr = in_wcs.to_header()
    fits.PrimaryHDU(img, header=hdr).writeto(in_path, overwrite=True)
    from surveyred.fitsio import exposure_hdus

    exp_path = workdir / "frame_exp.fits"
    exposure_hdus(img, msk, var, image_header=hdr).writeto(exp_path, overwrite=True)
    out_path = workdir / "warp_ours.fits"

    def ours_files():
        from surveyred.fitsio import read_exposure

        im, mk, va, _, h = read_exposure(exp_path)
        from astropy.wcs import WCS

        ww = warp_exposure(im, va, mk, WCS(h), out_wcs, shape, config=cfg, threads=threads)
        write_warp(out_path, ww)
        return ww

    ours_f_s, ours_f_runs, _ = best_of(ours_files)
    res = dict(ours_s=ours_s, ours_runs=ours_runs, rep_s=rep_s, rep_runs=rep_runs, rel_rep=rel_rep,
               ngood=int(good.sum()), map_error=w.map_error, grid_step=w.grid_step,
               ours_files_s=ours_f_s, ours_files_runs=ours_f_runs, megapix=shape[0] * shape[1] / 1e6)
    res.update(bench_swarp(workdir, in_path, out_wcs, shape, threads, w.image, w.mask))
    return res


def bench_swarp(workdir: Path, in_path: Path, out_wcs, shape, threads, ours_img, ours_mask):
    exe = shutil.which("SWarp") or shutil.which("swarp")
    if exe is None:
        return dict(swarp_reason="SWarp not found on PATH (apt-get install swarp)")
    from astropy.io import fits

    out_name = workdir / "swarp_out.fits"
    head = fits.Header()
    head["NAXIS"] = 2
    head["NAXIS1"] = shape[1]
    head["NAXIS2"] = shape[0]
    head.update(out_wcs.to_header())
    for key in ("MJDREF", "DATEREF", "MJD-OBS", "DATE-OBS"):
        head.remove(key, ignore_missing=True, remove_all=True)
    (workdir / "swarp_out.head").write_text(head.tostring(sep="\n", endcard=True, padding=False) + "\n")
    rdir = workdir / "swarp_resamp"
    rdir.mkdir(exist_ok=True)
    cmd = [exe, str(in_path), "-c", "/dev/null", "-IMAGEOUT_NAME", str(out_name),
           "-WEIGHTOUT_NAME", str(workdir / "swarp_out.weight.fits"),
           "-RESAMPLING_TYPE", "LANCZOS3", "-COMBINE", "N", "-RESAMPLE", "Y", "-RESAMPLE_DIR", str(rdir),
           "-SUBTRACT_BACK", "N", "-NTHREADS", str(threads), "-FSCALASTRO_TYPE", "NONE",
           "-FSCALE_KEYWORD", "NONEXISTENT", "-FSCALE_DEFAULT", "1.0", "-GAIN_DEFAULT", "0.0",
           "-WRITE_XML", "N", "-VERBOSE_TYPE", "QUIET", "-CELESTIAL_TYPE", "NATIVE", "-PROJECTION_ERR", "0.001",
           "-OVERSAMPLING", "1", "-INTERPOLATE", "N", "-VMEM_DIR", str(workdir), "-MEM_MAX", "2048",
           "-COMBINE_BUFSIZE", "1024", "-COPY_KEYWORDS", "OBJECT"]
    times = []
    for _ in range(3):
        for p in rdir.glob("*"):
            p.unlink()
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, check=False)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            return dict(swarp_reason=f"SWarp exited {r.returncode}: {(r.stderr or r.stdout).strip()[-300:]}")
    resamp = sorted(rdir.glob("*.resamp.fits"))
    if not resamp:
        return dict(swarp_reason="SWarp wrote no resampled image")
    with fits.open(resamp[0]) as h:
        sw = h[0].data.astype(np.float64)
        sh = h[0].header
    # the resampled image is a sub-frame of the output grid: offset from CRPIX
    dx = int(round(out_wcs.wcs.crpix[0] - sh["CRPIX1"]))
    dy = int(round(out_wcs.wcs.crpix[1] - sh["CRPIX2"]))
    ours = ours_img[dy:dy + sw.shape[0], dx:dx + sw.shape[1]]
    om = ours_mask[dy:dy + sw.shape[0], dx:dx + sw.shape[1]]
    good = (om == 0) & np.isfinite(sw) & (sw != 0)
    rel = float(np.median(np.abs(ours[good] - sw[good]) / np.abs(sw[good])))
    bright = good & (sw > SKY + 500)
    rel_b = float(np.median(np.abs(ours[bright] - sw[bright]) / np.abs(sw[bright] - SKY))) if bright.any() else np.nan
    ver = subprocess.run([exe, "-v"], capture_output=True, text=True, check=False).stdout.strip()
    return dict(swarp_s=min(times), swarp_runs=times, swarp_rel=rel, swarp_rel_bright=rel_b,
                swarp_ngood=int(good.sum()), swarp_version=ver, swarp_offset=(dx, dy))


# -- coadd memory --------------------------------------------------------------------

def write_patch_warps(workdir: Path, size, n, rng):
    """Write ``n`` noisy warps of one simulated patch scene (with a trail in one)."""
    from astropy.wcs import WCS

    from surveyred.warp import Warp, write_warp

    shape = size["patch"]
    truth = np.zeros(shape, np.float32)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    for _ in range(200 if shape[0] > 1000 else 30):
        x0, y0 = rng.uniform(10, shape[1] - 10), rng.uniform(10, shape[0] - 10)
        sl = (slice(max(0, int(y0) - 12), int(y0) + 13), slice(max(0, int(x0) - 12), int(x0) + 13))
        truth[sl] += (10 ** rng.uniform(2.5, 4.5) * np.exp(
            -((xx[sl] - x0) ** 2 + (yy[sl] - y0) ** 2) / (2 * 1.5**2)) / (2 * np.pi * 1.5**2)).astype(np.float32)
    wcs = WCS(naxis=2)
    paths = []
    for k in range(n):
        sigma = rng.uniform(8.0, 12.0)
        img = truth + rng.normal(0, sigma, shape).astype(np.float32)
        if k == 3:
            d = (yy - (0.4 * xx + 30)) / np.hypot(1, 0.4)
            img += (100.0 * np.exp(-0.5 * (d / 1.3) ** 2)).astype(np.float32)
        var = np.full(shape, sigma**2, np.float32)
        msk = np.zeros(shape, np.int32)
        msk[:, : 20 + 3 * k] = 128  # NO_DATA strip of varying width
        p = workdir / f"warp{k:02d}.fits"
        write_warp(p, Warp(img, var, msk, wcs, 1.0, 0.0, 16))
        paths.append(str(p))
    return paths


def child_coadd(args) -> None:
    from surveyred.coadd import CoaddConfig, coadd

    paths = json.loads(Path(args.child_paths).read_text())
    # warm the JIT on a tiny problem
    from surveyred.coadd import ArrayWarp

    z = np.zeros((8, 8), np.float32)
    coadd([ArrayWarp(z + k, z + 1, z.astype(np.int32)) for k in range(3)], threads=args.threads)
    gc.collect()
    reset_peak_rss()
    baseline = current_rss_mb()
    t0 = time.perf_counter()
    res = coadd(paths, config=CoaddConfig(), threads=args.threads)
    dt = time.perf_counter() - t0
    peak = peak_rss_mb()
    print(json.dumps(dict(baseline_mb=baseline, peak_mb=peak, seconds=dt, shape=list(res.image.shape),
                          n_artifacts=int(res.inputs["n_artifacts"].sum()))))


def run_child(paths, workdir: Path, threads: int) -> dict:
    pf = workdir / f"paths_{len(paths)}.json"
    pf.write_text(json.dumps(paths))
    cmd = [sys.executable, __file__, "--child", "coadd", "--child-paths", str(pf), "--threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"child coadd failed:\n{r.stdout}\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- main ----------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small frame (512x1024) and patch (500x500)")
    p.add_argument("--threads", type=int, default=2, help="numba (and SWarp) threads (default 2)")
    p.add_argument("--workdir", default=None, help="where to write the frames (default: a temp dir)")
    p.add_argument("--skip-warp", action="store_true")
    p.add_argument("--skip-coadd", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-paths", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "coadd":
        child_coadd(args)
        return 0

    import numba

    from surveyred.runtime import set_threads

    size = SIZES["quick" if args.quick else "full"]
    threads = set_threads(args.threads)
    log(f"numba {numba.__version__}, numpy {np.__version__}; {os.cpu_count()} CPUs, numba threads {threads}; "
        f"sizes {size}")
    rng = np.random.default_rng(SEED)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_coadd_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if not args.skip_warp:
            r = bench_warp(size, threads, rng, workdir)
            print(f"warp_ours_s: {r['ours_s']:.3f}  (best of 3: {', '.join(f'{t:.3f}' for t in r['ours_runs'])}; "
                  f"Lanczos-3, image+variance+mask, {r['megapix']:.1f} Mpix, coordinate grid step "
                  f"{r['grid_step']} px, max map error {r['map_error']:.2g} px)")
            print(f"warp_reproject_s: {r['rep_s']:.3f}  (best of 3: {', '.join(f'{t:.3f}' for t in r['rep_runs'])}; "
                  "reproject_interp bilinear, image only)")
            print(f"warp_speedup_vs_reproject: {r['rep_s'] / r['ours_s']:.1f}")
            print(f"warp_median_rel_diff_vs_reproject: {r['rel_rep']:.3g}  (on {r['ngood']} pixels; sky "
                  f"{SKY:.0f} e- included)")
            if "swarp_s" in r:
                print(f"warp_ours_file_to_file_s: {r['ours_files_s']:.3f}  (read calexp FITS, warp, write warp "
                      f"FITS with image+mask+variance)")
                print(f"warp_swarp_s: {r['swarp_s']:.3f}  (best of 3: "
                      f"{', '.join(f'{t:.3f}' for t in r['swarp_runs'])}; {r['swarp_version']}; image+weight)")
                print(f"warp_speedup_vs_swarp: {r['swarp_s'] / r['ours_files_s']:.1f}")
                print(f"warp_median_rel_diff_vs_swarp: {r['swarp_rel']:.3g}  (on {r['swarp_ngood']} pixels, sky "
                      f"included; sky-subtracted on pixels > sky+500 e-: {r['swarp_rel_bright']:.3g})")
            else:
                print(f"warp_speedup_vs_swarp: unavailable ({r['swarp_reason']})")
        if not args.skip_coadd:
            n_small, n_big = size["ninputs"]
            log(f"writing {n_big} warps of a {size['patch'][1]}x{size['patch'][0]} patch to {workdir}")
            paths = write_patch_warps(workdir, size, n_big, rng)
            npix = size["patch"][0] * size["patch"][1]
            warp_mb = npix * 12 / 2**20
            out_mb = npix * 16 / 2**20
            res = {}
            for n in (n_small, n_big):
                res[n] = run_child(paths[:n], workdir, threads)
            for n in (n_small, n_big):
                c = res[n]
                print(f"coadd_peak_mb_n{n}: {c['peak_mb'] - c['baseline_mb']:.0f}  ({c['seconds']:.2f} s, "
                      f"{c['n_artifacts']} artifact regions)")
            c = res[n_big]
            print(f"coadd_peak_mb: {c['peak_mb'] - c['baseline_mb']:.0f}")
            print(f"coadd_one_warp_mb: {warp_mb:.0f}  (image+variance+mask, 12 B/px)")
            print(f"coadd_output_mb: {out_mb:.0f}  (image, variance, mask, nimage, 16 B/px)")
            print(f"coadd_all_inputs_mb: {warp_mb * n_big:.0f}  (what holding all {n_big} warps would take)")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
