"""The run planner (pipeline/plan.py) and the stage cost bench (pipeline/bench/stages.py).

Plans use a hand-made costs file, so every job count and hour below is computed by hand from
the presets (workflow/presets/*.yaml) and docs/design.md §15 (K shard jobs per data stage).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import plan as planner
from pipeline.bench import stages as bench
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ROOT / "workflow" / "presets"

#: round numbers, so the hours below are easy to compute by hand
HAND_COSTS = {
    "label": "hand-made for tests",
    "measured_on": {"device": "cpu", "date": "2026-01-01", "threads": 1},
    "caveat": "hand-made",
    "stages": {
        "degrade": {"startup_s": 2.0, "per_image_s": 0.5, "per_megapixel_s": 1000.0},
        "prompts": {"startup_s": 3.0, "per_image_s": 0.1, "per_megapixel_s": 0.0},
        "candidates/onestep": {"startup_s": 10.0, "per_image_s": 1.0, "per_megapixel_s": 0.0},
        "candidates/multistep": {"startup_s": 10.0, "per_image_s": 2.0, "per_megapixel_s": 0.0},
        "segment": {"startup_s": 5.0, "per_image_s": 1.0, "per_megapixel_s": 0.0},
        "caption": {"startup_s": 5.0, "per_image_s": 1.0, "per_megapixel_s": 0.0},
        "score": {"startup_s": 6.0, "per_image_s": 1.0, "per_megapixel_s": 0.0},
        "select": {"startup_s": 1.0, "per_image_s": 0.0, "per_megapixel_s": 0.0},
        "evaluate/bicubic": {"startup_s": 1.0, "per_image_s": 0.5, "per_megapixel_s": 0.0},
        "evaluate": {"startup_s": 4.0, "per_image_s": 2.0, "per_megapixel_s": 0.0},
        "winrates": {"startup_s": 6.0, "per_image_s": 1.0, "per_megapixel_s": 0.0},
        "pretrain/onestep": {"startup_s": 20.0, "per_step_s": 1.0},
        "pretrain/multistep": {"startup_s": 20.0, "per_step_s": 2.0},
        "train/onestep/dspo": {"startup_s": 30.0, "per_step_s": 2.0},
        "train/multistep/dspo": {"startup_s": 30.0, "per_step_s": 3.0},
    },
}


def make_plan(
    preset: str,
    images: int,
    gpus: int,
    shards: int | None = None,
    tmp: Path = ROOT,
    costs: dict | None = None,
) -> dict:
    config = load_config([str(PRESETS / f"{preset}.yaml")], [])
    return planner.plan(config, images, gpus, shards, costs or HAND_COSTS, 32, {}, tmp)


def rows(result: dict) -> dict[str, dict]:
    return {row["stage"]: row for row in result["stages"]}


# -- the ci preset ------------------------------------------------------------------------------


def test_ci_job_counts_follow_the_dag(tmp_path):
    # ci: frameworks onestep + multistep, 9 methods x objective fidelity (ea_adam onestep only),
    # rounds.count 2 for dspo, one test set ("synthetic", the degrade test split)
    for k in (1, 3):
        got = {name: row["jobs"] for name, row in rows(make_plan("ci", 8, 1, k, tmp_path)).items()}
        assert got == {
            "degrade": 2 * k,  # train and test split, K shards each
            "prompts.train": k,
            "prompts.testsets": k,
            "pretrain": 6,  # onestep: base + rank16/rank64/cfg6/cfg12; multistep: base
            "candidates": 2 * k,
            "segment": 2 * k,
            "caption": 2 * k,
            "score": 2 * k,
            "select": 2,
            "train": 17,  # 8 methods x 1 objective x 2 frameworks + ea_adam on onestep
            "r2.candidates": 2 * k,
            "r2.caption": 2 * k,
            "r2.score": 2 * k,
            "r2.select": 2,
            "r2.train": 2,
            # onestep: bicubic, pretrained, 8 aligned, ea_adam front + 2 members, dspo_r2 = 14;
            # multistep: bicubic, pretrained, 8 aligned, dspo_fidelity_nom2, dspo_r2 = 12
            "evaluate": 26 * k,
            "winrates": 2 * k,
        }


def test_ci_hours_equal_hand_computed_values(tmp_path):
    # 8 source images, test_ids [coffee]: 7 training crops, 1 test crop, 32 px (0.001024 MP)
    result = make_plan("ci", 8, 1, 1, tmp_path)
    stage = rows(result)
    assert result["counts"]["train_images"] == 7 and result["counts"]["test_images"] == 1
    # degrade: per image 0.5 + 1000 x 0.001024 s; one job of 7 (train), one of 1 (test), CPU
    per_image = 0.5 + 1000 * 32 * 32 / 1e6
    assert stage["degrade"]["cpu_hours"] == pytest.approx(
        (2 + 7 * per_image + 2 + per_image) / 3600
    )
    assert stage["degrade"]["gpu_hours"] == 0
    # candidates, 1 GPU each: onestep 10 + 7 x 1, multistep 10 + 7 x 2
    assert stage["candidates"]["gpu_hours"] == pytest.approx((17 + 24) / 3600)
    assert stage["candidates"]["wall_hours"] == pytest.approx((17 + 24) / 3600)  # on one GPU
    # pretrain, 4 steps (ci), 1 GPU: 5 onestep variants x (20 + 4), multistep 20 + 2 x 4
    assert stage["pretrain"]["gpu_hours"] == pytest.approx((5 * 24 + 28) / 3600)
    # train: dspo only has a cost (max_steps 2): onestep 30 + 2 x 2, multistep 30 + 3 x 2
    assert stage["train"]["gpu_hours"] == pytest.approx((34 + 36) / 3600)
    assert stage["train"]["not_modelled"]["train/onestep/ea_adam"] == 1
    assert sum(stage["train"]["not_modelled"].values()) == 15
    # evaluate: 26 models on 1 test image; 2 bicubic at 1 + 0.5, the other 24 at 4 + 2
    assert stage["evaluate"]["gpu_hours"] == pytest.approx((2 * 1.5 + 24 * 6) / 3600)
    # select is a CPU job per framework: 1 s each
    assert stage["select"]["cpu_hours"] == pytest.approx(2 / 3600)
    # start-up share of a candidates job: onestep 10/17, multistep 10/24, averaged
    assert stage["candidates"]["startup_share"] == pytest.approx((10 / 17 + 10 / 24) / 2, abs=1e-4)
    totals = result["totals"]
    assert totals["gpu_hours"] == pytest.approx(sum(r["gpu_hours"] for r in stage.values()))
    assert totals["estimate_hours"] == pytest.approx(
        max(totals["critical_path_hours"], totals["gpu_hours"] / 1)
    )


def test_critical_path_follows_the_stage_chain(tmp_path):
    path = make_plan("ci", 8, 1, 1, tmp_path)["totals"]["critical_path"]
    assert path[0] == "degrade" and path[-1] == "winrates"
    for before, after in [
        ("pretrain", "candidates"),
        ("candidates", "score"),
        ("select", "train"),
        ("train", "r2.candidates"),
        ("r2.train", "evaluate"),
    ]:
        assert path.index(before) < path.index(after)
    # hand-made costs: score (6 s start-up) outlasts caption (5 s); pretrain waits for the
    # training prompts; segment (hq frame) waits only for degrade: off the critical path
    assert "segment" not in path and path[:3] == ["degrade", "prompts.train", "pretrain"]


# -- the paper presets --------------------------------------------------------------------------


def test_paper_presets_job_counts_and_hours(tmp_path):
    # 200 source images, test_fraction 0.01: 2 test photos, 198 training crops of 512 px; test
    # sets DIV2K-val (the 2 test crops), RealSR 100 and DRealSR 93 (not on disk: the paper's)
    k = 4
    multi = make_plan("paper_multistep", 200, 8, k, tmp_path)
    one = make_plan("paper_onestep", 200, 8, k, tmp_path)
    for result in (multi, one):
        assert result["counts"]["train_images"] == 198
        assert {n: t["images"] for n, t in result["counts"]["testsets"].items()} == {
            "DIV2K-val": 2,
            "RealSR": 100,
            "DRealSR": 93,
        }
    m, o = rows(multi), rows(one)
    # 5 methods x 3 objectives; multi-step: + 3 dspo no-M2 ablations; + bicubic, pretrained
    assert m["evaluate"]["jobs"] == 20 * 3 * k and o["evaluate"]["jobs"] == 17 * 3 * k
    assert m["evaluate"]["gathers"] == 60 and o["evaluate"]["gathers"] == 51
    assert m["pretrain"]["jobs"] == 1 and o["pretrain"]["jobs"] == 5
    assert m["train"]["jobs"] == o["train"]["jobs"] == 15
    assert m["candidates"]["jobs"] == m["score"]["jobs"] == k
    assert m["degrade"]["jobs"] == 2 * k and m["prompts.testsets"]["jobs"] == 3 * k
    assert m["winrates"]["jobs"] == 3 * k
    assert "r2.train" not in m  # no rounds in the paper presets
    # evaluate GPU-hours: per (model, test set) K start-ups and 2 s per image; bicubic 1 + 0.5
    images = 2 + 100 + 93
    model_seconds = 3 * k * 4 + 2 * images
    bicubic_seconds = 3 * k * 1 + 0.5 * images
    assert m["evaluate"]["gpu_hours"] == pytest.approx(
        (19 * model_seconds + bicubic_seconds) / 3600
    )
    assert o["evaluate"]["gpu_hours"] == pytest.approx(
        (16 * model_seconds + bicubic_seconds) / 3600
    )
    # pretrain (gpus.pretrain 8): multistep 100000 steps x 2 s + 20; onestep 5 x (100000 + 20)
    assert m["pretrain"]["gpu_hours"] == pytest.approx(8 * (20 + 2 * 100000) / 3600)
    assert o["pretrain"]["gpu_hours"] == pytest.approx(8 * 5 * (20 + 100000) / 3600)
    assert o["pretrain"]["wall_hours"] == pytest.approx(5 * (20 + 100000) / 3600)  # one at a time
    # train (gpus.train 4, max_steps 2000): only dspo priced, 3 objectives; two jobs at a time
    assert m["train"]["gpu_hours"] == pytest.approx(3 * 4 * (30 + 3 * 2000) / 3600)
    assert m["train"]["wall_hours"] == pytest.approx(2 * (30 + 3 * 2000) / 3600)
    assert m["train"]["not_modelled"] == {
        f"train/multistep/{x}": 3 for x in ("ddpo", "dpo", "dspo_m1", "sft")
    }
    # candidates: 198 images in 4 shards of 50, 50, 49, 49, all 4 at once on 8 GPUs
    assert m["candidates"]["gpu_hours"] == pytest.approx((4 * 10 + 2 * 198) / 3600)
    assert m["candidates"]["wall_hours"] == pytest.approx((10 + 2 * 50) / 3600)


def test_more_gpus_less_wall_time_same_gpu_hours(tmp_path):
    for preset in ("paper_multistep", "paper_onestep"):
        plans = [make_plan(preset, 2000, g, 16, tmp_path) for g in (8, 16, 32)]
        hours = [p["totals"]["gpu_hours"] for p in plans]
        walls = [p["totals"]["estimate_hours"] for p in plans]
        paths = [p["totals"]["critical_path_hours"] for p in plans]
        assert hours == pytest.approx([hours[0]] * 3)
        assert walls[0] > walls[1] > walls[2]
        assert paths[0] >= paths[1] >= paths[2]


def test_shards_change_jobs_and_add_one_startup_per_shard(tmp_path):
    one = rows(make_plan("paper_multistep", 2000, 8, 1, tmp_path))
    four = rows(make_plan("paper_multistep", 2000, 8, 4, tmp_path))
    for stage, startup in (("candidates", 10.0), ("segment", 5.0), ("score", 6.0)):
        assert (one[stage]["jobs"], four[stage]["jobs"]) == (1, 4)
        # the images are the same; each extra shard pays one more start-up
        assert four[stage]["gpu_hours"] - one[stage]["gpu_hours"] == pytest.approx(
            3 * startup / 3600
        )
        assert four[stage]["wall_hours"] < one[stage]["wall_hours"]
        assert four[stage]["startup_share"] > one[stage]["startup_share"]
    assert (one["train"]["jobs"], one["pretrain"]["jobs"]) == (four["train"]["jobs"], 1)
    # --shards falls back to the config's shards
    config = load_config([str(PRESETS / "paper_multistep.yaml")], ["shards=3"])
    assert planner.plan(config, 2000, 8, None, HAND_COSTS, 32, {}, tmp_path)["shards"] == 3


def test_testset_sizes_from_the_command_line_and_settings_mismatch(tmp_path):
    config = load_config([str(PRESETS / "paper_onestep.yaml")], [])
    ci = load_config([str(PRESETS / "ci.yaml")], [])
    costs = {**HAND_COSTS, "measured_with": planner.measured_with(ci, ["onestep"])}
    result = planner.plan(config, 500, 8, 2, costs, 32, {"RealSR": (10, 128)}, tmp_path)
    assert result["counts"]["testsets"]["RealSR"]["images"] == 10
    assert result["counts"]["testsets"]["RealSR"]["px"] == 128
    mismatched = "\n".join(result["mismatched_settings"])
    assert "evaluate" in mismatched and "50" in mismatched  # ci samples 3 steps, the paper 50
    assert "segment" in mismatched and "sam" in mismatched
    assert result["extrapolated"] == []  # the hand-made file records no sizes
    same = {
        **HAND_COSTS,
        "measured_with": planner.measured_with(config, ["onestep"]),
        "sizes": [32, 96],
    }
    result = planner.plan(config, 500, 8, 2, same, 32, {}, tmp_path)
    assert result["mismatched_settings"] == []
    # measured up to 96 px, planned at 512 px crops (paper_onestep): (512 / 96)^2 = 28x
    assert result["extrapolated"] == [
        "per-megapixel costs measured up to 96 px, applied at 512 px (28x the pixels): extrapolated"
    ]


def test_cli_prints_the_table_and_the_costs_label(tmp_path, capsys):
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(HAND_COSTS))
    argv = [
        "--configfile",
        str(PRESETS / "paper_multistep.yaml"),
        "--images",
        "85000",
        "--gpus",
        "8",
        "--shards",
        "8",
        "--costs",
        str(costs),
        "--root",
        str(tmp_path),
    ]
    assert planner.main(argv) == 0
    text = capsys.readouterr().out
    assert "hand-made for tests" in text and "critical path" in text
    assert re.search(r"^candidates\s+8\s+1\s+1\s+10519 img", text, re.M)  # 84150 / 8 per shard
    assert "NOT MODELLED" in text
    assert planner.main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["jobs"] > 0
    with pytest.raises(SystemExit):
        planner.main([*argv[:-6], "--gpus", "0"])


def test_several_costs_files_merge_the_last_one_wins(tmp_path, capsys):
    gpu = {
        "label": "measured on GPU test card",
        "measured_on": {"device": "gpu", "gpu": "test card", "date": "2026-01-02", "threads": 8},
        "caveat": "",
        "stages": {
            "candidates/multistep": {"startup_s": 1.0, "per_image_s": 0.5, "per_megapixel_s": 0.0}
        },
    }
    files = []
    for name, costs in (("cpu.json", HAND_COSTS), ("gpu.json", gpu)):
        files.append(tmp_path / name)
        files[-1].write_text(json.dumps(costs))
    merged = planner.load_costs(files)
    assert merged["stages"]["candidates/multistep"]["source"] == 1
    assert merged["stages"]["score"]["source"] == 0
    result = make_plan("paper_multistep", 2000, 8, 1, tmp_path, merged)
    stage = rows(result)
    # 1980 training crops (test_fraction 0.01) on the GPU file's candidates cost
    assert stage["candidates"]["gpu_hours"] == pytest.approx((1 + 0.5 * 1980) / 3600)
    assert stage["candidates"]["cost_keys"] == ["candidates/multistep[2]"]
    assert stage["score"]["cost_keys"] == ["score[1]"]
    assert [c["label"] for c in result["costs"]] == [HAND_COSTS["label"], gpu["label"]]
    argv = [
        "--configfile",
        str(PRESETS / "paper_multistep.yaml"),
        "--images",
        "2000",
        "--gpus",
        "8",
        "--costs",
        *map(str, files),
        "--root",
        str(tmp_path),
    ]
    assert planner.main(argv) == 0
    text = capsys.readouterr().out
    assert "costs [1]: hand-made for tests" in text and "costs [2]: measured on GPU" in text


def test_shipped_costs_file_is_labelled_with_where_it_was_measured():
    costs = json.loads(planner.DEFAULT_COSTS.read_text())
    assert costs["format"] == bench.FORMAT
    assert costs["measured_on"]["device"] in ("cpu", "gpu")
    assert "measured on" in costs["label"] and costs["caveat"]
    for stage in ("degrade", "segment", "score"):
        entry = costs["stages"][stage]
        assert entry["startup_s"] >= 0 and entry["per_image_s"] >= 0
        assert entry["peak_rss_bytes"] > 0
    assert any(key.startswith("candidates/") for key in costs["stages"])
    assert any(key.startswith("evaluate/") for key in costs["stages"])


# -- scheduling and fits ------------------------------------------------------------------------


def test_schedule_longest_first_on_the_gpus_that_free_first():
    assert planner.schedule([(3, 1), (3, 1), (2, 1)], 2) == 5
    assert planner.schedule([(3, 1), (2, 1), (2, 1), (1, 1)], 2) == 4
    # a 2-GPU job waits for both GPUs; a job asking more than there are takes them all
    assert planner.schedule([(4, 1), (1, 2)], 2) == 5
    assert planner.schedule([(4, 8)], 2) == 4
    assert planner.split_evenly(10, 4) == [3, 3, 2, 2] and planner.split_evenly(1, 3) == [1, 0, 0]


def test_fit_separates_startup_per_image_and_per_megapixel():
    jobs = []
    for size in (32, 64):
        for images in (4, 12):
            mp = size * size / 1e6
            seconds = 5.0 + images * (0.25 + 100.0 * mp)
            jobs.append(
                {
                    "seconds": seconds,
                    "cpu_seconds": seconds / 2,
                    "peak_rss_bytes": 10 + images,
                    "images": images,
                    "megapixels": mp,
                    "size": size,
                }
            )
    entry = bench.stage_costs(jobs, [100], "wall")
    assert entry["startup_s"] == pytest.approx(5.0, abs=1e-3)
    assert entry["per_image_s"] == pytest.approx(0.25, abs=1e-5)
    assert entry["per_megapixel_s"] == pytest.approx(100.0, abs=1e-3)
    assert entry["fits"]["cpu"]["startup_s"] == pytest.approx(2.5, abs=1e-3)
    assert entry["fits"]["wall"]["fit"]["determined"] and entry["peak_rss_bytes"] == 22
    # start-up share of a 100-image shard at 64 px: 5 / (5 + 100 x (0.25 + 100 x 0.004096))
    assert entry["startup_share"]["100"] == pytest.approx(5 / (5 + 100 * 0.6596), abs=1e-4)
    steps = [
        {"seconds": 7 + 2 * n, "cpu_seconds": 7 + 2 * n, "peak_rss_bytes": 1, "steps": n}
        for n in (1, 2, 4)
    ]
    entry = bench.step_costs(steps, "cpu")
    assert (entry["startup_s"], entry["per_step_s"]) == pytest.approx((7.0, 2.0))


def test_run_job_reports_seconds_and_the_peak_rss_of_its_children(tmp_path):
    # a child that allocates ~200 MB reports it; one that allocates nothing reports its own
    # ~10 MB, not the RSS of this process (torch imported, hundreds of MB), which Linux would
    # carry over exec into a child forked from here
    code = "import numpy as np; a = np.ones(25_000_000); print(a.sum())"
    result = bench.run_job([sys.executable, "-c", code], {}, tmp_path, tmp_path / "log")
    assert result["peak_rss_bytes"] > 200e6 and result["seconds"] > 0
    import torch  # noqa: F401  (this process is large now, whatever ran before)

    small = bench.run_job([sys.executable, "-c", "pass"], {}, tmp_path, tmp_path / "log")
    assert small["peak_rss_bytes"] < 60e6 and small["cpu_seconds"] < 5
    with pytest.raises(bench.JobFailed, match="exit 3"):
        bench.run_job([sys.executable, "-c", "raise SystemExit(3)"], {}, tmp_path, tmp_path / "l")
    both = bench.combine([result, {**result, "peak_rss_bytes": 1}])
    assert both["seconds"] == 2 * result["seconds"]
    assert both["peak_rss_bytes"] == result["peak_rss_bytes"]


# -- against Snakemake, and the bench end to end (slow) --------------------------------------------


@pytest.mark.slow
def test_job_counts_equal_a_snakemake_dry_run(tmp_path):
    """Every priced rule's jobs and gathers, as the plan counts them, against Snakemake's own
    count (a dry run of the ci preset at K = 1 and 3)."""
    from tests.workflow_helpers import copy_workflow, planned_jobs

    workdir = copy_workflow(tmp_path / "wf")
    mapping = {"prompts": ["prompts.train", "prompts.testsets"]}
    for k in (1, 3):
        planned = planned_jobs(
            workdir, "--configfile", "workflow/presets/ci.yaml", "--config", f"shards={k}"
        )
        stage = rows(make_plan("ci", 4, 1, k, tmp_path))
        compared = set()
        for rule, count in planned.items():
            name = rule.removesuffix("_gather").replace("rounds_", "r2.")
            names = mapping.get(name, [name])
            if not all(n in stage for n in names):
                continue  # all, report, annotate_*: not priced
            field = "gathers" if rule.endswith("_gather") else "jobs"
            assert sum(stage[n][field] for n in names) == count, (rule, k)
            compared.add(rule)
        assert {"degrade", "candidates_gather", "evaluate", "winrates", "r2.train"} <= {
            r.replace("rounds_", "r2.") for r in compared
        }


@pytest.mark.slow
def test_bench_stages_smoke(tmp_path):
    """The bench at its tiniest: one framework, 32 px, 1 and 2 images, no training."""
    out = tmp_path / "costs.json"
    argv = [
        sys.executable,
        "-m",
        "pipeline",
        "bench",
        "stages",
        "--sizes",
        "32",
        "--counts",
        "1",
        "2",
        "--frameworks",
        "multistep",
        "--train-methods",
        "--warmup",
        "0",
        "--pretrain-steps",
        "4",
        "--shard-images",
        "10",
        "--out",
        str(out),
        "--scratch",
        str(tmp_path / "scratch"),
    ]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    printed = json.loads(result.stdout)
    assert printed["benchmark"] == "stages" and printed["failed_stages"] == {}
    assert printed["verdict"] == "pass" and printed["failed"] == []
    assert printed["not_measured"] == []
    costs = json.loads(out.read_text())
    for key in (
        "degrade",
        "prompts",
        "candidates/multistep",
        "segment",
        "caption",
        "score",
        "select",
        "evaluate/multistep",
        "evaluate/bicubic",
        "winrates",
    ):
        entry = costs["stages"][key]
        assert {p["images"] for p in entry["points"]} == {1, 2}, key
        assert entry["startup_s"] >= 0 and entry["peak_rss_bytes"] > 50e6, key
        assert 0 <= entry["startup_share"]["10"] <= 1, key
    assert {p["steps"] for p in costs["stages"]["pretrain/multistep"]["points"]} == {4, 1}
    assert costs["measured_on"]["threads"] == 1 and costs["measured_on"]["date"]
    # the plan reads what the bench wrote
    config = load_config([str(PRESETS / "ci.yaml")], [])
    plan = planner.plan(config, 8, 1, 2, costs, 2, {}, tmp_path)
    assert rows(plan)["candidates"]["cost_keys"] == ["candidates/multistep"]
