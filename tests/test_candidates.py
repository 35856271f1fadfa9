"""Candidates stage: four settings, byte-identical reruns, batch-size independence, schema."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pipeline.candidates import generate_candidates, main
from pipeline.guidance import feedback_by_image
from pipeline.io.images import read_rgb
from pipeline.io.tables import SCHEMAS, read_metadata, read_table
from pipeline.models.onestep import OneStepSR
from pipeline.seeding import derive_seed, torch_generator
from tests.onestep_helpers import make_pairs

VARIANTS = {
    "rank16": {"lora_rank": 16},
    "rank64": {"lora_rank": 64},
    "cfg6": {"cfg_vsd": 6.0},
    "cfg12": {"cfg_vsd": 12.0},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cand")
    data = make_pairs(root / "data", count=3)
    models = {}
    for index, (variant, settings) in enumerate(VARIANTS.items()):
        model = OneStepSR.build_tiny(block_out_channels=(16, 32), seed=index, **settings)
        import torch

        with torch.no_grad():  # an untrained model returns the LQ; make the variants differ
            for name, p in model.unet.named_parameters():
                if "conv_out" in name:
                    p.normal_(std=0.01, generator=torch_generator(index, "init", name))
        model.save_pretrained(root / "models" / variant)
        models[variant] = root / "models" / variant
    return root, data, models


def test_four_settings_table_and_pngs(setup):
    root, data, models = setup
    out = root / "out"
    generate_candidates("onestep", models, data, out, {"device": "cpu"}, seed=5)
    stored = read_table(out / "candidates.parquet", "candidates")
    assert list(stored.columns) == SCHEMAS["candidates"].names
    assert len(stored) == 12 and set(stored["setting"]) == set(VARIANTS)
    row = stored[(stored.image_id == "img1") & (stored.setting == "cfg12")].iloc[0]
    assert (row.steps, row.cfg, row.variant) == (1, 12.0, "cfg12")
    assert row.seed == derive_seed(5, "candidates", "img1", "cfg12")
    assert read_rgb(out / row.path).shape == (32, 32, 3)
    assert read_metadata(out / "candidates.parquet")["models"]["rank64"]["lora_stack"]
    images = {s: (out / f"{s}/img0.png").read_bytes() for s in VARIANTS}
    assert len(set(images.values())) == 4  # the variants give different candidates


def test_rerun_is_byte_identical_and_independent_of_batch_size(setup):
    root, data, models = setup
    runs = {}
    for batch in (3, 2, 1):
        out = root / f"batch{batch}"
        generate_candidates(
            "onestep", models, data, out, {"device": "cpu", "batch_size": batch}, seed=5
        )
        runs[batch] = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.png"))}
    again = root / "again"
    generate_candidates("onestep", models, data, again, {"device": "cpu", "batch_size": 3}, 5)
    assert {p.relative_to(again): p.read_bytes() for p in sorted(again.rglob("*.png"))} == runs[3]
    assert runs[3] == runs[2] == runs[1]


def test_negative_prompts_and_cli(setup, tmp_path):
    root, data, models = setup
    negatives = tmp_path / "neg.parquet"
    pd.DataFrame(
        {"image_id": ["img0", "img0", "img2"], "negative_prompt": ["blurry dog", "", "a cat"]}
    ).to_parquet(negatives)
    assert feedback_by_image(pd.read_parquet(negatives)) == {
        "img0": ["blurry dog"],
        "img2": ["a cat"],
    }
    args = [
        "--framework",
        "onestep",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "c"),
        "--negative-prompts",
        str(negatives),
        "--config",
        json.dumps({"device": "cpu", "settings": [{"name": "only", "variant": "cfg6"}]}),
    ]
    args += [item for v, p in models.items() for item in ("--model", f"{v}={p}")]
    assert main(args) == 0
    table = read_table(tmp_path / "c" / "candidates.parquet", "candidates")
    assert dict(zip(table.image_id, table.negative_prompt, strict=True)) == {
        "img0": "blurry dog",
        "img1": "",
        "img2": "a cat",
    }
    with pytest.raises(KeyError, match="needs model variant 'cfg6'"):
        generate_candidates(
            "onestep",
            {"rank16": models["rank16"]},
            data,
            tmp_path / "d",
            {"device": "cpu", "settings": [{"name": "x", "variant": "cfg6"}]},
            0,
        )


def test_multistep_four_settings_from_one_model_batch_independent(setup, tmp_path):
    from pipeline.models.multistep import MultiStepSR

    _, data, _ = setup
    MultiStepSR.build_tiny(block_out_channels=(16, 32)).save_pretrained(tmp_path / "ms")
    settings = [
        {"name": f"s{s}_c{c}", "variant": "base", "steps": s, "cfg": c}
        for s in (2, 3)
        for c in (4.5, 10.5)
    ]
    runs = []
    for batch in (3, 1):
        out = tmp_path / f"b{batch}"
        config = {"device": "cpu", "settings": settings, "batch_size": batch}
        generate_candidates("multistep", {"base": tmp_path / "ms"}, data, out, config, seed=2)
        runs.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.png"))})
    assert len(runs[0]) == 12 and runs[0] == runs[1]
    table = read_table(tmp_path / "b1" / "candidates.parquet", "candidates")
    assert sorted(set(zip(table.steps, table.cfg, strict=True))) == [
        (2, 4.5),
        (2, 10.5),
        (3, 4.5),
        (3, 10.5),
    ]
