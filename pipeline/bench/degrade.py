"""Throughput of the degrade stage on 512×512 crops of the demo photos.

``python -m pipeline bench degrade [--pairs N] [--crop 512] [--workers W]`` prints one JSON
object: pairs per second in one process and with W worker processes (warm pool, so process
start-up is excluded), and the time of the degradation chain alone.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from pipeline.degradations import apply_degradation, sample_degradation_params
from pipeline.degrade import degrade_pair, find_source_images, plan_pairs, stage_config
from pipeline.seeding import numpy_rng

# the demo photos at least 512 px on both sides, so no crop is padded
LARGE_DEMO_IMAGES = ["astronaut.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline bench degrade")
    parser.add_argument("--pairs", type=int, default=16, help="pairs timed per configuration")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    config = stage_config(
        {"demo_images": LARGE_DEMO_IMAGES, "crop_size": args.crop, "crops_per_image": args.pairs}
    )
    images = find_source_images("demo", LARGE_DEMO_IMAGES)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        (out / "hq").mkdir()
        (out / "lq").mkdir()
        # crops_per_image = pairs, so each source image offers enough tasks; take them round-robin
        by_image = [plan_pairs([image], "train", out, config, seed=0) for image in images]
        tasks = [by_image[i % len(images)][i // len(images)] for i in range(args.pairs)]

        start = time.perf_counter()
        for task in tasks:
            degrade_pair(task)
        one_process = time.perf_counter() - start

        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            list(pool.map(degrade_pair, tasks[: args.workers]))  # warm-up: imports, first calls
            start = time.perf_counter()
            list(pool.map(degrade_pair, tasks, chunksize=1))
            all_cores = time.perf_counter() - start

    hq = np.random.default_rng(0).random((args.crop, args.crop, 3), dtype=np.float32)
    chain_seconds = []
    for index in range(args.pairs):
        params = sample_degradation_params(numpy_rng(0, "bench", index), config["degradation"])
        start = time.perf_counter()
        apply_degradation(hq, params, config["degradation"])
        chain_seconds.append(time.perf_counter() - start)

    print(
        json.dumps(
            {
                "crop": args.crop,
                "pairs": args.pairs,
                "workers": args.workers,
                "cpu_count": os.cpu_count(),
                "images_per_s_1proc": round(args.pairs / one_process, 3),
                "images_per_s_all_cores": round(args.pairs / all_cores, 3),
                "speedup_all_cores": round(one_process / all_cores, 3),
                "chain_ms_per_image_median": round(1000 * float(np.median(chain_seconds)), 1),
                "chain_ms_per_image_max": round(1000 * float(np.max(chain_seconds)), 1),
                "note": "pair = read + crop + degrade + 2 PNG writes; chain = apply_degradation only",
            }
        )
    )
    return 0
