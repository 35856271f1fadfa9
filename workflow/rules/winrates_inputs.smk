# Helpers only (no rules): inputs of the winrates rule and the report's alignment inputs
# (the aligned models' curves, the win-rate tables); pipeline/winrates.py has the logic.

def winrate_models(framework):
    """{aligned model: objective} of the evaluation (automatic objectives only; the models of
    pipeline.model_names.winrate_models)."""
    return {spec.name: spec.objective for spec in model_names.winrate_models(config, framework)}


def get_winrate_evaluation_shards(wildcards):
    """The evaluations' shards of the job's shard: the pretrained model's first, then every
    aligned model's."""
    return [
        shard_artifact("evaluation", framework=wildcards.framework, testset=wildcards.testset,
                       model=model, scatteritem=wildcards.scatteritem)
        for model in [model_names.PRETRAINED, *winrate_models(wildcards.framework)]
    ]  # fmt: skip


def winrate_config_file(wildcards):
    score = settings.resolve("score", config.get("score"))
    job = {
        "models": winrate_models(wildcards.framework),
        "objectives": settings.resolve("select", config.get("select"))["objectives"],
        "score": {k: score[k] for k in ("weights_dir", "weights", "options", "device", "min_crop_size")},
        "tie_tolerance": settings.resolve("select", config.get("select"))["tie_tolerance"],
    }
    return write_job_config("winrates", json.dumps(job, sort_keys=True, separators=(",", ":")))


def get_win_rates(wildcards):
    """The report's win-rate tables (none without an aligned model)."""
    if not winrate_models(wildcards.framework):
        return []
    return expand(artifact("win_rates"), framework=wildcards.framework, testset=list(TESTSETS))


def get_aligned_with_curves(wildcards):
    """The aligned model folders whose train_curves.parquet the report plots."""
    return [
        artifact("aligned", framework=wildcards.framework, method=m, objective=o)
        for m in METHODS
        for o in OBJECTIVES
        if contracts.method(m).loop == "offline"
    ]


def get_train_curves(wildcards):
    return [f"{folder}/{contracts.TRAIN_CURVES}" for folder in get_aligned_with_curves(wildcards)]
