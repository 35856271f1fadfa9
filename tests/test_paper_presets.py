"""The paper presets end to end on the replicas (`python -m pipeline replicas`).

For each of ``workflow/presets/paper_onestep.yaml`` and ``paper_multistep.yaml``: copy the
workflow, write the tiny random stand-ins of every weight file and data folder the preset names
into the copy (so the preset's relative paths resolve), and run the preset with Snakemake plus
one overrides file (``--configfile PRESET overrides.yaml``, deep-merged after the preset).

The overrides change only sizes and step counts (crop sizes, steps, batch sizes, numbers of
images, threads, GPUs), add what the replicas document in ``replicas.json`` ->
``config_overrides`` (the tiny SAM's architecture and mask-generator thresholds), and swap the
paper metrics that have no offline replica (:data:`METRIC_SWAPS`). Every other setting stays the
preset's: objectives, methods, test sets, the one-step variants and their LPIPS perceptual loss
with its weights, prompts, guidance values and candidate settings. ``python -m pipeline config``
gives the effective settings with and without the overrides; the test checks that they differ
only where :data:`OVERRIDDEN` allows, and, after the run, that what the stages recorded (Parquet
metadata, ``dspo_model.json``) equals the preset's effective settings.

Select alone with ``pytest -k paper_presets`` (one preset: ``-k paper_onestep``).
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import contracts
from pipeline.io.tables import read_metadata, read_table
from tests.workflow_helpers import copy_workflow, planned_jobs, snakemake

PRESETS = {"paper_onestep": "onestep", "paper_multistep": "multistep"}

#: paper metrics without an offline replica (replicas.json "not_replicated") -> the weight-free
#: pyiqa metric measured instead in this test only (the replicas' documented swap)
METRIC_SWAPS = {"musiq": "piqe", "maniqa": "fsim", "clipiqa": "gmsd"}

#: the replica's LSDIR images kept: two train images and one test image (DIV2K-val, the
#: synthetic test set); the preset's test_fraction (0.01) would give no test image out of a few
TRAIN_IMAGES = ("0001000/0000001.png", "0001000/0000002.png")
TEST_IMAGES = ("0001000/0000003.png",)

#: Snakemake: two one-thread jobs at a time on 2 cores, every GPU rule on the CPU
RULES = (
    "degrade",
    "prompts",
    "pretrain",
    "candidates",
    "segment",
    "caption",
    "score",
    "train",
    "evaluate",
)
TWO_AT_A_TIME = ("--resources", "gpu=0", "--set-threads", *(f"{rule}=1" for rule in RULES))

#: effective settings (dotted paths of `python -m pipeline config`) the overrides may change;
#: every other leaf must equal the preset's
OVERRIDDEN = (
    "run.threads",
    "run.gpus.*",
    "degrade.crop_size",
    "degrade.test_ids",  # number of images (see TEST_IMAGES)
    "pretrain.*.steps",
    "pretrain.*.batch_size",
    "pretrain.*.crop_size",
    "candidates.batch_size",
    "segment.architecture.*",  # replicas.json config_overrides (tiny SAM)
    "segment.generator.*",  # replicas.json config_overrides (thresholds of an untrained SAM)
    "score.metrics",  # METRIC_SWAPS
    "select.objectives.*",  # METRIC_SWAPS, the same weights
    "train.max_steps",
    "train.batch_size",
    "train.methods.*.max_steps",
    "train.methods.*.batch_size",
    "train.policy_steps",  # ddpo's DDIM steps and group size (step counts, sizes)
    "train.policy_group_size",
    "train.methods.*.policy_steps",
    "train.methods.*.policy_group_size",
    "train.methods.*.reward.score.metrics",  # ddpo's reward: METRIC_SWAPS, as score.metrics
    "train.methods.*.reward.objectives.*",  # METRIC_SWAPS, the same weights
    "evaluate.metrics",  # METRIC_SWAPS
    "evaluate.steps",
    "evaluate.batch_size",
    "evaluate.max_images",
    "report.grid_crop",
    "report.front_objectives.*",  # select.objectives' perception and fidelity (METRIC_SWAPS)
)


def _swap(metrics: list[str]) -> list[str]:
    return [METRIC_SWAPS.get(name, name) for name in metrics]


def sizes_and_steps(framework: str, test_ids: list[str]) -> dict[str, Any]:
    """The overrides that only shrink the run."""
    return {
        "threads": 1,
        "gpus": dict.fromkeys(
            ["pretrain", "candidates", "segment", "caption", "score", "train", "evaluate"], 0
        ),
        "degrade": {"crop_size": 32, "test_ids": test_ids},
        "pretrain": {framework: {"steps": 2, "batch_size": 2, "crop_size": 32}},
        "candidates": {"batch_size": 2},
        # ddpo: 2 DDIM steps (multi-step) and 2 samples per LQ instead of 50 and 6
        "train": {"max_steps": 2, "batch_size": 2, "policy_steps": 2, "policy_group_size": 2},
        "evaluate": {"max_images": 2, "batch_size": 2, "steps": 2},
        "report": {"grid_crop": 32},
    }


def effective_config(workdir: Path, *configfiles: str) -> dict[str, Any]:
    """``python -m pipeline config --configfile ...`` in ``workdir``."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "config", "--configfile", *configfiles],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def changed_paths(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    flat_before, flat_after = flatten(before), flatten(after)
    return sorted(
        path
        for path in set(flat_before) | set(flat_after)
        if flat_before.get(path, "<absent>") != flat_after.get(path, "<absent>")
    )


def assert_recorded(recorded: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Every key of ``expected`` recorded with the same value."""
    differ = {
        key: (recorded.get(key, "<absent>"), value)
        for key, value in expected.items()
        if recorded.get(key, "<absent>") != value
    }
    assert differ == {}, f"{where}: recorded != effective: {differ}"


def prepare(tmp_path: Path, preset_name: str) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The workflow copy with the replicas and overrides.yaml; the effective settings of the
    preset alone and with the overrides."""
    framework = PRESETS[preset_name]
    preset = f"workflow/presets/{preset_name}.yaml"
    workdir = copy_workflow(tmp_path / "wf")
    from pipeline import degrade, replicas

    summary = replicas.write_replicas(workdir)
    assert json.loads((workdir / "replicas.json").read_text())["seed"] == summary["seed"]
    lsdir = workdir / replicas.LSDIR_FOLDER
    for path in sorted(lsdir.rglob("*.png")):
        if path.relative_to(lsdir).as_posix() not in TRAIN_IMAGES + TEST_IMAGES:
            path.unlink()
    test_ids = [degrade.image_id_for(name) for name in TEST_IMAGES]

    documented = summary["config_overrides"]
    paper = effective_config(workdir, preset)
    # the replicas' documented swap is the one recorded here
    assert set(summary["not_replicated"]) == set(METRIC_SWAPS)
    assert documented["score"]["metrics"] == _swap(paper["score"]["metrics"])
    assert documented["evaluate"]["metrics"] == _swap(paper["evaluate"]["metrics"])

    overrides = sizes_and_steps(framework, test_ids)
    overrides["segment"] = {
        key: documented["segment"][key] for key in ("architecture", "generator")
    }
    overrides["score"] = {"metrics": list(documented["score"]["metrics"])}
    overrides["evaluate"]["metrics"] = list(documented["evaluate"]["metrics"])
    overrides["select"] = {
        "objectives": {
            objective: {METRIC_SWAPS.get(m, m): w for m, w in weights.items()}
            for objective, weights in paper["select"]["objectives"].items()
        }
    }
    text = yaml.safe_dump(overrides, sort_keys=True)
    assert yaml.safe_load(text) == overrides  # ids such as 0001000__0000003 stay strings
    (workdir / "overrides.yaml").write_text(text)
    effective = effective_config(workdir, preset, "overrides.yaml")

    unexpected = [
        path
        for path in changed_paths(paper, effective)
        if not any(
            fnmatch.fnmatchcase(path, allowed) or path == allowed.removesuffix(".*")
            for allowed in OVERRIDDEN
        )
    ]
    assert unexpected == [], f"overrides.yaml changes preset settings: {unexpected}"
    return workdir, paper, effective


@pytest.mark.slow
@pytest.mark.parametrize("preset_name", list(PRESETS))
def test_paper_presets_end_to_end_on_replicas(tmp_path, preset_name):
    framework = PRESETS[preset_name]
    workdir, paper, effective = prepare(tmp_path, preset_name)
    run = effective["run"]
    configfiles = ("--configfile", f"workflow/presets/{preset_name}.yaml", "overrides.yaml")

    trained = set(itertools.product(run["methods"], run["objectives"]))
    jobs = planned_jobs(workdir, *configfiles, "--resources", "gpu=0")
    assert jobs["train"] == len(trained)
    assert jobs["evaluate"] >= len(run["testsets"]) * (2 + len(trained))

    started = time.monotonic()
    snakemake(workdir, *configfiles, *TWO_AT_A_TIME)
    print(f"{preset_name}: snakemake took {time.monotonic() - started:.0f} s")

    results = workdir / "results"
    check_pretrained(results, framework, effective)
    check_candidates(results, framework, effective, paper)
    check_prompts(results, framework, effective, paper)
    check_feedback_and_scores(results, framework, effective, paper)
    check_training(results, framework, effective, trained)
    check_evaluation(results, framework, effective, paper, trained)


def check_pretrained(results: Path, framework: str, effective: dict[str, Any]) -> None:
    section = effective["pretrain"][framework]
    variants = section["variants"]
    folders = results / "models" / framework
    assert sorted(p.name for p in folders.iterdir()) == sorted(variants)
    for variant, settings in variants.items():
        model = json.loads((folders / variant / "dspo_model.json").read_text())
        assert model["framework"] == framework
        assert Path(model["settings"]["weights"]).parts[-2:] == Path(section["weights"]).parts[-2:]
        assert_recorded(model["settings"], settings, f"{framework}/{variant}/dspo_model.json")
        log = read_metadata(folders / variant / "train_log.parquet")
        assert log["variant"] == variant and log["config"]["model"] == settings
        assert log["config"]["weights"] == section["weights"]
        assert log["config"]["steps"] == section["steps"]
        assert len(read_table(folders / variant / "train_log.parquet", "pretrain_log")) == 2
        if framework == "onestep":  # the preset: LPIPS (VGG, its weights) for every variant
            assert model["settings"]["perceptual"] == "lpips"
            assert model["settings"]["lambda_lpips"] == 2.0
            assert model["settings"]["perceptual_weights"] == (
                "models/pyiqa/LPIPS_v0.1_vgg-a78928a0.pth"
            )
    if framework == "onestep":  # the four variants differ as the preset says
        ranks = {v: variants[v]["lora_rank"] for v in ("rank16", "rank64")}
        assert ranks == {"rank16": 16, "rank64": 64}
        assert {v: variants[v]["cfg_vsd"] for v in ("base", "cfg6", "cfg12")} == {
            "base": 7.5,
            "cfg6": 6.0,
            "cfg12": 12.0,
        }


def check_candidates(
    results: Path, framework: str, effective: dict[str, Any], paper: dict[str, Any]
) -> None:
    settings = effective["candidates"]["settings"][framework]
    assert settings == paper["candidates"]["settings"][framework]
    path = results / f"candidates/{framework}/candidates.parquet"
    metadata = read_metadata(path)
    assert metadata["config"]["settings"] == settings
    table = read_table(path, "candidates")
    assert sorted(table["setting"].unique()) == sorted(s["name"] for s in settings)
    if framework == "multistep":  # steps {20, 80} x cfg {4.5, 10.5}, as the paper
        recorded = {(int(r.steps), float(r.cfg)) for r in table.itertuples()}
        assert recorded == {(s["steps"], s["cfg"]) for s in settings}
        assert {cfg for _, cfg in recorded} == {4.5, 10.5}
        assert {steps for steps, _ in recorded} == {20, 80}
    else:
        assert sorted(table["variant"].unique()) == ["cfg12", "cfg6", "rank16", "rank64"]
        for name, described in metadata["models"].items():
            assert "LPIPS" in described["perceptual_loss"], name


def check_prompts(
    results: Path, framework: str, effective: dict[str, Any], paper: dict[str, Any]
) -> None:
    """The prompts tables (train split and every test set) and the stages that read them run
    with the preset's prompt settings (source, added and negative prompts)."""
    section = effective["prompts"]
    assert section == paper["prompts"]
    # the train split's table is gathered; a test set's prompts stay in their shards, which
    # evaluate reads shard by shard (docs/design.md §15)
    tables = [results / "prompts/train.parquet"]
    for testset in effective["run"]["testsets"]:
        shards = sorted((results / "shards/prompts" / testset).glob("*.parquet"))
        assert shards, testset
        tables += shards
    for path in tables:
        metadata = read_metadata(path)
        assert_recorded(metadata["config"], section, str(path))
        assert metadata["source"] == section["source"]
        assert metadata["negative_prompt"] == section["negative_prompt"]
    readers = [
        results / f"candidates/{framework}/candidates.parquet",
        *sorted((results / "aligned" / framework).glob("*/*/train_log.parquet")),
        *sorted((results / "eval" / framework).glob("*/*/metrics.parquet")),
    ]
    for path in readers:
        metadata = read_metadata(path)
        if metadata.get("model") == "bicubic":
            continue
        prompts = metadata["prompts"]
        assert prompts["source"] == section["source"], path
        assert prompts["negative_prompts"] == [section["negative_prompt"]], path


def check_feedback_and_scores(
    results: Path, framework: str, effective: dict[str, Any], paper: dict[str, Any]
) -> None:
    segment = read_metadata(results / f"masks/{framework}/instances.parquet")
    assert segment["backend"] == "sam" and segment["sam_used"] is True
    assert segment["model_type"] == paper["segment"]["model_type"] == "vit_h"
    assert segment["checkpoint"].endswith(paper["segment"]["checkpoint"])
    assert segment["top_k"] == paper["segment"]["top_k"] == 5
    assert segment["architecture"] == effective["segment"]["architecture"]

    captions = read_metadata(results / f"captions/{framework}.parquet")
    assert captions["skipped"] is False
    assert captions["captioner"].endswith(paper["caption"]["captioner"])
    assert captions["threshold"] == paper["caption"]["threshold"] == 0.1

    scores = read_metadata(results / f"scores/{framework}.parquet")
    assert sorted(scores["metrics"]) == sorted(_swap(paper["score"]["metrics"]))
    assert set(read_table(results / f"scores/{framework}.parquet", "scores")["metric"]) == set(
        scores["metrics"]
    )
    assert str(scores["weights_dir"]).endswith(paper["score"]["weights_dir"])
    for objective in effective["run"]["objectives"]:
        pairs = read_metadata(results / f"pairs/{framework}/{objective}.parquet")
        assert pairs["metric_weights"] == effective["select"]["objectives"][objective]
        assert pairs["tie_tolerance"] == paper["select"]["tie_tolerance"]


def check_training(
    results: Path, framework: str, effective: dict[str, Any], trained: set[tuple[str, str]]
) -> None:
    aligned = results / "aligned" / framework
    found = {(p.parent.name, p.name) for p in aligned.glob("*/*") if p.is_dir()}
    assert found == trained
    for method, objective in sorted(trained):
        folder = aligned / method / objective
        log = read_metadata(folder / "train_log.parquet")
        # the stage records the method and the loss it assembled (dspo_m1: the dspo loss, no
        # negative prompts)
        assert (log["method"], log["objective"], log["framework"]) == (method, objective, framework)
        assert log["loss"] == contracts.method(method).loss
        expected = dict(effective["train"]["methods"][method])
        assert expected["negative_prompts"] is (method != "dspo_m1")
        if "reward" in expected:  # ddpo: `pipeline config` lists every objective's reward
            reward = expected.pop("reward")
            assert log["config"]["reward"] == {
                "score": reward["score"],
                "objectives": {objective: reward["objectives"][objective]},
            }
        assert_recorded(log["config"], expected, f"aligned/{framework}/{method}/{objective}")
        assert expected["beta"] == 8000.0 and expected["learning_rate"] == 5.0e-5
        if method == "ddpo":  # the policy is named; the one-step arm is never called DDPO
            policy = {
                "onestep": "one-step Gaussian policy",
                "multistep": "DDPO (multi-step DDIM policy)",
            }[framework]
            assert log["policy"]["name"] == policy and log["table"] == "ddpo_log"
        steps = read_table(folder / "train_log.parquet", log["table"])["step"]
        assert list(steps) == list(range(1, expected["max_steps"] + 1))
        model = json.loads((folder / "dspo_model.json").read_text())
        assert model["framework"] == framework
        if framework == "onestep":
            assert model["settings"]["perceptual"] == "lpips"


def check_evaluation(
    results: Path,
    framework: str,
    effective: dict[str, Any],
    paper: dict[str, Any],
    trained: set[tuple[str, str]],
) -> None:
    measured = _swap(paper["evaluate"]["metrics"])
    expected_models = {"bicubic", "pretrained"} | {f"{m}_{o}" for m, o in trained}
    evaluated = results / "eval" / framework
    for testset in effective["run"]["testsets"]:
        models = {p.name for p in (evaluated / testset).iterdir() if p.is_dir()}
        assert expected_models <= models, (testset, expected_models - models)
        for model in sorted(models):
            path = evaluated / testset / model / "metrics.parquet"
            metadata = read_metadata(path)
            assert metadata["testset"] == testset
            assert_recorded(metadata["config"], effective["evaluate"], str(path))
            assert metadata["config"]["cfg"] == paper["evaluate"]["cfg"] == 5.5
            assert sorted(metadata["metrics"]) == sorted(measured)
            stand_ins = metadata["stand_ins"]
            assert sorted(stand_ins["dspo_metrics_not_measured"]) == sorted(METRIC_SWAPS)
            assert sorted(stand_ins["measured_instead"]) == sorted(METRIC_SWAPS.values())
            table = read_table(path, "eval_metrics")
            assert set(table["metric"]) == set(measured)
            assert 1 <= table["image_id"].nunique() <= 2
    summary = read_table(evaluated / "summary.parquet", "eval_summary")
    assert expected_models <= set(summary["model"])
    report = (evaluated / "report.md").read_text()
    for name in [*measured, *METRIC_SWAPS]:  # the metrics used, and the ones swapped out
        assert name in report, name
    for testset in effective["run"]["testsets"]:
        assert (evaluated / f"radar_{testset}.png").stat().st_size > 0
