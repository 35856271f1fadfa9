# Prompts of every LQ (docs/design.md §9): the training split and each test set by its name.
# Test-set images and ids are listed as the evaluate rule lists them (same suffix pattern).
if "train" in TESTSETS:
    raise ValueError("config testsets: 'train' names the training split's prompts; rename it")


rule prompts:
    input:
        images=lambda w: artifact("data", split="train") if w.split == "train" else TESTSETS[w.split]["path"],
    output:
        artifact("prompts"),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/prompts/{split}.log",
    benchmark:
        "benchmarks/prompts/{split}.tsv"
    wildcard_constraints:
        split="|".join(["train", *TESTSETS]),
    params:
        code=code_hash("prompts"),
        config=job_config("prompts"),
        config_file=job_config_file("prompts"),
        threads=STAGE_THREADS,
        kind=lambda w: "train" if w.split == "train" else TESTSETS[w.split]["kind"],
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
        "python -m pipeline prompts --images {input.images} --kind {params.kind} "
        "--out {output} --config {params.config_file} --name-suffix-pattern {params.suffix:q} "
        "--seed {params.seed} > {log} 2>&1"
