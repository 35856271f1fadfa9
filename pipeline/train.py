"""Preference training: DSPO, Diffusion-DPO, SFT and Diffusion-DRO on one model (DSPO paper §4.2-4.4).

This module is the stage: its command line and the loop, :func:`train`. The parts are in
:mod:`pipeline.training` (config, pairs grouped per LQ, one step's shared forwards and loss, the
run's bookkeeping); checkpoints in :mod:`pipeline.checkpoints`. For every LQ of a batch the
distinct candidates share one timestep and one noise, the policy and the frozen reference each
run once over them, and the maps pooled per instance feed the method's loss (docs/design.md §3,
:mod:`pipeline.training.step`).

Methods (:data:`pipeline.contracts.METHODS`): ``dspo`` (instance pairs, Eq. 5), ``dspo_m1``
(DSPO without the feedback negatives), ``dpo`` (the image-level pair, ``instance_id -1``, one
full mask), ``sft`` (the image-level winner's plain error), ``dro`` (instance pairs,
Diffusion-DRO's hinge). Each LQ trains on its prompt from the prompts table (``--prompts``,
``prompts/train.parquet``); the user description feedback (paper's M2) feeds the unconditional
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

import argparse
import contextlib
import dataclasses
import importlib
import shutil
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pipeline import checkpoints, contracts, guidance, losses, settings
from pipeline.distributed import make_accelerator
from pipeline.io.atomic import atomic_path
from pipeline.io.tables import read_table, write_table
from pipeline.models.base import SRModel
from pipeline.training import curves
from pipeline.training.config import TrainConfig
from pipeline.training.items import ItemLoader, LoadedItem, PreferenceItem, preference_items
from pipeline.training.run import (
    clipped_update,
    configure_model,
    learning_rate,
    make_optimizer,
    run_fingerprint,
    run_steps,
    step_slots,
    trainable_names,
)
from pipeline.training.step import (
    STAGE,
    PolicyErrors,
    backward_one_candidate_at_a_time,
    batch_loss,
    draw_conditions,
    error_map_gradients,
    uses_two_pass,
)

LOG_COLUMNS = ("step", "loss", *losses.STAT_KEYS, "lr", "grad_norm")
#: the module of each method loop other than this file's (``contracts.Method.loop``); each has a
#: ``train(**arguments)`` taking :func:`train`'s keyword arguments
LOOPS = {"ddpo": "pipeline.training.ddpo", "ea_adam": "pipeline.training.ea_adam",
         "gdpo": "pipeline.training.gdpo", "dro_online": "pipeline.training.dro_online"}  # fmt: skip


def micro_batch_size(config: TrainConfig, processes: int) -> int:
    """LQs per process and micro-step: ``batch_size`` is the global batch of one update."""
    per_micro, remainder = divmod(config.batch_size, processes * config.gradient_accumulation_steps)
    if remainder or per_micro == 0:
        raise ValueError(
            f"train.batch_size {config.batch_size} must be a multiple of processes ({processes}) "
            f"x gradient_accumulation_steps ({config.gradient_accumulation_steps})"
        )
    return per_micro


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
class Trainer:
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

    def stopped(self) -> str:
        return f"training stopped; last good checkpoint: {self.last_good or 'none'}"

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
                        self.policy, self.model, loaded, conditions, self.method, config,
                        autocast=accelerator.autocast,
                    )  # fmt: skip
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
            self.accelerator, loss, f"non-finite loss at step {step + 1} "
            f"(images {[e.item.image_id for e in loaded]}); {self.stopped()}",
        )  # fmt: skip

    def two_pass(self, step: int, loaded: list[LoadedItem], conditions, sync: bool):
        """One micro-step with train.memory two_pass (pipeline.training.step): the same
        gradient as the one-pass step, one candidate's activations at a time."""
        accelerator = self.accelerator
        loss, stats, gradients = error_map_gradients(
            self.model, loaded, conditions, self.method, self.config,
            scale=1.0 / self.config.gradient_accumulation_steps, autocast=accelerator.autocast,
        )  # fmt: skip
        self.check_loss(step, loss, loaded)
        backward_one_candidate_at_a_time(
            self.policy, loaded, conditions, gradients, accelerator.backward,
            autocast=accelerator.autocast,
            hold_sync=lambda: accelerator.no_sync(self.policy), sync_at_end=sync,
        )  # fmt: skip
        return loss, stats

    def check_final_weights(self, step: int, loaded: list[LoadedItem], conditions) -> None:
        """One more forward with the last step's weights, as the next step would run it."""
        with torch.no_grad():
            after, _ = batch_loss(
                PolicyErrors(self.model), self.model, loaded, conditions, self.method,
                self.config, autocast=self.accelerator.autocast,
            )  # fmt: skip
        checkpoints.check_finite(
            self.accelerator, after,
            f"non-finite loss after the last step (step {step + 1}) with its weights; "
            f"{self.stopped()}",
        )  # fmt: skip


def train(
    *,
    framework: str,
    method: str,
    objective: str,
    pairs_path: str | Path,
    candidates_path: str | Path,
    data_dir: str | Path,
    masks_path: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    config: dict[str, Any] | TrainConfig | None = None,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    model: SRModel | None = None,
    prompts_path: str | Path | None = None,
) -> Path:
    """Train ``method`` (a name of :data:`pipeline.contracts.METHODS`) on the pairs and write
    ``out_dir`` (``save_pretrained`` + train_log.parquet).

    Checkpoints go to ``checkpoint_dir`` (default :func:`pipeline.checkpoints.default_location`)
    every ``checkpoint_every`` steps; the newest is resumed if its fingerprint matches this run's,
    otherwise the folder is moved aside and training starts afresh. A non-finite loss, gradient
    norm or weight raises ``FloatingPointError`` naming the step (the last step's weights are
    checked by one more forward, as the next step would); the last good checkpoint stays. ``model``
    (optional) is an already loaded model, otherwise ``pipeline.models.load_model(model_dir)``.
    ``prompts_path`` is the training split's prompts table (each LQ's prompt and negative
    prompt; see the module docstring).
    """
    loop = contracts.method(method).loop  # an unknown method fails before anything is read
    if loop != "offline":
        arguments = dict(
            framework=framework, method=method, objective=objective, pairs_path=pairs_path,
            candidates_path=candidates_path, data_dir=data_dir, masks_path=masks_path,
            model_dir=model_dir, out_dir=out_dir, config=config, seed=seed,
            checkpoint_dir=checkpoint_dir, model=model, prompts_path=prompts_path,
        )  # fmt: skip
        return importlib.import_module(LOOPS[loop]).train(**arguments)
    config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    out_dir = Path(out_dir)
    checkpoint_dir = (
        Path(checkpoint_dir) if checkpoint_dir else checkpoints.default_location(STAGE, out_dir)
    )
    accelerator = make_accelerator(config.device, config.mixed_precision)
    micro_batch_size(config, accelerator.num_processes)  # fails early on a bad layout
    inputs = read_inputs(method, pairs_path, candidates_path, data_dir, masks_path, prompts_path)
    inputs, curve = curves.hold_out(inputs, config, seed)  # held-out items never train
    if model is None:
        from pipeline.models import load_model

        model = load_model(model_dir)
    fingerprint = run_fingerprint(
        config, framework=framework, method=method, objective=objective, seed=seed,
        pairs_path=pairs_path, candidates_path=candidates_path, data_dir=data_dir,
        masks_path=masks_path, model_dir=model_dir, model=model,
        processes=accelerator.num_processes, device=accelerator.device.type,
        prompts_path=prompts_path,
    )  # fmt: skip
    trainable = configure_model(model, config)
    # models may build their frozen reference lazily on first use: make it capture the
    # pretrained weights before a checkpoint overwrites them
    with model.reference():
        pass
    optimizer = make_optimizer(trainable, config)
    named = trainable_names(model)
    start, log = 0, []
    resumed_from = checkpoints.resume_point(checkpoint_dir, fingerprint, accelerator)
    if resumed_from is not None:
        start, log = checkpoints.load(resumed_from, named, optimizer, fingerprint)
    policy, optimizer = accelerator.prepare(PolicyErrors(model), optimizer)
    trainer = Trainer(
        method, config, seed, inputs, accelerator, policy,
        accelerator.unwrap_model(policy).model, optimizer, trainable, resumed_from,
    )  # fmt: skip

    run_steps(
        trainer, config, accelerator, start=start, log=log, desc=f"train {method}",
        postfix=lambda row: {"loss": f"{row['loss']:.4f}",
                             "acc": f"{row['implicit_accuracy']:.2f}"},
        save=lambda done: checkpoints.save(
            checkpoint_dir, done, named, optimizer, log, fingerprint, config.keep_checkpoints,
        ),
        curve_rows=lambda done: curve.rows(trainer, done),  # alignment curves, when due
    )  # fmt: skip

    if accelerator.is_main_process:
        metadata = {
            "framework": framework,
            "method": method,
            "loss": contracts.method(method).loss,
            "objective": objective,
            "seed": int(seed),
            "pairs": str(pairs_path),
            "prompts": inputs.prompt_record,
            "model": str(model_dir),
            "items": len(inputs.items),
            **curve.record(),  # the held-out items and how they were chosen
            "fingerprint": fingerprint.fields,
            "fingerprint_hash": fingerprint.hash,
            "config": dataclasses.asdict(config),
            "candidates": str(candidates_path),
            "data": str(data_dir),
            "masks": str(masks_path),
            "model_describe": trainer.model.describe(),
            "processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "device": str(accelerator.device),
            "resumed_from": str(resumed_from) if resumed_from else None,
        }
        with atomic_path(out_dir) as folder:
            trainer.model.save_pretrained(folder)
            write_table(
                pd.DataFrame(log, columns=list(LOG_COLUMNS)),
                folder / "train_log.parquet",
                "train_log",
                metadata,
            )
            write_table(
                curves.curves_frame(log), folder / curves.CURVES_TABLE, "train_curves", metadata
            )
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline train", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--framework", required=True)
    parser.add_argument("--method", required=True, choices=sorted(contracts.METHODS))
    parser.add_argument("--objective", required=True)
    parser.add_argument("--pairs", nargs="+", default=None,  # none for ddpo: it samples its own
                        help="pairs/{framework}/{objective}.parquet; a method of pair level "
                        "objectives (ea_adam) takes one table per contracts.MULTI_OBJECTIVES, "
                        "in that order")  # fmt: skip
    parser.add_argument(
        "--candidates", required=True, help="candidates/{framework}/candidates.parquet"
    )
    parser.add_argument("--data", required=True, help="data/{split}/ (holds lq/)")
    parser.add_argument("--masks", required=True, help="masks/{framework}.zarr")
    parser.add_argument("--model", required=True, help="pretrained model folder")
    parser.add_argument("--out", required=True, help="aligned/{framework}/{method}/{objective}/")
    parser.add_argument(
        "--checkpoints",
        default=None,
        help="checkpoint folder (default: results/checkpoints/train/... beside OUT's results/)",
    )
    parser.add_argument("--config", default="{}", help="the train config section as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", default=None,
                        help="prompts/train.parquet: each LQ's prompt and negative prompt")  # fmt: skip
    args = parser.parse_args(argv)
    train(
        framework=args.framework,
        method=args.method,
        objective=args.objective,
        pairs_path=args.pairs[0] if args.pairs and len(args.pairs) == 1 else args.pairs,
        candidates_path=args.candidates,
        data_dir=args.data,
        masks_path=args.masks,
        model_dir=args.model,
        out_dir=args.out,
        config=settings.cli_config(args.config),
        seed=args.seed,
        checkpoint_dir=args.checkpoints,
        prompts_path=args.prompts,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
