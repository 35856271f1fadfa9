"""Iterative alignment rounds (docs/design.md §14): the plan, the round candidates, the DAG and
the report's Rounds table."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import contracts, rounds, settings
from pipeline.candidates import generate_candidates
from pipeline.io.images import read_rgb
from pipeline.io.tables import read_metadata, read_table
from pipeline.model_names import ModelSpec
from pipeline.models.onestep import OneStepSR
from pipeline.report import ROUNDS_COLUMNS, rounds_frame, write_rounds
from pipeline.seeding import derive_seed, torch_generator
from tests.onestep_helpers import make_pairs
from tests.workflow_helpers import copy_workflow, snakemake

ONESTEP_VARIANTS = ("cfg12", "cfg6", "rank16", "rank64")  # the paper's four one-step settings

# ------------------------------------------------------------------------------------ the plan


def test_round_names_round_trip():
    """A later round's model is its run's spec with the round (pipeline/model_names.py)."""
    assert ModelSpec.aligned("dspo", "fidelity").name == "dspo_fidelity"
    assert ModelSpec.aligned("dspo", "fidelity", 2).name == "dspo_fidelity_r2"
    later = ModelSpec.parse("dspo_fidelity_r2")
    assert (later.round, later.base.name) == (2, "dspo_fidelity")
    later = ModelSpec.parse("dspo_m1_united_r12")
    assert (later.method, later.objective, later.round) == ("dspo_m1", "united", 12)
    # round 1 has no suffix: names without one are round 1's, and "_r1" is no name
    for name in ("dspo_fidelity", "pretrained", "ea_adam_member3"):
        assert ModelSpec.parse(name).round == 1
    with pytest.raises(ValueError, match="dspo_fidelity_r1"):
        ModelSpec.parse("dspo_fidelity_r1")
    dspo_m1 = ModelSpec.parse("dspo_m1_fidelity")
    assert (dspo_m1.method, dspo_m1.objective) == ("dspo_m1", "fidelity")
    assert ModelSpec.parse("dpo_perception").method == "dpo"
    assert ModelSpec.parse("pretrained").method is None


def test_round_wildcard_matches_every_later_round_only():
    pattern = re.compile(f"^(?:{rounds.ROUND_WILDCARD})$")
    assert [n for n in range(0, 31) if pattern.match(str(n))] == list(range(2, 31))
    assert not pattern.match("02") and pattern.match("100")


def test_which_methods_and_objectives_iterate():
    config = {"methods": ["dspo", "dpo", "sft", "ddpo", "ea_adam"], "objectives": ["fidelity"]}
    assert rounds.later_rounds(config) == [] and rounds.runs(config) == []  # schema default 1
    config["rounds"] = {"count": 3}
    # null: every configured method that trains on selected pairs (not ddpo, not ea_adam)
    assert rounds.iterating_methods(config) == ["dspo", "dpo", "sft"]
    assert rounds.runs(config) == [
        (m, "fidelity", r) for m in ("dspo", "dpo", "sft") for r in (2, 3)
    ]
    config["rounds"]["methods"] = ["sft", "dspo"]  # kept in the order of `methods`
    assert rounds.iterating_methods(config) == ["dspo", "sft"]
    for refused in (["ddpo"], ["ea_adam"]):
        with pytest.raises(settings.ConfigError, match="cannot iterate"):
            rounds.iterating_methods({**config, "rounds": {"count": 2, "methods": refused}})
    with pytest.raises(settings.ConfigError, match="not in methods"):
        rounds.iterating_methods({**config, "rounds": {"count": 2, "methods": ["dro"]}})
    # the human objective's annotations rate round 1's candidates: it does not iterate
    human = {**config, "objectives": ["fidelity", "human"], "rounds": {"count": 2}}
    assert rounds.iterating_objectives(human) == ["fidelity"]
    with pytest.raises(settings.ConfigError, match="no run iterates"):
        rounds.check({"methods": ["ddpo"], "objectives": ["fidelity"], "rounds": {"count": 2}})
    rounds.check({"methods": ["ddpo"], "objectives": ["fidelity"]})  # count 1: nothing to check


def test_round_paths_and_job_settings():
    assert contracts.aligned_artifact("onestep", "dspo", "fidelity") == (
        "results/aligned/onestep/dspo/fidelity"
    )
    assert contracts.aligned_artifact("onestep", "dspo", "fidelity", 3) == (
        "results/rounds/onestep/dspo/fidelity/r3/aligned"
    )
    assert contracts.train_pairs_artifacts("multistep", "fidelity", "dpo", 2) == [
        "results/rounds/multistep/dpo/fidelity/r2/pairs/fidelity_image.parquet"
    ]
    assert contracts.train_pairs_artifacts("multistep", "fidelity", "dpo") == [
        "results/pairs/multistep/fidelity_image.parquet"
    ]
    config = {"rounds": {"count": 3}}
    # round 2 samples round 1's model, round 3 round 2's, for every variant of the settings
    assert rounds.candidate_models(config, "onestep", "dspo", "fidelity", 2) == {
        v: "results/aligned/onestep/dspo/fidelity" for v in ONESTEP_VARIANTS
    }
    assert rounds.candidate_models(config, "multistep", "dspo", "fidelity", 3) == {
        "base": "results/rounds/multistep/dspo/fidelity/r2/aligned"
    }
    assert rounds.policy_std(config, "onestep") == 0.1
    assert rounds.policy_std({"rounds": {"onestep_policy_std": 0.3}}, "onestep") == 0.3
    assert rounds.policy_std(config, "multistep") is None
    # a round's select computes its run's objective only; the other stages run as round 1
    config["select"] = {"objectives": {"fidelity": {"psnr": 1.0}, "perception": {"piqe": 1.0}}}
    select = rounds.job_settings(
        config, "select", framework="onestep", method="dspo", objective="perception", round="2"
    )
    assert select["objectives"] == {"perception": {"piqe": 1.0}}
    assert {k: v for k, v in select.items() if k != "objectives"} == {
        k: v for k, v in settings.job_settings(config, "select").items() if k != "objectives"
    }
    wildcards = {"framework": "onestep", "method": "dspo", "objective": "fidelity", "round": "2"}
    assert rounds.job_settings(config, "train", **wildcards) == settings.job_settings(
        config, "train", method="dspo", objective="fidelity"
    )
    assert rounds.job_settings(config, "candidates", **wildcards) == settings.job_settings(
        config, "candidates", framework="onestep"
    )


# ------------------------------------------------------------------------- round candidates


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """A tiny one-step model (its output not the LQ) standing in for round 1's aligned model."""
    root = tmp_path_factory.mktemp("rounds")
    data = make_pairs(root / "data", count=2)
    model = OneStepSR.build_tiny(block_out_channels=(16, 32), seed=3)
    with torch.no_grad():
        for name, parameter in model.unet.named_parameters():
            if "conv_out" in name:
                parameter.normal_(std=0.01, generator=torch_generator(3, "init", name))
    model.save_pretrained(root / "aligned")
    return root, data, {variant: root / "aligned" for variant in ONESTEP_VARIANTS}


def _images(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_one_model_gives_four_different_candidates_through_the_policy(aligned):
    root, data, models = aligned
    config = {"device": "cpu"}
    # the deterministic one step: four settings of one model are one image (select: no pairs)
    plain = root / "plain"
    generate_candidates("onestep", models, data, plain, config, seed=5)
    for image_id in ("img0", "img1"):
        assert len({(plain / f"{v}/{image_id}.png").read_bytes() for v in ONESTEP_VARIANTS}) == 1
    # round 2: the one-step Gaussian policy, each setting its own seeded noise
    second = root / "r2"
    table = generate_candidates(
        "onestep", models, data, second, config, seed=5, policy_std=0.1, round_number=2
    )
    for image_id in ("img0", "img1"):
        images = [
            read_rgb(second / f"{v}/{image_id}.png").astype(np.int16) for v in ONESTEP_VARIANTS
        ]
        assert len({image.tobytes() for image in images}) == 4
        base = read_rgb(plain / f"cfg6/{image_id}.png").astype(np.int16)
        # noise of std 0.1 latent units around the one-step sample: near it, not on it
        assert 0 < np.abs(images[1] - base).mean() < 20
    row = table[(table.image_id == "img1") & (table.setting == "rank64")].iloc[0]
    assert row.seed == derive_seed(5, "candidates", "img1", "rank64", "round", 2)
    recorded = read_metadata(second / contracts.CANDIDATES_TABLE)
    assert recorded["round"] == {"round": 2, "policy_std": 0.1, "sampling": OneStepSR.POLICY_NAME}
    assert {m["path"] for m in recorded["models"].values()} == {str(root / "aligned")}
    assert "round" not in read_metadata(plain / contracts.CANDIDATES_TABLE)  # round 1 as before
    # reruns are byte-identical; the round keys the draws, the std scales them
    again = root / "r2again"
    generate_candidates("onestep", models, data, again, config, 5, policy_std=0.1, round_number=2)
    assert _images(again) == _images(second)
    third = root / "r3"
    generate_candidates("onestep", models, data, third, config, 5, policy_std=0.1, round_number=3)
    wider = root / "r2wide"
    generate_candidates("onestep", models, data, wider, config, 5, policy_std=0.3, round_number=2)
    for other in (third, wider):
        assert all(_images(other)[k] != v for k, v in _images(second).items())
    assert read_table(third / contracts.CANDIDATES_TABLE, "candidates")["seed"].tolist() != (
        table["seed"].tolist()
    )


def test_policy_std_is_for_one_step_models_only(aligned):
    root, data, models = aligned
    with pytest.raises(ValueError, match="one-step models only"):
        generate_candidates(
            "multistep", {"base": models["cfg6"]}, data, root / "x", {}, 0, policy_std=0.1
        )


# ----------------------------------------------------------------------------- the report


def _summary(rows):
    return pd.DataFrame(
        [
            {
                "testset": "synthetic",
                "model": model,
                "metric": metric,
                "mean": value,
                "lower_better": metric == "gmsd",
            }
            for model, metric, value in rows
        ]
    )


def test_rounds_table_lists_each_run_per_round(tmp_path):
    summary = _summary(
        [
            ("pretrained", "psnr", 20.0),
            ("pretrained", "gmsd", 0.2),
            ("dspo_fidelity", "psnr", 21.0),
            ("dspo_fidelity", "gmsd", 0.19),
            ("dspo_fidelity_r3", "psnr", 23.5),
            ("dspo_fidelity_r3", "gmsd", 0.15),
            ("dspo_fidelity_r2", "psnr", 22.25),
            ("dspo_fidelity_r2", "gmsd", 0.17),
            ("dpo_fidelity", "psnr", 20.5),
            ("dpo_fidelity", "gmsd", 0.21),
        ]
    )
    frame = rounds_frame(summary)
    assert frame.columns.tolist() == [*ROUNDS_COLUMNS, "psnr", "gmsd"]
    assert frame[["method", "objective", "round", "model"]].values.tolist() == [
        ["dspo", "fidelity", 1, "dspo_fidelity"],
        ["dspo", "fidelity", 2, "dspo_fidelity_r2"],
        ["dspo", "fidelity", 3, "dspo_fidelity_r3"],
    ]  # dpo has no later round: not in the table
    assert frame["psnr"].tolist() == [21.0, 22.25, 23.5]
    files, text = write_rounds(summary, tmp_path)
    assert files == ["rounds.csv", "rounds.md"] and text.startswith("## Rounds")
    assert "| dspo | fidelity | 2 | 22.25 | 0.1700 |" in text
    assert "| method | objective | round | PSNR↑ | GMSD↓ |" in text
    assert pd.read_csv(tmp_path / "rounds.csv")["round"].tolist() == [1, 2, 3]
    assert write_rounds(summary[~summary["model"].str.contains("_r")], tmp_path / "no") == (
        [],
        "",
    )


# -------------------------------------------------------------------------------- the DAG


def _jobs(workdir: Path, *configfiles: str) -> list[dict[str, str]]:
    """Every job of a dry run: rule, input, output, wildcards and shell command."""
    result = snakemake(workdir, "--dry-run", "--printshellcmds", "--configfile", *configfiles)
    jobs = []
    for block in re.split(r"\n(?=\[[^\n]*\d{4}\]\n)", result.stdout + result.stderr):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        if rule is None:
            continue
        job = {"rule": rule[1]}
        for key in ("input", "output", "wildcards"):
            found = re.search(rf"^\s+{key}: (.*)$", block, re.M)
            job[key] = found[1] if found else ""
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        job["shell"] = shell[1] if shell else ""
        jobs.append(job)
    return jobs


def _signature(jobs):
    return sorted((j["rule"], j["wildcards"], j["output"]) for j in jobs)


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    workdir = copy_workflow(tmp_path_factory.mktemp("rounds-dag") / "wf")
    overlays = {
        "one": "rounds: {count: 1, methods: [dspo]}\n",
        "three": "rounds: {count: 3, methods: [dspo, dpo], onestep_policy_std: 0.25}\n",
    }
    for name, text in overlays.items():
        (workdir / f"{name}.yaml").write_text(text)
    ci = "workflow/presets/ci.yaml"
    return {
        "workdir": workdir,
        "ci": _jobs(workdir, ci),  # rounds count 2 for dspo
        "one": _jobs(workdir, ci, "one.yaml"),
        "three": _jobs(workdir, ci, "three.yaml"),
    }


ROUND_RULES = (
    "rounds_candidates",
    "rounds_candidates_gather",
    "rounds_caption",
    "rounds_caption_gather",
    "rounds_score",
    "rounds_score_gather",
    "rounds_select",
    "rounds_train",
)


@pytest.mark.slow
def test_one_round_is_the_dag_without_rounds(plans):
    one, two = plans["one"], plans["ci"]
    assert not [j for j in one if j["rule"].startswith("rounds_") or "rounds/" in j["output"]]
    # count 2 adds the round jobs and the round models' evaluations, and changes no other job
    added = [j for j in two if j["rule"] in ROUND_RULES]
    assert sorted(j["rule"] for j in added) == sorted(ROUND_RULES * 2)  # per framework
    round_evaluations = [
        j for j in two if j["rule"] in ("evaluate", "evaluate_gather") and "_r2" in j["output"]
    ]
    assert len(round_evaluations) == 2 * 2  # one shard and its gather per framework
    unchanged = [j for j in two if j not in added and j not in round_evaluations]
    assert _signature(unchanged) == _signature(one)
    # the same commands, but the win rates and the report also read the round models
    commands = {(j["rule"], j["output"]): j["shell"] for j in one}
    differ = {j["rule"] for j in unchanged if commands[(j["rule"], j["output"])] != j["shell"]}
    assert differ == {"winrates", "winrates_gather", "report"}


@pytest.mark.slow
def test_round_two_reads_its_pairs_and_round_one_model(plans):
    for framework in ("onestep", "multistep"):
        run = f"{framework}/dspo/fidelity"
        train = _only(plans["ci"], "rounds_train", framework)
        assert train["output"] == f"results/rounds/{run}/r2/aligned"
        assert train["input"].split(", ") == [
            f"results/rounds/{run}/r2/pairs/fidelity.parquet",
            f"results/rounds/{run}/r2/candidates",
            "results/data/train",
            "results/prompts/train.parquet",
            f"results/masks/{framework}.zarr",  # round 1's masks: segment is not rerun
            f"results/aligned/{run}",  # round 1's weights: start and reference
        ]
        assert f"--model results/aligned/{run} " in train["shell"]
        # the base candidates rule with round 1's model, on the data's and prompts' own shard
        candidates = _only(plans["ci"], "rounds_candidates", framework)
        assert set(candidates["input"].split(", ")) == {
            f"results/aligned/{run}",
            "results/shards/data/train/1-of-1",
            "results/shards/prompts/train/1-of-1.parquet",
        }
        assert candidates["output"] == f"results/shards/rounds/{run}/r2/candidates/1-of-1"
        policy = " --policy-std 0.1" if framework == "onestep" else ""
        assert f"--round 2{policy} --out" in candidates["shell"]
        for rule in ("rounds_score", "rounds_caption"):  # round 1's masks, shard by shard
            job = _only(plans["ci"], rule, framework)
            instances = f"results/shards/masks/{framework}/instances/1-of-1.parquet"
            assert instances in job["input"].split(", ")
        select = _only(plans["ci"], "rounds_select", framework)
        assert select["output"].split(", ") == [
            f"results/rounds/{run}/r2/pairs/fidelity.parquet",
            f"results/rounds/{run}/r2/pairs/fidelity_image.parquet",
        ]
        evaluation = [
            j
            for j in plans["ci"]
            if j["rule"] == "evaluate"
            and j["output"] == f"results/shards/eval/{framework}/synthetic/dspo_fidelity_r2/1-of-1"
        ]
        assert len(evaluation) == 1
        assert evaluation[0]["input"].startswith(f"results/rounds/{run}/r2/aligned")
        report = _only(plans["ci"], "report", framework)
        assert f"results/eval/{framework}/synthetic/dspo_fidelity_r2" in report["input"]


def _only(jobs, rule, framework):
    found = [j for j in jobs if j["rule"] == rule and f"framework={framework}" in j["wildcards"]]
    assert len(found) == 1, (rule, framework, found)
    return found[0]


@pytest.mark.slow
def test_rounds_settings_change_what_runs(plans):
    three = plans["three"]
    trains = sorted(j["output"] for j in three if j["rule"] == "rounds_train")
    assert trains == sorted(
        f"results/rounds/{fw}/{m}/fidelity/r{r}/aligned"
        for fw in ("onestep", "multistep")
        for m in ("dspo", "dpo")
        for r in (2, 3)
    )
    for framework in ("onestep", "multistep"):
        # round 3 starts from round 2's model; dpo reads its round's image-level pairs
        job = [
            j
            for j in three
            if j["rule"] == "rounds_train"
            and j["output"] == f"results/rounds/{framework}/dpo/fidelity/r3/aligned"
        ][0]
        inputs = job["input"].split(", ")
        assert (
            inputs[0] == f"results/rounds/{framework}/dpo/fidelity/r3/pairs/fidelity_image.parquet"
        )
        assert inputs[-1] == f"results/rounds/{framework}/dpo/fidelity/r2/aligned"
    onestep = [
        j["shell"]
        for j in three
        if j["rule"] == "rounds_candidates" and "framework=onestep" in j["wildcards"]
    ]
    assert len(onestep) == 4 and all("--policy-std 0.25 " in s for s in onestep)
    evaluated = {j["output"].rsplit("/", 1)[1] for j in three if j["rule"] == "evaluate_gather"}
    assert {
        "dspo_fidelity_r2",
        "dspo_fidelity_r3",
        "dpo_fidelity_r2",
        "dpo_fidelity_r3",
    } <= evaluated


@pytest.mark.slow
def test_snakemake_refuses_rounds_of_an_online_method(plans):
    workdir = plans["workdir"]
    (workdir / "online.yaml").write_text("rounds: {count: 2, methods: [dspo, ddpo]}\n")
    result = snakemake(
        workdir, "--dry-run", "--configfile", "workflow/presets/ci.yaml", "online.yaml", check=False
    )
    assert result.returncode != 0
    assert "config rounds.methods: ['ddpo'] cannot iterate" in result.stdout + result.stderr
