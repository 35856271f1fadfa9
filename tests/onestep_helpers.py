"""Tiny LQ/HQ pair folders and tiny one-step configs shared by the one-step tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.io.images import write_png
from pipeline.io.tables import SCHEMAS, write_table

#: a tiny one-step family: pixel codec, 2-level UNet of 16/32 channels
TINY = {"codec": "pixel", "factor": 4, "block_out_channels": [16, 32], "text_hidden_size": 32}


def make_pairs(root: Path, count: int = 3, size: int = 32, scale: int = 4) -> Path:
    """``count`` smooth random HQ images, their box-downsampled LQ and a pairs table."""
    rng = np.random.default_rng(0)
    rows = []
    for index in range(count):
        image_id = f"img{index}"
        coarse = rng.uniform(0, 255, (size // 8, size // 8, 3))
        hq = np.kron(coarse, np.ones((8, 8, 1))) + rng.normal(0, 12, (size, size, 3))
        hq = np.clip(hq, 0, 255).astype(np.uint8)
        lq = hq.reshape(size // scale, scale, size // scale, scale, 3).mean(axis=(1, 3))
        write_png(root / "hq" / f"{image_id}.png", hq)
        write_png(root / "lq" / f"{image_id}.png", np.rint(lq).astype(np.uint8))
        row = {name: None for name in SCHEMAS["degradation_pairs"].names}
        row.update(
            image_id=image_id,
            source="test",
            split="train",
            scale=scale,
            seed=index,
            hq_path=f"hq/{image_id}.png",
            lq_path=f"lq/{image_id}.png",
        )
        rows.append(row)
    write_table(pd.DataFrame(rows), root / "pairs.parquet", "degradation_pairs")
    return root


# what build_tiny assumes for a model from scratch, written out as a config must (the schema's
# defaults are a real SD base's: frozen base, no LQ concatenation, AdaIN colour fix)
TINY_MODEL = {"lambda_vsd": 0.0, "train_base": True, "lq_condition": "concat", "color_fix": "none"}
