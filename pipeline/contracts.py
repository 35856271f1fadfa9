"""The vocabulary every stage shares, owned by no stage (docs/design.md §12).

- **Artifacts**: where every output of the DAG lives (:data:`ARTIFACTS`, :func:`artifact`; the
  Snakemake rules build their paths from it) and how a stage finds the files inside another
  stage's folder (:func:`data_images`, :func:`candidate_files`, :func:`evaluation_images`).
  Stages take folder and table paths on their command lines and open files only through these.
- **Tables**: the Parquet schemas are in :mod:`pipeline.io.tables`, the label-map layout in
  :mod:`pipeline.io.masks`.
- **Words**: the whole-image instance id, the table of training methods and the join that turns
  hallucination captions into an image's negative prompt.
"""

from __future__ import annotations

import importlib.util
import os
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the tables are pandas frames; importing pandas is left to the stages
    import pandas as pd

#: the pipeline's stages, in DAG order: one Snakemake rule and one module each, whose config
#: section (if any) has the same name
STAGES = (
    "degrade",
    "prompts",
    "pretrain",
    "candidates",
    "segment",
    "caption",
    "score",
    "select",
    "train",
    "evaluate",
    "winrates",
    "report",
)

# ---------------------------------------------------------------------------------- artifacts

#: every artifact of the DAG, relative to the working directory: the rules' outputs (wildcards in
#: braces, as Snakemake reads them) and the checkpoint folders kept outside them (Snakemake
#: deletes a failed job's outputs, not these)
ARTIFACTS = {
    "data": "results/data/{split}",  # DATA_TABLE + hq/ + lq/ (paths recorded in the table)
    "prompts": "results/prompts/{split}.parquet",  # split: train or a test set's name
    "model": "results/models/{framework}/{variant}",  # save_pretrained folder
    "pretrain_checkpoints": "results/checkpoints/pretrain/{framework}/{variant}",
    "candidates": "results/candidates/{framework}",  # CANDIDATES_TABLE + images it names
    "masks": "results/masks/{framework}.zarr",
    "instances": "results/masks/{framework}/instances.parquet",
    "captions": "results/captions/{framework}.parquet",
    "scores": "results/scores/{framework}.parquet",
    "pairs_dir": "results/pairs/{framework}",
    "pairs": "results/pairs/{framework}/{objective}{level}.parquet",  # level: PAIR_LEVELS
    "aligned": "results/aligned/{framework}/{method}/{objective}",  # save_pretrained folder
    # ea_adam's aligned folder holds the fused model itself and the population beside it:
    # POPULATION_TABLE, POPULATION_STATE and one save_pretrained folder per member
    "population_member": "results/aligned/{framework}/{method}/{objective}/members/{member}",
    "train_checkpoints": "results/checkpoints/train/{framework}/{method}/{objective}",
    # iterative rounds (docs/design.md §14, workflow/rules/rounds.smk): round r >= 2 of one
    # (framework, method, objective) run, regenerated from round r - 1's aligned model; round 1
    # is the artifacts above. The round's select writes only its objective's pairs.
    "round_candidates": "results/rounds/{framework}/{method}/{objective}/r{round}/candidates",
    "round_captions": "results/rounds/{framework}/{method}/{objective}/r{round}/captions.parquet",
    "round_scores": "results/rounds/{framework}/{method}/{objective}/r{round}/scores.parquet",
    "round_pairs_dir": "results/rounds/{framework}/{method}/{objective}/r{round}/pairs",
    "round_pairs": "results/rounds/{framework}/{method}/{objective}/r{round}/pairs/{objective}{level}.parquet",
    "round_aligned": "results/rounds/{framework}/{method}/{objective}/r{round}/aligned",
    "round_train_checkpoints": "results/checkpoints/rounds/{framework}/{method}/{objective}/r{round}",
    "evaluation": "results/eval/{framework}/{testset}/{model}",  # EVAL_* files + images/
    "report_dir": "results/eval/{framework}",  # summary, tables, plots, report.md
    # human evaluation (Fig. 3; pipeline/annotate, workflow/rules/annotate.smk): the votes of
    # simulated annotators (a real round's votes come from `annotate export`), and the win-rate
    # folder (winrates.csv/.md, bradley_terry.csv, winrates.png, summary.json)
    "simulated_votes": "results/annotations/{framework}/votes_simulated.parquet",
    "human_winrates": "results/annotations/{framework}/winrates",
    # win rates on a test set: its HQ segmented like the training images, then the table
    "test_hq": "results/masks/{framework}/test_{testset}_hq.parquet",  # candidates table of HQ
    "test_masks": "results/masks/{framework}/test_{testset}.zarr",
    "test_instances": "results/masks/{framework}/test_{testset}_instances.parquet",
    "win_rates": "results/winrates/{framework}/{testset}.parquet",
    # a winrates shard's per-instance scores of every compared model (table win_instances);
    # only shards of it are written: the gather computes win_rates from them
    "win_instances": "results/winrates/{framework}/{testset}_instances.parquet",
    # the Figure 1 study (pipeline/study.py, workflow/rules/study.smk; split: train or test;
    # arm: the main arm or a control, pipeline.study.ARM)
    "study_masks": "results/study/masks/{split}.zarr",
    "study_instances": "results/study/masks/{split}_instances.parquet",
    "study_prompts": "results/study/prompts/{split}.parquet",
    "study_candidates": "results/study/{arm}/candidates",  # CANDIDATES_TABLE, study.REGIONS_TABLE
    "study_scores": "results/study/{arm}/scores.parquet",
    "study_pairs_dir": "results/study/{arm}/pairs",
    "study_pairs": "results/study/{arm}/pairs/study{level}.parquet",  # objective study.OBJECTIVE
    "study_aligned": "results/study/{arm}/aligned/{method}/seed{seed}",
    "study_train_checkpoints": "results/study/{arm}/checkpoints/{method}/seed{seed}",
    "study_adoption": "results/study/adoption.parquet",
    "study_report": "results/study/report.md",
    "study_plot": "results/study/adoption.png",
    "study_section": "results/study/section.md",  # the study's section of the demo's report
}
#: files inside the folder artifacts: no other module spells them (docs/design.md §12)
DATA_TABLE = "pairs.parquet"  # data/{split}: table degradation_pairs
CANDIDATES_TABLE = "candidates.parquet"  # candidates/{framework}: table candidates
EVAL_METRICS = "metrics.parquet"  # evaluation: table eval_metrics
EVAL_IMAGES = "images.parquet"  # evaluation: table eval_images (the manifest report reads)
#: a trained model's folder (model, aligned, round_aligned, study_aligned): its log, table
#: pretrain_log (pretrain), train_log or the method's own log table
TRAIN_LOG = "train_log.parquet"
TRAIN_CURVES = "train_curves.parquet"  # aligned: table train_curves (the alignment curves)
STUDY_REGIONS = "regions.parquet"  # study_candidates: table study_regions
#: report_dir: every file the report writes, by kind (:func:`report_file` fills the fields)
REPORT_FILES = {
    "summary": "summary.parquet",  # table eval_summary
    "tables_md": "tables.md",
    "tables_csv": "tables.csv",
    "report": "report.md",
    "radar": "radar_{testset}.png",
    "grid": "grid_{testset}.png",
    "front": "front_{testset}.png",  # EA-Adam's front
    "front_md": "front.md",
    "rounds_csv": "rounds.csv",
    "rounds_md": "rounds.md",
    "curves": "curves_{framework}.png",  # alignment curves
    "win_rates": "win_rates_{framework}.png",
    "win_rates_csv": "win_rates.csv",
    "study_plot": "study_adoption.png",  # the Figure 1 study's plot, copied
    "human_plot": "human_winrates.png",  # the human win rates' plot, copied
}
#: annotations/{framework}/ (``annotate export``): tables annotations and votes
ANNOTATIONS_TABLE = "annotations.parquet"
VOTES_TABLE = "votes.parquet"
#: human_winrates: the files of one human win-rate folder, the summary among them
HUMAN_WINRATES_CSV = "winrates.csv"
HUMAN_BRADLEY_TERRY = "bradley_terry.csv"
HUMAN_WINRATES_MD = "winrates.md"
HUMAN_WINRATES_PLOT = "winrates.png"
HUMAN_WINRATE_SUMMARY = "summary.json"
HUMAN_WINRATE_FILES = (
    HUMAN_WINRATES_CSV,
    HUMAN_BRADLEY_TERRY,
    HUMAN_WINRATES_MD,
    HUMAN_WINRATES_PLOT,
    HUMAN_WINRATE_SUMMARY,
)
#: the pairs file of each pair level: ``pairs/{framework}/{objective}{suffix}.parquet``
PAIR_LEVELS = {"instance": "", "image": "_image"}


def pairs_file(objective: str, level: str = "instance") -> str:
    """The name of ``objective``'s pairs table of pair ``level`` in a pairs folder:
    ``pairs_file("fidelity", "image")`` -> ``fidelity_image.parquet``."""
    if level not in PAIR_LEVELS:
        raise KeyError(f"unknown pair level {level!r}; known: {sorted(PAIR_LEVELS)}")
    return f"{objective}{PAIR_LEVELS[level]}.parquet"


#: the pair level of an online method (ddpo): it samples its own outputs and reads no pairs
NO_PAIRS = "none"
#: a method of pair level "objectives" reads the instance pairs of each of these objectives, in
#: this order (EA-Adam, docs/ea_adam.md: objective 0 = perception, 1 = fidelity)
MULTI_OBJECTIVES = ("perception", "fidelity")
#: the objective wildcard of a multi-objective method's one run per framework (ea_adam)
FRONT_OBJECTIVE = "front"
#: files of ea_adam's aligned folder (docs/ea_adam.md): table population, the population state
POPULATION_TABLE = "population.parquet"
POPULATION_STATE = "population.safetensors"
MEMBERS_DIR = "members"  # members/{i}/: member i, a save_pretrained folder


class _KeepMissing(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def wildcards_of(name: str) -> set[str]:
    """The wildcards in artifact ``name``'s path."""
    if name not in ARTIFACTS:
        raise KeyError(f"unknown artifact {name!r}; known: {sorted(ARTIFACTS)}")
    return {f for _, f, _, _ in string.Formatter().parse(ARTIFACTS[name]) if f}


def artifact(name: str, **fields: Any) -> str:
    """The path of artifact ``name`` with the given wildcards filled in; the others stay as
    ``{wildcard}`` (for Snakemake rules). ``artifact("model", variant="base")`` ->
    ``results/models/{framework}/base``."""
    if name not in ARTIFACTS:
        raise KeyError(f"unknown artifact {name!r}; known: {sorted(ARTIFACTS)}")
    unknown = set(fields) - wildcards_of(name)
    if unknown:
        raise KeyError(f"artifact {name!r} has no wildcard {sorted(unknown)}")
    return ARTIFACTS[name].format_map(_KeepMissing(fields))


def report_file(kind: str, **fields: Any) -> str:
    """The name of a report file (:data:`REPORT_FILES`): ``report_file("radar", testset="x")``
    -> ``radar_x.png``."""
    if kind not in REPORT_FILES:
        raise KeyError(f"unknown report file {kind!r}; known: {sorted(REPORT_FILES)}")
    return REPORT_FILES[kind].format(**fields)


def artifact_in(results: str | Path, name: str, **fields: Any) -> Path:
    """Artifact ``name`` under a results folder other than the working directory's
    ``results/`` (the annotation tools and tests take one): ``artifact_in("/r", "masks",
    framework="onestep")`` -> ``/r/masks/onestep.zarr``."""
    return Path(results) / artifact(name, **fields).removeprefix("results/")


#: where shard outputs live (docs/design.md §15): artifact ``results/X/Y[.ext]`` has its shard
#: ``{scatteritem}`` (Snakemake's scatter item, ``I-of-K``) at ``results/shards/X/Y/{scatteritem}[.ext]``
SHARDS_ROOT = "results/shards"
#: extensions of file artifacts (and Zarr stores) kept on their shards' names
_SHARD_SUFFIXES = (".parquet", ".zarr")


def shard_artifact(name: str, **fields: Any) -> str:
    """The path of shard ``{scatteritem}`` of artifact ``name`` (a folder, table or store of
    the same layout holding that shard's images), other wildcards as :func:`artifact` fills
    them. ``shard_artifact("scores", framework="onestep", scatteritem="1-of-2")`` ->
    ``results/shards/scores/onestep/1-of-2.parquet``."""
    path = artifact(name, **{k: v for k, v in fields.items() if k != "scatteritem"})
    relative = path.removeprefix("results/")
    suffix = next((s for s in _SHARD_SUFFIXES if relative.endswith(s)), "")
    stem = relative[: len(relative) - len(suffix)]
    item = fields.get("scatteritem", "{scatteritem}")
    return f"{SHARDS_ROOT}/{stem}/{item}{suffix}"


def pairs_artifact(
    framework: str, objective: str, method_name: str, round_number: int = 1
) -> str | None:
    """The pairs table a training method reads (its pair level's file; from round 2 on, the
    round's own, ``round_pairs``); None for a method of pair level :data:`NO_PAIRS`."""
    if method(method_name).pair_level == NO_PAIRS:
        return None
    if method(method_name).pair_level == "objectives":
        raise ValueError(f"{method_name!r} reads several pairs tables: use train_pairs_artifacts")
    level = PAIR_LEVELS[method(method_name).pair_level]
    if round_number > 1:
        return artifact(
            "round_pairs",
            framework=framework,
            method=method_name,
            objective=objective,
            round=round_number,
            level=level,
        )
    return artifact("pairs", framework=framework, objective=objective, level=level)


def aligned_artifact(
    framework: str, method_name: str, objective: str, round_number: int = 1
) -> str:
    """The aligned model of one run after round ``round_number`` (1: ``aligned``, later rounds:
    ``round_aligned``). Round r + 1 starts from, and takes as its reference, round r's model:
    ``aligned_artifact(..., r)`` (docs/design.md §14)."""
    if round_number == 1:
        return artifact("aligned", framework=framework, method=method_name, objective=objective)
    return artifact(
        "round_aligned",
        framework=framework,
        method=method_name,
        objective=objective,
        round=round_number,
    )


def train_pairs_artifacts(
    framework: str, objective: str, method_name: str, round_number: int = 1
) -> list[str]:
    """Every pairs table a training method reads: its pair level's file, or for pair level
    "objectives" the instance pairs of each of :data:`MULTI_OBJECTIVES`, in that order."""
    if method(method_name).pair_level != "objectives":
        path = pairs_artifact(framework, objective, method_name, round_number)
        return [path] if path else []
    if round_number > 1:
        raise ValueError(f"{method_name!r} reads several objectives' pairs: it has no rounds")
    level = PAIR_LEVELS["instance"]
    return [
        artifact("pairs", framework=framework, objective=o, level=level) for o in MULTI_OBJECTIVES
    ]


def _beside(folder: Path, recorded: str) -> Path:
    path = Path(recorded)
    return path if path.is_absolute() else folder / path


def data_images(data_dir: str | Path, kind: str) -> dict[str, Path]:
    """``{image_id: path}`` of a degraded data folder's ``kind`` images (``hq`` or ``lq``), as its
    :data:`DATA_TABLE` records them (paths relative to the folder)."""
    from pipeline.io.tables import read_table

    if kind not in ("hq", "lq"):
        raise ValueError(f"data images are 'hq' or 'lq', not {kind!r}")
    folder = Path(data_dir)
    table = folder / DATA_TABLE
    if not table.is_file():
        raise FileNotFoundError(f"{folder}: no {DATA_TABLE} (is it a degrade stage output?)")
    frame = read_table(table, "degradation_pairs")
    return {
        str(image_id): _beside(folder, str(path))
        for image_id, path in zip(frame["image_id"], frame[f"{kind}_path"], strict=True)
    }


def candidate_files(
    candidates_table: str | Path, frame: pd.DataFrame
) -> dict[tuple[str, str], Path]:
    """``{(image_id, setting): path}`` of a candidates table's images: each recorded path is
    relative to the table's folder (or absolute); nothing is looked up in the working directory."""
    folder = Path(candidates_table).parent
    return {
        (str(row.image_id), str(row.setting)): _beside(folder, str(row.path))
        for row in frame.itertuples()
    }


def evaluation_images(evaluation_dir: str | Path) -> pd.DataFrame:
    """An evaluation folder's :data:`EVAL_IMAGES` manifest with absolute-or-relative paths
    resolved: one row per test image (testset, model, image_id, sr_path, lq_path, hq_path)."""
    from pipeline.io.tables import read_table

    folder = Path(evaluation_dir)
    frame = read_table(folder / EVAL_IMAGES, "eval_images")
    frame["sr_path"] = [str(_beside(folder, path)) for path in frame["sr_path"]]
    return frame


# ------------------------------------------------------------------------------------- words

#: ``instance_id`` of the whole image (scores, pairs): the image-level baselines' "instance"
WHOLE_IMAGE_ID = -1
#: ``candidate`` of the HQ image in the captions table (the reference captions)
HQ_CANDIDATE = "hq"


@dataclass(frozen=True)
class Method:
    """A preference-training method as the workflow and the train stage see it."""

    name: str
    loss: str  # the loss the train stage assembles (pipeline.losses, pipeline.training.step)
    pair_level: str  # a key of PAIR_LEVELS, or "objectives" (MULTI_OBJECTIVES' instance pairs)
    needs_reference: bool = True  # whether the loss compares against the frozen reference
    # the method's module, pipeline.training.<loop> (pipeline.training.session.method_module):
    # "offline" (the loop over selected pairs) or a method with its own loop
    loop: str = "offline"
    # overrides of the train section: e.g. the prompt rule (negative_prompts) of an ablation
    settings: dict[str, Any] = field(default_factory=dict)
    # a method added from a file outside the package (load_method_files): that file's path
    file: str | None = None


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("dspo", "dspo", "instance"),
        Method("dro", "dro", "instance"),
        # Diffusion-DRO's hybrid sampling (docs/online_alignment.md "Online DRO"): the pairs'
        # winners (or the HQ) as experts against states of the policy's own trajectories
        Method("dro_online", "dro", "instance", loop="dro_online"),
        # the M1-only ablation: DSPO without the description feedback (no negative prompts)
        Method("dspo_m1", "dspo", "instance", settings={"negative_prompts": False}),
        Method("dpo", "dpo", "image"),
        Method("sft", "sft", "image", needs_reference=False),
        # DDPO (docs/online_alignment.md): PPO on the policy's own samples, rewarded by the
        # objective's scores; the one-step framework's policy is the one-step Gaussian policy
        Method("ddpo", "ppo", NO_PAIRS, needs_reference=False, loop="ddpo"),
        # GDPO-SR (docs/online_alignment.md "GDPO"): groups of policy samples, group-relative
        # advantages in a Diffusion-DPO-style loss; gdpo_instance: rewards, advantages and error
        # maps per DSPO instance (it reads the segment stage's masks)
        Method("gdpo", "gdpo", NO_PAIRS, loop="gdpo"),
        Method("gdpo_instance", "gdpo_instance", NO_PAIRS, loop="gdpo"),
        # EA-Adam on DSPO (docs/ea_adam.md): a population on the perception and fidelity pairs
        Method("ea_adam", "dspo", "objectives", loop="ea_adam"),
    )
}


def method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown training method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


def method_module(name: str) -> str:
    """The module of method ``name``: ``pipeline.training.<Method.loop>`` (its ``RUN``, for the
    training session). Built from this package's name: a literal module name here would put
    every method into every stage's code hash (pipeline.codehash reads names in strings)."""
    return ".".join((__package__, "training", method(name).loop))


#: method files outside the package (docs/adding_a_method.md), os.pathsep-separated: every
#: process that imports this module registers their methods (the workflow sets it from the
#: config's ``method_files``, so the jobs it runs see them too)
METHOD_FILES_ENV = "DSPO_METHOD_FILES"
_METHOD_FILE_MODULES: dict[str, Any] = {}  # method name -> its file's module


def load_method_files(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Register the method each file declares and return their names. A method file defines
    ``METHOD`` (a :class:`Method`) and ``RUN`` (its :class:`pipeline.training.session.MethodRun`);
    loading a file twice registers it once; a name the table has already is refused."""
    names = []
    for given in paths:
        path = Path(given).resolve()
        known = [m.name for m in METHODS.values() if m.file == str(path)]
        if known:
            names += known
            continue
        if not path.is_file():
            raise FileNotFoundError(f"method file not found: {given}")
        spec = importlib.util.spec_from_file_location(f"dspo_method_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        declared = getattr(module, "METHOD", None)
        if not isinstance(declared, Method) or not hasattr(module, "RUN"):
            raise ValueError(f"{path}: a method file defines METHOD (a Method) and RUN")
        if declared.name in METHODS:
            raise ValueError(f"{path}: method {declared.name!r} is already in the method table")
        METHODS[declared.name] = replace(declared, file=str(path))
        _METHOD_FILE_MODULES[declared.name] = module
        names.append(declared.name)
    return names


def method_file_module(name: str) -> Any:
    """The module a method file was loaded as (:func:`load_method_files`)."""
    if method(name).file is None:
        raise KeyError(f"method {name!r} is the package's, not a method file's")
    return _METHOD_FILE_MODULES[name]


def _join_unique(texts: Sequence[str]) -> str:
    return ", ".join(dict.fromkeys(text for text in texts if text))


def negative_prompts(captions: pd.DataFrame) -> dict[tuple[str, str], str]:
    """``{(image_id, candidate): prompt}``: the hallucinated instances' captions, by instance
    id, joined with ", " (repeats dropped); ``""`` for a candidate with no hallucination."""
    candidates = captions[captions["candidate"] != HQ_CANDIDATE].sort_values(
        ["image_id", "candidate", "instance_id"]
    )
    prompts: dict[tuple[str, str], str] = {}
    for (image_id, candidate), group in candidates.groupby(["image_id", "candidate"], sort=True):
        prompts[(image_id, candidate)] = _join_unique(
            group.loc[group["hallucinated"], "caption"].tolist()
        )
    return prompts


def image_negative_prompts(captions: pd.DataFrame) -> dict[str, str]:
    """``{image_id: prompt}``: the union over candidates (docs/design.md §7, "that image's
    negative prompt"), in candidate then instance order, repeats dropped."""
    prompts: dict[str, list[str]] = {}
    for (image_id, _candidate), prompt in negative_prompts(captions).items():
        prompts.setdefault(image_id, []).extend(prompt.split(", ") if prompt else [])
    return {image_id: _join_unique(texts) for image_id, texts in prompts.items()}


if os.environ.get(METHOD_FILES_ENV):  # after the table: a method file imports this module
    load_method_files(p for p in os.environ[METHOD_FILES_ENV].split(os.pathsep) if p)
