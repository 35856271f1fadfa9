"""Stage `degrade`: synthetic LQ/HQ training and test pairs (DSPO Sec. 4.1, data).

DSPO trains on LSDIR/DIV2K-style HQ images degraded with the Real-ESRGAN pipeline as OSEDiff
uses it. The steps, each a function below:

1. :func:`find_source_images` — the HQ source: ``demo`` (photos shipped with scikit-image, no
   download) or a folder searched recursively; every file gets a stable, filesystem-safe id;
2. :func:`assign_split` — train or test, decided by the image id alone (hash or explicit list);
3. :func:`crop_hq` — random ``crop_size`` crops (``crops_per_image`` per train image,
   ``test_crops_per_image`` per test image; a source image is in one split only), small images
   padded, refused or skipped as configured, optional horizontal flip (train only);
4. :func:`degrade_pair` — Real-ESRGAN second-order degradation (:mod:`pipeline.degradations`)
   with every drawn value recorded, writing ``hq/{image_id}.png`` and ``lq/{image_id}.png``.

All randomness of a pair comes from ``numpy_rng(seed, "degrade", source_id, crop_index)``, so a
rerun, or a run with a different number of workers, writes the same bytes.
"""

from __future__ import annotations

import argparse
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline import settings
from pipeline.degradations import (
    apply_degradation,
    degradation_config,
    recorded_params,
    sample_degradation_params,
)
from pipeline.io.atomic import atomic_path
from pipeline.io.images import (
    ImageError,
    demo_root,
    image_size,
    list_images,
    list_problems,
    read_rgb,
    source_manifest,
    write_png,
)
from pipeline.io.tables import read_metadata, schema_for, write_table
from pipeline.seeding import derive_seed, numpy_rng

SPLITS = ("train", "test")
SMALL_IMAGE_ACTIONS = ("pad", "error", "skip")
# colour photographs among scikit-image's bundled data (no download needed)
DEMO_IMAGES = tuple(settings.defaults("degrade")["demo_images"])


def stage_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stage defaults with ``overrides`` applied and checked; ``degradation`` filled in full."""
    overrides = dict(overrides or {})
    workers = overrides.pop("workers", 1)  # a CLI setting, not a config key (speed, not bytes)
    config = settings.resolve("degrade", overrides)
    config["workers"] = workers
    config["degradation"] = degradation_config(config["degradation"])
    scale = config["degradation"]["scale"]
    if config["crop_size"] < scale or config["crop_size"] % scale:
        raise ValueError(
            f"degrade config 'crop_size' {config['crop_size']} is not a multiple of scale {scale}"
        )
    if config["small_image"] not in SMALL_IMAGE_ACTIONS:
        raise ValueError(f"degrade config 'small_image' must be one of {SMALL_IMAGE_ACTIONS}")
    if not 0.0 <= config["test_fraction"] <= 1.0:
        raise ValueError(
            f"degrade config 'test_fraction' must be in [0, 1]: {config['test_fraction']}"
        )
    if min(config["crops_per_image"], config["test_crops_per_image"], config["workers"]) < 1:
        raise ValueError(
            "degrade config 'crops_per_image', 'test_crops_per_image' and 'workers' must be "
            "at least 1"
        )
    return config


# ----------------------------------------------------------------------------- 1. source images


@dataclass(frozen=True)
class SourceImage:
    image_id: str
    path: Path
    relative: str  # path relative to the source root, recorded in the table


def image_id_for(relative_path: str | Path) -> str:
    """Relative path without extension, folders joined by ``__``, other unsafe characters ``_``."""
    stem = Path(relative_path).with_suffix("")
    return re.sub(r"[^A-Za-z0-9._-]", "_", "__".join(stem.parts))


def find_source_images(source: str, demo_images: list[str] | tuple[str, ...] = DEMO_IMAGES):
    """The HQ images of ``source`` (``"demo"`` or a folder), sorted, with unique ids."""
    if source == "demo":
        root = demo_root()
        paths = [root / name for name in demo_images]
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"demo images not found in scikit-image's data: {missing}")
    else:
        root = Path(source)
        paths = list_images(root)
        if not paths:
            raise FileNotFoundError(f"no images (png/jpg/jpeg/webp/bmp/tif/tiff) under {root}")
    images: dict[str, SourceImage] = {}
    for path in paths:
        relative = path.relative_to(root).as_posix()
        image_id = image_id_for(relative)
        if image_id in images:
            raise ValueError(
                f"two source images map to the id {image_id!r}: {images[image_id].path} and {path}"
            )
        images[image_id] = SourceImage(image_id, path, relative)
    return sorted(images.values(), key=lambda image: image.image_id)


def min_source_side(config: dict[str, Any]) -> int:
    """The shortest image side degrade accepts (``skip`` mode: none, small images are skipped).

    ``error`` needs the whole crop. ``pad`` mirrors a short side once at most, as Real-ESRGAN's
    reflect padding does; a side under half the crop would be tiled from copies of itself
    (a 1-pixel side from one repeated row), so such an image is refused rather than padded.
    """
    if config["small_image"] == "error":
        return config["crop_size"]
    if config["small_image"] == "pad":
        return config["crop_size"] // 2 + 1
    return 1


def check_source_images(images: list[SourceImage], config: dict[str, Any]) -> None:
    """Open every header before decoding anything; one error lists every bad file.

    Refused: files Pillow cannot identify, multi-frame files (:mod:`pipeline.io.images`) and
    images with a side under :func:`min_source_side`, each named with its size.
    """
    shortest = min_source_side(config)
    problems = []
    for image in images:
        try:
            width, height = image_size(image.path)
        except ImageError as error:
            problems.append(str(error))
            continue
        if min(width, height) < shortest:
            problems.append(
                f"{image.path}: image {width}x{height} is smaller than {shortest} pixels on a "
                f"side (crop_size {config['crop_size']}, small_image {config['small_image']!r})"
            )
    if problems:
        raise ImageError(
            f"{len(problems)} of {len(images)} source images cannot be used:\n"
            + list_problems(problems)
        )


# ----------------------------------------------------------------------------- 2. split


def assign_split(image_id: str, test_fraction: float, test_ids: list[str] | None = None) -> str:
    """``test`` if listed in ``test_ids`` (when given), else if the id's hash falls below the fraction.

    The hash ignores the global seed, so the test images stay the same for every seed, and an
    image keeps its split when images are added to the folder.
    """
    if test_ids:
        return "test" if image_id in test_ids else "train"
    position = derive_seed(0, "split", image_id) / float(1 << 63)
    return "test" if position < test_fraction else "train"


def select_split(images: list[SourceImage], split: str, config: dict[str, Any]):
    """The source images of ``split``; unknown explicit ids and an empty split are errors."""
    known = {image.image_id for image in images}
    unknown = sorted(set(config["test_ids"]) - known)
    if unknown:
        raise ValueError(
            f"degrade config 'test_ids' names unknown images {unknown}; known: {sorted(known)}"
        )
    chosen = [
        image
        for image in images
        if assign_split(image.image_id, config["test_fraction"], config["test_ids"]) == split
    ]
    if not chosen:
        raise ValueError(
            f"split {split!r} has no images out of {len(images)}; "
            "set degrade.test_ids or change degrade.test_fraction"
        )
    return chosen


# ----------------------------------------------------------------------------- 3. crop


def crop_hq(
    image: np.ndarray, crop_size: int, rng: np.random.Generator, small_image: str, name: str
) -> tuple[np.ndarray, int, int, bool] | None:
    """A random ``crop_size`` square: ``(crop, top, left, padded)``, or ``None`` when skipped.

    Images smaller than the crop are reflect-padded at the bottom/right (as Real-ESRGAN's
    dataset does), refused with an error naming the file, or skipped.
    """
    height, width = image.shape[:2]
    padded = height < crop_size or width < crop_size
    if padded:
        if small_image == "error":
            raise ValueError(
                f"{name}: image {width}x{height} is smaller than crop_size {crop_size}"
            )
        if small_image == "skip":
            return None
        pad = ((0, max(0, crop_size - height)), (0, max(0, crop_size - width)), (0, 0))
        image = np.pad(image, pad, mode="reflect" if min(height, width) > 1 else "edge")
        height, width = image.shape[:2]
    top = int(rng.integers(0, height - crop_size + 1))
    left = int(rng.integers(0, width - crop_size + 1))
    return image[top : top + crop_size, left : left + crop_size], top, left, padded


# ----------------------------------------------------------------------------- 4. degrade


@dataclass(frozen=True)
class PairTask:
    image: SourceImage
    split: str
    crop_index: int
    pair_id: str
    seed: int
    out: Path
    config: dict[str, Any]


def degrade_pair(task: PairTask) -> dict[str, Any] | None:
    """Crop, flip and degrade one pair; write its PNGs; return its table row (``None``: skipped)."""
    config = task.config
    key = (task.image.image_id, task.crop_index)
    rng = numpy_rng(task.seed, "degrade", *key)
    hq_full = read_rgb(task.image.path)
    cropped = crop_hq(
        hq_full, config["crop_size"], rng, config["small_image"], str(task.image.path)
    )
    if cropped is None:
        return None
    hq, top, left, padded = cropped
    # the coin is always drawn so the degradation draws do not depend on the split
    flip = bool(rng.random() < 0.5) and config["hflip"] and task.split == "train"
    if flip:
        hq = hq[:, ::-1]
    hq = np.ascontiguousarray(hq)
    params = sample_degradation_params(rng, config["degradation"])
    lq = apply_degradation(hq.astype(np.float32) / 255.0, params, config["degradation"])
    hq_path = f"hq/{task.pair_id}.png"
    lq_path = f"lq/{task.pair_id}.png"
    write_png(task.out / hq_path, hq)
    write_png(task.out / lq_path, np.rint(lq * 255.0).astype(np.uint8))
    return {
        "image_id": task.pair_id,
        "source_id": task.image.image_id,
        "source": task.image.relative,
        "split": task.split,
        "source_height": hq_full.shape[0],
        "source_width": hq_full.shape[1],
        "crop_index": task.crop_index,
        "crop_top": top,
        "crop_left": left,
        "crop_size": config["crop_size"],
        "padded": padded,
        "hflip": flip,
        "scale": int(config["degradation"]["scale"]),
        "seed": derive_seed(task.seed, "degrade", *key),
        **params,
        "hq_path": hq_path,
        "lq_path": lq_path,
    }


def plan_pairs(images: list[SourceImage], split: str, out: Path, config: dict[str, Any], seed: int):
    """One task per (image, crop): ``crops_per_image`` per train image, ``test_crops_per_image``
    per test image (every crop seeded by (seed, image id, crop index); flips on train only)."""
    crops = config["crops_per_image"] if split == "train" else config["test_crops_per_image"]
    tasks = [
        PairTask(
            image=image,
            split=split,
            crop_index=index,
            pair_id=image.image_id if crops == 1 else f"{image.image_id}__crop{index}",
            seed=seed,
            out=out,
            config=config,
        )
        for image in images
        for index in range(crops)
    ]
    pair_ids = [task.pair_id for task in tasks]
    if len(set(pair_ids)) != len(pair_ids):
        raise ValueError("crop ids collide with source image ids; rename the '__crop*' files")
    return tasks


def _degrade_or_problem(task: PairTask) -> tuple[dict[str, Any] | None, str | None]:
    """``(row, None)``, or ``(None, message)`` for a file that fails to decode."""
    try:
        return degrade_pair(task), None
    except ImageError as error:
        return None, str(error)


def _run_tasks(tasks: list[PairTask], workers: int) -> list[dict[str, Any] | None]:
    """Every task's row (``None``: skipped); files that fail to decode are all named at once."""
    progress = {"total": len(tasks), "desc": "degrade", "file": sys.stderr, "mininterval": 1}
    if workers == 1:
        results = [_degrade_or_problem(task) for task in tqdm(tasks, **progress)]
    else:
        # spawn, not fork: torch's thread pools do not survive a fork reliably
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            results = list(tqdm(pool.map(_degrade_or_problem, tasks, chunksize=1), **progress))
    # several crops of one broken file give one message
    problems = list(dict.fromkeys(problem for _, problem in results if problem is not None))
    if problems:
        raise ImageError(
            f"{len(problems)} source images cannot be decoded:\n" + list_problems(problems)
        )
    return [row for row, _ in results]


def degrade_split(
    split: str, out: str | Path, config: dict[str, Any] | None, seed: int
) -> pd.DataFrame:
    """Write ``{out}/hq``, ``{out}/lq`` and ``{out}/pairs.parquet`` for ``split`` (atomically)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    config = stage_config(config)
    images = find_source_images(config["source"], config["demo_images"])
    chosen = select_split(images, split, config)
    check_source_images(chosen, config)
    manifest = source_manifest(config["source"], config["demo_images"])
    out = Path(out)
    with atomic_path(out) as temporary:
        (temporary / "hq").mkdir(parents=True)
        (temporary / "lq").mkdir()
        tasks = plan_pairs(chosen, split, temporary, config, seed)
        results = _run_tasks(tasks, config["workers"])
        rows = [row for row in results if row is not None]
        skipped = [
            str(task.image.path) for task, row in zip(tasks, results, strict=True) if row is None
        ]
        if not rows:
            raise ValueError(f"split {split!r}: every image was skipped as smaller than the crop")
        frame = pd.DataFrame(rows, columns=schema_for("degradation_pairs").names, dtype=object)
        metadata = {
            "stage": "degrade",
            "split": split,
            "seed": seed,
            # workers changes speed, not bytes: leave it out so the file is the same either way
            "config": {key: value for key, value in config.items() if key != "workers"},
            "source_root": str(
                demo_root() if config["source"] == "demo" else Path(config["source"])
            ),
            "source_manifest": manifest,
            "skipped_small_images": skipped,
            "jpeg": "Pillow baseline JPEG, integer quality, 4:2:0 (reference: DiffJPEG)",
        }
        write_table(frame, temporary / "pairs.parquet", "degradation_pairs", metadata)
    return frame


def rebuild_lq(folder: str | Path, row: Any, metadata: dict[str, Any] | None = None) -> np.ndarray:
    """Replay one pair: its LQ rebuilt from the written HQ and the row's recorded parameters.

    ``row`` is a row of ``{folder}/pairs.parquet`` (a pandas Series or a dict); ``metadata``
    that file's metadata (read when not given). Returns the uint8 LQ, equal to ``lq_path``.
    """
    folder = Path(folder)
    if metadata is None:
        metadata = read_metadata(folder / "pairs.parquet")
    degradation = metadata["config"]["degradation"]
    params = recorded_params(dict(row))
    hq = read_rgb(folder / params["hq_path"]).astype(np.float32) / 255.0
    return np.rint(apply_degradation(hq, params, degradation) * 255.0).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline degrade", description="Real-ESRGAN degraded LQ/HQ pairs."
    )
    parser.add_argument("--split", required=True, choices=SPLITS)
    parser.add_argument("--out", required=True, help="output folder (hq/, lq/, pairs.parquet)")
    parser.add_argument("--config", default="{}", help="the degrade config section as JSON")
    parser.add_argument("--seed", type=int, required=True, help="global seed")
    parser.add_argument("--workers", type=int, help="worker processes (overrides the config)")
    args = parser.parse_args(argv)
    config = settings.cli_config(args.config)
    if args.workers is not None:
        config["workers"] = args.workers
    frame = degrade_split(args.split, args.out, config, args.seed)
    print(f"degrade: {len(frame)} {args.split} pairs in {args.out}", file=sys.stderr)
    return 0
