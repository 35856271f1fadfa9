"""The benches' shared machinery (pipeline.bench.timing) and each bench's command line.

No assertion here depends on how fast anything ran: the timing functions get a fake clock,
and each bench runs once at a tiny size with an impossible target to see ``--check`` fail.
"""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from pipeline.bench import timing


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    """The benches pin threads (torch and environment): put both back afterwards."""
    for name in timing.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)  # monkeypatch restores the original at teardown
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# -- summaries and ratios ------------------------------------------------------------------------


def test_summarize_hand_values():
    assert timing.summarize([5.0, 1.0, 4.0, 2.0, 3.0]) == {
        "n": 5,
        "min": 1.0,
        "median": 3.0,
        "max": 5.0,
        "iqr": 2.0,  # inclusive quartiles 2 and 4
        "range": 4.0,
    }
    assert timing.summarize([1.0, 2.0, 3.0, 10.0])["median"] == 2.5
    one = timing.summarize([0.25])
    assert one["min"] == one["median"] == one["max"] == 0.25 and one["iqr"] == one["range"] == 0
    with pytest.raises(ValueError):
        timing.summarize([])


def test_paired_ratio_pairs_the_same_rounds():
    # round 1: 2/1, round 2: 6/2 -> ratios 2 and 3 (the ratio of medians would be 4/1.5)
    ratio = timing.paired_ratio([2.0, 6.0], [1.0, 2.0])
    assert (ratio["min"], ratio["median"], ratio["max"], ratio["range"]) == (2.0, 2.5, 3.0, 1.0)
    assert timing.paired_ratio([2.0, 6.0], [1.0, 2.0], scale=2.0)["median"] == 1.25
    with pytest.raises(ValueError):
        timing.paired_ratio([1.0, 2.0], [1.0])


# -- interleaving --------------------------------------------------------------------------------


def test_interleave_calls_the_variants_in_turn_and_times_each_call():
    log, now = [], [0.0]

    def variant(name: str, seconds: float):
        def call():
            log.append(name)
            now[0] += seconds

        return call

    times = timing.interleave(
        {"a": variant("a", 1.0), "b": variant("b", 3.0), "c": variant("c", 0.5)},
        repeats=2,
        warmup=1,
        clock=lambda: now[0],
    )
    assert log == ["a", "b", "c"] * 3  # one warm-up round, then two timed rounds: A B C A B C
    assert times == {"a": [1.0, 1.0], "b": [3.0, 3.0], "c": [0.5, 0.5]}
    with pytest.raises(ValueError):
        timing.interleave({"a": variant("a", 1.0)}, repeats=0)


def test_pin_threads_sets_torch_and_the_child_environment():
    assert timing.pin_threads(2) == 2
    assert torch.get_num_threads() == 2
    assert all(os.environ[name] == "2" for name in timing.THREAD_VARIABLES)
    with pytest.raises(ValueError):
        timing.pin_threads(0)


# -- targets and the verdict ---------------------------------------------------------------------


def test_targets_compare_and_bounds_can_be_replaced():
    assert timing.Target("r", 3.0, ">=", 3.0).passed
    assert not timing.Target("r", 3.0, ">", 3.0).passed
    assert timing.Target("r", 1.0, "<=", 1.1).passed
    assert not timing.Target("r", 1.2, "<", 1.1).passed
    with pytest.raises(ValueError):
        timing.Target("r", 1.0, "==", 1.0)
    (replaced,) = timing.apply_overrides([timing.Target("r", 3.0, ">=", 3.0)], {"r": 100.0})
    assert replaced.bound == 100.0 and not replaced.passed
    with pytest.raises(ValueError, match="unknown target"):
        timing.apply_overrides([timing.Target("r", 3.0, ">=", 3.0)], {"typo": 1.0})
    assert timing.parse_overrides(["a=3", "b=0.5"]) == {"a": 3.0, "b": 0.5}
    with pytest.raises(ValueError):
        timing.parse_overrides(["a:3"])


def test_finish_exits_non_zero_only_under_check_when_a_target_fails(capsys):
    targets = [timing.Target("fast", 2.0, ">=", 3.0), timing.Target("small", 1.0, "<", 2.0)]
    args = argparse.Namespace(check=False, target=[])
    assert timing.finish({"benchmark": "x"}, targets, args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "fail" and report["failed"] == ["fast"]
    assert report["targets"]["small"]["passed"] is True
    assert timing.finish({}, targets, argparse.Namespace(check=True, target=[])) == 1
    capsys.readouterr()
    passing = argparse.Namespace(check=True, target=["fast=2"])
    assert timing.finish({}, targets, passing) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "pass"


# -- tensors saved for backward ------------------------------------------------------------------


def test_saved_tensor_peak_on_hand_computable_graphs():
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)  # 24 bytes
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)  # 24 bytes
    # mul saves both operands (each is needed for the other's gradient); sum saves no tensor
    assert timing.saved_tensor_peak(lambda: (x * w).sum().backward()) == 48
    assert timing.saved_tensor_peak(lambda: (x * w).sum().backward(), exclude=[w]) == 24
    constant = torch.randn(3, dtype=torch.float64)  # w's gradient needs it; x is not needed
    assert timing.saved_tensor_peak(lambda: (constant * w).sum().backward()) == 24
    # two views of x: one storage, counted once
    assert timing.saved_tensor_peak(lambda: (x[:2] * x[1:]).sum().backward()) == 24

    def two_steps():  # the first graph is released by its backward before the second is built
        (x * w).sum().backward()
        (x * w).sum().backward()

    assert timing.saved_tensor_peak(two_steps) == 48
    # two graphs alive together: x, w and exp's result (24 bytes)
    assert timing.saved_tensor_peak(lambda: ((x * w).sum() + x.exp().sum()).backward()) == 72


def test_saved_tensor_peak_counts_storages_out_when_autograd_releases_them():
    x = torch.randn(4, requires_grad=True)  # float32: 16 bytes
    tracker = timing.SavedTensorPeak()
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        loss = (x * x).sum()  # saves x twice: one storage
    assert tracker.live_bytes == 16
    loss.backward()
    assert tracker.live_bytes == 0 and tracker.peak_bytes == 16
    assert torch.equal(x.grad, 2 * x.detach())  # the unpacked tensors are the saved ones


# -- each bench's command line: tiny, one round, --check with an impossible bound ----------------


def run_bench(module, argv, capsys) -> tuple[int, dict]:
    status = module.main(argv)
    out = capsys.readouterr().out
    return status, json.loads(out[out.index("{") :])


def check_report(report: dict, variants: list[str], repeats: int) -> None:
    assert report["threads"] == 1
    assert report["order"] == "interleaved: " + " ".join(variants) + " per round"
    for name in variants:
        assert report["seconds"][name]["n"] == repeats


def test_bench_train_step_memory_and_check(capsys):
    from pipeline.bench import train_step

    argv = ["--size", "16", "--batch", "1", "--instances", "2", "--candidates", "3"]
    argv += ["--repeats", "1", "--warmup", "0", "--check", "--target", "naive_over_dspo=1e9"]
    argv += ["--target", "dspo_over_scaled_dpo=1e9", "--target", "two_pass_over_one_pass=1e9"]
    argv += ["--target", "two_pass_memory_over_one_candidate=1e9"]  # only the first can fail
    argv += ["--train-methods"]  # none: the rows through the train stage have their own test
    status, report = run_bench(train_step, argv, capsys)
    assert status == 1 and report["failed"] == ["naive_over_dspo"]
    check_report(report, list(train_step.METHODS), 1)
    assert "train_step" not in report
    assert set(report["ratios"]) == {
        "naive_over_dspo",
        "dspo_over_dpo",
        "dspo_over_scaled_dpo",
        "two_pass_over_one_pass",
    }
    saved = report["saved_for_backward_bytes"]
    assert set(saved) == {*train_step.METHODS, "one_candidate_forward"}
    # two-pass: the activations of one candidate per LQ, like SFT's single winner
    assert saved["dspo_two_pass"] == pytest.approx(saved["one_candidate_forward"], rel=0.01)
    assert saved["dspo_two_pass"] == pytest.approx(saved["sft"], rel=0.01)
    # candidates forwarded with gradients: sft 1, dpo 2, dspo and dro the distinct ones (3 here),
    # naive 2 per instance
    assert 0 < saved["sft"] < saved["dpo"] < saved["dspo"] < saved["naive"]
    assert saved["dro"] == pytest.approx(saved["dspo"], rel=1e-3)
    distinct = report["distinct_mean"]
    assert saved["dspo"] == pytest.approx(distinct / 2 * saved["dpo"], rel=0.05)


@pytest.mark.slow
def test_bench_train_step_times_every_method_through_the_train_stage(capsys):
    """The online methods' rows at smoke size: one step of each through pipeline.train.train,
    measured as the difference of a 1-step and a 2-step run, with its ratio to dspo's."""
    from pipeline import contracts
    from pipeline.bench import train_step

    methods = ["dspo", "dro_online", "ddpo", "gdpo", "gdpo_instance"]
    argv = ["--size", "16", "--batch", "2", "--instances", "2", "--candidates", "3"]
    argv += ["--repeats", "1", "--warmup", "0", "--methods", "dspo", "--train-steps", "1"]
    argv += ["--policy-steps", "2", "--group-size", "2", "--train-methods", *methods]
    status, report = run_bench(train_step, argv, capsys)
    assert status == 0
    block = report["train_step"]
    assert block["methods"] == methods
    calls = [f"{m}@{k}" for m in methods for k in (1, 2)]
    assert block["order"] == "interleaved: " + " ".join(calls) + " per round"
    assert set(block["calls_seconds"]) == set(calls)
    for m in methods:
        one, two = block["calls_seconds"][f"{m}@1"], block["calls_seconds"][f"{m}@2"]
        assert block["seconds_per_step"][m]["median"] == pytest.approx(
            two["median"] - one["median"], abs=2e-5
        )  # one round: the per-step time is the difference of the two calls
        assert block["settings"]["loops"][m] == contracts.method(m).loop
    assert block["over_dspo"]["dspo"]["median"] == 1.0
    assert set(block["over_dspo"]) == set(methods)
    # the settings each job ran with: the command line's group size and DDIM steps
    assert block["settings"]["train"]["ddpo"]["policy_group_size"] == 2
    assert block["settings"]["train"]["dro_online"]["dro_sampler_steps"] == 2
    assert block["settings"]["train"]["dspo"]["batch_size"] == 2
    fidelity = train_step.TRAIN_CONFIG["select"]["objectives"]["fidelity"]
    assert block["settings"]["reward"]["objectives"] == {"fidelity": fidelity}


def test_bench_train_step_refuses_a_method_that_is_not_registered():
    from pipeline import contracts
    from pipeline.bench import train_step

    assert set(train_step.TRAIN_METHODS) <= set(contracts.METHODS)  # the default rows all exist
    with pytest.raises(ValueError, match="not registered.*dspo"):
        train_step.main(["--train-methods", "dspo", "ppo_typo", "--methods", "dspo"])


def test_bench_sample_check(capsys):
    from pipeline.bench import sample

    argv = ["--images", "2", "--size", "16", "--batch", "2", "--repeats", "2", "--warmup", "0"]
    status, report = run_bench(
        sample, [*argv, "--check", "--target", "single_over_batched=1e9"], capsys
    )
    assert status == 1 and report["verdict"] == "fail"
    check_report(report, ["batched", "single"], 2)


def test_bench_iqa_check(capsys):
    from pipeline.bench import iqa

    argv = ["--size", "128", "--metrics", "psnr", "ssim", "--repeats", "1", "--warmup", "0"]
    status, report = run_bench(
        iqa, [*argv, "--check", "--target", "per_crop_over_pooled=1e9"], capsys
    )
    assert status == 1 and report["failed"] == ["per_crop_over_pooled"]
    assert report["order"].split()[1:4] == ["pooled/psnr", "per_crop/psnr", "per_crop_batched/psnr"]
    for way in iqa.WAYS:
        assert report["seconds"][way]["n"] == 1


def test_bench_segment_check(capsys):
    from pipeline.bench import segment

    argv = ["--size", "32", "--repeats", "1", "--warmup", "0", "--check"]
    argv += ["--target", "segment_over_partition=0"]  # always met: only the store's can fail
    status, report = run_bench(segment, [*argv, "--target", "zarr_over_uint16=0"], capsys)
    assert status == 1 and report["failed"] == ["zarr_over_uint16"]
    check_report(report, ["segment", "partition"], 1)


def test_bench_degrade_check(capsys):
    from pipeline.bench import degrade

    argv = ["--pairs", "2", "--crop", "32", "--workers", "1", "--repeats", "1", "--warmup", "0"]
    status, report = run_bench(
        degrade, [*argv, "--check", "--target", "scaling_vs_machine=1e9"], capsys
    )
    assert status == 1 and report["failed"] == ["scaling_vs_machine"]
    check_report(report, ["one_process", "workers", "spin_one", "spin_workers", "chain"], 1)


def test_bench_gpu_smoke_path_on_the_cpu(capsys):
    """`bench gpu` at smoke scale: SD 2-base's architecture at tiny widths, every measurement
    present; two-pass DSPO saves a quarter of one-pass's activations (4 candidates per LQ)."""
    from pipeline.bench import gpu

    argv = ["--scale", "smoke", "--resolution", "64", "--batches", "1", "--repeats", "1"]
    status, report = run_bench(
        gpu, [*argv, "--warmup", "0", "--sample-steps", "2", "--check"], capsys
    )
    assert status == 0 and report["device"] == "cpu"
    entry = report["steps"]["batch1"]
    assert set(entry["seconds"]) == {"dpo", "dspo", "dspo_two_pass"}
    saved = entry["saved_for_backward_bytes"]
    assert saved["dspo_two_pass"] < saved["dpo"] < saved["dspo"]
    assert set(report["sampling_images_per_second"]) == {"multistep_batch1", "onestep_batch1"}
    assert gpu.SD2_UNET["block_out_channels"] == (320, 640, 1280, 1280)
