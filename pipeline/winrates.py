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

The win rate is (wins + ties / 2) / instances, with a Wilson 95% interval from statsmodels
(``proportion_confint(method="wilson")``, on the tie-counted number of wins). Instances of one
image are not independent, so the interval is optimistic; the table also gives the images.
"""

from __future__ import annotations

import argparse
import json
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
    frame = pd.DataFrame(
        {
            "image_id": manifest["image_id"].astype(str),
            "setting": HQ_SETTING,
            "variant": HQ_SETTING,
            "steps": 0,
            "cfg": 0.0,
            "seed": 0,
            "negative_prompt": "",
            "path": [str(Path(p).resolve()) for p in manifest["hq_path"]],
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


def win_rate(scores: pd.DataFrame, weights: dict[str, float], tolerance: float) -> dict[str, Any]:
    """Wins, ties, losses of ``aligned`` vs ``pretrained`` and the tie-counted Wilson interval."""
    objective = objective_scores(scores, weights).pivot_table(
        index=["image_id", "instance_id"], columns="candidate", values="score"
    )
    difference = (objective["aligned"] - objective[PRETRAINED]).to_numpy()
    wins = int((difference > tolerance).sum())
    ties = int((np.abs(difference) <= tolerance).sum())
    n = len(difference)
    count = wins + 0.5 * ties
    low, high = proportion_confint(count, n, alpha=0.05, method="wilson")
    return {"instances": n, "images": int(objective.index.get_level_values(0).nunique()),
            "wins": wins, "ties": ties, "losses": n - wins - ties, "win_rate": count / n,
            "ci_low": float(low), "ci_high": float(high)}  # fmt: skip


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
    write_table(frame, args.out, "win_rates", {"stage": "winrates", "config": config,
                                               "seed": args.seed})  # fmt: skip
    print(f"winrates: {len(frame)} models in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
