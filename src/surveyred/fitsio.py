"""FITS input and output with clear errors and atomic writes.

Reading: every failure (missing file, not FITS, truncated data, missing HDU)
becomes a :class:`~surveyred.errors.CorruptInput` naming the file and the cause.
Writing: products are written to a temporary file in the destination directory
and renamed into place, so an interrupted job never leaves a half-written
product under its final name.  Inputs are opened read-only.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning
from astropy.io.fits.verify import VerifyWarning

from . import masks
from .errors import CorruptInput


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    On any exception the temporary file is removed and nothing appears at
    ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_hdulist(hdul: fits.HDUList, path: str | os.PathLike) -> None:
    """Write ``hdul`` atomically to ``path`` (with checksums)."""
    with atomic_path(path) as tmp:
        hdul.writeto(tmp, overwrite=True, checksum=True)


def open_fits(path: str | os.PathLike) -> fits.HDUList:
    """Open a FITS file read-only, verifying that every HDU's data is complete.

    Raises
    ------
    CorruptInput
        If the file is missing, is not FITS, or is truncated.
    """
    path = Path(path)
    if not path.exists():
        raise CorruptInput("file does not exist", path=path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", AstropyUserWarning)
            warnings.simplefilter("ignore", VerifyWarning)
            hdul = fits.open(path, mode="readonly", memmap=False, lazy_load_hdus=False)
    except (OSError, ValueError, TypeError, AstropyUserWarning) as exc:
        raise CorruptInput(f"not a readable FITS file ({_cause(exc)})", path=path) from exc
    size = path.stat().st_size
    for i, hdu in enumerate(hdul):
        end = hdu._data_offset + hdu._data_size  # noqa: SLF001 - astropy exposes no public end offset
        if end > size and not str(path).endswith((".gz", ".fz", ".bz2")):
            hdul.close()
            raise CorruptInput(
                f"truncated: HDU {i} needs {end} bytes, file has {size}", path=path
            )
    return hdul


def read_image(hdul: fits.HDUList, hdu: int | str, path: str | os.PathLike) -> tuple[np.ndarray, fits.Header]:
    """Read one image HDU as float32-or-wider array, with its header."""
    try:
        ext = hdul[hdu]
    except (KeyError, IndexError) as exc:
        raise CorruptInput(f"has no HDU {hdu!r} (file has {len(hdul)})", path=path) from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", AstropyUserWarning)
            data = ext.data
    except (OSError, ValueError, TypeError, AstropyUserWarning) as exc:
        raise CorruptInput(f"HDU {hdu!r} data unreadable ({_cause(exc)})", path=path) from exc
    if data is None or data.ndim != 2:
        raise CorruptInput(f"HDU {hdu!r} holds no 2-D image", path=path)
    return data, ext.header


def _cause(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__


def exposure_hdus(
    image: np.ndarray,
    mask: np.ndarray,
    variance: np.ndarray,
    *,
    primary_header: fits.Header | None = None,
    image_header: fits.Header | None = None,
) -> fits.HDUList:
    """Build the calibrated-exposure HDU list: PRIMARY, IMAGE, MASK, VARIANCE."""
    primary = fits.PrimaryHDU(header=primary_header)
    img = fits.ImageHDU(np.asarray(image, dtype=np.float32), header=image_header, name="IMAGE")
    img.header["BUNIT"] = "electron"
    msk = fits.ImageHDU(np.asarray(mask, dtype=masks.MASK_DTYPE), name="MASK")
    masks.write_planes(msk.header)
    var = fits.ImageHDU(np.asarray(variance, dtype=np.float32), name="VARIANCE")
    var.header["BUNIT"] = "electron2"
    return fits.HDUList([primary, img, msk, var])


def read_exposure(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, fits.Header, fits.Header]:
    """Read a calibrated exposure: image, mask, variance, primary and image headers."""
    with open_fits(path) as hdul:
        try:
            image = hdul["IMAGE"].data.astype(np.float32)
            mask = hdul["MASK"].data.astype(masks.MASK_DTYPE)
            variance = hdul["VARIANCE"].data.astype(np.float32)
        except KeyError as exc:
            raise CorruptInput(f"not a calibrated exposure ({_cause(exc)})", path=path) from exc
        return image, mask, variance, hdul[0].header.copy(), hdul["IMAGE"].header.copy()
