"""Preference pairs grouped per LQ (:class:`PreferenceItem`) and the tensors one item reads
(:class:`ItemLoader`): its LQ, its distinct candidates and its instance masks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from pipeline import contracts
from pipeline.contracts import WHOLE_IMAGE_ID
from pipeline.guidance import join_prompts
from pipeline.io.images import read_rgb, signed_tensor
from pipeline.io.masks import instance_masks, read_label_map
from pipeline.models.base import upsample_lq


@dataclass(frozen=True)
class PreferenceItem:
    """One LQ's training pairs: distinct candidates and, per instance, winner/loser indices."""

    image_id: str
    candidates: tuple[str, ...]  # distinct candidate settings that win or lose any pair, sorted
    instance_ids: tuple[int, ...]  # label ids in the mask store; WHOLE_IMAGE_ID = whole image
    weights: tuple[float, ...]
    winners: tuple[int, ...]  # indices into ``candidates``
    losers: tuple[int, ...]  # empty for a method without losers (sft)
    negative_prompt: str


def preference_items(
    pairs: pd.DataFrame, method_name: str, pair_level: str | None = None
) -> list[PreferenceItem]:
    """Group the preference pairs by image into the items ``method_name`` trains on (sorted by
    image), as its entry of :data:`pipeline.contracts.METHODS` says.

    Instance-level methods use the instance pairs (``instance_id >= 0``) with their weights;
    image-level ones the image pair (``instance_id == WHOLE_IMAGE_ID``) with one full mask;
    ``sft`` only that pair's winner. The image's negative prompt joins its rows' negative prompts
    (:func:`pipeline.guidance.join_prompts`: terms split at commas, repeats dropped).
    ``pair_level`` ("instance" or "image") overrides the method's (dro_online falls back to the
    image pair when the table has no instance pairs).
    """
    method = contracts.method(method_name)
    image_level = (pair_level or method.pair_level) == "image"
    whole_image = pairs["instance_id"] == WHOLE_IMAGE_ID
    rows = pairs[whole_image if image_level else ~whole_image]
    if rows.empty:
        kind = f"image-level (instance_id {WHOLE_IMAGE_ID})" if image_level else "instance-level"
        raise ValueError(
            f"method {method_name!r} needs {kind} preference pairs; the pairs table has none"
        )
    items = []
    for image_id, group in rows.sort_values(["image_id", "instance_id"], kind="stable").groupby(
        "image_id", sort=True
    ):
        if image_level and len(group) != 1:
            raise ValueError(f"image {image_id!r} has {len(group)} image-level pairs; expected one")
        winners = list(group["winner"])
        losers = list(group["loser"]) if method.needs_reference else []
        candidates = tuple(sorted(set(winners) | set(losers)))
        index = {name: i for i, name in enumerate(candidates)}
        negatives = pairs.loc[pairs["image_id"] == image_id, "negative_prompt"]
        items.append(
            PreferenceItem(
                image_id=str(image_id),
                candidates=candidates,
                instance_ids=tuple(int(i) for i in group["instance_id"]),
                weights=(1.0,) if image_level else tuple(float(w) for w in group["weight"]),
                winners=tuple(index[name] for name in winners),
                losers=tuple(index[name] for name in losers),
                negative_prompt=join_prompts(negatives),
            )
        )
    return items


@dataclass
class LoadedItem:
    """An item's tensors: HQ-sized LQ ``[3, H, W]``, candidates ``[D, 3, H, W]``, masks ``[M, H, W]``."""

    item: PreferenceItem
    lq: torch.Tensor
    targets: torch.Tensor
    masks: torch.Tensor


class ItemLoader:
    """Reads an item's LQ, candidate images and instance masks from the stage inputs (paths
    through :mod:`pipeline.contracts`)."""

    def __init__(
        self, candidates: pd.DataFrame, candidates_path: Path, data_dir: Path, masks_path: Path
    ):
        self.masks_path = Path(masks_path)
        self.lq_paths = contracts.data_images(data_dir, "lq")
        self.data_dir = Path(data_dir)
        self.paths = contracts.candidate_files(candidates_path, candidates)

    def check(self, items: Sequence[PreferenceItem]) -> None:
        """Fail before training if a pair names a candidate the candidates table lacks, or an
        LQ the data folder lacks."""
        missing = [
            (i.image_id, c)
            for i in items
            for c in i.candidates
            if (i.image_id, c) not in self.paths
        ]
        if missing:
            raise KeyError(f"candidates table has no row for (image_id, setting) {missing[:5]}")
        absent = [i.image_id for i in items if i.image_id not in self.lq_paths]
        if absent:
            raise KeyError(
                f"{self.data_dir / contracts.DATA_TABLE} has no LQ for images {absent[:5]}"
            )

    def load(self, item: PreferenceItem) -> LoadedItem:
        targets = torch.stack(
            [signed_tensor(read_rgb(self.paths[(item.image_id, c)])) for c in item.candidates]
        )
        lq_path = self.lq_paths[item.image_id]
        if not lq_path.is_file():
            raise FileNotFoundError(f"LQ image not found: {lq_path}")
        size = tuple(targets.shape[-2:])
        lq = upsample_lq(signed_tensor(read_rgb(lq_path))[None], size)[0]
        if all(i == WHOLE_IMAGE_ID for i in item.instance_ids):
            masks = torch.ones((1, *size), dtype=torch.bool)
        else:
            label_map = read_label_map(self.masks_path, item.image_id)
            masks = torch.from_numpy(instance_masks(label_map, item.instance_ids))
            if tuple(masks.shape[-2:]) != size:
                masks = (
                    nn.functional.interpolate(masks[None].float(), size=size, mode="nearest")[0]
                    > 0.5
                )
            empty = [i for i, mask in zip(item.instance_ids, masks, strict=True) if not mask.any()]
            if empty:
                raise ValueError(
                    f"image {item.image_id!r}: instances {empty} are absent from the label map"
                )
        return LoadedItem(item, lq, targets, masks)
