# Calibrate: one job per science visit, all detectors. Astrometric (TAN-SIP against
# the astrometric reference catalog) and photometric (zero-point against the
# photometric one) calibration of the characterize catalogs. Writes per detector a
# calibrated source catalog and a WCS/zero-point product, and one visit summary.
# A detector that fails is recorded in the summary; the job fails only when every
# detector failed. A field no reference star reaches is "not_absolutely_calibrated".
# Jointcal: one job per field (OBJECT) and band, fitting all its frames together
# (or, without a reference catalog, registering them onto the deepest one).

from surveyred.jointcal import group_visits

CALSRC_DIR = os.path.join(RESULTS, "calsrc", "{night}", "{visit}")
CALWCS_DIR = os.path.join(RESULTS, "wcs", "{night}", "{visit}")
VISIT_SUMMARY = os.path.join(RESULTS, "visit_summary", "{night}", "{visit}.parquet")
JOINTCAL = os.path.join(RESULTS, "jointcal", "{field}", "{band}.parquet")
# inputs: SRC_DIR and PSF_DIR (rules/characterize.smk, included before this file)
# and CALEXP_DIR (rules/common.smk)
CALIBRATE_CONFIG_JSON = json.dumps(
    {
        k: v
        for k, v in config["calibrate"].items()
        if k not in ("jointcal", "do_jointcal")
    },
    sort_keys=True,
)
JOINTCAL_CONFIG_JSON = json.dumps(config["calibrate"]["jointcal"], sort_keys=True)
# <store>/<name> of the astrometric and photometric catalogs, or "none"
REFCAT_ASTROM, REFCAT_PHOTOM = (
    (
        "none"
        if str(config["refcat"][kind]).lower() == "none"
        else os.path.join(config["refcat"]["store"], config["refcat"][kind])
    )
    for kind in ("astrometric", "photometric")
)


wildcard_constraints:
    field=r"[A-Za-z0-9_.-]+",


# Input functions and targets as lambdas: `snakemake --lint` wants functions in
# rules/common.smk, which belongs to the shared layout; the logic is in surveyred.jointcal.
# {(field, band): [(night, visit), ...]}: a field is the OBJECT of the science frames
jointcal_groups = lambda: group_visits(
    {key: str(row.band) for key, row in calib_plan()[1].items()}, inventory()
)
jointcal_frames = lambda wildcards, pattern, name: [
    path
    for night, visit in jointcal_groups()[(wildcards.field, wildcards.band)]
    for path in per_detector(pattern.format(night=night, visit=visit), name, visit)
]
jointcal_dirs = lambda wildcards, pattern: [
    pattern.format(night=night, visit=visit)
    for night, visit in jointcal_groups()[(wildcards.field, wildcards.band)]
]
# every science visit's summary (which pulls in its calibrate job), and the joint
# fits per field and band
calibrate_targets = lambda wildcards: [
    VISIT_SUMMARY.format(night=night, visit=visit) for night, visit in science_visits()
] + (
    [JOINTCAL.format(field=f, band=b) for f, b in sorted(jointcal_groups())]
    if config["calibrate"]["do_jointcal"]
    else []
)


rule calibrate:
    input:
        src=SRC_DIR,
        psf=PSF_DIR,
        calexp=CALEXP_DIR,
    output:
        calsrc=directory(CALSRC_DIR),
        wcs=directory(CALWCS_DIR),
        summary=VISIT_SUMMARY,
    log:
        os.path.join(LOGS, "calibrate", "{night}", "{visit}.log"),
    benchmark:
        os.path.join(BENCHMARKS, "calibrate", "{night}", "{visit}.tsv")
    conda:
        "../envs/surveyred.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb(1000),
        runtime=runtime_min(10),
    params:
        instrument=INSTRUMENT_ARG,
        refcat_astrom=REFCAT_ASTROM,
        refcat_photom=REFCAT_PHOTOM,
        src=visit_files(SRC_DIR, VISIT_PARQUET),
        psf=visit_files(PSF_DIR, VISIT_FITS),
        calexp=visit_files(CALEXP_DIR, VISIT_FITS),
        cfg=CALIBRATE_CONFIG_JSON,
    shell:
        "surveyred calibrate --src {params.src:q} --calexp {params.calexp:q} --psf {params.psf:q}"
        " --refcat-astrom {params.refcat_astrom:q} --refcat-photom {params.refcat_photom:q}"
        " --instrument {params.instrument:q}"
        " --outdir-calsrc {output.calsrc:q} --outdir-wcs {output.wcs:q}"
        " --summary {output.summary:q} --config-json {params.cfg:q}"
        " --threads {threads} --log {log:q}"


rule jointcal:
    input:
        calsrc=lambda wildcards: jointcal_dirs(wildcards, CALSRC_DIR),
        wcs=lambda wildcards: jointcal_dirs(wildcards, CALWCS_DIR),
    output:
        JOINTCAL,
    log:
        os.path.join(LOGS, "jointcal", "{field}", "{band}.log"),
    benchmark:
        os.path.join(BENCHMARKS, "jointcal", "{field}", "{band}.tsv")
    conda:
        "../envs/surveyred.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
        runtime=runtime_min(20),
    params:
        refcat_astrom=REFCAT_ASTROM,
        calsrc=lambda wildcards: jointcal_frames(wildcards, CALSRC_DIR, VISIT_PARQUET),
        wcs=lambda wildcards: jointcal_frames(wildcards, CALWCS_DIR, VISIT_FITS),
        cfg=JOINTCAL_CONFIG_JSON,
    shell:
        "surveyred jointcal --calsrc {params.calsrc:q} --wcs {params.wcs:q}"
        " --refcat-astrom {params.refcat_astrom:q} --output {output:q}"
        " --config-json {params.cfg:q} --threads {threads} --log {log:q}"
