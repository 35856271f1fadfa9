# The controlled study of the Figure 1 dilemma (docs/study.md): `snakemake --cores all study`,
# and part of `rule all` when study.in_report is true (the report rule of study.framework reads
# study.report_inputs: the section and the plot). Thin rules: the logic
# is pipeline/study.py; segment, prompts, select and train are the real stages, run with the
# study's settings (pipeline.study.*_settings). One build, select and set of train jobs per arm
# (the main arm and the controls of study.controls).
from pipeline import study as study_module

STUDY = study_module.study_settings(config)
STUDY_FRAMEWORK = STUDY["framework"]
STUDY_METHODS = STUDY["methods"]
STUDY_SEEDS = STUDY["seeds"]
STUDY_ARMS = study_module.arms(STUDY)


STUDY_JOBS = study_module.rule_jobs(config, JOB_CONFIG_DIR)
STUDY_MODEL = artifact("model", framework=STUDY_FRAMEWORK, variant=BASE_VARIANT)
STUDY_ALIGNED = study_module.aligned_paths(STUDY_ARMS, STUDY_METHODS, STUDY_SEEDS)
STUDY_ALIGNED_ARG = " ".join(f"{a}:{m}:{s}={path}" for (a, m, s), path in STUDY_ALIGNED.items())
STUDY_REGIONS = (
    f"{artifact('study_candidates', arm=study_module.MAIN)}/{study_module.REGIONS_TABLE}"
)


rule study:
    input:
        artifact("study_report"),
        artifact("study_plot"),
        artifact("study_adoption"),
        artifact("study_section"),


# The study's copies of the real stages reuse their rules (sharded as they are, docs/design.md
# §15) with the study's inputs, outputs and settings.
use rule segment as study_segment with:
    input:
        images=shard_input("data"),
    output:
        masks=directory(shard_artifact("study_masks")),
        instances=shard_artifact("study_instances"),
    wildcard_constraints:
        split="train|test",
    log:
        "logs/study/segment_{split}/{scatteritem}.log",
    benchmark:
        "benchmarks/study/segment_{split}/{scatteritem}.tsv"
    params:
        config=STUDY_JOBS["segment"][0],
        config_file=STUDY_JOBS["segment"][1],
        images=lambda w, input: f"--data {input.images}",


use rule segment_gather as study_segment_gather with:
    input:
        masks=shards_of("study_masks"),
        instances=shards_of("study_instances"),
    output:
        masks=directory(artifact("study_masks")),
        instances=artifact("study_instances"),
    wildcard_constraints:
        split="train|test",
    log:
        "logs/study/segment_{split}/gather.log",
    benchmark:
        "benchmarks/study/segment_{split}/gather.tsv"


# the held-out images' prompts: shard i of the test split's data
use rule prompts as study_prompts with:
    input:
        images=shard_input("data", split="test"),
    output:
        shard_artifact("study_prompts", split="test"),
    log:
        "logs/study/prompts_test/{scatteritem}.log",
    benchmark:
        "benchmarks/study/prompts_test/{scatteritem}.tsv"
    params:
        config=STUDY_JOBS["prompts"][0],
        config_file=STUDY_JOBS["prompts"][1],
        kind="synthetic",
        shard="",


use rule prompts_gather as study_prompts_gather with:
    input:
        shards_of("study_prompts", split="test"),
    output:
        artifact("study_prompts", split="test"),
    log:
        "logs/study/prompts_test/gather.log",
    benchmark:
        "benchmarks/study/prompts_test/gather.tsv"


rule study_build:
    input:
        data=artifact("data", split="train"),
        prompts=artifact("prompts", split="train"),
        masks=artifact("study_masks", split="train"),
        model=STUDY_MODEL,
    output:
        candidates=directory(artifact("study_candidates")),
        scores=artifact("study_scores"),
    wildcard_constraints:
        arm="|".join(study_module.ARM),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/study/build_{arm}.log",
    benchmark:
        "benchmarks/study/build_{arm}.tsv"
    params:
        code=code_hash("study"),
        config=STUDY_JOBS["build"][0],
        config_file=STUDY_JOBS["build"][1],
        threads=STAGE_THREADS,
        seed=config["seed"],
    threads: STAGE_THREADS
    shell:
        "OMP_NUM_THREADS={params.threads} MKL_NUM_THREADS={params.threads} "
        "python -m pipeline study build --arm {wildcards.arm} --data {input.data} "
        "--prompts {input.prompts} --masks {input.masks} --model {input.model} "
        "--out {output.candidates} --scores {output.scores} --config {params.config_file} "
        "--seed {params.seed} > {log} 2>&1"


use rule select as study_select with:
    input:
        scores=artifact("study_scores"),
        instances=artifact("study_instances", split="train"),
    output:
        [artifact("study_pairs", level=level) for level in contracts.PAIR_LEVELS.values()],
    wildcard_constraints:
        arm="|".join(study_module.ARM),
    log:
        "logs/study/select_{arm}.log",
    benchmark:
        "benchmarks/study/select_{arm}.tsv"
    params:
        out_dir=lambda w: artifact("study_pairs_dir", arm=w.arm),
        config=lambda w: STUDY_JOBS[f"select_{w.arm}"][0],
        config_file=lambda w: STUDY_JOBS[f"select_{w.arm}"][1],
        annotations="",
        captions="",


use rule train as study_train with:
    input:
        pairs=lambda w: artifact(
            "study_pairs",
            arm=w.arm,
            level=contracts.PAIR_LEVELS[contracts.method(w.method).pair_level],
        ),
        candidates=artifact("study_candidates"),
        data=artifact("data", split="train"),
        prompts=artifact("prompts", split="train"),
        masks=artifact("study_masks", split="train"),
        model=STUDY_MODEL,
    output:
        directory(artifact("study_aligned")),
    wildcard_constraints:
        arm="|".join(study_module.ARM),
        method="|".join(STUDY_METHODS),
        seed=r"\d+",
    log:
        "logs/study/train_{arm}_{method}_seed{seed}.log",
    benchmark:
        "benchmarks/study/train_{arm}_{method}_seed{seed}.tsv"
    params:
        config=lambda w: STUDY_JOBS[f"train_{w.method}"][0],
        config_file=lambda w: STUDY_JOBS[f"train_{w.method}"][1],
        pairs=lambda w, input: f"--pairs {input.pairs}",
        checkpoints=artifact("study_train_checkpoints"),
        framework=STUDY_FRAMEWORK,
        objective=study_module.OBJECTIVE,
        seed=lambda w: w.seed,
    resources:
        gpu=STUDY["gpus"],


rule study_measure:
    input:
        data=artifact("data", split="test"),
        prompts=artifact("study_prompts", split="test"),
        masks=artifact("study_masks", split="test"),
        candidates=artifact("study_candidates", arm=study_module.MAIN),
        model=STUDY_MODEL,
        aligned=list(STUDY_ALIGNED.values()),
    output:
        artifact("study_adoption"),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/study/measure.log",
    benchmark:
        "benchmarks/study/measure.tsv"
    params:
        code=code_hash("study"),
        config=STUDY_JOBS["study"][0],
        config_file=STUDY_JOBS["study"][1],
        threads=STAGE_THREADS,
        aligned=STUDY_ALIGNED_ARG,
        regions=STUDY_REGIONS,
    threads: STAGE_THREADS
    shell:
        "OMP_NUM_THREADS={params.threads} MKL_NUM_THREADS={params.threads} "
        "python -m pipeline study measure --data {input.data} --prompts {input.prompts} "
        "--masks {input.masks} --pretrained {input.model} --aligned {params.aligned} "
        "--regions {params.regions} --out {output} --config {params.config_file} > {log} 2>&1"


rule study_report:
    input:
        adoption=artifact("study_adoption"),
        pairs=[
            artifact("study_pairs", arm=arm, level=level)
            for arm in STUDY_ARMS
            for level in contracts.PAIR_LEVELS.values()
        ],
        candidates=[artifact("study_candidates", arm=arm) for arm in STUDY_ARMS],
        scores=[artifact("study_scores", arm=arm) for arm in STUDY_ARMS],
        aligned=list(STUDY_ALIGNED.values()),
    output:
        report=artifact("study_report"),
        plot=artifact("study_plot"),
        section=artifact("study_section"),
    conda:
        "../../envs/pipeline.yaml"
    log:
        "logs/study/report.log",
    benchmark:
        "benchmarks/study/report.tsv"
    params:
        code=code_hash("study"),
        config=STUDY_JOBS["study"][0],
        config_file=STUDY_JOBS["study"][1],
        train_file=STUDY_JOBS[f"train_{STUDY_METHODS[0]}"][1],
        aligned=STUDY_ALIGNED_ARG,
        pairs_dirs=" ".join(f"{arm}={artifact('study_pairs_dir', arm=arm)}" for arm in STUDY_ARMS),
        scores=" ".join(f"{arm}={artifact('study_scores', arm=arm)}" for arm in STUDY_ARMS),
        regions=STUDY_REGIONS,
    shell:
        "python -m pipeline study report --adoption {input.adoption} "
        "--pairs-dir {params.pairs_dirs} --regions {params.regions} --scores {params.scores} "
        "--aligned {params.aligned} --out {output.report} --plot {output.plot} "
        "--section {output.section} --config {params.config_file} "
        "--train-config {params.train_file} > {log} 2>&1"
