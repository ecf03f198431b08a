# Ingest: the raw frames -> the inventory (one row per exposure and detector) and
# the rejects table. A checkpoint: the calibration plan and every pixel job are
# derived from its output.


checkpoint ingest:
    input:
        raw=raw_files,
    output:
        inventory=INVENTORY,
        rejects=REJECTS,
    log:
        os.path.join(LOGS, "ingest.log"),
    benchmark:
        os.path.join(BENCHMARKS, "ingest.tsv")
    conda:
        "../envs/surveyred.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb(1000),
        runtime=lambda wildcards, attempt: (10 + len(RAW_FILES) // 200) * attempt,
    params:
        raw_dir=lambda wildcards: RAW_DIR,
        instrument=INSTRUMENT_ARG,
        night_offset=config["night_utc_offset_hours"],
        detectors=DETECTOR_LIST,
    shell:
        "surveyred ingest {params.raw_dir:q} --instrument {params.instrument:q}"
        " --output {output.inventory:q} --rejects {output.rejects:q}"
        " --night-offset-hours {params.night_offset} --detectors {params.detectors}"
        " --log {log:q}"
