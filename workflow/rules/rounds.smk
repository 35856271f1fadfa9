# Iterative alignment rounds (docs/design.md §14; pipeline/rounds.py has the logic): round r >= 2
# of one (framework, method, objective) run runs the candidates, caption, score, select and train
# stages' CLIs again on round r - 1's aligned model. The masks and instances of the HQ are round
# 1's (segment is not rerun). Round 1 is the DAG without rounds; config rounds.count 1 adds no job.

rule rounds_candidates:
    input:
        unpack(get_round_models),
        data=artifact("data", split="train"),
        prompts=artifact("prompts", split="train"),
    output:
        directory(artifact("round_candidates")),
    wildcard_constraints:
        round=rounds.ROUND_WILDCARD,
    conda:
        "../../envs/pipeline.yaml"
    log:
        f"logs/rounds/{ROUND_DIR}/candidates.log",
    benchmark:
        f"benchmarks/rounds/{ROUND_DIR}/candidates.tsv"
    params:
        code=code_hash("candidates"),
        config=round_job_config("candidates"),
        config_file=round_job_config_file("candidates"),
        threads=STAGE_THREADS,
        models=get_round_model_args,
        policy=get_round_policy_arg,
        seed=config["seed"],
    threads: STAGE_THREADS
    resources:
        gpu=config["gpus"]["candidates"],
    shell:
        "python -m pipeline run-gpu --gpus {resources.gpu} --threads {params.threads} -- "
        "python -m pipeline candidates --framework {wildcards.framework} "
        "$(printf -- '--model %s ' {params.models}) --data {input.data} --prompts {input.prompts} "
        "--round {wildcards.round} {params.policy} --out {output} "
        "--config {params.config_file} --seed {params.seed} > {log} 2>&1"


rule rounds_caption:
    input:
        data=artifact("data", split="train"),
        candidates=round_artifact("round_candidates"),
        masks=artifact("masks"),
        instances=artifact("instances"),
    output:
        artifact("round_captions"),
    wildcard_constraints:
        round=rounds.ROUND_WILDCARD,
    conda:
        "../../envs/pipeline.yaml"
    log:
        f"logs/rounds/{ROUND_DIR}/caption.log",
    params:
        code=code_hash("caption"),
        table=contracts.CANDIDATES_TABLE,
        config=round_job_config("caption"),
        config_file=round_job_config_file("caption"),
        threads=STAGE_THREADS,
        seed=config["seed"],
    threads: STAGE_THREADS
    resources:
        gpu=config["gpus"]["caption"],
    shell:
        "python -m pipeline run-gpu --gpus {resources.gpu} --threads {params.threads} -- "
        "python -m pipeline caption --data {input.data} "
        "--candidates {input.candidates}/{params.table} --masks-zarr {input.masks} "
        "--instances {input.instances} --out {output} --config {params.config_file} "
        "--seed {params.seed} > {log} 2>&1"


rule rounds_score:
    input:
        data=artifact("data", split="train"),
        candidates=round_artifact("round_candidates"),
        masks=artifact("masks"),
        instances=artifact("instances"),
    output:
        artifact("round_scores"),
    wildcard_constraints:
        round=rounds.ROUND_WILDCARD,
    conda:
        "../../envs/pipeline.yaml"
    log:
        f"logs/rounds/{ROUND_DIR}/score.log",
    benchmark:
        f"benchmarks/rounds/{ROUND_DIR}/score.tsv"
    params:
        code=code_hash("score"),
        table=contracts.CANDIDATES_TABLE,
        config=round_job_config("score"),
        config_file=round_job_config_file("score"),
        threads=STAGE_THREADS,
        seed=config["seed"],
    threads: STAGE_THREADS
    resources:
        gpu=config["gpus"]["score"],
    shell:
        "python -m pipeline run-gpu --gpus {resources.gpu} --threads {params.threads} -- "
        "python -m pipeline score --candidates {input.candidates}/{params.table} "
        "--data {input.data} --masks {input.masks} --instances {input.instances} "
        "--out {output} --config {params.config_file} --seed {params.seed} > {log} 2>&1"


rule rounds_select:
    input:
        scores=round_artifact("round_scores"),
        instances=artifact("instances"),
        captions=round_artifact("round_captions"),
    output:
        # the run's objective only (its select job computes nothing else)
        expand(
            artifact("round_pairs", framework="{{framework}}", method="{{method}}",
                     objective="{{objective}}", round="{{round}}"),
            level=list(contracts.PAIR_LEVELS.values()),
        ),
    wildcard_constraints:
        round=rounds.ROUND_WILDCARD,
    conda:
        "../../envs/pipeline.yaml"
    log:
        f"logs/rounds/{ROUND_DIR}/select.log",
    params:
        code=code_hash("select"),
        out_dir=round_artifact("round_pairs_dir"),
        config=round_job_config("select"),
        config_file=round_job_config_file("select"),
        seed=config["seed"],
    shell:
        "python -m pipeline select --scores {input.scores} --instances {input.instances} "
        "--captions {input.captions} --out-dir {params.out_dir} "
        "--config {params.config_file} --seed {params.seed} > {log} 2>&1"


rule rounds_train:
    input:
        pairs=get_round_train_pairs,
        candidates=round_artifact("round_candidates"),
        data=artifact("data", split="train"),
        prompts=artifact("prompts", split="train"),
        masks=artifact("masks"),
        # round r - 1's weights: the starting point and the frozen reference
        model=get_previous_aligned,
    output:
        directory(artifact("round_aligned")),
    wildcard_constraints:
        round=rounds.ROUND_WILDCARD,
    conda:
        "../../envs/pipeline.yaml"
    log:
        f"logs/rounds/{ROUND_DIR}/train.log",
    benchmark:
        f"benchmarks/rounds/{ROUND_DIR}/train.tsv"
    params:
        code=code_hash("train"),
        config=round_job_config("train"),
        config_file=round_job_config_file("train"),
        threads=STAGE_THREADS,
        seed=config["seed"],
        checkpoints=round_artifact("round_train_checkpoints"),
        table=contracts.CANDIDATES_TABLE,
    threads: STAGE_THREADS
    resources:
        gpu=config["gpus"]["train"],
    shell:
        "python -m pipeline run-gpu --gpus {resources.gpu} --threads {params.threads} --accelerate -- "
        "python -m pipeline train --framework {wildcards.framework} --method {wildcards.method} "
        "--objective {wildcards.objective} --pairs {input.pairs} "
        "--candidates {input.candidates}/{params.table} --data {input.data} "
        "--prompts {input.prompts} "
        "--masks {input.masks} --model {input.model} --out {output} "
        "--checkpoints {params.checkpoints} --config {params.config_file} --seed {params.seed} "
        "> {log} 2>&1"
