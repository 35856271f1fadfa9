rule select:
    input:
        scores=artifact("scores"),
        instances=artifact("instances"),
        captions=artifact("captions"),
        annotations=get_annotations,
    output:
        expand(
            artifact("pairs", framework="{{framework}}"),
            objective=SELECT_OBJECTIVES,
            level=list(contracts.PAIR_LEVELS.values()),
        ),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/select/{framework}.log",
    benchmark:
        "benchmarks/select/{framework}.tsv"
    params:
        code=code_hash("select"),
        out_dir=lambda w: artifact("pairs_dir", framework=w.framework),
        config=job_config("select"),
        config_file=job_config_file("select"),
        threads=STAGE_THREADS,
        annotations=get_annotations_arg,
        # the study's copy selects without captions (study.smk)
        captions=lambda w, input: f"--captions {input.captions}",
        seed=config["seed"],
    shell:
        "python -m pipeline select --scores {input.scores} --instances {input.instances} "
        "{params.captions} {params.annotations} "
        "--out-dir {params.out_dir} --config {params.config_file} "
        "--seed {params.seed} > {log} 2>&1"
