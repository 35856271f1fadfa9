"""Win rates in shard jobs (docs/design.md §15): each shard segments and scores its test images
into a win_instances table; the gather's win rates, test HQ table, label maps and instances
equal one job's over the whole test set, for K = 1, 2, 3 and with an empty shard; a killed shard
resumes per image."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import zarr

from pipeline import contracts, segment, shards, winrates
from pipeline.io.images import write_png
from pipeline.io.tables import SCHEMAS, read_metadata, read_table, write_table
from tests.shard_helpers import run_killed_after, run_stage

IDS = [f"img_{c}" for c in "abcdef"]
SEGMENT = {
    "device": "cpu",
    "top_k": 5,
    "classical": {
        "method": "felzenszwalb",
        "felzenszwalb": {"scale": 100.0, "sigma": 0.8, "min_size": 40},
    },
}
#: two aligned models under two objectives (rows of one image: one model after the other)
MODELS = {"aligned_f": "fidelity", "aligned_p": "perception"}


def _config():
    from pipeline import settings

    score = settings.resolve("score", {"device": "cpu", "min_crop_size": 16})
    return {
        "models": MODELS,
        "objectives": {
            "fidelity": {"psnr": 1.0, "ssim": 1.0},
            "perception": {"gmsd": 1.0, "psnr": 0.5},
        },
        "score": {key: score[key] for key in winrates.REGISTRY_KEYS},
        "tie_tolerance": 1e-9,
    }


def _images(root, ids):
    """HQ test images and three models' outputs: pretrained (noise), aligned_f (less noise on
    the left half, more on the right, the pretrained output itself on the first image: wins,
    losses and ties), aligned_p (other noise)."""
    rng = np.random.default_rng(0)
    outputs = {name: {} for name in ("pretrained", *MODELS)}
    for n, image_id in enumerate(ids):
        coarse = rng.uniform(0, 255, size=(6, 6, 3))
        hq = np.clip(np.kron(coarse, np.ones((8, 8, 1))) + rng.normal(0, 6, (48, 48, 3)), 0, 255)
        write_png(root / "hq" / f"{image_id}.png", hq.astype(np.uint8))

        def noisy(sigma, hq=hq):
            return np.clip(hq + rng.normal(0, 1, hq.shape) * sigma, 0, 255).astype(np.uint8)

        outputs["pretrained"][image_id] = noisy(10.0)
        sigma = np.where(np.arange(48)[None, :, None] < 24, 4.0, 20.0)
        outputs["aligned_f"][image_id] = outputs["pretrained"][image_id] if n == 0 else noisy(sigma)
        outputs["aligned_p"][image_id] = noisy(10.0)
    return outputs


def _evaluation(folder, model, outputs, root, ids):
    """An evaluation folder (or shard of one) of ``ids``: PNGs and the manifest."""
    for image_id in ids:
        write_png(folder / "images" / f"{image_id}.png", outputs[model][image_id])
    manifest = pd.DataFrame(
        {
            "testset": "syn",
            "model": model,
            "image_id": list(ids),
            "sr_path": [f"images/{i}.png" for i in ids],
            "lq_path": [str(root / "lq" / f"{i}.png") for i in ids],
            "hq_path": [str(root / "hq" / f"{i}.png") for i in ids],
        },
        columns=SCHEMAS["eval_images"].names,
    )
    (folder / "images").mkdir(parents=True, exist_ok=True)
    write_table(manifest, folder / contracts.EVAL_IMAGES, "eval_images", {"model": model})
    return folder


def _segment(hq, masks, instances):
    assert (
        segment.main(
            [
                "--candidates",
                str(hq),
                "--setting",
                "hq",
                "--out-zarr",
                str(masks),
                "--out-table",
                str(instances),
                "--config",
                json.dumps(SEGMENT),
                "--seed",
                "0",
            ]
        )
        == 0
    )


def _whole(root, outputs, ids, out):
    """One job over the whole test set, as the stage ran before shards."""
    evals = [_evaluation(out / "eval" / m, m, outputs, root, ids) for m in outputs]
    hq = winrates.hq_table(evals[0], out / "masks" / "test_syn_hq.parquet")
    masks, instances = out / "masks" / "test_syn.zarr", out / "masks" / "test_syn_instances.parquet"
    _segment(hq, masks, instances)
    return evals, winrates.win_rates(evals, masks, instances, _config())


def _shard_job(root, outputs, ids, out, item):
    """Shard job ``item``: the shard's evaluations, test HQ table, segmentation, scores."""
    held = shards.Shard.parse(item).select(ids)
    evals = [_evaluation(out / "eval" / m / item, m, outputs, root, held) for m in outputs]
    paths = {
        "hq": out / "hq" / f"{item}.parquet",
        "masks": out / "masks" / f"{item}.zarr",
        "instances": out / "inst" / f"{item}.parquet",
        "win": out / "win" / f"{item}.parquet",
    }
    winrates.hq_table(evals[0], paths["hq"])
    _segment(paths["hq"], paths["masks"], paths["instances"])
    winrates.shard_instances(
        evals, paths["masks"], paths["instances"], _config(), paths["win"], shard=item
    )
    return paths, evals


def _gather_cli(jobs, out, config_file):
    argv = [
        "--gather",
        *[str(j["win"]) for j in jobs],
        "--out",
        str(out / "win_rates.parquet"),
        "--config",
        str(config_file),
        "--seed",
        "0",
    ]
    for name in ("hq", "masks", "instances"):
        argv += [
            f"--{name}-shards",
            *[str(j[name]) for j in jobs],
            f"--out-{name}",
            str(out / f"{name}.out"),
        ]
    assert winrates.main(argv) == 0
    return {name: out / f"{name}.out" for name in ("hq", "masks", "instances")}


def _assert_masks_equal(a, b):
    left, right = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert sorted(left.array_keys()) == sorted(right.array_keys())
    for key in left.array_keys():
        np.testing.assert_array_equal(left[key][...], right[key][...])


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    root = tmp_path_factory.mktemp("win_shards")
    outputs = _images(root, IDS)
    evals, rates = _whole(root, outputs, IDS, root / "whole")
    return root, outputs, rates


@pytest.mark.slow
def test_shards_gathered_equal_the_single_job(whole, tmp_path):
    root, outputs, expected = whole
    # the fixture really has wins, ties and losses, and both models
    assert list(expected["model"]) == sorted(MODELS)
    first = expected.iloc[0]
    assert first["wins"] > 0 and first["ties"] > 0 and first["losses"] > 0
    config_file = tmp_path / "winrates.json"
    config_file.write_text(json.dumps(_config()))
    one = root / "whole" / "masks"
    for count in (1, 2, 3):
        out = tmp_path / f"k{count}"
        jobs = [_shard_job(root, outputs, IDS, out, item)[0] for item in shards.items(count)]
        for item, job in zip(shards.items(count), jobs, strict=True):
            table = read_table(job["win"], "win_instances")
            assert set(table["image_id"]) <= set(shards.Shard.parse(item).select(IDS))
            assert read_metadata(job["win"])["shard"] == shards.Shard.parse(item).record()
        gathered = _gather_cli(jobs, out, config_file)
        rates = read_table(out / "win_rates.parquet", "win_rates")
        pd.testing.assert_frame_equal(rates, expected, check_exact=True, check_dtype=False)
        assert read_metadata(out / "win_rates.parquet")["shards"] == count
        # the test HQ table: the rows of one job, its paths re-rooted at the gathered table
        hq, hq_one = (
            read_table(gathered["hq"], "candidates"),
            read_table(one / "test_syn_hq.parquet", "candidates"),
        )
        assert list(hq["image_id"]) == IDS
        files = contracts.candidate_files(gathered["hq"], hq)
        for image_id in IDS:
            assert files[(image_id, "hq")].resolve() == (root / "hq" / f"{image_id}.png").resolve()
        expected_paths = [
            os.path.relpath((root / "hq" / f"{i}.png").resolve(), out.resolve()) for i in IDS
        ]
        assert list(hq["path"]) == expected_paths
        pd.testing.assert_frame_equal(hq.drop(columns="path"), hq_one.drop(columns="path"))
        _assert_masks_equal(gathered["masks"], one / "test_syn.zarr")
        pd.testing.assert_frame_equal(
            read_table(gathered["instances"], "instances"),
            read_table(one / "test_syn_instances.parquet", "instances"),
            check_exact=True,
        )


def test_the_shard_table_holds_what_win_rate_reads(whole, tmp_path):
    """One shard of everything: its per-instance rows of a model are instance_scores' rows,
    and rates_from_instances gives win_rates' numbers."""
    root, outputs, expected = whole
    job, evals = _shard_job(root, outputs, IDS, tmp_path, "1-of-1")
    table = read_table(job["win"], "win_instances")
    assert list(table.columns) == SCHEMAS["win_instances"].names
    manifests = {m: contracts.evaluation_images(e) for m, e in zip(outputs, evals, strict=True)}
    registry = winrates._registry(_config(), 0)
    instances = read_table(job["instances"], "instances")
    for model, objective in sorted(MODELS.items()):
        metrics = sorted(_config()["objectives"][objective])
        scores = winrates.instance_scores(
            manifests["pretrained"], manifests[model], job["masks"], instances, registry, metrics
        )
        part = table[table["model"] == model]
        assert set(part["objective"]) == {objective} and set(part["testset"]) == {"syn"}
        pd.testing.assert_frame_equal(
            part[winrates.SCORE_COLUMNS].reset_index(drop=True), scores, check_exact=True
        )
    rates = winrates.rates_from_instances(table, _config())
    pd.testing.assert_frame_equal(rates, expected, check_exact=True)


def test_an_empty_shard_writes_empty_tables_and_gathers(tmp_path):
    ids = IDS[:2]
    root = tmp_path / "data"
    outputs = _images(root, ids)
    _, expected = _whole(root, outputs, ids, tmp_path / "whole")
    empty = next(item for item in shards.items(3) if not shards.Shard.parse(item).select(ids))
    jobs = [_shard_job(root, outputs, ids, tmp_path / "k3", item)[0] for item in shards.items(3)]
    job = jobs[shards.items(3).index(empty)]
    for name, schema in (
        ("hq", "candidates"),
        ("instances", "instances"),
        ("win", "win_instances"),
    ):
        table = read_table(job[name], schema)
        assert table.empty and list(table.columns) == SCHEMAS[schema].names
    assert not job["win"].with_name(f".{job['win'].name}.work").exists()
    config_file = tmp_path / "winrates.json"
    config_file.write_text(json.dumps(_config()))
    _gather_cli(jobs, tmp_path / "gathered", config_file)
    rates = read_table(tmp_path / "gathered" / "win_rates.parquet", "win_rates")
    pd.testing.assert_frame_equal(rates, expected, check_exact=True, check_dtype=False)


def test_gather_refuses_shards_scored_with_another_config(whole, tmp_path):
    root, outputs, _ = whole
    job, _ = _shard_job(root, outputs, IDS, tmp_path, "1-of-1")
    other = {**_config(), "tie_tolerance": 0.5}
    with pytest.raises(ValueError, match="another config"):
        winrates.gather([job["win"]], tmp_path / "rates.parquet", other)


@pytest.mark.slow
def test_a_killed_shard_resumes_per_image(whole, tmp_path):
    root, outputs, _ = whole
    job, evals = _shard_job(root, outputs, IDS, tmp_path / "ref", "1-of-1")
    config = tmp_path / "winrates.json"
    config.write_text(json.dumps(_config()))

    def argv(out, seed=0):
        return [
            "winrates",
            "--evaluations",
            *map(str, evals),
            "--masks",
            str(job["masks"]),
            "--instances",
            str(job["instances"]),
            "--shard",
            "1-of-1",
            "--out",
            str(out),
            "--config",
            str(config),
            "--seed",
            str(seed),
        ]

    out = tmp_path / "win.parquet"
    work = out.with_name(f".{out.name}.work")
    # another seed's work folder is discarded
    assert run_killed_after(2, argv(out, seed=1)) == -9
    assert run_killed_after(3, argv(out)) == -9
    assert not out.exists()
    assert sorted(p.stem for p in (work / "done").iterdir()) == IDS[:3]
    log = run_stage(argv(out))
    assert f"skipped 3 of {len(IDS)} already complete" in log
    assert not work.exists()
    pd.testing.assert_frame_equal(
        read_table(out, "win_instances"), read_table(job["win"], "win_instances"), check_exact=True
    )
