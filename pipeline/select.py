"""Select stage: Best/Worst-of-N winners and losers per instance (DSPO Sec. 4.2.1 and 5.1).

Automatic IQA method (docs/design.md §8). Per instance, each metric of the objective is min–max
normalised across the N candidates, flipped to ``1 - x`` where pyiqa says lower is better, and
the weighted sum is the candidate's objective score. The best candidate is the winner, the
worst the loser, ``margin`` the score difference. A tie for best or for worst (within
``tie_tolerance``) gives no pair, so an instance whose candidates all score alike gives none;
a metric whose values are equal across the candidates of an instance contributes nothing
there, and a metric with a missing (NaN) value on an instance is left out of that instance.

Human method. Annotations (CSV or Parquet, table ``annotations``): one row per annotator and
instance with columns ``annotator, image_id, instance_id, best, worst, flagged`` and optionally
``description`` (the annotator's words for the hallucination, `annotate export`); ``best`` and
``worst`` name candidate settings, ``flagged`` lists the candidates whose captions the annotator
marks as not matching the image, separated by ``;`` (empty: none); ``instance_id = -1`` rates
the whole image. Per instance the winner is the candidate with strictly the most ``best``
votes and the loser the one with strictly the most ``worst`` votes (else no pair);
``margin = (best votes of winner + worst votes of loser) / (2 · annotators)``. Rows naming an
unknown image, instance or candidate, with ``best == worst``, or repeating an annotator on an
instance raise :class:`AnnotationError` listing every such row.

Outputs in ``pairs/{framework}/`` (table ``preference_pairs``), per objective ``O``:
``O.parquet`` — instance pairs, ``weight`` = the instance weight w_m of the instances table;
``O_image.parquet`` — image-level pairs from the whole-image scores (``instance_id = -1``,
``weight = 1``) for Diffusion-DPO and DDPO; SFT trains on their ``winner`` (the preferred
image). Human annotations give ``human.parquet`` and ``human_image.parquet`` (source ``human``).

Negative prompt (docs/design.md §7): one per image, carried by every pair of that image,
because winner and loser are denoised from the same LQ and sampling uses one negative prompt
per LQ. For IQA pairs it joins the image's hallucinated candidate captions of the captions
table (``pipeline.contracts.image_negative_prompts``); for human pairs the annotators' non-empty
descriptions of the image, then the captions of the candidates flagged by a strict majority of an
instance's annotators. Without a captions table it is the empty string.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import contracts, settings
from pipeline.contracts import WHOLE_IMAGE_ID, image_negative_prompts
from pipeline.io.tables import read_table, schema_for, to_arrow, write_table
from pipeline.objectives import KEYS, objective_scores  # noqa: F401  (select's public API)

PAIR_COLUMNS = [
    "image_id",
    "instance_id",
    "weight",
    "winner",
    "loser",
    "margin",
    "negative_prompt",
    "source",
]
FLAG_SEPARATOR = ";"
# bad annotation rows an error lists before "... and N more rows"
LISTED_ROWS = 20


class AnnotationError(ValueError):
    """Human annotation rows that cannot be turned into pairs."""


class NoPairsError(ValueError):
    """An objective that yields no preference pair at all (training on it would do nothing)."""


def best_and_worst(candidate_scores: pd.DataFrame, tie_tolerance: float = 1e-9) -> pd.DataFrame:
    """Best/Worst-of-N per instance: columns image_id, instance_id, winner, loser, margin.

    No pair where the best or the worst score is shared (within ``tie_tolerance``).
    """
    rows = []
    for (image_id, instance_id), group in candidate_scores.groupby(KEYS, sort=True):
        values = group["score"].to_numpy(float)
        best, worst = values.max(), values.min()
        if len(values) < 2 or best - worst <= tie_tolerance:
            continue
        if (values >= best - tie_tolerance).sum() > 1 or (
            values <= worst + tie_tolerance
        ).sum() > 1:
            continue
        names = group["candidate"].to_numpy()
        rows.append(
            (
                image_id,
                int(instance_id),
                names[values.argmax()],
                names[values.argmin()],
                best - worst,
            )
        )
    return pd.DataFrame(rows, columns=[*KEYS, "winner", "loser", "margin"])


def no_pairs_cause(
    scores: pd.DataFrame,
    metric_weights: Mapping[str, float],
    candidate_scores: pd.DataFrame,
    chosen: pd.DataFrame,
    tie_tolerance: float,
) -> str:
    """Why ``chosen`` (best/worst pairs of one level) is empty, in words, for the error."""
    if candidate_scores.empty:
        return "the scores table has no scored instances at this level"
    counts = candidate_scores.groupby(KEYS)["candidate"].nunique()
    if (counts < 2).all():
        names = sorted(set(candidate_scores["candidate"]))
        return f"every instance has fewer than 2 candidates ({names})"
    levels = set(zip(candidate_scores["image_id"], candidate_scores["instance_id"], strict=True))
    table = scores[scores["metric"].isin(list(metric_weights))]
    keys = zip(table["image_id"], table["instance_id"], strict=True)
    table = table[[key in levels for key in keys]]
    spread = table.groupby([*KEYS, "metric"])["value"].agg(lambda v: v.max() - v.min())
    if (spread.fillna(0.0) == 0.0).all():
        return (
            "candidate settings give identical images: every metric "
            f"{sorted(metric_weights)} has one value across the candidates "
            f"{sorted(set(candidate_scores['candidate']))} on all {len(counts)} instances "
            "(check that the settings differ in steps, cfg or variant)"
        )
    if chosen.empty:
        return (
            f"on all {len(counts)} instances the best or the worst score is shared by several "
            f"candidates (tie_tolerance {tie_tolerance})"
        )
    return (
        f"all {len(chosen)} pairs are on remainder instances and select.include_remainder is false"
    )


def hallucinated_prompts(captions: pd.DataFrame | None) -> dict[str, str]:
    """Per image, its hallucinated candidate captions (caption stage's rule; {} without captions)."""
    return {} if captions is None else image_negative_prompts(captions)


def finish_pairs(
    pairs: pd.DataFrame,
    instances: pd.DataFrame,
    negative_prompts: Mapping[str, str],
    source: str,
    include_remainder: bool = True,
) -> pd.DataFrame:
    """Add weight (w_m; 1 for image-level pairs), negative prompt and source."""
    weights = {
        (str(r.image_id), int(r.instance_id)): float(r.weight) for r in instances.itertuples()
    }
    remainder = {
        (str(r.image_id), int(r.instance_id)) for r in instances.itertuples() if r.is_remainder
    }
    keys = list(zip(pairs["image_id"].astype(str), pairs["instance_id"].astype(int), strict=True))
    frame = pairs.copy()
    frame["weight"] = [1.0 if key[1] == WHOLE_IMAGE_ID else weights[key] for key in keys]
    frame["negative_prompt"] = [negative_prompts.get(key[0], "") for key in keys]
    frame["source"] = source
    if not include_remainder:
        frame = frame[[key not in remainder for key in keys]]
    return frame[PAIR_COLUMNS].reset_index(drop=True)


# ---------------------------------------------------------------- human annotations


def read_annotations(path: Path) -> pd.DataFrame:
    """Annotations from CSV (UTF-8) or Parquet, checked against the ``annotations`` table.

    An empty file, a CSV that is not UTF-8 or does not parse, one without a required column (all
    missing ones are named) and a file without any annotation row raise :class:`AnnotationError`
    naming the file.
    """
    if path.suffix.lower() == ".csv":
        if path.is_file() and path.stat().st_size == 0:
            raise AnnotationError(f"{path}: the annotations file is empty (expected a CSV header)")
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        except UnicodeDecodeError as error:
            raise AnnotationError(
                f"{path}: not UTF-8 text (byte {error.start}: {error.reason}); "
                "save the annotations as UTF-8 CSV"
            ) from error
        except pd.errors.EmptyDataError as error:
            raise AnnotationError(f"{path}: the annotations file has no CSV header") from error
        except pd.errors.ParserError as error:
            raise AnnotationError(f"{path}: not a valid CSV file: {error}") from error
        missing = [name for name in schema_for("annotations").names if name not in frame]
        if missing:
            raise AnnotationError(f"{path}: missing columns {missing} (header: {list(frame)})")
        if frame.empty:
            raise AnnotationError(f"{path}: the annotations file has a header but no rows")
        try:
            frame["instance_id"] = frame["instance_id"].astype(int)
        except ValueError as error:
            raise AnnotationError(f"{path}: instance_id must be integers: {error}") from error
        return to_arrow(frame, "annotations", str(path)).to_pandas()
    return read_table(path, "annotations")


def flagged_candidates(value: Any) -> list[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    return [name.strip() for name in str(value).split(FLAG_SEPARATOR) if name.strip()]


def check_annotations(
    annotations: pd.DataFrame, instances: pd.DataFrame, candidates: Mapping[str, set[str]]
) -> None:
    """Raise AnnotationError listing every row that names unknown things or contradicts itself."""
    known_instances = set(
        zip(instances["image_id"].astype(str), instances["instance_id"].astype(int), strict=True)
    )
    problems = []
    duplicated = annotations.duplicated(["annotator", *KEYS], keep=False)
    for index, row in annotations.iterrows():
        image_id, instance_id = str(row["image_id"]), int(row["instance_id"])
        reasons = []
        if image_id not in candidates:
            reasons.append(f"unknown image {image_id!r}")
        else:
            if instance_id != WHOLE_IMAGE_ID and (image_id, instance_id) not in known_instances:
                reasons.append(f"unknown instance {instance_id}")
            named = [row["best"], row["worst"], *flagged_candidates(row["flagged"])]
            unknown = [str(name) for name in named if str(name) not in candidates[image_id]]
            if unknown:
                reasons.append(f"unknown candidates {unknown}")
        if row["best"] == row["worst"]:
            reasons.append("best == worst")
        if duplicated[index]:
            reasons.append("annotator rates this instance more than once")
        if reasons:
            problems.append(f"row {index}: {row.to_dict()}: {'; '.join(reasons)}")
    if problems:
        listed = problems[:LISTED_ROWS]
        if len(problems) > LISTED_ROWS:
            listed.append(f"... and {len(problems) - LISTED_ROWS} more rows")
        raise AnnotationError(
            f"{len(problems)} bad annotation rows (of {len(annotations)}):\n" + "\n".join(listed)
        )


def vote(annotations: pd.DataFrame) -> pd.DataFrame:
    """Majority vote per instance: columns image_id, instance_id, winner, loser, margin."""
    rows = []
    for (image_id, instance_id), group in annotations.groupby(KEYS, sort=True):
        best_votes = group["best"].value_counts()
        worst_votes = group["worst"].value_counts()
        if (best_votes == best_votes.max()).sum() > 1 or (
            worst_votes == worst_votes.max()
        ).sum() > 1:
            continue
        winner, loser = best_votes.idxmax(), worst_votes.idxmax()
        if winner == loser:
            continue
        margin = (best_votes.max() + worst_votes.max()) / (2 * len(group))
        rows.append((image_id, int(instance_id), winner, loser, float(margin)))
    return pd.DataFrame(rows, columns=[*KEYS, "winner", "loser", "margin"])


def human_descriptions(annotations: pd.DataFrame) -> dict[str, list[str]]:
    """Per image, the annotators' non-empty ``description`` texts (what a hallucination shows,
    typed in `annotate serve`), stripped, in instance then annotator order, repeats dropped."""
    if "description" not in annotations.columns:
        return {}
    texts: dict[str, list[str]] = {}
    rows = annotations.sort_values(["image_id", "instance_id", "annotator"], kind="stable")
    for image_id, text in zip(rows["image_id"], rows["description"], strict=True):
        if isinstance(text, str) and text.strip():
            texts.setdefault(str(image_id), []).append(text.strip())
    return {image_id: list(dict.fromkeys(found)) for image_id, found in texts.items()}


def human_flagged_prompts(
    annotations: pd.DataFrame, captions: pd.DataFrame | None
) -> dict[str, str]:
    """Per image, the annotators' descriptions (:func:`human_descriptions`, first: the user
    description feedback) then the captions of candidates flagged by a strict majority of an
    instance's annotators, joined with ", "."""
    described = {
        image_id: ", ".join(texts) for image_id, texts in human_descriptions(annotations).items()
    }
    if captions is None:
        return described
    chosen = set()
    for (image_id, instance_id), group in annotations.groupby(KEYS):
        counts = pd.Series(
            [name for value in group["flagged"] for name in flagged_candidates(value)]
        )
        chosen |= {
            (str(image_id), int(instance_id), name)
            for name, n in counts.value_counts().items()
            if 2 * n > len(group)
        }
    keys = zip(
        captions["image_id"].astype(str),
        captions["instance_id"].astype(int),
        captions["candidate"],
        strict=True,
    )
    flagged = image_negative_prompts(captions.assign(hallucinated=[key in chosen for key in keys]))
    return {
        image_id: ", ".join(
            t for t in (described.get(image_id, ""), flagged.get(image_id, "")) if t
        )
        for image_id in sorted(set(described) | set(flagged))
    }


# ---------------------------------------------------------------- stage


def split_levels(pairs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(instance-level pairs, image-level pairs)."""
    image_level = pairs["instance_id"] == WHOLE_IMAGE_ID
    return pairs[~image_level].reset_index(drop=True), pairs[image_level].reset_index(drop=True)


def write_pairs(
    pairs: pd.DataFrame, out_dir: Path, name: str, metadata: dict[str, Any]
) -> dict[str, int]:
    """Write objective ``name``'s pairs of each level to its file (contracts.pairs_file);
    returns the pair count per level."""
    levels = dict(zip(("instance", "image"), split_levels(pairs), strict=True))
    for level, table in levels.items():
        path = out_dir / contracts.pairs_file(name, level)
        write_table(table, path, "preference_pairs", {**metadata, "level": level})
    return {level: len(table) for level, table in levels.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline select", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--scores", type=Path, required=True, help="scores parquet")
    parser.add_argument("--instances", type=Path, required=True, help="instances.parquet")
    parser.add_argument("--captions", type=Path, help="captions parquet (optional)")
    parser.add_argument(
        "--annotations", type=Path, help="human annotations, CSV or Parquet (optional)"
    )
    parser.add_argument("--out-dir", type=Path, required=True, help="pairs/{framework}/")
    parser.add_argument("--config", default="{}", help="the `select` config section as JSON")
    parser.add_argument("--seed", type=int, default=0, help="global seed (selection draws nothing)")
    args = parser.parse_args(argv)
    config = settings.resolve("select", settings.cli_config(args.config))
    scores = read_table(args.scores, "scores")
    instances = read_table(args.instances, "instances")
    captions = read_table(args.captions, "captions") if args.captions else None
    prompts = hallucinated_prompts(captions)
    common = {"scores": str(args.scores), "captions": str(args.captions) if args.captions else None}
    counts = {}
    for objective, metric_weights in config["objectives"].items():
        candidate_scores = objective_scores(scores, metric_weights)
        chosen = best_and_worst(candidate_scores, config["tie_tolerance"])
        pairs = finish_pairs(chosen, instances, prompts, "iqa", config["include_remainder"])
        for level, whole_image in (("instance", False), ("image", True)):
            if ((pairs["instance_id"] == WHOLE_IMAGE_ID) == whole_image).any():
                continue
            at_level = [
                (frame["instance_id"] == WHOLE_IMAGE_ID) == whole_image
                for frame in (candidate_scores, chosen)
            ]
            cause = no_pairs_cause(
                scores,
                metric_weights,
                candidate_scores[at_level[0]],
                chosen[at_level[1]],
                config["tie_tolerance"],
            )
            raise NoPairsError(
                f"select objective {objective!r}: no {level}-level pairs from {args.scores}: "
                f"{cause}"
            )
        metadata = {
            **common,
            "objective": objective,
            "metric_weights": metric_weights,
            "tie_tolerance": config["tie_tolerance"],
        }
        counts[objective] = write_pairs(pairs, args.out_dir, objective, metadata)
    if args.annotations:
        annotations = read_annotations(args.annotations)
        candidates = (
            scores.groupby("image_id")["candidate"]
            .agg(lambda names: set(map(str, names)))
            .to_dict()
        )
        check_annotations(annotations, instances, candidates)
        human_prompts = human_flagged_prompts(annotations, captions)
        votes = vote(annotations)
        pairs = finish_pairs(votes, instances, human_prompts, "human", config["include_remainder"])
        if pairs.empty:
            cause = (
                f"all {len(votes)} voted pairs are on remainder instances and "
                "select.include_remainder is false"
                if len(votes)
                else "no annotated instance has a strict majority for one best and one other "
                f"worst candidate ({annotations.groupby(KEYS).ngroups} instances, "
                f"{annotations['annotator'].nunique()} annotators)"
            )
            raise NoPairsError(f"human annotations {args.annotations}: no pairs: {cause}")
        metadata = {
            **common,
            "annotations": str(args.annotations),
            "annotators": int(annotations["annotator"].nunique()),
        }
        counts["human"] = write_pairs(pairs, args.out_dir, "human", metadata)
    print(json.dumps({"pairs": counts}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
