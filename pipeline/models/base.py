"""The one interface both SR families implement; later stages use only this.

Conventions (every method):
- images are float tensors ``[B, 3, H, W]`` in ``[-1, 1]``;
- ``lq`` is the low-quality input already at the HQ size (bicubic upsampled with
  :func:`upsample_lq` when the stored LQ is small), so one tensor shape serves all codecs;
- a *latent codec* maps images to latents and back; it may use the LQ as context
  (the demo's residual pixel codec does, the SD VAE ignores it);
- *error maps* are per-pixel squared denoising errors on the latent grid, mean over
  channels, ``[B, N, h, w]`` for ``N`` target images per LQ, computed under one shared
  timestep and one shared noise per LQ (docs/design.md §3).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


def upsample_lq(lq: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic upsampling of an LQ batch to ``size`` (H, W), clamped to [-1, 1]; identity if equal."""
    if tuple(lq.shape[-2:]) == tuple(size):
        return lq
    return F.interpolate(lq, size=size, mode="bicubic", align_corners=False).clamp(-1.0, 1.0)


@dataclass
class PolicySample:
    """Samples of a model's stochastic policy for online alignment (docs/online_alignment.md):
    ``images [B, 3, H, W]`` in [-1, 1], the states ``latents [B, T+1, C, h, w]`` (the initial
    state first, the decoded action last), the log-probability of each action ``log_probs [B,
    T]``, the timesteps ``int64 [B, T]`` and, for the multi-step DDIM policy, the guided noise
    predictions ``[B, T, C, h, w]``. The one-step Gaussian policy has T = 1."""

    images: torch.Tensor
    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    noise_predictions: torch.Tensor | None = None


class LatentCodec(ABC):
    """Images <-> latents. ``lq`` is the HQ-sized LQ, for codecs that code relative to it."""

    #: channels of the latent
    latent_channels: int
    #: spatial factor from image to latent grid (8 for the SD VAE)
    downscale: int

    @abstractmethod
    def encode(self, images: torch.Tensor, lq: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def decode(self, latents: torch.Tensor, lq: torch.Tensor) -> torch.Tensor: ...


class SRModel(ABC, nn.Module):
    """A diffusion SR model of either family (``onestep`` or ``multistep``)."""

    framework: ClassVar[str]
    codec: LatentCodec

    # -- persistence -------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> SRModel:
        """Load from a folder written by :meth:`save_pretrained` (or a real-weights folder/hub id)."""

    @abstractmethod
    def save_pretrained(self, path: str | Path) -> None:
        """Write a self-describing folder (diffusers layout, safetensors only)."""

    # -- training ----------------------------------------------------------------------
    @abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters preference training updates (LoRA weights or the ControlNet/UNet)."""

    def pretrain_parameters(self) -> list[nn.Parameter]:
        """The parameters pretraining updates (by default every parameter that requires grad)."""
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    @abstractmethod
    def draw_timesteps_and_noise(
        self, lq: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One timestep ``[B]`` and one noise tensor ``[B, C, h, w]`` per LQ, drawn on the CPU."""

    @abstractmethod
    def error_maps(
        self,
        lq: torch.Tensor,
        targets: torch.Tensor,
        timesteps: torch.Tensor,
        noise: torch.Tensor,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Per-pixel squared denoising error ``[B, N, h, w]`` of ``targets [B, N, 3, H, W]``.

        Multi-step: ``||eps_theta(x_t(target), t, lq, prompt) - eps||^2`` averaged over latent channels.
        One-step: ``||z_hat(lq) - encode(target)||^2`` (the one-step limit, docs/design.md §4).
        Gradients flow into :meth:`trainable_parameters`.
        """

    def state_error_maps(
        self,
        lq: torch.Tensor,
        states: torch.Tensor,
        timesteps: torch.Tensor,
        targets: torch.Tensor,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Per-pixel squared error ``[B, h, w]`` of the model's prediction at given policy
        states against given targets (Diffusion-DRO's online negatives, method ``dro_online``).

        Multi-step: ``||ε_θ(x_t, t, lq, prompt) - target||²`` at the states ``x_t``.
        One-step: ``||z_hat(lq) - target||²`` for a latent target (the state is ``z_L``).
        Gradients flow into :meth:`trainable_parameters`.
        """
        raise NotImplementedError(f"{type(self).__name__} has no state_error_maps")

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Within this context, forward passes use the frozen reference weights.

        LoRA models disable their adapters; full fine-tunes swap in a frozen copy.
        """
        raise NotImplementedError
        yield  # pragma: no cover

    @abstractmethod
    def pretrain_loss(
        self,
        lq: torch.Tensor,
        hq: torch.Tensor,
        prompts: Sequence[str],
        generator: torch.Generator,
        negative_prompts: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The family's own pretraining objective on a batch of pairs, and scalar stats to log;
        ``negative_prompts`` (one per pair, e.g. from the prompts table) are the unconditional
        text where the objective has guidance (one-step VSD), None: the model's default."""

    # -- inference ---------------------------------------------------------------------
    @abstractmethod
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
        """SR images ``[B, 3, H, W]`` in [-1, 1]; one generator per image makes each image's
        result independent of its batch neighbours."""

    def describe(self) -> dict[str, str]:
        """What this model is made of (weights path, codec, stand-ins), for stage metadata."""
        return {"framework": self.framework, "codec": type(self.codec).__name__}


@contextlib.contextmanager
def batch_invariant(model: nn.Module) -> Iterator[None]:
    """Make a forward pass give each image bit-identical results whatever the batch size (CPU).

    Two CPU kernels depend on the batch size: oneDNN convolutions (another algorithm at
    batch 1) and GEMMs with few rows (the timestep-embedding MLPs, ``[B, C]`` inputs). Within
    this context oneDNN is off (native convolutions run per image) and 2-D linear layers run
    row by row; token-wise linears (``[B, L, C]``) are left alone. GPUs are not covered.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]

    def rowwise(forward):
        def wrapped(inputs: torch.Tensor, *args, **kwargs):
            if inputs.dim() == 2 and inputs.shape[0] > 1:
                return torch.cat([forward(row[None], *args, **kwargs) for row in inputs])
            return forward(inputs, *args, **kwargs)

        return wrapped

    for linear in linears:
        linear.forward = rowwise(linear.forward)
    try:
        with torch.backends.mkldnn.flags(enabled=False):
            yield
    finally:
        for linear in linears:
            del linear.forward
