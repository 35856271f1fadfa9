"""The prompt and negative prompt every stage gives an image, from the prompts table.

The ``prompts`` stage (:mod:`pipeline.prompts`, docs/prompts.md) writes one table per split;
pretrain, candidates and train read ``prompts/train.parquet``, evaluate the test set's. This
module is the consumers' one way in: :func:`stage_prompts` loads the rows of the images a stage
needs (optionally with the M2 feedback negatives, :func:`load_prompts`),
refuses a table whose prompt equals its negative prompt for any of them (guidance would be a
no-op: :func:`check_guidance`, reached here for tables made or edited by hand
as well as by the stage), and returns what the stage records in its output metadata (the
table, its source and model, the feedback). Without a table (direct API calls) the stages use
the models' own defaults: an empty prompt and ``default_negative_prompt`` (multi-step) or the
one-step ``negative_prompt``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import settings
from pipeline.io.tables import read_metadata, read_table

FEEDBACK_MODES = ("image", "vocabulary")
#: how many distinct negative prompts the metadata record lists
NEGATIVES_SHOWN = 10


class PromptsError(ValueError):
    """Prompts that would make guidance a no-op, or inputs the stage cannot use."""


def join_prompts(*parts: str | Iterable[str]) -> str:
    """The comma-separated terms of all texts, joined with ", ": terms stripped, empty ones and
    repeats dropped (first occurrence kept); a part may itself be a list of texts."""
    terms: list[str] = []
    for part in parts:
        for text in [part] if isinstance(part, str) else part:
            terms.extend(term.strip() for term in (text or "").split(","))
    return ", ".join(dict.fromkeys(term for term in terms if term))


def check_guidance(frame: pd.DataFrame, where: str = "prompts") -> None:
    """Refuse prompts equal to their negative prompt: guidance could not change the output
    (docs/design.md §9). The error lists the first images."""
    same = frame.loc[
        frame["prompt"].str.strip() == frame["negative_prompt"].str.strip(), "image_id"
    ]
    if len(same):
        shown = ", ".join(map(str, same.tolist()[:10]))
        raise PromptsError(
            f"{where}: {len(same)} image(s) have a prompt equal to their negative prompt "
            f"(guidance would be a no-op): {shown}; set prompts.prompt / added_prompt / "
            f"negative_prompt so they differ"
        )


def load_prompts(
    path: str | os.PathLike,
    image_ids: Iterable[str] | None = None,
    *,
    feedback: str | os.PathLike | pd.DataFrame | None = None,
    mode: str = "vocabulary",
    max_terms: int = 8,
    min_images: int = 1,
) -> dict[str, tuple[str, str]]:
    """``{image_id: (prompt, negative_prompt)}`` of a ``prompts`` table; with ``image_ids``,
    an image the table lacks is a KeyError naming the file and the first missing ids.

    ``feedback`` (M2 in sampling): a captions or preference-pairs table (or its path) whose
    hallucination captions go before the negative prompts, each image's own
    (``mode="image"``, training LQs) or the training vocabulary (``mode="vocabulary"``, test
    images); see :func:`apply_feedback`.
    """
    frame = read_table(path, "prompts")
    if feedback is not None:
        table = feedback if isinstance(feedback, pd.DataFrame) else pd.read_parquet(feedback)
        frame = apply_feedback(frame, table, mode, max_terms, min_images)
    prompts = {
        str(row.image_id): (str(row.prompt), str(row.negative_prompt))
        for row in frame.itertuples(index=False)
    }
    if image_ids is not None:
        missing = sorted(set(map(str, image_ids)) - set(prompts))
        if missing:
            raise KeyError(f"{path}: no prompt for {len(missing)} image(s): {missing[:10]}")
    return prompts


def prompts_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a prompts table (source, model, ...)."""
    return read_metadata(path)


# -- M2: feedback negatives in sampling ----------------------------------------------------------


def feedback_by_image(feedback: pd.DataFrame) -> dict[str, list[str]]:
    """``{image_id: [hallucination caption, ...]}`` of a feedback table, in table order,
    repeats dropped: a ``captions`` table (rows with ``hallucinated`` true, HQ rows excluded)
    or any table with ``image_id`` and ``negative_prompt`` (preference pairs, candidates; the
    ``", "``-joined texts are split again)."""
    result: dict[str, list[str]] = {}
    if {"caption", "hallucinated"} <= set(feedback.columns):
        flagged = feedback[feedback["hallucinated"].astype(bool)]
        if "candidate" in flagged.columns:
            flagged = flagged[flagged["candidate"] != "hq"]
        sort = [c for c in ("image_id", "candidate", "instance_id") if c in flagged.columns]
        for row in flagged.sort_values(sort, kind="stable").itertuples(index=False):
            result.setdefault(str(row.image_id), []).append(str(row.caption))
    elif {"image_id", "negative_prompt"} <= set(feedback.columns):
        for row in feedback.itertuples(index=False):
            text = row.negative_prompt if isinstance(row.negative_prompt, str) else ""
            result.setdefault(str(row.image_id), []).extend(text.split(", "))
    else:
        raise PromptsError(
            "a feedback table needs columns (caption, hallucinated) or (image_id, "
            f"negative_prompt); it has {list(feedback.columns)}"
        )
    cleaned = {image_id: join_prompts(texts) for image_id, texts in result.items()}
    return {image_id: text.split(", ") for image_id, text in cleaned.items() if text}


def feedback_vocabulary(
    feedback: pd.DataFrame | Mapping[str, Sequence[str]], max_terms: int = 8, min_images: int = 1
) -> list[str]:
    """The hallucination captions of the training feedback that a test image's negative prompt
    carries: each text counted once per training image it was flagged in, those flagged in at
    least ``min_images`` images, most frequent first (ties alphabetically), at most
    ``max_terms``."""
    by_image = feedback if isinstance(feedback, Mapping) else feedback_by_image(feedback)
    counts = Counter(text for texts in by_image.values() for text in dict.fromkeys(texts))
    ranked = sorted(
        (text for text, n in counts.items() if n >= min_images),
        key=lambda text: (-counts[text], text),
    )
    return ranked[: max(0, int(max_terms))]


def image_negative_prompt(base_negative: str, feedback: Sequence[str] | str) -> str:
    """A training image's negative prompt during candidate regeneration: its own feedback texts
    first (CLIP truncates at 77 tokens; the feedback must survive), then the base negative."""
    return join_prompts(feedback, base_negative)


def vocabulary_negative_prompt(
    feedback: pd.DataFrame | Mapping[str, Sequence[str]],
    base_negative: str = "",
    max_terms: int = 8,
    min_images: int = 1,
) -> str:
    """A test image's negative prompt (no feedback of its own): the training set's
    :func:`feedback_vocabulary`, then the base negative prompt."""
    return join_prompts(feedback_vocabulary(feedback, max_terms, min_images), base_negative)


def apply_feedback(
    prompts: pd.DataFrame,
    feedback: pd.DataFrame,
    mode: str,
    max_terms: int = 8,
    min_images: int = 1,
) -> pd.DataFrame:
    """A prompts table with M2 negatives: ``mode="image"`` puts each image's own feedback
    before its negative prompt (training LQs), ``mode="vocabulary"`` the training vocabulary
    (test sets)."""
    prompts = prompts.copy()
    if mode == "image":
        by_image = feedback_by_image(feedback)
        prompts["negative_prompt"] = [
            image_negative_prompt(negative, by_image.get(str(image_id), []))
            for image_id, negative in zip(
                prompts["image_id"], prompts["negative_prompt"], strict=True
            )
        ]
    elif mode == "vocabulary":
        vocabulary = feedback_vocabulary(feedback, max_terms, min_images)
        prompts["negative_prompt"] = [
            join_prompts(vocabulary, n) for n in prompts["negative_prompt"]
        ]
    else:
        raise ValueError(f"unknown feedback mode {mode!r} (image or vocabulary)")
    return prompts


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
    prompt is a :class:`PromptsError`. ``record`` goes into the stage's output
    metadata."""
    if feedback is not None and mode not in FEEDBACK_MODES:
        raise ValueError(f"unknown feedback mode {mode!r}; expected one of {FEEDBACK_MODES}")
    ids = [str(i) for i in image_ids]
    metadata = prompts_metadata(path)
    max_terms, min_images = _feedback_limits(metadata)
    loaded = load_prompts(
        path, ids, feedback=feedback, mode=mode, max_terms=max_terms, min_images=min_images
    )
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
        record["feedback"] = {
            "table": name,
            "mode": mode,
            "max_terms": max_terms,
            "min_images": min_images,
        }
    return chosen, record


def optional_stage_prompts(
    path: str | os.PathLike | None, image_ids: Iterable[str], *, where: str
) -> tuple[dict[str, tuple[str, str]] | None, dict[str, Any]]:
    """:func:`stage_prompts` of a stage whose prompts table is optional (the train loops):
    ``(None, no_table_record(None))`` without one (the models' default prompts)."""
    if path is None:
        return None, no_table_record(None)
    return stage_prompts(path, image_ids, where=where)


def no_table_record(negative: str | None) -> dict[str, Any]:
    """The metadata record of a stage run without a prompts table (the models' defaults)."""
    return {
        "table": None,
        "source": None,
        "model": None,
        "feedback": None,
        "note": "no prompts table: empty prompts, negative prompt "
        f"{negative!r} (None: the model's default)",
    }
