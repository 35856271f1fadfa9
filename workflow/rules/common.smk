# Helpers only (no rules): config validation, input functions, code hashes for honest caching.
import json
import os
import sys
from pathlib import Path

from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

ROOT = Path(workflow.basedir)
# Rules call `python`: make it the interpreter running Snakemake (the project's venv), as an
# activated venv would, so `.venv/bin/snakemake` works without activating the venv.
os.environ.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
sys.path.insert(0, str(ROOT))
from pipeline.codehash import code_hash as _code_hash  # noqa: E402


# Threads of a heavy stage: scaled down to --cores on a workstation; cpus-per-task under Slurm
# (capped by the profile's max-threads). A fixed number: workflow.cores is unset on clusters.
STAGE_THREADS = 8

FRAMEWORKS = config["frameworks"]
OBJECTIVES = config["objectives"]
METHODS = config["methods"]
TESTSETS = config["testsets"]
SELECT_OBJECTIVES = list(config["select"]["objectives"]) + (
    ["human"] if config["annotations"] else []
)
# the model each framework aligns and evaluates as "pretrained"
BASE_VARIANT = "base"
# methods trained on instance pairs; the others use the image-level pairs
INSTANCE_METHODS = {"dspo", "dro", "dspo_m1"}

for _objective in OBJECTIVES:
    if _objective not in SELECT_OBJECTIVES:
        raise ValueError(
            f"config 'objectives': {_objective!r} is not a select objective "
            f"(select.objectives: {sorted(SELECT_OBJECTIVES)}; 'human' needs 'annotations')"
        )
for _name, _testset in TESTSETS.items():
    # a missing external test set would make Snakemake skip the report silently when an older
    # report exists ("Nothing to be done"); results/... folders are made by the degrade rule
    if not _testset["path"].startswith("results/") and not Path(_testset["path"]).exists():
        raise ValueError(
            f"config testsets.{_name}.path: {_testset['path']!r} does not exist "
            f"({_testset['kind']} test set; download it there or remove it from 'testsets')"
        )
for _framework in FRAMEWORKS:
    if BASE_VARIANT not in config["pretrain"][_framework]["variants"]:
        raise ValueError(f"config pretrain.{_framework}.variants needs a {BASE_VARIANT!r} variant")



def code_hash(stage):
    """Hash of the stage module and every pipeline module it imports (see pipeline/codehash.py)."""
    return _code_hash(ROOT, f"pipeline.{stage}")


def section(*keys):
    """A config section as canonical JSON: the stage's --config argument and a rerun trigger."""
    value = config
    for key in keys:
        value = value[key]
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def candidate_setting_list(framework):
    """The candidate settings ({name, variant, steps, cfg}); the paper's four by default."""
    settings = config["candidates"]["settings"][framework]
    if settings is None:
        from pipeline.candidates import DEFAULT_SETTINGS

        settings = DEFAULT_SETTINGS[framework]
    return settings


def candidate_variants(framework):
    """The pretrained variants the candidate settings sample from."""
    return sorted({setting["variant"] for setting in candidate_setting_list(framework)})


def get_candidates_config(wildcards):
    """The candidates section with the framework's own settings list."""
    section = dict(config["candidates"])
    section["settings"] = config["candidates"]["settings"][wildcards.framework]
    return json.dumps(section, sort_keys=True, separators=(",", ":"))


def get_pretrain_config(wildcards):
    return section("pretrain", wildcards.framework)


def get_candidate_models(wildcards):
    return {
        variant: f"results/models/{wildcards.framework}/{variant}"
        for variant in candidate_variants(wildcards.framework)
    }


def get_candidate_model_args(wildcards):
    return " ".join(f"{v}={p}" for v, p in get_candidate_models(wildcards).items())


def get_segment_images(wildcards):
    source = config["segment"]["source"]
    if source == "hq":
        return "results/data/train"
    return f"results/candidates/{wildcards.framework}"


def get_segment_images_arg(wildcards):
    source = config["segment"]["source"]
    if source == "hq":
        return "results/data/train/hq"
    return f"results/candidates/{wildcards.framework}/{source}"


def get_annotations(wildcards):
    return [config["annotations"]] if config["annotations"] else []


def get_annotations_arg(wildcards):
    return f"--annotations {config['annotations']}" if config["annotations"] else ""


def get_train_pairs(wildcards):
    suffix = "" if wildcards.method in INSTANCE_METHODS else "_image"
    return f"results/pairs/{wildcards.framework}/{wildcards.objective}{suffix}.parquet"


def get_train_method(wildcards):
    return "dspo" if wildcards.method == "dspo_m1" else wildcards.method


def get_train_config(wildcards):
    train = dict(config["train"])
    if wildcards.method == "dspo_m1":
        train["negative_prompts"] = False  # the M1-only ablation: no description feedback
    return json.dumps(train, sort_keys=True, separators=(",", ":"))


def evaluated_models():
    """Model names in the evaluation: bicubic, the pretrained base, every aligned model."""
    aligned = [f"{method}_{objective}" for method in METHODS for objective in OBJECTIVES]
    return ["bicubic", "pretrained", *aligned]


def get_eval_model(wildcards):
    name = wildcards.model
    if name == "bicubic":
        return []
    if name == "pretrained":
        return f"results/models/{wildcards.framework}/{BASE_VARIANT}"
    method, objective = name.split("_", 1) if not name.startswith("dspo_m1_") else ("dspo_m1", name[8:])
    return f"results/aligned/{wildcards.framework}/{method}/{objective}"


def get_eval_model_arg(wildcards):
    return get_eval_model(wildcards) or "bicubic"


def get_testset_path(wildcards):
    return TESTSETS[wildcards.testset]["path"]


def get_testset_kind(wildcards):
    return TESTSETS[wildcards.testset]["kind"]


def get_eval_metrics(wildcards):
    return expand(
        "results/eval/{framework}/{testset}/{model}",
        framework=wildcards.framework,
        testset=list(TESTSETS),
        model=evaluated_models(),
    )


def get_eval_metrics_files(wildcards):
    return [f"{folder}/metrics.parquet" for folder in get_eval_metrics(wildcards)]


def provenance(framework):
    """(input, table) per upstream stage whose metadata the report repeats (backends, weights,
    stand-ins); the input is the rule output to depend on, the table the file inside it."""
    folders = {
        "results/data/train": "pairs.parquet",
        f"results/models/{framework}/{BASE_VARIANT}": "train_log.parquet",
        f"results/candidates/{framework}": "candidates.parquet",
    }
    tables = [
        f"results/masks/{framework}/instances.parquet",
        f"results/captions/{framework}.parquet",
        f"results/scores/{framework}.parquet",
        *(f"results/pairs/{framework}/{objective}.parquet" for objective in OBJECTIVES),
    ]
    return [(folder, f"{folder}/{table}") for folder, table in folders.items()] + [
        (table, table) for table in tables
    ]


def get_provenance(wildcards):
    return [source for source, _ in provenance(wildcards.framework)]


def get_provenance_files(wildcards):
    return [table for _, table in provenance(wildcards.framework)]


def get_final_outputs():
    """The targets of the default run: every framework's report."""
    return expand("results/eval/{framework}/report.md", framework=FRAMEWORKS)


def check_gpu_requests():
    """Refuse to start when a rule asks for more GPUs than --resources gpu=N allows.

    Snakemake would silently start such a job with N GPUs (it scales requests down to the
    global cap); a training job would then run with fewer processes than configured. gpu=0
    (everything on the CPU) and no cap (cluster profiles) are accepted as they are.
    """
    cap = getattr(workflow.global_resources.get("gpu"), "value", None)
    if not workflow.is_main_process or not isinstance(cap, int) or cap == 0:
        return
    asking = {
        job_rule.name: job_rule.resources["gpu"].value
        for job_rule in workflow.rules
        if "gpu" in job_rule.resources and isinstance(job_rule.resources["gpu"].value, int)
    }
    too_many = {name: gpus for name, gpus in sorted(asking.items()) if gpus > cap}
    if too_many:
        wanted = ", ".join(f"{name} asks for {gpus}" for name, gpus in too_many.items())
        raise ValueError(
            f"--resources gpu={cap} is fewer GPUs than rules ask for ({wanted}); raise "
            f"--resources gpu (the default profile sets 1), or lower config 'gpus' "
            f"(or --set-resources RULE:gpu=N); --resources gpu=0 runs everything on the CPU"
        )
