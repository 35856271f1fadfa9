"""Colour correction of SR outputs against the LQ, as OSEDiff and SeeSR define it.

Both work on ``[B, 3, H, W]`` tensors in [-1, 1]; ``reference`` is the HQ-sized LQ.
(OSEDiff ``my_utils/wavelet_color_fix.py``: ``adain_color_fix``, ``wavelet_color_fix``.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOR_FIXES = ("adain", "wavelet", "none")


def _mean_std(images: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    flat = images.flatten(2)
    std = (flat.var(dim=2) + eps).sqrt()
    return flat.mean(dim=2)[..., None, None], std[..., None, None]


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Give each channel of ``image`` the mean and standard deviation of ``reference``'s."""
    image_mean, image_std = _mean_std(image)
    reference_mean, reference_std = _mean_std(reference)
    return (image - image_mean) / image_std * reference_std + reference_mean


def wavelet_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    """The à-trous 3x3 binomial blur with dilation ``radius`` and replicate padding."""
    kernel = torch.tensor(
        [[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]],
        dtype=image.dtype,
        device=image.device,
    )
    channels = image.shape[1]
    kernel = kernel.expand(channels, 1, 3, 3)
    padded = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=radius)


def wavelet_decomposition(
    image: torch.Tensor, levels: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(high frequencies, low frequencies) after ``levels`` blurs of radius 1, 2, 4, ..."""
    high = torch.zeros_like(image)
    for level in range(levels):
        low = wavelet_blur(image, 2**level)
        high = high + (image - low)
        image = low
    return high, image


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Keep ``image``'s high frequencies and take the low frequencies from ``reference``."""
    image_high, _ = wavelet_decomposition(image)
    _, reference_low = wavelet_decomposition(reference)
    return image_high + reference_low


def apply_color_fix(image: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    """``method`` in :data:`COLOR_FIXES`; the result is clamped to [-1, 1]."""
    if method == "adain":
        image = adain_color_fix(image, reference)
    elif method == "wavelet":
        image = wavelet_color_fix(image, reference)
    elif method != "none":
        raise ValueError(f"unknown color_fix {method!r}; expected one of {COLOR_FIXES}")
    return image.clamp(-1.0, 1.0)
