# Master calibrations: one job per validity group (bias) or group and band (flat),
# writing one file per detector into the job's output directory. Groups and their raw frames come from
# surveyred.calib.plan_calibrations via the ingest checkpoint (rules/common.smk).


rule master_bias:
    input:
        raw=master_bias_raw,
    output:
        directory(BIAS_DIR),
    log:
        os.path.join(LOGS, "master_bias", "{bgroup}.log"),
    benchmark:
        os.path.join(BENCHMARKS, "master_bias", "{bgroup}.tsv")
    conda:
        "../envs/surveyred.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb(1500),
        runtime=runtime_min(15),
    params:
        instrument=INSTRUMENT_ARG,
        detectors=DETECTOR_LIST,
        outdir=lambda wildcards, output: output[0],
        cfg=CALIB_CONFIG_JSON,
    shell:
        "surveyred master-bias {input.raw:q} --instrument {params.instrument:q}"
        " --detectors {params.detectors} --outdir {params.outdir:q}"
        " --group {wildcards.bgroup} --config-json {params.cfg:q}"
        " --threads {threads} --log {log:q}"


rule master_flat:
    input:
        unpack(master_flat_inputs),
    output:
        directory(FLAT_DIR),
    log:
        os.path.join(LOGS, "master_flat", "{fgroup}", "{band}.log"),
    benchmark:
        os.path.join(BENCHMARKS, "master_flat", "{fgroup}", "{band}.tsv")
    conda:
        "../envs/surveyred.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb(1500),
        runtime=runtime_min(15),
    params:
        instrument=INSTRUMENT_ARG,
        detectors=DETECTOR_LIST,
        outdir=lambda wildcards, output: output[0],
        bias_dir=master_flat_bias_dir,
        cfg=CALIB_CONFIG_JSON,
    shell:
        "surveyred master-flat {input.raw:q} --band {wildcards.band}"
        " --bias-dir {params.bias_dir:q} --instrument {params.instrument:q}"
        " --detectors {params.detectors} --outdir {params.outdir:q}"
        " --group {wildcards.fgroup} --config-json {params.cfg:q}"
        " --threads {threads} --log {log:q}"
