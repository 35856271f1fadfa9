"""Preference losses on per-pixel denoising-error maps (DSPO paper Eqs. 3-7, docs/design.md §3).

Inputs, for ONE low-quality image (LQ) and its ``N`` candidate SR images, all computed under one
shared timestep ``t`` and one shared noise ``eps``:

- ``err_theta``, ``err_ref``: ``[N, h, w]`` per-pixel squared denoising errors of the policy and
  of the frozen reference on the latent grid (``SRModel.error_maps``);
- ``masks``: ``[M, h, w]`` instance masks ``s_m`` on the same grid (bool or float; soft masks
  come from :func:`resize_masks_to_grid`);
- ``weights``: ``[M]`` instance weights ``w_m`` (Eq. 3: ``|s_m| / sum_m |s_m|``);
- ``winners``, ``losers``: ``[M]`` candidate indices (into the ``N`` maps) of instance ``m``'s
  preferred and dispreferred candidate. Winner and loser may differ from instance to instance.

Instance error (Eqs. 6-7 with a constant weighting, normalised by the mask's mass)::

    E(x, s_m) = sum_{h,w} s_m * err(x) / sum_{h,w} s_m

DSPO (Eq. 5)::

    d_m  = (E_theta(w_m, s_m) - E_ref(w_m, s_m)) - (E_theta(l_m, s_m) - E_ref(l_m, s_m))
    loss = - sum_m w_m * log sigmoid(-k * beta * d_m)

``beta = 8000`` (paper). ``k = 0.5`` reproduces Diffusion-DPO's reference code, whose logit is
``-0.5 * beta_dpo * (model_diff - ref_diff)``; ``k = 1`` reads the paper's ``beta`` literally.

Batches: every function here takes ONE LQ. A batch is a list of per-LQ results combined by
:func:`mean_over_lqs` (loss and statistics averaged over LQs with equal weight), because LQs
have different numbers of instances and of distinct candidates.

Statistics (detached Python floats, all weighted by ``w_m`` and normalised by ``sum_m w_m``)::

    implicit_accuracy = sum_m w_m [-d_m > 0] / sum_m w_m   (the sign of -k*beta*d_m)
    err_theta_winner  = sum_m w_m E_theta(w_m, s_m) / sum_m w_m, and likewise
    err_theta_loser, err_ref_winner, err_ref_loser.

When the weights sum to 1 (a full partition with every instance paired) the accuracy is
``sum_m w_m [-k beta d_m > 0]`` exactly; the normalisation keeps it in [0, 1] when ties
removed some instances. Statistics a loss cannot compute (SFT has no reference) are NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

STAT_KEYS = (
    "implicit_accuracy",
    "err_theta_winner",
    "err_theta_loser",
    "err_ref_winner",
    "err_ref_loser",
)

#: an instance mask's mass below this counts as empty (its error is 0, not 0/0)
_MIN_MASS = 1e-12


def resize_masks_to_grid(masks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Area-resize masks ``[M, H, W]`` (bool or float) to the latent grid ``[M, h, w]``.

    Each grid cell holds the fraction of its footprint covered by the mask, so a partition
    stays a partition (the soft masks still sum to 1 per cell) and a mask's mass is kept.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be [M, H, W], got shape {tuple(masks.shape)}")
    soft = masks.to(torch.float32)
    if tuple(soft.shape[-2:]) == (h, w):
        return soft
    return F.interpolate(soft[None], size=(h, w), mode="area")[0]


def instance_errors(err_maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mask-weighted mean error ``[N, M]`` of every candidate map ``[N, h, w]`` in every mask."""
    if err_maps.shape[-2:] != masks.shape[-2:]:
        raise ValueError(
            f"error maps {tuple(err_maps.shape)} and masks {tuple(masks.shape)} are on different grids"
        )
    soft = masks.to(err_maps.dtype)
    mass = soft.sum(dim=(-2, -1)).clamp_min(_MIN_MASS)  # [M]
    return torch.einsum("nhw,mhw->nm", err_maps, soft) / mass


def _check_pairs(
    n: int, weights: torch.Tensor, winners: torch.Tensor, losers: torch.Tensor, m: int
):
    if not (weights.shape == winners.shape == losers.shape == (m,)):
        raise ValueError(
            f"weights {tuple(weights.shape)}, winners {tuple(winners.shape)} and losers "
            f"{tuple(losers.shape)} must all be [M] with M = {m} masks"
        )
    for name, index in (("winners", winners), ("losers", losers)):
        if m and (int(index.min()) < 0 or int(index.max()) >= n):
            raise IndexError(f"{name} {index.tolist()} out of range for {n} candidates")


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """Losses run in fp32 even under bf16 training (float64 inputs stay float64)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> float:
    total = float(weights.sum())
    return float((values * weights).sum()) / total if total > 0 else math.nan


def preference_margins(
    err_theta: torch.Tensor,
    err_ref: torch.Tensor,
    masks: torch.Tensor,
    weights: torch.Tensor,
    winners: torch.Tensor,
    losers: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``d_m`` ``[M]`` (differentiable through ``err_theta``) and the statistics of the module doc."""
    err_theta, err_ref = _at_least_fp32(err_theta), _at_least_fp32(err_ref)
    weights = torch.as_tensor(weights, dtype=err_theta.dtype, device=err_theta.device)
    winners = torch.as_tensor(winners, dtype=torch.long, device=err_theta.device)
    losers = torch.as_tensor(losers, dtype=torch.long, device=err_theta.device)
    _check_pairs(err_theta.shape[0], weights, winners, losers, masks.shape[0])
    per_theta = instance_errors(err_theta, masks)  # [N, M]
    per_ref = instance_errors(err_ref, masks).detach()
    instances = torch.arange(masks.shape[0], device=err_theta.device)
    theta_w, theta_l = per_theta[winners, instances], per_theta[losers, instances]
    ref_w, ref_l = per_ref[winners, instances], per_ref[losers, instances]
    margins = (theta_w - ref_w) - (theta_l - ref_l)
    with torch.no_grad():
        stats = {
            "implicit_accuracy": _weighted_mean((margins < 0).float(), weights),
            "err_theta_winner": _weighted_mean(theta_w, weights),
            "err_theta_loser": _weighted_mean(theta_l, weights),
            "err_ref_winner": _weighted_mean(ref_w, weights),
            "err_ref_loser": _weighted_mean(ref_l, weights),
        }
    return margins, stats


def dspo_loss(
    err_theta: torch.Tensor,
    err_ref: torch.Tensor,
    masks: torch.Tensor,
    weights: torch.Tensor,
    winners: torch.Tensor,
    losers: torch.Tensor,
    *,
    beta: float = 8000.0,
    k: float = 0.5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DSPO loss of one LQ: ``-sum_m w_m log sigmoid(-k beta d_m)`` (Eq. 5); see module doc."""
    margins, stats = preference_margins(err_theta, err_ref, masks, weights, winners, losers)
    weights = torch.as_tensor(weights, dtype=margins.dtype, device=margins.device)
    loss = -(weights * F.logsigmoid(-k * beta * margins)).sum()
    return loss, stats


def dpo_loss(
    err_theta: torch.Tensor,
    err_ref: torch.Tensor,
    winner: int,
    loser: int,
    *,
    beta: float = 8000.0,
    k: float = 0.5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Diffusion-DPO of one LQ: DSPO with one full-image mask (M = 1, w = 1).

    ``-log sigmoid(-k beta ((L_theta,w - L_ref,w) - (L_theta,l - L_ref,l)))`` with ``L`` the
    plain mean of the error map; ``k = 0.5`` is Diffusion-DPO's ``scale_term = -0.5 * beta_dpo``.
    """
    full = torch.ones((1, *err_theta.shape[-2:]), device=err_theta.device)
    pair = torch.tensor([winner]), torch.tensor([loser])
    return dspo_loss(err_theta, err_ref, full, torch.ones(1), *pair, beta=beta, k=k)


def dro_loss(
    err_theta: torch.Tensor,
    err_ref: torch.Tensor,
    masks: torch.Tensor,
    weights: torch.Tensor,
    winners: torch.Tensor,
    losers: torch.Tensor,
    *,
    margin: float = 1e-3,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Diffusion-DRO's thresholded ranking loss, instance-weighted: ``sum_m w_m relu(d_m + margin)``.

    Diffusion-DRO (`basiclab/DiffusionDRO` train.py) optimises
    ``relu((L_exp - L_exp_ref) - (L_pol - L_pol_ref) + 0.001)``: the winner plays the expert and
    the loser the policy sample. It has no sigmoid and no beta; the hinge stops pushing once the
    winner's implicit reward beats the loser's by ``margin``.
    """
    margins, stats = preference_margins(err_theta, err_ref, masks, weights, winners, losers)
    weights = torch.as_tensor(weights, dtype=margins.dtype, device=margins.device)
    loss = (weights * torch.relu(margins + margin)).sum()
    return loss, stats


def sft_loss(
    err_theta: torch.Tensor,
    masks: torch.Tensor,
    weights: torch.Tensor,
    winners: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Supervised fine-tuning on the preferred image: ``sum_m w_m E_theta(w_m, s_m) / sum_m w_m``.

    With one full mask this is the winner's plain diffusion loss (the mean of its error map),
    as in Diffusion-DPO's ``--sft`` mode. No reference: the reference/loser statistics are NaN.
    """
    err_theta = _at_least_fp32(err_theta)
    weights = torch.as_tensor(weights, dtype=err_theta.dtype, device=err_theta.device)
    winners = torch.as_tensor(winners, dtype=torch.long, device=err_theta.device)
    _check_pairs(err_theta.shape[0], weights, winners, winners, masks.shape[0])
    per_theta = instance_errors(err_theta, masks)
    theta_w = per_theta[winners, torch.arange(masks.shape[0], device=err_theta.device)]
    loss = (weights * theta_w).sum() / weights.sum()
    stats = dict.fromkeys(STAT_KEYS, math.nan)
    stats["err_theta_winner"] = float(loss.detach())
    return loss, stats


def mean_over_lqs(
    results: list[tuple[torch.Tensor, dict[str, float]]],
) -> tuple[torch.Tensor, dict[str, float]]:
    """Combine per-LQ ``(loss, stats)`` into the batch loss: both averaged over LQs."""
    if not results:
        raise ValueError("no LQ in the batch")
    loss = torch.stack([loss for loss, _ in results]).mean()
    stats = {key: float(sum(s[key] for _, s in results) / len(results)) for key in STAT_KEYS}
    return loss, stats
