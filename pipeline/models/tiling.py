"""Tiled latent processing: overlapping tiles blended with Gaussian weights (OSEDiff, SeeSR).

A function predicting on one latent tile is run over a grid of overlapping tiles; predictions
are averaged with Gaussian weights peaked at each tile's centre, so seams vanish and memory is
bounded by the tile size whatever the image size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one axis: stride ``tile - overlap``, the last tile flush with the end."""
    if length <= tile:
        return [0]
    stride = max(tile - overlap, 1)
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def gaussian_weights(height: int, width: int, variance: float = 0.01) -> torch.Tensor:
    """``[height, width]`` weights: a separable Gaussian in coordinates normalised by tile size
    (OSEDiff ``_gaussian_weights``, variance 0.01)."""

    def profile(size: int) -> torch.Tensor:
        position = torch.arange(size, dtype=torch.float64)
        midpoint = (size - 1) / 2
        values = torch.exp(-((position - midpoint) ** 2) / (size * size) / (2 * variance))
        return values / math.sqrt(2 * math.pi * variance)

    return torch.outer(profile(height), profile(width)).float()


def tiled_apply(
    predict: Callable[[slice, slice], torch.Tensor],
    shape: tuple[int, ...],
    tile_size: int,
    overlap: int,
) -> torch.Tensor:
    """Blend ``predict(rows, cols)`` (a ``[B, C, tile_h, tile_w]`` tensor for the latent region
    ``rows x cols``) over a tile grid covering a latent of ``shape = (B, C, H, W)``.

    ``tile_size <= 0`` or a latent that fits in one tile calls ``predict`` once on the whole.
    """
    height, width = shape[-2:]
    if tile_size <= 0 or (height <= tile_size and width <= tile_size):
        return predict(slice(0, height), slice(0, width))
    total = None
    weight_sum = torch.zeros(height, width)
    for top in tile_starts(height, tile_size, overlap):
        for left in tile_starts(width, tile_size, overlap):
            rows = slice(top, min(top + tile_size, height))
            cols = slice(left, min(left + tile_size, width))
            prediction = predict(rows, cols)
            weights = gaussian_weights(*prediction.shape[-2:])
            if total is None:
                total = torch.zeros(shape, dtype=prediction.dtype, device=prediction.device)
            total[..., rows, cols] += prediction * weights.to(prediction)
            weight_sum[rows, cols] += weights
    return total / weight_sum.to(total)
