"""The one-step SR family: OSEDiff (Wu et al., NeurIPS 2024) behind the SRModel interface.

Generator (OSEDiff ``OSEDiff_gen``): LoRA on the SD UNet (and on the VAE encoder when the codec
is the SD VAE); the LQ latent ``z_L`` is denoised in one step at ``t = T``:

    z_hat = (z_L - sqrt(1 - abar_T) * eps_theta(z_L, T, prompt)) / sqrt(abar_T)

No classifier-free guidance at inference; ``cfg_vsd`` is a training knob of the VSD regulariser
(``OSEDiff_reg``): a frozen "real" score UNet with CFG and a LoRA "fake" score UNet trained on
the generator's latents with its own diffusion loss.

Demo codec: the residual pixel codec encodes the LQ itself to zero, so with ``lq_condition ==
"concat"`` the generator UNet sees ``[z_L, pixel_unshuffle(lq)]`` (in_channels = latent + 3 f^2).
With the SD VAE ``lq_condition`` is ``"none"``: OSEDiff as published.

LoRA adapters form a stack: every saved adapter is loaded frozen and stays active, and a fresh
adapter (LoRA B = 0, so outputs are unchanged) is added on top as the trainable one.
:meth:`reference` disables only that top adapter, so during preference training the reference
is exactly the loaded (pretrained) model. For a freshly built model the stack holds just the
pretraining adapter and the reference is the base network (peft ``disable_adapter``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from pipeline import policy as online
from pipeline import settings
from pipeline.devices import resolve_device
from pipeline.hub import resolve_weights
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
    hub_load_error,
    load_tokenizer,
    resolve_pretrained,
)
from pipeline.models.tiling import tiled_apply
from pipeline.seeding import derive_seed

MODEL_FILE = "dspo_model.json"
#: OSEDiff ``initialize_unet`` LoRA targets (module-name suffixes)
UNET_LORA_TARGETS = [
    "to_k",
    "to_q",
    "to_v",
    "to_out.0",
    "conv",
    "conv1",
    "conv2",
    "conv_in",
    "conv_shortcut",
    "conv_out",
    "proj_out",
    "proj_in",
    "ff.net.2",
    "ff.net.0.proj",
]
#: OSEDiff ``initialize_vae``: the encoder's convs/attention plus quant_conv; decoder untouched
VAE_LORA_TARGETS = (
    r"^(encoder\..*\.(conv1|conv2|conv_in|conv_shortcut|conv|conv_out|to_k|to_q|to_v|to_out\.0)"
    r"|encoder\.(conv_in|conv_out)|quant_conv)$"
)
PERCEPTUAL_LOSSES = ("none", "gradient", "lpips")
LQ_CONDITIONS = ("concat", "none")


#: the schema's ``pretrain.onestep.model`` defaults (pipeline/settings.py): the only copy of the values
_DEFAULTS = settings.defaults("pretrain.onestep.model")


@dataclasses.dataclass
class OneStepSettings:
    """Everything besides weights that defines the model (saved in dspo_model.json)."""

    lora_rank: int = _DEFAULTS["lora_rank"]
    lora_alpha: float = _DEFAULTS["lora_alpha"]  # peft's default alpha, which OSEDiff keeps
    align_lora_rank: int = _DEFAULTS["align_lora_rank"]
    cfg_vsd: float = _DEFAULTS["cfg_vsd"]
    lambda_l2: float = _DEFAULTS["lambda_l2"]
    lambda_lpips: float = _DEFAULTS["lambda_lpips"]
    lambda_vsd: float = _DEFAULTS["lambda_vsd"]
    lambda_vsd_lora: float = _DEFAULTS["lambda_vsd_lora"]  # fake-score diffusion loss
    vsd_timestep_min: int = _DEFAULTS["vsd_timestep_min"]
    vsd_timestep_max: int = _DEFAULTS["vsd_timestep_max"]
    negative_prompt: str = _DEFAULTS["negative_prompt"]
    perceptual: str = _DEFAULTS["perceptual"]
    perceptual_weights: str = _DEFAULTS["perceptual_weights"]
    perceptual_weights_dir: str = _DEFAULTS["perceptual_weights_dir"]
    train_base: bool = _DEFAULTS["train_base"]
    prompt_dropout: float = _DEFAULTS["prompt_dropout"]
    vae_lora: bool = _DEFAULTS["vae_lora"]  # LoRA on the VAE encoder (SD VAE codec only)
    lq_condition: str = _DEFAULTS["lq_condition"]
    timestep: int = _DEFAULTS["timestep"]  # the one step, t = T
    color_fix: str = _DEFAULTS["color_fix"]  # OSEDiff test default
    latent_tile_size: int = _DEFAULTS["latent_tile_size"]
    latent_tile_overlap: int = _DEFAULTS["latent_tile_overlap"]
    base_weights: str = _DEFAULTS["base_weights"]
    weights: str = ""  # description for stage metadata
    seed: int = 0  # LoRA initialisation seed

    def __post_init__(self):
        if self.perceptual not in PERCEPTUAL_LOSSES:
            raise ValueError(f"model.perceptual must be one of {PERCEPTUAL_LOSSES}")
        if self.perceptual == "lpips" and not self.perceptual_weights:
            raise ValueError("model.perceptual 'lpips' needs model.perceptual_weights (a file)")
        if self.lq_condition not in LQ_CONDITIONS:
            raise ValueError(f"model.lq_condition must be one of {LQ_CONDITIONS}")
        if self.color_fix not in COLOR_FIXES:
            raise ValueError(f"model.color_fix must be one of {COLOR_FIXES}")
        if self.latent_tile_size and self.latent_tile_overlap >= self.latent_tile_size:
            raise ValueError("model.latent_tile_overlap must be smaller than latent_tile_size")


def sd_scheduler_config() -> dict:
    """The SD 2.1-base noise schedule."""
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


def image_gradient_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Stand-in perceptual term: L1 between horizontal and vertical finite differences.

    Used when no LPIPS weights are configured; it rewards matching edges and texture,
    which is what LPIPS adds over L2 for SR, without any pretrained network.
    """

    def differences(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images[..., :, 1:] - images[..., :, :-1], images[..., 1:, :] - images[..., :-1, :]

    (px, py), (tx, ty) = differences(prediction), differences(target)
    return (px - tx).abs().mean() + (py - ty).abs().mean()


def build_perceptual_loss(settings: OneStepSettings) -> Callable | None:
    """The perceptual term (OSEDiff: LPIPS-VGG) or its documented stand-in."""
    if settings.perceptual == "none" or settings.lambda_lpips == 0:
        return None
    if settings.perceptual == "gradient":
        return image_gradient_loss
    import pyiqa

    from pipeline.iqa import offline_weights

    weights = Path(settings.perceptual_weights)
    if not weights.is_file():
        raise FileNotFoundError(f"LPIPS weights not found: {weights}")
    with offline_weights("lpips-vgg", settings.perceptual_weights_dir or None):
        metric = pyiqa.create_metric(
            "lpips-vgg", as_loss=True, device="cpu", pretrained_model_path=str(weights)
        )

    def lpips_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        metric.to(prediction.device)
        # pyiqa metrics take images in [0, 1]
        return metric((prediction + 1) / 2, (target + 1) / 2).mean()

    return lpips_loss


def _tuner_layers(module: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def _inject(module: nn.Module, name: str, rank: int, alpha: float, targets, seed: int) -> None:
    """Add LoRA adapter ``name`` (OSEDiff's gaussian init: A ~ N(0, 1/r), B = 0)."""
    config = LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # stacking adapters is intended; peft warns when a model already has one
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        torch.manual_seed(seed)
        inject_adapter_in_model(config, module, adapter_name=name)


def _activate(module: nn.Module, names: list[str]) -> None:
    """Make exactly ``names`` the active adapters of every LoRA layer (none = all disabled).

    peft's switches also flip ``requires_grad``; the caller's flags are restored here.
    """
    flags = {id(p): p.requires_grad for p in module.parameters()}
    for layer in _tuner_layers(module):
        if names:
            layer.enable_adapters(True)
            layer.set_adapter(names)
        else:
            layer.enable_adapters(False)
    for p in module.parameters():
        p.requires_grad_(flags[id(p)])


def _lora_parameters(module: nn.Module, name: str) -> list[nn.Parameter]:
    return [p for key, p in module.named_parameters() if f".{name}." in key and "lora_" in key]


def _strip_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A peft-injected module's state dict as the plain module's (no LoRA, no base_layer)."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}


class OneStepSR(DiffusionParts, SRModel):
    framework = "onestep"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        codec: LatentCodec,
        scheduler: DDPMScheduler,
        settings: OneStepSettings,
        adapters: Sequence[dict] | None = None,
    ):
        """``adapters`` lists the saved LoRA stack ({name, rank, alpha}); ``None`` starts a
        new stack with one pretraining adapter of ``settings.lora_rank``."""
        super().__init__()
        self.unet = unet.requires_grad_(False)
        self.text_encoder = text_encoder.requires_grad_(False)
        self.tokenizer = tokenizer
        self.codec = codec
        if isinstance(codec, nn.Module):
            codec.requires_grad_(False)
        self.scheduler = scheduler
        self.settings = settings
        self.compute_dtype = torch.float32
        self.regulariser: nn.ModuleDict | None = None
        self.adapters: list[dict] = []
        self.__dict__["_perceptual"] = None
        stack = adapters if adapters is not None else [self._new_adapter(settings.lora_rank)]
        for adapter in stack:
            self._inject_adapter(adapter)
        self._freeze_all_but_top()

    # -- adapter stack ---------------------------------------------------------------------
    def _new_adapter(self, rank: int) -> dict:
        return {
            "name": f"stage{len(self.adapters)}",
            "rank": int(rank),
            "alpha": float(self.settings.lora_alpha),
        }

    @property
    def _vae(self) -> AutoencoderKL | None:
        if isinstance(self.codec, VaeCodec) and self.settings.vae_lora:
            return self.codec.vae
        return None

    def _inject_adapter(self, adapter: dict) -> None:
        seed = derive_seed(self.settings.seed, "lora_init", "onestep", adapter["name"])
        _inject(
            self.unet, adapter["name"], adapter["rank"], adapter["alpha"], UNET_LORA_TARGETS, seed
        )
        if self._vae is not None:
            _inject(
                self._vae,
                adapter["name"],
                adapter["rank"],
                adapter["alpha"],
                VAE_LORA_TARGETS,
                seed + 1,
            )
        self.adapters.append(dict(adapter))
        self._set_active([a["name"] for a in self.adapters])

    def _set_active(self, names: list[str]) -> None:
        _activate(self.unet, names)
        if self._vae is not None:
            _activate(self._vae, names)

    def _lora_modules(self) -> list[nn.Module]:
        return [self.unet] if self._vae is None else [self.unet, self._vae]

    def add_adapter(self, rank: int | None = None) -> None:
        """Freeze the stack and put a fresh trainable adapter (B = 0) on top."""
        self._inject_adapter(self._new_adapter(rank or self.settings.align_lora_rank))
        self._freeze_all_but_top()

    def _freeze_all_but_top(self) -> None:
        for module in self._lora_modules():
            module.requires_grad_(False)
        for p in self.trainable_parameters():
            p.requires_grad_(True)

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
    ) -> OneStepSR:
        """A small randomly initialised model (tests, CPU demo): base UNets trained from scratch,
        LQ concatenated to the generator input for the pixel codec, no colour fix."""
        lq_condition = "concat" if codec == "pixel" else "none"
        settings = {
            "train_base": True,
            "lq_condition": lq_condition,
            "color_fix": "none",
            "weights": f"tiny-random(seed={seed})",
            "seed": seed,
            **settings,
        }
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "model_init", "onestep"))
            latent_codec = build_tiny_codec(codec, factor, pixel_scale)
            text_encoder, tokenizer = build_tiny_text_encoder(hidden_size=text_hidden_size)
            latent = latent_codec.latent_channels
            extra = 3 * latent_codec.downscale**2 if settings["lq_condition"] == "concat" else 0
            unet = build_tiny_unet(latent + extra, latent, text_hidden_size, 16, block_out_channels)
            # from scratch, a zero output layer makes the untrained generator return z_hat = z_L
            # (the bicubic LQ for the pixel codec) instead of z_L - 14.6 * random noise
            nn.init.zeros_(unet.conv_out.weight)
            nn.init.zeros_(unet.conv_out.bias)
        scheduler = DDPMScheduler.from_config(sd_scheduler_config())
        return cls(
            unet, text_encoder, tokenizer, latent_codec, scheduler, OneStepSettings(**settings)
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
    ) -> OneStepSR:
        """OSEDiff's starting point from an SD 2.1-base folder: fresh rank-``lora_rank`` LoRA.

        The folder is recorded absolute (``base_weights``), so the saved model loads from any
        working directory; a hub id only with downloads allowed (``weights_key`` names the
        config entry in errors)."""
        source = resolve_weights(path_or_id, weights_key)
        parts = _load_sd_parts(source, weights_key, vae_tile_size)
        settings = {"base_weights": source, "weights": source, **settings}
        model = cls(*parts, OneStepSettings(**settings))
        return model.to_device(device, dtype)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str = "cpu",
        dtype: str = "float32",
        add_adapter: bool = True,
        **overrides,
    ) -> OneStepSR:
        """Load a folder written by :meth:`save_pretrained` (an SD folder or hub id without
        ``dspo_model.json`` goes to :meth:`from_sd_base`). The saved LoRA stack is loaded
        frozen; with ``add_adapter`` a fresh trainable adapter (B = 0) goes on top so
        :meth:`reference` is exactly the loaded model. ``overrides`` replace settings."""
        folder = Path(path)
        if not (folder / MODEL_FILE).is_file():
            return cls.from_sd_base(path, device=device, dtype=dtype, **overrides)
        description = json.loads((folder / MODEL_FILE).read_text())
        if description.get("framework") != cls.framework:
            raise ValueError(f"{folder / MODEL_FILE} is not a {cls.framework} model")
        settings = OneStepSettings(**{**description["settings"], **overrides})
        full = description["full_weights"]
        if settings.base_weights:
            base = _saved_base_weights(settings.base_weights, folder)
            settings = dataclasses.replace(settings, base_weights=base)
        if full:
            unet_config = json.loads((folder / "unet_config.json").read_text())
            parts = (
                UNet2DConditionModel.from_config(unet_config),
                CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True),
                load_tokenizer(folder / "tokenizer"),
                load_codec(folder / "codec"),
                DDPMScheduler.from_pretrained(folder / "scheduler"),
            )
        else:
            key = f"base_weights of {folder / MODEL_FILE}"
            parts = _load_sd_parts(settings.base_weights, key, 0)
        model = cls(*parts, settings, adapters=description["adapters"])
        model._load_weights(folder, full)
        if add_adapter:
            model.add_adapter()
        return model.to_device(device, dtype)

    def _load_weights(self, folder: Path, full: bool) -> None:
        unet_file = folder / "unet.safetensors"
        if not unet_file.is_file():
            raise FileNotFoundError(f"one-step model weights not found: {unet_file}")
        state = load_file(unet_file)
        missing, unexpected = self.unet.load_state_dict(state, strict=False)
        if unexpected or (full and missing):
            raise ValueError(
                f"{unet_file} does not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        vae_file = folder / "vae_lora.safetensors"
        if self._vae is not None:
            if not vae_file.is_file():
                raise FileNotFoundError(f"VAE encoder LoRA weights not found: {vae_file}")
            _, unexpected = self._vae.load_state_dict(load_file(vae_file), strict=False)
            if unexpected:
                raise ValueError(f"{vae_file} does not match the VAE: unexpected {unexpected[:5]}")

    def save_pretrained(self, path: str | Path) -> None:
        """``dspo_model.json`` (framework, settings, LoRA stack) + ``unet.safetensors``.

        With SD base weights (``base_weights`` set and the base not trained) only the LoRA
        stack and ``conv_in`` (which OSEDiff trains fully) are stored; otherwise the whole
        generator (UNet with adapters, text encoder, tokenizer, codec) is. The VAE encoder
        LoRA goes to ``vae_lora.safetensors``. The VSD regulariser is not saved: it serves
        pretraining only (pretraining checkpoints hold it).
        """
        full = not self.settings.base_weights or self.settings.train_base
        with atomic_path(path) as folder:
            folder.mkdir(parents=True)
            state = self.unet.state_dict()
            if not full:
                state = {k: v for k, v in state.items() if "lora_" in k or k.startswith("conv_in.")}
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in state.items()},
                folder / "unet.safetensors",
            )
            if self._vae is not None:
                vae_state = {
                    k: v.detach().contiguous().cpu()
                    for k, v in self._vae.state_dict().items()
                    if "lora_" in k
                }
                save_file(vae_state, folder / "vae_lora.safetensors")
            if full:
                # diffusers' private keys (e.g. _use_default_values, built from a set) would make
                # the file's bytes depend on the process's hash seed
                public = {k: v for k, v in self.unet.config.items() if not k.startswith("_")}
                (folder / "unet_config.json").write_text(json.dumps(public, sort_keys=True))
                self.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
                self.tokenizer.save_pretrained(folder / "tokenizer")
                save_codec(self._plain_codec(), folder / "codec")
            self.scheduler.save_pretrained(folder / "scheduler")
            description = {
                "framework": self.framework,
                "settings": dataclasses.asdict(self.settings),
                "adapters": self.adapters,
                "full_weights": full,
            }
            (folder / MODEL_FILE).write_text(json.dumps(description, indent=2) + "\n")

    def _plain_codec(self) -> LatentCodec:
        """The codec without LoRA layers (its adapters are saved separately)."""
        if self._vae is None:
            return self.codec
        vae = AutoencoderKL.from_config(self._vae.config)
        vae.load_state_dict(_strip_lora(self._vae.state_dict()))
        return VaeCodec(vae, tile_size=self.codec.tile_size)

    def to_device(self, device: str | torch.device = "cpu", dtype: str = "float32") -> OneStepSR:
        """Move to ``device`` ("auto" picks cuda). ``bfloat16`` on cuda runs forwards under
        autocast (weights stay fp32); on the CPU everything is fp32."""
        device = resolve_device(device)
        self.to(device)
        use_bf16 = dtype == "bfloat16" and device.type == "cuda"
        self.compute_dtype = torch.bfloat16 if use_bf16 else torch.float32
        return self

    def describe(self) -> dict[str, str]:
        perceptual = self.settings.perceptual if self.settings.lambda_lpips else "none"
        return {
            **super().describe(),
            "weights": self.settings.weights,
            "lora_stack": ",".join(f"{a['name']}:r{a['rank']}" for a in self.adapters),
            "lq_condition": self.settings.lq_condition,
            "perceptual_loss": {
                "gradient": "gradient-L1 stand-in for LPIPS",
                "lpips": f"LPIPS-VGG ({self.settings.perceptual_weights})",
                "none": "none",
            }[perceptual],
            "cfg_vsd": str(self.settings.cfg_vsd),
        }

    # -- forward pieces ----------------------------------------------------------------------
    def _alpha_bar(self, timesteps: torch.Tensor) -> torch.Tensor:
        alphas = self.scheduler.alphas_cumprod.to(self.device)[timesteps.to(self.device)]
        return alphas.view(-1, 1, 1, 1).float()

    def _x0(self, noisy, prediction, timesteps) -> torch.Tensor:
        """x0 from the UNet output by the scheduler's ``prediction_type``, the formulas of
        ``DDPMScheduler.step``'s ``pred_original_sample``. For ε (SD 2.1-base) this is OSEDiff's
        ``eps_to_mu``: x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
        alpha_bar = self._alpha_bar(timesteps)
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return (noisy - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()
        if kind == "v_prediction":
            return alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * prediction
        if kind == "sample":
            return prediction
        raise ValueError(f"unsupported scheduler prediction_type {kind!r}")

    def _diffusion_target(self, latents, noise, timesteps) -> torch.Tensor:
        """What a score UNet is trained to output, by the scheduler's ``prediction_type``."""
        kind = self.scheduler.config.prediction_type
        if kind == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        if kind == "sample":
            return latents
        return noise

    def generator_input(self, lq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z_L`` (through the LoRA'd VAE encoder) and the UNet input built from it."""
        with self._autocast():
            z_lq = self.codec.encode(lq, lq).float()
        if self.settings.lq_condition == "concat":
            unshuffled = F.pixel_unshuffle(lq, self.codec.downscale)
            return z_lq, torch.cat([z_lq, unshuffled], dim=1)
        return z_lq, z_lq

    def predict_latent(self, lq: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """The one-step estimate ``z_hat`` of the HQ latent."""
        z_lq, unet_input = self.generator_input(lq)
        timesteps = torch.full((lq.shape[0],), self.settings.timestep, device=self.device)
        with self._autocast():
            output = self.unet(unet_input, timesteps, encoder_hidden_states=embeddings).sample
        return self._x0(z_lq, output.float(), timesteps)

    @contextlib.contextmanager
    def _plain_vae_encoder(self) -> Iterator[None]:
        """Targets are encoded with the original encoder (the decoder's partner)."""
        if self._vae is None:
            yield
            return
        _activate(self._vae, [])
        try:
            yield
        finally:
            _activate(self._vae, self._active_names)

    @torch.no_grad()
    def encode_targets(self, images: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        with self._plain_vae_encoder(), self._autocast():
            return self.codec.encode(images, lq).float()

    # -- training ----------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The top adapter's LoRA weights (UNet and, with the SD VAE, VAE encoder)."""
        name = self.adapters[-1]["name"]
        return [p for module in self._lora_modules() for p in _lora_parameters(module, name)]

    def pretrain_parameters(self) -> list[nn.Parameter]:
        """What :meth:`pretrain_loss` trains, marked trainable: the top adapter, ``conv_in``
        (OSEDiff trains it fully), the fake-score LoRA, and with ``train_base`` the base
        weights of the generator and both score UNets. Builds the regulariser if needed."""
        if self.settings.lambda_vsd > 0 and self.regulariser is None:
            self.build_regulariser()
        params = list(self.trainable_parameters())
        base = self.unet if self.settings.train_base else self.unet.conv_in.base_layer
        params += [p for key, p in base.named_parameters() if "lora_" not in key]
        if self.regulariser is not None:
            params += _lora_parameters(self.regulariser["fake"], "fake")
            if self.settings.train_base:
                for module in self.regulariser.values():
                    params += [p for k, p in module.named_parameters() if "lora_" not in k]
        unique = list({id(p): p for p in params}.values())
        for p in unique:
            p.requires_grad_(True)
        return unique

    def build_regulariser(self) -> None:
        """OSEDiff_reg: ``real`` = the base score UNet (frozen SD UNet; from scratch in the demo),
        ``fake`` = a copy with a LoRA of ``lora_rank`` (the "fake score")."""
        if self.settings.base_weights:
            source, kwargs = resolve_pretrained(
                self.settings.base_weights, SD_BASE_REQUIRED, "model.base_weights"
            )
            real = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs)
        else:
            config = dict(self.unet.config)
            config["in_channels"] = self.codec.latent_channels
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.settings.seed, "model_init", "onestep", "score"))
                real = UNet2DConditionModel.from_config(config)
        real = real.to(self.device).requires_grad_(False)
        fake = copy.deepcopy(real)
        seed = derive_seed(self.settings.seed, "lora_init", "onestep", "fake")
        _inject(
            fake, "fake", self.settings.lora_rank, self.settings.lora_alpha, UNET_LORA_TARGETS, seed
        )
        fake.requires_grad_(False)
        self.regulariser = nn.ModuleDict({"real": real, "fake": fake})

    def _noise_like(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(latents.shape, generator=generator).to(latents.device)

    def diffusion_loss(
        self, unet: nn.Module, latents: torch.Tensor, embeddings: torch.Tensor, generator
    ) -> torch.Tensor:
        """Plain diffusion MSE at t ~ U[0, 1000) (OSEDiff ``diff_loss``; the target follows the
        scheduler's ``prediction_type``, ε for SD 2.1-base)."""
        count = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, count, (latents.shape[0],), generator=generator)
        timesteps = timesteps.to(latents.device)
        noise = self._noise_like(latents, generator)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        with self._autocast():
            prediction = unet(noisy, timesteps, encoder_hidden_states=embeddings).sample.float()
        return F.mse_loss(prediction, self._diffusion_target(latents, noise, timesteps))

    def distribution_matching_loss(
        self, latents: torch.Tensor, embeddings: torch.Tensor, negative: torch.Tensor, generator
    ) -> torch.Tensor:
        """VSD (OSEDiff ``distribution_matching_loss``): the gradient
        ``(x0_fake - x0_real) / mean|z - x0_real|`` is pushed into ``z_hat`` through an MSE
        against a detached target; the real score uses CFG with ``cfg_vsd`` (only its
        conditional branch when ``cfg_vsd <= 1``, as diffusers skips guidance there)."""
        low, high = self.settings.vsd_timestep_min, self.settings.vsd_timestep_max
        timesteps = torch.randint(low, high, (latents.shape[0],), generator=generator)
        timesteps = timesteps.to(latents.device)
        noise = self._noise_like(latents, generator)
        noisy = self.scheduler.add_noise(latents.detach(), noise, timesteps)
        with torch.no_grad(), self._autocast():
            fake_eps = self.regulariser["fake"](noisy, timesteps, encoder_hidden_states=embeddings)
            if self.settings.cfg_vsd <= 1.0:
                real_eps = self.regulariser["real"](
                    noisy, timesteps, encoder_hidden_states=embeddings
                ).sample.float()
            else:
                both = self.regulariser["real"](
                    torch.cat([noisy, noisy]),
                    torch.cat([timesteps, timesteps]),
                    encoder_hidden_states=torch.cat([negative, embeddings]),
                ).sample.float()
                uncond, cond = both.chunk(2)
                real_eps = uncond + self.settings.cfg_vsd * (cond - uncond)
            x0_fake = self._x0(noisy, fake_eps.sample.float(), timesteps)
            x0_real = self._x0(noisy, real_eps, timesteps)
            weighting = (latents - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
            grad = (x0_fake - x0_real) / weighting.clamp_min(1e-8)
        return F.mse_loss(latents, (latents - grad).detach())

    def pretrain_loss(
        self,
        lq: torch.Tensor,
        hq: torch.Tensor,
        prompts: Sequence[str],
        generator: torch.Generator,
        negative_prompts: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """OSEDiff: ``λ_l2 L2 + λ_lpips LPIPS + λ_vsd VSD`` for the generator, plus the fake
        score's diffusion loss (``λ_vsd_lora``) on detached ``z_hat`` and, with ``train_base``,
        the real score's diffusion loss on HQ latents (prompts dropped with
        ``prompt_dropout`` so CFG has an unconditional branch). Parameter sets are disjoint, so
        one AdamW over the sum takes OSEDiff's two optimizers' steps only if the gradients are
        clipped per set as OSEDiff does: ``pipeline.pretrain`` clips the generator's and the
        regulariser's (``self.regulariser``) separately, each to ``max_grad_norm``. The VSD real
        score's unconditional branch is each pair's ``negative_prompts`` entry (an empty one, or
        None for all, takes the settings' ``negative_prompt``)."""
        settings = self.settings
        lq, hq = lq.to(self.device), hq.to(self.device)
        embeddings = self._text(prompts)
        z_hat = self.predict_latent(lq, embeddings)
        with self._autocast():
            images = self.codec.decode(z_hat, lq).float().clamp(-1, 1)
        l2 = F.mse_loss(images, hq)
        terms = {"l2": l2}
        total = settings.lambda_l2 * l2
        if self._perceptual is None:
            self.__dict__["_perceptual"] = build_perceptual_loss(settings) or (lambda *_: None)
        perceptual = self._perceptual(images, hq)
        if perceptual is not None:
            terms["lpips"] = perceptual
            total = total + settings.lambda_lpips * perceptual
        if settings.lambda_vsd > 0:
            if self.regulariser is None:
                raise RuntimeError("call pretrain_parameters() before pretrain_loss (VSD)")
            if negative_prompts is not None and len(negative_prompts) != len(prompts):
                raise ValueError(
                    f"{len(negative_prompts)} negative prompts for {len(prompts)} pairs"
                )
            negative = self._text(
                [
                    text or settings.negative_prompt
                    for text in negative_prompts or [""] * len(prompts)
                ]
            )
            terms["vsd"] = self.distribution_matching_loss(z_hat, embeddings, negative, generator)
            terms["vsd_lora"] = self.diffusion_loss(
                self.regulariser["fake"], z_hat.detach(), embeddings, generator
            )
            total = total + settings.lambda_vsd * terms["vsd"]
            total = total + settings.lambda_vsd_lora * terms["vsd_lora"]
            if settings.train_base:
                drop = torch.rand(len(prompts), generator=generator) < settings.prompt_dropout
                real_prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
                real_latents = self.encode_targets(hq, lq)
                terms["score_real"] = self.diffusion_loss(
                    self.regulariser["real"], real_latents, self._text(real_prompts), generator
                )
                total = total + terms["score_real"]
        return total, {
            "loss": float(total.detach()),
            **{k: float(v.detach()) for k, v in terms.items()},
        }

    def draw_timesteps_and_noise(
        self, lq: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``t = T`` for every LQ and a noise draw of the latent shape. Both are accepted by
        :meth:`error_maps` for interface compatibility and unused: the one-step prediction
        involves no noise."""
        batch, _, height, width = lq.shape
        down = self.codec.downscale
        shape = (batch, self.codec.latent_channels, height // down, width // down)
        return torch.full((batch,), self.settings.timestep), torch.randn(shape, generator=generator)

    def error_maps(
        self,
        lq: torch.Tensor,
        targets: torch.Tensor,
        timesteps: torch.Tensor,
        noise: torch.Tensor,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """``||z_hat(lq) - encode(target)||²`` mean over latent channels (docs/design.md §4).

        ``z_hat`` is computed once per LQ and compared with all N targets. ``timesteps``,
        ``noise`` and ``negative_prompts`` are unused (one step, no CFG at inference).
        """
        batch, count = targets.shape[:2]
        lq = lq.to(self.device)
        z_hat = self.predict_latent(lq, self._text(prompts))
        latents = self.encode_targets(
            targets.flatten(0, 1).to(self.device), lq.repeat_interleave(count, dim=0)
        ).view(batch, count, *z_hat.shape[1:])
        return (z_hat[:, None] - latents).pow(2).mean(dim=2)

    def state_error_maps(
        self,
        lq: torch.Tensor,
        states: torch.Tensor,
        timesteps: torch.Tensor,
        targets: torch.Tensor,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """``||z_hat(lq) - target||²`` mean over latent channels ``[B, h, w]`` for latent
        ``targets [B, C, h', w']`` (e.g. the one-step Gaussian policy's action, on the padded
        grid :meth:`sample_policy` records): :meth:`error_maps` with a latent in place of an
        encoded image. The one-step model's only state is ``z_L`` of the LQ at
        ``settings.timestep``, recomputed here, so ``states`` and ``timesteps`` are accepted for
        the interface and unused, as are ``negative_prompts``."""
        if targets.shape[0] != lq.shape[0] or len(prompts) != lq.shape[0]:
            raise ValueError(
                f"{targets.shape[0]} targets and {len(prompts)} prompts for {lq.shape[0]} LQs"
            )
        lq = lq.to(self.device)
        z_hat = self.predict_latent(lq, self._text(prompts))
        height, width = z_hat.shape[-2:]
        target = targets.to(self.device).float()[..., :height, :width]
        return (z_hat - target).pow(2).mean(dim=1)

    @property
    def _active_names(self) -> list[str]:
        return [a["name"] for a in self.adapters]

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Forward passes without the top (trainable) adapter: the model as loaded."""
        self._set_active(self._active_names[:-1])
        try:
            yield
        finally:
            self._set_active(self._active_names)

    # -- inference ---------------------------------------------------------------------------
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
        """One step at ``t = T``, noise predictions blended over Gaussian-weighted latent
        tiles when the latent is larger than a tile, then colour correction (OSEDiff test).

        Deterministic: ``negative_prompts``, ``steps``, ``cfg`` and ``generators`` are
        accepted for the interface and unused (one step, no CFG, VAE posterior mode).
        """
        lq, padded, z_lq, z_hat = self._one_step(lq, prompts)
        return self._decode_one_step(z_hat, padded, lq)

    def _one_step(
        self, lq: torch.Tensor, prompts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`sample`'s prediction: (the LQ on the device, its padded copy, ``z_L``, the
        one-step latent ``z_hat`` over Gaussian-blended tiles); differentiable."""
        batch, _, height, width = lq.shape
        if len(prompts) != batch:
            raise ValueError(f"need one prompt per image ({batch}), got {len(prompts)}")
        lq = lq.to(self.device).float()
        multiple = self._size_multiple()
        pad_h, pad_w = -height % multiple, -width % multiple
        padded = F.pad(lq, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else lq
        embeddings = self._text(prompts)
        z_lq, unet_input = self.generator_input(padded)
        timesteps = torch.full((batch,), self.settings.timestep, device=self.device)

        def predict_tile(rows: slice, cols: slice) -> torch.Tensor:
            with self._autocast():
                tile = unet_input[..., rows, cols]
                return self.unet(tile, timesteps, encoder_hidden_states=embeddings).sample.float()

        eps = tiled_apply(
            predict_tile,
            z_lq.shape,
            self.settings.latent_tile_size,
            self.settings.latent_tile_overlap,
        )
        return lq, padded, z_lq, self._x0(z_lq, eps, timesteps)

    def _decode_one_step(
        self, latents: torch.Tensor, padded: torch.Tensor, lq: torch.Tensor
    ) -> torch.Tensor:
        height, width = lq.shape[-2:]
        with self._autocast():
            images = self.codec.decode(latents, padded).float()[..., :height, :width]
        return apply_color_fix(images.clamp(-1, 1), lq, self.settings.color_fix)

    # -- the stochastic policy of online methods (docs/online_alignment.md) ------------------
    #: what tables and metadata call this family's policy: one Gaussian action, not DDPO's MDP
    POLICY_NAME = "one-step Gaussian policy"

    @torch.no_grad()
    def sample_policy(
        self,
        lq: torch.Tensor,
        *,
        prompts: Sequence[str],
        std: float,
        generators: Sequence[torch.Generator],
    ) -> PolicySample:
        """The one-step Gaussian policy (:func:`pipeline.policy.gaussian_onestep_policy`):
        ``z ~ N(z_hat, std^2 I)`` around :meth:`sample`'s one-step latent, decoded as
        :meth:`sample` decodes. ONE action (T = 1), not DDPO's denoising chain; its states are
        ``(z_L, z)`` and its timestep ``settings.timestep``."""
        lq, padded, z_lq, z_hat = self._one_step(lq, prompts)
        latent, log_prob = online.gaussian_onestep_policy(z_hat, std, generator=list(generators))
        batch = lq.shape[0]
        return PolicySample(
            images=self._decode_one_step(latent, padded, lq),
            latents=torch.stack([z_lq, latent], dim=1),
            log_probs=log_prob[:, None],
            timesteps=torch.full((batch, 1), self.settings.timestep, dtype=torch.long),
        )

    def trajectory_log_probs(
        self,
        lq: torch.Tensor,
        sample: PolicySample,
        step_index: torch.Tensor,
        *,
        prompts: Sequence[str],
        std: float,
    ) -> torch.Tensor:
        """The current policy's log-prob ``[B]`` of ``sample``'s action, with gradients (the PPO
        pass); ``step_index`` is all zeros (one action)."""
        if bool((torch.as_tensor(step_index) != 0).any()):
            raise ValueError("the one-step Gaussian policy has one action: step_index must be 0")
        _, _, _, z_hat = self._one_step(lq, prompts)
        _, log_prob = online.gaussian_onestep_policy(
            z_hat, std, sample=sample.latents[:, 1].to(z_hat.device)
        )
        return log_prob


def _saved_base_weights(base: str, folder: Path) -> str:
    """A saved model's ``base_weights``: absolute, else relative to the model folder, else
    (models saved before paths were recorded absolute) relative to the working directory; a
    hub id only with downloads allowed. Returned absolute for local folders."""
    key = f"base_weights of {folder / MODEL_FILE}"
    path = Path(base).expanduser()
    if not path.is_absolute() and (folder / path).exists():
        return resolve_weights(folder / path, key)
    if not path.is_absolute() and not path.exists():
        key += f" (not found relative to the model folder {folder} either)"
    return resolve_weights(base, key)


def _load_sd_parts(path_or_id: str | Path, key: str, vae_tile_size: int) -> tuple:
    """UNet, text encoder, tokenizer, VAE codec and scheduler of an SD 2.1-base folder
    (``key``: the config entry that named it, for errors)."""
    source, kwargs = resolve_pretrained(path_or_id, SD_BASE_REQUIRED, key)
    plain = {k: v for k, v in kwargs.items() if k != "use_safetensors"}
    try:
        return (
            UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs),
            CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs),
            load_tokenizer(source, "tokenizer", **plain),
            VaeCodec.from_pretrained(source, subfolder="vae", tile_size=vae_tile_size, **kwargs),
            DDPMScheduler.from_pretrained(source, subfolder="scheduler", **plain),
        )
    except OSError as error:
        if Path(source).exists():
            raise
        raise hub_load_error(source, error) from error
