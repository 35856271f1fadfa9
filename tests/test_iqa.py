"""IQA registry: pooled maps against pyiqa, crops, registry metadata, offline weights."""

import socket

import numpy as np
import pyiqa
import pytest
import torch
import torch.nn.functional as F

import pipeline.iqa
from pipeline.iqa import (
    MetricRegistry,
    MissingWeightsError,
    lpips_map,
    masked_crop,
    metric_info,
    score_images,
    score_instances,
    ssim_map,
)


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(0)
    hq = torch.rand(3, 40, 48, generator=generator)
    noise = (
        torch.randn(3, 3, 40, 48, generator=generator)
        * torch.tensor([0.02, 0.1, 0.3])[:, None, None, None]
    )
    return (hq + noise).clamp(0, 1), hq


@pytest.fixture(scope="module")
def registry():
    return MetricRegistry(device="cpu")


def full_mask(hq):
    return torch.ones(1, *hq.shape[1:], dtype=torch.bool)


def test_full_mask_pooled_psnr_is_pyiqa_psnr_exactly(images, registry):
    candidates, hq = images
    reference = pyiqa.create_metric("psnr", test_y_channel=True, color_space="ycbcr", device="cpu")
    expected = reference(candidates, hq[None].expand_as(candidates)).double()
    pooled = score_instances(registry, ["psnr"], candidates, hq, full_mask(hq))["psnr"][:, 0]
    assert torch.equal(pooled, expected)


def test_full_mask_pooled_ssim_matches_pyiqa(images, registry):
    candidates, hq = images
    reference = pyiqa.create_metric("ssim", test_y_channel=True, color_space="ycbcr", device="cpu")
    expected = reference(candidates, hq[None].expand_as(candidates)).double()
    pooled = score_instances(registry, ["ssim"], candidates, hq, full_mask(hq))["ssim"][:, 0]
    assert torch.allclose(pooled, expected, atol=1e-4, rtol=0)
    assert pooled[0] > pooled[1] > pooled[2]  # more noise, lower SSIM


def test_instance_psnr_is_psnr_of_the_instance_pixels(images, registry):
    candidates, hq = images
    labels = torch.zeros(40, 48, dtype=torch.long)
    labels[5:25, 10:40] = 1
    masks = torch.stack([labels == 0, labels == 1])
    pooled = score_instances(registry, ["psnr"], candidates, hq, masks)["psnr"]

    def luma(image):  # ITU-R BT.601 Y in [0, 1], as pyiqa's rgb2ycbcr
        rgb = image.double().numpy()
        return (65.481 * rgb[0] + 128.553 * rgb[1] + 24.966 * rgb[2] + 16.0) / 255.0

    for c in range(3):
        error = (luma(candidates[c]) - luma(hq)) ** 2
        for m in range(2):
            mse = error[masks[m].numpy()].mean()
            assert pooled[c, m] == pytest.approx(10 * np.log10(1 / (mse + 1e-8)), abs=1e-4)


def test_ssim_of_a_thin_border_instance_is_finite(images, registry):
    candidates, hq = images
    labels = torch.zeros(40, 48, dtype=torch.long)
    labels[:3, :] = 1  # no 11x11 window is centred here
    masks = torch.stack([labels == 0, labels == 1])
    pooled = score_instances(registry, ["ssim"], candidates, hq, masks)["ssim"]
    assert torch.isfinite(pooled).all()
    assert pooled[0, 1] > pooled[2, 1]


def luma_255(images):
    """What pyiqa's SSIM filters: rounded BT.601 luma in [0, 255], float64."""
    from pyiqa.archs.func_util import preprocess_rgb

    return preprocess_rgb(images, True, 255, "ycbcr").to(torch.float64)


def ssim_test_images(kind, generator, height=64, width=75):
    """One reference and four candidates (from identical to heavily noisy, or unrelated)."""
    if kind == "smooth":
        coarse = torch.rand(1, 3, 6, 5, generator=generator)
        hq = F.interpolate(coarse, size=(height, width), mode="bicubic").clamp(0, 1)
    elif kind == "flat":
        hq = torch.full((1, 3, height, width), 0.97)
    else:
        hq = torch.rand(1, 3, height, width, generator=generator)
    if kind == "random":
        return torch.rand(4, 3, height, width, generator=generator), hq
    sigma = torch.tensor([0.0, 0.01, 0.05, 0.3])[:, None, None, None]
    noise = torch.randn(4, 3, height, width, generator=generator) * sigma
    return (hq + noise).clamp(0, 1), hq


@pytest.mark.parametrize("kind", ["random", "noisy", "smooth", "flat"])
@pytest.mark.parametrize("size", [(64, 75), (131, 40)])
def test_fast_ssim_map_matches_pyiqa_ssim_map(kind, size):
    # pyiqa's window is a float64 gaussian stored as float32, so not exactly separable; the
    # separable factors (its marginals, same sum) differ from it by float32 rounding (~4e-9
    # per coefficient). On 8-bit luma that moves the filtered moments far less than C1 = 6.5
    # and C2 = 58.5: the map differs by < 1e-8 (measured); 1e-7 leaves a 10x margin.
    from pyiqa.archs.ssim_arch import ssim

    candidates, hq = ssim_test_images(kind, torch.Generator().manual_seed(1), *size)
    sr, reference = luma_255(candidates), luma_255(hq)
    expected = ssim(sr, reference.expand_as(sr), get_ssim_map=True, data_range=255)
    fast = ssim_map(sr, reference, 255)
    assert fast.shape == expected.shape == (4, 1, size[0] - 10, size[1] - 10)
    assert (fast - expected).abs().max() < 1e-7
    assert torch.equal(fast, ssim_map(sr, reference, 255))  # deterministic


def test_ssim_map_strips_do_not_change_its_numbers(monkeypatch):
    candidates, hq = ssim_test_images("noisy", torch.Generator().manual_seed(2))
    sr, reference = luma_255(candidates), luma_255(hq)
    one_strip = ssim_map(sr, reference, 255)
    monkeypatch.setattr(pipeline.iqa, "SSIM_STRIP_ELEMENTS", 1)  # one output row per strip
    assert torch.equal(ssim_map(sr, reference, 255), one_strip)
    with pytest.raises(ValueError, match="smaller than the 11px window"):
        ssim_map(sr[..., :10, :], reference[..., :10, :], 255)


def test_full_mask_pooled_downsampled_ssim_matches_pyiqa():
    # SSIM(downsample=True) average-pools by round(min(H, W) / 256) = 2 before filtering
    generator = torch.Generator().manual_seed(3)
    hq = torch.rand(3, 520, 530, generator=generator)
    candidates = (hq + torch.randn(2, 3, 520, 530, generator=generator) * 0.1).clamp(0, 1)
    options = {"test_y_channel": True, "color_space": "ycbcr", "downsample": True}
    reference = pyiqa.create_metric("ssim", device="cpu", **options)
    expected = reference(candidates, hq[None].expand_as(candidates)).double()
    registry = MetricRegistry(options={"ssim": {"downsample": True}})
    pooled = score_instances(registry, ["ssim"], candidates, hq, full_mask(hq))["ssim"][:, 0]
    assert torch.allclose(pooled, expected, atol=1e-7, rtol=0)


@pytest.fixture
def random_alexnet(monkeypatch):
    """torchvision's AlexNet builder returning a seeded random network (pyiqa's LPIPS asks
    for the ImageNet weights whatever its options say)."""
    import torchvision

    build = torchvision.models.alexnet

    def seeded(*args, **kwargs):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return build(weights=None)

    monkeypatch.setattr(torchvision.models, "alexnet", seeded)


@pytest.mark.parametrize("version, heads", [("0.1", True), ("0.0", True), ("0.1", False)])
@pytest.mark.parametrize("size", [(64, 72), (100, 133)])
def test_lpips_map_matches_pyiqa_spatial_map(random_alexnet, version, heads, size):
    # The map is float32. The reference's features come from a batch-1 forward pass instead
    # of pyiqa's batch of N copies, which may round differently (measured <= 1e-7 on values
    # ~0.2-0.4, i.e. a few float32 ulps); 1e-6 leaves a 10x margin.
    from pyiqa.archs.lpips_arch import LPIPS

    generator = torch.Generator().manual_seed(4)
    net = LPIPS(pretrained=False, version=version, lpips=heads, spatial=True).eval()
    for lin in net.lins if heads else []:  # random positive heads, not uniform ones
        lin.model[-1].weight.data = torch.rand(lin.model[-1].weight.shape, generator=generator)
    hq = torch.rand(1, 3, *size, generator=generator)
    candidates = (hq + torch.randn(5, 3, *size, generator=generator) * 0.1).clamp(0, 1)
    with torch.no_grad():
        expected = net(candidates, hq.expand_as(candidates))
        fast = lpips_map(net, candidates, hq)
    assert fast.shape == expected.shape == (5, 1, *size)
    assert (fast - expected).abs().max() < 1e-6
    assert torch.equal(fast, lpips_map(net, candidates, hq))  # deterministic


def test_crop_metric_on_a_full_mask_is_pyiqa_whole_image(images, registry):
    candidates, hq = images
    pooled = score_instances(registry, ["gmsd"], candidates, hq, full_mask(hq))["gmsd"][:, 0]
    whole = score_images(["gmsd"], candidates, hq[None].expand_as(candidates), registry)["gmsd"]
    expected = pyiqa.create_metric("gmsd", device="cpu")(candidates, hq[None].expand_as(candidates))
    assert torch.equal(whole, expected.double().flatten())
    assert torch.equal(pooled, whole)


def test_masked_crop_neutralises_outside_pixels_and_upscales():
    sr = torch.full((2, 3, 20, 20), 0.9)
    hq = torch.full((2, 3, 20, 20), 0.2)
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[4:8, 4:12] = True
    mask[4, 4] = False
    nr_sr, _ = masked_crop(sr, hq, mask, full_reference=False, minimum_size=2)
    fr_sr, fr_hq = masked_crop(sr, hq, mask, full_reference=True, minimum_size=2)
    assert nr_sr.shape == (2, 3, 4, 8)
    assert nr_sr[0, 0, 0, 0] == 0.5 and nr_sr[0, 0, 1, 1] == pytest.approx(0.9)
    assert fr_sr[0, 0, 0, 0] == pytest.approx(0.2) and fr_hq.shape == fr_sr.shape
    upscaled, _ = masked_crop(sr, hq, mask, full_reference=False, minimum_size=16)
    assert upscaled.shape == (2, 3, 16, 32)


def test_direction_and_mode_come_from_pyiqa():
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    for name, pyiqa_id in [
        ("lpips", "lpips"),
        ("niqe", "niqe"),
        ("maniqa", "maniqa-pipal"),
        ("psnr", "psnr"),
    ]:
        info = metric_info(name)
        assert info.pyiqa_id == pyiqa_id
        assert info.lower_better == DEFAULT_CONFIGS[pyiqa_id].get("lower_better", False)
        assert info.full_reference == (DEFAULT_CONFIGS[pyiqa_id]["metric_mode"] == "FR")
    assert metric_info("lpips").lower_better and metric_info("niqe").lower_better
    assert not metric_info("musiq").lower_better and not metric_info("musiq").full_reference
    assert metric_info("ssim").options == {"test_y_channel": True, "color_space": "ycbcr"}
    with pytest.raises(KeyError, match="no-such-metric"):
        metric_info("no-such-metric")


def test_missing_explicit_weights_file_names_metric_and_path(tmp_path):
    path = tmp_path / "musiq_koniq.pth"
    registry = MetricRegistry(weights={"musiq": path})
    with pytest.raises(MissingWeightsError, match=r"'musiq'.*" + str(path)):
        registry.model("musiq")


def test_missing_weights_in_cache_dir_is_an_error_not_a_download(tmp_path):
    registry = MetricRegistry(weights_dir=tmp_path)
    connect = socket.socket.connect
    expected = tmp_path / "pyiqa" / "niqe_modelparameters.mat"
    with pytest.raises(MissingWeightsError, match=r"'niqe'.*" + str(expected)):
        registry.model("niqe")
    assert socket.socket.connect is connect  # guards are undone
    assert not expected.exists()


def test_torchvision_backbone_is_looked_up_in_weights_dir(tmp_path):
    # LPIPS builds torchvision's AlexNet with ImageNet weights whatever `pretrained` says
    registry = MetricRegistry(weights_dir=tmp_path, options={"lpips": {"pretrained": False}})
    with pytest.raises(MissingWeightsError, match=r"'lpips'.*" + str(tmp_path / "checkpoints")):
        registry.model("lpips")


@pytest.mark.slow
def test_lpips_from_weights_dir_pooled_spatial_map_matches_whole_image(tmp_path, images):
    from pipeline.bench.iqa import random_lpips_weights

    random_lpips_weights(tmp_path)  # seeded random AlexNet (244 MB) + averaging heads
    registry = MetricRegistry(weights_dir=tmp_path)
    candidates, hq = images
    pooled = score_instances(registry, ["lpips"], candidates, hq, full_mask(hq))["lpips"][:, 0]
    whole = score_images(["lpips"], candidates, hq[None].expand_as(candidates), registry)["lpips"]
    # the spatial map is each layer's map upsampled bilinearly: its mean is close, not equal
    assert torch.allclose(pooled, whole, rtol=5e-3, atol=0)
    net = registry.model("lpips").net
    net.spatial = True
    with torch.no_grad():
        spatial_map = net(candidates, hq[None].expand_as(candidates))
    net.spatial = False
    # ... but it is the mean of pyiqa's spatial map (float32, see the lpips_map test)
    assert torch.allclose(pooled, spatial_map.double().mean(dim=[1, 2, 3]), atol=1e-6, rtol=0)
    assert pooled[0] < pooled[1] < pooled[2]  # more noise, larger distance
    assert registry.weights_used() == {"lpips": str(tmp_path)}
