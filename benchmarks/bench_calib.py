"""Ratio benchmark of surveyred's calibration kernels against ccdproc.

Run ``python benchmarks/bench_calib.py`` (``--quick`` for small frames).  It
simulates one detector of 2048 x 4096 pixels read through two amplifiers
(1024 x 4096 data + 32 overscan columns each, amplifier B read out from the
right), measures in the same run:

* ``combine_speedup_vs_ccdproc``: 25-frame sigma-clipped mean combine from
  FITS files, :func:`surveyred.kernels.combine_files_chunked` vs
  ``ccdproc.combine``;
* ``isr_speedup_vs_ccdproc``: one detector's ISR (overscan, trim/assemble,
  gain, variance, bias, flat, defects, cosmic rays), surveyred kernels vs the
  ccdproc chain ending in ``cosmicray_lacosmic``;
* ``combine_peak_mb``: peak resident memory above baseline of our combine,
  measured in a child process;

and prints ``name: value`` lines (plus informative ones).  See
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

SIZES = {
    # ny rows, amp data columns, overscan columns, frames in the combine
    "full": dict(ny=4096, amp_nx=1024, n_over=32, nframes=25),
    "quick": dict(ny=1024, amp_nx=256, n_over=32, nframes=9),
}
GAINS = (1.52, 1.47)  # e-/ADU per amp
READ_NOISE = (5.8, 6.3)  # e- per amp
BIAS_LEVEL = 1000.0  # ADU
SATURATION = 60000.0  # ADU
SEED = 20240611


def log(msg: str) -> None:
    print(f"# {msg}", flush=True)


def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process image, in MiB.

    ``VmHWM`` of ``/proc/self/status`` belongs to the current address space,
    so unlike ``ru_maxrss`` it does not start from the parent's resident size
    at the fork that launched this child.
    """
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# -- simulation ----------------------------------------------------------------------

def bias_pattern(ny: int, nx: int, rng) -> np.ndarray:
    """Fixed 2-D bias structure in ADU above the overscan level (row glow, column pattern)."""
    y = np.arange(ny)[:, None]
    cols = rng.normal(0.0, 1.5, (1, nx))
    return (3.0 * np.exp(-y / 300.0) + cols).astype(np.float32)


def write_bias_frames(workdir: Path, size: dict, rng) -> list[Path]:
    """Write the combine's input: trimmed float32 bias frames (ADU), one FITS file each."""
    ny, nx = size["ny"], 2 * size["amp_nx"]
    pattern = bias_pattern(ny, nx, rng)
    paths = []
    for i in range(size["nframes"]):
        frame = BIAS_LEVEL + pattern + rng.normal(0.0, 4.0, (ny, nx)).astype(np.float32)
        # cosmic rays: ~1e-4 of the pixels, 50-5000 ADU
        hits = rng.random((ny, nx)) < 1e-4
        frame[hits] += rng.uniform(50.0, 5000.0, hits.sum()).astype(np.float32)
        path = workdir / f"bias{i:02d}.fits"
        from astropy.io import fits

        hdu = fits.PrimaryHDU(frame.astype(np.float32))
        hdu.header["BUNIT"] = "adu"
        hdu.writeto(path, overwrite=True)
        paths.append(path)
    return paths


class Detector:
    """Geometry of the simulated two-amplifier detector (0-based, half-open)."""

    def __init__(self, ny: int, amp_nx: int, n_over: int):
        self.ny, self.amp_nx, self.n_over = ny, amp_nx, n_over
        self.raw_shape = (ny, 2 * amp_nx + 2 * n_over)
        self.shape = (ny, 2 * amp_nx)
        # amp A: overscan columns [0, n_over), data [n_over, n_over + amp_nx), normal read-out
        # amp B: data [n_over + amp_nx, n_over + 2 amp_nx), overscan after; read from the right
        self.amps = [
            dict(name="A", data_x0=n_over, over=(0, n_over), out_x0=0, flip_x=False),
            dict(name="B", data_x0=n_over + amp_nx, over=(n_over + 2 * amp_nx, 2 * n_over + 2 * amp_nx),
                 out_x0=amp_nx, flip_x=True),
        ]

    @staticmethod
    def fits_section(x0: int, x1: int, y0: int, y1: int) -> str:
        return f"[{x0 + 1}:{x1},{y0 + 1}:{y1}]"


def simulate_science(det: Detector, rng):
    """A raw science frame (uint16 ADU) and its assembled calibrations (electrons)."""
    ny, nx = det.shape
    # calibration truths in the assembled frame
    flat = (1.0 + 0.004 * rng.standard_normal((ny, nx))
            + 0.03 * np.sin(np.arange(nx) / 300.0)[None, :]).astype(np.float32)
    flat /= flat.mean()
    gain_map = np.empty((ny, nx), np.float32)
    rn_map = np.empty((ny, nx), np.float32)
    for k, amp in enumerate(det.amps):
        gain_map[:, amp["out_x0"]:amp["out_x0"] + det.amp_nx] = GAINS[k]
        rn_map[:, amp["out_x0"]:amp["out_x0"] + det.amp_nx] = READ_NOISE[k]
    bias_adu = bias_pattern(ny, nx, rng)
    master_bias_e = (bias_adu * gain_map).astype(np.float32)
    defects = np.zeros((ny, nx), np.int32)
    for x in rng.integers(0, nx, 4):
        defects[:, x] = 1  # bad columns (BAD)
    # sky + stars in electrons, before the flat
    sky = 800.0
    signal = np.full((ny, nx), sky, np.float64)
    nstars = max(20, ny * nx // 20000)
    ys, xs = rng.uniform(10, ny - 10, nstars), rng.uniform(10, nx - 10, nstars)
    peaks = 10 ** rng.uniform(2, 4.5, nstars)
    sig = 2.0
    half = 12
    gy, gx = np.mgrid[-half:half + 1, -half:half + 1]
    for y0, x0, p in zip(ys, xs, peaks):
        iy, ix = int(y0), int(x0)
        yl, yh, xl, xh = max(iy - half, 0), min(iy + half + 1, ny), max(ix - half, 0), min(ix + half + 1, nx)
        stamp = p * np.exp(-((gy + iy - y0) ** 2 + (gx + ix - x0) ** 2) / (2 * sig * sig))
        signal[yl:yh, xl:xh] += stamp[yl - iy + half:yh - iy + half, xl - ix + half:xh - ix + half]
    electrons = rng.poisson(signal * flat).astype(np.float64)
    # cosmic rays: single pixels and short tracks
    ncr = max(50, ny * nx // 4000)
    for _ in range(ncr):
        y, x = rng.integers(2, ny - 2), rng.integers(2, nx - 2)
        ang = rng.uniform(0, np.pi)
        for t in range(rng.integers(1, 5)):
            py, px = round(y + t * np.sin(ang)), round(x + t * np.cos(ang))
            if 0 <= py < ny and 0 <= px < nx:
                electrons[py, px] += rng.uniform(300, 20000)
    adu_assembled = (electrons + rng.normal(0, 1, (ny, nx)) * rn_map) / gain_map + bias_adu
    raw = np.zeros(det.raw_shape, np.float64)
    drift = 2.0 * np.sin(np.arange(ny) / 500.0)[:, None]
    for k, amp in enumerate(det.amps):
        block = adu_assembled[:, amp["out_x0"]:amp["out_x0"] + det.amp_nx]
        if amp["flip_x"]:
            block = block[:, ::-1]
        level = BIAS_LEVEL + 10.0 * k + drift
        raw[:, amp["data_x0"]:amp["data_x0"] + det.amp_nx] = block + level
        o0, o1 = amp["over"]
        raw[:, o0:o1] = level + rng.normal(0, READ_NOISE[k] / GAINS[k], (ny, o1 - o0))
    raw = np.clip(np.round(raw), 0, 65535).astype(np.uint16)
    return raw, master_bias_e, flat, defects


# -- combine ---------------------------------------------------------------------------

def ours_combine(paths, threads, maxiters=5, chunk_rows=256):
    from surveyred.kernels import combine_files_chunked

    return combine_files_chunked(paths, hdu=0, chunk_rows=chunk_rows, low=3.0, high=3.0, maxiters=maxiters,
                                 center="median", threads=threads)


def warm_jit(threads: int) -> float:
    """Compile (or load from cache) every kernel the benchmark uses; return seconds."""
    from surveyred.kernels import clipped_mean, find_cosmic_rays, isr_amp, row_statistic

    t0 = time.perf_counter()
    for th in sorted({1, threads}):
        clipped_mean(np.ones((3, 4, 5), np.float32), threads=th)
        row_statistic(np.ones((4, 5), np.float32), threads=th)
        img = np.zeros((6, 6), np.float32)
        isr_amp(np.ones((6, 6), np.float32), np.zeros(6), data_y0=0, data_x0=0, ny=6, nx=6, out_y0=0, out_x0=0,
                flip_x=False, flip_y=False, gain=1.0, read_noise=1.0, saturation=1e5,
                bias=np.zeros((6, 6), np.float32), flat=np.ones((6, 6), np.float32),
                defects=np.zeros((6, 6), np.int32), out_image=img, out_variance=np.zeros_like(img),
                out_mask=np.zeros((6, 6), np.int32), threads=th)
        find_cosmic_rays(img, np.ones_like(img), np.zeros((6, 6), np.int32), threads=th)
    return time.perf_counter() - t0


def child_ours_combine(args) -> None:
    """Child process: peak memory (and time) of our chunked file combine."""
    paths = json.loads(Path(args.child_paths).read_text())
    warm_jit(args.threads)
    gc.collect()
    reset_peak_rss()
    baseline = current_rss_mb()
    t0 = time.perf_counter()
    mean, _count, _std = ours_combine(paths, args.threads, chunk_rows=args.chunk_rows)
    dt = time.perf_counter() - t0
    peak = peak_rss_mb()
    print(json.dumps(dict(baseline_mb=baseline, peak_mb=peak, seconds=dt, shape=list(mean.shape))))


def child_ccdproc_combine(args) -> None:
    """Child process: ccdproc.combine of the files (time, peak memory, result saved as .npy)."""
    import ccdproc

    paths = json.loads(Path(args.child_paths).read_text())
    gc.collect()
    reset_peak_rss()
    baseline = current_rss_mb()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        combined = ccdproc.combine(
            [str(p) for p in paths], method="average", sigma_clip=True,
            sigma_clip_low_thresh=3, sigma_clip_high_thresh=3,
            sigma_clip_func=np.ma.median, sigma_clip_dev_func=np.ma.std, unit="adu",
        )
        dt = time.perf_counter() - t0
    peak = peak_rss_mb()
    np.save(args.child_out, np.asarray(combined.data, dtype=np.float64))
    print(json.dumps(dict(baseline_mb=baseline, peak_mb=peak, seconds=dt)))


def run_child(mode: str, paths_file: Path, threads: int, chunk_rows: int, out: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--child-paths", str(paths_file),
           "--threads", str(threads), "--chunk-rows", str(chunk_rows)]
    if out is not None:
        cmd += ["--child-out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"child {mode} failed:\n{res.stdout}\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_combine(workdir: Path, size: dict, threads: int, chunk_rows: int, rng) -> dict:
    ny, nx, n = size["ny"], 2 * size["amp_nx"], size["nframes"]
    log(f"writing {n} simulated {nx}x{ny} float32 bias frames to {workdir}")
    paths = write_bias_frames(workdir, size, rng)
    paths_file = workdir / "paths.json"
    paths_file.write_text(json.dumps([str(p) for p in paths]))
    stack_mb = n * ny * nx * 4 / 2**20
    print(f"combine_input_stack_mb: {stack_mb:.0f}")

    # ours: time (best of 3; the files are in the page cache for both sides)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        mean, count, _std = ours_combine(paths, threads, chunk_rows=chunk_rows)
        times.append(time.perf_counter() - t0)
    ours_s = min(times)
    mean1, _count1, _std1 = ours_combine(paths, threads, maxiters=1, chunk_rows=chunk_rows)

    log("running ccdproc.combine in a child process (this is the slow part)")
    ccd_out = workdir / "ccdproc_combined.npy"
    ccd = run_child("ccdproc-combine", paths_file, threads, chunk_rows, ccd_out)
    ref = np.load(ccd_out)
    d5 = np.abs(mean.astype(np.float64) - ref)
    d1 = np.abs(mean1.astype(np.float64) - ref)
    mem = run_child("ours-combine", paths_file, threads, chunk_rows)
    return dict(ours_s=ours_s, ours_runs=times, ccdproc_s=ccd["seconds"], ccdproc_peak_mb=ccd["peak_mb"] - ccd["baseline_mb"],
                d5_median=float(np.median(d5)), d5_p999=float(np.quantile(d5, 0.999)), d5_max=float(d5.max()),
                d1_median=float(np.median(d1)), d1_max=float(d1.max()),
                frac_rejected=float((count < n).mean()),
                peak_mb=mem["peak_mb"] - mem["baseline_mb"], child_s=mem["seconds"], stack_mb=stack_mb)


# -- ISR -----------------------------------------------------------------------------

def ours_isr(raw, det: Detector, bias, flat, defects, threads):
    from surveyred.kernels import find_cosmic_rays, isr_amp, row_statistic

    image = np.empty(det.shape, np.float32)
    variance = np.empty(det.shape, np.float32)
    mask = np.zeros(det.shape, np.int32)
    raw32 = np.ascontiguousarray(raw, dtype=np.float32)  # once per detector
    for k, amp in enumerate(det.amps):
        o0, o1 = amp["over"]
        level = row_statistic(raw32[:, o0:o1], stat="median", threads=threads)
        isr_amp(raw32, level, data_y0=0, data_x0=amp["data_x0"], ny=det.ny, nx=det.amp_nx, out_y0=0,
                out_x0=amp["out_x0"], flip_x=amp["flip_x"], flip_y=False, gain=GAINS[k],
                read_noise=READ_NOISE[k], saturation=SATURATION, linearity=(), bias=bias, flat=flat,
                defects=defects, out_image=image, out_variance=variance, out_mask=mask, threads=threads)
    cr = find_cosmic_rays(image, variance, mask, psf_sigma=1.0, threads=threads)
    mask |= cr
    return image, variance, mask, cr


def ccdproc_isr(raw, det: Detector, bias, flat, defects):
    import astropy.units as u
    import ccdproc
    from astropy.nddata import CCDData, StdDevUncertainty

    ccd = CCDData(raw, unit="adu")
    datas, uncs = [], []
    for k, amp in enumerate(det.amps):
        o0, o1 = amp["over"]
        x0 = amp["data_x0"]
        o = ccdproc.subtract_overscan(ccd, fits_section=det.fits_section(o0, o1, 0, det.ny), median=True,
                                      overscan_axis=1)
        t = ccdproc.trim_image(o, fits_section=det.fits_section(x0, x0 + det.amp_nx, 0, det.ny))
        # gain and deviation per amplifier: create_deviation takes one (scalar) read noise
        g = ccdproc.gain_correct(t, GAINS[k] * u.electron / u.adu)
        d = ccdproc.create_deviation(g, readnoise=READ_NOISE[k] * u.electron, disregard_nan=True)
        data, unc = d.data, d.uncertainty.array
        if amp["flip_x"]:
            data, unc = data[:, ::-1], unc[:, ::-1]
        datas.append(data)
        uncs.append(unc)
    sat = np.hstack([raw[:, a["data_x0"]:a["data_x0"] + det.amp_nx][:, ::(-1 if a["flip_x"] else 1)]
                     for a in det.amps]) >= SATURATION
    assembled = CCDData(np.hstack(datas), uncertainty=StdDevUncertainty(np.hstack(uncs)), unit="electron",
                        mask=(defects != 0) | sat)
    b = ccdproc.subtract_bias(assembled, CCDData(bias, unit="electron"))
    f = ccdproc.flat_correct(b, CCDData(flat, unit=""), norm_value=1.0)
    before_cr = f.copy()
    c = ccdproc.cosmicray_lacosmic(f, gain=1.0, readnoise=float(np.mean(READ_NOISE)), satlevel=np.inf,
                                   gain_apply=False)
    return before_cr, c


def bench_isr(size: dict, threads: int, rng) -> dict:
    det = Detector(size["ny"], size["amp_nx"], size["n_over"])
    log(f"simulating a raw {det.raw_shape[1]}x{det.raw_shape[0]} uint16 science frame")
    raw, bias, flat, defects = simulate_science(det, rng)
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        image, variance, mask, cr = ours_isr(raw, det, bias, flat, defects, threads)
        runs.append(time.perf_counter() - t0)
    # split of our time
    from surveyred.kernels import find_cosmic_rays

    t0 = time.perf_counter()
    find_cosmic_rays(image, variance, mask, psf_sigma=1.0, threads=threads)
    cr_s = time.perf_counter() - t0
    log("running the ccdproc chain (subtract_overscan, trim_image, gain_correct, create_deviation, "
        "subtract_bias, flat_correct, cosmicray_lacosmic)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        before_cr, ccd_out = ccdproc_isr(raw, det, bias, flat, defects)
        ccd_s = time.perf_counter() - t0
    good = (mask & (1 | 2 | 4 | 128)) == 0
    good &= ~np.asarray(ccd_out.mask)
    d_img = np.abs(image.astype(np.float64) - before_cr.data)[good]
    d_var = np.abs(variance.astype(np.float64) - before_cr.uncertainty.array ** 2)[good]
    rel_var = d_var / np.maximum(variance[good], 1.0)
    ours_cr = cr > 0
    lac_cr = np.asarray(ccd_out.mask) & ~np.asarray(before_cr.mask)
    return dict(ours_s=min(runs), ours_runs=runs, cr_s=cr_s, ccdproc_s=ccd_s,
                img_median=float(np.median(d_img)), img_max=float(d_img.max()),
                var_rel_median=float(np.median(rel_var)), var_rel_max=float(rel_var.max()),
                ours_cr=int(ours_cr.sum()), lac_cr=int(lac_cr.sum()), both_cr=int((ours_cr & lac_cr).sum()),
                megapix=det.shape[0] * det.shape[1] / 1e6)


# -- main ----------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small frames (1024 rows, 2x256 columns, 9 frames)")
    p.add_argument("--threads", type=int, default=2, help="numba threads for surveyred (default 2)")
    p.add_argument("--chunk-rows", type=int, default=256, help="rows per block of the file combine")
    p.add_argument("--workdir", default=None, help="where to write the simulated frames (default: a temp dir)")
    p.add_argument("--skip-combine", action="store_true")
    p.add_argument("--skip-isr", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-paths", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "ours-combine":
        child_ours_combine(args)
        return 0
    if args.child == "ccdproc-combine":
        child_ccdproc_combine(args)
        return 0

    import numba

    import surveyred
    from surveyred.runtime import set_threads

    size = SIZES["quick" if args.quick else "full"]
    threads = set_threads(args.threads)
    log(f"surveyred {surveyred.__version__}, numba {numba.__version__}, numpy {np.__version__}; "
        f"{os.cpu_count()} CPUs, numba threads {threads}; sizes {size}")
    warm_s = warm_jit(threads)
    print(f"jit_warmup_s: {warm_s:.2f}  (compile, or load from numba's cache when already compiled)")
    rng = np.random.default_rng(SEED)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_calib_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if not args.skip_combine:
            c = bench_combine(workdir, size, threads, args.chunk_rows, rng)
            print(f"combine_ours_s: {c['ours_s']:.2f}  (best of {len(c['ours_runs'])}: "
                  f"{', '.join(f'{t:.2f}' for t in c['ours_runs'])}; maxiters=5, {args.chunk_rows}-row blocks)")
            print(f"combine_ccdproc_s: {c['ccdproc_s']:.2f}  (one sigma-clipping pass, as ccdproc.combine does)")
            print(f"combine_speedup_vs_ccdproc: {c['ccdproc_s'] / c['ours_s']:.1f}")
            print(f"combine_median_abs_diff_adu: {c['d5_median']:.3g}  (ours maxiters=5 vs ccdproc; "
                  f"99.9th pct {c['d5_p999']:.3g}, max {c['d5_max']:.3g})")
            print(f"combine_median_abs_diff_adu_maxiters1: {c['d1_median']:.3g}  (ours maxiters=1, the same "
                  f"single pass as ccdproc; max {c['d1_max']:.3g})")
            print(f"combine_fraction_pixels_with_rejection: {c['frac_rejected']:.4f}")
            print(f"combine_peak_mb: {c['peak_mb']:.0f}")
            print(f"combine_peak_fraction_of_stack: {c['peak_mb'] / c['stack_mb']:.3f}  "
                  f"(target < 1.5; stack {c['stack_mb']:.0f} MB; child combine took {c['child_s']:.2f} s)")
            print(f"combine_ccdproc_peak_mb: {c['ccdproc_peak_mb']:.0f}")
        if not args.skip_isr:
            r = bench_isr(size, threads, rng)
            print(f"isr_ours_s: {r['ours_s']:.3f}  (best of 3: {', '.join(f'{t:.3f}' for t in r['ours_runs'])}; "
                  f"of which find_cosmic_rays {r['cr_s']:.3f}; {r['megapix']:.1f} Mpix)")
            print(f"isr_ccdproc_s: {r['ccdproc_s']:.2f}")
            print(f"isr_speedup_vs_ccdproc: {r['ccdproc_s'] / r['ours_s']:.1f}")
            print(f"isr_image_median_abs_diff_e: {r['img_median']:.3g}  (max {r['img_max']:.3g}, on pixels "
                  f"neither side masks)")
            print(f"isr_variance_median_rel_diff: {r['var_rel_median']:.3g}  (max {r['var_rel_max']:.3g})")
            print(f"isr_cr_pixels: ours {r['ours_cr']}, lacosmic {r['lac_cr']}, both {r['both_cr']}")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
