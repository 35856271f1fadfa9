"""OneStepSR: persistence, determinism, error maps, reference(), VSD regulariser."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import load_model
from pipeline.models.onestep import OneStepSR, image_gradient_loss
from pipeline.seeding import torch_generator

TINY = {"block_out_channels": (16, 32), "seed": 3}


@pytest.fixture(scope="module")
def model() -> OneStepSR:
    model = OneStepSR.build_tiny(**TINY)
    # non-zero LoRA B and output layer so the adapter and the network both matter
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "lora_B" in name or "conv_out" in name:
                p.copy_(torch.randn(p.shape, generator=torch_generator(0, "t", name)) * 0.01)
    return model


def images(batch: int, size: int = 32, key: str = "lq") -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch_generator(0, key)) * 2 - 1


def test_untrained_generator_returns_the_lq():
    # zero output layer: z_hat = z_L = 0 for the residual codec, so the output is the LQ
    fresh = OneStepSR.build_tiny(**TINY)
    lq = images(2)
    assert torch.allclose(fresh.sample(lq, prompts=["", ""]), lq, atol=1e-6)


def test_save_load_identity(model, tmp_path):
    lq = images(2)
    before = model.sample(lq, prompts=["a", "b"])
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "dspo_model.json").is_file()
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, OneStepSR)
    assert torch.equal(loaded.sample(lq, prompts=["a", "b"]), before)
    # the loaded stack is frozen; a fresh zero adapter on top is the trainable one
    assert [a["name"] for a in loaded.adapters] == ["stage0", "stage1"]
    with loaded.reference():
        assert torch.equal(loaded.sample(lq, prompts=["a", "b"]), before)
    trainable = {id(p) for p in loaded.trainable_parameters()}
    assert trainable and trainable == {id(p) for p in loaded.parameters() if p.requires_grad}
    assert all(".stage1." in n for n, p in loaded.named_parameters() if id(p) in trainable)


def test_sample_is_deterministic_and_batch_consistent(model):
    lq = images(3)
    first = model.sample(lq, prompts=["x"] * 3)
    assert torch.equal(first, model.sample(lq, prompts=["x"] * 3))
    alone = model.sample(lq[1:2], prompts=["x"])
    assert torch.allclose(alone, first[1:2], atol=1e-5)


def test_error_map_equals_hand_computed_mse(model):
    lq, targets = images(2), torch.stack([images(2, key="t1"), images(2, key="t2")], dim=1)
    t, noise = model.draw_timesteps_and_noise(lq, torch_generator(0, "draw"))
    assert t.tolist() == [999, 999]
    maps = model.error_maps(lq, targets, t, noise, ["", ""])
    # by hand: one UNet call at t = 999, x0 from eps, residual codec of each target
    with torch.no_grad():
        z_lq = torch.zeros(2, 48, 8, 8)
        unet_input = torch.cat([z_lq, torch.nn.functional.pixel_unshuffle(lq, 4)], 1)
        emb = model._text(["", ""])
        eps = model.unet(unet_input, torch.full((2,), 999), encoder_hidden_states=emb).sample
        alpha = model.scheduler.alphas_cumprod[999]
        z_hat = (z_lq - (1 - alpha).sqrt() * eps) / alpha.sqrt()
        for n in range(2):
            target = torch.nn.functional.pixel_unshuffle((targets[:, n] - lq) * 4.0, 4)
            expected = (z_hat - target).pow(2).mean(1)
            assert torch.allclose(maps[:, n], expected, atol=1e-5, rtol=1e-5)
    # the noise draw is unused: other noise, same maps
    assert torch.equal(model.error_maps(lq, targets, t, noise * 0 + 5, ["", ""]), maps)


def test_reference_is_base_and_differs_with_nonzero_lora():
    fresh = OneStepSR.build_tiny(**TINY)
    with torch.no_grad():
        fresh.unet.conv_out.base_layer.weight.normal_(generator=torch_generator(0, "w"))
    lq = images(1)
    with fresh.reference():
        base = fresh.sample(lq, prompts=[""])
    assert torch.equal(fresh.sample(lq, prompts=[""]), base)  # B = 0 at init
    with torch.no_grad():
        for p in fresh.trainable_parameters():
            p.add_(0.05)
    assert not torch.allclose(fresh.sample(lq, prompts=[""]), base, atol=1e-4)
    with fresh.reference():
        assert torch.equal(fresh.sample(lq, prompts=[""]), base)


def test_error_map_gradients_reach_only_the_top_adapter(model):
    lq = images(1)
    for p in model.parameters():
        p.grad = None
    maps = model.error_maps(
        lq,
        images(1, key="t")[:, None],
        *model.draw_timesteps_and_noise(lq, torch_generator(0, "d")),
        [""],
    )
    maps.mean().backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad and all(".stage0." in n and "lora_" in n for n in with_grad)


def test_pretrain_loss_terms_and_vae_codec_lora():
    vae_model = OneStepSR.build_tiny(codec="vae", block_out_channels=(16, 32), lambda_vsd=0.0)
    assert vae_model.settings.lq_condition == "none"
    names = [n for n, _ in vae_model.codec.vae.named_parameters() if "lora_A.stage0" in n]
    assert any(n.startswith("quant_conv") for n in names)
    assert names and not any(n.startswith("decoder") for n in names)
    params = vae_model.pretrain_parameters()
    lq, hq = images(2), images(2, key="hq")
    loss, stats = vae_model.pretrain_loss(lq, hq, ["", ""], torch_generator(0, "l"))
    assert set(stats) == {"loss", "l2", "lpips"}
    expected = stats["l2"] + 2.0 * stats["lpips"]
    assert stats["loss"] == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert any(p.grad is not None for n, p in vae_model.codec.vae.named_parameters() if "lora" in n)
    assert all(p.requires_grad for p in params)


def test_vsd_regulariser_trains_disjoint_parameter_sets():
    vsd = OneStepSR.build_tiny(**TINY, cfg_vsd=6.0)
    vsd.pretrain_parameters()
    lq, hq = images(2), images(2, key="hq")
    loss, stats = vsd.pretrain_loss(lq, hq, ["a", "b"], torch_generator(0, "l"))
    assert {"vsd", "vsd_lora", "score_real"} <= set(stats)
    # the VSD term alone moves only the generator
    for p in vsd.parameters():
        p.grad = None
    vsd_only = vsd.distribution_matching_loss(
        vsd.predict_latent(lq, vsd._text(["a", "b"])),
        vsd._text(["a", "b"]),
        vsd._text(["", ""]),
        torch_generator(0, "v"),
    )
    vsd_only.backward()
    assert all(p.grad is None for p in vsd.regulariser.parameters())
    assert any(p.grad is not None for p in vsd.unet.parameters())


def test_gradient_loss_is_zero_for_equal_images_and_positive_otherwise():
    a, b = images(1), images(1, key="b")
    assert float(image_gradient_loss(a, a)) == 0.0
    expected = (a[..., 1:] - a[..., :-1] - b[..., 1:] + b[..., :-1]).abs().mean() + (
        a[..., 1:, :] - a[..., :-1, :] - b[..., 1:, :] + b[..., :-1, :]
    ).abs().mean()
    assert float(image_gradient_loss(a, b)) == pytest.approx(float(expected))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_one_step_x0_follows_the_scheduler_prediction_type(prediction_type):
    """Issue 12.3: z_hat (and the VSD x0s) use the scheduler's prediction_type, matching
    DDPMScheduler.step's pred_original_sample; an ε-only formula is wrong for a v base."""
    from diffusers import DDPMScheduler

    from pipeline.models.onestep import sd_scheduler_config

    fresh = OneStepSR.build_tiny(**TINY)
    config = {**sd_scheduler_config(), "prediction_type": prediction_type}
    fresh.scheduler = DDPMScheduler.from_config(config)
    with torch.no_grad():
        for name, p in fresh.unet.named_parameters():
            if "conv_out" in name:
                p.copy_(torch.randn(p.shape, generator=torch_generator(1, name)) * 0.05)
    lq = images(2)
    embeddings = fresh._text(["a", "b"])
    with torch.no_grad():
        z_hat = fresh.predict_latent(lq, embeddings)
        z_lq, unet_input = fresh.generator_input(lq)
        timestep = fresh.settings.timestep
        output = fresh.unet(
            unet_input, torch.full((2,), timestep), encoder_hidden_states=embeddings
        )
    expected = fresh.scheduler.step(output.sample, timestep, z_lq).pred_original_sample
    torch.testing.assert_close(z_hat, expected, rtol=1e-5, atol=1e-5)
    # the VSD path: x0 of noisy latents at other timesteps, batch of mixed t
    noisy = torch.randn(2, *z_lq.shape[1:], generator=torch_generator(2, "noisy"))
    prediction = torch.randn(noisy.shape, generator=torch_generator(3, "prediction"))
    timesteps = torch.tensor([20, 700])
    for i, t in enumerate(timesteps.tolist()):
        step = fresh.scheduler.step(prediction[i : i + 1], t, noisy[i : i + 1])
        torch.testing.assert_close(
            fresh._x0(noisy, prediction, timesteps)[i : i + 1],
            step.pred_original_sample,
            rtol=1e-5,
            atol=1e-5,
        )
