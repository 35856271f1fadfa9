"""Pretraining stage: loss goes down, kill-and-resume is bit-identical, outputs on disk."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from pipeline import checkpoints
from pipeline.io.tables import read_metadata, read_table
from pipeline.models import load_model
from pipeline.pretrain import PairSource, build_model, main, pretrain, stage_config
from tests.ddp_helpers import run_in_gloo_processes
from tests.onestep_helpers import TINY, TINY_MODEL, make_pairs

CONFIG = {
    "steps": 6,
    "batch_size": 2,
    "crop_size": 32,
    "lr": 1e-3,
    "checkpoint_every": 2,
    "device": "cpu",
    "tiny": TINY,
    "model": TINY_MODEL,
    "variants": {"rank8": {"lora_rank": 8}, "base": {}},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("train"))


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(data):
    config = stage_config({**CONFIG, "model": {**TINY_MODEL, "lambda_vsd": 1.0}}, "onestep")
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
    model = build_model("onestep", stage_config(CONFIG, "onestep"), "rank8", seed=0)
    assert model.adapters[0]["rank"] == 8
    with pytest.raises(KeyError, match="unknown variant 'nope'"):
        build_model("onestep", stage_config(CONFIG, "onestep"), "nope", seed=0)
    with pytest.raises(KeyError, match=r"unknown pretrain.onestep config keys \['stepz'\]"):
        stage_config({"stepz": 3}, "onestep")


def test_kill_and_resume_gives_identical_weights(data, tmp_path):
    config = {
        **CONFIG,
        "model": {**TINY_MODEL, "lambda_vsd": 1.0},
    }  # the VSD regulariser is checkpointed too
    whole = pretrain("onestep", "rank8", data, tmp_path / "whole", config, seed=1)
    # "killed" after 3 steps: the checkpoint of step 3 is all that is left
    assert pretrain("onestep", "rank8", data, tmp_path / "split", config, 1, max_steps=3) is None
    folder = tmp_path / "checkpoints" / "pretrain" / "split"  # the default place
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-00000002", "step-00000003"]
    state = json.loads((folder / "step-00000003" / "state.json").read_text())
    assert state["step"] == 3 and len(state["log"]) == 3
    assert state["fingerprint"]["settings"]["lr"] == 1e-3 and state["fingerprint"]["seed"] == 1
    pretrain("onestep", "rank8", data, tmp_path / "split", config, seed=1)
    assert not folder.exists()
    assert read_metadata(tmp_path / "split" / "train_log.parquet")["resumed_from"] == str(
        folder / "step-00000003"
    )
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
    assert (
        main(
            [
                "--framework",
                "onestep",
                "--variant",
                "base",
                "--data",
                str(data),
                "--out",
                str(out),
                "--config",
                json.dumps(config),
                "--seed",
                "0",
            ]
        )
        == 0
    )
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


def _weights(folder):
    model = load_model(folder)
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n}


@pytest.mark.slow
def test_two_gloo_processes_give_the_update_of_one_process(data, tmp_path):
    # the one-step loss without VSD draws no noise: each process's half of the (shared) batch
    # plus DDP's gradient average must give the whole batch's update
    config = {**CONFIG, "steps": 3, "batch_size": 4, "checkpoint_every": 2}
    single = pretrain("onestep", "rank8", data, tmp_path / "single", config, seed=1)
    run_in_gloo_processes(2, pretrain, "onestep", "rank8", data, tmp_path / "ddp", config, 1)
    assert read_metadata(tmp_path / "ddp" / "train_log.parquet")["processes"] == 2
    assert read_metadata(single / "train_log.parquet")["processes"] == 1
    log_single = read_table(single / "train_log.parquet", "pretrain_log")
    log_ddp = read_table(tmp_path / "ddp" / "train_log.parquet", "pretrain_log")
    assert log_single["loss"].iloc[-1] < log_single["loss"].iloc[0]
    # the all-reduced gradient is the whole batch's mean gradient: its norm shows a wrong
    # average (Adam's update alone would not: it is invariant to the gradient's scale)
    for column in ("loss", "grad_norm"):
        torch.testing.assert_close(
            torch.tensor(log_ddp[column].to_numpy()),
            torch.tensor(log_single[column].to_numpy()),
            rtol=1e-5,
            atol=0,
        )
    # Adam amplifies float noise from the all-reduce's summation order in near-zero gradients;
    # a different update would move weights by ~lr (1e-3) per step
    a, b = _weights(single), _weights(tmp_path / "ddp")
    assert a and set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-4)


def test_batch_must_split_evenly_over_processes(data, tmp_path, monkeypatch):
    class TwoProcesses:
        num_processes, process_index = 2, 0

    monkeypatch.setattr("pipeline.pretrain.make_accelerator", lambda device: TwoProcesses())
    with pytest.raises(
        ValueError, match="batch_size 3 must be a multiple of the processes \\(2\\)"
    ):
        pretrain("onestep", "base", data, tmp_path / "out", {**CONFIG, "batch_size": 3}, seed=0)


# -- fingerprinted checkpoints, checked steps, separate clipping (pipeline/checkpoints.py) ------
def _stale_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipeline.checkpoints"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"lr": 2e-3}, "settings.lr"),
        ({"model": {**TINY_MODEL, "lambda_l2": 2.0}}, "settings.model.lambda_l2"),
        ({"seed": 2}, "seed"),
    ],
    ids=["lr", "loss-weight", "seed"],
)
def test_a_changed_run_starts_afresh_and_keeps_the_old_checkpoints_aside(
    data, tmp_path, caplog, change, field
):
    config = {**CONFIG, "steps": 4}
    assert pretrain("onestep", "base", data, tmp_path / "out", config, 1, max_steps=2) is None
    seed = change.get("seed", 1)
    changed = {**config, **{k: v for k, v in change.items() if k != "seed"}}
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoints"):
        out = pretrain("onestep", "base", data, tmp_path / "out", changed, seed)
    stale = list((tmp_path / "checkpoints" / "pretrain").glob("out.stale-*"))
    assert len(stale) == 1 and (stale[0] / "step-00000002" / "state.json").is_file()
    lines = _stale_lines(caplog)
    assert len(lines) == 1 and field in lines[0] and "starting afresh" in lines[0]
    assert read_metadata(out / "train_log.parquet")["resumed_from"] is None
    # nothing of the old run leaks in: the result is an uninterrupted run of the new settings
    fresh = pretrain("onestep", "base", data, tmp_path / "fresh", changed, seed)
    assert (out / "unet.safetensors").read_bytes() == (fresh / "unet.safetensors").read_bytes()
    log = read_table(out / "train_log.parquet", "pretrain_log")
    assert log.equals(read_table(fresh / "train_log.parquet", "pretrain_log"))
    assert log["lr"].tolist() == [changed["lr"]] * 4


def test_a_blown_up_last_step_is_an_error_naming_it(data, tmp_path):
    # Adam moves every weight by ~lr: finite weights of 1e30 that only a forward shows
    config = {**CONFIG, "steps": 1, "lr": 1e30, "max_grad_norm": 0.0}
    with pytest.raises(FloatingPointError, match=r"after the last step \(step 0\)"):
        pretrain("onestep", "base", data, tmp_path / "out", config, seed=0)
    assert not (tmp_path / "out").exists()


def test_fewer_than_one_step_is_refused_naming_the_key(data, tmp_path):
    with pytest.raises(ValueError, match="steps"):
        pretrain("onestep", "base", data, tmp_path / "out", {**CONFIG, "steps": 0}, seed=0)
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        pretrain("onestep", "base", data, tmp_path / "out", CONFIG, seed=0, max_steps=0)
    assert not (tmp_path / "out").exists()


def test_the_loop_clips_generator_and_regulariser_as_two_groups(data, tmp_path, monkeypatch):
    seen, original = [], checkpoints.clip_gradients

    def spy(accelerator, groups, max_norm):
        seen.append((len(groups), max_norm))
        return original(accelerator, groups, max_norm)

    monkeypatch.setattr(checkpoints, "clip_gradients", spy)
    config = {**CONFIG, "steps": 1, "model": {**TINY_MODEL, "lambda_vsd": 1.0}}
    pretrain("onestep", "base", data, tmp_path / "out", config, seed=0)
    assert seen == [(2, 1.0)]


def test_cli_takes_the_shared_checkpoints_flag(data, tmp_path):
    folder = tmp_path / "elsewhere"
    assert (
        main(
            [
                "--framework",
                "onestep",
                "--variant",
                "base",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "out"),
                "--config",
                json.dumps({**CONFIG, "steps": 3}),
                "--checkpoints",
                str(folder),
                "--max-steps",
                "1",
            ]
        )
        == 0
    )
    assert [p.name for p in folder.glob("step-*")] == ["step-00000001"]
