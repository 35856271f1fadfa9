"""Where a stage computes: one resolver for the config's ``device`` value."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` picks CUDA when one is visible (a leased GPU), else the CPU; other values
    (``cpu``, ``cuda``, ``cuda:N``, ``mps``) are taken as they are."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
