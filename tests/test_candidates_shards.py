"""Candidates in shard jobs (docs/design.md §15): resume after SIGKILL, fingerprint, empty
input, one model load, and two halves of the images gathered equal to the whole run."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

from pipeline import candidates, contracts
from pipeline.candidates import generate_candidates
from pipeline.gather import gather
from pipeline.io.tables import SCHEMAS, read_metadata, read_table, write_table
from pipeline.models.onestep import OneStepSR
from pipeline.seeding import torch_generator
from tests.onestep_helpers import make_pairs
from tests.shard_helpers import run_killed_after, run_stage

#: two of the paper's one-step variants: enough to show image-major order keeps every setting
VARIANTS = {"rank16": {"lora_rank": 16}, "cfg12": {"cfg_vsd": 12.0}}
SETTINGS = [{"name": name, "variant": name} for name in VARIANTS]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Three 32x32 pairs and two tiny one-step variants whose outputs differ."""
    root = tmp_path_factory.mktemp("cand_shards")
    data = make_pairs(root / "data", count=3)
    models = {}
    for index, (variant, settings) in enumerate(VARIANTS.items()):
        model = OneStepSR.build_tiny(block_out_channels=(16, 32), seed=index, **settings)
        with torch.no_grad():  # an untrained model returns the LQ; make the variants differ
            for name, p in model.unet.named_parameters():
                if "conv_out" in name:
                    p.normal_(std=0.01, generator=torch_generator(index, "init", name))
        model.save_pretrained(root / "models" / variant)
        models[variant] = root / "models" / variant
    return root, data, models


def _argv(data, models, out, seed=5, batch_size=2, settings=SETTINGS):
    config = {"device": "cpu", "batch_size": batch_size, "settings": settings}
    argv = [
        "candidates",
        "--framework",
        "onestep",
        "--data",
        str(data),
        "--out",
        str(out),
        "--config",
        json.dumps(config),
        "--seed",
        str(seed),
    ]
    return argv + [item for v, p in models.items() for item in ("--model", f"{v}={p}")]


def _pngs(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def _table(folder):
    return read_table(folder / contracts.CANDIDATES_TABLE, "candidates")


def _work(out):
    return out.with_name(f".{out.name}.work")


def _subset(data, ids, folder):
    """A data folder of ``ids`` only (a shard's data folder): its images and its table rows."""
    table = read_table(data / contracts.DATA_TABLE, "degradation_pairs")
    part = table[table["image_id"].isin(ids)].reset_index(drop=True)
    for path in [*part["hq_path"], *part["lq_path"]]:
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(data / path, folder / path)
    write_table(part, folder / contracts.DATA_TABLE, "degradation_pairs")
    return folder


@pytest.mark.slow
def test_killed_after_one_image_resumes_to_the_uninterrupted_bytes(setup, tmp_path):
    _, data, models = setup
    whole = tmp_path / "whole"
    run_stage(_argv(data, models, whole))
    out = tmp_path / "killed"
    # batch 2: img0 and img1 share the first batch; killed after img0 is marked complete,
    # img1's PNGs are written but unmarked and img2 was never started
    assert run_killed_after(1, _argv(data, models, out)) == -9
    assert not out.exists()
    done = sorted(p.stem for p in (_work(out) / "done").iterdir())
    assert done == ["img0"]
    assert (_work(out) / "files" / "rank16" / "img0.png").is_file()
    log = run_stage(_argv(data, models, out))
    assert "skipped 1 of 3 already complete" in log
    assert not _work(out).exists()
    assert len(_pngs(whole)) == 6 and _pngs(out) == _pngs(whole)
    pd.testing.assert_frame_equal(_table(out), _table(whole), check_exact=True)
    assert list(_table(out)["image_id"]) == ["img0", "img0", "img1", "img1", "img2", "img2"]
    assert list(_table(out)["setting"]) == ["cfg12", "rank16"] * 3


@pytest.mark.slow
def test_changed_setting_discards_the_work_folder(setup, tmp_path):
    _, data, models = setup
    out = tmp_path / "out"
    assert run_killed_after(1, _argv(data, models, out)) == -9
    # setting rank16 now samples the cfg12 model: img0's kept PNGs would be stale
    changed = [{"name": "rank16", "variant": "cfg12"}, {"name": "cfg12", "variant": "cfg12"}]
    log = run_stage(_argv(data, models, out, settings=changed))
    assert "already complete" not in log
    config = {"device": "cpu", "batch_size": 2}
    fresh, before = tmp_path / "fresh", tmp_path / "before"
    generate_candidates("onestep", models, data, fresh, {**config, "settings": changed}, seed=5)
    generate_candidates("onestep", models, data, before, {**config, "settings": SETTINGS}, seed=5)
    assert _pngs(out) == _pngs(fresh)
    assert _pngs(out)["rank16/img0.png"] != _pngs(before)["rank16/img0.png"]
    pd.testing.assert_frame_equal(_table(out), _table(fresh), check_exact=True)


def test_two_halves_gathered_equal_the_whole_run(setup, tmp_path):
    _, data, models = setup
    config = {"device": "cpu", "settings": SETTINGS}
    whole = tmp_path / "whole"
    generate_candidates("onestep", models, data, whole, config, seed=5)
    halves = []
    for name, ids in (("a", ["img0", "img2"]), ("b", ["img1"])):
        part = _subset(data, ids, tmp_path / f"data_{name}")
        generate_candidates("onestep", models, part, tmp_path / name, config, seed=5)
        halves.append(tmp_path / name)
        assert set(_pngs(tmp_path / name)) == {f"{s}/{i}.png" for s in VARIANTS for i in ids}
    gather("candidates", halves, tmp_path / "gathered")
    assert _pngs(tmp_path / "gathered") == _pngs(whole)
    pd.testing.assert_frame_equal(_table(tmp_path / "gathered"), _table(whole), check_exact=True)
    assert read_metadata(tmp_path / "gathered" / contracts.CANDIDATES_TABLE)["shards"] == 2


def test_models_load_once_and_lqs_are_read_per_batch(setup, tmp_path, monkeypatch):
    _, data, models = setup
    loads, reads = [], []
    load_model, load_lq = candidates.load_model, candidates.load_lq
    monkeypatch.setattr(
        candidates,
        "load_model",
        lambda folder, **kw: loads.append(folder) or load_model(folder, **kw),
    )
    monkeypatch.setattr(
        candidates, "load_lq", lambda path, size: reads.append(path.stem) or load_lq(path, size)
    )
    config = {"device": "cpu", "batch_size": 1, "settings": SETTINGS}
    generate_candidates("onestep", models, data, tmp_path / "out", config, seed=5)
    assert sorted(loads) == sorted(str(p) for p in models.values())
    assert reads == ["img0", "img1", "img2"]  # each LQ once, not once per setting
    assert len(_pngs(tmp_path / "out")) == 6


def test_empty_input_writes_an_empty_table_with_the_schema(setup, tmp_path):
    _, _, models = setup
    data = tmp_path / "empty"
    data.mkdir()
    names = SCHEMAS["degradation_pairs"].names
    write_table(pd.DataFrame(columns=names), data / contracts.DATA_TABLE, "degradation_pairs")
    prompts = tmp_path / "prompts.parquet"
    write_table(pd.DataFrame(columns=SCHEMAS["prompts"].names), prompts, "prompts")
    out = tmp_path / "out"
    run_stage([*_argv(data, models, out), "--prompts", str(prompts)])
    table = _table(out)
    assert table.empty and list(table.columns) == SCHEMAS["candidates"].names
    assert _pngs(out) == {} and not _work(out).exists()
    assert set(read_metadata(out / contracts.CANDIDATES_TABLE)["models"]) == set(VARIANTS)
