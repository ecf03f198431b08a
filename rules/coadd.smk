# Coaddition and forced photometry.
#   warp:           one job per science visit: all its detectors resampled onto every
#                   patch its footprint touches (warp/{night}/{visit}/, temporary
#                   unless coadd.keep_warps).
#   coadd:          one job per tract, patch and band, reading only the warps of the
#                   exposures that touch the patch (minus config exclude_visits).
#   coadd_catalog:  one job per patch: detection and measurement on each band's
#                   coadd, merged into one object table with stable ids.
#   forced_photometry: one job per night (or per window of forced.nights_per_job
#                   nights), one table per visit: PSF and aperture fluxes at every
#                   object of the patches the visit touches and at the user's
#                   positions. Not per visit, so that the Slurm submissions stay
#                   few without grouping (see the profile).
#   lightcurves:    one job: per-object light curves and the requested plots.
# Patches per exposure come from the header-WCS footprint recorded at ingest
# (surveyred.footprint), so the DAG is known before any pixel is processed.

WARP_DIR = os.path.join(RESULTS, "warp", "{night}", "{visit}")
COADD = os.path.join(RESULTS, "coadd", "{tract}", "{patch}", "{band}.fits")
COADD_CAT = os.path.join(RESULTS, "coadd_cat", "{tract}", "{patch}.parquet")
FORCED_DIR = os.path.join(RESULTS, "forced", "{fbatch}")
LIGHTCURVES = os.path.join(RESULTS, "lightcurves", "lightcurves.parquet")
LIGHTCURVE_PLOTS = os.path.join(RESULTS, "lightcurves", "plots")
WARP_CONFIG_JSON = json.dumps({"warp": config["warp"]}, sort_keys=True)
COADD_CONFIG_JSON = json.dumps(
    {"coadd": {k: v for k, v in config["coadd"].items() if k != "keep_warps"}},
    sort_keys=True,
)
COADD_CATALOG_CONFIG_JSON = json.dumps(
    {"coadd_catalog": config["coadd_catalog"]}, sort_keys=True
)
FORCED_CONFIG_JSON = json.dumps(
    {
        "forced": {
            k: v
            for k, v in config["forced"].items()
            if k not in ("positions", "nights_per_job")
        }
    },
    sort_keys=True,
)
FORCED_POSITIONS = config["forced"]["positions"]


wildcard_constraints:
    tract=r"\d+",
    patch=r"\d+,\d+",
    fbatch=r"\d{8}",


# As lambdas: `snakemake --lint` wants functions in rules/common.smk.
coadd_targets = lambda wildcards: (
    [COADD.format(tract=t, patch=p, band=b) for t, p, b in coadd_keys()]
    + [COADD_CAT.format(tract=t, patch=p) for t, p in patch_keys()]
    + ([LIGHTCURVES] if forced_visits() else [])
)
patch_bands = lambda wildcards: [
    COADD.format(tract=t, patch=p, band=b)
    for t, p, b in coadd_keys()
    if (t, p) == (wildcards.tract, wildcards.patch)
]


rule warp:
    input:
        calexp=CALEXP_DIR,
        wcs=CALWCS_DIR,
        psf=PSF_DIR,
    output:
        (
            directory(WARP_DIR)
            if config["coadd"]["keep_warps"]
            else temp(directory(WARP_DIR))
        ),
    log:
        os.path.join(LOGS, "warp", "{night}", "{visit}.log"),
    benchmark:
        os.path.join(BENCHMARKS, "warp", "{night}", "{visit}.tsv")
    conda:
        "../envs/surveyred.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb(1500),
        runtime=runtime_min(15),
    params:
        calexp=visit_files(CALEXP_DIR, VISIT_FITS),
        wcs=visit_files(CALWCS_DIR, VISIT_FITS),
        psf=visit_files(PSF_DIR, VISIT_FITS),
        tract=lambda wildcards: tract_json(visit_tract_patches(wildcards)[0]),
        patches=lambda wildcards: visit_tract_patches(wildcards)[1],
        skymap=SKYMAP_JSON,
        zero_point=config["coadd"]["zero_point"],
        cfg=WARP_CONFIG_JSON,
    shell:
        "surveyred warp --calexp {params.calexp:q} --wcs {params.wcs:q} --psf {params.psf:q}"
        " --tract-json {params.tract:q} --skymap-json {params.skymap:q}"
        " --patches {params.patches:q} --zero-point {params.zero_point}"
        " --outdir {output:q} --config-json {params.cfg:q}"
        " --threads {threads} --log {log:q}"


rule coadd:
    input:
        lambda wildcards: [
            WARP_DIR.format(night=n, visit=v) for n, v in coadd_visits(wildcards)
        ],
    output:
        COADD,
    log:
        os.path.join(LOGS, "coadd", "{tract}", "{patch}", "{band}.log"),
    benchmark:
        os.path.join(BENCHMARKS, "coadd", "{tract}", "{patch}", "{band}.tsv")
    conda:
        "../envs/surveyred.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb(2000),
        runtime=runtime_min(30),
    params:
        cfg=COADD_CONFIG_JSON,
    shell:
        "surveyred coadd --warp-dirs {input:q} --tract {wildcards.tract}"
        " --patch {wildcards.patch:q} --band {wildcards.band} --output {output:q}"
        " --config-json {params.cfg:q} --threads {threads} --log {log:q}"


rule coadd_catalog:
    input:
        patch_bands,
    output:
        COADD_CAT,
    log:
        os.path.join(LOGS, "coadd_catalog", "{tract}", "{patch}.log"),
    benchmark:
        os.path.join(BENCHMARKS, "coadd_catalog", "{tract}", "{patch}.tsv")
    conda:
        "../envs/surveyred.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb(2000),
        runtime=runtime_min(30),
    params:
        tract=lambda wildcards: tract_json(wildcards.tract),
        skymap=SKYMAP_JSON,
        cfg=COADD_CATALOG_CONFIG_JSON,
    shell:
        "surveyred coadd-catalog --coadd {input:q} --tract {wildcards.tract}"
        " --patch {wildcards.patch:q} --tract-json {params.tract:q}"
        " --skymap-json {params.skymap:q} --output {output:q}"
        " --config-json {params.cfg:q} --threads {threads} --log {log:q}"


rule forced_photometry:
    input:
        calexp=lambda wildcards: batch_dirs(wildcards, CALEXP_DIR),
        wcs=lambda wildcards: batch_dirs(wildcards, CALWCS_DIR),
        psf=lambda wildcards: batch_dirs(wildcards, PSF_DIR),
        objects=lambda wildcards: [
            COADD_CAT.format(tract=t, patch=p) for t, p in batch_patches(wildcards)
        ],
        positions=[FORCED_POSITIONS] if FORCED_POSITIONS else [],
    output:
        directory(FORCED_DIR),
    log:
        os.path.join(LOGS, "forced_photometry", "{fbatch}.log"),
    benchmark:
        os.path.join(BENCHMARKS, "forced_photometry", "{fbatch}.tsv")
    conda:
        "../envs/surveyred.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb(1500),
        runtime=lambda wildcards, attempt: 5 * len(batch_visits(wildcards)) * attempt,
    params:
        script=lambda wildcards, input, output, threads: forced_script(
            wildcards, input, output[0], threads, FORCED_CONFIG_JSON
        ),
    shell:
        "( {params.script} ) 2> {log:q}"


rule lightcurves:
    input:
        lambda wildcards: [FORCED_DIR.format(fbatch=b) for b in forced_batches()],
    output:
        table=LIGHTCURVES,
        plots=directory(LIGHTCURVE_PLOTS),
    log:
        os.path.join(LOGS, "lightcurves.log"),
    benchmark:
        os.path.join(BENCHMARKS, "lightcurves.tsv")
    conda:
        "../envs/surveyred.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(4000),
        runtime=runtime_min(30),
    params:
        forced=lambda wildcards: [forced_file(n, v) for n, v in forced_visits()],
        plot=(
            lambda wildcards: (
                "--plot "
                + " ".join(shlex.quote(str(p)) for p in config["lightcurves"]["plot"])
                if config["lightcurves"]["plot"]
                else ""
            )
        ),
    shell:
        "mkdir -p {output.plots:q} && surveyred lightcurve --forced {params.forced:q}"
        " --output {output.table:q} {params.plot} --plot-dir {output.plots:q} --log {log:q}"
