rule train:
    input:
        pairs=get_train_pairs,
        candidates="results/candidates/{framework}",
        data="results/data/train",
        prompts="results/prompts/train.parquet",
        masks="results/masks/{framework}.zarr",
        model=f"results/models/{{framework}}/{BASE_VARIANT}",
    output:
        directory("results/aligned/{framework}/{method}/{objective}"),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/train/{framework}/{method}/{objective}.log",
    benchmark:
        "benchmarks/train/{framework}/{method}/{objective}.tsv"
    params:
        code=code_hash("train"),
        config=job_config("train", "method"),
        config_file=job_config_file("train", "method"),
        threads=STAGE_THREADS,
        method=get_train_method,
        seed=config["seed"],
        checkpoints="results/checkpoints/train/{framework}/{method}/{objective}",
    threads: STAGE_THREADS
    resources:
        gpu=config["gpus"]["train"],
    shell:
        "python -m pipeline run-gpu --gpus {resources.gpu} --threads {params.threads} --accelerate -- "
        "python -m pipeline train --framework {wildcards.framework} --method {params.method} "
        "--objective {wildcards.objective} --pairs {input.pairs} "
        "--candidates {input.candidates}/candidates.parquet --data {input.data} "
        "--prompts {input.prompts} "
        "--masks {input.masks} --model {input.model} --out {output} "
        "--checkpoints {params.checkpoints} --config {params.config_file} --seed {params.seed} "
        "> {log} 2>&1"
