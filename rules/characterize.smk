# Single-frame characterisation: one job per science visit, reading the visit's
# calexps (the isr rule's output directory) and writing per detector the source
# catalog (Parquet, into src/{night}/{visit}/) and the PSF product (PSF model,
# background mesh, DETECTED plane, into psf/{night}/{visit}/). A detector without
# sources or PSF stars is recorded as failed in its products (status / failure
# class); the job fails only when every detector failed.

SRC_DIR = os.path.join(RESULTS, "src", "{night}", "{visit}")
PSF_DIR = os.path.join(RESULTS, "psf", "{night}", "{visit}")
CHARACTERIZE_CONFIG_JSON = json.dumps(
    {"characterize": config["characterize"]}, sort_keys=True
)


rule characterize:
    input:
        calexp=CALEXP_DIR,
    output:
        src=directory(SRC_DIR),
        psf=directory(PSF_DIR),
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
        calexps=visit_files(CALEXP_DIR, VISIT_FITS),
        cfg=CHARACTERIZE_CONFIG_JSON,
    shell:
        "surveyred characterize {params.calexps:q}"
        " --outdir-src {output.src:q} --outdir-psf {output.psf:q}"
        " --config-json {params.cfg:q} --threads {threads} --log {log:q}"
