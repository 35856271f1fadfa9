"""Time one preference-training step: shared forwards vs a per-instance loop vs Diffusion-DPO.

``python -m pipeline bench train_step [--framework multistep] [--size 64] [--instances 5]
[--candidates 4] [--batch 4] [--repeats 5]`` prints one JSON object:

- ``dspo_s``: median seconds of a DSPO step (forward policy + reference over each LQ's distinct
  candidates, pooled per instance, backward, AdamW step);
- ``naive_s``: the same loss with one policy and one reference forward per instance;
- ``dpo_s``: a Diffusion-DPO step on the same LQs (one winner/loser pair each);
- ``distinct_mean``: mean number of distinct candidates per LQ; ``ratios`` and ``targets``
  (``naive_s / dspo_s >= 3`` and ``dspo_s <= 1.1 * distinct_mean / 2 * dpo_s`` at M = 5, N = 4).

The tiny model and all draws are seeded; figures are from this one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence

import torch

from pipeline import train as T
from pipeline.models import build_tiny_model
from pipeline.models.base import SRModel
from pipeline.seeding import numpy_rng, torch_generator


def instance_loop_loss(
    model: SRModel,
    loaded: Sequence[T.LoadedItem],
    conditions: Sequence[T.Conditions],
    method: str,
    config: T.TrainConfig,
) -> torch.Tensor:
    """The naive reference implementation: one policy and one reference forward PER INSTANCE.

    Same draws and same formula as :func:`pipeline.train.batch_loss`; kept here, outside the
    product, for this bench (the speed-up of the shared forwards) and the tests (equality of
    loss and gradients).
    """
    device = next(model.parameters()).device
    per_lq = []
    for entry, cond in zip(loaded, conditions, strict=True):
        item, total = entry.item, 0.0
        for m in range(len(item.instance_ids)):
            pair = [item.winners[m]] if method == "sft" else [item.winners[m], item.losers[m]]
            one = T.LoadedItem(
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
            err_theta = T._error_maps_batched(model, [one], [cond], device)[0]
            err_ref = None if method == "sft" else T.reference_errors(model, [one], [cond])[0]
            loss, _ = T.lq_loss(method, err_theta, err_ref, one, config)
            # sft_loss normalises by the weights; undo it to sum the per-instance terms
            total = total + (
                loss * item.weights[m] / sum(item.weights) if method == "sft" else loss
            )
        per_lq.append(total)
    return torch.stack(per_lq).mean()


def synthetic_batch(
    n_lq: int, n_candidates: int, n_instances: int, size: int, seed: int
) -> tuple[list[T.LoadedItem], list[T.LoadedItem]]:
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
        item = T.PreferenceItem(
            image_id=f"lq{n}",
            candidates=tuple(names[c] for c in used),
            instance_ids=tuple(range(1, n_instances + 1)),
            weights=tuple(float(m.float().mean()) for m in masks),
            winners=tuple(index[int(p[0])] for p in pairs),
            losers=tuple(index[int(p[1])] for p in pairs),
            negative_prompt="",
        )
        dspo.append(T.LoadedItem(item, lq, targets[used], masks))
        image_pair = T.PreferenceItem(f"lq{n}", names[:2], (-1,), (1.0,), (0,), (1,), "")
        dpo.append(
            T.LoadedItem(image_pair, lq, targets[:2], torch.ones(1, size, size, dtype=torch.bool))
        )
    return dspo, dpo


def time_steps(step, repeats: int) -> float:
    """Median wall time of ``step()`` after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline bench train_step")
    parser.add_argument("--framework", default="multistep", choices=("multistep", "onestep"))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--instances", type=int, default=5)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model = build_tiny_model(args.framework, seed=args.seed)
    config = T.TrainConfig(uncond_drop_rate=0.0)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-6)
    policy = T.PolicyErrors(model)
    dspo, dpo = synthetic_batch(args.batch, args.candidates, args.instances, args.size, args.seed)
    conditions = [
        T.draw_conditions(model, entry, config, args.seed, 0, s) for s, entry in enumerate(dspo)
    ]

    def step(loss_fn):
        def run():
            optimizer.zero_grad(set_to_none=True)
            loss_fn().backward()
            optimizer.step()

        return run

    dspo_s = time_steps(
        step(lambda: T.batch_loss(policy, model, dspo, conditions, "dspo", config)[0]), args.repeats
    )
    naive_s = time_steps(
        step(lambda: instance_loop_loss(model, dspo, conditions, "dspo", config)), args.repeats
    )
    dpo_s = time_steps(
        step(lambda: T.batch_loss(policy, model, dpo, conditions, "dpo", config)[0]), args.repeats
    )
    distinct = [len(entry.item.candidates) for entry in dspo]
    distinct_mean = sum(distinct) / len(distinct)
    result = {
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
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "dspo_s": round(dspo_s, 5),
        "naive_s": round(naive_s, 5),
        "dpo_s": round(dpo_s, 5),
        "ratios": {
            "naive_over_dspo": round(naive_s / dspo_s, 3),
            "dspo_over_dpo": round(dspo_s / dpo_s, 3),
            "dspo_over_scaled_dpo": round(dspo_s / (distinct_mean / 2 * dpo_s), 3),
        },
        "targets": {
            "naive_over_dspo_at_least_3": naive_s / dspo_s >= 3.0,
            "dspo_within_1.1_of_scaled_dpo": dspo_s <= 1.1 * distinct_mean / 2 * dpo_s,
        },
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
