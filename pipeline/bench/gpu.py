"""The training step and candidate sampling at paper scale, for a real GPU (README, Benchmarks).

``python -m pipeline bench gpu [--scale sd2|smoke] [--resolution 512] [--batches 1 4]
[--dtype bf16] [--repeats 3]`` builds the multi-step model (SD 2-base UNet + a ControlNet from
it + the SD VAE + a text encoder of SD 2's width) and the one-step model (the same UNet with a
LoRA, the same VAE) from the published configurations with random weights (nothing is
downloaded), and measures, for each batch size: the step time of Diffusion-DPO, one-pass DSPO
and two-pass DSPO (``train.memory``) with gradient checkpointing, each step's
``torch.cuda.max_memory_allocated`` (on CUDA) and its peak bytes saved for backward
(:func:`pipeline.bench.timing.saved_tensor_peak`), and candidate sampling throughput (images
per second) of both families. Steps are interleaved per round like every bench.

``--scale smoke`` keeps the architectures (block types, attention, ControlNet, VAE, text
encoder) at tiny widths so the CPU path runs in seconds (the tests call it); ``sd2`` is the
published size (about 865M UNet parameters) and is meant for a GPU.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from pipeline.bench import timing
from pipeline.bench.train_step import synthetic_batch
from pipeline.models.codecs import VaeCodec
from pipeline.models.components import build_tiny_tokenizer
from pipeline.models.multistep import (
    MultiStepSettings,
    MultiStepSR,
    conditioning_widths,
    sd_scheduler_config,
)
from pipeline.models.onestep import OneStepSettings, OneStepSR
from pipeline.training.config import TrainConfig
from pipeline.training.step import (
    PolicyErrors,
    backward_one_candidate_at_a_time,
    batch_loss,
    draw_conditions,
    error_map_gradients,
)

#: stabilityai/stable-diffusion-2-base unet/config.json (the keys that set its size)
SD2_UNET = {
    "block_out_channels": (320, 640, 1280, 1280),
    "attention_head_dim": (5, 10, 20, 20),
    "cross_attention_dim": 1024,
    "layers_per_block": 2,
    "use_linear_projection": True,
    "sample_size": 64,
}
#: its vae/config.json
SD2_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "sample_size": 512}
#: OpenCLIP ViT-H/14's text tower as SD 2 uses it (23 layers: the penultimate of 24)
SD2_TEXT = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
}
#: the same architectures at tiny widths (CPU smoke path)
SMOKE_UNET = {
    **SD2_UNET,
    "block_out_channels": (32, 32, 64, 64),
    "attention_head_dim": (1, 1, 2, 2),
    "cross_attention_dim": 32,
    "layers_per_block": 1,
}
SMOKE_VAE = {**SD2_VAE, "block_out_channels": (32, 32, 32, 32), "layers_per_block": 1}
SMOKE_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}
SCALES = {"sd2": (SD2_UNET, SD2_VAE, SD2_TEXT), "smoke": (SMOKE_UNET, SMOKE_VAE, SMOKE_TEXT)}
DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


def build_parts(scale: str, seed: int = 0) -> dict[str, Any]:
    """Random-weight UNet, VAE codec, text encoder and tokenizer of ``scale``."""
    unet_config, vae_config, text_config = SCALES[scale]
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **text_config,
        )
    )
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=4, down_block_types=DOWN, up_block_types=UP, **unet_config
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        **vae_config,
    )
    return {"unet": unet, "codec": VaeCodec(vae), "text": text, "tokenizer": tokenizer}


def build_models(scale: str, device: str, dtype: str) -> dict[str, Any]:
    """The multi-step model (ControlNet trainable, gradient checkpointing) and the one-step
    model (rank-4 LoRA) on ``device`` in ``dtype``."""
    parts = build_parts(scale)
    scheduler = DDPMScheduler.from_config(sd_scheduler_config())
    controlnet = ControlNetModel.from_unet(
        parts["unet"], conditioning_embedding_out_channels=conditioning_widths(8)
    )
    multistep = MultiStepSR(
        parts["unet"],
        controlnet,
        parts["text"],
        parts["tokenizer"],
        parts["codec"],
        scheduler,
        MultiStepSettings(gradient_checkpointing=True, weights=f"random {scale}"),
    ).to_device(device, dtype)
    onestep_parts = build_parts(scale)
    onestep = OneStepSR(
        onestep_parts["unet"],
        onestep_parts["text"],
        onestep_parts["tokenizer"],
        onestep_parts["codec"],
        DDPMScheduler.from_config(sd_scheduler_config()),
        OneStepSettings(weights=f"random {scale}"),
    ).to_device(device, dtype)
    return {"multistep": multistep, "onestep": onestep}


def _memory(device: torch.device, function) -> int | None:
    """``torch.cuda.max_memory_allocated`` over one call (None off CUDA)."""
    if device.type != "cuda":
        function()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    function()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def step_functions(model, batch: int, resolution: int, seed: int) -> dict[str, Any]:
    """One optimizer step of dpo, dspo (one pass) and dspo_two_pass on ``batch`` LQs."""
    config = TrainConfig(uncond_drop_rate=0.0)
    dspo, dpo = synthetic_batch(batch, 4, 5, resolution, seed)
    conditions = [draw_conditions(model, e, config, seed, 0, s) for s, e in enumerate(dspo)]
    parameters = list(model.trainable_parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=1e-6)
    policy = PolicyErrors(model)  # the models run their forwards under autocast themselves

    def one_pass(items, method):
        def run():
            optimizer.zero_grad(set_to_none=True)
            loss, _ = batch_loss(policy, model, items, conditions, method, config)
            loss.backward()
            optimizer.step()

        return run

    def two_pass():
        optimizer.zero_grad(set_to_none=True)
        _, _, gradients = error_map_gradients(model, dspo, conditions, "dspo", config)
        backward_one_candidate_at_a_time(
            policy, dspo, conditions, gradients, lambda loss: loss.backward()
        )
        optimizer.step()

    return {"dpo": one_pass(dpo, "dpo"), "dspo": one_pass(dspo, "dspo"), "dspo_two_pass": two_pass}


def sampling_rate(model, batch: int, resolution: int, steps: int, seed: int) -> float:
    """Images per second of ``model.sample`` on ``batch`` LQs (one timed call after a warm-up)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    lq = torch.rand(batch, 3, resolution, resolution, generator=generator).mul(2).sub(1).to(device)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    kwargs = {"prompts": [""] * batch, "negative_prompts": [""] * batch, "steps": steps}
    model.sample(lq, generators=generators, **kwargs)
    seconds = timing.interleave(
        {"sample": lambda: model.sample(lq, generators=generators, **kwargs)}, 1, 0
    )["sample"][0]
    return batch / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline bench gpu", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--scale", default="sd2", choices=sorted(SCALES))
    parser.add_argument("--resolution", type=int, default=512, help="HQ side in pixels")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--dtype",
        default="bf16",
        choices=("bf16", "float32"),
        help="bf16: frozen modules in bf16 and autocast (on CUDA; fp32 on a CPU)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sample-steps", type=int, default=20, help="multi-step sampling")
    parser.add_argument("--seed", type=int, default=0)
    timing.add_arguments(parser, repeats=3)
    args = parser.parse_args(argv)
    timing.pin_threads(args.threads)
    dtype = {"bf16": "bfloat16", "float32": "float32"}[args.dtype]
    models = build_models(args.scale, args.device, dtype)
    device = torch.device(args.device)
    result: dict[str, Any] = {
        "benchmark": "gpu",
        "scale": args.scale,
        "resolution": args.resolution,
        "dtype": args.dtype,
        "device": str(device),
        "gradient_checkpointing": True,
        "unet_parameters": sum(p.numel() for p in models["multistep"].unet.parameters()),
        "steps": {},
        "sampling_images_per_second": {},
    }
    targets = []
    for batch in args.batches:
        steps = step_functions(models["multistep"], batch, args.resolution, args.seed)
        times = timing.interleave(steps, args.repeats, args.warmup)
        parameters = list(models["multistep"].parameters())
        entry = {
            "seconds": {name: timing.summarize(values) for name, values in times.items()},
            "max_memory_allocated": {name: _memory(device, run) for name, run in steps.items()},
            "saved_for_backward_bytes": {
                name: timing.saved_tensor_peak(run, exclude=parameters)
                for name, run in steps.items()
            },
        }
        saved = entry["saved_for_backward_bytes"]
        targets.append(
            timing.Target(
                f"two_pass_saved_below_one_pass_b{batch}",
                saved["dspo_two_pass"] / saved["dspo"],
                "<",
                1.0,
                "two-pass DSPO saves less for backward than one-pass",
            )
        )
        result["steps"][f"batch{batch}"] = entry
        for framework, model in models.items():
            result["sampling_images_per_second"][f"{framework}_batch{batch}"] = round(
                sampling_rate(model, batch, args.resolution, args.sample_steps, args.seed), 4
            )
    return timing.finish(result, targets, args)


if __name__ == "__main__":
    sys.exit(main())
