rule degrade:
    output:
        directory("results/data/{split}"),
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
        config=section("degrade"),
        seed=config["seed"],
    threads: STAGE_THREADS
    shell:
        "python -m pipeline degrade --split {wildcards.split} --out {output} "
        "--config {params.config:q} --seed {params.seed} --workers {threads} > {log} 2>&1"
