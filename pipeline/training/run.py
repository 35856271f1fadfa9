"""What a training run needs around its steps: the trainable parameters, which items each
step's global batch holds, the learning rate of each step and the checkpoint fingerprint."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import checkpoints, contracts
from pipeline.models.base import SRModel
from pipeline.seeding import numpy_rng
from pipeline.training.config import TrainConfig
from pipeline.training.step import STAGE


@functools.lru_cache(maxsize=4)
def _epoch_order(n_items: int, seed: int, epoch: int) -> np.ndarray:
    return numpy_rng(seed, STAGE, "order", epoch).permutation(n_items)


def step_slots(n_items: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Item indices of the global batch of ``step`` (0-based): seeded epoch permutations, back to back."""
    positions = range(step * batch_size, (step + 1) * batch_size)
    return [int(_epoch_order(n_items, seed, p // n_items)[p % n_items]) for p in positions]


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up over ``lr_warmup_steps`` optimizer steps, then constant."""
    if config.lr_warmup_steps <= 0:
        return config.learning_rate
    return config.learning_rate * min(1.0, (step + 1) / config.lr_warmup_steps)


def micro_batch_size(config: TrainConfig, processes: int) -> int:
    """LQs per process and micro-step: ``batch_size`` is the global batch of one update."""
    per_micro, remainder = divmod(config.batch_size, processes * config.gradient_accumulation_steps)
    if remainder or per_micro == 0:
        raise ValueError(
            f"train.batch_size {config.batch_size} must be a multiple of processes ({processes}) "
            f"x gradient_accumulation_steps ({config.gradient_accumulation_steps})"
        )
    return per_micro


def configure_model(model: SRModel, config: TrainConfig) -> list[nn.Parameter]:
    """Freeze everything but the trainable parameters; switch on gradient checkpointing."""
    trainable = list(model.trainable_parameters())
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in trainable:
        parameter.requires_grad_(True)
    if config.gradient_checkpointing:
        switched = [
            module.enable_gradient_checkpointing()
            for module in model.modules()
            if getattr(module, "_supports_gradient_checkpointing", False)
        ]
        if not switched:
            raise ValueError(
                f"{type(model).__name__} has no module that supports gradient checkpointing"
            )
    return trainable


def make_optimizer(trainable: list[nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the train section's learning rate, betas, epsilon and weight decay."""
    return torch.optim.AdamW(
        trainable,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )


def clipped_update(
    accelerator,
    optimizer,
    trainable: list[nn.Parameter],
    max_grad_norm: float,
    step: int,
    stopped: str,
) -> float:
    """One optimizer update: clip the gradients, check their norm, step, zero them, check the
    weights (``FloatingPointError`` naming ``step`` and ``stopped``); returns the norm."""
    grad_norm = checkpoints.total_norm(
        checkpoints.clip_gradients(accelerator, [trainable], max_grad_norm)
    )
    checkpoints.check_finite(
        accelerator, grad_norm, f"non-finite gradient norm at step {step + 1}; {stopped}"
    )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    checkpoints.check_finite(
        accelerator,
        checkpoints.weights_flag(trainable),
        f"non-finite weights after step {step + 1}; {stopped}",
    )
    return grad_norm


def summed_update(
    accelerator,
    optimizer,
    trainable: list[nn.Parameter],
    max_grad_norm: float,
    step: int,
    stopped: str,
) -> float:
    """:func:`clipped_update` after summing the gradients over processes (the online loops
    take their gradients outside accelerate's DDP, each process's share already scaled)."""
    if accelerator.num_processes > 1:
        for parameter in trainable:
            if parameter.grad is not None:
                torch.distributed.all_reduce(parameter.grad)
    return clipped_update(accelerator, optimizer, trainable, max_grad_norm, step, stopped)


def trainable_names(model: SRModel) -> dict[str, nn.Parameter]:
    """The parameters a checkpoint stores, by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


#: config keys a resumed run may change: they do not alter the steps already taken
_NOT_FINGERPRINTED = ("max_steps", "checkpoint_every", "keep_checkpoints")


def fingerprinted_settings(config: TrainConfig, **fields: Any) -> dict[str, Any]:
    """The settings a checkpoint must match: the train section but the keys a resumed run may
    change, and ``fields`` (framework, method, objective, a method's own settings)."""
    effective = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_FINGERPRINTED}
    effective.update(fields)
    return effective


def run_fingerprint(
    config: TrainConfig,
    *,
    framework: str,
    method: str,
    objective: str,
    seed: int,
    pairs_path: str | Path,
    candidates_path: str | Path,
    data_dir: str | Path,
    masks_path: str | Path,
    model_dir: str | Path,
    model: SRModel | None,
    processes: int,
    device: str,
    prompts_path: str | Path | None = None,
) -> checkpoints.Fingerprint:
    """What a checkpoint must match to be resumed: the effective settings, seed, code, the bytes
    of the pairs and candidates tables, of the mask store, of the data folder's table (and of the
    prompts table when one is given), the base model's weight files (or the in-memory model's
    state) and the process layout."""
    effective = fingerprinted_settings(
        config, framework=framework, method=method, objective=objective
    )
    inputs = {
        "pairs": pairs_path,
        "candidates": candidates_path,
        "masks": masks_path,
        "data_pairs": Path(data_dir) / contracts.DATA_TABLE,
    }
    if prompts_path is not None:
        inputs["prompts"] = prompts_path
    return checkpoints.run_fingerprint(
        STAGE,
        settings=effective,
        seed=seed,
        inputs=inputs,
        weights=checkpoints.base_weights(model_dir, model),
        processes=processes,
        device=device,
    )


class TrainerBase:
    """What every method's trainer shares (a base of their dataclasses, which hold ``config``,
    ``accelerator``, ``optimizer``, ``trainable`` and ``last_good``): the message naming the last
    good checkpoint, and the update of the methods that sum their gradients themselves."""

    def stopped(self) -> str:
        return f"training stopped; last good checkpoint: {self.last_good or 'none'}"

    def summed_update(self, step: int) -> float:
        """:func:`summed_update` of this trainer's parameters at ``step``."""
        return summed_update(
            self.accelerator,
            self.optimizer,
            self.trainable,
            self.config.max_grad_norm,
            step,
            self.stopped(),
        )
