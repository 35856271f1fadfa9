"""Checks a configuration before the first job runs: every problem at once, in seconds.

A paper run that names a missing SAM checkpoint would otherwise fail in the segment stage,
hours after pretraining started; an objective over a metric nobody scores would fail in select.
:func:`check` looks at the whole config (after Snakemake's schema validation) and raises one
:class:`PreflightError` listing every problem as ``key: problem``. It is fast: no torch, no
model construction; metric names come from pyiqa's registry file read on its own (importing
pyiqa costs seconds) and the score stage's aliases (``pipeline.iqa.DSPO_METRICS``, read from
its source for the same reason).

What is checked (relative paths are read from ``root``, the run's working directory):

- weights: ``pretrain.<fw>.weights`` and, in ``pretrain.<fw>.model`` and in each variant the run
  pretrains, ``base_weights`` (each a local path, or a hub id ``org/name`` when
  ``allow_downloads`` is true), ``perceptual_weights`` (a file) and ``perceptual_weights_dir`` (a
  folder); ``perceptual: lpips`` without ``perceptual_weights``; ``segment.checkpoint`` (a
  file); ``caption.captioner`` and ``caption.text_encoder`` (a path or, with downloads, a hub
  id); ``score``/``evaluate`` ``weights_dir`` (a folder) and ``weights`` (a file per metric that
  the section scores);
- metrics: ``score.metrics``, ``evaluate.metrics`` known to pyiqa (or the score stage's
  aliases); every metric of ``select.objectives`` scored by ``score.metrics``; no empty
  objective; every name in ``objectives`` a select objective ('human' needs ``annotations``);
- data: ``degrade.source`` ('demo' or a folder), test set paths outside ``results/``
  (``results/...`` folders are made by the degrade rule), the ``annotations`` file;
- models and candidates, per framework in ``frameworks``: a ``base`` variant; every candidate
  setting's variant configured; unique setting names; ``segment.source`` 'hq' or a setting name;
  settings that cannot differ (below);
- tiny models (no ``pretrain.<fw>.weights``): their base network is trained
  (``train_base`` / ``train_unet``), else a random frozen base would be fine-tuned;
- GPUs: batch sizes divisible by the processes ``gpus`` starts (pretrain: ``gpus.pretrain``;
  train: ``gpus.train`` x ``gradient_accumulation_steps``), which the stages check only when
  their job starts.

Candidate settings that cannot differ are refused (issue 12; docs/design.md §9, "a guidance
setting that cannot change the output is a configuration error"):

- one-step: a one-step model runs one step and has no sampling guidance, so ``steps``/``cfg`` in
  a one-step setting are refused (they would be recorded but change nothing), and two settings
  of one variant are identical; two variants whose settings are equal, or differ only in the VSD
  regulariser's keys while it is off (``lambda_vsd: 0``, e.g. cfg6/cfg12 without VSD), would
  differ only by chance;
- multi-step: two settings with the same variant, steps and cfg (a missing or zero steps/cfg
  is the model's default, as the candidates stage reads it), where every cfg <= 1 counts as one
  (guidance off: only the conditional branch runs).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import itertools
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline import settings

BASE_VARIANT = "base"
#: one-step model keys that only act through the VSD regulariser (inert when lambda_vsd is 0)
VSD_ONLY_KEYS = ("cfg_vsd", "lambda_vsd_lora", "vsd_timestep_min", "vsd_timestep_max",
                 "negative_prompt")  # fmt: skip
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # as pipeline.hub.is_hub_id
_IQA_SOURCE = Path(__file__).resolve().parent / "iqa.py"


class PreflightError(ValueError):
    """The configuration cannot run; ``problems`` holds ``(key, problem)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  {key}: {problem}" for key, problem in self.problems)
        super().__init__(
            f"the configuration has {len(self.problems)} problem(s); nothing was run:\n{lines}"
        )


def check(config: Mapping[str, Any], root: Path) -> None:
    """Raise :class:`PreflightError` listing every problem of ``config``; relative paths are
    read from ``root`` (the run's working directory)."""
    problems = find_problems(config, root)
    if problems:
        raise PreflightError(problems)


def find_problems(config: Mapping[str, Any], root: Path) -> list[tuple[str, str]]:
    """Every problem of ``config`` as ``(key, problem)``, in config order; [] when it can run."""
    config = settings.resolve("", config)  # defaults filled (a no-op after Snakemake's)
    checker = _Checker(config, Path(root))
    checker.weights()
    checker.metrics()
    checker.data()
    checker.candidates()
    checker.tiny_models()
    checker.gpus()
    return checker.problems


# --- metric names -------------------------------------------------------------------------------


@functools.cache
def score_aliases() -> dict[str, str]:
    """The score stage's metric names -> pyiqa ids (``pipeline.iqa.DSPO_METRICS``), read from its
    source so that torch is not imported."""
    tree = ast.parse(_IQA_SOURCE.read_text())
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if isinstance(target, ast.Name) and target.id == "DSPO_METRICS" and node.value:
            return {name: spec[0] for name, spec in ast.literal_eval(node.value).items()}
    raise RuntimeError(f"no DSPO_METRICS in {_IQA_SOURCE}")


@functools.cache
def pyiqa_metric_ids() -> frozenset[str] | None:
    """pyiqa's registry (``DEFAULT_CONFIGS`` keys) without importing pyiqa; None if absent."""
    spec = importlib.util.find_spec("pyiqa")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "default_model_configs.py"
    module_spec = importlib.util.spec_from_file_location("_dspo_pyiqa_configs", source)
    if module_spec is None or module_spec.loader is None or not source.is_file():
        return None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # it imports collections only
    return frozenset(module.DEFAULT_CONFIGS)


def known_metric(name: str) -> bool:
    """Whether the score stage accepts ``name`` (``pipeline.iqa.metric_info`` would not raise)."""
    ids = pyiqa_metric_ids()
    pyiqa_id = score_aliases().get(name, name)
    return ids is None or pyiqa_id in ids


# --- the checks ---------------------------------------------------------------------------------


def _names(values: Iterable[Any]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


class _Checker:
    def __init__(self, config: dict[str, Any], root: Path) -> None:
        self.config = config
        self.root = root
        self.allow_downloads = bool(config.get("allow_downloads", False))
        self.problems: list[tuple[str, str]] = []

    def problem(self, key: str, text: str) -> None:
        self.problems.append((key, text))

    # paths

    def _where(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.root / path

    def local(self, key: str, value: str | None, kind: str, what: str) -> None:
        """``value`` (if set) must exist locally as ``kind`` ('file', 'dir' or 'path')."""
        if not value:
            return
        path = self._where(value)
        exists = {"file": path.is_file, "dir": path.is_dir, "path": path.exists}[kind]()
        if exists:
            return
        if path.exists():
            self.problem(key, f"{value!r} is not a {'folder' if kind == 'dir' else kind} ({what})")
        else:
            self.problem(key, f"{value!r} does not exist ({what}; looked for {path})")

    def weight_path(self, key: str, value: str | None, what: str) -> None:
        """``value`` (if set) a local path, or a hub id (org/name) when downloads are allowed."""
        if not value or self._where(value).exists():
            return
        if self.allow_downloads and _HUB_ID.match(value):
            return  # the stage downloads it
        hint = (
            "and it is not a hub id (org/name)"
            if self.allow_downloads
            else "and downloads are off (allow_downloads: false), so it is not a hub id"
        )
        self.problem(
            key, f"{value!r} does not exist ({what}; looked for {self._where(value)}) {hint}"
        )

    # sections

    def weights(self) -> None:
        config = self.config
        for framework in config["frameworks"]:
            family = config["pretrain"][framework]
            prefix = f"pretrain.{framework}"
            self.weight_path(f"{prefix}.weights", family["weights"], "base model weights")
            sections = [(f"{prefix}.model", family.get("model") or {})]
            for variant in self.used_variants(framework):
                override = (family["variants"].get(variant) or {}) if family["variants"] else {}
                sections.append((f"{prefix}.variants.{variant}", override))
            for where, section in sections:
                self.weight_path(
                    f"{where}.base_weights", section.get("base_weights"), "SD base weights"
                )
                self.local(
                    f"{where}.perceptual_weights", section.get("perceptual_weights"), "file",
                    "LPIPS-VGG checkpoint file",
                )  # fmt: skip
                self.local(
                    f"{where}.perceptual_weights_dir", section.get("perceptual_weights_dir"),
                    "dir", "torch hub folder of the VGG16 backbone",
                )  # fmt: skip
            if framework == "onestep":
                for variant in self.used_variants(framework):
                    resolved = self.variant(framework, variant)
                    if (
                        resolved
                        and resolved["perceptual"] == "lpips"
                        and not (resolved["perceptual_weights"])
                    ):
                        self.problem(
                            f"{prefix}.variants.{variant}.perceptual_weights",
                            "perceptual 'lpips' needs perceptual_weights (the LPIPS-VGG file); "
                            "none is set in the variant or in model",
                        )
        self.local("segment.checkpoint", config["segment"]["checkpoint"], "file", "SAM checkpoint")
        caption = config["caption"]
        self.weight_path("caption.captioner", caption["captioner"], "BLIP captioner folder")
        self.weight_path(
            "caption.text_encoder", caption["text_encoder"], "sentence-similarity model folder"
        )
        for stage in ("score", "evaluate"):
            section = config[stage]
            self.local(
                f"{stage}.weights_dir", section["weights_dir"], "dir", "pyiqa weights folder"
            )
            for metric, path in (section["weights"] or {}).items():
                key = f"{stage}.weights.{metric}"
                if metric not in section["metrics"]:
                    self.problem(key, f"{metric!r} is not in {stage}.metrics")
                self.local(key, str(path), "file", f"weights file of IQA metric {metric!r}")

    def metrics(self) -> None:
        config = self.config
        for stage in ("score", "evaluate"):
            unknown = [m for m in config[stage]["metrics"] if not known_metric(m)]
            if unknown:
                self.problem(
                    f"{stage}.metrics",
                    f"unknown IQA metric(s) {_names(unknown)} (neither a pyiqa metric id nor "
                    f"one of the score stage's names {_names(sorted(score_aliases()))})",
                )
        scored = list(config["score"]["metrics"])
        objectives = config["select"]["objectives"]
        for objective, weights in objectives.items():
            key = f"select.objectives.{objective}"
            if not weights:
                self.problem(key, "has no metrics (it could never choose a winner)")
            missing = [m for m in weights if m not in scored]
            if missing:
                self.problem(
                    key, f"metric(s) {_names(missing)} are not in score.metrics {_names(scored)}"
                )
        selectable = list(objectives) + (["human"] if config["annotations"] else [])
        for objective in config["objectives"]:
            if objective not in selectable:
                self.problem(
                    "objectives",
                    f"{objective!r} is not a select objective (select.objectives: "
                    f"{_names(sorted(selectable))}; 'human' needs 'annotations')",
                )

    def data(self) -> None:
        config = self.config
        source = config["degrade"]["source"]
        if source != "demo":
            self.local("degrade.source", source, "dir", "folder of HQ training images")
        for name, testset in config["testsets"].items():
            path = testset["path"]
            # results/... folders are made by the degrade rule; a missing external one would make
            # Snakemake skip the report silently when an older report exists
            if not Path(path).as_posix().startswith("results/"):
                self.local(
                    f"testsets.{name}.path", path, "dir",
                    f"{testset['kind']} test set; put it there or remove it from 'testsets'",
                )  # fmt: skip
        self.local("annotations", config["annotations"], "file", "human annotation file")
        human_eval = config["human_eval"]
        for framework, votes in (human_eval["votes"] or {}).items():
            self.local(f"human_eval.votes.{framework}", votes, "file",
                       "votes table of `annotate export`")  # fmt: skip
        metric = human_eval["simulate"]["metric"]
        if human_eval["simulate"]["enabled"] and metric not in config["evaluate"]["metrics"]:
            self.problem("human_eval.simulate.metric",
                         f"{metric!r} is not in evaluate.metrics {_names(config['evaluate']['metrics'])}")  # fmt: skip

    def candidates(self) -> None:
        config = self.config
        names_by_framework = {}
        for framework in config["frameworks"]:
            family = config["pretrain"][framework]
            variants = family["variants"] or {}
            if BASE_VARIANT not in variants:
                self.problem(
                    f"pretrain.{framework}.variants",
                    f"needs a {BASE_VARIANT!r} variant (the pretrained model every method "
                    f"aligns); configured: {_names(variants)}",
                )
            chosen = settings.candidate_settings(config, framework)
            key = f"candidates.settings.{framework}"
            names = [setting["name"] for setting in chosen]
            names_by_framework[framework] = names
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                self.problem(key, f"setting name(s) {_names(repeated)} used more than once")
            for index, setting in enumerate(chosen):
                if setting["variant"] not in variants:
                    self.problem(
                        f"{key}[{index}]",
                        f"setting {setting['name']!r}: variant {setting['variant']!r} is not in "
                        f"pretrain.{framework}.variants {_names(variants)}",
                    )
            valid = [s for s in chosen if s["variant"] in variants]
            if framework == "onestep":
                self._onestep_settings(key, chosen, valid)
            else:
                self._multistep_settings(key, valid)
        source = config["segment"]["source"]
        if source != "hq":
            for framework, names in names_by_framework.items():
                if source not in names:
                    self.problem(
                        "segment.source",
                        f"{source!r} is neither 'hq' nor a candidate setting of {framework} "
                        f"{_names(names)}",
                    )

    def _onestep_settings(self, key: str, chosen: list[dict], valid: list[dict]) -> None:
        for index, setting in enumerate(chosen):
            ignored = [k for k in ("steps", "cfg") if setting.get(k) is not None]
            if ignored:
                self.problem(
                    f"{key}[{index}]",
                    f"setting {setting['name']!r} gives {'/'.join(ignored)}, which one-step "
                    "models ignore (one step, no sampling guidance): a setting picks a variant",
                )
        by_variant: dict[str, list[str]] = {}
        for setting in valid:
            by_variant.setdefault(setting["variant"], []).append(setting["name"])
        for variant, names in by_variant.items():
            if len(names) > 1:
                self.problem(
                    key,
                    f"settings {_names(names)} use the same variant {variant!r}: one-step models "
                    "ignore steps and cfg, so they would be identical",
                )
        effective = {}
        for variant in by_variant:
            resolved = self.variant("onestep", variant)
            if resolved is None:
                continue
            if not resolved["lambda_vsd"]:
                resolved = {k: v for k, v in resolved.items() if k not in VSD_ONLY_KEYS}
            effective[variant] = resolved
        for first, second in itertools.combinations(effective, 2):
            if effective[first] == effective[second]:
                self.problem(
                    key,
                    f"variants {first!r} and {second!r} have the same effective settings "
                    f"(pretrain.onestep.variants; with lambda_vsd 0 the VSD keys "
                    f"{_names(VSD_ONLY_KEYS)} change nothing), so their candidates could differ "
                    "only by chance",
                )

    def _multistep_settings(self, key: str, valid: list[dict]) -> None:
        groups: dict[tuple, list[str]] = {}
        for setting in valid:
            model = self.variant("multistep", setting["variant"])
            if model is None:
                continue
            # as pipeline.candidates.setting_steps_cfg reads them: missing or 0 = the default
            steps = int(setting.get("steps") or model["steps"])
            cfg = float(setting.get("cfg") or model["cfg"])
            guidance = cfg if cfg > 1.0 else "off"
            groups.setdefault((setting["variant"], steps, guidance), []).append(setting["name"])
        for (variant, steps, guidance), names in groups.items():
            if len(names) > 1:
                why = (
                    "every cfg <= 1 runs the conditional branch only (no guidance)"
                    if guidance == "off"
                    else "the same variant, steps and cfg"
                )
                self.problem(
                    key,
                    f"settings {_names(names)} would be identical (variant {variant!r}, "
                    f"{steps} steps; {why})",
                )

    def gpus(self) -> None:
        config = self.config
        gpus = config["gpus"]
        processes = gpus.get("pretrain", 1)
        for framework in config["frameworks"]:
            batch = config["pretrain"][framework]["batch_size"]
            if processes > 1 and batch % processes:
                self.problem(
                    f"pretrain.{framework}.batch_size",
                    f"{batch} is not a multiple of gpus.pretrain ({processes}): each DDP "
                    "process takes an equal share",
                )
        train = config["train"]
        processes = max(1, gpus.get("train", 1)) * train["gradient_accumulation_steps"]
        if train["batch_size"] % processes:
            self.problem(
                "train.batch_size",
                f"{train['batch_size']} is not a multiple of gpus.train "
                f"({gpus.get('train', 1)}) x train.gradient_accumulation_steps "
                f"({train['gradient_accumulation_steps']})",
            )

    # helpers

    def tiny_models(self) -> None:
        """A model built from scratch (no ``weights``) must train its base network: a random,
        frozen UNet under a LoRA (or a ControlNet) cannot learn to super-resolve."""
        trained = {"onestep": "train_base", "multistep": "train_unet"}
        for framework in self.config["frameworks"]:
            if self.config["pretrain"][framework]["weights"]:
                continue
            key = trained[framework]
            for variant in self.used_variants(framework):
                model = self.variant(framework, variant)
                if model is not None and not model[key]:
                    self.problem(
                        f"pretrain.{framework}.model.{key}",
                        f"false for variant {variant!r}, but pretrain.{framework}.weights is empty "
                        f"(a tiny model from scratch): its random base would stay frozen; set "
                        f"model.{key}: true, or name real weights",
                    )

    def used_variants(self, framework: str) -> list[str]:
        """The variants the run pretrains: the base and every candidate setting's variant."""
        variants = self.config["pretrain"][framework]["variants"] or {}
        used = [BASE_VARIANT] + [
            s["variant"] for s in settings.candidate_settings(self.config, framework)
        ]
        return [v for v in dict.fromkeys(used) if v in variants]

    def variant(self, framework: str, variant: str) -> dict[str, Any] | None:
        """A variant's complete model settings; None (and a problem) if the schema refuses them."""
        family = self.config["pretrain"][framework]
        try:
            return settings.variant_settings(family, framework, variant)
        except settings.ConfigError as error:
            self.problem(f"pretrain.{framework}.variants.{variant}", str(error))
            return None
