# With no captioner configured the stage writes an empty table marked {"skipped": true}.
rule caption:
    input:
        data=artifact("data", split="train"),
        candidates=artifact("candidates"),
        masks=artifact("masks"),
        instances=artifact("instances"),
    output:
        artifact("captions"),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/caption/{framework}.log",
    benchmark:
        "benchmarks/caption/{framework}.tsv"
    params:
        code=code_hash("caption"),
        table=contracts.CANDIDATES_TABLE,
        config=job_config("caption"),
        config_file=job_config_file("caption"),
        threads=STAGE_THREADS,
        seed=config["seed"],
    threads: STAGE_THREADS
    resources:
        gpu=config["gpus"]["caption"],
    shell:
        "python -m pipeline run-gpu --gpus {resources.gpu} --threads {params.threads} -- "
        "python -m pipeline caption --data {input.data} "
        "--candidates {input.candidates}/{params.table} --masks-zarr {input.masks} "
        "--instances {input.instances} --out {output} --config {params.config_file} "
        "--seed {params.seed} > {log} 2>&1"
