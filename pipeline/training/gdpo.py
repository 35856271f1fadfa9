"""GDPO: group-relative online alignment (GDPO-SR, CVPR 2026, ``Joyies/GDPO``) and its
instance-level form (docs/online_alignment.md "GDPO").

:data:`RUN` is the method of ``contracts.Method.loop == "gdpo"`` for the training session
(:mod:`pipeline.training.session`; pairs and candidates are not read, masks only by
``gdpo_instance``). Per optimizer step, for each LQ of the step's global batch
(``batch_size`` LQs of the training split's data folder, seeded epoch permutations as the
offline loop; split over processes):

1. **Group.** ``policy_group_size`` (G) samples of the CURRENT policy, without gradients, as
   DDPO draws them (:func:`pipeline.training.sampling.sample_policy`; sample ``k`` of the LQ in slot
   ``s`` from ``torch_generator(seed, "train", step, "policy", s, k, image_id)``): multi-step, the
   DDIM policy with ``policy_eta > 0`` over ``policy_steps``; one-step, the one-step Gaussian
   policy ``z ~ N(z_hat, onestep_policy_std^2 I)``. (GDPO-SR's released code draws its group
   from the frozen reference with its noise-aware one-step model; see the docs.)
2. **Attribute-aware reward** (GDPO-SR ``GDPOSR/losses/grpo.py``). The samples, quantised to 8
   bits as the score stage reads them, are scored against the HQ by the score stage's metric
   registry (:func:`pipeline.iqa.score_instances`; one full-image mask for ``gdpo``, the DSPO
   instance masks for ``gdpo_instance``). Within the group, every metric is min-max normalised
   (:func:`minmax_normalised`, 1 = best), then
   ``r_k = w_f * mean_{m in F} n_m(k) + w_d * mean_{m in D} n_m(k)`` (:func:`group_rewards`;
   F = ``gdpo_fidelity_metrics``, GDPO: PSNR; D = ``gdpo_detail_metrics``, no-reference, GDPO:
   MANIQA and MUSIQ) and ``A_k = (r_k - mean r) / (std r + 1e-8)``, std with ddof 1
   (:func:`group_advantages`): zero mean per group. ``w_f, w_d``: ``gdpo_fidelity_weight`` /
   ``gdpo_detail_weight``, or where null GDPO's adaptive ratios of the HQ (the shares of its
   flat and its textured 10 x 10 patches, :func:`attribute_weights`).
3. **Loss** (GDPO-SR ``GDPOSR/train/train_GDPOSR.py``): every sample is a denoising target; the
   policy's and the frozen reference's error maps against it under one seeded timestep and
   noise shared by the group (``torch_generator(seed, "train", step, "gdpo-noise", s,
   image_id)``; :meth:`pipeline.models.base.SRModel.error_maps`, as DSPO), ``D_k = E_theta,k -
   E_ref,k`` and ``loss = -log sigmoid(-k * gdpo_beta * sum_k A_k D_k)`` (:func:`gdpo_loss`);
   the batch loss is the mean over LQs.

``gdpo_instance`` (no published method has it): the rewards, the adaptive weights and the
advantages are per instance of the segment stage's label map (``--masks``), the error maps are
pooled per instance mask and the per-instance losses are summed with DSPO's instance weights
``w_m = |s_m| / sum |s|``: ``-sum_m w_m log sigmoid(-k beta sum_k A_km D_km)``.

Log (``train_log.parquet``, table ``gdpo_log``): per step the loss, the reward's mean and std
over the global batch (the group-normalised ``r``, instance-weighted), the raw metric means
(``scores``, JSON), the reward weights used, the advantage-weighted error gap ``margin`` and the
implicit accuracy (share of LQs whose ``-sum A D > 0``), the policy's and reference's mean errors,
lr and grad norm. Checkpoints and resume as the offline loop (the loop has no state besides
weights, optimizer and RNG: the groups are drawn afresh every step).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import checkpoints, contracts, losses, settings
from pipeline.distributed import gather_objects
from pipeline.io.masks import read_label_map
from pipeline.iqa import score_instances
from pipeline.models.base import PolicySample, SRModel
from pipeline.seeding import torch_generator
from pipeline.training import sampling
from pipeline.training.config import TrainConfig
from pipeline.training.run import learning_rate, step_slots
from pipeline.training.sampling import (
    SampledRun,
    metric_registry,
    my_positions,
    quantised_unit,
)
from pipeline.training.step import STAGE

LOG_TABLE = "gdpo_log"
LOG_COLUMNS = (
    "step",
    "loss",
    "reward_mean",
    "reward_std",
    "scores",
    "fidelity_weight",
    "detail_weight",
    "margin",
    "implicit_accuracy",
    "err_theta",
    "err_ref",
    "lr",
    "grad_norm",
)
LOSS_STATS = ("margin", "implicit_accuracy", "err_theta", "err_ref")
#: the level of each GDPO loss (:attr:`pipeline.contracts.Method.loss`)
LEVELS = {"gdpo": "image", "gdpo_instance": "instance"}
#: GDPO-SR ``grpo.py``: added to the group's std
STD_EPSILON = 1e-8
#: GDPO-SR ``my_utils/mask.py`` and its dataset (``create_complexity_matrix(gray, patch_size=10)``,
#: ``binarize_complexity_matrix(threshold=50)``): patch edge, the size each patch is resized to,
#: the gradient histogram's bins and range, and the complexity above which a patch is "detail"
COMPLEXITY_PATCH = 10
COMPLEXITY_RESIZE = 64
COMPLEXITY_BINS = 512
COMPLEXITY_RANGE = (-5.5, 5.5)
COMPLEXITY_THRESHOLD = 50.0
REWARD_FORMULA = (
    "A_k = (r_k - mean_j r_j) / (std_j r_j (ddof 1) + 1e-8) within each LQ's group (per instance "
    "for gdpo_instance), r_k = w_f * mean_{m in fidelity_metrics} n_m(k) + w_d * mean_{m in "
    "detail_metrics} n_m(k), n_m(k) = (v_mk - min_j v_mj) / (max_j v_mj - min_j v_mj) over the "
    "group (1 - that where lower is better; 0 for a constant or non-finite metric)"
)
LOSS_FORMULA = (
    "-sum_m w_m log sigmoid(-k * gdpo_beta * sum_k A_km (E_theta(k, s_m) - E_ref(k, s_m))), "
    "mean over LQs (gdpo: one full-image mask, w = 1)"
)


# -- reward: normalisation within a group --------------------------------------------------------


def minmax_normalised(values: np.ndarray, lower_better: bool) -> np.ndarray:
    """``values [G, ...]`` min-max normalised over the group (axis 0), 1 = the group's best
    (flipped where lower is better). A column that is constant or holds a non-finite value
    gives 0 (GDPO-SR would divide by zero; select gives 0 likewise)."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values).all(axis=0)
    safe = np.where(finite, values, 0.0)
    low, high = safe.min(axis=0), safe.max(axis=0)
    spread = high - low
    valid = finite & (spread > 0)
    scaled = np.divide(safe - low, spread, out=np.zeros_like(safe), where=valid)
    if lower_better:
        scaled = np.where(valid, 1.0 - scaled, 0.0)
    return scaled


def group_rewards(
    scores: Mapping[str, np.ndarray],
    lower_better: Mapping[str, bool],
    fidelity_metrics: Sequence[str],
    detail_metrics: Sequence[str],
    fidelity_weight: np.ndarray | float,
    detail_weight: np.ndarray | float,
) -> np.ndarray:
    """GDPO-SR's attribute-aware reward ``r [G, ...]`` of one group:
    ``w_f * mean_{m in F} n_m + w_d * mean_{m in D} n_m`` (``n_m`` :func:`minmax_normalised`);
    the weights broadcast against the trailing (instance) axis."""

    def mean_normalised(names: Sequence[str]) -> np.ndarray:
        return np.mean([minmax_normalised(scores[m], lower_better[m]) for m in names], axis=0)

    return np.asarray(fidelity_weight) * mean_normalised(fidelity_metrics) + np.asarray(
        detail_weight
    ) * mean_normalised(detail_metrics)


def group_advantages(rewards: np.ndarray) -> np.ndarray:
    """``(r - mean) / (std + 1e-8)`` over the group (axis 0), std with ddof 1 (GDPO-SR
    ``grpo.py``: ``std(unbiased=True)``); each column has zero mean."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.shape[0] < 2:
        raise ValueError("a GDPO group needs at least 2 samples (train.policy_group_size)")
    return (rewards - rewards.mean(axis=0)) / (rewards.std(axis=0, ddof=1) + STD_EPSILON)


# -- reward: GDPO-SR's adaptive fidelity / detail weights ---------------------------------------


def _sobel_magnitude(images: torch.Tensor) -> torch.Tensor:
    """``[P, 1, h, w]`` float64 -> the 3 x 3 Sobel gradient magnitude, replicated borders (as
    ``cv2.Sobel(ksize=3, borderType=BORDER_REPLICATE)``)."""
    kernel = torch.tensor(
        [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64
    )[None, None]
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    dx = F.conv2d(padded, kernel)
    dy = F.conv2d(padded, kernel.transpose(-1, -2))
    return (dx.square() + dy.square()).sqrt()


def patch_complexity(patches: np.ndarray) -> np.ndarray:
    """GDPO-SR's ``calculate_complexity_degree`` of same-sized grey patches ``[P, h, w]`` in
    [0, 1]: each bilinearly resized to 64 x 64, the Shannon entropy (bits) of its Sobel gradient
    magnitude's 512-bin histogram over [-5.5, 5.5], times the patch's area ``h * w``."""
    patches = np.asarray(patches, dtype=np.float64)
    height, width = patches.shape[-2:]
    resized = F.interpolate(
        torch.from_numpy(patches)[:, None],
        size=(COMPLEXITY_RESIZE, COMPLEXITY_RESIZE),
        mode="bilinear",
        align_corners=False,
    )
    magnitudes = _sobel_magnitude(resized)[:, 0].numpy()
    out = np.empty(len(patches))
    for index, magnitude in enumerate(magnitudes):
        hist, _ = np.histogram(magnitude, bins=COMPLEXITY_BINS, range=COMPLEXITY_RANGE)
        hist = hist / (hist.sum() + 1e-5)
        out[index] = -np.sum(hist * np.log2(hist + 1e-10)) * height * width
    return out


def _edges(size: int) -> list[int]:
    """Patch boundaries along one side: whole patches, then the remainder as one patch."""
    whole = size // COMPLEXITY_PATCH
    edges = [i * COMPLEXITY_PATCH for i in range(whole + 1)]
    if edges[-1] < size:
        edges.append(size)
    return edges


def detail_map(hq: torch.Tensor) -> np.ndarray:
    """Boolean ``[H, W]``: the pixels of GDPO-SR's "detail" patches of ``hq [3, H, W]`` in
    [0, 1] (``create_complexity_matrix(gray, 10)`` then ``> 50``). Grey is ITU-R 601 luma
    rounded to 8 bits (GDPO-SR converts its RGB tensor with ``COLOR_BGR2GRAY``, swapping the red
    and blue weights; we do not)."""
    rgb = hq.detach().to(torch.float64).cpu().numpy()
    gray = np.round((0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) * 255.0) / 255.0
    rows, cols = _edges(gray.shape[0]), _edges(gray.shape[1])
    out = np.zeros(gray.shape, dtype=bool)
    by_shape: dict[tuple[int, int], list[tuple[slice, slice]]] = {}
    for top, bottom in zip(rows[:-1], rows[1:], strict=True):
        for left, right in zip(cols[:-1], cols[1:], strict=True):
            by_shape.setdefault((bottom - top, right - left), []).append(
                (slice(top, bottom), slice(left, right))
            )
    for cells in by_shape.values():
        complexity = patch_complexity(np.stack([gray[cell] for cell in cells]))
        for cell, value in zip(cells, complexity, strict=True):
            out[cell] = value > COMPLEXITY_THRESHOLD
    return out


def attribute_weights(hq: torch.Tensor, masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """GDPO-SR's adaptive weights per mask ``([M], [M])``: the share of the mask's pixels in
    flat patches (fidelity) and in detail patches (detail), each rounded to 2 decimals as
    ``binarize_complexity_matrix`` rounds them (a full-image mask gives GDPO-SR's own pair)."""
    detail = torch.from_numpy(detail_map(hq))
    masks = masks.to(torch.bool).cpu()
    area = masks.flatten(1).sum(1).to(torch.float64).clamp_min(1.0)
    share = (masks & detail).flatten(1).sum(1).to(torch.float64) / area
    detail_share = np.round(share.numpy(), 2)
    fidelity_share = np.round(1.0 - share.numpy(), 2)
    return fidelity_share, detail_share


# -- the loss ------------------------------------------------------------------------------------


def gdpo_loss(
    err_theta: torch.Tensor,
    err_ref: torch.Tensor,
    masks: torch.Tensor,
    weights: torch.Tensor,
    advantages: torch.Tensor,
    *,
    beta: float = 5000.0,
    k: float = 0.5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GDPO's loss of one LQ's group: ``-sum_m w_m log sigmoid(-k beta sum_g A_gm D_gm)`` with
    ``D_gm = E_theta(g, s_m) - E_ref(g, s_m)`` the mask-pooled errors
    (:func:`pipeline.losses.instance_errors`) of the group's ``G`` samples.

    ``err_theta``, ``err_ref`` ``[G, h, w]``; ``masks`` ``[M, h, w]``; ``weights`` ``[M]``;
    ``advantages`` ``[G, M]``. With one full mask and ``w = 1`` this is GDPO-SR's
    ``-logsigmoid(-0.5 * 5000 * (sum_g A_g mse_theta,g - sum_g A_g mse_ref,g))`` (``k = 0.5``,
    ``beta = 5000``). Statistics (weighted by ``w_m``, normalised by their sum): ``margin`` =
    ``sum_g A D``, ``implicit_accuracy`` = the share with ``-sum_g A D > 0``, ``err_theta`` and
    ``err_ref`` the mean pooled errors."""
    err_theta = err_theta.to(torch.promote_types(err_theta.dtype, torch.float32))
    err_ref = err_ref.to(err_theta.dtype).to(err_theta.device)
    masks = masks.to(err_theta.device)
    weights = torch.as_tensor(weights, dtype=err_theta.dtype, device=err_theta.device)
    advantages = torch.as_tensor(advantages, dtype=err_theta.dtype, device=err_theta.device)
    groups, instances = err_theta.shape[0], masks.shape[0]
    if advantages.shape != (groups, instances) or weights.shape != (instances,):
        raise ValueError(
            f"advantages {tuple(advantages.shape)} must be [G, M] = [{groups}, {instances}] and "
            f"weights {tuple(weights.shape)} [M]"
        )
    per_theta = losses.instance_errors(err_theta, masks)  # [G, M]
    per_ref = losses.instance_errors(err_ref, masks).detach()
    margins = (advantages * (per_theta - per_ref)).sum(dim=0)  # [M]
    loss = -(weights * F.logsigmoid(-k * beta * margins)).sum()
    with torch.no_grad():
        total = float(weights.sum())

        def mean(values: torch.Tensor) -> float:
            return float((values * weights).sum()) / total if total > 0 else math.nan

        stats = {
            "margin": mean(margins),
            "implicit_accuracy": mean((-k * beta * margins > 0).to(weights.dtype)),
            "err_theta": mean(per_theta.mean(dim=0)),
            "err_ref": mean(per_ref.mean(dim=0)),
        }
    return loss, stats


# -- the reward's metrics ------------------------------------------------------------------------


class GroupReward:
    """The raw scores of a group through the score stage's metric registry, and the metric
    roles of GDPO-SR's reward (fidelity: full-reference; detail: no-reference)."""

    def __init__(self, reward: Mapping[str, Any], config: TrainConfig, seed: int):
        score = reward["score"]
        self.fidelity = [str(m) for m in config.gdpo_fidelity_metrics]
        self.detail = [str(m) for m in config.gdpo_detail_metrics]
        both = sorted(set(self.fidelity) & set(self.detail))
        if both:
            raise settings.ConfigError(
                f"train.gdpo_fidelity_metrics and train.gdpo_detail_metrics share {both}"
            )
        unscored = sorted(set(self.fidelity + self.detail) - set(score["metrics"]))
        if unscored:
            raise settings.ConfigError(
                f"gdpo rewards metrics {unscored} (train.gdpo_fidelity_metrics "
                f"{self.fidelity}, train.gdpo_detail_metrics {self.detail}) that score.metrics "
                f"{list(score['metrics'])} does not score; add them to score.metrics or change "
                "the gdpo metric lists"
            )
        self.registry = metric_registry(score, seed)
        infos = {m: self.registry.info(m) for m in self.fidelity + self.detail}
        wrong = [m for m in self.fidelity if not infos[m].full_reference] + [
            m for m in self.detail if infos[m].full_reference
        ]
        if wrong:
            raise settings.ConfigError(
                f"gdpo's fidelity metrics must be full-reference and its detail metrics "
                f"no-reference (GDPO-SR: PSNR; MANIQA, MUSIQ); wrong kind: {wrong}"
            )
        self.metrics = self.fidelity + self.detail
        self.lower_better = {m: bool(infos[m].lower_better) for m in self.metrics}

    def raw_scores(
        self, images: torch.Tensor, hq: torch.Tensor, masks: torch.Tensor
    ) -> dict[str, np.ndarray]:
        """``{metric: float64 [G, M]}`` of ``images [G, 3, H, W]`` in [-1, 1] against ``hq [3,
        H, W]`` in [0, 1] within each of ``masks [M, H, W]`` (a full mask: the whole image), as
        the score stage computes them from the PNGs the images would be written as."""
        scores = score_instances(self.registry, self.metrics, quantised_unit(images), hq, masks)
        return {name: values.numpy() for name, values in scores.items()}


# -- the policy ----------------------------------------------------------------------------------

#: what metadata and the saved model call each family's policy under gdpo
POLICY_NAMES = {"multistep": "multi-step DDIM policy", "onestep": "one-step Gaussian policy"}


def policy_record(model: SRModel, config: TrainConfig) -> dict[str, Any]:
    """What the group's sampler is, for metadata."""
    name = POLICY_NAMES[model.framework]
    if model.framework == "multistep":
        return {
            "name": name,
            "steps": config.policy_steps,
            "eta": config.policy_eta,
            "cfg": config.policy_cfg,
            "samples_from": "current policy",
        }
    return {
        "name": name,
        "std": config.onestep_policy_std,
        "steps": 1,
        "samples_from": "current policy",
        "note": "z ~ N(z_hat, std^2 I) on the one-step latent; GDPO-SR's noise-aware "
        "one-step sampling (NAOSD) is not used",
    }


# -- one run -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Group:
    """One LQ's G policy samples, their scores and advantages (``M`` masks: 1 for gdpo)."""

    slot: int
    image_id: str
    lq: torch.Tensor  # [G, 3, H, W], HQ-sized, on the device
    prompt: str
    negative: str
    sample: PolicySample
    masks: torch.Tensor  # bool [M, H, W]
    weights: np.ndarray  # [M], sum 1
    scores: dict[str, np.ndarray]  # {metric: [G, M]}
    fidelity_weight: np.ndarray  # [M]
    detail_weight: np.ndarray  # [M]
    rewards: np.ndarray  # [G, M]
    advantages: np.ndarray  # [G, M]


@dataclasses.dataclass
class Trainer(sampling.SampledTrainer):
    config: TrainConfig
    seed: int
    level: str  # "image" or "instance"
    model: SRModel
    accelerator: Any
    optimizer: Any
    trainable: list[torch.nn.Parameter]
    reward: GroupReward
    image_ids: list[str]
    lq_paths: dict[str, Path]
    hq_paths: dict[str, Path]
    texts: dict[str, tuple[str, str]] | None
    masks_path: Path | None = None
    last_good: Path | None = None
    _instances: dict[str, tuple[torch.Tensor, np.ndarray]] = dataclasses.field(default_factory=dict)
    _attributes: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)

    def instances(self, image_id: str, size: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray]:
        """The LQ's masks ``bool [M, H, W]`` and weights ``[M]``: one full mask for gdpo; for
        gdpo_instance every instance of its label map (ascending ids), ``w_m = |s_m| / sum |s|``."""
        if image_id not in self._instances:
            if self.level == "image":
                masks, weights = torch.ones((1, *size), dtype=torch.bool), np.ones(1)
            else:
                label_map = torch.from_numpy(
                    read_label_map(self.masks_path, image_id).astype(np.int64)
                )
                if tuple(label_map.shape) != tuple(size):
                    label_map = F.interpolate(
                        label_map[None, None].double(), size=size, mode="nearest"
                    )[0, 0].long()
                ids = torch.unique(label_map)
                masks = label_map[None] == ids[:, None, None]
                area = masks.flatten(1).sum(1).double()
                weights = (area / area.sum()).numpy()
            self._instances[image_id] = (masks, weights)
        return self._instances[image_id]

    def reward_weights(self, image_id: str, hq: torch.Tensor, masks: torch.Tensor):
        """``(w_f [M], w_d [M])``: the configured weights, else GDPO-SR's adaptive ones."""
        config = self.config
        if config.gdpo_fidelity_weight is None or config.gdpo_detail_weight is None:
            if image_id not in self._attributes:
                self._attributes[image_id] = attribute_weights(hq, masks)
            adaptive = self._attributes[image_id]
        count = masks.shape[0]
        fidelity = (
            adaptive[0]
            if config.gdpo_fidelity_weight is None
            else np.full(count, float(config.gdpo_fidelity_weight))
        )
        detail = (
            adaptive[1]
            if config.gdpo_detail_weight is None
            else np.full(count, float(config.gdpo_detail_weight))
        )
        return fidelity, detail

    def sample_group(self, step: int, position: int, image_id: str) -> Group:
        hq, lq, prompt, negative, sample = self.draw_group(step, position, image_id)
        masks, weights = self.instances(image_id, tuple(hq.shape[-2:]))
        scores = self.reward.raw_scores(sample.images, hq, masks)
        fidelity, detail = self.reward_weights(image_id, hq, masks)
        rewards = group_rewards(
            scores,
            self.reward.lower_better,
            self.reward.fidelity,
            self.reward.detail,
            fidelity,
            detail,
        )
        return Group(
            position,
            image_id,
            lq,
            prompt,
            negative,
            sample,
            masks,
            weights,
            scores,
            fidelity,
            detail,
            rewards,
            group_advantages(rewards),
        )

    def group_loss(self, step: int, group: Group) -> tuple[torch.Tensor, dict[str, float]]:
        """The group's GDPO loss: policy and reference error maps of every sample under the
        group's one seeded (timestep, noise)."""
        model, accelerator = self.model, self.accelerator
        generator = torch_generator(
            self.seed, STAGE, step, "gdpo-noise", group.slot, group.image_id
        )
        lq = group.lq[:1]
        timestep, noise = model.draw_timesteps_and_noise(lq, generator)
        targets = group.sample.images.detach()[None]  # [1, G, 3, H, W]
        arguments = (lq, targets, timestep, noise, [group.prompt], [group.negative])
        with accelerator.autocast():
            err_theta = model.error_maps(*arguments)[0]
        with torch.no_grad(), accelerator.autocast(), model.reference():
            err_ref = model.error_maps(*arguments)[0]
        masks = losses.resize_masks_to_grid(group.masks, *err_theta.shape[-2:])
        return gdpo_loss(
            err_theta,
            err_ref,
            masks,
            torch.as_tensor(group.weights),
            torch.as_tensor(group.advantages),
            beta=self.config.gdpo_beta,
            k=self.config.k,
        )

    def update(self, step: int) -> dict[str, Any]:
        config, accelerator = self.config, self.accelerator
        lr = learning_rate(config, step)
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        slots = step_slots(len(self.image_ids), step, config.batch_size, self.seed)
        total, stats = 0.0, {key: [] for key in LOSS_STATS}
        rewards, raw, fidelity, detail = [], {m: [] for m in self.reward.metrics}, [], []
        for position in my_positions(self.config, self.accelerator):
            group = self.sample_group(step, position, self.image_ids[slots[position]])
            loss, group_stats = self.group_loss(step, group)
            checkpoints.check_finite(
                accelerator,
                loss,
                f"non-finite GDPO loss at step {step + 1} (image "
                f"{group.image_id}); {self.stopped()}",
            )
            accelerator.backward(loss / config.batch_size)
            total += float(loss.detach()) / config.batch_size
            for key in LOSS_STATS:
                stats[key].append(group_stats[key])
            rewards.extend((group.rewards @ group.weights).tolist())
            for metric in self.reward.metrics:
                raw[metric].extend((group.scores[metric] @ group.weights).tolist())
            fidelity.append(float(group.fidelity_weight @ group.weights))
            detail.append(float(group.detail_weight @ group.weights))
        grad_norm = self.summed_update(step)
        rewards_all = np.asarray(gather_objects(accelerator, rewards))
        means = checkpoints.reduce_mean(
            accelerator,
            [float(np.mean(stats[k])) for k in LOSS_STATS]
            + [float(np.mean(fidelity)), float(np.mean(detail))],
        )
        scores = {
            m: float(np.mean(gather_objects(accelerator, raw[m]))) for m in self.reward.metrics
        }
        return {
            "step": step + 1,
            "loss": float(np.sum(gather_objects(accelerator, [total]))),
            "reward_mean": float(np.mean(rewards_all)),
            "reward_std": float(np.std(rewards_all)),
            "scores": json.dumps(scores, sort_keys=True),
            "fidelity_weight": means[-2],
            "detail_weight": means[-1],
            **dict(zip(LOSS_STATS, means[:-2], strict=True)),
            "lr": lr,
            "grad_norm": grad_norm,
        }


class GdpoRun(SampledRun):
    """GDPO's part of the session: the group reward, the level (gdpo: the whole image;
    gdpo_instance: per DSPO instance, reading the segment stage's label maps)."""

    log_table = LOG_TABLE
    log_columns = LOG_COLUMNS
    captures_reference = True

    def check(self) -> None:
        loss = contracts.method(self.job.method).loss
        if loss not in LEVELS:
            raise ValueError(f"method {self.job.method!r} (loss {loss!r}) is not a GDPO method")
        self.level = LEVELS[loss]
        if self.level == "instance" and self.job.masks_path is None:
            raise ValueError(f"{self.job.method} needs the segment stage's label maps (--masks)")

    def read_inputs(self) -> None:
        super().read_inputs()
        self.reward = GroupReward(self.section, self.config, self.job.seed)

    def fingerprint_inputs(self) -> dict[str, Any]:
        inputs = super().fingerprint_inputs()
        if self.level == "instance":
            inputs["masks"] = self.job.masks_path
        return inputs

    def build(self) -> Trainer:
        masks = Path(self.job.masks_path) if self.job.masks_path else None
        return Trainer(
            self.config,
            self.job.seed,
            self.level,
            self.model,
            self.accelerator,
            self.optimizer,
            self.trainable,
            self.reward,
            self.image_ids,
            self.lq_paths,
            self.hq_paths,
            self.texts,
            masks,
        )

    def checkpoint(self) -> dict[str, Any]:
        return {**super().checkpoint(), "extra": {"gdpo": {"level": self.level}}}

    def postfix(self, row: dict) -> dict[str, str]:
        return {"loss": f"{row['loss']:.4f}", "reward": f"{row['reward_mean']:.3f}"}

    def policy_record(self) -> dict[str, Any]:
        return policy_record(self.model, self.config)

    def metadata(self) -> dict[str, Any]:
        config, reward, level = self.config, self.reward, self.level
        adaptive = "GDPO-SR adaptive (share of flat / detail 10x10 patches of the HQ" + (
            ", per instance)" if level == "instance" else ")"
        )
        return {
            **super().metadata(),
            "level": level,
            "masks": str(self.job.masks_path) if level == "instance" else None,
            "reward": {
                "formula": REWARD_FORMULA,
                "fidelity_metrics": reward.fidelity,
                "detail_metrics": reward.detail,
                "fidelity_weight": adaptive
                if config.gdpo_fidelity_weight is None
                else config.gdpo_fidelity_weight,
                "detail_weight": adaptive
                if config.gdpo_detail_weight is None
                else config.gdpo_detail_weight,
                "registry": reward.registry.weights_used(),
                "note": "the objective names the run; GDPO's reward does not use its weights",
            },
            "loss_formula": LOSS_FORMULA,
            "beta": config.gdpo_beta,
            "k": config.k,
        }


RUN = GdpoRun
