"""The workflow run the workflow, status and report tests share (session scope)."""

from __future__ import annotations

import shutil

import pytest
import yaml

from wf_support import show, tiny_config, workflow


@pytest.fixture(scope="session")
def tiny_run(tiny_survey, tmp_path_factory):
    """The workflow run to completion (``--cores 2``) on a copy of the tiny survey."""
    base = tmp_path_factory.mktemp("workflow")
    raw = base / "raw"
    shutil.copytree(tiny_survey / "raw", raw)
    workdir = base / "work"
    workdir.mkdir()
    configfile = base / "config.yaml"
    configfile.write_text(yaml.safe_dump(tiny_config(tiny_survey, raw)))
    proc = workflow("--cores", "2", workdir=workdir, configfile=configfile)
    assert proc.returncode == 0, show(proc)
    return {"raw": raw, "workdir": workdir, "results": workdir / "results", "configfile": configfile}
