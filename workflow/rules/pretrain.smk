rule pretrain:
    input:
        data=artifact("data", split="train"),
        prompts=artifact("prompts", split="train"),
    output:
        directory(artifact("model")),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/pretrain/{framework}/{variant}.log",
    benchmark:
        "benchmarks/pretrain/{framework}/{variant}.tsv"
    params:
        code=code_hash("pretrain"),
        config=job_config("pretrain", "framework", "variant"),
        config_file=job_config_file("pretrain", "framework", "variant"),
        threads=STAGE_THREADS,
        seed=config["seed"],
        # outside the output folder: Snakemake deletes a failed job's outputs, not these
        checkpoints=artifact("pretrain_checkpoints"),
    threads: STAGE_THREADS
    resources:
        gpu=config["gpus"]["pretrain"],
    shell:
        "python -m pipeline run-gpu --gpus {resources.gpu} --threads {params.threads} --accelerate -- "
        "python -m pipeline pretrain --framework {wildcards.framework} "
        "--variant {wildcards.variant} --data {input.data} --prompts {input.prompts} --out {output} "
        "--checkpoints {params.checkpoints} --config {params.config_file} "
        "--seed {params.seed} > {log} 2>&1"
