"""Shards and gathers (docs/design.md §15): which shard an image is in, resume inside a shard,
and the gather of tables, folders and label-map stores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline import contracts, gather, shards
from pipeline.io.masks import read_label_map, read_store_attrs, write_label_maps
from pipeline.io.tables import read_metadata, read_table, write_table


def test_shard_of_is_a_pure_function_of_the_key_and_count():
    keys = [f"img{i:04d}" for i in range(600)]
    first = {key: shards.shard_of(key, 4) for key in keys}
    # adding keys never moves the others
    assert {
        key: shards.shard_of(key, 4) for key in [*keys, "new1", "new2"] if key in first
    } == first
    counts = pd.Series(first).value_counts()
    assert set(counts.index) == {1, 2, 3, 4}
    assert counts.min() > 100  # roughly even: 150 expected per shard
    assert all(shards.shard_of(key, 1) == 1 for key in keys)
    # the hash is sha256 of the key: pinned, so a new Python or platform cannot move an image
    assert (
        shards.shard_of("astronaut", 3)
        == 1 + int.from_bytes(__import__("hashlib").sha256(b"astronaut").digest()[:8], "little") % 3
    )


def test_shard_parse_and_items():
    assert shards.Shard.parse("2-of-3") == shards.Shard(2, 3)
    assert shards.Shard.parse(None) == shards.WHOLE
    assert shards.items(3) == ["1-of-3", "2-of-3", "3-of-3"]
    for bad in ("0-of-3", "4-of-3"):
        with pytest.raises(ValueError, match="index must be in 1..count"):
            shards.Shard.parse(bad)
    with pytest.raises(ValueError, match="expected 'I-of-K'"):
        shards.Shard.parse("2/3")
    keys = [f"k{i}" for i in range(50)]
    parts = [shards.Shard(i, 3).select(keys) for i in (1, 2, 3)]
    assert sorted(sum(parts, [])) == sorted(keys)  # a partition


def test_shard_artifact_paths():
    assert contracts.shard_artifact("scores", framework="onestep", scatteritem="2-of-3") == (
        "results/shards/scores/onestep/2-of-3.parquet"
    )
    assert contracts.shard_artifact("masks", framework="x") == (
        "results/shards/masks/x/{scatteritem}.zarr"
    )
    assert contracts.shard_artifact("data", split="train") == (
        "results/shards/data/train/{scatteritem}"
    )


def _work(out, **settings):
    return shards.ShardWork(out, {"settings": settings}, stage="test")


def test_shard_work_resumes_only_with_the_same_fingerprint(tmp_path, capsys):
    out = tmp_path / "shard"
    work = _work(out, a=1)
    assert not work.resumed and work.todo(["x", "y"]) == ["x", "y"]
    (work.files / "x.txt").write_text("x")
    work.finish("x", [{"image_id": "x", "value": 1.5}])
    # killed here: a new attempt with the same fingerprint skips x
    again = _work(out, a=1)
    assert again.resumed and again.todo(["x", "y"]) == ["y"]
    assert "skipped 1 of 2 already complete" in capsys.readouterr().err
    again.finish("y", [])  # an image with no rows
    assert again.rows(["x", "y"]).to_dict("records") == [{"image_id": "x", "value": 1.5}]
    # other settings: the work folder is discarded
    fresh = _work(out, a=2)
    assert not fresh.resumed and fresh.todo(["x", "y"]) == ["x", "y"]
    assert not (fresh.files / "x.txt").exists()
    (fresh.files / "y.txt").write_text("y")
    fresh.commit_folder()
    assert (out / "y.txt").read_text() == "y" and not fresh.folder.exists()


def test_fingerprint_follows_the_inputs(tmp_path):
    table = tmp_path / "in.parquet"
    table.write_bytes(b"one")
    first = shards.fingerprint("score", [table], seed=0)
    assert shards.fingerprint("score", [table], seed=0) == first
    table.write_bytes(b"other bytes")
    assert shards.fingerprint("score", [table], seed=0) != first
    assert shards.fingerprint("score", [table], seed=1) != shards.fingerprint(
        "score", [table], seed=0
    )


INSTANCE_COLUMNS = [
    "image_id",
    "instance_id",
    "area",
    "bbox_x",
    "bbox_y",
    "bbox_w",
    "bbox_h",
    "weight",
    "score",
    "is_remainder",
]


def _instances(ids):
    return pd.DataFrame(
        [
            {
                "image_id": i,
                "instance_id": k,
                "area": 4,
                "bbox_x": 0,
                "bbox_y": 0,
                "bbox_w": 2,
                "bbox_h": 2,
                "weight": 0.5,
                "score": 1.0,
                "is_remainder": k == 0,
            }
            for i in ids
            for k in (1, 0)
        ],  # rows of one image in the shard's own order
        columns=INSTANCE_COLUMNS,
    )


def test_gather_table_equals_the_whole_and_merges_metadata(tmp_path):
    ids = ["b", "a", "c", "a.b", "d"]
    whole = _instances(sorted(ids))
    parts = []
    for index in (1, 2):
        shard = shards.Shard(index, 2)
        path = tmp_path / f"{index}.parquet"
        write_table(
            _instances(sorted(shard.select(ids))),
            path,
            "instances",
            {
                "seed": 3,
                "shard": shard.record(),
                "skipped": [f"s{index}"],
                "where": f"folder{index}",
            },
        )
        parts.append(path)
    gather.gather("instances", parts, tmp_path / "all.parquet")
    gathered = read_table(tmp_path / "all.parquet", "instances")
    pd.testing.assert_frame_equal(gathered, read_table(_written(whole, tmp_path), "instances"))
    metadata = read_metadata(tmp_path / "all.parquet")
    assert metadata["seed"] == 3 and metadata["shards"] == 2 and "shard" not in metadata
    assert metadata["skipped"] == ["s1", "s2"]
    assert metadata["where"] == {"per_shard": ["folder1", "folder2"]}


def _written(frame, tmp_path):
    return write_table(frame, tmp_path / "whole.parquet", "instances")


def test_gather_of_an_empty_shard(tmp_path):
    full, empty = tmp_path / "1.parquet", tmp_path / "2.parquet"
    write_table(_instances(["a"]), full, "instances")
    write_table(_instances([]), empty, "instances")
    gather.gather("instances", [empty, full], tmp_path / "all.parquet")
    assert len(read_table(tmp_path / "all.parquet", "instances")) == 2
    gather.gather("instances", [empty], tmp_path / "none.parquet")
    assert len(read_table(tmp_path / "none.parquet", "instances")) == 0


def test_gather_folder_links_files_and_refuses_a_file_twice(tmp_path):
    frames = {}
    for index, ids in ((1, ["b"]), (2, ["a", "c"])):
        folder = tmp_path / f"s{index}"
        (folder / "set").mkdir(parents=True)
        rows = []
        for image_id in ids:
            (folder / "set" / f"{image_id}.png").write_bytes(image_id.encode())
            rows.append(
                {
                    "image_id": image_id,
                    "setting": "set",
                    "variant": "v",
                    "steps": 1,
                    "cfg": 1.0,
                    "seed": 1,
                    "negative_prompt": "",
                    "path": f"set/{image_id}.png",
                }
            )
        frames[index] = pd.DataFrame(rows)
        (folder / ".snakemake_timestamp").touch()  # Snakemake marks every folder output
        write_table(frames[index], folder / contracts.CANDIDATES_TABLE, "candidates")
    out = tmp_path / "all"
    gather.gather("candidates", [tmp_path / "s1", tmp_path / "s2"], out)
    table = read_table(out / contracts.CANDIDATES_TABLE, "candidates")
    assert table["image_id"].tolist() == ["a", "b", "c"]
    for path in table["path"]:
        assert (out / path).read_bytes() == path.split("/")[1][0].encode()
    assert not (out / ".snakemake_timestamp").exists()
    assert (out / "set/a.png").stat().st_ino == (tmp_path / "s2/set/a.png").stat().st_ino
    with pytest.raises(FileExistsError, match="more than one shard"):
        gather.gather("candidates", [tmp_path / "s1", tmp_path / "s1"], tmp_path / "twice")
    assert not (tmp_path / "twice").exists()  # atomic: nothing half-gathered


def test_gather_zarr_links_label_maps(tmp_path):
    maps = {f"im{i}": np.full((3, 4), i, dtype=np.uint16) for i in range(4)}
    for index in (1, 2):
        chosen = {k: v for k, v in maps.items() if shards.Shard(index, 2).holds(k)}
        write_label_maps(tmp_path / f"{index}.zarr", chosen, {"backend": "x", "images": index})
    gather.gather("masks", [tmp_path / "1.zarr", tmp_path / "2.zarr"], tmp_path / "all.zarr")
    for image_id, label_map in maps.items():
        np.testing.assert_array_equal(read_label_map(tmp_path / "all.zarr", image_id), label_map)
    attrs = read_store_attrs(tmp_path / "all.zarr")
    assert attrs["backend"] == "x" and attrs["shards"] == 2
    assert attrs["images"] == {"per_shard": [1, 2]}


def test_gather_errors_name_the_problem(tmp_path):
    with pytest.raises(KeyError, match="no gather for artifact 'model'"):
        gather.gather("model", [tmp_path], tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="shard outputs missing"):
        gather.gather("scores", [tmp_path / "nope.parquet"], tmp_path / "x.parquet")


def test_reading_one_label_map_never_lists_the_store(tmp_path, monkeypatch):
    # a gathered store holds every training image: listing it on each read made score and
    # training slower per image as the image count grew (docs/design.md §15)
    import zarr

    maps = {f"im{i}": np.full((3, 4), i, dtype=np.uint16) for i in range(5)}
    write_label_maps(tmp_path / "s.zarr", maps, {"backend": "x"})

    def listed(self):
        raise AssertionError("the store was listed")

    monkeypatch.setattr(zarr.Group, "array_keys", listed)
    np.testing.assert_array_equal(read_label_map(tmp_path / "s.zarr", "im3"), maps["im3"])
    for missing in ("im9", "../im1", ""):
        with pytest.raises(KeyError, match="has no label map for image"):
            read_label_map(tmp_path / "s.zarr", missing)
