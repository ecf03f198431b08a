"""Exceptions raised by surveyred.

Every exception carries a *failure class* (its class name by default) that the
production-status report counts, and a message that names the file and the
cause.  The command line prints ``<FailureClass>: <message>`` on one line and
exits non-zero, so Snakemake marks the job failed and ``--keep-going`` goes on.
"""

from __future__ import annotations


class SurveyredError(Exception):
    """Base class of every error surveyred raises on purpose."""

    #: Exit status used by the command line for this class of failure.
    exit_code = 2

    def __init__(self, message: str, *, path: str | None = None):
        self.path = None if path is None else str(path)
        if self.path and self.path not in message:
            message = f"{self.path}: {message}"
        super().__init__(message)

    @property
    def failure_class(self) -> str:
        return type(self).__name__

    def one_line(self) -> str:
        """The message as the command line prints it."""
        text = " ".join(str(self).split())
        return f"{self.failure_class}: {text}"


class ConfigError(SurveyredError):
    """The pipeline configuration is invalid."""


class InstrumentError(ConfigError):
    """An instrument description is inconsistent."""


class CorruptInput(SurveyredError):
    """An input file cannot be read: truncated, not FITS, or damaged."""


class MissingKeyword(CorruptInput):
    """A header keyword that the instrument map requires is absent or empty."""


class UnknownFilter(CorruptInput):
    """The filter in the header is not in the instrument's filter map."""


class ShapeMismatch(CorruptInput):
    """A frame's pixel shape does not match the instrument description."""


class Unclassifiable(CorruptInput):
    """The observation type cannot be mapped to bias, flat, dark or science."""


class MissingCalibration(SurveyredError):
    """No master calibration is valid for a frame."""


class InsufficientData(SurveyredError):
    """Too few input frames or pixels for the requested computation."""


class TooFewStars(SurveyredError):
    """Too few usable stars for a PSF model or a fit."""


class NoSources(SurveyredError):
    """Detection found no source on a frame (or extraction could not run)."""


class NoReferenceMatch(SurveyredError):
    """No reference stars in the field, or no pattern matches detections to them."""


class TooFewMatches(SurveyredError):
    """Too few detections matched to reference stars for the requested fit."""


class PoorAstrometricFit(SurveyredError):
    """The astrometric fit converged but its scatter exceeds the configured limit."""


class MissingInput(SurveyredError):
    """An input that the job's inputs promise is absent: a manifest, a listed file, a detector's product."""


class InconsistentInput(SurveyredError):
    """Inputs that must agree do not: another band, tract, patch, visit or pixel grid."""


FAILURE_CLASSES = (
    "ConfigError",
    "InstrumentError",
    "CorruptInput",
    "MissingKeyword",
    "UnknownFilter",
    "ShapeMismatch",
    "Unclassifiable",
    "MissingCalibration",
    "InsufficientData",
    "TooFewStars",
    "NoSources",
    "NoReferenceMatch",
    "TooFewMatches",
    "PoorAstrometricFit",
    "MissingInput",
    "InconsistentInput",
)
