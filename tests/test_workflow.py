"""The Snakemake DAG: job plans, and the `ci` preset run end to end once.

The end-to-end test runs the real workflow (every stage, both frameworks, tiny models) in a
copy of the repository, checks every artifact of docs/design.md against its contract, then uses
dry runs in the same copy to check caching: nothing to do on a second run, `--forcerun score`
reruns score and its dependants only, and a changed setting or changed stage code reruns
exactly the stages that depend on it.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import yaml
import zarr

from pipeline import contracts
from pipeline.io.masks import read_label_map
from pipeline.io.tables import read_metadata, read_table
from tests.workflow_helpers import ROOT, copy_workflow, planned_jobs, snakemake

CI = ("--configfile", "workflow/presets/ci.yaml")
# On CI's 2 cores the tiny jobs are dominated by start-up (imports), so run two at a time with
# one thread each; with no GPU, `gpu=0` lifts the local profile's one-GPU-job cap.
RULES = ("degrade", "pretrain", "candidates", "segment", "caption", "score", "train", "evaluate")
TWO_AT_A_TIME = ("--resources", "gpu=0", "--set-threads", *(f"{rule}=1" for rule in RULES))
UPSTREAM_OF_SCORE = {"degrade", "pretrain", "candidates", "segment", "caption"}


@pytest.mark.parametrize("shards", [1, 3])
def test_demo_plan(tmp_path, shards):
    # every data stage: `shards` jobs and one gather (docs/design.md §15)
    jobs = planned_jobs(copy_workflow(tmp_path / "wf"), "--config", f"shards={shards}")
    assert jobs == {
        "degrade": 2 * shards,  # train and test splits
        "degrade_gather": 2,
        "prompts": 2 * shards,  # the training split and the test set
        "prompts_gather": 1,  # the training split's (evaluate reads the test set's shards)
        "pretrain": 5,  # one-step base and the four DSPO variants
        **{stage: shards for stage in ("candidates", "segment", "caption", "score")},
        **{f"{stage}_gather": 1 for stage in ("candidates", "segment", "caption", "score")},
        "select": 1,
        "train": 3,  # dspo, dpo, sft on the fidelity objective
        "evaluate": 5 * shards,  # bicubic, pretrained and the three aligned models
        "evaluate_gather": 5,
        "winrates": shards,  # the three aligned models against the pretrained one, test set
        "winrates_gather": 1,
        "annotate_simulate": 1,  # simulated votes (human_eval: no votes file) ...
        "annotate_winrate": 1,  # ... and their Fig. 3 win rates for the report
        # the Figure 1 study (study.in_report): the main arm and the positive control
        "study_segment": 2 * shards,  # the training and the held-out images' HQ
        "study_segment_gather": 2,
        "study_prompts": shards,
        "study_prompts_gather": 1,
        "study_build": 2,
        "study_select": 2,
        "study_train": 2 * 2 * 3,  # arms x methods (dspo, dpo) x seeds
        "study_measure": 1,
        "study_report": 1,
        "report": 1,
        "all": 1,
    }


def test_ci_plan_covers_both_frameworks(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    jobs = planned_jobs(workdir, *CI)
    # the rounds' copies of the stages are the base rules, sharded as they are
    sharded = planned_jobs(workdir, *CI, "--set-scatter", "shard=3")
    for stage in ("candidates", "caption", "score"):
        assert sharded[stage] == sharded[f"rounds_{stage}"] == 3 * 2
        assert sharded[f"{stage}_gather"] == sharded[f"rounds_{stage}_gather"] == 2
    assert sharded["evaluate"] == 3 * jobs["evaluate"]
    assert jobs["pretrain"] == 5 + 1  # one-step base + four variants; multi-step base
    assert jobs["candidates"] == jobs["segment"] == jobs["score"] == jobs["report"] == 2
    # eight methods (ddpo, dro_online, gdpo and gdpo_instance included), one objective, two
    # frameworks; ea_adam once, one-step only
    assert jobs["train"] == 2 * 8 + 1
    # bicubic, pretrained, four aligned per framework; multi-step also dspo without M2 sampling
    # ... and one-step's ea_adam fused model and its two members
    # ... and dspo's round 2 per framework (rounds: count 2, methods [dspo])
    assert jobs["evaluate"] == 2 * (2 + 8) + 1 + 3 + 2
    assert all(
        jobs[f"rounds_{stage}"] == 2
        for stage in (
            "candidates",
            "candidates_gather",
            "caption",
            "caption_gather",
            "score",
            "score_gather",
            "select",
            "train",
        )
    )
    assert jobs["prompts"] == 2  # the training split and the test set
    assert jobs["winrates"] == jobs["winrates_gather"] == 2  # one test set per framework
    assert all(jobs[f"{stage}_gather"] == jobs[stage] for stage in ("candidates", "evaluate"))
    assert jobs["annotate_simulate"] == jobs["annotate_winrate"] == 2  # Fig. 3, per framework


@pytest.mark.slow
def test_ci_preset_end_to_end(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    snakemake(workdir, *CI, *TWO_AT_A_TIME)
    results = workdir / "results"
    check_artifacts(results)
    check_rounds(results)

    assert planned_jobs(workdir, *CI) == {}
    # K = 2 on one core and K = 3 on two: the same bytes as K = 1 (docs/design.md §15)
    same_bytes_sharded(workdir, tmp_path / "two-shards", shards=2, cores=1)
    same_bytes_sharded(workdir, tmp_path / "three-shards", shards=3, cores=2)

    rerun = planned_jobs(workdir, *CI, "--forcerun", "score")
    assert rerun["score"] == 2 and rerun["select"] == 2 and rerun["train"] == 11
    assert not UPSTREAM_OF_SCORE & set(rerun)

    # a rerun gives the same bytes (tables, masks and images were checked per stage)
    scores = (results / "scores/multistep.parquet").read_bytes()
    pairs = (results / "pairs/multistep/fidelity.parquet").read_bytes()
    snakemake(workdir, *CI, *TWO_AT_A_TIME, "--forcerun", "select", "--until", "select")
    assert (results / "pairs/multistep/fidelity.parquet").read_bytes() == pairs
    assert (results / "scores/multistep.parquet").read_bytes() == scores

    # a method from a file outside the package runs through the train rule, and only its jobs
    # run (docs/adding_a_method.md)
    shutil.copy(ROOT / "tests/methods/toy_ipo.py", workdir / "toy_ipo.py")
    methods = yaml.safe_load((workdir / "workflow/presets/ci.yaml").read_text())["methods"]
    toy = ("--config", "method_files=[toy_ipo.py]", f"methods=[{','.join(methods)},toy_ipo]")
    assert planned_jobs(workdir, *CI, *toy, "--until", "train") == {"train": 2}
    snakemake(workdir, *CI, *toy, *TWO_AT_A_TIME, "--until", "train")
    for framework in ("onestep", "multistep"):
        log = results / f"aligned/{framework}/toy_ipo/fidelity/{contracts.TRAIN_LOG}"
        assert read_metadata(log)["loss"] == "toy_ipo"

    # a changed degradation setting reruns degrade and everything after it
    changed = _with_setting(workdir, "degrade:\n  degradation: {jpeg_range: [40, 95]}\n")
    jobs = planned_jobs(workdir, "--configfile", "workflow/presets/ci.yaml", str(changed))
    assert jobs["degrade"] == 2 and jobs["pretrain"] == 6 and jobs["report"] == 2

    # editing one stage's code reruns that stage and its dependants only
    select_code = workdir / "pipeline/select.py"
    select_code.write_text(select_code.read_text() + "\n# edited\n")
    jobs = planned_jobs(workdir, *CI)
    # every train job but ddpo (it reads no pairs and imports no stage: pipeline.objectives)
    assert jobs["select"] == 2 and jobs["train"] == 11
    assert not (UPSTREAM_OF_SCORE | {"score"}) & set(jobs)


#: the results up to select, compared across shard counts and --cores
UNTIL_SELECT = (
    "data/train",
    "prompts/train.parquet",
    "candidates",
    *(
        f"masks/{framework}{part}"
        for framework in ("onestep", "multistep")
        for part in (".zarr", "/instances.parquet")
    ),
    "captions",
    "scores",
    "pairs",
)


def _compare_results():
    spec = importlib.util.spec_from_file_location(
        "compare_results", ROOT / "scripts/compare_results.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def same_bytes_sharded(reference: Path, destination: Path, shards: int, cores: int) -> None:
    """The ci preset up to ``select``, run again with ``shards`` shards per data stage and
    ``cores`` cores, writes the same tables (rows; metadata, which records the shard count and
    paths, aside), label maps and images as the one-shard run: results depend neither on the
    shard count nor on --cores (the config's `threads` fixes every job's intra-op threads, and
    each table records it)."""
    # the same code as the first run (a copy of its working directory, without its outputs)
    skip = shutil.ignore_patterns("results", "logs", "benchmarks", ".snakemake", "__pycache__")
    copy = Path(shutil.copytree(reference, destination, ignore=skip))
    snakemake(
        copy,
        *CI,
        "--config",
        f"shards={shards}",
        "--resources",
        "gpu=0",
        "--until",
        "select",
        "candidates_gather",
        cores=cores,
    )
    compare = _compare_results()
    for part in UNTIL_SELECT:
        a, b = reference / "results" / part, copy / "results" / part
        assert a.exists() and b.exists(), part
        if a.is_file():
            assert compare.same(a, b), part
        else:
            assert compare.main([str(a), str(b)]) == 0, part
    shard_tables = sorted((copy / "results/shards/scores").rglob("*.parquet"))
    assert len(shard_tables) == 2 * shards  # two frameworks
    assert read_metadata(copy / "results/scores/onestep.parquet")["shards"] == shards
    if cores == 1:
        scores = read_metadata(copy / "results/scores/onestep.parquet")
        assert scores["runtime"]["torch_threads"] == 1


def _with_setting(workdir: Path, text: str) -> Path:
    path = workdir / "overlay.yaml"
    path.write_text(text)
    return path


def check_rounds(results: Path) -> None:
    """dspo's round 2 (ci: rounds count 2): new candidates from round 1's model that differ,
    scores, pairs on round 1's masks, training from round 1's weights, the report's Rounds."""
    for framework in ("onestep", "multistep"):
        round_one = f"results/aligned/{framework}/dspo/fidelity"
        run = results / f"rounds/{framework}/dspo/fidelity/r2"
        table = run / "candidates/candidates.parquet"
        candidates = read_table(table, "candidates")
        assert candidates["setting"].nunique() == 4
        for _, group in candidates.groupby("image_id"):  # select would be a silent no-op
            assert len({(run / "candidates" / path).read_bytes() for path in group["path"]}) == 4
        recorded = read_metadata(table)
        assert recorded["round"]["round"] == 2
        assert {model["path"] for model in recorded["models"].values()} == {round_one}
        scores = read_table(run / "scores.parquet", "scores")
        instances = read_table(results / f"masks/{framework}/instances.parquet", "instances")
        assert set(scores["instance_id"]) - {-1} <= set(instances["instance_id"])
        assert len(read_table(run / "pairs/fidelity.parquet", "preference_pairs")) > 0
        trained = read_metadata(run / "aligned/train_log.parquet")
        assert trained["model"] == round_one  # round 1's weights: the start and the reference
        assert (
            trained["pairs"]
            == f"results/rounds/{framework}/dspo/fidelity/r2/pairs/fidelity.parquet"
        )
        if framework == "onestep":  # one more adapter on round 1's stack (base + round 1)
            assert len(trained["model_describe"]["lora_stack"].split(",")) == 3
        evaluated = results / f"eval/{framework}/synthetic/dspo_fidelity_r2"
        assert len(read_table(evaluated / "metrics.parquet", "eval_metrics")) > 0
        report_text = (results / f"eval/{framework}/report.md").read_text()
        assert "## Rounds" in report_text and "| dspo | fidelity | 2 |" in report_text
        assert "| dspo | fidelity | 1 |" in report_text


def check_artifacts(results: Path) -> None:
    """Every file of docs/design.md's data-contract table exists and matches its contract."""
    for split in ("train", "test"):
        pairs = read_table(results / f"data/{split}/pairs.parquet", "degradation_pairs")
        assert len(pairs) > 0
        for image_id in pairs["image_id"]:
            assert (results / f"data/{split}/hq/{image_id}.png").is_file()
            assert (results / f"data/{split}/lq/{image_id}.png").is_file()
    train_ids = set(
        read_table(results / "data/train/pairs.parquet", "degradation_pairs")["image_id"]
    )
    for framework in ("onestep", "multistep"):
        models = results / "models" / framework
        for model in models.iterdir():
            assert (model / "dspo_model.json").is_file()
            assert not list(model.rglob("*.bin")) and not list(model.rglob("*.pt*"))
            read_table(model / "train_log.parquet", "pretrain_log")
        candidates = read_table(
            results / f"candidates/{framework}/candidates.parquet", "candidates"
        )
        assert set(candidates["image_id"]) == train_ids and candidates["setting"].nunique() == 4
        for path in candidates["path"]:
            assert (results / f"candidates/{framework}" / path).is_file()
        store = results / f"masks/{framework}.zarr"
        instances = read_table(results / f"masks/{framework}/instances.parquet", "instances")
        assert set(zarr.open_group(store, mode="r").array_keys()) == train_ids
        for image_id, group in instances.groupby("image_id"):
            labels = read_label_map(store, image_id)
            assert labels.dtype.name == "uint16"
            assert sorted(group["instance_id"]) == sorted(set(labels.ravel().tolist()))
            assert abs(group["weight"].sum() - 1.0) < 1e-9
        captions = results / f"captions/{framework}.parquet"
        read_table(captions, "captions")
        assert read_metadata(captions)["skipped"] is True
        scores = read_table(results / f"scores/{framework}.parquet", "scores")
        assert set(scores["metric"]) == {"psnr", "ssim", "gmsd", "piqe"}
        for level in ("", "_image"):
            read_table(results / f"pairs/{framework}/fidelity{level}.parquet", "preference_pairs")
        for method in ("dspo", "dpo", "sft", "dspo_m1"):
            aligned = results / f"aligned/{framework}/{method}/fidelity"
            assert (aligned / "dspo_model.json").is_file()
            log = read_table(aligned / "train_log.parquet", "train_log")
            assert list(log["step"]) == [1, 2]
        for model in ("bicubic", "pretrained", "dspo_fidelity", "dspo_m1_fidelity"):
            evaluated = results / f"eval/{framework}/synthetic/{model}"
            metrics = read_table(evaluated / "metrics.parquet", "eval_metrics")
            assert set(metrics["metric"]) == {"psnr", "ssim", "gmsd", "piqe"}
            assert len(list((evaluated / "images").glob("*.png"))) == metrics["image_id"].nunique()
        ddpo = results / f"aligned/{framework}/ddpo/fidelity"
        assert read_metadata(ddpo / "train_log.parquet")["table"] == "ddpo_log"
        dro = read_metadata(results / f"aligned/{framework}/dro_online/fidelity/train_log.parquet")
        assert dro["table"] == "dro_online_log" and dro["pair_level"] == "instance"
        policy = {"onestep": "one-step Gaussian policy", "multistep": "multi-step DDIM policy"}
        for method, level in (("gdpo", "image"), ("gdpo_instance", "instance")):
            log = results / f"aligned/{framework}/{method}/fidelity/train_log.parquet"
            gdpo = read_metadata(log)
            assert gdpo["table"] == "gdpo_log" and gdpo["level"] == level
            assert gdpo["policy"]["name"] == policy[framework]
        summary = read_table(results / f"eval/{framework}/summary.parquet", "eval_summary")
        online = {"ddpo_fidelity", "dro_online_fidelity", "gdpo_fidelity", "gdpo_instance_fidelity"}
        assert set(summary["model"]) >= {"bicubic", "pretrained", "sft_fidelity", *online}
        for name in (
            "tables.md",
            "tables.csv",
            "report.md",
            "radar_synthetic.png",
            "grid_synthetic.png",
        ):
            assert (results / f"eval/{framework}/{name}").stat().st_size > 0
        report_text = (results / f"eval/{framework}/report.md").read_text()
        assert "classical" in report_text  # the offline segmenter is named as a stand-in
        assert "SIMULATED" in report_text  # the Fig. 3 section of simulated annotators
    front = results / "aligned/onestep/ea_adam/front"  # EA-Adam runs on the one-step framework
    population = read_table(front / "population.parquet", "population")
    assert len(population) == len(list((front / "members").iterdir())) >= 2
    assert (front / "dspo_model.json").is_file()  # the fused model
