# Shard i: the candidates of shard i scored on the masks of shard i (docs/design.md §15).
rule score:
    input:
        data=shard_input("data", split="train"),
        candidates=shard_input("candidates"),
        masks=shard_input("masks"),
        instances=shard_input("instances"),
    output:
        shard_artifact("scores"),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/score/{framework}/{scatteritem}.log",
    benchmark:
        "benchmarks/score/{framework}/{scatteritem}.tsv"
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


use rule degrade_gather as score_gather with:
    input:
        shards_of("scores"),
    output:
        artifact("scores"),
    log:
        "logs/score/{framework}/gather.log",
    benchmark:
        "benchmarks/score/{framework}/gather.tsv"
    params:
        artifact="scores",
