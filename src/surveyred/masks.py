"""Mask bit planes.

The one definition of the mask planes used in every MASK HDU.  Planes are added
at the end and never renumbered (DESIGN.md section 4).
"""

from __future__ import annotations

import numpy as np

PLANES: dict[str, int] = {
    "BAD": 1 << 0,
    "SAT": 1 << 1,
    "CR": 1 << 2,
    "TRAIL": 1 << 3,
    "INTRP": 1 << 4,
    "EDGE": 1 << 5,
    "DETECTED": 1 << 6,
    "NO_DATA": 1 << 7,
    "SUSPECT": 1 << 8,
    "CLIPPED": 1 << 9,
}

BAD = PLANES["BAD"]
SAT = PLANES["SAT"]
CR = PLANES["CR"]
TRAIL = PLANES["TRAIL"]
INTRP = PLANES["INTRP"]
EDGE = PLANES["EDGE"]
DETECTED = PLANES["DETECTED"]
NO_DATA = PLANES["NO_DATA"]
SUSPECT = PLANES["SUSPECT"]
CLIPPED = PLANES["CLIPPED"]

MASK_DTYPE = np.int32


def bits(*names: str) -> int:
    """OR of the named planes, e.g. ``bits("BAD", "SAT")``."""
    value = 0
    for name in names:
        try:
            value |= PLANES[name]
        except KeyError:
            raise KeyError(f"unknown mask plane {name!r}; known: {', '.join(PLANES)}") from None
    return value


def write_planes(header) -> None:
    """Record the plane definitions in a FITS header (``MP_<NAME> = bit``)."""
    for name, value in PLANES.items():
        key = f"MP_{name}"
        if len(key) > 8:  # say HIERARCH ourselves rather than have astropy warn
            key = f"HIERARCH {key}"
        header[key] = (int(value).bit_length() - 1, f"mask plane {name} bit number")


def describe(value: int) -> list[str]:
    """Names of the planes set in ``value``."""
    return [name for name, bit in PLANES.items() if value & bit]
