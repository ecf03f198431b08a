"""Provenance recorded in every product header.

Each product carries the software version, the git revision of the code when
it runs from a checkout, a hash of the effective configuration, the step that
made it, its parameters and its input files (in the spirit of ccdproc's
``log_to_metadata`` and BANZAI's status keywords).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping

from . import __version__


def config_hash(config: Mapping[str, Any] | None) -> str:
    """SHA-256 (first 16 hex digits) of the configuration in canonical JSON."""
    text = json.dumps(config or {}, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def git_revision() -> str:
    """The git revision of the source tree, or ``'unknown'`` outside a checkout.

    Honours ``SURVEYRED_GIT_REV`` so that a production can pin what it records.
    """
    env = os.environ.get("SURVEYRED_GIT_REV")
    if env:
        return env
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    rev = out.stdout.strip()
    return rev if out.returncode == 0 and rev else "unknown"


def add_provenance(
    header,
    *,
    step: str,
    inputs: Iterable[str | os.PathLike] = (),
    params: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
) -> None:
    """Write provenance cards into ``header`` (an ``astropy.io.fits.Header``).

    Cards: ``SRVERSN`` software version, ``SRGITREV`` git revision, ``SRSTEP``
    the step, ``SRCFGHSH`` config hash, ``SRNINPUT`` and ``SRIN0001``...
    input file names (base names, so the value does not depend on where the
    run happens), and ``SRPARAMS`` the step parameters as compact JSON (long
    values continue with CONTINUE cards).
    """
    header["SRVERSN"] = (__version__, "surveyred version")
    header["SRGITREV"] = (git_revision(), "surveyred git revision")
    header["SRSTEP"] = (step, "surveyred step that made this product")
    header["SRCFGHSH"] = (config_hash(config), "sha256[:16] of effective config")
    names = [Path(p).name for p in inputs]
    header["SRNINPUT"] = (len(names), "number of input files")
    for i, name in enumerate(names, start=1):
        header[f"SRIN{i:04d}"] = (name, "input file")
    if params is not None:
        header["SRPARAMS"] = json.dumps(params, sort_keys=True, default=str, separators=(",", ":"))


def read_provenance(header) -> dict[str, Any]:
    """The provenance cards of ``header`` as a dictionary."""
    out: dict[str, Any] = {}
    for key in ("SRVERSN", "SRGITREV", "SRSTEP", "SRCFGHSH"):
        if key in header:
            out[key] = header[key]
    n = int(header.get("SRNINPUT", 0))
    out["inputs"] = [header[f"SRIN{i:04d}"] for i in range(1, n + 1) if f"SRIN{i:04d}" in header]
    if "SRPARAMS" in header:
        try:
            out["params"] = json.loads(header["SRPARAMS"])
        except ValueError:
            out["params"] = header["SRPARAMS"]
    return out


def provenance_of(path: str | os.PathLike) -> dict[str, Any]:
    """Provenance recorded in a product: FITS primary header or Parquet metadata.

    Raises
    ------
    CorruptInput
        If the file cannot be read or records no provenance.
    """
    from .errors import CorruptInput

    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            meta = pq.read_schema(path).metadata or {}
        except (OSError, ValueError) as exc:
            raise CorruptInput(f"not a readable Parquet file ({exc})", path=path) from exc
        out = {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"ARROW") and k != b"pandas"}
    else:
        from .fitsio import open_fits

        with open_fits(path) as hdul:
            out = read_provenance(hdul[0].header)
            if "SRVERSN" not in out:
                out = {}
    if not out:
        raise CorruptInput("records no surveyred provenance", path=path)
    return out


def main(argv: list[str] | None = None) -> int:
    """``surveyred provenance FILE...``: print what made each product."""
    import argparse

    from .runtime import run, setup_logging

    p = argparse.ArgumentParser(prog="surveyred provenance",
                                description="Print the provenance recorded in surveyred products.")
    p.add_argument("files", nargs="+")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    setup_logging(None, level=30)

    def body():
        records = {str(f): provenance_of(f) for f in args.files}
        if args.json:
            print(json.dumps(records, indent=2, sort_keys=True, default=str))
            return
        for f, rec in records.items():
            print(f)
            for key, value in rec.items():
                if key == "inputs":
                    print(f"  inputs ({len(value)}):")
                    for name in value:
                        print(f"    {name}")
                elif key == "params":
                    print(f"  params: {json.dumps(value, sort_keys=True)}")
                else:
                    print(f"  {key}: {value}")

    return run(body, what="provenance")
