# Shard i: the shared frame (docs/design.md §1) of the data's shard i (docs/design.md §15): its
# HQ images, or one candidate setting's images of the candidates' shard i.
rule segment:
    input:
        images=get_segment_images,
    output:
        masks=directory(shard_artifact("masks")),
        instances=shard_artifact("instances"),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/segment/{framework}/{scatteritem}.log",
    benchmark:
        "benchmarks/segment/{framework}/{scatteritem}.tsv"
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


rule segment_gather:
    input:
        masks=shards_of("masks"),
        instances=shards_of("instances"),
    output:
        masks=directory(artifact("masks")),
        instances=artifact("instances"),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/segment/{framework}/gather.log",
    benchmark:
        "benchmarks/segment/{framework}/gather.tsv"
    localrule: True
    params:
        code=code_hash("gather"),
    shell:
        "(python -m pipeline gather masks {input.masks} --out {output.masks} && "
        "python -m pipeline gather instances {input.instances} --out {output.instances}) "
        "> {log} 2>&1"
