"""Deterministic seeds: every random draw derives from (global seed, stage, image id, ...).

A rerun on the same machine therefore draws the same numbers whatever the job order,
the number of workers or the images processed before this one.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(global_seed: int, stage: str, *keys: object) -> int:
    """A 63-bit seed from the global seed, the stage name and any further keys (image id, ...)."""
    text = "\x1f".join([str(int(global_seed)), stage, *map(str, keys)])
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def numpy_rng(global_seed: int, stage: str, *keys: object) -> np.random.Generator:
    """A NumPy generator seeded by :func:`derive_seed`."""
    return np.random.default_rng(derive_seed(global_seed, stage, *keys))


def torch_generator(
    global_seed: int, stage: str, *keys: object, device: str = "cpu"
) -> torch.Generator:
    """A torch generator seeded by :func:`derive_seed` (CPU by default, so draws match across devices)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(global_seed, stage, *keys))
    return generator
