"""Score stage: the scores table on disk from a tiny candidates/masks/instances set."""

import json
import re

import numpy as np
import pandas as pd
import pyiqa
import pytest
import torch

from pipeline.contracts import WHOLE_IMAGE_ID
from pipeline.io.images import write_png
from pipeline.io.masks import write_label_maps
from pipeline.io.tables import SCHEMAS, read_metadata, read_table, write_table
from pipeline.score import load_unit, main
from tests.data_helpers import write_data_table

SETTINGS = {"s20": 2.0, "s80": 12.0, "c45": 30.0}  # noise sigma in grey levels


@pytest.fixture()
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    candidate_rows, instance_rows, label_maps = [], [], {}
    for image_id in ["a", "b"]:
        hq = rng.integers(40, 216, size=(32, 36, 3)).astype(np.uint8)
        write_png(tmp_path / "hq" / f"{image_id}.png", hq)
        for setting, sigma in SETTINGS.items():
            noisy = np.clip(hq + rng.normal(0, sigma, hq.shape), 0, 255).round().astype(np.uint8)
            path = tmp_path / "candidates" / setting / f"{image_id}.png"
            write_png(path, noisy)
            candidate_rows.append((image_id, setting, "v", 1, 1.0, 0, "", str(path)))
        labels = np.zeros((32, 36), np.uint16)
        labels[4:20, 6:30] = 1
        labels[24:, :] = 2
        label_maps[image_id] = labels
        for instance_id in (0, 1, 2):
            area = int((labels == instance_id).sum())
            instance_rows.append(
                (
                    image_id,
                    instance_id,
                    area,
                    0,
                    0,
                    36,
                    32,
                    area / labels.size,
                    1.0,
                    instance_id == 0,
                )
            )
    write_data_table(tmp_path, ["a", "b"])
    write_label_maps(tmp_path / "masks.zarr", label_maps, {"backend": "test"})
    write_table(
        pd.DataFrame(candidate_rows, columns=SCHEMAS["candidates"].names),
        tmp_path / "candidates.parquet",
        "candidates",
    )
    write_table(
        pd.DataFrame(instance_rows, columns=SCHEMAS["instances"].names),
        tmp_path / "instances.parquet",
        "instances",
    )
    return tmp_path


def run(inputs, metrics):
    out = inputs / "scores" / "test.parquet"
    argv = ["--candidates", str(inputs / "candidates.parquet"), "--data", str(inputs)]
    argv += [
        "--masks",
        str(inputs / "masks.zarr"),
        "--instances",
        str(inputs / "instances.parquet"),
    ]
    argv += ["--out", str(out), "--config", json.dumps({"metrics": metrics, "device": "cpu"})]
    assert main(argv) == 0
    return out


def test_scores_table_schema_rows_and_values(inputs):
    out = run(inputs, ["psnr", "ssim", "gmsd"])
    scores = read_table(out, "scores")
    assert list(scores.columns) == SCHEMAS["scores"].names
    # 2 images x (3 instances + whole image) x 3 candidates x 3 metrics
    assert len(scores) == 2 * 4 * 3 * 3
    assert set(scores["instance_id"]) == {0, 1, 2, WHOLE_IMAGE_ID}
    assert scores.groupby("metric")["lower_better"].first().to_dict() == {
        "gmsd": True,
        "psnr": False,
        "ssim": False,
    }
    psnr = scores[scores["metric"] == "psnr"].set_index(["image_id", "instance_id", "candidate"])[
        "value"
    ]
    for image_id in ["a", "b"]:
        for instance_id in [0, 1, 2, WHOLE_IMAGE_ID]:
            assert (
                psnr[(image_id, instance_id, "s20")]
                > psnr[(image_id, instance_id, "s80")]
                > psnr[(image_id, instance_id, "c45")]
            )
    # the whole-image row is pyiqa's whole-image PSNR
    sr = load_unit(inputs / "candidates" / "s80" / "a.png")[None]
    hq = load_unit(inputs / "hq" / "a.png")[None]
    expected = pyiqa.create_metric("psnr", test_y_channel=True, color_space="ycbcr", device="cpu")(
        sr, hq
    )
    assert psnr[("a", WHOLE_IMAGE_ID, "s80")] == float(expected.double())
    metadata = read_metadata(out)
    assert metadata["metrics"]["psnr"]["method"] == "pooled map"
    assert metadata["metrics"]["gmsd"]["method"] == "masked crop"
    assert metadata["metrics"]["gmsd"]["minimum_crop_size"] >= 32
    assert "lpips" in metadata["stand_ins"]["dspo_metrics_not_scored"]
    assert metadata["stand_ins"]["scored_instead"] == ["gmsd"]


def test_candidate_of_another_size_is_an_error_naming_the_file(inputs):
    bad = inputs / "candidates" / "s80" / "b.png"
    write_png(bad, np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=str(bad)):
        run(inputs, ["psnr"])


def test_unknown_config_key_is_rejected(inputs):
    with pytest.raises(ValueError, match="metricz"):
        main(
            [
                "--candidates",
                "x",
                "--data",
                "x",
                "--masks",
                "x",
                "--instances",
                "x",
                "--out",
                "x",
                "--config",
                '{"metricz": []}',
            ]
        )


def test_load_unit_range(inputs):
    image = load_unit(inputs / "hq" / "a.png")
    assert image.dtype == torch.float32 and image.shape == (3, 32, 36)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0


def test_relative_candidate_paths_are_read_beside_the_table_not_in_the_working_directory(
    inputs, tmp_path_factory, monkeypatch
):
    expected = read_table(run(inputs, ["psnr"]), "scores")
    table = inputs / "candidates.parquet"
    candidates = read_table(table, "candidates")
    candidates["path"] = [
        f"candidates/{row.setting}/{row.image_id}.png" for row in candidates.itertuples()
    ]
    write_table(candidates, table, "candidates")
    # the working directory holds same-named files of other content (and size)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    for row in candidates.itertuples():
        write_png(elsewhere / row.path, np.zeros((8, 8, 3), np.uint8))
    monkeypatch.chdir(elsewhere)
    scores = read_table(run(inputs, ["psnr"]), "scores")
    pd.testing.assert_frame_equal(scores, expected)


def test_hq_missing_from_the_data_table_names_the_image_and_the_folder(inputs):
    write_data_table(inputs, ["a"])
    with pytest.raises(FileNotFoundError, match=rf"'b'.*data folder {re.escape(str(inputs))}"):
        run(inputs, ["psnr"])
