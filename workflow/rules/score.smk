rule score:
    input:
        data=artifact("data", split="train"),
        candidates=artifact("candidates"),
        masks=artifact("masks"),
        instances=artifact("instances"),
    output:
        artifact("scores"),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/score/{framework}.log",
    benchmark:
        "benchmarks/score/{framework}.tsv"
    params:
        code=code_hash("score"),
        table=contracts.CANDIDATES_TABLE,
        config=job_config("score"),
        config_file=job_config_file("score"),
        threads=STAGE_THREADS,
        seed=config["seed"],
    threads: STAGE_THREADS
    resources:
        gpu=config["gpus"]["score"],
    shell:
        "python -m pipeline run-gpu --gpus {resources.gpu} --threads {params.threads} -- "
        "python -m pipeline score --candidates {input.candidates}/{params.table} "
        "--data {input.data} --masks {input.masks} --instances {input.instances} "
        "--out {output} --config {params.config_file} --seed {params.seed} > {log} 2>&1"
