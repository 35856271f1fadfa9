"""Alignment curves: held-out preference items and the statistics Diffusion-DPO users watch.

A run holds out the items (LQs) whose ``derive_seed(seed, "train", "heldout", image_id)`` falls
below ``train.heldout_fraction`` of the seed range: the split depends on the seed and the image
id alone (not on the process layout or the other items), and held-out items never enter a
training batch. Several crops of one source image are separate items, so a held-out crop may
share its photo with training crops: the held-out statistics measure generalisation to unseen
pairs, not to unseen photos (the test sets do that).

Every ``train.eval_every`` optimizer steps and after the last one, the policy is run without
gradients on up to ``train.curve_items`` training items and the same number of held-out items
(a fixed seeded choice), through the loss code of the step (:func:`pipeline.training.step.batch_loss`)
with fixed draws (keyed by ``"curves"`` instead of the step, the conditional prompt), so the
curves move with the weights only. One row per (step, split): the loss, the implicit accuracy
(share of instance weight whose margin favours the winner) and the mean margin
``-d = (E_ref(w) - E_θ(w)) - (E_ref(l) - E_θ(l))`` (positive: the winner's error fell relative to
the loser's) and ``reward_margin = k·β·(-d)``, the logit of DSPO's / Diffusion-DPO's sigmoid.
At step 0 the policy is the reference (margin 0), so no row is written for it. SFT has no
loser and no reference: its accuracy and margins are NaN, its loss the winner's error.

The rows travel inside the train log's rows (key ``"curves"``), which checkpoints save, so a
resumed run writes the same table as an uninterrupted one; :func:`curves_frame` builds the
``train_curves`` table from that log.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from pipeline.seeding import derive_seed, numpy_rng
from pipeline.training.config import TrainConfig
from pipeline.training.items import PreferenceItem
from pipeline.training.step import STAGE, PolicyErrors, batch_loss, draw_conditions

CURVES_TABLE = "train_curves.parquet"  # in the aligned model folder, table train_curves
LOG_KEY = "curves"  # the log row key holding a step's curve rows
SPLITS = ("train", "heldout")
COLUMNS = ("step", "split", "items", "loss", "implicit_accuracy", "margin", "reward_margin")


def is_heldout(image_id: str, fraction: float, seed: int) -> bool:
    return derive_seed(seed, STAGE, "heldout", image_id) / float(1 << 63) < fraction


def split_items(
    items: Sequence[PreferenceItem], fraction: float, seed: int
) -> tuple[list[PreferenceItem], list[PreferenceItem]]:
    """(training items, held-out items); every item in exactly one, order kept."""
    heldout = [item for item in items if is_heldout(item.image_id, fraction, seed)]
    training = [item for item in items if not is_heldout(item.image_id, fraction, seed)]
    if not training:
        raise ValueError(
            f"train.heldout_fraction {fraction} holds out all {len(items)} items; lower it"
        )
    return training, heldout


def _chosen(items: Sequence[PreferenceItem], count: int, seed: int, split: str):
    if len(items) <= count:
        return list(items)
    order = numpy_rng(seed, STAGE, "curves", split).permutation(len(items))[:count]
    return [items[int(i)] for i in sorted(order)]


@dataclasses.dataclass
class Curves:
    """The items a run evaluates and when: ``rows(trainer, step)`` is what the loop logs."""

    items: dict[str, list[PreferenceItem]]  # split -> the evaluated items
    heldout_ids: list[str]  # every held-out image id (metadata)
    every: int
    max_steps: int

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.max_steps

    def rows(self, trainer: Any, step: int) -> dict[str, list[dict[str, Any]]]:
        """``{"curves": [row per split]}`` after optimizer step ``step`` when due, else ``{}``."""
        if not self.due(step):
            return {}
        return {
            LOG_KEY: [
                {"step": step, "split": split, **evaluate(trainer, items)}
                for split, items in self.items.items()
                if items
            ]
        }


def hold_out(inputs: Any, config: TrainConfig, seed: int) -> tuple[Any, Curves]:
    """``inputs`` with the held-out items removed, and the run's :class:`Curves`."""
    training, heldout = split_items(inputs.items, config.heldout_fraction, seed)
    chosen = {
        "train": _chosen(training, config.curve_items, seed, "train"),
        "heldout": _chosen(heldout, config.curve_items, seed, "heldout"),
    }
    curves = Curves(chosen, [i.image_id for i in heldout], config.eval_every, config.max_steps)
    return dataclasses.replace(inputs, items=training), curves


def evaluate(trainer: Any, items: Sequence[PreferenceItem]) -> dict[str, float]:
    """Loss, implicit accuracy and margins of ``items`` under the current weights (no gradient),
    in micro-batches of ``batch_size`` LQs, means over LQs."""
    config = dataclasses.replace(trainer.config, uncond_drop_rate=0.0)  # the conditional branch
    model, loader, texts = trainer.model, trainer.inputs.loader, trainer.inputs.texts
    sums = {"loss": 0.0, "implicit_accuracy": 0.0, "margin": 0.0}
    for first in range(0, len(items), config.batch_size):
        chunk = list(items[first : first + config.batch_size])
        loaded = [loader.load(item) for item in chunk]
        conditions = [
            draw_conditions(model, entry, config, trainer.seed, "curves", 0, texts)
            for entry in loaded
        ]
        with torch.no_grad():
            loss, stats = batch_loss(
                PolicyErrors(model), model, loaded, conditions, trainer.method, config,
                autocast=trainer.accelerator.autocast,
            )  # fmt: skip
        margin = (stats["err_ref_winner"] - stats["err_theta_winner"]) - (
            stats["err_ref_loser"] - stats["err_theta_loser"]
        )
        for key, value in (
            ("loss", float(loss)),
            ("implicit_accuracy", stats["implicit_accuracy"]),
            ("margin", margin),
        ):
            sums[key] += value * len(chunk)
    means = {key: value / len(items) for key, value in sums.items()}
    reward = config.k * config.beta * means["margin"]
    return {
        "items": len(items),
        **means,
        "reward_margin": reward if math.isfinite(reward) else math.nan,
    }


def curves_frame(log: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The ``train_curves`` table of a run's log rows (in step order)."""
    rows = [row for entry in log for row in entry.get(LOG_KEY, [])]
    return pd.DataFrame(rows, columns=list(COLUMNS))
