"""Segment as a shard job (docs/design.md §15): the store is written one label map at a time
in the shard's work folder, a killed job resumes where it stopped, an empty shard writes an
empty store and table, and the gather of K shards equals the whole set segmented at once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import segment
from pipeline.contracts import DATA_TABLE
from pipeline.gather import gather
from pipeline.io.images import write_png
from pipeline.io.masks import (
    list_image_ids,
    open_label_store,
    read_store_attrs,
    write_label_map,
    write_label_maps,
)
from pipeline.io.tables import SCHEMAS, read_metadata, read_table, write_table
from pipeline.shards import Shard
from tests.shard_helpers import run_killed_after, run_stage

#: shard_of puts these in shards 1, 2, 2 of 2 and 2, 1, 1 of 3 (shard 3 of 3 is empty)
IDS = ["apple", "berry", "cherry"]
CONFIG = {"top_k": 3, "classical": {"method": "slic", "slic": {"n_segments": 6, "sigma": 1.0}}}


def write_pairs(folder: Path, hq_paths: dict[str, Path]) -> Path:
    """A data folder whose table names the given HQ files (absolute paths)."""
    rows = []
    for image_id, path in hq_paths.items():
        row = {name: None for name in SCHEMAS["degradation_pairs"].names}
        row.update(image_id=image_id, source_id=image_id, split="train", hq_path=str(path))
        row.update(lq_path=str(path))
        rows.append(row)
    frame = pd.DataFrame(rows, columns=SCHEMAS["degradation_pairs"].names)
    write_table(frame, folder / DATA_TABLE, "degradation_pairs")
    return folder


@pytest.fixture()
def images(tmp_path) -> dict[str, Path]:
    """Three small HQ images with a few regions each."""
    rng = np.random.default_rng(7)
    paths = {}
    for index, image_id in enumerate(IDS):
        image = np.zeros((24, 28, 3), np.uint8)
        image[:, 10 + index :] = (200, 50 + 40 * index, 40)
        image[4:14, 3:12] = (30, 170, 90)
        image = np.clip(image + rng.integers(0, 10, image.shape), 0, 255).astype(np.uint8)
        paths[image_id] = tmp_path / "hq" / f"{image_id}.png"
        write_png(paths[image_id], image)
    return paths


def argv(data: Path, out: Path, config=CONFIG) -> list[str]:
    return [
        "segment",
        "--data",
        str(data),
        "--out-zarr",
        str(out / "masks.zarr"),
        "--out-table",
        str(out / "instances.parquet"),
        "--config",
        json.dumps(config),
    ]


def run(data: Path, out: Path, config=CONFIG) -> None:
    assert segment.main(argv(data, out, config)[1:]) == 0


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path: the bytes to compare."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_one_label_map_at_a_time_has_the_bytes_of_the_whole_store_written_at_once(tmp_path):
    rng = np.random.default_rng(0)
    maps = {
        "img_a": rng.integers(0, 6, size=(300, 270)).astype(np.uint16),
        "img_b": np.ones((17, 9), dtype=np.uint16),
    }
    attrs = {"backend": "classical", "generator": {"scale": np.float64(2)}}
    array_attrs = {"img_a": {"source_image": "a.png", "remainder_id": 0}}
    write_label_maps(tmp_path / "whole.zarr", maps, attrs, array_attrs)
    store = tmp_path / "one" / "by_one.zarr"
    open_label_store(store, {"backend": "other"})
    write_label_map(store, "img_a", maps["img_b"])  # replaced below
    open_label_store(store, attrs)  # a resumed job: new root attributes, label maps kept
    assert list_image_ids(store) == ["img_a"]
    for image_id, label_map in maps.items():
        write_label_map(store, image_id, label_map, array_attrs.get(image_id))
    assert tree(store) == tree(tmp_path / "whole.zarr")
    assert len(tree(store)) == 1 + 5 + 2  # root, img_a's metadata and 4 tiles, img_b's 1 tile
    assert sorted(p.name for p in store.parent.iterdir()) == ["by_one.zarr"]  # no scratch left
    with pytest.raises(ValueError, match="cannot name a Zarr array"):
        write_label_map(store, "bad/id", maps["img_b"])
    with pytest.raises(FileNotFoundError, match="mask store not found"):
        write_label_map(tmp_path / "absent.zarr", "x", maps["img_b"])


def test_rows_and_label_maps_come_in_image_id_order_not_path_order(tmp_path):
    rng = np.random.default_rng(3)
    # path order (a-1.png < a.png) differs from id order (a < a-1)
    hq = {}
    for image_id in ("a-1", "a"):
        hq[image_id] = tmp_path / "hq" / f"{image_id}.png"
        write_png(hq[image_id], rng.integers(0, 255, (12, 12, 3)).astype(np.uint8))
    run(write_pairs(tmp_path, hq), tmp_path / "out")
    table = read_table(tmp_path / "out" / "instances.parquet", "instances")
    assert list(dict.fromkeys(table["image_id"])) == ["a", "a-1"]
    assert list_image_ids(tmp_path / "out" / "masks.zarr") == ["a", "a-1"]


@pytest.mark.slow
def test_a_killed_shard_resumes_and_ends_as_a_run_never_killed(tmp_path, images):
    data = write_pairs(tmp_path / "data", images)
    run(data, tmp_path / "whole")
    killed = tmp_path / "killed"
    assert run_killed_after(1, argv(data, killed)) == -9
    assert not (killed / "masks.zarr").exists()
    work = killed / ".masks.zarr.work"
    assert [p.name for p in (work / "done").iterdir()] == ["apple.parquet"]
    assert list_image_ids(work / "files") == ["apple"]
    log = run_stage(argv(data, killed))
    assert "skipped 1 of 3 already complete" in log
    assert not work.exists()
    assert tree(killed / "masks.zarr") == tree(tmp_path / "whole" / "masks.zarr")
    pd.testing.assert_frame_equal(
        read_table(killed / "instances.parquet", "instances"),
        read_table(tmp_path / "whole" / "instances.parquet", "instances"),
    )
    assert len(tree(killed / "masks.zarr")) == 1 + 3 * 2  # root + (metadata, 1 tile) per image


def test_a_changed_setting_starts_the_shard_afresh(tmp_path, images, monkeypatch, capsys):
    data = write_pairs(tmp_path / "data", images)
    out = tmp_path / "out"

    def stop(self, key, rows):
        raise KeyboardInterrupt  # stands in for a kill after the first image's label map

    with monkeypatch.context() as patched:
        patched.setattr(segment.shards.ShardWork, "finish", stop)
        with pytest.raises(KeyboardInterrupt):
            run(data, out)
    assert list_image_ids(out / ".masks.zarr.work" / "files") == ["apple"]
    other = {**CONFIG, "top_k": 1}
    run(data, out, other)
    assert "resumed" not in capsys.readouterr().err
    run(data, tmp_path / "fresh", other)
    assert tree(out / "masks.zarr") == tree(tmp_path / "fresh" / "masks.zarr")
    table = read_table(out / "instances.parquet", "instances")
    assert table["instance_id"].max() == 1  # top_k 1, not the first attempt's 3
    pd.testing.assert_frame_equal(
        table, read_table(tmp_path / "fresh" / "instances.parquet", "instances")
    )


def test_an_empty_shard_writes_an_empty_store_and_table(tmp_path):
    run(write_pairs(tmp_path / "data", {}), tmp_path / "out")
    store = tmp_path / "out" / "masks.zarr"
    assert list_image_ids(store) == []
    attrs = read_store_attrs(store)
    assert attrs["format"] == "dspo-label-maps/1" and attrs["backend"] == "classical"
    assert attrs["top_k"] == 3
    table = read_table(tmp_path / "out" / "instances.parquet", "instances")
    assert table.empty and list(table.columns) == SCHEMAS["instances"].names
    assert read_metadata(tmp_path / "out" / "instances.parquet")["sam_used"] is False
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "instances.parquet",
        "masks.zarr",
    ]


def test_an_empty_candidates_table_is_an_empty_shard(tmp_path):
    table = tmp_path / "cand" / "candidates.parquet"
    write_table(pd.DataFrame(columns=SCHEMAS["candidates"].names), table, "candidates")
    outputs = ["--out-zarr", str(tmp_path / "m.zarr"), "--out-table", str(tmp_path / "i.parquet")]
    config = json.dumps({**CONFIG, "source": "rank16"})
    argv = ["--candidates", str(table), "--setting", "rank16", *outputs, "--config", config]
    assert segment.main(argv) == 0
    assert list_image_ids(tmp_path / "m.zarr") == []
    assert read_table(tmp_path / "i.parquet", "instances").empty


@pytest.mark.parametrize("count", [2, 3])
def test_gathered_shards_equal_the_whole_set(tmp_path, images, count):
    run(write_pairs(tmp_path / "data", images), tmp_path / "whole")
    parts = []
    for shard in (Shard(index, count) for index in range(1, count + 1)):
        chosen = {image_id: images[image_id] for image_id in shard.select(IDS)}
        data = write_pairs(tmp_path / f"data-{shard.item}", chosen)
        run(data, tmp_path / shard.item)
        parts.append(tmp_path / shard.item)
    assert [list_image_ids(part / "masks.zarr") for part in parts] == (
        [["apple"], ["berry", "cherry"]] if count == 2 else [["berry", "cherry"], ["apple"], []]
    )
    gather("masks", [part / "masks.zarr" for part in parts], tmp_path / "g" / "masks.zarr")
    gather("instances", [p / "instances.parquet" for p in parts], tmp_path / "g" / "inst.parquet")
    whole, gathered = tree(tmp_path / "whole" / "masks.zarr"), tree(tmp_path / "g" / "masks.zarr")
    assert whole.keys() == gathered.keys() and len(whole) == 7
    assert all(whole[name] == gathered[name] for name in whole if name != "zarr.json")
    attrs = read_store_attrs(tmp_path / "g" / "masks.zarr")
    expected = read_store_attrs(tmp_path / "whole" / "masks.zarr")
    assert attrs.pop("shards") == count
    # an empty shard's images folder is its data folder (it has no image to name)
    whole_images = expected.pop("images")
    assert whole_images == str(tmp_path / "hq")
    shard_images = [whole_images] * 2 + [str(tmp_path / "data-3-of-3")]
    assert attrs.pop("images") == (whole_images if count == 2 else {"per_shard": shard_images})
    assert attrs == expected
    pd.testing.assert_frame_equal(
        read_table(tmp_path / "g" / "inst.parquet", "instances"),
        read_table(tmp_path / "whole" / "instances.parquet", "instances"),
    )
