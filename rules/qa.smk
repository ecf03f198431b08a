# Quality assurance: production status, per-CCD summary, LSST SRD science metrics
# and the plots of the report (`snakemake --report report.html`). Every rule reads
# finished products only; the report items are wrapped in report() with captions
# in report/*.rst.
# Needs from rules/common.smk and the stage files included before this one:
# RESULTS, LOGS, INVENTORY, INSTRUMENT_ARG, science_visits(), VISIT_SUMMARY,
# CALSRC_DIR, REFCAT_ASTROM, COADD, coadd_keys(), LIGHTCURVES, forced_visits(),
# mem_mb(), runtime_min().
# Note: qa_status and qa_ccd_summary depend on every visit summary so that they run
# last; after a partial run (--keep-going) run `surveyred status RESULTS` directly.

import shlex

QA_DIR = os.path.join(RESULTS, "qa")
QA_PLOTS = os.path.join(QA_DIR, "plots")
QA_STATUS = os.path.join(QA_DIR, "status.parquet")
QA_STATUS_TXT = os.path.join(QA_DIR, "status.txt")
QA_CCD_SUMMARY = os.path.join(QA_DIR, "ccd_summary.parquet")
QA_METRICS = os.path.join(QA_DIR, "metrics.parquet")
QA_METRICS_HTML = os.path.join(QA_DIR, "metrics.html")
# patch "x,y" written x-y: a comma in a file name ends the header of the data URI that
# the Snakemake report embeds the image in, and the image does not load
QA_THUMBNAIL = os.path.join(QA_PLOTS, "coadd", "coadd_{tract}_{px}-{py}.png")
QA_CONFIG = config.get("qa", {})
# light curves plotted: qa.lightcurve_objects, else lightcurves.plot
QA_CONFIG_JSON = json.dumps(
    {
        "metrics": QA_CONFIG.get("metrics", {}),
        "plots": QA_CONFIG.get("plots", {}),
        "lightcurve_objects": QA_CONFIG.get("lightcurve_objects")
        or config.get("lightcurves", {}).get("plot", []),
    },
    sort_keys=True,
)
QA_METRICS_JSON = json.dumps(QA_CONFIG.get("metrics", {}), sort_keys=True)
# qa.truth_dir: the truth/ of `surveyred simulate` (simulated data only): the metrics
# table then also gives PA1/AM1 expected from the simulated noise
QA_TRUTH_OPTION = (
    f"--truth {shlex.quote(str(QA_CONFIG['truth_dir']))}"
    if QA_CONFIG.get("truth_dir")
    else ""
)

# Input functions as lambdas (like rules/calibrate.smk): rules/common.smk belongs to
# the shared layout.
qa_visit_summaries = lambda wildcards: [
    VISIT_SUMMARY.format(night=n, visit=v) for n, v in science_visits()
]
qa_calsrc_dirs = lambda wildcards: [
    CALSRC_DIR.format(night=n, visit=v) for n, v in science_visits()
]
qa_lightcurves = lambda wildcards: [LIGHTCURVES] if forced_visits() else []
# one thumbnail per patch, a panel per band (not one job per coadd: at survey scale
# a job per coadd adds a hundred jobs to the dry run for no science)
qa_thumbnails = lambda wildcards: [
    QA_THUMBNAIL.format(tract=t, px=p.split(",")[0], py=p.split(",")[1])
    for t, p in patch_keys()
]
qa_thumbnail_coadds = lambda wildcards: [
    COADD.format(tract=t, patch=p, band=b)
    for t, p, b in coadd_keys()
    if (t, p) == (wildcards.tract, f"{wildcards.px},{wildcards.py}")
]
# every QA product (the lead adds qa_targets to rule all)
qa_targets = lambda wildcards: [
    QA_STATUS,
    QA_STATUS_TXT,
    QA_CCD_SUMMARY,
    QA_METRICS,
    QA_METRICS_HTML,
    os.path.join(QA_PLOTS, "status_table.png"),
] + qa_thumbnails(wildcards)


rule qa_status:
    input:
        inventory=INVENTORY,
        summaries=qa_visit_summaries,
    output:
        table=QA_STATUS,
        summary=report(
            QA_STATUS_TXT,
            caption="../report/status_summary.rst",
            category="Production status",
        ),
    log:
        os.path.join(LOGS, "qa", "status.log"),
    localrule: True
    conda:
        "../envs/surveyred.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(500),
        runtime=runtime_min(5),
    params:
        results=lambda wildcards, input: os.path.dirname(input.inventory),
        cfg=json.dumps(
            {
                "night_utc_offset_hours": config["night_utc_offset_hours"],
                "calib": {"validity": config["calib"]["validity"]},
            },
            sort_keys=True,
        ),
    shell:
        "surveyred status {params.results:q} --output {output.table:q}"
        " --summary {output.summary:q} --config-json {params.cfg:q} --log {log:q}"


rule qa_ccd_summary:
    input:
        inventory=INVENTORY,
        summaries=qa_visit_summaries,
    output:
        QA_CCD_SUMMARY,
    log:
        os.path.join(LOGS, "qa", "ccd_summary.log"),
    localrule: True
    conda:
        "../envs/surveyred.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(500),
        runtime=runtime_min(5),
    params:
        results=lambda wildcards, input: os.path.dirname(input.inventory),
        instrument=INSTRUMENT_ARG,
    shell:
        "surveyred ccd-summary {params.results:q} --output {output:q}"
        " --instrument {params.instrument:q} --quiet --log {log:q}"


rule qa_metrics:
    input:
        calsrc=qa_calsrc_dirs,
        summaries=qa_visit_summaries,
    output:
        table=QA_METRICS,
        html=report(
            QA_METRICS_HTML,
            caption="../report/metrics.rst",
            category="Science metrics",
        ),
    log:
        os.path.join(LOGS, "qa", "metrics.log"),
    conda:
        "../envs/surveyred.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
        runtime=runtime_min(10),
    params:
        cfg=QA_METRICS_JSON,
        truth=QA_TRUTH_OPTION,
    shell:
        "surveyred metrics --calsrc {input.calsrc:q} --visit-summary {input.summaries:q}"
        " --output {output.table:q} --thresholds-table {output.html:q} {params.truth}"
        " --config-json {params.cfg:q} --threads {threads} --log {log:q}"


rule qa_plots:
    input:
        calsrc=qa_calsrc_dirs,
        summaries=qa_visit_summaries,
        metrics=QA_METRICS,
        status=QA_STATUS,
        lightcurves=qa_lightcurves,
    output:
        psf=report(
            os.path.join(QA_PLOTS, "focal_plane_psf_fwhm.png"),
            caption="../report/focal_plane_psf.rst",
            category="Focal plane",
            subcategory="PSF FWHM",
        ),
        zp=report(
            os.path.join(QA_PLOTS, "focal_plane_zero_point.png"),
            caption="../report/focal_plane_zp.rst",
            category="Focal plane",
            subcategory="Zero point",
        ),
        astrometry=report(
            os.path.join(QA_PLOTS, "astrometric_residuals.png"),
            caption="../report/astrometry.rst",
            category="Astrometry",
        ),
        repeatability=report(
            os.path.join(QA_PLOTS, "photometric_repeatability.png"),
            caption="../report/repeatability.rst",
            category="Photometry",
        ),
        lightcurves=report(
            os.path.join(QA_PLOTS, "lightcurves.png"),
            caption="../report/lightcurves.rst",
            category="Light curves",
        ),
        status=report(
            os.path.join(QA_PLOTS, "status_table.png"),
            caption="../report/status_table.rst",
            category="Production status",
        ),
    log:
        os.path.join(LOGS, "qa", "plots.log"),
    conda:
        "../envs/surveyred.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(2000),
        runtime=runtime_min(10),
    params:
        # RESULTS and QA_PLOTS, from the files (no hard-coded prefixes)
        results=lambda wildcards, input: os.path.dirname(os.path.dirname(input.metrics)),
        outdir=lambda wildcards, output: os.path.dirname(output.psf),
        instrument=INSTRUMENT_ARG,
        refcat=REFCAT_ASTROM,
        lightcurves=LIGHTCURVES,
        cfg=QA_CONFIG_JSON,
    shell:
        "surveyred qa-plots {params.results:q} --outdir {params.outdir:q}"
        " --instrument {params.instrument:q} --refcat-astrom {params.refcat:q}"
        " --metrics {input.metrics:q} --status {input.status:q}"
        " --lightcurves {params.lightcurves:q}"
        " --config-json {params.cfg:q} --threads {threads} --log {log:q}"


rule qa_coadd_thumbnail:
    input:
        qa_thumbnail_coadds,
    output:
        report(
            QA_THUMBNAIL,
            caption="../report/coadd.rst",
            category="Coadds",
        ),
    log:
        os.path.join(LOGS, "qa", "thumbnail", "{tract}", "{px}-{py}.log"),
    wildcard_constraints:
        px=r"\d+",
        py=r"\d+",
    localrule: True
    conda:
        "../envs/surveyred.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(1000),
        runtime=runtime_min(5),
    params:
        cfg=QA_CONFIG_JSON,
    shell:
        "surveyred qa-plots --coadd {input:q} --output {output:q}"
        " --config-json {params.cfg:q} --log {log:q}"
