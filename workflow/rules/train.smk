rule train:
    input:
        pairs=get_train_pairs,
        candidates=artifact("candidates"),
        data=artifact("data", split="train"),
        prompts=artifact("prompts", split="train"),
        masks=artifact("masks"),
        model=artifact("model", variant=BASE_VARIANT),
    output:
        directory(artifact("aligned")),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/train/{framework}/{method}/{objective}.log",
    benchmark:
        "benchmarks/train/{framework}/{method}/{objective}.tsv"
    params:
        code=train_code_hash,
        config=job_config("train", "method", "objective"),
        config_file=job_config_file("train", "method", "objective"),
        pairs=get_train_pairs_arg,
        threads=STAGE_THREADS,
        seed=config["seed"],
        checkpoints=artifact("train_checkpoints"),
        table=contracts.CANDIDATES_TABLE,
        # wildcards here; the study's copy has none for them (study.smk)
        framework=lambda w: w.framework,
        method=lambda w: w.method,
        objective=lambda w: w.objective,
    threads: STAGE_THREADS
    resources:
        gpu=config["gpus"]["train"],
    shell:
        "python -m pipeline run-gpu --gpus {resources.gpu} --threads {params.threads} --accelerate -- "
        "python -m pipeline train --framework {params.framework} --method {params.method} "
        "--objective {params.objective} {params.pairs} "
        "--candidates {input.candidates}/{params.table} --data {input.data} "
        "--prompts {input.prompts} "
        "--masks {input.masks} --model {input.model} --out {output} "
        "--checkpoints {params.checkpoints} --config {params.config_file} --seed {params.seed} "
        "> {log} 2>&1"
