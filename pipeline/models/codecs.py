"""Latent codecs: the SD VAE for real weights, a lossless residual pixel codec for the demo.

Both are ``nn.Module``s (so ``model.to(device)`` moves them) and implement
:class:`~pipeline.models.base.LatentCodec`. A codec folder holds ``config.json`` (type and
settings) and, for the VAE, its ``save_pretrained`` folder under ``vae/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from pipeline.models.base import LatentCodec


class ResidualPixelCodec(nn.Module, LatentCodec):
    """``latent = pixel_unshuffle((image - lq) * scale, factor)``; decode is the exact inverse.

    Coding the residual over the bicubic LQ makes a tiny model trained from scratch on a CPU
    give real images (docs/design.md §6): the network only has to learn the missing detail.
    """

    def __init__(self, factor: int = 4, scale: float = 4.0):
        super().__init__()
        self.factor = int(factor)
        self.scale = float(scale)
        self.latent_channels = 3 * self.factor**2
        self.downscale = self.factor

    def encode(self, images: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle((images - lq) * self.scale, self.factor)

    def decode(self, latents: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, self.factor) / self.scale + lq

    def config(self) -> dict:
        return {"type": "residual_pixel", "factor": self.factor, "scale": self.scale}


class VaeCodec(nn.Module, LatentCodec):
    """The SD ``AutoencoderKL``: deterministic posterior mode, times the scaling factor.

    The LQ is ignored. ``tile_size`` (pixels, 0 = off) turns on diffusers' tiled encode/decode
    so large images run in bounded memory.
    """

    def __init__(self, vae: AutoencoderKL, tile_size: int = 0):
        super().__init__()
        self.vae = vae.requires_grad_(False)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.latent_channels = int(vae.config.latent_channels)
        self.downscale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.tile_size = int(tile_size)
        if self.tile_size:
            vae.enable_tiling()
            vae.tile_sample_min_size = self.tile_size
            vae.tile_latent_min_size = self.tile_size // self.downscale

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, tile_size: int = 0, **kwargs) -> VaeCodec:
        """Load the VAE from a folder (``subfolder``, ``local_files_only`` pass through)."""
        return cls(AutoencoderKL.from_pretrained(path_or_id, **kwargs), tile_size=tile_size)

    def encode(self, images: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return (posterior.mode() - self.shift_factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(latents).sample

    def config(self) -> dict:
        return {"type": "vae", "tile_size": self.tile_size}


def save_codec(codec: LatentCodec, directory: str | Path) -> None:
    """Write ``directory/config.json`` (+ ``directory/vae/`` for a VAE codec)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(codec, VaeCodec):
        codec.vae.save_pretrained(directory / "vae", safe_serialization=True)
    elif not isinstance(codec, ResidualPixelCodec):
        raise TypeError(f"cannot save codec of type {type(codec).__name__}")
    (directory / "config.json").write_text(json.dumps(codec.config(), indent=2) + "\n")


def load_codec(directory: str | Path, **overrides) -> LatentCodec:
    """Read a codec folder written by :func:`save_codec`; ``overrides`` replace config entries
    (e.g. ``tile_size`` for the VAE)."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"codec config not found: {config_file}")
    config = {**json.loads(config_file.read_text()), **overrides}
    kind = config.pop("type")
    if kind == "residual_pixel":
        return ResidualPixelCodec(**config)
    if kind == "vae":
        return VaeCodec.from_pretrained(directory / "vae", **config)
    raise ValueError(f"unknown codec type {kind!r} in {config_file}")


def build_tiny_vae(sample_size: int = 32) -> AutoencoderKL:
    """A tiny 2-level AutoencoderKL (4 latent channels, factor 2) for tests."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
    )


def build_tiny_codec(codec: str, factor: int = 4, pixel_scale: float = 4.0) -> LatentCodec:
    """The codec of a tiny model: ``pixel`` (the demo's residual codec) or a tiny SD-style VAE."""
    if codec == "pixel":
        return ResidualPixelCodec(factor=factor, scale=pixel_scale)
    if codec == "vae":
        return VaeCodec(build_tiny_vae())
    raise ValueError(f"model.codec must be 'pixel' or 'vae', got {codec!r}")
