"""DDPO: PPO on the policy's own samples, rewarded by the objective's IQA scores.

:data:`RUN` is the method of ``contracts.Method.loop == "ddpo"`` for the training session
(:mod:`pipeline.training.session`; pairs, candidates and masks are not read). Per optimizer
step (docs/online_alignment.md §4):

1. **Sample.** The step's global batch of ``batch_size`` LQs (the training split's data folder,
   :func:`pipeline.contracts.data_images`; seeded epoch permutations as the offline loop) is split
   over processes; for each LQ, ``policy_group_size`` (G) samples of the current policy, without
   gradients, sample ``k`` of the LQ in slot ``s`` drawn by ``torch_generator(seed, "train",
   step, "policy", s, k, image_id)``. Multi-step: DDIM with ``policy_eta > 0`` over
   ``policy_steps`` steps, each step's Gaussian log-prob recorded
   (:meth:`pipeline.models.multistep.MultiStepSR.sample_trajectory`, the model's own sampler).
   One-step: the **one-step Gaussian policy** ``z ~ N(z_hat, onestep_policy_std^2 I)``
   (:meth:`pipeline.models.onestep.OneStepSR.sample_policy`), ONE action: a bandit policy
   gradient, not DDPO's multi-step MDP; metadata and the saved model name it so.
2. **Reward.** The images are quantised to 8 bits (what the score stage reads from PNG) and the
   whole image is scored against the HQ as the score stage scores an image's whole-image row
   (:class:`pipeline.iqa.MetricRegistry` + :func:`pipeline.iqa.score_instances` with the
   full-image mask: pyiqa's numbers, an image smaller than a metric's minimum upscaled as the
   score stage upscales it; configured from the ``score`` section, which the job's settings
   carry as ``reward.score``); the reward of a sample
   is its objective score as select computes it (:func:`pipeline.objectives.objective_scores`: per
   LQ, each metric min-max normalised over the group, flipped where lower is better, weighted by
   ``reward.objectives[objective]``).
3. **Advantages.** Rewards and image ids are gathered over processes and z-scored per LQ by
   :class:`pipeline.policy.PerLQStatTracker` (its state is checkpointed).
4. **PPO.** ``ppo_inner_epochs`` passes, each ONE optimizer update: per sample
   ``int(T * ppo_timestep_fraction)`` of its T steps (its own seeded choice,
   ``torch_generator(seed, "train", step, "ppo-order", epoch, s, k, image_id)``), the log-prob
   recomputed with gradients from the stored states, :func:`pipeline.policy.ppo_clipped_loss`,
   gradients accumulated over LQ groups and timesteps (the loss is the mean over samples and
   timesteps) and summed over processes. The sample order is not shuffled: with one update per
   pass it changes nothing but float summation order. ``gradient_accumulation_steps`` is not
   used (each LQ's group is one forward).

Log (``train_log.parquet``, table ``ddpo_log``): per step the loss, the reward's mean and std
over the global batch (the normalised objective), the raw metric means (``scores``, JSON), PPO's
``approx_kl``, ``clipfrac`` and ``ratio_mean`` (means over passes and timesteps), lr and grad norm.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline import checkpoints, contracts, settings
from pipeline import policy as online
from pipeline.distributed import gather_objects
from pipeline.iqa import score_instances
from pipeline.models.base import PolicySample, SRModel
from pipeline.objectives import objective_scores
from pipeline.seeding import torch_generator
from pipeline.training import sampling
from pipeline.training.config import TrainConfig
from pipeline.training.run import learning_rate, step_slots
from pipeline.training.sampling import (  # noqa: F401  (ddpo's public names)
    SampledRun,
    metric_registry,
    my_positions,
    policy_log_probs,
    quantised_unit,
    sample_policy,
)
from pipeline.training.step import STAGE

LOG_TABLE = "ddpo_log"
LOG_COLUMNS = (
    "step",
    "loss",
    "reward_mean",
    "reward_std",
    "scores",
    "approx_kl",
    "clipfrac",
    "ratio_mean",
    "lr",
    "grad_norm",
)
PPO_STATS = ("approx_kl", "clipfrac", "ratio_mean")


# -- reward --------------------------------------------------------------------------------------


class Reward:
    """The objective's score of whole images through the score stage's metric registry."""

    def __init__(self, reward: Mapping[str, Any], objective: str, seed: int):
        objectives = reward["objectives"]
        if objective not in objectives:
            raise ValueError(
                f"ddpo needs the objective {objective!r} in select.objectives (its reward is that "
                f"objective's score; the job's settings give {sorted(objectives)})"
            )
        self.weights = {str(k): float(v) for k, v in objectives[objective].items()}
        score = reward["score"]
        unscored = sorted(set(self.weights) - set(score["metrics"]))
        if unscored:
            raise ValueError(
                f"objective {objective!r} weighs metrics {unscored} that score.metrics "
                f"{list(score['metrics'])} does not score"
            )
        self.metrics = [m for m in score["metrics"] if m in self.weights]
        self.registry = metric_registry(score, seed)

    def raw_scores(self, images: torch.Tensor, hq: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{metric: float64 [G]}`` of ``images [G, 3, H, W]`` in [-1, 1] against ``hq [3, H,
        W]`` in [0, 1]: the score stage's whole-image scores (:func:`pipeline.iqa.score_instances`
        with the full-image mask, so that a metric with a minimum input size, e.g. NIQE on a
        small crop, is computed as the score stage computes it, not refused by pyiqa)."""
        sr = quantised_unit(images)
        whole = torch.ones((1, *sr.shape[-2:]), dtype=torch.bool)
        scores = score_instances(self.registry, self.metrics, sr, hq, whole)
        return {name: values[:, 0] for name, values in scores.items()}

    def objective(self, image_id: str, scores: Mapping[str, torch.Tensor]) -> np.ndarray:
        """Rewards ``float64 [G]``: select's objective score of each sample within its group."""
        count = len(next(iter(scores.values())))
        names = [f"{k:06d}" for k in range(count)]
        rows = [
            (
                image_id,
                contracts.WHOLE_IMAGE_ID,
                names[k],
                metric,
                float(values[k]),
                self.registry.info(metric).lower_better,
            )
            for metric, values in scores.items()
            for k in range(count)
        ]
        frame = pd.DataFrame(
            rows,
            columns=["image_id", "instance_id", "candidate", "metric", "value", "lower_better"],
        )
        summed = objective_scores(frame, self.weights).set_index("candidate")["score"]
        return summed.loc[names].to_numpy(np.float64)


# -- the policy of each family -------------------------------------------------------------------


def policy_name(model: SRModel) -> str:
    return str(getattr(model, "POLICY_NAME", type(model).__name__))


def policy_record(model: SRModel, config: TrainConfig) -> dict[str, Any]:
    """What the policy is, for metadata (the one-step arm is never called DDPO)."""
    if model.framework == "multistep":
        return {
            "name": policy_name(model),
            "steps": config.policy_steps,
            "eta": config.policy_eta,
            "cfg": config.policy_cfg,
        }
    return {
        "name": policy_name(model),
        "std": config.onestep_policy_std,
        "steps": 1,
        "note": "one Gaussian action on the one-step latent (a bandit policy gradient), "
        "not DDPO's multi-step MDP",
    }


# -- one run -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Group:
    """One LQ's G policy samples and their rewards."""

    slot: int
    image_id: str
    lq: torch.Tensor  # [G, 3, H, W], HQ-sized
    prompts: list[str]
    negatives: list[str]
    sample: PolicySample
    scores: dict[str, torch.Tensor]
    rewards: np.ndarray


@dataclasses.dataclass
class Trainer(sampling.SampledTrainer):
    config: TrainConfig
    seed: int
    model: SRModel
    accelerator: Any
    optimizer: Any
    trainable: list[torch.nn.Parameter]
    reward: Reward
    tracker: online.PerLQStatTracker
    image_ids: list[str]
    lq_paths: dict[str, Path]
    hq_paths: dict[str, Path]
    texts: dict[str, tuple[str, str]] | None
    last_good: Path | None = None

    def sample_group(self, step: int, position: int, image_id: str) -> Group:
        hq, lq, prompt, negative, sample = self.draw_group(step, position, image_id)
        size = self.config.policy_group_size
        scores = self.reward.raw_scores(sample.images, hq)
        rewards = self.reward.objective(image_id, scores)
        return Group(
            position, image_id, lq, [prompt] * size, [negative] * size, sample, scores, rewards
        )

    def timestep_order(self, step: int, epoch: int, group: Group) -> torch.Tensor:
        """``int64 [G, T_train]``: which recorded steps each sample trains on in this pass."""
        steps = group.sample.log_probs.shape[1]
        trained = max(1, int(steps * self.config.ppo_timestep_fraction))
        return torch.stack(
            [
                torch.randperm(
                    steps,
                    generator=torch_generator(
                        self.seed, STAGE, step, "ppo-order", epoch, group.slot, k, group.image_id
                    ),
                )[:trained]
                for k in range(len(group.prompts))
            ]
        )

    def ppo_backward(
        self,
        step: int,
        epoch: int,
        group: Group,
        advantages: torch.Tensor,
        samples: int,
        stats: dict[str, list],
    ) -> float:
        """One pass's PPO backward over a group's trained timesteps: the loss of each timestep
        weighted by the group's share of the global batch's ``samples`` and of the timesteps;
        appends the PPO statistics; returns the weighted loss."""
        config, accelerator = self.config, self.accelerator
        order = self.timestep_order(step, epoch, group)
        rows, total = torch.arange(len(group.rewards)), 0.0
        for column in range(order.shape[1]):
            index = order[:, column]
            with accelerator.autocast():
                log_prob = policy_log_probs(
                    self.model,
                    group.lq,
                    group.sample,
                    index,
                    group.prompts,
                    group.negatives,
                    config,
                )
            old = group.sample.log_probs[rows, index].to(log_prob.device)
            loss, ppo = online.ppo_clipped_loss(
                log_prob,
                old,
                advantages.to(log_prob.device),
                clip_range=config.ppo_clip_range,
                adv_clip_max=config.ppo_adv_clip_max,
            )
            checkpoints.check_finite(
                accelerator,
                loss,
                f"non-finite PPO loss at step {step + 1} (image "
                f"{group.image_id}); {self.stopped()}",
            )
            share = len(group.rewards) / (samples * order.shape[1])
            accelerator.backward(loss * share)
            total += float(loss.detach()) * share
            for key in PPO_STATS:
                stats[key].append(ppo[key])
        return total

    def update(self, step: int) -> dict[str, Any]:
        config, accelerator = self.config, self.accelerator
        lr = learning_rate(config, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        slots = step_slots(len(self.image_ids), step, config.batch_size, self.seed)
        groups = [
            self.sample_group(step, p, self.image_ids[slots[p]])
            for p in my_positions(config, accelerator)
        ]
        ids = gather_objects(accelerator, [g.image_id for g in groups for _ in g.rewards])
        rewards = np.asarray(
            gather_objects(accelerator, [float(r) for g in groups for r in g.rewards])
        )
        advantages_all = self.tracker.update(ids, rewards)
        first = sum(len(g.rewards) for g in groups) * accelerator.process_index
        mine = advantages_all[first : first + sum(len(g.rewards) for g in groups)]
        raw = {
            metric: float(
                np.mean(
                    gather_objects(
                        accelerator, [float(v) for g in groups for v in g.scores[metric].tolist()]
                    )
                )
            )
            for metric in self.reward.metrics
        }

        samples = len(rewards)  # the loss is the mean over the global batch's samples
        losses, stats, norms = [], {key: [] for key in PPO_STATS}, []
        for epoch in range(config.ppo_inner_epochs):
            epoch_loss, offset = 0.0, 0
            for group in groups:
                size = len(group.rewards)
                advantages = torch.as_tensor(mine[offset : offset + size], dtype=torch.float32)
                offset += size
                epoch_loss += self.ppo_backward(step, epoch, group, advantages, samples, stats)
            norm = self.summed_update(step)
            norms.append(norm)
            losses.append(float(np.sum(gather_objects(accelerator, [epoch_loss]))))
        means = checkpoints.reduce_mean(accelerator, [float(np.mean(stats[k])) for k in PPO_STATS])
        return {
            "step": step + 1,
            "loss": float(np.mean(losses)),
            "reward_mean": float(np.mean(rewards)),
            "reward_std": float(np.std(rewards)),
            "scores": json.dumps(raw, sort_keys=True),
            **dict(zip(PPO_STATS, means, strict=True)),
            "lr": lr,
            "grad_norm": float(np.mean(norms)),
        }


class DdpoRun(SampledRun):
    """DDPO's part of the session: the reward and the per-LQ stat tracker (checkpointed)."""

    log_table = LOG_TABLE
    log_columns = LOG_COLUMNS

    def check(self) -> None:
        config = self.config
        if config.stat_tracker_min_count > config.stat_tracker_buffer_size:
            raise settings.ConfigError(
                f"train.stat_tracker_min_count ({config.stat_tracker_min_count}) must not exceed "
                f"train.stat_tracker_buffer_size ({config.stat_tracker_buffer_size})"
            )

    def read_inputs(self) -> None:
        super().read_inputs()
        self.reward = Reward(self.section, self.job.objective, self.job.seed)

    def build(self) -> Trainer:
        config = self.config
        tracker = online.PerLQStatTracker(
            config.stat_tracker_buffer_size, config.stat_tracker_min_count
        )
        return Trainer(
            config,
            self.job.seed,
            self.model,
            self.accelerator,
            self.optimizer,
            self.trainable,
            self.reward,
            tracker,
            self.image_ids,
            self.lq_paths,
            self.hq_paths,
            self.texts,
        )

    def resume(self, path: Path) -> tuple[int, list[dict]]:
        done = super().resume(path)
        state = checkpoints.load_extra(path)["tracker"]
        self.trainer.tracker = online.PerLQStatTracker.from_state_dict(state)
        return done

    def checkpoint(self) -> dict[str, Any]:
        return {**super().checkpoint(), "extra": {"tracker": self.trainer.tracker.state_dict()}}

    def postfix(self, row: dict) -> dict[str, str]:
        return {"reward": f"{row['reward_mean']:.3f}", "kl": f"{row['approx_kl']:.2e}"}

    def policy_record(self) -> dict[str, Any]:
        return policy_record(self.model, self.config)

    def metadata(self) -> dict[str, Any]:
        reward = self.reward
        return {
            **super().metadata(),
            "reward": {
                "metrics": reward.metrics,
                "weights": reward.weights,
                "registry": reward.registry.weights_used(),
                "normalisation": "select.objective_scores over each LQ's group, then "
                "PerLQStatTracker",
            },
        }


RUN = DdpoRun
