"""Shards: one data stage as K jobs, each resumable inside itself (docs/design.md §15).

- **Which shard.** :func:`shard_of` puts a key (a source image's id for degrade, a test
  image's id for the test sets) in shard ``1..K`` by a hash of the key alone, so an image never
  moves when others are added. Later stages of the training chain follow their input's shard:
  shard ``i`` of candidates reads shard ``i`` of the data, and so on.
- **The shard's name** is Snakemake's scatter item, ``"{i}-of-{K}"`` (:class:`Shard`); the
  workflow's ``scattergather: shard=K`` comes from the config's ``shards`` (``--set-scatter
  shard=K`` overrides it).
- **Resume.** :class:`ShardWork` is the shard job's work folder beside its output (Snakemake
  deletes a killed job's outputs, not this folder). Each image's files are written into it and
  its rows last, atomically, as the image's completion mark; a rerun with the same fingerprint
  skips every marked image, says how many, and ends with the same bytes as a run never killed.
  The work folder is renamed onto the output when the shard is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.atomic import atomic_path

#: the name of the workflow's scattergather (``--set-scatter shard=K``)
SCATTER = "shard"
#: the stages that run as shards, each followed by its rule ``{stage}_gather``
STAGES = ("degrade", "prompts", "candidates", "segment", "caption", "score", "evaluate", "winrates")
_ITEM = re.compile(r"^(\d+)-of-(\d+)$")


def shard_of(key: str, count: int) -> int:
    """The shard (1..count) of ``key``: a hash of the key alone, so it never moves when other
    keys are added (it moves only when ``count`` changes)."""
    if count < 1:
        raise ValueError(f"shard count must be >= 1, not {count}")
    digest = hashlib.sha256(str(key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % count + 1


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (both 1-based, as Snakemake's scatter items)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.count:
            raise ValueError(f"shard {self.index} of {self.count}: index must be in 1..count")

    @classmethod
    def parse(cls, item: str | None) -> Shard:
        """``"2-of-3"`` (a scatter item) -> Shard(2, 3); None -> the whole set (1 of 1)."""
        if item is None:
            return WHOLE
        match = _ITEM.match(str(item))
        if not match:
            raise ValueError(f"shard {item!r}: expected 'I-of-K' (a scatter item, e.g. 2-of-3)")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def item(self) -> str:
        return f"{self.index}-of-{self.count}"

    def holds(self, key: str) -> bool:
        return self.count == 1 or shard_of(key, self.count) == self.index

    def select(self, keys: Iterable[str]) -> list[str]:
        """The keys of this shard, in their given order."""
        return [key for key in keys if self.holds(key)]

    def record(self) -> dict[str, int]:
        """The metadata entry of a shard's table (gather drops it)."""
        return {"index": self.index, "count": self.count}


WHOLE = Shard(1, 1)


def items(count: int) -> list[str]:
    """Every scatter item of ``count`` shards: ``["1-of-K", ..., "K-of-K"]``."""
    return [Shard(index, count).item for index in range(1, count + 1)]


# ---------------------------------------------------------------------------- resume in a shard


def input_stamp(paths: Iterable[str | os.PathLike | None]) -> list[list[Any]]:
    """(path, size, mtime_ns) of each input file, or of the files directly inside an input
    folder: a work folder left by a killed run is reused only while its inputs are the same."""
    stamp: list[list[Any]] = []
    for raw in paths:
        if raw is None:
            continue
        path = Path(raw)
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.exists():
                status = file.stat()
                stamp.append([str(file), status.st_size, status.st_mtime_ns])
            else:
                stamp.append([str(file), None, None])
    return stamp


def fingerprint(
    stage: str, inputs: Iterable[str | os.PathLike | None], **settings: Any
) -> dict[str, Any]:
    """What a shard's work folder must match to be resumed: the stage's code (its module and
    every pipeline module it imports), its settings (config, seed, arguments) and the stamps
    of its inputs (:func:`input_stamp`)."""
    from pipeline.codehash import code_hash

    root = Path(__file__).resolve().parent.parent
    return {
        "stage": stage,
        "code": code_hash(root, f"pipeline.{stage}"),
        "inputs": input_stamp(inputs),
        **settings,
    }


def _fingerprint_text(fingerprint: Mapping[str, Any]) -> str:
    return json.dumps(fingerprint, sort_keys=True, default=str, separators=(",", ":"))


def _key_file(key: str) -> str:
    # image ids are file-name safe (the stages write {image_id}.png); a hash keeps odd keys safe
    if re.fullmatch(r"[A-Za-z0-9._-]+", key) and not key.startswith("."):
        return key
    return "k" + hashlib.sha256(key.encode()).hexdigest()[:32]


class ShardWork:
    """The work folder of one shard job: per-key files and rows, kept across a kill.

    ``out`` is the job's output (a folder, or a table file); the work folder is
    ``.{name}.work`` beside it. ``files`` is where the job writes the output folder's content
    (renamed onto ``out`` by :meth:`commit_folder`); ``done/`` holds one Parquet file of rows
    per completed key. A work folder whose fingerprint differs (other settings, code or
    inputs) is discarded and the shard starts afresh.
    """

    DONE = "done"
    FILES = "files"
    FINGERPRINT = "fingerprint.json"

    def __init__(self, out: str | os.PathLike, fingerprint: Mapping[str, Any], stage: str = ""):
        self.out = Path(out)
        self.stage = stage or "shard"
        self.folder = self.out.with_name(f".{self.out.name}.work")
        self.files = self.folder / self.FILES
        self._done = self.folder / self.DONE
        text = _fingerprint_text(fingerprint)
        recorded = self.folder / self.FINGERPRINT
        if self.folder.exists() and (
            not recorded.is_file() or recorded.read_text(encoding="utf-8") != text
        ):
            shutil.rmtree(self.folder)
        self.resumed = self.folder.exists()
        self.files.mkdir(parents=True, exist_ok=True)
        self._done.mkdir(exist_ok=True)
        if not recorded.is_file():
            with atomic_path(recorded) as temporary:
                temporary.write_text(text, encoding="utf-8")
        self.skipped = 0

    def _mark(self, key: str) -> Path:
        return self._done / f"{_key_file(key)}.parquet"

    def done(self, key: str) -> bool:
        """Whether ``key`` was completed by an earlier attempt (counted in :attr:`skipped`)."""
        complete = self._mark(key).is_file()
        self.skipped += complete
        return complete

    def todo(self, keys: Sequence[str]) -> list[str]:
        """The keys not yet complete, in order; reports how many were skipped."""
        remaining = [key for key in keys if not self.done(key)]
        self.report(len(keys))
        return remaining

    def report(self, total: int) -> None:
        if self.resumed:
            print(
                f"{self.stage}: resumed {self.folder}: skipped {self.skipped} of {total} "
                f"already complete",
                file=sys.stderr,
            )

    def finish(self, key: str, rows: pd.DataFrame | Sequence[Mapping[str, Any]]) -> None:
        """Mark ``key`` complete with its rows (written last, atomically: the key's files must
        already be in place)."""
        frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
        table = pa.Table.from_pandas(frame, preserve_index=False)
        with atomic_path(self._mark(key)) as temporary:
            pq.write_table(table, temporary)

    def rows(self, keys: Sequence[str], columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The rows of ``keys`` in that order (every key must be complete)."""
        frames = [pq.read_table(self._mark(key)).to_pandas() for key in keys]
        frames = [frame for frame in frames if len(frame)]
        if not frames:
            return pd.DataFrame(columns=list(columns or []))
        frame = pd.concat(frames, ignore_index=True)
        return frame if columns is None else frame[list(columns)]

    def commit_folder(self) -> Path:
        """Rename the files folder onto ``out`` (a folder output) and drop the work folder."""
        with atomic_path(self.out) as temporary:
            os.replace(self.files, temporary)
        shutil.rmtree(self.folder, ignore_errors=True)
        return self.out

    def discard(self) -> None:
        """Drop the work folder (a table output written elsewhere is complete)."""
        shutil.rmtree(self.folder, ignore_errors=True)
