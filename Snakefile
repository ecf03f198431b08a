# surveyred: raw mosaic CCD exposures -> inventory -> master calibrations -> ISR ->
# characterize -> calibrate -> warp -> coadd -> coadd catalogs -> forced photometry
# -> light curves -> QA (status, metrics, plots; `snakemake --report report.html`).
# Thin on purpose: configuration, validation, the rule files and the target.
# Pixel rules run one job per exposure (or calibration group) and write one file
# per detector; see README.md ("Why one job per exposure").

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "config/schema.yaml")


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/ingest.smk"
include: "rules/calib.smk"
include: "rules/isr.smk"
include: "rules/characterize.smk"
include: "rules/calibrate.smk"
include: "rules/coadd.smk"
include: "rules/qa.smk"


rule all:
    default_target: True
    input:
        all_targets,
        calibrate_targets,
        coadd_targets,
        qa_targets,
    localrule: True
