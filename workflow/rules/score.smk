rule score:
    input:
        data="results/data/train",
        candidates="results/candidates/{framework}",
        masks="results/masks/{framework}.zarr",
        instances="results/masks/{framework}/instances.parquet",
    output:
        "results/scores/{framework}.parquet",
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/score/{framework}.log",
    benchmark:
        "benchmarks/score/{framework}.tsv"
    params:
        code=code_hash("score"),
        config=job_config("score"),
        config_file=job_config_file("score"),
        threads=STAGE_THREADS,
        seed=config["seed"],
    threads: STAGE_THREADS
    resources:
        gpu=config["gpus"]["score"],
    shell:
        "python -m pipeline run-gpu --gpus {resources.gpu} --threads {params.threads} -- "
        "python -m pipeline score --candidates {input.candidates}/candidates.parquet "
        "--hq {input.data}/hq --masks {input.masks} --instances {input.instances} "
        "--out {output} --config {params.config_file} --seed {params.seed} > {log} 2>&1"
