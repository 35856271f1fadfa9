"""Evaluate in shard jobs (docs/design.md §15): shards by test image id gathered equal the one
job, an empty shard, resume after SIGKILL, a changed setting starting afresh, metrics that do not
depend on the batch an image is measured in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import contracts, evaluate, shards
from pipeline.gather import gather
from pipeline.io.images import write_png
from pipeline.io.tables import SCHEMAS, read_metadata, read_table, write_table
from tests.shard_helpers import run_killed_after, run_stage

#: gmsd gives other last bits in a batch of another size on the CPU (the reason the stage
#: measures one image at a time); psnr and ssim are the spatial ones
METRICS = ["psnr", "ssim", "gmsd"]
IDS = [f"img_{c}" for c in "abcdef"]


def _config(batch_size=3, **overrides):
    return {
        "metrics": METRICS,
        "steps": 2,
        "cfg": 2.0,
        "batch_size": batch_size,
        "device": "cpu",
        **overrides,
    }


def _testset(root, ids=IDS):
    """A degraded test folder: 32x32 and 24x32 HQs (two batches of sizes), 4x LQs."""
    rng = np.random.default_rng(0)
    rows = []
    for n, image_id in enumerate(ids):
        h, w = (32, 32) if n % 3 else (24, 32)
        coarse = rng.uniform(0, 255, size=(h // 8, w // 8, 3))
        hq = np.kron(coarse, np.ones((8, 8, 1))) + rng.normal(0, 8, size=(h, w, 3))
        hq = np.clip(hq, 0, 255).astype(np.uint8)
        lq = hq.reshape(h // 4, 4, w // 4, 4, 3).mean(axis=(1, 3)).round().astype(np.uint8)
        write_png(root / "hq" / f"{image_id}.png", hq)
        write_png(root / "lq" / f"{image_id}.png", lq)
        row = dict.fromkeys(SCHEMAS["degradation_pairs"].names)
        rows.append(
            {
                **row,
                "image_id": image_id,
                "source_id": image_id,
                "split": "test",
                "hq_path": f"hq/{image_id}.png",
                "lq_path": f"lq/{image_id}.png",
            }
        )
    write_table(pd.DataFrame(rows), root / contracts.DATA_TABLE, "degradation_pairs")
    return root


def _prompts(path, ids):
    """A prompts table of ``ids`` only (a shard's, as the prompts stage's shard job writes)."""
    frame = pd.DataFrame(
        {
            "image_id": list(ids),
            "prompt": "a photo",
            "negative_prompt": "blurry",
            "source": "fixed",
            "model": "",
        }
    )
    write_table(frame, path, "prompts", {"source": "fixed"})
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pipeline.models import build_tiny_model

    root = tmp_path_factory.mktemp("eval_shards")
    data = _testset(root / "data")
    model = root / "pretrained"
    build_tiny_model("multistep", block_out_channels=(8, 16)).save_pretrained(model)
    return root, data, model


def _run(setup, out, shard=None, ids=IDS, **config):
    root, data, model = setup
    name = (shard or "whole").replace("-", "_")
    prompts = _prompts(
        root / f"prompts_{name}_{out.name}.parquet", shards.Shard.parse(shard).select(ids)
    )
    return evaluate.evaluate(
        str(model),
        "pretrained",
        "syn",
        "synthetic",
        data,
        out,
        _config(**config),
        seed=3,
        prompts=prompts,
        shard=shard,
    )


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def _tables(folder):
    return (
        read_table(folder / contracts.EVAL_METRICS, "eval_metrics"),
        read_table(folder / contracts.EVAL_IMAGES, "eval_images"),
    )


def _assert_same_output(folder, expected):
    assert _files(folder) == _files(expected)
    for got, want in zip(_tables(folder), _tables(expected), strict=True):
        pd.testing.assert_frame_equal(got, want, check_exact=True)


def _work(out):
    return out.with_name(f".{out.name}.work")


def test_shards_gathered_equal_the_single_job(setup, tmp_path):
    whole = tmp_path / "whole"
    table = _run(setup, whole)
    assert sorted(_files(whole)) == [f"images/{i}.png" for i in IDS]
    assert list(table["image_id"]) == [i for i in IDS for _ in METRICS]  # image-id order
    assert list(table["metric"]) == METRICS * len(IDS)
    assert read_metadata(whole / contracts.EVAL_METRICS)["n_images"] == len(IDS)
    for count in (2, 3):
        outs = []
        for item in shards.items(count):
            out = tmp_path / f"k{count}" / item
            part = _run(setup, out, shard=item)
            held = shards.Shard.parse(item).select(IDS)
            assert sorted(set(part["image_id"])) == held  # only the shard's images
            assert sorted(_files(out)) == [f"images/{i}.png" for i in held]
            metadata = read_metadata(out / contracts.EVAL_METRICS)
            assert metadata["shard"] == shards.Shard.parse(item).record()
            assert (metadata["n_images"], metadata["shard_images"]) == (len(IDS), len(held))
            outs.append(out)
        gathered = tmp_path / f"gathered{count}"
        gather("evaluation", outs, gathered)
        _assert_same_output(gathered, whole)
        metadata = read_metadata(gathered / contracts.EVAL_METRICS)
        assert metadata["shards"] == count and "shard" not in metadata
        assert metadata["n_images"] == len(IDS)
        sr_paths = contracts.evaluation_images(gathered)["sr_path"]
        assert all(Path(path).is_file() for path in sr_paths)  # linked into the folder


def test_an_image_measures_the_same_alone_as_in_a_batch(setup, tmp_path):
    """The metrics of an image do not depend on its batch (so neither on its shard)."""
    batched = _run(setup, tmp_path / "b3", batch_size=3)
    alone = _run(setup, tmp_path / "b1", batch_size=1)
    pd.testing.assert_frame_equal(batched, alone, check_exact=True)
    assert _files(tmp_path / "b3") == _files(tmp_path / "b1")


def test_an_empty_shard_writes_empty_tables_and_gathers(setup, tmp_path):
    ids = IDS[:2]
    root, data, model = setup
    small = _testset(tmp_path / "small", ids)
    empty = next(item for item in shards.items(3) if not shards.Shard.parse(item).select(ids))
    outs = []
    for item in shards.items(3):
        out = tmp_path / item
        prompts = _prompts(tmp_path / f"{item}.parquet", shards.Shard.parse(item).select(ids))
        evaluate.evaluate(
            str(model),
            "pretrained",
            "syn",
            "synthetic",
            small,
            out,
            _config(),
            seed=3,
            prompts=prompts,
            shard=item,
        )
        outs.append(out)
    metrics, manifest = _tables(tmp_path / empty)
    assert metrics.empty and list(metrics.columns) == SCHEMAS["eval_metrics"].names
    assert manifest.empty and list(manifest.columns) == SCHEMAS["eval_images"].names
    assert (tmp_path / empty / "images").is_dir() and not _files(tmp_path / empty)
    assert not _work(tmp_path / empty).exists()
    metadata = read_metadata(tmp_path / empty / contracts.EVAL_METRICS)
    assert (metadata["shard_images"], metadata["n_images"]) == (0, 2)
    whole = tmp_path / "whole"
    evaluate.evaluate(
        str(model),
        "pretrained",
        "syn",
        "synthetic",
        small,
        whole,
        _config(),
        seed=3,
        prompts=_prompts(tmp_path / "all.parquet", ids),
    )
    gather("evaluation", outs, tmp_path / "gathered")
    _assert_same_output(tmp_path / "gathered", whole)


def test_a_prompts_table_missing_a_shard_image_is_refused(setup, tmp_path):
    root, data, model = setup
    shard = shards.Shard.parse("1-of-2")
    other = [i for i in IDS if not shard.holds(i)]
    with pytest.raises(KeyError, match="no prompt"):
        evaluate.evaluate(
            str(model),
            "pretrained",
            "syn",
            "synthetic",
            data,
            tmp_path / "out",
            _config(),
            seed=3,
            prompts=_prompts(tmp_path / "p.parquet", other),
            shard=shard,
        )


def _argv(setup, out, prompts, seed=3, shard="2-of-2"):
    _, data, model = setup
    return [
        "evaluate",
        "--model",
        str(model),
        "--model-name",
        "pretrained",
        "--testset",
        "syn",
        "--testset-kind",
        "synthetic",
        "--testset-path",
        str(data),
        "--out",
        str(out),
        "--config",
        json.dumps(_config(batch_size=2)),
        "--seed",
        str(seed),
        "--prompts",
        str(prompts),
        "--shard",
        shard,
    ]


@pytest.mark.slow
def test_a_killed_shard_resumes_to_the_uninterrupted_bytes(setup, tmp_path):
    held = shards.Shard.parse("2-of-2").select(IDS)
    assert len(held) >= 3  # the kill leaves images both done and not done
    prompts = _prompts(tmp_path / "prompts.parquet", held)
    whole = tmp_path / "whole"
    run_stage(_argv(setup, whole, prompts))
    out = tmp_path / "killed"
    # a changed seed: the work folder of another run is discarded, nothing is skipped
    assert run_killed_after(2, _argv(setup, out, prompts, seed=4)) == -9
    assert len(list((_work(out) / "done").iterdir())) == 2
    log = run_stage(_argv(setup, out, prompts, seed=3))
    assert "skipped" not in log
    _assert_same_output(out, whole)
    # killed after two images: the rerun skips them and ends with the same bytes
    out = tmp_path / "resumed"
    assert run_killed_after(2, _argv(setup, out, prompts)) == -9
    assert not out.exists()
    assert sorted(p.stem for p in (_work(out) / "done").iterdir()) == held[:2]
    log = run_stage(_argv(setup, out, prompts))
    assert f"skipped 2 of {len(held)} already complete" in log
    assert not _work(out).exists()
    _assert_same_output(out, whole)
    seed4 = tmp_path / "seed4"
    run_stage(_argv(setup, seed4, prompts, seed=4))
    assert _files(seed4) != _files(whole)  # the seed matters: the discard test above can fail
