"""A degraded data folder's table, as the stages that read a data folder need it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from pipeline.contracts import DATA_TABLE
from pipeline.io.tables import SCHEMAS, write_table


def write_data_table(folder: Path, image_ids: Iterable[str], split: str = "train") -> Path:
    """``folder``'s ``pairs.parquet`` (table ``degradation_pairs``) naming ``hq/{id}.png`` and
    ``lq/{id}.png`` of each image; the degradation parameters are None. The images themselves
    are the caller's to write."""
    rows = []
    for image_id in image_ids:
        row = {name: None for name in SCHEMAS["degradation_pairs"].names}
        row.update(
            image_id=image_id,
            source_id=image_id,
            split=split,
            hq_path=f"hq/{image_id}.png",
            lq_path=f"lq/{image_id}.png",
        )
        rows.append(row)
    frame = pd.DataFrame(rows, columns=SCHEMAS["degradation_pairs"].names)
    return write_table(frame, Path(folder) / DATA_TABLE, "degradation_pairs")
