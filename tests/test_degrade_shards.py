"""Degrade as a shard job (docs/design.md §15): shard I of K holds the source photos whose id
hashes to I (every crop of a photo in one shard, the split decided on every photo first), a
killed job resumes pair by pair with the same bytes, an empty shard writes an empty table, and
the gather of K shards equals the whole split degraded at once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import degrade
from pipeline.gather import gather
from pipeline.io.tables import read_metadata, read_table, schema_for
from pipeline.shards import ShardWork, shard_of
from tests.shard_helpers import run_killed_after, run_stage

CROP = 16
#: shard_of puts img0..img5 in shards 2 2 2 1 1 1 of 2 and 2 2 3 2 3 3 of 3; img2 is the test
#: image, so the test split's shards 1 of 2, 1 of 3 and 2 of 3 hold no image
IDS = [f"img{i}" for i in range(6)]
TEST_ID = "img2"


def _photo(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC))


def _source(folder: Path, tiny: tuple[str, ...] = ()) -> Path:
    """img0..img5 as PNGs (the ``tiny`` ones 12x10, smaller than the crop)."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed, image_id in enumerate(IDS):
        size = (10, 12) if image_id in tiny else (24 + seed, 28)
        Image.fromarray(_photo(*size, seed)).save(folder / f"{image_id}.png")
    return folder


@pytest.fixture
def source(tmp_path) -> Path:
    return _source(tmp_path / "source")


def _config(folder: Path, **overrides) -> dict:
    return {
        "source": str(folder),
        "crop_size": CROP,
        "test_ids": [TEST_ID],
        "crops_per_image": 2,
        **overrides,
    }


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` but the table (compared by its rows)."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != "pairs.parquet"
    }


def _assert_same_data(left: Path, right: Path) -> None:
    assert _tree(left) == _tree(right)
    pd.testing.assert_frame_equal(
        read_table(left / "pairs.parquet", "degradation_pairs"),
        read_table(right / "pairs.parquet", "degradation_pairs"),
    )


def test_the_ids_are_where_the_docstring_says():
    assert [shard_of(i, 2) for i in IDS] == [2, 2, 2, 1, 1, 1]
    assert [shard_of(i, 3) for i in IDS] == [2, 2, 3, 2, 3, 3]


@pytest.mark.parametrize("split", ["train", "test"])
def test_gathered_shards_equal_the_whole_split(source, tmp_path, split):
    config = _config(source)
    whole = tmp_path / "whole"
    frame = degrade.degrade_split(split, whole, config, seed=3)
    assert len(frame) == (10 if split == "train" else 1)
    for count in (2, 3):
        outs = [tmp_path / f"k{count}" / f"{i}-of-{count}" for i in range(1, count + 1)]
        for index, out in enumerate(outs, start=1):
            part = degrade.degrade_split(split, out, config, seed=3, shard=f"{index}-of-{count}")
            assert {shard_of(s, count) for s in part["source_id"]} <= {index}
            assert read_metadata(out / "pairs.parquet")["shard"] == {"index": index, "count": count}
        gathered = tmp_path / f"gathered{count}"
        gather("data", outs, gathered)
        _assert_same_data(whole, gathered)
        assert read_metadata(gathered / "pairs.parquet")["shards"] == count


def test_every_crop_of_a_photo_is_in_its_shard(source, tmp_path):
    frame = degrade.degrade_split("train", tmp_path / "s", _config(source), seed=0, shard="1-of-2")
    assert sorted(frame["image_id"]) == [f"img{i}__crop{c}" for i in (3, 4, 5) for c in (0, 1)]
    assert list(frame["source_id"]) == ["img3", "img3", "img4", "img4", "img5", "img5"]


def test_an_empty_shard_writes_an_empty_table(source, tmp_path):
    out = tmp_path / "empty"
    frame = degrade.degrade_split("test", out, _config(source), seed=0, shard="1-of-3")
    assert len(frame) == 0
    table = read_table(out / "pairs.parquet", "degradation_pairs")
    assert len(table) == 0 and list(table.columns) == schema_for("degradation_pairs").names
    assert sorted(p.name for p in out.iterdir()) == ["hq", "lq", "pairs.parquet"]
    assert not any((out / "hq").iterdir()) and not any((out / "lq").iterdir())
    metadata = read_metadata(out / "pairs.parquet")
    assert metadata["shard"] == {"index": 1, "count": 3}
    assert metadata["skipped_small_images"] == []
    # the shard's own images (img0, img1, img3 are train images of shard 2 of 3; none in 1)
    assert metadata["source_manifest"].startswith("0 images of shard 1-of-3, sha256 ")
    assert not out.with_name(".empty.work").exists()
    # the split itself must still have images: an unknown test id is still an error
    with pytest.raises(ValueError, match="test_ids.*nope"):
        degrade.degrade_split(
            "test", tmp_path / "x", _config(source, test_ids=["nope"]), seed=0, shard="1-of-3"
        )


def test_a_shard_of_small_images_fails_only_when_the_whole_split_would(tmp_path):
    # img3, img4, img5 (all of shard 1 of 2) are too small; img0, img1 are large enough
    source = _source(tmp_path / "source", tiny=("img3", "img4", "img5"))
    config = _config(source, small_image="skip")
    out = tmp_path / "small"
    frame = degrade.degrade_split("train", out, config, seed=0, shard="1-of-2")
    assert len(frame) == 0
    skipped = read_metadata(out / "pairs.parquet")["skipped_small_images"]
    assert [Path(p).name for p in skipped] == ["img3.png"] * 2 + ["img4.png"] * 2 + ["img5.png"] * 2
    degrade.degrade_split("train", tmp_path / "big", config, seed=0, shard="2-of-2")
    whole = degrade.degrade_split("train", tmp_path / "whole", config, seed=0)
    assert sorted(set(whole["source_id"])) == ["img0", "img1"]
    gather("data", [out, tmp_path / "big"], tmp_path / "gathered")
    _assert_same_data(tmp_path / "whole", tmp_path / "gathered")

    # every train image too small: every non-empty shard fails as the whole split does
    source = _source(tmp_path / "tiny", tiny=tuple(IDS))
    config = _config(source, small_image="skip")
    message = "every image was skipped as smaller than the crop"
    for shard in ("1-of-2", "2-of-2", None):
        with pytest.raises(ValueError, match=message):
            degrade.degrade_split("train", tmp_path / "t", config, seed=0, shard=shard)


@pytest.mark.slow
def test_killed_shard_resumes_with_the_same_bytes(source, tmp_path):
    config = json.dumps(_config(source))
    out = tmp_path / "killed"
    argv = [
        "degrade",
        "--split",
        "train",
        "--out",
        str(out),
        "--config",
        config,
        "--seed",
        "1",
        "--workers",
        "1",
        "--shard",
        "2-of-2",
    ]
    assert run_killed_after(1, argv) == -9
    work = out.with_name(".killed.work")
    assert not out.exists() and work.is_dir()
    # a write the kill cut short (atomic_path's temporary) never reaches the output
    (work / "files" / "hq" / ".img1__crop0.png.tmp-1").write_bytes(b"partial")
    log = run_stage(argv)
    assert "degrade: resumed" in log and "skipped 1 of 4 already complete" in log
    assert not work.exists()
    reference = tmp_path / "reference"
    assert "resumed" not in run_stage([*argv[:4], str(reference), *argv[5:]])
    assert sorted(_tree(out)) == [
        f"{kind}/img{i}__crop{c}.png" for kind in ("hq", "lq") for i in (0, 1) for c in (0, 1)
    ]
    _assert_same_data(reference, out)
    # the same process settings: the table is the same file, metadata and all
    assert (out / "pairs.parquet").read_bytes() == (reference / "pairs.parquet").read_bytes()


def _crash_after(monkeypatch, n: int) -> None:
    """Make :meth:`ShardWork.finish` raise after its ``n``-th pair (a crash in-process)."""
    finish, calls = ShardWork.finish, []

    def finish_then_crash(self, key, rows):
        finish(self, key, rows)
        calls.append(key)
        if len(calls) >= n:
            raise RuntimeError(f"crash after {key}")

    monkeypatch.setattr(ShardWork, "finish", finish_then_crash)


@pytest.mark.slow
def test_resume_with_worker_processes(source, tmp_path, monkeypatch, capsys):
    # pairs finish in any order in the pool; each is marked as it returns
    config = _config(source, workers=2)
    out = tmp_path / "pool"
    with monkeypatch.context() as patch:
        _crash_after(patch, 3)
        with pytest.raises(RuntimeError, match="crash after"):
            degrade.degrade_split("train", out, config, seed=2)
    assert len(list((tmp_path / ".pool.work" / "done").iterdir())) == 3
    capsys.readouterr()
    degrade.degrade_split("train", out, config, seed=2)
    assert "skipped 3 of 10 already complete" in capsys.readouterr().err
    degrade.degrade_split("train", tmp_path / "one", _config(source), seed=2)
    _assert_same_data(tmp_path / "one", out)


def test_a_changed_setting_starts_afresh(source, tmp_path, monkeypatch, capsys):
    out = tmp_path / "changed"
    with monkeypatch.context() as patch:
        _crash_after(patch, 3)
        with pytest.raises(RuntimeError, match="crash after"):
            degrade.degrade_split("train", out, _config(source), seed=2)
    capsys.readouterr()
    # another seed is another fingerprint: the work folder is discarded, nothing is skipped
    degrade.degrade_split("train", out, _config(source), seed=4)
    assert "resumed" not in capsys.readouterr().err
    degrade.degrade_split("train", tmp_path / "four", _config(source), seed=4)
    _assert_same_data(tmp_path / "four", out)
    # the same seed after a crash resumes (the control for the assertion above)
    with monkeypatch.context() as patch:
        _crash_after(patch, 3)
        with pytest.raises(RuntimeError, match="crash after"):
            degrade.degrade_split("train", out, _config(source, hflip=False), seed=4)
    capsys.readouterr()
    degrade.degrade_split("train", out, _config(source, hflip=False), seed=4)
    assert "skipped 3 of 10" in capsys.readouterr().err


def test_cli_shard_argument(source, tmp_path):
    out = tmp_path / "cli"
    argv = [
        "--split",
        "train",
        "--out",
        str(out),
        "--config",
        json.dumps(_config(source)),
        "--seed",
        "0",
        "--shard",
        "2-of-3",
    ]
    assert degrade.main(argv) == 0
    table = read_table(out / "pairs.parquet", "degradation_pairs")
    assert sorted(set(table["source_id"])) == ["img0", "img1", "img3"]
    with pytest.raises(ValueError, match="I-of-K"):
        degrade.main([*argv[:-1], "2of3"])
