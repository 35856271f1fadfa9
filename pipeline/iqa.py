"""Image quality metrics over pyiqa: a registry by name, per-instance scores, whole-image scores.

Names and options follow OSEDiff's ``test_metrics.py`` (the eight DSPO metrics): ``psnr`` and
``ssim`` with ``test_y_channel=True, color_space='ycbcr'``, ``lpips``, ``dists``, ``niqe``,
``musiq``, ``maniqa`` (pyiqa's ``maniqa-pipal``) and ``clipiqa``. Any other pyiqa id is accepted
as is. Whether a metric is full-reference (FR) and whether lower is better come from pyiqa's
own registry (``pyiqa.default_model_configs.DEFAULT_CONFIGS``), never from this module.

Images are float tensors ``[B, 3, H, W]`` in [0, 1] (pyiqa's convention).

Weights, offline. :class:`MetricRegistry` creates metrics with every download turned into a
:class:`MissingWeightsError` naming the metric and the file it looked for, and with a socket
guard as the last line of defence, so nothing ever reaches the network. Two ways to provide
weights:

- ``weights={name: file}``: passed to pyiqa as ``pretrained_model_path`` after checking the file
  exists (the metric's own checkpoint; backbones still come from ``weights_dir``);
- ``weights_dir``: used as the torch hub directory while a metric is created, so pyiqa looks in
  ``{weights_dir}/pyiqa/`` (its checkpoints, named as pyiqa names them, e.g.
  ``musiq_koniq_ckpt-e95806b9.pth``), torchvision backbones in ``{weights_dir}/checkpoints/``
  (LPIPS' AlexNet, DISTS' VGG16) and CLIP in ``{weights_dir}/clip/`` (CLIPIQA's RN50).
  MANIQA's timm ViT comes from the Hugging Face cache (``HF_HOME``), read offline.

Per-instance scores (:func:`score_instances`):

- metrics with a spatial map (pyiqa archs PSNR, SSIM, LPIPS) run ONCE per candidate image and
  the map is pooled under each instance mask: PSNR from the pooled squared error of pyiqa's
  Y channel (so a full-image mask gives pyiqa's PSNR exactly); SSIM from pyiqa's ``valid``
  SSIM map, each map pixel standing for its window centre (an instance with no window centre
  inside the valid area uses the map padded by edge replication); LPIPS from pyiqa's
  ``spatial`` map. The HQ reference is shared by the N candidates, so what depends on it
  alone is computed once, not on N copies: LPIPS' reference features (:func:`lpips_map`,
  pyiqa's own network, heads and steps) and SSIM's reference mean and variance
  (:func:`ssim_map`, pyiqa's formula with its window applied separably). Both maps are
  tested against pyiqa's on random images: SSIM within 1e-7 (float64), LPIPS within 1e-6
  (float32);
- every other metric runs on the instance's bounding-box crop, batched over the candidates,
  with the pixels outside the mask neutralised: for FR metrics the candidate takes the HQ
  pixels there (zero difference), for NR metrics they are mid-grey (0.5) in every candidate,
  so the out-of-mask area is identical across the candidates being compared;
- crops whose shorter side is below the metric's minimum input size are upscaled (bicubic,
  clamped to [0, 1]) until it is reached. The minimum is the larger of ``min_crop_size`` and
  the smallest of 8, 16, 32, ... px on which the metric returns a finite value (probed once
  per metric on a seeded random image), so no per-metric table is kept here.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.devices import resolve_device
from pipeline.seeding import torch_generator

# pipeline name -> (pyiqa id, options): OSEDiff test_metrics.py, reference/sr-alignment.md 3.3
DSPO_METRICS: dict[str, tuple[str, dict[str, Any]]] = {
    "psnr": ("psnr", {"test_y_channel": True, "color_space": "ycbcr"}),
    "ssim": ("ssim", {"test_y_channel": True, "color_space": "ycbcr"}),
    "lpips": ("lpips", {}),
    "dists": ("dists", {}),
    "niqe": ("niqe", {}),
    "musiq": ("musiq", {}),
    "maniqa": ("maniqa-pipal", {}),
    "clipiqa": ("clipiqa", {}),
}

PROBE_SIZES = (8, 16, 32, 64, 128, 256, 512)
NR_FILL_VALUE = 0.5
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # pyiqa's ssim(): fspecial(11, 1.5)
SSIM_STRIP_ELEMENTS = 1 << 17  # float64 values per strip of SSIM filter input (1 MB)


class MissingWeightsError(FileNotFoundError):
    """A metric's weights are not available locally (nothing is ever downloaded)."""


@dataclass(frozen=True)
class MetricInfo:
    """What pyiqa's registry says about one pipeline metric."""

    name: str
    pyiqa_id: str
    options: Mapping[str, Any] = field(default_factory=dict)
    arch: str = ""
    full_reference: bool = False
    lower_better: bool = False


def metric_info(name: str, options: Mapping[str, Any] | None = None) -> MetricInfo:
    """Look ``name`` up in pyiqa's registry (``DEFAULT_CONFIGS``); unknown names raise KeyError."""
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    pyiqa_id, default_options = DSPO_METRICS.get(name, (name, {}))
    if pyiqa_id not in DEFAULT_CONFIGS:
        raise KeyError(f"unknown IQA metric {name!r} (not a pyiqa metric id)")
    config = DEFAULT_CONFIGS[pyiqa_id]
    merged = {**default_options, **(options or {})}
    return MetricInfo(
        name=name,
        pyiqa_id=pyiqa_id,
        options=merged,
        arch=str(config["metric_opts"]["type"]),
        full_reference=config.get("metric_mode") == "FR",
        lower_better=bool(config.get("lower_better", False)),
    )


@contextlib.contextmanager
def offline_weights(metric: str, weights_dir: str | os.PathLike | None) -> Iterator[None]:
    """While creating ``metric``: caches point at ``weights_dir``; any download is an error.

    pyiqa fetches its checkpoints through ``load_file_from_url`` (into
    ``download_util.DEFAULT_CACHE_DIR``), torchvision through ``torch.hub``, CLIP through its
    own ``_download``; each is replaced by a check that the file exists. Any other socket
    connection (e.g. timm asking the Hugging Face hub) raises as well.
    """
    import pyiqa.archs.clip_model as clip_model
    import pyiqa.utils.download_util as download_util

    def refuse(url: str, destination: str, *args: Any, **kwargs: Any) -> None:
        raise MissingWeightsError(
            f"weights for IQA metric {metric!r} not found: {destination} (from {url})"
        )

    original_clip_download = clip_model._download

    def clip_download(url: str, root: str) -> str:
        target = os.path.join(root, os.path.basename(url))
        if not os.path.isfile(target):
            refuse(url, target)
        return original_clip_download(url, root)

    def no_network(*args: Any, **kwargs: Any) -> None:
        where = weights_dir if weights_dir is not None else torch.hub.get_dir()
        raise MissingWeightsError(
            f"IQA metric {metric!r} tried to reach the network for weights; put them under {where}"
        )

    saved = (
        download_util.DEFAULT_CACHE_DIR,
        download_util.download_url_to_file,
        torch.hub.download_url_to_file,
        clip_model._download,
        socket.socket.connect,
        torch.hub.get_dir(),
    )
    try:
        if weights_dir is not None:
            torch.hub.set_dir(str(weights_dir))
            download_util.DEFAULT_CACHE_DIR = os.path.join(str(weights_dir), "pyiqa")
        download_util.download_url_to_file = refuse
        torch.hub.download_url_to_file = refuse
        clip_model._download = clip_download
        socket.socket.connect = no_network
        yield
    finally:
        (
            download_util.DEFAULT_CACHE_DIR,
            download_util.download_url_to_file,
            torch.hub.download_url_to_file,
            clip_model._download,
            socket.socket.connect,
            hub_dir,
        ) = saved
        torch.hub.set_dir(hub_dir)


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub import errors

    return (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)


class MetricRegistry:
    """Creates pyiqa metrics on first use (offline, see the module docstring) and keeps them."""

    def __init__(
        self,
        *,
        weights_dir: str | os.PathLike | None = None,
        weights: Mapping[str, str | os.PathLike] | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        device: str | torch.device = "cpu",
        min_crop_size: int = 32,
        seed: int = 0,
    ) -> None:
        self.weights_dir = Path(weights_dir) if weights_dir is not None else None
        self.weights = {name: Path(path) for name, path in (weights or {}).items()}
        self.options = {name: dict(value) for name, value in (options or {}).items()}
        self.device = resolve_device(device)
        self.min_crop_size = int(min_crop_size)
        self.seed = int(seed)
        self._models: dict[str, torch.nn.Module] = {}
        self._minimum_sizes: dict[str, int] = {}

    def info(self, name: str) -> MetricInfo:
        return metric_info(name, self.options.get(name))

    def model(self, name: str) -> torch.nn.Module:
        """The pyiqa ``InferenceModel`` for ``name`` (MissingWeightsError if weights are absent)."""
        if name not in self._models:
            import pyiqa

            info = self.info(name)
            options = dict(info.options)
            if name in self.weights:
                if not self.weights[name].is_file():
                    raise MissingWeightsError(
                        f"weights for IQA metric {name!r} not found: {self.weights[name]}"
                    )
                options["pretrained_model_path"] = str(self.weights[name])
            try:
                with offline_weights(name, self.weights_dir):
                    model = pyiqa.create_metric(info.pyiqa_id, device=self.device, **options)
            except _hub_errors() as error:
                raise MissingWeightsError(
                    f"weights for IQA metric {name!r} are not in the local Hugging Face cache: {error}"
                ) from error
            self._models[name] = model.eval()
        return self._models[name]

    def weights_used(self) -> dict[str, str | None]:
        """Per created metric: the explicit file, else the weights directory (None: none needed)."""
        used: dict[str, str | None] = {}
        for name in self._models:
            if name in self.weights:
                used[name] = str(self.weights[name])
            elif self.weights_dir is not None:
                used[name] = str(self.weights_dir)
            else:
                used[name] = None
        return used

    def minimum_size(self, name: str) -> int:
        """Smallest side the metric accepts here (see the module docstring)."""
        if name not in self._minimum_sizes:
            model = self.model(name)
            info = self.info(name)
            probed = PROBE_SIZES[-1]
            for size in PROBE_SIZES:
                generator = torch_generator(self.seed, "iqa-probe", name, size)
                image = torch.rand(1, 3, size, size, generator=generator).to(self.device)
                try:
                    with torch.no_grad():
                        value = (
                            model(image, image.flip(-1)) if info.full_reference else model(image)
                        )
                except (RuntimeError, ValueError, AssertionError, IndexError, ZeroDivisionError):
                    continue
                if torch.isfinite(torch.as_tensor(value, dtype=torch.float64)).all():
                    probed = size
                    break
            self._minimum_sizes[name] = max(self.min_crop_size, probed)
        return self._minimum_sizes[name]


def _as_batch(values: Any, batch: int) -> torch.Tensor:
    return torch.as_tensor(values).detach().to("cpu", torch.float64).reshape(batch)


def score_images(
    metric_names: Iterable[str],
    sr_batch: torch.Tensor,
    hq_batch: torch.Tensor | None = None,
    registry: MetricRegistry | None = None,
) -> dict[str, torch.Tensor]:
    """Whole-image scores ``{name: float64 [B]}`` exactly as pyiqa computes them.

    ``sr_batch`` and ``hq_batch`` are ``[B, 3, H, W]`` in [0, 1]; ``hq_batch`` is needed only
    by full-reference metrics. A default registry (CPU, standard caches, offline) is used
    when none is given.
    """
    registry = registry or MetricRegistry()
    scores = {}
    for name in metric_names:
        info = registry.info(name)
        model = registry.model(name)
        sr = sr_batch.to(registry.device)
        with torch.no_grad():
            if info.full_reference:
                if hq_batch is None:
                    raise ValueError(
                        f"IQA metric {name!r} is full-reference: an HQ batch is needed"
                    )
                values = model(sr, hq_batch.to(registry.device))
            else:
                values = model(sr)
        scores[name] = _as_batch(values, sr_batch.shape[0])
    return scores


# ---------------------------------------------------------------- spatial maps, pooled per mask


def _pool(value_map: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of ``value_map [B, 1, h, w]`` under each of ``weights [M, h, w]`` → [B, M].

    One instance at a time on purpose: the sum then runs over the same contiguous layout as
    ``torch.mean`` in pyiqa, so a full-image mask reproduces its numbers bit for bit.
    """
    columns = []
    for mask in weights:
        mask = mask.to(value_map.dtype)
        columns.append((value_map * mask).sum(dim=[1, 2, 3]) / mask.sum())
    return torch.stack(columns, dim=1)


def _crop_border(images: list[torch.Tensor], masks: torch.Tensor, border: int):
    if not border:
        return images, masks
    window = (slice(None), slice(None), slice(border, -border), slice(border, -border))
    return [image[window] for image in images], masks[:, border:-border, border:-border]


def _psnr_pooled(model: torch.nn.Module, sr: torch.Tensor, hq: torch.Tensor, masks: torch.Tensor):
    """PSNR per instance from the squared-error map of pyiqa's ``psnr`` (same Y channel, eps).

    The reference is expanded to the candidates' batch, as pyiqa is called, so that a
    full-image mask gives pyiqa's numbers bit for bit.
    """
    from pyiqa.archs import psnr_arch
    from pyiqa.utils.color_util import to_y_channel

    net = model.net
    defaults = {k: p.default for k, p in inspect.signature(psnr_arch.psnr).parameters.items()}
    data_range = net.kwargs.get("data_range", defaults["data_range"])
    eps = net.kwargs.get("eps", defaults["eps"])
    color_space = net.kwargs.get("color_space", defaults["color_space"])
    hq = hq.expand_as(sr)
    (sr, hq), masks = _crop_border([sr, hq], masks, int(net.crop_border))
    if sr.shape[1] == 3 and net.test_y_channel:
        sr, hq = (
            to_y_channel(sr, data_range, color_space),
            to_y_channel(hq, data_range, color_space),
        )
    mse = _pool((sr - hq) ** 2, masks)
    return 10 * torch.log10(data_range**2 / (mse + eps))


def _ssim_window_factors() -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical and horizontal factors (float64) of the window pyiqa's ``ssim()`` builds.

    pyiqa filters with ``fspecial(11, 1.5)``: a gaussian computed in float64, stored as
    float32, used in float64. A gaussian is separable, but the stored window is only nearly
    so (float32 rounding). Its marginals, the horizontal one divided by the window's sum,
    keep its exact sum, so a flat image is filtered as pyiqa filters it; measured on random,
    noisy, smooth and flat images, the SSIM map then differs from pyiqa's by < 1e-8 (the
    exact float64 gaussian instead: up to 3e-6, from the float32 window's sum not being 1).
    """
    from pyiqa.matlab_utils import fspecial

    window = fspecial(SSIM_WINDOW, SSIM_SIGMA, 1)[0, 0].to(torch.float64)
    return window.sum(dim=1), window.sum(dim=0) / window.sum()


def _filter_valid(
    images: torch.Tensor, vertical: torch.Tensor, horizontal: torch.Tensor
) -> torch.Tensor:
    """``images [..., H, W]`` filtered by the window ``vertical[i] * horizontal[j]``, ``valid``
    region only.

    What pyiqa's ``filter2(x, window, 'valid')`` (an 11x11 ``conv2d``, a correlation)
    computes for a separable window: one pass down the columns, then one along the rows,
    each a sum of shifted slices (22 multiply-adds per pixel instead of 121, no unfolded
    buffer).
    """
    size = vertical.numel()
    height = images.shape[-2] - size + 1
    width = images.shape[-1] - size + 1
    down = images[..., 0:height, :] * float(vertical[0])
    for k in range(1, size):
        down.add_(images[..., k : k + height, :], alpha=float(vertical[k]))
    out = down[..., 0:width] * float(horizontal[0])
    for k in range(1, size):
        out.add_(down[..., k : k + width], alpha=float(horizontal[k]))
    return out


def ssim_map(sr: torch.Tensor, hq: torch.Tensor, data_range: float) -> torch.Tensor:
    """pyiqa's ``ssim(sr, hq, get_ssim_map=True)`` (``valid`` map) against one reference.

    ``sr [N, 1, H, W]`` and ``hq [1, 1, H, W]`` (float64, already preprocessed as pyiqa's
    ``SSIM`` does). Same constants and formula as pyiqa (C1, C2, the ReLU on the contrast-
    structure term, the same operation order); the reference's mean and variance are
    filtered once, not once per candidate, and the window is applied separably
    (:func:`_ssim_window_factors`).

    Computed over strips of rows (each output row sees the same window, so the numbers do
    not depend on the strips) sized so that a strip's filter input, ``3N + 2`` planes, is
    about ``SSIM_STRIP_ELEMENTS`` values and stays in cache: measured 1.5x faster than one
    pass at 256 px and 512 px on one CPU thread.
    """
    height, width = sr.shape[-2:]
    valid_rows = height - SSIM_WINDOW + 1
    if valid_rows < 1 or width < SSIM_WINDOW:
        raise ValueError(f"image {(height, width)} is smaller than the {SSIM_WINDOW}px window")
    factors = _ssim_window_factors()
    step = max(1, SSIM_STRIP_ELEMENTS // ((3 * sr.shape[0] + 2) * width))
    span = step + SSIM_WINDOW - 1
    strips = [
        _ssim_map_valid(
            sr[..., top : top + span, :], hq[..., top : top + span, :], data_range, factors
        )
        for top in range(0, valid_rows, step)
    ]
    return torch.cat(strips, dim=-2)


def _ssim_map_valid(
    sr: torch.Tensor,
    hq: torch.Tensor,
    data_range: float,
    factors: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """The body of pyiqa's ``ssim()`` for ``get_ssim_map=True``, the reference filtered once."""
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    n = sr.shape[0]
    filtered = _filter_valid(torch.cat([sr, sr * sr, sr * hq, hq, hq * hq]), *factors)
    mu1, sr_sq, sr_hq = filtered[:n], filtered[n : 2 * n], filtered[2 * n : 3 * n]
    mu2, hq_sq = filtered[3 * n : 3 * n + 1], filtered[3 * n + 1 :]
    mu1_sq = mu1.pow(2)
    mu2_sq = mu2.pow(2)
    mu1_mu2 = mu1 * mu2
    sigma1_sq = sr_sq - mu1_sq
    sigma2_sq = hq_sq - mu2_sq
    sigma12 = sr_hq - mu1_mu2
    cs_map = F.relu((2 * sigma12 + c2) / (sigma1_sq + sigma2_sq + c2))
    return ((2 * mu1_mu2 + c1) / (mu1_sq + mu2_sq + c1)) * cs_map


def _ssim_pooled(model: torch.nn.Module, sr: torch.Tensor, hq: torch.Tensor, masks: torch.Tensor):
    """SSIM per instance from pyiqa's ``valid`` SSIM map (window centres under the mask)."""
    from pyiqa.archs.func_util import preprocess_rgb

    net = model.net
    (sr, hq), masks = _crop_border([sr, hq], masks, int(net.crop_border))
    sr = preprocess_rgb(sr, net.test_y_channel, net.data_range, net.color_space).to(torch.float64)
    hq = preprocess_rgb(hq, net.test_y_channel, net.data_range, net.color_space).to(torch.float64)
    # pyiqa's ssim(downsample=True) average-pools by this factor before filtering
    factor = max(1, round(min(sr.shape[-2:]) / 256)) if net.downsample else 1
    weights = masks.to(torch.float64)
    if factor > 1:
        sr, hq = F.avg_pool2d(sr, factor), F.avg_pool2d(hq, factor)
        weights = F.avg_pool2d(weights[:, None], factor)[:, 0]  # pool the masks alike
    value_map = ssim_map(sr, hq, net.data_range)
    top = (weights.shape[-2] - value_map.shape[-2]) // 2
    left = (weights.shape[-1] - value_map.shape[-1]) // 2
    inside = weights[:, top : top + value_map.shape[-2], left : left + value_map.shape[-1]]
    has_centres = inside.sum(dim=[1, 2]) > 0
    safe_inside = torch.where(has_centres[:, None, None], inside, torch.ones_like(inside))
    pooled = _pool(value_map, safe_inside)
    if has_centres.all():
        return pooled
    padded_map = F.pad(
        value_map,
        (
            left,
            weights.shape[-1] - value_map.shape[-1] - left,
            top,
            weights.shape[-2] - value_map.shape[-2] - top,
        ),
        mode="replicate",
    )
    return torch.where(has_centres[None], pooled, _pool(padded_map, weights))


def lpips_map(net: torch.nn.Module, sr: torch.Tensor, hq: torch.Tensor) -> torch.Tensor:
    """pyiqa's spatial LPIPS map (``net.spatial = True``) of ``sr [N, 3, H, W]`` against one
    reference ``hq [1, 3, H, W]`` → ``[N, 1, H, W]``; ``net`` is pyiqa's ``LPIPS`` arch.

    The steps of ``LPIPS.forward`` (default ``normalize=True``) with pyiqa's own modules and
    helpers: inputs scaled to [-1, 1], ``scaling_layer`` for version 0.1, features of
    ``net.net``, ``normalize_tensor`` per layer, squared difference, the ``lins`` heads (or the
    channel sum without them), bilinear ``upsample`` to the input size, summed over layers in
    order. Only the reference's features are computed once (batch 1) and broadcast against
    the N candidates', instead of running the network on N copies of the reference.
    """
    from pyiqa.archs.lpips_arch import normalize_tensor, upsample

    reference, distorted = 2 * hq - 1, 2 * sr - 1
    if net.version == "0.1":
        reference, distorted = net.scaling_layer(reference), net.scaling_layer(distorted)
    reference_features, distorted_features = net.net(reference), net.net(distorted)
    total = 0
    for layer in range(net.L):
        difference = (
            normalize_tensor(reference_features[layer])
            - normalize_tensor(distorted_features[layer])
        ) ** 2
        if net.lpips:
            layer_map = net.lins[layer](difference)
        else:
            layer_map = difference.sum(dim=1, keepdim=True)
        total = total + upsample(layer_map, out_HW=hq.shape[2:])
    return total


def _lpips_pooled(model: torch.nn.Module, sr: torch.Tensor, hq: torch.Tensor, masks: torch.Tensor):
    """LPIPS per instance from pyiqa's spatial LPIPS map (:func:`lpips_map`)."""
    return _pool(lpips_map(model.net, sr, hq).to(torch.float64), masks)


# pyiqa arch type -> pooled-map implementation (candidates [N, 3, H, W], the reference
# [1, 3, H, W], masks [M, H, W]); every other metric uses masked crops
POOLED_MAPS: dict[str, Callable[..., torch.Tensor]] = {
    "PSNR": _psnr_pooled,
    "SSIM": _ssim_pooled,
    "LPIPS": _lpips_pooled,
}


def uses_pooled_map(info: MetricInfo) -> bool:
    return info.full_reference and info.arch in POOLED_MAPS


# ---------------------------------------------------------------- masked crops


def bounding_box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` (exclusive ends) of a non-empty boolean mask ``[H, W]``."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if rows.numel() == 0:
        raise ValueError("empty instance mask")
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def masked_crop(
    sr: torch.Tensor, hq: torch.Tensor, mask: torch.Tensor, full_reference: bool, minimum_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The instance's bbox crop with out-of-mask pixels neutralised, upscaled to the minimum."""
    top, bottom, left, right = bounding_box(mask)
    sr_crop = sr[:, :, top:bottom, left:right]
    hq_crop = hq[:, :, top:bottom, left:right].expand_as(sr_crop)
    inside = mask[top:bottom, left:right][None, None]
    neutral = hq_crop if full_reference else torch.full_like(sr_crop, NR_FILL_VALUE)
    sr_crop = torch.where(inside, sr_crop, neutral)
    sr_crop, hq_crop = upscale_to_minimum(sr_crop, hq_crop, minimum_size)
    return sr_crop.contiguous(), hq_crop.contiguous()


def upscale_to_minimum(
    sr: torch.Tensor, hq: torch.Tensor, minimum_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sr`` and ``hq`` ``[B, 3, h, w]`` bicubic-upscaled (aspect kept) so the shorter side is
    at least ``minimum_size``, the smallest input the metric accepts; unchanged if it is."""
    height, width = sr.shape[-2:]
    shorter = min(height, width)
    if shorter >= minimum_size:
        return sr, hq
    scale = minimum_size / shorter
    size = (math.ceil(height * scale), math.ceil(width * scale))
    sr = F.interpolate(sr, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
    hq = F.interpolate(hq, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
    return sr, hq


def score_instances(
    registry: MetricRegistry,
    metric_names: Iterable[str],
    candidates: torch.Tensor,
    hq: torch.Tensor,
    masks: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Per-instance scores ``{name: float64 [N, M]}`` for N candidates and M instance masks.

    ``candidates [N, 3, H, W]`` and ``hq [3, H, W]`` in [0, 1]; ``masks`` boolean ``[M, H, W]``
    (a full-image mask gives the whole-image score). See the module docstring for how.
    """
    device = registry.device
    candidates = candidates.to(device)
    reference = hq.to(device)[None]
    hq_batch = reference.expand_as(candidates)
    masks = masks.to(device)
    scores: dict[str, torch.Tensor] = {}
    for name in metric_names:
        info = registry.info(name)
        model = registry.model(name)
        with torch.no_grad():
            if uses_pooled_map(info):
                values = POOLED_MAPS[info.arch](model, candidates, reference, masks)
            else:
                minimum = registry.minimum_size(name)
                columns = []
                for mask in masks:
                    sr_crop, hq_crop = masked_crop(
                        candidates, hq_batch, mask, info.full_reference, minimum
                    )
                    output = model(sr_crop, hq_crop) if info.full_reference else model(sr_crop)
                    columns.append(_as_batch(output, candidates.shape[0]))
                values = torch.stack(columns, dim=1)
        scores[name] = values.detach().to("cpu", torch.float64)
    return scores
