"""Objective scores shared by the select stage and the win rates (docs/design.md §8).

Per instance, each metric of the objective is min–max normalised across the candidates, flipped
where lower is better and weighted; a candidate's objective score is the sum. ``select`` turns
them into best/worst pairs, ``winrates`` compares an aligned model's output with the pretrained
model's under the same scores.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

KEYS = ["image_id", "instance_id"]


def objective_scores(scores: pd.DataFrame, metric_weights: Mapping[str, float]) -> pd.DataFrame:
    """Per (image, instance, candidate) the weighted sum of normalised metrics (docs/design.md §8).

    Returns columns image_id, instance_id, candidate, score.
    """
    missing = sorted(set(metric_weights) - set(scores["metric"]))
    if missing:
        raise KeyError(
            f"metrics {missing} are not in the scores table (it has {sorted(set(scores['metric']))})"
        )
    table = scores[scores["metric"].isin(list(metric_weights))].copy()
    groups = table.groupby([*KEYS, "metric"])["value"]
    low, high = groups.transform("min"), groups.transform("max")
    has_nan = groups.transform(lambda values: values.isna().any()).astype(bool)
    spread = (high - low).to_numpy()
    scaled = np.divide(
        (table["value"] - low).to_numpy(), spread, out=np.zeros(len(table)), where=spread > 0
    )
    # flip where lower is better so 1 is always the best candidate; all-equal metrics give 0
    flipped = np.where(table["lower_better"].to_numpy(bool) & (spread > 0), 1.0 - scaled, scaled)
    weights = table["metric"].map(dict(metric_weights)).to_numpy(float)
    table["score"] = np.where(has_nan.to_numpy(), 0.0, flipped * weights)
    summed = table.groupby([*KEYS, "candidate"], as_index=False)["score"].sum()
    return summed.sort_values([*KEYS, "candidate"], ignore_index=True)
