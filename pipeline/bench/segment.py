"""Benchmark of the segment stage on scikit-image's bundled photos (offline backend).

Prints one JSON object: images/s of the classical segmenter (mask records), images/s of
:func:`pipeline.segment.masks_to_partition` on those records, and the bytes of the Zarr
store against the raw masks it replaces (one bool byte per pixel per mask record, as SAM's
``binary_mask`` output holds them) and against uncompressed uint16 label maps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from skimage import data
from skimage.transform import resize

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
    parser = argparse.ArgumentParser(prog="python -m pipeline bench segment")
    parser.add_argument("--size", type=int, default=256, help="image edge in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the photos")
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args(argv)

    images = bench_images(args.size)
    segmenter = build_segmenter({"top_k": args.top_k})
    started = time.perf_counter()
    for _ in range(args.repeats):
        records = {name: generate_mask_records(image, segmenter) for name, image in images.items()}
    segment_seconds = time.perf_counter() - started

    started = time.perf_counter()
    for _ in range(args.repeats):
        label_maps = {
            name: masks_to_partition(recs, (args.size, args.size), args.top_k).label_map
            for name, recs in records.items()
        }
    partition_seconds = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder) / "bench.zarr"
        write_label_maps(store, label_maps, segmenter.info)
        store_bytes = directory_bytes(store)
    raw_mask_bytes = sum(len(recs) * args.size * args.size for recs in records.values())
    label_map_bytes = sum(label_map.nbytes for label_map in label_maps.values())
    n_images = len(images) * args.repeats
    result = {
        "backend": segmenter.info["backend"],
        "segmenter": segmenter.info["generator"],
        "image_size": args.size,
        "n_images": len(images),
        "repeats": args.repeats,
        "masks_per_image_mean": raw_mask_bytes / (len(images) * args.size * args.size),
        "segment_images_per_s": n_images / segment_seconds,
        "partition_images_per_s": n_images / partition_seconds,
        "zarr_store_bytes": store_bytes,
        "raw_mask_bytes": raw_mask_bytes,
        "label_map_uint16_bytes": label_map_bytes,
        "zarr_vs_raw_masks_ratio": store_bytes / raw_mask_bytes,
        "zarr_vs_uint16_ratio": store_bytes / label_map_bytes,
    }
    print(json.dumps(result, indent=1))
    return 0
