"""The Snakemake report renders in headless Chromium with every plot loaded.

``snakemake --report report.html`` writes a single-page JavaScript (React) app:
the result files are embedded as data URIs in a ``results`` object and an image
is only put into the page after navigating to it (Results -> category ->
subcategory -> the file's "eye" button).  So the test drives the page like a
user, with Playwright for Python on the system Chromium (``executable_path``;
Playwright downloads no browser): for every image result it opens the report
afresh, navigates to the file, waits until an ``<img>`` with that file's data URI
has finished loading and reads ``naturalWidth``/``naturalHeight``; they must
equal the PNG's own size (read from its IHDR chunk on disk).  A broken or
truncated image decodes to ``naturalWidth == 0`` and fails the test; the harness
itself is checked on a small report with one corrupt PNG.

Playwright over the raw Chrome DevTools Protocol because it waits for the app's
asynchronous rendering and exposes each element's state reliably; it is a test
dependency only (the ``test`` extra).  Without Chromium or Playwright the test
skips, and fails with the reason when ``SURVEYRED_REQUIRE_SLURM=1`` (CI).
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
import textwrap
from pathlib import Path

import pytest

from wf_support import REPO, show, snakemake, workflow

pytestmark = pytest.mark.workflow

CHROMIUM = os.environ.get("SURVEYRED_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
REQUIRED = os.environ.get("SURVEYRED_REQUIRE_SLURM") == "1"
NAV_TIMEOUT_MS = 30000


def _need_browser() -> None:
    reason = None
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        reason = f"headless Chromium not found at {CHROMIUM} (Debian package 'chromium')"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "playwright (Python) is not installed (pip install -e '.[test]')"
    if reason:
        if REQUIRED:
            pytest.fail(f"{reason}; SURVEYRED_REQUIRE_SLURM=1 makes this a failure")
        pytest.skip(reason)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    head = Path(path).read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return (0, 0)
    return struct.unpack(">II", head[16:24])


_FIND_IMG = """
(name) => {
  const needle = "filename=" + name + ";";
  const img = Array.from(document.images).find(i => i.src.startsWith("data:") && i.src.includes(needle));
  if (!img || !img.complete) return null;
  return [img.naturalWidth, img.naturalHeight];
}
"""


def render_report_images(html: Path) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Navigate to every image result of a Snakemake report; ``{path: (naturalWidth, naturalHeight)}``.

    Also returns the JavaScript errors the page raised.  A result that cannot be
    reached or whose image never completes maps to ``(0, 0)``.
    """
    from playwright.sync_api import TimeoutError as PwTimeout
    from playwright.sync_api import sync_playwright

    url = Path(html).resolve().as_uri()
    seen: dict[str, tuple[int, int]] = {}
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(NAV_TIMEOUT_MS)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url, wait_until="load")
            results = page.evaluate("() => Object.entries(results).map(([k, v]) => [k, v.mime_type])")
            categories = page.evaluate("() => categories")
            where = {path: (cat, sub) for cat, subs in categories.items() for sub, paths in subs.items()
                     for path in paths}
            for path, mime in sorted(results):
                if not str(mime).startswith("image/"):
                    continue
                cat, sub = where.get(path, (None, None))
                page.goto(url, wait_until="load")
                try:
                    page.get_by_text("Results", exact=True).first.click()
                    if cat is not None:
                        page.get_by_text(cat, exact=True).first.click()
                    row = page.locator("tr", has_text=path)
                    try:
                        row.first.wait_for(state="visible", timeout=2000)
                    except PwTimeout:
                        page.get_by_text(sub, exact=True).first.click()  # a category with subcategories
                    row.first.locator("a[iconname=eye]").first.click()
                    size = page.wait_for_function(_FIND_IMG, arg=Path(path).name, timeout=NAV_TIMEOUT_MS)
                    seen[path] = tuple(size.json_value())
                except PwTimeout as exc:
                    errors.append(f"{path}: not shown ({str(exc).splitlines()[0]})")
                    seen[path] = (0, 0)
        finally:
            browser.close()
    return seen, errors


def _toy_report(tmp: Path, *, corrupt: bool) -> Path:
    """A tiny workflow with two plots in categories/subcategories (one corrupt if asked) and its report."""
    (tmp / "cap.rst").write_text("Plot {{ snakemake.wildcards.x }}.\n")
    (tmp / "wf.rst").write_text("A toy workflow.\n")
    plot = (f"{sys.executable} -c \"import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt; "
            "plt.figure(figsize=(4, 3), dpi=50); plt.plot([1, 2]); plt.savefig('{output}')\"")
    bad = "printf 'not a png' > {output}" if corrupt else plot
    (tmp / "Snakefile").write_text(textwrap.dedent(f"""\
        report: "wf.rst"

        rule all:
            input: "plots/a.png", "plots/b.png", "other/c.png"

        rule plot:
            output: report("plots/{{x}}.png", caption="cap.rst", category="QA", subcategory="{{x}} maps")
            shell: {plot!r}

        rule other:
            output: report("other/c.png", caption="cap.rst", category="Other plots")
            shell: {bad!r}
        """))
    proc = snakemake("-c1", cwd=tmp)
    assert proc.returncode == 0, show(proc)
    proc = snakemake("--report", "report.html", cwd=tmp)
    assert proc.returncode == 0, show(proc)
    return tmp / "report.html"


def test_harness_sees_good_and_broken_images(tmp_path):
    """The rendering harness: all three plots are reached; the corrupt one has naturalWidth 0."""
    _need_browser()
    html = _toy_report(tmp_path, corrupt=True)
    seen, errors = render_report_images(html)
    assert set(seen) == {"plots/a.png", "plots/b.png", "other/c.png"}, errors
    assert seen["plots/a.png"] == seen["plots/b.png"] == png_size(tmp_path / "plots" / "a.png") == (200, 150)
    assert seen["other/c.png"][0] == 0


def test_report_renders_every_plot(tiny_run):
    _need_browser()
    workdir = tiny_run["workdir"]
    html = workdir / "report.html"
    proc = workflow("--report", str(html), workdir=workdir, configfile=tiny_run["configfile"])
    assert proc.returncode == 0, show(proc)
    assert html.stat().st_size > 0
    seen, errors = render_report_images(html)
    plots = tiny_run["results"] / "qa" / "plots"
    expected = {f"results/qa/plots/{name}" for name in (
        "focal_plane_psf_fwhm.png", "focal_plane_zero_point.png", "astrometric_residuals.png",
        "photometric_repeatability.png", "lightcurves.png", "status_table.png")}
    expected |= {str(p.relative_to(workdir)) for p in sorted((plots / "coadd").glob("*.png"))}
    assert any("coadd_" in p for p in expected), "no coadd thumbnail was made"
    # a comma in a file name ends the data URI's header: the image would not load
    assert not [p for p in expected if "," in Path(p).name]
    assert expected <= set(seen), f"missing from the report: {sorted(expected - set(seen))}; {errors}"
    for path, (w, h) in sorted(seen.items()):
        assert (w, h) == png_size(workdir / path) and w > 0, f"{path}: rendered {w}x{h}; {errors}"
    assert not [e for e in errors if "not shown" in e], errors
