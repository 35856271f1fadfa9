"""Multi-step SR family: persistence, sampling, guidance, tiling, error maps, colour fix."""

import json

import pytest
import torch
import torch.nn.functional as F

from pipeline.models import build_tiny_model, load_model
from pipeline.models.colorfix import adain_color_fix, wavelet_blur, wavelet_color_fix
from pipeline.models.multistep import MultiStepSR
from pipeline.models.tiling import gaussian_weights, tiled_apply
from tests.test_loading import write_tiny_sd_folder

TINY = {"block_out_channels": (16, 32), "text_hidden_size": 16}


@pytest.fixture(scope="module")
def model() -> MultiStepSR:
    return build_tiny_model("multistep", **TINY).eval()


def _images(seed: int, size: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def _sample(model, lq, **kwargs):
    kwargs = {"prompts": ["a red barn", "grass"], "steps": 3, "cfg": 3.0, **kwargs}
    kwargs.setdefault("generators", _generators(1, 2))
    return model.sample(lq, **kwargs)


def test_save_load_identity(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    for sub in ("unet", "controlnet", "text_encoder", "tokenizer", "scheduler", "codec"):
        assert (tmp_path / "m" / sub).is_dir(), sub
    description = json.loads((tmp_path / "m" / "dspo_model.json").read_text())
    assert description["framework"] == "multistep"
    assert description["settings"]["sampler"] == "ddpm"
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, MultiStepSR)
    lq = _images(0)
    torch.testing.assert_close(_sample(loaded, lq), _sample(model, lq), rtol=0, atol=0)
    overridden = load_model(tmp_path / "m", sampler="ddim", cfg=7.0)
    assert (overridden.settings.sampler, overridden.settings.cfg) == ("ddim", 7.0)


def test_sampling_is_deterministic_per_image_seed(model):
    lq = _images(1)
    first, again = _sample(model, lq), _sample(model, lq)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert first.shape == lq.shape and first.abs().max() <= 1.0
    other_seed = _sample(model, lq, generators=_generators(1, 3))
    # image 0 keeps its generator and must not depend on its neighbour's seed
    torch.testing.assert_close(other_seed[0], first[0], rtol=0, atol=0)
    assert not torch.equal(other_seed[1], first[1])


def test_ddim_sampler_runs_and_differs_from_ddpm():
    ddim = build_tiny_model("multistep", sampler="ddim", **TINY)
    ddpm = build_tiny_model("multistep", **TINY)
    lq = _images(2)
    assert not torch.allclose(_sample(ddim, lq), _sample(ddpm, lq))


def test_guidance_combines_branches_and_cfg_one_ignores_negative(model):
    lq = _images(3)
    latents = torch.randn(2, 48, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([100, 700])
    prompt, negative = model._text(["a red barn", "grass"]), model._text(["blurry", "noise"])
    with torch.no_grad():
        conditional = model.predict_noise(latents, timesteps, lq, prompt)
        unconditional = model.predict_noise(latents, timesteps, lq, negative)
        guided = model.guided_noise(latents, timesteps, lq, prompt, negative, 3.0)
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional))
    with_negative = _sample(model, lq, cfg=1.0, negative_prompts=["blurry", "noise"])
    without = _sample(model, lq, cfg=1.0)
    torch.testing.assert_close(with_negative, without, rtol=0, atol=0)


def test_negative_prompt_changes_guided_output(model):
    lq = _images(4)
    plain = _sample(model, lq)
    negative = _sample(model, lq, negative_prompts=["blurry noise", "oil painting"])
    assert (plain - negative).abs().max() > 1e-4


def test_tiled_equals_untiled_when_image_fits_one_tile():
    lq = _images(5)
    untiled = build_tiny_model("multistep", latent_tile_size=0, **TINY)
    one_tile = build_tiny_model("multistep", latent_tile_size=8, latent_tile_overlap=2, **TINY)
    torch.testing.assert_close(_sample(one_tile, lq), _sample(untiled, lq), rtol=0, atol=0)
    several = build_tiny_model("multistep", latent_tile_size=4, latent_tile_overlap=2, **TINY)
    assert _sample(several, lq).shape == lq.shape


def test_tile_blending_reconstructs_a_tiled_function():
    field = torch.randn(1, 2, 13, 10, generator=torch.Generator().manual_seed(0))
    calls = []

    def predict(rows, cols):
        calls.append((rows, cols))
        return field[..., rows, cols] * 2

    blended = tiled_apply(predict, field.shape, tile_size=6, overlap=2)
    torch.testing.assert_close(blended, field * 2)
    assert len(calls) == 3 * 2  # rows start 0, 4, 7; cols start 0, 4
    weights = gaussian_weights(5, 5)
    assert weights.argmax() == 12 and weights[0, 0] < weights[2, 2]


def test_error_map_equals_hand_computed_mse(model):
    lq, targets = _images(6), torch.stack([_images(7), _images(8)], dim=1)
    timesteps, noise = torch.tensor([10, 900]), torch.randn(2, 48, 8, 8)
    prompts = ["a red barn", ""]
    with torch.no_grad():
        maps = model.error_maps(lq, targets, timesteps, noise, prompts)
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        alpha_bar = torch.cumprod(1 - betas, 0).float()
        tokens = model.tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt")
        embeddings = model.text_encoder(tokens.input_ids).last_hidden_state
        for i in range(2):
            for n in range(2):
                latent = F.pixel_unshuffle((targets[i, n] - lq[i])[None] * 4.0, 4)
                a = alpha_bar[timesteps[i]]
                noisy = a.sqrt() * latent + (1 - a).sqrt() * noise[i : i + 1]
                down, mid = model.controlnet(
                    noisy,
                    timesteps[i : i + 1],
                    embeddings[i : i + 1],
                    lq[i : i + 1],
                    return_dict=False,
                )
                eps = model.unet(
                    noisy,
                    timesteps[i : i + 1],
                    embeddings[i : i + 1],
                    down_block_additional_residuals=down,
                    mid_block_additional_residual=mid,
                ).sample
                expected = ((eps - noise[i : i + 1]) ** 2).mean(dim=1)[0]
                torch.testing.assert_close(maps[i, n], expected, rtol=1e-4, atol=1e-5)


def test_trainable_set_reference_and_pretrain_gradients():
    model = build_tiny_model("multistep", train_unet=False, gradient_checkpointing=True, **TINY)
    assert model.unet.is_gradient_checkpointing and model.controlnet.is_gradient_checkpointing
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in model.controlnet.parameters()}
    assert not any(p.requires_grad for p in model.unet.parameters())
    lq, hq = _images(9), _images(10)
    timesteps, noise = model.draw_timesteps_and_noise(lq, torch.Generator().manual_seed(0))
    before = model.error_maps(lq, hq[:, None], timesteps, noise, ["a", "b"]).detach()
    loss, stats = model.pretrain_loss(lq, hq, ["a", "b"], torch.Generator().manual_seed(1))
    loss.backward()
    assert stats["loss"] == pytest.approx(float(loss.detach()))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())
    with model.reference():
        pass  # the snapshot is taken on first use, before any update
    with torch.no_grad():
        for parameter in model.controlnet.parameters():
            parameter.add_(0.05)
    after = model.error_maps(lq, hq[:, None], timesteps, noise, ["a", "b"]).detach()
    with model.reference():
        reference = model.error_maps(lq, hq[:, None], timesteps, noise, ["a", "b"]).detach()
    assert not torch.allclose(after, before)
    torch.testing.assert_close(reference, before, rtol=0, atol=0)
    assert all(not p.requires_grad for p in model._reference_modules["controlnet"].parameters())


def test_from_sd_base_builds_controlnet_from_unet(tmp_path):
    write_tiny_sd_folder(tmp_path / "sd")
    model = load_model(tmp_path / "sd", framework="multistep", color_fix="wavelet")
    assert model.describe()["weights"] == str(tmp_path / "sd")
    assert type(model.codec).__name__ == "VaeCodec"
    lq = _images(11, size=16)
    assert _sample(model, lq).shape == lq.shape


def test_missing_weights_name_path_and_files(tmp_path):
    write_tiny_sd_folder(tmp_path / "sd")
    (tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (tmp_path / "sd" / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError) as error:
        MultiStepSR.from_sd_base(tmp_path / "sd")
    message = str(error.value)
    assert str(tmp_path / "sd") in message
    assert "unet/diffusion_pytorch_model.safetensors" in message
    assert "scheduler/scheduler_config.json" in message
    assert "vae/" not in message
    with pytest.raises(FileNotFoundError, match="weights: .*nowhere does not exist; downloads"):
        MultiStepSR.from_sd_base(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="dspo_model.json"):
        load_model(tmp_path / "sd")
    # an org/name string is a hub id only with downloads allowed; offline it is a missing path
    with pytest.raises(FileNotFoundError, match="does not exist; downloads are off"):
        MultiStepSR.from_sd_base("no-such-org-dspo/no-such-model")


def test_adain_matches_reference_statistics():
    image, reference = _images(12) * 0.3 + 0.2, _images(13) * 0.8 - 0.1
    fixed = adain_color_fix(image, reference)
    torch.testing.assert_close(
        fixed.mean(dim=(2, 3)), reference.mean(dim=(2, 3)), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(fixed.std(dim=(2, 3)), reference.std(dim=(2, 3)), atol=1e-4, rtol=0)


def test_wavelet_keeps_lq_low_frequencies():
    lq = _images(14)
    shifted = lq + torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1)
    # a constant colour cast is pure low frequency: the fix removes it entirely
    torch.testing.assert_close(wavelet_color_fix(shifted, lq), lq, atol=1e-5, rtol=0)

    def low_pass(image):  # five à-trous blurs, radii 1..16, written out by hand
        for radius in (1, 2, 4, 8, 16):
            padded = F.pad(image, (radius,) * 4, mode="replicate")
            kernel = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16
            image = F.conv2d(padded, kernel.expand(3, 1, 3, 3), groups=3, dilation=radius)
        return image

    content = _images(15)
    expected = content - low_pass(content) + low_pass(lq)
    torch.testing.assert_close(wavelet_color_fix(content, lq), expected, atol=1e-5, rtol=0)
    assert wavelet_blur(torch.ones(1, 3, 8, 8), 4).sub(1).abs().max() < 1e-6


def test_odd_sizes_are_padded_and_cropped_back(model):
    lq = _images(16, size=20)  # not a multiple of the model stride (codec 4 x UNet 2 = 8)
    out = _sample(model, lq, steps=2)
    assert out.shape == lq.shape


def _live_controlnet(model: MultiStepSR, seed: int = 5) -> MultiStepSR:
    """A fresh ControlNet's zero convolutions make its residuals 0 whatever the conditioning;
    random weights there make the conditioning matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.controlnet.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def _step_inputs(model: MultiStepSR, lq: torch.Tensor):
    down = model.codec.downscale
    shape = (lq.shape[0], model.codec.latent_channels, lq.shape[2] // down, lq.shape[3] // down)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    timesteps = torch.full((lq.shape[0],), 500)
    return latents, timesteps, model._text(["a red barn"] * lq.shape[0])


def _manual_noise(model: MultiStepSR, latents, timesteps, embeddings, controlnet_cond):
    with torch.no_grad():
        down, mid = model.controlnet(
            latents,
            timesteps,
            encoder_hidden_states=embeddings,
            controlnet_cond=controlnet_cond,
            return_dict=False,
        )
        return model.unet(
            latents,
            timesteps,
            encoder_hidden_states=embeddings,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample


def test_controlnet_conditioning_is_what_the_diffusers_pipeline_feeds():
    """Issue 12.3: the LQ enters the ControlNet in [0, 1], as StableDiffusionControlNetPipeline
    (prepare_image: VaeImageProcessor with do_normalize=False) and train_controlnet.py give it."""
    from diffusers import StableDiffusionControlNetPipeline
    from PIL import Image

    from pipeline.io.images import signed_tensor

    model = _live_controlnet(build_tiny_model("multistep", codec="vae", **TINY).eval())
    pixels = (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(3)) * 255).byte()
    pipe = StableDiffusionControlNetPipeline(
        vae=model.codec.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        controlnet=model.controlnet,
        scheduler=model.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    fed = pipe.prepare_image(
        Image.fromarray(pixels.numpy()),
        width=32,
        height=32,
        batch_size=1,
        num_images_per_prompt=1,
        device="cpu",
        dtype=torch.float32,
    )
    lq = signed_tensor(pixels.numpy())[None]
    torch.testing.assert_close(model.controlnet_condition(lq), fed, rtol=0, atol=1e-6)
    latents, timesteps, embeddings = _step_inputs(model, lq)
    ours = model.predict_noise(latents, timesteps, lq, embeddings)
    expected = _manual_noise(model, latents, timesteps, embeddings, fed)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert model.describe()["controlnet_conditioning_range"] == "0,1"


def test_legacy_model_folder_keeps_its_conditioning_range(tmp_path):
    """A folder saved before the [0, 1] convention (no controlnet_conditioning_range in
    dspo_model.json) still feeds the LQ in [-1, 1] and gives the outputs it gave."""
    model = _live_controlnet(build_tiny_model("multistep", **TINY).eval())
    model.save_pretrained(tmp_path / "new")
    description = json.loads((tmp_path / "new" / "dspo_model.json").read_text())
    assert description["controlnet_conditioning_range"] == "0,1"
    del description["controlnet_conditioning_range"]
    model.save_pretrained(tmp_path / "legacy")
    (tmp_path / "legacy" / "dspo_model.json").write_text(json.dumps(description))
    legacy = load_model(tmp_path / "legacy").eval()
    assert legacy.conditioning_range == "-1,1"
    lq = _images(21, size=16, batch=1)
    latents, timesteps, embeddings = _step_inputs(legacy, lq)
    old = _manual_noise(legacy, latents, timesteps, embeddings, lq)  # the old code's call
    torch.testing.assert_close(
        legacy.predict_noise(latents, timesteps, lq, embeddings), old, rtol=0, atol=0
    )
    current = load_model(tmp_path / "new").eval()
    assert not torch.allclose(current.predict_noise(latents, timesteps, lq, embeddings), old)
    legacy.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "dspo_model.json").read_text())
    assert resaved["controlnet_conditioning_range"] == "-1,1"


def test_guidance_at_or_below_one_runs_only_the_conditional_branch(model):
    """diffusers: do_classifier_free_guidance = guidance_scale > 1. A scale of 0.5 runs one
    UNet batch per step (no unconditional half) and equals scale 1."""
    batches = []
    hook = model.unet.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    try:
        lq = _images(22, size=16)
        half = _sample(model, lq, cfg=0.5)
        assert batches and set(batches) == {2}, batches
        batches.clear()
        one = _sample(model, lq, cfg=1.0)
        guided = _sample(model, lq, cfg=3.0)
        assert set(batches) == {2, 4}
    finally:
        hook.remove()
    torch.testing.assert_close(half, one, rtol=0, atol=0)
    assert not torch.equal(half, guided)
