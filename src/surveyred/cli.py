"""The ``surveyred`` command line.

Each stage module owns its sub-command through a ``main(argv)`` function; this
dispatcher imports only the module asked for, so start-up stays fast.  Every
sub-command accepts ``--log FILE`` and ``--threads N`` where meaningful, exits 0
on success and non-zero with a one-line ``FailureClass: file: cause`` message on
failure (see :func:`surveyred.runtime.run`).
"""

from __future__ import annotations

import importlib
import sys

#: sub-command -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "simulate": ("surveyred.simulate", "main", "write a simulated raw survey with its truth"),
    "ingest": ("surveyred.ingest", "main", "scan raw frames into the inventory (and rejects)"),
    "master-bias": ("surveyred.calib", "main_bias", "build master biases for one validity group"),
    "master-flat": ("surveyred.calib", "main_flat", "build master flats for one validity group and band"),
    "isr": ("surveyred.isr", "main", "instrument signature removal of one exposure's detectors"),
    "provenance": ("surveyred.provenance", "main", "print the provenance recorded in products"),
    "characterize": ("surveyred.characterize", "main", "background, detection, PSF and measurement of one visit"),
    "refcat": ("surveyred.refcat", "main", "reference-catalog store: fetch (Gaia/PS1/SDSS) or ingest a table"),
    "calibrate": ("surveyred.calibrate", "main", "astrometric and photometric calibration of one visit's sources"),
    "jointcal": ("surveyred.jointcal", "main", "joint astrometry of all exposures of one field and band"),
    "metrics": ("surveyred.metrics", "main", "LSST SRD science metrics (PA1, PF1, AM1/AM2, zero-point scatter) per band"),
    "qa-plots": ("surveyred.plots", "main", "QA plots (PNG) of a results tree for the report"),
    "warp": ("surveyred.warpcmd", "main", "warp one visit's detectors onto patches of a tract (common zero-point)"),
    "coadd": ("surveyred.coaddcmd", "main", "stack the warps of one patch and band into a coadd"),
    "coadd-catalog": ("surveyred.coaddcat", "main", "detection and measurement on a patch's coadds: object catalog"),
    "forced-phot": ("surveyred.forced", "main", "forced photometry of one visit at object and user positions"),
    "lightcurve": ("surveyred.lightcurve", "main", "light curves (and plots) from forced photometry"),
    "status": ("surveyred.status", "main", "production status: ok / failed (with cause) / pending CCDs per band and night"),
    "ccd-summary": ("surveyred.status", "main_ccd_summary", "one row per calibrated CCD: PSF, zero-point, astrometric scatter, status"),
    "disk": ("surveyred.disk", "main", "files and bytes per product type, deletable and missing products"),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items())
    return f"usage: surveyred COMMAND [options]\n\ncommands:\n{rows}\n\n'surveyred COMMAND --help' for a command's options."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from . import __version__
        print(f"surveyred {__version__}")
        return 0
    name = argv.pop(0)
    if name not in COMMANDS:
        print(f"surveyred: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    return int(getattr(importlib.import_module(module), func)(argv) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
