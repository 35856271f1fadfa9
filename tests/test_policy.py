"""pipeline.policy against diffusers, torch.distributions and numbers computed by hand."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from safetensors.torch import load_file, save_file
from torch.distributions import Normal

from pipeline import policy
from pipeline.policy import (
    OnlineNegativeBuffer,
    PerLQStatTracker,
    ddim_step_with_log_prob,
    gaussian_onestep_policy,
    perturbed_timesteps,
    ppo_clipped_loss,
)
from pipeline.seeding import torch_generator

SHAPE = (3, 4, 5, 6)  # [B, C, h, w]


def tiny_scheduler(prediction_type="epsilon", set_alpha_to_one=False, steps=5, **extra):
    """A small DDIM schedule (100 training timesteps) with SD's beta schedule."""
    scheduler = DDIMScheduler(
        num_train_timesteps=100,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=set_alpha_to_one,
        steps_offset=1,
        **extra,
    )
    scheduler.set_timesteps(steps)
    return scheduler


def tensors(seed=0, shape=SHAPE):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def closed_form(scheduler, eps, x_t, t, eta):
    """DDIM posterior N(mean, std^2) for an ε-prediction, from alphas_cumprod (DDIM Eqs. 12, 16)."""
    gap = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = float(scheduler.alphas_cumprod[t])
    a_prev = float(scheduler.alphas_cumprod[t - gap]) if t - gap >= 0 else 1.0
    if t - gap < 0 and not scheduler.config.set_alpha_to_one:
        a_prev = float(scheduler.alphas_cumprod[0])
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
    return mean, sigma


# -- ddim_step_with_log_prob ---------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_eta_zero_equals_diffusers_step(prediction_type, set_alpha_to_one):
    scheduler = tiny_scheduler(prediction_type, set_alpha_to_one)
    reference = tiny_scheduler(prediction_type, set_alpha_to_one)
    output, x_t = tensors()
    for t in scheduler.timesteps:  # the last step reaches prev < 0 (final_alpha_cumprod)
        expected = reference.step(output, t, x_t, eta=0.0).prev_sample
        prev, log_prob = ddim_step_with_log_prob(scheduler, output, t, x_t, eta=0.0)
        torch.testing.assert_close(prev, expected, rtol=1e-6, atol=1e-6)
        assert log_prob.shape == (SHAPE[0],) and torch.isnan(log_prob).all()


def test_eta_positive_is_the_closed_form_gaussian():
    scheduler = tiny_scheduler()
    eps, x_t = tensors(1)
    eta = 0.7
    for t in scheduler.timesteps:
        prev, log_prob = ddim_step_with_log_prob(
            scheduler, eps, t, x_t, eta, generator=torch.Generator().manual_seed(5)
        )
        mean, std = closed_form(scheduler, eps, x_t, int(t), eta)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(prev, mean + std * noise, rtol=1e-5, atol=1e-5)
        expected = Normal(mean, torch.full_like(mean, std)).log_prob(prev).mean(dim=(1, 2, 3))
        torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-5)
        # and diffusers' own stochastic step draws the same sample from the same generator
        diffusers_prev = scheduler.step(
            eps, t, x_t, eta=eta, generator=torch.Generator().manual_seed(5)
        ).prev_sample
        torch.testing.assert_close(prev, diffusers_prev, rtol=1e-6, atol=1e-6)


def test_v_prediction_with_eta_matches_diffusers():
    scheduler = tiny_scheduler("v_prediction")
    output, x_t = tensors(2)
    t = scheduler.timesteps[1]
    prev, log_prob = ddim_step_with_log_prob(
        scheduler, output, t, x_t, 1.0, generator=torch.Generator().manual_seed(3)
    )
    expected = scheduler.step(
        output, t, x_t, eta=1.0, generator=torch.Generator().manual_seed(3)
    ).prev_sample
    torch.testing.assert_close(prev, expected, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(log_prob).all()


def test_per_sample_timesteps_and_generators():
    scheduler = tiny_scheduler()
    eps, x_t = tensors(3)
    timesteps = torch.tensor([81, 41, 1])  # one per sample, the last one's prev is < 0
    seeds = [10, 11, 12]
    prev, log_prob = ddim_step_with_log_prob(
        scheduler,
        eps,
        timesteps,
        x_t,
        1.0,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    )
    for i, (t, seed) in enumerate(zip(timesteps.tolist(), seeds, strict=True)):
        row, row_log_prob = ddim_step_with_log_prob(
            scheduler,
            eps[i : i + 1],
            t,
            x_t[i : i + 1],
            1.0,
            generator=torch.Generator().manual_seed(seed),
        )
        torch.testing.assert_close(prev[i : i + 1], row, rtol=0, atol=0)
        torch.testing.assert_close(log_prob[i : i + 1], row_log_prob, rtol=0, atol=0)
        mean, std = closed_form(scheduler, eps[i : i + 1], x_t[i : i + 1], t, 1.0)
        noise = torch.randn((1, *SHAPE[1:]), generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(row, mean + std * noise, rtol=1e-5, atol=1e-5)


def test_given_prev_sample_is_only_evaluated():
    scheduler = tiny_scheduler()
    eps, x_t = tensors(4)
    t = scheduler.timesteps[2]
    prev, sampled_log_prob = ddim_step_with_log_prob(
        scheduler, eps, t, x_t, 1.0, generator=torch.Generator().manual_seed(0)
    )
    rng_state = torch.get_rng_state()
    output = eps.clone().requires_grad_(True)
    stored = prev.clone().requires_grad_(True)
    returned, log_prob = ddim_step_with_log_prob(scheduler, output, t, x_t, 1.0, prev_sample=stored)
    assert returned is stored
    assert torch.equal(torch.get_rng_state(), rng_state)  # nothing drawn
    # the same model output gives exactly the sampling-time log-prob: PPO's first ratio is 1
    assert torch.equal(log_prob.detach(), sampled_log_prob)
    assert torch.equal(torch.exp(log_prob.detach() - sampled_log_prob), torch.ones(SHAPE[0]))
    log_prob.sum().backward()
    assert output.grad is not None and output.grad.abs().sum() > 0
    assert stored.grad is None  # prev_sample is detached, as ddpo-pytorch does


def test_step_errors():
    scheduler = tiny_scheduler()
    eps, x_t = tensors()
    t = scheduler.timesteps[0]
    with pytest.raises(ValueError, match="not both"):
        ddim_step_with_log_prob(
            scheduler, eps, t, x_t, 1.0, prev_sample=x_t, generator=torch.Generator()
        )
    with pytest.raises(ValueError, match="no density"):
        ddim_step_with_log_prob(scheduler, eps, t, x_t, 0.0, prev_sample=x_t)
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_log_prob(scheduler, eps, t, x_t, -1.0)
    with pytest.raises(ValueError, match="one per sample"):
        ddim_step_with_log_prob(scheduler, eps, torch.tensor([1, 2]), x_t, 1.0)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_log_prob(DDIMScheduler(num_train_timesteps=100), eps, t, x_t, 1.0)
    with pytest.raises(TypeError, match="DDIMScheduler"):
        ddim_step_with_log_prob(DDPMScheduler(num_train_timesteps=100), eps, t, x_t, 1.0)


# -- PerLQStatTracker ----------------------------------------------------------------------------


def test_stat_tracker_against_hand_numbers():
    tracker = PerLQStatTracker(buffer_size=3, min_count=2)
    # a holds [1, 3]: its own mean 2, std 1; b holds [5] (< min_count): the batch's mean 3 and
    # std sqrt(8/3)
    advantages = tracker.update(["a", "a", "b"], [1.0, 3.0, 5.0])
    expected = [-1 / (1 + 1e-6), 1 / (1 + 1e-6), 2 / (math.sqrt(8 / 3) + 1e-6)]
    np.testing.assert_allclose(advantages, expected, rtol=1e-12)
    # a holds [1, 3, 7]: mean 11/3, variance 168/27; b holds [5, 1]: mean 3, std 2
    advantages = tracker.update(["b", "a"], [1.0, 7.0])
    expected = [-2 / (2 + 1e-6), (7 - 11 / 3) / (math.sqrt(168 / 27) + 1e-6)]
    np.testing.assert_allclose(advantages, expected, rtol=1e-12)
    # FIFO: a's oldest reward (1) leaves; a holds [3, 7, 8]: mean 6, variance 14/3
    advantages = tracker.update(["a"], [8.0])
    np.testing.assert_allclose(advantages, [2 / (math.sqrt(14 / 3) + 1e-6)], rtol=1e-12)
    assert tracker.get_stats()["a"] == {"mean": 6.0, "std": math.sqrt(14 / 3), "count": 3}


def test_stat_tracker_defaults_and_zero_mean_per_lq():
    tracker = PerLQStatTracker()
    assert (tracker.buffer_size, tracker.min_count) == (16, 16)  # ddpo-pytorch config/base.py
    group = 16  # one group of samples per LQ fills its buffer at once
    rewards = np.random.default_rng(0).normal(size=(3, group)) * [[1.0], [5.0], [0.1]]
    ids = np.repeat(["x", "y", "z"], group)
    advantages = tracker.update(ids, rewards.reshape(-1))
    for image_id, lq_rewards in zip(("x", "y", "z"), rewards, strict=True):
        assert abs(advantages[ids == image_id].mean()) < 1e-12
        spread = np.std(lq_rewards)  # z-scores have std 1 but for the 1e-6 added to the std
        np.testing.assert_allclose(advantages[ids == image_id].std(), spread / (spread + 1e-6))


def test_stat_tracker_state_round_trip():
    tracker = PerLQStatTracker(buffer_size=4, min_count=2)
    tracker.update(["a", "b", "a"], [0.1, 0.2, 0.3])
    tracker.update(["b", "c"], [1 / 3, 2.5])
    restored = PerLQStatTracker.from_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert restored.state_dict() == tracker.state_dict()
    batch = (["a", "c", "c", "b"], [0.7, 0.11, 0.13, 9.0])
    assert np.array_equal(restored.update(*batch), tracker.update(*batch))
    assert restored.state_dict() == tracker.state_dict()


def test_stat_tracker_errors():
    with pytest.raises(ValueError, match="never be used"):
        PerLQStatTracker(buffer_size=2, min_count=3)
    with pytest.raises(ValueError, match=">= 1"):
        PerLQStatTracker(buffer_size=0, min_count=0)
    tracker = PerLQStatTracker(2, 1)
    with pytest.raises(ValueError, match="2 image ids for 1 rewards"):
        tracker.update(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="finite"):
        tracker.update(["a"], [math.nan])


# -- ppo_clipped_loss ----------------------------------------------------------------------------


def test_ppo_loss_hand_values_with_clipping():
    old = torch.zeros(4)
    ratios = torch.tensor([1.0, 1.5, 0.5, 1.5])
    log_prob = torch.log(ratios).requires_grad_(True)
    advantages = torch.tensor([1.0, -2.0, 10.0, 1.0])  # 10 is clipped to adv_clip_max 5
    loss, stats = ppo_clipped_loss(log_prob, old, advantages, clip_range=0.2)
    # per sample max(-A r, -A clip(r, 0.8, 1.2)) with A = [1, -2, 5, 1]:
    #   [max(-1, -1), max(3, 2.4), max(-2.5, -4), max(-1.5, -1.2)] = [-1, 3, -2.5, -1.2]
    assert loss.item() == pytest.approx((-1 + 3 - 2.5 - 1.2) / 4)
    assert stats["clipfrac"] == pytest.approx(3 / 4)
    assert stats["approx_kl"] == pytest.approx(
        0.5 * (2 * math.log(1.5) ** 2 + math.log(0.5) ** 2) / 4
    )
    assert stats["ratio_mean"] == pytest.approx(1.125)
    loss.backward()
    # d/dlogp of -A r is -A r / B where unclipped wins; 0 where the clipped term wins
    torch.testing.assert_close(log_prob.grad, torch.tensor([-0.25, 0.75, -0.625, 0.0]))


def test_ppo_loss_defaults_at_ratio_one():
    log_prob = torch.tensor([-1.0, 2.0, 0.5])
    advantages = torch.tensor([3.0, -7.0, 0.5])
    loss, stats = ppo_clipped_loss(log_prob, log_prob.clone(), advantages)
    assert policy.DDPO_CLIP_RANGE == 1e-4 and policy.DDPO_ADV_CLIP_MAX == 5.0
    assert loss.item() == pytest.approx(-(3.0 - 5.0 + 0.5) / 3)
    assert stats == {"approx_kl": 0.0, "clipfrac": 0.0, "ratio_mean": 1.0}


def test_ppo_loss_errors():
    with pytest.raises(ValueError, match="must all be"):
        ppo_clipped_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="> 0"):
        ppo_clipped_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), clip_range=0)


# -- gaussian_onestep_policy ---------------------------------------------------------------------


def test_onestep_policy_against_torch_distributions():
    mean, _ = tensors(6)
    mean.requires_grad_(True)
    std = torch.tensor([0.1, 0.5, 2.0])
    sample, log_prob = gaussian_onestep_policy(
        mean, std, generator=torch.Generator().manual_seed(9)
    )
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    scale = std.view(-1, 1, 1, 1)
    torch.testing.assert_close(sample, mean.detach() + scale * noise)
    expected = Normal(mean.detach(), scale.expand(SHAPE)).log_prob(sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob.detach(), expected)
    log_prob.sum().backward()
    assert mean.grad is not None and mean.grad.abs().sum() > 0
    # evaluating the stored sample gives the same log-prob exactly
    _, again = gaussian_onestep_policy(mean.detach(), std, sample=sample)
    assert torch.equal(again, log_prob.detach())
    _, scalar = gaussian_onestep_policy(mean.detach(), 0.5, sample=sample)
    expected = Normal(mean.detach(), 0.5).log_prob(sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(scalar, expected)


def test_onestep_policy_errors():
    mean, _ = tensors()
    with pytest.raises(ValueError, match="positive"):
        gaussian_onestep_policy(mean, 0.0)
    with pytest.raises(ValueError, match="not both"):
        gaussian_onestep_policy(mean, 1.0, sample=mean, generator=torch.Generator())
    with pytest.raises(ValueError, match="one value per sample"):
        gaussian_onestep_policy(mean, torch.ones(2))


# -- OnlineNegativeBuffer ------------------------------------------------------------------------


def trajectories(first: int, count: int, steps: int = 3):
    """Trajectories n = first.. whose state at step k is filled with 100 n + k (target: minus)."""
    index = torch.arange(first, first + count, dtype=torch.float32)[:, None]
    values = 100 * index + torch.arange(steps, dtype=torch.float32)[None]
    states = values[..., None, None, None].expand(count, steps, 2, 2, 2).clone()
    timesteps = torch.tensor([90, 50, 10])[:steps]
    return [f"img{n}" for n in range(first, first + count)], states, timesteps, -states


def test_buffer_defaults_and_periods():
    buffer = OnlineNegativeBuffer()
    assert (buffer.size, buffer.refill_every, buffer.sync_every) == (4, 1, 16)  # DRO train.py
    buffer = OnlineNegativeBuffer(size=3, refill_every=2, sync_every=4)
    assert buffer.due_for_refill(1)  # empty: always
    assert buffer.refill_batches(train_batch_size=8, sampler_batch_size=4) == 2
    buffer.add(*trajectories(0, 1))
    assert [buffer.due_for_refill(s) for s in (1, 2, 3, 4)] == [False, True, False, True]
    assert [buffer.due_for_sync(s) for s in (1, 4, 6, 8)] == [False, True, False, True]
    assert buffer.refill_batches(8, 4, accumulation=1) == 1


def test_buffer_is_a_fifo_of_whole_trajectories():
    buffer = OnlineNegativeBuffer(size=3)
    buffer.add(*trajectories(0, 2))
    buffer.add(*trajectories(2, 2))
    assert buffer.image_ids == ["img1", "img2", "img3"]
    assert buffer.states[:, 0, 0, 0, 0].tolist() == [100.0, 200.0, 300.0]
    buffer.add(*trajectories(4, 5))  # more than fit: the newest three
    assert buffer.image_ids == ["img6", "img7", "img8"] and len(buffer) == 3
    assert buffer.timesteps.tolist() == [[90, 50, 10]] * 3


def test_buffer_sample_gives_aligned_triplets():
    buffer = OnlineNegativeBuffer(size=4)
    buffer.add(*trajectories(0, 4))
    generator = torch.Generator().manual_seed(0)
    drawn = buffer.sample(3, generator)
    assert len(set(drawn["image_ids"])) == 3  # without replacement when it can
    for image_id, state, t, target in zip(
        drawn["image_ids"], drawn["states"], drawn["timesteps"], drawn["targets"], strict=True
    ):
        n = int(image_id[3:])
        k = [90, 50, 10].index(int(t))
        assert torch.all(state == 100 * n + k) and torch.equal(target, -state)
    # DRO's draw: a permutation of trajectories, then one step index per trajectory
    generator = torch.Generator().manual_seed(1)
    rows, columns = (
        torch.randperm(4, generator=generator)[:3],
        torch.randint(0, 3, (3,), generator=generator),
    )
    drawn = buffer.sample(3, torch.Generator().manual_seed(1))
    assert drawn["image_ids"] == [f"img{int(r)}" for r in rows]
    assert torch.equal(drawn["timesteps"], torch.tensor([90, 50, 10])[columns])
    assert len(buffer.sample(7, generator)["image_ids"]) == 7  # with replacement past the size


def test_buffer_resume_is_bit_identical(tmp_path):
    def micro_step(buffer, step):
        if buffer.due_for_refill(step):
            generator = torch_generator(0, "test-refill", step)
            states = torch.randn(2, 3, 4, 4, 4, generator=generator)
            targets = torch.randn(2, 3, 4, 4, 4, generator=generator)
            buffer.add([f"s{step}a", f"s{step}b"], states, torch.tensor([70, 40, 10]), targets)
        return buffer.sample(3, torch_generator(0, "test-sample", step))

    uninterrupted = OnlineNegativeBuffer(size=5, refill_every=2)
    expected = [micro_step(uninterrupted, step) for step in range(1, 9)]

    killed = OnlineNegativeBuffer(size=5, refill_every=2)
    save_file(killed.state_dict(), tmp_path / "empty.safetensors")
    killed = OnlineNegativeBuffer.from_state_dict(load_file(tmp_path / "empty.safetensors"))
    drawn = [micro_step(killed, step) for step in range(1, 5)]
    save_file(killed.state_dict(), tmp_path / "buffer.safetensors")
    resumed = OnlineNegativeBuffer.from_state_dict(load_file(tmp_path / "buffer.safetensors"))
    drawn += [micro_step(resumed, step) for step in range(5, 9)]

    for got, want in zip(drawn, expected, strict=True):
        assert got["image_ids"] == want["image_ids"]
        for key in ("states", "timesteps", "targets"):
            assert torch.equal(got[key], want[key])
    final, reference = resumed.state_dict(), uninterrupted.state_dict()
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[key], reference[key]) for key in final)


def test_buffer_errors():
    buffer = OnlineNegativeBuffer()
    with pytest.raises(ValueError, match="empty"):
        buffer.sample(1, torch.Generator())
    ids, states, _, targets = trajectories(0, 2)
    with pytest.raises(ValueError, match="decrease strictly"):
        buffer.add(ids, states, torch.tensor([10, 50, 90]), targets)
    with pytest.raises(ValueError, match="image ids"):
        buffer.add(ids[:1], states, torch.tensor([90, 50, 10]), targets)
    buffer.add(*trajectories(0, 1))
    with pytest.raises(ValueError, match="do not match"):
        buffer.add(*trajectories(0, 1, steps=2))


def test_perturbed_timesteps_follow_dro_and_drive_the_ddim_step():
    grids = perturbed_timesteps(5, 100, 3, torch.Generator().manual_seed(4))
    # DRO train.py: (arange(T) * r).flip(0)[:, None] + randint(0, r, (1, B))
    generator = torch.Generator().manual_seed(4)
    dro = (torch.arange(5) * 20).flip(0)[:, None] + torch.randint(
        0, 20, (1, 3), generator=generator
    )
    assert torch.equal(grids, dro.t())
    offsets = grids[:, -1]
    assert bool(((offsets >= 0) & (offsets < 20)).all())
    assert torch.equal(grids - offsets[:, None], torch.tensor([[80, 60, 40, 20, 0]] * 3))
    # a trajectory over per-sample grids with the DDIM policy step (its step is r = 20)
    scheduler = tiny_scheduler(steps=5)
    x_t = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for k in range(5):
        eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(k + 1))
        x_t, log_prob = ddim_step_with_log_prob(
            scheduler,
            eps,
            grids[:, k],
            x_t,
            1.0,
            generator=[torch.Generator().manual_seed(100 * k + i) for i in range(3)],
        )
        assert torch.isfinite(x_t).all() and torch.isfinite(log_prob).all()
