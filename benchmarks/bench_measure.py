"""Ratio benchmark of surveyred's detection + measurement stage against photutils, sep and SExtractor.

Run ``python benchmarks/bench_measure.py`` (``--quick`` for a 1024 x 1024 frame).
It simulates one 2048 x 4096 exposure (``surveyred.simulate.render_stars``:
double-Gaussian PSF, FWHM 3.2 px, stars with the simulator's magnitude law
dN/dm ~ 10^(0.25 m) between 14 and 25 mag (r-band zero-point 27.7, 60 s),
sky 960 e-/px, Poisson noise + 6 e- read noise, saturation at 90000 e- with
the SAT plane set; variance plane = expected counts + read noise^2) and measures,
in the same run on the same pixels, the wall time of:

* **ours**: :func:`surveyred.characterize.detect_and_measure` - sep background
  (mesh 64, filter 3, masked), sep extraction (3 sigma of the variance plane,
  minarea 5, 32 deblending levels, contrast 0.005, segmentation map ->
  DETECTED), half-light radii, windowed centroids with errors, aperture sums
  at r = 3, 5, 8, 12 px with errors from the variance plane, footprint flags;
  PSF modelling excluded;
* **bare sep**: ``sep.Background`` + ``sep.extract`` (same parameters) +
  ``sep.sum_circle`` at the same radii;
* **photutils** 3: ``Background2D`` (64 px boxes, 3x3 filter, SExtractor
  estimator) + convolution with a 3x3 kernel equal to sep's default + ``detect_sources``
  (3 sigma of the variance plane per pixel on the convolved image, npixels 5) +
  ``deblend_sources`` (32 levels, contrast 0.005) + ``SourceCatalog``
  (centroids, shapes) + ``aperture_photometry`` at the same radii with errors;
* **SExtractor** 2.25 (Debian ``source-extractor``): DETECT_THRESH 1.125 (= sep's
  matched-filter 3 sigma, see ``SX_THRESH``),
  DETECT_MINAREA 5, default.conv filter, DEBLEND_NTHRESH 32, DEBLEND_MINCONT
  0.005, CLEAN N, BACK_SIZE 64, BACK_FILTERSIZE 3, WEIGHT_TYPE MAP_VAR (the
  variance plane), PHOT_APERTURES 6,10,16,24 (diameters), windowed centroids;
  the image and variance are read from FITS files and the catalog written as
  ASCII, so its time includes that I/O; the ratio against SExtractor uses our
  time *including* reading the same two FITS files with astropy.

Ours, sep and SExtractor run in ``--repeat`` (5) interleaved rounds after a warm-up
run each, and each keeps its best time (interleaving keeps the ratios honest when
the load of a shared machine drifts); photutils keeps the best of
``--photutils-repeat`` (3) runs after a warm-up.
Prints ``name: value`` lines; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RADII = (3.0, 5.0, 8.0, 12.0)
SEED = 20240612
#: sep's default ("matched") filtering compares the filtered image with the *filtered* noise;
#: SExtractor compares it with the unfiltered noise.  For the normalised 3x3 kernel
#: [[1,2,1],[2,4,2],[1,2,1]]/16 the filtered noise is sqrt(sum k^2)/sum k = 6/16 of the pixel
#: noise, so sep's 3 sigma equals SExtractor's DETECT_THRESH 3 x 6/16 = 1.125.
SX_THRESH = 3.0 * 6.0 / 16.0


def log(msg: str) -> None:
    print(f"# {msg}", flush=True)


def simulate(ny: int, nx: int, seed: int = SEED):
    from surveyred import masks
    from surveyred.simulate import FWHM_PER_SIGMA, render_stars

    rng = np.random.default_rng(seed)
    area_deg2 = ny * nx * (0.26 / 3600) ** 2
    n = int(60000 * area_deg2 * 3)  # 3x the simulator's field density: a moderately crowded frame
    u = rng.uniform(size=n)
    lo, hi, k = 14.0, 25.0, 0.25 * np.log(10)
    mag = np.log(np.exp(k * lo) + u * (np.exp(k * hi) - np.exp(k * lo))) / k  # dN/dm ~ 10^(0.25 m)
    flux = 10 ** (-0.4 * (mag - 27.7)) * 60.0
    x, y = rng.uniform(-5, nx + 5, n), rng.uniform(-5, ny + 5, n)
    s = 3.2 / FWHM_PER_SIGMA
    expected = render_stars((ny, nx), x, y, flux, s, s).astype(np.float32) + np.float32(960.0)
    image = (rng.poisson(expected).astype(np.float32) + rng.normal(0, 6.0, (ny, nx)).astype(np.float32))
    mask = np.zeros((ny, nx), np.int32)
    sat = image >= 90000
    image[sat] = 90000
    mask[sat] |= masks.SAT
    variance = expected + np.float32(36.0)
    return image, mask, variance, n


def best_of(fn, repeat):
    fn()  # warm-up (JIT, caches)
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def interleaved_best(fns: dict, repeat):
    """Best time of each function over ``repeat`` rounds that run every function once, in turn.

    Interleaving makes the ratios robust to the load of a shared machine drifting
    between one side's runs and the other's; the order rotates from round to round
    so that no side always runs first.  Each function is run once first (warm-up).
    """
    out = {k: fn() for k, fn in fns.items()}
    best = {k: float("inf") for k in fns}
    names = list(fns)
    for r in range(repeat):
        for k in names[r % len(names):] + names[:r % len(names)]:  # rotate: every side in every slot
            fn = fns[k]
            t0 = time.perf_counter()
            out[k] = fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best, out


def run_ours(image, mask, variance):
    from surveyred.characterize import CharacterizeConfig, detect_and_measure

    cfg = CharacterizeConfig()

    def fn():
        bkg, sub, var, objs, seg, cols = detect_and_measure(image, mask, variance, cfg=cfg)
        return cols

    return fn


def run_sep(image, mask, variance):
    import sep

    def fn():
        sep.set_extract_pixstack(3_000_000)
        sep.set_sub_object_limit(4096)
        bkg = sep.Background(image, bw=64, bh=64, fw=3, fh=3)
        sub = image - bkg.back()
        objs = sep.extract(sub, 3.0, var=variance, minarea=5, deblend_nthresh=32, deblend_cont=0.005, clean=False)
        out = [sep.sum_circle(sub, objs["x"], objs["y"], r, var=variance) for r in RADII]
        return objs, out

    return fn


def run_photutils(image, mask, variance):
    from astropy.convolution import convolve
    from photutils.aperture import CircularAperture, aperture_photometry
    from photutils.background import Background2D, SExtractorBackground
    from photutils.segmentation import SourceCatalog, deblend_sources, detect_sources

    kernel = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], float)
    kernel /= kernel.sum()
    err = np.sqrt(variance)

    def fn():
        bkg = Background2D(image, (64, 64), filter_size=(3, 3), bkg_estimator=SExtractorBackground())
        sub = image - bkg.background
        conv = convolve(sub, kernel, normalize_kernel=False)
        # the convolved noise is sqrt(sum k^2) of the per-pixel sigma
        thresh = 3.0 * err * np.sqrt((kernel ** 2).sum())
        segm = detect_sources(conv, thresh, n_pixels=5) if _has_n_pixels() else detect_sources(conv, thresh, npixels=5)
        segm = _deblend(deblend_sources, conv, segm)
        cat = SourceCatalog(sub, segm, convolved_data=conv, error=err)
        pos = np.column_stack([_attr(cat, "x_centroid", "xcentroid"), _attr(cat, "y_centroid", "ycentroid")])
        pos = pos[np.all(np.isfinite(pos), axis=1)]
        _ = _attr(cat, "semimajor_axis", "semimajor_sigma"), _attr(cat, "semiminor_axis", "semiminor_sigma")
        _ = cat.orientation
        phot = aperture_photometry(sub, [CircularAperture(pos, r) for r in RADII], error=err)
        return pos, phot

    return fn


def _attr(cat, new, old):
    """photutils 3 renamed catalog properties; use the new name when it exists."""
    return getattr(cat, new) if hasattr(type(cat), new) else getattr(cat, old)


def _has_n_pixels():
    import inspect

    from photutils.segmentation import detect_sources

    return "n_pixels" in inspect.signature(detect_sources).parameters


def _deblend(deblend_sources, conv, segm):
    import inspect

    params = inspect.signature(deblend_sources).parameters
    kw = dict(contrast=0.005)
    kw["n_levels" if "n_levels" in params else "nlevels"] = 32
    kw["n_pixels" if "n_pixels" in params else "npixels"] = 5
    if "progress_bar" in params:
        kw["progress_bar"] = False
    if "nproc" in params:
        kw["nproc"] = 1
    return deblend_sources(conv, segm, **kw)


def run_sextractor(binary, workdir: Path, image, variance):
    from astropy.io import fits

    img_path, var_path = workdir / "image.fits", workdir / "var.fits"
    fits.PrimaryHDU(image).writeto(img_path, overwrite=True)
    fits.PrimaryHDU(variance).writeto(var_path, overwrite=True)
    conv = workdir / "default.conv"
    conv.write_text("CONV NORM\n# 3x3 ``all-ground'' convolution mask with FWHM = 2 pixels.\n1 2 1\n2 4 2\n1 2 1\n")
    params = workdir / "default.param"
    params.write_text("\n".join(["NUMBER", "X_IMAGE", "Y_IMAGE", "XWIN_IMAGE", "YWIN_IMAGE",
                                 "FLUX_APER(4)", "FLUXERR_APER(4)", "FLAGS"]) + "\n")
    cat = workdir / "out.cat"
    cmd = [binary, str(img_path), "-c", "/dev/null", "-CATALOG_NAME", str(cat), "-CATALOG_TYPE", "ASCII_HEAD",
           "-PARAMETERS_NAME", str(params), "-FILTER", "Y", "-FILTER_NAME", str(conv),
           "-DETECT_THRESH", f"{SX_THRESH:.4f}", "-ANALYSIS_THRESH", f"{SX_THRESH:.4f}", "-DETECT_MINAREA", "5", "-DEBLEND_NTHRESH", "32",
           "-DEBLEND_MINCONT", "0.005", "-CLEAN", "N", "-BACK_SIZE", "64", "-BACK_FILTERSIZE", "3",
           "-WEIGHT_TYPE", "MAP_VAR", "-WEIGHT_IMAGE", str(var_path), "-PHOT_APERTURES", "6,10,16,24",
           "-SATUR_LEVEL", "90000", "-GAIN", "0", "-MEMORY_PIXSTACK", "3000000", "-MEMORY_BUFSIZE", "4096",
           "-CHECKIMAGE_TYPE", "NONE", "-VERBOSE_TYPE", "QUIET", "-NTHREADS", "1"]

    def fn():
        subprocess.run(cmd, check=True, cwd=workdir, capture_output=True)
        return np.loadtxt(cat, comments="#", ndmin=2)

    return fn, img_path, var_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1024 x 1024 frame")
    p.add_argument("--repeat", type=int, default=5, help="interleaved rounds of ours, sep, SExtractor")
    p.add_argument("--photutils-repeat", type=int, default=3, help="runs of photutils (best of)")
    args = p.parse_args(argv)
    ny, nx = (1024, 1024) if args.quick else (4096, 2048)
    log(f"simulating a {nx} x {ny} frame")
    image, mask, variance, nstars = simulate(ny, nx)
    log(f"{nstars} stars rendered")
    fns = {"ours": run_ours(image, mask, variance), "sep": run_sep(image, mask, variance)}
    binary = shutil.which("source-extractor") or shutil.which("sex")
    with tempfile.TemporaryDirectory(prefix="bench_measure_") as tmp:
        tmp = Path(tmp)
        sx_reason = None
        if binary is None:
            sx_reason = "no source-extractor or sex binary on PATH; apt-get install source-extractor"
        else:
            fn, img_path, var_path = run_sextractor(binary, tmp, image, variance)
            try:
                fn()
            except subprocess.CalledProcessError as exc:
                sx_reason = f"source-extractor failed: {exc.stderr.decode(errors='replace')[-200:]}"
            else:
                def ours_with_io():
                    from astropy.io import fits

                    img = fits.getdata(img_path).astype(np.float32)
                    var = fits.getdata(var_path).astype(np.float32)
                    return run_ours(img, mask, var)()

                fns["sextractor"] = fn
                fns["ours_io"] = ours_with_io
        best, out = interleaved_best(fns, args.repeat)
        cols, (objs, _) = out["ours"], out["sep"]
        print(f"detect_measure_ours_s: {best['ours']:.3f}")
        print(f"detect_measure_ours_nsources: {len(cols['x'])}")
        print(f"detect_measure_sep_s: {best['sep']:.3f}")
        print(f"detect_measure_sep_nsources: {len(objs)}")
        print(f"detect_measure_overhead_vs_sep: {best['ours'] / best['sep']:.2f}")
        try:
            t_ph, (pos, _) = best_of(run_photutils(image, mask, variance), args.photutils_repeat or args.repeat)
            print(f"detect_measure_photutils_s: {t_ph:.3f}")
            print(f"detect_measure_photutils_nsources: {len(pos)}")
            print(f"detect_measure_speedup_vs_photutils: {t_ph / best['ours']:.2f}")
        except ImportError as exc:
            print(f"detect_measure_speedup_vs_photutils: unavailable (photutils not importable: {exc})")
        if sx_reason is not None:
            print(f"detect_measure_speedup_vs_source_extractor: unavailable ({sx_reason})")
            return 0
        cat = out["sextractor"]
        print(f"detect_measure_source_extractor_s: {best['sextractor']:.3f}")
        print(f"detect_measure_ours_with_fits_read_s: {best['ours_io']:.3f}")
        print(f"detect_measure_source_extractor_nsources: {len(cat)}")
        print(f"detect_measure_speedup_vs_source_extractor: {best['sextractor'] / best['ours_io']:.2f}")
        from scipy.spatial import cKDTree

        # SExtractor pixels are 1-based; its windowed centroids vs ours
        sx = np.column_stack([cat[:, 3] - 1, cat[:, 4] - 1])
        d, _ = cKDTree(np.column_stack([cols["x"], cols["y"]])).query(sx)
        print(f"detect_measure_source_extractor_matched_frac_0p5px: {np.mean(d < 0.5):.4f}")
        print(f"detect_measure_source_extractor_matched_frac_1px: {np.mean(d < 1.0):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
