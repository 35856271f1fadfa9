"""pipeline.winrates: per-instance wins under select's objective scores, ties as half, Wilson CI."""

import pandas as pd
import pytest
from statsmodels.stats.proportion import proportion_confint

from pipeline import winrates


def _scores(values):
    """values: {(image, instance): (pretrained psnr, aligned psnr)}"""
    rows = []
    for (image_id, instance_id), pair in values.items():
        for candidate, value in zip(("pretrained", "aligned"), pair, strict=True):
            rows.append((image_id, instance_id, candidate, "psnr", value, False))
    return pd.DataFrame(
        rows, columns=["image_id", "instance_id", "candidate", "metric", "value", "lower_better"]
    )


def test_wins_ties_and_losses_with_a_wilson_interval():
    scores = _scores({("a", 0): (20.0, 21.0), ("a", 1): (20.0, 20.0), ("b", 0): (22.0, 21.0),
                      ("b", 1): (20.0, 25.0)})  # fmt: skip
    row = winrates.win_rate(scores, {"psnr": 1.0}, 1e-9)
    assert (row["wins"], row["ties"], row["losses"], row["instances"], row["images"]) == (
        2, 1, 1, 4, 2,
    )  # fmt: skip
    assert row["win_rate"] == pytest.approx(2.5 / 4)
    low, high = proportion_confint(2.5, 4, alpha=0.05, method="wilson")
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))


def test_lower_better_metrics_are_flipped_as_select_flips_them():
    scores = _scores({("a", 0): (0.3, 0.1)})
    scores["metric"], scores["lower_better"] = "lpips", True
    assert winrates.win_rate(scores, {"lpips": 1.0}, 1e-9)["wins"] == 1


def test_the_report_gets_the_curves_and_win_rate_sections(tmp_path):
    from pipeline import alignment_report
    from pipeline.io.tables import write_table

    curves = pd.DataFrame(
        [(s, split, 4, 0.6, 0.5 + s / 100, 1e-3 * s, 4.0 * s) for s in (5, 10)
         for split in ("train", "heldout")],
        columns=["step", "split", "items", "loss", "implicit_accuracy", "margin", "reward_margin"],
    )  # fmt: skip
    write_table(
        curves, tmp_path / "c.parquet", "train_curves", {"method": "dspo", "objective": "u"}
    )
    rates = pd.DataFrame([{"testset": "t", "model": "dspo_u", "objective": "u", "instances": 4,
                           "images": 2, "wins": 2, "ties": 1, "losses": 1, "win_rate": 0.625,
                           "ci_low": 0.2, "ci_high": 0.9}])  # fmt: skip
    write_table(rates, tmp_path / "w.parquet", "win_rates")
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    written = alignment_report.append_to_report(
        report, [tmp_path / "c.parquet"], [tmp_path / "w.parquet"], "onestep"
    )
    assert written == ["curves_onestep.png", "win_rates_onestep.png", "win_rates.csv"]
    text = report.read_text()
    assert "![alignment curves](curves_onestep.png)" in text
    assert "| t | dspo_u | u | 2 | 4 | 2 | 1 | 1 | 0.625 | [0.200, 0.900] |" in text
    assert "| dspo_u | heldout | 10 | 4 | 0.600 |" in text
