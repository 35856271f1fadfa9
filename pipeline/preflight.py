"""Checks a configuration before the first job runs: every problem at once, in seconds.

A paper run that names a missing SAM checkpoint would otherwise fail in the segment stage,
hours after pretraining started; an objective over a metric nobody scores would fail in select.
:func:`check_schema` runs first, before Snakemake's own validation: every value the schema
refuses, an unknown key with the nearest valid names and the file that has it (Snakemake's
error would print the schema). :func:`check` looks at the whole config and raises one
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
  the section scores); the prompts source's model (``prompts.captioner`` / ``tagger``);
- metrics: every key of :data:`METRIC_KEYS` (each config key that names IQA metrics) names
  metrics known to pyiqa (or the score stage's aliases), with the nearest names when not, and
  among the metrics it reads (``select.objectives`` among ``score.metrics``, the report's among
  ``evaluate.metrics``, ...); no empty objective; every name in ``objectives`` a select
  objective ('human' needs ``annotations``);
- data: ``degrade.source`` ('demo' or a folder), test set paths outside ``results/``
  (``results/...`` folders are made by the degrade rule), the ``annotations`` file;
- models and candidates, per framework in ``frameworks``: a ``base`` variant; every candidate
  setting's variant configured; unique setting names; ``segment.source`` 'hq' or a setting name;
  settings that cannot differ (below);
- tiny models (no ``pretrain.<fw>.weights``): their base network is trained
  (``train_base`` / ``train_unet``), else a random frozen base would be fine-tuned;
- GPUs: batch sizes divisible by the processes ``gpus`` starts (pretrain: ``gpus.pretrain``;
  train: ``gpus.train`` x ``gradient_accumulation_steps``), which the stages check only when
  their job starts;
- what the stages check when their job starts (:meth:`_Checker.stage_checks`): ``degrade``'s
  crop a multiple of its scale; a fixed prompt that differs from its negative prompt once
  joined as the prompts stage joins them (docs/design.md §9); gdpo's two metric lists disjoint,
  scored, full-reference and no-reference; ddpo's tracker count within its buffer; ea_adam's
  perception and fidelity objectives. (Single values, such as ``report.radar_floor`` below 1,
  are the schema's.)

:func:`lock_hint` names ``snakemake --unlock`` when Snakemake's lock files are present (a
killed run leaves them; whether one is stale cannot be told from here, see there).

Candidate settings that cannot differ are refused (docs/design.md §9, "a guidance
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
import difflib
import functools
import importlib.util
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline import contracts, settings

BASE_VARIANT = "base"
#: one-step model keys that only act through the VSD regulariser (inert when lambda_vsd is 0)
VSD_ONLY_KEYS = (
    "cfg_vsd",
    "lambda_vsd_lora",
    "vsd_timestep_min",
    "vsd_timestep_max",
    "negative_prompt",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # as pipeline.hub.is_hub_id
_IQA_SOURCE = Path(__file__).resolve().parent / "iqa.py"
#: Snakemake's lock folder, relative to the working directory
LOCKS = Path(".snakemake") / "locks"

#: Every config key that names IQA metrics (docs/design.md §10): how its names are read
#: ("list", "keys" of a map, one "value", or "objectives": {name: {metric: weight}}), the key
#: whose metrics they must be among (None: any the registry knows) and when that is read
#: ("always", "gdpo": a gdpo method runs, "simulate": human_eval.simulate.enabled). Every name
#: is checked against the registry whether or not the key is read.
METRIC_KEYS = (
    ("score.metrics", "list", None, "always"),
    ("evaluate.metrics", "list", None, "always"),
    ("score.weights", "keys", "score.metrics", "always"),
    ("score.options", "keys", None, "always"),
    ("evaluate.weights", "keys", "evaluate.metrics", "always"),
    ("evaluate.options", "keys", None, "always"),
    ("select.objectives", "objectives", "score.metrics", "always"),
    ("train.gdpo_fidelity_metrics", "list", "score.metrics", "gdpo"),
    ("train.gdpo_detail_metrics", "list", "score.metrics", "gdpo"),
    ("train.ea_adam.objectives", "objectives", None, "always"),
    ("report.radar_metrics", "list", "evaluate.metrics", "always"),
    ("report.front_objectives", "objectives", "evaluate.metrics", "always"),
    ("human_eval.simulate.metric", "value", "evaluate.metrics", "simulate"),
)


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
    """Every problem of ``config`` as ``(key, problem)``, in config order; [] when it can run.
    Values the schema refuses come alone (nothing else can be read then)."""
    refused = schema_problems(config)
    if refused:
        return refused
    config = settings.resolve("", config)  # defaults filled (a no-op after Snakemake's)
    checker = _Checker(config, Path(root))
    checker.weights()
    checker.metrics()
    checker.data()
    checker.candidates()
    checker.tiny_models()
    checker.gpus()
    checker.stage_checks()
    return checker.problems


# --- the schema ---------------------------------------------------------------------------------


def check_schema(config: Mapping[str, Any], configfiles: Sequence[str | Path] = ()) -> None:
    """Raise :class:`PreflightError` naming every value the schema refuses; an unknown key
    with the nearest valid names and the file that has it. The workflow calls this before
    Snakemake's own validation, whose error prints the schema (5,000 lines at the top level)."""
    problems = schema_problems(config, configfiles)
    if problems:
        raise PreflightError(problems)


def schema_problems(
    config: Mapping[str, Any], configfiles: Sequence[str | Path] = ()
) -> list[tuple[str, str]]:
    """``(key, problem)`` for every value the schema refuses (``configfiles``: where to say an
    unknown key is written)."""
    files = [(Path(name), _load_yaml(name)) for name in configfiles]
    problems = []
    for error in settings.schema_errors("", config):
        where = [str(part) for part in error.absolute_path]
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            known = sorted(error.schema.get("properties", {}))
            for key in sorted(set(error.instance) - set(known)):
                problems.append(_unknown_key(where, key, known, files))
        else:
            problems.append((_dotted(where) or "<config>", _short(error.message)))
    return problems + method_problems(config)


def method_problems(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """An unknown name in ``methods``: the method table (with the config's method files
    registered) is the one list of methods, not the schema (docs/adding_a_method.md)."""
    methods = config.get("methods")
    if not isinstance(methods, list):
        return []
    known = sorted(contracts.METHODS)
    problems = []
    for name in methods:
        if name not in contracts.METHODS:
            nearest = difflib.get_close_matches(str(name), known, n=3)
            hint = (
                f"did you mean: {', '.join(nearest)}?" if nearest else f"known: {', '.join(known)}"
            )
            problems.append(
                (
                    "methods",
                    f"unknown method {name!r}; {hint} (a method of your "
                    "own: a file in method_files, docs/adding_a_method.md)",
                )
            )
    return problems


def _unknown_key(where: list[str], key: str, known: list[str], files) -> tuple[str, str]:
    place = f"in {_dotted(where)}" if where else "at the top level"
    if files:
        holding = [_shown(path) for path, loaded in files if _has(loaded, [*where, key])]
        place += f" (in {', '.join(holding)})" if holding else " (given with --config)"
    nearest = difflib.get_close_matches(key, known, n=3)
    hint = f"did you mean: {', '.join(nearest)}?" if nearest else f"valid: {', '.join(known)}"
    return _dotted([*where, key]), f"unknown key {place}; {hint}"


def _dotted(parts: Sequence[str]) -> str:
    return ".".join(parts)


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_yaml(name: str | Path) -> Any:
    try:
        return yaml.safe_load(Path(name).read_text())
    except (OSError, yaml.YAMLError):
        return None


def _has(loaded: Any, parts: Sequence[str]) -> bool:
    """Whether a loaded config file holds the key at ``parts`` (list items by index)."""
    for part in parts:
        if isinstance(loaded, list) and part.isdigit() and int(part) < len(loaded):
            loaded = loaded[int(part)]
        elif isinstance(loaded, Mapping) and part in loaded:
            loaded = loaded[part]
        else:
            return False
    return True


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# --- after a kill: Snakemake's locks ------------------------------------------------------------


def lock_hint(root: Path) -> str | None:
    """A hint naming ``snakemake --unlock`` when ``root`` holds Snakemake lock files, else None.

    Whether a lock is stale cannot be told reliably from here: the files name the locked paths,
    not a process, and the Snakemake holding them may run on another machine sharing the
    folder (a cluster's login node); so this says what the files mean and the command, and
    Snakemake itself decides whether they conflict (docs/design.md §10).
    """
    folder = Path(root) / LOCKS
    names = sorted(p.name for p in folder.glob("*.lock")) if folder.is_dir() else []
    if not names:
        return None
    return (
        f"note: {LOCKS}/ holds {len(names)} lock file(s) ({', '.join(names[:4])}). If no other "
        "Snakemake runs in this directory, a killed run (kill -9, a lost node) left them and "
        "Snakemake will stop with a LockException: run `snakemake --unlock` with the same "
        "options once, then start the run again."
    )


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
def pyiqa_configs() -> dict[str, Any] | None:
    """pyiqa's registry (``DEFAULT_CONFIGS``) without importing pyiqa; None if absent."""
    spec = importlib.util.find_spec("pyiqa")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "default_model_configs.py"
    module_spec = importlib.util.spec_from_file_location("_dspo_pyiqa_configs", source)
    if module_spec is None or module_spec.loader is None or not source.is_file():
        return None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # it imports collections only
    return dict(module.DEFAULT_CONFIGS)


def pyiqa_metric_ids() -> frozenset[str] | None:
    """pyiqa's metric ids (``DEFAULT_CONFIGS`` keys); None if pyiqa is absent."""
    configs = pyiqa_configs()
    return None if configs is None else frozenset(configs)


def known_metric(name: str) -> bool:
    """Whether the score stage accepts ``name`` (``pipeline.iqa.metric_info`` would not raise)."""
    ids = pyiqa_metric_ids()
    pyiqa_id = score_aliases().get(name, name)
    return ids is None or pyiqa_id in ids


def full_reference(name: str) -> bool | None:
    """Whether ``name`` compares with the HQ (``pipeline.iqa.MetricInfo.full_reference``);
    None when the registry does not know it."""
    configs = pyiqa_configs() or {}
    config = configs.get(score_aliases().get(name, name))
    return None if config is None else config.get("metric_mode") == "FR"


def unknown_metrics_message(unknown: Sequence[str]) -> str:
    """What to say of metric names the registry does not know: the nearest known names."""
    choices = sorted(set(pyiqa_metric_ids() or ()) | set(score_aliases()))
    nearest = [m for name in unknown for m in difflib.get_close_matches(name, choices, n=2)]
    hint = f" (did you mean: {', '.join(dict.fromkeys(nearest))}?)" if nearest else ""
    return (
        f"unknown IQA metric(s) {_names(unknown)}{hint}: neither a pyiqa metric id nor one of "
        f"the score stage's names {_names(sorted(score_aliases()))}"
    )


# --- the checks ---------------------------------------------------------------------------------


def _names(values: Iterable[Any]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted key; None where a section is missing or null."""
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _metric_names(value: Any, reader: str, key: str) -> list[tuple[str, list[str]]]:
    """``(key, metric names)`` of one :data:`METRIC_KEYS` value (per objective for
    "objectives"); none for a null value."""
    if value is None:
        return []
    if reader == "objectives":
        return [
            (f"{key}.{name}", [str(m) for m in (weights or {})]) for name, weights in value.items()
        ]
    if reader == "value":
        return [(key, [str(value)])]
    return [(key, [str(m) for m in value])]  # a list, or the keys of a map


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
                    f"{where}.perceptual_weights",
                    section.get("perceptual_weights"),
                    "file",
                    "LPIPS-VGG checkpoint file",
                )
                self.local(
                    f"{where}.perceptual_weights_dir",
                    section.get("perceptual_weights_dir"),
                    "dir",
                    "torch hub folder of the VGG16 backbone",
                )
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
                self.local(key, str(path), "file", f"weights file of IQA metric {metric!r}")

    def metrics(self) -> None:
        """Every key of :data:`METRIC_KEYS`: names the registry knows, among the metrics of
        the key they read when it is read; no empty objective; every objective selectable."""
        for key, reader, within, when in METRIC_KEYS:
            for where, names in _metric_names(_get(self.config, key), reader, key):
                self.metric_names(where, names, within if self.reads(when) else None)
        for objective, weights in self.config["select"]["objectives"].items():
            if not weights:
                self.problem(
                    f"select.objectives.{objective}",
                    "has no metrics (it could never choose a winner)",
                )
        selectable = list(self.config["select"]["objectives"])
        selectable += ["human"] if self.config["annotations"] else []
        for objective in self.config["objectives"]:
            if objective not in selectable:
                self.problem(
                    "objectives",
                    f"{objective!r} is not a select objective (select.objectives: "
                    f"{_names(sorted(selectable))}; 'human' needs 'annotations')",
                )

    def metric_names(self, key: str, names: list[str], within: str | None) -> None:
        unknown = [name for name in names if not known_metric(name)]
        if unknown:
            self.problem(key, unknown_metrics_message(unknown))
        allowed = _get(self.config, within) if within else None
        missing = [n for n in names if n not in unknown and n not in (allowed or [])]
        if within and missing:
            self.problem(
                key, f"metric(s) {_names(missing)} are not in {within} {_names(allowed or [])}"
            )

    def reads(self, when: str) -> bool:
        """Whether the run reads a key of :data:`METRIC_KEYS` ("always", "gdpo", "simulate")."""
        if when == "gdpo":
            return bool(self.methods_with_loop("gdpo"))
        if when == "simulate":
            return bool(self.config["human_eval"]["simulate"]["enabled"])
        return True

    def methods_with_loop(self, loop: str) -> list[str]:
        return [m for m in self.config["methods"] if contracts.method(m).loop == loop]

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
                    f"testsets.{name}.path",
                    path,
                    "dir",
                    f"{testset['kind']} test set; put it there or remove it from 'testsets'",
                )
        self.local("annotations", config["annotations"], "file", "human annotation file")
        human_eval = config["human_eval"]
        for framework, votes in (human_eval["votes"] or {}).items():
            self.local(
                f"human_eval.votes.{framework}", votes, "file", "votes table of `annotate export`"
            )

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

    # what the stages check when their job starts, checked now (docs/design.md §10)

    def stage_checks(self) -> None:
        self.degrade_crop()
        self.prompts()
        if self.methods_with_loop("gdpo"):
            self.gdpo_metrics()
        if self.methods_with_loop("ddpo") or self.methods_with_loop("gdpo"):
            self.stat_tracker()
        if "ea_adam" in self.config["methods"]:
            self.ea_adam_objectives()

    def degrade_crop(self) -> None:
        """As ``pipeline.degrade.stage_config``: the LQ is the crop downscaled by the scale."""
        degrade = self.config["degrade"]
        crop, scale = degrade["crop_size"], degrade["degradation"]["scale"]
        if crop < scale or crop % scale:
            self.problem(
                "degrade.crop_size",
                f"{crop} is not a multiple of "
                f"degrade.degradation.scale ({scale}): the LQ is the crop downscaled by it",
            )

    def prompts(self) -> None:
        """As the prompts stage: its source's model, and a fixed prompt that differs from its
        negative prompt once joined as the stage joins them (docs/design.md §9)."""
        prompts = self.config["prompts"]
        source = prompts["source"]
        if source == "fixed":
            self.fixed_prompt(prompts)
        models = {
            "captioner": ("captioner", "a BLIP folder"),
            "tagger": ("tagger", "a RAM checkpoint"),
        }
        if source in models:
            key, what = models[source]
            if not prompts[key]:
                self.problem(f"prompts.{key}", f"source {source!r} needs {what} (it is null)")
            self.weight_path(f"prompts.{key}", prompts[key], f"prompts source {source!r}")
        if source == "tagger":
            self.local(
                "prompts.tagger_condition",
                prompts["tagger_condition"],
                "path",
                "DAPE condition checkpoint",
            )
            if importlib.util.find_spec("ram") is None:
                self.problem(
                    "prompts.source",
                    "'tagger' needs the Python package 'ram' "
                    "(recognize-anything), which is not installed",
                )

    def fixed_prompt(self, prompts: Mapping[str, Any]) -> None:
        from pipeline.guidance import join_prompts  # the prompts stage's join (pandas only)

        prompt = join_prompts(prompts["prompt"], prompts["added_prompt"])
        if prompt.strip() == join_prompts(prompts["negative_prompt"]).strip():
            self.problem(
                "prompts.negative_prompt",
                f"equals the prompt {prompt!r} (prompts.prompt + added_prompt, as the prompts "
                "stage joins them): guidance would change nothing (docs/design.md §9)",
            )

    def gdpo_metrics(self) -> None:
        """As ``pipeline.training.gdpo.GroupReward``: two disjoint lists, fidelity metrics
        full-reference, detail metrics no-reference (their names: :meth:`metrics`)."""
        train = self.config["train"]
        fidelity, detail = train["gdpo_fidelity_metrics"], train["gdpo_detail_metrics"]
        shared = [m for m in detail if m in fidelity]
        if shared:
            self.problem(
                "train.gdpo_detail_metrics",
                f"shares {_names(shared)} with train.gdpo_fidelity_metrics",
            )
        for key, names, wanted, kind, term in (
            ("train.gdpo_fidelity_metrics", fidelity, True, "full-reference", "fidelity"),
            ("train.gdpo_detail_metrics", detail, False, "no-reference", "detail"),
        ):
            wrong = [m for m in names if full_reference(m) is (not wanted)]
            if wrong:
                self.problem(key, f"{_names(wrong)} are not {kind} (gdpo's {term} term)")

    def stat_tracker(self) -> None:
        """As ``pipeline.training.ddpo``: the tracker needs its count within its buffer."""
        train = self.config["train"]
        count, size = train["stat_tracker_min_count"], train["stat_tracker_buffer_size"]
        if count > size:
            self.problem(
                "train.stat_tracker_min_count",
                f"{count} exceeds "
                f"train.stat_tracker_buffer_size ({size}): ddpo's tracker could never "
                "use an LQ's own statistics",
            )

    def ea_adam_objectives(self) -> None:
        """ea_adam trains on the pairs of both multi-objectives (select makes them) and scores
        fitness by their metric weights (``train.ea_adam.objectives``, else select's)."""
        wanted = contracts.MULTI_OBJECTIVES
        missing = [o for o in wanted if o not in self.config["select"]["objectives"]]
        if missing:
            self.problem(
                "select.objectives",
                f"methods has 'ea_adam', which trains on the "
                f"pairs of objectives {_names(wanted)}; select.objectives has no "
                f"{_names(missing)}",
            )
        fitness = _get(self.config, "train.ea_adam.objectives")
        lacking = [o for o in wanted if not (fitness or {}).get(o)]
        if fitness is not None and lacking:
            self.problem(
                "train.ea_adam.objectives",
                f"ea_adam's fitness needs metric weights "
                f"of {_names(wanted)}; it has no {_names(lacking)}",
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
