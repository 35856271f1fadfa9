"""``python -m pipeline plan --configfile PRESET [--configfile MORE] --images N --gpus G
[--shards K] [--costs FILE [FILE ...]] [--cores C] [--testset NAME=COUNT[@PX]] [--json]``

What a run of the workflow costs before it starts: per stage, the jobs the configuration's DAG
gives (shard jobs times frameworks, models, test sets, methods; computed from the config with
:mod:`pipeline.settings`, as ``workflow/rules/*.smk`` fans them out), the images each job sees,
the GPU-hours and the wall time on G GPUs, and the critical path through the stage chain.

**Jobs** (docs/design.md §15): every data stage (degrade, prompts, candidates, segment,
caption, score, evaluate, winrates and the later rounds' candidates, caption and score) runs as
K shard jobs of about 1/K of its images, plus one gather job (local, tables and hard links:
counted, not timed). pretrain and train are one job each, on ``gpus.pretrain`` /
``gpus.train`` GPUs; select is one CPU job per framework (per run in later rounds).

**Time of a job** from a costs file (``python -m pipeline bench stages``):
``startup_s + images x (per_image_s + per_megapixel_s x MP)`` with MP the HQ crop's megapixels,
and ``startup_s + steps x per_step_s`` for pretrain (``pretrain.<framework>.steps``) and train
(``train.max_steps``). A stage's wall time schedules its jobs on the G GPUs, longest first,
each job on the ``gpus.<stage>`` GPUs that free up first (Snakemake's ``--resources gpu=G``);
CPU jobs (degrade, prompts with the fixed source, select) on ``--cores / threads`` slots. The
stages chain as the DAG does (pretrain waits for the training split's prompts, candidates for
pretrain, ...); the critical path is the longest chain of stage wall times, and the estimate is
the larger of it and the GPU-hours over G (branches that overlap share the GPUs).

**Honesty.** The costs file says where it was measured; the shipped one
(``pipeline/bench/costs_cpu.json``) was measured on a CPU with the ci preset's tiny models, so
its hours say nothing about the paper's real models on GPUs: it shows the shape of a plan (job
counts, the start-up share of small shards, which stage dominates), not its size. Measure a
costs file on the GPUs with the same bench for hours that mean something. Several files merge:
a stage's cost comes from the last file that has it, and the table names that file. A stage or
training method no file has a cost for is printed as *not modelled* and left out of the totals;
settings the costs were measured with that differ from the config's (sampler steps, metrics,
segmenter, captioner, batch sizes) are listed.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pipeline import contracts, model_names, rounds, settings

DEFAULT_COSTS = Path(__file__).resolve().parent / "bench" / "costs_cpu.json"
#: test sets whose images are not on disk: their images and HQ edge, as the paper evaluates them
#: (StableSR's test crops: RealSR 100 and DRealSR 93 LR/HR pairs of 128/512 px)
KNOWN_TESTSETS = {"RealSR": (100, 512), "DRealSR": (93, 512)}


@dataclass
class Job:
    """One job: its name, GPUs, and its images (of ``megapixels`` each) or training steps."""

    name: str
    gpus: int
    images: int = 0
    megapixels: float = 0.0
    steps: int = 0


@dataclass
class Stage:
    """The jobs of one stage (all frameworks, models, test sets), their cost key(s) and the
    stages it waits for."""

    name: str
    kind: str  # "images" or "steps"
    jobs: list[Job]
    keys: list[str]  # cost keys tried in order (the first found prices the jobs)
    after: list[str] = field(default_factory=list)
    gathers: int = 0
    note: str = ""


# -- the DAG's fan-out (workflow/rules/common.smk and friends) ------------------------------------


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` items over ``parts`` shards as evenly as possible (the hash spreads images
    evenly in expectation); an empty shard is a job too (it writes empty tables)."""
    base, extra = divmod(total, parts)
    return [base + (1 if index < extra else 0) for index in range(parts)]


def candidate_variants(config: Mapping[str, Any], framework: str) -> list[str]:
    return sorted({s["variant"] for s in settings.candidate_settings(config, framework)})


def train_runs(config: Mapping[str, Any], framework: str) -> list[tuple[str, str]]:
    """(method, objective) of every round-1 train job of ``framework`` (ea_adam: one run on
    the front objective, where it runs)."""
    runs = []
    for method in config["methods"]:
        if method == model_names.EA_ADAM:
            if model_names.ea_adam_models(config, framework):
                runs.append((method, contracts.FRONT_OBJECTIVE))
            continue
        runs.extend((method, objective) for objective in config["objectives"])
    return runs


def testset_sizes(
    config: Mapping[str, Any],
    test_images: int,
    crop: int,
    given: Mapping[str, tuple[int, int]],
    root: Path,
) -> dict[str, tuple[int, int, str]]:
    """``{testset: (images, HQ edge px, where the numbers come from)}``: the degrade test split
    for ``results/data/test``, ``--testset`` values, the folder when it is on disk, else the
    paper's crops (:data:`KNOWN_TESTSETS`)."""
    from pipeline.io.testsets import load_testset

    evaluate = settings.job_settings(config, "evaluate")
    cap = int(evaluate["max_images"])
    sizes = {}
    for name, testset in config["testsets"].items():
        if name in given:
            count, px = given[name]
            source = "--testset"
        elif testset["path"] == contracts.artifact("data", split="test"):
            count, px, source = test_images, crop, "the degrade test split"
        elif (root / testset["path"]).exists():
            images = load_testset(
                testset["kind"], root / testset["path"], evaluate["name_suffix_pattern"]
            )
            count, px, source = len(images), crop, f"{len(images)} pairs on disk (HQ edge assumed)"
        elif name in KNOWN_TESTSETS:
            count, px = KNOWN_TESTSETS[name]
            source = "assumed: the paper's test crops (not on disk; --testset NAME=N@PX)"
        else:
            raise SystemExit(
                f"plan: test set {name!r} is not on disk at {testset['path']}: "
                f"give its size with --testset {name}=COUNT[@PX]"
            )
        sizes[name] = (min(count, cap) if cap else count, px, source)
    return sizes


@dataclass
class Fanout:
    """What the stages' jobs are counted from: the resolved config, the shards per data stage,
    the degrade splits and the test sets' sizes (:func:`fanout`)."""

    config: Mapping[str, Any]
    shards: int
    crop: int  # the HQ crop's edge in px
    splits: dict[str, tuple[int, int]]  # degrade split: (source photos, crops per photo)
    train_images: int
    test_images: int
    testsets: dict[str, tuple[int, int, str]]  # as testset_sizes gives them

    @property
    def gpus(self) -> Mapping[str, int]:
        """``gpus.<stage>``: the GPUs one job of a stage takes."""
        return self.config["gpus"]

    @property
    def frameworks(self) -> list[str]:
        """The config's frameworks, in its order."""
        return self.config["frameworks"]

    @property
    def mp(self) -> float:
        """The megapixels of one HQ crop."""
        return self.crop * self.crop / 1e6

    @cached_property
    def max_steps(self) -> int:
        """``train.max_steps``: the steps of every train job, in every round."""
        return int(settings.job_settings(self.config, "train")["max_steps"])

    def sharded(self, label: str, count: int, megapixels: float, gpu: int) -> list[Job]:
        """``count`` images over the K shard jobs of one stage instance (docs/design.md §15)."""
        return [
            Job(f"{label} {i + 1}-of-{self.shards}", gpu, n, megapixels)
            for i, n in enumerate(split_evenly(count, self.shards))
        ]

    def training_shards(self, labels: Sequence[str], gpu: str) -> list[Job]:
        """A stage's shard jobs over the training split, one shard set per label (a framework;
        a run in the later rounds), each job on ``gpus.<gpu>`` GPUs."""
        return [
            job
            for label in labels
            for job in self.sharded(label, self.train_images, self.mp, self.gpus[gpu])
        ]


def fanout(
    config: Mapping[str, Any],
    images: int,
    shards: int,
    given_testsets: Mapping[str, tuple[int, int]],
    root: Path,
) -> Fanout:
    """The image counts of a run of ``images`` source photos on a resolved ``config``: its
    degrade splits, training and test crops, and test sets (:func:`testset_sizes`)."""
    degrade = settings.job_settings(config, "degrade")
    crop = int(degrade["crop_size"])
    if degrade["test_ids"]:
        test_sources = len(degrade["test_ids"])
    else:
        test_sources = int(round(images * degrade["test_fraction"]))
    train_sources = images - test_sources
    train_images = train_sources * int(degrade["crops_per_image"])
    test_images = test_sources * int(degrade["test_crops_per_image"])
    testsets = testset_sizes(config, test_images, crop, given_testsets, root)
    splits = {"train": (train_sources, int(degrade["crops_per_image"]))}
    test_split = contracts.artifact("data", split="test")
    if any(t["path"] == test_split for t in config["testsets"].values()):
        splits["test"] = (test_sources, int(degrade["test_crops_per_image"]))
    return Fanout(config, shards, crop, splits, train_images, test_images, testsets)


def input_stages(fan: Fanout) -> list[Stage]:
    """degrade (CPU, sharded by source photo) and the prompts of the training split and of
    the test sets."""
    jobs = []
    for split, (sources, crops) in fan.splits.items():
        for job in fan.sharded(split, sources, fan.mp, 0):  # a shard holds every crop of its photos
            job.images *= crops
            jobs.append(job)
    fixed = settings.job_settings(fan.config, "prompts")["source"] == "fixed"
    prompt_gpus = 0 if fixed else fan.gpus["prompts"]
    test_jobs = [
        job
        for name, (count, px, _) in fan.testsets.items()
        for job in fan.sharded(name, count, px * px / 1e6, prompt_gpus)
    ]
    return [
        Stage(
            "degrade",
            "images",
            jobs,
            ["degrade"],
            [],
            len(fan.splits),
            note="CPU (no gpu resource); sharded by source photo",
        ),
        Stage(
            "prompts.train",
            "images",
            fan.sharded("train", fan.train_images, fan.mp, prompt_gpus),
            ["prompts"],
            ["degrade"],
            1,
        ),
        Stage(
            "prompts.testsets",
            "images",
            test_jobs,
            ["prompts"],
            ["degrade"],
            0,
            note="no gather: evaluate's shard i reads prompts shard i",
        ),
    ]


def pretrain_stage(fan: Fanout) -> Stage:
    """One pretrain job per framework and variant (the candidates' and the base)."""
    jobs = []
    for fw in fan.frameworks:
        steps = int(settings.job_settings(fan.config, "pretrain", framework=fw)["steps"])
        for variant in sorted({*candidate_variants(fan.config, fw), model_names.BASE_VARIANT}):
            jobs.append(Job(f"{fw}/{variant}", fan.gpus["pretrain"], steps=steps))
    return Stage(
        "pretrain",
        "steps",
        jobs,
        ["pretrain/{fw}"],
        ["prompts.train"],
        note="one job per variant; DDP scaling of a step not modelled",
    )


def round_one_stages(fan: Fanout) -> list[Stage]:
    """Round 1's candidates, segment, caption, score, select and train stages."""
    hq_frame = settings.job_settings(fan.config, "segment")["source"] == "hq"
    sharded = [  # (stage, which is also its gpus key; cost keys; the stages it waits for)
        ("candidates", ["candidates/{fw}", "candidates"], ["pretrain", "prompts.train"]),
        ("segment", ["segment"], ["degrade"] if hq_frame else ["candidates"]),
        ("caption", ["caption"], ["candidates", "segment"]),
        ("score", ["score"], ["candidates", "segment"]),
    ]
    frameworks = fan.frameworks
    stages = [
        Stage(stage, "images", fan.training_shards(frameworks, stage), keys, after, len(frameworks))
        for stage, keys, after in sharded
    ]
    select_jobs = [Job(fw, 0, fan.train_images, fan.mp) for fw in fan.frameworks]
    train_jobs = [
        Job(f"{fw}/{m}/{o}", fan.gpus["train"], steps=fan.max_steps)
        for fw in fan.frameworks
        for m, o in train_runs(fan.config, fw)
    ]
    return [
        *stages,
        Stage(
            "select",
            "images",
            select_jobs,
            ["select"],
            ["caption", "score"],
            note="one CPU job per framework (tables only)",
        ),
        Stage(
            "train",
            "steps",
            train_jobs,
            ["train/{fw}/{method}"],
            ["select"],
            note="one job per method and objective; DDP scaling not modelled",
        ),
    ]


def round_stages(
    fan: Fanout, round_number: int, runs: Sequence[tuple[str, str, str]], previous: str
) -> list[Stage]:
    """Round ``round_number``'s candidates, caption, score, select and train stages of the
    (framework, method, objective) ``runs``, after the stage ``previous`` (docs/design.md §14)."""
    tag = f"r{round_number}"
    names = [f"{fw}/{m}/{o}" for fw, m, o in runs]
    sharded = [  # (stage, which is also its gpus key; cost keys; the stages it waits for)
        ("candidates", ["candidates/{fw}", "candidates"], [previous]),
        ("caption", ["caption"], [f"{tag}.candidates"]),
        ("score", ["score"], [f"{tag}.candidates"]),
    ]
    stages = [
        Stage(f"{tag}.{stage}", "images", fan.training_shards(names, stage), keys, after, len(runs))
        for stage, keys, after in sharded
    ]
    select_jobs = [Job(name, 0, fan.train_images, fan.mp) for name in names]
    train_jobs = [Job(name, fan.gpus["train"], steps=fan.max_steps) for name in names]
    return [
        *stages,
        Stage(
            f"{tag}.select", "images", select_jobs, ["select"], [f"{tag}.caption", f"{tag}.score"]
        ),
        Stage(f"{tag}.train", "steps", train_jobs, ["train/{fw}/{method}"], [f"{tag}.select"]),
    ]


def later_round_stages(fan: Fanout) -> list[Stage]:
    """The stages of rounds 2..R, each round after the previous round's train."""
    stages: list[Stage] = []
    previous = "train"
    for round_number in rounds.later_rounds(fan.config):
        runs = [
            (fw, m, o)
            for fw in fan.frameworks
            for m, o, r in rounds.runs(fan.config)
            if r == round_number
        ]
        stages += round_stages(fan, round_number, runs, previous)
        previous = f"r{round_number}.train"
    return stages


def evaluate_stage(fan: Fanout, after: str) -> Stage:
    """One shard set per framework, test set and evaluated model, after the stage ``after``
    (the last round's train) and the test sets' prompts."""
    jobs, instances = [], 0
    for fw in fan.frameworks:
        for name, (count, px, _) in fan.testsets.items():
            for model in model_names.evaluated_models(fan.config, fw):
                instances += 1
                jobs += fan.sharded(
                    f"{fw}/{name}/{model.name}", count, px * px / 1e6, fan.gpus["evaluate"]
                )
    return Stage(
        "evaluate",
        "images",
        jobs,
        ["evaluate/{model}", "evaluate/{fw}", "evaluate"],
        [after, "prompts.testsets"],
        instances,
        note="one model x test set per shard set",
    )


def winrates_stage(fan: Fanout) -> Stage:
    """One shard set per test set of each framework that has models to compare."""
    jobs, instances = [], 0
    for fw in fan.frameworks:
        if not model_names.winrate_models(fan.config, fw):
            continue
        for name, (count, px, _) in fan.testsets.items():
            instances += 1
            jobs += fan.sharded(f"{fw}/{name}", count, px * px / 1e6, fan.gpus["score"])
    return Stage("winrates", "images", jobs, ["winrates"], ["evaluate"], instances)


def build_stages(
    config: Mapping[str, Any],
    images: int,
    shards: int,
    given_testsets: Mapping[str, tuple[int, int]],
    root: Path,
) -> tuple[list[Stage], dict[str, Any]]:
    """Every stage of the run (jobs, cost keys, upstream stages) and the counts they rest on."""
    config = settings.resolve("", config)
    fan = fanout(config, images, shards, given_testsets, root)
    stages = [*input_stages(fan), pretrain_stage(fan), *round_one_stages(fan)]
    stages += later_round_stages(fan)
    stages += [evaluate_stage(fan, stages[-1].name), winrates_stage(fan)]  # after the last train
    counts = {
        "source_images": images,
        "train_images": fan.train_images,
        "test_images": fan.test_images,
        "crop_px": fan.crop,
        "shards": shards,
        "testsets": {n: {"images": c, "px": p, "from": s} for n, (c, p, s) in fan.testsets.items()},
        "frameworks": fan.frameworks,
        "not_modelled_jobs": not_modelled_jobs(config),
    }
    return stages, counts


def not_modelled_jobs(config: Mapping[str, Any]) -> dict[str, int]:
    """Jobs of the run the plan does not price: the report, the human-evaluation rules and the
    Figure 1 study when it is part of the report."""
    from pipeline.annotate import human_eval

    frameworks = config["frameworks"]
    jobs = {"report (CPU)": len(frameworks)}
    simulated = [fw for fw in frameworks if human_eval.votes_table(config, fw)]
    if simulated:
        jobs["annotate simulate/winrate (CPU)"] = 2 * len(simulated)
    study = settings.resolve("study", config.get("study"))
    if study["in_report"]:
        jobs["study (its own build, select, train and measure jobs)"] = -1
    return jobs


# -- costs and scheduling -------------------------------------------------------------------------


def load_costs(paths: Sequence[str | Path]) -> dict[str, Any]:
    """The costs files, merged (:func:`merge_costs`)."""
    files = []
    for path in paths:
        costs = json.loads(Path(path).read_text())
        if "stages" not in costs:
            raise SystemExit(
                f"plan: {path} is not a costs file (no 'stages'; write one with "
                "`python -m pipeline bench stages`)"
            )
        files.append({**costs, "path": str(path)})
    return merge_costs(files)


def merge_costs(files: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several costs files as one: a stage's cost comes from the last file that has it (e.g. a
    GPU file for the GPU stages after the CPU one), each entry remembering its file."""
    merged: dict[str, Any] = {"stages": {}, "files": []}
    for index, costs in enumerate(files):
        merged["files"].append(
            {
                "path": costs.get("path"),
                "label": costs.get("label", "unlabelled"),
                "measured_on": costs.get("measured_on", {}),
                "caveat": costs.get("caveat", ""),
                "measured_with": costs.get("measured_with") or {},
                "sizes": costs.get("sizes") or [],
            }
        )
        for key, entry in costs["stages"].items():
            merged["stages"][key] = {**entry, "source": index}
    return merged


def cost_keys(keys: Sequence[str], job: Job) -> list[str]:
    """``keys`` with ``{fw}``, ``{method}`` and ``{model}`` filled from the job's name
    (``framework[/method or test set[/objective or model]] [shard]``)."""
    parts = job.name.split(" ")[0].split("/")
    fields = {"fw": parts[0], "method": parts[1] if len(parts) > 1 else "", "model": parts[-1]}
    return [key.format(**fields) for key in keys]


def find_cost(costs: Mapping[str, Any], keys: Sequence[str], job: Job) -> tuple[str, dict] | None:
    """The first of ``keys`` (filled by :func:`cost_keys`) in the costs file, and its entry;
    None if none is there."""
    for name in cost_keys(keys, job):
        if name in costs["stages"]:
            return name, costs["stages"][name]
    return None


def job_seconds(entry: Mapping[str, Any], job: Job) -> float:
    if job.steps:
        return entry["startup_s"] + entry["per_step_s"] * job.steps
    per_image = entry["per_image_s"] + entry["per_megapixel_s"] * job.megapixels
    return entry["startup_s"] + per_image * job.images


def schedule(durations: Sequence[tuple[float, int]], slots: int) -> float:
    """Makespan of jobs ``(seconds, slots needed)`` on ``slots`` slots, longest first, each on
    the slots that free up first (a job needing more than there are takes them all)."""
    free = [0.0] * max(slots, 1)
    heapq.heapify(free)
    end = 0.0
    for seconds, need in sorted(durations, key=lambda d: -d[0]):
        taken = [heapq.heappop(free) for _ in range(min(max(need, 1), len(free)))]
        finish = max(taken) + seconds
        for _ in taken:
            heapq.heappush(free, finish)
        end = max(end, finish)
    return end


def price(
    stages: Sequence[Stage], costs: Mapping[str, Any], gpus: int, cpu_slots: int, threads: int
) -> list[dict[str, Any]]:
    """Per stage: jobs, images, per-job seconds, start-up share, GPU-hours, wall hours."""
    rows = []
    for stage in stages:
        priced, keys_used = [], set()
        missing: dict[str, int] = {}
        for job in stage.jobs:
            found = find_cost(costs, stage.keys, job)
            if found is None:
                wanted = cost_keys(stage.keys, job)[0]
                missing[wanted] = missing.get(wanted, 0) + 1
                continue
            key, entry = found
            keys_used.add(key if len(costs["files"]) == 1 else f"{key}[{entry['source'] + 1}]")
            priced.append((job, entry, job_seconds(entry, job)))
        gpu_jobs = [(s, j.gpus) for j, _, s in priced if j.gpus > 0]
        cpu_jobs = [(s, threads) for j, _, s in priced if j.gpus == 0]
        wall = max(
            schedule(gpu_jobs, gpus) if gpu_jobs else 0.0,
            schedule(cpu_jobs, cpu_slots * threads) if cpu_jobs else 0.0,
        )
        shares = [e["startup_s"] / s for j, e, s in priced if s > 0 and not j.steps]
        too_big = sorted({j.gpus for j in stage.jobs if j.gpus > gpus})
        rows.append(
            {
                "stage": stage.name,
                "kind": stage.kind,
                "jobs": len(stage.jobs),
                "gathers": stage.gathers,
                "gpus_per_job": max((j.gpus for j in stage.jobs), default=0),
                "images": sum(j.images for j in stage.jobs),
                "images_per_job": max((j.images for j in stage.jobs), default=0),
                "steps_per_job": max((j.steps for j in stage.jobs), default=0),
                "seconds_per_job": max((s for _, _, s in priced), default=None),
                "startup_share": round(sum(shares) / len(shares), 4) if shares else None,
                "gpu_hours": sum(s * j.gpus for j, _, s in priced) / 3600,
                "cpu_hours": sum(s for j, _, s in priced if j.gpus == 0) / 3600,
                "wall_hours": wall / 3600,
                "cost_keys": sorted(keys_used),
                "not_modelled": dict(sorted(missing.items())),
                "after": list(stage.after),
                "note": stage.note
                + (
                    f"; jobs ask {too_big} GPUs, more than --gpus {gpus}: "
                    "Snakemake refuses them (capped here)"
                    if too_big
                    else ""
                ),
            }
        )
    return rows


def critical_path(rows: Sequence[Mapping[str, Any]]) -> tuple[float, list[str]]:
    """The longest chain of stage wall hours through the stage DAG, and its stages."""
    by_name = {row["stage"]: row for row in rows}
    best: dict[str, tuple[float, list[str]]] = {}
    for row in rows:  # rows come in an order where every upstream stage is earlier
        upstream = [best[a] for a in row["after"] if a in best]
        length, path = max(upstream, key=lambda u: u[0], default=(0.0, []))
        best[row["stage"]] = (length + by_name[row["stage"]]["wall_hours"], [*path, row["stage"]])
    return max(best.values(), key=lambda b: b[0], default=(0.0, []))


#: the settings of :func:`measured_with` given per framework
PER_FRAMEWORK = ("candidates", "pretrain")


def measured_with(config: Mapping[str, Any], frameworks: Sequence[str]) -> dict[str, Any]:
    """The settings a stage's cost depends on beyond its images and pixels: candidate settings,
    prompt source, segmenter, captioner, metrics, sampler steps, batch sizes. The bench records
    them in the costs file; the plan lists those a config changes."""
    segment = settings.job_settings(config, "segment")
    evaluate = settings.job_settings(config, "evaluate")
    train = settings.job_settings(config, "train")
    return {
        "candidates": {
            fw: [s["name"] for s in settings.candidate_settings(config, fw)] for fw in frameworks
        },
        "prompts": settings.job_settings(config, "prompts")["source"],
        "segment": f"sam {segment['model_type']}"
        if segment["checkpoint"]
        else f"classical {segment['classical']['method']}",
        "caption": settings.job_settings(config, "caption")["captioner"],
        "score": settings.job_settings(config, "score")["metrics"],
        "evaluate": {"metrics": evaluate["metrics"], "steps": evaluate["steps"]},
        "train": {"batch_size": train["batch_size"]},
        "pretrain": {
            fw: {
                k: settings.job_settings(config, "pretrain", framework=fw)[k]
                for k in ("batch_size", "crop_size", "weights")
            }
            for fw in frameworks
        },
    }


def mismatches(costs: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    """Settings the costs were measured with that the config changes (costs not rescaled),
    for the stages each file prices."""
    here = measured_with(config, config["frameworks"])
    lines = []
    for index, file in enumerate(costs["files"]):
        tag = f"[{index + 1}] " if len(costs["files"]) > 1 else ""
        used = {k.split("/")[0] for k, e in costs["stages"].items() if e["source"] == index}
        measured = file["measured_with"]
        if not measured:
            if used:
                lines.append(f"{tag}the costs file records no settings: cannot check them")
            continue
        for key, value in measured.items():
            if key not in here or key not in used:
                continue
            ours = here[key]
            if key in PER_FRAMEWORK:  # only the config's frameworks the file measured
                value = {fw: v for fw, v in value.items() if fw in ours}
                ours = {fw: v for fw, v in ours.items() if fw in value}
            if ours != value:
                lines.append(
                    f"{tag}{key}: measured with {json.dumps(value)}; this config has "
                    f"{json.dumps(ours)}"
                )
    return lines


def extrapolation(costs: Mapping[str, Any], counts: Mapping[str, Any]) -> list[str]:
    """A line per costs file whose image sizes lie far below this plan's: its per-megapixel
    terms are extrapolated (a coefficient fitted at a few thousand pixels, times 100000s)."""
    largest = max([counts["crop_px"], *(t["px"] for t in counts["testsets"].values())])
    lines = []
    for index, file in enumerate(costs["files"]):
        measured = max(file["sizes"], default=0)
        if measured and largest > 2 * measured:
            tag = f"[{index + 1}] " if len(costs["files"]) > 1 else ""
            lines.append(
                f"{tag}per-megapixel costs measured up to {measured} px, applied at "
                f"{largest} px ({(largest / measured) ** 2:.0f}x the pixels): "
                "extrapolated"
            )
    return lines


def plan(
    config: Mapping[str, Any],
    images: int,
    gpus: int,
    shards: int | None,
    costs: Mapping[str, Any],
    cores: int,
    testsets: Mapping[str, tuple[int, int]],
    root: Path = Path("."),
) -> dict[str, Any]:
    """The whole plan as a dict (``--json`` prints it); ``costs``: one costs file's content,
    or several merged by :func:`merge_costs`."""
    if "files" not in costs:
        costs = merge_costs([costs])
    resolved = settings.resolve("", config)
    shards = shards or int(resolved.get("shards", 1))
    stages, counts = build_stages(config, images, shards, testsets, root)
    threads = int(resolved["threads"])
    cpu_slots = max(1, cores // threads)
    rows = price(stages, costs, gpus, cpu_slots, threads)
    length, path = critical_path(rows)
    gpu_hours = sum(r["gpu_hours"] for r in rows)
    return {
        "images": images,
        "gpus": gpus,
        "shards": shards,
        "cores": cores,
        "threads": threads,
        "counts": counts,
        "costs": [
            {k: f[k] for k in ("path", "label", "measured_on", "caveat")} for f in costs["files"]
        ],
        "stages": rows,
        "totals": {
            "jobs": sum(r["jobs"] for r in rows),
            "gather_jobs": sum(r["gathers"] for r in rows),
            "gpu_hours": gpu_hours,
            "cpu_hours": sum(r["cpu_hours"] for r in rows),
            "critical_path_hours": length,
            "critical_path": path,
            "gpu_bound_hours": gpu_hours / gpus,
            "estimate_hours": max(length, gpu_hours / gpus),
            "not_modelled": {r["stage"]: r["not_modelled"] for r in rows if r["not_modelled"]},
        },
        "mismatched_settings": mismatches(costs, resolved),
        "extrapolated": extrapolation(costs, counts),
    }


# -- printing -------------------------------------------------------------------------------------


def _hours(value: float) -> str:
    if value < 1 / 60:
        return f"{value * 3600:.0f}s"
    if value < 1:
        return f"{value * 60:.1f}m"
    return f"{value:.1f}h"


def _missing(keys: Mapping[str, int]) -> str:
    return ", ".join(f"{key} ({n} job{'s' if n > 1 else ''})" for key, n in keys.items())


def render(result: Mapping[str, Any]) -> str:
    counts = result["counts"]
    lines = [
        f"plan: {result['images']} source images -> {counts['train_images']} training and "
        f"{counts['test_images']} test crops of {counts['crop_px']} px; "
        f"{result['gpus']} GPUs, {result['shards']} shard(s) per data stage, "
        f"{result['cores']} cores ({result['threads']} thread(s) a job)",
    ]
    several = len(result["costs"]) > 1
    for index, costs in enumerate(result["costs"]):
        where = costs["measured_on"]
        tag = f" [{index + 1}]" if several else ""
        lines.append(
            f"costs{tag}: {costs['label']} ({where.get('date', '?')}, threads "
            f"{where.get('threads', '?')})"
        )
        if where.get("device", "cpu") == "cpu" or costs["caveat"]:
            lines.append(
                "  NOTE: " + (costs["caveat"] or "measured on a CPU") + ". The hours "
                "below apply those costs to this DAG."
            )
    lines.append(
        "test sets: "
        + "; ".join(
            f"{n} {t['images']} x {t['px']} px ({t['from']})" for n, t in counts["testsets"].items()
        )
    )
    header = (
        f"{'stage':<17} {'jobs':>6} {'gath':>4} {'gpu/j':>5} {'per job':>15} "
        f"{'s/job':>9} {'start-up':>8} {'GPU-h':>9} {'CPU-h':>7} {'wall':>8}  cost"
    )
    lines += ["", header, "-" * len(header)]
    for row in result["stages"]:
        per_job = (
            f"{row['steps_per_job']} steps"
            if row["kind"] == "steps"
            else f"{row['images_per_job']} img"
        )
        seconds = "-" if row["seconds_per_job"] is None else f"{row['seconds_per_job']:.1f}"
        share = "-" if row["startup_share"] is None else f"{row['startup_share']:.0%}"
        where_cost = ",".join(row["cost_keys"]) or "-"
        if row["not_modelled"]:
            where_cost += "; NOT MODELLED: " + _missing(row["not_modelled"])
        lines.append(
            f"{row['stage']:<17} {row['jobs']:>6} {row['gathers']:>4} "
            f"{row['gpus_per_job']:>5} {per_job:>15} {seconds:>9} {share:>8} "
            f"{row['gpu_hours']:>9.2f} {row['cpu_hours']:>7.2f} "
            f"{_hours(row['wall_hours']):>8}  {where_cost}"
        )
    totals = result["totals"]
    lines += [
        "-" * len(header),
        f"jobs {totals['jobs']} (+ {totals['gather_jobs']} gather jobs, local, not timed); "
        f"GPU-hours {totals['gpu_hours']:.2f}; CPU-job hours {totals['cpu_hours']:.2f}",
        f"critical path {_hours(totals['critical_path_hours'])}: "
        + " -> ".join(totals["critical_path"]),
        f"GPU-bound floor (GPU-hours / {result['gpus']}): {_hours(totals['gpu_bound_hours'])}; "
        f"estimate (the larger): {_hours(totals['estimate_hours'])}",
        "start-up: the share of a job's seconds spent before its first image (imports, "
        "model load), averaged over the stage's jobs",
    ]
    if totals["not_modelled"]:
        lines.append(
            "not modelled (no cost in the file; left out of the totals): "
            + "; ".join(
                f"{stage}: {_missing(keys)}" for stage, keys in totals["not_modelled"].items()
            )
        )
    others = counts["not_modelled_jobs"]
    lines.append(
        "not modelled (not priced): "
        + ", ".join(f"{name} {n if n >= 0 else ''}".rstrip() for name, n in others.items())
        + "; gather jobs; EA-Adam phases and online sampling beyond the per-step cost"
    )
    lines += [f"NOTE: {line}" for line in result["extrapolated"]]
    if result["mismatched_settings"]:
        lines.append("costs measured with other settings (not rescaled):")
        lines += [f"  {line}" for line in result["mismatched_settings"]]
    return "\n".join(lines)


def parse_testset(value: str) -> tuple[str, tuple[int, int]]:
    name, sep, rest = value.partition("=")
    count, _, px = rest.partition("@")
    if not sep or not name or not count.isdigit() or (px and not px.isdigit()):
        raise argparse.ArgumentTypeError(f"--testset expects NAME=COUNT[@PX], got {value!r}")
    return name, (int(count), int(px) if px else 512)


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import load_config

    parser = argparse.ArgumentParser(
        prog="python -m pipeline plan", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument(
        "--configfile",
        nargs="+",
        action="extend",
        default=[],
        metavar="FILE",
        help="as snakemake --configfile (default: config.yaml)",
    )
    parser.add_argument("--config", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--images", type=int, required=True, help="source images (degrade's)")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs of the run")
    parser.add_argument(
        "--shards",
        type=int,
        default=None,
        help="shards per data stage (default: the config's shards)",
    )
    parser.add_argument(
        "--costs",
        nargs="+",
        default=[str(DEFAULT_COSTS)],
        help="costs file(s) of `python -m pipeline bench stages`; a stage's cost comes from the "
        "last file that has it",
    )
    parser.add_argument("--cores", type=int, default=32, help="CPU cores for the CPU jobs")
    parser.add_argument(
        "--testset",
        type=parse_testset,
        action="append",
        default=[],
        metavar="NAME=COUNT[@PX]",
        help="a test set's images (and HQ edge)",
    )
    parser.add_argument("--root", default=".", help="where the config's relative paths lie")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    if args.images < 1 or args.gpus < 1 or (args.shards is not None and args.shards < 1):
        parser.error("--images, --gpus and --shards must be >= 1")
    try:
        config = load_config(args.configfile, args.config)
        result = plan(
            config,
            args.images,
            args.gpus,
            args.shards,
            load_costs(args.costs),
            args.cores,
            dict(args.testset),
            Path(args.root),
        )
    except (settings.ConfigError, FileNotFoundError) as error:
        print(f"plan: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
