"""Benchmark: full-reference IQA per instance by pooled maps vs one pyiqa call per crop.

4 candidates × 5 instances (a partition of the image into 5 regions). ``pooled``: the
metrics with spatial maps run once per candidate image (batched) and are pooled under each
mask (:func:`pipeline.iqa.score_instances`); what depends on the HQ reference alone (LPIPS
features, SSIM mean and variance) is computed once for the 4 candidates, and SSIM's gaussian
window is applied separably (same numbers as pyiqa's maps, see :mod:`pipeline.iqa`).
``per_crop``: one pyiqa call per (candidate, instance) on the instance's masked
bounding-box crop. ``per_crop_batched``: one call per instance with the 4 candidates
batched (what the crop path does for other metrics).

``python -m pipeline bench iqa [--size 256] [--metrics psnr ssim lpips] [--repeats 3]
[--threads 1] [--check]`` prints one JSON object. Each round runs, metric by metric, the
three ways once (interleaved, :mod:`pipeline.bench.timing`); a way's seconds in a round are
the sum over the metrics; ``ratios`` are per-round ratios.

Target (``--check`` exits 1 if it fails): ``per_crop_over_pooled >= 5``, the pooled maps at
least 5x faster than one call per crop (median of the per-round ratios).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import torch

from pipeline.bench import timing
from pipeline.iqa import MetricRegistry, bounding_box, masked_crop, score_instances, uses_pooled_map
from pipeline.seeding import derive_seed, torch_generator


def five_instances(height: int, width: int) -> torch.Tensor:
    """A segmenter-like partition, boolean ``[5, H, W]``: four elliptic objects of different
    sizes and the remainder (everything else, whose bounding box is the whole image)."""
    rows, cols = torch.meshgrid(
        torch.arange(height) / height, torch.arange(width) / width, indexing="ij"
    )
    labels = torch.zeros(height, width, dtype=torch.long)
    objects = [
        (0.3, 0.3, 0.22, 0.15),
        (0.7, 0.25, 0.12, 0.2),
        (0.35, 0.75, 0.18, 0.1),
        (0.75, 0.7, 0.08, 0.08),
    ]
    for label, (centre_y, centre_x, radius_y, radius_x) in enumerate(objects, start=1):
        inside = ((rows - centre_y) / radius_y) ** 2 + ((cols - centre_x) / radius_x) ** 2 < 1
        labels[inside] = label
    return torch.stack([labels == i for i in range(5)])


def random_lpips_weights(folder: Path, seed: int = 0) -> None:
    """Offline stand-in for timing and tests: a seeded random AlexNet where torchvision looks
    for it and LPIPS heads that average each layer's channels (uniform 1/C weights)."""
    import torchvision
    from pyiqa.archs.lpips_arch import default_model_urls

    alexnet_file = Path(torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url).name
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "pyiqa").mkdir()
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(seed, "bench-iqa", "alexnet"))
        alexnet = torchvision.models.alexnet(weights=None)
    torch.save(alexnet.state_dict(), folder / "checkpoints" / alexnet_file)
    channels = [64, 192, 384, 256, 256]  # AlexNet's five feature layers, as pyiqa's LPIPS taps them
    heads = {
        f"lin{k}.model.1.weight": torch.full((1, c, 1, 1), 1.0 / c) for k, c in enumerate(channels)
    }
    torch.save(heads, folder / "pyiqa" / Path(default_model_urls["0.1_alex"]).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline bench iqa", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument(
        "--metrics", nargs="+", default=["psnr", "ssim", "lpips"], help="FR metrics with maps"
    )
    parser.add_argument(
        "--weights-dir", default=None, help="pyiqa weights dir (default: random LPIPS weights)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    timing.add_arguments(parser, repeats=3)
    args = parser.parse_args(argv)
    timing.pin_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        weights_dir = args.weights_dir
        if weights_dir is None and "lpips" in args.metrics:
            weights_dir = Path(scratch)
            random_lpips_weights(weights_dir, args.seed)
        with contextlib.redirect_stdout(sys.stderr):  # pyiqa prints while loading weights
            result, targets = run(
                args, MetricRegistry(weights_dir=weights_dir, device=args.device), parser
            )
    result["lpips_weights"] = args.weights_dir or "random stand-in (timing only)"
    return timing.finish(result, targets, args)


WAYS = ("pooled", "per_crop", "per_crop_batched")


def run(
    args: argparse.Namespace, registry: MetricRegistry, parser: argparse.ArgumentParser
) -> tuple[dict, list[timing.Target]]:
    """Time the three ways on seeded candidates; the report and its target."""
    not_pooled = [name for name in args.metrics if not uses_pooled_map(registry.info(name))]
    if not_pooled:
        parser.error(f"metrics without a pooled map: {not_pooled}")
    generator = torch_generator(args.seed, "bench-iqa")
    hq = torch.rand(3, args.size, args.size, generator=generator)
    noise = torch.randn(4, 3, args.size, args.size, generator=generator) * 0.05
    candidates = (hq + noise).clamp(0, 1)
    masks = five_instances(args.size, args.size)
    hq_batch = hq[None].expand_as(candidates)
    crop_area = 0
    for mask in masks:
        top, bottom, left, right = bounding_box(mask)
        crop_area += (bottom - top) * (right - left)
    variants = {}
    for name in args.metrics:
        model = registry.model(name)

        def pooled(name: str = name) -> object:
            return score_instances(registry, [name], candidates, hq, masks)

        def per_crop(model: torch.nn.Module = model) -> object:
            with torch.no_grad():
                for mask in masks:
                    for c in range(len(candidates)):
                        model(
                            *masked_crop(candidates[c : c + 1], hq_batch[c : c + 1], mask, True, 1)
                        )

        def per_crop_batched(model: torch.nn.Module = model) -> object:
            with torch.no_grad():
                for mask in masks:
                    model(*masked_crop(candidates, hq_batch, mask, True, 1))

        variants[f"pooled/{name}"] = pooled
        variants[f"per_crop/{name}"] = per_crop
        variants[f"per_crop_batched/{name}"] = per_crop_batched
    by_metric = timing.interleave(variants, args.repeats, args.warmup)
    times = {
        way: [
            sum(by_metric[f"{way}/{name}"][r] for name in args.metrics) for r in range(args.repeats)
        ]
        for way in WAYS
    }
    ratios = {
        "per_crop_over_pooled": timing.paired_ratio(times["per_crop"], times["pooled"]),
        "per_crop_batched_over_pooled": timing.paired_ratio(
            times["per_crop_batched"], times["pooled"]
        ),
    }
    result = {
        "benchmark": "iqa",
        "metrics": args.metrics,
        "candidates": len(candidates),
        "instances": len(masks),
        "image_size": args.size,
        "device": str(registry.device),
        **timing.timing_fields(args, times, order=by_metric),
        "ratios": ratios,
        "median_seconds_by_metric": {
            key: timing.summarize(values)["median"] for key, values in by_metric.items()
        },
        "pooled_method": "one map per candidate, HQ-only terms once, pooled under each mask",
        "crop_area_over_image_area": round(crop_area / masks[0].numel(), 3),
    }
    target = timing.Target(
        "per_crop_over_pooled",
        ratios["per_crop_over_pooled"]["median"],
        ">=",
        5.0,
        "pooled maps at least 5x faster than one pyiqa call per crop",
    )
    return result, [target]


if __name__ == "__main__":
    raise SystemExit(main())
