#!/usr/bin/env bash
# Run by snakemake --sdm conda inside the new environment: install this checkout
# of surveyred (its dependencies come from envs/surveyred.yaml). The workflow
# (rules/common.smk) exports SURVEYRED_SRC as the directory of the Snakefile.
set -euo pipefail
: "${SURVEYRED_SRC:?SURVEYRED_SRC must point at the surveyred checkout}"
python -m pip install --no-deps --no-build-isolation -e "${SURVEYRED_SRC}"
