"""A controlled study of the DSPO paper's Figure 1 dilemma (``snakemake study``, docs/study.md).

Image-level preference can pick an image that is better overall but carries a severe local
artifact, so image-level Diffusion-DPO learns the artifact; instance-level DSPO should not. The
study builds candidates whose truth is known, lets the REAL select and train stages turn them
into pairs and aligned models (the rules in ``workflow/rules/study.smk`` call
``python -m pipeline select`` and ``python -m pipeline train``; this module imports no stage),
and measures on held-out images how much of the planted artifact each aligned model reproduces
per kind of region.

Per training image, with a base ``P`` (``study.base``: the HQ by default, or the pretrained
model's output) and its instances (the segment stage's partition of the HQ) split into
*textured* and *smooth* by the HQ's luminance gradient (:func:`region_kinds`), the candidates of
the **main arm** are:

- ``checker``: ``P`` + a checkerboard of amplitude ``artifact_strength`` on the textured
  instances (:func:`checker_pattern`, the Nyquist frequency at a fixed phase: a content-free
  signature that natural images hardly contain), clean elsewhere;
- ``cast``: ``P`` + a colour cast ``c · (1, -1, 1)`` on the smooth instances, clean elsewhere,
  with ``c`` chosen per image so that the cast's planted squared error over the whole image is
  ``image_margin`` times the checkerboard's (:func:`cast_amplitude`).

Under the study's objective (PSNR against the HQ, per instance and whole image, a ``scores``
table) the image-level winner is ``checker`` (better overall, yet with the artifact on every
textured instance); per instance, the winner is the candidate that is clean there (``cast`` on
textured, ``checker`` on smooth instances). Two **control arms** (``study.controls``, :data:`ARM`)
tell whether the measure and the training budget can show adoption at all:

- ``positive``: candidates ``checker`` and ``clean`` (``P`` itself), paired by the real select
  stage under the *reversed* objective (PSNR weight -1: the candidate farther from the HQ wins),
  so both the image-level and the textured instances' winner is ``checker`` and the loser is
  clean; smooth instances are identical in both candidates and get no pair. Both methods should
  adopt the checkerboard here;
- ``negative``: candidates ``clean`` and ``noise`` (``P`` + white Gaussian noise of standard
  deviation ``artifact_strength`` everywhere, seeded per image), paired under PSNR: the winner is
  clean at both levels and neither candidate carries the checkerboard or the cast, so training
  happens (away from the noise) yet the adoption of either signature should be about 0.

The measure (:func:`adoption`) is the matched filter of the artifact's signature on the aligned
model's change over the pretrained one, pooled over the held-out pixels of one kind of region, in
units of the main arm's planted amplitude: 1 = the model adds the whole planted artifact, 0 =
none, < 0 = it moves away from it.

Commands (``python -m pipeline study SUBCOMMAND``): ``build`` (one arm's candidates, regions,
scores), ``measure`` (the adoption table) and ``report`` (report.md, the plot and the section the
demo's report includes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import contracts, settings
from pipeline.io.atomic import atomic_path
from pipeline.io.images import read_rgb, write_png
from pipeline.io.masks import read_label_map
from pipeline.io.tables import read_metadata, read_table, write_table
from pipeline.seeding import numpy_rng

#: the candidates: the base plus a checkerboard (textured instances), a colour cast (smooth
#: instances), nothing, or white noise (everywhere)
CHECKER, CAST, CLEAN, NOISE = "checker", "cast", "clean", "noise"
#: the two planted artifacts, whose signatures the measure looks for
SETTINGS = (CHECKER, CAST)
#: where each artifact is planted
PLANTED_ON = {CHECKER: "textured", CAST: "smooth"}
REGIONS = ("textured", "smooth")
MAIN, POSITIVE, NEGATIVE = "main", "positive", "negative"
CONTROLS = (POSITIVE, NEGATIVE)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm of the study: its two candidates, the weight of PSNR in the objective its pairs
    are selected under, and the winners that construction implies (checked on the real pairs)."""

    candidates: tuple[str, str]
    psnr_weight: float
    image_winner: str
    instance_winner: dict[str, str | None]  # per region kind; None: identical there, no pair
    words: str  # the report's description of the pairs
    expect: str  # what the arm should show


ARM = {
    MAIN: Arm(
        (CHECKER, CAST),
        1.0,
        CHECKER,
        {"textured": CAST, "smooth": CHECKER},
        "`checker` vs `cast` under PSNR: image winner `checker` (better overall, with the "
        "checkerboard on every textured instance); each instance's winner the candidate "
        "clean there",
        "the hypothesis: Diffusion-DPO adopts the checkerboard, DSPO does not",
    ),
    POSITIVE: Arm(
        (CHECKER, CLEAN),
        -1.0,
        CHECKER,
        {"textured": CHECKER, "smooth": None},
        "`checker` vs `clean` under the reversed objective (PSNR weight -1): winner "
        "`checker`, loser clean, at the image level and on textured instances (smooth "
        "instances are identical: no pair)",
        "both methods adopt the checkerboard (interval above 0)",
    ),
    NEGATIVE: Arm(
        (CLEAN, NOISE),
        1.0,
        CLEAN,
        {"textured": CLEAN, "smooth": CLEAN},
        "`clean` vs `noise` (white noise everywhere) under PSNR: winner clean at both "
        "levels; neither candidate carries the checkerboard or the cast",
        "adoption of both signatures about 0 (interval around 0)",
    ),
}
#: the select objective the study's pairs are made under (the study's scores hold one metric)
OBJECTIVE = "study"
METRIC = "psnr"
#: per-channel direction of the colour cast (a magenta shift); |component| = 1
CAST_DIRECTION = np.array([1.0, -1.0, 1.0])
STAGE = "study"


# ------------------------------------------------------------------------------ settings


def study_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``study`` section with the schema's defaults."""
    return settings.resolve("study", config.get("study"))


def arms(study: Mapping[str, Any]) -> list[str]:
    """The arms a study section runs: the main arm, then its controls in :data:`CONTROLS` order."""
    return [MAIN, *(arm for arm in CONTROLS if arm in study["controls"])]


def train_settings(config: Mapping[str, Any], method: str) -> dict[str, Any]:
    """A study train job's settings: the ``train`` section < ``study.train`` (validated as train
    keys) < the method's own overrides (as :func:`pipeline.settings.job_settings`)."""
    merged = {**(config.get("train") or {}), **study_settings(config)["train"]}
    section = settings.resolve("train", merged)
    section.update(contracts.method(method).settings)
    return section


def select_settings(config: Mapping[str, Any], arm: str = MAIN) -> dict[str, Any]:
    """An arm's select job settings: the study's one objective (PSNR, weighted by the arm's
    :attr:`Arm.psnr_weight`), every instance kept."""
    objective = {OBJECTIVE: {METRIC: ARM[arm].psnr_weight}}
    merged = {**(config.get("select") or {}), "objectives": objective, "include_remainder": True}
    return settings.resolve("select", merged)


def segment_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The segment job's settings: the configured segmenter on the HQ images (source ``hq``)."""
    return settings.resolve("segment", {**(config.get("segment") or {}), "source": "hq"})


def job_file(job_dir: str | Path, name: str, payload: Mapping[str, Any]) -> tuple[str, str]:
    """``(canonical JSON, path)``: a study job's settings, written once to
    ``job_dir/study-NAME-HASH.json`` (the rules' ``--config`` file; the JSON is the rerun trigger)."""
    import hashlib
    import os

    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    target = Path(job_dir) / f"study-{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text)
        partial.replace(target)
    return text, str(target)


#: the study keys that only the train jobs (and the rules' job lists) read
TRAIN_KEYS = ("train", "gpus", "seeds", "methods", "controls", "in_report")
#: the study keys the build reads (the others do not rerun the candidates)
BUILD_KEYS = ("framework", "artifact_strength", "image_margin", "texture_quantile", "base")


def rule_jobs(config: Mapping[str, Any], job_dir: str | Path) -> dict[str, tuple[str, str]]:
    """Every study rule's settings (:func:`job_file`), by job: ``build``, ``study`` (measure and
    report), ``segment``, ``prompts``, ``select_{arm}`` and ``train_{method}``."""
    study = study_settings(config)
    jobs = {
        "build": {k: study[k] for k in BUILD_KEYS},
        # measure and report: not the keys of the train jobs (those rerun what they change)
        "study": {k: v for k, v in study.items() if k not in TRAIN_KEYS},
        "segment": segment_settings(config),
        "prompts": settings.job_settings(config, "prompts"),
        **{f"select_{arm}": select_settings(config, arm) for arm in ARM},
        **{f"train_{m}": train_settings(config, m) for m in study["methods"]},
    }
    return {name: job_file(job_dir, name.replace("_", "-"), job) for name, job in jobs.items()}


def report_inputs(study: Mapping[str, Any], framework: str) -> dict[str, str]:
    """``{"section": ..., "plot": ...}``: the study's files the report of ``framework`` includes
    when ``study.in_report`` and ``framework`` is ``study.framework`` (the report rule's inputs and
    its ``--study-section``/``--study-plot`` options), else ``{}``."""
    if study["in_report"] and framework == study["framework"]:
        return {
            "section": contracts.artifact("study_section"),
            "plot": contracts.artifact("study_plot"),
        }
    return {}


def aligned_paths(
    arm_names: Sequence[str], methods: Sequence[str], seeds: Sequence[int]
) -> dict[tuple[str, str, int], str]:
    """``{(arm, method, seed): aligned model folder}`` of the study's train jobs."""
    return {
        (a, m, int(s)): contracts.artifact("study_aligned", arm=a, method=m, seed=s)
        for a in arm_names
        for m in methods
        for s in seeds
    }


# ------------------------------------------------------------------------------- regions


def unit(image: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` → float64 in [0, 1]."""
    return np.asarray(image, dtype=np.float64) / 255.0


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float in [0, 1] → uint8 (rounded, clipped)."""
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def texture(hq: np.ndarray, mask: np.ndarray) -> float:
    """Mean luminance gradient magnitude of ``hq`` (float ``[H, W, 3]`` in [0, 1]) under ``mask``."""
    luminance = hq @ np.array([0.299, 0.587, 0.114])
    gy, gx = np.gradient(luminance)
    return float(np.hypot(gx, gy)[mask].mean())


def region_kinds(
    hq: np.ndarray, label_map: np.ndarray, quantile: float
) -> dict[int, tuple[str, float]]:
    """``{instance_id: (kind, texture)}``: an instance is ``textured`` when its texture is above
    the ``quantile`` of its image's instance textures, else ``smooth``."""
    ids = [int(i) for i in np.unique(label_map)]
    values = {i: texture(hq, label_map == i) for i in ids}
    threshold = float(np.quantile(list(values.values()), quantile))
    return {i: ("textured" if v > threshold else "smooth", v) for i, v in values.items()}


def kind_masks(
    label_map: np.ndarray, kinds: Mapping[int, tuple[str, float]]
) -> dict[str, np.ndarray]:
    """``{region: bool [H, W]}``: the union of the instances of each kind."""
    return {
        region: np.isin(label_map, [i for i, (kind, _) in kinds.items() if kind == region])
        for region in REGIONS
    }


# -------------------------------------------------------------------------------- planting


def checker_pattern(height: int, width: int) -> np.ndarray:
    """``(-1)^(y + x)`` on all three channels, float ``[H, W, 3]``: the checkerboard signature."""
    y, x = np.indices((height, width))
    return np.repeat((1.0 - 2.0 * ((y + x) % 2))[:, :, None], 3, axis=2)


def cast_pattern(height: int, width: int) -> np.ndarray:
    """The colour cast's signature: :data:`CAST_DIRECTION` at every pixel, float ``[H, W, 3]``."""
    return np.broadcast_to(CAST_DIRECTION, (height, width, 3)).astype(np.float64)


def cast_amplitude(strength: float, margin: float, textured: int, smooth: int) -> float:
    """The cast amplitude whose planted squared error over the image is ``margin`` times the
    checkerboard's: ``smooth · c² = margin · textured · strength²``."""
    return float(strength * np.sqrt(margin * textured / smooth))


def plant(
    base: np.ndarray, masks: Mapping[str, np.ndarray], strength: float, margin: float
) -> tuple[dict[str, np.ndarray], float]:
    """The main arm's two candidates (uint8 ``[H, W, 3]``) built from ``base`` (uint8: the HQ or
    the pretrained output) and the region masks, and the cast amplitude used."""
    height, width = base.shape[:2]
    textured, smooth = masks["textured"], masks["smooth"]
    amplitude = cast_amplitude(strength, margin, int(textured.sum()), int(smooth.sum()))
    planted = {
        CHECKER: unit(base) + strength * checker_pattern(height, width) * textured[:, :, None],
        CAST: unit(base) + amplitude * cast_pattern(height, width) * smooth[:, :, None],
    }
    return {name: to_uint8(image) for name, image in planted.items()}, amplitude


def arm_candidates(
    arm: str,
    base: np.ndarray,
    masks: Mapping[str, np.ndarray],
    strength: float,
    margin: float,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, float]]]:
    """One arm's two candidates (uint8) and, per region kind, ``(planted, amplitude)``: what the
    arm plants there (``""``: nothing) and its amplitude. ``rng`` draws the negative control's
    noise (one standard normal per pixel and channel)."""
    main, amplitude = plant(base, masks, strength, margin)
    if arm == MAIN:
        return main, {"textured": (CHECKER, strength), "smooth": (CAST, amplitude)}
    if arm == POSITIVE:
        return (
            {CHECKER: main[CHECKER], CLEAN: base.copy()},
            {"textured": (CHECKER, strength), "smooth": ("", 0.0)},
        )
    if arm == NEGATIVE:
        noisy = to_uint8(unit(base) + strength * rng.standard_normal(base.shape))
        return {CLEAN: base.copy(), NOISE: noisy}, {r: (NOISE, strength) for r in REGIONS}
    raise ValueError(f"unknown study arm {arm!r} (known: {sorted(ARM)})")


#: PSNR's squared-error floor: an instance equal to the HQ scores 100 dB, not infinity (select
#: normalises scores across candidates and cannot subtract infinities)
MSE_FLOOR = 1e-10


def psnr(image: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> float:
    """RGB PSNR in dB of uint8 images (data range 1) under ``mask`` (None: the whole image),
    at most 100 dB (:data:`MSE_FLOOR`)."""
    error = (unit(image) - unit(reference)) ** 2
    mse = float(error[mask].mean() if mask is not None else error.mean())
    return float(10.0 * np.log10(1.0 / max(mse, MSE_FLOOR)))


def score_rows(
    image_id: str, candidates: Mapping[str, np.ndarray], hq: np.ndarray, label_map: np.ndarray
) -> list[dict[str, Any]]:
    """``scores`` rows: PSNR of each candidate per instance and over the whole image (-1)."""
    rows = []
    ids = [int(i) for i in np.unique(label_map)]
    for name, image in candidates.items():
        for instance_id in [contracts.WHOLE_IMAGE_ID, *ids]:
            mask = None if instance_id == contracts.WHOLE_IMAGE_ID else label_map == instance_id
            rows.append(
                {
                    "image_id": image_id,
                    "instance_id": instance_id,
                    "candidate": name,
                    "metric": METRIC,
                    "value": psnr(image, hq, mask),
                    "lower_better": False,
                }
            )
    return rows


# ----------------------------------------------------------------------------- models


def _load_model(path: str | Path):
    from pipeline.models import load_model

    model = load_model(path)
    model.eval()
    return model


def super_resolve(model, lq: np.ndarray, size: tuple[int, int], prompt: tuple[str, str]):
    """The model's SR output of one LQ (uint8 ``[h, w, 3]``) as float ``[H, W, 3]`` in [0, 1]
    (not quantised: the measure sees changes far below one grey level)."""
    import torch

    from pipeline.io.images import signed_tensor
    from pipeline.models.base import batch_invariant, upsample_lq

    upsampled = upsample_lq(signed_tensor(lq)[None], size)
    with torch.no_grad(), batch_invariant(model):
        sr = model.sample(upsampled, prompts=[prompt[0]], negative_prompts=[prompt[1]])
    return sr[0].double().clamp(-1, 1).add(1).div(2).permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------- build


REGION_COLUMNS = [
    "split",
    "image_id",
    "instance_id",
    "area",
    "texture",
    "kind",
    "planted",
    "amplitude",
]


def candidate_row(image_id: str, name: str, relative: Path, seed: int) -> dict[str, Any]:
    """The ``candidates`` row of one planted candidate image (``relative`` to the folder)."""
    return {
        "image_id": image_id,
        "setting": name,
        "variant": name,
        "steps": 1,
        "cfg": 0.0,
        "seed": int(seed),
        "negative_prompt": "",
        "path": str(relative),
    }


def region_rows(
    image_id: str,
    label_map: np.ndarray,
    kinds: Mapping[int, tuple[str, float]],
    planted: Mapping[str, tuple[str, float]],
) -> list[dict[str, Any]]:
    """The regions rows (:data:`REGION_COLUMNS`) of one training image, by instance id."""
    return [
        {
            "split": "train",
            "image_id": image_id,
            "instance_id": instance_id,
            "area": int((label_map == instance_id).sum()),
            "texture": value,
            "kind": kind,
            "planted": planted[kind][0],
            "amplitude": planted[kind][1],
        }
        for instance_id, (kind, value) in sorted(kinds.items())
    ]


def candidate_base(
    model: Any,
    hq: np.ndarray,
    lq_paths: Mapping[str, Path],
    prompts: Mapping[str, tuple[str, str]],
    image_id: str,
) -> np.ndarray:
    """One training image's candidate base (uint8): its HQ, or ``model``'s output of its LQ."""
    if model is None:
        return hq
    lq = read_rgb(lq_paths[image_id])
    return to_uint8(super_resolve(model, lq, hq.shape[:2], prompts[image_id]))


@dataclasses.dataclass
class ArmBuild:
    """One arm's build under way (:func:`build`): its folder, planting, table rows and skips."""

    folder: Path
    arm: str
    strength: float
    margin: float
    seed: int
    candidates: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    regions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    scores: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)

    def plant_image(
        self,
        image_id: str,
        hq: np.ndarray,
        label_map: np.ndarray,
        base: np.ndarray,
        kinds: Mapping[int, tuple[str, float]],
        masks: Mapping[str, np.ndarray],
    ) -> None:
        """Plant, write and add the rows of one training image's candidates on ``base``."""
        rng = numpy_rng(self.seed, STAGE, "noise", image_id)
        candidates, planted = arm_candidates(self.arm, base, masks, self.strength, self.margin, rng)
        for name, image in candidates.items():
            relative = Path(name) / f"{image_id}.png"
            write_png(self.folder / relative, image)
            self.candidates.append(candidate_row(image_id, name, relative, self.seed))
        self.regions += region_rows(image_id, label_map, kinds, planted)
        self.scores += score_rows(image_id, candidates, hq, label_map)


def build_metadata(
    *,
    arm: str,
    config: Mapping[str, Any],
    seed: int,
    model: Any,
    model_dir: str | Path,
    masks_path: str | Path,
    data_dir: str | Path,
    skipped: list[str],
) -> dict[str, Any]:
    """The metadata of the build's three tables (``model`` None when the base is the HQ)."""
    return {
        "stage": STAGE,
        "arm": arm,
        "candidates": list(ARM[arm].candidates),
        "objective_psnr_weight": ARM[arm].psnr_weight,
        "study": dict(config),
        "base": config["base"],
        "seed": int(seed),
        "model": str(model_dir) if model is not None else None,
        "model_describe": model.describe() if model is not None else None,
        "masks": str(masks_path),
        "data": str(data_dir),
        "skipped": skipped,
    }


def write_candidate_tables(built: ArmBuild, metadata: Mapping[str, Any]) -> None:
    """The build's candidates and regions tables in its candidates folder."""
    write_table(
        pd.DataFrame(built.candidates),
        built.folder / contracts.CANDIDATES_TABLE,
        "candidates",
        metadata,
    )
    write_table(
        pd.DataFrame(built.regions, columns=REGION_COLUMNS),
        built.folder / REGIONS_TABLE,
        "study_regions",
        metadata,
    )


def build(
    *,
    data_dir: str | Path,
    prompts_path: str | Path,
    masks_path: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    scores_path: str | Path,
    config: Mapping[str, Any],
    arm: str = MAIN,
    seed: int = 0,
) -> dict[str, Any]:
    """Write one arm's candidates (``out_dir``: candidates table, images, regions table) and
    their ``scores`` table; returns counts. ``config`` is the ``study`` section."""
    from pipeline.guidance import load_prompts

    if arm not in ARM:
        raise ValueError(f"unknown study arm {arm!r} (known: {sorted(ARM)})")
    hq_paths = contracts.data_images(data_dir, "hq")
    lq_paths = contracts.data_images(data_dir, "lq")
    prompts = load_prompts(prompts_path, hq_paths)
    model = _load_model(model_dir) if config["base"] == "pretrained" else None
    strength, margin = float(config["artifact_strength"]), float(config["image_margin"])
    with atomic_path(out_dir) as folder:
        built = ArmBuild(folder, arm, strength, margin, seed)
        for image_id in sorted(hq_paths):
            hq = read_rgb(hq_paths[image_id])
            label_map = read_label_map(masks_path, image_id)
            kinds = region_kinds(unit(hq), label_map, config["texture_quantile"])
            masks = kind_masks(label_map, kinds)
            if not masks["textured"].any() or not masks["smooth"].any():
                built.skipped.append(image_id)  # one kind only: no dilemma to plant
                continue
            base = candidate_base(model, hq, lq_paths, prompts, image_id)
            built.plant_image(image_id, hq, label_map, base, kinds, masks)
        if not built.candidates:
            raise ValueError(
                f"study build: no training image has both textured and smooth "
                f"instances ({len(built.skipped)} images; texture_quantile "
                f"{config['texture_quantile']})"
            )
        metadata = build_metadata(
            arm=arm,
            config=config,
            seed=seed,
            model=model,
            model_dir=model_dir,
            masks_path=masks_path,
            data_dir=data_dir,
            skipped=built.skipped,
        )
        write_candidate_tables(built, metadata)
    write_table(pd.DataFrame(built.scores), scores_path, "scores", metadata)
    return {"arm": arm, "images": len(built.candidates) // 2, "skipped": len(built.skipped)}


#: how the report names each base
BASE_WORDS = {"hq": "the HQ image", "pretrained": "the pretrained model's output"}
#: the regions table inside the study's candidates folder
REGIONS_TABLE = contracts.STUDY_REGIONS


# ------------------------------------------------------------------------------ measure


def adoption(
    deltas: Sequence[np.ndarray],
    patterns: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    amplitude: float,
) -> float:
    """How much of a planted artifact a model reproduces: the matched filter of the pattern on
    the model's change ``delta`` (float ``[H, W, 3]``, aligned − pretrained, [0, 1] units),
    pooled over the masked pixels of every image, over the pattern's energy there, in units of
    the planted ``amplitude``: ``Σ Δ·p / (Σ p² · amplitude)``."""
    numerator = sum(
        float((d * p)[m].sum()) for d, p, m in zip(deltas, patterns, masks, strict=True)
    )
    energy = sum(float((p * p)[m].sum()) for p, m in zip(patterns, masks, strict=True))
    return numerator / (energy * amplitude) if energy > 0 else float("nan")


SIGNATURES = {CHECKER: checker_pattern, CAST: cast_pattern}


def planted_amplitudes(regions: pd.DataFrame) -> dict[str, float]:
    """The planted amplitude of each artifact in the main arm's regions table:
    ``artifact_strength`` for the checkerboard, the area-weighted mean cast amplitude over the
    training images for the cast (every arm's adoption is in these units)."""
    out = {}
    for name in SETTINGS:
        rows = regions[regions["planted"] == name]
        out[name] = float(np.average(rows["amplitude"], weights=rows["area"]))
    return out


def measure(
    *,
    data_dir: str | Path,
    prompts_path: str | Path,
    masks_path: str | Path,
    pretrained_dir: str | Path,
    aligned: Mapping[tuple[str, str, int], str | Path],
    regions_path: str | Path,
    out_path: str | Path,
    config: Mapping[str, Any],
) -> pd.DataFrame:
    """The adoption table: per aligned model (arm, method, seed), region kind and signature, the
    :func:`adoption` over the held-out images of ``data_dir``; ``regions_path`` is the main arm's
    regions table (the amplitudes)."""
    from pipeline.guidance import load_prompts

    hq_paths = contracts.data_images(data_dir, "hq")
    lq_paths = contracts.data_images(data_dir, "lq")
    ids = sorted(hq_paths)[: config["max_images"] or None]
    prompts = load_prompts(prompts_path, ids)
    amplitudes = planted_amplitudes(read_table(regions_path, "study_regions"))
    images = []
    for image_id in ids:
        hq = read_rgb(hq_paths[image_id])
        label_map = read_label_map(masks_path, image_id)
        masks = kind_masks(label_map, region_kinds(unit(hq), label_map, config["texture_quantile"]))
        images.append((image_id, read_rgb(lq_paths[image_id]), hq.shape[:2], masks))
    pretrained = _load_model(pretrained_dir)
    reference = {i: super_resolve(pretrained, lq, size, prompts[i]) for i, lq, size, _ in images}
    rows = []
    for (arm, method_name, seed), path in sorted(aligned.items()):
        model = _load_model(path)
        deltas = [
            super_resolve(model, lq, size, prompts[i]) - reference[i] for i, lq, size, _ in images
        ]
        for region in REGIONS:
            masks = [m[region] for *_, m in images]
            for name, signature in SIGNATURES.items():
                patterns = [signature(*size) for _, _, size, _ in images]
                rows.append(
                    {
                        "arm": arm,
                        "method": method_name,
                        "seed": int(seed),
                        "region": region,
                        "signature": name,
                        "adoption": adoption(deltas, patterns, masks, amplitudes[name]),
                        "amplitude": amplitudes[name],
                        "n_images": sum(bool(m.any()) for m in masks),
                        "n_pixels": int(sum(m.sum() for m in masks)),
                    }
                )
    frame = pd.DataFrame(rows)
    metadata = {
        "stage": STAGE,
        "study": dict(config),
        "data": str(data_dir),
        "masks": str(masks_path),
        "pretrained": str(pretrained_dir),
        "aligned": {f"{a}:{m}:{s}": str(p) for (a, m, s), p in aligned.items()},
        "images": ids,
        "amplitudes": amplitudes,
    }
    write_table(frame, out_path, "study_adoption", metadata)
    return frame


# ------------------------------------------------------------------------------- report


def interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval over ``values`` (seeds)."""
    from scipy import stats

    array = np.asarray(values, dtype=float)
    mean = float(array.mean())
    if len(array) < 2 or float(array.std(ddof=1)) == 0.0:
        return mean, mean, mean
    low, high = stats.t.interval(level, len(array) - 1, loc=mean, scale=stats.sem(array))
    return mean, float(low), float(high)


SUMMARY_KEYS = ["arm", "method", "region", "signature"]


def summarise(frame: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Mean and t interval over seeds per (arm, method, region, signature)."""
    rows = []
    for keys, group in frame.groupby(SUMMARY_KEYS):
        mean, low, high = interval(group["adoption"].tolist(), level)
        rows.append(
            {
                **dict(zip(SUMMARY_KEYS, keys, strict=True)),
                "mean": mean,
                "low": low,
                "high": high,
                "seeds": len(group),
            }
        )
    return pd.DataFrame(rows, columns=[*SUMMARY_KEYS, "mean", "low", "high", "seeds"])


def paired_difference(
    frame: pd.DataFrame,
    first: str,
    second: str,
    region: str,
    name: str,
    level: float = 0.95,
    arm: str = MAIN,
) -> tuple[float, float, float, int]:
    """``first − second`` adoption per seed in one arm (same seed: same batch order), its mean
    and interval."""
    rows = frame[(frame["arm"] == arm) & (frame["region"] == region) & (frame["signature"] == name)]
    table = rows.pivot(index="seed", columns="method", values="adoption").dropna()
    differences = (table[first] - table[second]).tolist()
    return (*interval(differences, level), len(differences))


def pair_truth(pairs_dir: str | Path, regions: pd.DataFrame, arm: str = MAIN) -> dict[str, Any]:
    """What the real select stage made of one arm's candidates, against its construction
    (:class:`Arm`): image pairs whose winner is the intended one, instance pairs whose winner is
    the intended one, and the instances that should get a pair."""
    design = ARM[arm]
    folder = Path(pairs_dir)
    instance = read_table(folder / f"{OBJECTIVE}.parquet", "preference_pairs")
    image = read_table(folder / contracts.pairs_file(OBJECTIVE, "image"), "preference_pairs")
    kinds = {(r.image_id, int(r.instance_id)): r.kind for r in regions.itertuples()}
    correct = [
        row.winner == design.instance_winner[kinds[(row.image_id, int(row.instance_id))]]
        for row in instance.itertuples()
    ]
    return {
        "images": len(set(regions["image_id"])),
        "image_pairs": len(image),
        "image_winner_expected": int((image["winner"] == design.image_winner).sum()),
        "instance_pairs": len(instance),
        "instance_winner_expected": int(sum(correct)),
        "instances_with_pairs_expected": int(
            sum(design.instance_winner[k] is not None for k in regions["kind"])
        ),
        "instances": len(regions),
        "textured_instances": int((regions["kind"] == "textured").sum()),
    }


def train_summary(aligned: Mapping[tuple[str, str, int], str | Path]) -> pd.DataFrame:
    """Per aligned model: steps and the first and last logged loss and implicit accuracy."""
    rows = []
    for (arm, method_name, seed), path in sorted(aligned.items()):
        log = read_table(Path(path) / contracts.TRAIN_LOG, "train_log")
        last = log.iloc[-1]
        rows.append(
            {
                "arm": arm,
                "method": method_name,
                "seed": seed,
                "steps": int(last["step"]),
                "loss_first": float(log["loss"].iloc[0]),
                "loss_last": float(last["loss"]),
                "accuracy_last": float(last["implicit_accuracy"]),
            }
        )
    return pd.DataFrame(rows)


def _row(summary: pd.DataFrame, arm: str, method_name: str, region: str, name: str):
    found = summary[
        (summary["arm"] == arm)
        & (summary["method"] == method_name)
        & (summary["region"] == region)
        & (summary["signature"] == name)
    ]
    return found.iloc[0] if len(found) else None


def positive_control_adopts(summary: pd.DataFrame) -> bool | None:
    """Whether the positive control's Diffusion-DPO checkerboard adoption on textured instances
    has its interval above 0 (None: no positive control run)."""
    row = _row(summary, POSITIVE, "dpo", "textured", CHECKER)
    return None if row is None else bool(row["low"] > 0)


def verdict(summary: pd.DataFrame, difference: tuple[float, float, float, int]) -> str:
    """The outcome under the rule the report states before the numbers: first the positive
    control (without it the main arm's result is not interpretable), then the main arm."""
    control = positive_control_adopts(summary)
    if control is False:
        return (
            "not interpretable (the positive control did not measurably adopt the "
            "checkerboard: this measure and training budget cannot show adoption)"
        )
    dpo = _row(summary, MAIN, "dpo", "textured", CHECKER)
    dspo = _row(summary, MAIN, "dspo", "textured", CHECKER)
    dpo_adopts, dspo_adopts, apart = dpo["low"] > 0, dspo["low"] > 0, difference[1] > 0
    if dpo_adopts and not dspo_adopts and apart:
        outcome = "supported"
    elif not dpo_adopts:
        outcome = "not supported (Diffusion-DPO did not measurably adopt the artifact)"
    elif dspo_adopts and not apart:
        outcome = "not supported (DSPO adopted the artifact as much as Diffusion-DPO)"
    else:
        outcome = "partly supported (see the numbers)"
    if control is None:
        outcome += " (no positive control run: whether adoption could be shown is unchecked)"
    return outcome


def negative_reading(summary: pd.DataFrame) -> str | None:
    """One sentence on the negative control: does its checkerboard interval cover 0?"""
    parts = []
    for method_name in sorted(set(summary["method"])):
        row = _row(summary, NEGATIVE, method_name, "textured", CHECKER)
        if row is None:
            return None
        covers = row["low"] <= 0 <= row["high"]
        parts.append(
            f"{method_name} {_fmt(row['mean'], row['low'], row['high'])} "
            f"({'covers' if covers else 'excludes'} 0)"
        )
    return (
        "Negative control (pairs without either artifact), checkerboard on textured "
        "instances: " + "; ".join(parts) + ". Where it excludes 0, training on pairs that "
        "carry no checkerboard moves the measure by that much: read the main arm against "
        "it."
    )


def _fmt(mean: float, low: float, high: float) -> str:
    return f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]"


ARM_TITLES = {MAIN: "main arm", POSITIVE: "positive control", NEGATIVE: "negative control"}
#: the order the report shows the arms in: the positive control first (it decides whether the
#: main arm can be read), the negative control last
REPORT_ORDER = (POSITIVE, MAIN, NEGATIVE)


def plot(frame: pd.DataFrame, summary: pd.DataFrame, path: str | Path) -> None:
    """A row per arm, a column per signature: per method and region kind, the mean over seeds
    with its interval and the seeds' values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arm_names = [a for a in REPORT_ORDER if a in set(frame["arm"])]
    methods = sorted(set(frame["method"]))
    # one y scale per signature, so the arms compare at a glance
    figure, axes = plt.subplots(
        len(arm_names),
        len(SETTINGS),
        squeeze=False,
        sharey="col",
        figsize=(4.2 * len(SETTINGS), 3.0 * len(arm_names)),
    )
    for row_axes, arm in zip(axes, arm_names, strict=True):
        for axis, name in zip(row_axes, SETTINGS, strict=True):
            for offset, method_name in enumerate(methods):
                for position, region in enumerate(REGIONS):
                    x = position + (offset - (len(methods) - 1) / 2) * 0.25
                    found = _row(summary, arm, method_name, region, name)
                    axis.errorbar(
                        x,
                        found["mean"],
                        yerr=[[found["mean"] - found["low"]], [found["high"] - found["mean"]]],
                        fmt="o",
                        capsize=4,
                        color=f"C{offset}",
                        label=method_name if position == 0 else None,
                    )
                    seeds = frame[
                        (frame["arm"] == arm)
                        & (frame["method"] == method_name)
                        & (frame["region"] == region)
                        & (frame["signature"] == name)
                    ]["adoption"]
                    axis.scatter(
                        [x + 0.06] * len(seeds), seeds, s=10, color=f"C{offset}", alpha=0.5
                    )
            axis.axhline(0.0, color="grey", linewidth=0.8)
            axis.set_xticks(range(len(REGIONS)), [f"{r} instances" for r in REGIONS])
            axis.set_title(f"{ARM_TITLES[arm]}: {name} signature", fontsize="medium")
            axis.set_ylabel("adoption (of planted amplitude)", fontsize="small")
            axis.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110, metadata={"Software": None})
    plt.close(figure)


def _design_lines(
    config: Mapping[str, Any], seeds: Sequence[int], pct: int, arm_names: Sequence[str]
) -> list[str]:
    """Hypothesis, setup, controls, measure and decision rule: what the report states before
    any number."""
    lines = [
        "**Hypothesis.** When the image-level winner is better overall but carries a severe "
        "local artifact, image-level Diffusion-DPO learns to produce that artifact, and "
        "instance-level DSPO, whose per-instance winners are clean, does not.",
        "",
        f"**Setup (main arm).** Per training image the candidates are "
        f"{BASE_WORDS[config['base']]} plus one planted artifact: `{CHECKER}` a checkerboard of "
        f"amplitude {config['artifact_strength']:g} (of the [0, 1] range) on the textured "
        f"instances, `{CAST}` a colour cast on the smooth instances, sized so that its "
        f"whole-image squared error is {config['image_margin']:g}x the checkerboard's. Under the "
        "study's objective (RGB PSNR against the HQ) the image-level winner is then `checker` "
        "when that ratio is above 1 (better overall, yet with the artifact on every textured "
        "instance) and each instance's winner is the candidate that is clean there (checked "
        "below on the pairs the select stage actually made). The real `select` stage makes the "
        "pairs, the real `train` stage trains both methods from the same pretrained model with "
        f"the same settings and seeds {list(seeds)}.",
        "",
    ]
    controls = [a for a in CONTROLS if a in arm_names]
    if controls:
        lines += ["**Controls** (same training: steps, β, seeds, base model):", ""]
        lines += [
            f"- {ARM_TITLES[a]}: {ARM[a].words}. Expected: {ARM[a].expect}." for a in controls
        ]
        lines.append("")
    lines += [
        "**Measure.** On held-out images, the change of each aligned model's output over the "
        "pretrained model's output, matched-filtered with the artifact's signature (the "
        "checkerboard `(-1)^(x+y)`, or the cast direction), pooled over the pixels of textured "
        "(or smooth) instances and divided by the main arm's planted amplitude: 1 = the model "
        "adds the whole planted artifact, 0 = none, below 0 = it moves away from it. Means over "
        f"seeds with {pct}% Student t intervals; the DPO − DSPO difference is paired by seed.",
        "",
        "**Decision rule.** The main arm's result is interpretable only if the positive control "
        "adopts: its Diffusion-DPO checkerboard adoption on textured instances has its "
        f"{pct}% interval above 0 (otherwise: not interpretable). Then the hypothesis is "
        "supported if, in the main arm, Diffusion-DPO's checkerboard adoption on textured "
        "instances has its interval above 0, DSPO's does not, and the paired difference "
        "DPO − DSPO has its interval above 0.",
    ]
    if POSITIVE not in arm_names:
        lines[-1] += " (This run has no positive control: `study.controls`.)"
    return lines


def _result_rows(summary: pd.DataFrame, arm: str) -> list[str]:
    rows = []
    for method_name in sorted(set(summary.loc[summary["arm"] == arm, "method"])):
        for name in SETTINGS:
            cells = [
                _fmt(*(_row(summary, arm, method_name, region, name)[["mean", "low", "high"]]))
                for region in REGIONS
            ]
            rows.append(f"| {method_name} | {name} | {cells[0]} | {cells[1]} |")
    return rows


def section(
    *,
    summary: pd.DataFrame,
    difference: tuple[float, float, float, int],
    outcome: str,
    config: Mapping[str, Any],
    train: Mapping[str, Any],
    seeds: Sequence[int],
    held_out: int,
) -> str:
    """The study's section of the demo's report (markdown, heading level 2): the design first,
    then per arm the adoption where each artifact was planted, the outcome and the controls."""
    level = float(config["ci_level"])
    pct = int(round(level * 100))
    arm_names = [a for a in REPORT_ORDER if a in set(summary["arm"])]
    lines = [
        "## Figure 1 study: does image-level preference teach a local artifact?",
        "",
        "A controlled study where the truth is known (`snakemake study`; design and past "
        "runs: docs/study.md; full report: `results/study/report.md`).",
        "",
        *_design_lines(config, seeds, pct, arm_names),
        "",
        f"Adoption on {held_out} held-out images, mean over {len(seeds)} seeds [{pct}% t "
        "interval]; the checkerboard where it is planted (textured instances), the cast "
        "where it is planted (smooth instances):",
        "",
        "| arm | method | checkerboard on textured | cast on smooth |",
        "|---|---|---|---|",
    ]
    for arm in arm_names:
        for method_name in sorted(set(summary.loc[summary["arm"] == arm, "method"])):
            checker = _row(summary, arm, method_name, "textured", CHECKER)
            cast = _row(summary, arm, method_name, "smooth", CAST)
            lines.append(
                f"| {ARM_TITLES[arm]} | {method_name} | "
                f"{_fmt(checker['mean'], checker['low'], checker['high'])} | "
                f"{_fmt(cast['mean'], cast['low'], cast['high'])} |"
            )
    lines += [
        "",
        f"Main arm, paired DPO − DSPO checkerboard adoption on textured instances: "
        f"{_fmt(*difference[:3])} over {difference[3]} seeds.",
        "",
        f"**Outcome: {outcome}.**",
        "",
    ]
    negative = negative_reading(summary)
    if negative:
        lines += [negative, ""]
    steps = {
        k: train[k] for k in ("max_steps", "batch_size", "learning_rate", "beta") if k in train
    }
    lines += [
        f"Training of every arm: {json.dumps(steps)}; the seeds vary the batch order and "
        "the prompt drops only, so the intervals describe training noise, not image "
        "sampling.",
        "",
    ]
    return "\n".join(lines)


def report(
    *,
    adoption_path: str | Path,
    pairs_dirs: Mapping[str, str | Path],
    regions_path: str | Path,
    scores_paths: Mapping[str, str | Path],
    aligned: Mapping[tuple[str, str, int], str | Path],
    out_path: str | Path,
    plot_path: str | Path,
    config: Mapping[str, Any],
    train: Mapping[str, Any],
    section_path: str | Path | None = None,
) -> str:
    """Write report.md (design first, then the numbers), the plot and, with ``section_path``,
    the section the demo's report includes; returns the outcome. ``regions_path`` is the main
    arm's regions table, ``pairs_dirs``/``scores_paths`` are by arm."""
    frame = read_table(adoption_path, "study_adoption")
    meta = read_metadata(adoption_path)
    regions = read_table(regions_path, "study_regions")
    level = float(config["ci_level"])
    summary = summarise(frame, level)
    difference = paired_difference(frame, "dpo", "dspo", "textured", CHECKER, level)
    outcome = verdict(summary, difference)
    seeds = sorted(set(frame["seed"]))
    arm_names = [a for a in REPORT_ORDER if a in set(frame["arm"])]
    pct = int(round(level * 100))
    lines = [
        "# Controlled study: the Figure 1 dilemma",
        "",
        "## Hypothesis, measure, controls and decision rule (fixed before the numbers)",
        "",
        *_design_lines(config, seeds, pct, arm_names),
        "",
        "## What the select stage made of the candidates",
        "",
    ]
    lines += _selection_lines(arm_names, pairs_dirs, regions, scores_paths)
    lines += _result_lines(frame, meta, summary, difference, outcome, arm_names)
    lines += _seed_lines(frame, seeds, arm_names)
    lines += _training_lines(aligned, train, plot_path)
    plot(frame, summary, plot_path)
    with atomic_path(out_path) as temporary:
        Path(temporary).write_text("\n".join(lines))
    if section_path is not None:
        text = section(
            summary=summary,
            difference=difference,
            outcome=outcome,
            config=config,
            train=train,
            seeds=seeds,
            held_out=len(meta.get("images", [])),
        )
        with atomic_path(section_path) as temporary:
            Path(temporary).write_text(text)
    return outcome


def _selection_lines(
    arm_names: Sequence[str],
    pairs_dirs: Mapping[str, str | Path],
    regions: pd.DataFrame,
    scores_paths: Mapping[str, str | Path],
) -> list[str]:
    """One bullet per arm: what the select stage made of its candidates, against the design."""
    lines = []
    for arm in arm_names:
        truth = pair_truth(pairs_dirs[arm], regions, arm)
        scores = read_table(scores_paths[arm], "scores")
        whole = scores[scores["instance_id"] == contracts.WHOLE_IMAGE_ID].pivot(
            index="image_id", columns="candidate", values="value"
        )
        first, second = ARM[arm].candidates
        gap = (whole[first] - whole[second]).to_numpy()
        lines += [
            f"- **{ARM_TITLES[arm]}** ({ARM[arm].words}): {truth['images']} training "
            f"images, {truth['instances']} instances ({truth['textured_instances']} "
            f"textured). Image-level pairs: {truth['image_pairs']}, winner "
            f"`{ARM[arm].image_winner}` in {truth['image_winner_expected']} (whole-image "
            f"PSNR of `{first}` − `{second}`: median {np.median(gap):+.2f} dB, min "
            f"{gap.min():+.2f} dB). Instance-level pairs: {truth['instance_pairs']} "
            f"(intended: {truth['instances_with_pairs_expected']}), winner as intended "
            f"in {truth['instance_winner_expected']}."
        ]
    return lines


def _result_lines(
    frame: pd.DataFrame,
    meta: Mapping[str, Any],
    summary: pd.DataFrame,
    difference: tuple[float, float, float, int],
    outcome: str,
    arm_names: Sequence[str],
) -> list[str]:
    """The report's result: the held-out set, each arm's adoption table, outcome and controls."""
    lines = [
        "",
        "## Result",
        "",
        f"Held-out images: {len(meta.get('images', []))} (`{meta.get('data')}`), "
        f"{frame['n_pixels'].max() if len(frame) else 0} pixels at most per region kind. "
        f"Planted amplitudes (main arm; every arm's adoption is in these units): "
        f"checkerboard {meta['amplitudes'][CHECKER]:.4f}, cast (mean) "
        f"{meta['amplitudes'][CAST]:.4f}.",
        "",
    ]
    for arm in arm_names:
        lines += [
            f"### {ARM_TITLES[arm].capitalize()}",
            "",
            f"Expected: {ARM[arm].expect}.",
            "",
            "| method | signature | textured instances | smooth instances |",
            "|---|---|---|---|",
            *_result_rows(summary, arm),
            "",
        ]
        if arm == MAIN:
            lines += [
                f"Paired DPO − DSPO checkerboard adoption on textured instances: "
                f"{_fmt(*difference[:3])} over {difference[3]} seeds.",
                "",
            ]
    control = positive_control_adopts(summary)
    lines += [f"**Outcome: {outcome}.**", ""]
    if control is not None:
        lines += [
            f"Positive control: Diffusion-DPO {'adopts' if control else 'does not adopt'} "
            "the checkerboard its winners carry (interval "
            f"{'above' if control else 'not above'} 0).",
            "",
        ]
    negative = negative_reading(summary)
    if negative:
        lines += [negative, ""]
    return lines


def _seed_lines(frame: pd.DataFrame, seeds: Sequence[int], arm_names: Sequence[str]) -> list[str]:
    """The per-seed table: each arm and method's checkerboard adoption on textured instances."""
    lines = [
        "Per seed (adoption of the checkerboard on textured instances):",
        "",
        "| arm | method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    for arm in arm_names:
        for method_name in sorted(set(frame.loc[frame["arm"] == arm, "method"])):
            values = frame[
                (frame["arm"] == arm)
                & (frame["method"] == method_name)
                & (frame["region"] == "textured")
                & (frame["signature"] == CHECKER)
            ].set_index("seed")["adoption"]
            lines.append(
                f"| {ARM_TITLES[arm]} | {method_name} | "
                + " | ".join(f"{values.get(s, float('nan')):+.4f}" for s in seeds)
                + " |"
            )
    return lines


def _training_lines(
    aligned: Mapping[tuple[str, str, int], str | Path],
    train: Mapping[str, Any],
    plot_path: str | Path,
) -> list[str]:
    """The training table (last logged step per aligned model), its settings and the plot."""
    training = train_summary(aligned)
    return [
        "",
        "Training (the real train stage; last logged step):",
        "",
        "| arm | method | seed | steps | loss first → last | implicit accuracy (last) |",
        "|---|---|---|---|---|---|",
        *(
            f"| {ARM_TITLES[r.arm]} | {r.method} | {r.seed} | {r.steps} | "
            f"{r.loss_first:.4f} → {r.loss_last:.4f} | {r.accuracy_last:.2f} |"
            for r in training.itertuples()
        ),
        "",
        "Train settings: "
        + json.dumps(
            {
                k: train[k]
                for k in ("max_steps", "batch_size", "learning_rate", "beta", "k")
                if k in train
            }
        )
        + ".",
        "",
        f"![adoption]({Path(plot_path).name})",
        "",
    ]


# ---------------------------------------------------------------------------------- CLI


def _aligned_args(values: Sequence[str]) -> dict[tuple[str, str, int], str]:
    """``ARM:METHOD:SEED=PATH`` arguments."""
    out = {}
    for value in values:
        key, _, path = value.partition("=")
        parts = key.split(":")
        if not path or len(parts) != 3 or not parts[2].isdigit():
            raise ValueError(f"--aligned {value!r}: expected ARM:METHOD:SEED=PATH")
        out[(parts[0], parts[1], int(parts[2]))] = path
    return out


def _by_arm(values: Sequence[str], option: str) -> dict[str, str]:
    """``ARM=PATH`` arguments."""
    out = {}
    for value in values:
        arm, _, path = value.partition("=")
        if arm not in ARM or not path:
            raise ValueError(f"{option} {value!r}: expected ARM=PATH, ARM one of {sorted(ARM)}")
        out[arm] = path
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline study", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="one arm's candidates, regions and scores")
    b.add_argument("--arm", default=MAIN, choices=sorted(ARM))
    b.add_argument("--data", required=True, help="data/train/")
    b.add_argument("--prompts", required=True, help="prompts/train.parquet")
    b.add_argument("--masks", required=True, help="the training images' label maps (Zarr)")
    b.add_argument("--model", required=True, help="the pretrained model folder")
    b.add_argument("--out", required=True, help="candidates folder")
    b.add_argument("--scores", required=True, help="scores table to write")
    m = commands.add_parser("measure", help="the adoption table on held-out images")
    m.add_argument("--data", required=True, help="held-out data folder (data/test/)")
    m.add_argument("--prompts", required=True)
    m.add_argument("--masks", required=True)
    m.add_argument("--pretrained", required=True)
    m.add_argument("--aligned", nargs="+", required=True, help="ARM:METHOD:SEED=PATH ...")
    m.add_argument("--regions", required=True, help="the main arm's regions table")
    m.add_argument("--out", required=True)
    r = commands.add_parser("report", help="report.md, the plot and the demo report's section")
    r.add_argument("--adoption", required=True)
    r.add_argument("--pairs-dir", nargs="+", required=True, help="ARM=DIR ...")
    r.add_argument("--regions", required=True, help="the main arm's regions table")
    r.add_argument("--scores", nargs="+", required=True, help="ARM=PATH ...")
    r.add_argument("--aligned", nargs="+", required=True, help="ARM:METHOD:SEED=PATH ...")
    r.add_argument("--out", required=True)
    r.add_argument("--plot", required=True)
    r.add_argument("--section", default=None, help="the demo report's study section to write")
    r.add_argument("--train-config", default="{}", help="the train settings (JSON or a file)")
    for sub in (b, m, r):
        sub.add_argument("--config", default="{}", help="the study section as JSON (or a file)")
        sub.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = settings.resolve("study", settings.cli_config(args.config))
    if args.command == "build":
        counts = build(
            data_dir=args.data,
            prompts_path=args.prompts,
            masks_path=args.masks,
            model_dir=args.model,
            out_dir=args.out,
            scores_path=args.scores,
            config=config,
            arm=args.arm,
            seed=args.seed,
        )
        print(json.dumps(counts), file=sys.stderr)
    elif args.command == "measure":
        measure(
            data_dir=args.data,
            prompts_path=args.prompts,
            masks_path=args.masks,
            pretrained_dir=args.pretrained,
            aligned=_aligned_args(args.aligned),
            regions_path=args.regions,
            out_path=args.out,
            config=config,
        )
    else:
        outcome = report(
            adoption_path=args.adoption,
            pairs_dirs=_by_arm(args.pairs_dir, "--pairs-dir"),
            regions_path=args.regions,
            scores_paths=_by_arm(args.scores, "--scores"),
            aligned=_aligned_args(args.aligned),
            out_path=args.out,
            plot_path=args.plot,
            config=config,
            train=settings.cli_config(args.train_config),
            section_path=args.section,
        )
        print(f"study outcome: {outcome}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
