# With no captioner configured the stage writes an empty table marked {"skipped": true}.
# Shard i: the candidates, masks and instances of shard i (docs/design.md §15).
rule caption:
    input:
        data=shard_input("data", split="train"),
        candidates=shard_input("candidates"),
        masks=shard_input("masks"),
        instances=shard_input("instances"),
    output:
        shard_artifact("captions"),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/caption/{framework}/{scatteritem}.log",
    benchmark:
        "benchmarks/caption/{framework}/{scatteritem}.tsv"
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


use rule degrade_gather as caption_gather with:
    input:
        shards_of("captions"),
    output:
        artifact("captions"),
    log:
        "logs/caption/{framework}/gather.log",
    benchmark:
        "benchmarks/caption/{framework}/gather.tsv"
    params:
        artifact="captions",
