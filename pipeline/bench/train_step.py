"""Time one preference-training step per method, interleaved, and the memory it saves for backward.

``python -m pipeline bench train-step [--framework multistep] [--size 64] [--instances 5]
[--candidates 4] [--batch 4] [--methods dspo naive dpo sft dro] [--repeats 3] [--threads 1]
[--check]`` prints one JSON object. The methods, on the same seeded LQs and draws:

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
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import torch

from pipeline.bench import timing
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


def main(argv: list[str] | None = None) -> int:
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
    timing.add_arguments(parser, repeats=3)
    args = parser.parse_args(argv)
    timing.pin_threads(args.threads)

    model = build_tiny_model(args.framework, seed=args.seed)
    config = TrainConfig(uncond_drop_rate=0.0)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-6)
    policy = PolicyErrors(model)
    dspo, dpo = synthetic_batch(args.batch, args.candidates, args.instances, args.size, args.seed)
    sft = sft_batch(dpo)
    conditions = [
        draw_conditions(model, entry, config, args.seed, 0, s) for s, entry in enumerate(dspo)
    ]
    losses = {
        "dspo": lambda: batch_loss(policy, model, dspo, conditions, "dspo", config)[0],
        "naive": lambda: instance_loop_loss(model, dspo, conditions, "dspo", config),
        "dpo": lambda: batch_loss(policy, model, dpo, conditions, "dpo", config)[0],
        "sft": lambda: batch_loss(policy, model, sft, conditions, "sft", config)[0],
        "dro": lambda: batch_loss(policy, model, dspo, conditions, "dro", config)[0],
    }

    def step(loss_fn):
        def run():
            optimizer.zero_grad(set_to_none=True)
            loss_fn().backward()
            optimizer.step()

        return run

    def two_pass_step():
        optimizer.zero_grad(set_to_none=True)
        _, _, gradients = error_map_gradients(model, dspo, conditions, "dspo", config)
        backward_one_candidate_at_a_time(
            policy, dspo, conditions, gradients, lambda loss: loss.backward()
        )
        optimizer.step()

    steps = {
        method: two_pass_step if method == "dspo_two_pass" else step(losses[method])
        for method in dict.fromkeys(args.methods)
    }
    times = timing.interleave(steps, args.repeats, args.warmup)
    parameters = list(model.parameters())
    saved = {
        method: timing.saved_tensor_peak(run, exclude=parameters) for method, run in steps.items()
    }
    one_each = [LoadedItem(e.item, e.lq, e.targets[:1], e.masks) for e in dspo]
    saved["one_candidate_forward"] = timing.saved_tensor_peak(
        lambda: policy(one_each, conditions), exclude=parameters
    )

    distinct = [len(entry.item.candidates) for entry in dspo]
    distinct_mean = sum(distinct) / len(distinct)
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
    return timing.finish(result, targets, args)


if __name__ == "__main__":
    sys.exit(main())
