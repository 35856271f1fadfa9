"""Stage `prompts`: the text every LQ image is super-resolved with (docs/design.md §9).

The SR models are text-conditioned and sample with classifier-free guidance; with an empty
prompt and an empty negative prompt the conditional and unconditional branches are the same
and every guidance scale is a no-op. This stage gives every LQ of a split (the training LQs
and each test set) a prompt and a negative prompt, recorded in ``prompts/{split}.parquet``
(table ``prompts``: image_id, prompt, negative_prompt, source, model). Sources:

- ``fixed``: the configured ``prompt`` for every image;
- ``captioner``: a BLIP caption of the LQ, through the captioner of the `caption` stage
  (:class:`pipeline.captioner.BlipCaptioner`, the same loader and decoding);
- ``tagger``: RAM / DAPE tags of the LQ as OSEDiff and SeeSR prompt with, from the ``ram``
  package (recognize-anything, or the copy OSEDiff/SeeSR vendor with DAPE's ``ram_lora``);
  without it the stage stops with an error naming the package.

Every source appends ``added_prompt`` (SeeSR's "clean, high-resolution, 8k") and gives every
image the configured ``negative_prompt``. Defaults come from the references: SeeSR's
``"dotted, noise, blur, lowres, smooth"`` and OSEDiff's long training negative prompt
(:data:`OSEDIFF_NEGATIVE_PROMPT`); a prompt equal to its negative prompt (guidance would be a
no-op) is an error.

Images and ids: ``train`` is a degraded data folder, listed by its ``pairs.parquet``
(image_id, lq_path); ``synthetic`` and ``paired`` test sets are listed by
:func:`pipeline.io.testsets.load_testset`, so the ids are the ones the evaluation uses.

User description feedback in sampling (the paper's M2, docs/prompts.md): a training image's
negative prompt during candidate regeneration is its own hallucination captions followed by
the base negative prompt (:func:`image_negative_prompt`); a test image, which has no feedback,
gets the training set's most frequent hallucination captions (:func:`feedback_vocabulary`)
followed by the base negative prompt (:func:`vocabulary_negative_prompt`). ``--feedback`` applies
either to a prompts table.

Shards (docs/design.md §15): ``--shard I-of-K`` keeps the listed images whose id hashes to I (a
test set's shard); the training split's shard job lists its data shard folder instead. Each
image's row is marked complete in the job's work folder as soon as it is described, so a killed
job resumes there; a shard with no image writes an empty table.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline import contracts, settings
from pipeline.devices import resolve_device
from pipeline.guidance import PromptsError, apply_feedback, check_guidance, join_prompts
from pipeline.io.images import read_rgb
from pipeline.io.tables import read_metadata, write_table
from pipeline.shards import Shard, ShardWork, fingerprint

SOURCES = ("fixed", "captioner", "tagger")
KINDS = ("train", "synthetic", "paired")
PROMPT_COLUMNS = ["image_id", "prompt", "negative_prompt", "source", "model"]
#: the ``model`` column of the fixed source (no model involved)
NO_MODEL = "none"

#: SeeSR ``test_seesr.py`` ``--negative_prompt`` default (also DP2O-SR's)
SEESR_NEGATIVE_PROMPT = "dotted, noise, blur, lowres, smooth"
#: SeeSR ``--added_prompt`` default, appended to every prompt
SEESR_ADDED_PROMPT = "clean, high-resolution, 8k"
#: OSEDiff ``scripts/train/train_osediff.sh`` ``--neg_prompt`` (cswry/OSEDiff)
OSEDIFF_NEGATIVE_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, cartoon, CG Style, 3D render, "
    "unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, "
    "signature, jpeg artifacts, deformed, lowres, over-smooth"
)

#: the package the tagger source imports, and how to get it
TAGGER_PACKAGE = "ram"
TAGGER_MISSING = (
    "prompts.source 'tagger' needs the Python package 'ram' (RAM / DAPE tagging models), "
    "which is not installed: pip install recognize-anything "
    "(git+https://github.com/xinyu1205/recognize-anything), or put the 'ram' folder that "
    "OSEDiff / SeeSR vendor (with DAPE's ram.models.ram_lora) on PYTHONPATH; "
    "or use prompts.source 'captioner' or 'fixed'"
)


def resolve_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``prompts`` section with the schema's defaults; bad keys or values raise
    :class:`pipeline.settings.ConfigError` naming them."""
    return settings.resolve("prompts", config)


# -- 1. images of a split ----------------------------------------------------------------------


@dataclass(frozen=True)
class LQImage:
    image_id: str
    path: Path


def list_lq_images(
    kind: str, images: str | os.PathLike, suffix_pattern: str | None = None
) -> list[LQImage]:
    """The (image_id, LQ file) of a split, sorted by id.

    ``train``: a degraded data folder, its ``pairs.parquet`` (image_id, lq_path relative to the
    folder). ``synthetic`` / ``paired``: :func:`pipeline.io.testsets.load_testset`, with the
    evaluation's ``name_suffix_pattern`` (its default when None).
    """
    folder = Path(images)
    if kind == "train":
        lq_paths = contracts.data_images(folder, "lq")
        listed = [LQImage(image_id, lq_paths[image_id]) for image_id in sorted(lq_paths)]
        missing = [str(image.path) for image in listed if not image.path.is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: LQ images in pairs.parquet are missing: {missing}")
        if not listed and not _is_shard(folder / contracts.DATA_TABLE):
            raise PromptsError(f"{folder}/pairs.parquet lists no images")
        return listed
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    from pipeline.io.testsets import DEFAULT_SUFFIX_PATTERN, load_testset

    testset = load_testset(kind, folder, suffix_pattern or DEFAULT_SUFFIX_PATTERN)
    return [LQImage(image.image_id, image.lq) for image in testset]


def _is_shard(table: Path) -> bool:
    """Whether a data table is one shard of several (docs/design.md §15): such a shard may
    hold no image, and its prompts table is then empty."""
    return read_metadata(table).get("shard", {}).get("count", 1) > 1


# -- 2. sources --------------------------------------------------------------------------------


class FixedSource:
    """The configured prompt for every image."""

    name = "fixed"

    def __init__(self, prompt: str) -> None:
        self.prompt = prompt
        self.model = NO_MODEL

    def describe(self, images: Sequence[np.ndarray]) -> list[str]:
        return [self.prompt] * len(images)

    def metadata(self) -> dict[str, Any]:
        return {"prompt": self.prompt}


class CaptionerSource:
    """BLIP captions of the LQ images, with the caption stage's loader."""

    name = "captioner"

    def __init__(self, config: Mapping[str, Any]) -> None:
        if not config["captioner"]:
            raise settings.ConfigError(
                "config prompts.captioner: source 'captioner' needs a BLIP folder (it is null)"
            )
        # the caption stage's loader (to move to a shared module; imported from there then)
        from pipeline.captioner import BlipCaptioner

        self.captioner = BlipCaptioner(
            config["captioner"],
            resolve_device(config["device"]),
            config["captioner_prompt"],
            config["max_new_tokens"],
            config["num_beams"],
            config["batch_size"],
        )
        path = Path(self.captioner.path)
        self.model = str(path.resolve()) if path.exists() else self.captioner.path

    def describe(self, images: Sequence[np.ndarray]) -> list[str]:
        return self.captioner.caption(images)

    def metadata(self) -> dict[str, Any]:
        return {
            "captioner": self.model,
            "captioner_prompt": self.captioner.prompt,
            "max_new_tokens": self.captioner.max_new_tokens,
            "num_beams": self.captioner.num_beams,
        }


def ram_tags_to_prompt(tags: str) -> str:
    """RAM's ``"cat | dog | tree"`` as a prompt: ``"cat, dog, tree"``."""
    return join_prompts([tag for tag in tags.split("|")])


class TaggerSource:
    """RAM / DAPE tags of the LQ images (OSEDiff ``test_osediff.py``, SeeSR ``test_seesr.py``):
    the LQ resized to ``tagger_image_size``, ImageNet-normalised, ``model.generate_tag``."""

    name = "tagger"
    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, config: Mapping[str, Any]) -> None:
        try:
            import ram  # noqa: F401
        except ImportError as error:
            raise ModuleNotFoundError(TAGGER_MISSING, name=TAGGER_PACKAGE) from error
        weights, condition = config["tagger"], config["tagger_condition"]
        if not weights:
            raise settings.ConfigError(
                "config prompts.tagger: source 'tagger' needs a RAM checkpoint (it is null)"
            )
        for key, path in (("tagger", weights), ("tagger_condition", condition)):
            if path and not Path(path).is_file():
                raise FileNotFoundError(f"config prompts.{key}: checkpoint not found: {path}")
        self.image_size = int(config["tagger_image_size"])
        self.batch_size = int(config["batch_size"])
        self.device = resolve_device(config["device"])
        options = {"pretrained": str(weights), "image_size": self.image_size}
        options["vit"] = config["tagger_vit"]
        if condition:
            from ram.models.ram_lora import ram as build  # DAPE, as vendored by OSEDiff / SeeSR

            options["pretrained_condition"] = str(condition)
        else:
            from ram.models import ram as build
        self.net = build(**options).eval().to(self.device)
        self.weights, self.condition = str(weights), condition and str(condition)
        self.model = self.weights if not condition else f"{self.weights} + {condition}"

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        batch = torch.stack(
            [torch.from_numpy(np.ascontiguousarray(i)).permute(2, 0, 1) for i in images]
        )
        size = (self.image_size, self.image_size)
        batch = torch.nn.functional.interpolate(
            batch.float() / 255.0, size=size, mode="bilinear", antialias=True, align_corners=False
        )
        mean = torch.tensor(self.MEAN).view(1, 3, 1, 1)
        std = torch.tensor(self.STD).view(1, 3, 1, 1)
        return ((batch - mean) / std).to(self.device)

    @torch.no_grad()
    def describe(self, images: Sequence[np.ndarray]) -> list[str]:
        prompts: list[str] = []
        for start in range(0, len(images), self.batch_size):
            tags, _chinese = self.net.generate_tag(
                self.preprocess(images[start : start + self.batch_size])
            )
            prompts.extend(ram_tags_to_prompt(text) for text in tags)
        return prompts

    def metadata(self) -> dict[str, Any]:
        return {
            "tagger": self.weights,
            "tagger_condition": self.condition,
            "tagger_image_size": self.image_size,
        }


def build_source(config: Mapping[str, Any]):
    """The prompt source the (resolved) config names."""
    source = config["source"]
    if source == "fixed":
        return FixedSource(config["prompt"])
    if source == "captioner":
        return CaptionerSource(config)
    if source == "tagger":
        return TaggerSource(config)
    raise settings.ConfigError(f"config prompts.source: unknown source {source!r}; known {SOURCES}")


# -- 3. the stage ------------------------------------------------------------------------------


def make_prompts(
    images: Sequence[LQImage],
    config: Mapping[str, Any] | None,
    chunk: int = 64,
    work: ShardWork | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The ``prompts`` rows of ``images`` and the metadata to store with them.

    The LQs are read and described ``chunk`` at a time (the source batches inside a chunk),
    never all at once. With ``work`` (a shard job, docs/design.md §15) each image's row is
    marked complete as soon as it is described, images an earlier attempt completed are
    skipped, and the rows come back from ``work`` in the order of ``images``.
    """
    config = resolve_config(config)
    source = build_source(config)
    rows: list[dict[str, Any]] = []
    pending = list(images)
    if work is not None:
        pending = [image for image in images if not work.done(image.image_id)]
        work.report(len(images))
    for start in range(0, len(pending), chunk):
        part = pending[start : start + chunk]
        pixels = [read_rgb(image.path) for image in part]
        texts = source.describe(pixels)
        for image, text in zip(part, texts, strict=True):
            row = {
                "image_id": image.image_id,
                "prompt": join_prompts(text, config["added_prompt"]),
                "negative_prompt": join_prompts(config["negative_prompt"]),
                "source": source.name,
                "model": source.model,
            }
            if work is None:
                rows.append(row)
            else:
                work.finish(image.image_id, [row])
    if work is None:
        frame = pd.DataFrame(rows, columns=PROMPT_COLUMNS)
    else:
        frame = work.rows([image.image_id for image in images], PROMPT_COLUMNS)
    check_guidance(frame)
    metadata = {
        "source": source.name,
        "model": source.model,
        "added_prompt": config["added_prompt"],
        "negative_prompt": config["negative_prompt"],
        "n_images": len(frame),
        **source.metadata(),
        "config": config,
    }
    return frame, metadata


def shard_images(listed: Sequence[LQImage], shard: Shard) -> list[LQImage]:
    """The listed images whose id lies in ``shard``, in listed (id) order."""
    return [image for image in listed if shard.holds(image.image_id)]


def run_prompts_stage(
    images: str | os.PathLike,
    kind: str,
    config: Mapping[str, Any] | None,
    suffix_pattern: str | None = None,
    shard: Shard | str | None = None,
    work: ShardWork | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The whole stage for one split: list its LQs, describe them, the rows and metadata.

    ``shard`` (``"I-of-K"``; None: every listed image) keeps the images whose id lies in that
    shard (docs/design.md §15: a test set's shard; the training split's shard is its data
    shard folder). ``work``: resume inside the shard (:func:`make_prompts`).
    """
    shard = shard if isinstance(shard, Shard) else Shard.parse(shard)
    listed = shard_images(list_lq_images(kind, images, suffix_pattern), shard)
    frame, metadata = make_prompts(listed, config, work=work)
    return frame, {"kind": kind, "images": str(images), **metadata, "shard": shard.record()}


def write_prompts(
    images: str | os.PathLike,
    kind: str,
    out: str | os.PathLike,
    config: Mapping[str, Any] | None,
    seed: int = 0,
    suffix_pattern: str | None = None,
    shard: Shard | str | None = None,
    feedback: str | os.PathLike | None = None,
    feedback_mode: str | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The stage as the CLI runs it: the prompts table of a split (or of one shard of it) at
    ``out``, written through a :class:`pipeline.shards.ShardWork` folder beside it, so a
    killed run resumes image by image; ``feedback`` (M2) is applied to the assembled rows.
    Returns the rows and the metadata written with them."""
    shard = shard if isinstance(shard, Shard) else Shard.parse(shard)
    resolved = resolve_config(config)
    listed = shard_images(list_lq_images(kind, images, suffix_pattern), shard)
    mode = None
    if feedback is not None:
        mode = feedback_mode or ("image" if kind == "train" else "vocabulary")
    # the listing's folder (a data folder: its pairs.parquet), every LQ read, the feedback
    inputs = [images, *(image.path for image in listed), feedback]
    stamp = fingerprint(
        "prompts",
        inputs=inputs,
        config=resolved,
        seed=seed,
        kind=kind,
        suffix_pattern=suffix_pattern,
        shard=shard.item,
        feedback_mode=mode,
    )
    work = ShardWork(out, stamp, stage="prompts")
    frame, metadata = make_prompts(listed, config, work=work)
    metadata = {"kind": kind, "images": str(images), **metadata, "shard": shard.record()}
    if feedback is not None:
        frame = apply_feedback(
            frame,
            pd.read_parquet(feedback),
            mode,
            resolved["feedback_max_terms"],
            resolved["feedback_min_images"],
        )
        metadata["feedback"] = {"table": str(feedback), "mode": mode}
    metadata["seed"] = seed
    write_table(frame, out, "prompts", metadata)
    work.discard()
    return frame, metadata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline prompts",
        description="a prompt and a negative prompt for every LQ of a split",
    )
    parser.add_argument(
        "--images",
        required=True,
        type=Path,
        help="train / synthetic: a degraded data folder; paired: an LR/HR folder",
    )
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--out", required=True, type=Path, help="prompts/{split}.parquet")
    parser.add_argument("--config", default="{}", help="the prompts settings: JSON or a file")
    parser.add_argument("--seed", type=int, default=0, help="recorded only (no random draws)")
    parser.add_argument(
        "--name-suffix-pattern",
        default=None,
        help="paired test sets: evaluate.name_suffix_pattern (ids as evaluate)",
    )
    parser.add_argument(
        "--feedback",
        type=Path,
        default=None,
        help="M2: a captions or pairs table whose hallucination captions join the negative prompts",
    )
    parser.add_argument(
        "--feedback-mode",
        choices=("image", "vocabulary"),
        default=None,
        help="image: each image's own feedback (default for train); vocabulary: "
        "the training vocabulary (default for test sets)",
    )
    parser.add_argument(
        "--shard",
        default=None,
        help="I-of-K: only the listed images whose id lies in shard I of K "
        "(docs/design.md §15: test sets; the training split reads its data "
        "shard instead; default: every image)",
    )
    args = parser.parse_args(argv)

    config = settings.cli_config(args.config)
    frame, metadata = write_prompts(
        args.images,
        args.kind,
        args.out,
        config,
        seed=args.seed,
        suffix_pattern=args.name_suffix_pattern,
        shard=args.shard,
        feedback=args.feedback,
        feedback_mode=args.feedback_mode,
    )
    print(
        f"prompts: {len(frame)} images, source {metadata['source']}, model {metadata['model']}",
        file=sys.stderr,
    )
    return 0
