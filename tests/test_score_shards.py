"""Score as a shard job (docs/design.md §15): each image's rows mark it complete in the
shard's work folder, a killed job resumes where it stopped, an empty shard writes an empty
table, and the gather of K shards equals the whole set scored at once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import score
from pipeline.gather import gather
from pipeline.io.images import write_png
from pipeline.io.masks import write_label_maps
from pipeline.io.tables import SCHEMAS, read_metadata, read_table, write_table
from pipeline.shards import Shard
from tests.data_helpers import write_data_table
from tests.shard_helpers import run_killed_after, run_stage

#: shard_of puts these in shards 1, 2, 2 of 2 and 2, 1, 1 of 3 (shard 3 of 3 is empty)
IDS = ["apple", "berry", "cherry"]
SETTINGS = {"s20": 2.0, "s80": 12.0, "c45": 30.0}  # noise sigma in grey levels
METRICS = ["psnr", "gmsd"]  # a pooled-map and a masked-crop metric


@pytest.fixture()
def inputs(tmp_path) -> Path:
    """A data folder, candidates folder, masks store and instances table of three images."""
    rng = np.random.default_rng(5)
    candidate_rows, instance_rows, label_maps = [], [], {}
    for image_id in IDS:
        hq = rng.integers(40, 216, size=(32, 36, 3)).astype(np.uint8)
        write_png(tmp_path / "hq" / f"{image_id}.png", hq)
        for setting, sigma in SETTINGS.items():
            noisy = np.clip(hq + rng.normal(0, sigma, hq.shape), 0, 255).round().astype(np.uint8)
            write_png(tmp_path / "candidates" / setting / f"{image_id}.png", noisy)
            path = f"{setting}/{image_id}.png"
            candidate_rows.append((image_id, setting, "v", 1, 1.0, 0, "", path))
        labels = np.zeros((32, 36), np.uint16)
        labels[4:20, 6:30] = 1
        labels[24:, :] = 2
        label_maps[image_id] = labels
        for instance_id in (0, 1, 2):
            area = int((labels == instance_id).sum())
            row = (image_id, instance_id, area, 0, 0, 36, 32, area / labels.size, 1.0, False)
            instance_rows.append(row)
    write_data_table(tmp_path, IDS)
    write_label_maps(tmp_path / "masks.zarr", label_maps, {"backend": "test"})
    candidates = pd.DataFrame(candidate_rows, columns=SCHEMAS["candidates"].names)
    write_table(candidates, tmp_path / "candidates" / "candidates.parquet", "candidates")
    instances = pd.DataFrame(instance_rows, columns=SCHEMAS["instances"].names)
    write_table(instances, tmp_path / "instances.parquet", "instances")
    return tmp_path


def candidates_of(inputs: Path, image_ids: list[str], name: str) -> Path:
    """A candidates table of some images, beside the whole one (so its paths still resolve)."""
    table = inputs / "candidates" / "candidates.parquet"
    frame = read_table(table, "candidates")
    frame = frame[frame["image_id"].isin(image_ids)].reset_index(drop=True)
    return write_table(frame, table.with_name(f"{name}.parquet"), "candidates")


def argv(inputs: Path, out: Path, metrics=METRICS, candidates: Path | None = None) -> list[str]:
    candidates = candidates or inputs / "candidates" / "candidates.parquet"
    return [
        "score",
        "--candidates",
        str(candidates),
        "--data",
        str(inputs),
        "--masks",
        str(inputs / "masks.zarr"),
        "--instances",
        str(inputs / "instances.parquet"),
        "--out",
        str(out),
        "--config",
        json.dumps({"metrics": metrics, "device": "cpu"}),
    ]


def run(inputs: Path, out: Path, metrics=METRICS, candidates: Path | None = None) -> pd.DataFrame:
    assert score.main(argv(inputs, out, metrics, candidates)[1:]) == 0
    return read_table(out, "scores")


def interrupted_after(n: int, monkeypatch, *run_args) -> None:
    """Run the stage in this process, stopped right after its ``n``-th image is complete."""
    finish, calls = score.shards.ShardWork.finish, []

    def finish_then_stop(self, key, rows):
        finish(self, key, rows)
        calls.append(key)
        if len(calls) >= n:
            raise KeyboardInterrupt  # stands in for a kill

    with monkeypatch.context() as patched:
        patched.setattr(score.shards.ShardWork, "finish", finish_then_stop)
        with pytest.raises(KeyboardInterrupt):
            run(*run_args)


@pytest.mark.slow
def test_a_killed_shard_resumes_and_ends_as_a_run_never_killed(inputs, tmp_path):
    whole = run(inputs, tmp_path / "whole.parquet")
    out = tmp_path / "killed" / "scores.parquet"
    assert run_killed_after(1, argv(inputs, out)) == -9
    assert not out.exists()
    done = out.with_name(".scores.parquet.work") / "done"
    assert [p.name for p in done.iterdir()] == ["apple.parquet"]
    log = run_stage(argv(inputs, out))
    assert "skipped 1 of 3 already complete" in log
    assert not done.parent.exists()
    pd.testing.assert_frame_equal(read_table(out, "scores"), whole)
    assert len(whole) == 3 * 4 * 3 * 2  # images x (3 instances + whole) x candidates x metrics
    assert list(dict.fromkeys(whole["image_id"])) == IDS


def test_a_shard_found_complete_writes_the_same_table_and_metadata(
    inputs, tmp_path, monkeypatch, capsys
):
    whole = run(inputs, tmp_path / "whole.parquet")
    out = tmp_path / "out.parquet"
    interrupted_after(3, monkeypatch, inputs, out)  # every image done, the table not written
    assert not out.exists()
    assert run(inputs, out).equals(whole)
    assert "skipped 3 of 3 already complete" in capsys.readouterr().err
    # the metrics were created although this run scored no image: the same record
    assert read_metadata(out) == read_metadata(tmp_path / "whole.parquet")
    assert read_metadata(out)["weights"] == {"psnr": None, "gmsd": None}
    assert out.read_bytes() == (tmp_path / "whole.parquet").read_bytes()


def test_a_changed_setting_starts_the_shard_afresh(inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.parquet"
    interrupted_after(1, monkeypatch, inputs, out, ["psnr"])
    assert len(list(out.with_name(".out.parquet.work").glob("done/*"))) == 1
    capsys.readouterr()
    scores = run(inputs, out, ["psnr", "ssim"])
    assert "resumed" not in capsys.readouterr().err
    assert sorted(set(scores["metric"])) == ["psnr", "ssim"]
    assert scores["image_id"].value_counts().to_dict() == {i: 4 * 3 * 2 for i in IDS}
    pd.testing.assert_frame_equal(scores, run(inputs, tmp_path / "fresh.parquet", ["psnr", "ssim"]))


def test_an_empty_shard_writes_an_empty_table_with_the_schema(inputs, tmp_path):
    empty = candidates_of(inputs, [], "empty")
    out = tmp_path / "shard" / "out.parquet"
    scores = run(inputs, out, candidates=empty)
    assert scores.empty and list(scores.columns) == SCHEMAS["scores"].names
    assert sorted(read_metadata(out)["metrics"]) == ["gmsd", "psnr"]
    assert [p.name for p in out.parent.iterdir()] == ["out.parquet"]  # no work folder left


@pytest.mark.parametrize("count", [2, 3])
def test_gathered_shards_equal_the_whole_set(inputs, tmp_path, count):
    whole = run(inputs, tmp_path / "whole.parquet")
    parts = []
    for shard in (Shard(index, count) for index in range(1, count + 1)):
        table = candidates_of(inputs, shard.select(IDS), shard.item)
        parts.append(tmp_path / f"{shard.item}.parquet")
        run(inputs, parts[-1], candidates=table)
    assert [len(read_table(part, "scores")) for part in parts] == (
        [24, 48] if count == 2 else [48, 24, 0]
    )
    gather("scores", parts, tmp_path / "gathered.parquet")
    pd.testing.assert_frame_equal(read_table(tmp_path / "gathered.parquet", "scores"), whole)
    metadata = read_metadata(tmp_path / "gathered.parquet")
    assert metadata.pop("shards") == count
    assert metadata == read_metadata(tmp_path / "whole.parquet")
