"""Gather: the K shard outputs of one data stage into the artifact later stages read
(docs/design.md §15).

``python -m pipeline gather ARTIFACT --out OUT SHARD [SHARD ...]``. A gathered table is the
shards' rows, stably sorted by the table's image key (every image lies in one shard, so the rows
of one image keep the order its shard wrote them in): the same bytes for any number of shards.
The files of a folder artifact and the label maps of a Zarr store are hard-linked (copied across
file systems), never decoded, so a gather holds one table in memory and no pixels. Metadata
equal in every shard is kept; what differs is listed per shard; ``shards`` records K.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import contracts
from pipeline.io.atomic import atomic_path
from pipeline.io.tables import read_metadata, read_table, write_table


@dataclass(frozen=True)
class Gathered:
    """How one artifact is gathered: its contract tables (file inside a folder artifact, or
    ``""`` for a table artifact), each with its schema and sort key, and whether it is a folder
    of files or a Zarr store of label maps."""

    tables: Mapping[str, tuple[str, str]]  # file ("" = the artifact itself) -> (schema, key)
    kind: str = "table"  # "table", "folder" or "zarr"


#: every sharded artifact (docs/design.md §15)
ARTIFACTS: dict[str, Gathered] = {
    "data": Gathered({contracts.DATA_TABLE: ("degradation_pairs", "source_id")}, "folder"),
    "prompts": Gathered({"": ("prompts", "image_id")}),
    "candidates": Gathered({contracts.CANDIDATES_TABLE: ("candidates", "image_id")}, "folder"),
    "masks": Gathered({}, "zarr"),
    "instances": Gathered({"": ("instances", "image_id")}),
    "captions": Gathered({"": ("captions", "image_id")}),
    "scores": Gathered({"": ("scores", "image_id")}),
    "evaluation": Gathered(
        {
            contracts.EVAL_METRICS: ("eval_metrics", "image_id"),
            contracts.EVAL_IMAGES: ("eval_images", "image_id"),
        },
        "folder",
    ),
}


def merge_metadata(documents: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One metadata document of K shards: a value equal in all is kept, lists are joined in
    shard order, anything else that differs is listed per shard; ``shard`` becomes ``shards``."""
    documents = [{k: v for k, v in doc.items() if k not in ("shard", "table")} for doc in documents]
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(k for doc in documents for k in doc):
        values = [doc.get(key) for doc in documents]
        encoded = {json.dumps(value, sort_keys=True, default=str) for value in values}
        if len(encoded) == 1:
            merged[key] = values[0]
        elif all(isinstance(value, list) for value in values):
            merged[key] = [item for value in values for item in value]
        else:
            merged[key] = {"per_shard": values}
    merged["shards"] = len(documents)
    return merged


def gather_table(shards: Sequence[Path], out: Path, schema: str, key: str) -> pd.DataFrame:
    """The shards' tables as one, stably sorted by ``key`` (an image key)."""
    frames = [read_table(path, schema) for path in shards]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(frame):
        frame = frame.sort_values(key, kind="stable").reset_index(drop=True)
    else:
        frame = frames[0]
    write_table(frame, out, schema, merge_metadata([read_metadata(p) for p in shards]))
    return frame


#: files Snakemake writes into every folder output (its freshness mark): never gathered
SNAKEMAKE_FILES = (".snakemake_timestamp",)


def link_tree(source: Path, target: Path, skip: Sequence[str] = ()) -> int:
    """Hard-link every file under ``source`` to the same place under ``target`` (a copy
    where links cannot cross file systems); the number of files. Two shards offering one
    file is an error naming it."""
    count = 0
    for folder, _, names in os.walk(source):
        relative = Path(folder).relative_to(source)
        for name in names:
            if (relative == Path(".") and name in skip) or name in SNAKEMAKE_FILES:
                continue
            destination = target / relative / name
            if destination.exists():
                raise FileExistsError(f"{destination}: offered by more than one shard")
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(Path(folder) / name, destination)
            except OSError:
                shutil.copy2(Path(folder) / name, destination)
            count += 1
    return count


def gather_zarr(shards: Sequence[Path], out: Path) -> int:
    """One label-map store from K: the root attributes merged, each image's array linked."""
    import zarr

    with atomic_path(out) as temporary:
        attrs = [dict(zarr.open_group(str(shard), mode="r").attrs) for shard in shards]
        root = zarr.open_group(str(temporary), mode="w", zarr_format=3)
        root.attrs.update(merge_metadata(attrs))
        count = 0
        for shard in shards:
            for entry in sorted(shard.iterdir()):
                if entry.is_dir():
                    if (temporary / entry.name).exists():
                        raise FileExistsError(f"label map {entry.name!r} is in several shards")
                    link_tree(entry, temporary / entry.name)
                    count += 1
    return count


def gather(artifact: str, shards: Sequence[str | os.PathLike], out: str | os.PathLike) -> None:
    """Write artifact ``artifact`` at ``out`` from its shard outputs (in shard order)."""
    if artifact not in ARTIFACTS:
        raise KeyError(f"no gather for artifact {artifact!r}; known: {sorted(ARTIFACTS)}")
    if not shards:
        raise ValueError(f"gather {artifact}: no shard outputs given")
    spec, paths, out = ARTIFACTS[artifact], [Path(p) for p in shards], Path(out)
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise FileNotFoundError(f"gather {artifact}: shard outputs missing: {missing}")
    if spec.kind == "zarr":
        count = gather_zarr(paths, out)
    elif spec.kind == "table":
        ((schema, key),) = spec.tables.values()
        count = len(gather_table(paths, out, schema, key))
    else:
        with atomic_path(out) as temporary:
            temporary.mkdir(parents=True)
            count = sum(link_tree(path, temporary, skip=list(spec.tables)) for path in paths)
            for name, (schema, key) in spec.tables.items():
                gather_table([path / name for path in paths], temporary / name, schema, key)
    print(f"gather {artifact}: {len(paths)} shards, {count} entries -> {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline gather", description=__doc__)
    parser.add_argument("artifact", choices=sorted(ARTIFACTS))
    parser.add_argument("shards", nargs="+", help="the shard outputs, in shard order")
    parser.add_argument("--out", required=True, help="the gathered artifact")
    args = parser.parse_args(argv)
    gather(args.artifact, args.shards, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
