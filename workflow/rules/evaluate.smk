rule evaluate:
    input:
        model=get_eval_model,
        testset=get_testset_path,
        prompts="results/prompts/{testset}.parquet",
        # M2 in sampling: a dspo model's training pairs give the feedback vocabulary
        feedback=get_eval_feedback,
    output:
        directory("results/eval/{framework}/{testset}/{model}"),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/evaluate/{framework}/{testset}/{model}.log",
    benchmark:
        "benchmarks/evaluate/{framework}/{testset}/{model}.tsv"
    params:
        code=code_hash("evaluate"),
        config=job_config("evaluate"),
        config_file=job_config_file("evaluate"),
        threads=STAGE_THREADS,
        model=get_eval_model_arg,
        feedback=get_eval_feedback_arg,
        kind=get_testset_kind,
        seed=config["seed"],
    threads: STAGE_THREADS
    resources:
        gpu=config["gpus"]["evaluate"],
    shell:
        "python -m pipeline run-gpu --gpus {resources.gpu} --threads {params.threads} -- "
        "python -m pipeline evaluate --model {params.model} --model-name {wildcards.model} "
        "--testset {wildcards.testset} --testset-kind {params.kind} "
        "--testset-path {input.testset} --prompts {input.prompts} {params.feedback} "
        "--out {output} --config {params.config_file} "
        "--seed {params.seed} > {log} 2>&1"


rule report:
    input:
        metrics=get_eval_metrics,
        provenance=get_provenance,
    output:
        summary="results/eval/{framework}/summary.parquet",
        tables=report(
            "results/eval/{framework}/tables.md",
            caption="../report/tables.rst",
            category="Results",
        ),
        tables_csv="results/eval/{framework}/tables.csv",
        radar=report(
            expand("results/eval/{{framework}}/radar_{testset}.png", testset=list(TESTSETS)),
            caption="../report/radar.rst",
            category="Results",
        ),
        grid=report(
            expand("results/eval/{{framework}}/grid_{testset}.png", testset=list(TESTSETS)),
            caption="../report/grid.rst",
            category="Results",
        ),
        report=report(
            "results/eval/{framework}/report.md",
            caption="../report/report.rst",
            category="Run",
        ),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/report/{framework}.log",
    params:
        code=code_hash("report"),
        config=job_config("report"),
        config_file=job_config_file("report"),
        metrics=get_eval_metrics_files,
        provenance=get_provenance_files,
        seed=config["seed"],
    shell:
        "python -m pipeline report --metrics {params.metrics} --out results/eval/{wildcards.framework} "
        "--provenance {params.provenance} --framework {wildcards.framework} "
        "--config {params.config_file} --seed {params.seed} > {log} 2>&1"
