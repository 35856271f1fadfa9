"""The degrade stage on a tiny folder: ids, splits, crops, odd inputs, table, reruns."""

import json

import numpy as np
import pytest
from PIL import Image

from pipeline import degrade
from pipeline.io.images import ImageError, read_rgb
from pipeline.io.tables import read_metadata, read_table, schema_for

CROP = 16


def _photo(height, width, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC))


@pytest.fixture
def source(tmp_path):
    """RGB, JPEG, grayscale, RGBA, 16-bit and too-small images, some in a subfolder."""
    folder = tmp_path / "hq"
    (folder / "sub dir").mkdir(parents=True)
    Image.fromarray(_photo(24, 28, 0)).save(folder / "sub dir" / "rgb.png")
    Image.fromarray(_photo(20, 20, 1)).save(folder / "photo.jpg", quality=95)
    Image.fromarray(_photo(20, 24, 2)[:, :, 0]).save(folder / "gray.png")
    rgba = np.dstack([_photo(20, 20, 3), np.full((20, 20), 128, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(folder / "alpha.png")
    Image.fromarray((_photo(18, 18, 4)[:, :, 1].astype(np.int32) * 257), mode="I").convert(
        "I;16"
    ).save(folder / "deep16.png")
    Image.fromarray(_photo(10, 12, 5)).save(folder / "tiny.png")
    return folder


def _config(folder, **overrides):
    return {
        "source": str(folder),
        "crop_size": CROP,
        "test_ids": ["photo"],
        "hflip": True,
        **overrides,
    }


def _tree_bytes(folder):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_image_ids_are_stable_safe_and_unique(source):
    ids = [image.image_id for image in degrade.find_source_images(str(source))]
    assert ids == ["alpha", "deep16", "gray", "photo", "sub_dir__rgb", "tiny"]
    assert degrade.image_id_for("a/b c/d.e.png") == "a__b_c__d.e"
    Image.fromarray(_photo(20, 20, 6)).save(source / "photo.png")
    with pytest.raises(ValueError, match=r"photo.*photo\.jpg.*photo\.png"):
        degrade.find_source_images(str(source))


def test_split_by_hash_and_by_list():
    ids = [f"img{i:04d}" for i in range(2000)]
    test_share = np.mean([degrade.assign_split(i, 0.1) == "test" for i in ids])
    assert 0.08 < test_share < 0.12
    assert [degrade.assign_split(i, 0.1) for i in ids] == [
        degrade.assign_split(i, 0.1) for i in ids
    ]
    assert all(degrade.assign_split(i, 0.0) == "train" for i in ids[:50])
    assert all(degrade.assign_split(i, 1.0) == "test" for i in ids[:50])
    assert degrade.assign_split("img0001", 1.0, ["img0002"]) == "train"
    assert degrade.assign_split("img0002", 0.0, ["img0002"]) == "test"


def test_train_split_writes_pairs_and_table(source, tmp_path):
    out = tmp_path / "train"
    frame = degrade.degrade_split("train", out, _config(source, crops_per_image=2), seed=3)
    table = read_table(out / "pairs.parquet", "degradation_pairs")
    assert list(table.columns) == schema_for("degradation_pairs").names
    assert len(table) == len(frame) == 10  # 5 train images × 2 crops; photo is the test image
    assert set(table["split"]) == {"train"}
    assert "photo" not in set(table["source_id"])
    assert table["image_id"].is_unique and "sub_dir__rgb__crop1" in set(table["image_id"])
    for row in table.itertuples():
        hq = read_rgb(out / row.hq_path)
        lq = read_rgb(out / row.lq_path)
        assert hq.shape == lq.shape == (CROP, CROP, 3)  # resize_back: LQ at HQ size
        assert 0 <= row.crop_top <= max(0, row.source_height - CROP)
        assert 0 <= row.crop_left <= max(0, row.source_width - CROP)
    tiny = table[table["source_id"] == "tiny"]
    assert tiny["padded"].all() and not table[table["source_id"] != "tiny"]["padded"].any()
    assert (table["seed"] > 0).all() and table["noise1_seed"].notna().all()
    assert set(table.loc[~table["blur2_applied"], "kernel2_type"].dropna()) == set()
    metadata = read_metadata(out / "pairs.parquet")
    assert metadata["config"]["crop_size"] == CROP and metadata["seed"] == 3
    assert metadata["config"]["degradation"]["second_blur_prob"] == 0.8


def test_hq_crops_are_the_decoded_source_pixels(source, tmp_path):
    out = tmp_path / "train"
    table = degrade.degrade_split("train", out, _config(source, hflip=False), seed=0)
    for source_id, file in [("gray", "gray.png"), ("alpha", "alpha.png"), ("deep16", "deep16.png")]:
        row = table[table["source_id"] == source_id].iloc[0]
        full = read_rgb(source / file)
        top, left = row["crop_top"], row["crop_left"]
        crop = full[top : top + CROP, left : left + CROP]
        np.testing.assert_array_equal(read_rgb(out / row["hq_path"]), crop)
    gray_hq = read_rgb(out / "hq" / "gray.png")
    np.testing.assert_array_equal(gray_hq[..., 0], gray_hq[..., 2])
    # RGBA with alpha 128 is composited over white: brighter than the RGB channels alone
    alpha_hq = read_rgb(out / "hq" / "alpha.png").astype(int)
    assert alpha_hq.min() >= 127


def test_rerun_is_byte_identical_and_split_is_the_test_list(source, tmp_path):
    config = _config(source, crops_per_image=2)
    degrade.degrade_split("train", tmp_path / "a", config, seed=5)
    degrade.degrade_split("train", tmp_path / "b", config, seed=5)
    assert _tree_bytes(tmp_path / "a") == _tree_bytes(tmp_path / "b")
    degrade.degrade_split("train", tmp_path / "c", config, seed=6)
    assert (
        _tree_bytes(tmp_path / "a")["lq/alpha__crop0.png"]
        != _tree_bytes(tmp_path / "c")["lq/alpha__crop0.png"]
    )
    test = degrade.degrade_split("test", tmp_path / "t", config, seed=5)
    assert list(test["image_id"]) == ["photo"] and not test["hflip"].any()  # one crop, no flip


def test_workers_give_identical_results(source, tmp_path):
    config = _config(source)
    degrade.degrade_split("train", tmp_path / "one", config, seed=1)
    degrade.degrade_split("train", tmp_path / "two", dict(config, workers=2), seed=1)
    # every file, the table included, is byte-identical: workers is not part of the output
    assert _tree_bytes(tmp_path / "one") == _tree_bytes(tmp_path / "two")


def test_small_images_error_or_skip(source, tmp_path):
    with pytest.raises(ValueError, match=r"tiny\.png.*12x10.*crop_size 16"):
        degrade.degrade_split("train", tmp_path / "e", _config(source, small_image="error"), seed=0)
    assert not (tmp_path / "e").exists()  # nothing half-written
    table = degrade.degrade_split(
        "train", tmp_path / "s", _config(source, small_image="skip"), seed=0
    )
    assert "tiny" not in set(table["source_id"]) and len(table) == 4
    skipped = read_metadata(tmp_path / "s" / "pairs.parquet")["skipped_small_images"]
    assert [p.split("/")[-1] for p in skipped] == ["tiny.png"]


def test_corrupt_file_is_named(source, tmp_path):
    (source / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ImageError, match=r"broken\.png"):
        degrade.degrade_split("train", tmp_path / "x", _config(source), seed=0)


def test_thin_images_are_refused_with_their_size(source, tmp_path):
    # 40 wide, 1 high: padding would fill the crop with copies of one row
    Image.fromarray(_photo(4, 40, 7)[:1]).save(source / "thin.png")
    with pytest.raises(ImageError, match=r"thin\.png: image 40x1 is smaller than 9 pixels"):
        degrade.degrade_split("train", tmp_path / "x", _config(source), seed=0)
    assert not (tmp_path / "x").exists()
    # the 12x10 image mirrors once into the 16 crop: still padded, as before
    (source / "thin.png").unlink()
    table = degrade.degrade_split("train", tmp_path / "p", _config(source), seed=0)
    assert table.loc[table["source_id"] == "tiny", "padded"].all()


def test_every_bad_source_file_is_listed_at_once(source, tmp_path):
    Image.fromarray(_photo(4, 40, 7)[:1]).save(source / "thin.png")
    (source / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    pages = [Image.fromarray(_photo(20, 20, seed)) for seed in (8, 9)]
    pages[0].save(source / "pages.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(ImageError) as raised:
        degrade.degrade_split("train", tmp_path / "x", _config(source), seed=0)
    message = str(raised.value)
    assert message.startswith("3 of 8 source images cannot be used")
    assert "broken.png" in message and "pages.tif" in message and "thin.png: image 40x1" in message
    # files whose header reads but whose pixels are cut off fail when decoded: all named too
    for name in ("thin.png", "broken.png", "pages.tif"):
        (source / name).unlink()
    data = (source / "gray.png").read_bytes()
    for index in range(25):
        (source / f"cut{index:02d}.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as raised:
        degrade.degrade_split("train", tmp_path / "x", _config(source, crops_per_image=2), seed=0)
    lines = str(raised.value).splitlines()
    assert lines[0] == "25 source images cannot be decoded:"
    assert [line.split("/")[-1][:5] for line in lines[1:21]] == [f"cut{i:02d}" for i in range(20)]
    assert lines[21:] == ["... and 5 more"]
    assert not (tmp_path / "x").exists()


def test_replay_rebuilds_every_lq_from_the_table(source, tmp_path):
    out = tmp_path / "train"
    degrade.degrade_split("train", out, _config(source, crops_per_image=3), seed=4)
    table = read_table(out / "pairs.parquet", "degradation_pairs")
    # both kinds of rows, so final_sinc_size comes back from Parquet as floats with NaN
    assert table["final_sinc_applied"].nunique() == 2
    metadata = read_metadata(out / "pairs.parquet")
    for _, row in table.iterrows():
        lq = degrade.rebuild_lq(out, row, metadata)
        degrade.write_png(tmp_path / "replayed.png", lq)
        assert (tmp_path / "replayed.png").read_bytes() == (out / row["lq_path"]).read_bytes()


def test_pairs_table_records_the_source_manifest(source, tmp_path):
    degrade.degrade_split("train", tmp_path / "t", _config(source), seed=0)
    manifest = read_metadata(tmp_path / "t" / "pairs.parquet")["source_manifest"]
    assert manifest == degrade.source_manifest(str(source), [])
    assert manifest.startswith("6 images, sha256 ")


def test_config_errors_name_the_key(source, tmp_path):
    with pytest.raises(KeyError, match="crop_sise"):
        degrade.stage_config({"crop_sise": 16})
    with pytest.raises(ValueError, match="crop_size"):
        degrade.stage_config({"crop_size": 18})  # not a multiple of scale 4
    with pytest.raises(ValueError, match="test_ids.*nope"):
        degrade.degrade_split("test", tmp_path / "x", _config(source, test_ids=["nope"]), seed=0)


def test_cli_without_resize_back(source, tmp_path):
    config = _config(source, degradation={"resize_back": False})
    code = degrade.main(
        [
            "--split",
            "test",
            "--out",
            str(tmp_path / "cli"),
            "--config",
            json.dumps(config),
            "--seed",
            "2",
        ]
    )
    assert code == 0
    table = read_table(tmp_path / "cli" / "pairs.parquet", "degradation_pairs")
    assert list(table["image_id"]) == ["photo"]
    assert table["resize_back_mode"].isna().all()
    assert read_rgb(tmp_path / "cli" / "lq" / "photo.png").shape == (CROP // 4, CROP // 4, 3)


def test_demo_source_is_bundled_colour_photos():
    images = degrade.find_source_images("demo")
    assert [image.image_id for image in images][:3] == ["astronaut", "chelsea", "coffee"]
    assert all(image.path.is_file() for image in images)


def test_test_split_takes_test_crops_per_image_without_flips(source, tmp_path):
    config = _config(source, crops_per_image=2, test_crops_per_image=3)
    test = degrade.degrade_split("test", tmp_path / "test", config, seed=5)
    train = degrade.degrade_split("train", tmp_path / "train", config, seed=5)
    assert list(test["image_id"]) == [f"photo__crop{i}" for i in range(3)]
    assert not test["hflip"].any() and set(test["source_id"]) == {"photo"}
    assert not set(test["source_id"]) & set(train["source_id"])  # no image in both splits
    assert test["seed"].is_unique
    assert len(train) == 10  # crops_per_image still rules the train split
    degrade.degrade_split("test", tmp_path / "again", config, seed=5)
    assert _tree_bytes(tmp_path / "test") == _tree_bytes(tmp_path / "again")
    # the default (1) keeps the single test crop named by its image id
    single = degrade.degrade_split("test", tmp_path / "one", _config(source), seed=5)
    assert list(single["image_id"]) == ["photo"]
