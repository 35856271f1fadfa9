"""Policy sampling for online alignment: DDPO's step log-prob, its stat tracker and PPO loss,
a one-step Gaussian policy and Diffusion-DRO's buffer of online negatives (docs/online_alignment.md).

Core components only; the train stage calls them (docs/online_alignment.md, "Integration").

- :func:`ddim_step_with_log_prob`: one DDIM step ``x_t -> x_{t-1}`` as a Gaussian policy
  ``N(mu_t, sigma_t^2 I)`` (DDIM Eqs. 12 and 16) and the log-density of the step, averaged over
  every non-batch dimension, as ``kvablack/ddpo-pytorch``
  (``ddpo_pytorch/diffusers_patch/ddim_with_logprob.py``) computes it;
- :class:`PerLQStatTracker`: ddpo-pytorch's ``PerPromptStatTracker``
  (``ddpo_pytorch/stat_tracking.py``) with the LQ image id in place of the prompt;
- :func:`ppo_clipped_loss`: the PPO clipped surrogate of ddpo-pytorch ``scripts/train.py``;
- :func:`gaussian_onestep_policy`: a Gaussian on the one-step latent (a one-action policy, NOT
  DDPO's multi-step MDP);
- :class:`OnlineNegativeBuffer` and :func:`perturbed_timesteps`: Diffusion-DRO's replay buffer
  of policy trajectories (``basiclab/DiffusionDRO`` ``misc/buffer.py`` and ``train.py``).

Shapes: ``B`` samples, latent ``[B, C, h, w]`` (any number of non-batch dimensions works),
``T`` steps of a trajectory. Log-probs are ``[B]``. Every random draw takes an explicit
``torch.Generator`` (or one per sample), never the global RNG's state implicitly, so the
train stage can key draws by (seed, step, image id) (:mod:`pipeline.seeding`).
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

#: ddpo-pytorch ``config/base.py`` (HEAD 1958463): PPO clip range, advantage clip
DDPO_CLIP_RANGE = 1e-4
DDPO_ADV_CLIP_MAX = 5.0
#: ddpo-pytorch ``config/base.py``: ``per_prompt_stat_tracking.buffer_size`` / ``min_count``
DDPO_STAT_BUFFER_SIZE = 16
DDPO_STAT_MIN_COUNT = 16
#: ddpo-pytorch ``stat_tracking.py``: added to the std of the rewards
STAT_EPS = 1e-6
#: basiclab/DiffusionDRO ``train.py`` click defaults: ``--buffer_size`` (trajectories),
#: ``--buffer_sample_steps`` (refill period) and ``--buffer_update_steps`` (policy sync
#: period), both in micro-steps; 16 = its ``--gradient_accumulation_steps``, i.e. M = 1
DRO_BUFFER_SIZE = 4
DRO_REFILL_EVERY = 1
DRO_SYNC_EVERY = 16

_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


# -- shared helpers ------------------------------------------------------------------------------


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` (or a scalar) as ``[B, 1, ..., 1]`` broadcastable against ``like [B, ...]``."""
    if values.ndim == 0:
        values = values.expand(like.shape[0])
    if values.ndim != 1 or values.shape[0] != like.shape[0]:
        raise ValueError(
            f"expected a scalar or one value per sample ({like.shape[0]}), got shape "
            f"{tuple(values.shape)}"
        )
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1))).to(like)


def _draw_noise(
    shape: torch.Size, like: torch.Tensor, generator: torch.Generator | Sequence | None
) -> torch.Tensor:
    """Standard normal noise as diffusers draws it (``randn_tensor``: a CPU generator draws on
    the CPU and the noise moves to ``like.device``; a list gives one generator per sample)."""
    from diffusers.utils.torch_utils import randn_tensor

    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        generator = list(generator)
    return randn_tensor(shape, generator=generator, device=like.device, dtype=like.dtype)


def gaussian_log_prob(value: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``log N(value; mean, std^2)`` per element, averaged over all non-batch dimensions: ``[B]``.

    ``value`` is detached (the density is a function of the policy's parameters through
    ``mean``), as ddpo-pytorch does. ``std`` broadcasts against ``mean``.
    """
    log_prob = -((value.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


# -- DDIM step as a Gaussian policy (DDPO) -------------------------------------------------------


def _timesteps(timestep: int | torch.Tensor, batch: int) -> torch.Tensor:
    timesteps = torch.as_tensor(timestep).detach().to("cpu", torch.long)
    if timesteps.ndim == 0:
        return timesteps.expand(batch).clone()
    if timesteps.shape != (batch,):
        raise ValueError(
            f"timestep must be a scalar or one per sample ({batch}), got shape "
            f"{tuple(timesteps.shape)}"
        )
    return timesteps


def ddim_step_with_log_prob(
    scheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One stochastic DDIM step and its log-probability (DDPO's policy step).

    ``scheduler`` is a diffusers ``DDIMScheduler`` after ``set_timesteps``; its config's
    ``prediction_type`` (``epsilon``, ``v_prediction`` or ``sample``), ``clip_sample`` and
    ``thresholding`` apply as in ``DDIMScheduler.step``. ``model_output`` and ``sample`` are
    ``[B, C, h, w]``; ``timestep`` is an int or ``[B]`` (one per sample: perturbed grids).

    The step is Gaussian: mean ``mu_t = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2)
    eps_hat`` (DDIM Eq. 12), std ``sigma_t = eta sqrt((1 - abar_prev)/(1 - abar_t) (1 - abar_t /
    abar_prev))`` (Eq. 16), with ``prev = t - num_train_timesteps // num_inference_steps`` and
    ``abar_prev = final_alpha_cumprod`` where ``prev < 0`` (as diffusers).

    Without ``prev_sample`` the step is sampled, ``mu_t + sigma_t z`` with ``z`` drawn by
    ``generator`` (one, or one per sample) exactly as ``DDIMScheduler.step`` draws it, so with
    the same generator state the sample equals diffusers'. With ``prev_sample`` (e.g. stored
    from sampling) it is only evaluated: returned unchanged, nothing is drawn; passing both
    raises. Returns ``(prev_sample [B, C, h, w] in sample's dtype, log_prob [B])``, the log-prob
    averaged over every non-batch dimension (ddpo-pytorch), differentiable through
    ``model_output``.

    ``eta == 0`` is plain DDIM: deterministic, with no density, so ``log_prob`` is NaN and
    evaluating a given ``prev_sample`` raises. A step whose variance is 0 (``set_alpha_to_one``
    at the final step) has no finite log-prob either; SD's schedule (``set_alpha_to_one:
    false``) never has one.
    """
    _check_step_arguments(scheduler, model_output, sample, eta, prev_sample, generator)
    batch = sample.shape[0]
    alpha_prod_t, alpha_prod_t_prev, std_dev_t = _step_coefficients(scheduler, timestep, batch, eta)

    model_output = _at_least_fp32(model_output)
    x_t = _at_least_fp32(sample)
    alpha_prod_t = _per_sample(alpha_prod_t, x_t)
    alpha_prod_t_prev = _per_sample(alpha_prod_t_prev, x_t)
    std_dev_t = _per_sample(std_dev_t, x_t)
    pred_original_sample, pred_epsilon = _predict_x0_and_epsilon(
        scheduler, model_output, x_t, alpha_prod_t
    )

    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
    prev_sample_mean = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction

    if prev_sample is None and eta == 0:  # diffusers draws no noise at eta 0 either
        prev_sample = prev_sample_mean.to(sample.dtype)
    elif prev_sample is None:
        noise = _draw_noise(model_output.shape, model_output, generator)
        prev_sample = (prev_sample_mean + std_dev_t * noise).to(sample.dtype)
    if eta == 0:
        log_prob = torch.full((batch,), math.nan, device=x_t.device, dtype=x_t.dtype)
    else:
        log_prob = gaussian_log_prob(_at_least_fp32(prev_sample), prev_sample_mean, std_dev_t)
    return prev_sample, log_prob


def _check_step_arguments(
    scheduler,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None,
    generator: torch.Generator | Sequence[torch.Generator] | None,
) -> None:
    """Nothing; raises unless :func:`ddim_step_with_log_prob`'s arguments fit together."""
    from diffusers import DDIMScheduler

    if not isinstance(scheduler, DDIMScheduler):
        raise TypeError(f"need a diffusers DDIMScheduler, got {type(scheduler).__name__}")
    if scheduler.num_inference_steps is None:
        raise ValueError("the scheduler has no timesteps: call scheduler.set_timesteps(steps)")
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output {tuple(model_output.shape)} and sample {tuple(sample.shape)} differ"
        )
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if prev_sample is not None and generator is not None:
        raise ValueError("pass prev_sample (evaluate) or generator (sample), not both")
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(
            f"prev_sample {tuple(prev_sample.shape)} and sample {tuple(sample.shape)} differ"
        )
    if prev_sample is not None and eta == 0:
        raise ValueError("eta = 0 is deterministic DDIM: a given prev_sample has no density")


def _step_coefficients(
    scheduler, timestep: int | torch.Tensor, batch: int, eta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample ``[B]``: ``abar_t``, ``abar_prev`` and the step's std ``sigma_t`` (Eq. 16)."""
    config = scheduler.config
    timesteps = _timesteps(timestep, batch)
    prev_timesteps = timesteps - config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod
    alpha_prod_t = alphas[timesteps]
    alpha_prod_t_prev = torch.where(
        prev_timesteps >= 0,
        alphas[prev_timesteps.clamp(min=0)],
        torch.as_tensor(scheduler.final_alpha_cumprod, dtype=alphas.dtype),
    )
    # DDIMScheduler._get_variance, per sample
    variance = ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t)) * (
        1 - alpha_prod_t / alpha_prod_t_prev
    )
    return alpha_prod_t, alpha_prod_t_prev, eta * variance**0.5


def _predict_x0_and_epsilon(
    scheduler, model_output: torch.Tensor, x_t: torch.Tensor, alpha_prod_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0_hat, eps_hat)`` from the model output by the scheduler's ``prediction_type``, with
    ``x0_hat`` thresholded or clipped as ``DDIMScheduler.step`` does."""
    config = scheduler.config
    beta_prod_t = 1 - alpha_prod_t
    kind = config.prediction_type
    if kind == "epsilon":
        pred_original_sample = (x_t - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        pred_epsilon = model_output
    elif kind == "sample":
        pred_original_sample = model_output
        pred_epsilon = (x_t - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
    elif kind == "v_prediction":
        pred_original_sample = (alpha_prod_t**0.5) * x_t - (beta_prod_t**0.5) * model_output
        pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * x_t
    else:
        raise ValueError(f"unsupported scheduler prediction_type {kind!r}")

    if config.thresholding:
        pred_original_sample = scheduler._threshold_sample(pred_original_sample)
    elif config.clip_sample:
        pred_original_sample = pred_original_sample.clamp(
            -config.clip_sample_range, config.clip_sample_range
        )
    return pred_original_sample, pred_epsilon


# -- one-step policy -----------------------------------------------------------------------------


def gaussian_onestep_policy(
    mean: torch.Tensor,
    std: float | torch.Tensor,
    sample: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-step framework's stochastic policy: ``z ~ N(z_hat, std^2 I)`` on the latent.

    ``mean`` is the one-step model's latent prediction ``z_hat [B, C, h, w]``
    (``OneStepSR.predict_latent``), ``std`` a positive float or ``[B]``. Without ``sample`` one
    is drawn with ``generator`` (one, or one per sample; ``randn_tensor`` as diffusers); with it
    the given latent is only evaluated (passing both raises). Returns ``(sample [B, C, h, w],
    log_prob [B])``, the log-density averaged over every non-batch dimension (the convention of
    :func:`ddim_step_with_log_prob`), differentiable through ``mean``.

    This is NOT DDPO's multi-step MDP: a one-step generator has no denoising chain, so the
    "trajectory" is ONE Gaussian action whose mean is the deterministic one-step output and
    whose spread ``std`` is a chosen exploration scale, not a quantity of the diffusion model.
    A PPO loss over it is a one-action (bandit) policy gradient; tables must name it
    "one-step Gaussian policy", never DDPO. (GDPO-SR instead makes the one-step model
    stochastic by noising its input, Joyies/GDPO; docs/online_alignment.md.)
    """
    std = torch.as_tensor(std, dtype=torch.promote_types(mean.dtype, torch.float32))
    if not bool((std > 0).all()) or not bool(torch.isfinite(std).all()):
        raise ValueError(f"std must be positive and finite, got {std}")
    if sample is not None and generator is not None:
        raise ValueError("pass sample (evaluate) or generator (sample), not both")
    if sample is not None and sample.shape != mean.shape:
        raise ValueError(f"sample {tuple(sample.shape)} and mean {tuple(mean.shape)} differ")
    mean32 = _at_least_fp32(mean)
    std = _per_sample(std, mean32)
    if sample is None:
        noise = _draw_noise(mean.shape, mean32, generator)
        sample = (mean32 + std * noise).detach().to(mean.dtype)
    return sample, gaussian_log_prob(_at_least_fp32(sample), mean32, std)


# -- advantages ----------------------------------------------------------------------------------


class PerLQStatTracker:
    """Per-LQ reward normalisation: ddpo-pytorch's ``PerPromptStatTracker`` keyed by image id.

    Each LQ keeps its last ``buffer_size`` rewards (a FIFO across steps). :meth:`update` appends a
    batch's rewards, then normalises each LQ's rewards with the mean and std (NumPy's, ddof 0,
    plus ``1e-6``) of that LQ's buffer once it holds at least ``min_count`` rewards, else with the
    mean and std of the whole batch (the global fallback). Defaults: ddpo-pytorch
    ``config/base.py`` (16 / 16).
    """

    def __init__(
        self, buffer_size: int = DDPO_STAT_BUFFER_SIZE, min_count: int = DDPO_STAT_MIN_COUNT
    ) -> None:
        if int(buffer_size) < 1 or int(min_count) < 1:
            raise ValueError(
                f"buffer_size ({buffer_size}) and min_count ({min_count}) must be >= 1"
            )
        if int(min_count) > int(buffer_size):
            raise ValueError(
                f"min_count ({min_count}) > buffer_size ({buffer_size}): per-LQ statistics "
                "would never be used"
            )
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self.stats: dict[str, deque[float]] = {}

    def update(self, image_ids: Sequence[str], rewards: Sequence[float] | np.ndarray) -> np.ndarray:
        """Advantages ``float64 [B]`` for ``rewards [B]`` of the LQs ``image_ids [B]``.

        The batch is everything gathered over processes (as ddpo-pytorch gathers before
        updating), so every process computes the same advantages.
        """
        ids = np.asarray([str(i) for i in image_ids], dtype=object)
        values = np.asarray(rewards, dtype=np.float64).reshape(-1)
        if len(ids) != len(values):
            raise ValueError(f"{len(ids)} image ids for {len(values)} rewards")
        if not np.isfinite(values).all():
            raise ValueError(f"rewards must be finite, got {values.tolist()}")
        advantages = np.empty_like(values)
        if len(values) == 0:
            return advantages
        for image_id in sorted(set(ids.tolist())):
            where = ids == image_id
            lq_rewards = values[where]
            buffer = self.stats.setdefault(image_id, deque(maxlen=self.buffer_size))
            buffer.extend(lq_rewards.tolist())
            if len(buffer) < self.min_count:
                mean, std = np.mean(values), np.std(values) + STAT_EPS
            else:
                mean, std = np.mean(buffer), np.std(buffer) + STAT_EPS
            advantages[where] = (lq_rewards - mean) / std
        return advantages

    def get_stats(self) -> dict[str, dict[str, float]]:
        """Per LQ: mean, std and count of its buffer (for logging)."""
        return {
            key: {"mean": float(np.mean(v)), "std": float(np.std(v)), "count": len(v)}
            for key, v in self.stats.items()
        }

    def state_dict(self) -> dict[str, Any]:
        """A JSON-able plain dict (floats round-trip exactly through ``json``)."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "stats": {key: list(buffer) for key, buffer in sorted(self.stats.items())},
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PerLQStatTracker:
        tracker = cls(int(state["buffer_size"]), int(state["min_count"]))
        for key, values in state["stats"].items():
            tracker.stats[str(key)] = deque(map(float, values), maxlen=tracker.buffer_size)
        return tracker


# -- PPO -----------------------------------------------------------------------------------------


def ppo_clipped_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float = DDPO_CLIP_RANGE,
    adv_clip_max: float = DDPO_ADV_CLIP_MAX,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DDPO's PPO clipped surrogate for one timestep of a batch (ddpo-pytorch ``train.py``).

    ``log_prob [B]`` under the current policy (differentiable), ``old_log_prob [B]`` recorded at
    sampling, ``advantages [B]`` (from :class:`PerLQStatTracker`). With ``A = clamp(adv,
    ±adv_clip_max)`` and ``r = exp(log_prob - old_log_prob)``::

        loss = mean(max(-A r, -A clamp(r, 1 - clip_range, 1 + clip_range)))

    Stats (detached floats): ``approx_kl = 0.5 mean((log_prob - old_log_prob)^2)``, ``clipfrac =
    mean(|r - 1| > clip_range)``, ``ratio_mean``. Defaults: ddpo-pytorch ``config/base.py``
    (clip range 1e-4, advantage clip 5; TRL's DDPOConfig has the same).
    """
    if not (log_prob.shape == old_log_prob.shape == advantages.shape) or log_prob.ndim != 1:
        raise ValueError(
            f"log_prob {tuple(log_prob.shape)}, old_log_prob {tuple(old_log_prob.shape)} and "
            f"advantages {tuple(advantages.shape)} must all be [B]"
        )
    if clip_range <= 0 or adv_clip_max <= 0:
        raise ValueError(f"clip_range ({clip_range}) and adv_clip_max ({adv_clip_max}) must be > 0")
    log_prob = _at_least_fp32(log_prob)
    old_log_prob = old_log_prob.detach().to(log_prob)
    advantages = torch.clamp(advantages.detach().to(log_prob), -adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.mean(torch.maximum(unclipped, clipped))
    with torch.no_grad():
        stats = {
            "approx_kl": float(0.5 * torch.mean((log_prob - old_log_prob) ** 2)),
            "clipfrac": float(torch.mean((torch.abs(ratio - 1.0) > clip_range).float())),
            "ratio_mean": float(ratio.mean()),
        }
    return loss, stats


# -- Diffusion-DRO's online negatives ------------------------------------------------------------


def perturbed_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int,
    batch_size: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Diffusion-DRO's per-trajectory timestep grids ``int64 [B, T]`` (``train.py``,
    ``--buffer_perturb_timesteps``): ``[(T-1) r, ..., r, 0]`` with ``r = num_train_timesteps //
    T``, plus one offset in ``[0, r)`` per trajectory, shared by its T steps, so training sees
    every timestep although sampling takes T. Usable with :func:`ddim_step_with_log_prob`'s
    per-sample timesteps (its step is ``r``)."""
    ratio = num_train_timesteps // num_inference_steps
    if ratio < 1:
        raise ValueError(f"{num_inference_steps} steps exceed {num_train_timesteps} timesteps")
    grid = (torch.arange(num_inference_steps) * ratio).flip(0)
    offsets = torch.randint(0, ratio, (batch_size,), generator=generator)
    return grid[None, :] + offsets[:, None]


class OnlineNegativeBuffer:
    """A FIFO of policy trajectories for Diffusion-DRO's online negatives (DRO ``misc/buffer.py``).

    One entry is one trajectory of one LQ: ``image_id``, the states fed to the policy ``[T, C, h,
    w]``, their timesteps ``[T]`` (strictly decreasing), the targets ``[T, C, h, w]`` (the
    policy's own ε-prediction at each state) and the prompt it was sampled under (DRO keeps the
    prompt embedding ``c`` with the trajectory and trains on it; ``""`` when not given). The buffer keeps the ``size`` newest trajectories
    (whole trajectories are trimmed, as DRO does). :meth:`sample` draws as DRO: trajectories
    without replacement (with replacement when more are asked than held) and one uniform step
    per drawn trajectory.

    Periods, in micro-steps counted from 1 as DRO's loop does: refill (new trajectories) when
    the buffer is empty or ``step % refill_every == 0``; copy the trained weights into the
    sampling policy when ``step % sync_every == 0``. Defaults: DRO's click defaults (size 4,
    refill 1, sync 16 = its gradient accumulation, the paper's M = 1).

    Tensors are kept detached on the CPU (DRO's ``cpu_offload``). :meth:`state_dict` gives a dict
    of tensors (safetensors-ready) and :meth:`from_state_dict` restores it bit for bit; the
    generator of :meth:`sample` is the caller's (keyed by seed and step), so a resumed run
    draws what an uninterrupted one draws.
    """

    def __init__(
        self,
        size: int = DRO_BUFFER_SIZE,
        refill_every: int = DRO_REFILL_EVERY,
        sync_every: int = DRO_SYNC_EVERY,
    ) -> None:
        for name, value in (("size", size), ("refill_every", refill_every)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if int(sync_every) < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.size = int(size)
        self.refill_every = int(refill_every)
        self.sync_every = int(sync_every)
        self.image_ids: list[str] = []
        self.prompts: list[str] = []  # the text each trajectory was sampled under
        self.states: torch.Tensor | None = None  # [N, T, C, h, w]
        self.timesteps: torch.Tensor | None = None  # int64 [N, T]
        self.targets: torch.Tensor | None = None  # [N, T, C, h, w]

    def __len__(self) -> int:
        return len(self.image_ids)

    # -- periods ---------------------------------------------------------------------------
    def due_for_refill(self, step: int) -> bool:
        """Whether micro-step ``step`` (from 1) samples new trajectories first (DRO L655)."""
        return len(self) == 0 or step % self.refill_every == 0

    def due_for_sync(self, step: int) -> bool:
        """Whether the sampling policy takes the trained weights after micro-step ``step``
        (DRO L805-807)."""
        return step % self.sync_every == 0

    def refill_batches(
        self, train_batch_size: int, sampler_batch_size: int, accumulation: int = 1
    ) -> int:
        """Sampler batches to draw at a refill (DRO L656-659): ``accumulation``, and when the
        buffer is empty at least enough for one training batch."""
        if len(self) == 0:
            return max(math.ceil(train_batch_size / sampler_batch_size), accumulation)
        return accumulation

    # -- contents --------------------------------------------------------------------------
    def add(
        self,
        image_ids: Sequence[str],
        states: torch.Tensor,
        timesteps: torch.Tensor,
        targets: torch.Tensor,
        prompts: Sequence[str] | None = None,
    ) -> None:
        """Append ``B`` trajectories: ``states`` and ``targets`` ``[B, T, C, h, w]``,
        ``timesteps`` ``[B, T]`` (or ``[T]``, shared), ``prompts`` (one per trajectory, default
        ``""``), then keep the ``size`` newest."""
        ids = [str(i) for i in image_ids]
        texts = [""] * len(ids) if prompts is None else [str(p) for p in prompts]
        if len(texts) != len(ids):
            raise ValueError(f"{len(texts)} prompts for {len(ids)} trajectories")
        if states.ndim < 3 or states.shape != targets.shape:
            raise ValueError(
                f"states {tuple(states.shape)} and targets {tuple(targets.shape)} must be the "
                "same [B, T, ...] shape"
            )
        batch, steps = states.shape[:2]
        if len(ids) != batch:
            raise ValueError(f"{len(ids)} image ids for {batch} trajectories")
        times = torch.as_tensor(timesteps).detach().to("cpu", torch.long)
        if times.ndim == 1:
            times = times[None].expand(batch, -1)
        if times.shape != (batch, steps):
            raise ValueError(f"timesteps {tuple(times.shape)} must be [B, T] = {(batch, steps)}")
        if steps > 1 and not bool((times[:, :-1] > times[:, 1:]).all()):
            raise ValueError(f"timesteps must decrease strictly along each trajectory: {times}")
        if self.states is not None and (
            states.shape[1:] != self.states.shape[1:] or states.dtype != self.states.dtype
        ):
            raise ValueError(
                f"trajectories {tuple(states.shape[1:])} {states.dtype} do not match the "
                f"buffer's {tuple(self.states.shape[1:])} {self.states.dtype}"
            )
        new = [states.detach().cpu().clone(), times.clone(), targets.detach().cpu().clone()]
        if self.states is not None:
            new = [torch.cat([old, part]) for old, part in zip(self._tensors(), new, strict=True)]
        self.image_ids = (self.image_ids + ids)[-self.size :]
        self.prompts = (self.prompts + texts)[-self.size :]
        self.states, self.timesteps, self.targets = (part[-self.size :] for part in new)

    def _tensors(self) -> list[torch.Tensor]:
        return [self.states, self.timesteps, self.targets]

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        """``batch_size`` (state, timestep, target) triplets, DRO's draw (``buffer.py`` L105-118).

        Returns ``image_ids`` and ``prompts`` (lists of str), ``states [b, C, h, w]``,
        ``timesteps int64 [b]``, ``targets [b, C, h, w]`` (CPU copies).
        """
        if len(self) == 0:
            raise ValueError("the online-negative buffer is empty: refill it before sampling")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        count, steps = self.timesteps.shape
        if batch_size <= count:
            rows = torch.randperm(count, generator=generator)[:batch_size]
        else:
            rows = torch.randint(0, count, (batch_size,), generator=generator)
        columns = torch.randint(0, steps, (batch_size,), generator=generator)
        return {
            "image_ids": [self.image_ids[int(i)] for i in rows],
            "prompts": [self.prompts[int(i)] for i in rows],
            "states": self.states[rows, columns].clone(),
            "timesteps": self.timesteps[rows, columns].clone(),
            "targets": self.targets[rows, columns].clone(),
        }

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything as tensors (``safetensors.torch.save_file`` accepts it as is)."""
        ids = json.dumps(self.image_ids).encode("utf-8")
        prompts = json.dumps(self.prompts).encode("utf-8")
        state = {
            "config": torch.tensor([self.size, self.refill_every, self.sync_every]),
            "image_ids": torch.tensor(list(ids), dtype=torch.uint8),
            "prompts": torch.tensor(list(prompts), dtype=torch.uint8),
        }
        if self.states is not None:
            state.update(states=self.states, timesteps=self.timesteps, targets=self.targets)
        return {key: value.contiguous() for key, value in state.items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> OnlineNegativeBuffer:
        size, refill_every, sync_every = (int(v) for v in state["config"])
        buffer = cls(size, refill_every, sync_every)
        buffer.image_ids = json.loads(bytes(state["image_ids"].tolist()).decode("utf-8"))
        buffer.prompts = (
            json.loads(bytes(state["prompts"].tolist()).decode("utf-8"))
            if "prompts" in state
            else [""] * len(buffer.image_ids)
        )
        if buffer.image_ids:
            buffer.states = state["states"].clone()
            buffer.timesteps = state["timesteps"].to(torch.long).clone()
            buffer.targets = state["targets"].clone()
            if not (
                len(buffer.image_ids)
                == len(buffer.prompts)
                == len(buffer.states)
                == len(buffer.timesteps)
            ):
                raise ValueError("online-negative buffer state: entries of different lengths")
        return buffer
