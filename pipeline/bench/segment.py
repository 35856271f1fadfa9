"""Benchmark of the segment stage on scikit-image's bundled photos (offline backend).

``python -m pipeline bench segment [--size 256] [--top-k 5] [--repeats 3] [--threads 1]
[--check]`` prints one JSON object. Each round (interleaved, :mod:`pipeline.bench.timing`)
runs the classical segmenter over the photos (mask records), then
:func:`pipeline.segment.masks_to_partition` on those records; ``seconds`` summarises both and
``images_per_s_at_median`` gives their throughput. Also the bytes of the Zarr store against
the raw masks it replaces (one bool byte per pixel per mask record, as SAM's ``binary_mask``
output holds them) and against uncompressed uint16 label maps.

Targets (``--check`` exits 1 if one fails): ``segment_over_partition >= 1``, building the
partition costs no more than segmenting (median per-round ratio), and ``zarr_over_uint16 < 1``,
the store is smaller than uncompressed uint16 label maps.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from skimage import data
from skimage.transform import resize

from pipeline.bench import timing
from pipeline.io.masks import write_label_maps
from pipeline.segment import build_segmenter, generate_mask_records, masks_to_partition

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina")


def bench_images(size: int) -> dict[str, np.ndarray]:
    """The bundled colour photos, resized to ``size`` x ``size`` uint8 RGB."""
    images = {}
    for name in PHOTOS:
        photo = getattr(data, name)()[..., :3]
        resized = resize(photo, (size, size), anti_aliasing=True, preserve_range=True)
        images[name] = np.clip(np.rint(resized), 0, 255).astype(np.uint8)
    return images


def directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline bench segment", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--size", type=int, default=256, help="image edge in pixels")
    parser.add_argument("--top-k", type=int, default=5)
    timing.add_arguments(parser, repeats=3)
    args = parser.parse_args(argv)
    timing.pin_threads(args.threads)

    images = bench_images(args.size)
    segmenter = build_segmenter({"top_k": args.top_k})
    state: dict[str, dict] = {}

    def segment() -> None:
        state["records"] = {
            name: generate_mask_records(image, segmenter) for name, image in images.items()
        }

    def partition() -> None:
        state["label_maps"] = {
            name: masks_to_partition(recs, (args.size, args.size), args.top_k).label_map
            for name, recs in state["records"].items()
        }

    times = timing.interleave(
        {"segment": segment, "partition": partition}, args.repeats, args.warmup
    )
    records, label_maps = state["records"], state["label_maps"]
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder) / "bench.zarr"
        write_label_maps(store, label_maps, segmenter.info)
        store_bytes = directory_bytes(store)
    raw_mask_bytes = sum(len(recs) * args.size * args.size for recs in records.values())
    label_map_bytes = sum(label_map.nbytes for label_map in label_maps.values())
    ratio = timing.paired_ratio(times["segment"], times["partition"])
    result = {
        "benchmark": "segment",
        "backend": segmenter.info["backend"],
        "segmenter": segmenter.info["generator"],
        "image_size": args.size,
        "n_images": len(images),
        **timing.timing_fields(args, times),
        "images_per_s_at_median": {
            name: round(len(images) / timing.summarize(values)["median"], 2)
            for name, values in times.items()
        },
        "ratios": {"segment_over_partition": ratio},
        "masks_per_image_mean": raw_mask_bytes / (len(images) * args.size * args.size),
        "zarr_store_bytes": store_bytes,
        "raw_mask_bytes": raw_mask_bytes,
        "label_map_uint16_bytes": label_map_bytes,
        "zarr_vs_raw_masks_ratio": store_bytes / raw_mask_bytes,
        "zarr_vs_uint16_ratio": store_bytes / label_map_bytes,
    }
    targets = [
        timing.Target(
            "segment_over_partition",
            ratio["median"],
            ">=",
            1.0,
            "building the partition costs no more than segmenting",
        ),
        timing.Target(
            "zarr_over_uint16",
            store_bytes / label_map_bytes,
            "<",
            1.0,
            "Zarr store smaller than uncompressed uint16 label maps",
        ),
    ]
    return timing.finish(result, targets, args)
