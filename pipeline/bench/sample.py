"""Candidate generation throughput on the tiny one-step model: batched vs one image at a time.

``python -m pipeline bench sample [--images N] [--size PX] [--batch B] [--threads T]`` prints one
JSON object: images per second both ways (inside :func:`pipeline.candidates.batch_invariant`,
as the candidates stage runs) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pipeline.candidates import batch_invariant
from pipeline.models.onestep import OneStepSR
from pipeline.seeding import torch_generator


def images_per_second(model: OneStepSR, lq: torch.Tensor, batch_size: int) -> float:
    start = time.perf_counter()
    with batch_invariant(model):
        for index in range(0, len(lq), batch_size):
            chunk = lq[index : index + batch_size]
            model.sample(chunk, prompts=[""] * len(chunk))
    return len(lq) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline bench sample")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = OneStepSR.build_tiny(block_out_channels=(32, 64)).eval()
    lq = (
        torch.rand(args.images, 3, args.size, args.size, generator=torch_generator(0, "bench")) * 2
        - 1
    )
    images_per_second(model, lq[:2], 2)  # warm-up
    batched = images_per_second(model, lq, args.batch)
    single = images_per_second(model, lq, 1)
    result = {
        "model": "onestep tiny (UNet 32/64, pixel codec)",
        "images": args.images, "size": args.size, "batch_size": args.batch,
        "threads": args.threads,
        "images_per_second_batched": round(batched, 2),
        "images_per_second_single": round(single, 2),
        "speedup_batched_vs_single": round(batched / single, 2),
    }  # fmt: skip
    print(json.dumps(result))
    return 0
