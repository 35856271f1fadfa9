"""DDPO: PPO on the policy's own samples, rewarded by the objective's IQA scores (issue 15).

``train(**kwargs)`` takes :func:`pipeline.train.train`'s keyword arguments (it is that
function's loop for methods with ``contracts.Method.loop == "ddpo"``; pairs, candidates and masks
are not read). Per optimizer step (docs/online_alignment.md §4):

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
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline import checkpoints, contracts, guidance, settings
from pipeline import policy as online
from pipeline.distributed import gather_objects, make_accelerator
from pipeline.io.atomic import atomic_path
from pipeline.io.images import read_rgb, signed_tensor, unit_tensor
from pipeline.io.tables import write_table
from pipeline.iqa import MetricRegistry, score_instances
from pipeline.models.base import PolicySample, SRModel, upsample_lq
from pipeline.objectives import objective_scores
from pipeline.seeding import torch_generator
from pipeline.training.config import TrainConfig
from pipeline.training.run import (
    _NOT_FINGERPRINTED,
    clipped_update,
    configure_model,
    learning_rate,
    make_optimizer,
    run_steps,
    step_slots,
    trainable_names,
)
from pipeline.training.step import STAGE

LOG_TABLE = "ddpo_log"
LOG_COLUMNS = (
    "step", "loss", "reward_mean", "reward_std", "scores", "approx_kl", "clipfrac", "ratio_mean",
    "lr", "grad_norm",
)  # fmt: skip
PPO_STATS = ("approx_kl", "clipfrac", "ratio_mean")


# -- reward --------------------------------------------------------------------------------------


def quantised_unit(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as the score stage reads them back from 8-bit PNGs: [0, 1], k / 255
    (:func:`pipeline.io.images.signed_to_uint8` then :func:`~pipeline.io.images.unit_tensor`)."""
    levels = images.detach().float().cpu().clamp(-1.0, 1.0).add(1.0).mul(127.5).round()
    return levels / 255.0


def metric_registry(score: Mapping[str, Any], seed: int) -> MetricRegistry:
    """The score stage's metric registry from the ``score`` settings a job carries
    (``reward.score``), built as :mod:`pipeline.score` builds it."""
    return MetricRegistry(
        weights_dir=score["weights_dir"],
        weights=score["weights"],
        options=score["options"],
        device=score["device"],
        min_crop_size=score["min_crop_size"],
        seed=seed,
    )


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
            (image_id, contracts.WHOLE_IMAGE_ID, names[k], metric, float(values[k]),
             self.registry.info(metric).lower_better)
            for metric, values in scores.items()
            for k in range(count)
        ]  # fmt: skip
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
        return {"name": policy_name(model), "steps": config.policy_steps,
                "eta": config.policy_eta, "cfg": config.policy_cfg}  # fmt: skip
    return {"name": policy_name(model), "std": config.onestep_policy_std, "steps": 1,
            "note": "one Gaussian action on the one-step latent (a bandit policy gradient), "
                    "not DDPO's multi-step MDP"}  # fmt: skip


def sample_policy(model: SRModel, lq, prompts, negatives, generators, config) -> PolicySample:
    if model.framework == "multistep":
        return model.sample_trajectory(
            lq, prompts=prompts, negative_prompts=negatives, steps=config.policy_steps,
            cfg=config.policy_cfg, eta=config.policy_eta, generators=generators,
        )  # fmt: skip
    return model.sample_policy(
        lq, prompts=prompts, std=config.onestep_policy_std, generators=generators
    )


def policy_log_probs(model: SRModel, lq, sample, index, prompts, negatives, config) -> torch.Tensor:
    if model.framework == "multistep":
        return model.trajectory_log_probs(
            lq, sample, index, prompts=prompts, negative_prompts=negatives,
            steps=config.policy_steps, cfg=config.policy_cfg, eta=config.policy_eta,
        )  # fmt: skip
    return model.trajectory_log_probs(
        lq, sample, index, prompts=prompts, std=config.onestep_policy_std
    )


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
class Trainer:
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

    def stopped(self) -> str:
        return f"training stopped; last good checkpoint: {self.last_good or 'none'}"

    def my_positions(self) -> range:
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_process, remainder = divmod(self.config.batch_size, world)
        if remainder:
            raise ValueError(
                f"train.batch_size {self.config.batch_size} must be a multiple of the processes "
                f"({world})"
            )
        return range(rank * per_process, (rank + 1) * per_process)

    def sample_group(self, step: int, position: int, image_id: str) -> Group:
        config, device = self.config, self.accelerator.device
        hq = unit_tensor(read_rgb(self.hq_paths[image_id]))
        lq = upsample_lq(signed_tensor(read_rgb(self.lq_paths[image_id]))[None], hq.shape[-2:])
        size = config.policy_group_size
        lq = lq.expand(size, -1, -1, -1).contiguous().to(device)
        prompt, negative = self.texts[image_id] if self.texts else ("", "")
        generators = [
            torch_generator(self.seed, STAGE, step, "policy", position, k, image_id)
            for k in range(size)
        ]
        with torch.no_grad(), self.accelerator.autocast():
            sample = sample_policy(
                self.model, lq, [prompt] * size, [negative] * size, generators, config
            )
        scores = self.reward.raw_scores(sample.images, hq)
        rewards = self.reward.objective(image_id, scores)
        return Group(position, image_id, lq, [prompt] * size, [negative] * size, sample, scores,
                     rewards)  # fmt: skip

    def timestep_order(self, step: int, epoch: int, group: Group) -> torch.Tensor:
        """``int64 [G, T_train]``: which recorded steps each sample trains on in this pass."""
        steps = group.sample.log_probs.shape[1]
        trained = max(1, int(steps * self.config.ppo_timestep_fraction))
        return torch.stack([
            torch.randperm(steps, generator=torch_generator(
                self.seed, STAGE, step, "ppo-order", epoch, group.slot, k, group.image_id
            ))[:trained]
            for k in range(len(group.prompts))
        ])  # fmt: skip

    def update(self, step: int) -> dict[str, Any]:
        config, accelerator = self.config, self.accelerator
        lr = learning_rate(config, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        slots = step_slots(len(self.image_ids), step, config.batch_size, self.seed)
        groups = [self.sample_group(step, p, self.image_ids[slots[p]]) for p in self.my_positions()]
        ids = gather_objects(accelerator, [g.image_id for g in groups for _ in g.rewards])
        rewards = np.asarray(
            gather_objects(accelerator, [float(r) for g in groups for r in g.rewards])
        )
        advantages_all = self.tracker.update(ids, rewards)
        first = sum(len(g.rewards) for g in groups) * accelerator.process_index
        mine = advantages_all[first : first + sum(len(g.rewards) for g in groups)]
        raw = {
            metric: float(np.mean(gather_objects(accelerator, [
                float(v) for g in groups for v in g.scores[metric].tolist()
            ])))
            for metric in self.reward.metrics
        }  # fmt: skip

        total_samples = len(rewards)
        losses, stats = [], {key: [] for key in PPO_STATS}
        norms = []
        for epoch in range(config.ppo_inner_epochs):
            epoch_loss = 0.0
            offset = 0
            for group in groups:
                size = len(group.rewards)
                advantages = torch.as_tensor(mine[offset : offset + size], dtype=torch.float32)
                offset += size
                order = self.timestep_order(step, epoch, group)
                rows = torch.arange(size)
                for column in range(order.shape[1]):
                    index = order[:, column]
                    with accelerator.autocast():
                        log_prob = policy_log_probs(
                            self.model, group.lq, group.sample, index, group.prompts,
                            group.negatives, config,
                        )  # fmt: skip
                    old = group.sample.log_probs[rows, index].to(log_prob.device)
                    loss, ppo = online.ppo_clipped_loss(
                        log_prob, old, advantages.to(log_prob.device),
                        clip_range=config.ppo_clip_range, adv_clip_max=config.ppo_adv_clip_max,
                    )  # fmt: skip
                    checkpoints.check_finite(
                        accelerator, loss, f"non-finite PPO loss at step {step + 1} (image "
                        f"{group.image_id}); {self.stopped()}",
                    )  # fmt: skip
                    share = size / (total_samples * order.shape[1])
                    accelerator.backward(loss * share)
                    epoch_loss += float(loss.detach()) * share
                    for key in PPO_STATS:
                        stats[key].append(ppo[key])
            if accelerator.num_processes > 1:
                for parameter in self.trainable:
                    if parameter.grad is not None:
                        torch.distributed.all_reduce(parameter.grad)
            losses.append(float(np.sum(gather_objects(accelerator, [epoch_loss]))))
            norms.append(
                clipped_update(
                    accelerator,
                    self.optimizer,
                    self.trainable,
                    config.max_grad_norm,
                    step,
                    self.stopped(),
                )  # fmt: skip
            )
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


def _split_reward(
    config: Mapping[str, Any] | TrainConfig | None, objective: str
) -> tuple[TrainConfig, dict[str, Any]]:
    """The train section without ``reward`` (a job setting, not a schema key) and the reward:
    the job's, else the schema defaults' (``settings.reward_settings``)."""
    if isinstance(config, TrainConfig):
        return config, settings.reward_settings({}, objective)
    section = dict(config or {})
    reward = section.pop("reward", None) or settings.reward_settings({}, objective)
    return TrainConfig.from_dict(section), reward


def train(
    *,
    framework: str,
    method: str,
    objective: str,
    data_dir: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    config: dict[str, Any] | TrainConfig | None = None,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    model: SRModel | None = None,
    prompts_path: str | Path | None = None,
    pairs_path: str | Path | None = None,
    candidates_path: str | Path | None = None,
    masks_path: str | Path | None = None,
) -> Path:
    """Align the model with DDPO on the training split's LQs and write ``out_dir``
    (``save_pretrained`` + ``train_log.parquet``, table ``ddpo_log``). ``pairs_path``,
    ``candidates_path`` and ``masks_path`` are accepted for :func:`pipeline.train.train`'s
    interface and not read. Checkpoints and resume as the offline loop (the stat tracker's
    state travels in the checkpoint's ``extra``)."""
    config, reward_config = _split_reward(config, objective)
    if config.stat_tracker_min_count > config.stat_tracker_buffer_size:
        raise settings.ConfigError(
            f"train.stat_tracker_min_count ({config.stat_tracker_min_count}) must not exceed "
            f"train.stat_tracker_buffer_size ({config.stat_tracker_buffer_size})"
        )
    out_dir = Path(out_dir)
    checkpoint_dir = (
        Path(checkpoint_dir) if checkpoint_dir else checkpoints.default_location(STAGE, out_dir)
    )
    accelerator = make_accelerator(config.device, config.mixed_precision)
    lq_paths = contracts.data_images(data_dir, "lq")
    hq_paths = contracts.data_images(data_dir, "hq")
    image_ids = sorted(lq_paths)
    texts, prompt_record = guidance.optional_stage_prompts(
        prompts_path, image_ids, where=f"train {method}"
    )
    reward = Reward(reward_config, objective, seed)
    if model is None:
        from pipeline.models import load_model

        model = load_model(model_dir)
    effective = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_FINGERPRINTED}
    effective.update(framework=framework, method=method, objective=objective, reward=reward_config)
    inputs = {"data_pairs": Path(data_dir) / contracts.DATA_TABLE}
    if prompts_path is not None:
        inputs["prompts"] = prompts_path
    fingerprint = checkpoints.run_fingerprint(
        STAGE, settings=effective, seed=seed, inputs=inputs,
        weights=checkpoints.base_weights(model_dir, model),
        processes=accelerator.num_processes, device=accelerator.device.type,
    )  # fmt: skip
    trainable = configure_model(model, config)
    model.to(accelerator.device)
    optimizer = make_optimizer(trainable, config)
    named = trainable_names(model)
    start, log = 0, []
    tracker = online.PerLQStatTracker(
        config.stat_tracker_buffer_size, config.stat_tracker_min_count
    )
    resumed_from = checkpoints.resume_point(checkpoint_dir, fingerprint, accelerator)
    if resumed_from is not None:
        start, log = checkpoints.load(resumed_from, named, optimizer, fingerprint)
        tracker = online.PerLQStatTracker.from_state_dict(
            checkpoints.load_extra(resumed_from)["tracker"]
        )
    optimizer = accelerator.prepare(optimizer)
    trainer = Trainer(
        config, seed, model, accelerator, optimizer, trainable, reward, tracker, image_ids,
        lq_paths, hq_paths, texts, resumed_from,
    )  # fmt: skip
    run_steps(
        trainer, config, accelerator, start=start, log=log, desc=f"train {method}",
        postfix=lambda row: {"reward": f"{row['reward_mean']:.3f}",
                             "kl": f"{row['approx_kl']:.2e}"},
        save=lambda done: checkpoints.save(
            checkpoint_dir, done, named, optimizer, log, fingerprint, config.keep_checkpoints,
            extra={"tracker": trainer.tracker.state_dict()},
        ),
    )  # fmt: skip

    if accelerator.is_main_process:
        policy = policy_record(model, config)
        # the saved model's description names how it was aligned (the report's weights column)
        model.settings.weights = f"{model.settings.weights} + {method} ({policy['name']})"
        metadata = {
            "framework": framework,
            "method": method,
            "loss": contracts.method(method).loss,
            "objective": objective,
            "policy": policy,
            "seed": int(seed),
            "prompts": prompt_record,
            "model": str(model_dir),
            "items": len(image_ids),
            "reward": {
                "metrics": reward.metrics,
                "weights": reward.weights,
                "registry": reward.registry.weights_used(),
                "normalisation": "select.objective_scores over each LQ's group, then "
                "PerLQStatTracker",
            },  # fmt: skip
            "fingerprint": fingerprint.fields,
            "fingerprint_hash": fingerprint.hash,
            "config": {**dataclasses.asdict(config), "reward": reward_config},
            "data": str(data_dir),
            "model_describe": model.describe(),
            "processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "device": str(accelerator.device),
            "resumed_from": str(resumed_from) if resumed_from else None,
        }
        with atomic_path(out_dir) as folder:
            model.save_pretrained(folder)
            write_table(
                pd.DataFrame(log, columns=list(LOG_COLUMNS)),
                folder / "train_log.parquet",
                LOG_TABLE,
                metadata,
            )
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return out_dir
