"""pipeline.winrates: per-instance wins under select's objective scores, ties as half, Wilson CI
and the interval clustered by image."""

import numpy as np
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
    scores = _scores(
        {
            ("a", 0): (20.0, 21.0),
            ("a", 1): (20.0, 20.0),
            ("b", 0): (22.0, 21.0),
            ("b", 1): (20.0, 25.0),
        }
    )
    row = winrates.win_rate(scores, {"psnr": 1.0}, 1e-9)
    assert (row["wins"], row["ties"], row["losses"], row["instances"], row["images"]) == (
        2,
        1,
        1,
        4,
        2,
    )
    assert row["win_rate"] == pytest.approx(2.5 / 4)
    low, high = proportion_confint(2.5, 4, alpha=0.05, method="wilson")
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))
    # per image: a has 1.5 of 2, b 1 of 2 -> p = 0.625, sum (w - p n)^2 = 2 * 0.25^2 = 0.125,
    # v_cluster = 2/1 * 0.125 / 16, v_binomial = 0.625 * 0.375 / 4: deff = 0.0156 / 0.0586 < 1 -> 1
    assert row["effective_n"] == pytest.approx(4.0)
    assert (row["cluster_low"], row["cluster_high"]) == pytest.approx((low, high))


def _instances(outcomes):
    """{(image, instance): (pretrained, aligned)} with the aligned output winning where 1."""
    return _scores(
        {
            (f"img{i}", j): (20.0, 21.0 if won else 19.0)
            for i, image in enumerate(outcomes)
            for j, won in enumerate(image)
        }
    )


def test_perfectly_correlated_instances_widen_the_interval_to_about_one_per_image():
    """4 images of 5 instances, all won in two images, all lost in the other two: 20 instances
    but 4 independent outcomes. v_cluster = 4/3 * 4 * 2.5^2 / 20^2 = 1/12, v_binomial = 1/80:
    deff = 20/3, effective n = 3 (= images - 1), and the interval is Wilson's for 1.5 of 3, about
    the per-image one (2 of 4) and far wider than Wilson's on the 20 instances."""
    row = winrates.win_rate(_instances([[1] * 5, [1] * 5, [0] * 5, [0] * 5]), {"psnr": 1.0}, 1e-9)
    assert (row["win_rate"], row["instances"], row["images"]) == (0.5, 20, 4)
    assert row["effective_n"] == pytest.approx(3.0)
    expected = proportion_confint(1.5, 3, alpha=0.05, method="wilson")
    assert (row["cluster_low"], row["cluster_high"]) == pytest.approx(expected)
    per_image = np.subtract(*proportion_confint(2, 4, method="wilson")[::-1])
    instance = row["ci_high"] - row["ci_low"]
    clustered = row["cluster_high"] - row["cluster_low"]
    assert instance == pytest.approx(
        np.subtract(*proportion_confint(10, 20, method="wilson")[::-1])
    )
    assert clustered > 1.8 * instance and abs(clustered - per_image) < 0.1 * per_image


def test_independent_looking_instances_keep_the_wilson_interval():
    """Every image wins 2 of its 4 instances: no spread between images, deff floored at 1."""
    row = winrates.win_rate(_instances([[1, 1, 0, 0]] * 5), {"psnr": 1.0}, 1e-9)
    assert row["effective_n"] == pytest.approx(20.0)
    assert (row["cluster_low"], row["cluster_high"]) == pytest.approx(
        (row["ci_low"], row["ci_high"])
    )


def test_clustered_interval_by_hand():
    """Images with 3 of 4, 1 of 2 and 0 of 2 wins: p = 0.5; residuals 1, 0, -1; v_cluster =
    3/2 * 2 / 64 = 3/64; v_binomial = 0.25 / 8 = 2/64: deff = 1.5, effective n = 8 / 1.5."""
    effective, low, high = winrates.clustered_interval(np.array([3, 1, 0]), np.array([4, 2, 2]))
    assert effective == pytest.approx(16 / 3)
    assert (low, high) == pytest.approx(proportion_confint(8 / 3, 16 / 3, method="wilson"))
    # all instances agree: one observation per image
    assert winrates.clustered_interval(np.array([2, 3]), np.array([2, 3]))[0] == 2.0


def test_lower_better_metrics_are_flipped_as_select_flips_them():
    scores = _scores({("a", 0): (0.3, 0.1)})
    scores["metric"], scores["lower_better"] = "lpips", True
    assert winrates.win_rate(scores, {"lpips": 1.0}, 1e-9)["wins"] == 1


def test_the_report_gets_the_curves_and_win_rate_sections(tmp_path):
    from pipeline import alignment_report
    from pipeline.io.tables import write_table

    curves = pd.DataFrame(
        [
            (s, split, 4, 0.6, 0.5 + s / 100, 1e-3 * s, 4.0 * s)
            for s in (5, 10)
            for split in ("train", "heldout")
        ],
        columns=["step", "split", "items", "loss", "implicit_accuracy", "margin", "reward_margin"],
    )
    write_table(
        curves, tmp_path / "c.parquet", "train_curves", {"method": "dspo", "objective": "u"}
    )
    rates = pd.DataFrame(
        [
            {
                "testset": "t",
                "model": "dspo_u",
                "objective": "u",
                "instances": 4,
                "images": 2,
                "wins": 2,
                "ties": 1,
                "losses": 1,
                "win_rate": 0.625,
                "ci_low": 0.2,
                "ci_high": 0.9,
                "effective_n": 2.5,
                "cluster_low": 0.1,
                "cluster_high": 0.95,
            }
        ]
    )
    write_table(rates, tmp_path / "w.parquet", "win_rates")
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    written = alignment_report.append_to_report(
        report, [tmp_path / "c.parquet"], [tmp_path / "w.parquet"], "onestep"
    )
    assert written == ["curves_onestep.png", "win_rates_onestep.png", "win_rates.csv"]
    text = report.read_text()
    assert "![alignment curves](curves_onestep.png)" in text
    assert (
        "| t | dspo_u | u | 2 | 4 | 2 | 1 | 1 | 0.625 | [0.200, 0.900] | 2.5 | [0.100, 0.950] |"
    ) in text
    assert "The plot shows the clustered interval." in text
    assert "| dspo_u | heldout | 10 | 4 | 0.600 |" in text


def test_hq_table_paths_are_relative_to_the_table_so_results_can_move(tmp_path, monkeypatch):
    import shutil

    from pipeline import contracts
    from pipeline.io.tables import read_table, write_table

    monkeypatch.chdir(tmp_path)
    hq = tmp_path / "results" / "data" / "test" / "hq" / "a.png"
    hq.parent.mkdir(parents=True)
    hq.write_bytes(b"png")
    evaluation = tmp_path / "results" / "eval" / "pretrained"
    evaluation.mkdir(parents=True)
    manifest = pd.DataFrame(
        {
            "testset": ["t"],
            "model": ["pretrained"],
            "image_id": ["a"],
            "sr_path": ["images/a.png"],
            "lq_path": ["results/data/test/lq/a.png"],
            "hq_path": ["results/data/test/hq/a.png"],
        }
    )
    write_table(manifest, evaluation / contracts.EVAL_IMAGES, "eval_images", {})
    table = tmp_path / "results" / "masks" / "test_t_hq.parquet"
    table.parent.mkdir(parents=True)
    winrates.hq_table(evaluation, table)
    frame = read_table(table, "candidates")
    assert frame["path"].tolist() == ["../data/test/hq/a.png"]
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "results", moved / "results")
    moved_table = moved / "results" / "masks" / "test_t_hq.parquet"
    files = contracts.candidate_files(moved_table, read_table(moved_table, "candidates"))
    assert files[("a", "hq")].resolve() == (moved / "results/data/test/hq/a.png").resolve()
