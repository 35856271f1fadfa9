"""``annotate export``: the vote store as contract tables.

- ``annotations/{F}/annotations.parquet`` (table ``annotations``, what ``select --annotations``
  reads): one row per answered, not skipped, instance task: annotator, image_id, instance_id,
  best, worst, flagged (settings joined by ``;``), description;
- ``annotations/{F}/votes.parquet`` (table ``votes``): one row per A/B answer: annotator, round,
  testset, image_id, left, right, answer, repeated, gold, simulated (false: a person answered),
  shown_at, answered_at.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline import contracts
from pipeline.annotate.store import Store
from pipeline.io.tables import SCHEMAS, full_schema, write_table


def annotations_frame(store: Store) -> pd.DataFrame:
    rows = [
        {
            "annotator": row["annotator"],
            "image_id": row["image_id"],
            "instance_id": int(row["instance_id"]),
            "best": row["best"],
            "worst": row["worst"],
            "flagged": row["flagged"],
            "description": row["description"],
        }
        for row in store.instance_rows()
        if not row["skipped"]
    ]
    frame = pd.DataFrame(rows, columns=full_schema("annotations").names)
    return frame.sort_values(["image_id", "instance_id", "annotator"], ignore_index=True)


def votes_frame(store: Store) -> pd.DataFrame:
    rows = [
        {
            "annotator": row["annotator"],
            "round": int(row["round"]),
            "testset": row["testset"],
            "image_id": row["image_id"],
            "left": row["left_model"],
            "right": row["right_model"],
            "answer": row["answer"],
            "repeated": bool(row["repeated"]),
            "gold": bool(row["gold"]),
            "simulated": False,
            "shown_at": pd.Timestamp(row["shown_at"]) if row["shown_at"] else pd.NaT,
            "answered_at": pd.Timestamp(row["answered_at"]),
        }
        for row in store.compare_rows()
    ]
    return pd.DataFrame(rows, columns=SCHEMAS["votes"].names)


def export(store: Store, out_dir: str | Path) -> dict[str, int]:
    """Write both tables into ``out_dir``; the row counts."""
    out_dir = Path(out_dir)
    annotations, votes = annotations_frame(store), votes_frame(store)
    source = {"store": str(store.path), "simulated": False}
    write_table(annotations, out_dir / contracts.ANNOTATIONS_TABLE, "annotations", source)
    write_table(votes, out_dir / contracts.VOTES_TABLE, "votes", source)
    return {"annotations": len(annotations), "votes": len(votes)}
