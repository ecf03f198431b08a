"""Sky geometry shared by the pipeline and the simulator: the gnomonic (TAN) projection."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["tan_deproject", "tan_project"]


def tan_project(ra, dec, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic standard coordinates (xi, eta), deg, about ``(ra0, dec0)``.

    Notes
    -----
    ``cos c = sin d0 sin d + cos d0 cos d cos(a - a0)``,
    ``xi = cos d sin(a - a0) / cos c``,
    ``eta = (cos d0 sin d - sin d0 cos d cos(a - a0)) / cos c``.
    """
    a = np.radians(np.asarray(ra, float) - ra0)
    d = np.radians(np.asarray(dec, float))
    d0 = math.radians(dec0)
    cosc = math.sin(d0) * np.sin(d) + math.cos(d0) * np.cos(d) * np.cos(a)
    xi = np.cos(d) * np.sin(a) / cosc
    eta = (math.cos(d0) * np.sin(d) - math.sin(d0) * np.cos(d) * np.cos(a)) / cosc
    return np.degrees(xi), np.degrees(eta)


def tan_deproject(xi, eta, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`tan_project`."""
    x = np.radians(np.asarray(xi, float))
    y = np.radians(np.asarray(eta, float))
    d0 = math.radians(dec0)
    denom = math.cos(d0) - y * math.sin(d0)
    ra = ra0 + np.degrees(np.arctan2(x, denom))
    dec = np.degrees(np.arctan2(math.sin(d0) + y * math.cos(d0), np.hypot(x, denom)))
    return np.mod(ra, 360.0), dec
