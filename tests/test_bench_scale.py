"""The scale bench (pipeline/bench/scale.py): its parsing of Snakemake's output and benchmark
files, the attribution of peak RSS to jobs, the verdicts, and one tiny run of the real workflow.

Nothing here depends on how fast anything ran: the fast tests feed the functions hand-written
inputs; the slow smoke test checks the report's keys, that its figures are positive, and that
``--check`` fails on an impossible bound.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest

from pipeline import config as config_cli
from pipeline import settings
from pipeline.bench import scale, timing
from pipeline.io.images import read_rgb

SNAKEMAKE_OUTPUT = """\
Building DAG of jobs...
[Mon Dec  7 20:28:43 2026]
rule segment:
    input: results/shards/data/train/1-of-2
    output: results/shards/masks/onestep/1-of-2.zarr, results/shards/masks/onestep/1-of-2.parquet
    log: logs/segment/onestep/1-of-2.log
    jobid: 7
    benchmark: benchmarks/segment/onestep/1-of-2.tsv
    reason: Missing output files: results/shards/masks/onestep/1-of-2.parquet
    wildcards: framework=onestep, scatteritem=1-of-2
    threads: 1
    resources: tmpdir=/tmp, gpu=0
Shell command: python -m pipeline segment --out-zarr results/shards/masks/onestep/1-of-2.zarr

[Mon Dec  7 20:28:50 2026]
localrule select:
    input: results/scores/onestep.parquet
    output: results/pairs/onestep/fidelity.parquet, results/pairs/onestep/fidelity_image.parquet
    log: logs/select/onestep.log
    jobid: 23
    benchmark: benchmarks/select/onestep.tsv
    wildcards: framework=onestep
    resources: tmpdir=/tmp
[Mon Dec  7 20:28:55 2026]
Finished jobid: 23 (Rule: select)
"""


def test_parse_jobs_reads_rule_outputs_benchmark_and_wildcards():
    jobs = scale.parse_jobs(SNAKEMAKE_OUTPUT)
    assert [job["rule"] for job in jobs] == ["segment", "select"]
    segment, select = jobs
    assert segment["output"] == [
        "results/shards/masks/onestep/1-of-2.zarr",
        "results/shards/masks/onestep/1-of-2.parquet",
    ]
    assert segment["benchmark"] == "benchmarks/segment/onestep/1-of-2.tsv"
    assert segment["wildcards"] == {"framework": "onestep", "scatteritem": "1-of-2"}
    assert select["benchmark"] == "benchmarks/select/onestep.tsv"
    assert select["output"][1] == "results/pairs/onestep/fidelity_image.parquet"


def test_add_benchmarks_gives_logged_rules_without_one_a_benchmark(tmp_path):
    rules = tmp_path / "workflow" / "rules"
    rules.mkdir(parents=True)
    (rules / "x.smk").write_text(
        "rule a:\n"
        "    output:\n"
        '        "results/a/{framework}.parquet",\n'
        "    log:\n"
        '        "logs/a/{framework}.log",\n'
        "    shell:\n"
        '        "true"\n'
        "\n\n"
        "rule b:\n"
        "    log:\n"
        '        "logs/b.log",\n'
        "    benchmark:\n"
        '        "benchmarks/b_own.tsv"\n'
        "\n\n"
        "use rule a as c with:\n"
        "    log:\n"
        '        f"logs/c/{ROUND}/gather.log",\n'
    )
    assert scale.add_benchmarks(tmp_path) == ["a", "c"]
    text = (rules / "x.smk").read_text()
    assert '    benchmark:\n        "benchmarks/a/{framework}.tsv"\n    log:' in text
    assert '    benchmark:\n        f"benchmarks/c/{ROUND}/gather.tsv"\n' in text
    assert text.count("benchmark:") == 3  # b keeps its own, once
    assert scale.add_benchmarks(tmp_path) == []  # idempotent


def test_read_benchmark_gives_seconds_rss_and_times(tmp_path):
    path = tmp_path / "job.tsv"
    path.write_text("s\th:m:s\tmax_rss\tcpu_time\n12.5\t0:00:12\t301.25\t9.5\n")
    os.utime(path, (1000.0, 1000.0))
    record = scale.read_benchmark(path)
    assert record == {
        "seconds": 12.5,
        "max_rss_mb": 301.25,
        "cpu_time": 9.5,
        "start": 987.5,
        "end": 1000.0,
    }
    path.write_text("s\th:m:s\tmax_rss\tmax_vms\n0.3\t0:00:00\tNA\tNA\n")
    assert scale.read_benchmark(path)["max_rss_mb"] is None
    assert scale.read_benchmark(tmp_path / "missing.tsv") is None


def _record(pid, ppid, argv, rss_kb, start=100.0, children_kb=0, cpu=1.0, children_cpu=0.0):
    return {
        "pid": pid,
        "ppid": ppid,
        "argv": argv,
        "start": start,
        "end": start + 1,
        "maxrss_kb": rss_kb,
        "children_maxrss_kb": children_kb,
        "cpu_s": cpu,
        "children_cpu_s": children_cpu,
    }


def test_job_processes_are_the_writers_of_its_outputs_and_their_children():
    job = {"output": ["results/pairs/onestep/fidelity.parquet"]}
    py = ["python", "-m", "pipeline"]
    records = [
        _record(10, 1, [*py, "select", "--out-dir", "results/pairs/onestep"], 2048),
        _record(11, 10, ["python", "-c", "from multiprocessing.spawn import spawn_main"], 4096),
        # reads the output: not the job's
        _record(12, 1, [*py, "train", "--pairs", "results/pairs/onestep/fidelity.parquet"], 9999),
        # a child of a reused pid, started before the job: not the job's
        _record(13, 10, ["python", "-c", "pass"], 9999, start=50.0),
        _record(14, 1, [*py, "gather", "--out=results/pairs/onestep/fidelity.parquet"], 1024),
    ]
    chosen = sorted(record["pid"] for record in scale.job_processes(job, records))
    assert chosen == [10, 11, 14]
    assert scale.job_processes({"output": ["elsewhere"]}, records) == []


def test_measure_jobs_joins_benchmark_and_hook_peaks(tmp_path):
    bench = tmp_path / "benchmarks" / "select"
    bench.mkdir(parents=True)
    (bench / "onestep.tsv").write_text("s\tmax_rss\tcpu_time\n2.0\t150.0\t1.0\n")
    records = [
        _record(
            10,
            1,
            ["python", "-m", "pipeline", "select", "--out-dir", "results/pairs/onestep"],
            200 * 1024,
            children_kb=300 * 1024,
            cpu=1.5,
            children_cpu=2.0,
        ),
        # a waited-for child: its CPU is in its parent's children_cpu_s already
        _record(11, 10, ["python", "-c", "pass"], 100, cpu=2.0),
    ]
    jobs = scale.measure_jobs(tmp_path, SNAKEMAKE_OUTPUT, records)
    segment, select = jobs
    assert select["seconds"] == 2.0 and select["benchmark_max_rss_mb"] == 150.0
    assert select["hook_peak_rss_mb"] == 300.0 and select["peak_rss_mb"] == 300.0
    assert select["cpu_s"] == 3.5 and select["processes"] == 2
    assert segment["seconds"] is None and segment["peak_rss_mb"] is None  # no file, no record


def test_rss_bound_pairs_jobs_and_subtracts_the_output_table():
    small = [{"rule": "score_gather", "wildcards": {"framework": "onestep"}, "peak_rss_mb": 100.0}]
    large = [
        {
            "rule": "score_gather",
            "wildcards": {"framework": "onestep"},
            "peak_rss_mb": 150.0,
            "output_table_bytes": 40 * 2**20,
        }
    ]
    bound = scale.rss_bound("score_gather", small, large)
    assert bound["value"] == pytest.approx(1.1)  # (150 - 40) / 100
    assert bound["bound_mb"] == pytest.approx(160.0)
    assert scale.rss_bound("select", small, large) == {}


def test_targets_and_check_exit_status(capsys):
    result = {
        "scale": {"stages": {"select": {"bound": {"value": 1.3}}, "score": {}}},
        "dag": {"seconds": 4.0, "shards": 64},
        "speedup": {"span_ratio_k1_over_k2": {"median": 1.8}},
    }
    targets = {target.name: target for target in scale.targets_of(result)}
    assert set(targets) == {"rss_select", "dag_seconds", "speedup_span"}
    assert not targets["rss_select"].passed
    assert targets["dag_seconds"].passed and targets["speedup_span"].passed
    args = argparse.Namespace(check=True, target=[])
    assert timing.finish(dict(result), list(targets.values()), args) == 1
    assert json.loads(capsys.readouterr().out)["failed"] == ["rss_select"]
    args = argparse.Namespace(check=True, target=["rss_select=1.5"])  # the factor, replaced
    assert timing.finish(dict(result), list(targets.values()), args) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "pass"


def test_stage_timing_spans_from_first_start_to_last_end():
    jobs = [
        {"rule": "score", "seconds": 10.0, "start": 100.0, "end": 110.0, "cpu_s": 6.0},
        {"rule": "score", "seconds": 8.0, "start": 101.0, "end": 109.0, "cpu_s": 7.0},
        {"rule": "score_gather", "seconds": 1.0, "start": 110.0, "end": 111.0, "cpu_s": 1.0},
    ]
    assert scale.stage_timing(jobs, "score") == {
        "jobs": 2,
        "span_s": 10.0,
        "job_seconds": 18.0,
        "cpu_s": 13.0,
        "max_job_cpu_s": 7.0,
    }
    jobs[0]["cpu_s"] = None
    assert scale.stage_timing(jobs, "score")["cpu_s"] is None
    with pytest.raises(RuntimeError):
        scale.stage_timing(jobs, "segment")


def test_sources_are_seeded_small_photos_and_the_overlay_validates(tmp_path):
    ids = scale.write_sources(tmp_path / "a", 5)
    again = scale.write_sources(tmp_path / "b", 5)
    assert ids == again == [f"img{i:05d}" for i in range(5)]
    for name in ids:
        first = read_rgb(tmp_path / "a" / f"{name}.png")
        assert np.array_equal(first, read_rgb(tmp_path / "b" / f"{name}.png"))
        assert first.shape[2] == 3 and 48 <= first.shape[0] == first.shape[1] <= 64
    settings_overlay = scale.overlay(tmp_path / "a", ids[:2], shards=3, threads=1)
    path = scale.write_overlay(tmp_path / "overlay.yaml", settings_overlay)
    merged = config_cli.load_config([str(scale.ROOT / scale.PRESET), str(path)], [])
    effective = settings.effective_config(merged)
    run = effective["run"]
    assert run["frameworks"] == ["onestep"] and run["methods"] == ["dspo"]
    assert run["shards"] == 3 and run["rounds"]["count"] == 1
    degrade = effective["degrade"]
    assert degrade["source"] == str(tmp_path / "a") and degrade["test_ids"] == ids[:2]
    assert degrade["crop_size"] == 32 and degrade["crops_per_image"] == 1


@pytest.mark.slow
def test_tiny_run_reports_every_figure(tmp_path, capsys):
    """Two tiny sizes up to the segment gather (no pretraining: a smoke test of the machinery,
    the real proof runs to select), a dry run at 4 shards, and --check failing on an impossible
    DAG bound."""
    status = scale.main(
        [
            "--images",
            "4",
            "8",
            "--shards",
            "2",
            "--until",
            "segment_gather",
            "--dag-shards",
            "4",
            "--speedup-images",
            "0",
            "--scratch",
            str(tmp_path / "s"),
            "--check",
            "--target",
            "dag_seconds=0.001",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert status == 1 and report["failed"] == ["dag_seconds"]
    assert not (tmp_path / "s").exists()  # removed without --keep
    stages = report["scale"]["stages"]
    # segment reads the data's shards: the data's gather is not upstream of segment_gather
    assert set(stages) == {"degrade", "segment", "segment_gather"}
    for rule, entry in stages.items():
        for n in ("4", "8"):
            assert entry[n]["jobs"] == (1 if rule.endswith("_gather") else 2)
            assert entry[n]["seconds"] > 0 and entry[n]["peak_rss_mb"] > 0
            assert entry[n]["cpu_s"] > 0
        assert entry["rss_ratio"] > 0 and entry["seconds_ratio"] > 0 and entry["cpu_ratio"] > 0
        assert entry["startup_probe"]["wall_s"] > 0 and entry["startup_probe"]["cpu_s"] > 0
        assert set(entry["per_image_s"]) == set(entry["per_image_cpu_s"]) == {"4", "8"}
    bound = stages["segment_gather"]["bound"]
    assert bound["rss_small_mb"] > 0 and bound["output_table_mb"] > 0
    assert report["targets"]["rss_segment_gather"]["value"] == pytest.approx(
        bound["value"], abs=1e-3
    )
    assert set(report["targets"]) == {"rss_segment_gather", "dag_seconds"}
    # the hook found each job's own process (the stage, not a reader of its output)
    jobs = report["scale"]["jobs"]["8"]
    assert all(job["hook_peak_rss_mb"] and job["processes"] >= 1 for job in jobs)
    assert report["dag"]["seconds"] > 0 and report["dag"]["jobs"] > 0
    assert report["dag"]["cpu_s_summary"]["median"] > 0
    assert report["scale"]["runs"]["8"]["wall_s"] > 0
    assert len(report["load_start"]) == 3
