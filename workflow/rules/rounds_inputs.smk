# Helpers only (no rules): inputs and settings of the rounds rules (workflow/rules/rounds.smk;
# pipeline/rounds.py has the logic).

ROUND_DIR = "{framework}/{method}/{objective}/r{round}"


def _round_job_json(stage, wildcards):
    job = rounds.job_settings(config, stage, **dict(wildcards))
    return json.dumps(job, sort_keys=True, separators=(",", ":"))


def round_job_config(stage):
    """params: a round job's settings (pipeline.rounds.job_settings), its rerun trigger."""
    return lambda wildcards: _round_job_json(stage, wildcards)


def round_job_config_file(stage):
    """params: the same settings in .snakemake/dspo-job-config/STAGE-HASH.json (--config)."""

    return lambda wildcards: write_job_config(stage, _round_job_json(stage, wildcards))


def round_artifact(name):
    """An input function: artifact ``name`` of the job's round."""
    return lambda w: artifact(name, framework=w.framework, method=w.method,
                              objective=w.objective, round=w.round)


def get_round_models(wildcards):
    """{variant: round r - 1's aligned model} for every variant the candidate settings name."""
    return rounds.candidate_models(config, wildcards.framework, wildcards.method,
                                   wildcards.objective, int(wildcards.round))


def get_round_model_args(wildcards):
    return " ".join(f"{v}={p}" for v, p in get_round_models(wildcards).items())


def get_round_candidates_args(wildcards):
    """The candidates CLI's round arguments: the round (it keys every draw) and, for one-step
    models, the one-step Gaussian policy's std."""
    std = rounds.policy_std(config, wildcards.framework)
    policy = "" if std is None else f" --policy-std {std!r}"
    return f"--round {wildcards.round}{policy}"


def get_previous_aligned(wildcards):
    return contracts.aligned_artifact(wildcards.framework, wildcards.method,
                                      wildcards.objective, int(wildcards.round) - 1)


def get_round_train_pairs(wildcards):
    return contracts.train_pairs_artifacts(wildcards.framework, wildcards.objective,
                                           wildcards.method, int(wildcards.round))
