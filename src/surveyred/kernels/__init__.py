"""Numba pixel kernels and their NumPy references.

Each kernel module holds the numba kernels (``@numba.njit(cache=True)``; a
serial and a ``parallel=True`` variant chosen by the wrapper from
``threads``), a wrapper that validates its input, converts dtypes and sets the
numba thread count, and a plain NumPy reference ``*_ref`` that the tests
compare the kernel with.  Results never depend on the thread count.

* :func:`row_statistic` - per-row overscan level (mean, median, clipped mean);
* :func:`clipped_mean` - sigma-clipped mean combination of a frame stack, and
  :func:`combine_files_chunked` doing it over FITS files in row blocks;
* :func:`isr_amp` - one amplifier's fused ISR pixel pass into the assembled
  detector image, variance and mask;
* :func:`find_cosmic_rays` - cosmic-ray mask by sharpness against the PSF.
"""

from .combine import clipped_mean, combine_files_chunked
from .cosmic import find_cosmic_rays
from .isr import isr_amp
from .overscan import row_statistic
from .stack import stack_band
from .warp import lanczos_warp

__all__ = [
    "clipped_mean", "combine_files_chunked", "find_cosmic_rays", "isr_amp", "lanczos_warp", "row_statistic",
    "stack_band",
]
