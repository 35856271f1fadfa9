"""Candidate generation throughput on the tiny one-step model: batched vs one image at a time.

``python -m pipeline bench sample [--images N] [--size PX] [--batch B] [--repeats R]
[--threads T] [--check]`` prints one JSON object: the seconds of generating the N images in
batches of B and one at a time (both inside :func:`pipeline.candidates.batch_invariant`, as the
candidates stage runs), interleaved per round (:mod:`pipeline.bench.timing`), images per second
at the medians, and the per-round ratio.

Target (``--check`` exits 1 if it fails): ``single_over_batched > 1``, i.e. batched sampling
is faster than one image at a time (median of the per-round ratios of seconds).
"""

from __future__ import annotations

import argparse

import torch

from pipeline.bench import timing
from pipeline.candidates import batch_invariant
from pipeline.models.onestep import OneStepSR
from pipeline.seeding import torch_generator


def generate(model: OneStepSR, lq: torch.Tensor, batch_size: int) -> None:
    """Sample every LQ of ``lq`` in chunks of ``batch_size`` (empty prompts)."""
    with batch_invariant(model):
        for index in range(0, len(lq), batch_size):
            chunk = lq[index : index + batch_size]
            model.sample(chunk, prompts=[""] * len(chunk))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline bench sample", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    timing.add_arguments(parser, repeats=5)
    args = parser.parse_args(argv)
    timing.pin_threads(args.threads)
    model = OneStepSR.build_tiny(block_out_channels=(32, 64)).eval()
    lq = (
        torch.rand(args.images, 3, args.size, args.size, generator=torch_generator(0, "bench")) * 2
        - 1
    )
    times = timing.interleave(
        {
            "batched": lambda: generate(model, lq, args.batch),
            "single": lambda: generate(model, lq, 1),
        },
        args.repeats,
        args.warmup,
    )
    ratio = timing.paired_ratio(times["single"], times["batched"])
    medians = {name: timing.summarize(values)["median"] for name, values in times.items()}
    result = {
        "benchmark": "sample",
        "model": "onestep tiny (UNet 32/64, pixel codec)",
        "images": args.images,
        "size": args.size,
        "batch_size": args.batch,
        **timing.timing_fields(args, times),
        "images_per_second_at_median": {
            name: round(args.images / seconds, 2) for name, seconds in medians.items()
        },
        "ratios": {"single_over_batched": ratio},
    }
    target = timing.Target(
        "single_over_batched", ratio["median"], ">", 1.0, "batched sampling faster than single"
    )
    return timing.finish(result, [target], args)
