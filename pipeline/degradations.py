"""Real-ESRGAN second-order degradation, OSEDiff variant, as pure functions.

The numbers are those of Real-ESRGAN (``options/train_realesrgan_x4plus.yml``) as OSEDiff uses
them (``dataloaders/params_realesrgan.yml`` + ``realesrgan.py::degrade_process``): no USM
sharpening of the HQ, a fixed final scale of 4, and optionally the LQ resized back to the HQ
size. The chain (Real-ESRGAN, Wang et al. 2021, Sec. 3):

1. blur (kernel1) → random resize (up/down/keep) → Gaussian or Poisson noise → JPEG;
2. blur (kernel2, with ``second_blur_prob``) → random resize to ``size/scale · s`` → noise;
3. with probability ``final_order_prob`` [resize to ``size/scale`` → sinc → JPEG],
   otherwise [JPEG → resize → sinc]; then (OSEDiff ``resize_bak``) resize back to the HQ size;
4. quantise: ``clip(round(255·x), 0, 255) / 255``.

Sampling and applying are separate: :func:`sample_degradation_params` draws every random value
into a flat, JSON-able dict (values that do not apply are ``None``), and
:func:`apply_degradation` is a deterministic function of the image, that dict and the config.
Noise fields are drawn from the ``noise*_seed`` integers stored in the dict.
:func:`recorded_params` turns a row of ``pairs.parquet`` back into that dict (a replay).

Images are float32 ``[H, W, 3]`` in [0, 1]. Blur is cross-correlation with reflect-101 borders
and resizing is ``torch.nn.functional.interpolate`` (``area`` / ``bilinear`` / ``bicubic``,
``align_corners=False``, no antialiasing), as in the reference's GPU path. JPEG is real
baseline JPEG (Pillow, 4:2:0 chroma) at an integer quality, where the reference uses DiffJPEG
at a real-valued quality.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import special

from pipeline import settings

KERNEL_TYPES = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
RESIZE_DIRECTIONS = ("up", "down", "keep")
RESIZE_MODES = ("area", "bilinear", "bicubic")
FINAL_ORDERS = ("resize_sinc_jpeg", "jpeg_resize_sinc")
KERNEL_FIELDS = ("type", "size", "sigma_x", "sigma_y", "rotation", "beta", "omega_c")

# OSEDiff's params_realesrgan.yml (identical to Real-ESRGAN x4plus), flattened: the schema's
# ``degrade.degradation`` section holds the values (the only copy, see pipeline/settings.py).
DEFAULT_DEGRADATION: dict[str, Any] = settings.defaults("degrade.degradation")

_RANGE_KEYS = (
    "kernel_range",
    "rotation_range",
    "sinc_cutoff_small_kernel",
    "sinc_cutoff_large_kernel",
    "blur_sigma",
    "betag_range",
    "betap_range",
    "resize_range",
    "noise_range",
    "poisson_scale_range",
    "jpeg_range",
    "blur_sigma2",
    "betag_range2",
    "betap_range2",
    "resize_range2",
    "noise_range2",
    "poisson_scale_range2",
    "jpeg_range2",
    "final_sinc_cutoff",
)
_PROBABILITY_KEYS = (
    "sinc_prob",
    "gaussian_noise_prob",
    "gray_noise_prob",
    "second_blur_prob",
    "sinc_prob2",
    "gaussian_noise_prob2",
    "gray_noise_prob2",
    "final_order_prob",
    "final_sinc_prob",
)


# ----------------------------------------------------------------------------- configuration


def degradation_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The OSEDiff defaults with ``overrides`` applied, checked; errors name the key."""
    config = settings.resolve("degrade.degradation", overrides)
    for key in _RANGE_KEYS:
        low, high = config[key]
        if not low <= high:
            raise ValueError(f"degradation config {key!r}: expected [low, high], got {config[key]}")
    for key in _PROBABILITY_KEYS:
        if not 0.0 <= config[key] <= 1.0:
            raise ValueError(f"degradation config {key!r} is not a probability: {config[key]}")
    for list_key, prob_key in (("kernel_list", "kernel_prob"), ("kernel_list2", "kernel_prob2")):
        _check_distribution(config, prob_key, len(config[list_key]))
        bad = sorted(set(config[list_key]) - set(KERNEL_TYPES))
        if bad:
            raise ValueError(f"degradation config {list_key!r}: unknown kernel types {bad}")
    for key in ("resize_prob", "resize_prob2"):
        _check_distribution(config, key, len(RESIZE_DIRECTIONS))
    if not config["resize_modes"] or set(config["resize_modes"]) - set(RESIZE_MODES):
        raise ValueError(
            f"degradation config 'resize_modes': must be a non-empty subset of {RESIZE_MODES}"
        )
    smallest, largest = config["kernel_range"]
    if (
        smallest % 2 == 0
        or largest % 2 == 0
        or smallest < 1
        or largest > config["blur_kernel_size"]
    ):
        raise ValueError(
            f"degradation config 'kernel_range' {config['kernel_range']}: odd sizes up to "
            f"blur_kernel_size={config['blur_kernel_size']} expected"
        )
    if int(config["scale"]) != config["scale"] or config["scale"] < 1:
        raise ValueError(
            f"degradation config 'scale' must be a positive integer: {config['scale']}"
        )
    return config


def _check_distribution(config: dict[str, Any], key: str, length: int) -> None:
    probabilities = config[key]
    if len(probabilities) != length or min(probabilities) < 0 or abs(sum(probabilities) - 1) > 1e-6:
        raise ValueError(
            f"degradation config {key!r}: expected {length} probabilities summing to 1, got {probabilities}"
        )


# ----------------------------------------------------------------------------- kernels


def mesh_grid(kernel_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel offsets ``(x, y)`` from the kernel centre, each ``[k, k]`` (x along columns)."""
    axis = np.arange(kernel_size, dtype=np.float64) - (kernel_size - 1) / 2
    return np.meshgrid(axis, axis)


def sigma_matrix(sigma_x: float, sigma_y: float, rotation: float) -> np.ndarray:
    """Covariance ``R diag(σx², σy²) Rᵀ`` of a Gaussian rotated by ``rotation`` radians."""
    rotate = np.array(
        [[math.cos(rotation), -math.sin(rotation)], [math.sin(rotation), math.cos(rotation)]]
    )
    return rotate @ np.diag([sigma_x**2, sigma_y**2]) @ rotate.T


def _mahalanobis_squared(kernel_size: int, sigma_x: float, sigma_y: float, rotation: float):
    """``d² = [x y] Σ⁻¹ [x y]ᵀ`` on the kernel grid."""
    x, y = mesh_grid(kernel_size)
    inverse = np.linalg.inv(sigma_matrix(sigma_x, sigma_y, rotation))
    return inverse[0, 0] * x * x + (inverse[0, 1] + inverse[1, 0]) * x * y + inverse[1, 1] * y * y


def bivariate_gaussian(kernel_size: int, sigma_x: float, sigma_y: float, rotation: float):
    """``exp(−d²/2) / Z`` (isotropic when ``sigma_x == sigma_y``)."""
    kernel = np.exp(-0.5 * _mahalanobis_squared(kernel_size, sigma_x, sigma_y, rotation))
    return kernel / kernel.sum()


def bivariate_generalized_gaussian(
    kernel_size: int, sigma_x: float, sigma_y: float, rotation: float, beta: float
) -> np.ndarray:
    """Generalised Gaussian ``exp(−(d²)^β / 2) / Z`` (β = 1 is the Gaussian)."""
    distance = _mahalanobis_squared(kernel_size, sigma_x, sigma_y, rotation)
    kernel = np.exp(-0.5 * np.power(distance, beta))
    return kernel / kernel.sum()


def bivariate_plateau(
    kernel_size: int, sigma_x: float, sigma_y: float, rotation: float, beta: float
) -> np.ndarray:
    """Plateau kernel ``1 / (1 + (d²)^β) / Z``."""
    distance = _mahalanobis_squared(kernel_size, sigma_x, sigma_y, rotation)
    kernel = 1.0 / (np.power(distance, beta) + 1.0)
    return kernel / kernel.sum()


def circular_lowpass_kernel(cutoff: float, kernel_size: int, pad_to: int = 0) -> np.ndarray:
    """2-D sinc (ideal circular low-pass) ``ω J₁(ω r) / (2π r)``, centre ``ω²/(4π)``, normalised."""
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel size must be odd, got {kernel_size}")
    x, y = mesh_grid(kernel_size)
    radius = np.hypot(x, y)
    centre = (kernel_size - 1) // 2
    radius[centre, centre] = 1.0  # placeholder, replaced by the limit below
    kernel = cutoff * special.j1(cutoff * radius) / (2 * np.pi * radius)
    kernel[centre, centre] = cutoff**2 / (4 * np.pi)
    kernel = kernel / kernel.sum()
    return pad_kernel(kernel, pad_to) if pad_to > kernel_size else kernel


def pad_kernel(kernel: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad a square odd kernel to ``size × size`` (convolution result unchanged)."""
    pad = (size - kernel.shape[0]) // 2
    if pad < 0:
        raise ValueError(f"kernel of size {kernel.shape[0]} does not fit in {size}")
    return np.pad(kernel, pad)


def make_kernel(params: dict[str, Any], prefix: str) -> np.ndarray:
    """Rebuild the kernel described by the ``{prefix}_*`` entries of ``params``."""
    kind = params[f"{prefix}_type"]
    size = int(params[f"{prefix}_size"])
    if kind == "sinc":
        return circular_lowpass_kernel(params[f"{prefix}_omega_c"], size)
    sigma_x = params[f"{prefix}_sigma_x"]
    isotropic = kind.endswith("_iso") or kind == "iso"
    sigma_y = sigma_x if isotropic else params[f"{prefix}_sigma_y"]
    rotation = 0.0 if isotropic else params[f"{prefix}_rotation"]
    if kind in ("iso", "aniso"):
        return bivariate_gaussian(size, sigma_x, sigma_y, rotation)
    if kind.startswith("generalized"):
        return bivariate_generalized_gaussian(
            size, sigma_x, sigma_y, rotation, params[f"{prefix}_beta"]
        )
    if kind.startswith("plateau"):
        return bivariate_plateau(size, sigma_x, sigma_y, rotation, params[f"{prefix}_beta"])
    raise ValueError(f"unknown kernel type {kind!r} in {prefix}_type")


# ----------------------------------------------------------------------------- sampling


def _uniform(rng: np.random.Generator, bounds) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _shape_beta(rng: np.random.Generator, bounds) -> float:
    """β < 1 or β > 1 with equal odds: U(β_min, 1) w.p. ½, else U(1, β_max) (as the reference)."""
    if rng.random() < 0.5:
        return _uniform(rng, (bounds[0], 1.0))
    return _uniform(rng, (1.0, bounds[1]))


def _kernel_size(rng: np.random.Generator, config: dict[str, Any]) -> int:
    smallest, largest = config["kernel_range"]
    return int(rng.choice(np.arange(smallest, largest + 1, 2)))


def sample_kernel(
    rng: np.random.Generator, config: dict[str, Any], prefix: str, second: bool
) -> dict[str, Any]:
    """Blur kernel of one degradation round: sinc with ``sinc_prob``, else a mixed kernel."""
    suffix = "2" if second else ""
    drawn = dict.fromkeys((f"{prefix}_{field}" for field in KERNEL_FIELDS), None)
    size = _kernel_size(rng, config)
    drawn[f"{prefix}_size"] = size
    if rng.random() < config[f"sinc_prob{suffix}"]:
        small = size < config["sinc_large_kernel_from"]
        cutoff_range = config["sinc_cutoff_small_kernel" if small else "sinc_cutoff_large_kernel"]
        drawn[f"{prefix}_type"] = "sinc"
        drawn[f"{prefix}_omega_c"] = _uniform(rng, cutoff_range)
        return drawn
    kinds = config[f"kernel_list{suffix}"]
    probabilities = np.asarray(config[f"kernel_prob{suffix}"], dtype=np.float64)
    kind = kinds[int(rng.choice(len(kinds), p=probabilities / probabilities.sum()))]
    drawn[f"{prefix}_type"] = kind
    drawn[f"{prefix}_sigma_x"] = _uniform(rng, config[f"blur_sigma{suffix}"])
    if not (kind == "iso" or kind.endswith("_iso")):
        drawn[f"{prefix}_sigma_y"] = _uniform(rng, config[f"blur_sigma{suffix}"])
        drawn[f"{prefix}_rotation"] = _uniform(rng, config["rotation_range"])
    if kind.startswith("generalized"):
        drawn[f"{prefix}_beta"] = _shape_beta(rng, config[f"betag_range{suffix}"])
    elif kind.startswith("plateau"):
        drawn[f"{prefix}_beta"] = _shape_beta(rng, config[f"betap_range{suffix}"])
    return drawn


def sample_resize(
    rng: np.random.Generator, config: dict[str, Any], prefix: str, second: bool
) -> dict[str, Any]:
    """Up with U(1, max), down with U(min, 1) or keep (scale 1), and an interpolation mode."""
    suffix = "2" if second else ""
    probabilities = np.asarray(config[f"resize_prob{suffix}"], dtype=np.float64)
    direction = RESIZE_DIRECTIONS[int(rng.choice(3, p=probabilities / probabilities.sum()))]
    low, high = config[f"resize_range{suffix}"]
    scale = {"up": lambda: _uniform(rng, (1.0, high)), "down": lambda: _uniform(rng, (low, 1.0))}
    return {
        f"{prefix}_direction": direction,
        f"{prefix}_scale": scale[direction]() if direction in scale else 1.0,
        f"{prefix}_mode": _resize_mode(rng, config),
    }


def _resize_mode(rng: np.random.Generator, config: dict[str, Any]) -> str:
    modes = config["resize_modes"]
    return str(modes[int(rng.integers(len(modes)))])


def sample_noise(
    rng: np.random.Generator, config: dict[str, Any], prefix: str, second: bool
) -> dict[str, Any]:
    """Gaussian (σ on the 0–255 scale) with ``gaussian_noise_prob``, else Poisson; gray or colour."""
    suffix = "2" if second else ""
    gaussian = bool(rng.random() < config[f"gaussian_noise_prob{suffix}"])
    return {
        f"{prefix}_type": "gaussian" if gaussian else "poisson",
        f"{prefix}_sigma": _uniform(rng, config[f"noise_range{suffix}"]) if gaussian else None,
        f"{prefix}_poisson_scale": (
            None if gaussian else _uniform(rng, config[f"poisson_scale_range{suffix}"])
        ),
        f"{prefix}_gray": bool(rng.random() < config[f"gray_noise_prob{suffix}"]),
        f"{prefix}_seed": int(rng.integers(0, 2**63 - 1)),
    }


def _jpeg_quality(rng: np.random.Generator, bounds) -> int:
    """An integer quality, uniform over ``[low, high]`` inclusive (real encoders take integers)."""
    return int(rng.integers(int(bounds[0]), int(bounds[1]) + 1))


def sample_degradation_params(rng: np.random.Generator, config: dict[str, Any] | None = None):
    """Draw every random value of one degradation (flat dict, ``None`` where not applicable)."""
    config = degradation_config(config)
    params: dict[str, Any] = {}
    # first degradation
    params.update(sample_kernel(rng, config, "kernel1", second=False))
    params.update(sample_resize(rng, config, "resize1", second=False))
    params.update(sample_noise(rng, config, "noise1", second=False))
    params["jpeg1_quality"] = _jpeg_quality(rng, config["jpeg_range"])
    # second degradation
    params["blur2_applied"] = bool(rng.random() < config["second_blur_prob"])
    if params["blur2_applied"]:
        params.update(sample_kernel(rng, config, "kernel2", second=True))
    else:
        params.update(dict.fromkeys((f"kernel2_{field}" for field in KERNEL_FIELDS), None))
    params.update(sample_resize(rng, config, "resize2", second=True))
    params.update(sample_noise(rng, config, "noise2", second=True))
    # final stage
    first_order = rng.random() < config["final_order_prob"]
    params["final_order"] = FINAL_ORDERS[0] if first_order else FINAL_ORDERS[1]
    params["final_resize_mode"] = _resize_mode(rng, config)
    params["final_sinc_applied"] = bool(rng.random() < config["final_sinc_prob"])
    params["final_sinc_size"] = _kernel_size(rng, config) if params["final_sinc_applied"] else None
    params["final_sinc_omega_c"] = (
        _uniform(rng, config["final_sinc_cutoff"]) if params["final_sinc_applied"] else None
    )
    params["jpeg2_quality"] = _jpeg_quality(rng, config["jpeg_range2"])
    params["resize_back"] = bool(config["resize_back"])
    params["resize_back_mode"] = _resize_mode(rng, config) if config["resize_back"] else None
    return params


def recorded_params(record: dict[str, Any]) -> dict[str, Any]:
    """A ``pairs.parquet`` row (dict) back as :func:`sample_degradation_params` drew it.

    Reading Parquet through pandas turns an integer column with missing values (such as
    ``final_sinc_size``, ``None`` where no sinc was drawn) into floats with NaN; here missing
    values become ``None`` again, sizes, seeds and JPEG qualities ``int``, and numpy scalars
    Python ones, so :func:`apply_degradation` rebuilds the LQ byte for byte.
    """
    params = {}
    for key, value in record.items():
        if isinstance(value, np.generic):
            value = value.item()
        if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
            value = None
        elif key.endswith(("_size", "_seed", "_quality")) and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"recorded parameter {key!r} is not an integer: {value}")
            value = int(value)
        params[key] = value
    return params


# ----------------------------------------------------------------------------- operations


def _to_batch(image: np.ndarray) -> torch.Tensor:
    chw = np.ascontiguousarray(np.asarray(image, dtype=np.float32).transpose(2, 0, 1))
    return torch.from_numpy(chw)[None]


def _from_batch(batch: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(batch[0].permute(1, 2, 0).numpy(), dtype=np.float32)


def filter2d(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Cross-correlate every channel with ``kernel`` (reflect-101 borders, any image size)."""
    pad = kernel.shape[0] // 2
    # np.pad reflects repeatedly when the image is smaller than the kernel (torch refuses)
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    weight = torch.from_numpy(kernel.astype(np.float32))[None, None].expand(3, 1, -1, -1)
    return _from_batch(F.conv2d(_to_batch(padded), weight.contiguous(), groups=3))


def resize(
    image: np.ndarray,
    mode: str,
    size: tuple[int, int] | None = None,
    scale_factor: float | None = None,
) -> np.ndarray:
    """``F.interpolate`` to ``size`` (h, w) or by ``scale_factor``; no clipping (bicubic overshoots)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")
    options = {} if mode == "area" else {"align_corners": False}
    if size is not None:
        size = (max(1, int(size[0])), max(1, int(size[1])))
        if size == image.shape[:2]:
            return image
        return _from_batch(F.interpolate(_to_batch(image), size=size, mode=mode, **options))
    if scale_factor == 1.0:
        return image
    height, width = image.shape[:2]
    if int(height * scale_factor) < 1 or int(width * scale_factor) < 1:
        # a tiny crop shrunk below one pixel: keep one pixel rather than fail
        return resize(image, mode, size=(height * scale_factor, width * scale_factor))
    batch = F.interpolate(_to_batch(image), scale_factor=scale_factor, mode=mode, **options)
    return _from_batch(batch)


def _grayscale(image: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma with torchvision's weights, ``[H, W, 1]``."""
    weights = np.array([0.2989, 0.587, 0.114], dtype=np.float32)
    return (image @ weights)[:, :, None]


def gaussian_noise(image: np.ndarray, sigma: float, gray: bool, seed: int) -> np.ndarray:
    """Additive N(0, (σ/255)²) noise, one field for all channels if ``gray``; clipped to [0, 1]."""
    rng = np.random.default_rng(seed)
    shape = (*image.shape[:2], 1) if gray else image.shape
    noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma / 255.0)
    return np.clip(image + noise, 0.0, 1.0)


def poisson_noise(image: np.ndarray, scale: float, gray: bool, seed: int) -> np.ndarray:
    """Shot noise ``scale · (Poisson(v·x)/v − x)``, ``v`` = 2^⌈log₂ #levels⌉ of the 8-bit image."""
    rng = np.random.default_rng(seed)
    source = _grayscale(image) if gray else image
    levels = np.clip(np.rint(source * 255.0), 0, 255) / 255.0
    values = 2.0 ** math.ceil(math.log2(len(np.unique(levels))))
    noise = (rng.poisson(levels * values) / values - levels).astype(np.float32)
    return np.clip(image + noise * np.float32(scale), 0.0, 1.0)


def add_noise(image: np.ndarray, params: dict[str, Any], prefix: str) -> np.ndarray:
    """Apply the ``{prefix}_*`` noise described in ``params`` (reproducible from its seed)."""
    seed = int(params[f"{prefix}_seed"])
    gray = bool(params[f"{prefix}_gray"])
    if params[f"{prefix}_type"] == "gaussian":
        return gaussian_noise(image, params[f"{prefix}_sigma"], gray, seed)
    return poisson_noise(image, params[f"{prefix}_poisson_scale"], gray, seed)


def jpeg_compress(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode as baseline JPEG at ``quality`` and decode (after clipping and 8-bit rounding)."""
    pixels = np.clip(np.rint(np.clip(image, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.float32) / 255.0


def quantise(image: np.ndarray) -> np.ndarray:
    """``clip(round(255·x), 0, 255) / 255`` as the reference's last step."""
    return (np.clip(np.rint(image * 255.0), 0, 255) / 255.0).astype(np.float32)


# ----------------------------------------------------------------------------- the chain


@contextlib.contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run torch on one thread meanwhile.

    torch's CPU interpolation rounds differently with different thread counts (bilinear
    differs by one float32 ulp between 1 and 2 threads), which would change LQ bytes with
    the machine's load; one thread makes the chain reproducible. Parallelism comes from
    worker processes instead.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def apply_degradation(
    hq: np.ndarray, params: dict[str, Any], config: dict[str, Any] | None = None
) -> np.ndarray:
    """The second-order degradation of ``hq`` with the drawn ``params`` (deterministic).

    Returns float32 ``[H, W, 3]`` on the 8-bit grid: HQ size if ``params['resize_back']``,
    else ``H // scale × W // scale``.
    """
    with single_torch_thread():
        return _degrade(hq, params, degradation_config(config))


def _degrade(hq: np.ndarray, params: dict[str, Any], config: dict[str, Any]) -> np.ndarray:
    if hq.ndim != 3 or hq.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {hq.shape}")
    height, width = hq.shape[:2]
    scale = int(config["scale"])
    lq_size = (height // scale, width // scale)

    # first degradation
    out = filter2d(hq.astype(np.float32), make_kernel(params, "kernel1"))
    out = resize(out, params["resize1_mode"], scale_factor=params["resize1_scale"])
    out = add_noise(out, params, "noise1")
    out = jpeg_compress(out, params["jpeg1_quality"])

    # second degradation
    if params["blur2_applied"]:
        out = filter2d(out, make_kernel(params, "kernel2"))
    size2 = (
        int(height / scale * params["resize2_scale"]),
        int(width / scale * params["resize2_scale"]),
    )
    out = resize(out, params["resize2_mode"], size=size2)
    out = add_noise(out, params, "noise2")

    # final stage: [resize → sinc] and JPEG in the drawn order
    def resize_and_sinc(image: np.ndarray) -> np.ndarray:
        image = resize(image, params["final_resize_mode"], size=lq_size)
        if params["final_sinc_applied"]:
            sinc = circular_lowpass_kernel(
                params["final_sinc_omega_c"], int(params["final_sinc_size"])
            )
            image = filter2d(image, sinc)
        return image

    if params["final_order"] == "resize_sinc_jpeg":
        out = jpeg_compress(resize_and_sinc(out), params["jpeg2_quality"])
    elif params["final_order"] == "jpeg_resize_sinc":
        out = resize_and_sinc(jpeg_compress(out, params["jpeg2_quality"]))
    else:
        raise ValueError(f"unknown final_order {params['final_order']!r}; expected {FINAL_ORDERS}")

    if params["resize_back"]:
        out = resize(out, params["resize_back_mode"], size=(height, width))
    return quantise(out)
