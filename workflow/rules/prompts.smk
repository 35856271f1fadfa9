# Prompts of every LQ (docs/design.md §9): the training split and each test set by its name.
# Test-set images and ids are listed as the evaluate rule lists them (same suffix pattern).
# Shards (docs/design.md §15): the training split's shard i reads the data's shard i; a test
# set's shard i holds the test images whose id hashes to i (as evaluate's shard i).
if "train" in TESTSETS:
    raise ValueError("config testsets: 'train' names the training split's prompts; rename it")


rule prompts:
    input:
        images=get_prompt_images,
    output:
        shard_artifact("prompts"),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/prompts/{split}/{scatteritem}.log",
    benchmark:
        "benchmarks/prompts/{split}/{scatteritem}.tsv"
    wildcard_constraints:
        split="|".join(["train", *TESTSETS]),
    params:
        code=code_hash("prompts"),
        config=job_config("prompts"),
        config_file=job_config_file("prompts"),
        threads=STAGE_THREADS,
        kind=lambda w: "train" if w.split == "train" else TESTSETS[w.split]["kind"],
        # a test set's shard is chosen by test image id; the training split's is its input's
        shard=lambda w: "" if w.split == "train" else f"--shard {w.scatteritem}",
        suffix=settings.job_settings(config, "evaluate")["name_suffix_pattern"],
        seed=config["seed"],
    threads: STAGE_THREADS
    resources:
        # the fixed source runs no model
        gpu=0
        if settings.job_settings(config, "prompts")["source"] == "fixed"
        else config["gpus"]["prompts"],
    shell:
        "python -m pipeline run-gpu --gpus {resources.gpu} --threads {params.threads} -- "
        "python -m pipeline prompts --images {input.images} --kind {params.kind} {params.shard} "
        "--out {output} --config {params.config_file} --name-suffix-pattern {params.suffix:q} "
        "--seed {params.seed} > {log} 2>&1"


use rule degrade_gather as prompts_gather with:
    input:
        shards_of("prompts"),
    output:
        artifact("prompts"),
    log:
        "logs/prompts/{split}/gather.log",
    benchmark:
        "benchmarks/prompts/{split}/gather.tsv"
    wildcard_constraints:
        split="|".join(["train", *TESTSETS]),
    params:
        artifact="prompts",
