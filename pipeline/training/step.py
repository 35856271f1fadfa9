"""One training step's parts (docs/design.md §3): the draws an LQ shares, the policy's and the
reference's error maps over its distinct candidates, and the method's loss on them.

For every LQ of a batch, the distinct candidates that win or lose any of its pairs share ONE
timestep and ONE noise (:func:`draw_conditions`); the policy and the frozen reference each run
once over them (:func:`shared_error_maps`), not once per instance; the maps are pooled per
instance mask and fed to the method's loss from :mod:`pipeline.losses` (:func:`lq_loss`); the
batch loss is the mean over LQs (:func:`losses_from_errors`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pipeline import contracts, losses
from pipeline.guidance import image_negative_prompt
from pipeline.models.base import SRModel
from pipeline.seeding import torch_generator
from pipeline.training.config import TrainConfig
from pipeline.training.items import LoadedItem

STAGE = "train"  # the seeding key of every draw of the train stage


@dataclass
class Conditions:
    """An LQ's shared draws: timestep ``[1]``, noise ``[1, C, h, w]``, the prompt it trains on
    and the negative prompt of guided error maps (multi-step ``error_map_cfg > 1``)."""

    timestep: torch.Tensor
    noise: torch.Tensor
    prompt: str
    negative: str = ""


def draw_conditions(
    model: SRModel,
    loaded: LoadedItem,
    config: TrainConfig,
    seed: int,
    step: int,
    slot: int,
    texts: dict[str, tuple[str, str]] | None = None,
) -> Conditions:
    """One ``t`` and ``eps`` shared by all candidates of the LQ, and the branch it trains on:
    the image's prompt of ``texts`` (``{image_id: (prompt, negative_prompt)}``, the prompts
    table), or on the unconditional branch its feedback texts then its negative prompt (M2) or
    the empty prompt (M1). Drawn from (seed, stage, step, slot in the global batch, image id)."""
    item = loaded.item
    generator = torch_generator(seed, STAGE, step, slot, item.image_id)
    timestep, noise = model.draw_timesteps_and_noise(loaded.lq[None], generator)
    dropped = float(torch.rand(1, generator=generator)) < config.uncond_drop_rate
    prompt, base_negative = texts[item.image_id] if texts else ("", "")
    negative = (
        image_negative_prompt(base_negative, item.negative_prompt)
        if config.negative_prompts
        else ""
    )
    return Conditions(timestep, noise, negative if dropped else prompt, negative)


def _shape_groups(loaded: Sequence[LoadedItem]) -> list[list[int]]:
    """Indices of the items sharing an image size (one batched forward per group)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, entry in enumerate(loaded):
        groups.setdefault(tuple(entry.targets.shape[-2:]), []).append(i)
    return list(groups.values())


def error_maps_batched(
    model: SRModel,
    loaded: Sequence[LoadedItem],
    conditions: Sequence[Conditions],
    device: torch.device,
) -> list[torch.Tensor]:
    """Per-item error maps ``[D_i, h, w]``: one ``error_maps`` call per image size.

    Items with fewer distinct candidates are padded by repeating their first candidate; the
    padded maps are dropped (each target's map depends only on that target).
    """
    out: list[torch.Tensor | None] = [None] * len(loaded)
    for group in _shape_groups(loaded):
        width = max(loaded[i].targets.shape[0] for i in group)
        targets = []
        for i in group:
            t = loaded[i].targets
            pad = t[:1].expand(width - t.shape[0], *t.shape[1:])
            targets.append(torch.cat([t, pad]))
        maps = model.error_maps(
            torch.stack([loaded[i].lq for i in group]).to(device),
            torch.stack(targets).to(device),
            torch.cat([conditions[i].timestep for i in group]).to(device),
            torch.cat([conditions[i].noise for i in group]).to(device),
            [conditions[i].prompt for i in group],
            [conditions[i].negative for i in group],
        )
        for row, i in enumerate(group):
            out[i] = maps[row, : loaded[i].targets.shape[0]]
    return out


class PolicyErrors(nn.Module):
    """The policy's forward as one ``nn.Module`` call, so DDP sees one forward per micro-step."""

    def __init__(self, model: SRModel):
        super().__init__()
        self.model = model

    def forward(
        self, loaded: Sequence[LoadedItem], conditions: Sequence[Conditions]
    ) -> list[torch.Tensor]:
        return error_maps_batched(
            self.model, loaded, conditions, next(self.model.parameters()).device
        )


def reference_errors(
    model: SRModel, loaded: Sequence[LoadedItem], conditions: Sequence[Conditions]
) -> list[torch.Tensor]:
    """The frozen reference's error maps under the same draws (no gradient)."""
    with torch.no_grad(), model.reference():
        return error_maps_batched(model, loaded, conditions, next(model.parameters()).device)


LossFunction = Callable[..., tuple[torch.Tensor, dict[str, float]]]


def _dspo(err_theta, err_ref, masks, weights, winners, losers, config: TrainConfig):
    return losses.dspo_loss(
        err_theta, err_ref, masks, weights, winners, losers, beta=config.beta, k=config.k
    )


def _dpo(err_theta, err_ref, masks, weights, winners, losers, config: TrainConfig):
    # the image-level pair: one winner, one loser, the full image
    return losses.dpo_loss(
        err_theta, err_ref, int(winners[0]), int(losers[0]), beta=config.beta, k=config.k
    )


def _dro(err_theta, err_ref, masks, weights, winners, losers, config: TrainConfig):
    return losses.dro_loss(
        err_theta, err_ref, masks, weights, winners, losers, margin=config.dro_margin
    )


def _sft(err_theta, err_ref, masks, weights, winners, losers, config: TrainConfig):
    return losses.sft_loss(err_theta, masks, weights, winners)


#: each :attr:`pipeline.contracts.Method.loss` and the function computing it for one LQ
LOSSES: dict[str, LossFunction] = {"dspo": _dspo, "dpo": _dpo, "dro": _dro, "sft": _sft}


def lq_loss(
    method_name: str,
    err_theta: torch.Tensor,
    err_ref: torch.Tensor | None,
    loaded: LoadedItem,
    config: TrainConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The method's loss for one LQ from its shared error maps (masks area-resized to the grid)."""
    item = loaded.item
    masks = losses.resize_masks_to_grid(loaded.masks, *err_theta.shape[-2:]).to(err_theta.device)
    weights = torch.tensor(item.weights)
    winners, losers = torch.tensor(item.winners), torch.tensor(item.losers)
    loss = LOSSES[contracts.method(method_name).loss]
    return loss(err_theta, err_ref, masks, weights, winners, losers, config)


def shared_error_maps(
    policy: nn.Module,
    model: SRModel,
    loaded: Sequence[LoadedItem],
    conditions: Sequence[Conditions],
    method_name: str,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Policy and reference maps over each LQ's distinct candidates (the reference only for a
    method that needs one)."""
    err_ref: list[torch.Tensor | None] = [None] * len(loaded)
    if contracts.method(method_name).needs_reference:
        err_ref = reference_errors(model, loaded, conditions)
    return policy(loaded, conditions), err_ref


def losses_from_errors(
    err_theta: Sequence[torch.Tensor],
    err_ref: Sequence[torch.Tensor | None],
    loaded: Sequence[LoadedItem],
    method_name: str,
    config: TrainConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over LQs of the method's loss (computed in fp32, outside any autocast)."""
    return losses.mean_over_lqs(
        [
            lq_loss(method_name, et, er, entry, config)
            for et, er, entry in zip(err_theta, err_ref, loaded, strict=True)
        ]
    )


def batch_loss(
    policy: nn.Module,
    model: SRModel,
    loaded: Sequence[LoadedItem],
    conditions: Sequence[Conditions],
    method_name: str,
    config: TrainConfig,
    autocast=None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over LQs of the method's loss, with shared forwards per LQ; the forwards run under
    ``autocast`` (a context manager, e.g. accelerate's) when given, the loss in fp32 outside."""
    with autocast() if autocast is not None else contextlib.nullcontext():
        err_theta, err_ref = shared_error_maps(policy, model, loaded, conditions, method_name)
    return losses_from_errors(err_theta, err_ref, loaded, method_name, config)


# -- the two-pass step (train.memory: two_pass) ---------------------------------------------------
# The loss depends on the policy only through its error maps, so
#   dL/dθ = Σ_n Σ_pixels dL/d err_n · d err_n/dθ.
# Pass 1 runs the policy without gradients and differentiates the loss with respect to the maps
# (small tensors); pass 2 re-runs one candidate per LQ at a time with gradients and
# back-propagates (err_n · dL/d err_n).sum(): the same gradient with the activations of one
# candidate per LQ alive, however many candidates an LQ has.


def uses_two_pass(config: TrainConfig, loaded: Sequence[LoadedItem], device: torch.device) -> bool:
    """``train.memory``: two_pass, one_pass, or auto (two_pass on CUDA when some LQ has more than
    two distinct candidates: that is where one-pass memory exceeds Diffusion-DPO's)."""
    if config.memory != "auto":
        return config.memory == "two_pass"
    return device.type == "cuda" and any(entry.targets.shape[0] > 2 for entry in loaded)


def error_map_gradients(
    model: SRModel,
    loaded: Sequence[LoadedItem],
    conditions: Sequence[Conditions],
    method_name: str,
    config: TrainConfig,
    scale: float = 1.0,
    autocast=None,
) -> tuple[torch.Tensor, dict[str, float], list[torch.Tensor]]:
    """Pass 1: the batch loss and statistics (as :func:`batch_loss` computes them) and the
    derivative of ``scale * loss`` with respect to each LQ's policy error maps ``[D_i, h, w]``."""
    with torch.no_grad(), autocast() if autocast is not None else contextlib.nullcontext():
        err_theta = error_maps_batched(model, loaded, conditions, next(model.parameters()).device)
        err_ref: list[torch.Tensor | None] = [None] * len(loaded)
        if contracts.method(method_name).needs_reference:
            err_ref = reference_errors(model, loaded, conditions)
    leaves = [maps.detach().requires_grad_() for maps in err_theta]
    with torch.enable_grad():
        loss, stats = losses_from_errors(leaves, err_ref, loaded, method_name, config)
        gradients = torch.autograd.grad(loss * scale, leaves)
    return loss.detach(), stats, list(gradients)


def backward_one_candidate_at_a_time(
    policy: nn.Module,
    loaded: Sequence[LoadedItem],
    conditions: Sequence[Conditions],
    gradients: Sequence[torch.Tensor],
    backward: Callable[[torch.Tensor], None],
    autocast=None,
    hold_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    sync_at_end: bool = True,
) -> None:
    """Pass 2: for each candidate slot ``n``, the policy's error maps of every LQ's ``n``-th
    distinct candidate with gradients (one batched forward: one target per LQ, whatever the
    number of candidates) and ``backward(sum_i (map_i * its gradient).sum())``. ``hold_sync``
    (e.g. accelerate's ``no_sync``) wraps every backward but the last (and the last too unless
    ``sync_at_end``), so DDP all-reduces once per optimizer step."""
    slots = max(entry.targets.shape[0] for entry in loaded)
    for n in range(slots):
        rows = [i for i, entry in enumerate(loaded) if entry.targets.shape[0] > n]
        ones = [
            LoadedItem(loaded[i].item, loaded[i].lq, loaded[i].targets[n : n + 1], loaded[i].masks)
            for i in rows
        ]
        syncs = sync_at_end and n == slots - 1
        with contextlib.nullcontext() if syncs or hold_sync is None else hold_sync():
            with autocast() if autocast is not None else contextlib.nullcontext():
                maps = policy(ones, [conditions[i] for i in rows])
            total = sum(
                (m * gradients[i][n : n + 1].to(m.dtype)).sum()
                for m, i in zip(maps, rows, strict=True)
            )
            backward(total)
