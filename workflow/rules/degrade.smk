from pipeline.io.images import source_manifest


# Shard i of a split: the source photos whose id hashes to i (docs/design.md §15).
rule degrade:
    output:
        directory(shard_artifact("data")),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/degrade/{split}/{scatteritem}.log",
    benchmark:
        "benchmarks/degrade/{split}/{scatteritem}.tsv"
    wildcard_constraints:
        split="train|test",
    params:
        code=code_hash("degrade"),
        config=job_config("degrade"),
        config_file=job_config_file("degrade"),
        threads=STAGE_THREADS,
        # the shard's images under degrade.source: adding, removing or changing one reruns
        # its shard only (degrade.manifest: by stat, or by content)
        source=lambda w: source_manifest(
            config["degrade"]["source"],
            config["degrade"]["demo_images"],
            shard=w.scatteritem,
            manifest=config["degrade"]["manifest"],
        ),
        seed=config["seed"],
    threads: STAGE_THREADS
    shell:
        "OMP_NUM_THREADS={params.threads} MKL_NUM_THREADS={params.threads} "
        "python -m pipeline degrade --split {wildcards.split} --shard {wildcards.scatteritem} "
        "--out {output} --config {params.config_file} --seed {params.seed} --workers {threads} "
        "> {log} 2>&1"


# The gather of every stage's shards (pipeline/gather.py): the other stages' gathers reuse
# this rule with their artifact.
rule degrade_gather:
    input:
        shards_of("data"),
    output:
        directory(artifact("data")),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/degrade/{split}/gather.log",
    benchmark:
        "benchmarks/degrade/{split}/gather.tsv"
    wildcard_constraints:
        split="train|test",
    localrule: True
    params:
        code=code_hash("gather"),
        artifact="data",
    shell:
        "python -m pipeline gather {params.artifact} {input} --out {output} > {log} 2>&1"
