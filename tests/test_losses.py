"""pipeline.losses: DSPO / DPO / DRO / SFT losses against hand computations and reference formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import (
    dpo_loss,
    dro_loss,
    dspo_loss,
    instance_errors,
    mean_over_lqs,
    resize_masks_to_grid,
    sft_loss,
)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.fixture
def fixed():
    """N = 3 candidates on a 2 x 2 grid; M = 2 instances (left column, right column)."""
    err_theta = torch.tensor(
        [
            [[1.0, 2.0], [3.0, 4.0]],
            [[2.0, 2.0], [2.0, 2.0]],
            [[0.0, 1.0], [0.0, 1.0]],
        ]
    )
    err_ref = torch.tensor(
        [
            [[1.0, 1.0], [1.0, 1.0]],
            [[3.0, 1.0], [1.0, 1.0]],
            [[0.5, 0.5], [0.5, 0.5]],
        ]
    )
    masks = torch.tensor([[[1, 0], [1, 0]], [[0, 1], [0, 1]]], dtype=torch.bool)
    weights = torch.tensor([0.25, 0.75])
    winners = torch.tensor([0, 2])
    losers = torch.tensor([1, 0])
    return err_theta, err_ref, masks, weights, winners, losers


def test_dspo_matches_hand_computation(fixed):
    # instance 0 (left column): E_theta(0) = (1+3)/2 = 2, E_ref(0) = 1, E_theta(1) = 2, E_ref(1) = 2
    #   d_0 = (2 - 1) - (2 - 2) = 1
    # instance 1 (right column): E_theta(2) = 1, E_ref(2) = 0.5, E_theta(0) = 3, E_ref(0) = 1
    #   d_1 = (1 - 0.5) - (3 - 1) = -1.5
    beta, k = 2.0, 0.5
    expected = -(0.25 * _log_sigmoid(-k * beta * 1.0) + 0.75 * _log_sigmoid(-k * beta * -1.5))
    loss, stats = dspo_loss(*fixed, beta=beta, k=k)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["implicit_accuracy"] == pytest.approx(0.75)  # only instance 1 has -d > 0
    assert stats["err_theta_winner"] == pytest.approx(0.25 * 2 + 0.75 * 1)
    assert stats["err_theta_loser"] == pytest.approx(0.25 * 2 + 0.75 * 3)
    assert stats["err_ref_winner"] == pytest.approx(0.25 * 1 + 0.75 * 0.5)
    assert stats["err_ref_loser"] == pytest.approx(0.25 * 2 + 0.75 * 1)


def test_float_and_bool_masks_agree_and_soft_masks_weight_pixels(fixed):
    err_theta, err_ref, masks, weights, winners, losers = fixed
    as_bool, _ = dspo_loss(*fixed, beta=2.0)
    as_float, _ = dspo_loss(err_theta, err_ref, masks.float(), weights, winners, losers, beta=2.0)
    assert as_bool.item() == pytest.approx(as_float.item(), rel=1e-7)
    soft = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])
    # (1*1 + 0.5*2) / 1.5 for candidate 0
    assert instance_errors(err_theta, soft)[0, 0].item() == pytest.approx(2.0 / 1.5)


def test_one_full_mask_equals_diffusion_dpo_reference_code():
    generator = torch.Generator().manual_seed(0)
    # float64: at beta = 8000 float32 rounding of the two ways of averaging shows at 1e-5
    err_theta = torch.rand(2, 8, 8, generator=generator, dtype=torch.float64) * 1e-3 + 0.1
    err_ref = torch.rand(2, 8, 8, generator=generator, dtype=torch.float64) * 1e-3 + 0.1
    beta_dpo = 8000.0
    # SalesforceAIResearch/DiffusionDPO train.py: per-sample MSE, scale_term = -0.5 * beta_dpo
    model_losses_w, model_losses_l = err_theta.mean(dim=(1, 2))
    ref_losses_w, ref_losses_l = err_ref.mean(dim=(1, 2))
    inside_term = (
        -0.5 * beta_dpo * ((model_losses_w - model_losses_l) - (ref_losses_w - ref_losses_l))
    )
    reference = -F.logsigmoid(inside_term)
    loss, stats = dpo_loss(err_theta, err_ref, 0, 1, beta=beta_dpo, k=0.5)
    assert abs(loss.item() - reference.item()) < 1e-6
    assert stats["implicit_accuracy"] == float(inside_term > 0)
    full = torch.ones(1, 8, 8)
    as_dspo, _ = dspo_loss(
        err_theta, err_ref, full, torch.ones(1), torch.tensor([0]), torch.tensor([1])
    )
    assert abs(as_dspo.item() - reference.item()) < 1e-6
    # the diffusers LoRA script drops the 0.5 and halves beta: same loss
    diffusers = -F.logsigmoid(
        2500.0 * ((ref_losses_w - ref_losses_l) - (model_losses_w - model_losses_l))
    )
    k1, _ = dpo_loss(err_theta, err_ref, 0, 1, beta=2500.0, k=1.0)
    assert abs(k1.item() - diffusers.item()) < 1e-6


def test_policy_equal_to_reference_gives_log_two(fixed):
    err_theta, _, masks, weights, winners, losers = fixed
    loss, stats = dspo_loss(err_theta, err_theta.clone(), masks, weights, winners, losers)
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-7)
    assert stats["implicit_accuracy"] == 0.0  # d = 0 is not a win


def test_gradient_pushes_winner_error_down_and_loser_error_up(fixed):
    err_theta, err_ref, masks, weights, winners, losers = fixed
    err_theta = err_theta.clone().requires_grad_(True)
    loss, _ = dspo_loss(err_theta, err_ref, masks, weights, winners, losers, beta=2.0)
    loss.backward()
    # instance 1 (right column): winner candidate 2, loser candidate 0
    assert err_theta.grad[2, 0, 1] > 0 and err_theta.grad[0, 0, 1] < 0
    assert err_theta.grad[1, :, 1].abs().sum() == 0  # candidate 1 plays no part in instance 1


def test_dro_hinge_matches_hand_computation_and_stops_past_margin(fixed):
    err_theta, err_ref, masks, weights, winners, losers = fixed
    loss, stats = dro_loss(*fixed, margin=0.1)
    # d = (1, -1.5): relu(1.1) * 0.25 + relu(-1.4) * 0.75
    assert loss.item() == pytest.approx(0.25 * 1.1)
    assert stats["implicit_accuracy"] == pytest.approx(0.75)
    err_theta = err_theta.clone().requires_grad_(True)
    dro_loss(err_theta, err_ref, masks, weights, winners, losers, margin=0.1)[0].backward()
    assert err_theta.grad[:, :, 1].abs().sum() == 0  # instance 1 already beats the margin


def test_sft_is_the_winners_plain_error(fixed):
    err_theta, _, masks, weights, winners, _ = fixed
    full = torch.ones(1, 2, 2)
    loss, stats = sft_loss(err_theta, full, torch.ones(1), torch.tensor([2]))
    assert loss.item() == pytest.approx(err_theta[2].mean().item())
    assert math.isnan(stats["err_ref_winner"]) and stats["err_theta_winner"] == pytest.approx(0.5)
    weighted, _ = sft_loss(err_theta, masks, weights, winners)
    assert weighted.item() == pytest.approx(0.25 * 2 + 0.75 * 1)


def test_area_resize_keeps_partition_and_mass():
    labels = torch.zeros(8, 8, dtype=torch.long)
    labels[:3, :5] = 1
    labels[5:, 2:] = 2
    masks = labels[None] == torch.arange(3)[:, None, None]
    grid = resize_masks_to_grid(masks, 2, 2)
    assert grid.shape == (3, 2, 2)
    torch.testing.assert_close(grid.sum(0), torch.ones(2, 2))
    torch.testing.assert_close(grid.sum(dim=(1, 2)) * 16, masks.float().sum(dim=(1, 2)))
    assert grid[1, 0, 0].item() == pytest.approx(12 / 16)  # rows 0-2, cols 0-3 of the top-left cell


def test_mean_over_lqs_averages_losses_and_stats(fixed):
    a = dspo_loss(*fixed, beta=2.0)
    err_theta, err_ref, masks, weights, winners, losers = fixed
    b = dspo_loss(err_theta, err_theta, masks, weights, winners, losers)
    loss, stats = mean_over_lqs([a, b])
    assert loss.item() == pytest.approx((a[0].item() + math.log(2.0)) / 2)
    assert stats["implicit_accuracy"] == pytest.approx(0.75 / 2)


def test_errors_name_the_mismatch(fixed):
    err_theta, err_ref, masks, weights, winners, losers = fixed
    with pytest.raises(ValueError, match="different grids"):
        dspo_loss(err_theta, err_ref, torch.ones(2, 4, 4), weights, winners, losers)
    with pytest.raises(IndexError, match="losers"):
        dspo_loss(err_theta, err_ref, masks, weights, winners, torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="must all be"):
        dspo_loss(err_theta, err_ref, masks, weights[:1], winners, losers)
