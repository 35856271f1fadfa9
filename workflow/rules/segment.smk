rule segment:
    input:
        get_segment_images,
    output:
        masks=directory("results/masks/{framework}.zarr"),
        instances="results/masks/{framework}/instances.parquet",
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/segment/{framework}.log",
    benchmark:
        "benchmarks/segment/{framework}.tsv"
    params:
        code=code_hash("segment"),
        config=section("segment"),
        images=get_segment_images_arg,
        seed=config["seed"],
    threads: STAGE_THREADS
    resources:
        gpu=config["gpus"]["segment"],
    shell:
        "python -m pipeline run-gpu --gpus {resources.gpu} --threads {threads} -- "
        "python -m pipeline segment --images {params.images} --out-zarr {output.masks} "
        "--out-table {output.instances} --config {params.config:q} --seed {params.seed} "
        "> {log} 2>&1"
