"""pipeline.training.ddpo: DDPO (multi-step) and the one-step Gaussian policy inside the train job.

Rewards are the score registry's numbers normalised as select normalises, advantages are
z-scored per LQ, a PPO step lowers the surrogate on a fixed reward, settings change what
training does, and a killed run resumes bit for bit (tracker state in the checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import checkpoints, contracts, settings
from pipeline import policy as online
from pipeline import train as T
from pipeline.io.images import write_png
from pipeline.io.tables import read_metadata, read_table
from pipeline.iqa import score_images
from pipeline.models import build_tiny_model, load_model
from pipeline.select import objective_scores
from pipeline.training import ddpo
from pipeline.training.config import TrainConfig
from tests.data_helpers import write_data_table

IMAGES = ("img_a", "img_b", "img_c")
SIZE = 16
REWARD = {
    "score": {"metrics": ["psnr", "ssim"], "weights_dir": None, "weights": {}, "options": {},
              "device": "cpu", "min_crop_size": 8},
    "objectives": {"fidelity": {"psnr": 1.0, "ssim": 0.5}},
}  # fmt: skip
BASE = {
    "max_steps": 4,
    "batch_size": 2,
    "checkpoint_every": 2,
    "learning_rate": 1e-3,
    "policy_steps": 2,
    "policy_group_size": 3,
    "policy_cfg": 1.0,
    "stat_tracker_buffer_size": 3,
    "stat_tracker_min_count": 3,
    "ppo_clip_range": 0.2,
    "device": "cpu",
    "reward": REWARD,
}


def tiny(framework: str = "multistep"):
    if framework == "onestep":
        return build_tiny_model("onestep", seed=0)
    return build_tiny_model("multistep", block_out_channels=(8, 16), seed=0)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "data" / "train"
    for image_id in IMAGES:
        write_png(
            folder / "lq" / f"{image_id}.png", rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        )
        write_png(
            folder / "hq" / f"{image_id}.png", rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        )
    write_data_table(folder, IMAGES)
    return folder


def run(data: Path, out: Path, config: dict, framework: str = "multistep", **kwargs) -> Path:
    return T.train(
        framework=framework, method="ddpo", objective="fidelity", pairs_path=None,
        candidates_path=None, data_dir=data, masks_path=None, model_dir="in-memory tiny model",
        out_dir=out, config=config, seed=3, model=tiny(framework), **kwargs,
    )  # fmt: skip


def trained(folder: Path) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in load_model(folder).named_parameters()}


def test_ddpo_is_a_method_without_pairs_and_its_settings_carry_the_reward():
    method = contracts.method("ddpo")
    assert (method.loss, method.pair_level, method.loop, method.needs_reference) == (
        "ppo",
        contracts.NO_PAIRS,
        "ddpo",
        False,
    )
    assert contracts.pairs_artifact("multistep", "fidelity", "ddpo") is None
    config = {"score": {"metrics": ["psnr", "ssim", "gmsd"]},
              "select": {"objectives": {"fidelity": {"psnr": 1.0, "gmsd": 2.0}}}}  # fmt: skip
    job = settings.job_settings(config, "train", method="ddpo", objective="fidelity")
    assert job["reward"]["objectives"] == {"fidelity": {"psnr": 1.0, "gmsd": 2.0}}
    assert job["reward"]["score"]["metrics"] == ["psnr", "ssim", "gmsd"]
    assert "reward" not in settings.job_settings(config, "train", method="dspo")
    assert job["policy_group_size"] == 6 and job["ppo_clip_range"] == 1e-4  # paper defaults


def test_rewards_are_the_score_registrys_numbers_normalised_as_select():
    reward = ddpo.Reward(REWARD, "fidelity", seed=0)
    torch.manual_seed(0)
    images = torch.rand(3, 3, SIZE, SIZE) * 2 - 1
    hq = torch.rand(3, SIZE, SIZE)
    scores = reward.raw_scores(images, hq)
    # what the score stage computes on the PNGs the images would be written as
    unit = torch.round((images.clamp(-1, 1) + 1) * 127.5) / 255
    expected = score_images(["psnr", "ssim"], unit, hq[None].expand(3, -1, -1, -1), reward.registry)
    for name in ("psnr", "ssim"):
        assert torch.equal(scores[name], expected[name])
    rewards = reward.objective("x", scores)
    rows = [("x", -1, f"c{k}", m, float(scores[m][k]), False) for m in scores for k in range(3)]
    frame = pd.DataFrame(
        rows, columns=["image_id", "instance_id", "candidate", "metric", "value", "lower_better"]
    )
    select = objective_scores(frame, {"psnr": 1.0, "ssim": 0.5})["score"].to_numpy()
    np.testing.assert_array_equal(rewards, select)
    assert rewards.max() > rewards.min() and rewards.max() <= 1.5


def test_advantages_have_zero_mean_per_lq_and_a_step_lowers_the_ppo_loss(data):
    model = tiny()
    config = TrainConfig.from_dict({k: v for k, v in BASE.items() if k != "reward"})
    trainer_parts = dict(config=config, seed=3, model=model)
    reward = ddpo.Reward(REWARD, "fidelity", seed=3)
    from pipeline.distributed import make_accelerator
    from pipeline.training.run import configure_model

    accelerator = make_accelerator("cpu", "no")
    trainable = configure_model(model, config)
    optimizer = accelerator.prepare(torch.optim.AdamW(trainable, lr=1e-3))
    tracker = online.PerLQStatTracker(3, 3)
    trainer = ddpo.Trainer(
        **trainer_parts, accelerator=accelerator, optimizer=optimizer, trainable=trainable,
        reward=reward, tracker=tracker, image_ids=list(IMAGES),
        lq_paths={i: data / "lq" / f"{i}.png" for i in IMAGES},
        hq_paths={i: data / "hq" / f"{i}.png" for i in IMAGES}, texts=None,
    )  # fmt: skip
    groups = [trainer.sample_group(0, p, image_id) for p, image_id in enumerate(IMAGES[:2])]
    ids = [g.image_id for g in groups for _ in g.rewards]
    advantages = tracker.update(ids, np.concatenate([g.rewards for g in groups]))
    for image_id in IMAGES[:2]:
        where = np.asarray(ids) == image_id
        assert abs(advantages[where].mean()) < 1e-9  # each LQ's buffer holds exactly its group

    # a fixed reward: the surrogate of the same samples falls after one update on it
    group = groups[0]
    fixed = torch.tensor([1.0, -1.0, 0.5])
    last = group.sample.log_probs.shape[1] - 1
    index = torch.full((3,), last)

    def surrogate() -> torch.Tensor:
        log_prob = ddpo.policy_log_probs(model, group.lq, group.sample, index, group.prompts,
                                         group.negatives, config)  # fmt: skip
        return online.ppo_clipped_loss(log_prob, group.sample.log_probs[:, last], fixed, 10.0)[0]

    before = surrogate()
    assert before.item() == pytest.approx(-fixed.mean().item(), abs=1e-5)  # ratio 1 at first
    before.backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        after = surrogate()
    assert after.item() < before.item() - 1e-3


def test_ddpo_trains_logs_and_resumes_bit_for_bit(data, tmp_path, monkeypatch):
    full = run(data, tmp_path / "full", BASE)
    log = read_table(full / "train_log.parquet", "ddpo_log")
    assert log["step"].tolist() == [1, 2, 3, 4]
    assert (
        np.isfinite(log[["loss", "reward_mean", "approx_kl", "clipfrac", "grad_norm"]]).all().all()
    )
    assert set(json.loads(log["scores"][0])) == {"psnr", "ssim"}
    meta = read_metadata(full / "train_log.parquet")
    assert meta["table"] == "ddpo_log" and meta["policy"]["name"] == "DDPO (multi-step DDIM policy)"
    assert meta["config"]["reward"] == REWARD and meta["loss"] == "ppo"
    assert "ddpo" in load_model(full).describe()["weights"]

    original = ddpo.step_slots

    def killed(n_items, step, batch_size, seed):
        if step == 2:
            raise KeyboardInterrupt("killed")
        return original(n_items, step, batch_size, seed)

    monkeypatch.setattr(ddpo, "step_slots", killed)
    with pytest.raises(KeyboardInterrupt):
        run(data, tmp_path / "resumed", BASE)
    folder = tmp_path / "checkpoints" / "train" / "resumed"
    assert [p.name for p in folder.glob("step-*")] == ["step-00000002"]
    extra = checkpoints.load_extra(folder / "step-00000002")
    assert sum(len(v) for v in extra["tracker"]["stats"].values()) > 0
    monkeypatch.setattr(ddpo, "step_slots", original)
    resumed = run(data, tmp_path / "resumed", BASE)
    pd.testing.assert_frame_equal(read_table(resumed / "train_log.parquet", "ddpo_log"), log)
    a, b = trained(full), trained(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert read_metadata(resumed / "train_log.parquet")["resumed_from"].endswith("step-00000002")


@pytest.mark.parametrize(
    "change",
    [{"ppo_clip_range": 1e-4}, {"policy_group_size": 2}, {"policy_eta": 0.5},
     {"ppo_timestep_fraction": 0.5}],
)  # fmt: skip
def test_a_changed_setting_changes_what_training_does(data, tmp_path, change):
    # two inner epochs: the second pass has ratios != 1, where the clip range binds
    config = {**BASE, "max_steps": 2, "checkpoint_every": 2, "ppo_inner_epochs": 2}
    base = read_table(run(data, tmp_path / "a", config) / "train_log.parquet", "ddpo_log")
    other = read_table(
        run(data, tmp_path / "b", {**config, **change}) / "train_log.parquet", "ddpo_log"
    )
    columns = ["loss", "reward_mean", "clipfrac", "approx_kl"]
    assert not base[columns].equals(other[columns])
    a, b = trained(tmp_path / "a"), trained(tmp_path / "b")
    assert not all(torch.equal(a[n], b[n]) for n in a)


def test_the_one_step_gaussian_policy_runs_and_is_named_so(data, tmp_path):
    out = run(data, tmp_path / "one", {**BASE, "max_steps": 2}, framework="onestep")
    log = read_table(out / "train_log.parquet", "ddpo_log")
    assert log["step"].tolist() == [1, 2] and np.isfinite(log["loss"]).all()
    meta = read_metadata(out / "train_log.parquet")
    assert meta["policy"]["name"] == "one-step Gaussian policy"
    assert "DDPO" not in meta["policy"]["name"]
    assert "one-step Gaussian policy" in load_model(out).describe()["weights"]


def test_a_reward_objective_the_score_section_cannot_score_is_refused():
    bad = {**REWARD, "objectives": {"fidelity": {"lpips": 1.0}}}
    with pytest.raises(ValueError, match="lpips"):
        ddpo.Reward(bad, "fidelity", seed=0)
    with pytest.raises(ValueError, match="perception"):
        ddpo.Reward(REWARD, "perception", seed=0)


def test_checkpoint_extra_round_trips(tmp_path):
    parameter = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([parameter])
    fingerprint = checkpoints.Fingerprint({"a": 1})
    path = checkpoints.save(tmp_path, 1, {"p": parameter}, optimizer, [], fingerprint,
                            extra={"tracker": {"stats": {"x": [0.1, 1 / 3]}}})  # fmt: skip
    assert checkpoints.load_extra(path) == {"tracker": {"stats": {"x": [0.1, 1 / 3]}}}
    plain = checkpoints.save(tmp_path / "b", 1, {"p": parameter}, optimizer, [], fingerprint)
    assert checkpoints.load_extra(plain) is None
