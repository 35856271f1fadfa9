"""Tiny random stand-ins for every weight file and data folder the paper presets name.

``python -m pipeline replicas OUT [--seed S]`` writes, under ``OUT`` acting as the project root,
the files that ``workflow/presets/paper_onestep.yaml`` and ``paper_multistep.yaml`` point at, in
the layouts the real downloads have, but with tiny randomly initialised networks (widths 8-32),
so the paper configuration's loading code can be exercised end to end on a CPU:

==========================================  ===================================================
``models/stable-diffusion-2-base/``         diffusers ``StableDiffusionPipeline`` folder
``models/stable-diffusion-2-1-base/``       (``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
                                            ``scheduler``, ``feature_extractor``,
                                            ``model_index.json``); PNDM scheduler config with
                                            epsilon prediction, as both SD releases ship it
``models/sam_vit_h_4b8939.pth``             SAM state dict (``torch.save``, as SAM ships), tiny
                                            architecture: load it with ``segment.architecture``
                                            set to :data:`TINY_SAM` (see ``config_overrides``)
``models/blip-image-captioning-large/``     ``BlipForConditionalGeneration`` + ``BlipProcessor``
``models/all-MiniLM-L6-v2/``                a tiny sentence-transformers model (optional: the
                                            caption stage's default is the bundled real one)
``models/pyiqa/``                           torch-hub layout: LPIPS (VGG, AlexNet) heads, DISTS
                                            alpha/beta, NIQE parameters under ``pyiqa/``, the
                                            torchvision VGG16 / AlexNet backbones under
                                            ``checkpoints/`` (full size: pyiqa fixes their
                                            architecture; the unused classifier weights are
                                            stored as stride-0 constants, a few bytes)
``data/RealSR/``, ``data/DRealSR/``         paired test sets (``LR``/``HR`` with RealSR V3 names,
                                            ``test_LR``/``test_HR`` with DRealSR's ``_x4``/``_x1``)
``data/LSDIR/``                             a few HQ training images in LSDIR's folder layout
==========================================  ===================================================

Everything is deterministic from ``--seed`` (each part seeded by
:func:`pipeline.seeding.derive_seed`). Networks are saved as safetensors through
``save_pretrained``; the files whose real layout is a ``.pth`` (SAM, the pyiqa and torchvision
checkpoints) are ``torch.save`` of plain tensor dicts, loadable with ``weights_only=True``.
MUSIQ, MANIQA and CLIPIQA are not replicated (see :data:`NOT_REPLICATED`). A JSON summary is
printed and written to ``OUT/replicas.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.io.images import write_png
from pipeline.seeding import derive_seed, numpy_rng

# -- where the paper presets look (relative to the project root) ------------------------------
SD_FOLDERS = {
    "multistep": "models/stable-diffusion-2-base",
    "onestep": "models/stable-diffusion-2-1-base",
}
SAM_CHECKPOINT = "models/sam_vit_h_4b8939.pth"
BLIP_FOLDER = "models/blip-image-captioning-large"
MINILM_FOLDER = "models/all-MiniLM-L6-v2"
PYIQA_DIR = "models/pyiqa"
LPIPS_VGG_FILE = "models/pyiqa/LPIPS_v0.1_vgg-a78928a0.pth"
TESTSETS = {"RealSR": "data/RealSR", "DRealSR": "data/DRealSR"}
LSDIR_FOLDER = "data/LSDIR"

#: SD's ``scheduler/scheduler_config.json`` (both 2-base and 2.1-base: epsilon prediction; the
#: v-prediction one is the 768 px SD 2.1, not named by the presets)
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD_DIFFUSERS_VERSION = {"multistep": "0.8.0", "onestep": "0.10.0.dev0"}
SD_MODEL_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
TEXT_WIDTH = 32
TOKENIZER_LENGTH = 77  # SD's CLIP context length
# common English merges, so prompts tokenize into more than single bytes
BPE_MERGES = [
    "t h",
    "th e</w>",
    "a n",
    "i n",
    "e r",
    "o n",
    "r e",
    "a t",
    "e n",
    "o r",
    "e s",
    "i s</w>",
    "o f</w>",
    "t o</w>",
    "an d</w>",
    "in g</w>",
    "e d</w>",
    "h i",
    "s t",
]

#: a tiny SAM (segment.architecture overrides of vit_h's keys)
TINY_SAM: dict[str, Any] = {
    "encoder_embed_dim": 16,
    "encoder_depth": 2,
    "encoder_num_heads": 2,
    "encoder_global_attn_indexes": [1],
    "image_size": 64,
    "patch_size": 8,
    "window_size": 4,
    "prompt_embed_dim": 16,
    "decoder_depth": 1,
    "decoder_mlp_dim": 32,
    "decoder_num_heads": 2,
    "iou_head_hidden_dim": 16,
}
#: thresholds at zero so the untrained SAM still returns masks; a 4 x 4 point grid
SAM_GENERATOR: dict[str, Any] = {
    "points_per_side": 4,
    "points_per_batch": 16,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
    "box_nms_thresh": 0.99,
}
CAPTION_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "with",
    "and",
    "photo",
    "picture",
    "close",
    "up",
    "cat",
    "dog",
    "tree",
    "sky",
    "house",
    "car",
    "road",
    "grass",
    "water",
    "wall",
    "man",
    "woman",
    "red",
    "blue",
    "green",
    "white",
    "black",
    "small",
    "large",
    "old",
]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

#: pyiqa checkpoints (``{weights_dir}/pyiqa/``) and torchvision backbones (``checkpoints/``)
LPIPS_CHANNELS = {"vgg": (64, 128, 256, 512, 512), "alex": (64, 192, 384, 256, 256)}
LPIPS_FILES = {"vgg": "LPIPS_v0.1_vgg-a78928a0.pth", "alex": "LPIPS_v0.1_alex-df73285e.pth"}
BACKBONE_FILES = {"vgg16": "vgg16-397923af.pth", "alexnet": "alexnet-owt-7be5be79.pth"}
DISTS_FILE = "DISTS_weights-f5e65c96.pth"
DISTS_CHANNELS = 3 + 64 + 128 + 256 + 512 + 512
NIQE_FILE = "niqe_modelparameters.mat"
NIQE_FEATURES = 36
#: paper metrics whose networks have a fixed, large architecture and need real weights
NOT_REPLICATED: dict[str, str] = {
    "musiq": "MUSIQ's multi-scale transformer has a fixed size (~27 M parameters); needs "
    "models/pyiqa/pyiqa/musiq_koniq_ckpt-e95806b9.pth",
    "maniqa": "MANIQA (pyiqa maniqa-pipal) builds timm's ViT-B/8 from the Hugging Face cache "
    "plus ckpt_maniqa_pipal; fixed size (~135 M parameters)",
    "clipiqa": "CLIPIQA loads OpenAI CLIP RN50 from models/pyiqa/clip/RN50.pt (TorchScript, "
    "~100 M parameters)",
}
#: weight-free pyiqa metrics the paper metrics above can be swapped for in a CPU test
#: (piqe is the only weight-free no-reference one; fsim and gmsd are full-reference)
WEIGHT_FREE_SWAPS = {"musiq": "piqe", "maniqa": "fsim", "clipiqa": "gmsd"}


def _seeded(seed: int, *keys: object) -> None:
    torch.manual_seed(derive_seed(seed, "replicas", *keys))


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``torch.save`` of a plain tensor dict (the ``.pth`` layouts), contiguous copies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, path)


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# -- SD 2-base / 2.1-base diffusers folders ---------------------------------------------------


def write_clip_tokenizer(folder: Path) -> Any:
    """A byte-level CLIP BPE tokenizer (256 symbols, their ``</w>`` forms, a few merges) with
    SD 2's settings (pad ``!``, 77 tokens), saved as ``vocab.json`` + ``merges.txt``."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in [*symbols, *(s + "</w>" for s in symbols)]:
        vocab[token] = len(vocab)
    for merge in BPE_MERGES:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(BPE_MERGES) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(
        vocab=str(vocab_file),
        merges=str(merges_file),
        pad_token="!",
        model_max_length=TOKENIZER_LENGTH,
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_sd_base(folder: Path, seed: int, family: str) -> dict[str, Any]:
    """An SD 2-base (``family="multistep"``) or 2.1-base (``"onestep"``) shaped folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel

    tokenizer = write_clip_tokenizer(folder / "tokenizer")
    _seeded(seed, "sd", family, "text_encoder")
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TOKENIZER_LENGTH,
        hidden_act="gelu",
        projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    CLIPTextModel(text_config).save_pretrained(folder / "text_encoder")
    _seeded(seed, "sd", family, "unet")
    UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=[2, 4],  # SD 2 names the head count so ([5, 10, 20, 20])
        use_linear_projection=True,
        norm_num_groups=8,
    ).save_pretrained(folder / "unet")
    _seeded(seed, "sd", family, "vae")
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),  # four levels: SD's 8x latent downscale
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    ).save_pretrained(folder / "vae")
    version = SD_DIFFUSERS_VERSION[family]
    _write_json(
        folder / "scheduler" / "scheduler_config.json",
        {**SD_SCHEDULER_CONFIG, "_diffusers_version": version},
    )
    CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    ).save_pretrained(folder / "feature_extractor")
    _write_json(folder / "model_index.json", {**SD_MODEL_INDEX, "_diffusers_version": version})
    return {
        "kind": f"SD {'2-base' if family == 'multistep' else '2.1-base'} (diffusers)",
        "files": _files(folder),
    }


# -- SAM ---------------------------------------------------------------------------------------


def write_sam(path: Path, seed: int) -> dict[str, Any]:
    """A tiny SAM's state dict saved as SAM ships its checkpoints (a pickled state dict)."""
    from pipeline.segment import SAM_ARCHITECTURES, build_sam

    _seeded(seed, "sam")
    sam = build_sam({**SAM_ARCHITECTURES["vit_h"], **TINY_SAM})
    _save_tensors({k: v.contiguous() for k, v in sam.state_dict().items()}, path)
    return {"kind": "segment-anything state dict (tiny)", "architecture": dict(TINY_SAM)}


# -- BLIP captioner and the similarity model ---------------------------------------------------


def write_blip(folder: Path, seed: int) -> dict[str, Any]:
    """``BlipForConditionalGeneration`` + ``BlipProcessor`` (BERT word-piece vocab, 32 px)."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = [*BERT_SPECIALS, "[DEC]", *CAPTION_WORDS]
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(vocab_file), bos_token="[DEC]")
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    dec = vocab.index("[DEC]")
    sep = vocab.index("[SEP]")
    text = {
        "vocab_size": len(vocab),
        "hidden_size": 16,
        "encoder_hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 40,
        "bos_token_id": dec,
        "eos_token_id": sep,
        "sep_token_id": sep,
        "pad_token_id": 0,
    }
    vision = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 16,
    }
    _seeded(seed, "blip")
    model = BlipForConditionalGeneration(
        BlipConfig(vision_config=vision, text_config=text, projection_dim=16)
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return {"kind": "BLIP captioner (tiny)", "files": _files(folder)}


def write_sentence_model(folder: Path, seed: int) -> dict[str, Any]:
    """A sentence-transformers model (BERT + mean pooling) in all-MiniLM-L6-v2's layout."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizer

    bert = folder / "_bert"
    bert.mkdir(parents=True, exist_ok=True)
    vocab = [*BERT_SPECIALS, *CAPTION_WORDS]
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizer(str(bert / "vocab.txt")).save_pretrained(bert)
    _seeded(seed, "minilm")
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(bert)
    model = SentenceTransformer(modules=[Transformer(str(bert)), Pooling(16), Normalize()])
    model.save(str(folder))
    for path in sorted(bert.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    bert.rmdir()
    return {
        "kind": "sentence-transformers (tiny; optional: the default is the bundled "
        "all-MiniLM-L6-v2)",
        "files": _files(folder),
    }


# -- pyiqa weights (torch-hub layout) ---------------------------------------------------------


def _backbone_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    """A torchvision ``vgg16`` / ``alexnet`` state dict: random (He-initialised) convolutions,
    the classifier (unused by LPIPS and DISTS, but ``load_state_dict`` is strict) as stride-0
    zero tensors, which ``torch.save`` stores in a few bytes."""
    import torchvision

    with torch.device("meta"):
        net = getattr(torchvision.models, name)()
    generator = torch.Generator().manual_seed(derive_seed(seed, "replicas", "pyiqa", name))
    state: dict[str, torch.Tensor] = {}
    for key, meta in net.state_dict().items():
        if key.startswith("features.") and key.endswith(".weight"):
            fan_in = meta[0].numel()
            state[key] = torch.randn(meta.shape, generator=generator) * (2.0 / fan_in) ** 0.5
        elif key.startswith("features."):
            state[key] = torch.zeros(meta.shape)
        else:
            state[key] = torch.zeros(()).expand(meta.shape)
    return state


def write_pyiqa(folder: Path, lpips_vgg_file: Path, seed: int) -> dict[str, Any]:
    """LPIPS-VGG (perceptual loss) and the weights of lpips, dists and niqe under ``folder``."""
    import scipy.io

    written: dict[str, str] = {}
    rng = numpy_rng(seed, "replicas", "pyiqa", "heads")
    heads = {
        net: {
            f"lin{k}.model.1.weight": torch.from_numpy(
                rng.uniform(0, 2 / c, (1, c, 1, 1)).astype(np.float32)
            )
            for k, c in enumerate(channels)
        }
        for net, channels in LPIPS_CHANNELS.items()
    }
    _save_tensors(heads["vgg"], lpips_vgg_file)
    written["lpips-vgg (perceptual_weights)"] = str(lpips_vgg_file)
    for net, name in LPIPS_FILES.items():
        _save_tensors(heads[net], folder / "pyiqa" / name)
        written[f"lpips-{net}"] = str(folder / "pyiqa" / name)
    for name, file in BACKBONE_FILES.items():
        _save_tensors(_backbone_state(name, seed), folder / "checkpoints" / file)
        written[f"torchvision {name}"] = str(folder / "checkpoints" / file)
    dists = {
        key: torch.from_numpy(rng.normal(0.1, 0.01, (1, DISTS_CHANNELS, 1, 1)).astype(np.float32))
        for key in ("alpha", "beta")
    }
    _save_tensors(dists, folder / "pyiqa" / DISTS_FILE)
    written["dists"] = str(folder / "pyiqa" / DISTS_FILE)
    # NIQE's pristine model: a mean feature vector and a positive definite covariance
    basis = rng.normal(0, 1, (NIQE_FEATURES, NIQE_FEATURES))
    covariance = basis @ basis.T / NIQE_FEATURES + 0.1 * np.eye(NIQE_FEATURES)
    mean = rng.uniform(0.1, 2.0, (1, NIQE_FEATURES))
    (folder / "pyiqa").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(
        folder / "pyiqa" / NIQE_FILE, {"mu_prisparam": mean, "cov_prisparam": covariance}
    )
    written["niqe"] = str(folder / "pyiqa" / NIQE_FILE)
    return {
        "kind": "pyiqa / torch-hub weights",
        "written": written,
        "metrics": ["psnr", "ssim", "lpips", "lpips-vgg", "dists", "niqe"],
        "not_replicated": dict(NOT_REPLICATED),
    }


# -- images ------------------------------------------------------------------------------------


def random_photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A uint8 image with some structure: smooth colour blocks, a disc, a bar and noise."""
    coarse = rng.uniform(30, 225, (height // 16 + 1, width // 16 + 1, 3))
    image = np.kron(coarse, np.ones((16, 16, 1)))[:height, :width]
    ys, xs = np.mgrid[:height, :width]
    cy, cx, r = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width, height / 5
    image[(ys - cy) ** 2 + (xs - cx) ** 2 < r**2] = rng.uniform(0, 255, 3)
    top = int(rng.integers(0, height - 4))
    image[top : top + 4] = rng.uniform(0, 255, 3)
    image = image + rng.normal(0, 6, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def box_downsample(image: np.ndarray, scale: int) -> np.ndarray:
    height, width = image.shape[0] // scale, image.shape[1] // scale
    blocks = image[: height * scale, : width * scale].astype(np.float64)
    low = blocks.reshape(height, scale, width, scale, 3).mean(axis=(1, 3))
    return np.rint(low).astype(np.uint8)


#: (LQ folder, HQ folder, LQ name, HQ name, HQ sizes) per paired test set, scale 4
TESTSET_LAYOUTS = {
    "RealSR": (
        "LR",
        "HR",
        "Canon_{i:03d}_LR4.png",
        "Canon_{i:03d}_HR.png",
        [(64, 64), (64, 64), (48, 64)],
    ),
    "DRealSR": (
        "test_LR",
        "test_HR",
        "DSC_{i:04d}_x4.png",
        "DSC_{i:04d}_x1.png",
        [(64, 64), (32, 48)],
    ),
}


def write_testset(folder: Path, name: str, seed: int) -> dict[str, Any]:
    lq_dir, hq_dir, lq_name, hq_name, sizes = TESTSET_LAYOUTS[name]
    for index, (height, width) in enumerate(sizes, start=1):
        hq = random_photo(numpy_rng(seed, "replicas", "testset", name, index), height, width)
        write_png(folder / hq_dir / hq_name.format(i=index), hq)
        write_png(folder / lq_dir / lq_name.format(i=index), box_downsample(hq, 4))
    return {"kind": f"{name} paired test set (x4)", "files": _files(folder)}


def write_lsdir(folder: Path, seed: int, count: int = 4, size: int = 96) -> dict[str, Any]:
    """HQ training images in LSDIR's layout (``0001000/0000001.png``, ...)."""
    for index in range(1, count + 1):
        image = random_photo(numpy_rng(seed, "replicas", "lsdir", index), size, size)
        write_png(folder / "0001000" / f"{index:07d}.png", image)
    return {"kind": "LSDIR-layout HQ images", "files": _files(folder)}


# -- all together ------------------------------------------------------------------------------


def config_overrides() -> dict[str, Any]:
    """What a paper preset needs on top to run on these replicas (documented config keys)."""
    swapped = [
        WEIGHT_FREE_SWAPS.get(m, m)
        for m in ["psnr", "ssim", "lpips", "dists", "niqe", "musiq", "maniqa", "clipiqa"]
    ]
    return {
        "segment": {"architecture": dict(TINY_SAM), "generator": dict(SAM_GENERATOR)},
        "caption": {"text_encoder": MINILM_FOLDER},
        "score": {"metrics": swapped},
        "evaluate": {"metrics": swapped},
        "notes": {
            "segment": "required: the checkpoint holds a tiny SAM, not ViT-H",
            "caption": "optional: without it the bundled real all-MiniLM-L6-v2 is used",
            "metrics": f"required: {sorted(NOT_REPLICATED)} have no replica; swapped for "
            f"weight-free {WEIGHT_FREE_SWAPS}",
            "degrade": f"the {LSDIR_FOLDER} images are 96 px: degrade.crop_size must be <= 96",
        },
    }


def write_replicas(root: str | Path, seed: int = 0) -> dict[str, Any]:
    """Write every replica under ``root``; returns the summary (also ``root/replicas.json``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    jobs: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
        "sd_2_base": (
            SD_FOLDERS["multistep"],
            lambda: write_sd_base(root / SD_FOLDERS["multistep"], seed, "multistep"),
        ),
        "sd_2_1_base": (
            SD_FOLDERS["onestep"],
            lambda: write_sd_base(root / SD_FOLDERS["onestep"], seed, "onestep"),
        ),
        "sam": (SAM_CHECKPOINT, lambda: write_sam(root / SAM_CHECKPOINT, seed)),
        "blip": (BLIP_FOLDER, lambda: write_blip(root / BLIP_FOLDER, seed)),
        "sentence_model": (MINILM_FOLDER, lambda: write_sentence_model(root / MINILM_FOLDER, seed)),
        "pyiqa": (PYIQA_DIR, lambda: write_pyiqa(root / PYIQA_DIR, root / LPIPS_VGG_FILE, seed)),
        **{
            name.lower(): (path, lambda n=name, p=path: write_testset(root / p, n, seed))
            for name, path in TESTSETS.items()
        },
        "lsdir": (LSDIR_FOLDER, lambda: write_lsdir(root / LSDIR_FOLDER, seed)),
    }
    written: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        for name, (path, write) in jobs.items():
            written[name] = {"path": path, **write()}
    if "written" in written["pyiqa"]:  # paths relative to the root, like every other entry
        written["pyiqa"]["written"] = {
            k: str(Path(v).relative_to(root)) for k, v in written["pyiqa"]["written"].items()
        }
    summary = {
        "root": str(root.resolve()),
        "seed": int(seed),
        "written": written,
        "not_replicated": dict(NOT_REPLICATED),
        "config_overrides": config_overrides(),
    }
    _write_json(root / "replicas.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline replicas",
        description="Write tiny random stand-ins for the paper presets' weights and data.",
    )
    parser.add_argument("out", help="folder acting as the project root (models/, data/)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = write_replicas(args.out, args.seed)
    json.dump(summary, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
