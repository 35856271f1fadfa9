# Per-instance win rates of every aligned model against the pretrained one on each test set
# (pipeline/winrates.py): shard i segments the test HQ of the evaluations' shard i (the segment
# stage's CLI) and scores every instance of each model's output; the gather computes the win
# rates over every shard's instances (docs/design.md §15).


rule winrates:
    input:
        evaluations=get_winrate_evaluation_shards,
    output:
        hq=shard_artifact("test_hq"),
        masks=directory(shard_artifact("test_masks")),
        instances=shard_artifact("test_instances"),
        scores=shard_artifact("win_instances"),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/winrates/{framework}/{testset}/{scatteritem}.log",
    benchmark:
        "benchmarks/winrates/{framework}/{testset}/{scatteritem}.tsv"
    params:
        code=code_hash("winrates"),
        segment_code=code_hash("segment"),
        segment_config=job_config("segment"),
        segment_config_file=job_config_file("segment"),
        config_file=winrate_config_file,
        pretrained=lambda w, input: input.evaluations[0],
        threads=STAGE_THREADS,
        seed=config["seed"],
    threads: STAGE_THREADS
    resources:
        gpu=config["gpus"]["score"],
    shell:
        "(python -m pipeline winrates --hq-table-of {params.pretrained} --out {output.hq} && "
        "python -m pipeline run-gpu --gpus {resources.gpu} --threads {params.threads} -- "
        "python -m pipeline segment --candidates {output.hq} --setting hq "
        "--out-zarr {output.masks} --out-table {output.instances} "
        "--config {params.segment_config_file} --seed {params.seed} && "
        "python -m pipeline run-gpu --gpus {resources.gpu} --threads {params.threads} -- "
        "python -m pipeline winrates --evaluations {input.evaluations} --masks {output.masks} "
        "--instances {output.instances} --shard {wildcards.scatteritem} --out {output.scores} "
        "--config {params.config_file} --seed {params.seed}) > {log} 2>&1"


rule winrates_gather:
    input:
        scores=shards_of("win_instances"),
        hq=shards_of("test_hq"),
        masks=shards_of("test_masks"),
        instances=shards_of("test_instances"),
    output:
        hq=artifact("test_hq"),
        masks=directory(artifact("test_masks")),
        instances=artifact("test_instances"),
        table=artifact("win_rates"),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/winrates/{framework}/{testset}/gather.log",
    benchmark:
        "benchmarks/winrates/{framework}/{testset}/gather.tsv"
    localrule: True
    params:
        code=code_hash("winrates"),
        config_file=winrate_config_file,
        seed=config["seed"],
    shell:
        "python -m pipeline winrates --gather {input.scores} "
        "--hq-shards {input.hq} --out-hq {output.hq} "
        "--masks-shards {input.masks} --out-masks {output.masks} "
        "--instances-shards {input.instances} --out-instances {output.instances} "
        "--out {output.table} --config {params.config_file} --seed {params.seed} > {log} 2>&1"
