"""Cost model of the data stages: start-up per job and cost per image, from the stage CLIs.

``python -m pipeline bench stages [--sizes 32 96] [--counts 4 32] [--frameworks onestep
multistep] [--train-methods dspo] [--repeats 1] [--warmup 1] [--threads 1] [--basis wall|cpu]
[--configfile workflow/presets/ci.yaml] [--workdir DIR] [--pretrain-steps 16] [--train-steps 1 6]
[--code-root DIR]
[--out pipeline/bench/costs_cpu.json] [--check]`` prints one JSON object and writes the costs
file that ``python -m pipeline plan`` reads (docs/design.md §15: every data stage runs as K
shard jobs, so a job's fixed cost, imports and model load, is paid K times).

**What runs.** For every image size S (``--sizes``, the HQ crop edge in pixels) and image count
N (``--counts``), a fresh chain of the stage CLIs, each started as its own process exactly as
the Snakemake rules start it (``workflow/rules/*.smk``: ``python -m pipeline run-gpu --gpus G
--threads T -- python -m pipeline STAGE ...`` for the GPU rules, with the settings
:func:`pipeline.settings.job_settings` gives the job as a ``--config`` file):
degrade (N synthetic S x S source photos, one crop each, all in the training split) -> prompts
-> candidates -> segment -> caption -> score -> select, then per framework evaluate (the
pretrained model on the degraded set as a synthetic test set, twice: as ``pretrained`` and as
an aligned model's name) -> winrates (its rule's three commands: the HQ table, segment of the
test HQ, the win rates); bicubic is evaluated too (``evaluate/bicubic``: no network). The
models come from the pretrain CLI at ``--pretrain-steps``, once, before the chains (one-step
variants then get a seeded nudge of their output layer, :func:`distinguish_variants`, or the
tiny variants would give identical candidates and select no pair); the training stages are
timed separately (below). Settings are the ``--configfile`` preset's (default: the ci preset,
tiny models, weight-free metrics); a preset with real weights runs with ``--workdir`` where
its relative paths resolve. ``--code-root`` runs another checkout's stages (``PYTHONPATH``,
e.g. a baseline copy).

**What is measured.** Wall seconds of each job (the stage process and its children), its CPU
seconds and its peak resident memory (``ru_maxrss`` of the job's process tree from
``os.wait4``: the largest RSS of the stage process or of any child it waited for), taken by a
small helper process the job is forked from (:data:`MEASURE`: a process forked from the bench
itself would inherit the bench's peak RSS). Rounds: one
``--warmup`` chain of one image at the smallest size (untimed: file cache, byte code), then
``--repeats`` rounds, each running every (S, N) point once (interleaved,
:mod:`pipeline.bench.timing`).

**The fit.** Per stage, non-negative least squares over every timed job:
``seconds = startup_s + images x (per_image_s + per_megapixel_s x MP)`` with MP the HQ crop's
megapixels (S^2 / 1e6). Two counts separate the start-up from the per-image cost, two sizes
the per-image from the per-megapixel cost. The *start-up share* of a shard job of n images is
``startup_s / (startup_s + n x per-image cost)`` (reported for ``--shard-images``, at the
largest measured size). Training is not per image: ``pretrain`` and ``train`` (each method of
``--train-methods``, at ``--train-steps``) run at two step counts each, fitting
``startup_s + steps x per_step_s``.
Each fit is made twice, on wall seconds and on CPU seconds; ``--basis`` picks the one the costs
file's top-level figures give (``cpu`` on a loaded shared machine, where wall time measures the
neighbours; it undercounts time a GPU job waits on its device).

**Honesty.** The costs file says where it was measured (CPU model or GPU name, threads, date,
the preset): CPU figures with tiny models say nothing about the paper's real models on a GPU
(run the same bench on a GPU machine for a GPU costs file). A stage whose CLI fails is listed
under ``failed`` with its log's tail (what needs its output is skipped in that chain), and
only its successful runs are fitted.

Targets (``--check`` exits 1 if one fails): ``fit_residual_share <= 0.5``, the largest share
of a stage's seconds the fit leaves unexplained (root-mean-square residual over mean seconds):
a fit that explains little of the measurements is not a cost model.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import contracts, model_names, settings
from pipeline.bench import timing
from pipeline.plan import measured_with

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PRESET = ROOT / "workflow" / "presets" / "ci.yaml"
#: the costs file written by default (a CPU one ships with the repository)
DEFAULT_COSTS = Path(__file__).resolve().parent / "costs_cpu.json"
FORMAT = "dspo-stage-costs/1"
#: the per-image stages, in the order of the chain
DATA_STAGES = (
    "degrade",
    "prompts",
    "candidates",
    "segment",
    "caption",
    "score",
    "select",
    "evaluate",
    "winrates",
)
#: the model the second evaluation of the pretrained model stands for (winrates needs an
#: aligned one)
ALIGNED_MODEL = model_names.ModelSpec.aligned(model_names.DSPO, "fidelity")


# -- jobs ---------------------------------------------------------------------------------------


class JobFailed(RuntimeError):
    """A stage CLI exited non-zero; the message holds the command and its log's tail."""


#: the small process every job starts from (``python -c MEASURE RESULT ARGV...``): it runs the
#: job, waits for it with ``os.wait4`` and writes the job's seconds, CPU seconds and peak RSS to
#: RESULT. Linux carries a process's peak RSS over ``exec`` from the process it was forked from,
#: so a job forked by the bench directly would report at least the bench's own RSS; forked by
#: this ~10 MB process it reports its own (and that of every child it waited for).
MEASURE = """
import json, os, subprocess, sys, time
result, argv = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
process = subprocess.Popen(argv)
_, status, usage = os.wait4(process.pid, 0)
seconds = time.perf_counter() - start
code = os.waitstatus_to_exitcode(status)
with open(result, "w") as sink:
    json.dump({"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
               "peak_rss_bytes": usage.ru_maxrss * 1024, "returncode": code}, sink)
sys.exit(code if code >= 0 else 1)
"""


def run_job(argv: Sequence[str], env: Mapping[str, str], cwd: Path, log: Path) -> dict[str, float]:
    """Run one job (its output into ``log``); its wall seconds, CPU seconds and peak RSS bytes
    (``ru_maxrss``, kilobytes on Linux, of the job and every child it waited for: run-gpu's
    stage process, degrade's workers), measured by :data:`MEASURE`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    result = log.with_name(f".{log.name}.{os.getpid()}.{time.monotonic_ns()}.json")
    with open(log, "ab") as sink:
        sink.write(("$ " + " ".join(map(str, argv)) + "\n").encode())
        sink.flush()
        command = [sys.executable, "-c", MEASURE, str(result), *map(str, argv)]
        code = subprocess.call(
            command, env=dict(env), cwd=cwd, stdout=sink, stderr=subprocess.STDOUT
        )
    measured = json.loads(result.read_text()) if result.exists() else {"returncode": code}
    result.unlink(missing_ok=True)
    if code != 0 or measured["returncode"] != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise JobFailed(
            f"exit {measured['returncode']}: {' '.join(map(str, argv))}\n" + "\n".join(tail)
        )
    return {k: measured[k] for k in ("seconds", "cpu_seconds", "peak_rss_bytes")}


def combine(parts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """One rule's several commands (winrates runs three): summed seconds, the largest RSS."""
    return {
        "seconds": sum(p["seconds"] for p in parts),
        "cpu_seconds": sum(p["cpu_seconds"] for p in parts),
        "peak_rss_bytes": max(p["peak_rss_bytes"] for p in parts),
    }


def write_sources(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """``count`` smooth random ``size`` x ``size`` RGB photos (PNG), the degrade source."""
    from pipeline.io.images import write_png

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    cells = max(1, size // 8)
    for index in range(count):
        coarse = rng.uniform(0, 255, (cells, cells, 3))
        image = np.kron(coarse, np.ones((size // cells + 1, size // cells + 1, 1)))[:size, :size]
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        write_png(folder / f"photo{index:05d}.png", image)
    return folder


class Chain:
    """The stage commands of one configuration, as the rules write them."""

    def __init__(self, config: dict[str, Any], scratch: Path, env: Mapping[str, str], cwd: Path):
        self.config = config
        self.root = settings.resolve("", config)
        self.scratch = scratch
        self.env = env
        self.cwd = cwd
        self.seed = str(self.root["seed"])
        self.threads = str(self.root["threads"])
        self.gpus = self.root["gpus"]
        self.configs = scratch / "job-config"

    def job_config(self, stage: str, name: str | None = None, **wildcards: str) -> str:
        """The job's settings file (``.snakemake/dspo-job-config`` in a workflow run)."""
        job = settings.job_settings(self.config, stage, **wildcards)
        return self.write_config(name or "-".join([stage, *wildcards.values()]), job)

    def write_config(self, name: str, job: Mapping[str, Any]) -> str:
        path = self.configs / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(job, sort_keys=True, separators=(",", ":")))
        return str(path)

    def gpu(self, stage: str, accelerate: bool = False) -> list[str]:
        """``python -m pipeline run-gpu --gpus G --threads T [--accelerate] --`` of a GPU rule."""
        wrapper = [
            sys.executable,
            "-m",
            "pipeline",
            "run-gpu",
            "--gpus",
            str(self.gpus[stage]),
            "--threads",
            self.threads,
        ]
        return [*wrapper, *(["--accelerate"] if accelerate else []), "--"]

    def stage(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pipeline", *args]

    def run(self, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None):
        return run_job(argv, {**self.env, **(env or {})}, self.cwd, log)

    # -- one command per rule ----------------------------------------------------------------

    def degrade(self, source: Path, size: int, out: Path, log: Path) -> dict[str, float]:
        section = dict(self.config.get("degrade") or {})
        section.update(
            source=str(source), crop_size=size, crops_per_image=1, test_fraction=0.0, test_ids=[]
        )
        config = self.write_config(
            f"degrade-{size}", settings.job_settings({**self.config, "degrade": section}, "degrade")
        )
        argv = self.stage(
            "degrade",
            "--split",
            "train",
            "--out",
            str(out),
            "--config",
            config,
            "--seed",
            self.seed,
            "--workers",
            self.threads,
        )
        return self.run(
            argv, log, {"OMP_NUM_THREADS": self.threads, "MKL_NUM_THREADS": self.threads}
        )

    def prompts(self, data: Path, kind: str, out: Path, log: Path) -> dict[str, float]:
        section = settings.job_settings(self.config, "prompts")
        gpus = 0 if section["source"] == "fixed" else self.gpus["prompts"]
        suffix = settings.job_settings(self.config, "evaluate")["name_suffix_pattern"]
        wrapper = [*self.gpu("prompts")]
        wrapper[wrapper.index("--gpus") + 1] = str(gpus)
        argv = [
            *wrapper,
            *self.stage(
                "prompts",
                "--images",
                str(data),
                "--kind",
                kind,
                "--out",
                str(out),
                "--config",
                self.job_config("prompts"),
                "--name-suffix-pattern",
                suffix,
                "--seed",
                self.seed,
            ),
        ]
        return self.run(argv, log)

    def candidate_variants(self, framework: str) -> list[str]:
        """The pretrained variants a framework's candidates sample (the rule's inputs)."""
        return sorted({s["variant"] for s in settings.candidate_settings(self.config, framework)})

    def variants(self, framework: str) -> list[str]:
        """Every variant the chains need: the candidates' and the base (evaluate, train)."""
        return sorted({*self.candidate_variants(framework), "base"})

    def pretrain(
        self,
        framework: str,
        variant: str,
        data: Path,
        prompts: Path,
        out: Path,
        steps: int,
        log: Path,
    ) -> dict[str, float]:
        job = settings.job_settings(self.config, "pretrain", framework=framework, variant=variant)
        job["steps"] = steps
        job["checkpoint_every"] = max(steps, 1)
        config = self.write_config(f"pretrain-{framework}-{variant}-{steps}", job)
        argv = [
            *self.gpu("pretrain", accelerate=True),
            *self.stage(
                "pretrain",
                "--framework",
                framework,
                "--variant",
                variant,
                "--data",
                str(data),
                "--prompts",
                str(prompts),
                "--out",
                str(out),
                "--checkpoints",
                str(out) + ".ckpt",
                "--config",
                config,
                "--seed",
                self.seed,
            ),
        ]
        return self.run(argv, log)

    def candidates(
        self,
        framework: str,
        models: Mapping[str, Path],
        data: Path,
        prompts: Path,
        out: Path,
        log: Path,
    ) -> dict[str, float]:
        model_args = [arg for v, p in sorted(models.items()) for arg in ("--model", f"{v}={p}")]
        argv = [
            *self.gpu("candidates"),
            *self.stage(
                "candidates",
                "--framework",
                framework,
                *model_args,
                "--data",
                str(data),
                "--prompts",
                str(prompts),
                "--out",
                str(out),
                "--config",
                self.job_config("candidates", framework=framework),
                "--seed",
                self.seed,
            ),
        ]
        return self.run(argv, log)

    def segment_source(self) -> str:
        return settings.job_settings(self.config, "segment")["source"]

    def segment(self, images: list[str], masks: Path, instances: Path, log: Path):
        argv = [
            *self.gpu("segment"),
            *self.stage(
                "segment",
                *images,
                "--out-zarr",
                str(masks),
                "--out-table",
                str(instances),
                "--config",
                self.job_config("segment"),
                "--seed",
                self.seed,
            ),
        ]
        return self.run(argv, log)

    def caption(
        self, data: Path, candidates: Path, masks: Path, instances: Path, out: Path, log: Path
    ) -> dict[str, float]:
        argv = [
            *self.gpu("caption"),
            *self.stage(
                "caption",
                "--data",
                str(data),
                "--candidates",
                str(candidates / contracts.CANDIDATES_TABLE),
                "--masks-zarr",
                str(masks),
                "--instances",
                str(instances),
                "--out",
                str(out),
                "--config",
                self.job_config("caption"),
                "--seed",
                self.seed,
            ),
        ]
        return self.run(argv, log)

    def score(
        self, data: Path, candidates: Path, masks: Path, instances: Path, out: Path, log: Path
    ) -> dict[str, float]:
        argv = [
            *self.gpu("score"),
            *self.stage(
                "score",
                "--candidates",
                str(candidates / contracts.CANDIDATES_TABLE),
                "--data",
                str(data),
                "--masks",
                str(masks),
                "--instances",
                str(instances),
                "--out",
                str(out),
                "--config",
                self.job_config("score"),
                "--seed",
                self.seed,
            ),
        ]
        return self.run(argv, log)

    def select(self, scores: Path, instances: Path, captions: Path, out: Path, log: Path):
        argv = self.stage(
            "select",
            "--scores",
            str(scores),
            "--instances",
            str(instances),
            "--captions",
            str(captions),
            "--out-dir",
            str(out),
            "--config",
            self.job_config("select"),
            "--seed",
            self.seed,
        )
        return self.run(argv, log)

    def evaluate(
        self, model: Path, name: str, testset: Path, prompts: Path, out: Path, log: Path
    ) -> dict[str, float]:
        argv = [
            *self.gpu("evaluate"),
            *self.stage(
                "evaluate",
                "--model",
                str(model),
                "--model-name",
                name,
                "--testset",
                "bench",
                "--testset-kind",
                "synthetic",
                "--testset-path",
                str(testset),
                "--prompts",
                str(prompts),
                "--out",
                str(out),
                "--config",
                self.job_config("evaluate"),
                "--seed",
                self.seed,
            ),
        ]
        return self.run(argv, log)

    def winrate_config(self, models: Mapping[str, str]) -> str:
        """The winrates job's settings (``winrate_config_file`` in winrates_inputs.smk)."""
        score = settings.resolve("score", self.config.get("score"))
        select = settings.resolve("select", self.config.get("select"))
        job = {
            "models": dict(models),
            "objectives": select["objectives"],
            "score": {
                k: score[k]
                for k in ("weights_dir", "weights", "options", "device", "min_crop_size")
            },
            "tie_tolerance": select["tie_tolerance"],
        }
        return self.write_config("winrates", job)

    def winrates(
        self, evaluations: Mapping[str, Path], objective: str, folder: Path, log: Path
    ) -> dict[str, float]:
        """The winrates rule's three commands; their summed seconds and largest RSS."""
        pretrained = evaluations["pretrained"]
        hq, masks, instances = folder / "hq.parquet", folder / "masks.zarr", folder / "inst.parquet"
        models = {name: objective for name in evaluations if name != "pretrained"}
        parts = [
            self.run(
                self.stage("winrates", "--hq-table-of", str(pretrained), "--out", str(hq)), log
            ),
            self.run(
                [
                    *self.gpu("score"),
                    *self.stage(
                        "segment",
                        "--candidates",
                        str(hq),
                        "--setting",
                        "hq",
                        "--out-zarr",
                        str(masks),
                        "--out-table",
                        str(instances),
                        "--config",
                        self.job_config("segment"),
                        "--seed",
                        self.seed,
                    ),
                ],
                log,
            ),
            self.run(
                [
                    *self.gpu("score"),
                    *self.stage(
                        "winrates",
                        "--evaluations",
                        *map(str, evaluations.values()),
                        "--masks",
                        str(masks),
                        "--instances",
                        str(instances),
                        "--out",
                        str(folder / "win.parquet"),
                        "--config",
                        self.winrate_config(models),
                        "--seed",
                        self.seed,
                    ),
                ],
                log,
            ),
        ]
        return combine(parts)

    def train(
        self,
        framework: str,
        method: str,
        objective: str,
        pairs_dir: Path,
        candidates: Path,
        data: Path,
        prompts: Path,
        masks: Path,
        model: Path,
        out: Path,
        steps: int,
        log: Path,
    ) -> dict[str, float]:
        job = settings.job_settings(self.config, "train", method=method, objective=objective)
        job["max_steps"] = steps
        config = self.write_config(f"train-{framework}-{method}-{steps}", job)
        pairs = []
        for path in contracts.train_pairs_artifacts(framework, objective, method):
            pairs.append(str(pairs_dir / Path(path).name))
        argv = [
            *self.gpu("train", accelerate=True),
            *self.stage(
                "train",
                "--framework",
                framework,
                "--method",
                method,
                "--objective",
                objective,
                *(["--pairs", *pairs] if pairs else []),
                "--candidates",
                str(candidates / contracts.CANDIDATES_TABLE),
                "--data",
                str(data),
                "--prompts",
                str(prompts),
                "--masks",
                str(masks),
                "--model",
                str(model),
                "--out",
                str(out),
                "--checkpoints",
                str(out) + ".ckpt",
                "--config",
                config,
                "--seed",
                self.seed,
            ),
        ]
        return self.run(argv, log)


# -- the measurements ---------------------------------------------------------------------------


class Recorder:
    """Every timed job: ``{key: [{seconds, cpu_seconds, peak_rss_bytes, images, ...}]}``;
    failures by key (each error once)."""

    def __init__(self) -> None:
        self.jobs: dict[str, list[dict[str, Any]]] = {}
        self.failed: dict[str, list[str]] = {}
        self.timed = True

    def record(self, key: str, fields: Mapping[str, Any], job, *args: Any) -> bool:
        """Run ``job(*args)``; record its measurement and ``fields`` under ``key`` (when
        timing); False when it failed (the chain then skips what needs its output)."""
        try:
            result = job(*args)
        except JobFailed as error:
            errors = self.failed.setdefault(key, [])
            if str(error) not in errors:
                errors.append(str(error))
            return False
        if self.timed:
            self.jobs.setdefault(key, []).append({**result, **fields})
        return True


@dataclasses.dataclass(frozen=True)
class ChainFiles:
    """What one chain (:func:`run_chain`) writes in its folder that its frameworks share."""

    folder: Path
    logs: Path
    data: Path
    prompts: Path
    test_prompts: Path
    masks: Path
    instances: Path

    @classmethod
    def under(cls, folder: Path) -> ChainFiles:
        """The chain's files in ``folder``."""
        return cls(
            folder=folder,
            logs=folder / "logs",
            data=folder / "data",
            prompts=folder / "prompts.parquet",
            test_prompts=folder / "prompts_test.parquet",
            masks=folder / "masks.zarr",
            instances=folder / "instances.parquet",
        )


def run_chain(
    chain: Chain,
    recorder: Recorder,
    models: Mapping[str, Mapping[str, Path]],
    size: int,
    count: int,
    folder: Path,
    frameworks: Sequence[str],
) -> None:
    """One chain of the data stages at ``count`` images of ``size`` px, into ``folder``."""
    point = {"images": count, "megapixels": size * size / 1e6, "size": size}
    files = ChainFiles.under(folder)
    if not run_data_stages(chain, recorder, point, files, size, count):
        return
    hq_frame = chain.segment_source() == "hq"
    if hq_frame:
        recorder.record(
            "segment",
            point,
            chain.segment,
            ["--data", str(files.data)],
            files.masks,
            files.instances,
            files.logs / "segment.log",
        )
    for fw in frameworks:
        run_framework(chain, recorder, models, fw, point, files, hq_frame)


def run_data_stages(
    chain: Chain,
    recorder: Recorder,
    point: Mapping[str, Any],
    files: ChainFiles,
    size: int,
    count: int,
) -> bool:
    """A chain's sources, degrade and prompts; False when nothing after them can run."""
    record, logs, data = recorder.record, files.logs, files.data
    source = write_sources(files.folder / "source", count, size)
    if not record("degrade", point, chain.degrade, source, size, data, logs / "degrade.log"):
        return False
    if not record(
        "prompts", point, chain.prompts, data, "train", files.prompts, logs / "prompts.log"
    ):
        return False
    record(
        "prompts",
        point,
        chain.prompts,
        data,
        "synthetic",
        files.test_prompts,
        logs / "prompts_test.log",
    )
    return True


def run_framework(
    chain: Chain,
    recorder: Recorder,
    models: Mapping[str, Mapping[str, Path]],
    fw: str,
    point: Mapping[str, Any],
    files: ChainFiles,
    hq_frame: bool,
) -> None:
    """One framework's candidates, segment, caption, score, select and evaluations of a chain."""
    record, logs = recorder.record, files.logs
    out = files.folder / fw
    candidates = out / "candidates"
    chosen = {v: models[fw][v] for v in chain.candidate_variants(fw)}
    if not record(
        f"candidates/{fw}",
        point,
        chain.candidates,
        fw,
        chosen,
        files.data,
        files.prompts,
        candidates,
        logs / f"candidates_{fw}.log",
    ):
        return
    masks, instances = files.masks, files.instances
    if not hq_frame:
        masks, instances = out / "masks.zarr", out / "instances.parquet"
        images = [
            "--candidates",
            str(candidates / contracts.CANDIDATES_TABLE),
            "--setting",
            chain.segment_source(),
        ]
        record(
            "segment", point, chain.segment, images, masks, instances, logs / f"segment_{fw}.log"
        )
    if not masks.exists():
        return
    captions, scores = out / "captions.parquet", out / "scores.parquet"
    inputs = (files.data, candidates, masks, instances)
    record("caption", point, chain.caption, *inputs, captions, logs / f"caption_{fw}.log")
    record("score", point, chain.score, *inputs, scores, logs / f"score_{fw}.log")
    if captions.exists() and scores.exists():
        pairs = out / "pairs"
        log = logs / f"select_{fw}.log"
        record("select", point, chain.select, scores, instances, captions, pairs, log)
    evaluate_framework(chain, recorder, models, fw, point, files)


def evaluate_framework(
    chain: Chain,
    recorder: Recorder,
    models: Mapping[str, Mapping[str, Path]],
    fw: str,
    point: Mapping[str, Any],
    files: ChainFiles,
) -> None:
    """One framework's evaluations of a chain (bicubic, pretrained, aligned) and win rates."""
    record, logs = recorder.record, files.logs
    out = files.folder / fw
    record(
        "evaluate/bicubic",
        point,
        chain.evaluate,
        "bicubic",
        "bicubic",
        files.data,
        files.test_prompts,
        out / "eval" / "bicubic",
        logs / f"evaluate_{fw}_bicubic.log",
    )
    evaluations = {}
    for name in (model_names.PRETRAINED, ALIGNED_MODEL.name):
        if record(
            f"evaluate/{fw}",
            point,
            chain.evaluate,
            models[fw]["base"],
            name,
            files.data,
            files.test_prompts,
            out / "eval" / name,
            logs / f"evaluate_{fw}_{name}.log",
        ):
            evaluations[name] = out / "eval" / name
    if len(evaluations) == 2:
        objective = ALIGNED_MODEL.objective
        log = logs / f"winrates_{fw}.log"
        record("winrates", point, chain.winrates, evaluations, objective, out / "winrates", log)


def build_models(
    chain: Chain,
    recorder: Recorder,
    folder: Path,
    frameworks: Sequence[str],
    size: int,
    count: int,
    steps: int = 16,
) -> dict[str, dict[str, Path]]:
    """Every pretrained variant the chains need, by the pretrain CLI at ``steps`` steps (not the
    preset's: a paper preset's 100000 are not a bench); the base variant also at a quarter of
    them, so the fit separates the start-up from the per-step cost."""
    source = write_sources(folder / "source", count, size)
    data, prompts, logs = folder / "data", folder / "prompts.parquet", folder / "logs"
    chain.degrade(source, size, data, logs / "degrade.log")
    chain.prompts(data, "train", prompts, logs / "prompts.log")
    models: dict[str, dict[str, Path]] = {}
    for fw in frameworks:
        models[fw] = {}
        runs = [(v, steps) for v in chain.variants(fw)] + [("base", max(1, steps // 4))]
        for variant, n in runs:
            out = folder / "models" / fw / (variant if n == steps else f"{variant}-{n}")
            recorder.record(
                f"pretrain/{fw}",
                {"steps": n},
                chain.pretrain,
                fw,
                variant,
                data,
                prompts,
                out,
                n,
                logs / f"pretrain_{fw}.log",
            )
            if n == steps and out.exists():
                models[fw][variant] = out
        distinguish_variants(
            {v: models[fw][v] for v in chain.candidate_variants(fw) if v in models[fw]}
        )
    return models


def distinguish_variants(models: Mapping[str, Path]) -> None:
    """Tiny variants pretrained a few steps from one initialisation sample one image, so select
    finds no pair and training has nothing to read. Nudge each variant's output layer (noise
    seeded by the variant) so its candidates differ, as real variants' do; the architecture, and
    so the cost, is unchanged. Nothing to do for one variant (multi-step: settings differ)."""
    if len(models) < 2:
        return
    import torch

    from pipeline.models import load_model
    from pipeline.seeding import torch_generator

    for variant, path in sorted(models.items()):
        model = load_model(path)
        with torch.no_grad():
            for name, parameter in model.unet.named_parameters():
                if "conv_out" in name:
                    noise = torch.randn(
                        parameter.shape, generator=torch_generator(0, "bench-stages", variant, name)
                    )
                    parameter.add_(0.01 * noise)
        kept = {f.name: f.read_bytes() for f in path.glob("*.parquet")}  # the train log
        model.save_pretrained(path)
        for name, data in kept.items():
            if not (path / name).exists():
                (path / name).write_bytes(data)


def measure_training(
    chain: Chain,
    recorder: Recorder,
    models: Mapping[str, Mapping[str, Path]],
    folder: Path,
    frameworks: Sequence[str],
    methods: Sequence[str],
    step_counts: Sequence[int] = (1, 6),
) -> None:
    """Each method of ``methods`` through the train CLI at each of ``step_counts``, on the
    pairs of the chain in ``folder`` (the first timed point)."""
    objectives = list(settings.resolve("select", chain.config.get("select"))["objectives"])
    objective = next((o for o in chain.root["objectives"] if o in objectives), objectives[0])
    shared = folder / "masks.zarr"
    for fw in frameworks:
        out = folder / fw
        masks = shared if shared.exists() else out / "masks.zarr"
        for method in methods:
            for steps in step_counts:
                recorder.record(
                    f"train/{fw}/{method}",
                    {"steps": steps},
                    chain.train,
                    fw,
                    method,
                    objective,
                    out / "pairs",
                    out / "candidates",
                    folder / "data",
                    folder / "prompts.parquet",
                    masks,
                    models[fw]["base"],
                    out / "aligned" / f"{method}-{steps}",
                    steps,
                    folder / "logs" / f"train_{fw}_{method}.log",
                )


# -- fits ---------------------------------------------------------------------------------------


def fit_costs(
    jobs: Sequence[Mapping[str, Any]], columns: Sequence[str], basis: str = "seconds"
) -> dict[str, Any]:
    """Non-negative least squares ``jobs[basis] = startup + sum(coef x column)``: the
    coefficients (start-up first), the residual and whether the points determine every term."""
    from scipy.optimize import nnls

    seconds = np.array([job[basis] for job in jobs], dtype=float)
    design = np.column_stack(
        [np.ones(len(jobs))] + [np.array([job[c] for job in jobs], dtype=float) for c in columns]
    )
    coefficients, _ = nnls(design, seconds)
    residual = seconds - design @ coefficients
    rms = float(np.sqrt(np.mean(residual**2)))
    return {
        "coefficients": [float(c) for c in coefficients],
        "residual_rms_s": round(rms, 4),
        "residual_share": round(rms / float(np.mean(seconds)), 4) if seconds.mean() > 0 else 0.0,
        "jobs": len(jobs),
        "determined": bool(np.linalg.matrix_rank(design) == design.shape[1]),
    }


#: the two bases of a fit: wall seconds, and CPU seconds (user + system of the job's process
#: tree), which a loaded shared machine inflates far less than wall time
BASES = {"wall": "seconds", "cpu": "cpu_seconds"}


def memory_fields(jobs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    rss = [int(job["peak_rss_bytes"]) for job in jobs]
    return {"peak_rss_bytes": max(rss), "peak_rss_bytes_min": min(rss)}


def per_image_fit(jobs: Sequence[Mapping[str, Any]], basis: str) -> dict[str, Any]:
    rows = [{**job, "image_megapixels": job["images"] * job["megapixels"]} for job in jobs]
    fit = fit_costs(rows, ["images", "image_megapixels"], BASES[basis])
    startup, per_image, per_mp = fit.pop("coefficients")
    return {
        "startup_s": round(startup, 4),
        "per_image_s": round(per_image, 6),
        "per_megapixel_s": round(per_mp, 6),
        "fit": fit,
    }


def startup_share(entry: Mapping[str, Any], images: float, megapixels: float) -> float:
    """``startup / (startup + images x per-image cost)`` of a job of ``images`` images of
    ``megapixels`` each: the share of a shard job spent starting (imports, model load)."""
    per_image = entry["per_image_s"] + entry["per_megapixel_s"] * megapixels
    total = entry["startup_s"] + per_image * images
    return round(entry["startup_s"] / total, 4) if total > 0 else 0.0


def stage_costs(
    jobs: Sequence[Mapping[str, Any]], shard_images: Sequence[int], basis: str
) -> dict[str, Any]:
    """One data stage's costs on ``basis`` (the other basis's fit beside it), memory, each
    point's medians and the start-up share of a shard job of ``shard_images`` images at the
    largest measured size."""
    fits = {name: per_image_fit(jobs, name) for name in BASES}
    largest = max(job["megapixels"] for job in jobs)
    primary = fits[basis]
    points: dict[tuple[int, int], list[Mapping[str, Any]]] = {}
    for job in jobs:
        points.setdefault((job["size"], job["images"]), []).append(job)
    return {
        **{k: primary[k] for k in ("startup_s", "per_image_s", "per_megapixel_s")},
        "basis": basis,
        **memory_fields(jobs),
        "startup_share": {str(n): startup_share(primary, n, largest) for n in shard_images},
        "startup_share_at_px": int(round((largest * 1e6) ** 0.5)),
        "fits": fits,
        "points": [
            {
                "size": size,
                "images": images,
                "seconds_median": round(float(np.median([j["seconds"] for j in group])), 3),
                "cpu_seconds_median": round(float(np.median([j["cpu_seconds"] for j in group])), 3),
                "peak_rss_bytes": max(int(j["peak_rss_bytes"]) for j in group),
                "n": len(group),
            }
            for (size, images), group in sorted(points.items())
        ],
    }


def step_costs(jobs: Sequence[Mapping[str, Any]], basis: str) -> dict[str, Any]:
    """A training stage's costs: ``startup_s + steps x per_step_s`` (both bases' fits)."""
    fits = {}
    for name, column in BASES.items():
        fit = fit_costs(jobs, ["steps"], column)
        startup, per_step = fit.pop("coefficients")
        fits[name] = {"startup_s": round(startup, 4), "per_step_s": round(per_step, 6), "fit": fit}
    return {
        **{k: fits[basis][k] for k in ("startup_s", "per_step_s")},
        "basis": basis,
        **memory_fields(jobs),
        "fits": fits,
        "points": [
            {
                "steps": job["steps"],
                "seconds": round(job["seconds"], 3),
                "cpu_seconds": round(job["cpu_seconds"], 3),
            }
            for job in jobs
        ],
    }


def device_description() -> dict[str, Any]:
    """Where the costs were measured: the GPU's name (if the stages see one), else the CPU's."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "device": "gpu" if gpu else "cpu",
        "gpu": gpu,
        "gpu_count": torch.cuda.device_count() if gpu else 0,
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
    }


def build_costs(
    recorder: Recorder,
    args: argparse.Namespace,
    config: Mapping[str, Any],
    frameworks: Sequence[str],
    wall: float,
) -> dict[str, Any]:
    device = device_description()
    where = device["gpu"] or device["cpu_model"]
    preset = Path(args.configfile[0]).name
    tiny = not any(
        settings.job_settings(config, "pretrain", framework=fw)["weights"] for fw in frameworks
    )
    label = (
        f"measured on {'GPU ' + where if device['gpu'] else 'CPU (' + where + ')'}, "
        f"{args.threads} thread(s), preset {preset}" + (" (tiny models)" if tiny else "")
    )
    measured_on = {
        **device,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "threads": args.threads,
        "preset": [str(Path(c).name) for c in args.configfile],
        "code_root": str(Path(args.code_root).resolve()),
        "python": platform.python_version(),
        "load_average_1min": timing.load_average(),
    }
    stages: dict[str, Any] = {}
    for key, jobs in sorted(recorder.jobs.items()):
        if key.split("/")[0] in ("pretrain", "train"):
            stages[key] = step_costs(jobs, args.basis)
        else:
            stages[key] = stage_costs(jobs, args.shard_images, args.basis)
        stages[key]["measured_on"] = {
            "label": label,
            **{k: measured_on[k] for k in ("device", "gpu", "cpu_model", "date", "threads")},
        }
    caveat = "; ".join(
        [
            *(
                ["tiny models: the figures say nothing about the paper's real models"]
                if tiny
                else []
            ),
            *(["measured on a CPU: GPU jobs take other times"] if not device["gpu"] else []),
            "other settings (see measured_with) or devices are not rescaled",
        ]
    )
    return {
        "format": FORMAT,
        "label": label,
        "measured_on": measured_on,
        "basis": args.basis,
        "model": "seconds of a job = startup_s + images x (per_image_s + per_megapixel_s x MP), "
        "MP = the HQ crop's megapixels; training: startup_s + steps x per_step_s",
        "caveat": caveat,
        "measured_with": measured_with(config, frameworks),
        "sizes": list(args.sizes),
        "counts": list(args.counts),
        "repeats": args.repeats,
        "bench_seconds": round(wall, 1),
        "stages": stages,
        "failed": {
            key: [e.splitlines()[0] for e in errors] for key, errors in recorder.failed.items()
        },
    }


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of what is measured: the grid of crop sizes and image counts, the
    frameworks, the train methods and the shard sizes the start-up share is reported at."""
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[32, 96],
        help="HQ crop edges in pixels (multiples of the degradation scale; far apart, so the "
        "per-megapixel cost stands out of the noise)",
    )
    parser.add_argument(
        "--counts",
        type=int,
        nargs="+",
        default=[4, 32],
        help="images per job (far apart, so the per-image cost stands out of the start-up's noise)",
    )
    parser.add_argument(
        "--frameworks", nargs="+", default=None, help="default: the preset's frameworks"
    )
    parser.add_argument(
        "--train-methods",
        nargs="*",
        default=["dspo"],
        help="methods whose train CLI is timed at --train-steps (none: skip)",
    )
    parser.add_argument(
        "--shard-images",
        type=int,
        nargs="+",
        default=[100, 1000, 10000],
        help="images per shard job at which to report the start-up share",
    )


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of how the jobs run: the presets, the code, the folders and the steps of
    the pretrain and train jobs."""
    parser.add_argument(
        "--configfile",
        nargs="+",
        default=[str(DEFAULT_PRESET)],
        help="the preset(s) whose settings the jobs run with",
    )
    parser.add_argument(
        "--code-root",
        default=str(ROOT),
        help="the checkout whose `python -m pipeline` the jobs run "
        "(PYTHONPATH; e.g. a baseline copy)",
    )
    parser.add_argument(
        "--scratch", default=None, help="work folder (default: a temporary one, removed afterwards)"
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="where the jobs run, so a preset's relative paths (models/..., data/...) resolve "
        "(default: the scratch folder)",
    )
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=16,
        help="pretrain steps of the models the chains use (the base variant also at a quarter: "
        "far enough apart that the per-step cost stands out of the start-up's noise)",
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        nargs=2,
        default=[1, 6],
        metavar=("FEW", "MORE"),
        help="the two max_steps each --train-methods method is timed at",
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m pipeline bench stages`` (module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline bench stages", description=__doc__.splitlines()[0]
    )
    add_grid_arguments(parser)
    add_job_arguments(parser)
    parser.add_argument("--out", default=str(DEFAULT_COSTS), help="the costs file to write")
    parser.add_argument(
        "--basis",
        choices=sorted(BASES),
        default="wall",
        help="what the costs' top-level figures fit: wall seconds, or CPU "
        "seconds (a loaded shared machine inflates wall time; both fits are "
        "written)",
    )
    timing.add_arguments(parser, repeats=1)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line's options (:func:`build_parser`), the grid's bounds checked."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.counts) < 1 or min(args.sizes) < 4:
        parser.error("--counts must be >= 1 and --sizes >= 4")
    return args


def job_env(code_root: str | Path) -> dict[str, str]:
    """The jobs' environment: this one, offline, unbuffered, ``code_root`` on ``PYTHONPATH``."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(code_root).resolve()), os.environ.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep),
        "DSPO_ALLOW_DOWNLOADS": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def run_rounds(
    chain: Chain,
    recorder: Recorder,
    args: argparse.Namespace,
    scratch: Path,
    frameworks: Sequence[str],
) -> None:
    """The bench's jobs in ``scratch``: models, warm-up chains, timed rounds, training."""
    smallest = (min(args.sizes), min(args.counts))
    models = build_models(
        chain, recorder, scratch / "setup", frameworks, *smallest, args.pretrain_steps
    )
    points = [(size, count) for size in args.sizes for count in args.counts]
    recorder.timed = False
    for index in range(args.warmup):  # one image: imports, byte code, file cache
        run_chain(chain, recorder, models, smallest[0], 1, scratch / f"warmup{index}", frameworks)
    recorder.timed = True
    first = None
    for repeat in range(args.repeats):
        for size, count in points:
            folder = scratch / f"r{repeat}" / f"{size}px_{count}"
            run_chain(chain, recorder, models, size, count, folder, frameworks)
            first = first or folder
    if args.train_methods and first is not None:
        measure_training(
            chain, recorder, models, first, frameworks, args.train_methods, args.train_steps
        )


def bench_result(
    costs: Mapping[str, Any], recorder: Recorder, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    """The JSON object the bench prints (before :func:`pipeline.bench.timing.finish`)."""
    return {
        "benchmark": "stages",
        "costs_file": str(out),
        **{k: costs[k] for k in ("label", "measured_on", "sizes", "counts", "repeats")},
        "threads": args.threads,
        "warmup": args.warmup,
        "order": "interleaved: every (size, count) point's chain per round",
        "costs": {
            key: {k: v for k, v in entry.items() if k not in ("points", "fits", "measured_on")}
            for key, entry in costs["stages"].items()
        },
        # not "failed": timing.finish writes the failed targets there
        "failed_stages": recorder.failed,
        "not_measured": [
            s for s in DATA_STAGES if not any(k.split("/")[0] == s for k in costs["stages"])
        ],
    }


def bench_targets(costs: Mapping[str, Any], recorder: Recorder, basis: str) -> list[timing.Target]:
    """The ``--check`` targets: the fits explain the seconds, and every stage CLI ran."""
    shares = [e["fits"][basis]["fit"]["residual_share"] for e in costs["stages"].values()]
    targets = [
        timing.Target(
            "fit_residual_share",
            max(shares) if shares else 0.0,
            "<=",
            0.5,
            "the fit explains every stage's seconds (largest RMS residual / mean)",
        ),
    ]
    if recorder.failed:
        targets.append(
            timing.Target("failed_stages", len(recorder.failed), "<=", 0, "every stage CLI ran")
        )
    return targets


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline bench stages``: run the jobs, write the costs file, report."""
    from pipeline.config import load_config

    args = parse_args(argv)
    timing.pin_threads(args.threads)
    config = load_config(args.configfile, [f"threads={args.threads}"])
    root = settings.resolve("", config)
    frameworks = args.frameworks or list(root["frameworks"])
    env = job_env(args.code_root)
    own_scratch = args.scratch is None
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench-stages-")).resolve()
    if not os.access(Path(args.code_root) / "pipeline", os.W_OK):  # a read-only baseline
        env["PYTHONPYCACHEPREFIX"] = str(scratch / "pycache")
    started = time.perf_counter()
    try:
        chain = Chain(config, scratch, env, Path(args.workdir or scratch).resolve())
        recorder = Recorder()
        run_rounds(chain, recorder, args, scratch, frameworks)
    finally:
        if own_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    costs = build_costs(recorder, args, config, frameworks, time.perf_counter() - started)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(costs, indent=1) + "\n")
    result = bench_result(costs, recorder, args, out)
    return timing.finish(result, bench_targets(costs, recorder, args.basis), args)


if __name__ == "__main__":
    sys.exit(main())
