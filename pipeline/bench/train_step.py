"""Time one preference-training step per method, interleaved, and the memory it saves for backward.

``python -m pipeline bench train-step [--framework multistep] [--size 64] [--instances 5]
[--candidates 4] [--batch 4] [--methods dspo naive dpo sft dro dspo_two_pass] [--train-methods
dspo dpo sft dro dro_online ddpo gdpo gdpo_instance] [--train-steps 2] [--policy-steps 4]
[--group-size 4] [--repeats 3] [--threads 1] [--check]`` prints one JSON object. The
``--methods`` rows time the loss, backward and AdamW step on in-memory batches, on the same
seeded LQs and draws:

- ``dspo``: forward policy + reference over each LQ's distinct candidates, pooled per instance,
  backward, AdamW step (:func:`pipeline.training.step.batch_loss`);
- ``naive``: the same loss with one policy and one reference forward per instance
  (:func:`instance_loop_loss`);
- ``dpo``: a Diffusion-DPO step on the same LQs (one winner/loser pair each);
- ``dro``: the DRO loss on DSPO's instance pairs; ``sft``: the winner only, no reference;
- ``dspo_two_pass``: DSPO with ``train.memory: two_pass`` (pass 1 without gradients, then one
  candidate per LQ at a time with gradients; :mod:`pipeline.training.step`).

One step of each method per round, rounds interleaved (:mod:`pipeline.bench.timing`).
``seconds`` gives each method's min / median / IQR / range; ``ratios`` are per-round ratios.
``saved_for_backward_bytes``: peak bytes of the distinct storages autograd holds during one
step (:func:`pipeline.bench.timing.saved_tensor_peak`, the model's parameters not counted).

Targets (``--check`` exits 1 if one fails), on the per-round ratios' medians, at M = 5, N = 4:

- ``naive_over_dspo >= 3``: the shared forwards are at least 3x faster than the naive loop;
- ``dspo_over_scaled_dpo <= 1.1``: a DSPO step costs at most 1.1 x (distinct candidates / 2)
  DPO steps (DSPO forwards every distinct candidate, DPO two);
- ``two_pass_over_one_pass <= 1.6``: the two-pass step's time over the one-pass step's;
- ``two_pass_memory_over_one_candidate <= 1.1``: the two-pass step's peak saved bytes over
  those of one candidate's forward (one target per LQ of the batch): memory no longer grows
  with the number of candidates.

**One optimizer step of every method through the train stage** (``--train-methods``, default
:data:`TRAIN_METHODS`: dspo, dpo, sft, dro (offline pairs), dro_online, ddpo, gdpo,
gdpo_instance; any other name of :data:`pipeline.contracts.METHODS`, e.g. ``ea_adam``, can be
named, and a name that is not registered is an error): each method runs
:func:`pipeline.train.train` on the same tiny model and the same synthetic training folder
(``--batch`` LQs of ``--size`` px HQ, ``--candidates`` candidates and ``--instances`` instance
pairs each, a label map per LQ; :func:`write_train_inputs`) with the settings the DAG gives its
job (:func:`pipeline.settings.job_settings` of :data:`TRAIN_CONFIG`: small online settings,
``--policy-steps`` DDIM steps and ``--group-size`` samples per LQ, reported under
``train_step.settings``). A method's step time is ``(t(k1 + n) - t(k1)) / n`` with ``t(k)`` the
wall time of a whole ``train(max_steps=k)`` call (``k1 = 1``, ``n = --train-steps``), so set-up
(model transfer, metric registries, data, the final save) cancels; the calls are interleaved
across methods in rounds as above. ``train_step.seconds_per_step`` summarises each method's
per-round step times, ``train_step.over_dspo`` the per-round ratios to dspo's step. No target
is checked on these rows (online methods sample, score and back-propagate whole trajectories:
their cost is a property of their settings, not a regression).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline import contracts, settings
from pipeline.bench import timing
from pipeline.io.images import write_png
from pipeline.io.masks import write_label_maps
from pipeline.io.tables import SCHEMAS, write_table
from pipeline.models import build_tiny_model
from pipeline.models.base import SRModel
from pipeline.seeding import numpy_rng, torch_generator
from pipeline.training.config import TrainConfig
from pipeline.training.items import LoadedItem, PreferenceItem
from pipeline.training.step import (
    Conditions,
    PolicyErrors,
    backward_one_candidate_at_a_time,
    batch_loss,
    draw_conditions,
    error_map_gradients,
    error_maps_batched,
    lq_loss,
    reference_errors,
)


def instance_loop_loss(
    model: SRModel,
    loaded: Sequence[LoadedItem],
    conditions: Sequence[Conditions],
    method: str,
    config: TrainConfig,
) -> torch.Tensor:
    """The naive reference implementation: one policy and one reference forward PER INSTANCE.

    Same draws and same formula as :func:`pipeline.training.step.batch_loss`; kept here, outside the
    product, for this bench (the speed-up of the shared forwards) and the tests (equality of
    loss and gradients).
    """
    device = next(model.parameters()).device
    per_lq = []
    for entry, cond in zip(loaded, conditions, strict=True):
        item, total = entry.item, 0.0
        for m in range(len(item.instance_ids)):
            pair = [item.winners[m]] if method == "sft" else [item.winners[m], item.losers[m]]
            one = LoadedItem(
                dataclasses.replace(
                    item,
                    candidates=tuple(item.candidates[c] for c in pair),
                    instance_ids=item.instance_ids[m : m + 1],
                    weights=item.weights[m : m + 1],
                    winners=(0,),
                    losers=(len(pair) - 1,),
                ),
                entry.lq,
                entry.targets[pair],
                entry.masks[m : m + 1],
            )
            err_theta = error_maps_batched(model, [one], [cond], device)[0]
            err_ref = None if method == "sft" else reference_errors(model, [one], [cond])[0]
            loss, _ = lq_loss(method, err_theta, err_ref, one, config)
            # sft_loss normalises by the weights; undo it to sum the per-instance terms
            total = total + (
                loss * item.weights[m] / sum(item.weights) if method == "sft" else loss
            )
        per_lq.append(total)
    return torch.stack(per_lq).mean()


def synthetic_batch(
    n_lq: int, n_candidates: int, n_instances: int, size: int, seed: int
) -> tuple[list[LoadedItem], list[LoadedItem]]:
    """The same LQs as DSPO items (random instance pairs over a band partition) and DPO items."""
    dspo, dpo = [], []
    names = tuple(f"c{i}" for i in range(n_candidates))
    for n in range(n_lq):
        rng = numpy_rng(seed, "bench_train_step", n)
        generator = torch_generator(seed, "bench_train_step", n)
        lq = torch.rand(3, size, size, generator=generator) * 2 - 1
        targets = (lq + 0.2 * torch.randn(n_candidates, 3, size, size, generator=generator)).clamp(
            -1, 1
        )
        bands = torch.arange(size).repeat(size, 1) * n_instances // size  # vertical bands
        masks = bands[None] == torch.arange(n_instances)[:, None, None]
        pairs = [rng.choice(n_candidates, size=2, replace=False) for _ in range(n_instances)]
        used = sorted({int(c) for pair in pairs for c in pair})
        index = {c: i for i, c in enumerate(used)}
        item = PreferenceItem(
            image_id=f"lq{n}",
            candidates=tuple(names[c] for c in used),
            instance_ids=tuple(range(1, n_instances + 1)),
            weights=tuple(float(m.float().mean()) for m in masks),
            winners=tuple(index[int(p[0])] for p in pairs),
            losers=tuple(index[int(p[1])] for p in pairs),
            negative_prompt="",
        )
        dspo.append(LoadedItem(item, lq, targets[used], masks))
        image_pair = PreferenceItem(f"lq{n}", names[:2], (-1,), (1.0,), (0,), (1,), "")
        dpo.append(
            LoadedItem(image_pair, lq, targets[:2], torch.ones(1, size, size, dtype=torch.bool))
        )
    return dspo, dpo


def sft_batch(dpo: Sequence[LoadedItem]) -> list[LoadedItem]:
    """SFT items on the DPO LQs: the winner only (as :func:`pipeline.training.items.preference_items`
    builds them: one candidate, winner = loser = 0)."""
    return [
        LoadedItem(
            dataclasses.replace(
                entry.item, candidates=entry.item.candidates[:1], winners=(0,), losers=(0,)
            ),
            entry.lq,
            entry.targets[:1],
            entry.masks,
        )
        for entry in dpo
    ]


METHODS = ("dspo", "naive", "dpo", "sft", "dro", "dspo_two_pass")

#: methods timed through the train stage by default (every method's step, in one run)
TRAIN_METHODS = ("dspo", "dpo", "sft", "dro", "dro_online", "ddpo", "gdpo", "gdpo_instance")

#: the run configuration the train rows' jobs are resolved from (settings.job_settings, as the
#: DAG resolves a train job): weight-free metrics, both multi-objective objectives (ea_adam),
#: and the online methods at a small size (the batch, DDIM steps and group size come from the
#: command line)
TRAIN_CONFIG: dict[str, Any] = {
    "score": {"metrics": ["psnr", "ssim", "gmsd", "piqe"], "device": "cpu"},
    "select": {
        "objectives": {
            "fidelity": {"psnr": 1.0, "ssim": 1.0, "gmsd": 1.0},
            "perception": {"piqe": 1.0},
        }
    },
    "train": {
        "device": "cpu",
        "learning_rate": 1e-6,
        "uncond_drop_rate": 0.0,
        "heldout_fraction": 0.0,  # no alignment curves: every LQ trains
        "policy_cfg": 1.0,
        "dro_buffer_size": 4,
        "gdpo_detail_metrics": ["piqe"],
        "ea_adam": {
            "population_size": 2,
            "neighbourhood_size": 2,
            "ea_every": 1,
            "ea_iterations": 1,
            "fitness_images": 2,
            "fitness_crop": 16,
            "fitness_steps": 2,
            "fusion_images": 2,
            "fusion_steps": 2,
        },
    },
}

TRAIN_OBJECTIVE = "fidelity"


def check_train_methods(names: Sequence[str]) -> list[str]:
    """``names`` in order without repeats; a name :data:`pipeline.contracts.METHODS` lacks
    raises (a row asked for is never skipped silently)."""
    unknown = [name for name in names if name not in contracts.METHODS]
    if unknown:
        raise ValueError(
            f"--train-methods {unknown}: not registered in pipeline.contracts.METHODS "
            f"({sorted(contracts.METHODS)})"
        )
    return list(dict.fromkeys(names))


def bench_pair(
    image_id: str, instance_id: int, weight: float, winner: str, loser: str, margin: float
) -> dict[str, Any]:
    """One ``preference_pairs`` row of the synthetic training split."""
    return {
        "image_id": image_id,
        "instance_id": instance_id,
        "weight": weight,
        "winner": winner,
        "loser": loser,
        "margin": margin,
        "negative_prompt": "",
        "source": "bench",
    }


def write_candidates(
    root: Path,
    image_id: str,
    hq: np.ndarray,
    names: Sequence[str],
    seed: int,
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    """A noisy copy of ``hq`` per setting of ``names`` under ``root/candidates``; their rows."""
    rows = []
    for name in names:
        noisy = hq.astype(np.int16) + rng.integers(-40, 41, hq.shape)
        path = Path(name) / f"{image_id}.png"
        write_png(root / "candidates" / path, np.clip(noisy, 0, 255).astype(np.uint8))
        rows.append(
            {
                "image_id": image_id,
                "setting": name,
                "variant": "base",
                "steps": 1,
                "cfg": 1.0,
                "seed": seed,
                "negative_prompt": "",
                "path": str(path),
            }
        )
    return rows


def lq_pairs(
    image_id: str,
    labels: np.ndarray,
    n_instances: int,
    names: Sequence[str],
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    """One LQ's preference rows: a random pair per instance and one image-level pair."""
    pairs = []
    for instance_id in range(1, n_instances + 1):
        win, lose = rng.choice(len(names), size=2, replace=False)
        weight = float((labels == instance_id).mean())
        pairs.append(bench_pair(image_id, instance_id, weight, names[win], names[lose], 0.5))
    pairs.append(bench_pair(image_id, contracts.WHOLE_IMAGE_ID, 1.0, names[0], names[1], 1.0))
    return pairs


def degradation_row(image_id: str) -> dict[str, Any]:
    """One LQ's ``degradation_pairs`` row (the columns it does not name are None)."""
    row = dict.fromkeys(SCHEMAS["degradation_pairs"].names)
    row.update(
        image_id=image_id,
        source_id=image_id,
        split="train",
        hq_path=f"hq/{image_id}.png",
        lq_path=f"lq/{image_id}.png",
    )
    return row


def write_train_inputs(
    root: Path, n_lq: int, n_candidates: int, n_instances: int, size: int, factor: int, seed: int
) -> dict[str, Path]:
    """A synthetic training split on disk, as the stages before train leave it: ``data/train``
    (LQ ``size / factor`` px, HQ ``size`` px, its pairs table), ``n_candidates`` candidate PNGs
    per LQ with their table, a label map per LQ (``n_instances`` vertical bands), and one
    preference table with a pair per instance (random winner/loser) and one image-level pair
    per LQ. Seeded (``numpy_rng(seed, "bench_train_inputs", n)``)."""
    data = root / "data" / "train"
    settings_names = [f"c{k}" for k in range(n_candidates)]
    candidates, pairs, label_maps, degradations = [], [], {}, []
    for n in range(n_lq):
        image_id = f"lq{n}"
        rng = numpy_rng(seed, "bench_train_inputs", n)
        hq = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        write_png(data / "hq" / f"{image_id}.png", hq)
        write_png(data / "lq" / f"{image_id}.png", hq[::factor, ::factor].copy())
        candidates += write_candidates(root, image_id, hq, settings_names, seed, rng)
        labels = np.arange(size)[None, :].repeat(size, 0) * n_instances // size + 1
        label_maps[image_id] = labels.astype(np.uint16)
        pairs += lq_pairs(image_id, labels, n_instances, settings_names, rng)
        degradations.append(degradation_row(image_id))
    write_table(
        pd.DataFrame(degradations, columns=SCHEMAS["degradation_pairs"].names),
        data / contracts.DATA_TABLE,
        "degradation_pairs",
    )
    write_table(pd.DataFrame(candidates), root / "candidates" / "candidates.parquet", "candidates")
    write_table(pd.DataFrame(pairs), root / "pairs.parquet", "preference_pairs")
    write_label_maps(root / "masks.zarr", label_maps, {"backend": "bench"})
    return {
        "data_dir": data,
        "candidates_path": root / "candidates" / "candidates.parquet",
        "pairs_path": root / "pairs.parquet",
        "masks_path": root / "masks.zarr",
    }


def train_job_settings(method: str, batch: int, policy_steps: int, group_size: int) -> dict:
    """The train section a DAG job of ``method`` would get from :data:`TRAIN_CONFIG` with the
    command line's batch, DDIM steps and group size (``max_steps`` is set per call)."""
    config = {
        **TRAIN_CONFIG,
        "train": {
            **TRAIN_CONFIG["train"],
            "batch_size": batch,
            "policy_steps": policy_steps,
            "policy_group_size": group_size,
            "stat_tracker_buffer_size": group_size,
            "stat_tracker_min_count": group_size,
            "dro_sampler_steps": policy_steps,
            "dro_sampler_batch_size": batch,
        },
    }
    return settings.job_settings(config, "train", method=method, objective=TRAIN_OBJECTIVE)


def train_call(
    method: str,
    framework: str,
    inputs: dict[str, Path],
    section: dict,
    max_steps: int,
    build_model: Callable[[], SRModel],
    scratch: Path,
    seed: int,
) -> Callable[[], None]:
    """A zero-argument ``train(method, max_steps)`` on ``inputs`` with a fresh model, writing to
    (and then removing) a folder under ``scratch``."""
    from pipeline.train import train

    pair_level = contracts.method(method).pair_level
    if pair_level == contracts.NO_PAIRS:
        pairs: Any = None
    elif pair_level == "objectives":  # ea_adam: a table per objective (the same one here)
        pairs = {name: inputs["pairs_path"] for name in ("perception", "fidelity")}
    else:
        pairs = inputs["pairs_path"]
    config = {**section, "max_steps": max_steps, "checkpoint_every": max_steps}

    def run() -> None:
        out = Path(tempfile.mkdtemp(prefix=f"{method}-{max_steps}-", dir=scratch))
        try:
            train(
                framework=framework,
                method=method,
                objective=TRAIN_OBJECTIVE,
                pairs_path=pairs,
                candidates_path=inputs["candidates_path"],
                data_dir=inputs["data_dir"],
                masks_path=inputs["masks_path"],
                model_dir="bench tiny model",
                out_dir=out / "model",
                config=config,
                seed=seed,
                checkpoint_dir=out / "checkpoints",
                model=build_model(),
            )
        finally:
            shutil.rmtree(out, ignore_errors=True)

    return run


def time_train_steps(args: argparse.Namespace, methods: Sequence[str]) -> dict[str, Any]:
    """The ``train_step`` block of the report: each method's optimizer step through the train
    stage (module docstring), interleaved in rounds."""
    first, extra = 1, args.train_steps
    if extra < 1:
        raise ValueError(f"--train-steps must be >= 1, got {extra}")
    sections = {
        m: train_job_settings(m, args.batch, args.policy_steps, args.group_size) for m in methods
    }
    for m in methods:  # imported before timing: no call pays for its method's first import
        importlib.import_module(contracts.method_module(m))
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as folder:
        scratch = Path(folder)
        factor = build_tiny_model(args.framework, seed=args.seed).codec.downscale
        inputs = write_train_inputs(
            scratch / "inputs",
            args.batch,
            args.candidates,
            args.instances,
            args.size,
            factor,
            args.seed,
        )

        def build_model() -> SRModel:
            return build_tiny_model(args.framework, seed=args.seed)

        calls = {
            f"{m}@{k}": train_call(
                m, args.framework, inputs, sections[m], k, build_model, scratch, args.seed
            )
            for m in methods
            for k in (first, first + extra)
        }
        times = timing.interleave(calls, args.repeats, args.warmup)
    per_step = {
        m: [
            (b - a) / extra
            for a, b in zip(times[f"{m}@{first}"], times[f"{m}@{first + extra}"], strict=True)
        ]
        for m in methods
    }
    block: dict[str, Any] = {
        "methods": list(methods),
        "measured": f"(t(max_steps={first + extra}) - t(max_steps={first})) / {extra} of "
        "pipeline.train.train per method and round",
        "order": "interleaved: " + " ".join(calls) + " per round",
        "calls_seconds": {name: timing.summarize(values) for name, values in times.items()},
        "seconds_per_step": {m: timing.summarize(values) for m, values in per_step.items()},
        "settings": {
            "objective": TRAIN_OBJECTIVE,
            "policy_steps": args.policy_steps,
            "group_size": args.group_size,
            "train": {
                m: {k: v for k, v in s.items() if k != "reward"} for m, s in sections.items()
            },
            "reward": next((s["reward"] for s in sections.values() if "reward" in s), None),
            "loops": {m: contracts.method(m).loop for m in methods},
        },
    }
    if "dspo" in per_step:
        block["over_dspo"] = {
            m: timing.paired_ratio(values, per_step["dspo"]) for m, values in per_step.items()
        }
    return block


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m pipeline bench train-step`` (module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline bench train-step", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--framework", default="multistep", choices=("multistep", "onestep"))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--instances", type=int, default=5)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=METHODS, help="timed, in this order"
    )
    parser.add_argument(
        "--train-methods",
        nargs="*",
        default=list(TRAIN_METHODS),
        metavar="METHOD",
        help="methods timed through the train stage, in this order (any of "
        "pipeline.contracts.METHODS; none: skip these rows)",
    )
    parser.add_argument(
        "--train-steps", type=int, default=2, help="steps whose time is the difference"
    )
    parser.add_argument("--policy-steps", type=int, default=4, help="online methods' DDIM steps")
    parser.add_argument("--group-size", type=int, default=4, help="policy samples per LQ")
    timing.add_arguments(parser, repeats=3)
    return parser


@dataclasses.dataclass
class Batches:
    """The seeded in-memory batches the ``--methods`` rows step on, and their draws."""

    dspo: list[LoadedItem]
    dpo: list[LoadedItem]
    sft: list[LoadedItem]
    conditions: list[Conditions]


def make_batches(model: SRModel, config: TrainConfig, args: argparse.Namespace) -> Batches:
    """The DSPO, DPO and SFT items of :func:`synthetic_batch` and one draw per LQ."""
    dspo, dpo = synthetic_batch(args.batch, args.candidates, args.instances, args.size, args.seed)
    sft = sft_batch(dpo)
    conditions = [
        draw_conditions(model, entry, config, args.seed, 0, s) for s, entry in enumerate(dspo)
    ]
    return Batches(dspo, dpo, sft, conditions)


def method_steps(
    methods: Sequence[str],
    model: SRModel,
    policy: PolicyErrors,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    config: TrainConfig,
) -> dict[str, Callable[[], None]]:
    """One zero-argument optimizer step (loss, backward, AdamW step) per method of ``methods``,
    in their order without repeats."""
    dspo, dpo, sft, conditions = batches.dspo, batches.dpo, batches.sft, batches.conditions
    losses = {
        "dspo": lambda: batch_loss(policy, model, dspo, conditions, "dspo", config)[0],
        "naive": lambda: instance_loop_loss(model, dspo, conditions, "dspo", config),
        "dpo": lambda: batch_loss(policy, model, dpo, conditions, "dpo", config)[0],
        "sft": lambda: batch_loss(policy, model, sft, conditions, "sft", config)[0],
        "dro": lambda: batch_loss(policy, model, dspo, conditions, "dro", config)[0],
    }

    def step(loss_fn):
        """The optimizer step of the loss ``loss_fn`` returns."""

        def run():
            optimizer.zero_grad(set_to_none=True)
            loss_fn().backward()
            optimizer.step()

        return run

    def two_pass_step():
        """DSPO's step with ``train.memory: two_pass`` (module docstring)."""
        optimizer.zero_grad(set_to_none=True)
        _, _, gradients = error_map_gradients(model, dspo, conditions, "dspo", config)
        backward_one_candidate_at_a_time(
            policy, dspo, conditions, gradients, lambda loss: loss.backward()
        )
        optimizer.step()

    return {
        method: two_pass_step if method == "dspo_two_pass" else step(losses[method])
        for method in dict.fromkeys(methods)
    }


def saved_bytes(
    steps: dict[str, Callable[[], None]], model: SRModel, policy: PolicyErrors, batches: Batches
) -> dict[str, int]:
    """Each step's peak saved-for-backward bytes, and those of one candidate's forward per LQ."""
    parameters = list(model.parameters())
    saved = {
        method: timing.saved_tensor_peak(run, exclude=parameters) for method, run in steps.items()
    }
    one_each = [LoadedItem(e.item, e.lq, e.targets[:1], e.masks) for e in batches.dspo]
    saved["one_candidate_forward"] = timing.saved_tensor_peak(
        lambda: policy(one_each, batches.conditions), exclude=parameters
    )
    return saved


def step_targets(
    times: dict[str, list[float]], saved: dict[str, int], distinct_mean: float
) -> tuple[dict[str, Any], list[timing.Target]]:
    """The per-round ratios and the targets (module docstring) of the methods timed."""
    ratios, targets = {}, []
    if {"naive", "dspo"} <= times.keys():
        ratios["naive_over_dspo"] = timing.paired_ratio(times["naive"], times["dspo"])
        targets.append(
            timing.Target(
                "naive_over_dspo",
                ratios["naive_over_dspo"]["median"],
                ">=",
                3.0,
                "per-instance loop at least 3x slower than the shared forwards",
            )
        )
    if {"dspo", "dpo"} <= times.keys():
        ratios["dspo_over_dpo"] = timing.paired_ratio(times["dspo"], times["dpo"])
        ratios["dspo_over_scaled_dpo"] = timing.paired_ratio(
            times["dspo"], times["dpo"], scale=distinct_mean / 2
        )
        targets.append(
            timing.Target(
                "dspo_over_scaled_dpo",
                ratios["dspo_over_scaled_dpo"]["median"],
                "<=",
                1.1,
                "DSPO step <= 1.1 x (distinct candidates / 2) x DPO step",
            )
        )
    if {"dspo", "dspo_two_pass"} <= times.keys():
        ratios["two_pass_over_one_pass"] = timing.paired_ratio(
            times["dspo_two_pass"], times["dspo"]
        )
        targets.append(
            timing.Target(
                "two_pass_over_one_pass",
                ratios["two_pass_over_one_pass"]["median"],
                "<=",
                1.6,
                "two-pass DSPO step at most 1.6 x the one-pass step's time",
            )
        )
        targets.append(
            timing.Target(
                "two_pass_memory_over_one_candidate",
                saved["dspo_two_pass"] / saved["one_candidate_forward"],
                "<=",
                1.1,
                "two-pass DSPO saves at most 1.1 x one candidate's forward for backward",
            )
        )
    return ratios, targets


def run(args: argparse.Namespace, train_methods: Sequence[str]) -> int:
    """Time the ``--methods`` steps and the ``train_methods`` rows, print the report, and return
    the exit status (:func:`pipeline.bench.timing.finish`)."""
    model = build_tiny_model(args.framework, seed=args.seed)
    config = TrainConfig(uncond_drop_rate=0.0)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-6)
    policy = PolicyErrors(model)
    batches = make_batches(model, config, args)
    steps = method_steps(args.methods, model, policy, optimizer, batches, config)
    times = timing.interleave(steps, args.repeats, args.warmup)
    saved = saved_bytes(steps, model, policy, batches)
    distinct = [len(entry.item.candidates) for entry in batches.dspo]
    distinct_mean = sum(distinct) / len(distinct)
    ratios, targets = step_targets(times, saved, distinct_mean)
    result = {
        "benchmark": "train-step",
        "framework": args.framework,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.trainable_parameters()),
        "size": args.size,
        "batch": args.batch,
        "instances": args.instances,
        "candidates": args.candidates,
        "distinct_per_lq": distinct,
        "distinct_mean": distinct_mean,
        "forwarded_targets_per_lq": max(distinct),  # padded to the widest LQ of the batch
        **timing.timing_fields(args, times),
        "ratios": ratios,
        "saved_for_backward_bytes": saved,
    }
    if "dpo" in saved and saved["dpo"]:
        result["saved_over_dpo"] = {
            method: round(value / saved["dpo"], 3) for method, value in saved.items()
        }
    if train_methods:
        result["train_step"] = time_train_steps(args, train_methods)
    return timing.finish(result, targets, args)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline bench train-step``: parse, check the train methods, then :func:`run`."""
    args = build_parser().parse_args(argv)
    train_methods = check_train_methods(args.train_methods)
    timing.pin_threads(args.threads)
    return run(args, train_methods)


if __name__ == "__main__":
    sys.exit(main())
