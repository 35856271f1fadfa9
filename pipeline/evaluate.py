"""Stage `evaluate`: one model on one test set (DSPO Sec. 5.1, test sets and metrics).

DSPO evaluates on RealSR and DRealSR (real LQ/HQ pairs) and on DIV2K-val degraded with the
Real-ESRGAN pipeline (synthetic), with the eight IQA metrics of OSEDiff's ``test_metrics.py``.
The steps, each a function below:

1. :func:`load_testset` — the (image_id, LQ file, HQ file) triples of a test set:

   - ``synthetic``: a folder written by the `degrade` stage (``hq/``, ``lq/``, ``pairs.parquet``);
     the image ids are those of ``pairs.parquet``;
   - ``paired``: a RealSR / DRealSR style folder. The LQ and HQ folders are the first pair of
     sub-folders found among :data:`PAIRED_LAYOUTS` (``LR``/``HR``, ``test_LR``/``test_HR``,
     ``LQ``/``HQ``, ``lr``/``hr``, ``lq``/``hq``, ``test_lr``/``test_hr``); a folder holding both
     kinds side by side (RealSR V3's ``Canon_001_HR.png`` next to ``Canon_001_LR4.png``) is
     split by its ``_HR`` / ``_LR4`` suffixes. Files are matched by name after stripping, on
     both sides, the suffixes matched by ``name_suffix_pattern`` (``_HR``, ``_LR4``, ``_x4``,
     ``x4``, ``_x1``, ``_GT``, ``_LQ``, case-insensitive; applied until nothing changes).
     Unmatched or ambiguous names are an error listing them;

2. :func:`super_resolve` — LQ images smaller than their HQ are bicubic-upsampled
   (:func:`~pipeline.models.base.upsample_lq`), then sampled in batches of same-sized images
   with the paper's inference settings (multi-step: spaced DDPM, 50 steps, cfg 5.5; one-step
   models ignore steps and cfg) and one generator per image,
   ``torch_generator(seed, "evaluate", testset, image_id)``. Each image takes its prompt (the
   conditional branch) and negative prompt (the unconditional branch) from the test set's
   prompts table (``--prompts``, ``prompts/{testset}.parquet``); an aligned ``dspo`` model is
   sampled with the feedback vocabulary of its training pairs before the negative prompt
   (``--feedback``, M2 in sampling, docs/prompts.md); its ``_nom2`` ablation without it. Without
   a table (direct calls) prompts are empty and the negative prompt the model's default. The
   ``bicubic`` pseudo-model returns the upsampled LQ itself (the classical baseline of the
   tables);
3. :func:`measure` — every metric on the saved 8-bit SR image against the HQ, as pyiqa
   computes it (:func:`pipeline.iqa.score_images`, weights offline, never downloaded), one
   image at a time: some metrics (GMSD, VIF) give other last bits in a batch of another size
   on the CPU, and an image's numbers must not depend on its batch neighbours (its shard, a
   resumed run, ``batch_size``).

Outputs (the folder appears complete, atomically): ``{out}/images/{image_id}.png``,
``{out}/metrics.parquet`` (table ``eval_metrics``, one row per image and metric, image by image
in image-id order), whose metadata records the model's ``describe()``, the metrics with their
pyiqa ids, the weights used and the stand-ins (metrics other than the paper's eight, tiny or
random model weights), and ``{out}/images.parquet`` (table ``eval_images``, the manifest: one
row per image, in image-id order).

Shards (docs/design.md §15): ``--shard I-of-K`` evaluates the test images whose id
:func:`pipeline.shards.shard_of` puts in shard ``I`` (after ``max_images``), with the prompts
table of that shard (a table holding only the shard's images is enough). The folder keeps its
layout, so ``python -m pipeline gather evaluation`` joins the K shard folders into the one a
single job writes. Each image's PNG and metric rows go through a
:class:`~pipeline.shards.ShardWork`, so a killed job's rerun skips the images already done.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from pipeline import contracts, guidance, settings, shards
from pipeline.io.images import read_rgb, signed_tensor, signed_to_uint8, unit_tensor, write_png
from pipeline.io.tables import write_table
from pipeline.io.testsets import TESTSET_KINDS, TestImage, load_testset
from pipeline.iqa import DSPO_METRICS, MetricRegistry, score_images, upscale_to_minimum
from pipeline.models.base import batch_invariant, upsample_lq
from pipeline.seeding import torch_generator

BICUBIC = "bicubic"
#: the eval_metrics table's columns, in the order the stage writes them
COLUMNS = ["testset", "model", "image_id", "metric", "value", "lower_better"]
#: the eval_images manifest's columns
MANIFEST_COLUMNS = ["testset", "model", "image_id", "sr_path", "lq_path", "hq_path"]


def stage_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``evaluate`` section with the schema's defaults; bad keys, types or ranges raise
    :class:`pipeline.settings.ConfigError` naming them."""
    return settings.resolve("evaluate", overrides)


# ----------------------------------------------------------------------------- 2. inference


class BicubicModel:
    """The classical baseline: the bicubic-upsampled LQ is the SR image."""

    framework = BICUBIC

    def sample(self, lq: torch.Tensor, **_: Any) -> torch.Tensor:
        return lq

    def describe(self) -> dict[str, str]:
        return {"framework": BICUBIC, "codec": "none", "weights": "none (bicubic upsampling)"}


def load_sr_model(path: str, config: dict[str, Any]):
    """``bicubic`` or a model folder through :func:`pipeline.models.load_model`."""
    if path == BICUBIC:
        return BicubicModel()
    from pipeline.models import load_model

    if not Path(path).exists() and config["framework"] is None:
        raise FileNotFoundError(f"model folder not found: {path}")
    return load_model(path, config["framework"], device=config["device"], dtype=config["dtype"])


@dataclass
class LoadedPair:
    image: TestImage
    lq: torch.Tensor  # [3, H, W] in [-1, 1], upsampled to the HQ size
    hq: np.ndarray  # uint8 [H, W, 3]


def load_pair(image: TestImage) -> LoadedPair:
    hq = read_rgb(image.hq)
    lq = signed_tensor(read_rgb(image.lq))
    if lq.shape[1] > hq.shape[0] or lq.shape[2] > hq.shape[1]:
        raise ValueError(
            f"LQ {image.lq} ({lq.shape[2]}x{lq.shape[1]}) is larger than its HQ {image.hq} "
            f"({hq.shape[1]}x{hq.shape[0]})"
        )
    return LoadedPair(image, upsample_lq(lq[None], hq.shape[:2])[0], hq)


def batches(images: Sequence[TestImage], batch_size: int) -> Iterator[list[LoadedPair]]:
    """Consecutive images (sorted by id) of one HQ size, at most ``batch_size`` at a time."""
    batch: list[LoadedPair] = []
    for image in images:
        pair = load_pair(image)
        if batch and (len(batch) == batch_size or batch[0].hq.shape != pair.hq.shape):
            yield batch
            batch = []
        batch.append(pair)
    if batch:
        yield batch


def super_resolve(
    model,
    batch: Sequence[LoadedPair],
    testset: str,
    config: dict[str, Any],
    seed: int,
    prompts: dict[str, tuple[str, str]] | None = None,
) -> list[np.ndarray]:
    """Step 2: the SR images (uint8 ``[H, W, 3]``) of one batch, one generator per image;
    ``prompts`` maps each image id to its (prompt, negative prompt), None: empty prompts and
    the model's default negative prompt."""
    lq = torch.stack([pair.lq for pair in batch])
    ids = [pair.image.image_id for pair in batch]
    # each image's output must not depend on its batch neighbours (byte-identical reruns
    # whatever batch_size); BicubicModel is no nn.Module and needs no such care
    invariance = (
        batch_invariant(model) if isinstance(model, nn.Module) else contextlib.nullcontext()
    )
    with invariance:
        sr = model.sample(
            lq,
            prompts=[prompts[i][0] for i in ids] if prompts else [""] * len(ids),
            negative_prompts=[prompts[i][1] for i in ids] if prompts else None,
            steps=config["steps"],
            cfg=config["cfg"],
            generators=[
                torch_generator(seed, "evaluate", testset, p.image.image_id) for p in batch
            ],
        )
    return [signed_to_uint8(image) for image in sr]


# ----------------------------------------------------------------------------- 3. metrics


def measure(
    registry: MetricRegistry,
    metric_names: Sequence[str],
    sr_images: Sequence[np.ndarray],
    hq_images: Sequence[np.ndarray],
) -> dict[str, np.ndarray]:
    """Step 3: ``{metric: float64 [B]}`` of the 8-bit SR images against their HQ, in [0, 1].
    Images smaller than a metric accepts (e.g. NIQE below its probed minimum) are bicubic-
    upscaled for that metric first, as the score stage does with small instance crops (the
    metadata records each metric's minimum, ``metrics_metadata``)."""

    sr_batch, hq_batch = unit_tensor(np.stack(sr_images)), unit_tensor(np.stack(hq_images))
    scores: dict[str, torch.Tensor] = {}
    for name in metric_names:
        sr, hq = upscale_to_minimum(sr_batch, hq_batch, registry.minimum_size(name))
        scores.update(score_images([name], sr, hq, registry))
    return {name: values.numpy() for name, values in scores.items()}


def metrics_metadata(registry: MetricRegistry, metric_names: Sequence[str]) -> dict[str, Any]:
    """The metrics with their pyiqa ids and options, and the weights they used."""
    metrics = {}
    for name in metric_names:
        info = registry.info(name)
        metrics[name] = {
            "pyiqa_id": info.pyiqa_id,
            "options": dict(info.options),
            "full_reference": info.full_reference,
            "lower_better": info.lower_better,
            # smaller images are bicubic-upscaled to this side for the metric (measure)
            "minimum_size": registry.minimum_size(name),
        }
    return {
        "metrics": metrics,
        "weights": registry.weights_used(),
        "weights_dir": str(registry.weights_dir) if registry.weights_dir else None,
        "metrics_device": str(registry.device),
    }


def stand_ins(model_description: dict[str, str], metric_names: Sequence[str]) -> dict[str, Any]:
    """What differs from the paper's evaluation: other metrics, tiny or random model weights."""
    found: dict[str, Any] = {}
    missing = [name for name in DSPO_METRICS if name not in metric_names]
    if missing:
        found["dspo_metrics_not_measured"] = missing
        found["measured_instead"] = [name for name in metric_names if name not in DSPO_METRICS]
    weights = str(model_description.get("weights", ""))
    if "tiny" in weights or "random" in weights:
        found["model_weights"] = weights
    for key, value in model_description.items():
        if "stand-in" in str(value):
            found[f"model_{key}"] = value
    return found


# ----------------------------------------------------------------------------- the stage


def evaluate(
    model_path: str,
    model_name: str,
    testset: str,
    testset_kind: str,
    testset_path: str | Path,
    out_dir: str | Path,
    config: dict[str, Any] | None = None,
    seed: int = 0,
    registry: MetricRegistry | None = None,
    prompts: str | Path | None = None,
    feedback: str | Path | None = None,
    shard: shards.Shard | str | None = None,
) -> pd.DataFrame:
    """Evaluate one model on one test set (or its shard ``shard``, "I-of-K"); writes
    ``out_dir`` and returns the metrics table.

    ``prompts``: the test set's prompts table (of the shard's images at least); ``feedback``:
    the preference pairs a ``dspo`` model was trained on, whose hallucination vocabulary joins
    the negative prompts (M2)."""
    config = stage_config(config)
    shard = shard if isinstance(shard, shards.Shard) else shards.Shard.parse(shard)
    every = load_testset(
        testset_kind, testset_path, config["name_suffix_pattern"], int(config["max_images"])
    )
    images = [image for image in every if shard.holds(image.image_id)]
    ids = [image.image_id for image in images]
    where = f"evaluate {model_name} on {testset}"
    texts, prompt_record = _image_prompts(ids, prompts, feedback, where)
    model = load_sr_model(model_path, config)
    metric_names = list(config["metrics"])
    registry = registry or _metric_registry(config, seed)
    lower_better = {name: registry.info(name).lower_better for name in metric_names}
    job = _Job(model_path, model_name, testset, testset_kind, testset_path, shard, config, seed)
    work = _shard_work(job, out_dir, prompts, feedback)
    todo = set(work.todo(ids))
    (work.files / "images").mkdir(exist_ok=True)
    done = len(images) - len(todo)
    progress = tqdm(
        total=len(images), initial=done, unit="img", file=sys.stderr, desc=where, mininterval=1
    )
    remaining = [image for image in images if image.image_id in todo]
    for batch in batches(remaining, int(config["batch_size"])):
        sr_images = super_resolve(model, batch, testset, config, seed, texts)
        for pair, sr in zip(batch, sr_images, strict=True):
            _finish_image(job, work, pair, sr, registry, metric_names, lower_better)
        progress.update(len(batch))
    progress.close()
    table = work.rows(ids, COLUMNS)
    metadata = _table_metadata(
        job, model.describe(), len(every), len(images), prompt_record, registry, metric_names
    )
    write_table(table, work.files / contracts.EVAL_METRICS, "eval_metrics", metadata)
    _write_manifest(job, work.files, images)
    work.commit_folder()
    return table


@dataclass(frozen=True)
class _Job:
    """What one evaluation job is: the model, the test set, the shard, the settings and seed."""

    model_path: str
    model_name: str
    testset: str
    testset_kind: str
    testset_path: str | Path
    shard: shards.Shard
    config: dict[str, Any]
    seed: int


def _metric_registry(config: dict[str, Any], seed: int) -> MetricRegistry:
    """The metrics of the ``evaluate`` section (weights offline, on its device)."""
    return MetricRegistry(
        weights_dir=config["weights_dir"],
        weights=config["weights"],
        options=config["options"],
        device=config["device"],
        seed=seed,
    )


def _image_prompts(
    ids: list[str], prompts: str | Path | None, feedback: str | Path | None, where: str
) -> tuple[dict[str, tuple[str, str]] | None, dict[str, Any]]:
    """Each image's (prompt, negative prompt) (None without a table) and their record."""
    if prompts is not None:
        return guidance.stage_prompts(
            prompts, ids, feedback=feedback, mode="vocabulary", where=where
        )
    if feedback is not None:
        raise ValueError("evaluate: --feedback needs --prompts (the negative prompts it joins)")
    return None, guidance.no_table_record(None)


def _shard_work(
    job: _Job, out_dir: str | Path, prompts: str | Path | None, feedback: str | Path | None
) -> shards.ShardWork:
    """The job's work folder in ``out_dir``, resumed if an earlier attempt's fingerprint matches."""
    model_input = None if job.model_path == BICUBIC else job.model_path
    return shards.ShardWork(
        out_dir,
        shards.fingerprint(
            "evaluate",
            inputs=[model_input, job.testset_path, prompts, feedback],
            config=job.config,
            seed=job.seed,
            model=job.model_name,
            model_path=str(job.model_path),
            testset=job.testset,
            testset_kind=job.testset_kind,
            shard=job.shard.item,
        ),
        stage="evaluate",
    )


def _finish_image(
    job: _Job,
    work: shards.ShardWork,
    pair: LoadedPair,
    sr: np.ndarray,
    registry: MetricRegistry,
    metric_names: Sequence[str],
    lower_better: dict[str, bool],
) -> None:
    """Nothing: writes one image's SR PNG, measures it and marks it complete with its rows."""
    image_id = pair.image.image_id
    write_png(work.files / "images" / f"{image_id}.png", sr)  # the manifest's sr_path
    scores = measure(registry, metric_names, [sr], [pair.hq])
    rows = [
        (job.testset, job.model_name, image_id, name, float(scores[name][0]), lower_better[name])
        for name in metric_names
    ]
    # the image is complete once its PNG is in place (docs/design.md §15)
    work.finish(image_id, pd.DataFrame(rows, columns=COLUMNS))


def _table_metadata(
    job: _Job,
    description: dict[str, str],
    n_images: int,
    shard_images: int,
    prompt_record: dict[str, Any],
    registry: MetricRegistry,
    metric_names: Sequence[str],
) -> dict[str, Any]:
    """The metadata of ``metrics.parquet``: model, test set, shard, settings, metrics, stand-ins."""
    return {
        "model": job.model_name,
        "model_path": str(job.model_path),
        "model_describe": description,
        "testset": job.testset,
        "testset_kind": job.testset_kind,
        "testset_path": str(job.testset_path),
        # the test set's images (every shard's), what the report lists; the shard's own below
        "n_images": n_images,
        "shard_images": shard_images,
        "shard": job.shard.record(),
        "seed": job.seed,
        "config": job.config,
        "prompts": prompt_record,
        **metrics_metadata(registry, metric_names),
        "stand_ins": stand_ins(description, metric_names),
    }


def _write_manifest(job: _Job, files: Path, images: Sequence[TestImage]) -> None:
    """Nothing: writes ``images.parquet``, the manifest of the shard's images."""
    manifest = pd.DataFrame(
        [
            (
                job.testset,
                job.model_name,
                image.image_id,
                f"images/{image.image_id}.png",
                str(image.lq),
                str(image.hq),
            )
            for image in images
        ],
        columns=MANIFEST_COLUMNS,
    )
    metadata = {"model": job.model_name, "testset": job.testset, "shard": job.shard.record()}
    write_table(manifest, files / contracts.EVAL_IMAGES, "eval_images", metadata)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline evaluate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", required=True, help="model folder, or 'bicubic'")
    parser.add_argument("--model-name", required=True, help="name in the tables (e.g. pretrained)")
    parser.add_argument("--testset", required=True, help="test set name (e.g. RealSR)")
    parser.add_argument("--testset-kind", required=True, choices=TESTSET_KINDS)
    parser.add_argument("--testset-path", required=True, type=Path, help="test set folder")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--config", default="{}", help="the `evaluate` config section as JSON")
    parser.add_argument("--seed", type=int, required=True, help="global seed")
    parser.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help="prompts/{testset}.parquet: each image's prompt and negative prompt",
    )
    parser.add_argument(
        "--feedback",
        type=Path,
        default=None,
        help="M2: the pairs table the model was trained on; its hallucination "
        "vocabulary joins the negative prompts",
    )
    parser.add_argument(
        "--shard",
        default=None,
        help="I-of-K: only the test images of shard I of K (docs/design.md §15)",
    )
    args = parser.parse_args(argv)
    table = evaluate(
        args.model,
        args.model_name,
        args.testset,
        args.testset_kind,
        args.testset_path,
        args.out,
        settings.cli_config(args.config),
        args.seed,
        prompts=args.prompts,
        feedback=args.feedback,
        shard=args.shard,
    )
    means = table.groupby("metric", sort=False)["value"].mean()
    summary = ", ".join(f"{name} {value:.4g}" for name, value in means.items())
    print(f"evaluate: {args.model_name} on {args.testset}: {summary}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
