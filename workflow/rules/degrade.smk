from pipeline.io.images import source_manifest


rule degrade:
    output:
        directory(artifact("data")),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/degrade/{split}.log",
    benchmark:
        "benchmarks/degrade/{split}.tsv"
    wildcard_constraints:
        split="train|test",
    params:
        code=code_hash("degrade"),
        config=job_config("degrade"),
        config_file=job_config_file("degrade"),
        threads=STAGE_THREADS,
        # the images under degrade.source: adding, removing or changing one reruns degrade
        source=source_manifest(config["degrade"]["source"], config["degrade"]["demo_images"]),
        seed=config["seed"],
    threads: STAGE_THREADS
    shell:
        "OMP_NUM_THREADS={params.threads} MKL_NUM_THREADS={params.threads} "
        "python -m pipeline degrade --split {wildcards.split} --out {output} "
        "--config {params.config_file} --seed {params.seed} --workers {threads} > {log} 2>&1"
