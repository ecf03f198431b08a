"""FITS input and output with clear errors and atomic writes.

Reading: every failure (missing file, not FITS, truncated data, missing HDU)
becomes a :class:`~surveyred.errors.CorruptInput` naming the file and the cause.
Writing: products are written to a temporary file in the destination directory
and renamed into place, so an interrupted job never leaves a half-written
product under its final name.  Inputs are opened read-only.
"""

from __future__ import annotations

import contextlib
from glob import escape as glob_escape
import os
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning
from astropy.io.fits.verify import VerifyWarning

from . import masks
from .errors import CorruptInput


#: What reading a damaged file can raise (zlib.error and EOFError from truncated .gz streams).
_READ_ERRORS = (OSError, ValueError, TypeError, EOFError, zlib.error, AstropyUserWarning)


def _clear_stale_temporaries(path: Path) -> None:
    """Remove temporaries of ``path`` left by a writer that was killed (SIGKILL, OOM).

    Only one job writes a given product (Snakemake guarantees it), so any
    ``.<name>.*.tmp`` beside it is debris of an earlier, interrupted attempt.
    """
    for stale in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    On any exception the temporary file is removed and nothing appears at
    ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale_temporaries(path)
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


def write_parquet(df, path: str | os.PathLike, meta) -> None:
    """Write a DataFrame atomically to ``path`` as Parquet, ``meta`` in the schema metadata.

    ``meta`` values are stored as strings beside pandas' own metadata (so that
    the table reads back with its dtypes); no timestamps, so identical inputs
    give identical bytes.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    md = dict(table.schema.metadata or {})
    md.update({str(k).encode(): str(v).encode() for k, v in meta.items()})
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(md), tmp)


def write_hdulist(hdul: fits.HDUList, path: str | os.PathLike) -> None:
    """Write ``hdul`` atomically to ``path``.

    No CHECKSUM/DATASUM cards: astropy stamps the wall-clock time into their
    comments, which would make identical runs give different bytes.
    """
    with atomic_path(path) as tmp:
        hdul.writeto(tmp, overwrite=True)


def write_all(items) -> None:
    """Write several products all or none.

    ``items`` is a sequence of ``(path, HDUList)``.  Every list is written to a
    temporary file beside its destination first; only when all are written are
    they renamed into place.  On failure no temporary file is left behind and
    no destination is touched.
    """
    tmps: list[str] = []
    try:
        for path, hdul in items:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            _clear_stale_temporaries(path)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmps.append(tmp)
            hdul.writeto(tmp, overwrite=True)  # no checksums: see write_hdulist
        for (path, _), tmp in zip(items, tmps):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


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
    except _READ_ERRORS as exc:
        raise CorruptInput(f"not a readable FITS file ({_cause(exc)})", path=path) from exc
    size = path.stat().st_size
    for i, hdu in enumerate(hdul):
        end = hdu._data_offset + hdu._data_size  # noqa: SLF001 - astropy exposes no public end offset
        # compressed streams (.gz, .bz2) have no on-disk offsets; tile-compressed .fz files do
        if end > size and not str(path).endswith((".gz", ".bz2")):
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
    except _READ_ERRORS as exc:
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


# -- header-only reading (ingest) ------------------------------------------------------


_STREAM_COMPRESSED = (".gz", ".bz2")


def _decompressed_size(path: Path) -> int:
    """Bytes in a gzip/bzip2 stream; raises on a damaged or truncated stream."""
    import bz2
    import gzip

    opener = bz2.open if str(path).endswith(".bz2") else gzip.open
    n = 0
    with opener(path, "rb") as fh:
        while True:
            chunk = fh.read(1 << 22)
            if not chunk:
                return n
            n += len(chunk)


def read_headers(path: str | os.PathLike) -> list[fits.Header]:
    """The headers of every HDU of a FITS file, without reading pixel data.

    The file is checked for completeness like :func:`open_fits`: every HDU's
    declared data must fit in the file.  Plain and tile-compressed (``.fz``)
    files are checked against the file size; whole-file compressed files
    (``.gz``, ``.bz2``) are decompressed as a stream (without keeping the
    bytes) so that a truncated stream is caught too.  For a tile-compressed
    HDU the header is that of the uncompressed image (``NAXISn`` are the
    image's).

    Returns
    -------
    list of astropy.io.fits.Header
        One header per HDU, in file order; ``EXTNAME`` identifies named HDUs.

    Raises
    ------
    CorruptInput
        If the file is missing, empty, not FITS, truncated or damaged.
    """
    path = Path(path)
    if not path.exists():
        raise CorruptInput("file does not exist", path=path)
    if path.stat().st_size == 0:
        raise CorruptInput("empty file, not FITS", path=path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", AstropyUserWarning)
            warnings.simplefilter("ignore", VerifyWarning)
            with fits.open(path, mode="readonly", memmap=True, lazy_load_hdus=False) as hdul:
                headers = [hdu.header.copy() for hdu in hdul]
                end = max(hdu._data_offset + hdu._data_size for hdu in hdul)  # noqa: SLF001
    except CorruptInput:
        raise
    except (OSError, ValueError, TypeError, EOFError, zlib.error, AstropyUserWarning) as exc:
        cause = _cause(exc)
        what = "truncated" if "truncated" in cause.lower() else "not a readable FITS file"
        raise CorruptInput(f"{what} ({cause})", path=path) from exc
    if str(path).endswith(_STREAM_COMPRESSED):
        try:
            size = _decompressed_size(path)
        except (OSError, EOFError, ValueError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            raise CorruptInput(f"compressed stream damaged or truncated ({_cause(exc)})", path=path) from exc
    else:
        size = path.stat().st_size
    if end > size:
        raise CorruptInput(f"truncated: its HDUs need {end} bytes, file has {size}", path=path)
    return headers
