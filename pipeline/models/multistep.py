"""The multi-step SR family: SD 2-base UNet + ControlNet on the LQ (docs/design.md §5).

The LQ (HQ-sized, in [-1, 1]) enters through a diffusers ``ControlNetModel`` as conditioning in
[0, 1], as diffusers' ``StableDiffusionControlNetPipeline`` and ``train_controlnet.py`` feed it
(models saved before that convention record none in ``dspo_model.json`` and keep [-1, 1]). Its
conditioning embedding downsamples by the codec's factor (8 for the SD VAE, 4 for the demo's residual pixel
codec), so its features land on the latent grid. Text prompts steer the UNet through
cross-attention; classifier-free guidance uses the negative prompt as the unconditional text.
Sampling runs spaced DDPM or DDIM; large images are denoised in Gaussian-blended latent tiles.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from pipeline import policy as online
from pipeline import settings
from pipeline.devices import resolve_device
from pipeline.io.atomic import atomic_path
from pipeline.models.base import LatentCodec, PolicySample, SRModel
from pipeline.models.codecs import (
    VaeCodec,
    build_tiny_codec,
    load_codec,
    save_codec,
)
from pipeline.models.colorfix import COLOR_FIXES, apply_color_fix
from pipeline.models.components import (
    SD_BASE_REQUIRED,
    DiffusionParts,
    build_tiny_text_encoder,
    build_tiny_unet,
    check_pretrained_folder,
    hub_load_error,
    load_tokenizer,
    resolve_pretrained,
)
from pipeline.models.tiling import tiled_apply
from pipeline.seeding import derive_seed

MODEL_FILE = "dspo_model.json"
#: channel widths of the ControlNet conditioning embedding; one stride-2 stage per entry after the first
CONDITIONING_WIDTHS = (16, 32, 96, 256)
SAMPLERS = ("ddpm", "ddim")
#: range of the ControlNet conditioning image: diffusers' convention, and what models saved
#: before it was recorded used (``dspo_model.json`` without ``controlnet_conditioning_range``)
CONDITIONING_RANGE = "0,1"
LEGACY_CONDITIONING_RANGE = "-1,1"
CONDITIONING_RANGES = (CONDITIONING_RANGE, LEGACY_CONDITIONING_RANGE)
#: what a folder written by :meth:`MultiStepSR.save_pretrained` holds
SAVED_REQUIRED: dict[str, list[str]] = {
    "unet": ["config.json", "diffusion_pytorch_model.safetensors"],
    "controlnet": ["config.json", "diffusion_pytorch_model.safetensors"],
    "text_encoder": ["config.json", "model.safetensors"],
    "scheduler": ["scheduler_config.json"],
}
CONTROLNET_REQUIRED = {"controlnet": SAVED_REQUIRED["controlnet"]}


#: the schema's ``pretrain.multistep.model`` defaults (pipeline/settings.py): the only copy of the values
_DEFAULTS = settings.defaults("pretrain.multistep.model")


@dataclasses.dataclass
class MultiStepSettings:
    """Everything besides weights that defines the model's behaviour (saved in dspo_model.json)."""

    sampler: str = _DEFAULTS["sampler"]  # "ddpm" (spaced ancestral) or "ddim" (eta 0)
    steps: int = _DEFAULTS["steps"]  # default sampling steps
    cfg: float = _DEFAULTS["cfg"]  # default guidance scale; <= 1 = conditional branch only
    conditioning_scale: float = _DEFAULTS["conditioning_scale"]  # ControlNet residual scale
    default_negative_prompt: str = _DEFAULTS["default_negative_prompt"]
    prompt_dropout: float = _DEFAULTS["prompt_dropout"]
    error_map_cfg: float = _DEFAULTS["error_map_cfg"]
    color_fix: str = _DEFAULTS["color_fix"]  # "adain", "wavelet" or "none"
    latent_tile_size: int = _DEFAULTS["latent_tile_size"]
    latent_tile_overlap: int = _DEFAULTS["latent_tile_overlap"]
    train_unet: bool = _DEFAULTS["train_unet"]  # trains the UNet beside the ControlNet
    gradient_checkpointing: bool = _DEFAULTS["gradient_checkpointing"]
    weights: str = ""  # where the base weights came from (for stage metadata)

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"model.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.color_fix not in COLOR_FIXES:
            raise ValueError(
                f"model.color_fix must be one of {COLOR_FIXES}, got {self.color_fix!r}"
            )
        if self.latent_tile_size and self.latent_tile_overlap >= self.latent_tile_size:
            raise ValueError("model.latent_tile_overlap must be smaller than latent_tile_size")


def sd_scheduler_config() -> dict:
    """The SD 2-base noise schedule (``scheduler/scheduler_config.json``)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }


def conditioning_widths(downscale: int) -> tuple[int, ...]:
    """ControlNet conditioning-embedding widths that downsample the image by ``downscale``."""
    stages = int(math.log2(downscale))
    if 2**stages != downscale or stages + 1 > len(CONDITIONING_WIDTHS):
        raise ValueError(f"codec downscale must be 1, 2, 4 or 8, got {downscale}")
    return CONDITIONING_WIDTHS[: stages + 1]


class MultiStepSR(DiffusionParts, SRModel):
    framework = "multistep"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        controlnet: ControlNetModel,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        codec: LatentCodec,
        scheduler: DDPMScheduler,
        settings: MultiStepSettings | None = None,
        conditioning_range: str = CONDITIONING_RANGE,
    ):
        """``conditioning_range`` is the range of the ControlNet's conditioning image, a
        property of its weights: "0,1" (diffusers) or "-1,1" (models saved before)."""
        super().__init__()
        if conditioning_range not in CONDITIONING_RANGES:
            raise ValueError(
                f"controlnet_conditioning_range must be one of {CONDITIONING_RANGES}, "
                f"got {conditioning_range!r}"
            )
        self.conditioning_range = conditioning_range
        self.unet = unet
        self.controlnet = controlnet
        self.text_encoder = text_encoder.requires_grad_(False)
        self.tokenizer = tokenizer
        self.codec = codec
        self.scheduler = scheduler
        self.settings = settings or MultiStepSettings()
        self.compute_dtype = torch.float32
        # frozen copies for reference(); kept out of _modules so they are neither trained nor saved
        self.__dict__["_reference_modules"] = None
        self.controlnet.requires_grad_(True)
        self.unet.requires_grad_(self.settings.train_unet)
        self.set_gradient_checkpointing(self.settings.gradient_checkpointing)

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def build_tiny(
        cls,
        codec: str = "pixel",
        factor: int = 4,
        pixel_scale: float = 4.0,
        block_out_channels: Sequence[int] = (32, 64),
        text_hidden_size: int = 32,
        seed: int = 0,
        **settings,
    ) -> MultiStepSR:
        """A small randomly initialised model for tests and the CPU demo (UNet trainable)."""
        settings = {"train_unet": True, "weights": f"tiny-random(seed={seed})", **settings}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "model_init", "multistep"))
            latent_codec = build_tiny_codec(codec, factor, pixel_scale)
            text_encoder, tokenizer = build_tiny_text_encoder(hidden_size=text_hidden_size)
            channels = latent_codec.latent_channels
            unet = build_tiny_unet(channels, channels, text_hidden_size, 16, block_out_channels)
            controlnet = ControlNetModel.from_unet(
                unet,
                conditioning_embedding_out_channels=conditioning_widths(latent_codec.downscale),
            )
        scheduler = DDPMScheduler.from_config(sd_scheduler_config())
        return cls(
            unet,
            controlnet,
            text_encoder,
            tokenizer,
            latent_codec,
            scheduler,
            MultiStepSettings(**settings),
        )

    @classmethod
    def from_sd_base(
        cls,
        path_or_id: str | Path,
        *,
        weights_key: str = "weights",
        vae_tile_size: int = 0,
        device: str = "cpu",
        dtype: str = "float32",
        **settings,
    ) -> MultiStepSR:
        """Build from an SD 2-base / 2.1-base diffusers folder, or a hub id when downloads are
        allowed (:func:`pipeline.hub.resolve_weights`; ``weights_key`` names the config entry in
        errors). The ControlNet is initialised from the UNet unless the folder has
        ``controlnet/`` (diffusers-trained: conditioning in [0, 1])."""
        source, load_kwargs = resolve_pretrained(path_or_id, SD_BASE_REQUIRED, weights_key)
        scheduler_kwargs = {k: v for k, v in load_kwargs.items() if k != "use_safetensors"}
        try:
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **load_kwargs)
            text_encoder = CLIPTextModel.from_pretrained(
                source, subfolder="text_encoder", **load_kwargs
            )
            tokenizer = load_tokenizer(source, "tokenizer", **scheduler_kwargs)
            codec = VaeCodec.from_pretrained(
                source, subfolder="vae", tile_size=vae_tile_size, **load_kwargs
            )
            scheduler = DDPMScheduler.from_pretrained(
                source, subfolder="scheduler", **scheduler_kwargs
            )
            if Path(source, "controlnet").is_dir():
                check_pretrained_folder(source, CONTROLNET_REQUIRED)
                controlnet = ControlNetModel.from_pretrained(
                    source, subfolder="controlnet", use_safetensors=True
                )
            else:
                controlnet = ControlNetModel.from_unet(
                    unet, conditioning_embedding_out_channels=conditioning_widths(codec.downscale)
                )
        except OSError as error:
            if Path(source).exists():
                raise
            raise hub_load_error(source, error) from error
        model = cls(
            unet,
            controlnet,
            text_encoder,
            tokenizer,
            codec,
            scheduler,
            MultiStepSettings(**{"weights": source, **settings}),
        )
        return model.to_device(device, dtype)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str = "cpu", dtype: str = "float32", **overrides
    ) -> MultiStepSR:
        """Load a folder written by :meth:`save_pretrained`; an SD base folder or hub id without
        ``dspo_model.json`` goes to :meth:`from_sd_base`. ``overrides`` replace settings."""
        folder = Path(path)
        if not (folder / MODEL_FILE).is_file():
            return cls.from_sd_base(path, device=device, dtype=dtype, **overrides)
        description = json.loads((folder / MODEL_FILE).read_text())
        if description.get("framework") != cls.framework:
            raise ValueError(f"{folder / MODEL_FILE} is not a {cls.framework} model")
        settings = {**description.get("settings", {}), **overrides}
        vae_tile_size = settings.pop("vae_tile_size", None)
        codec_overrides = {} if vae_tile_size is None else {"tile_size": vae_tile_size}
        check_pretrained_folder(folder, SAVED_REQUIRED)
        model = cls(
            UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True),
            ControlNetModel.from_pretrained(folder / "controlnet", use_safetensors=True),
            CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True),
            load_tokenizer(folder / "tokenizer"),
            load_codec(folder / "codec", **codec_overrides),
            DDPMScheduler.from_pretrained(folder / "scheduler"),
            MultiStepSettings(**settings),
            conditioning_range=description.get(
                "controlnet_conditioning_range", LEGACY_CONDITIONING_RANGE
            ),
        )
        return model.to_device(device, dtype)

    def save_pretrained(self, path: str | Path) -> None:
        """Diffusers subfolders (unet/, controlnet/, text_encoder/, tokenizer/, scheduler/,
        codec/) plus ``dspo_model.json``; written to a temporary folder and renamed."""
        with atomic_path(path) as folder:
            folder.mkdir(parents=True)
            self.unet.save_pretrained(folder / "unet", safe_serialization=True)
            self.controlnet.save_pretrained(folder / "controlnet", safe_serialization=True)
            self.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
            self.tokenizer.save_pretrained(folder / "tokenizer")
            self.scheduler.save_pretrained(folder / "scheduler")
            save_codec(self.codec, folder / "codec")
            description = {
                "framework": self.framework,
                "settings": dataclasses.asdict(self.settings),
                "controlnet_conditioning_range": self.conditioning_range,
            }
            (folder / MODEL_FILE).write_text(json.dumps(description, indent=2) + "\n")

    def to_device(self, device: str | torch.device = "cpu", dtype: str = "float32") -> MultiStepSR:
        """Move to ``device`` ("auto" picks cuda when present). ``dtype="bfloat16"`` on cuda puts
        the frozen modules in bf16 and runs forwards under autocast; trainable weights stay fp32.
        On the CPU everything stays fp32."""
        device = resolve_device(device)
        self.to(device)
        use_bf16 = dtype == "bfloat16" and device.type == "cuda"
        self.compute_dtype = torch.bfloat16 if use_bf16 else torch.float32
        if use_bf16:
            self.text_encoder.to(dtype=torch.bfloat16)
            if isinstance(self.codec, nn.Module):
                self.codec.to(dtype=torch.bfloat16)
            if not self.settings.train_unet:
                self.unet.to(dtype=torch.bfloat16)
        return self

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        for module in (self.unet, self.controlnet):
            if enabled:
                module.enable_gradient_checkpointing()
            else:
                module.disable_gradient_checkpointing()

    def describe(self) -> dict[str, str]:
        return {
            **super().describe(),
            "weights": self.settings.weights,
            "sampler": self.settings.sampler,
            "trainable": "controlnet+unet" if self.settings.train_unet else "controlnet",
            "controlnet_conditioning_range": self.conditioning_range,
        }

    # -- shared forward pieces ---------------------------------------------------------------
    def controlnet_condition(self, lq: torch.Tensor) -> torch.Tensor:
        """The ControlNet's conditioning image from the LQ in [-1, 1]: [0, 1] as diffusers'
        ``StableDiffusionControlNetPipeline.prepare_image`` gives it, or the LQ itself for a
        legacy model (``controlnet_conditioning_range`` "-1,1")."""
        if self.conditioning_range == LEGACY_CONDITIONING_RANGE:
            return lq
        return (lq + 1) / 2

    def predict_noise(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        lq: torch.Tensor,
        text_embeddings: torch.Tensor,
    ) -> torch.Tensor:
        """The UNet output (ε for SD 2-base) with ControlNet residuals from the LQ."""
        with self._autocast():
            down_residuals, mid_residual = self.controlnet(
                noisy_latents,
                timesteps,
                encoder_hidden_states=text_embeddings,
                controlnet_cond=self.controlnet_condition(lq),
                conditioning_scale=self.settings.conditioning_scale,
                return_dict=False,
            )
            prediction = self.unet(
                noisy_latents,
                timesteps,
                encoder_hidden_states=text_embeddings,
                down_block_additional_residuals=down_residuals,
                mid_block_additional_residual=mid_residual,
            ).sample
        return prediction.float()

    def guided_noise(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        lq: torch.Tensor,
        prompt_embeddings: torch.Tensor,
        negative_embeddings: torch.Tensor,
        cfg: float,
    ) -> torch.Tensor:
        """Classifier-free guidance ``ε_neg + cfg (ε_cond - ε_neg)``; ``cfg <= 1`` runs only the
        conditional branch (diffusers: ``do_classifier_free_guidance = guidance_scale > 1``)."""
        if cfg <= 1.0:
            return self.predict_noise(noisy_latents, timesteps, lq, prompt_embeddings)
        both = self.predict_noise(
            torch.cat([noisy_latents, noisy_latents]),
            torch.cat([timesteps, timesteps]),
            torch.cat([lq, lq]),
            torch.cat([negative_embeddings, prompt_embeddings]),
        )
        negative, conditional = both.chunk(2)
        return negative + cfg * (conditional - negative)

    def _training_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        if prediction_type == "sample":
            return latents
        return noise

    def _negatives(self, negative_prompts: Sequence[str] | None, count: int) -> list[str]:
        if negative_prompts is None:
            return [self.settings.default_negative_prompt] * count
        if len(negative_prompts) != count:
            raise ValueError(f"{len(negative_prompts)} negative prompts for {count} images")
        return [text or self.settings.default_negative_prompt for text in negative_prompts]

    # -- training ----------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        modules = [self.controlnet, self.unet] if self.settings.train_unet else [self.controlnet]
        return [p for module in modules for p in module.parameters()]

    def draw_timesteps_and_noise(
        self, lq: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, height, width = lq.shape
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (batch,), generator=generator)
        down = self.codec.downscale
        shape = (batch, self.codec.latent_channels, height // down, width // down)
        return timesteps, torch.randn(shape, generator=generator)

    def error_maps(
        self,
        lq: torch.Tensor,
        targets: torch.Tensor,
        timesteps: torch.Tensor,
        noise: torch.Tensor,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """``||ε_θ(x_t(target), t, lq, prompt) - ε||²`` mean over latent channels (Eq. 6/7).

        With negative prompts and ``error_map_cfg > 1`` the prediction is the guided one, the
        negative prompt taking the unconditional branch (docs/design.md §7).
        """
        batch, count = targets.shape[:2]
        device = self.device
        lq = lq.to(device)
        lq_per_target = lq.repeat_interleave(count, dim=0)
        with torch.no_grad():
            latents = self.codec.encode(targets.flatten(0, 1).to(device), lq_per_target).float()
        timesteps = timesteps.to(device).repeat_interleave(count)
        noise = noise.to(device).repeat_interleave(count, dim=0)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        embeddings = self._text(prompts).repeat_interleave(count, dim=0)
        if negative_prompts is not None and self.settings.error_map_cfg > 1.0:
            negative = self._text(self._negatives(negative_prompts, batch))
            prediction = self.guided_noise(
                noisy,
                timesteps,
                lq_per_target,
                embeddings,
                negative.repeat_interleave(count, dim=0),
                self.settings.error_map_cfg,
            )
        else:
            prediction = self.predict_noise(noisy, timesteps, lq_per_target, embeddings)
        target = self._training_target(latents, noise, timesteps)
        squared = (prediction - target).pow(2).mean(dim=1)
        return squared.view(batch, count, *squared.shape[-2:])

    def state_error_maps(
        self,
        lq: torch.Tensor,
        states: torch.Tensor,
        timesteps: torch.Tensor,
        targets: torch.Tensor,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """``||ε_θ(x_t, t, lq, prompt) - target||²`` mean over latent channels ``[B, h, w]`` at
        GIVEN noisy states ``x_t`` ``[B, C, h', w']`` (e.g. a policy trajectory's, on the padded
        grid :meth:`sample_trajectory` records) with their own targets (Diffusion-DRO's online
        negatives: the sampler's ε-prediction there). The prediction is :meth:`error_maps`'
        (guided when negative prompts are given and ``error_map_cfg > 1``); the map is cropped
        to the LQ's latent grid, the grid of :meth:`error_maps`."""
        batch = states.shape[0]
        if targets.shape != states.shape or len(prompts) != batch:
            raise ValueError(
                f"states {tuple(states.shape)}, targets {tuple(targets.shape)} and "
                f"{len(prompts)} prompts must match"
            )
        lq, padded_lq = self._padded(lq)
        down = self.codec.downscale
        if tuple(states.shape[-2:]) != (padded_lq.shape[2] // down, padded_lq.shape[3] // down):
            raise ValueError(f"states {tuple(states.shape)} are not on the LQ's padded grid")
        states = states.to(self.device).float()
        timesteps = torch.as_tensor(timesteps).to(self.device)
        embeddings = self._text(prompts)
        if negative_prompts is not None and self.settings.error_map_cfg > 1.0:
            negative = self._text(self._negatives(negative_prompts, batch))
            prediction = self.guided_noise(
                states, timesteps, padded_lq, embeddings, negative, self.settings.error_map_cfg
            )
        else:
            prediction = self.predict_noise(states, timesteps, padded_lq, embeddings)
        squared = (prediction - targets.to(self.device).float()).pow(2).mean(dim=1)
        return squared[..., : lq.shape[2] // down, : lq.shape[3] // down]

    def pretrain_loss(
        self,
        lq: torch.Tensor,
        hq: torch.Tensor,
        prompts: Sequence[str],
        generator: torch.Generator,
        negative_prompts: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Conditional ε-MSE; each prompt is dropped to "" with probability ``prompt_dropout``
        so the model also learns the unconditional branch CFG needs (as SD / SeeSR train it;
        ``negative_prompts`` are accepted for the interface and only steer sampling)."""
        timesteps, noise = self.draw_timesteps_and_noise(lq, generator)
        dropped = torch.rand(len(prompts), generator=generator) < self.settings.prompt_dropout
        prompts = [
            "" if drop else text for text, drop in zip(prompts, dropped.tolist(), strict=True)
        ]
        maps = self.error_maps(lq, hq[:, None], timesteps, noise, prompts)
        loss = maps.mean()
        return loss, {"loss": float(loss.detach()), "prompt_dropout": float(dropped.float().mean())}

    def snapshot_reference(self) -> None:
        """Freeze a copy of the trainable modules now (called lazily by :meth:`reference`)."""
        names = ["controlnet", "unet"] if self.settings.train_unet else ["controlnet"]
        copies = {name: copy.deepcopy(getattr(self, name)).requires_grad_(False) for name in names}
        self.__dict__["_reference_modules"] = copies

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Swap in the frozen copy of the trainable modules, taken before the first update."""
        if self._reference_modules is None:
            self.snapshot_reference()
        current = {name: self._modules[name] for name in self._reference_modules}
        try:
            for name, frozen in self._reference_modules.items():
                self._modules[name] = frozen.to(self.device)
            yield
        finally:
            self._modules.update(current)

    # -- inference ---------------------------------------------------------------------------
    def _sampling_scheduler(self, steps: int):
        if self.settings.sampler == "ddim":
            scheduler = DDIMScheduler.from_config(self.scheduler.config)
        else:
            scheduler = DDPMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        return scheduler

    def _tiled_noise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        lq: torch.Tensor,
        prompt_embeddings: torch.Tensor,
        negative_embeddings: torch.Tensor,
        cfg: float,
    ) -> torch.Tensor:
        """Guided noise over the whole latent, in Gaussian-blended tiles when it exceeds one."""
        down = self.codec.downscale

        def predict_tile(rows: slice, cols: slice) -> torch.Tensor:
            image_rows = slice(rows.start * down, rows.stop * down)
            image_cols = slice(cols.start * down, cols.stop * down)
            return self.guided_noise(
                latents[..., rows, cols],
                timesteps,
                lq[..., image_rows, image_cols],
                prompt_embeddings,
                negative_embeddings,
                cfg,
            )

        return tiled_apply(
            predict_tile,
            latents.shape,
            self.settings.latent_tile_size,
            self.settings.latent_tile_overlap,
        )

    def _padded(self, lq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The LQ on the model's device and its copy padded (replicate) to the model's stride."""
        lq = lq.to(self.device).float()
        height, width = lq.shape[-2:]
        multiple = self._size_multiple()
        pad_h, pad_w = -height % multiple, -width % multiple
        padded_lq = F.pad(lq, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else lq
        return lq, padded_lq

    def _sampling_inputs(
        self,
        lq: torch.Tensor,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None,
        generators: Sequence[torch.Generator],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What every sampler starts from: the LQ, its padded copy, the initial noise (one draw
        per image from its own generator) and the prompt and negative-prompt embeddings."""
        batch = lq.shape[0]
        if len(generators) != batch or len(prompts) != batch:
            raise ValueError(f"need one prompt and one generator per image ({batch})")
        lq, padded_lq = self._padded(lq)
        down = self.codec.downscale
        shape = (
            1,
            self.codec.latent_channels,
            padded_lq.shape[2] // down,
            padded_lq.shape[3] // down,
        )
        latents = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(self.device)
        prompt_embeddings = self._text(prompts)
        negative_embeddings = self._text(self._negatives(negative_prompts, batch))
        return lq, padded_lq, latents, prompt_embeddings, negative_embeddings

    def _decode_sample(
        self, latents: torch.Tensor, padded_lq: torch.Tensor, lq: torch.Tensor
    ) -> torch.Tensor:
        """Final latents to images cropped back to the LQ's size, colour-corrected against it."""
        height, width = lq.shape[-2:]
        images = self.codec.decode(latents, padded_lq).float()[..., :height, :width]
        return apply_color_fix(images, lq, self.settings.color_fix)

    @torch.no_grad()
    def sample(
        self,
        lq: torch.Tensor,
        *,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
        steps: int | None = None,
        cfg: float | None = None,
        generators: Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Spaced DDPM/DDIM from pure noise with CFG, tiled when the latent exceeds one tile,
        then colour correction against the LQ. Images whose sides are not a multiple of the
        model's stride are padded (replicate) and cropped back."""
        steps = steps or self.settings.steps
        cfg = self.settings.cfg if cfg is None else cfg
        batch = lq.shape[0]
        if generators is None:
            generators = [torch.Generator().manual_seed(0) for _ in range(batch)]
        lq, padded_lq, latents, prompt_embeddings, negative_embeddings = self._sampling_inputs(
            lq, prompts, negative_prompts, generators
        )
        scheduler = self._sampling_scheduler(steps)
        latents = latents * scheduler.init_noise_sigma

        for timestep in scheduler.timesteps:
            timesteps = torch.full((batch,), int(timestep), device=self.device)
            noise_prediction = self._tiled_noise(
                latents, timesteps, padded_lq, prompt_embeddings, negative_embeddings, cfg
            )
            # one scheduler step per image so each image's noise comes from its own generator
            latents = torch.cat(
                [
                    scheduler.step(
                        noise_prediction[i : i + 1],
                        timestep,
                        latents[i : i + 1],
                        generator=generators[i],
                    ).prev_sample
                    for i in range(batch)
                ]
            )
        return self._decode_sample(latents, padded_lq, lq)

    # -- the stochastic policy of online methods (DDPO; docs/online_alignment.md) ------------
    #: what tables and metadata call this family's policy (DDPO's multi-step MDP)
    POLICY_NAME = "DDPO (multi-step DDIM policy)"

    def policy_scheduler(self, steps: int) -> DDIMScheduler:
        """The DDIM scheduler of policy samples (whatever ``settings.sampler`` says)."""
        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        return scheduler

    def _policy_step(
        self,
        scheduler: DDIMScheduler,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        padded_lq: torch.Tensor,
        prompt_embeddings: torch.Tensor,
        negative_embeddings: torch.Tensor,
        cfg: float,
        eta: float,
        prev_sample: torch.Tensor | None = None,
        generators: Sequence[torch.Generator] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One DDIM step as a Gaussian policy: (next latents, log-prob ``[B]``, guided noise)."""
        noise_prediction = self._tiled_noise(
            latents,
            timesteps.to(self.device),
            padded_lq,
            prompt_embeddings,
            negative_embeddings,
            cfg,
        )
        following, log_prob = online.ddim_step_with_log_prob(
            scheduler,
            noise_prediction,
            timesteps,
            latents,
            eta,
            prev_sample=prev_sample,
            generator=None if generators is None else list(generators),
        )
        return following, log_prob, noise_prediction

    @torch.no_grad()
    def sample_trajectory(
        self,
        lq: torch.Tensor,
        *,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
        steps: int | None = None,
        cfg: float | None = None,
        eta: float = 1.0,
        generators: Sequence[torch.Generator],
        timesteps: torch.Tensor | None = None,
    ) -> PolicySample:
        """DDIM sampling with ``eta > 0`` recording every step's log-probability (DDPO's
        trajectory; :func:`pipeline.policy.ddim_step_with_log_prob`): the same inputs, guidance,
        tiling, decoding and colour fix as :meth:`sample`, each image's initial noise and step
        noise from its own generator. Latents are on the padded grid.

        ``timesteps`` (``int64 [B, steps]``, optional) gives each trajectory its own grid, e.g.
        Diffusion-DRO's perturbed ones (:func:`pipeline.policy.perturbed_timesteps`: the
        scheduler's spacing plus one offset per trajectory); default the scheduler's grid for
        every image. ``eta = 0`` is deterministic DDIM: the states and noise predictions are
        recorded (what DRO's online negatives need), the log-probs are NaN (no density)."""
        steps = steps or self.settings.steps
        cfg = self.settings.cfg if cfg is None else cfg
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        batch = lq.shape[0]
        lq, padded_lq, latents, prompt_embeddings, negative_embeddings = self._sampling_inputs(
            lq, prompts, negative_prompts, generators
        )
        scheduler = self.policy_scheduler(steps)
        if timesteps is None:
            grid = scheduler.timesteps.to(torch.long)[None].expand(batch, -1).clone()
        else:
            grid = torch.as_tensor(timesteps).detach().to("cpu", torch.long).clone()
            if grid.shape != (batch, len(scheduler.timesteps)):
                raise ValueError(
                    f"timesteps {tuple(grid.shape)} must be [B, steps] = "
                    f"{(batch, len(scheduler.timesteps))}"
                )
        latents = latents * scheduler.init_noise_sigma
        states, log_probs, predictions = [latents], [], []
        for column in range(grid.shape[1]):
            latents, log_prob, prediction = self._policy_step(
                scheduler,
                latents,
                grid[:, column],
                padded_lq,
                prompt_embeddings,
                negative_embeddings,
                cfg,
                eta,
                generators=None if eta == 0 else generators,
            )
            states.append(latents)
            log_probs.append(log_prob)
            predictions.append(prediction)
        return PolicySample(
            images=self._decode_sample(latents, padded_lq, lq),
            latents=torch.stack(states, dim=1),
            log_probs=torch.stack(log_probs, dim=1),
            timesteps=grid,
            noise_predictions=torch.stack(predictions, dim=1),
        )

    def trajectory_log_probs(
        self,
        lq: torch.Tensor,
        sample: PolicySample,
        step_index: torch.Tensor,
        *,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
        steps: int | None = None,
        cfg: float | None = None,
        eta: float = 1.0,
    ) -> torch.Tensor:
        """The current policy's log-prob ``[B]`` of each recorded step ``step_index [B]`` of
        ``sample`` (from :meth:`sample_trajectory` with the same settings), with gradients: the
        PPO pass. Equal to the recorded log-prob while the weights are those that sampled."""
        steps = steps or self.settings.steps
        cfg = self.settings.cfg if cfg is None else cfg
        batch = lq.shape[0]
        rows = torch.arange(batch)
        index = torch.as_tensor(step_index, dtype=torch.long).cpu()
        lq, padded_lq = self._padded(lq)
        _, log_prob, _ = self._policy_step(
            self.policy_scheduler(steps),
            sample.latents[rows, index].to(self.device),
            sample.timesteps[rows, index],
            padded_lq,
            self._text(prompts),
            self._text(self._negatives(negative_prompts, batch)),
            cfg,
            eta,
            prev_sample=sample.latents[rows, index + 1].to(self.device),
        )
        return log_prob
