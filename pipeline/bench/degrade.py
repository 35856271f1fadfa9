"""Throughput of the degrade stage on 512×512 crops of the demo photos: 1 process vs W.

``python -m pipeline bench degrade [--pairs N] [--crop 512] [--workers W] [--repeats 5]
[--threads 1] [--check]`` prints one JSON object. Each round (interleaved,
:mod:`pipeline.bench.timing`) degrades the N pairs with one worker process (``one_process``),
then with W (``workers``), then times the degradation chain alone on N draws in this process
(``chain``). Both pools are warm (process start-up excluded), spawned alike and pinned to
``--threads``, so the two ways differ only in the number of processes. ``spin_one`` and
``spin_workers`` run a pure-Python loop of the same number of tasks in the same pools: the
speed-up the machine offers right now (on a saturated machine, none).
``images_per_s_at_median`` gives the throughputs; ``ratios`` are per-round ratios.

Target (``--check`` exits 1 if it fails): ``scaling_vs_machine >= 0.8``: the speed-up of W
processes (default: one per core) over one, ``one_process / workers``, is at least 0.8 of the
pure loop's ``spin_one / spin_workers`` in the same round (median over rounds). On an idle
machine that means W processes degrade faster than one; load that leaves no core free takes
the speed-up from both alike, so the verdict does not depend on it. The raw speed-up is in
``ratios.one_process_over_workers``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench import timing
from pipeline.degradations import apply_degradation, sample_degradation_params
from pipeline.degrade import degrade_pair, find_source_images, plan_pairs, stage_config
from pipeline.seeding import numpy_rng

SPIN_ADDITIONS = 2_000_000  # one calibration task: about 0.1 s of one core

# the demo photos at least 512 px on both sides, so no crop is padded
LARGE_DEMO_IMAGES = ["astronaut.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png"]


def spin(n: int) -> int:
    """CPU-only work for the calibration tasks: a pure-Python loop of ``n`` additions."""
    total = 0
    for i in range(n):
        total += i
    return total


def pinned_pool(workers: int, threads: int) -> ProcessPoolExecutor:
    """``workers`` spawned processes, each pinned to ``threads`` (:func:`timing.pin_threads`)."""
    return ProcessPoolExecutor(
        workers,
        mp_context=get_context("spawn"),
        initializer=timing.pin_threads,
        initargs=(threads,),
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m pipeline bench degrade`` (module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline bench degrade", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--pairs", type=int, default=8, help="pairs degraded per round and way")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    timing.add_arguments(parser, repeats=5)
    return parser


def time_ways(args: argparse.Namespace) -> dict[str, list[float]]:
    """Each round's seconds of every way (module docstring): the pairs in one process and in
    ``--workers``, the spin tasks in both pools, and the degradation chain alone."""
    config = stage_config(
        {"demo_images": LARGE_DEMO_IMAGES, "crop_size": args.crop, "crops_per_image": args.pairs}
    )
    images = find_source_images("demo", LARGE_DEMO_IMAGES)
    hq = np.random.default_rng(0).random((args.crop, args.crop, 3), dtype=np.float32)
    params = [
        sample_degradation_params(numpy_rng(0, "bench", index), config["degradation"])
        for index in range(args.pairs)
    ]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        (out / "hq").mkdir()
        (out / "lq").mkdir()
        # crops_per_image = pairs, so each source image offers enough tasks; take them round-robin
        by_image = [plan_pairs([image], "train", out, config, seed=0) for image in images]
        tasks = [by_image[i % len(images)][i // len(images)] for i in range(args.pairs)]
        spins = [SPIN_ADDITIONS] * args.pairs
        with pinned_pool(1, args.threads) as one, pinned_pool(args.workers, args.threads) as pool:
            return timing.interleave(
                {
                    "one_process": lambda: list(one.map(degrade_pair, tasks, chunksize=1)),
                    "workers": lambda: list(pool.map(degrade_pair, tasks, chunksize=1)),
                    "spin_one": lambda: list(one.map(spin, spins, chunksize=1)),
                    "spin_workers": lambda: list(pool.map(spin, spins, chunksize=1)),
                    "chain": lambda: [
                        apply_degradation(hq, p, config["degradation"]) for p in params
                    ],
                },
                args.repeats,
                args.warmup,
            )


def report(
    args: argparse.Namespace, times: dict[str, list[float]]
) -> tuple[dict[str, Any], timing.Target]:
    """The report of the rounds' ``times`` and its target, ``scaling_vs_machine``."""
    ratio = timing.paired_ratio(times["one_process"], times["workers"])
    machine = timing.paired_ratio(times["spin_one"], times["spin_workers"])
    scaling = timing.summarize(
        [
            (a / b) / (c / d)
            for a, b, c, d in zip(
                times["one_process"],
                times["workers"],
                times["spin_one"],
                times["spin_workers"],
                strict=True,
            )
        ],
        4,
    )
    medians = {name: timing.summarize(values)["median"] for name, values in times.items()}
    result = {
        "benchmark": "degrade",
        "crop": args.crop,
        "pairs": args.pairs,
        "workers": args.workers,
        "cpu_count": os.cpu_count(),
        **timing.timing_fields(args, times),
        "images_per_s_at_median": {
            name: round(args.pairs / seconds, 3) for name, seconds in medians.items()
        },
        "chain_ms_per_image_at_median": round(1000 * medians["chain"] / args.pairs, 1),
        "ratios": {
            "one_process_over_workers": ratio,
            "spin_one_over_spin_workers": machine,
            "scaling_vs_machine": scaling,
        },
        "note": "pair = read + crop + degrade + 2 PNG writes; chain = apply_degradation only",
    }
    target = timing.Target(
        "scaling_vs_machine",
        scaling["median"],
        ">=",
        0.8,
        f"{args.workers} processes over one: at least 0.8 of the speed-up a pure loop gets",
    )
    return result, target


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline bench degrade``: time the ways, print the report, check the target."""
    args = build_parser().parse_args(argv)
    timing.pin_threads(args.threads)  # before the pool starts: its workers inherit the variables
    result, target = report(args, time_ways(args))
    return timing.finish(result, [target], args)
