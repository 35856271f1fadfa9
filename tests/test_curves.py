"""Alignment curves (pipeline.training.curves): the held-out split, its exclusion from training,
the train_curves table and bit-identical resume."""

import numpy as np
import pandas as pd
import pytest

from pipeline import train as T
from pipeline.io.tables import read_metadata, read_table
from pipeline.training import curves
from pipeline.training.items import preference_items
from tests.test_train import BASE, _run, inputs, kill_at_step_three  # noqa: F401  (fixture)

CURVED = {**BASE, "heldout_fraction": 0.5, "eval_every": 2}  # seed 3: img_b, img_c held out


def test_the_split_depends_on_seed_and_image_id_only(inputs):  # noqa: F811
    items = preference_items(read_table(inputs["pairs_path"], "preference_pairs"), "dspo")
    training, heldout = curves.split_items(items, 0.5, seed=3)
    assert [i.image_id for i in heldout] == ["img_b", "img_c"]
    assert {i.image_id for i in training} == {"img_a", "img_d"}
    # the same image ids whatever the other items are
    assert curves.is_heldout("img_b", 0.5, 3) and not curves.is_heldout("img_a", 0.5, 3)
    assert curves.split_items(items, 0.0, seed=3) == (items, [])
    with pytest.raises(ValueError, match="heldout_fraction"):
        curves.split_items(items, 1.0, seed=3)


def test_heldout_items_never_train_and_the_curves_are_written(inputs, tmp_path, monkeypatch):  # noqa: F811
    trained = []
    original = T.Trainer.micro_batch

    def spy(self, step, micro, slots):
        loaded, conditions = original(self, step, micro, slots)
        trained.extend(entry.item.image_id for entry in loaded)
        return loaded, conditions

    monkeypatch.setattr(T.Trainer, "micro_batch", spy)
    out = _run(inputs, tmp_path / "run", CURVED)
    assert set(trained) == {"img_a", "img_d"}
    table = read_table(out / curves.CURVES_TABLE, "train_curves")
    assert table[["step", "split"]].values.tolist() == [
        [2, "train"], [2, "heldout"], [4, "train"], [4, "heldout"],
    ]  # fmt: skip
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
    monkeypatch.setattr(T, "step_slots", original)
    resumed = _run(inputs, tmp_path / "resumed", CURVED)
    pd.testing.assert_frame_equal(read_table(resumed / curves.CURVES_TABLE, "train_curves"), full)
    log = read_table(resumed / "train_log.parquet", "train_log")
    assert log["step"].tolist() == [1, 2, 3, 4]


def test_sft_curves_have_a_loss_and_no_margin(inputs, tmp_path):  # noqa: F811
    out = _run(inputs, tmp_path / "sft", CURVED, method="sft")
    table = read_table(out / curves.CURVES_TABLE, "train_curves")
    assert np.isfinite(table["loss"]).all() and table["margin"].isna().all()
