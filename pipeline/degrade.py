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

Shards (docs/design.md §15): ``--shard I-of-K`` keeps the split's source images whose id hashes
to I (:func:`pipeline.shards.shard_of`), so every crop of a photo is in one shard and the K
shards gathered equal the whole split; each pair is marked complete in the shard's work folder
as it finishes, and a killed job resumes from there.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline import contracts, settings
from pipeline.degradations import (
    apply_degradation,
    degradation_config,
    recorded_params,
    sample_degradation_params,
)
from pipeline.io.images import (
    ImageError,
    demo_root,
    image_size,
    list_images,
    list_problems,
    read_rgb,
    source_image_id,
    source_manifest,
    write_png,
)
from pipeline.io.tables import read_metadata, schema_for, write_table
from pipeline.seeding import derive_seed, numpy_rng
from pipeline.shards import Shard, ShardWork, fingerprint

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
    """Relative path without extension, folders joined by ``__``, other unsafe characters ``_``
    (:func:`pipeline.io.images.source_image_id`: a shard's source manifest picks by it)."""
    return source_image_id(relative_path)


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


def _run_tasks(tasks: list[PairTask], workers: int, work: ShardWork, done: int = 0) -> None:
    """Run ``tasks``, marking each pair complete in ``work`` as it finishes (its row, or no
    row when its image was skipped as small); files that fail to decode are all named at once,
    in task order, after every other pair is done (a rerun retries only them).

    With several workers the pairs finish in any order; each is marked by this process when its
    worker returns (its PNGs are then written), at most ``4 * workers`` tasks in flight.
    ``done`` pairs were complete before (the progress bar starts there)."""
    problems: dict[int, str] = {}
    progress = tqdm(
        total=len(tasks) + done, initial=done, desc="degrade", file=sys.stderr, mininterval=1
    )

    def record(index: int, result: tuple[dict[str, Any] | None, str | None]) -> None:
        row, problem = result
        if problem is not None:
            problems[index] = problem
        else:
            work.finish(tasks[index].pair_id, [] if row is None else [row])
        progress.update()

    if workers == 1:
        for index, task in enumerate(tasks):
            record(index, _degrade_or_problem(task))
    else:
        # spawn, not fork: torch's thread pools do not survive a fork reliably
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            pending: dict[Future, int] = {}
            for index, task in enumerate(tasks):
                pending[pool.submit(_degrade_or_problem, task)] = index
                while len(pending) >= 4 * workers or (pending and index == len(tasks) - 1):
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        record(pending.pop(future), future.result())
    progress.close()
    # several crops of one broken file give one message
    messages = list(dict.fromkeys(problems[index] for index in sorted(problems)))
    if messages:
        raise ImageError(
            f"{len(messages)} source images cannot be decoded:\n" + list_problems(messages)
        )


def _usable_image(images: list[SourceImage], config: dict[str, Any]) -> bool:
    """Whether one of ``images`` is large enough for a crop (headers only, stops at the first):
    a shard whose images are all skipped as small fails only when the whole split would."""
    for image in images:
        try:
            width, height = image_size(image.path)
        except (ImageError, OSError):
            continue  # its own shard names it
        if min(width, height) >= config["crop_size"]:
            return True
    return False


def _drop_partial_writes(folder: Path) -> None:
    """Remove the temporaries of writes a kill interrupted (hidden names, ``atomic_path``) from
    a resumed work folder, so they never reach the output."""
    for sub in (folder, folder / "hq", folder / "lq"):
        if sub.is_dir():
            for entry in os.scandir(sub):
                if entry.name.startswith(".") and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)


def degrade_split(
    split: str,
    out: str | Path,
    config: dict[str, Any] | None,
    seed: int,
    shard: Shard | str | None = None,
) -> pd.DataFrame:
    """Write ``{out}/hq``, ``{out}/lq`` and ``{out}/pairs.parquet`` for ``split`` (atomically).

    ``shard`` (``"I-of-K"``; None: the whole split) keeps the split's source images whose id
    lies in that shard (docs/design.md §15): the split is decided on every image first, so
    it is the same for any K, and every crop of one photo lands in one shard. The shard is
    written through a :class:`pipeline.shards.ShardWork` folder, pair by pair, so a killed
    run resumes where it stopped and ends with the same bytes. A shard with no image of the
    split writes an empty table.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    shard = shard if isinstance(shard, Shard) else Shard.parse(shard)
    config = stage_config(config)
    images = find_source_images(config["source"], config["demo_images"])
    chosen = select_split(images, split, config)
    held = [image for image in chosen if shard.holds(image.image_id)]
    check_source_images(held, config)
    manifest = source_manifest(
        config["source"], config["demo_images"], shard, fresh=True, manifest=config["manifest"]
    )
    # workers changes speed, not bytes: leave it out so the output is the same either way
    recorded = {key: value for key, value in config.items() if key != "workers"}
    out = Path(out)
    inputs = [image.path for image in held]
    stamp = fingerprint(
        "degrade", inputs=inputs, config=recorded, seed=seed, split=split, shard=shard.item
    )
    work = ShardWork(out, stamp, stage="degrade")
    if work.resumed:
        _drop_partial_writes(work.files)
    (work.files / "hq").mkdir(exist_ok=True)
    (work.files / "lq").mkdir(exist_ok=True)
    tasks = plan_pairs(held, split, work.files, config, seed)
    todo = [task for task in tasks if not work.done(task.pair_id)]
    work.report(len(tasks))
    _run_tasks(todo, config["workers"], work, done=len(tasks) - len(todo))
    columns = schema_for("degradation_pairs").names
    frame = work.rows([task.pair_id for task in tasks], columns)
    produced = set(frame["image_id"])
    skipped = [str(task.image.path) for task in tasks if task.pair_id not in produced]
    if tasks and not len(frame):
        others = [image for image in chosen if not shard.holds(image.image_id)]
        if not _usable_image(others, config):
            raise ValueError(f"split {split!r}: every image was skipped as smaller than the crop")
    frame = pd.DataFrame(frame, columns=columns, dtype=object)
    metadata = {
        "stage": "degrade",
        "split": split,
        "seed": seed,
        "config": recorded,
        "source_root": str(demo_root() if config["source"] == "demo" else Path(config["source"])),
        "source_manifest": manifest,
        "skipped_small_images": skipped,
        "jpeg": "Pillow baseline JPEG, integer quality, 4:2:0 (reference: DiffJPEG)",
        "shard": shard.record(),
    }
    write_table(frame, work.files / contracts.DATA_TABLE, "degradation_pairs", metadata)
    work.commit_folder()
    return frame


def rebuild_lq(folder: str | Path, row: Any, metadata: dict[str, Any] | None = None) -> np.ndarray:
    """Replay one pair: its LQ rebuilt from the written HQ and the row's recorded parameters.

    ``row`` is a row of ``{folder}/pairs.parquet`` (a pandas Series or a dict); ``metadata``
    that file's metadata (read when not given). Returns the uint8 LQ, equal to ``lq_path``.
    """
    folder = Path(folder)
    if metadata is None:
        metadata = read_metadata(folder / contracts.DATA_TABLE)
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
    parser.add_argument(
        "--shard",
        default=None,
        help="I-of-K: only the source images of shard I of K (docs/design.md "
        "§15; default: the whole split)",
    )
    args = parser.parse_args(argv)
    config = settings.cli_config(args.config)
    if args.workers is not None:
        config["workers"] = args.workers
    shard = Shard.parse(args.shard)
    frame = degrade_split(args.split, args.out, config, args.seed, shard)
    where = "" if shard.count == 1 else f" (shard {shard.item})"
    print(f"degrade: {len(frame)} {args.split} pairs{where} in {args.out}", file=sys.stderr)
    return 0
