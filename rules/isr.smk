# Instrument signature removal: one job per science exposure (visit), writing one
# calibrated exposure per detector (IMAGE, MASK, VARIANCE) into calexp/{night}/{visit}/. The masters come from
# the calibration plan; when none is valid the input omits it, the command gets
# "none" and fails with MissingCalibration naming the frame.


rule isr:
    input:
        unpack(isr_inputs),
    output:
        directory(CALEXP_DIR),
    log:
        os.path.join(LOGS, "isr", "{night}", "{visit}.log"),
    benchmark:
        os.path.join(BENCHMARKS, "isr", "{night}", "{visit}.tsv")
    conda:
        "../envs/surveyred.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb(1000),
        runtime=runtime_min(10),
    params:
        instrument=INSTRUMENT_ARG,
        detectors=DETECTOR_LIST,
        band=isr_band,
        bias_dir=isr_bias_dir,
        flat_dir=isr_flat_dir,
        outdir=lambda wildcards, output: output[0],
        cfg=ISR_CONFIG_JSON,
    shell:
        "surveyred isr {input.raw:q} --instrument {params.instrument:q}"
        " --visit {wildcards.visit} --night {wildcards.night} --band {params.band:q}"
        " --bias-dir {params.bias_dir:q} --flat-dir {params.flat_dir:q}"
        " --detectors {params.detectors} --outdir {params.outdir:q}"
        " --config-json {params.cfg:q} --threads {threads} --log {log:q}"
