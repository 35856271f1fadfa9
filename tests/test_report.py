"""The `report` stage: summary statistics, the paper's tables, radar normalisation, plots."""

import math

import numpy as np
import pandas as pd
import pytest

from pipeline import report
from pipeline.io.images import read_rgb, write_png
from pipeline.io.tables import read_metadata, read_table, write_table
from tests.test_evaluate import make_synthetic_set

CONFIG = report.stage_config()


def metrics_frame(values: dict[str, dict[str, list[float]]], testset="syn") -> pd.DataFrame:
    """Long ``eval_metrics`` rows from {model: {metric: per-image values}}."""
    lower = {"psnr": False, "lpips": True, "musiq": False, "niqe": True}
    rows = [
        (testset, model, f"img{i}", metric, value, lower[metric])
        for model, by_metric in values.items()
        for metric, per_image in by_metric.items()
        for i, value in enumerate(per_image)
    ]
    return pd.DataFrame(
        rows, columns=["testset", "model", "image_id", "metric", "value", "lower_better"]
    )


HAND = {
    "pretrained": {"psnr": [20.0, 22.0, 24.0], "lpips": [0.30, 0.20, 0.25]},
    "dspo": {"psnr": [21.0, 23.0, 25.5], "lpips": [0.20, 0.20, 0.20]},
    "bicubic": {"psnr": [22.0, 22.0, 22.0], "lpips": [0.50, 0.40, 0.45]},
}


def test_t_interval_on_hand_numbers():
    low, high = report.confidence_interval(np.array([1.0, 2.0, 3.0, 4.0]), "t")
    # t(0.975, 3) = 3.182446305284263, s = sqrt(5/3), n = 4
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert (low, high) == (pytest.approx(2.5 - half), pytest.approx(2.5 + half))
    assert all(math.isnan(v) for v in report.confidence_interval(np.array([7.0]), "t"))


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    from pipeline.seeding import numpy_rng

    values = np.array([1.0, 5.0, 2.0, 8.0, 3.0])
    first = report.confidence_interval(values, "bootstrap", 500, numpy_rng(1, "report", "x"))
    again = report.confidence_interval(values, "bootstrap", 500, numpy_rng(1, "report", "x"))
    assert first == again
    assert 1.0 <= first[0] < values.mean() < first[1] <= 8.0
    constant = report.confidence_interval(np.full(4, 2.5), "bootstrap", 50, numpy_rng(1, "r"))
    assert constant == (2.5, 2.5)


def test_summary_means_ci_and_delta_vs_baseline():
    summary = report.summarise(metrics_frame(HAND), CONFIG, seed=0)
    row = summary.set_index(["model", "metric"])
    assert row.loc[("dspo", "psnr"), "mean"] == pytest.approx(69.5 / 3)
    assert row.loc[("dspo", "psnr"), "delta_vs_baseline"] == pytest.approx(69.5 / 3 - 22.0)
    assert row.loc[("dspo", "lpips"), "delta_vs_baseline"] == pytest.approx(0.2 - 0.25)
    assert row.loc[("pretrained", "psnr"), "delta_vs_baseline"] == 0.0
    half = 4.302652729911275 * 2.0 / math.sqrt(3)  # t(0.975, 2), s = 2
    assert row.loc[("pretrained", "psnr"), "ci95_high"] == pytest.approx(22.0 + half)
    assert row.loc[("bicubic", "psnr"), "ci95_low"] == pytest.approx(22.0)
    assert (summary["n_images"] == 3).all()
    assert row.loc[("dspo", "lpips"), "lower_better"]
    no_baseline = report.summarise(metrics_frame({"dspo": HAND["dspo"]}), CONFIG)
    assert no_baseline["delta_vs_baseline"].isna().all()


def test_models_on_different_images_are_refused():
    frame = metrics_frame(HAND)
    frame = frame[~((frame["model"] == "dspo") & (frame["image_id"] == "img2"))]
    with pytest.raises(ValueError, match="different images"):
        report.summarise(frame, CONFIG)


def test_table_layout_rows_deltas_and_highlights():
    summary = report.summarise(metrics_frame(HAND), CONFIG)
    markdown, table = report.format_tables(summary, CONFIG)
    assert list(table.columns) == ["testset", "model", "kind", "psnr", "lpips"]
    assert list(zip(table["model"], table["kind"], strict=True)) == [
        ("bicubic", "mean"),
        ("bicubic", "delta_vs_baseline"),
        ("pretrained", "mean"),
        ("dspo", "mean"),
        ("dspo", "delta_vs_baseline"),
    ]
    lines = markdown.splitlines()
    header = next(line for line in lines if line.startswith("| Method"))
    assert header == "| Method | PSNR↑ | LPIPS↓ |"
    assert "## syn (3 images)" in lines
    # psnr in the tens: 2 decimals; lpips: 4; best bold, second italic; improved deltas bold
    assert "| dspo | **23.17** | **0.2000** |" in lines
    assert "| pretrained | *22.00* | *0.2500* |" in lines
    assert "| bicubic | *22.00* | 0.4500 |" in lines
    assert "| Δ dspo vs pretrained | **+1.17** | **-0.0500** |" in lines
    assert "| Δ bicubic vs pretrained | +0.00 | +0.2000 |" in lines


def test_table_2_ablation_rows_sit_under_their_dspo_model():
    values = {
        "pretrained": {"psnr": [20.0, 22.0]},
        "dspo_fidelity_nom2": {"psnr": [20.5, 22.5]},  # evaluation order: ablations last
        "dpo_fidelity": {"psnr": [20.0, 21.0]},
        "dspo_fidelity": {"psnr": [21.0, 23.0]},
        "dspo_m1_fidelity": {"psnr": [20.0, 22.5]},
    }
    summary = report.summarise(metrics_frame(values), CONFIG)
    markdown, table = report.format_tables(summary, CONFIG)
    means = table[table["kind"] == "mean"]["model"].tolist()
    assert means == [
        "pretrained",
        "dpo_fidelity",
        "dspo_fidelity",
        "dspo_m1_fidelity",
        "dspo_fidelity_nom2",
    ]
    assert "| Δ dspo_fidelity_nom2 vs pretrained | **+0.50** |" in markdown.splitlines()
    assert "`dspo_fidelity_nom2`: DSPO sampled without the feedback negatives" in markdown
    assert "`dspo_m1_fidelity`: DSPO trained without the feedback negatives (M1 only)" in markdown
    # model_order still wins
    ordered = report.model_order(values, {**CONFIG, "model_order": ["dspo_fidelity_nom2"]})
    assert ordered[0] == "dspo_fidelity_nom2" and ordered.count("dspo_fidelity_nom2") == 1
    assert report.ablations_of("dpo_fidelity") == [] == report.ablations_of("dspo_m1_fidelity")


def test_radar_normalisation_best_is_one_after_sign_flip():
    values = dict(HAND, dro={"psnr": [20.0, 20.0, 20.0], "lpips": [0.4, 0.4, 0.4]})
    values["dspo"] = {**values["dspo"], "niqe": [3.0] * 3}
    for model in ("pretrained", "dro"):
        values[model] = {**values[model], "niqe": [5.0] * 3}
    values.pop("bicubic")
    summary = report.summarise(metrics_frame(values), CONFIG)
    radar = report.radar_values(summary, "syn", {**CONFIG, "radar_floor": 0.0})
    assert list(radar.columns) == ["psnr", "lpips"]  # NIQE left out, as in Figure 4
    assert list(radar.index) == ["pretrained", "dspo", "dro"]
    assert radar.loc["dspo", "psnr"] == 1.0 and radar.loc["dro", "psnr"] == 0.0
    assert radar.loc["pretrained", "psnr"] == pytest.approx((22 - 20) / (69.5 / 3 - 20))
    # LPIPS: lower is better, so the smallest LPIPS is the outermost point
    assert radar.loc["dspo", "lpips"] == 1.0 and radar.loc["dro", "lpips"] == 0.0
    assert radar.loc["pretrained", "lpips"] == pytest.approx((0.4 - 0.25) / (0.4 - 0.2))
    floored = report.radar_values(summary, "syn", {**CONFIG, "radar_metrics": ["niqe", "psnr"]})
    assert floored.loc["dspo", "niqe"] == 1.0 and floored.loc["dro", "niqe"] == 0.1
    assert floored.loc["dro", "psnr"] == pytest.approx(0.1)


def test_radar_axis_with_equal_values_sits_at_one():
    values = {"pretrained": {"psnr": [1.0, 2.0]}, "dspo": {"psnr": [2.0, 1.0]}}
    summary = report.summarise(metrics_frame(values), CONFIG)
    assert (report.radar_values(summary, "syn", CONFIG)["psnr"] == 1.0).all()


def test_report_stage_writes_every_artifact(tmp_path):
    data = make_synthetic_set(tmp_path / "data" / "test")
    provenance = tmp_path / "scores.parquet"
    write_table(
        pd.DataFrame(columns=["testset", "model", "image_id", "metric", "value", "lower_better"]),
        provenance,
        "eval_metrics",
        {"backend": "classical-segmenter", "stand_ins": {"segment": "no SAM checkpoint"}},
    )
    paths = []
    rng = np.random.default_rng(0)
    for offset, model in enumerate(("pretrained", "dspo", "bicubic")):
        folder = tmp_path / "eval" / "multistep" / "syn" / model
        frame = metrics_frame({model: {"psnr": [20.0 + offset, 21.0], "lpips": [0.3, 0.2]}})
        frame["image_id"] = frame["image_id"].map({"img0": "img_a", "img1": "img_b"})
        for image_id in ("img_a", "img_b"):
            write_png(
                folder / "images" / f"{image_id}.png",
                rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            )
        metadata = {
            "testset_kind": "synthetic",
            "testset_path": str(data),
            "n_images": 2,
            "model_describe": {"weights": f"{model}-weights"},
            "metrics": {"psnr": {}},
            "stand_ins": {"model_weights": "tiny-random(seed=0)"},
            "config": {},
        }
        write_table(frame, folder / "metrics.parquet", "eval_metrics", metadata)
        manifest = pd.DataFrame(
            [
                (
                    "syn",
                    model,
                    i,
                    f"images/{i}.png",
                    str(data / "lq" / f"{i}.png"),
                    str(data / "hq" / f"{i}.png"),
                )
                for i in ("img_a", "img_b")
            ],
            columns=["testset", "model", "image_id", "sr_path", "lq_path", "hq_path"],
        )
        write_table(manifest, folder / "images.parquet", "eval_images")
        paths.append(folder)
    out = tmp_path / "eval" / "multistep"
    argv = [
        "--evaluations",
        *map(str, paths),
        "--out",
        str(out),
        "--seed",
        "0",
        "--config",
        '{"grid_images": 2, "grid_crop": 16}',
        "--provenance",
        str(provenance),
    ]
    assert report.main(argv) == 0
    summary = read_table(out / "summary.parquet", "eval_summary")
    assert len(summary) == 3 * 2
    assert read_metadata(out / "summary.parquet")["framework"] == "multistep"
    radar = read_rgb(out / "radar_syn.png")
    grid = read_rgb(out / "grid_syn.png")
    assert radar.shape[0] > 100 and grid.shape[1] > grid.shape[0]  # 5 columns, 2 rows
    csv = pd.read_csv(out / "tables.csv")
    assert list(csv["model"]) == ["bicubic", "bicubic", "pretrained", "dspo", "dspo"]
    assert "| Δ dspo vs pretrained | **+0.50** |" in (out / "tables.md").read_text()
    text = (out / "report.md").read_text()
    assert '**backend**: `"classical-segmenter"`' in text
    assert "no SAM checkpoint" in text
    assert "| syn | dspo | 2 | dspo-weights | psnr |" in text
    first = {name: (out / name).read_bytes() for name in ("radar_syn.png", "grid_syn.png")}
    assert report.main(argv) == 0
    assert first == {name: (out / name).read_bytes() for name in first}
