"""The two annotation tasks, built deterministically from the pipeline's tables.

Instances (DSPO Sec. 4.2: best/worst of N per instance, plus the user's description). One task
per (image, instance) of ``masks/{F}/instances.parquet``: the ``top_k`` largest non-remainder
instances of each image (the paper's 5), in image order then largest first. A task holds the
instance box, the LQ and HQ of ``data/train/`` and the N candidates of
``candidates/{F}/candidates.parquet`` (paths relative to that folder), shown under letters in a
seeded order (``derive_seed(seed, "annotate", "instance", task_id)``), so names stay hidden.

Compare (Fig. 3, "Which image do you prefer given the LQ?"). A round's base pairs are, per test
set and image, the focus model against every other model (every pair of models without a
focus), with SR outputs from ``eval/{F}/{testset}/{model}/images/{image_id}.png`` and the LQ of
the test set folder. Every annotator sees every pair of the round. Seeded draws:

- repeats: ``ceil(repeat_fraction · pairs)`` base pairs, the same for every annotator of a round
  (``"repeats", round``), each shown a second time later in the session with the sides swapped;
- gold: ``gold_count`` images per test set where the HQ faces the ``bicubic`` output (the HQ is
  the right answer), the same for every annotator (``"gold", round``);
- order: per (round, annotator) a permutation of base and gold pairs; each repeat at a random
  later position (``"order", round, annotator``);
- sides: per (round, annotator, task) whether the first model is on the left (``"side", ...``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path

from pipeline import contracts, model_names
from pipeline.io.tables import read_table
from pipeline.io.testsets import load_testset
from pipeline.seeding import numpy_rng

HQ_MODEL = "hq"
GOLD_OPPONENT = "bicubic"


class TaskError(ValueError):
    """Inputs from which no task list can be built (missing tables, images, models)."""


@dataclass(frozen=True)
class InstanceTask:
    """One (image, instance) to judge; ``candidates`` are settings in display order."""

    task_id: str
    image_id: str
    instance_id: int
    bbox: tuple[int, int, int, int]  # x, y, w, h in HQ pixels
    candidates: tuple[str, ...]
    candidate_paths: tuple[Path, ...]
    lq_path: Path
    hq_path: Path
    masks: Path  # the framework's label-map store


@dataclass(frozen=True)
class CompareTask:
    """One A/B question as one annotator sees it (``left``/``right`` model names)."""

    task_id: str
    testset: str
    image_id: str
    left: str
    right: str
    repeated: bool
    gold: bool
    left_path: Path
    right_path: Path
    lq_path: Path


@dataclass(frozen=True)
class RoundSettings:
    """What fixes a compare round's pairs (stored with the round; a restart must match)."""

    round: int
    seed: int
    testsets: dict[str, str]  # name -> test set folder
    models: tuple[str, ...]  # empty: every evaluated model
    focus: str  # "" : every pair of models
    repeat_fraction: float
    gold_count: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# ---------------------------------------------------------------- instances


def instance_tasks(
    results: str | Path, framework: str, top_k: int = 5, seed: int = 0
) -> list[InstanceTask]:
    """Every instance task of a framework, in annotation order (see the module docstring)."""
    results = Path(results)
    instances = read_table(
        contracts.artifact_in(results, "instances", framework=framework), "instances"
    )
    table = (
        contracts.artifact_in(results, "candidates", framework=framework)
        / contracts.CANDIDATES_TABLE
    )
    candidates = read_table(table, "candidates")
    train = {image.image_id: image for image in load_testset("synthetic", results / "data/train")}
    masks = contracts.artifact_in(results, "masks", framework=framework)
    kept = instances[~instances["is_remainder"]].sort_values(
        ["image_id", "area", "instance_id"], ascending=[True, False, True], kind="stable"
    )
    kept = kept.groupby("image_id", sort=True).head(top_k) if top_k > 0 else kept
    by_image = {
        str(image_id): group.sort_values("setting")
        for image_id, group in candidates.groupby("image_id")
    }
    tasks = []
    for row in kept.itertuples(index=False):
        image_id = str(row.image_id)
        if image_id not in by_image:
            raise TaskError(f"{table}: no candidates for image {image_id!r} of the instances table")
        if image_id not in train:
            raise TaskError(f"{results / 'data/train'}: no LQ/HQ pair for image {image_id!r}")
        group = by_image[image_id]
        task_id = f"{image_id}:{int(row.instance_id)}"
        order = numpy_rng(seed, "annotate", "instance", task_id).permutation(len(group))
        settings = [str(group["setting"].iloc[i]) for i in order]
        paths = [table.parent / str(group["path"].iloc[i]) for i in order]
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            raise TaskError(f"{table}: candidate images missing: {missing}")
        tasks.append(
            InstanceTask(
                task_id=task_id,
                image_id=image_id,
                instance_id=int(row.instance_id),
                bbox=(int(row.bbox_x), int(row.bbox_y), int(row.bbox_w), int(row.bbox_h)),
                candidates=tuple(settings),
                candidate_paths=tuple(paths),
                lq_path=train[image_id].lq,
                hq_path=train[image_id].hq,
                masks=masks,
            )
        )
    if not tasks:
        raise TaskError(f"{results / 'masks' / framework}: no non-remainder instance to annotate")
    return tasks


# ---------------------------------------------------------------- compare


def testset_kind(path: str | Path) -> str:
    """``synthetic`` for a degrade output folder (it has ``pairs.parquet``), else ``paired``."""
    return "synthetic" if (Path(path) / contracts.DATA_TABLE).is_file() else "paired"


def evaluation_dir(results: str | Path, framework: str, testset: str, model: str) -> Path:
    """The evaluate stage's folder of (framework, test set, model): the contracts' artifact
    ``evaluation``, with ``results`` in place of its leading ``results/`` (the workflow's root)."""
    path = Path(contracts.artifact("evaluation", framework=framework, testset=testset, model=model))
    return Path(results).joinpath(*path.parts[1:])


def evaluated_models(results: Path, framework: str, testset: str) -> list[str]:
    """Models with SR outputs of a test set (folders ``eval/{F}/{testset}/*/images``)."""
    folder = evaluation_dir(results, framework, testset, "_").parent
    return sorted(p.parent.name for p in folder.glob("*/images") if p.is_dir())


def default_focus(models: list[str]) -> str:
    """The DSPO model the paper compares against the others: the first (by name) dspo model
    that is not an ablation (dspo_m1, sampling without M2: pipeline.model_names); "" when there
    is none."""
    for name in sorted(models):
        spec = model_names.parse_or_none(name)
        if spec is not None and spec.method == model_names.DSPO and not spec.is_ablation:
            return name
    return ""


def base_pairs(settings: RoundSettings, results: Path, framework: str) -> list[dict]:
    """The round's base and gold pairs (unordered: ``first``, ``second``), before sides."""
    pairs = []
    for testset, path in sorted(settings.testsets.items()):
        found = evaluated_models(results, framework, testset)
        models = list(settings.models) or found
        absent = sorted(set(models) - set(found))
        if absent:
            raise TaskError(
                f"{evaluation_dir(results, framework, testset, '_').parent}: no SR outputs of "
                f"models {absent} "
                f"(found {found})"
            )
        if len(models) < 2:
            raise TaskError(f"test set {testset!r}: need two models to compare, found {models}")
        focus = settings.focus
        if focus and focus not in models:
            raise TaskError(f"focus model {focus!r} is not among {models}")
        matchups = (
            [(focus, other) for other in models if other != focus]
            if focus
            else list(combinations(sorted(models), 2))
        )
        images = {i.image_id: i for i in load_testset(testset_kind(path), path)}
        outputs = evaluation_dir(results, framework, testset, "_").parent

        def sr(model: str, image_id: str, testset: str = testset) -> Path:
            return evaluation_dir(results, framework, testset, model) / "images" / f"{image_id}.png"

        ids = [i for i in sorted(images) if all(sr(m, i).is_file() for m in models)]
        if not ids:
            raise TaskError(f"{outputs}: no image has SR outputs of all models {models}")
        for image_id in ids:
            for first, second in matchups:
                pairs.append(
                    {
                        "task_id": f"{testset}:{image_id}:{first}:{second}",
                        "testset": testset,
                        "image_id": image_id,
                        "first": first,
                        "second": second,
                        "paths": {first: sr(first, image_id), second: sr(second, image_id)},
                        "lq": images[image_id].lq,
                        "gold": False,
                    }
                )
        if settings.gold_count > 0:
            if not sr(GOLD_OPPONENT, ids[0]).is_file():
                raise TaskError(
                    f"gold pairs need the {GOLD_OPPONENT!r} outputs in {outputs / GOLD_OPPONENT}"
                )
            rng = numpy_rng(settings.seed, "annotate-compare", "gold", settings.round, testset)
            count = min(settings.gold_count, len(ids))
            for image_id in sorted(rng.choice(ids, size=count, replace=False)):
                pairs.append(
                    {
                        "task_id": f"gold:{testset}:{image_id}",
                        "testset": testset,
                        "image_id": str(image_id),
                        "first": HQ_MODEL,
                        "second": GOLD_OPPONENT,
                        "paths": {
                            HQ_MODEL: images[image_id].hq,
                            GOLD_OPPONENT: sr(GOLD_OPPONENT, image_id),
                        },
                        "lq": images[image_id].lq,
                        "gold": True,
                    }
                )
    return pairs


def compare_tasks(
    settings: RoundSettings, results: str | Path, framework: str, annotator: str
) -> list[CompareTask]:
    """One annotator's questions of a round, in the order they are asked."""
    results = Path(results)
    pairs = base_pairs(settings, results, framework)
    regular = [p for p in pairs if not p["gold"]]
    n_repeats = math.ceil(settings.repeat_fraction * len(regular)) if regular else 0
    rng = numpy_rng(settings.seed, "annotate-compare", "repeats", settings.round)
    repeated = set(rng.choice(len(regular), size=n_repeats, replace=False).tolist())
    rng = numpy_rng(settings.seed, "annotate-compare", "order", settings.round, annotator)
    order = [pairs[i] for i in rng.permutation(len(pairs))]
    sequence: list[tuple[dict, bool]] = [(pair, False) for pair in order]
    for index in sorted(repeated):
        pair = regular[index]
        after = next(i for i, (p, _) in enumerate(sequence) if p is pair)
        sequence.insert(int(rng.integers(after + 1, len(sequence) + 1)), (pair, True))
    tasks = []
    for pair, is_repeat in sequence:
        side = numpy_rng(
            settings.seed, "annotate-compare", "side", settings.round, annotator, pair["task_id"]
        )
        first_left = bool(side.integers(2)) != is_repeat  # a repeat swaps the sides
        left, right = (
            (pair["first"], pair["second"]) if first_left else (pair["second"], pair["first"])
        )
        tasks.append(
            CompareTask(
                task_id=pair["task_id"] + (":repeat" if is_repeat else ""),
                testset=pair["testset"],
                image_id=pair["image_id"],
                left=left,
                right=right,
                repeated=is_repeat,
                gold=pair["gold"],
                left_path=pair["paths"][left],
                right_path=pair["paths"][right],
                lq_path=pair["lq"],
            )
        )
    return tasks
