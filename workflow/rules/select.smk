rule select:
    input:
        scores="results/scores/{framework}.parquet",
        instances="results/masks/{framework}/instances.parquet",
        captions="results/captions/{framework}.parquet",
        annotations=get_annotations,
    output:
        expand(
            "results/pairs/{{framework}}/{objective}{level}.parquet",
            objective=SELECT_OBJECTIVES,
            level=["", "_image"],
        ),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/select/{framework}.log",
    params:
        code=code_hash("select"),
        config=job_config("select"),
        config_file=job_config_file("select"),
        threads=STAGE_THREADS,
        annotations=get_annotations_arg,
        seed=config["seed"],
    shell:
        "python -m pipeline select --scores {input.scores} --instances {input.instances} "
        "--captions {input.captions} {params.annotations} "
        "--out-dir results/pairs/{wildcards.framework} --config {params.config_file} "
        "--seed {params.seed} > {log} 2>&1"
