"""Latent codecs: exact round trip, deterministic VAE encoding, save/load."""

import json

import pytest
import torch

from pipeline.models.codecs import (
    ResidualPixelCodec,
    VaeCodec,
    build_tiny_vae,
    load_codec,
    save_codec,
)


def _images(seed: int, size: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, size, size, generator=generator) * 2 - 1


def test_residual_pixel_codec_round_trip_and_layout():
    codec = ResidualPixelCodec(factor=4, scale=4.0)
    hq, lq = _images(0), _images(1)
    latents = codec.encode(hq, lq)
    assert latents.shape == (2, 48, 4, 4)
    assert codec.latent_channels == 48 and codec.downscale == 4
    # channel 0 of latent pixel (0, 0) is the scaled residual of image pixel (0, 0), red channel
    assert latents[0, 0, 0, 0] == pytest.approx(float((hq - lq)[0, 0, 0, 0] * 4.0), abs=1e-6)
    torch.testing.assert_close(codec.decode(latents, lq), hq, rtol=0, atol=1e-6)
    # the LQ itself is the zero latent
    assert codec.encode(lq, lq).abs().max() == 0


def test_vae_codec_is_deterministic_and_scaled():
    torch.manual_seed(0)
    vae = build_tiny_vae()
    codec = VaeCodec(vae)
    images = _images(2)
    first, second = codec.encode(images, images), codec.encode(images, images)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    posterior_mode = vae.encode(images).latent_dist.mode()
    torch.testing.assert_close(first, posterior_mode * vae.config.scaling_factor)
    assert first.shape == (2, 4, 8, 8) and codec.downscale == 2
    assert codec.decode(first, images).shape == images.shape
    assert not any(p.requires_grad for p in codec.parameters())


def test_save_and_load_codecs(tmp_path):
    pixel = ResidualPixelCodec(factor=2, scale=3.0)
    save_codec(pixel, tmp_path / "pixel")
    assert json.loads((tmp_path / "pixel" / "config.json").read_text())["type"] == "residual_pixel"
    loaded = load_codec(tmp_path / "pixel")
    assert (loaded.factor, loaded.scale) == (2, 3.0)

    torch.manual_seed(0)
    vae_codec = VaeCodec(build_tiny_vae())
    save_codec(vae_codec, tmp_path / "vae")
    assert (tmp_path / "vae" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    reloaded = load_codec(tmp_path / "vae")
    images = _images(3)
    torch.testing.assert_close(reloaded.encode(images, images), vae_codec.encode(images, images))


def test_load_codec_missing_config_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_codec(tmp_path / "nowhere")
