"""Segment stage: partition invariants, Zarr round trip, the real SAM path on a tiny SAM."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from pipeline import segment
from pipeline.io.images import write_png
from pipeline.io.masks import (
    instance_masks,
    list_image_ids,
    read_label_map,
    read_label_map_attrs,
    read_store_attrs,
    write_label_maps,
)
from pipeline.io.tables import SCHEMAS, read_metadata, read_table, write_table
from pipeline.replicas import TINY_SAM
from pipeline.segment import masks_to_partition
from tests.data_helpers import write_data_table

# thresholds at zero so an untrained SAM still returns masks
PERMISSIVE_GENERATOR = {
    "points_per_side": 4,
    "points_per_batch": 8,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
    "box_nms_thresh": 0.99,
}


def rect(shape, top, left, bottom, right):
    mask = np.zeros(shape, dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def record(mask, iou):
    return {"segmentation": mask, "area": int(mask.sum()), "predicted_iou": iou}


def assert_partition(partition, shape):
    label_map = partition.label_map
    assert label_map.dtype == np.uint16 and label_map.shape == shape
    ids = [row["instance_id"] for row in partition.instances]
    masks = instance_masks(label_map, ids)
    # every pixel in exactly one listed instance
    np.testing.assert_array_equal(masks.sum(axis=0), np.ones(shape))
    assert sum(row["area"] for row in partition.instances) == shape[0] * shape[1]
    assert sum(row["weight"] for row in partition.instances) == pytest.approx(1.0)
    for row, mask in zip(partition.instances, masks, strict=True):
        assert row["area"] == mask.sum()
        assert row["weight"] == pytest.approx(mask.sum() / mask.size)


def test_overlap_goes_to_higher_iou_then_smaller_area():
    shape = (10, 10)
    low = record(rect(shape, 0, 0, 6, 6), 0.5)
    high = record(rect(shape, 3, 3, 10, 10), 0.9)
    partition = masks_to_partition([low, high], shape, top_k=5)
    assert_partition(partition, shape)
    by_area = {row["area"]: row for row in partition.instances}
    # high keeps all 49 pixels, low loses the 3x3 overlap: 36 - 9 = 27, remainder 100 - 76
    assert sorted(by_area) == [24, 27, 49]
    high_id, low_id = by_area[49]["instance_id"], by_area[27]["instance_id"]
    assert partition.label_map[4, 4] == high_id
    assert partition.label_map[0, 0] == low_id
    assert by_area[49]["score"] == pytest.approx(0.9)
    assert (by_area[49]["bbox_x"], by_area[49]["bbox_y"], by_area[49]["bbox_w"]) == (3, 3, 7)

    # equal predicted IoU: the smaller mask takes the overlap
    big = record(rect(shape, 0, 0, 10, 10), 0.8)
    small = record(rect(shape, 2, 2, 4, 4), 0.8)
    tie = masks_to_partition([big, small], shape)
    assert_partition(tie, shape)
    small_id = next(row["instance_id"] for row in tie.instances if row["area"] == 4)
    assert (tie.label_map[2:4, 2:4] == small_id).all()
    assert tie.remainder_id is None  # full coverage: no remainder instance


def test_remainder_and_top_k_folding():
    shape = (12, 12)
    records = [
        record(rect(shape, 0, 0, 6, 6), 0.9),  # 36
        record(rect(shape, 6, 0, 12, 4), 0.9),  # 24
        record(rect(shape, 0, 6, 3, 12), 0.9),  # 18
        record(rect(shape, 6, 6, 8, 8), 0.9),  # 4
        record(rect(shape, 10, 10, 11, 11), 0.9),  # 1
    ]
    partition = masks_to_partition(records, shape, top_k=3)
    assert_partition(partition, shape)
    kept = [row for row in partition.instances if not row["is_remainder"]]
    assert [row["area"] for row in kept] == [36, 24, 18]
    assert [row["instance_id"] for row in kept] == [1, 2, 3]
    remainder = [row for row in partition.instances if row["is_remainder"]]
    assert len(remainder) == 1 and remainder[0]["instance_id"] == 0
    assert remainder[0]["area"] == 144 - 36 - 24 - 18
    assert np.isnan(remainder[0]["score"])
    # the folded 2x2 and 1x1 masks now belong to the remainder
    assert partition.label_map[6, 6] == 0 and partition.label_map[10, 10] == 0
    assert remainder[0]["weight"] == pytest.approx(66 / 144)

    everything = masks_to_partition(records, shape, top_k=None)
    assert_partition(everything, shape)
    assert len(everything.instances) == 6


def test_empty_and_swallowed_masks_vanish():
    shape = (8, 8)
    empty = record(np.zeros(shape, dtype=bool), 0.99)
    inner = record(rect(shape, 2, 2, 4, 4), 0.1)  # fully covered by a better mask
    outer = record(rect(shape, 0, 0, 8, 8), 0.9)
    partition = masks_to_partition([empty, inner, outer], shape)
    assert_partition(partition, shape)
    assert [row["area"] for row in partition.instances] == [64]
    no_masks = masks_to_partition([], shape)
    assert_partition(no_masks, shape)
    assert no_masks.instances[0]["is_remainder"]


def test_mask_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="record 0 has shape"):
        masks_to_partition([record(np.ones((3, 3), bool), 0.5)], (4, 4))


def test_zarr_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    maps = {
        "img_a": rng.integers(0, 6, size=(300, 270)).astype(np.uint16),
        "img_b": np.zeros((17, 9), dtype=np.uint16),
    }
    store = tmp_path / "masks" / "onestep.zarr"
    write_label_maps(store, maps, {"backend": "classical", "generator": {"scale": np.float64(2)}})
    assert list_image_ids(store) == ["img_a", "img_b"]
    for image_id, label_map in maps.items():
        loaded = read_label_map(store, image_id)
        assert loaded.dtype == np.uint16
        np.testing.assert_array_equal(loaded, label_map)
    attrs = read_store_attrs(store)
    assert attrs["backend"] == "classical" and attrs["generator"] == {"scale": 2.0}
    assert attrs["format"] == "dspo-label-maps/1"
    b_attrs = read_label_map_attrs(store, "img_b")
    assert b_attrs["instance_ids"] == [0] and b_attrs["weights"] == [1.0]
    with pytest.raises(KeyError, match="no label map for image 'img_c'"):
        read_label_map(store, "img_c")
    # rewriting replaces the store as a whole and leaves no temporary behind
    write_label_maps(store, {"img_c": np.ones((4, 4), np.uint16)}, {"backend": "sam"})
    assert list_image_ids(store) == ["img_c"]
    assert sorted(p.name for p in store.parent.iterdir()) == ["onestep.zarr"]


def test_zarr_write_failure_keeps_old_store(tmp_path):
    store = tmp_path / "m.zarr"
    write_label_maps(store, {"a": np.ones((4, 4), np.uint16)}, {})
    with pytest.raises(ValueError, match="cannot name a Zarr array"):
        write_label_maps(store, {"ok": np.ones((2, 2)), "bad/id": np.ones((2, 2))}, {})
    assert list_image_ids(store) == ["a"]
    with pytest.raises(ValueError, match="outside uint16"):
        write_label_maps(store, {"a": np.full((2, 2), 70000)}, {})


def test_classical_backend_records_and_stage(tmp_path):
    rng = np.random.default_rng(1)
    images = tmp_path / "hq"
    image = np.zeros((32, 48, 3), dtype=np.uint8)
    image[:, 24:] = (200, 40, 40)
    image[8:20, 4:16] = (30, 180, 60)
    image = np.clip(image + rng.integers(0, 8, image.shape), 0, 255).astype(np.uint8)
    write_png(images / "scene.png", image)
    write_png(images / "flat.png", np.full((20, 20, 3), 90, np.uint8))
    write_data_table(tmp_path, ["scene", "flat"])
    config = {"top_k": 2, "classical": {"method": "slic", "slic": {"n_segments": 6}}}
    zarr_path, table_path = tmp_path / "masks.zarr", tmp_path / "inst" / "instances.parquet"
    code = segment.main(
        ["--data", str(tmp_path), "--out-zarr", str(zarr_path), "--out-table", str(table_path)]
        + ["--config", json.dumps(config), "--seed", "3"]
    )
    assert code == 0
    table = read_table(table_path, "instances")
    metadata = read_metadata(table_path)
    assert metadata["backend"] == "classical" and metadata["sam_used"] is False
    assert metadata["source"] == "hq" and metadata["images"] == str(images)
    assert list(dict.fromkeys(table["image_id"])) == ["flat", "scene"]  # in file order
    assert read_label_map_attrs(zarr_path, "scene")["source_image"] == str(images / "scene.png")
    assert metadata["seed"] == 3 and metadata["generator"]["method"] == "slic"
    assert read_store_attrs(zarr_path)["sam_used"] is False
    for image_id, rows in table.groupby("image_id"):
        label_map = read_label_map(zarr_path, image_id)
        assert rows["weight"].sum() == pytest.approx(1.0)
        assert (rows["is_remainder"] == False).sum() <= 2  # noqa: E712
        for row in rows.itertuples():
            mask = label_map == row.instance_id
            assert mask.sum() == row.area
            ys, xs = np.nonzero(mask)
            assert (row.bbox_x, row.bbox_y) == (xs.min(), ys.min())
            assert (row.bbox_w, row.bbox_h) == (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        assert set(np.unique(label_map)) == set(rows["instance_id"])


CLASSICAL = {"top_k": 2, "classical": {"method": "slic", "slic": {"n_segments": 4}}}


def _write_candidates(folder, setting_images):
    """A candidates table in ``folder`` naming ``{setting}/{image_id}.png`` (relative)."""
    rows = []
    for (setting, image_id), image in setting_images.items():
        write_png(folder / setting / f"{image_id}.png", image)
        rows.append((image_id, setting, "v", 1, 1.0, 0, "", f"{setting}/{image_id}.png"))
    table = folder / "candidates.parquet"
    write_table(pd.DataFrame(rows, columns=SCHEMAS["candidates"].names), table, "candidates")
    return table


def test_candidate_source_segments_one_setting_found_beside_the_table(
    tmp_path, tmp_path_factory, monkeypatch
):
    rng = np.random.default_rng(4)
    images = {
        (setting, image_id): rng.integers(0, 255, (16, 20, 3)).astype(np.uint8)
        for setting in ("cfg6", "rank16")
        for image_id in ("i1", "i0")
    }
    table = _write_candidates(tmp_path / "cand", images)
    # the working directory holds same-named images of other content
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    for setting, image_id in images:
        write_png(elsewhere / setting / f"{image_id}.png", np.zeros((8, 8, 3), np.uint8))
    monkeypatch.chdir(elsewhere)
    zarr_path, table_path = tmp_path / "masks.zarr", tmp_path / "instances.parquet"
    config = {**CLASSICAL, "source": "rank16"}
    argv = ["--candidates", str(table), "--setting", "rank16", "--out-zarr", str(zarr_path)]
    argv += ["--out-table", str(table_path), "--config", json.dumps(config)]
    assert segment.main(argv) == 0
    assert list_image_ids(zarr_path) == ["i0", "i1"]
    metadata = read_metadata(table_path)
    assert metadata["source"] == "rank16"
    assert metadata["images"] == str(tmp_path / "cand" / "rank16")
    segmenter = segment.build_segmenter(CLASSICAL)
    for image_id in ("i0", "i1"):
        attrs = read_label_map_attrs(zarr_path, image_id)
        assert attrs["source_image"] == str(tmp_path / "cand" / "rank16" / f"{image_id}.png")
        records = segment.generate_mask_records(images[("rank16", image_id)], segmenter)
        expected = masks_to_partition(records, (16, 20), CLASSICAL["top_k"]).label_map
        np.testing.assert_array_equal(read_label_map(zarr_path, image_id), expected)


def test_the_command_line_names_one_frame_matching_the_source(tmp_path):
    table = _write_candidates(tmp_path, {("cfg6", "i0"): np.zeros((8, 8, 3), np.uint8)})
    outputs = ["--out-zarr", str(tmp_path / "m.zarr"), "--out-table", str(tmp_path / "i.parquet")]
    for frame in (
        [],
        ["--data", str(tmp_path), "--candidates", str(table), "--setting", "cfg6"],
        ["--candidates", str(table)],
        ["--data", str(tmp_path), "--setting", "cfg6"],
    ):
        with pytest.raises(SystemExit):
            segment.main(frame + outputs)
    argv = ["--candidates", str(table), "--setting", "cfg6", *outputs]
    with pytest.raises(ValueError, match="segment.source is 'hq'"):
        segment.main(argv)
    with pytest.raises(ValueError, match="no candidate of setting 'rank16'.*cfg6"):
        segment.main([*argv[:3], "rank16", *outputs, "--config", '{"source": "rank16"}'])


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "sam_vit_h.pth"
    with pytest.raises(FileNotFoundError, match=f"SAM checkpoint not found: {missing}"):
        segment.build_segmenter({"checkpoint": str(missing)})
    with pytest.raises(KeyError, match="points_per_sid"):
        segment.resolve_config({"generator": {"points_per_sid": 3}})


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_real_sam_generator_on_tiny_sam(tmp_path, suffix):
    torch.manual_seed(0)
    sam = segment.build_sam({**segment.SAM_ARCHITECTURES["vit_b"], **TINY_SAM})
    checkpoint = tmp_path / f"tiny_sam{suffix}"
    if suffix == ".safetensors":
        save_file(sam.state_dict(), str(checkpoint))
    else:
        torch.save(sam.state_dict(), checkpoint)
    config = {
        "checkpoint": str(checkpoint),
        "model_type": "vit_b",
        "architecture": TINY_SAM,
        "device": "cpu",
        "generator": PERMISSIVE_GENERATOR,
        "top_k": 3,
    }
    segmenter = segment.build_segmenter(config)
    assert segmenter.info["backend"] == "sam" and segmenter.info["sam_used"]
    assert segmenter.info["generator"]["pred_iou_thresh"] == 0.0
    assert segmenter.info["generator"]["crop_nms_thresh"] == 0.7  # SAM default filled in
    image = (np.random.default_rng(2).random((24, 40, 3)) * 255).astype(np.uint8)
    records = segment.generate_mask_records(image, segmenter)
    assert records, "the permissive thresholds should let the tiny SAM return masks"
    for rec in records:
        assert rec["segmentation"].shape == (24, 40) and rec["segmentation"].dtype == bool
        assert {"area", "bbox", "predicted_iou", "stability_score"} <= set(rec)
    partition = masks_to_partition(records, (24, 40), top_k=3)
    assert_partition(partition, (24, 40))

    # the loaded weights are the saved ones (not a fresh initialisation)
    loaded = segment.load_sam(checkpoint, "vit_b", TINY_SAM)
    for name, tensor in sam.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)


def test_checkpoint_architecture_mismatch_is_reported(tmp_path):
    torch.manual_seed(0)
    sam = segment.build_sam({**segment.SAM_ARCHITECTURES["vit_b"], **TINY_SAM})
    checkpoint = tmp_path / "tiny.safetensors"
    save_file(sam.state_dict(), str(checkpoint))
    with pytest.raises(ValueError, match="does not match model_type 'vit_b'"):
        segment.load_sam(checkpoint, "vit_b", {**TINY_SAM, "encoder_embed_dim": 32})
