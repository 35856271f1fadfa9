"""The offline loop: DSPO, Diffusion-DPO, SFT and Diffusion-DRO on selected pairs (DSPO paper
§4.2-4.4); :data:`RUN` is its method for :mod:`pipeline.training.session`.

For every LQ of a batch the distinct candidates share one timestep and one noise, the policy and
the frozen reference each run once over them, and the maps pooled per instance feed the method's
loss (docs/design.md §3, :mod:`pipeline.training.step`).

Methods (``contracts.Method.loop == "offline"``): ``dspo`` (instance pairs, Eq. 5), ``dspo_m1``
(DSPO without the feedback negatives), ``dpo`` (the image-level pair, ``instance_id -1``, one
full mask), ``sft`` (the image-level winner's plain error), ``dro`` (instance pairs,
Diffusion-DRO's hinge). Each LQ trains on its prompt from the prompts table
(``prompts/train.parquet``); the user description feedback (paper's M2) feeds the unconditional
branch: with probability ``uncond_drop_rate`` an LQ's prompt is replaced by its feedback texts
followed by its negative prompt from the table (M2, ``negative_prompts: true``; docs/prompts.md)
or by the empty prompt (M1 only). Without a table (direct calls) the prompt is empty and the
dropped prompt the feedback texts alone.

Batching: ``batch_size`` LQs per optimizer step IN TOTAL, split over processes and gradient
accumulation micro-steps, so one config gives the same update on 1 or several processes.
Every random draw is keyed by (seed, step, slot in the global batch, image id), so the
update does not depend on the process layout and a resumed run repeats a killed one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import torch

from pipeline import checkpoints, contracts, guidance, losses
from pipeline.io.tables import read_table, write_table
from pipeline.models.base import SRModel
from pipeline.training import curves
from pipeline.training.config import TrainConfig
from pipeline.training.items import ItemLoader, LoadedItem, PreferenceItem, preference_items
from pipeline.training.run import (
    TrainerBase,
    clipped_update,
    learning_rate,
    micro_batch_size,
    step_slots,
)
from pipeline.training.session import MethodRun
from pipeline.training.step import (
    PolicyErrors,
    backward_one_candidate_at_a_time,
    batch_loss,
    draw_conditions,
    error_map_gradients,
    uses_two_pass,
)

LOG_COLUMNS = ("step", "loss", *losses.STAT_KEYS, "lr", "grad_norm")


@dataclasses.dataclass
class Inputs:
    """What a run reads: the items of its method, their files and each LQ's prompts."""

    items: list[PreferenceItem]
    loader: ItemLoader
    texts: dict[str, tuple[str, str]] | None  # {image_id: (prompt, negative_prompt)}
    prompt_record: dict[str, Any]


def read_inputs(
    method: str, pairs_path, candidates_path, data_dir, masks_path, prompts_path
) -> Inputs:
    items = preference_items(read_table(pairs_path, "preference_pairs"), method)
    loader = ItemLoader(
        read_table(candidates_path, "candidates"),
        Path(candidates_path),
        Path(data_dir),
        Path(masks_path),
    )
    loader.check(items)
    texts, record = guidance.optional_stage_prompts(
        prompts_path, [item.image_id for item in items], where=f"train {method}"
    )
    return Inputs(items, loader, texts, record)


@dataclasses.dataclass
class Trainer(TrainerBase):
    """One run's state between steps: what :func:`train`'s loop advances one update at a time."""

    method: str
    config: TrainConfig
    seed: int
    inputs: Inputs
    accelerator: Any
    policy: torch.nn.Module  # PolicyErrors(model), prepared by accelerate (DDP-wrapped)
    model: SRModel
    optimizer: torch.optim.Optimizer
    trainable: list[torch.nn.Parameter]
    last_good: Path | None = None  # the newest checkpoint written or resumed

    def micro_batch(self, step: int, micro: int, slots: list[int]):
        """This process's LQs of one micro-step and their shared draws."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_micro = micro_batch_size(self.config, world)
        first = (micro * world + rank) * per_micro
        mine = range(first, first + per_micro)
        loaded = [self.inputs.loader.load(self.inputs.items[slots[s]]) for s in mine]
        conditions = [
            draw_conditions(self.model, entry, self.config, self.seed, step, s, self.inputs.texts)
            for entry, s in zip(loaded, mine, strict=True)
        ]
        return loaded, conditions

    def update(self, step: int) -> dict[str, float]:
        """One optimizer update (all micro-steps); returns its log row."""
        config, accelerator = self.config, self.accelerator
        lr = learning_rate(config, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        slots = step_slots(len(self.inputs.items), step, config.batch_size, self.seed)
        totals = torch.zeros(1 + len(losses.STAT_KEYS), dtype=torch.float64)
        for micro in range(config.gradient_accumulation_steps):
            loaded, conditions = self.micro_batch(step, micro, slots)
            sync = micro == config.gradient_accumulation_steps - 1
            if uses_two_pass(config, loaded, accelerator.device):
                loss, stats = self.two_pass(step, loaded, conditions, sync)
            else:
                with contextlib.nullcontext() if sync else accelerator.no_sync(self.policy):
                    loss, stats = batch_loss(
                        self.policy,
                        self.model,
                        loaded,
                        conditions,
                        self.method,
                        config,
                        autocast=accelerator.autocast,
                    )
                    self.check_loss(step, loss, loaded)
                    accelerator.backward(loss / config.gradient_accumulation_steps)
            totals += torch.tensor(
                [float(loss.detach()), *(stats[k] for k in losses.STAT_KEYS)], dtype=torch.float64
            )
        grad_norm = clipped_update(
            accelerator, self.optimizer, self.trainable, config.max_grad_norm, step, self.stopped()
        )
        if step + 1 == config.max_steps:  # no later step's forward will see these weights
            self.check_final_weights(step, loaded, conditions)
        means = checkpoints.reduce_mean(
            accelerator, (totals / config.gradient_accumulation_steps).tolist()
        )
        row = dict(zip(("loss", *losses.STAT_KEYS), means, strict=True))
        return {"step": step + 1, **row, "lr": lr, "grad_norm": grad_norm}

    def check_loss(self, step: int, loss: torch.Tensor, loaded: list[LoadedItem]) -> None:
        checkpoints.check_finite(
            self.accelerator,
            loss,
            f"non-finite loss at step {step + 1} "
            f"(images {[e.item.image_id for e in loaded]}); {self.stopped()}",
        )

    def two_pass(self, step: int, loaded: list[LoadedItem], conditions, sync: bool):
        """One micro-step with train.memory two_pass (pipeline.training.step): the same
        gradient as the one-pass step, one candidate's activations at a time."""
        accelerator = self.accelerator
        loss, stats, gradients = error_map_gradients(
            self.model,
            loaded,
            conditions,
            self.method,
            self.config,
            scale=1.0 / self.config.gradient_accumulation_steps,
            autocast=accelerator.autocast,
        )
        self.check_loss(step, loss, loaded)
        backward_one_candidate_at_a_time(
            self.policy,
            loaded,
            conditions,
            gradients,
            accelerator.backward,
            autocast=accelerator.autocast,
            hold_sync=lambda: accelerator.no_sync(self.policy),
            sync_at_end=sync,
        )
        return loss, stats

    def check_final_weights(self, step: int, loaded: list[LoadedItem], conditions) -> None:
        """One more forward with the last step's weights, as the next step would run it."""
        with torch.no_grad():
            after, _ = batch_loss(
                PolicyErrors(self.model),
                self.model,
                loaded,
                conditions,
                self.method,
                self.config,
                autocast=self.accelerator.autocast,
            )
        checkpoints.check_finite(
            self.accelerator,
            after,
            f"non-finite loss after the last step (step {step + 1}) with its weights; "
            f"{self.stopped()}",
        )


class OfflineRun(MethodRun):
    """The offline methods: pairs selected once, the loss of ``contracts.Method.loss``."""

    log_columns = LOG_COLUMNS

    def check(self) -> None:
        micro_batch_size(self.config, self.accelerator.num_processes)  # a bad layout fails early

    def read_inputs(self) -> None:
        job = self.job
        inputs = read_inputs(
            job.method,
            job.pairs_path,
            job.candidates_path,
            job.data_dir,
            job.masks_path,
            job.prompts_path,
        )
        self.inputs, self.curve = curves.hold_out(inputs, self.config, job.seed)  # never trained

    def build(self) -> Trainer:
        return Trainer(
            self.job.method,
            self.config,
            self.job.seed,
            self.inputs,
            self.accelerator,
            PolicyErrors(self.model),
            self.model,
            self.optimizer,
            self.trainable,
        )

    def prepare(self) -> None:
        policy, self.optimizer = self.accelerator.prepare(self.trainer.policy, self.optimizer)
        self.trainer.policy, self.trainer.optimizer = policy, self.optimizer
        self.trainer.model = self.accelerator.unwrap_model(policy).model

    def postfix(self, row: dict) -> dict[str, str]:
        return {"loss": f"{row['loss']:.4f}", "acc": f"{row['implicit_accuracy']:.2f}"}

    def extra_columns(self, steps_done: int) -> dict[str, Any]:
        return self.curve.rows(self.trainer, steps_done)  # alignment curves, when due

    def metadata(self) -> dict[str, Any]:
        job = self.job
        return {
            "pairs": str(job.pairs_path),
            "prompts": self.inputs.prompt_record,
            "items": len(self.inputs.items),
            **self.curve.record(),  # the held-out items and how they were chosen
            "candidates": str(job.candidates_path),
            "masks": str(job.masks_path),
        }

    def write(self, folder: Path, metadata: dict[str, Any]) -> None:
        super().write(folder, metadata)
        curves_table = curves.curves_frame(self.log)
        write_table(curves_table, folder / contracts.TRAIN_CURVES, "train_curves", metadata)


RUN = OfflineRun
