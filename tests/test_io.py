"""Image I/O conversions, table contracts and atomic writes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.io.atomic import atomic_path
from pipeline.io.images import (
    ImageError,
    image_size,
    read_rgb,
    signed_tensor,
    signed_to_uint8,
    write_png,
)
from pipeline.io.tables import TableError, read_metadata, read_table, write_table


def test_grayscale_is_repeated_on_three_channels(tmp_path):
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    rgb = read_rgb(tmp_path / "g.png")
    assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8
    assert (rgb == gray[:, :, None]).all()


def test_rgba_is_composited_over_white(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = [[255, 0], [128, 255]]
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    rgb = read_rgb(tmp_path / "a.png")
    assert tuple(rgb[0, 0]) == (200, 0, 0)  # opaque: the pixel
    assert tuple(rgb[0, 1]) == (255, 255, 255)  # transparent: white
    # half transparent: 200·a + 255·(1−a) on red, 255·(1−a) on green/blue, a = 128/255
    assert abs(int(rgb[1, 0, 0]) - round(200 * 128 / 255 + 255 * 127 / 255)) <= 1
    assert abs(int(rgb[1, 0, 1]) - round(255 * 127 / 255)) <= 1


def test_palette_image(tmp_path):
    image = Image.new("P", (3, 2))
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.putpixel((1, 1), 1)
    image.save(tmp_path / "p.png")
    rgb = read_rgb(tmp_path / "p.png")
    assert tuple(rgb[1, 1]) == (10, 20, 30) and tuple(rgb[0, 0]) == (0, 0, 0)


def test_16_bit_grayscale_is_scaled_from_the_full_range(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    rgb = read_rgb(tmp_path / "d.png")
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255]


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="bad.png"):
        read_rgb(tmp_path / "bad.png")
    write_png(tmp_path / "ok.png", np.full((32, 32, 3), 7, dtype=np.uint8))
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png"):
        read_rgb(tmp_path / "cut.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_rgb(tmp_path / "missing.png")


def test_exif_orientation_is_applied(tmp_path):
    # 16 wide, 8 high: left half black, right half white, stored with orientation 6
    # ("rotate 90 degrees clockwise to display"), as phone cameras write portrait photos
    stored = np.zeros((8, 16, 3), dtype=np.uint8)
    stored[:, 8:] = 255
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "phone.jpg", quality=100, exif=exif)
    rgb = read_rgb(tmp_path / "phone.jpg")
    assert rgb.shape == (16, 8, 3)  # portrait, as a viewer shows it
    upright = np.rot90(stored, k=-1)  # clockwise: the white right half comes to the bottom
    assert np.abs(rgb.astype(int) - upright).max() < 40
    assert rgb[:6].max() < 40 and rgb[10:].min() > 215
    assert image_size(tmp_path / "phone.jpg") == (8, 16)


def test_multi_frame_files_are_refused_naming_the_file(tmp_path):
    pages = [Image.fromarray(np.full((8, 8, 3), value, np.uint8)) for value in (0, 200)]
    pages[0].save(tmp_path / "two_pages.tif", save_all=True, append_images=pages[1:])
    pages[0].save(tmp_path / "animated.gif", save_all=True, append_images=pages[1:], duration=50)
    pages[0].save(tmp_path / "animated.webp", save_all=True, append_images=pages[1:], duration=50)
    for name in ("two_pages.tif", "animated.gif", "animated.webp"):
        with pytest.raises(ImageError, match=rf"{name}.*2 frames or pages"):
            read_rgb(tmp_path / name)
        with pytest.raises(ImageError, match=rf"{name}.*2 frames or pages"):
            image_size(tmp_path / name)
    pages[0].save(tmp_path / "one_page.tif")
    assert read_rgb(tmp_path / "one_page.tif").shape == (8, 8, 3)


def test_png_round_trip_and_tensor_range(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    write_png(tmp_path / "x.png", image)
    assert (read_rgb(tmp_path / "x.png") == image).all()
    tensor = signed_tensor(image)
    assert tensor.shape == (3, 5, 7) and tensor.min() >= -1 and tensor.max() <= 1
    assert (signed_to_uint8(tensor) == image).all()


def test_atomic_path_keeps_old_content_on_error(tmp_path):
    target = tmp_path / "out"
    with atomic_path(target) as temporary:
        temporary.mkdir()
        (temporary / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.mkdir()
        (temporary / "a").write_text("new")
        raise RuntimeError("killed")
    assert (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left
    with atomic_path(target) as temporary:
        temporary.mkdir()
        (temporary / "b").write_text("replaced")
    assert sorted(p.name for p in target.iterdir()) == ["b"]


def _scores(**overrides):
    row = {
        "image_id": "a",
        "instance_id": 1,
        "candidate": "s1",
        "metric": "psnr",
        "value": 20.5,
        "lower_better": False,
    }
    return pd.DataFrame([{**row, **overrides}])


def test_tables_round_trip_with_metadata(tmp_path):
    path = write_table(_scores(), tmp_path / "s.parquet", "scores", {"backend": "pyiqa"})
    frame = read_table(path, "scores")
    assert frame.iloc[0].to_dict() == _scores().iloc[0].to_dict()
    metadata = read_metadata(path)  # write_table may add its own keys (runtime) beside these
    assert metadata["table"] == "scores" and metadata["backend"] == "pyiqa"


def test_tables_refuse_missing_extra_and_mistyped_columns(tmp_path):
    with pytest.raises(TableError, match=r"s.parquet.*missing columns \['lower_better'\]"):
        write_table(_scores().drop(columns="lower_better"), tmp_path / "s.parquet", "scores")
    with pytest.raises(TableError, match=r"unexpected columns \['extra'\]"):
        write_table(_scores().assign(extra=1), tmp_path / "s.parquet", "scores")
    with pytest.raises(TableError, match="'value'"):
        write_table(_scores(value="high"), tmp_path / "s.parquet", "scores")
    assert not (tmp_path / "s.parquet").exists()
    # a file written by someone else with a wrong type is refused on read, naming the file
    _scores(instance_id="one").to_parquet(tmp_path / "foreign.parquet")
    with pytest.raises(TableError, match=r"foreign.parquet.*instance_id"):
        read_table(tmp_path / "foreign.parquet", "scores")
    with pytest.raises(TableError, match="missing columns"):
        read_table(tmp_path / "foreign.parquet", "candidates")
