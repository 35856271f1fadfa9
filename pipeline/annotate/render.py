"""The PNGs the annotation page shows, made from files the task lists resolved.

Instance views: the instance box padded by :data:`PAD` of its size (at least 8 pixels), cut
from a candidate, the HQ or the LQ (the LQ box scaled by the LQ/HQ size ratio and enlarged to
the HQ crop's size), enlarged with nearest-neighbour sampling so the longer side is at least
:data:`MIN_EDGE` pixels, with the instance mask outlined in :data:`OUTLINE` colour.
Compare views are the SR/HQ file as it is and the LQ enlarged (nearest) to the SR size.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.io.images import read_rgb
from pipeline.io.masks import read_label_map

PAD = 0.25
MIN_EDGE = 256
OUTLINE = (255, 0, 255)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def crop_box(bbox: tuple[int, int, int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the padded instance box, inside the image."""
    x, y, w, h = bbox
    pad = max(8, int(round(PAD * max(w, h))))
    return max(0, y - pad), max(0, x - pad), min(height, y + h + pad), min(width, x + w + pad)


def enlarge(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``array`` resized to (height, width) by nearest-neighbour sampling."""
    image = Image.fromarray(array)
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.NEAREST))


def outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a boolean mask (in the mask, with a 4-neighbour outside it)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def instance_view(
    image_path: Path,
    masks: Path,
    image_id: str,
    instance_id: int,
    bbox: tuple[int, int, int, int],
) -> bytes:
    """PNG of one candidate / HQ / LQ around an instance, mask outlined."""
    label_map = read_label_map(masks, image_id)
    height, width = label_map.shape
    top, left, bottom, right = crop_box(bbox, height, width)
    image = read_rgb(image_path)
    if image.shape[:2] != (height, width):  # the LQ: cut the same region, then enlarge
        sy, sx = image.shape[0] / height, image.shape[1] / width
        box = (
            int(top * sy),
            int(left * sx),
            max(int(top * sy) + 1, int(round(bottom * sy))),
            max(int(left * sx) + 1, int(round(right * sx))),
        )
        crop = enlarge(image[box[0] : box[2], box[1] : box[3]], (bottom - top, right - left))
    else:
        crop = image[top:bottom, left:right]
    mask = label_map[top:bottom, left:right] == instance_id
    factor = max(1, int(np.ceil(MIN_EDGE / max(crop.shape[:2]))))
    size = (crop.shape[0] * factor, crop.shape[1] * factor)
    crop = enlarge(np.ascontiguousarray(crop), size).copy()
    big_mask = enlarge(mask.astype(np.uint8) * 255, size) > 0
    edge = outline(big_mask)
    if factor >= 4:  # a two-pixel line stays visible on an enlarged crop
        edge |= outline(big_mask & ~edge)
    crop[edge] = OUTLINE
    return png_bytes(crop)


def compare_view(image_path: Path, size_of: Path | None = None) -> bytes:
    """PNG of an SR output or HQ; with ``size_of``, the image enlarged to that file's size."""
    image = read_rgb(image_path)
    if size_of is not None:
        target = read_rgb(size_of).shape[:2]
        if image.shape[:2] != target:
            image = enlarge(image, target)
    return png_bytes(image)
