"""Alignment curves: held-out preference items and the statistics Diffusion-DPO users watch.

A run holds out whole source photos: the data table (``degradation_pairs``, column ``source_id``)
tells which photo each LQ crop was cut from, the photos are ranked by
``derive_seed(seed, "train", "heldout", photo)`` and the first ``round(train.heldout_fraction ·
photos)`` of them are held out with every crop cut from them (:func:`heldout_units`). So no photo
has crops in both parts, the fraction is honoured in photos (not in crops), and the split depends
on the seed and the set of photos alone (not on the process layout or the batch order). Held-out
items never enter a training batch. When the data table does not say where a crop comes from (no
``source_id`` for some LQ), each crop is its own unit, as before, and a note says so: held-out
crops may then share a photo with training crops, and the held-out statistics are optimistic.

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
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pipeline import contracts
from pipeline.io.tables import read_table
from pipeline.seeding import derive_seed, numpy_rng
from pipeline.training.config import TrainConfig
from pipeline.training.items import PreferenceItem
from pipeline.training.step import STAGE, PolicyErrors, batch_loss, draw_conditions

CURVES_TABLE = contracts.TRAIN_CURVES  # in the aligned model folder, table train_curves
LOG_KEY = "curves"  # the log row key holding a step's curve rows
SPLITS = ("train", "heldout")
COLUMNS = ("step", "split", "items", "loss", "implicit_accuracy", "margin", "reward_margin")


def heldout_units(units: Iterable[str], fraction: float, seed: int) -> list[str]:
    """The held-out units (photos, or crops when photos are unknown), sorted: the
    ``round(fraction · len(units))`` units with the smallest ``derive_seed(seed, "train",
    "heldout", unit)`` (halves round up)."""
    unique = sorted(set(units))
    count = math.floor(fraction * len(unique) + 0.5)
    ranked = sorted(unique, key=lambda unit: (derive_seed(seed, STAGE, "heldout", unit), unit))
    return sorted(ranked[:count])


def photos_of(data_dir: str | Path | None, image_ids: Iterable[str]) -> dict[str, str] | None:
    """``{image_id: source photo id}`` from the data folder's table (column ``source_id``), or
    None when the table is absent or does not name the photo of every one of ``image_ids``."""
    if data_dir is None or not (Path(data_dir) / contracts.DATA_TABLE).is_file():
        return None
    table = read_table(Path(data_dir) / contracts.DATA_TABLE, "degradation_pairs")
    known = {
        str(image_id): str(source)
        for image_id, source in zip(table["image_id"], table["source_id"], strict=True)
        if isinstance(source, str) and source
    }
    ids = set(image_ids)
    return {i: known[i] for i in ids} if ids <= set(known) else None


@dataclasses.dataclass(frozen=True)
class Split:
    """A run's held-out split: the items of each part and what was held out."""

    training: list[PreferenceItem]
    heldout: list[PreferenceItem]
    unit: str  # "photo" (whole source photos held out) or "crop" (photos unknown)
    heldout_units: list[str]  # the held-out photos (or crops)
    units: int  # photos (or crops) among the items


def split_items(
    items: Sequence[PreferenceItem],
    fraction: float,
    seed: int,
    photos: Mapping[str, str] | None = None,
) -> Split:
    """Split ``items`` by whole photo (``photos``: ``{image_id: photo}``) or, without ``photos``,
    by crop; every item in exactly one part, order kept."""
    unit_of = {
        item.image_id: (photos[item.image_id] if photos else item.image_id) for item in items
    }
    chosen = set(heldout_units(unit_of.values(), fraction, seed))
    heldout = [item for item in items if unit_of[item.image_id] in chosen]
    training = [item for item in items if unit_of[item.image_id] not in chosen]
    unit = "photo" if photos else "crop"
    if not training:
        raise ValueError(
            f"train.heldout_fraction {fraction} holds out all {len(set(unit_of.values()))} "
            f"{unit}s of the {len(items)} items; lower it"
        )
    return Split(training, heldout, unit, sorted(chosen), len(set(unit_of.values())))


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
    split: Split | None = None  # how the held-out items were chosen (metadata)

    def record(self) -> dict[str, Any]:
        """The split for the train log's metadata."""
        if self.split is None:
            return {"heldout_items": self.heldout_ids}
        return {
            "heldout_items": self.heldout_ids,
            "heldout_unit": self.split.unit,
            "heldout_units": self.split.heldout_units,
            "units": self.split.units,
        }

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
    """``inputs`` with the held-out items removed, and the run's :class:`Curves`. The photos come
    from the data table of ``inputs.loader.data_dir``; without them the split is by crop (noted
    on stderr)."""
    items = inputs.items
    photos = None
    if config.heldout_fraction > 0:
        photos = photos_of(getattr(inputs.loader, "data_dir", None), [i.image_id for i in items])
        if photos is None:
            print(
                "train: the data table does not name every LQ's source photo (source_id); "
                "the held-out split is by crop, so held-out crops may share a photo with "
                "training crops",
                file=sys.stderr,
            )
    split = split_items(items, config.heldout_fraction, seed, photos)
    if config.heldout_fraction > 0 and not split.heldout:
        print(
            f"train: heldout_fraction {config.heldout_fraction} of {split.units} "
            f"{split.unit}s rounds to none held out; the curves have no held-out part",
            file=sys.stderr,
        )
    chosen = {
        "train": _chosen(split.training, config.curve_items, seed, "train"),
        "heldout": _chosen(split.heldout, config.curve_items, seed, "heldout"),
    }
    curves = Curves(
        chosen, [i.image_id for i in split.heldout], config.eval_every, config.max_steps, split
    )
    return dataclasses.replace(inputs, items=split.training), curves


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
                PolicyErrors(model),
                model,
                loaded,
                conditions,
                trainer.method,
                config,
                autocast=trainer.accelerator.autocast,
            )
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
