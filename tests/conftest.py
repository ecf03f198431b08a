"""Shared fixtures: real telescope frames (when present) and one tiny simulated survey."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"

#: Arguments of the one simulated survey the tests share.
TINY_SURVEY_ARGS = ("--preset", "tiny", "--seed", "3")


def pytest_configure(config):
    # also declared in pyproject.toml; repeated so the markers exist under any rootdir
    config.addinivalue_line("markers", "workflow: drives snakemake end to end (slower)")
    config.addinivalue_line("markers", "real: uses real telescope frames from ../shared/data/real")


def simulator_available() -> bool:
    """True when ``surveyred.simulate`` can be imported."""
    try:
        return importlib.util.find_spec("surveyred.simulate") is not None
    except ImportError:
        return False


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository checkout (holds the Snakefile and config/)."""
    return REPO


@pytest.fixture(scope="session")
def shared_real_dir() -> Path:
    """``../shared/data/real`` beside the checkout; skips when absent (fresh clones)."""
    if not SHARED_REAL.is_dir():
        pytest.skip(f"real telescope frames not available ({SHARED_REAL} is absent)")
    return SHARED_REAL


@pytest.fixture(scope="session")
def tiny_survey(tmp_path_factory) -> Path:
    """A tiny simulated survey written once per session; returns its directory.

    Raw frames are under ``<dir>/raw/<night>/``.  Skips when the simulator is
    not importable.
    """
    if not simulator_available():
        pytest.skip("surveyred.simulate is not importable (simulator not installed)")
    from surveyred import simulate

    out = tmp_path_factory.mktemp("tiny_survey") / "sim"
    status = simulate.main([str(out), *TINY_SURVEY_ARGS])
    if status:
        pytest.fail(f"surveyred simulate {out} {' '.join(TINY_SURVEY_ARGS)} exited with {status}")
    return out
