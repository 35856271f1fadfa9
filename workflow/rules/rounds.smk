# Iterative alignment rounds (docs/design.md §14; pipeline/rounds.py has the logic): round r >= 2
# of one (framework, method, objective) run reruns the candidates, caption, score, select and
# train rules on round r - 1's aligned model: the base rules, reused with the round's inputs,
# outputs and settings (sharded as they are, docs/design.md §15). The masks and instances of the
# HQ are round 1's (segment is not rerun). Config rounds.count 1 adds no job.


use rule candidates as rounds_candidates with:
    input:
        unpack(get_round_models),
        data=shard_input("data", split="train"),
        prompts=shard_input("prompts", split="train"),
    output:
        directory(shard_artifact("round_candidates")),
    wildcard_constraints:
        round=rounds.ROUND_WILDCARD,
    log:
        f"logs/rounds/{ROUND_DIR}/candidates/{{scatteritem}}.log",
    benchmark:
        f"benchmarks/rounds/{ROUND_DIR}/candidates/{{scatteritem}}.tsv"
    params:
        config=round_job_config("candidates"),
        config_file=round_job_config_file("candidates"),
        models=get_round_model_args,
        extra=get_round_candidates_args,


use rule candidates_gather as rounds_candidates_gather with:
    input:
        shards_of("round_candidates"),
    output:
        directory(artifact("round_candidates")),
    wildcard_constraints:
        round=rounds.ROUND_WILDCARD,
    log:
        f"logs/rounds/{ROUND_DIR}/candidates/gather.log",
    benchmark:
        f"benchmarks/rounds/{ROUND_DIR}/candidates/gather.tsv"


use rule caption as rounds_caption with:
    input:
        data=shard_input("data", split="train"),
        candidates=shard_input("round_candidates"),
        masks=shard_input("masks"),
        instances=shard_input("instances"),
    output:
        shard_artifact("round_captions"),
    wildcard_constraints:
        round=rounds.ROUND_WILDCARD,
    log:
        f"logs/rounds/{ROUND_DIR}/caption/{{scatteritem}}.log",
    benchmark:
        f"benchmarks/rounds/{ROUND_DIR}/caption/{{scatteritem}}.tsv"
    params:
        config=round_job_config("caption"),
        config_file=round_job_config_file("caption"),


use rule caption_gather as rounds_caption_gather with:
    input:
        shards_of("round_captions"),
    output:
        artifact("round_captions"),
    wildcard_constraints:
        round=rounds.ROUND_WILDCARD,
    log:
        f"logs/rounds/{ROUND_DIR}/caption/gather.log",
    benchmark:
        f"benchmarks/rounds/{ROUND_DIR}/caption/gather.tsv"


use rule score as rounds_score with:
    input:
        data=shard_input("data", split="train"),
        candidates=shard_input("round_candidates"),
        masks=shard_input("masks"),
        instances=shard_input("instances"),
    output:
        shard_artifact("round_scores"),
    wildcard_constraints:
        round=rounds.ROUND_WILDCARD,
    log:
        f"logs/rounds/{ROUND_DIR}/score/{{scatteritem}}.log",
    benchmark:
        f"benchmarks/rounds/{ROUND_DIR}/score/{{scatteritem}}.tsv"
    params:
        config=round_job_config("score"),
        config_file=round_job_config_file("score"),


use rule score_gather as rounds_score_gather with:
    input:
        shards_of("round_scores"),
    output:
        artifact("round_scores"),
    wildcard_constraints:
        round=rounds.ROUND_WILDCARD,
    log:
        f"logs/rounds/{ROUND_DIR}/score/gather.log",
    benchmark:
        f"benchmarks/rounds/{ROUND_DIR}/score/gather.tsv"


use rule select as rounds_select with:
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
    log:
        f"logs/rounds/{ROUND_DIR}/select.log",
    benchmark:
        f"benchmarks/rounds/{ROUND_DIR}/select.tsv"
    params:
        out_dir=round_artifact("round_pairs_dir"),
        config=round_job_config("select"),
        config_file=round_job_config_file("select"),
        annotations="",


use rule train as rounds_train with:
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
    log:
        f"logs/rounds/{ROUND_DIR}/train.log",
    benchmark:
        f"benchmarks/rounds/{ROUND_DIR}/train.tsv"
    params:
        config=round_job_config("train"),
        config_file=round_job_config_file("train"),
        pairs=lambda w: f"--pairs {' '.join(get_round_train_pairs(w))}",
        checkpoints=round_artifact("round_train_checkpoints"),
