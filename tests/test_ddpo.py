"""pipeline.training.ddpo: DDPO (multi-step) and the one-step Gaussian policy inside the train job.

Rewards are the score registry's numbers normalised as select normalises, advantages are
z-scored per LQ, a PPO step lowers the surrogate on a fixed reward, at ratio 1 the default clip
gives the plain policy gradient, settings change what training does, a killed run resumes bit
for bit (tracker state in the checkpoint), two gloo processes train what one does, and on a toy
reward (the output's mean brightness, either sign) a few dozen steps of the one-step Gaussian
policy move the reward far beyond its seed-to-seed spread.
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
from pipeline.io.images import read_rgb, signed_tensor, signed_to_uint8, unit_tensor, write_png
from pipeline.io.tables import read_metadata, read_table
from pipeline.iqa import score_images
from pipeline.models import build_tiny_model, load_model
from pipeline.models.base import upsample_lq
from pipeline.seeding import torch_generator
from pipeline.select import objective_scores
from pipeline.training import ddpo
from pipeline.training.config import TrainConfig
from tests.data_helpers import write_data_table
from tests.ddp_helpers import run_in_gloo_processes
from tests.resume_helpers import assert_resume_kept_the_metadata

IMAGES = ("img_a", "img_b", "img_c")
SIZE = 16
REWARD = {
    "score": {
        "metrics": ["psnr", "ssim"],
        "weights_dir": None,
        "weights": {},
        "options": {},
        "device": "cpu",
        "min_crop_size": 8,
    },
    "objectives": {"fidelity": {"psnr": 1.0, "ssim": 0.5}},
}
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
        framework=framework,
        method="ddpo",
        objective="fidelity",
        pairs_path=None,
        candidates_path=None,
        data_dir=data,
        masks_path=None,
        model_dir="in-memory tiny model",
        out_dir=out,
        config=config,
        seed=3,
        model=tiny(framework),
        **kwargs,
    )


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
    config = {
        "score": {"metrics": ["psnr", "ssim", "gmsd"]},
        "select": {"objectives": {"fidelity": {"psnr": 1.0, "gmsd": 2.0}}},
    }
    job = settings.job_settings(config, "train", method="ddpo", objective="fidelity")
    assert job["reward"]["objectives"] == {"fidelity": {"psnr": 1.0, "gmsd": 2.0}}
    assert job["reward"]["score"]["metrics"] == ["psnr", "ssim", "gmsd"]
    assert "reward" not in settings.job_settings(config, "train", method="dspo")
    assert job["policy_group_size"] == 6 and job["ppo_clip_range"] == 1e-4  # paper defaults


def test_rewards_are_the_score_stages_numbers_normalised_as_select(tmp_path):
    """The raw scores are the score stage's whole-image rows of the PNGs the samples would be
    written as (pipeline.score.score_image itself), also for a metric whose minimum input
    exceeds the image (ms_ssim needs 256 px; pyiqa alone refuses 16 px); the rewards are
    select's objective scores of those numbers."""
    from pipeline import score

    reward = ddpo.Reward(REWARD, "fidelity", seed=0)
    torch.manual_seed(0)
    images = torch.rand(3, 3, SIZE, SIZE) * 2 - 1
    hq = torch.round(torch.rand(3, SIZE, SIZE) * 255) / 255
    write_png(tmp_path / "hq.png", signed_to_uint8(hq * 2 - 1))
    files = {f"c{k}": tmp_path / f"c{k}.png" for k in range(3)}
    for k, path in enumerate(files.values()):
        write_png(path, signed_to_uint8(images[k]))
    metrics = ["psnr", "ssim", "ms_ssim"]
    labels = np.ones((SIZE, SIZE), dtype=np.uint16)
    stage = score.score_image(
        reward.registry, metrics, "x", files, tmp_path / "hq.png", labels, [1]
    )
    stage = stage[stage["instance_id"] == contracts.WHOLE_IMAGE_ID]
    reward.metrics = metrics
    scores = reward.raw_scores(images, hq)
    for name in metrics:
        expected = stage[stage["metric"] == name].sort_values("candidate")["value"].to_numpy()
        np.testing.assert_array_equal(scores[name].numpy(), expected)
    with pytest.raises(RuntimeError):  # what calling pyiqa on the whole image would do
        score_images(
            ["ms_ssim"], images.add(1).div(2), hq[None].expand(3, -1, -1, -1), reward.registry
        )
    reward.metrics = ["psnr", "ssim"]
    scores = {name: scores[name] for name in reward.metrics}
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
        **trainer_parts,
        accelerator=accelerator,
        optimizer=optimizer,
        trainable=trainable,
        reward=reward,
        tracker=tracker,
        image_ids=list(IMAGES),
        lq_paths={i: data / "lq" / f"{i}.png" for i in IMAGES},
        hq_paths={i: data / "hq" / f"{i}.png" for i in IMAGES},
        texts=None,
    )
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
        log_prob = ddpo.policy_log_probs(
            model, group.lq, group.sample, index, group.prompts, group.negatives, config
        )
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
    assert_resume_kept_the_metadata(full, resumed)


@pytest.mark.parametrize(
    "change",
    [
        {"ppo_clip_range": 1e-4},
        {"policy_group_size": 2},
        {"policy_eta": 0.5},
        {"ppo_timestep_fraction": 0.5},
    ],
)
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
    path = checkpoints.save(
        tmp_path,
        1,
        {"p": parameter},
        optimizer,
        [],
        fingerprint,
        extra={"tracker": {"stats": {"x": [0.1, 1 / 3]}}},
    )
    assert checkpoints.load_extra(path) == {"tracker": {"stats": {"x": [0.1, 1 / 3]}}}
    plain = checkpoints.save(tmp_path / "b", 1, {"p": parameter}, optimizer, [], fingerprint)
    assert checkpoints.load_extra(plain) is None


def test_at_ratio_one_the_default_clip_gives_the_plain_policy_gradient():
    """ddpo-pytorch's clip range 1e-4 with one inner epoch: the first (only) pass is at ratio 1,
    where max(-A r, -A clip(r)) ties; its gradient is the plain policy gradient -clamp(A) / B
    (half through each branch of the tie), not half of it, not zero."""
    log_prob = torch.tensor([-1.0, 2.0, 0.5, 3.0], requires_grad=True)
    advantages = torch.tensor([3.0, -7.0, 0.5, -0.25])
    loss, _ = online.ppo_clipped_loss(log_prob, log_prob.detach().clone(), advantages)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, -torch.tensor([3.0, -5.0, 0.5, -0.25]) / 4)


# -- two gloo processes ---------------------------------------------------------------------------


def _run_ddpo(data: Path, out: Path, config: dict) -> None:
    run(data, out, config)


@pytest.mark.slow
def test_two_gloo_processes_give_the_ddpo_update_of_one_process(data, tmp_path):
    """batch 2: one LQ per process. Rewards and ids are gathered before the tracker, the
    gradients all-reduced by hand (summed: each process's loss carries its share of the global
    mean), so the log (grad norm included: twice the gradient would double it) and the
    weights equal one process's. Adam eps 1 (update ~ lr g) keeps float32 summation-order
    noise from being amplified, as in test_train's gloo test."""
    config = {
        **BASE,
        "max_steps": 2,
        "checkpoint_every": 10,
        "adam_epsilon": 1.0,
        "learning_rate": 1e-2,
    }
    single = run(data, tmp_path / "single", config)
    run_in_gloo_processes(2, _run_ddpo, data, tmp_path / "ddp", config)
    assert read_metadata(tmp_path / "ddp" / "train_log.parquet")["processes"] == 2
    assert read_metadata(single / "train_log.parquet")["processes"] == 1
    one = read_table(single / "train_log.parquet", "ddpo_log")
    two = read_table(tmp_path / "ddp" / "train_log.parquet", "ddpo_log")
    pd.testing.assert_frame_equal(one.drop(columns="scores"), two.drop(columns="scores"), rtol=1e-5)
    for a, b in zip(one["scores"], two["scores"], strict=True):
        a, b = json.loads(a), json.loads(b)
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-6) for k in a)
    assert (one["grad_norm"] > 0).all()
    a, b = trained(single), trained(tmp_path / "ddp")
    start = dict(tiny().named_parameters())
    assert not all(torch.equal(a[n], start[n]) for n in a)  # it trained
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


# -- a toy reward: the mean brightness of the output ------------------------------------------------

TOY_REWARD = {
    "score": {
        "metrics": ["psnr"],
        "weights_dir": None,
        "weights": {},
        "options": {},
        "device": "cpu",
        "min_crop_size": 8,
    },
    "objectives": {"fidelity": {"psnr": 1.0}},
}
TOY = {
    "max_steps": 24,
    "batch_size": 2,
    "checkpoint_every": 100,
    "learning_rate": 1e-2,
    "policy_group_size": 4,
    "stat_tracker_buffer_size": 4,
    "stat_tracker_min_count": 4,
    "device": "cpu",
    "reward": TOY_REWARD,
}  # clip range, advantage clip, inner epochs, timestep fraction, std: the defaults


def toy_reward(images: torch.Tensor, sign: float) -> torch.Tensor:
    """``sign`` x the negative mean brightness of each image in [0, 1], as the score stage
    would read it (8-bit): float64 [B]."""
    return sign * -ddpo.quantised_unit(images).mean(dim=(1, 2, 3)).double()


def mean_toy_reward(model, data: Path, seed: int, sign: float, samples: int = 4) -> float:
    """A fresh evaluation: the mean toy reward of ``samples`` policy samples of every LQ, the
    noise keyed by (seed, sample, image id)."""
    config = TrainConfig.from_dict({k: v for k, v in TOY.items() if k != "reward"})
    rewards = []
    for image_id in IMAGES:
        hq = unit_tensor(read_rgb(data / "hq" / f"{image_id}.png"))
        lq = (
            upsample_lq(
                signed_tensor(read_rgb(data / "lq" / f"{image_id}.png"))[None], hq.shape[-2:]
            )
            .expand(samples, -1, -1, -1)
            .contiguous()
        )
        generators = [torch_generator(seed, "toy-eval", k, image_id) for k in range(samples)]
        with torch.no_grad():
            sample = ddpo.sample_policy(
                model, lq, [""] * samples, [""] * samples, generators, config
            )
        rewards.append(float(toy_reward(sample.images, sign).mean()))
    return float(np.mean(rewards))


@pytest.mark.slow
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["darker", "brighter"])
def test_on_a_toy_reward_a_few_dozen_steps_raise_it_far_beyond_the_seed_spread(
    data, tmp_path, monkeypatch, sign
):
    """The one-step Gaussian policy through the whole ddpo loop, the raw score patched to the
    toy reward (select's per-group min-max and the per-LQ tracker still normalise it). Both
    signs: a run driven by anything but the reward (a sign error, drift) fails one of them."""
    monkeypatch.setattr(
        ddpo.Reward, "raw_scores", lambda self, images, hq: {"psnr": toy_reward(images, sign)}
    )

    def model():
        return build_tiny_model("onestep", block_out_channels=(8, 16), seed=0)

    seeds = (0, 1, 2)
    before = [mean_toy_reward(model(), data, s, sign) for s in seeds]
    out = T.train(
        framework="onestep",
        method="ddpo",
        objective="fidelity",
        pairs_path=None,
        candidates_path=None,
        data_dir=data,
        masks_path=None,
        model_dir="in-memory tiny model",
        out_dir=tmp_path / "toy",
        config=TOY,
        seed=3,
        model=model(),
    )
    after = [mean_toy_reward(load_model(out), data, s, sign) for s in seeds]
    logged = [
        json.loads(row)["psnr"]
        for row in read_table(out / "train_log.parquet", "ddpo_log")["scores"]
    ]
    spread = max(before) - min(before)
    gain = float(np.mean(after) - np.mean(before))
    print(
        f"toy reward ({'darker' if sign > 0 else 'brighter'}): untrained {before} "
        f"(spread {spread:.2e}), after {TOY['max_steps']} steps {after}, gain {gain:.4f}; "
        f"logged {np.round(logged, 4).tolist()}"
    )
    assert len(logged) == TOY["max_steps"]
    assert gain > max(20 * spread, 0.01)
    assert np.mean(logged[-3:]) - np.mean(logged[:3]) > 0.01  # the samples it trained on, too
