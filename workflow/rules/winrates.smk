# Per-instance win rates of every aligned model against the pretrained one on each test set
# (pipeline/winrates.py): the test HQ segmented by the segment stage's CLI, then scored.


rule winrates:
    input:
        evaluations=get_winrate_evaluations,
    output:
        hq=artifact("test_hq"),
        masks=directory(artifact("test_masks")),
        instances=artifact("test_instances"),
        table=artifact("win_rates"),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/winrates/{framework}/{testset}.log",
    benchmark:
        "benchmarks/winrates/{framework}/{testset}.tsv"
    params:
        code=code_hash("winrates"),
        segment_code=code_hash("segment"),
        segment_config=job_config("segment"),
        segment_config_file=job_config_file("segment"),
        config_file=winrate_config_file,
        pretrained=lambda w: artifact("evaluation", framework=w.framework, testset=w.testset,
                                      model="pretrained"),
        threads=STAGE_THREADS,
        seed=config["seed"],
    threads: STAGE_THREADS
    resources:
        gpu=config["gpus"]["score"],
    shell:
        "(python -m pipeline winrates --hq-table-of {params.pretrained} --out {output.hq} && "
        "python -m pipeline run-gpu --gpus {resources.gpu} --threads {params.threads} -- "
        "python -m pipeline segment --candidates {output.hq} --setting hq "
        "--out-zarr {output.masks} --out-table {output.instances} "
        "--config {params.segment_config_file} --seed {params.seed} && "
        "python -m pipeline run-gpu --gpus {resources.gpu} --threads {params.threads} -- "
        "python -m pipeline winrates --evaluations {input.evaluations} --masks {output.masks} "
        "--instances {output.instances} --out {output.table} --config {params.config_file} "
        "--seed {params.seed}) > {log} 2>&1"
