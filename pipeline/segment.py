"""Semantic instance extraction (DSPO Sec. 4.2.1): SAM masks turned into one partition per image.

Steps, as in the paper's section:

1. :func:`generate_mask_records` runs the semantic extraction model on the shared frame
   (the HQ image by default, docs/design.md §1). With a configured checkpoint this is
   ``segment_anything.SamAutomaticMaskGenerator`` (:func:`load_sam`, :func:`build_mask_generator`);
   without one a classical scikit-image segmenter (:func:`classical_mask_records`) stands in
   and the run log and every metadata record say that SAM was not used.
2. :func:`masks_to_partition` turns the overlapping, gappy masks into the partition
   ``S = {s_m}, Σ_m s_m = 1`` the loss needs (docs/design.md §2) and computes the instance
   weights of Eq. (3), ``w_m = |s_m| / Σ_m |s_m|``.
3. :func:`segment_images` does both for every image of the shared frame (the data folder's HQ
   images, or the candidates of one setting, found through :mod:`pipeline.contracts`) in
   image-id order, writing each label map into the store as it is computed;
   :func:`main` builds ``masks/{framework}.zarr`` (:mod:`pipeline.io.masks`) in its shard's
   work folder, resumable after a kill (:class:`pipeline.shards.ShardWork`, docs/design.md
   §15), writes the ``instances`` table and renames the store into place.

Segmentation draws no random numbers (SAM's point grid and the classical segmenters are
deterministic); ``--seed`` is recorded in the metadata for provenance only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline import contracts, settings, shards
from pipeline.devices import resolve_device
from pipeline.io.images import read_rgb
from pipeline.io.masks import open_label_store, write_label_map
from pipeline.io.tables import read_table, write_table

MaskRecord = dict[str, Any]

#: segment_anything/build_sam.py's architectures; ``architecture`` in the config overrides keys
SAM_ARCHITECTURES: dict[str, dict[str, Any]] = {
    name: {
        "encoder_embed_dim": dim,
        "encoder_depth": depth,
        "encoder_num_heads": heads,
        "encoder_global_attn_indexes": list(global_indexes),
        "image_size": 1024,
        "patch_size": 16,
        "window_size": 14,
        "prompt_embed_dim": 256,
        "decoder_depth": 2,
        "decoder_mlp_dim": 2048,
        "decoder_num_heads": 8,
        "iou_head_hidden_dim": 256,
    }
    for name, dim, depth, heads, global_indexes in (
        ("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
        ("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
        ("vit_b", 768, 12, 12, (2, 5, 8, 11)),
    )
}


def resolve_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``segment`` section with the schema's defaults (the generator's are
    SamAutomaticMaskGenerator's own); bad keys or values raise
    :class:`pipeline.settings.ConfigError` naming them."""
    resolved = settings.resolve("segment", config)
    if resolved["model_type"] not in SAM_ARCHITECTURES:
        raise ValueError(
            f"segment.model_type {resolved['model_type']!r} unknown; "
            f"known: {sorted(SAM_ARCHITECTURES)}"
        )
    if resolved["top_k"] is not None and int(resolved["top_k"]) < 1:
        raise ValueError(f"segment.top_k must be >= 1 or null, got {resolved['top_k']}")
    return resolved


# -- 1. semantic extraction ------------------------------------------------------------------


def build_sam(architecture: Mapping[str, Any]) -> torch.nn.Module:
    """An untrained ``Sam`` assembled from segment_anything's modules (mirrors ``_build_sam``).

    ``architecture`` holds the keys of :data:`SAM_ARCHITECTURES`; the real ViT-H/L/B use
    those values, tests use tiny ones through this same function.
    """
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    image_size = int(architecture["image_size"])
    prompt_dim = int(architecture["prompt_embed_dim"])
    embedding_size = image_size // int(architecture["patch_size"])
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=int(architecture["encoder_depth"]),
            embed_dim=int(architecture["encoder_embed_dim"]),
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=int(architecture["encoder_num_heads"]),
            patch_size=int(architecture["patch_size"]),
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(architecture["encoder_global_attn_indexes"]),
            window_size=int(architecture["window_size"]),
            out_chans=prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=int(architecture["decoder_depth"]),
                embedding_dim=prompt_dim,
                mlp_dim=int(architecture["decoder_mlp_dim"]),
                num_heads=int(architecture["decoder_num_heads"]),
            ),
            transformer_dim=prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=int(architecture["iou_head_hidden_dim"]),
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def load_sam_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Read a SAM state dict from ``.safetensors`` or a released ``.pth`` file.

    The released SAM checkpoints (``sam_vit_h_4b8939.pth``, ...) are pickled state dicts;
    they are read with ``torch.load(weights_only=True)``, which unpickles tensors and plain
    containers only and refuses arbitrary objects, so no code in the file is executed.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {checkpoint}")
    if checkpoint.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(checkpoint))
    state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise ValueError(f"SAM checkpoint {checkpoint} does not hold a state dict")
    return state_dict


def load_sam(
    checkpoint: str | Path,
    model_type: str = "vit_h",
    architecture: Mapping[str, Any] | None = None,
    device: str = "cpu",
) -> torch.nn.Module:
    """Build the ``model_type`` SAM (keys overridden by ``architecture``) and load its weights."""
    state_dict = load_sam_state_dict(checkpoint)
    sam = build_sam({**SAM_ARCHITECTURES[model_type], **(architecture or {})})
    try:
        sam.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"SAM checkpoint {checkpoint} does not match model_type {model_type!r} "
            f"with architecture overrides {dict(architecture or {})}: {error}"
        ) from error
    return sam.to(resolve_device(device))


def build_mask_generator(sam: torch.nn.Module, generator: Mapping[str, Any]):
    """``SamAutomaticMaskGenerator`` with every setting from config (binary-mask output)."""
    from segment_anything import SamAutomaticMaskGenerator

    return SamAutomaticMaskGenerator(sam, output_mode="binary_mask", **generator)


def classical_mask_records(
    image: np.ndarray, method: str, params: Mapping[str, Any]
) -> list[MaskRecord]:
    """SAM-shaped records from a scikit-image segmentation (the stand-in when SAM is absent).

    The segments already form a partition, so ``predicted_iou`` and ``stability_score`` are
    set to 1.0 (they only break overlap ties, and there is no overlap).
    """
    from skimage.segmentation import felzenszwalb, slic

    if method == "felzenszwalb":
        segments = felzenszwalb(image, **params)
    elif method == "slic":
        segments = slic(image, start_label=0, channel_axis=-1, **params)
    else:
        raise ValueError(f"unknown classical segmenter {method!r} (felzenszwalb or slic)")
    records = []
    for label in np.unique(segments):
        mask = segments == label
        records.append(
            {
                "segmentation": mask,
                "area": int(mask.sum()),
                "bbox": list(mask_bbox(mask)),
                "predicted_iou": 1.0,
                "stability_score": 1.0,
            }
        )
    return records


@dataclass
class Segmenter:
    """A callable image → mask records, with what it is for the metadata."""

    generate: Callable[[np.ndarray], list[MaskRecord]]
    info: dict[str, Any]


def build_segmenter(config: Mapping[str, Any]) -> Segmenter:
    """SAM when ``checkpoint`` is set (missing file → ``FileNotFoundError``), else classical."""
    config = resolve_config(config)
    if config["checkpoint"]:
        device = resolve_device(config["device"])
        sam = load_sam(config["checkpoint"], config["model_type"], config["architecture"], device)
        generator = build_mask_generator(sam, config["generator"])
        info = {
            "backend": "sam",
            "sam_used": True,
            "model_type": config["model_type"],
            "architecture": {**SAM_ARCHITECTURES[config["model_type"]], **config["architecture"]},
            "checkpoint": str(Path(config["checkpoint"]).resolve()),
            "generator": config["generator"],
            "device": str(device),
        }
        return Segmenter(generator.generate, info)
    method = config["classical"]["method"]
    params = config["classical"][method]
    info = {
        "backend": "classical",
        "sam_used": False,
        "model_type": None,
        "checkpoint": None,
        "generator": {"method": method, **params},
        "note": f"no SAM checkpoint configured: scikit-image {method} stands in for SAM",
    }
    return Segmenter(partial(classical_mask_records, method=method, params=params), info)


def generate_mask_records(image: np.ndarray, segmenter: Segmenter) -> list[MaskRecord]:
    """Step 1: the semantic extraction model's masks for one RGB uint8 image."""
    return segmenter.generate(image)


# -- 2. partition and weights (Eq. 3) ---------------------------------------------------------


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box ``(x, y, w, h)`` of a non-empty boolean mask (SAM's XYWH convention)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return (0, 0, 0, 0)
    return (int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1))


@dataclass
class Partition:
    """One image's partition: ``label_map`` uint16 ``[H, W]`` and one row per instance.

    Instance ids: kept instances are ``1..K`` by decreasing area; the remainder (uncovered
    pixels plus the folded small instances) is ``0`` and absent when it has no pixels.
    """

    label_map: np.ndarray
    instances: list[dict[str, Any]]

    @property
    def remainder_id(self) -> int | None:
        return next((row["instance_id"] for row in self.instances if row["is_remainder"]), None)


REMAINDER_ID = 0


def masks_to_partition(
    records: Sequence[MaskRecord], shape: tuple[int, int], top_k: int | None = 5
) -> Partition:
    """Overlapping masks → a partition with at most ``top_k`` instances plus a remainder.

    - a pixel claimed by several masks goes to the mask with the highest ``predicted_iou``,
      then the smallest area, then the earliest record;
    - pixels no mask claims form the remainder;
    - after overlap resolution the ``top_k`` largest instances are kept (``None`` keeps all),
      the others are folded into the remainder;
    - Eq. (3): ``w_m = |s_m| / Σ_m |s_m|`` over all instances including the remainder, so the
      weights sum to one (``Σ_m |s_m| = H·W``).
    """
    height, width = shape
    masks = [np.asarray(record["segmentation"], dtype=bool) for record in records]
    for index, mask in enumerate(masks):
        if mask.shape != (height, width):
            raise ValueError(f"mask record {index} has shape {mask.shape}, expected {shape}")
    areas = [int(mask.sum()) for mask in masks]
    priority = sorted(
        range(len(masks)),
        key=lambda i: (-float(records[i].get("predicted_iou", 0.0)), areas[i], i),
    )
    # owner[y, x] = index into `masks` + 1 of the mask holding the pixel, 0 = unclaimed;
    # masks are visited best first and take only unclaimed pixels
    owner = np.zeros((height, width), dtype=np.int64)
    for index in priority:
        owner[masks[index] & (owner == 0)] = index + 1
    resolved_areas = np.bincount(owner.ravel(), minlength=len(masks) + 1)
    rank = {index: position for position, index in enumerate(priority)}
    survivors = [i for i in range(len(masks)) if resolved_areas[i + 1] > 0]
    survivors.sort(key=lambda i: (-resolved_areas[i + 1], rank[i]))
    kept = survivors if top_k is None else survivors[: int(top_k)]
    if len(kept) >= 65535:
        raise ValueError(f"{len(kept)} instances do not fit a uint16 label map")

    relabel = np.full(len(masks) + 1, REMAINDER_ID, dtype=np.uint16)
    for new_id, index in enumerate(kept, start=1):
        relabel[index + 1] = new_id
    label_map = relabel[owner]

    total = float(height * width)
    instances = []
    for new_id, index in enumerate(kept, start=1):
        mask = label_map == new_id
        instances.append(
            _instance_row(new_id, mask, total, float(records[index].get("predicted_iou", np.nan)))
        )
    remainder = label_map == REMAINDER_ID
    if remainder.any():
        instances.append(_instance_row(REMAINDER_ID, remainder, total, float("nan"), True))
    return Partition(label_map=label_map, instances=instances)


def _instance_row(
    instance_id: int, mask: np.ndarray, total: float, score: float, is_remainder: bool = False
) -> dict[str, Any]:
    area = int(mask.sum())
    x, y, w, h = mask_bbox(mask)
    return {
        "instance_id": instance_id,
        "area": area,
        "bbox_x": x,
        "bbox_y": y,
        "bbox_w": w,
        "bbox_h": h,
        "weight": area / total,
        "score": score,
        "is_remainder": is_remainder,
    }


# -- 3. the stage ---------------------------------------------------------------------------


#: the ``instances`` table's columns, in order
INSTANCE_COLUMNS = ["image_id", "instance_id", "area", "bbox_x", "bbox_y", "bbox_w", "bbox_h"]
INSTANCE_COLUMNS += ["weight", "score", "is_remainder"]


def named_images(images: Mapping[str, Path] | Sequence[Path]) -> dict[str, Path]:
    """``{image_id: path}`` as given, or from paths whose stems are the ids (unique)."""
    if isinstance(images, Mapping):
        return {str(image_id): Path(path) for image_id, path in images.items()}
    named: dict[str, Path] = {}
    for path in images:
        if Path(path).stem in named:
            raise ValueError(f"two images share the id {Path(path).stem!r} (second: {path})")
        named[Path(path).stem] = Path(path)
    return named


def segment_images(
    images: Mapping[str, Path] | Sequence[Path],
    config: Mapping[str, Any],
    segmenter: Segmenter | None = None,
    *,
    store: str | os.PathLike,
    attrs: Mapping[str, Any] | None = None,
    work: shards.ShardWork | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Segment every image (``{image_id: path}``, or paths whose stems are the ids) in image-id
    order, writing each label map into the Zarr store ``store`` as soon as it is computed, so
    one label map is in memory at a time (docs/design.md §15): the ``instances`` table (rows
    in image-id order) and the segmenter info.

    ``attrs`` (default: the segmenter info) become the store's root attributes; label maps
    already in ``store`` stay (give a new folder, or the work folder of the shard). With ``work``
    (the shard job's :class:`pipeline.shards.ShardWork`, whose ``files`` folder is ``store``),
    an image a killed earlier attempt completed is skipped, and each image's rows, written
    after its label map, mark it complete.
    """
    config = resolve_config(config)
    segmenter = segmenter or build_segmenter(config)
    images = named_images(images)
    ids = sorted(images)
    open_label_store(store, segmenter.info if attrs is None else attrs)
    rows: list[dict[str, Any]] = []
    for image_id in tqdm(
        ids if work is None else work.todo(ids), desc="segment", file=sys.stderr, mininterval=1
    ):
        path = images[image_id]
        image = read_rgb(path)
        records = generate_mask_records(image, segmenter)
        partition = masks_to_partition(records, image.shape[:2], config["top_k"])
        map_attrs = {
            "instance_ids": [row["instance_id"] for row in partition.instances],
            "areas": [row["area"] for row in partition.instances],
            "weights": [row["weight"] for row in partition.instances],
            "remainder_id": partition.remainder_id,
            "source_image": str(path),
            "n_masks_generated": len(records),
        }
        write_label_map(store, image_id, partition.label_map, map_attrs)
        these = [{"image_id": image_id, **row} for row in partition.instances]
        if work is None:
            rows.extend(these)
        else:
            work.finish(image_id, pd.DataFrame(these, columns=INSTANCE_COLUMNS))
    if work is not None:
        return work.rows(ids, INSTANCE_COLUMNS), segmenter.info
    return pd.DataFrame(rows, columns=INSTANCE_COLUMNS), segmenter.info


def frame_images(
    data: Path | None, candidates: Path | None, setting: str | None
) -> dict[str, Path]:
    """``{image_id: path}`` of the shared frame: the data folder's HQ images, or the candidates
    table's images of one setting (ids as the tables record them, whatever the file names)."""
    if data is not None:
        files = contracts.data_images(data, "hq")
    else:
        assert candidates is not None and setting is not None
        table = read_table(candidates, "candidates")
        chosen = table[table["setting"] == setting]
        if chosen.empty and not table.empty:  # an empty table is an empty shard (§15)
            raise ValueError(
                f"{candidates}: no candidate of setting {setting!r}; "
                f"settings: {sorted(set(table['setting']))}"
            )
        files = {
            image_id: path
            for (image_id, _), path in contracts.candidate_files(candidates, chosen).items()
        }
    return files


def images_folder(paths: Sequence[Path], fallback: Path) -> str:
    """The folder the images lie in (their common folder), for the metadata."""
    parents = {path.parent for path in paths}
    if not parents:
        return str(fallback)
    if len(parents) == 1:
        return str(parents.pop())
    return os.path.commonpath([str(parent) for parent in parents])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline segment", description="SAM instances → partition label maps"
    )
    frame = parser.add_mutually_exclusive_group(required=True)
    frame.add_argument(
        "--data", type=Path, help="degraded data folder: segment its HQ images (source hq)"
    )
    frame.add_argument(
        "--candidates", type=Path, help="candidates.parquet: segment the images of --setting"
    )
    parser.add_argument("--setting", help="the candidate setting to segment (with --candidates)")
    parser.add_argument("--out-zarr", required=True, type=Path, help="masks/{framework}.zarr")
    parser.add_argument("--out-table", required=True, type=Path, help="instances.parquet")
    parser.add_argument("--config", default="{}", help="the segment config section as JSON")
    parser.add_argument("--seed", type=int, default=0, help="recorded only (no random draws)")
    args = parser.parse_args(argv)
    if (args.candidates is None) != (args.setting is None):
        parser.error("--candidates and --setting go together")

    config = resolve_config(settings.cli_config(args.config))
    source = "hq" if args.data is not None else args.setting
    if config["source"] != source:
        raise ValueError(
            f"segment.source is {config['source']!r} but the command line segments {source!r}"
        )
    images = frame_images(args.data, args.candidates, args.setting)
    paths = sorted(images.values())
    segmenter = build_segmenter(config)
    if segmenter.info["sam_used"]:
        print(f"segment: SAM {config['model_type']} from {config['checkpoint']}", file=sys.stderr)
    else:
        print(f"segment: SAM NOT USED — {segmenter.info['note']}", file=sys.stderr)
    started = time.perf_counter()
    metadata = {
        **segmenter.info,
        "source": config["source"],
        "images": images_folder(paths, args.data or args.candidates.parent),
        "top_k": config["top_k"],
        "seed": args.seed,
    }
    # the store is built in the shard's work folder, one label map at a time, and renamed onto
    # --out-zarr when complete; a rerun after a kill skips the images already done (§15)
    work = shards.ShardWork(
        args.out_zarr,
        shards.fingerprint(
            "segment",
            inputs=[args.data if args.data is not None else args.candidates],
            config=config,
            seed=args.seed,
            setting=args.setting,
        ),
        stage="segment",
    )
    instances, info = segment_images(
        images, config, segmenter, store=work.files, attrs=metadata, work=work
    )
    write_table(instances, args.out_table, "instances", metadata)
    work.commit_folder()
    print(
        f"segment: {len(images)} images, {len(instances)} instances "
        f"in {time.perf_counter() - started:.1f} s (backend {info['backend']})",
        file=sys.stderr,
    )
    return 0
