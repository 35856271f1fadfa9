# Shard i: the candidates of the data's shard i (docs/design.md §15). Later rounds reuse these
# rules (rounds.smk) with round r's models and their own extra arguments.
rule candidates:
    input:
        unpack(get_candidate_models),
        data=shard_input("data", split="train"),
        prompts=shard_input("prompts", split="train"),
    output:
        directory(shard_artifact("candidates")),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/candidates/{framework}/{scatteritem}.log",
    benchmark:
        "benchmarks/candidates/{framework}/{scatteritem}.tsv"
    params:
        code=code_hash("candidates"),
        config=job_config("candidates", "framework"),
        config_file=job_config_file("candidates", "framework"),
        threads=STAGE_THREADS,
        models=get_candidate_model_args,
        extra="",  # rounds: --round R [--policy-std S]
        seed=config["seed"],
    threads: STAGE_THREADS
    resources:
        gpu=config["gpus"]["candidates"],
    shell:
        "python -m pipeline run-gpu --gpus {resources.gpu} --threads {params.threads} -- "
        "python -m pipeline candidates --framework {wildcards.framework} "
        "$(printf -- '--model %s ' {params.models}) --data {input.data} --prompts {input.prompts} "
        "{params.extra} --out {output} "
        "--config {params.config_file} --seed {params.seed} > {log} 2>&1"


use rule degrade_gather as candidates_gather with:
    input:
        shards_of("candidates"),
    output:
        directory(artifact("candidates")),
    log:
        "logs/candidates/{framework}/gather.log",
    benchmark:
        "benchmarks/candidates/{framework}/gather.tsv"
    params:
        artifact="candidates",
