"""Pretraining stage: loss goes down, kill-and-resume is bit-identical, outputs on disk."""

from __future__ import annotations

import json

import pytest
import torch
from tests.onestep_helpers import TINY, make_pairs

from pipeline.io.tables import read_metadata, read_table
from pipeline.models import load_model
from pipeline.pretrain import PairSource, build_model, main, pretrain, stage_config

CONFIG = {
    "steps": 6, "batch_size": 2, "crop_size": 32, "lr": 1e-3, "checkpoint_every": 2,
    "device": "cpu", "tiny": TINY, "model": {"lambda_vsd": 0.0},
    "variants": {"rank8": {"lora_rank": 8}, "base": {}},
}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("train"))


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(data):
    config = stage_config({**CONFIG, "model": {"lambda_vsd": 1.0}})
    model = build_model("onestep", config, "base", seed=0)
    params = model.pretrain_parameters()
    lq, hq = PairSource(data).batch(0, "base", 0, 2, 32, hflip=False)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for _ in range(8):
        gen = torch.Generator().manual_seed(0)  # same VSD draws each step: a fixed objective
        loss, stats = model.pretrain_loss(lq, hq, ["", ""], gen)
        losses.append(stats["l2"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.9 * losses[0]


def test_variant_overrides_settings_and_unknown_variant_fails(data):
    model = build_model("onestep", stage_config(CONFIG), "rank8", seed=0)
    assert model.adapters[0]["rank"] == 8
    with pytest.raises(KeyError, match="unknown variant 'nope'"):
        build_model("onestep", stage_config(CONFIG), "nope", seed=0)
    with pytest.raises(KeyError, match="unknown pretrain config keys"):
        stage_config({"stepz": 3})


def test_kill_and_resume_gives_identical_weights(data, tmp_path):
    config = {**CONFIG, "model": {"lambda_vsd": 1.0}}  # the VSD regulariser is checkpointed too
    whole = pretrain("onestep", "rank8", data, tmp_path / "whole", config, seed=1)
    # "killed" after 3 steps: the checkpoint of step 3 is all that is left
    assert pretrain("onestep", "rank8", data, tmp_path / "split", config, 1, max_steps=3) is None
    state = json.loads((tmp_path / "split" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and len(state["log"]) == 3
    pretrain("onestep", "rank8", data, tmp_path / "split", config, seed=1)
    assert not (tmp_path / "split" / "checkpoint").exists()
    a = (whole / "unet.safetensors").read_bytes()
    b = (tmp_path / "split" / "unet.safetensors").read_bytes()
    assert a == b
    log_whole = read_table(whole / "train_log.parquet", "pretrain_log")
    log_split = read_table(tmp_path / "split" / "train_log.parquet", "pretrain_log")
    assert log_whole["step"].tolist() == list(range(6))
    assert log_whole.equals(log_split)


def test_cli_writes_a_loadable_model_and_log_metadata(data, tmp_path):
    out = tmp_path / "models" / "onestep" / "base"
    config = {**CONFIG, "steps": 2}
    assert main(["--framework", "onestep", "--variant", "base", "--data", str(data), "--out",
                 str(out), "--config", json.dumps(config), "--seed", "0"]) == 0  # fmt: skip
    model = load_model(out)
    assert model.framework == "onestep"
    metadata = read_metadata(out / "train_log.parquet")
    assert metadata["variant"] == "base"
    assert "stand-in" in metadata["model"]["perceptual_loss"]
    terms = json.loads(read_table(out / "train_log.parquet", "pretrain_log")["terms"][0])
    assert set(terms) == {"l2", "lpips"}


def test_missing_pairs_table_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="pairs.parquet"):
        pretrain("onestep", "base", tmp_path, tmp_path / "out", CONFIG, seed=0)
