"""Scale proof of the sharded data stages: memory and time at two image counts, the DAG at many
shards, and the speed-up of two shards over one (docs/design.md §15).

``python -m pipeline bench scale [--images 100 1000] [--shards 2] [--cores 2]
[--until select] [--dag-shards 64] [--speedup-images 200] [--parts scale dag speedup]
[--repeats 1] [--warmup 0] [--threads 1] [--scratch DIR] [--keep] [--check]
[--target NAME=BOUND]`` prints one JSON object.

**What runs.** The real workflow (Snakemake, the rules of ``workflow/rules``), each time in a
fresh copy of the repository's workflow (:func:`tests.workflow_helpers.copy_workflow`'s files)
under ``--scratch``, with the ci preset and an overlay: one-step framework, method dspo, one
round, ``shards: K``, ``threads``, and as the degrade source a folder of N small photos (48 to
64 px squares cut at seeded positions from scikit-image's photos; 32 px crops, one per photo,
two photos in the test split). Every run is ``--resources gpu=0``, the scale runs
``--until select`` (``--until``: a smaller DAG for a smoke test).

1. *Scale* (``--images``, same K): per stage, from Snakemake's benchmark files of each of its
   jobs (the K shard jobs, the gather, select): the wall seconds summed over the jobs and the
   peak RSS. Memory comes two ways: ``benchmark_max_rss_mb``, Snakemake's (the sum over the
   job's process tree, sampled every 0.5 s for 15 s, then every 30 s, so it can miss a peak)
   and ``peak_rss_mb``, the kernel's high-water mark (``ru_maxrss``) of the job's largest
   process, written at exit by a ``sitecustomize`` hook on the jobs' ``PYTHONPATH``; the
   verdicts use ``peak_rss_mb`` (the benchmark's where the hook recorded nothing). Time: wall
   ``seconds`` and ``cpu_s`` (the hook's CPU seconds of the job's processes and the children
   they waited for: on a loaded machine a job waits for a core, and only its CPU seconds say
   how its work grows) at each N; the start-up per job (``startup_probe``, wall and CPU: the
   job's command up to the stage's argument parsing, ``python -m pipeline [run-gpu ... --]
   STAGE --help``, imports and interpreter start, measured once); ``per_image_s`` and
   ``per_image_cpu_s`` = (seconds - jobs x start-up) / N at each N and their ratios (1 when
   the stage is linear); ``two_point_fit[_cpu]``: the start-up per job and the per-image
   seconds that the two sizes alone imply (a negative start-up means growth faster than
   linear).
2. *DAG*: ``snakemake -n --config shards=DAG_SHARDS`` (default target) in the copy of the
   largest N, its wall and CPU seconds (the Snakemake process's: about its wall on an idle
   core) and job count, and the same at the scale runs' K, to compare (in turn, ``--repeats``
   rounds after ``--warmup`` ones).
3. *Speed-up*: candidates, segment and score with K = 1 and K = 2 (``--speedup-images``
   photos, two copies, each run to select once untimed: degrade and pretrain are not timed),
   then per round each stage in turn forced to rerun alone (``--forcerun S --until S``) at
   K = 1 then K = 2. ``span_s``: first job start to last job end (benchmark file mtime minus
   its seconds); ``job_seconds``: the jobs' summed wall; ``cpu_s``, ``max_job_cpu_s``: their
   CPU seconds. Ratios K1 / K2 per round; ``idle_estimate_k1_over_k2``: the K = 1 CPU seconds
   over the larger K = 2 job's, summed over the stages, what two idle cores would give if the
   jobs are CPU-bound (on a loaded machine the measured span ratio says little). With a
   start-up of s seconds per job and W seconds of per-image work at K = 1, two idle cores give
   (s + W) / (s + W / 2), at least 1.7 only when W >= 4.7 x s: hence the default 200 photos.

**Targets** (``--check`` exits 1 if one fails; ``--target NAME=BOUND`` replaces a bound):
``rss_<rule>`` for every gather rule and select: (peak RSS at the largest N - the byte size of
its output tables in memory (pyarrow ``Table.nbytes``)) / peak RSS at the smallest N ``<= 1.2``
(the bound "RSS(large) <= 1.2 x RSS(small) + output table"); ``dag_seconds < 10``;
``speedup_span >= 1.7`` (median over rounds of the summed spans of the three stages, K1 / K2).
The load average (1, 5, 15 min) is recorded beside every figure: on a loaded machine the times
and the speed-up say little (2 cores shared), the memory figures still hold.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench import timing

ROOT = Path(__file__).resolve().parents[2]
#: what :func:`tests.workflow_helpers.copy_workflow` copies (the bench must not import tests/)
WORKFLOW_FILES = (
    "Snakefile",
    "config.yaml",
    "workflow",
    "profiles",
    "envs",
    "pipeline",
    "pyproject.toml",
)
PRESET = "workflow/presets/ci.yaml"
#: the photos the sources are cut from (all shipped inside scikit-image)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
#: photos in the test split (the first ids): the test split stays small at any N
TEST_IMAGES = 2
#: the data stages timed by the speed-up part
SPEEDUP_STAGES = ("candidates", "segment", "score")
#: rules that run their command through ``python -m pipeline run-gpu`` (workflow/rules/*.smk)
RUN_GPU_RULES = ("prompts", "candidates", "segment", "caption", "score")
#: the bench's three parts (``--parts``)
PARTS = ("scale", "dag", "speedup")
RSS_FACTOR = 1.2
DAG_BOUND_S = 10.0
SPEEDUP_BOUND = 1.7
HOOK_VARIABLE = "DSPO_SCALE_RSS_DIR"

#: written as ``sitecustomize.py`` on the jobs' PYTHONPATH: each Python process records its
#: kernel peak RSS and CPU seconds (and those of the children it waited for) when it exits
HOOK = '''"""Bench hook (pipeline/bench/scale.py): record this process's peak RSS and CPU at exit."""
import os as _os

if _os.environ.get("HOOK_VARIABLE"):
    import atexit as _atexit
    import json as _json
    import resource as _resource
    import sys as _sys
    import time as _time

    _START = _time.time()

    def _record():
        try:
            own = _resource.getrusage(_resource.RUSAGE_SELF)
            children = _resource.getrusage(_resource.RUSAGE_CHILDREN)
            record = {
                "pid": _os.getpid(),
                "ppid": _os.getppid(),
                "argv": list(getattr(_sys, "orig_argv", _sys.argv)),
                "start": _START,
                "end": _time.time(),
                "maxrss_kb": own.ru_maxrss,
                "children_maxrss_kb": children.ru_maxrss,
                "cpu_s": own.ru_utime + own.ru_stime,
                "children_cpu_s": children.ru_utime + children.ru_stime,
            }
            folder = _os.environ["HOOK_VARIABLE"]
            name = f"{_os.getpid()}-{int(_START * 1e6)}"
            with open(_os.path.join(folder, name) + ".tmp", "w") as sink:
                _json.dump(record, sink)
            path = _os.path.join(folder, name)
            _os.replace(path + ".tmp", path + ".json")
        except Exception:
            pass

    _atexit.register(_record)
'''.replace("HOOK_VARIABLE", HOOK_VARIABLE)


# -- inputs ---------------------------------------------------------------------------------------


def write_sources(folder: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` PNG photos ``img00000.png`` ...: squares of 48 to 64 px cut at seeded
    positions from scikit-image's photos; returns their ids in order."""
    from skimage import data

    from pipeline.io.images import write_png

    photos = [getattr(data, name)() for name in PHOTOS]
    photos = [photo[..., :3] for photo in photos]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for index in range(count):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(48, 65))
        top = int(rng.integers(photo.shape[0] - side + 1))
        left = int(rng.integers(photo.shape[1] - side + 1))
        name = f"img{index:05d}"
        write_png(
            folder / f"{name}.png",
            np.ascontiguousarray(photo[top : top + side, left : left + side]),
        )
        ids.append(name)
    return ids


def overlay(source: Path, test_ids: Sequence[str], shards: int, threads: int) -> dict[str, Any]:
    """The settings laid over the ci preset (lists replace, mappings merge)."""
    return {
        "frameworks": ["onestep"],
        "methods": ["dspo"],
        "rounds": {"count": 1, "methods": ["dspo"]},
        "shards": shards,
        "threads": threads,
        "degrade": {
            "source": str(source),
            "crop_size": 32,
            "crops_per_image": 1,
            "test_crops_per_image": 1,
            "test_ids": list(test_ids),
        },
    }


def write_overlay(path: Path, settings: Mapping[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(dict(settings), sort_keys=False))
    return path


def copy_workflow(destination: Path) -> Path:
    """The workflow's files (code included) copied to ``destination``, as the workflow tests
    copy them (tests/workflow_helpers.py)."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(
                source, destination / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(source, destination / name)
    return destination


_RULE_HEAD = re.compile(r"^(?:rule (\w+):|use rule \w+ as (\w+) with:)")
_LOG_LITERAL = re.compile(r'^(\s+)(f?)"logs/(.+)\.log",?\s*$')


def add_benchmarks(workdir: Path) -> list[str]:
    """Give every rule of the copy that has a one-path ``log:`` but no ``benchmark:`` a
    benchmark file beside it (``logs/X.log`` -> ``benchmarks/X.tsv``), so that gathers and
    select are measured like the shard jobs; returns the rules changed (none once the rules
    carry their own)."""
    changed = []
    for path in sorted((workdir / "workflow" / "rules").glob("*.smk")):
        lines = path.read_text().splitlines(keepends=True)
        heads = [i for i, line in enumerate(lines) if _RULE_HEAD.match(line)]
        inserts = []
        for number, start in enumerate(heads):
            end = heads[number + 1] if number + 1 < len(heads) else len(lines)
            for j in range(start + 1, end):
                if lines[j] and not lines[j][0].isspace() and lines[j].strip():
                    end = j
                    break
            block = lines[start:end]
            if any(line.strip() == "benchmark:" for line in block):
                continue
            for j in range(start + 1, end - 1):
                literal = _LOG_LITERAL.match(lines[j + 1])
                if lines[j].strip() == "log:" and literal:
                    indent, prefix, stem = literal.groups()
                    head = _RULE_HEAD.match(lines[start])
                    changed.append(head.group(1) or head.group(2))
                    inserts.append(
                        (
                            j,
                            [
                                lines[j].replace("log:", "benchmark:"),
                                f'{indent}{prefix}"benchmarks/{stem}.tsv"\n',
                            ],
                        )
                    )
                    break
        for j, new in reversed(inserts):
            lines[j:j] = new
        if inserts:
            path.write_text("".join(lines))
    return changed


# -- running --------------------------------------------------------------------------------------


def snakemake_env(hook_dir: Path, records: Path) -> dict[str, str]:
    """This interpreter first on PATH (the rules call ``python``), the RSS hook on
    PYTHONPATH, records into ``records``."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    python_path = os.pathsep.join(p for p in (str(hook_dir), os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "PATH": path,
        "PYTHONPATH": python_path,
        HOOK_VARIABLE: str(records),
        "HF_HUB_OFFLINE": "1",
    }


def snakemake(
    workdir: Path, args: Sequence[str], env: Mapping[str, str], cores: int, log: Path
) -> tuple[float, str]:
    """``snakemake --cores CORES ARGS`` in ``workdir``; its wall seconds and output (also
    appended to ``log``); raises with the output's tail when it fails."""
    command = [sys.executable, "-m", "snakemake", "--cores", str(cores), *args]
    start = time.perf_counter()
    result = subprocess.run(
        command,
        cwd=workdir,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seconds = time.perf_counter() - start
    with open(log, "a") as sink:
        sink.write(f"$ {' '.join(command)}  # {seconds:.1f} s, exit {result.returncode}\n")
        sink.write(result.stdout)
    if result.returncode != 0:
        raise RuntimeError(
            f"snakemake {' '.join(args)} failed in {workdir} ({result.returncode}):\n"
            f"{result.stdout[-6000:]}"
        )
    return seconds, result.stdout


def load() -> list[float] | None:
    """The 1, 5 and 15 minute load averages."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


_JOB_HEAD = re.compile(r"^(?:local)?rule (\w+):\s*$")
_JOB_FIELD = re.compile(r"^\s+(\w+): (.*)$")


def parse_jobs(output: str) -> list[dict[str, Any]]:
    """The jobs Snakemake's output lists (``rule NAME:`` blocks): rule, output paths,
    benchmark path, wildcards; one entry per job id."""
    jobs: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in output.splitlines():
        head = _JOB_HEAD.match(line)
        if head:
            current = {"rule": head.group(1), "output": [], "benchmark": None, "wildcards": {}}
            continue
        if current is None:
            continue
        field = _JOB_FIELD.match(line)
        if not field:
            current = None
            continue
        key, value = field.groups()
        if key == "output":
            current["output"] = [item.strip() for item in value.split(",") if item.strip()]
        elif key == "benchmark":
            current["benchmark"] = value.strip()
        elif key == "wildcards":
            current["wildcards"] = dict(
                item.strip().split("=", 1) for item in value.split(",") if "=" in item
            )
        elif key == "jobid":
            jobs[value.strip()] = current
    return list(jobs.values())


def read_benchmark(path: Path) -> dict[str, float] | None:
    """Seconds, max RSS (MB, None when Snakemake sampled none), CPU seconds (sampled too),
    the start and the end time (the file's mtime, written as the job ends) of one benchmark
    file."""
    if not path.is_file():
        return None
    with open(path) as source:
        row = next(csv.DictReader(source, delimiter="\t"))
    try:
        rss = float(row["max_rss"])
    except (TypeError, ValueError):
        rss = None
    try:
        cpu = float(row["cpu_time"])
    except (KeyError, TypeError, ValueError):
        cpu = None
    seconds = float(row["s"])
    end = path.stat().st_mtime
    return {
        "seconds": seconds,
        "max_rss_mb": rss,
        "cpu_time": cpu,
        "start": end - seconds,
        "end": end,
    }


def read_records(folder: Path, since: float = 0.0) -> list[dict[str, Any]]:
    """The hook records in ``folder`` of processes started at ``since`` (a time) or later."""
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if record["start"] >= since:
            records.append(record)
    return records


def job_processes(
    job: Mapping[str, Any], records: Sequence[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """The hook records of ``job``'s processes: those whose command line writes one of its
    outputs (an ``--out...`` option naming it, or naming a folder holding it: select's
    ``--out-dir``), and their descendants (spawned workers)."""
    outputs = [output.rstrip("/") for output in job["output"]]

    def writes_output(record):
        argv = record["argv"]
        for index, flag in enumerate(argv):
            if not flag.startswith("--out"):
                continue
            if "=" in flag:
                value = flag.partition("=")[2]
            elif index + 1 < len(argv):
                value = argv[index + 1]
            else:
                continue
            value = value.rstrip("/")
            if value and any(o == value or o.startswith(value + "/") for o in outputs):
                return True
        return False

    chosen = {record["pid"]: record for record in records if writes_output(record)}
    grew = bool(chosen)
    while grew:
        grew = False
        earliest = min(record["start"] for record in chosen.values())
        for record in records:
            # (a start before the job's: an older process whose parent's pid was reused)
            fresh = record["start"] >= earliest
            if record["ppid"] in chosen and record["pid"] not in chosen and fresh:
                chosen[record["pid"]] = record
                grew = True
    return list(chosen.values())


def table_nbytes(paths: Iterable[str], workdir: Path) -> int:
    """In-memory bytes (pyarrow ``Table.nbytes``) of the Parquet tables among ``paths``
    (files, or folders searched recursively)."""
    import pyarrow.parquet as pq

    total = 0
    for name in paths:
        path = workdir / name
        files = (
            [path] if path.is_file() else sorted(path.rglob("*.parquet")) if path.is_dir() else []
        )
        for file in files:
            if file.suffix == ".parquet":
                total += pq.read_table(file).nbytes
    return total


def stage_of(rule: str) -> str:
    return rule.removesuffix("_gather")


def measure_jobs(
    workdir: Path, output: str, records: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Every job of one Snakemake run with its benchmark and hook figures."""
    measured = []
    for job in parse_jobs(output):
        bench = read_benchmark(workdir / job["benchmark"]) if job["benchmark"] else None
        processes = job_processes(job, records)
        peak_kb = max(
            (max(p["maxrss_kb"], p["children_maxrss_kb"]) for p in processes), default=None
        )
        pids = {p["pid"] for p in processes}
        # the roots' own CPU and that of every descendant they waited for (no double count)
        cpu = sum(
            p.get("cpu_s", 0) + p.get("children_cpu_s", 0)
            for p in processes
            if p["ppid"] not in pids
        )
        entry = {
            "rule": job["rule"],
            "wildcards": job["wildcards"],
            "output": job["output"],
            "seconds": bench["seconds"] if bench else None,
            "start": bench["start"] if bench else None,
            "end": bench["end"] if bench else None,
            "benchmark_max_rss_mb": bench["max_rss_mb"] if bench else None,
            "hook_peak_rss_mb": round(peak_kb / 1024, 1) if peak_kb else None,
            "cpu_s": round(cpu, 3) if processes else (bench["cpu_time"] if bench else None),
            "processes": len(processes),
        }
        entry["peak_rss_mb"] = entry["hook_peak_rss_mb"] or entry["benchmark_max_rss_mb"]
        measured.append(entry)
    return measured


def startup_probe(
    workdir: Path, rule: str, env: Mapping[str, str], threads: int
) -> dict[str, float]:
    """Wall and CPU seconds of a job's command up to the stage's argument parsing
    (``--help``): interpreter start and imports, the start-up every job of ``rule`` pays."""
    stage = {"select": "select"}.get(
        rule, stage_of(rule) if not rule.endswith("_gather") else "gather"
    )
    command = [sys.executable, "-m", "pipeline", stage, "--help"]
    if rule in RUN_GPU_RULES:
        prefix = [
            sys.executable,
            "-m",
            "pipeline",
            "run-gpu",
            "--gpus",
            "0",
            "--threads",
            str(threads),
            "--",
        ]
        command = [*prefix, "python", "-m", "pipeline", stage, "--help"]
    probe_env = {k: v for k, v in env.items() if k != HOOK_VARIABLE}
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=workdir, env=probe_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        return {"wall_s": float("nan"), "cpu_s": float("nan")}
    # wait4 counts the command's process and every child it waited for (run-gpu's stage)
    return {"wall_s": round(seconds, 3), "cpu_s": round(usage.ru_utime + usage.ru_stime, 3)}


# -- the three parts ------------------------------------------------------------------------------


class Workspace:
    """A copy of the workflow with its sources, overlay, hook and records."""

    def __init__(self, root: Path, name: str, images: int, shards: int, threads: int):
        self.dir = copy_workflow(root / name / "wf")
        self.benchmarks_added = add_benchmarks(self.dir)
        self.sources = root / name / "sources"
        self.ids = write_sources(self.sources, images)
        self.overlay = write_overlay(
            root / name / "overlay.yaml",
            overlay(self.sources, self.ids[:TEST_IMAGES], shards, threads),
        )
        hook_dir = root / "hook"
        hook_dir.mkdir(exist_ok=True)
        (hook_dir / "sitecustomize.py").write_text(HOOK)
        self.records = root / name / "rss"
        self.records.mkdir(exist_ok=True)
        self.env = snakemake_env(hook_dir, self.records)
        self.log = root / name / "snakemake.log"
        self.images = images

    def run(self, *args: str, cores: int) -> tuple[float, str]:
        config = ("--configfile", PRESET, str(self.overlay))
        return snakemake(
            self.dir, [*config, "--resources", "gpu=0", *args], self.env, cores, self.log
        )


def summarize_stage(jobs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    timed = [job["seconds"] for job in jobs if job["seconds"] is not None]
    cpu = [job["cpu_s"] for job in jobs if job.get("cpu_s") is not None]
    peaks = [job["peak_rss_mb"] for job in jobs if job["peak_rss_mb"] is not None]
    sampled = [job["benchmark_max_rss_mb"] for job in jobs if job["benchmark_max_rss_mb"]]
    return {
        "jobs": len(jobs),
        "seconds": round(sum(timed), 3) if timed else None,
        "cpu_s": round(sum(cpu), 3) if cpu else None,
        "peak_rss_mb": max(peaks) if peaks else None,
        "benchmark_max_rss_mb": max(sampled) if sampled else None,
    }


def scale_part(args: argparse.Namespace, root: Path) -> tuple[dict[str, Any], Workspace]:
    """Run to select at each N; per rule, its jobs' figures at each N and the comparisons."""
    runs: dict[int, dict[str, Any]] = {}
    workspace = None
    for images in args.images:
        workspace = Workspace(root, f"scale-{images}", images, args.shards, args.threads)
        before = load()
        seconds, output = workspace.run("--until", *args.until, cores=args.cores)
        jobs = measure_jobs(workspace.dir, output, read_records(workspace.records))
        for job in jobs:
            if job["rule"].endswith("_gather") or job["rule"] == "select":
                job["output_table_bytes"] = table_nbytes(job["output"], workspace.dir)
        runs[images] = {
            "wall_s": round(seconds, 1),
            "load_before": before,
            "load_after": load(),
            "jobs": jobs,
        }
    small, large = min(args.images), max(args.images)
    rules = sorted({job["rule"] for run in runs.values() for job in run["jobs"]}, key=rule_order)
    probes = {
        rule: startup_probe(workspace.dir, rule, workspace.env, args.threads)
        for rule in rules
        if rule != "pretrain"
    }
    stages: dict[str, Any] = {}
    for rule in rules:
        per_n = {
            n: summarize_stage([job for job in runs[n]["jobs"] if job["rule"] == rule])
            for n in args.images
        }
        entry: dict[str, Any] = {str(n): per_n[n] for n in args.images}
        a, b = per_n[small], per_n[large]
        if a["peak_rss_mb"] and b["peak_rss_mb"]:
            entry["rss_ratio"] = round(b["peak_rss_mb"] / a["peak_rss_mb"], 3)
        for key, suffix in (("seconds", ""), ("cpu_s", "_cpu")):
            entry.update(growth(per_n, small, large, key, probes.get(rule), suffix))
        if rule in probes:
            entry["startup_probe"] = probes[rule]
        if rule.endswith("_gather") or rule == "select":
            entry["bound"] = rss_bound(rule, runs[small]["jobs"], runs[large]["jobs"])
        stages[rule] = entry
    summary_runs = {
        str(n): {k: v for k, v in run.items() if k != "jobs"} for n, run in runs.items()
    }
    result = {
        "runs": summary_runs,
        "stages": stages,
        "benchmarks_added_to_rules": workspace.benchmarks_added,
        "jobs": {
            str(n): [
                {k: v for k, v in job.items() if k not in ("output", "start", "end")}
                for job in run["jobs"]
            ]
            for n, run in runs.items()
        },
    }
    return result, workspace


def growth(
    per_n: Mapping[int, Mapping[str, Any]],
    small: int,
    large: int,
    key: str,
    probe: Mapping[str, float] | None,
    suffix: str,
) -> dict[str, Any]:
    """How ``key`` (wall ``seconds`` or ``cpu_s``, summed over a rule's jobs) grows from
    ``small`` to ``large`` images: the ratio; per image net of the measured start-up of each
    job (``probe``) at both sizes and their ratio (1 when linear); the start-up per job and
    per-image cost the two sizes alone imply."""
    a, b = per_n[small], per_n[large]
    if not a.get(key) or not b.get(key):
        return {}
    name = "seconds" if key == "seconds" else "cpu"
    out: dict[str, Any] = {f"{name}_ratio": round(b[key] / a[key], 3)}
    if probe is not None:
        startup = probe["wall_s" if key == "seconds" else "cpu_s"]
        net = {n: (per_n[n][key] - per_n[n]["jobs"] * startup) / n for n in (small, large)}
        out[f"per_image{suffix}_s"] = {str(n): round(v, 5) for n, v in net.items()}
        if net[small] > 0:
            out[f"per_image{suffix}_ratio"] = round(net[large] / net[small], 3)
    if a["jobs"] == b["jobs"]:
        slope = (b[key] - a[key]) / (large - small)
        out[f"two_point_fit{suffix}"] = {
            "startup_per_job_s": round((a[key] - slope * small) / a["jobs"], 3),
            "per_image_s": round(slope, 5),
        }
    return out


def rule_order(rule: str) -> tuple[int, str]:
    order = (
        "degrade",
        "prompts",
        "pretrain",
        "candidates",
        "segment",
        "caption",
        "score",
        "select",
    )
    stage = stage_of(rule)
    return (order.index(stage) if stage in order else len(order), rule)


def rss_bound(
    rule: str, small_jobs: Sequence[Mapping[str, Any]], large_jobs: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """The worst job of ``rule`` against ``RSS(large) <= 1.2 x RSS(small) + output table``:
    ``value`` = (RSS(large) - table bytes) / RSS(small), jobs paired by their wildcards."""
    key = lambda job: json.dumps(job["wildcards"], sort_keys=True)  # noqa: E731
    small = {key(job): job for job in small_jobs if job["rule"] == rule}
    worst: dict[str, Any] | None = None
    for job in large_jobs:
        if job["rule"] != rule or key(job) not in small:
            continue
        before, after = small[key(job)]["peak_rss_mb"], job["peak_rss_mb"]
        if not before or not after:
            continue
        table_mb = job.get("output_table_bytes", 0) / 2**20
        value = (after - table_mb) / before
        entry = {
            "wildcards": job["wildcards"],
            "rss_small_mb": before,
            "rss_large_mb": after,
            "output_table_mb": round(table_mb, 3),
            "bound_mb": round(RSS_FACTOR * before + table_mb, 1),
            "value": round(value, 4),
        }
        if worst is None or value > worst["value"]:
            worst = entry
    return worst or {}


def dry_run(workspace: Workspace, shards: int, cores: int) -> dict[str, Any]:
    """A dry run of the default target at ``shards`` shards: wall and CPU seconds (of the
    Snakemake process: what it would take on an idle core), jobs, load."""
    before = load()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds, output = workspace.run("-n", "--config", f"shards={shards}", cores=cores)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    total = re.search(r"^total\s+(\d+)$", output, re.M)
    return {
        "shards": shards,
        "images": workspace.images,
        "seconds": round(seconds, 2),
        "cpu_s": round(cpu, 2),
        "jobs": int(total.group(1)) if total else None,
        "load_before": before,
        "load_after": load(),
    }


def dag_part(args: argparse.Namespace, workspace: Workspace | None, root: Path) -> dict[str, Any]:
    """Dry runs at ``--dag-shards`` shards and at the scale runs' K, in turn each round
    (``--warmup`` untimed rounds, then ``--repeats``), in the copy of the largest N (a fresh
    copy with its photos and no results when the scale part did not run)."""
    if workspace is None:
        images = max(args.images)
        workspace = Workspace(root, f"dag-{images}", images, args.shards, args.threads)
    rounds = []
    for round_number in range(args.warmup + args.repeats):
        entry = {
            "dag_shards": dry_run(workspace, args.dag_shards, args.cores),
            "scale_shards": dry_run(workspace, args.shards, args.cores),
        }
        if round_number >= args.warmup:
            rounds.append(entry)
    seconds = {
        name: timing.summarize([entry[name]["seconds"] for entry in rounds])
        for name in ("dag_shards", "scale_shards")
    }
    cpu = {
        name: timing.summarize([entry[name]["cpu_s"] for entry in rounds])
        for name in ("dag_shards", "scale_shards")
    }
    return {
        "shards": args.dag_shards,
        "images": workspace.images,
        "results_present": (workspace.dir / "results").is_dir(),
        "jobs": rounds[0]["dag_shards"]["jobs"],
        "seconds": seconds["dag_shards"]["median"],
        "seconds_summary": seconds["dag_shards"],
        "cpu_s_summary": cpu["dag_shards"],
        "at_scale_shards": {
            "shards": args.shards,
            "jobs": rounds[0]["scale_shards"]["jobs"],
            "seconds_summary": seconds["scale_shards"],
            "cpu_s_summary": cpu["scale_shards"],
        },
        "rounds": rounds,
    }


def stage_timing(jobs: Sequence[Mapping[str, Any]], stage: str) -> dict[str, float]:
    """The jobs of ``stage``: first start to last end, summed wall, summed and largest CPU
    seconds (None where a job has no CPU figure)."""
    mine = [job for job in jobs if job["rule"] == stage and job["seconds"] is not None]
    if not mine:
        raise RuntimeError(f"no benchmarked {stage} job in the rerun")
    cpu = [job.get("cpu_s") for job in mine]
    known = None not in cpu
    return {
        "jobs": len(mine),
        "span_s": round(max(j["end"] for j in mine) - min(j["start"] for j in mine), 3),
        "job_seconds": round(sum(j["seconds"] for j in mine), 3),
        "cpu_s": round(sum(cpu), 3) if known else None,
        "max_job_cpu_s": round(max(cpu), 3) if known else None,
    }


def speedup_part(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Candidates, segment and score at K = 1 and 2 on the same photos; only the reruns are
    timed (each stage alone, K = 1 then K = 2 in every round)."""
    spaces = {
        k: Workspace(root, f"speedup-k{k}", args.speedup_images, k, args.threads) for k in (1, 2)
    }
    prepare = {}
    for k, space in spaces.items():
        seconds, _ = space.run("--until", "select", cores=args.cores)
        prepare[f"k{k}_wall_s"] = round(seconds, 1)
    rounds: list[dict[str, Any]] = []
    for round_number in range(args.warmup + args.repeats):
        entry: dict[str, Any] = {}
        for stage in SPEEDUP_STAGES:
            for k, space in spaces.items():
                before, since = load(), time.time()
                _, output = space.run("--forcerun", stage, "--until", stage, cores=args.cores)
                jobs = measure_jobs(space.dir, output, read_records(space.records, since))
                entry[f"{stage}_k{k}"] = {**stage_timing(jobs, stage), "load_before": before}
        if round_number >= args.warmup:
            rounds.append(entry)
    span = {
        k: [sum(r[f"{s}_k{k}"]["span_s"] for s in SPEEDUP_STAGES) for r in rounds] for k in (1, 2)
    }
    work = {
        k: [sum(r[f"{s}_k{k}"]["job_seconds"] for s in SPEEDUP_STAGES) for r in rounds]
        for k in (1, 2)
    }
    per_stage = {
        stage: timing.paired_ratio(
            [r[f"{stage}_k1"]["span_s"] for r in rounds],
            [r[f"{stage}_k2"]["span_s"] for r in rounds],
        )
        for stage in SPEEDUP_STAGES
    }
    # on idle cores the K = 2 jobs run side by side: the span is about the larger job's CPU
    cpu = {
        k: [sum(r[f"{s}_k{k}"]["cpu_s"] or 0 for s in SPEEDUP_STAGES) for r in rounds]
        for k in (1, 2)
    }
    largest = [sum(r[f"{s}_k2"]["max_job_cpu_s"] or 0 for s in SPEEDUP_STAGES) for r in rounds]
    return {
        "images": args.speedup_images,
        "cores": args.cores,
        "threads": args.threads,
        "prepare": prepare,
        "rounds": rounds,
        "span_ratio_k1_over_k2": timing.paired_ratio(span[1], span[2]),
        "job_seconds_ratio_k1_over_k2": timing.paired_ratio(work[1], work[2]),
        "span_ratio_per_stage": per_stage,
        "cpu_s": {f"k{k}": timing.summarize(values) for k, values in cpu.items()},
        "idle_estimate_k1_over_k2": timing.paired_ratio(cpu[1], largest) if all(largest) else None,
        "load_after": load(),
    }


def targets_of(result: Mapping[str, Any]) -> list[timing.Target]:
    targets = []
    for rule, entry in result.get("scale", {}).get("stages", {}).items():
        bound = entry.get("bound")
        if bound:
            targets.append(
                timing.Target(
                    f"rss_{rule}",
                    bound["value"],
                    "<=",
                    RSS_FACTOR,
                    f"{rule}: (peak RSS at the largest N - output table) / peak RSS at the smallest N",
                )
            )
    if "dag" in result:
        targets.append(
            timing.Target(
                "dag_seconds",
                result["dag"]["seconds"],
                "<",
                DAG_BOUND_S,
                f"snakemake -n at {result['dag']['shards']} shards, wall seconds (median of rounds)",
            )
        )
    if "speedup" in result:
        targets.append(
            timing.Target(
                "speedup_span",
                result["speedup"]["span_ratio_k1_over_k2"]["median"],
                ">=",
                SPEEDUP_BOUND,
                "candidates + segment + score span, K=1 over K=2 (median of rounds)",
            )
        )
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline bench scale", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--images",
        type=int,
        nargs="+",
        default=[100, 1000],
        help="photo counts of the scale runs (at least two)",
    )
    parser.add_argument("--shards", type=int, default=2, help="K of the scale runs")
    parser.add_argument("--cores", type=int, default=2, help="snakemake --cores")
    parser.add_argument(
        "--until",
        nargs="+",
        default=["select"],
        metavar="RULE",
        help="snakemake --until of the scale runs (a smaller DAG for a smoke test)",
    )
    parser.add_argument(
        "--dag-shards", type=int, default=64, help="K of the timed dry run (0: skip)"
    )
    parser.add_argument(
        "--speedup-images", type=int, default=200, help="photos of the K=1 vs K=2 part (0: skip)"
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        default=list(PARTS),
        choices=PARTS,
        help="what to run (default: all three)",
    )
    parser.add_argument(
        "--scratch",
        type=Path,
        default=None,
        help="folder for the copies (default: a temporary one)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    timing.add_arguments(parser, repeats=1)
    parser.set_defaults(warmup=0)
    args = parser.parse_args(argv)
    if len(set(args.images)) < 2:
        parser.error("--images needs two different counts")
    timing.parse_overrides(args.target)  # a malformed --target fails before the runs
    timing.pin_threads(args.threads)

    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    scratch.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "bench": "scale",
        "images": args.images,
        "shards": args.shards,
        "cores": args.cores,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "scratch": str(scratch) if args.keep else None,
        "load_start": load(),
    }
    try:
        workspace = None
        if "scale" in args.parts:
            result["scale"], workspace = scale_part(args, scratch)
        if "dag" in args.parts and args.dag_shards:
            result["dag"] = dag_part(args, workspace, scratch)
        if "speedup" in args.parts and args.speedup_images:
            result["speedup"] = speedup_part(args, scratch)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    result["load_end"] = load()
    return timing.finish(result, targets_of(result), args)


if __name__ == "__main__":
    sys.exit(main())
