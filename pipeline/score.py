"""Score stage: IQA of every candidate on every instance of the shared frame (DSPO Sec. 5.1).

For each image the N candidates (one per setting) are scored against the HQ image on each
instance of the image's label map (the partition of docs/design.md §2) and on the whole
image (``instance_id = -1``, :data:`WHOLE_IMAGE_ID`, used by the image-level baselines).
How metrics are pooled per instance is described in :mod:`pipeline.iqa`.

Output: ``scores/{framework}.parquet`` (table ``scores``), long form: one row per
(image_id, instance_id, candidate, metric) with the raw value and pyiqa's ``lower_better``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline import contracts, settings, shards
from pipeline.contracts import WHOLE_IMAGE_ID
from pipeline.io.images import read_rgb, unit_tensor
from pipeline.io.masks import read_label_map
from pipeline.io.tables import read_table, write_table
from pipeline.iqa import DSPO_METRICS, MetricRegistry, score_instances, uses_pooled_map

#: the ``scores`` table's columns, in order
SCORE_COLUMNS = ["image_id", "instance_id", "candidate", "metric", "value", "lower_better"]


def load_unit(path: Path) -> torch.Tensor:
    """An image file as float ``[3, H, W]`` in [0, 1] (pyiqa's convention)."""
    return unit_tensor(read_rgb(path))


def instance_masks_for(
    label_map: np.ndarray, instance_ids: Sequence[int], image_id: str
) -> torch.Tensor:
    """Boolean ``[M + 1, H, W]``: one mask per instance id, then the whole image."""
    labels = torch.from_numpy(label_map.astype(np.int64))
    masks = [labels == int(instance_id) for instance_id in instance_ids]
    empty = [int(i) for i, mask in zip(instance_ids, masks, strict=True) if not bool(mask.any())]
    if empty:
        raise ValueError(f"image {image_id!r}: instances {empty} have no pixel in the label map")
    return torch.stack([*masks, torch.ones_like(labels, dtype=torch.bool)])


def score_image(
    registry: MetricRegistry,
    metric_names: Sequence[str],
    image_id: str,
    candidate_files: Mapping[str, Path],
    hq_file: Path,
    label_map: np.ndarray,
    instance_ids: Sequence[int],
) -> pd.DataFrame:
    """Long-form scores of one image: every candidate × (instances + whole image) × metric."""
    hq = load_unit(hq_file)
    settings = sorted(candidate_files)
    images = []
    for setting in settings:
        image = load_unit(candidate_files[setting])
        if image.shape != hq.shape:
            raise ValueError(
                f"candidate {candidate_files[setting]} is {tuple(image.shape[1:])}, "
                f"HQ {hq_file} is {tuple(hq.shape[1:])}"
            )
        images.append(image)
    if tuple(label_map.shape) != tuple(hq.shape[1:]):
        raise ValueError(
            f"label map of {image_id!r} is {label_map.shape}, HQ {hq_file} is {tuple(hq.shape[1:])}"
        )
    masks = instance_masks_for(label_map, instance_ids, image_id)
    scores = score_instances(registry, metric_names, torch.stack(images), hq, masks)
    rows = []
    ids = [*map(int, instance_ids), WHOLE_IMAGE_ID]
    for name in metric_names:
        lower_better = registry.info(name).lower_better
        for c, setting in enumerate(settings):
            for m, instance_id in enumerate(ids):
                rows.append(
                    (image_id, instance_id, setting, name, float(scores[name][c, m]), lower_better)
                )
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def score_candidates(
    candidates: pd.DataFrame,
    instances: pd.DataFrame,
    data_dir: Path,
    masks_store: Path,
    registry: MetricRegistry,
    metric_names: Sequence[str],
    candidates_table: Path,
    work: shards.ShardWork | None = None,
) -> pd.DataFrame:
    """The ``scores`` table of every image in the candidates table, image by image in image-id
    order (one image's candidates in memory at a time): HQ images from the data folder's table,
    candidate files relative to the candidates table's folder (:mod:`pipeline.contracts`).

    With ``work`` (the shard job's :class:`pipeline.shards.ShardWork`) each image's rows mark it
    complete, an image a killed earlier attempt completed is skipped, and the table is the
    images' rows in image-id order: the same as a run never killed (docs/design.md §15)."""
    hq_files = contracts.data_images(data_dir, "hq")
    candidate_files = contracts.candidate_files(candidates_table, candidates)
    ids = [str(image_id) for image_id in sorted(candidates["image_id"].unique())]
    frames = []
    for image_id in tqdm(
        ids if work is None else work.todo(ids), desc="score", file=sys.stderr, mininterval=1
    ):
        rows = candidates[candidates["image_id"] == image_id]
        duplicated = rows["setting"][rows["setting"].duplicated()].tolist()
        if duplicated:
            raise ValueError(
                f"image {image_id!r}: settings {duplicated} appear more than once in the candidates table"
            )
        instance_ids = sorted(
            instances.loc[instances["image_id"] == image_id, "instance_id"].astype(int)
        )
        if not instance_ids:
            raise ValueError(f"image {image_id!r} has no row in the instances table")
        if image_id not in hq_files:
            raise FileNotFoundError(
                f"image {image_id!r}: no HQ image in the data folder {data_dir} "
                f"(not in its {contracts.DATA_TABLE})"
            )
        files = {
            str(row.setting): candidate_files[(image_id, str(row.setting))]
            for row in rows.itertuples()
        }
        frame = score_image(
            registry,
            metric_names,
            image_id,
            files,
            hq_files[image_id],
            read_label_map(masks_store, image_id),
            instance_ids,
        )
        if work is None:
            frames.append(frame)
        else:
            work.finish(image_id, frame)
    if work is not None:
        return work.rows(ids, SCORE_COLUMNS)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SCORE_COLUMNS)


def scores_metadata(registry: MetricRegistry, metric_names: Sequence[str]) -> dict[str, Any]:
    """What was used: pyiqa ids and options, pooling method, weights, stand-ins.

    Every metric is created first, in ``metric_names`` order (the order scoring creates them
    in), so the record is the same whether this run scored an image or found every image
    complete (a resumed or empty shard, docs/design.md §15)."""
    for name in metric_names:
        registry.model(name)
    metrics = {}
    for name in metric_names:
        info = registry.info(name)
        pooled = uses_pooled_map(info)
        metrics[name] = {
            "pyiqa_id": info.pyiqa_id,
            "options": dict(info.options),
            "full_reference": info.full_reference,
            "lower_better": info.lower_better,
            "method": "pooled map" if pooled else "masked crop",
            "minimum_crop_size": None if pooled else registry.minimum_size(name),
        }
    missing = [name for name in DSPO_METRICS if name not in metric_names]
    return {
        "metrics": metrics,
        "weights": registry.weights_used(),
        "weights_dir": str(registry.weights_dir) if registry.weights_dir else None,
        "device": str(registry.device),
        "whole_image_instance_id": WHOLE_IMAGE_ID,
        "stand_ins": {
            "dspo_metrics_not_scored": missing,
            "scored_instead": [m for m in metric_names if m not in DSPO_METRICS],
        }
        if missing
        else {},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline score", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--candidates", type=Path, required=True, help="candidates.parquet")
    parser.add_argument(
        "--data", type=Path, required=True, help="degraded data folder (HQ images from its table)"
    )
    parser.add_argument("--masks", type=Path, required=True, help="masks Zarr store")
    parser.add_argument("--instances", type=Path, required=True, help="instances.parquet")
    parser.add_argument("--out", type=Path, required=True, help="scores parquet to write")
    parser.add_argument("--config", default="{}", help="the `score` config section as JSON")
    parser.add_argument(
        "--seed", type=int, default=0, help="global seed (seeds the minimum-size probes)"
    )
    args = parser.parse_args(argv)
    config = settings.resolve("score", settings.cli_config(args.config))
    metric_names = list(config["metrics"])
    registry = MetricRegistry(
        weights_dir=config["weights_dir"],
        weights=config["weights"],
        options=config["options"],
        device=config["device"],
        min_crop_size=config["min_crop_size"],
        seed=args.seed,
    )
    # each image's rows are kept in the shard's work folder as they are scored; a rerun
    # after a kill skips the images already done (docs/design.md §15)
    work = shards.ShardWork(
        args.out,
        shards.fingerprint(
            "score",
            inputs=[args.candidates, args.data, args.masks, args.instances],
            config=config,
            seed=args.seed,
        ),
        stage="score",
    )
    scores = score_candidates(
        read_table(args.candidates, "candidates"),
        read_table(args.instances, "instances"),
        args.data,
        args.masks,
        registry,
        metric_names,
        args.candidates,
        work=work,
    )
    write_table(scores, args.out, "scores", metadata=scores_metadata(registry, metric_names))
    work.discard()
    return 0


if __name__ == "__main__":
    sys.exit(main())
