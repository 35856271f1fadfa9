"""The `evaluate` stage: test set discovery, inference + metrics, reproducibility."""

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from pipeline import evaluate
from pipeline.io import testsets
from pipeline.io.images import read_rgb, write_png
from pipeline.io.tables import read_metadata, read_table, schema_for, write_table

METRICS = ["psnr", "ssim"]


def _blank(field: pa.Field):
    if pa.types.is_string(field.type):
        return ""
    if pa.types.is_boolean(field.type):
        return False
    if pa.types.is_floating(field.type):
        return 0.0
    return 0


def make_synthetic_set(root: Path, ids=("img_a", "img_b"), size=32, scale=4) -> Path:
    """A degraded data folder as the `degrade` stage writes it (smooth random images)."""
    rng = np.random.default_rng(0)
    rows = []
    for image_id in ids:
        coarse = rng.uniform(0, 255, size=(size // 4, size // 4, 3))
        hq = np.kron(coarse, np.ones((4, 4, 1))) + rng.normal(0, 8, size=(size, size, 3))
        hq = np.clip(hq, 0, 255).astype(np.uint8)
        lq = hq.reshape(size // scale, scale, size // scale, scale, 3).mean(axis=(1, 3))
        write_png(root / "hq" / f"{image_id}.png", hq)
        write_png(root / "lq" / f"{image_id}.png", lq.round().astype(np.uint8))
        row = {field.name: _blank(field) for field in schema_for("degradation_pairs")}
        rows.append(
            {
                **row,
                "image_id": image_id,
                "split": "test",
                "scale": scale,
                "hq_path": f"hq/{image_id}.png",
                "lq_path": f"lq/{image_id}.png",
            }
        )
    write_table(pd.DataFrame(rows), root / "pairs.parquet", "degradation_pairs")
    return root


def touch_png(path: Path, size: int = 8) -> None:
    write_png(path, np.full((size, size, 3), 128, np.uint8))


# ------------------------------------------------------------------------ paired test sets


def test_paired_layouts_match_names_after_stripping_suffixes(tmp_path):
    for name in ("Canon_001_LR4", "0801x4", "dreal_7_x4"):
        touch_png(tmp_path / "test_LR" / f"{name}.png", 4)
    for name in ("Canon_001_HR", "0801", "dreal_7_x1"):
        touch_png(tmp_path / "test_HR" / f"{name}.png", 16)
    images = testsets.load_testset("paired", tmp_path)
    assert [image.image_id for image in images] == ["0801", "Canon_001", "dreal_7"]
    assert images[1].lq.name == "Canon_001_LR4.png"
    assert images[1].hq.name == "Canon_001_HR.png"


def test_lr_hr_layout_preferred_and_flat_realsr_v3_folder(tmp_path):
    touch_png(tmp_path / "a" / "LR" / "x.png", 4)
    touch_png(tmp_path / "a" / "HR" / "x.png", 16)
    assert testsets.find_paired_folders(tmp_path / "a") == (
        tmp_path / "a" / "LR",
        tmp_path / "a" / "HR",
    )
    flat = tmp_path / "Canon" / "Test" / "4"
    touch_png(flat / "Canon_001_LR4.png", 4)
    touch_png(flat / "Canon_001_HR.png", 16)
    images = testsets.load_paired(tmp_path / "Canon")
    assert [(i.image_id, i.lq.name, i.hq.name) for i in images] == [
        ("Test__4__Canon_001", "Canon_001_LR4.png", "Canon_001_HR.png")
    ]


def test_unmatched_names_are_listed(tmp_path):
    touch_png(tmp_path / "LR" / "one_LR4.png", 4)
    touch_png(tmp_path / "LR" / "lonely_LR4.png", 4)
    touch_png(tmp_path / "HR" / "one_HR.png", 16)
    touch_png(tmp_path / "HR" / "orphan_HR.png", 16)
    with pytest.raises(ValueError, match="LQ without HQ") as error:
        testsets.load_testset("paired", tmp_path)
    assert "lonely_LR4.png" in str(error.value)
    assert "orphan_HR.png" in str(error.value)
    assert "one_" not in str(error.value)


def test_missing_layout_is_a_clear_error(tmp_path):
    touch_png(tmp_path / "images" / "x.png")
    with pytest.raises(FileNotFoundError, match="no LQ/HQ folders found"):
        testsets.find_paired_folders(tmp_path)


def test_synthetic_set_lists_pairs_table_and_checks_files(tmp_path):
    root = make_synthetic_set(tmp_path / "test")
    assert [i.image_id for i in testsets.load_testset("synthetic", root)] == ["img_a", "img_b"]
    (root / "lq" / "img_b.png").unlink()
    with pytest.raises(FileNotFoundError, match="img_b.png"):
        testsets.load_testset("synthetic", root)


def test_unknown_config_key_is_refused():
    with pytest.raises(KeyError, match="stepz"):
        evaluate.stage_config({"stepz": 3})


# ------------------------------------------------------------------------ the stage


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from pipeline.models import build_tiny_model

    folder = tmp_path_factory.mktemp("model") / "pretrained"
    build_tiny_model("multistep", block_out_channels=(8, 16)).save_pretrained(folder)
    return folder


def test_evaluate_tiny_model_writes_images_and_metrics_byte_identically(tmp_path, tiny_model_dir):
    data = make_synthetic_set(tmp_path / "data" / "test")
    config = {"metrics": METRICS, "steps": 2, "cfg": 2.0, "batch_size": 2, "device": "cpu"}
    outputs = []
    for run in ("first", "second"):
        out = tmp_path / run / "synthetic" / "pretrained"
        table = evaluate.evaluate(
            str(tiny_model_dir), "pretrained", "synthetic", "synthetic", data, out, config, seed=3
        )
        outputs.append(out)
    first, second = outputs
    assert sorted(p.name for p in (first / "images").iterdir()) == ["img_a.png", "img_b.png"]
    assert read_rgb(first / "images" / "img_a.png").shape == (32, 32, 3)
    stored = read_table(first / "metrics.parquet", "eval_metrics")
    pd.testing.assert_frame_equal(stored, table)
    assert len(stored) == 2 * len(METRICS)
    assert set(stored["metric"]) == set(METRICS)
    assert not stored["lower_better"].any()
    assert np.isfinite(stored["value"]).all()
    metadata = read_metadata(first / "metrics.parquet")
    assert metadata["model_describe"]["framework"] == "multistep"
    assert metadata["metrics"]["psnr"]["pyiqa_id"] == "psnr"
    assert metadata["stand_ins"]["dspo_metrics_not_measured"] == [
        "lpips",
        "dists",
        "niqe",
        "musiq",
        "maniqa",
        "clipiqa",
    ]
    assert "tiny-random" in metadata["stand_ins"]["model_weights"]
    for relative in ("images/img_a.png", "images/img_b.png", "metrics.parquet"):
        assert (first / relative).read_bytes() == (second / relative).read_bytes()
    # another seed gives other samples: the generator is really used
    other = evaluate.evaluate(
        str(tiny_model_dir),
        "pretrained",
        "synthetic",
        "synthetic",
        data,
        tmp_path / "other",
        config,
        seed=4,
    )
    assert not np.allclose(other["value"], table["value"])


def test_bicubic_psnr_equals_pyiqa_on_bicubic_upsampling(tmp_path):
    import pyiqa

    data = make_synthetic_set(tmp_path / "data")
    out = tmp_path / "eval" / "bicubic"
    assert (
        evaluate.main(
            [
                "--model",
                "bicubic",
                "--model-name",
                "bicubic",
                "--testset",
                "syn",
                "--testset-kind",
                "synthetic",
                "--testset-path",
                str(data),
                "--out",
                str(out),
                "--config",
                '{"metrics": ["psnr"]}',
                "--seed",
                "0",
            ]
        )
        == 0
    )
    table = read_table(out / "metrics.parquet", "eval_metrics")
    psnr = pyiqa.create_metric("psnr", test_y_channel=True, color_space="ycbcr")
    for image_id in ("img_a", "img_b"):
        lq = torch.from_numpy(read_rgb(data / "lq" / f"{image_id}.png")).permute(2, 0, 1)
        hq = torch.from_numpy(read_rgb(data / "hq" / f"{image_id}.png")).permute(2, 0, 1)
        upsampled = F.interpolate(
            lq[None].float() / 127.5 - 1, size=(32, 32), mode="bicubic", align_corners=False
        ).clamp(-1, 1)
        as_saved = ((upsampled + 1) * 127.5).round() / 255.0
        expected = float(psnr(as_saved, hq[None].float() / 255.0))
        measured = table.loc[table["image_id"] == image_id, "value"].item()
        assert measured == pytest.approx(expected, abs=1e-9)
        saved = read_rgb(out / "images" / f"{image_id}.png")
        np.testing.assert_array_equal(saved, (as_saved[0] * 255).round().byte().permute(1, 2, 0))


def test_lq_larger_than_hq_is_refused(tmp_path):
    touch_png(tmp_path / "LR" / "a.png", 32)
    touch_png(tmp_path / "HR" / "a.png", 16)
    with pytest.raises(ValueError, match="larger than its HQ"):
        evaluate.evaluate(
            "bicubic", "bicubic", "t", "paired", tmp_path, tmp_path / "out", {"metrics": ["psnr"]}
        )
    assert not (tmp_path / "out").exists()


def test_images_below_a_metrics_minimum_are_upscaled_for_it():
    """Whole test images smaller than a metric accepts are upscaled first, as score does with
    small crops (pyiqa's NIQE fails outright on 64 px images); the minimum is recorded."""
    from pipeline.iqa import MetricRegistry, score_images, upscale_to_minimum

    generator = np.random.default_rng(0)
    sr = [generator.integers(0, 256, (16, 24, 3), dtype=np.uint8) for _ in range(2)]
    hq = [generator.integers(0, 256, (16, 24, 3), dtype=np.uint8) for _ in range(2)]
    registry = MetricRegistry(device="cpu", min_crop_size=32)
    measured = evaluate.measure(registry, ["psnr"], sr, hq)

    def unit(arrays):
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255

    big_sr, big_hq = upscale_to_minimum(unit(sr), unit(hq), 32)
    assert tuple(big_sr.shape[-2:]) == (32, 48)
    expected = score_images(["psnr"], big_sr, big_hq, registry)["psnr"].numpy()
    np.testing.assert_array_equal(measured["psnr"], expected)
    assert not np.allclose(expected, score_images(["psnr"], unit(sr), unit(hq), registry)["psnr"])
    assert evaluate.metrics_metadata(registry, ["psnr"])["metrics"]["psnr"]["minimum_size"] == 32
