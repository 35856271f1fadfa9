"""Prompts stage: fixed / captioner / tagger sources, the table, M2 feedback negatives."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import prompts, settings
from pipeline.captioner import BlipCaptioner
from pipeline.guidance import (
    PromptsError,
    apply_feedback,
    feedback_by_image,
    feedback_vocabulary,
    image_negative_prompt,
    join_prompts,
    load_prompts,
    vocabulary_negative_prompt,
)
from pipeline.io.images import write_png
from pipeline.io.tables import TableError, read_metadata, read_table, schema_for, write_table
from pipeline.prompts import OSEDIFF_NEGATIVE_PROMPT, SEESR_NEGATIVE_PROMPT, ram_tags_to_prompt
from tests.test_caption import tiny_blip  # noqa: F401  (the caption tests' tiny BLIP fixture)

IDS = ["img_a", "img_b", "img_c"]


def _image(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.fixture
def data_folder(tmp_path):
    """A degraded data folder as the degrade stage writes it (pairs.parquet, hq/, lq/)."""
    folder = tmp_path / "train"
    columns = {name: [None] * len(IDS) for name in schema_for("degradation_pairs").names}
    columns |= {"image_id": IDS, "lq_path": [f"lq/{i}.png" for i in IDS]}
    columns |= {"hq_path": [f"hq/{i}.png" for i in IDS]}
    for n, image_id in enumerate(IDS):
        write_png(folder / "lq" / f"{image_id}.png", _image(n))
        write_png(folder / "hq" / f"{image_id}.png", _image(n, 64))
    write_table(pd.DataFrame(columns), folder / "pairs.parquet", "degradation_pairs")
    return folder


@pytest.fixture
def paired_folder(tmp_path):
    """A RealSR-style test set: LR/Canon_001_LR4.png matched with HR/Canon_001_HR.png."""
    folder = tmp_path / "RealSR"
    for n, name in enumerate(["Canon_001", "Nikon_002"]):
        write_png(folder / "LR" / f"{name}_LR4.png", _image(n))
        write_png(folder / "HR" / f"{name}_HR.png", _image(n, 64))
    return folder


# -- the fixed source and the table ------------------------------------------------------------


def test_fixed_prompts_table_schema_and_contents(data_folder, tmp_path):
    out = tmp_path / "prompts" / "train.parquet"
    config = {"prompt": "a photo", "negative_prompt": "blurry, noise"}
    argv = ["--images", str(data_folder), "--kind", "train", "--out", str(out), "--seed", "3"]
    assert prompts.main([*argv, "--config", json.dumps(config)]) == 0

    table = read_table(out, "prompts")
    assert list(table.columns) == ["image_id", "prompt", "negative_prompt", "source", "model"]
    assert table["image_id"].tolist() == IDS
    assert set(table["prompt"]) == {"a photo, clean, high-resolution, 8k"}  # + SeeSR's added
    assert set(table["negative_prompt"]) == {"blurry, noise"}
    assert set(table["source"]) == {"fixed"} and set(table["model"]) == {"none"}
    metadata = read_metadata(out)
    assert metadata["table"] == "prompts" and metadata["kind"] == "train"
    assert metadata["source"] == "fixed" and metadata["model"] == "none"
    assert metadata["seed"] == 3 and metadata["n_images"] == 3
    assert load_prompts(out) == {
        i: ("a photo, clean, high-resolution, 8k", "blurry, noise") for i in IDS
    }
    with pytest.raises(KeyError, match="img_z"):
        load_prompts(out, ["img_a", "img_z"])
    frame = table.drop(columns="model")
    with pytest.raises(TableError, match="missing columns"):
        write_table(frame, tmp_path / "bad.parquet", "prompts")


def test_defaults_are_seesr_and_guidance_is_never_a_no_op(data_folder):
    frame, metadata = prompts.run_prompts_stage(data_folder, "train", {})
    assert set(frame["prompt"]) == {"clean, high-resolution, 8k"}
    assert set(frame["negative_prompt"]) == {SEESR_NEGATIVE_PROMPT}
    assert metadata["config"]["source"] == "fixed"
    assert OSEDIFF_NEGATIVE_PROMPT.startswith("painting, oil painting") and "over-smooth" in (
        OSEDIFF_NEGATIVE_PROMPT
    )
    empty = {"prompt": "", "added_prompt": "", "negative_prompt": ""}
    with pytest.raises(PromptsError, match="no-op"):
        prompts.run_prompts_stage(data_folder, "train", empty)
    same = {"prompt": "x", "added_prompt": "", "negative_prompt": "x"}
    with pytest.raises(PromptsError, match="img_a"):
        prompts.run_prompts_stage(data_folder, "train", same)


def test_config_errors_name_the_key():
    with pytest.raises(settings.ConfigError, match="promt"):
        prompts.resolve_config({"promt": "typo"})
    with pytest.raises(settings.ConfigError, match="source"):
        prompts.resolve_config({"source": "llava"})
    with pytest.raises(settings.ConfigError, match="prompts.captioner"):
        prompts.build_source(prompts.resolve_config({"source": "captioner"}))


def test_test_sets_are_listed_as_evaluate_lists_them(data_folder, paired_folder):
    from pipeline.evaluate import load_testset

    frame, metadata = prompts.run_prompts_stage(paired_folder, "paired", {"prompt": "a photo"})
    expected = [image.image_id for image in load_testset("paired", paired_folder)]
    assert frame["image_id"].tolist() == expected == ["Canon_001", "Nikon_002"]
    assert metadata["kind"] == "paired"
    synthetic, _ = prompts.run_prompts_stage(data_folder, "synthetic", {})
    assert synthetic["image_id"].tolist() == IDS


# -- the captioner source ----------------------------------------------------------------------


def test_captioner_source_with_a_tiny_local_blip(data_folder, tiny_blip):  # noqa: F811
    config = {"source": "captioner", "captioner": str(tiny_blip), "device": "cpu"}
    config |= {"max_new_tokens": 5, "added_prompt": "", "negative_prompt": "lowres"}
    frame, metadata = prompts.run_prompts_stage(data_folder, "train", config)
    direct = BlipCaptioner(tiny_blip, "cpu", max_new_tokens=5)  # the caption stage's loader
    lq = [prompts.read_rgb(data_folder / "lq" / f"{i}.png") for i in IDS]
    assert frame["prompt"].tolist() == [join_prompts(t) for t in direct.caption(lq)]
    assert set(frame["source"]) == {"captioner"}
    assert set(frame["model"]) == {str(tiny_blip.resolve())}
    assert metadata["source"] == "captioner" and metadata["model"] == str(tiny_blip.resolve())
    assert metadata["max_new_tokens"] == 5


# -- the tagger source -------------------------------------------------------------------------


def test_tagger_without_its_package_names_the_package(data_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "ram", None)  # import ram fails even if installed
    config = {"source": "tagger", "tagger": "models/ram_swin_large_14m.pth"}
    with pytest.raises(ModuleNotFoundError, match="'ram'.*recognize-anything"):
        prompts.run_prompts_stage(data_folder, "train", config)


def test_tagger_source_through_a_stand_in_ram_package(data_folder, tmp_path, monkeypatch):
    """The RAM call path (resize, normalise, generate_tag, ' | ' tags) with a fake package."""
    calls = {}

    class FakeRam(torch.nn.Module):
        def generate_tag(self, batch):
            calls.setdefault("shapes", []).append(tuple(batch.shape))
            return [f"cat | tree | {n}" for n in range(len(batch))], ["zh"] * len(batch)

    def build(**options):
        calls["options"] = options
        return FakeRam()

    package, models = types.ModuleType("ram"), types.ModuleType("ram.models")
    models.ram, package.models = build, models
    monkeypatch.setitem(sys.modules, "ram", package)
    monkeypatch.setitem(sys.modules, "ram.models", models)
    weights = tmp_path / "ram_swin_large_14m.pth"
    weights.write_bytes(b"")
    config = {"source": "tagger", "tagger": str(weights), "tagger_image_size": 64}
    config |= {"batch_size": 2, "device": "cpu"}
    frame, metadata = prompts.run_prompts_stage(data_folder, "train", config)
    assert calls["options"] == {"pretrained": str(weights), "image_size": 64, "vit": "swin_l"}
    assert calls["shapes"] == [(2, 3, 64, 64), (1, 3, 64, 64)]
    assert frame["prompt"].tolist() == [
        "cat, tree, 0, clean, high-resolution, 8k",
        "cat, tree, 1, clean, high-resolution, 8k",
        "cat, tree, 0, clean, high-resolution, 8k",
    ]
    assert set(frame["source"]) == {"tagger"} and metadata["model"] == str(weights)
    missing = {**config, "tagger_condition": str(tmp_path / "DAPE.pth")}
    with pytest.raises(FileNotFoundError, match="DAPE.pth"):
        prompts.run_prompts_stage(data_folder, "train", missing)


def test_ram_tags_to_prompt():
    assert ram_tags_to_prompt("cat | dog |  tree") == "cat, dog, tree"
    assert ram_tags_to_prompt("") == ""


# -- M2: feedback negatives --------------------------------------------------------------------


def _feedback() -> pd.DataFrame:
    """A hand-made captions table: HQ rows and candidates, some hallucinated."""
    rows = [  # image_id, instance_id, candidate, caption, hallucinated
        ("i1", 1, "hq", "a dog on grass", False),
        ("i1", 1, "rank16", "a horse running", True),
        ("i1", 2, "rank16", "a face in the wall", True),
        ("i1", 1, "rank64", "a horse running", True),  # same image twice: counts once
        ("i2", 1, "rank16", "a horse running", True),
        ("i2", 2, "rank64", "text on a sign", True),
        ("i2", 3, "rank64", "a tree", False),
        ("i3", 1, "cfg6", "a face in the wall", True),
        ("i3", 2, "cfg6", "a bird", True),
        ("i4", 1, "cfg6", "a cat", False),
    ]
    columns = ["image_id", "instance_id", "candidate", "caption", "hallucinated"]
    frame = pd.DataFrame(rows, columns=columns).assign(similarity=0.0)
    return frame[["image_id", "instance_id", "candidate", "caption", "similarity", "hallucinated"]]


def test_feedback_vocabulary_of_a_hand_made_table():
    feedback = _feedback()
    assert feedback_by_image(feedback) == {
        "i1": ["a horse running", "a face in the wall"],
        "i2": ["a horse running", "text on a sign"],
        "i3": ["a face in the wall", "a bird"],
    }
    # per-image counts: horse 2, face 2, sign 1, bird 1; ties alphabetical
    assert feedback_vocabulary(feedback) == [
        "a face in the wall",
        "a horse running",
        "a bird",
        "text on a sign",
    ]
    assert feedback_vocabulary(feedback, max_terms=1) == ["a face in the wall"]
    assert feedback_vocabulary(feedback, min_images=2) == ["a face in the wall", "a horse running"]
    assert feedback_vocabulary(feedback, max_terms=0) == []
    assert vocabulary_negative_prompt(feedback, SEESR_NEGATIVE_PROMPT, max_terms=2) == (
        "a face in the wall, a horse running, dotted, noise, blur, lowres, smooth"
    )
    assert vocabulary_negative_prompt(feedback.iloc[:0], "lowres") == "lowres"  # no feedback
    # the preference-pairs form (negative_prompt joined with ", ") gives the same vocabulary
    pairs = pd.DataFrame(
        {
            "image_id": ["i1", "i1", "i2", "i3", "i4"],
            "negative_prompt": [
                "a horse running, a face in the wall",
                "a horse running",
                "a horse running, text on a sign",
                "a bird, a face in the wall",
                "",
            ],
        }
    )
    assert feedback_vocabulary(pairs) == feedback_vocabulary(feedback)
    with pytest.raises(PromptsError, match="feedback table"):
        feedback_by_image(pd.DataFrame({"image_id": ["i1"]}))


def test_feedback_per_image_and_on_a_prompts_table():
    assert image_negative_prompt("lowres, blur", ["a horse running", "lowres"]) == (
        "a horse running, lowres, blur"
    )
    table = pd.DataFrame(
        {
            "image_id": ["i1", "i4"],
            "prompt": ["p", "p"],
            "negative_prompt": ["lowres", "lowres"],
            "source": ["fixed"] * 2,
            "model": ["none"] * 2,
        }
    )
    per_image = apply_feedback(table, _feedback(), "image")
    assert per_image["negative_prompt"].tolist() == [
        "a horse running, a face in the wall, lowres",
        "lowres",
    ]
    vocabulary = apply_feedback(table, _feedback(), "vocabulary", max_terms=1)
    assert vocabulary["negative_prompt"].tolist() == ["a face in the wall, lowres"] * 2
    assert table["negative_prompt"].tolist() == ["lowres", "lowres"]  # input unchanged


def test_cli_applies_feedback_to_a_test_set(data_folder, tmp_path):
    captions = tmp_path / "captions.parquet"
    write_table(_feedback(), captions, "captions")
    out = tmp_path / "synthetic.parquet"
    argv = ["--images", str(data_folder), "--kind", "synthetic", "--out", str(out)]
    config = '{"negative_prompt": "lowres", "feedback_max_terms": 2}'
    assert prompts.main([*argv, "--config", config, "--feedback", str(captions)]) == 0
    negatives = {negative for _, negative in load_prompts(out).values()}
    assert negatives == {"a face in the wall, a horse running, lowres"}
    assert read_metadata(out)["feedback"] == {"table": str(captions), "mode": "vocabulary"}
    # the consumer's one call: base prompts + feedback applied on reading
    plain = tmp_path / "plain.parquet"
    assert prompts.main([*argv[:-1], str(plain), "--config", '{"negative_prompt": "lowres"}']) == 0
    loaded = load_prompts(plain, IDS, feedback=captions, max_terms=2)
    assert loaded == load_prompts(out)
    own = load_prompts(plain, feedback=_feedback(), mode="image")
    assert own["img_a"][1] == "lowres"  # no feedback for this image
