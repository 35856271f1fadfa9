"""The vocabulary every stage shares, owned by no stage (docs/design.md).

Table schemas live in :mod:`pipeline.io.tables` and the label-map layout in
:mod:`pipeline.io.masks`; this module holds the names and rules that more than one stage
needs: the whole-image instance id, the table of training methods, and the join that turns
hallucination captions into an image's negative prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the tables are pandas frames; importing pandas is left to the stages
    import pandas as pd

#: the pipeline's stages, in DAG order: one Snakemake rule and one module each, whose config
#: section (if any) has the same name
STAGES = (
    "degrade",
    "prompts",
    "pretrain",
    "candidates",
    "segment",
    "caption",
    "score",
    "select",
    "train",
    "evaluate",
    "report",
)
#: ``instance_id`` of the whole image (scores, pairs): the image-level baselines' "instance"
WHOLE_IMAGE_ID = -1
#: ``candidate`` of the HQ image in the captions table (the reference captions)
HQ_CANDIDATE = "hq"


@dataclass(frozen=True)
class Method:
    """A preference-training method as the workflow and the train stage see it."""

    name: str
    loss: str  # the loss train.py assembles (pipeline.losses)
    pair_level: str  # "instance" (pairs/{objective}.parquet) or "image" (..._image.parquet)
    settings: dict[str, Any] = field(default_factory=dict)  # overrides of the train section


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("dspo", "dspo", "instance"),
        Method("dro", "dro", "instance"),
        # the M1-only ablation: DSPO without the description feedback (no negative prompts)
        Method("dspo_m1", "dspo", "instance", {"negative_prompts": False}),
        Method("dpo", "dpo", "image"),
        Method("sft", "sft", "image"),
    )
}


def method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown training method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


def _join_unique(texts: Sequence[str]) -> str:
    return ", ".join(dict.fromkeys(text for text in texts if text))


def negative_prompts(captions: pd.DataFrame) -> dict[tuple[str, str], str]:
    """``{(image_id, candidate): prompt}``: the hallucinated instances' captions, by instance
    id, joined with ", " (repeats dropped); ``""`` for a candidate with no hallucination."""
    candidates = captions[captions["candidate"] != HQ_CANDIDATE].sort_values(
        ["image_id", "candidate", "instance_id"]
    )
    prompts: dict[tuple[str, str], str] = {}
    for (image_id, candidate), group in candidates.groupby(["image_id", "candidate"], sort=True):
        prompts[(image_id, candidate)] = _join_unique(
            group.loc[group["hallucinated"], "caption"].tolist()
        )
    return prompts


def image_negative_prompts(captions: pd.DataFrame) -> dict[str, str]:
    """``{image_id: prompt}``: the union over candidates (docs/design.md §7, "that image's
    negative prompt"), in candidate then instance order, repeats dropped."""
    prompts: dict[str, list[str]] = {}
    for (image_id, _candidate), prompt in negative_prompts(captions).items():
        prompts.setdefault(image_id, []).extend(prompt.split(", ") if prompt else [])
    return {image_id: _join_unique(texts) for image_id, texts in prompts.items()}
