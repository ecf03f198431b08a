"""Shared plumbing for command-line entry points: logging, threads, errors."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, Callable

from .errors import SurveyredError

log = logging.getLogger("surveyred")


def setup_logging(logfile: str | None = None, *, level: int = logging.INFO) -> None:
    """Log to stderr and, when given, to ``logfile`` (the rule's ``log:``)."""
    root = logging.getLogger("surveyred")
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if logfile:
        os.makedirs(os.path.dirname(os.path.abspath(logfile)), exist_ok=True)
        fh = logging.FileHandler(logfile, mode="w")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.propagate = False


def set_threads(threads: int | None) -> int:
    """Set numba's thread count (bounded by what numba was started with)."""
    import numba

    n = max(1, min(int(threads or 1), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


def common_arguments(parser: argparse.ArgumentParser, *, threads: bool = True) -> None:
    """Add ``--log`` (and ``--threads``) to a sub-command parser."""
    parser.add_argument("--log", default=None, help="also write the log to this file")
    if threads:
        parser.add_argument("--threads", type=int, default=1, help="numba threads (the rule's threads)")


def json_arg(text: str | None) -> dict[str, Any]:
    """Parse a ``--config-json`` value (``{}`` when absent)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--config-json is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--config-json must be a JSON object")
    return value


#: How :func:`run` writes the failure into the log (``--log FILE``): the last ERROR
#: record of a failed job's log is ``<what> failed: <FailureClass>: <message>``, the
#: same ``FailureClass: message`` line the command prints on stderr.  The
#: production status (:mod:`surveyred.status`) reads it back.
FAILURE_LINE = "%s failed: %s"


def run(body: Callable[[], Any], *, what: str) -> int:
    """Run a command body: log timing, turn errors into one line and exit 2.

    A :class:`SurveyredError` is printed as ``FailureClass: message`` (the
    message names the file and the cause); a :class:`MemoryError` as
    ``OutOfMemory: <what>`` (exit 3); any other exception is logged with its
    traceback and reported as ``InternalError``.  The same one line also goes
    into the log file (``<what> failed: FailureClass: message``, see
    :data:`FAILURE_LINE`) as the job's last ERROR record.  Nothing is
    swallowed: the exit status is non-zero so Snakemake marks the job failed.
    """
    t0 = time.perf_counter()
    try:
        body()
    except SurveyredError as exc:
        line = exc.one_line()
        log.error(FAILURE_LINE, what, line)
        print(line, file=sys.stderr)
        return exc.exit_code
    except MemoryError:
        log.exception("%s ran out of memory", what)
        line = "OutOfMemory: " + what
        log.error(FAILURE_LINE, what, line)
        print(line, file=sys.stderr)
        return 3
    except Exception as exc:  # noqa: BLE001 - reported, then the job fails
        log.exception("%s failed with an unexpected error", what)
        line = " ".join(f"InternalError: {what}: {type(exc).__name__}: {exc}".split())
        log.error(FAILURE_LINE, what, line)
        print(line, file=sys.stderr)
        return 1
    log.info("%s done in %.1f s", what, time.perf_counter() - t0)
    return 0
