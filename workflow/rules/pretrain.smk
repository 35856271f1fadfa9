rule pretrain:
    input:
        "results/data/train",
    output:
        directory("results/models/{framework}/{variant}"),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/pretrain/{framework}/{variant}.log",
    benchmark:
        "benchmarks/pretrain/{framework}/{variant}.tsv"
    params:
        code=code_hash("pretrain"),
        config=get_pretrain_config,
        seed=config["seed"],
        # outside the output folder: Snakemake deletes a failed job's outputs, not these
        checkpoints="results/checkpoints/pretrain/{framework}/{variant}",
    threads: STAGE_THREADS
    resources:
        gpu=config["gpus"]["pretrain"],
    shell:
        "python -m pipeline run-gpu --gpus {resources.gpu} --threads {threads} --accelerate -- "
        "python -m pipeline pretrain --framework {wildcards.framework} "
        "--variant {wildcards.variant} --data {input} --out {output} "
        "--checkpoint-dir {params.checkpoints} --config {params.config:q} "
        "--seed {params.seed} > {log} 2>&1"
