"""The prompt and negative prompt every stage gives an image, from the prompts table.

The ``prompts`` stage (:mod:`pipeline.prompts`, docs/prompts.md) writes one table per split;
pretrain, candidates and train read ``prompts/train.parquet``, evaluate the test set's. This
module is the consumers' one way in: :func:`stage_prompts` loads the rows of the images a stage
needs (optionally with the M2 feedback negatives, :func:`pipeline.prompts.load_prompts`),
refuses a table whose prompt equals its negative prompt for any of them (guidance would be a
no-op: :func:`pipeline.prompts.check_guidance`, reached here for tables made or edited by hand
as well as by the stage), and returns what the stage records in its output metadata (the
table, its source and model, the feedback). Without a table (direct API calls) the stages use
the models' own defaults: an empty prompt and ``default_negative_prompt`` (multi-step) or the
one-step ``negative_prompt``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import settings
from pipeline.prompts import check_guidance, load_prompts, prompts_metadata

FEEDBACK_MODES = ("image", "vocabulary")
#: how many distinct negative prompts the metadata record lists
NEGATIVES_SHOWN = 10


def _feedback_limits(metadata: dict[str, Any]) -> tuple[int, int]:
    """``feedback_max_terms`` / ``feedback_min_images`` the prompts table was made with (its
    resolved config), else the schema's defaults."""
    defaults = settings.defaults("prompts")
    made_with = metadata.get("config") or {}
    keys = ("feedback_max_terms", "feedback_min_images")
    return tuple(int(made_with.get(key, defaults[key])) for key in keys)  # type: ignore[return-value]


def stage_prompts(
    path: str | os.PathLike,
    image_ids: Iterable[str],
    *,
    feedback: str | os.PathLike | pd.DataFrame | None = None,
    mode: str = "vocabulary",
    where: str = "prompts",
) -> tuple[dict[str, tuple[str, str]], dict[str, Any]]:
    """``({image_id: (prompt, negative_prompt)}, record)`` for ``image_ids`` from the prompts
    table at ``path``; ``feedback`` (a pairs or captions table) puts its hallucination captions
    before the negative prompts (``mode`` ``image``: each image's own; ``vocabulary``: the
    training vocabulary). A missing image is a KeyError naming it; a prompt equal to its negative
    prompt is a :class:`pipeline.prompts.PromptsError`. ``record`` goes into the stage's output
    metadata."""
    if feedback is not None and mode not in FEEDBACK_MODES:
        raise ValueError(f"unknown feedback mode {mode!r}; expected one of {FEEDBACK_MODES}")
    ids = [str(i) for i in image_ids]
    metadata = prompts_metadata(path)
    max_terms, min_images = _feedback_limits(metadata)
    loaded = load_prompts(path, ids, feedback=feedback, mode=mode,
                          max_terms=max_terms, min_images=min_images)  # fmt: skip
    chosen = {i: loaded[i] for i in ids}
    frame = pd.DataFrame(
        [(i, p, n) for i, (p, n) in chosen.items()],
        columns=["image_id", "prompt", "negative_prompt"],
    )
    check_guidance(frame, where=f"{where} ({path})")
    record: dict[str, Any] = {
        "table": str(path),
        "source": metadata.get("source"),
        "model": metadata.get("model"),
        "feedback": None,
        # the distinct negative prompts used (one per image with image feedback; few otherwise)
        "negative_prompts": sorted({n for _, n in chosen.values()})[:NEGATIVES_SHOWN],
        "n_negative_prompts": len({n for _, n in chosen.values()}),
    }
    if feedback is not None:
        name = "<table>" if isinstance(feedback, pd.DataFrame) else str(Path(feedback))
        record["feedback"] = {"table": name, "mode": mode, "max_terms": max_terms,
                              "min_images": min_images}  # fmt: skip
    return chosen, record


def no_table_record(negative: str | None) -> dict[str, Any]:
    """The metadata record of a stage run without a prompts table (the models' defaults)."""
    return {"table": None, "source": None, "model": None, "feedback": None,
            "note": "no prompts table: empty prompts, negative prompt "
                    f"{negative!r} (None: the model's default)"}  # fmt: skip
