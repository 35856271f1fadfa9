# Helpers only (no rules): config validation, input functions, code hashes for honest caching.
import hashlib
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

from snakemake.utils import validate

ROOT = Path(workflow.basedir)
# Rules call `python`: make it the interpreter running Snakemake (the project's venv), as an
# activated venv would, so `.venv/bin/snakemake` works without activating the venv.
os.environ.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
sys.path.insert(0, str(ROOT))
from pipeline import contracts, model_names, preflight, rounds, settings  # noqa: E402
from pipeline.codehash import code_hash as _code_hash  # noqa: E402
from pipeline.contracts import artifact, shard_artifact  # noqa: E402  (every path of the DAG)

# After a kill, Snakemake's lock files stop the next run: say the command (docs/design.md §10).
if workflow.is_main_process and "--unlock" not in sys.argv:
    if hint := preflight.lock_hint(Path.cwd()):
        print(hint, file=sys.stderr)
# Methods from files outside the package (docs/adding_a_method.md): registered here, before
# the method names are checked, and through the environment in every job this run starts.
METHOD_FILES = [str(Path(p).resolve()) for p in config.get("method_files") or []]
if METHOD_FILES:
    os.environ[contracts.METHOD_FILES_ENV] = os.pathsep.join(METHOD_FILES)
    contracts.load_method_files(METHOD_FILES)
# A misspelt key or a refused value, named with the nearest valid names and its file, before
# Snakemake's validation (whose error prints the whole schema for a top-level key).
preflight.check_schema(config, workflow.configfiles)
validate(config, schema="../schemas/config.schema.yaml")

# Intra-op threads of every job process: the config's number, passed to each job explicitly
# (Snakemake would scale {threads} down to --cores, and results would depend on --cores).
# Snakemake schedules with it too (cpus-per-task under Slurm).
STAGE_THREADS = config["threads"]
# Stages see the hub offline unless the config allows downloads (pipeline/hub.py).
os.environ.update(DSPO_ALLOW_DOWNLOADS="1" if config["allow_downloads"] else "0")
# Each job's settings as a file named by its hash, so a job's command stays short; the
# settings themselves are the job's `config` param, Snakemake's rerun trigger.
JOB_CONFIG_DIR = Path(".snakemake") / "dspo-job-config"

FRAMEWORKS = config["frameworks"]
OBJECTIVES = config["objectives"]
METHODS = config["methods"]
TESTSETS = config["testsets"]
SELECT_OBJECTIVES = list(config["select"]["objectives"]) + (
    ["human"] if config["annotations"] else []
)
# the model each framework aligns and evaluates as "pretrained"
BASE_VARIANT = model_names.BASE_VARIANT

# Every data stage runs as K shard jobs and one gather (docs/design.md §15); one scatter for all
# stages (--set-scatter shard=K), so shard i of a stage reads shard i of the stage before it.
scattergather:
    shard=config["shards"],


# Every weight path, metric, objective, test set and candidate setting is checked now, so a
# paper run fails within seconds naming the key and the file (pipeline/preflight.py).
if workflow.is_main_process:
    preflight.check(config, Path.cwd())
    rounds.check(config)  # rounds.methods and objectives that can iterate (docs/design.md §14)


def code_hash(stage):
    """Hash of the stage module and every pipeline module it imports (see pipeline/codehash.py)."""
    return _code_hash(ROOT, f"pipeline.{stage}")


def train_code_hash(wildcards):
    """A train job's code: the stage (with the training session and the shared step code) and
    its own method's module only, so editing one method reruns that method's jobs
    (docs/design.md §16)."""
    method = contracts.method(wildcards.method)
    if method.file is not None:  # a method file outside the package: its bytes and imports
        return _code_hash(ROOT, "pipeline.train", files=(method.file,))
    return _code_hash(ROOT, "pipeline.train", contracts.method_module(wildcards.method))


def _job_json(stage, wildcards):
    job = settings.job_settings(config, stage, **dict(wildcards))
    return json.dumps(job, sort_keys=True, separators=(",", ":"))


def job_config(stage, *names):
    """params: the settings a job of ``stage`` runs with (pipeline.settings.job_settings, as
    ``python -m pipeline config`` prints them), canonical JSON: Snakemake's rerun trigger."""
    return lambda wildcards: _job_json(stage, {name: wildcards[name] for name in names})


def job_config_file(stage, *names):
    """params: the same settings written to .snakemake/dspo-job-config/STAGE-HASH.json, the
    path the job's command passes as --config."""

    return lambda wildcards: write_job_config(
        stage, _job_json(stage, {name: wildcards[name] for name in names})
    )


def write_job_config(stage, text):
    """Write a job's settings (canonical JSON) to JOB_CONFIG_DIR/STAGE-HASH.json once; its path."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    target = JOB_CONFIG_DIR / f"{stage}-{digest}.json"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text)
        partial.replace(target)
    return str(target)


def shards_of(name, **fields):
    """An input function: every shard of artifact ``name``, the job's wildcards and ``fields``
    filled in (the input of a gather rule, in shard order)."""
    return lambda wildcards: gather.shard(shard_artifact(name, **fields), **dict(wildcards))


def shard_input(name, **fields):
    """An input function: the job's own shard of artifact ``name``: the job's wildcards that
    the artifact's path has, then ``fields``."""
    names = contracts.wildcards_of(name) | {"scatteritem"}
    return lambda wildcards: shard_artifact(
        name, **{**{k: v for k, v in dict(wildcards).items() if k in names}, **fields}
    )


def candidate_variants(framework):
    """The pretrained variants the candidate settings sample from."""
    return sorted({s["variant"] for s in settings.candidate_settings(config, framework)})


def get_candidate_models(wildcards):
    return {
        variant: artifact("model", framework=wildcards.framework, variant=variant)
        for variant in candidate_variants(wildcards.framework)
    }


def get_candidate_model_args(wildcards):
    return " ".join(f"{v}={p}" for v, p in get_candidate_models(wildcards).items())


def get_prompt_images(wildcards):
    """A prompts shard's images: the data's shard (training split), or the test set."""
    if wildcards.split == "train":
        return shard_artifact("data", split="train", scatteritem=wildcards.scatteritem)
    return TESTSETS[wildcards.split]["path"]


def get_segment_images(wildcards):
    """The shared frame's images of the job's shard: the training split's HQ, or one candidate
    setting's images."""
    if config["segment"]["source"] == "hq":
        return shard_artifact("data", split="train", scatteritem=wildcards.scatteritem)
    return shard_artifact("candidates", framework=wildcards.framework,
                          scatteritem=wildcards.scatteritem)  # fmt: skip


def get_segment_images_arg(wildcards, input):
    source = config["segment"]["source"]
    if source == "hq":
        return f"--data {input.images}"
    return f"--candidates {input.images}/{contracts.CANDIDATES_TABLE} --setting {source}"


def get_annotations(wildcards):
    return [config["annotations"]] if config["annotations"] else []


def get_annotations_arg(wildcards):
    return f"--annotations {config['annotations']}" if config["annotations"] else ""


def get_train_pairs(wildcards):
    """The pairs table of the method's pair level (pipeline.contracts.METHODS); none for a
    method that samples its own outputs (pair level contracts.NO_PAIRS: ddpo); the perception
    and fidelity tables, in that order, for pair level "objectives" (ea_adam)."""
    return contracts.train_pairs_artifacts(wildcards.framework, wildcards.objective,
                                           wildcards.method)


def get_train_pairs_arg(wildcards):
    pairs = get_train_pairs(wildcards)
    return f"--pairs {' '.join(pairs)}" if pairs else ""


def evaluated_models(framework):
    """The names of the models the evaluation of ``framework`` has (bicubic, pretrained, the
    aligned models, ablations and later rounds: pipeline.model_names.evaluated_models)."""
    return [spec.name for spec in model_names.evaluated_models(config, framework)]


def get_eval_model(wildcards):
    """The DAG output an evaluated model comes from (an ea_adam member's is its run's folder);
    none for bicubic (pipeline.model_names.ModelSpec)."""
    spec = model_names.ModelSpec.parse(wildcards.model)
    return spec.source_artifact(wildcards.framework) or []


def get_eval_model_arg(wildcards):
    """The model folder evaluate loads (an ea_adam member's is inside its run's), or bicubic."""
    spec = model_names.ModelSpec.parse(wildcards.model)
    return spec.model_folder(wildcards.framework) or model_names.BICUBIC


def get_eval_feedback(wildcards):
    """The pairs tables a dspo model was trained on (their feedback vocabulary joins the
    negative prompts in sampling, M2); nothing for every other model, its ablation without M2
    included."""
    return model_names.ModelSpec.parse(wildcards.model).feedback_pairs(wildcards.framework)


def get_eval_feedback_arg(wildcards):
    feedback = get_eval_feedback(wildcards)
    return f"--feedback {' '.join(feedback)}" if feedback else ""


def get_testset_path(wildcards):
    return TESTSETS[wildcards.testset]["path"]


def get_testset_kind(wildcards):
    return TESTSETS[wildcards.testset]["kind"]


def get_evaluations(wildcards):
    return expand(
        artifact("evaluation"),
        framework=wildcards.framework,
        testset=list(TESTSETS),
        model=evaluated_models(wildcards.framework),
    )


def provenance(framework):
    """(input, table) per upstream stage whose metadata the report repeats (backends, weights,
    stand-ins); the input is the rule output to depend on, the table the file inside it."""
    folders = {
        artifact("data", split="train"): contracts.DATA_TABLE,
        artifact("model", framework=framework, variant=BASE_VARIANT): contracts.TRAIN_LOG,
        artifact("candidates", framework=framework): contracts.CANDIDATES_TABLE,
    }
    tables = [
        artifact("instances", framework=framework),
        artifact("captions", framework=framework),
        artifact("scores", framework=framework),
        *(artifact("pairs", framework=framework, objective=objective,
                   level=contracts.PAIR_LEVELS["instance"])
          for objective in OBJECTIVES),
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
    return expand(f"{artifact('report_dir')}/{contracts.report_file('report')}", framework=FRAMEWORKS)


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
