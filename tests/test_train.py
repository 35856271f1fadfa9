"""pipeline.train: shared forwards vs a per-instance loop, one step, DDP, resume, NaN, outputs."""

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import train as T
from pipeline.bench.train_step import instance_loop_loss
from pipeline.io.images import write_png
from pipeline.io.masks import write_label_maps
from pipeline.io.tables import read_metadata, read_table, write_table
from pipeline.models import build_tiny_model, load_model
from pipeline.training import offline
from pipeline.training.config import TrainConfig
from pipeline.training.items import ItemLoader, preference_items
from pipeline.training.run import configure_model, step_slots
from pipeline.training.step import (
    PolicyErrors,
    backward_one_candidate_at_a_time,
    batch_loss,
    draw_conditions,
    error_map_gradients,
    uses_two_pass,
)
from tests.data_helpers import write_data_table
from tests.ddp_helpers import run_in_gloo_processes
from tests.resume_helpers import assert_resume_kept_the_metadata

SETTINGS = ("s20_c4.5", "s20_c10.5", "s80_c4.5", "s80_c10.5")
IMAGES = ("img_a", "img_b", "img_c", "img_d")
SIZE = 16


def kill_at_step_three(monkeypatch):
    """Make ``train`` raise KeyboardInterrupt while it draws step 3's batch (a killed job);
    returns the real ``step_slots`` to restore."""
    original = step_slots

    def killed_at_step_three(n_items, step, batch_size, seed):
        if step == 2:
            raise KeyboardInterrupt("killed")
        return original(n_items, step, batch_size, seed)

    monkeypatch.setattr(offline, "step_slots", killed_at_step_three)
    return original


def tiny_model(framework: str = "multistep"):
    """The real model family at its smallest (multi-step: ControlNet + UNet, residual pixel codec)."""
    if framework == "onestep":
        return build_tiny_model("onestep", seed=0)
    return build_tiny_model(framework, block_out_channels=(8, 16), seed=0)


@pytest.fixture
def inputs(tmp_path: Path) -> dict:
    """Four LQs (4 px, x4), four candidates each (16 px), a 3-instance partition per image,
    instance pairs whose winners/losers vary by instance, and one image-level pair per image."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data" / "train"
    candidate_rows, pair_rows, label_maps = [], [], {}
    for n, image_id in enumerate(IMAGES):
        write_png(data / "lq" / f"{image_id}.png", rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        for setting in SETTINGS:
            path = Path(setting) / f"{image_id}.png"
            write_png(
                tmp_path / "candidates" / path,
                rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
            )
            candidate_rows.append(
                {
                    "image_id": image_id,
                    "setting": setting,
                    "variant": "base",
                    "steps": 20,
                    "cfg": 4.5,
                    "seed": 0,
                    "negative_prompt": "",
                    "path": str(path),
                }
            )
        labels = np.full((SIZE, SIZE), 3, dtype=np.uint16)
        labels[: 6 + n, :10] = 1
        labels[10:, 4:] = 2
        label_maps[image_id] = labels
        areas = {i: float((labels == i).sum()) / labels.size for i in (1, 2, 3)}
        wins = [(0, 1), (2, 0), (3, 1)] if n % 2 == 0 else [(1, 2), (1, 3), (0, 2)]
        for instance_id, (win, lose) in zip((1, 2, 3), wins, strict=True):
            pair_rows.append(
                {
                    "image_id": image_id,
                    "instance_id": instance_id,
                    "weight": areas[instance_id],
                    "winner": SETTINGS[win],
                    "loser": SETTINGS[lose],
                    "margin": 0.5,
                    "negative_prompt": "a horse" if (n, instance_id) == (1, 2) else "",
                    "source": "iqa",
                }
            )
        pair_rows.append(
            {
                "image_id": image_id,
                "instance_id": -1,
                "weight": 1.0,
                "winner": SETTINGS[n % 4],
                "loser": SETTINGS[(n + 2) % 4],
                "margin": 1.0,
                "negative_prompt": "",
                "source": "iqa",
            }
        )
    write_table(
        pd.DataFrame(candidate_rows), tmp_path / "candidates" / "candidates.parquet", "candidates"
    )
    write_table(pd.DataFrame(pair_rows), tmp_path / "pairs.parquet", "preference_pairs")
    write_label_maps(tmp_path / "masks.zarr", label_maps, {"backend": "test"})
    write_data_table(data, IMAGES)
    return {
        "framework": "multistep",
        "objective": "united",
        "pairs_path": tmp_path / "pairs.parquet",
        "candidates_path": tmp_path / "candidates" / "candidates.parquet",
        "data_dir": data,
        "masks_path": tmp_path / "masks.zarr",
        "model_dir": "in-memory tiny model",
    }


def _loader(inputs: dict) -> ItemLoader:
    return ItemLoader(
        read_table(inputs["candidates_path"], "candidates"),
        inputs["candidates_path"],
        inputs["data_dir"],
        inputs["masks_path"],
    )


def _batch(inputs: dict, method: str, model, config: TrainConfig, step: int = 0):
    items = preference_items(read_table(inputs["pairs_path"], "preference_pairs"), method)
    loader = _loader(inputs)
    loaded = [loader.load(item) for item in items]
    conditions = [draw_conditions(model, e, config, 7, step, s) for s, e in enumerate(loaded)]
    return loaded, conditions


def test_preference_items_group_instances_and_image_level_pairs(inputs):
    pairs = read_table(inputs["pairs_path"], "preference_pairs")
    dspo = preference_items(pairs, "dspo")
    first = dspo[0]
    assert first.image_id == "img_a" and first.instance_ids == (1, 2, 3)
    assert first.candidates == tuple(sorted({SETTINGS[i] for i in (0, 1, 2, 3)}))
    names = [
        (first.candidates[w], first.candidates[o])
        for w, o in zip(first.winners, first.losers, strict=True)
    ]
    assert names == [
        (SETTINGS[0], SETTINGS[1]),
        (SETTINGS[2], SETTINGS[0]),
        (SETTINGS[3], SETTINGS[1]),
    ]
    assert dspo[1].negative_prompt == "a horse" and first.negative_prompt == ""
    dpo = preference_items(pairs, "dpo")
    assert dpo[1].instance_ids == (-1,) and dpo[1].candidates == tuple(
        sorted((SETTINGS[1], SETTINGS[3]))
    )
    sft = preference_items(pairs, "sft")
    # SFT has winners only: no loser, no reference
    assert sft[2].candidates == (SETTINGS[2],) and sft[2].winners == (0,) and sft[2].losers == ()
    with pytest.raises(ValueError, match="image-level"):
        preference_items(pairs[pairs["instance_id"] >= 0], "dpo")


def test_loaded_masks_are_the_label_map_instances(inputs):
    pairs = read_table(inputs["pairs_path"], "preference_pairs")
    loaded = _loader(inputs).load(preference_items(pairs, "dspo")[0])
    assert loaded.lq.shape == (3, SIZE, SIZE) and loaded.targets.shape == (4, 3, SIZE, SIZE)
    assert loaded.masks.shape == (3, SIZE, SIZE)
    assert int(loaded.masks[0].sum()) == 6 * 10 and bool(loaded.masks.sum(0).eq(1).all())


@pytest.mark.parametrize(
    ("framework", "method"),
    [("multistep", m) for m in ("dspo", "dro", "dpo", "sft")] + [("onestep", "dspo")],
)
def test_shared_forwards_equal_a_per_instance_loop(inputs, framework, method):
    model = tiny_model(framework)
    config = TrainConfig(beta=500.0, uncond_drop_rate=0.5)  # beta keeps the sigmoid off saturation
    params = model.trainable_parameters()
    loaded, conditions = _batch(inputs, method, model, config)
    shared, _ = batch_loss(PolicyErrors(model), model, loaded, conditions, method, config)
    naive = instance_loop_loss(model, loaded, conditions, method, config)
    torch.testing.assert_close(shared, naive, rtol=1e-5, atol=1e-7)
    grads_shared = torch.autograd.grad(shared, params, allow_unused=True)
    grads_naive = torch.autograd.grad(naive, params, allow_unused=True)
    pairs = [(a, b) for a, b in zip(grads_shared, grads_naive, strict=True) if a is not None]
    assert len(pairs) == sum(b is not None for b in grads_naive) and pairs
    # float32 batched vs unbatched convolutions: compare at 1e-5 of the gradient's scale
    flat_a = torch.cat([a.flatten() for a, _ in pairs])
    flat_b = torch.cat([b.flatten() for _, b in pairs])
    assert flat_b.norm() > 0
    assert (flat_a - flat_b).norm() <= 1e-5 * flat_b.norm()
    torch.testing.assert_close(flat_a, flat_b, rtol=0, atol=1e-5 * flat_b.abs().max().item())


def test_one_optimizer_step_lowers_the_winners_error_relative_to_the_losers(inputs):
    model = tiny_model()
    config = TrainConfig(uncond_drop_rate=0.0)
    loaded, conditions = _batch(inputs, "dspo", model, config)
    policy = PolicyErrors(model)

    def relative_error() -> float:  # weighted mean over LQs of E_theta(w) - E_theta(l)
        with torch.no_grad():
            _, stats = batch_loss(policy, model, loaded, conditions, "dspo", config)
        return stats["err_theta_winner"] - stats["err_theta_loser"]

    before = relative_error()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    loss, _ = batch_loss(policy, model, loaded, conditions, "dspo", config)
    loss.backward()
    optimizer.step()
    assert relative_error() < before


def _run(inputs, out: Path, config: dict, method: str = "dspo", **kwargs) -> Path:
    return T.train(
        **inputs, method=method, out_dir=out, config=config, seed=3, model=tiny_model(), **kwargs
    )


def _trained_weights(folder: Path) -> dict[str, torch.Tensor]:
    model = load_model(folder)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


BASE = {
    "max_steps": 4,
    "batch_size": 2,
    "checkpoint_every": 2,
    "learning_rate": 1e-3,
    "uncond_drop_rate": 0.5,
}


def test_train_writes_model_and_log_and_resumes_bit_for_bit(inputs, tmp_path, monkeypatch):
    full = _run(inputs, tmp_path / "full", BASE)
    log = read_table(full / "train_log.parquet", "train_log")
    assert log["step"].tolist() == [1, 2, 3, 4]
    assert np.isfinite(log[["loss", "grad_norm", "err_ref_winner"]].to_numpy()).all()
    assert log["loss"].iloc[0] == pytest.approx(np.log(2.0), rel=1e-4)  # step 1: policy = reference
    meta = read_metadata(full / "train_log.parquet")
    assert meta["method"] == "dspo" and meta["config"]["beta"] == 8000.0 and meta["processes"] == 1
    assert not (tmp_path / "checkpoints" / "train" / "full").exists()  # the default place

    # kill the second run while it draws step 3's batch: the step-2 checkpoint survives
    original = kill_at_step_three(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _run(inputs, tmp_path / "resumed", BASE)
    folder = tmp_path / "checkpoints" / "train" / "resumed"
    assert [p.name for p in folder.glob("step-*")] == ["step-00000002"]
    assert not (tmp_path / "resumed").exists()
    monkeypatch.setattr(offline, "step_slots", original)
    resumed = _run(inputs, tmp_path / "resumed", BASE)
    pd.testing.assert_frame_equal(read_table(resumed / "train_log.parquet", "train_log"), log)
    a, b = _trained_weights(full), _trained_weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert read_metadata(resumed / "train_log.parquet")["resumed_from"].endswith("step-00000002")
    assert_resume_kept_the_metadata(full, resumed)


@pytest.mark.parametrize("change", ["beta", "swapped-pairs", "base-weights"])
def test_a_changed_run_starts_afresh_and_keeps_the_old_checkpoints_aside(
    inputs, tmp_path, monkeypatch, caplog, change
):
    tiny_model().save_pretrained(tmp_path / "pretrained")
    inputs = {**inputs, "model_dir": tmp_path / "pretrained"}

    def run(out: Path, config: dict) -> Path:
        return T.train(**inputs, method="dspo", out_dir=out, config=config, seed=3)

    original = kill_at_step_three(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "out", BASE)
    monkeypatch.setattr(offline, "step_slots", original)
    config, field = BASE, None
    if change == "beta":
        config, field = {**BASE, "beta": 100.0}, "settings.beta"
    elif change == "swapped-pairs":  # winners and losers swapped, same path, same item count
        pairs = read_table(inputs["pairs_path"], "preference_pairs")
        swapped = pairs.assign(winner=pairs["loser"], loser=pairs["winner"])
        write_table(swapped, inputs["pairs_path"], "preference_pairs")
        field = "inputs.pairs"
    else:  # other base weights in the same model folder
        build_tiny_model("multistep", block_out_channels=(8, 16), seed=1).save_pretrained(
            tmp_path / "pretrained"
        )
        field = "weights."
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoints"):
        out = run(tmp_path / "out", config)
    stale = list((tmp_path / "checkpoints" / "train").glob("out.stale-*"))
    assert len(stale) == 1 and (stale[0] / "step-00000002" / "state.json").is_file()
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.checkpoints"]
    assert len(lines) == 1 and field in lines[0] and "starting afresh" in lines[0]
    assert read_metadata(out / "train_log.parquet")["resumed_from"] is None
    # nothing of the old run leaks in: the result is an uninterrupted run of the new inputs
    fresh = run(tmp_path / "fresh", config)
    pd.testing.assert_frame_equal(
        read_table(out / "train_log.parquet", "train_log"),
        read_table(fresh / "train_log.parquet", "train_log"),
    )
    a, b = _trained_weights(out), _trained_weights(fresh)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_blown_up_last_step_is_an_error_naming_it(inputs, tmp_path):
    # Adam moves every weight by ~lr: finite weights of 1e30 that only a forward shows
    config = {**BASE, "max_steps": 1, "learning_rate": 1e30, "max_grad_norm": 0.0}
    with pytest.raises(FloatingPointError, match=r"after the last step \(step 1\)"):
        _run(inputs, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


def test_fewer_than_one_step_is_refused_naming_the_key(inputs, tmp_path):
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig.from_dict({"max_steps": 0})
    with pytest.raises(ValueError, match="train.max_steps must be >= 1"):
        TrainConfig(max_steps=0, batch_size=2)


def test_non_finite_loss_names_the_step_and_keeps_the_last_checkpoint(inputs, tmp_path):
    # Adam's first update moves every weight by ~lr: finite weights of 1e30 overflow the next forward
    config = {**BASE, "learning_rate": 1e30, "max_grad_norm": 0.0, "checkpoint_every": 1}
    with pytest.raises(FloatingPointError, match=r"loss at step 2 .*step-00000001"):
        _run(inputs, tmp_path / "out", config)
    folder = tmp_path / "checkpoints" / "train" / "out"
    assert [p.name for p in folder.glob("step-*")] == ["step-00000001"]
    assert not (tmp_path / "out").exists()
    # weights that overflow in the update itself are caught at once: no checkpoint holds them
    with pytest.raises(FloatingPointError, match=r"non-finite weights after step 1; .* none"):
        _run(inputs, tmp_path / "inf", {**config, "learning_rate": 1e37})
    assert not (tmp_path / "checkpoints" / "train" / "inf").exists()


def test_config_errors_name_the_key(inputs, tmp_path):
    with pytest.raises(ValueError, match="unknown train config keys"):
        TrainConfig.from_dict({"betta": 1.0})
    with pytest.raises(ValueError, match="multiple of processes"):
        _run(inputs, tmp_path / "out", {**BASE, "batch_size": 3, "gradient_accumulation_steps": 2})


def test_cli_trains_a_saved_model(inputs, tmp_path):
    tiny_model().save_pretrained(tmp_path / "pretrained")
    out = tmp_path / "aligned"
    args = [
        "--framework",
        "multistep",
        "--method",
        "dpo",
        "--objective",
        "united",
        "--pairs",
        str(inputs["pairs_path"]),
        "--candidates",
        str(inputs["candidates_path"]),
        "--data",
        str(inputs["data_dir"]),
        "--masks",
        str(inputs["masks_path"]),
        "--model",
        str(tmp_path / "pretrained"),
        "--out",
        str(out),
        "--config",
        json.dumps({"max_steps": 1, "batch_size": 2}),
        "--seed",
        "1",
    ]
    assert T.main(args) == 0
    assert read_table(out / "train_log.parquet", "train_log")["step"].tolist() == [1]
    assert (out / "dspo_model.json").is_file()


# -- two gloo processes ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("memory", ["one_pass", "two_pass"])
def test_two_gloo_processes_give_the_update_of_one_process(inputs, tmp_path, memory):
    # The all-reduce sums gradients in another order than one process does (float32 noise).
    # beta 100 and Adam eps 1 (update ~ lr * g, not lr * sign(g) for near-zero g) keep that
    # noise from being amplified, so a real difference in the update would still show.
    # two_pass: several backward passes per micro-step, all-reduced once (no_sync until the last)
    config = {
        **BASE,
        "max_steps": 2,
        "batch_size": 4,
        "checkpoint_every": 10,
        "beta": 100.0,
        "adam_epsilon": 1.0,
        "learning_rate": 1e-2,
        "gradient_accumulation_steps": 2,
    }
    single = _run(inputs, tmp_path / "single", {**config, "memory": "one_pass"})
    run_in_gloo_processes(2, _run, inputs, tmp_path / "ddp", {**config, "memory": memory})
    assert read_metadata(tmp_path / "ddp" / "train_log.parquet")["processes"] == 2
    log_single = read_table(single / "train_log.parquet", "train_log")
    log_ddp = read_table(tmp_path / "ddp" / "train_log.parquet", "train_log")
    pd.testing.assert_frame_equal(log_single, log_ddp, rtol=1e-5)
    a, b = _trained_weights(single), _trained_weights(tmp_path / "ddp")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_switch_keeps_loss_and_gradients(inputs):
    losses_and_grads = []
    for checkpointing in (False, True):
        model = tiny_model()
        config = TrainConfig(gradient_checkpointing=checkpointing)
        params = configure_model(model, config)
        assert model.unet.is_gradient_checkpointing == checkpointing
        loaded, conditions = _batch(inputs, "dspo", model, config)
        loss, _ = batch_loss(PolicyErrors(model), model, loaded, conditions, "dspo", config)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        losses_and_grads.append((loss, torch.cat([g.flatten() for g in grads if g is not None])))
    (loss_a, grad_a), (loss_b, grad_b) = losses_and_grads
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(grad_a, grad_b)


def _gradient(model, params, inputs, method, config, two_pass: bool) -> torch.Tensor:
    for p in params:
        p.grad = None
    loaded, conditions = _batch(inputs, method, model, config)
    loaded = [dataclasses.replace(e, lq=e.lq.double(), targets=e.targets.double()) for e in loaded]
    conditions = [dataclasses.replace(c, noise=c.noise.double()) for c in conditions]
    if two_pass:
        loss, _, maps_grad = error_map_gradients(model, loaded, conditions, method, config, 0.5)
        backward_one_candidate_at_a_time(
            PolicyErrors(model), loaded, conditions, maps_grad, lambda t: t.backward()
        )
    else:
        loss, _ = batch_loss(PolicyErrors(model), model, loaded, conditions, method, config)
        (loss * 0.5).backward()
    return torch.cat([p.grad.flatten() for p in params if p.grad is not None])


@pytest.mark.parametrize(
    ("framework", "method", "checkpointing"),
    [
        ("multistep", "dspo", False),
        ("multistep", "dspo", True),
        ("multistep", "dpo", False),
        ("multistep", "dro", False),
        ("multistep", "sft", False),
        ("onestep", "dspo", False),
    ],
)
def test_two_pass_gradient_equals_one_pass(inputs, framework, method, checkpointing):
    """train.memory two_pass: pass 1 differentiates the loss w.r.t. the error maps, pass 2
    back-propagates one candidate at a time; in float64 the gradient is the one-pass gradient."""
    model = tiny_model(framework).double()
    config = TrainConfig(gradient_checkpointing=checkpointing and framework == "multistep")
    params = configure_model(model, config)
    one = _gradient(model, params, inputs, method, config, two_pass=False)
    two = _gradient(model, params, inputs, method, config, two_pass=True)
    assert one.abs().max() > 0
    # relative to the gradient's norm: single elements that cancel (a sum of terms of ~1e3
    # giving ~1) differ by float64 rounding of the other summation order
    assert float((two - one).norm() / one.norm()) < 1e-6


def test_memory_setting_chooses_the_pass(inputs):
    model = tiny_model()
    loaded, _ = _batch(inputs, "dspo", model, TrainConfig())
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not uses_two_pass(TrainConfig(), loaded, cpu)  # auto: one pass on the CPU
    assert uses_two_pass(TrainConfig(), loaded, cuda)  # auto: 4 distinct candidates on CUDA
    assert uses_two_pass(TrainConfig(memory="two_pass"), loaded, cpu)
    assert not uses_two_pass(TrainConfig(memory="one_pass"), loaded, cuda)


def test_two_pass_training_matches_one_pass_training(inputs, tmp_path, monkeypatch):
    """The whole stage with memory two_pass trains to the one-pass weights (float32; as in the
    gloo test, beta 100 and Adam eps 1 keep float32 summation noise from being amplified)."""
    config = {
        **BASE,
        "max_steps": 2,
        "batch_size": 2,
        "beta": 100.0,
        "adam_epsilon": 1.0,
        "learning_rate": 1e-2,
    }
    passes = []
    second_pass = backward_one_candidate_at_a_time
    monkeypatch.setattr(
        offline,
        "backward_one_candidate_at_a_time",
        lambda *a, **k: passes.append(1) or second_pass(*a, **k),
    )
    one = _run(inputs, tmp_path / "one", {**config, "memory": "one_pass"})
    assert passes == []
    two = _run(inputs, tmp_path / "two", {**config, "memory": "two_pass"})
    assert len(passes) == 2  # one second pass per step
    a, b = _trained_weights(one), _trained_weights(two)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)
    log_one = read_table(one / "train_log.parquet", "train_log")
    log_two = read_table(two / "train_log.parquet", "train_log")
    pd.testing.assert_frame_equal(log_one, log_two, rtol=1e-5)
