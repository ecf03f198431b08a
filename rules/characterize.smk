# Single-frame characterisation: one job per science visit, reading the visit's
# calexps (the isr rule's outputs) and writing per detector the source catalog
# (Parquet) and the PSF product (PSF model, background mesh, DETECTED plane).
# A detector without sources or PSF stars is recorded as failed in its products
# (status / failure class); the job fails only when every detector failed.

SRC_CATALOG = os.path.join(RESULTS, "src", "{night}", "{visit}_{det}.parquet")
PSF_PRODUCT = os.path.join(RESULTS, "psf", "{night}", "{visit}_{det}.fits")
CHARACTERIZE_CONFIG_JSON = json.dumps(
    {"characterize": config["characterize"]}, sort_keys=True
)


# The target list for rule all (in the Snakefile). As a lambda: `snakemake --lint` wants
# functions in rules/common.smk, which belongs to the shared layout.
characterize_targets = lambda wildcards: [
    path
    for night, visit in sorted(calib_plan()[1])
    for pattern in (SRC_CATALOG, PSF_PRODUCT)
    for path in expand(pattern, night=night, visit=visit, det=DETECTORS)
]


rule characterize:
    input:
        calexp=lambda wildcards: calexps(wildcards.night, wildcards.visit),
    output:
        src=expand(SRC_CATALOG, det=DETECTORS, allow_missing=True),
        psf=expand(PSF_PRODUCT, det=DETECTORS, allow_missing=True),
    log:
        os.path.join(LOGS, "characterize", "{night}", "{visit}.log"),
    benchmark:
        os.path.join(BENCHMARKS, "characterize", "{night}", "{visit}.tsv")
    conda:
        "../envs/surveyred.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb(1000),
        runtime=runtime_min(10),
    params:
        outdir_src=lambda wildcards, output: os.path.dirname(output.src[0]),
        outdir_psf=lambda wildcards, output: os.path.dirname(output.psf[0]),
        cfg=CHARACTERIZE_CONFIG_JSON,
    shell:
        "surveyred characterize {input.calexp:q}"
        " --outdir-src {params.outdir_src:q} --outdir-psf {params.outdir_psf:q}"
        " --config-json {params.cfg:q} --threads {threads} --log {log:q}"
