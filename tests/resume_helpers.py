"""Resume = uninterrupted, for the metadata too (docs/design.md §16)."""

from __future__ import annotations

from pathlib import Path

from pipeline import contracts
from pipeline.io.tables import read_metadata


def assert_resume_kept_the_metadata(full: Path, resumed: Path, table: str = contracts.TRAIN_LOG):
    """The resumed run's table metadata is the uninterrupted run's, but for ``resumed_from``
    (counters included: a count kept outside the checkpoint would read lower after a resume)."""
    before, after = (read_metadata(folder / table) for folder in (full, resumed))
    assert before.pop("resumed_from") is None and after.pop("resumed_from")
    assert after == before
