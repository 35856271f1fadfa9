rule segment:
    input:
        get_segment_images,
    output:
        masks=directory(artifact("masks")),
        instances=artifact("instances"),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/segment/{framework}.log",
    benchmark:
        "benchmarks/segment/{framework}.tsv"
    params:
        code=code_hash("segment"),
        config=job_config("segment"),
        config_file=job_config_file("segment"),
        threads=STAGE_THREADS,
        images=get_segment_images_arg,
        seed=config["seed"],
    threads: STAGE_THREADS
    resources:
        gpu=config["gpus"]["segment"],
    shell:
        "python -m pipeline run-gpu --gpus {resources.gpu} --threads {params.threads} -- "
        "python -m pipeline segment {params.images} --out-zarr {output.masks} "
        "--out-table {output.instances} --config {params.config_file} --seed {params.seed} "
        "> {log} 2>&1"
