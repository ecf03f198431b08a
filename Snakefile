# surveyred: raw mosaic CCD exposures -> inventory -> master calibrations -> ISR ->
# characterize -> calibrate -> warp -> coadd -> coadd catalogs -> forced photometry.
# Thin on purpose: configuration, validation, the rule files and the target.
# Pixel rules run one job per exposure (or calibration group) and write one file
# per detector; see README.md ("Why one job per exposure").

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "config/schema.yaml")


include: "rules/common.smk"
include: "rules/ingest.smk"
include: "rules/calib.smk"
include: "rules/isr.smk"
include: "rules/characterize.smk"
include: "rules/calibrate.smk"
include: "rules/coadd.smk"


rule all:
    default_target: True
    input:
        all_targets,
        calibrate_targets,
        coadd_targets,
    localrule: True
