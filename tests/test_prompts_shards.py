"""Prompts as a shard job (docs/design.md §15): ``--shard I-of-K`` keeps a test set's images
whose id hashes to I, the training split's shard reads its data shard, a killed job resumes
image by image with the same table, an empty shard writes an empty table, and the gather of K
shards equals the whole set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import prompts
from pipeline.gather import gather
from pipeline.guidance import PromptsError
from pipeline.io.images import write_png
from pipeline.io.tables import read_metadata, read_table, schema_for, write_table
from pipeline.shards import ShardWork, shard_of
from tests.shard_helpers import run_killed_after, run_stage

#: shard_of puts Cam_000..Cam_006 in shards 2 2 2 2 1 2 1 of 2 and 3 1 1 1 1 2 3 of 3
NAMES = [f"Cam_{i:03d}" for i in range(7)]
CONFIG = {"prompt": "a photo", "negative_prompt": "lowres"}


def _image(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _paired(folder: Path, names=NAMES) -> Path:
    """A RealSR-style test set: LR/{name}_LR4.png with HR/{name}_HR.png."""
    for seed, name in enumerate(names):
        write_png(folder / "LR" / f"{name}_LR4.png", _image(seed, 8))
        write_png(folder / "HR" / f"{name}_HR.png", _image(seed, 32))
    return folder


@pytest.fixture
def paired(tmp_path) -> Path:
    return _paired(tmp_path / "RealSR")


def _data(folder: Path, ids: list[str], shard: dict | None = None) -> Path:
    """A degraded data folder (or one shard of it, recorded in its metadata as degrade does)."""
    columns = {name: [None] * len(ids) for name in schema_for("degradation_pairs").names}
    columns |= {"image_id": ids, "lq_path": [f"lq/{i}.png" for i in ids]}
    columns |= {"hq_path": [f"hq/{i}.png" for i in ids]}
    for seed, image_id in enumerate(ids):
        write_png(folder / "lq" / f"{image_id}.png", _image(seed, 8))
        write_png(folder / "hq" / f"{image_id}.png", _image(seed, 32))
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"shard": shard} if shard else {}
    write_table(pd.DataFrame(columns), folder / "pairs.parquet", "degradation_pairs", metadata)
    return folder


def _argv(images: Path, kind: str, out: Path, *extra: str, config=CONFIG) -> list[str]:
    return [
        "--images",
        str(images),
        "--kind",
        kind,
        "--out",
        str(out),
        "--config",
        json.dumps(config),
        *extra,
    ]


def _table(path: Path) -> pd.DataFrame:
    return read_table(path, "prompts")


def test_the_ids_are_where_the_docstring_says():
    assert [shard_of(n, 2) for n in NAMES] == [2, 2, 2, 2, 1, 2, 1]
    assert [shard_of(n, 3) for n in NAMES] == [3, 1, 1, 1, 1, 2, 3]


def test_gathered_test_set_shards_equal_the_whole_set(paired, tmp_path):
    feedback = tmp_path / "captions.parquet"
    rows = [("Cam_001", 1, "rank16", "a horse running", 0.0, True)]
    columns = ["image_id", "instance_id", "candidate", "caption", "similarity", "hallucinated"]
    write_table(pd.DataFrame(rows, columns=columns), feedback, "captions")
    extra = ["--feedback", str(feedback)]
    whole = tmp_path / "whole.parquet"
    assert prompts.main(_argv(paired, "paired", whole, *extra)) == 0
    expected = _table(whole)
    assert expected["image_id"].tolist() == NAMES
    assert set(expected["negative_prompt"]) == {"a horse running, lowres"}
    for count in (2, 3):
        outs = [tmp_path / f"k{count}" / f"{i}-of-{count}.parquet" for i in range(1, count + 1)]
        for index, out in enumerate(outs, start=1):
            argv = _argv(paired, "paired", out, *extra, "--shard", f"{index}-of-{count}")
            assert prompts.main(argv) == 0
            ids = _table(out)["image_id"].tolist()
            assert ids == [n for n in NAMES if shard_of(n, count) == index]
            assert read_metadata(out)["shard"] == {"index": index, "count": count}
        gather("prompts", outs, tmp_path / f"gathered{count}.parquet")
        pd.testing.assert_frame_equal(_table(tmp_path / f"gathered{count}.parquet"), expected)


def test_an_empty_shard_writes_an_empty_table(tmp_path):
    paired = _paired(tmp_path / "one", names=["Cam_000"])  # shard 2 of 2
    out = tmp_path / "empty.parquet"
    assert prompts.main(_argv(paired, "paired", out, "--shard", "1-of-2")) == 0
    table = _table(out)
    assert len(table) == 0 and list(table.columns) == prompts.PROMPT_COLUMNS
    assert read_metadata(out)["shard"] == {"index": 1, "count": 2}
    assert read_metadata(out)["n_images"] == 0
    assert not (tmp_path / ".empty.parquet.work").exists()


def test_training_split_reads_its_data_shard(tmp_path):
    # a data shard with no image (degrade's empty shard): an empty table
    empty = _data(tmp_path / "empty", [], shard={"index": 1, "count": 2})
    out = tmp_path / "train_1.parquet"
    assert prompts.main(_argv(empty, "train", out)) == 0
    assert len(_table(out)) == 0
    # a whole data folder without images is still an error
    with pytest.raises(PromptsError, match="lists no images"):
        prompts.main(_argv(_data(tmp_path / "none", []), "train", tmp_path / "x.parquet"))
    # the shards' tables gathered equal the whole data folder's
    ids = ["a1", "b2", "c3", "d4"]  # shards 2 1 1 2 of 2
    whole = _data(tmp_path / "whole", ids)
    assert prompts.main(_argv(whole, "train", tmp_path / "whole.parquet")) == 0
    outs = []
    for index in (1, 2):
        held = [i for i in ids if shard_of(i, 2) == index]
        part = _data(tmp_path / f"data{index}", held, shard={"index": index, "count": 2})
        outs.append(tmp_path / f"train{index}.parquet")
        assert prompts.main(_argv(part, "train", outs[-1])) == 0
        assert _table(outs[-1])["image_id"].tolist() == held
    gather("prompts", outs, tmp_path / "gathered.parquet")
    pd.testing.assert_frame_equal(
        _table(tmp_path / "gathered.parquet"), _table(tmp_path / "whole.parquet")
    )


class _Recording(prompts.FixedSource):
    """The fixed source, recording how many images each call describes."""

    calls: list[int] = []

    def describe(self, images):
        self.calls.append(len(images))
        return super().describe(images)


def test_images_are_described_a_chunk_at_a_time_and_resumed(paired, tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(_Recording, "calls", calls)
    monkeypatch.setattr(prompts, "build_source", lambda config: _Recording(config["prompt"]))
    listed = prompts.list_lq_images("paired", paired)
    out = tmp_path / "chunks.parquet"
    work = ShardWork(out, {"test": 1}, stage="prompts")
    finish, done = ShardWork.finish, []

    def finish_then_crash(self, key, rows):
        finish(self, key, rows)
        done.append(key)
        if len(done) == 3:
            raise RuntimeError("crash")

    with monkeypatch.context() as patch:
        patch.setattr(ShardWork, "finish", finish_then_crash)
        with pytest.raises(RuntimeError, match="crash"):
            prompts.make_prompts(listed, CONFIG, chunk=2, work=work)
    assert calls == [2, 2]  # the second chunk was described, then the crash
    resumed = ShardWork(out, {"test": 1}, stage="prompts")
    frame, _ = prompts.make_prompts(listed, CONFIG, chunk=2, work=resumed)
    assert calls == [2, 2, 2, 2]  # 4 images left after 3 complete: two chunks of two
    expected, _ = prompts.make_prompts(listed, CONFIG)
    pd.testing.assert_frame_equal(frame, expected)


def test_a_changed_setting_starts_afresh(paired, tmp_path, monkeypatch, capsys):
    out = tmp_path / "changed.parquet"
    finish, done = ShardWork.finish, []

    def finish_then_crash(self, key, rows):
        finish(self, key, rows)
        done.append(key)
        if len(done) == 2:
            raise RuntimeError("crash")

    for config, resumed in ((CONFIG, True), ({**CONFIG, "prompt": "a picture"}, False)):
        done.clear()
        with monkeypatch.context() as patch:
            patch.setattr(ShardWork, "finish", finish_then_crash)
            with pytest.raises(RuntimeError, match="crash"):
                prompts.main(_argv(paired, "paired", out))  # always the first config
        capsys.readouterr()
        assert prompts.main(_argv(paired, "paired", out, config=config)) == 0
        assert ("skipped 2 of 7 already complete" in capsys.readouterr().err) is resumed
        assert set(_table(out)["prompt"]) == {
            prompts.join_prompts(config["prompt"], "clean, high-resolution, 8k")
        }
        assert len(_table(out)) == 7


@pytest.mark.slow
def test_killed_shard_resumes_with_the_same_table(paired, tmp_path):
    out = tmp_path / "killed.parquet"
    argv = ["prompts", *_argv(paired, "paired", out, "--shard", "2-of-2")]
    assert run_killed_after(2, argv) == -9
    assert not out.exists() and (tmp_path / ".killed.parquet.work").is_dir()
    log = run_stage(argv)
    assert "prompts: resumed" in log and "skipped 2 of 5 already complete" in log
    assert not (tmp_path / ".killed.parquet.work").exists()
    reference = tmp_path / "reference.parquet"
    assert "resumed" not in run_stage(
        ["prompts", *_argv(paired, "paired", reference, "--shard", "2-of-2")]
    )
    assert _table(out)["image_id"].tolist() == [
        "Cam_000",
        "Cam_001",
        "Cam_002",
        "Cam_003",
        "Cam_005",
    ]
    pd.testing.assert_frame_equal(_table(out), _table(reference))
    # the same process settings: the same file, metadata and all
    assert out.read_bytes() == reference.read_bytes()
