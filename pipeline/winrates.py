"""Stage `winrates`: per-instance win rates of each aligned model against the pretrained model.

On a test set, the HQ images are segmented as the training images are (the segment stage's CLI
on a table of the test HQ images, :func:`hq_table`; the rule runs it), and every instance is
scored for the pretrained model's output and the aligned model's with the score stage's
per-instance scoring (:func:`pipeline.iqa.score_instances`: spatial maps pooled under the mask
or masked crops). Under the objective the model was trained for, the two outputs are compared
as select compares candidates (:func:`pipeline.objectives.objective_scores`: per instance,
min–max normalised over the two, flipped where lower is better, weighted sum): the aligned
model wins an instance when its score is higher by more than ``tie_tolerance``, ties (within it,
e.g. a metric equal on both) count as half a win. The whole-image "instance" is left out.

The win rate is (wins + ties / 2) / instances, with two 95% intervals:

- ``ci_low``/``ci_high``: Wilson's (statsmodels ``proportion_confint(method="wilson")``, on the
  tie-counted number of wins), which treats the instances as independent; instances of one image
  share the image's content and its model outputs, so it is optimistic;
- ``cluster_low``/``cluster_high``: Wilson's on the effective number of instances
  ``n / deff`` (:func:`clustered_interval`), where the design effect ``deff`` is the ratio of the
  cluster-robust variance of the win rate (the images as clusters, the linearised variance of a
  ratio estimator, Kish's design effect) to the binomial one, at least 1. Perfectly correlated
  instances within images give about one independent observation per image, independent ones the
  instance count. The report's plot uses this interval.

Shards (docs/design.md §15), by test image id: shard job ``I`` reads shard ``I`` of the
evaluations (pretrained and every aligned model), writes its test HQ table
(:func:`hq_table`), the segment CLI segments it, and ``--shard I-of-K`` scores its instances
into a ``win_instances`` table (:func:`shard_instances`: every instance's scores under each
model's objective, long-form, image by image; resumable per image) instead of the win rates.
The gather (:func:`gather`, ``--gather``) joins the shards' tables (the test HQ table with its
paths re-rooted at the gathered table's folder, the label maps, the instances, the per-instance
scores sorted stably by image id) and computes the win rates from the joined scores
(:func:`rates_from_instances`): the same rows as one job over the whole test set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from statsmodels.stats.proportion import proportion_confint

from pipeline import contracts, shards
from pipeline.io.images import read_rgb, unit_tensor
from pipeline.io.masks import instance_masks, read_label_map
from pipeline.io.tables import read_metadata, read_table, write_table
from pipeline.iqa import MetricRegistry, score_instances
from pipeline.objectives import objective_scores

PRETRAINED = "pretrained"
HQ_SETTING = "hq"
REGISTRY_KEYS = ("weights_dir", "weights", "options", "device", "min_crop_size")
#: the two outputs compared on every instance, in the order they are scored
CANDIDATES = (PRETRAINED, "aligned")
#: long-form per-instance scores, what :func:`win_rate` reads
SCORE_COLUMNS = ["image_id", "instance_id", "candidate", "metric", "value", "lower_better"]
#: the ``win_instances`` table: the scores of every aligned model (under its objective)
INSTANCE_COLUMNS = ["testset", "model", "objective", *SCORE_COLUMNS]
INTERVALS = {
    "ci": "Wilson 95% on the instances (statsmodels proportion_confint)",
    "cluster": "Wilson 95% on effective_n = instances / design effect (images as "
    "clusters; pipeline.winrates.clustered_interval)",
}


def hq_table(evaluation_dir: str | Path, out: str | Path) -> Path:
    """A candidates table (setting ``hq``) of an evaluation's HQ images, for the segment CLI."""
    manifest = contracts.evaluation_images(evaluation_dir)
    folder = Path(out).parent.resolve()
    frame = pd.DataFrame(
        {
            "image_id": manifest["image_id"].astype(str),
            "setting": HQ_SETTING,
            "variant": HQ_SETTING,
            "steps": 0,
            "cfg": 0.0,
            "seed": 0,
            "negative_prompt": "",
            # relative to the table (contracts.candidate_files): results can move
            "path": [os.path.relpath(Path(p).resolve(), folder) for p in manifest["hq_path"]],
        }
    )
    write_table(frame, out, "candidates", {"stage": "winrates", "hq_of": str(evaluation_dir)})
    return Path(out)


def image_scores(
    image_id: str,
    sr_images: tuple[np.ndarray, np.ndarray],
    hq: np.ndarray,
    masks: np.ndarray,
    instance_ids: list[int],
    registry: MetricRegistry,
    metrics: list[str],
) -> list[tuple]:
    """Rows of :data:`SCORE_COLUMNS` of one test image: the pretrained and the aligned output
    (uint8 ``[H, W, 3]``) scored on each of its instances (``masks`` ``[M, H, W]``)."""
    outputs = torch.stack([unit_tensor(image) for image in sr_images])
    scores = score_instances(registry, metrics, outputs, unit_tensor(hq), torch.from_numpy(masks))
    rows = []
    for metric in metrics:
        lower = registry.info(metric).lower_better
        for c, name in enumerate(CANDIDATES):
            for m, instance_id in enumerate(instance_ids):
                rows.append(
                    (image_id, instance_id, name, metric, float(scores[metric][c, m]), lower)
                )
    return rows


def _image_instances(instances: pd.DataFrame, masks_store: Path, image_id: str):
    """(sorted instance ids, their masks) of one test image."""
    ids = sorted(int(i) for i in instances.loc[instances["image_id"] == image_id, "instance_id"])
    return ids, instance_masks(read_label_map(masks_store, image_id), ids)


def instance_scores(
    pretrained: pd.DataFrame,
    aligned: pd.DataFrame,
    masks_store: Path,
    instances: pd.DataFrame,
    registry: MetricRegistry,
    metrics: list[str],
) -> pd.DataFrame:
    """Long-form scores (image_id, instance_id, candidate, metric, value, lower_better) of the
    two models' outputs on every segmented instance of every test image."""
    sr = dict(zip(aligned["image_id"], aligned["sr_path"], strict=True))
    base = dict(zip(pretrained["image_id"], pretrained["sr_path"], strict=True))
    hq_paths = dict(zip(pretrained["image_id"], pretrained["hq_path"], strict=True))
    rows = []
    for image_id in sorted(hq_paths):
        ids, masks = _image_instances(instances, masks_store, image_id)
        outputs = (read_rgb(base[image_id]), read_rgb(sr[image_id]))
        rows += image_scores(
            image_id, outputs, read_rgb(hq_paths[image_id]), masks, ids, registry, metrics
        )
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def clustered_interval(
    wins: np.ndarray, instances: np.ndarray, alpha: float = 0.05
) -> tuple[float, float, float]:
    """``(effective_n, low, high)``: Wilson's interval of ``sum(wins) / sum(instances)`` on the
    effective sample size ``n / deff``, for clusters (images) with ``wins[i]`` tie-counted wins
    of ``instances[i]`` instances.

    ``deff = v_cluster / v_binomial``, ``v_cluster = k / (k - 1) · Σ (w_i - p·n_i)² / n²`` (the
    linearised variance of the ratio estimator over ``k`` clusters), ``v_binomial = p(1 - p) / n``;
    ``deff`` is at least 1 (never narrower than Wilson's on the instances). With ``p`` 0 or 1 every
    instance agrees, which is what perfect correlation looks like: the effective size is ``k``.
    """
    wins, instances = np.asarray(wins, float), np.asarray(instances, float)
    n, k = float(instances.sum()), len(instances)
    p = float(wins.sum()) / n
    if k < 2 or p in (0.0, 1.0):
        effective = float(k)
    else:
        cluster = k / (k - 1) * float(((wins - p * instances) ** 2).sum()) / n**2
        effective = n / max(1.0, cluster / (p * (1.0 - p) / n))
    low, high = proportion_confint(p * effective, effective, alpha=alpha, method="wilson")
    return effective, float(low), float(high)


def win_rate(scores: pd.DataFrame, weights: dict[str, float], tolerance: float) -> dict[str, Any]:
    """Wins, ties, losses of ``aligned`` vs ``pretrained``, the tie-counted Wilson interval and
    the interval clustered by image (:func:`clustered_interval`)."""
    objective = objective_scores(scores, weights).pivot_table(
        index=["image_id", "instance_id"], columns="candidate", values="score"
    )
    difference = objective["aligned"] - objective[PRETRAINED]
    values = difference.to_numpy()
    wins = int((values > tolerance).sum())
    ties = int((np.abs(values) <= tolerance).sum())
    n = len(values)
    count = wins + 0.5 * ties
    low, high = proportion_confint(count, n, alpha=0.05, method="wilson")
    counted = (difference > tolerance) + 0.5 * (difference.abs() <= tolerance)
    per_image = counted.groupby(level=0).agg(["sum", "size"])
    effective, cluster_low, cluster_high = clustered_interval(
        per_image["sum"].to_numpy(), per_image["size"].to_numpy()
    )
    return {
        "instances": n,
        "images": len(per_image),
        "wins": wins,
        "ties": ties,
        "losses": n - wins - ties,
        "win_rate": count / n,
        "ci_low": float(low),
        "ci_high": float(high),
        "effective_n": effective,
        "cluster_low": cluster_low,
        "cluster_high": cluster_high,
    }


def _manifests(
    evaluations: list[Path], shard: shards.Shard = shards.WHOLE
) -> dict[str, pd.DataFrame]:
    """``{model: manifest}`` of the evaluation folders (the shard's images only)."""
    manifests = {}
    for folder in evaluations:
        frame = contracts.evaluation_images(folder)
        model = read_metadata(Path(folder) / contracts.EVAL_IMAGES).get("model")
        if len(frame):
            model = str(frame["model"].iloc[0])
        if model is None:
            raise ValueError(f"{folder}: an empty evaluation whose metadata names no model")
        keep = np.array([shard.holds(str(image_id)) for image_id in frame["image_id"]], bool)
        manifests[str(model)] = frame.loc[keep].reset_index(drop=True)
    return manifests


def _registry(config: dict[str, Any], seed: int) -> MetricRegistry:
    return MetricRegistry(**{k: config["score"][k] for k in REGISTRY_KEYS}, seed=seed)


def win_rates(
    evaluations: list[Path],
    masks: Path,
    instances_path: Path,
    config: dict[str, Any],
    seed: int = 0,
) -> pd.DataFrame:
    """One row per aligned model of ``config["models"]`` (``{model: objective}``)."""
    manifests = _manifests(evaluations)
    registry = _registry(config, seed)
    instances = read_table(instances_path, "instances")
    rows = []
    for model, objective in sorted(config["models"].items()):
        weights = config["objectives"][objective]
        scores = instance_scores(
            manifests[PRETRAINED], manifests[model], masks, instances, registry, sorted(weights)
        )
        testset = str(manifests[model]["testset"].iloc[0])
        rows.append(
            {
                "testset": testset,
                "model": model,
                "objective": objective,
                **win_rate(scores, weights, config["tie_tolerance"]),
            }
        )
    return pd.DataFrame(rows)


def shard_instances(
    evaluations: list[Path],
    masks: Path,
    instances_path: Path,
    config: dict[str, Any],
    out: str | Path,
    seed: int = 0,
    shard: shards.Shard | str | None = None,
) -> pd.DataFrame:
    """Write the ``win_instances`` table of one shard at ``out`` and return it: per test image
    of the shard (image-id order), every aligned model's and the pretrained model's scores on
    each instance under the model's objective (the rows :func:`instance_scores` gives, one
    model after the other). Resumable per image (:class:`pipeline.shards.ShardWork`)."""
    shard = shard if isinstance(shard, shards.Shard) else shards.Shard.parse(shard)
    manifests = _manifests(evaluations, shard)
    models = sorted(config["models"].items())
    missing = [name for name in (PRETRAINED, *(m for m, _ in models)) if name not in manifests]
    if missing:
        raise KeyError(f"winrates: no evaluation of {missing} among {sorted(manifests)}")
    pretrained = manifests[PRETRAINED]
    image_ids = sorted(str(i) for i in pretrained["image_id"])
    hq_paths = dict(zip(pretrained["image_id"], pretrained["hq_path"], strict=True))
    sr = {
        name: dict(zip(frame["image_id"], frame["sr_path"], strict=True))
        for name, frame in manifests.items()
    }
    testsets = {
        name: dict(zip(frame["image_id"], frame["testset"], strict=True))
        for name, frame in manifests.items()
    }
    instances = read_table(instances_path, "instances")
    registry = _registry(config, seed)
    work = shards.ShardWork(
        out,
        shards.fingerprint(
            "winrates",
            inputs=[*evaluations, masks, instances_path],
            config=config,
            seed=seed,
            shard=shard.item,
        ),
        stage="winrates",
    )
    for image_id in work.todo(image_ids):
        ids, image_masks = _image_instances(instances, masks, image_id)
        hq, base = read_rgb(hq_paths[image_id]), read_rgb(sr[PRETRAINED][image_id])
        rows = []
        for model, objective in models:
            outputs = (base, read_rgb(sr[model][image_id]))
            scored = image_scores(
                image_id,
                outputs,
                hq,
                image_masks,
                ids,
                registry,
                sorted(config["objectives"][objective]),
            )
            rows += [(str(testsets[model][image_id]), model, objective, *row) for row in scored]
        work.finish(image_id, pd.DataFrame(rows, columns=INSTANCE_COLUMNS))
    frame = work.rows(image_ids, INSTANCE_COLUMNS)
    metadata = {
        "stage": "winrates",
        "config": config,
        "seed": seed,
        "shard": shard.record(),
        "evaluations": [str(folder) for folder in evaluations],
    }
    write_table(frame, out, "win_instances", metadata)
    work.discard()
    return frame


def rates_from_instances(frame: pd.DataFrame, config: dict[str, Any]) -> pd.DataFrame:
    """The ``win_rates`` rows of a (gathered) ``win_instances`` table: per aligned model of
    ``config["models"]``, :func:`win_rate` of its rows (image-id order, as one job writes)."""
    rows = []
    for model, objective in sorted(config["models"].items()):
        part = frame[frame["model"] == model]
        if not len(part):
            raise ValueError(f"winrates: no scored instance of model {model!r}")
        scores = part[SCORE_COLUMNS].reset_index(drop=True)
        rows.append(
            {
                "testset": str(part["testset"].iloc[0]),
                "model": model,
                "objective": objective,
                **win_rate(scores, config["objectives"][objective], config["tie_tolerance"]),
            }
        )
    return pd.DataFrame(rows)


def _concat_sorted(frames: list[pd.DataFrame], key: str = "image_id") -> pd.DataFrame:
    """The frames as one, stably sorted by ``key`` (the rows of one image stay together)."""
    filled = [frame for frame in frames if len(frame)]
    if not filled:
        return frames[0]
    frame = pd.concat(filled, ignore_index=True)
    return frame.sort_values(key, kind="stable").reset_index(drop=True)


def gather_hq(shard_tables: list[Path], out: str | Path) -> pd.DataFrame:
    """One test HQ table from the shards': each path (relative to its shard table's folder,
    :func:`hq_table`) re-rooted at ``out``'s folder, rows sorted stably by image id."""
    from pipeline.gather import merge_metadata

    folder = Path(out).parent.resolve()
    frames = []
    for table in shard_tables:
        frame = read_table(table, "candidates")
        files = contracts.candidate_files(table, frame)
        frame["path"] = [
            os.path.relpath(files[(str(row.image_id), str(row.setting))].resolve(), folder)
            for row in frame.itertuples()
        ]
        frames.append(frame)
    frame = _concat_sorted(frames)
    write_table(frame, out, "candidates", merge_metadata([read_metadata(t) for t in shard_tables]))
    return frame


def gather(
    instance_tables: list[Path],
    out: str | Path,
    config: dict[str, Any],
    seed: int = 0,
    hq: tuple[list[Path], Path] | None = None,
    masks: tuple[list[Path], Path] | None = None,
    instances: tuple[list[Path], Path] | None = None,
) -> pd.DataFrame:
    """The win-rate gather (docs/design.md §15): the ``win_rates`` table at ``out`` from the
    shards' ``win_instances`` tables (in shard order), and, each given as (shard outputs, out),
    the test HQ table (:func:`gather_hq`), the label maps and the instances table
    (:func:`pipeline.gather.gather`)."""
    from pipeline import gather as gathering

    if not instance_tables:
        raise ValueError("winrates --gather: no win_instances shard tables given")
    for table in instance_tables:
        recorded = read_metadata(table).get("config")
        if recorded != config:
            raise ValueError(
                f"{table}: scored with another config than the gather's: {recorded} != {config}"
            )
    if hq is not None:
        gather_hq(*hq)
    if masks is not None:
        gathering.gather("masks", *masks)
    if instances is not None:
        gathering.gather("instances", *instances)
    frame = _concat_sorted([read_table(t, "win_instances") for t in instance_tables])
    rates = rates_from_instances(frame, config)
    write_table(
        rates,
        out,
        "win_rates",
        {
            "stage": "winrates",
            "config": config,
            "seed": seed,
            "intervals": INTERVALS,
            "shards": len(instance_tables),
        },
    )
    print(
        f"winrates: {len(rates)} models from {len(instance_tables)} shards in {out}",
        file=sys.stderr,
    )
    return rates


def add_gather_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the gather (docs/design.md §15): the shards' tables and where each goes."""
    parser.add_argument(
        "--gather",
        nargs="+",
        type=Path,
        default=None,
        metavar="WIN_INSTANCES",
        help="the shards' win_instances tables, in shard order: write the win "
        "rates at --out (and the --*-shards gathers)",
    )
    parser.add_argument(
        "--hq-shards",
        nargs="+",
        type=Path,
        default=None,
        help="with --gather: the shards' test HQ tables, gathered at --out-hq",
    )
    parser.add_argument("--out-hq", type=Path)
    parser.add_argument(
        "--masks-shards",
        nargs="+",
        type=Path,
        default=None,
        help="with --gather: the shards' test label maps, gathered at --out-masks",
    )
    parser.add_argument("--out-masks", type=Path)
    parser.add_argument(
        "--instances-shards",
        nargs="+",
        type=Path,
        default=None,
        help="with --gather: the shards' test instances tables, gathered at --out-instances",
    )
    parser.add_argument("--out-instances", type=Path)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m pipeline winrates`` (module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline winrates", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--hq-table-of", type=Path, help="write the HQ table of this evaluation")
    parser.add_argument(
        "--evaluations",
        nargs="*",
        type=Path,
        default=[],
        help="eval/{framework}/{testset}/{model} folders (or their shard I), pretrained among them",
    )
    parser.add_argument("--masks", type=Path, help="the test set's label maps (segment output)")
    parser.add_argument("--instances", type=Path, help="the test set's instances table")
    parser.add_argument(
        "--shard",
        default=None,
        help="I-of-K: score the test images of shard I and write their "
        "win_instances table at --out (not the win rates)",
    )
    add_gather_arguments(parser)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument(
        "--config",
        default="{}",
        help="JSON (or a file): models {name: objective}, objectives, score, tie_tolerance",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


def gather_pairs(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> dict[str, tuple[list[Path], Path] | None]:
    """``{hq, masks, instances: (shard outputs, out) or None}`` of the command line's gathers."""
    pairs = {}
    for name in ("hq", "masks", "instances"):
        given, out = getattr(args, f"{name}_shards"), getattr(args, f"out_{name}")
        if (given is None) != (out is None):
            parser.error(f"--{name}-shards and --out-{name} go together")
        pairs[name] = None if given is None else (given, out)
    return pairs


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The command line's job: the HQ table, the gather, one shard's scores or the win rates."""
    if args.hq_table_of is not None:
        hq_table(args.hq_table_of, args.out)
        return 0
    text = Path(args.config).read_text() if Path(args.config).is_file() else args.config
    config = json.loads(text)
    if args.gather is not None:
        gather(args.gather, args.out, config, args.seed, **gather_pairs(args, parser))
        return 0
    if args.shard is not None:
        frame = shard_instances(
            args.evaluations, args.masks, args.instances, config, args.out, args.seed, args.shard
        )
        print(
            f"winrates: shard {args.shard}: {len(frame)} instance scores in {args.out}",
            file=sys.stderr,
        )
        return 0
    frame = win_rates(args.evaluations, args.masks, args.instances, config, args.seed)
    write_table(
        frame,
        args.out,
        "win_rates",
        {"stage": "winrates", "config": config, "seed": args.seed, "intervals": INTERVALS},
    )
    print(f"winrates: {len(frame)} models in {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline winrates``: parse the command line, then :func:`run`."""
    parser = build_parser()
    return run(parser.parse_args(argv), parser)


if __name__ == "__main__":
    sys.exit(main())
