# Shard i of a (model, test set): the test images whose id hashes to i (docs/design.md §15),
# with the test set's prompts of shard i.
rule evaluate:
    input:
        model=get_eval_model,
        testset=get_testset_path,
        prompts=lambda w: shard_artifact("prompts", split=w.testset, scatteritem=w.scatteritem),
        # M2 in sampling: a dspo model's training pairs give the feedback vocabulary
        feedback=get_eval_feedback,
    output:
        directory(shard_artifact("evaluation")),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/evaluate/{framework}/{testset}/{model}/{scatteritem}.log",
    benchmark:
        "benchmarks/evaluate/{framework}/{testset}/{model}/{scatteritem}.tsv"
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
        "--shard {wildcards.scatteritem} --out {output} --config {params.config_file} "
        "--seed {params.seed} > {log} 2>&1"


use rule degrade_gather as evaluate_gather with:
    input:
        shards_of("evaluation"),
    output:
        directory(artifact("evaluation")),
    log:
        "logs/evaluate/{framework}/{testset}/{model}/gather.log",
    benchmark:
        "benchmarks/evaluate/{framework}/{testset}/{model}/gather.tsv"
    params:
        artifact="evaluation",


# the report's folder, with {framework} left as a wildcard (escaped once more inside expand)
REPORT_DIR = artifact("report_dir")
REPORT_DIR_ESCAPED = artifact("report_dir", framework="{{framework}}")


rule report:
    input:
        evaluations=get_evaluations,
        provenance=get_provenance,
        aligned=get_aligned_with_curves,
        win_rates=get_win_rates,
        # annotate.smk: the Fig. 3 win rates (maybe simulated; none without votes)
        human_eval=lambda wildcards: HUMAN_WINRATES[wildcards.framework],
        # study.smk: the Figure 1 study's section and plot when study.in_report (else none)
        study=lambda w: list(study_module.report_inputs(STUDY, w.framework).values()),
    output:
        summary=f"{REPORT_DIR}/{contracts.report_file('summary')}",
        tables=report(
            f"{REPORT_DIR}/{contracts.report_file('tables_md')}",
            caption="../report/tables.rst",
            category="Results",
        ),
        tables_csv=f"{REPORT_DIR}/{contracts.report_file('tables_csv')}",
        radar=report(
            expand(f"{REPORT_DIR_ESCAPED}/{contracts.REPORT_FILES['radar']}", testset=list(TESTSETS)),
            caption="../report/radar.rst",
            category="Results",
        ),
        grid=report(
            expand(f"{REPORT_DIR_ESCAPED}/{contracts.REPORT_FILES['grid']}", testset=list(TESTSETS)),
            caption="../report/grid.rst",
            category="Results",
        ),
        report=report(
            f"{REPORT_DIR}/{contracts.report_file('report')}",
            caption="../report/report.rst",
            category="Run",
        ),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/report/{framework}.log",
    params:
        code=code_hash("report"),
        out_dir=lambda w: artifact("report_dir", framework=w.framework),
        config=job_config("report"),
        config_file=job_config_file("report"),
        provenance=get_provenance_files,
        curves=get_train_curves,
        human_eval=lambda w: " ".join(f"--human-eval {d}" for d in HUMAN_WINRATES[w.framework]),
        study=lambda w: " ".join(
            f"--study-{k} {v}" for k, v in study_module.report_inputs(STUDY, w.framework).items()
        ),
        seed=config["seed"],
    shell:
        "python -m pipeline report --evaluations {input.evaluations} --out {params.out_dir} "
        "--provenance {params.provenance} --framework {wildcards.framework} "
        "--curves {params.curves} --win-rates {input.win_rates} {params.human_eval} "
        "{params.study} --config {params.config_file} --seed {params.seed} > {log} 2>&1"
