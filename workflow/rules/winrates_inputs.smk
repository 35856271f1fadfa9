# Helpers only (no rules): inputs of the winrates rule and the report's alignment inputs
# (the aligned models' curves, the win-rate tables); pipeline/winrates.py has the logic.

def winrate_models(framework):
    """{aligned model: objective} of the evaluation (automatic objectives only)."""
    models = {}
    for name in evaluated_models(framework):
        if name in ("bicubic", "pretrained") or name.endswith(NO_M2_SUFFIX):
            continue
        _, objective, _ = eval_method_objective(name)
        if objective in config["select"]["objectives"]:
            models[name] = objective
    return models


def get_winrate_evaluations(wildcards):
    return [
        artifact("evaluation", framework=wildcards.framework, testset=wildcards.testset, model=m)
        for m in ["pretrained", *winrate_models(wildcards.framework)]
    ]


def winrate_config_file(wildcards):
    score = settings.resolve("score", config.get("score"))
    job = {
        "models": winrate_models(wildcards.framework),
        "objectives": settings.resolve("select", config.get("select"))["objectives"],
        "score": {k: score[k] for k in ("weights_dir", "weights", "options", "device", "min_crop_size")},
        "tie_tolerance": settings.resolve("select", config.get("select"))["tie_tolerance"],
    }
    text = json.dumps(job, sort_keys=True, separators=(",", ":"))
    target = JOB_CONFIG_DIR / f"winrates-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text)
        partial.replace(target)
    return str(target)


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
    return [f"{folder}/train_curves.parquet" for folder in get_aligned_with_curves(wildcards)]
