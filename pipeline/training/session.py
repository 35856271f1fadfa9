"""The training session: one run's life cycle, written once for every method (docs/design.md §16).

A method is one module, ``pipeline.training.<loop>`` (``contracts.method_module``), whose
``RUN`` is a :class:`MethodRun` subclass declaring what differs: its settings section, checks,
inputs, trainer, checkpoint state, metadata and files. :func:`train` owns the rest, in this
order, for every method:

settings -> accelerator -> checks -> inputs -> model -> fingerprint -> trainable parameters,
frozen reference, device -> optimizer -> trainer -> resume -> prepare -> steps (a checkpoint
every ``checkpoint_every``, progress bar) -> finish -> metadata -> the output folder, written
atomically (model, log, the method's files) -> checkpoints removed.

The session imports only the job's method module (by name, at run time), so a train job's code
hash covers the stage, the session, the shared step code and its own method's module
(``contracts.method_module``; the train rule hashes those two modules' closures).
"""

from __future__ import annotations

import dataclasses
import importlib
import shutil
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from pipeline import checkpoints, contracts
from pipeline.distributed import make_accelerator
from pipeline.io.atomic import atomic_path
from pipeline.io.tables import write_table
from pipeline.models.base import SRModel
from pipeline.training.config import TrainConfig
from pipeline.training.run import configure_model, make_optimizer, run_fingerprint, trainable_names
from pipeline.training.step import STAGE


@dataclasses.dataclass
class Job:
    """One train job as the stage's command line (or a direct call) gives it."""

    framework: str
    method: str
    objective: str
    data_dir: Path
    model_dir: Path
    out_dir: Path
    config: Any = None  # the train section: a mapping (a job's settings) or a TrainConfig
    seed: int = 0
    checkpoint_dir: Path | None = None
    model: SRModel | None = None  # an already loaded model (else loaded from model_dir)
    prompts_path: Path | None = None
    pairs_path: Any = None  # one table, or one per objective (pair level "objectives")
    candidates_path: Path | None = None
    masks_path: Path | None = None

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.checkpoint_dir is None:
            self.checkpoint_dir = checkpoints.default_location(STAGE, self.out_dir)
        self.checkpoint_dir = Path(self.checkpoint_dir)


class MethodRun:
    """What a method declares; :func:`train` calls the hooks in its order. Between them the
    session sets ``accelerator``, ``model``, ``fingerprint``, ``trainable``, ``named``,
    ``optimizer``, ``trainer``, ``resumed_from`` and ``log`` on the instance."""

    #: the log's table (pipeline.io.tables) and columns
    log_table = "train_log"
    log_columns: tuple[str, ...] = ()
    #: whether a lazily built frozen reference captures the pretrained weights before training
    captures_reference = True

    def __init__(self, job: Job):
        self.job = job
        self.config, self.section = self.settings(job.config)

    # -- before the model ------------------------------------------------------------------
    def settings(self, raw: Any) -> tuple[TrainConfig, dict[str, Any]]:
        """(the train settings, the method's own section) of the job's config."""
        return (raw if isinstance(raw, TrainConfig) else TrainConfig.from_dict(raw)), {}

    def check(self) -> None:
        """Refuse a bad setting or process layout before anything is read."""

    def read_inputs(self) -> None:
        """Read the tables and file lists the steps use."""

    def fingerprint_run(self) -> checkpoints.Fingerprint:
        """What a checkpoint must match to be resumed (default: the offline loop's inputs)."""
        job = self.job
        return run_fingerprint(
            self.config,
            framework=job.framework,
            method=job.method,
            objective=job.objective,
            seed=job.seed,
            pairs_path=self.fingerprinted_pairs(),
            candidates_path=job.candidates_path,
            data_dir=job.data_dir,
            masks_path=job.masks_path,
            model_dir=job.model_dir,
            model=self.model,
            processes=self.accelerator.num_processes,
            device=self.accelerator.device.type,
            prompts_path=job.prompts_path,
        )

    def fingerprinted_pairs(self) -> Any:
        """The pairs table whose bytes the default fingerprint covers."""
        return self.job.pairs_path

    def make_optimizer(self):
        return make_optimizer(self.trainable, self.config)

    # -- the trainer -----------------------------------------------------------------------
    def build(self):
        """The trainer: an object whose ``update(step)`` does one optimizer step and returns
        its log row (or rows), with a ``last_good`` attribute."""
        raise NotImplementedError

    def resume(self, path: Path) -> tuple[int, list[dict]]:
        """Restore checkpoint ``path`` (weights, optimizer, random state; then the trainer's
        own state): (steps done, the log so far)."""
        return checkpoints.load(path, self.named, self.optimizer, self.fingerprint)

    def prepare(self) -> None:
        """Hand the optimizer (and modules) to accelerate, and the trainer what it returns."""
        self.optimizer = self.accelerator.prepare(self.optimizer)
        self.trainer.optimizer = self.optimizer

    def checkpoint(self) -> dict[str, Any]:
        """What :func:`pipeline.checkpoints.save` stores besides the log and fingerprint."""
        return {"named": self.named, "optimizer": self.optimizer}

    def description(self) -> str:
        return f"train {self.job.method}"

    def postfix(self, row: dict) -> dict[str, str]:
        return {}

    def extra_columns(self, steps_done: int) -> dict[str, Any]:
        """Columns the session adds to a step's row after the update (the alignment curves)."""
        return {}

    # -- after the steps -------------------------------------------------------------------
    def finish(self) -> None:
        """Work after the last step, on every process (EA-Adam's fusion, the model's name)."""

    def name_alignment(self, how: str) -> None:
        """Append ``+ <method> (<how>)`` to the saved model's weights description, so the
        report's weights column says how an online method aligned it."""
        weights = self.model.settings.weights
        self.model.settings.weights = f"{weights} + {self.job.method} ({how})"

    def metadata(self) -> dict[str, Any]:
        """The method's metadata keys (beside the session's; the same key overrides)."""
        return {}

    def write(self, folder: Path, metadata: dict[str, Any]) -> None:
        """The output folder: the model and the log (and the method's own files)."""
        self.model.save_pretrained(folder)
        self.write_log(folder, metadata)

    def write_log(self, folder: Path, metadata: dict[str, Any]) -> None:
        frame = pd.DataFrame(self.log, columns=list(self.log_columns))
        write_table(frame, folder / contracts.TRAIN_LOG, self.log_table, metadata)


def method_run(job: Job) -> MethodRun:
    """The job's method, from its module's ``RUN`` class."""
    if contracts.method(job.method).file is not None:  # a method file outside the package
        module = contracts.method_file_module(job.method)
    else:
        module = importlib.import_module(contracts.method_module(job.method))
    return module.RUN(job)


def start(job: Job) -> tuple[MethodRun, int]:
    """The job's method with everything its first step needs, resumed from the newest
    checkpoint of this run if there is one: (the method, steps already done)."""
    run = method_run(job)
    config = run.config
    run.accelerator = accelerator = make_accelerator(config.device, config.mixed_precision)
    run.check()
    run.read_inputs()
    if job.model is None:
        from pipeline.models import load_model

        job.model = load_model(job.model_dir)
    run.model = model = job.model
    run.fingerprint = run.fingerprint_run()
    run.trainable = configure_model(model, config)
    if run.captures_reference:  # a lazily built reference captures the pretrained weights now
        with model.reference():
            pass
    model.to(accelerator.device)
    run.optimizer = run.make_optimizer()
    run.named = trainable_names(model)
    run.trainer = run.build()
    done, run.log = 0, []
    run.resumed_from = checkpoints.resume_point(job.checkpoint_dir, run.fingerprint, accelerator)
    if run.resumed_from is not None:
        done, run.log = run.resume(run.resumed_from)
    run.trainer.last_good = run.resumed_from
    run.prepare()
    return run, done


def train(job: Job) -> Path:
    """Run ``job`` through its method's hooks (module docstring); returns the output folder.

    The newest checkpoint in ``job.checkpoint_dir`` is resumed if its fingerprint matches this
    run's, otherwise the folder is moved aside and training starts afresh. A non-finite loss,
    gradient norm or weight raises ``FloatingPointError`` naming the step; the last good
    checkpoint stays."""
    run, done = start(job)
    steps(run, done)
    run.finish()
    if run.accelerator.is_main_process:
        metadata = {**session_metadata(run), **run.metadata()}
        with atomic_path(job.out_dir) as folder:
            run.write(folder, metadata)
        shutil.rmtree(job.checkpoint_dir, ignore_errors=True)
    run.accelerator.wait_for_everyone()
    return job.out_dir


def steps(run: MethodRun, start: int) -> None:
    """The steps from ``start`` to ``max_steps``: each update's rows join the log; every
    ``checkpoint_every`` steps and at the end the main process writes a checkpoint (kept as
    the trainer's ``last_good``) and all processes wait for it; a progress bar on the main
    process."""
    config, accelerator, trainer = run.config, run.accelerator, run.trainer
    progress = tqdm(
        total=config.max_steps,
        initial=start,
        desc=run.description(),
        file=sys.stderr,
        mininterval=1,
        disable=not accelerator.is_main_process,
    )
    for step in range(start, config.max_steps):
        rows = trainer.update(step)
        rows = rows if isinstance(rows, list) else [rows]
        rows[-1].update(run.extra_columns(step + 1))
        run.log.extend(rows)
        progress.update(1)
        progress.set_postfix(run.postfix(rows[-1]), refresh=False)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.max_steps:
            if accelerator.is_main_process:
                trainer.last_good = checkpoints.save(
                    run.job.checkpoint_dir,
                    step + 1,
                    log=run.log,
                    fingerprint=run.fingerprint,
                    keep=config.keep_checkpoints,
                    **run.checkpoint(),
                )
            accelerator.wait_for_everyone()
    progress.close()


def session_metadata(run: MethodRun) -> dict[str, Any]:
    """The metadata every method's log records."""
    job, accelerator = run.job, run.accelerator
    return {
        "framework": job.framework,
        "method": job.method,
        "loss": contracts.method(job.method).loss,
        "objective": job.objective,
        "seed": int(job.seed),
        "model": str(job.model_dir),
        "fingerprint": run.fingerprint.fields,
        "fingerprint_hash": run.fingerprint.hash,
        "config": dataclasses.asdict(run.config),
        "data": str(job.data_dir),
        "model_describe": run.model.describe(),
        "processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "resumed_from": str(run.resumed_from) if run.resumed_from else None,
    }
