"""surveyred: an astronomical survey reduction pipeline.

Raw mosaic CCD exposures -> inventory -> master calibrations -> instrument
signature removal -> (later stages) catalogs, coadds, forced photometry.
The science lives in I/O-free functions in the stage modules; the pixel loops
live in :mod:`surveyred.kernels` (numba); Snakemake rules call the
``surveyred`` command line.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
