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

from pipeline import contracts
from pipeline.io.images import read_rgb, unit_tensor
from pipeline.io.masks import instance_masks, read_label_map
from pipeline.io.tables import read_table, write_table
from pipeline.iqa import MetricRegistry, score_instances
from pipeline.objectives import objective_scores

PRETRAINED = "pretrained"
HQ_SETTING = "hq"
REGISTRY_KEYS = ("weights_dir", "weights", "options", "device", "min_crop_size")


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
    sr = {
        name: dict(zip(frame["image_id"], frame["sr_path"], strict=True))
        for name, frame in ((PRETRAINED, pretrained), ("aligned", aligned))
    }
    hq_paths = dict(zip(pretrained["image_id"], pretrained["hq_path"], strict=True))
    rows = []
    for image_id in sorted(hq_paths):
        ids = sorted(
            int(i) for i in instances.loc[instances["image_id"] == image_id, "instance_id"]
        )
        masks = instance_masks(read_label_map(masks_store, image_id), ids)
        hq = unit_tensor(read_rgb(hq_paths[image_id]))
        outputs = [unit_tensor(read_rgb(sr[name][image_id])) for name in (PRETRAINED, "aligned")]
        scores = score_instances(
            registry, metrics, torch.stack(outputs), hq, torch.from_numpy(masks)
        )
        for metric in metrics:
            lower = registry.info(metric).lower_better
            for c, name in enumerate((PRETRAINED, "aligned")):
                for m, instance_id in enumerate(ids):
                    rows.append(
                        (image_id, instance_id, name, metric, float(scores[metric][c, m]), lower)
                    )
    return pd.DataFrame(
        rows, columns=["image_id", "instance_id", "candidate", "metric", "value", "lower_better"]
    )


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
    return {"instances": n, "images": len(per_image), "wins": wins, "ties": ties,
            "losses": n - wins - ties, "win_rate": count / n, "ci_low": float(low),
            "ci_high": float(high), "effective_n": effective, "cluster_low": cluster_low,
            "cluster_high": cluster_high}  # fmt: skip


def win_rates(
    evaluations: list[Path], masks: Path, instances_path: Path, config: dict[str, Any],
    seed: int = 0,
) -> pd.DataFrame:  # fmt: skip
    """One row per aligned model of ``config["models"]`` (``{model: objective}``)."""
    manifests = {}
    for folder in evaluations:
        frame = contracts.evaluation_images(folder)
        manifests[str(frame["model"].iloc[0])] = frame
    registry = MetricRegistry(**{k: config["score"][k] for k in REGISTRY_KEYS}, seed=seed)
    instances = read_table(instances_path, "instances")
    rows = []
    for model, objective in sorted(config["models"].items()):
        weights = config["objectives"][objective]
        scores = instance_scores(manifests[PRETRAINED], manifests[model], masks, instances,
                                 registry, sorted(weights))  # fmt: skip
        testset = str(manifests[model]["testset"].iloc[0])
        rows.append({"testset": testset, "model": model, "objective": objective,
                     **win_rate(scores, weights, config["tie_tolerance"])})  # fmt: skip
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline winrates", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--hq-table-of", type=Path, help="write the HQ table of this evaluation")
    parser.add_argument("--evaluations", nargs="*", type=Path, default=[],
                        help="eval/{framework}/{testset}/{model} folders, pretrained among them")  # fmt: skip
    parser.add_argument("--masks", type=Path, help="the test set's label maps (segment output)")
    parser.add_argument("--instances", type=Path, help="the test set's instances table")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--config", default="{}",
                        help="JSON (or a file): models {name: objective}, objectives, score, "
                        "tie_tolerance")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.hq_table_of is not None:
        hq_table(args.hq_table_of, args.out)
        return 0
    text = Path(args.config).read_text() if Path(args.config).is_file() else args.config
    config = json.loads(text)
    frame = win_rates(args.evaluations, args.masks, args.instances, config, args.seed)
    intervals = {"ci": "Wilson 95% on the instances (statsmodels proportion_confint)",
                 "cluster": "Wilson 95% on effective_n = instances / design effect (images as "
                            "clusters; pipeline.winrates.clustered_interval)"}  # fmt: skip
    write_table(frame, args.out, "win_rates", {"stage": "winrates", "config": config,
                                               "seed": args.seed, "intervals": intervals})  # fmt: skip
    print(f"winrates: {len(frame)} models in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
