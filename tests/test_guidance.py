"""Prompts reach every stage, so guidance is real (issue 12 points 1, 2, 5; docs/prompts.md).

With the shipped settings (config.yaml's `prompts` section: a fixed prompt and SeeSR's negative
prompt) every guidance scale must matter: multi-step candidates at cfg 4.5 and 10.5, the
one-step VSD loss at cfg_vsd 6 and 12, evaluation at cfg 5.5 and 1. Each comparison is run with
the same seed, and a control without the prompts table shows the old behaviour (identical).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import evaluate as evaluate_stage
from pipeline import prompts
from pipeline.candidates import generate_candidates
from pipeline.guidance import PromptsError, load_prompts
from pipeline.io.images import read_rgb
from pipeline.io.tables import SCHEMAS, read_metadata, read_table, write_table
from pipeline.models.multistep import MultiStepSR
from pipeline.pretrain import pretrain
from tests.onestep_helpers import TINY, make_pairs
from tests.workflow_helpers import ROOT, copy_workflow, snakemake

IDS = ["img0", "img1", "img2"]
SHIPPED = yaml.safe_load((ROOT / "config.yaml").read_text())["prompts"]
TINY_MULTISTEP = {"codec": "pixel", "factor": 4, "block_out_channels": (16, 32)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("guidance")
    data = make_pairs(root / "data", count=3)
    table = root / "prompts" / "train.parquet"
    frame, metadata = prompts.run_prompts_stage(data, "train", SHIPPED)
    write_table(frame, table, "prompts", metadata)
    synthetic = root / "prompts" / "syn.parquet"
    frame, metadata = prompts.run_prompts_stage(data, "synthetic", SHIPPED)
    write_table(frame, synthetic, "prompts", metadata)
    model = root / "models" / "multistep"
    MultiStepSR.build_tiny(**TINY_MULTISTEP, seed=3).save_pretrained(model)
    return {"root": root, "data": data, "train": table, "syn": synthetic, "model": model}


def test_shipped_prompts_give_two_different_branches(folders):
    texts = load_prompts(folders["train"], IDS)
    assert {texts[i] for i in IDS} == {
        ("a photo, clean, high-resolution, 8k", prompts.SEESR_NEGATIVE_PROMPT)
    }


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*.png"))}


# -- multi-step candidates: cfg 4.5 vs 10.5 ---------------------------------------------------


def _candidates(folders, out: Path, cfg: float, with_prompts: bool) -> dict[str, bytes]:
    # one setting name for both scales: the same generator (seed, "candidates", id, name)
    config = {
        "device": "cpu",
        "settings": [{"name": "s", "variant": "base", "steps": 2, "cfg": cfg}],
    }
    generate_candidates(
        "multistep",
        {"base": folders["model"]},
        folders["data"],
        out,
        config,
        seed=7,
        prompts=folders["train"] if with_prompts else None,
    )
    return _pngs(out)


def test_multistep_candidates_cfg_4_5_and_10_5_differ(folders, tmp_path):
    low = _candidates(folders, tmp_path / "low", 4.5, True)
    high = _candidates(folders, tmp_path / "high", 10.5, True)
    assert low.keys() == high.keys() and len(low) == 3
    assert all(low[name] != high[name] for name in low)
    # the old behaviour, empty prompt and negative prompt: the scales give the same images
    assert _candidates(folders, tmp_path / "a", 4.5, False) == _candidates(
        folders, tmp_path / "b", 10.5, False
    )
    table = read_table(tmp_path / "low" / "candidates.parquet", "candidates")
    assert set(table["negative_prompt"]) == {prompts.SEESR_NEGATIVE_PROMPT}
    recorded = read_metadata(tmp_path / "low" / "candidates.parquet")["prompts"]
    assert recorded["table"] == str(folders["train"])
    assert (recorded["source"], recorded["model"]) == ("fixed", "none")


def test_candidate_feedback_goes_before_the_negative_prompt(folders, tmp_path):
    feedback = tmp_path / "pairs.parquet"
    pd.DataFrame({"image_id": ["img1"], "negative_prompt": ["a dog"]}).to_parquet(feedback)
    config = {
        "device": "cpu",
        "settings": [{"name": "s", "variant": "base", "steps": 2, "cfg": 4.5}],
    }
    generate_candidates(
        "multistep",
        {"base": folders["model"]},
        folders["data"],
        tmp_path / "c",
        config,
        seed=7,
        negative_prompts=feedback,
        prompts=folders["train"],
    )
    table = read_table(tmp_path / "c" / "candidates.parquet", "candidates").set_index("image_id")
    assert table.loc["img1", "negative_prompt"] == f"a dog, {prompts.SEESR_NEGATIVE_PROMPT}"
    assert table.loc["img0", "negative_prompt"] == prompts.SEESR_NEGATIVE_PROMPT


# -- one-step VSD: cfg_vsd 6 vs 12 ------------------------------------------------------------


def _vsd_terms(folders, out: Path, cfg_vsd: float, with_prompts: bool) -> dict[str, float]:
    config = {
        "device": "cpu",
        "tiny": TINY,
        "steps": 1,
        "batch_size": 2,
        "crop_size": 32,
        "checkpoint_every": 0,
        "variants": {"v": {}},
        "model": {"lambda_vsd": 1.0, "cfg_vsd": cfg_vsd},
    }
    # the same variant name: the same batch (its draws are keyed by the variant) and seed
    pretrain(
        "onestep",
        "v",
        folders["data"],
        out,
        config,
        seed=4,
        checkpoint_dir=out.parent / f"{out.name}-ckpt",
        prompts=folders["train"] if with_prompts else None,
    )
    log = read_table(out / "train_log.parquet", "pretrain_log")
    return json.loads(log["terms"].iloc[0])


def test_onestep_vsd_loss_differs_between_cfg_vsd_6_and_12(folders, tmp_path):
    six = _vsd_terms(folders, tmp_path / "six", 6.0, True)
    twelve = _vsd_terms(folders, tmp_path / "twelve", 12.0, True)
    assert six["l2"] == twelve["l2"]  # same batch, same weights
    assert six["vsd"] != pytest.approx(twelve["vsd"], rel=1e-6, abs=0)
    # the old behaviour (empty prompt = empty negative prompt): the real score's two branches
    # are the same and the guidance scale changes nothing
    old_six = _vsd_terms(folders, tmp_path / "old6", 6.0, False)
    old_twelve = _vsd_terms(folders, tmp_path / "old12", 12.0, False)
    assert old_six["vsd"] == pytest.approx(old_twelve["vsd"], rel=1e-5)
    recorded = read_metadata(tmp_path / "six" / "train_log.parquet")["prompts"]
    assert (recorded["table"], recorded["source"]) == (str(folders["train"]), "fixed")


def test_vsd_negative_prompts_take_the_unconditional_branch():
    import torch

    from pipeline.models.onestep import OneStepSR
    from pipeline.seeding import torch_generator

    model = OneStepSR.build_tiny(**TINY, cfg_vsd=6.0)
    model.pretrain_parameters()
    lq, hq = torch.zeros(2, 3, 32, 32), torch.full((2, 3, 32, 32), 0.1)

    def vsd(negatives):
        _, stats = model.pretrain_loss(lq, hq, ["a photo"] * 2, torch_generator(0, "l"), negatives)
        return stats["vsd"]

    assert vsd(["dotted, noise"] * 2) != pytest.approx(vsd(None), rel=1e-6, abs=0)
    assert vsd(["", ""]) == vsd(None)  # empty entries take the settings' negative_prompt
    with pytest.raises(ValueError, match="1 negative prompts for 2"):
        vsd(["x"])


# -- evaluation: cfg 5.5 vs 1 -----------------------------------------------------------------


def _evaluate(folders, out: Path, cfg: float, *, with_prompts=True, feedback=None, name="m"):
    config = {"device": "cpu", "cfg": cfg, "steps": 2, "metrics": ["psnr"]}
    evaluate_stage.evaluate(
        str(folders["model"]),
        name,
        "syn",
        "synthetic",
        folders["data"],
        out,
        config,
        seed=2,
        prompts=folders["syn"] if with_prompts else None,
        feedback=feedback,
    )
    return _pngs(out / "images")


def test_evaluation_cfg_5_5_differs_from_cfg_1(folders, tmp_path):
    guided = _evaluate(folders, tmp_path / "cfg5.5", 5.5)
    plain = _evaluate(folders, tmp_path / "cfg1", 1.0)
    assert guided.keys() == plain.keys() and len(guided) == 3
    assert all(guided[name] != plain[name] for name in guided)
    # the old behaviour: without prompts both branches are the same, cfg 5.5 gives cfg 1's images
    old_guided = _evaluate(folders, tmp_path / "old5.5", 5.5, with_prompts=False)
    old_plain = _evaluate(folders, tmp_path / "old1", 1.0, with_prompts=False)
    for name in old_guided:
        difference = np.abs(
            read_rgb(tmp_path / "old5.5" / "images" / name).astype(int)
            - read_rgb(tmp_path / "old1" / "images" / name).astype(int)
        )
        assert difference.max() <= 1, name  # equal up to rounding of the guided sum
    assert old_guided.keys() == old_plain.keys()
    recorded = read_metadata(tmp_path / "cfg5.5" / "metrics.parquet")["prompts"]
    assert (recorded["table"], recorded["source"], recorded["model"]) == (
        str(folders["syn"]),
        "fixed",
        "none",
    )
    assert recorded["negative_prompts"] == [prompts.SEESR_NEGATIVE_PROMPT]


# -- M2 in sampling: dspo vs its _nom2 ablation -----------------------------------------------


def test_m2_ablation_gets_a_different_negative_prompt_than_dspo(folders, tmp_path):
    pairs = tmp_path / "pairs.parquet"
    pd.DataFrame(
        {"image_id": ["img0", "img1", "img2"], "negative_prompt": ["a dog", "a dog, a cat", ""]}
    ).to_parquet(pairs)
    dspo = _evaluate(folders, tmp_path / "dspo", 5.5, feedback=pairs, name="dspo_fidelity")
    nom2 = _evaluate(folders, tmp_path / "nom2", 5.5, name="dspo_fidelity_nom2")
    with_m2 = read_metadata(tmp_path / "dspo" / "metrics.parquet")["prompts"]
    without = read_metadata(tmp_path / "nom2" / "metrics.parquet")["prompts"]
    # the training vocabulary (most frequent first), then the base negative prompt
    assert with_m2["negative_prompts"] == [f"a dog, a cat, {prompts.SEESR_NEGATIVE_PROMPT}"]
    assert without["negative_prompts"] == [prompts.SEESR_NEGATIVE_PROMPT]
    assert with_m2["feedback"]["table"] == str(pairs) and without["feedback"] is None
    assert with_m2["feedback"]["mode"] == "vocabulary"
    assert all(dspo[name] != nom2[name] for name in dspo)
    with pytest.raises(ValueError, match="--feedback needs --prompts"):
        _evaluate(folders, tmp_path / "bad", 5.5, with_prompts=False, feedback=pairs)


def test_workflow_samples_dspo_with_its_pairs_and_the_ablation_without(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    result = snakemake(
        workdir, "--dry-run", "--printshellcmds", "--configfile", "workflow/presets/ci.yaml"
    )
    commands = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "pipeline evaluate" in line and "/multistep/" in line
    ]

    def command(model):
        (found,) = [c for c in commands if f"--model-name {model} " in c]
        return found

    dspo, nom2 = command("dspo_fidelity"), command("dspo_fidelity_nom2")
    assert "--feedback results/pairs/multistep/fidelity.parquet" in dspo
    assert "--feedback" not in nom2 and "--model results/aligned/multistep/dspo/fidelity " in nom2
    for model in ("dspo_m1_fidelity", "dpo_fidelity", "pretrained"):
        assert "--feedback" not in command(model)
        # the test set's prompts of the job's own shard (docs/design.md §15)
        assert "--prompts results/shards/prompts/synthetic/1-of-1.parquet" in command(model)
    # one-step sampling has no guidance: no ablation there (it would repeat dspo's images)
    assert not any(
        "--model-name dspo_fidelity_nom2" in c and "/onestep/" in c
        for c in (result.stdout + result.stderr).splitlines()
    )
    text = result.stdout + result.stderr
    for stage, table in (
        ("pretrain", "results/prompts/train.parquet"),
        ("candidates", "results/shards/prompts/train/1-of-1.parquet"),  # the shard's own
        ("train", "results/prompts/train.parquet"),
    ):
        lines = [c for c in text.splitlines() if f"python -m pipeline {stage} " in c]
        assert lines and all(f"--prompts {table}" in c for c in lines), stage
    assert re.search(r"^prompts\s+2$", text, re.M)


# -- a table whose prompt equals its negative prompt ------------------------------------------


def test_prompt_equal_to_negative_prompt_is_refused(folders, tmp_path):
    same = {"source": "fixed", "prompt": "x", "added_prompt": "", "negative_prompt": "x"}
    with pytest.raises(PromptsError, match="no-op"):
        prompts.run_prompts_stage(folders["data"], "train", same)
    # a table made or edited by hand reaches the check in every consumer
    frame = pd.DataFrame(
        {
            "image_id": IDS,
            "prompt": ["a photo", "x", "a photo"],
            "negative_prompt": ["blur", "x", "blur"],
            "source": "fixed",
            "model": "none",
        }
    )
    bad = tmp_path / "bad.parquet"
    write_table(frame, bad, "prompts", {"source": "fixed", "model": "none"})
    config = {
        "device": "cpu",
        "settings": [{"name": "s", "variant": "base", "steps": 2, "cfg": 4.5}],
    }
    with pytest.raises(PromptsError, match="candidates .*img1"):
        generate_candidates(
            "multistep",
            {"base": folders["model"]},
            folders["data"],
            tmp_path / "c",
            config,
            seed=0,
            prompts=bad,
        )
    with pytest.raises(PromptsError, match="evaluate .*img1"):
        evaluate_stage.evaluate(
            str(folders["model"]),
            "m",
            "syn",
            "synthetic",
            folders["data"],
            tmp_path / "e",
            {"device": "cpu", "metrics": ["psnr"]},
            prompts=bad,
        )
    pretrain_config = {
        "device": "cpu",
        "tiny": TINY,
        "steps": 1,
        "batch_size": 2,
        "crop_size": 32,
        "model": {"lambda_vsd": 0.0},
    }
    with pytest.raises(PromptsError, match="pretrain .*img1"):
        pretrain(
            "onestep",
            "base",
            folders["data"],
            tmp_path / "p",
            pretrain_config,
            0,
            checkpoint_dir=tmp_path / "pc",
            prompts=bad,
        )
    # a missing image is named too
    partial = tmp_path / "partial.parquet"
    write_table(frame.iloc[:1], partial, "prompts", {})
    with pytest.raises(KeyError, match="img1"):
        generate_candidates(
            "multistep",
            {"base": folders["model"]},
            folders["data"],
            tmp_path / "d",
            config,
            seed=0,
            prompts=partial,
        )
    assert SCHEMAS["prompts"].names == list(frame.columns)


# -- training: the conditional branch gets the prompt, the unconditional the negative ---------


def test_training_branches_take_the_table_prompt_and_feedback_then_negative(folders):
    import torch

    from pipeline.models.onestep import OneStepSR
    from pipeline.training.config import TrainConfig
    from pipeline.training.items import LoadedItem, PreferenceItem
    from pipeline.training.step import draw_conditions

    model = OneStepSR.build_tiny(**TINY)
    item = PreferenceItem("img1", ("a", "b"), (1,), (1.0,), (0,), (1,), "a dog")
    loaded = LoadedItem(
        item, torch.zeros(3, 32, 32), torch.zeros(2, 3, 32, 32), torch.ones(1, 32, 32)
    )
    texts = load_prompts(folders["train"], IDS)

    def prompt(rate, negative_prompts=True, table=texts):
        config = TrainConfig.from_dict(
            {"uncond_drop_rate": rate, "negative_prompts": negative_prompts}
        )
        return draw_conditions(model, loaded, config, 0, 0, 0, table).prompt

    assert prompt(0.0) == "a photo, clean, high-resolution, 8k"
    assert prompt(1.0) == f"a dog, {prompts.SEESR_NEGATIVE_PROMPT}"  # M2: feedback first
    assert prompt(1.0, negative_prompts=False) == ""  # dspo_m1: the empty prompt
    assert prompt(0.0, table=None) == "" and prompt(1.0, table=None) == "a dog"  # no table


def test_command_lines_take_prompts_and_feedback(folders, tmp_path):
    from pipeline import candidates

    pairs = tmp_path / "pairs.parquet"
    pd.DataFrame({"image_id": ["img0"], "negative_prompt": ["a dog"]}).to_parquet(pairs)
    out = tmp_path / "eval"
    argv = [
        "--model",
        str(folders["model"]),
        "--model-name",
        "dspo_fidelity",
        "--testset",
        "syn",
        "--testset-kind",
        "synthetic",
        "--testset-path",
        str(folders["data"]),
        "--out",
        str(out),
        "--config",
        json.dumps({"device": "cpu", "steps": 2, "metrics": ["psnr"]}),
        "--seed",
        "0",
        "--prompts",
        str(folders["syn"]),
        "--feedback",
        str(pairs),
    ]
    assert evaluate_stage.main(argv) == 0
    recorded = read_metadata(out / "metrics.parquet")["prompts"]
    assert recorded["negative_prompts"] == [f"a dog, {prompts.SEESR_NEGATIVE_PROMPT}"]
    setting = {"name": "s", "variant": "base", "steps": 2, "cfg": 4.5}
    argv = [
        "--framework",
        "multistep",
        "--model",
        f"base={folders['model']}",
        "--data",
        str(folders["data"]),
        "--out",
        str(tmp_path / "c"),
        "--prompts",
        str(folders["train"]),
        "--config",
        json.dumps({"device": "cpu", "settings": [setting]}),
    ]
    assert candidates.main(argv) == 0
    table = read_table(tmp_path / "c" / "candidates.parquet", "candidates")
    assert set(table["negative_prompt"]) == {prompts.SEESR_NEGATIVE_PROMPT}


def test_training_error_maps_follow_error_map_cfg(folders):
    """Multi-step training error maps are guided by the image's negative prompt when
    error_map_cfg > 1 (the setting did nothing in training before: no negatives reached them)."""
    import dataclasses

    import torch

    from pipeline.models.multistep import MultiStepSR
    from pipeline.training.config import TrainConfig
    from pipeline.training.items import LoadedItem, PreferenceItem
    from pipeline.training.step import draw_conditions, error_maps_batched

    item = PreferenceItem("img1", ("a", "b"), (1,), (1.0,), (0,), (1,), "a dog")
    generator = torch.Generator().manual_seed(0)
    loaded = LoadedItem(
        item,
        torch.rand(3, 32, 32, generator=generator) * 2 - 1,
        torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1,
        torch.ones(1, 32, 32),
    )
    texts = load_prompts(folders["train"], IDS)
    config = TrainConfig.from_dict({"uncond_drop_rate": 0.0})
    maps = {}
    for scale in (1.0, 3.0):
        model = MultiStepSR.build_tiny(block_out_channels=(16, 32), seed=0)
        model.settings = dataclasses.replace(model.settings, error_map_cfg=scale)
        conditions = draw_conditions(model, loaded, config, 0, 0, 0, texts)
        assert conditions.negative == f"a dog, {prompts.SEESR_NEGATIVE_PROMPT}"
        with torch.no_grad():
            maps[scale] = error_maps_batched(model, [loaded], [conditions], "cpu")[0]
    assert not torch.allclose(maps[1.0], maps[3.0])
