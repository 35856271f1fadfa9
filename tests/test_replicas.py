"""`python -m pipeline replicas`: every path the paper presets name, loaded by the real loaders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import replicas
from pipeline.io.images import read_rgb

ROOT = Path(__file__).resolve().parents[1]
PRESETS = [
    ROOT / "workflow/presets/paper_onestep.yaml",
    ROOT / "workflow/presets/paper_multistep.yaml",
]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    folder = tmp_path_factory.mktemp("replicas")
    assert replicas.main([str(folder), "--seed", "3"]) == 0
    return folder


def _images(size: int = 32, batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


def preset_paths(preset: dict) -> list[str]:
    """Every file or folder a paper preset refers to (results/ excepted: the pipeline's own)."""
    paths = [
        preset["degrade"]["source"],
        preset["segment"]["checkpoint"],
        preset["caption"]["captioner"],
        preset["score"]["weights_dir"],
        preset["evaluate"]["weights_dir"],
    ]
    for family in preset["pretrain"].values():
        paths.append(family["weights"])
        for key in ("perceptual_weights", "perceptual_weights_dir"):
            if family.get("model", {}).get(key):
                paths.append(family["model"][key])
    paths += [t["path"] for t in preset["testsets"].values() if t["kind"] == "paired"]
    return paths


@pytest.mark.slow
def test_every_preset_path_exists_and_summary_is_written(out, capsys):
    for preset_file in PRESETS:
        preset = yaml.safe_load(preset_file.read_text())
        for path in preset_paths(preset):
            assert (out / path).exists(), f"{preset_file.name}: {path} not written"
        assert preset["segment"]["model_type"] == "vit_h"
    summary = json.loads((out / "replicas.json").read_text())
    assert summary["seed"] == 3
    assert set(summary["not_replicated"]) == {"musiq", "maniqa", "clipiqa"}
    assert summary["config_overrides"]["segment"]["architecture"] == replicas.TINY_SAM
    # networks are safetensors; the only pickles are the .pth layouts the real files have
    pickles = [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert all(p.suffix == ".pth" for p in pickles)
    for pth in pickles:  # plain tensor dicts: loadable without unpickling arbitrary objects
        state = torch.load(pth, map_location="cpu", weights_only=True)
        assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    assert (out / "models/pyiqa/checkpoints/vgg16-397923af.pth").stat().st_size < 80e6


@pytest.mark.slow
def test_sd_folders_load_in_diffusers_and_the_pipeline_loaders(out):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from pipeline.models.multistep import MultiStepSR
    from pipeline.models.onestep import OneStepSR

    for path in replicas.SD_FOLDERS.values():
        folder = out / path
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        assert scheduler.config.prediction_type == "epsilon"
        assert scheduler.config.beta_schedule == "scaled_linear"
        assert (
            json.loads((folder / "scheduler/scheduler_config.json").read_text())["_class_name"]
            == "PNDMScheduler"
        )
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        assert pipe.vae_scale_factor == 8 and pipe.tokenizer.model_max_length == 77
        tokens = pipe.tokenizer("the cat on the road").input_ids
        assert len(tokens) < 20  # merges apply: fewer tokens than characters
        image = pipe(
            "a cat",
            height=64,
            width=64,
            num_inference_steps=1,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images
        assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()

    onestep = OneStepSR.from_sd_base(out / replicas.SD_FOLDERS["onestep"], lambda_vsd=0.0)
    assert onestep.codec.downscale == 8 and onestep._size_multiple() == 16
    sr = onestep.sample(_images(32), prompts=["a photo"])
    assert sr.shape == (1, 3, 32, 32) and torch.isfinite(sr).all()

    multistep = MultiStepSR.from_sd_base(out / replicas.SD_FOLDERS["multistep"])
    generators = [torch.Generator().manual_seed(0)]
    sr = multistep.sample(_images(32), prompts=["a photo"], steps=2, cfg=4.5, generators=generators)
    assert sr.shape == (1, 3, 32, 32) and torch.isfinite(sr).all()


@pytest.mark.slow
def test_onestep_pretrain_loss_with_the_lpips_vgg_replica(out):
    from pipeline.models.onestep import OneStepSR

    model = OneStepSR.from_sd_base(
        out / replicas.SD_FOLDERS["onestep"],
        perceptual="lpips",
        perceptual_weights=str(out / replicas.LPIPS_VGG_FILE),
        perceptual_weights_dir=str(out / replicas.PYIQA_DIR),
        lambda_vsd=0.0,
    )
    model.pretrain_parameters()
    loss, stats = model.pretrain_loss(
        _images(32), _images(32, seed=1), ["a photo"], torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(loss) and stats["lpips"] > 0
    loss.backward()


@pytest.mark.slow
def test_sam_replica_loads_with_the_documented_architecture_override(out):
    from pipeline import segment

    overrides = replicas.config_overrides()["segment"]
    config = {
        "checkpoint": str(out / replicas.SAM_CHECKPOINT),
        "model_type": "vit_h",
        "device": "cpu",
        **overrides,
    }
    segmenter = segment.build_segmenter(config)
    assert segmenter.info["backend"] == "sam"
    image = read_rgb(out / "data/RealSR/HR/Canon_001_HR.png")
    records = segment.generate_mask_records(image, segmenter)
    assert records and records[0]["segmentation"].shape == image.shape[:2]
    # the architecture comes from the override, the weights from the replica
    assert segmenter.info["architecture"]["encoder_embed_dim"] == 16
    loaded = segment.load_sam(out / replicas.SAM_CHECKPOINT, "vit_h", overrides["architecture"])
    saved = torch.load(out / replicas.SAM_CHECKPOINT, weights_only=True)
    for name, tensor in saved.items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)


@pytest.mark.slow
def test_caption_models_load_through_the_caption_stage(out):
    from pipeline.caption import TextEmbedder
    from pipeline.captioner import BlipCaptioner

    captioner = BlipCaptioner(out / replicas.BLIP_FOLDER, device="cpu", max_new_tokens=5)
    crop = read_rgb(out / "data/DRealSR/test_HR/DSC_0001_x1.png")[:24, :20]
    captions = captioner.caption([crop, crop])
    assert len(captions) == 2 and captions[0] == captions[1]
    embedder = TextEmbedder(out / replicas.MINILM_FOLDER, device="cpu")
    vectors = embedder.encode(["a red cat", "the blue sky"])
    assert vectors.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_pyiqa_replicas_load_offline_and_score(out):
    from pipeline.iqa import MetricRegistry, score_images

    registry = MetricRegistry(weights_dir=out / replicas.PYIQA_DIR, device="cpu")
    hq = (_images(96, batch=2) + 1) / 2  # NIQE needs 96 px blocks
    sr = (hq + 0.05 * torch.randn(hq.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    names = ["psnr", "ssim", "lpips", "dists", "niqe", *replicas.WEIGHT_FREE_SWAPS.values()]
    scores = score_images(names, sr, hq, registry)
    for name, values in scores.items():
        assert values.shape == (2,) and torch.isfinite(values).all(), name
    assert (scores["lpips"] > 0).all()
    # the loaded heads are the replica's, not pyiqa's random initialisation
    lin = registry.model("lpips").net.lin0.model[1].weight
    saved = torch.load(out / replicas.PYIQA_DIR / "pyiqa" / replicas.LPIPS_FILES["alex"])
    torch.testing.assert_close(lin.cpu(), saved["lin0.model.1.weight"])


@pytest.mark.slow
def test_paired_testsets_load_through_evaluate(out):
    from pipeline.evaluate import load_testset

    for name, path in replicas.TESTSETS.items():
        images = load_testset("paired", out / path)
        sizes = replicas.TESTSET_LAYOUTS[name][4]
        assert len(images) == len(sizes)
        for image, (height, width) in zip(images, sizes, strict=True):
            assert read_rgb(image.hq).shape == (height, width, 3)
            assert read_rgb(image.lq).shape == (height // 4, width // 4, 3)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_writers_are_deterministic_from_the_seed(tmp_path):
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        replicas.write_sd_base(tmp_path / name / "sd", seed, "onestep")
        replicas.write_sam(tmp_path / name / "sam.pth", seed)
        replicas.write_testset(tmp_path / name / "RealSR", "RealSR", seed)
    a, b, c = (_digest(tmp_path / name) for name in "abc")
    assert a == b
    differing = {key for key in a if a[key] != c[key]}
    assert {
        "sam.pth",
        "sd/unet/diffusion_pytorch_model.safetensors",
        "RealSR/HR/Canon_001_HR.png",
    } <= differing
