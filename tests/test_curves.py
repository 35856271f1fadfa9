"""Alignment curves (pipeline.training.curves): the held-out split (whole source photos, by crop
when the photos are unknown), its exclusion from training, the train_curves table and
bit-identical resume."""

import numpy as np
import pandas as pd
import pytest

from pipeline.contracts import DATA_TABLE
from pipeline.io.tables import read_metadata, read_table, write_table
from pipeline.training import curves, offline
from pipeline.training.items import PreferenceItem, preference_items
from tests.test_train import BASE, _run, inputs, kill_at_step_three  # noqa: F401  (fixture)

CURVED = {**BASE, "heldout_fraction": 0.5, "eval_every": 2}  # seed 3: img_b, img_c held out


def test_the_split_depends_on_seed_and_image_id_only(inputs):  # noqa: F811
    items = preference_items(read_table(inputs["pairs_path"], "preference_pairs"), "dspo")
    split = curves.split_items(items, 0.5, seed=3)  # no photos: each crop is its own unit
    assert [i.image_id for i in split.heldout] == ["img_b", "img_c"]
    assert {i.image_id for i in split.training} == {"img_a", "img_d"}
    assert (split.unit, split.heldout_units, split.units) == ("crop", ["img_b", "img_c"], 4)
    # the same units whatever order the items come in
    assert curves.split_items(items[::-1], 0.5, seed=3).heldout_units == ["img_b", "img_c"]
    assert curves.split_items(items, 0.5, seed=0).heldout_units == ["img_c", "img_d"]
    nothing = curves.split_items(items, 0.0, seed=3)
    assert (nothing.training, nothing.heldout) == (items, [])
    with pytest.raises(ValueError, match="heldout_fraction"):
        curves.split_items(items, 1.0, seed=3)


def _items(photos: int, crops: int) -> tuple[list, dict[str, str]]:
    """``photos x crops`` items named ``p{photo}_c{crop}`` and their ``{image_id: photo}``."""
    ids = [f"p{p}_c{c}" for p in range(photos) for c in range(crops)]
    items = [PreferenceItem(i, ("a", "b"), (-1,), (1.0,), (0,), (1,), "") for i in ids]
    return items, {i: i.split("_")[0] for i in ids}


@pytest.mark.parametrize(
    ("fraction", "photos_out"), [(0.1, 1), (0.2, 2), (0.25, 3), (0.5, 5), (0.04, 0)]
)
def test_whole_photos_are_held_out_in_the_configured_share(fraction, photos_out):
    """10 photos of 3 crops: round(fraction * 10) photos held out (0.25 -> 2.5 -> 3), each with
    all its crops, and no photo in both parts."""
    items, photos = _items(10, 3)
    split = curves.split_items(items, fraction, seed=1, photos=photos)
    held = {photos[i.image_id] for i in split.heldout}
    kept = {photos[i.image_id] for i in split.training}
    assert held & kept == set()
    assert len(held) == photos_out and len(split.heldout) == 3 * photos_out
    assert (split.unit, split.heldout_units, split.units) == ("photo", sorted(held), 10)
    assert len(split.training) + len(split.heldout) == 30
    if photos_out:  # the seed chooses which photos
        others = {
            curves.split_items(items, fraction, seed=s, photos=photos).heldout_units[0]
            for s in range(6)
        }
        assert len(others) > 1


def _relabel_photos(data_dir, photos):
    table = read_table(data_dir / DATA_TABLE, "degradation_pairs")
    table["source_id"] = table["image_id"].map(photos)
    write_table(table, data_dir / DATA_TABLE, "degradation_pairs")


def test_training_holds_out_whole_photos_of_the_data_table(inputs, tmp_path, monkeypatch):  # noqa: F811
    """Crops img_a, img_b are cut from photo p1, img_c, img_d from p2: half the photos held out
    is one photo with both its crops; the curves are written on them."""
    _relabel_photos(
        inputs["data_dir"], {"img_a": "p1", "img_b": "p1", "img_c": "p2", "img_d": "p2"}
    )
    trained = []
    original = offline.Trainer.micro_batch

    def spy(self, step, micro, slots):
        loaded, conditions = original(self, step, micro, slots)
        trained.extend(entry.item.image_id for entry in loaded)
        return loaded, conditions

    monkeypatch.setattr(offline.Trainer, "micro_batch", spy)
    out = _run(inputs, tmp_path / "run", CURVED)
    meta = read_metadata(out / "train_log.parquet")
    held = meta["heldout_units"]
    assert meta["heldout_unit"] == "photo" and meta["units"] == 2 and len(held) == 1
    crops = {"p1": {"img_a", "img_b"}, "p2": {"img_c", "img_d"}}
    assert set(meta["heldout_items"]) == crops[held[0]]
    assert set(trained) == crops[({"p1", "p2"} - set(held)).pop()]
    table = read_table(out / curves.CURVES_TABLE, "train_curves")
    assert (table["items"] == 2).all() and set(table["split"]) == {"train", "heldout"}
    assert np.isfinite(table[["loss", "implicit_accuracy", "margin"]].to_numpy()).all()


def test_without_source_photos_the_split_is_by_crop_with_a_note(inputs, tmp_path, capsys):  # noqa: F811
    _relabel_photos(
        inputs["data_dir"], {"img_a": "p1", "img_b": None, "img_c": "p2", "img_d": "p2"}
    )
    assert curves.photos_of(inputs["data_dir"], ["img_a", "img_c"]) == {
        "img_a": "p1",
        "img_c": "p2",
    }
    assert curves.photos_of(inputs["data_dir"], ["img_a", "img_b"]) is None
    assert curves.photos_of(tmp_path / "nowhere", ["img_a"]) is None
    out = _run(inputs, tmp_path / "run", CURVED)
    meta = read_metadata(out / "train_log.parquet")
    assert meta["heldout_unit"] == "crop" and meta["heldout_items"] == ["img_b", "img_c"]
    assert "held-out split is by crop" in capsys.readouterr().err


def test_heldout_items_never_train_and_the_curves_are_written(inputs, tmp_path, monkeypatch):  # noqa: F811
    trained = []
    original = offline.Trainer.micro_batch

    def spy(self, step, micro, slots):
        loaded, conditions = original(self, step, micro, slots)
        trained.extend(entry.item.image_id for entry in loaded)
        return loaded, conditions

    monkeypatch.setattr(offline.Trainer, "micro_batch", spy)
    out = _run(inputs, tmp_path / "run", CURVED)
    assert set(trained) == {"img_a", "img_d"}
    table = read_table(out / curves.CURVES_TABLE, "train_curves")
    assert table[["step", "split"]].values.tolist() == [
        [2, "train"],
        [2, "heldout"],
        [4, "train"],
        [4, "heldout"],
    ]
    assert (table["items"] == 2).all()
    assert np.isfinite(table[["loss", "implicit_accuracy", "margin"]].to_numpy()).all()
    assert table["reward_margin"].to_numpy() == pytest.approx(0.5 * 8000.0 * table["margin"])
    meta = read_metadata(out / "train_log.parquet")
    assert meta["heldout_items"] == ["img_b", "img_c"] and meta["items"] == 2
    # training on the pairs raises the accuracy on them above the reference's 0 (margin 0)
    assert table.loc[table["split"] == "train", "margin"].iloc[-1] != 0.0


def test_resumed_run_writes_the_same_curves(inputs, tmp_path, monkeypatch):  # noqa: F811
    full = read_table(_run(inputs, tmp_path / "full", CURVED) / curves.CURVES_TABLE, "train_curves")
    original = kill_at_step_three(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _run(inputs, tmp_path / "resumed", CURVED)
    monkeypatch.setattr(offline, "step_slots", original)
    resumed = _run(inputs, tmp_path / "resumed", CURVED)
    pd.testing.assert_frame_equal(read_table(resumed / curves.CURVES_TABLE, "train_curves"), full)
    log = read_table(resumed / "train_log.parquet", "train_log")
    assert log["step"].tolist() == [1, 2, 3, 4]


def test_sft_curves_have_a_loss_and_no_margin(inputs, tmp_path):  # noqa: F811
    out = _run(inputs, tmp_path / "sft", CURVED, method="sft")
    table = read_table(out / curves.CURVES_TABLE, "train_curves")
    assert np.isfinite(table["loss"]).all() and table["margin"].isna().all()
