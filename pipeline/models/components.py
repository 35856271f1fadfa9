"""Building blocks both SR families share: text encoder, UNet, pretrained-folder checks.

Tiny components are built from configs (nothing is downloaded), so tests and the CPU demo run
the same code paths as real SD 2-base weights; real weights come from a local diffusers folder
(checked with :func:`check_pretrained_folder`), or a hub id when downloads are allowed
(:mod:`pipeline.hub`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from pipeline.hub import ALLOW_DOWNLOADS_ENV, resolve_weights

#: files every SD 2-base / 2.1-base diffusers folder holds, per subfolder
SD_BASE_REQUIRED: dict[str, list[str]] = {
    "unet": ["config.json", "diffusion_pytorch_model.safetensors"],
    "vae": ["config.json", "diffusion_pytorch_model.safetensors"],
    "text_encoder": ["config.json", "model.safetensors"],
    "tokenizer": ["tokenizer_config.json"],
    "scheduler": ["scheduler_config.json"],
}

# A few common English merges so prompts tokenize into more than single bytes.
_TINY_MERGES = ["t h", "th e</w>", "a n", "i n", "e r", "o n", "r e", "a t", "e n", "o r"]
TINY_MAX_LENGTH = 16


def build_tiny_tokenizer(max_length: int = TINY_MAX_LENGTH) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over the 256 byte-level symbols plus a few merges, built offline.

    The vocab/merges files are generated into a temporary folder and loaded from there, the same
    way a real tokenizer folder is read.
    """
    symbols = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in [*symbols, *(s + "</w>" for s in symbols)]:
        vocab[token] = len(vocab)
    for merge in _TINY_MERGES:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    with tempfile.TemporaryDirectory() as folder:
        vocab_file = Path(folder, "vocab.json")
        merges_file = Path(folder, "merges.txt")
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(_TINY_MERGES) + "\n", encoding="utf-8")
        return CLIPTokenizer(
            vocab=str(vocab_file), merges=str(merges_file), model_max_length=max_length
        )


def build_tiny_text_encoder(
    hidden_size: int = 32, num_layers: int = 2, max_length: int = TINY_MAX_LENGTH
) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """A tiny CLIP text model (``hidden_size``, ``num_layers``) and its offline tokenizer."""
    tokenizer = build_tiny_tokenizer(max_length)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=hidden_size,
    )
    return CLIPTextModel(config), tokenizer


def encode_prompts(
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    prompts: Sequence[str],
    device: torch.device | str,
) -> torch.Tensor:
    """Last hidden states ``[B, L, D]`` of the prompts, padded/truncated to the tokenizer length."""
    tokens = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return text_encoder(tokens.input_ids.to(device))[0]


def build_tiny_unet(
    in_channels: int,
    out_channels: int,
    cross_attention_dim: int,
    sample_size: int,
    block_out_channels: Sequence[int] = (32, 64),
    attention_head_dim: int = 8,
) -> UNet2DConditionModel:
    """A small SD-style UNet: cross-attention in the first down / last up block, 1 layer per block."""
    depth = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (depth - 1),
        up_block_types=("UpBlock2D",) * (depth - 1) + ("CrossAttnUpBlock2D",),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=min(8, *block_out_channels),
    )


#: how to turn a pickle-only subfolder into safetensors: the class that loads it
_CONVERTERS = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "controlnet": ("diffusers", "ControlNetModel"),
    "text_encoder": ("transformers", "CLIPTextModel"),
}


def _pickle_only_message(folder: Path, sub: str, name: str, pickle_name: str) -> str:
    where = folder / sub
    library, cls = _CONVERTERS.get(sub, ("diffusers", "<ModelClass>"))
    return (
        f"{where} holds only pickle weights ({pickle_name}, no {name}); the pipeline loads "
        f"safetensors only (a pickle can run code). Convert it once, by hand: "
        f"python -c \"from {library} import {cls}; {cls}.from_pretrained('{where}', "
        f"use_safetensors=False).save_pretrained('{where}', safe_serialization=True)\""
    )


def _weights_present(directory: Path, name: str) -> bool:
    """``name`` or, for safetensors, its sharded form (``name.index.json``)."""
    if (directory / name).is_file():
        return True
    return name.endswith(".safetensors") and (directory / f"{name}.index.json").is_file()


def _pickle_alternative(directory: Path, name: str) -> str | None:
    """The pickle file that stands where safetensors ``name`` is expected, if any."""
    if not name.endswith(".safetensors"):
        return None
    stem = name.removesuffix(".safetensors")
    for candidate in (
        f"{stem}.bin",
        f"pytorch_{stem}.bin",
        f"{stem}.bin.index.json",
        f"pytorch_{stem}.bin.index.json",
    ):
        if (directory / candidate).is_file():
            return candidate
    return None


def check_pretrained_folder(path: str | Path, required: dict[str, list[str]]) -> Path:
    """Raise ``FileNotFoundError`` naming ``path`` and every expected file that is missing.

    ``required`` maps subfolders to file names (``{"unet": ["config.json", ...]}``; key ``""``
    for files at the root). Safetensors may be sharded (``*.safetensors.index.json``); a
    subfolder holding only pickle weights (``*.bin``) is refused with how to convert it.
    Returns the folder as a ``Path``.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"pretrained model folder not found: {folder}")
    missing, pickles = [], []
    for sub, names in required.items():
        for name in names:
            if _weights_present(folder / sub, name):
                continue
            pickle_name = _pickle_alternative(folder / sub, name)
            if pickle_name is not None:
                pickles.append(_pickle_only_message(folder, sub, name, pickle_name))
            else:
                missing.append(f"{sub}/{name}" if sub else name)
    if pickles:
        raise ValueError(" ".join(pickles))
    if missing:
        raise FileNotFoundError(
            f"pretrained model folder {folder} is incomplete; missing: {', '.join(missing)}"
        )
    return folder


def resolve_pretrained(
    path_or_id: str | Path, required: dict[str, list[str]], key: str = "weights"
) -> tuple[str, dict]:
    """Where to load from and the ``from_pretrained`` keyword arguments that go with it.

    :func:`pipeline.hub.resolve_weights` decides (``key`` names the config entry in errors): an
    existing folder comes back absolute and is checked with :func:`check_pretrained_folder`; a
    hub id only when downloads are allowed. Safetensors only, in either case.
    """
    source = resolve_weights(path_or_id, key)
    if Path(source).exists():
        return str(check_pretrained_folder(source, required)), {"use_safetensors": True}
    return source, {"use_safetensors": True}


def hub_load_error(path_or_id: str, error: Exception) -> FileNotFoundError:
    """A clear error for a hub id that could not be loaded (downloads are allowed here)."""
    return FileNotFoundError(
        f"could not load {path_or_id!r} from the Hugging Face hub (downloads allowed, "
        f"{ALLOW_DOWNLOADS_ENV}=1); give a local diffusers folder instead: {error}"
    )


def check_tokenizer_folder(folder: str | Path) -> Path:
    """A CLIP tokenizer folder needs ``tokenizer.json`` or both ``vocab.json`` and ``merges.txt``
    (SD's own layout); otherwise ``FileNotFoundError`` naming the folder and the missing files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    if (folder / "tokenizer.json").is_file():
        return folder
    missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"tokenizer folder {folder} is incomplete: missing {' and '.join(missing)} "
            "(a CLIP tokenizer needs vocab.json and merges.txt, or tokenizer.json)"
        )
    return folder


def load_tokenizer(source: str | Path, subfolder: str = "", **kwargs) -> CLIPTokenizer:
    """``CLIPTokenizer.from_pretrained`` after :func:`check_tokenizer_folder` for local folders
    (a hub id, allowed only with downloads on, is passed through)."""
    local = Path(source, subfolder)
    if Path(source).exists():
        return CLIPTokenizer.from_pretrained(check_tokenizer_folder(local))
    kwargs.pop("use_safetensors", None)
    extra = {"subfolder": subfolder} if subfolder else {}
    return CLIPTokenizer.from_pretrained(str(source), **extra, **kwargs)


class DiffusionParts:
    """Forward helpers both families share: they hold a ``unet``, a CLIP ``text_encoder`` and
    ``tokenizer``, a latent ``codec`` and the ``compute_dtype`` set by ``to_device``."""

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def _autocast(self):
        enabled = self.compute_dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=enabled)

    @torch.no_grad()
    def _text(self, prompts: Sequence[str]) -> torch.Tensor:
        return encode_prompts(self.text_encoder, self.tokenizer, prompts, self.device)

    def _size_multiple(self) -> int:
        """Image sides must be multiples of this: the codec's and the UNet's downscaling."""
        return self.codec.downscale * 2 ** (len(self.unet.config.block_out_channels) - 1)
