"""What the methods that sample their own outputs share (ddpo, gdpo; docs/online_alignment.md):
the policy of each framework, the reward's metric registry and 8-bit quantisation, the global
batch's split over processes, and :class:`SampledRun`, their part of the session's hooks
(:mod:`pipeline.training.session`: the training split's LQs and HQs, the ``reward`` settings,
the fingerprint over the data and prompts tables, the saved model's name)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline import checkpoints, contracts, guidance, settings
from pipeline.io.images import read_rgb, signed_tensor, unit_tensor
from pipeline.iqa import MetricRegistry
from pipeline.models.base import PolicySample, SRModel, upsample_lq
from pipeline.seeding import torch_generator
from pipeline.training.config import TrainConfig
from pipeline.training.run import TrainerBase, fingerprinted_settings
from pipeline.training.session import MethodRun
from pipeline.training.step import STAGE

# -- the policy of each family -------------------------------------------------------------------


def sample_policy(model: SRModel, lq, prompts, negatives, generators, config) -> PolicySample:
    """Samples of the current policy: multi-step, DDIM with ``policy_eta`` over ``policy_steps``
    (each step's log-prob recorded); one-step, the one-step Gaussian policy."""
    if model.framework == "multistep":
        return model.sample_trajectory(
            lq,
            prompts=prompts,
            negative_prompts=negatives,
            steps=config.policy_steps,
            cfg=config.policy_cfg,
            eta=config.policy_eta,
            generators=generators,
        )
    return model.sample_policy(
        lq, prompts=prompts, std=config.onestep_policy_std, generators=generators
    )


def policy_log_probs(model: SRModel, lq, sample, index, prompts, negatives, config) -> torch.Tensor:
    """The log-probs of recorded steps ``index`` of ``sample`` under the current weights."""
    if model.framework == "multistep":
        return model.trajectory_log_probs(
            lq,
            sample,
            index,
            prompts=prompts,
            negative_prompts=negatives,
            steps=config.policy_steps,
            cfg=config.policy_cfg,
            eta=config.policy_eta,
        )
    return model.trajectory_log_probs(
        lq, sample, index, prompts=prompts, std=config.onestep_policy_std
    )


def sample_group(
    model: SRModel,
    accelerator,
    config: TrainConfig,
    seed: int,
    step: int,
    position: int,
    image_id: str,
    lq_path: Path,
    hq_path: Path,
    texts: dict[str, tuple[str, str]] | None,
) -> tuple[torch.Tensor, torch.Tensor, str, str, PolicySample]:
    """One LQ's ``policy_group_size`` samples of the current policy, without gradients, sample
    ``k`` of the LQ in global slot ``position`` drawn by ``torch_generator(seed, "train", step,
    "policy", position, k, image_id)``: (HQ ``[3, H, W]`` in [0, 1], the HQ-sized LQ repeated
    ``[G, 3, H, W]`` on the device, prompt, negative prompt, the sample)."""
    hq = unit_tensor(read_rgb(hq_path))
    lq = upsample_lq(signed_tensor(read_rgb(lq_path))[None], hq.shape[-2:])
    size = config.policy_group_size
    lq = lq.expand(size, -1, -1, -1).contiguous().to(accelerator.device)
    prompt, negative = texts[image_id] if texts else ("", "")
    generators = [
        torch_generator(seed, STAGE, step, "policy", position, k, image_id) for k in range(size)
    ]
    with torch.no_grad(), accelerator.autocast():
        sample = sample_policy(model, lq, [prompt] * size, [negative] * size, generators, config)
    return hq, lq, prompt, negative, sample


def my_positions(config: TrainConfig, accelerator) -> range:
    """This process's slots of the step's global batch of ``batch_size`` LQs."""
    world, rank = accelerator.num_processes, accelerator.process_index
    per_process, remainder = divmod(config.batch_size, world)
    if remainder:
        raise ValueError(
            f"train.batch_size {config.batch_size} must be a multiple of the processes ({world})"
        )
    return range(rank * per_process, (rank + 1) * per_process)


class SampledTrainer(TrainerBase):
    """What the trainers of ddpo and gdpo share (a base of their dataclasses, which hold
    ``model``, ``seed``, ``lq_paths``, ``hq_paths`` and ``texts``): drawing an LQ's group."""

    def draw_group(self, step: int, position: int, image_id: str):
        """:func:`sample_group` of ``image_id`` in global slot ``position`` at ``step``."""
        return sample_group(
            self.model,
            self.accelerator,
            self.config,
            self.seed,
            step,
            position,
            image_id,
            self.lq_paths[image_id],
            self.hq_paths[image_id],
            self.texts,
        )


# -- the reward ----------------------------------------------------------------------------------


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


# -- their part of the session -------------------------------------------------------------------


class SampledRun(MethodRun):
    """The session's hooks for a method that samples its own outputs: it reads the training
    split's LQs and HQs (no pairs, no candidates), its reward settings travel in the job's
    ``reward`` key, and the saved model names the policy it was aligned with."""

    captures_reference = False

    def settings(self, raw: Any) -> tuple[TrainConfig, dict[str, Any]]:
        """The train section without ``reward`` (a job setting, not a schema key) and the
        reward: the job's, else the schema defaults' (``settings.reward_settings``)."""
        objective = self.job.objective
        if isinstance(raw, TrainConfig):
            return raw, settings.reward_settings({}, objective)
        section = dict(raw or {})
        reward = section.pop("reward", None) or settings.reward_settings({}, objective)
        return TrainConfig.from_dict(section), reward

    def read_inputs(self) -> None:
        job = self.job
        self.lq_paths = contracts.data_images(job.data_dir, "lq")
        self.hq_paths = contracts.data_images(job.data_dir, "hq")
        self.image_ids = sorted(self.lq_paths)
        self.texts, self.prompt_record = guidance.optional_stage_prompts(
            job.prompts_path, self.image_ids, where=f"train {job.method}"
        )

    def fingerprint_inputs(self) -> dict[str, Any]:
        inputs = {"data_pairs": Path(self.job.data_dir) / contracts.DATA_TABLE}
        if self.job.prompts_path is not None:
            inputs["prompts"] = self.job.prompts_path
        return inputs

    def fingerprint_run(self) -> checkpoints.Fingerprint:
        job, config = self.job, self.config
        effective = fingerprinted_settings(
            config,
            framework=job.framework,
            method=job.method,
            objective=job.objective,
            reward=self.section,
        )
        return checkpoints.run_fingerprint(
            STAGE,
            settings=effective,
            seed=job.seed,
            inputs=self.fingerprint_inputs(),
            weights=checkpoints.base_weights(job.model_dir, self.model),
            processes=self.accelerator.num_processes,
            device=self.accelerator.device.type,
        )

    def policy_record(self) -> dict[str, Any]:
        raise NotImplementedError

    def finish(self) -> None:
        self.policy = self.policy_record()
        self.name_alignment(self.policy["name"])

    def metadata(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "prompts": self.prompt_record,
            "items": len(self.image_ids),
            "config": {**dataclasses.asdict(self.config), "reward": self.section},
        }
