"""The one place configuration is resolved: schema defaults, then what the user wrote.

The JSON schema (``workflow/schemas/config.schema.yaml``) is the only source of defaults. Every
stage turns its config section into settings with :func:`resolve`, Snakemake's rules build each
job's section with :func:`job_settings`, and ``python -m pipeline config`` prints
:func:`effective_config`, so all three see the same values (docs/design.md, "Configuration").

Resolution order: schema defaults < the family's ``model`` section < a variant's override (only
the keys the variant names; the schema gives variants no defaults of their own). Free-form maps
(``variants``, ``select.objectives``, ``testsets``, ``tiny``) are replaced, not merged, by what the
user writes, as Snakemake's own default filling does.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline import contracts

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"

#: the config sections that belong to one stage each (the rest are run-wide)
STAGE_SECTIONS = contracts.STAGES


class ConfigError(KeyError, ValueError):
    """A config value the schema refuses (unknown key, wrong type, out of range, not an enum
    value). Both a ``KeyError`` and a ``ValueError``, for callers that caught either before."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@functools.cache
def _schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def schema_node(path: str) -> dict[str, Any]:
    """The schema of the config value at a dotted ``path`` ("" = the whole config); a key of a
    free-form map (e.g. a variant name) takes the map's ``additionalProperties`` schema."""
    node = _schema()
    for key in filter(None, path.split(".")):
        properties = node.get("properties", {})
        if key in properties:
            node = properties[key]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            raise ConfigError(f"config has no section {path!r} (no key {key!r})")
    return node


def _complete(node: Mapping[str, Any], value: Any) -> Any:
    """``value`` with the schema's defaults filled in wherever a key is missing (recursively)."""
    if isinstance(value, Mapping):
        value = dict(value)
        properties = node.get("properties", {})
        for key, sub in properties.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = _complete(sub, value[key])
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                if key not in properties:
                    value[key] = _complete(extra, value[key])
        return value
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        return [_complete(node["items"], item) for item in value]
    return copy.deepcopy(value)


def _validate(node: Mapping[str, Any], value: Any, path: str) -> None:
    from jsonschema import Draft202012Validator

    errors = sorted(
        Draft202012Validator(node).iter_errors(value), key=lambda e: list(map(str, e.path))
    )
    if errors:
        lines = []
        for error in errors[:20]:
            where = ".".join([path, *map(str, error.absolute_path)]).strip(".") or "<root>"
            if error.validator == "additionalProperties" and isinstance(error.instance, dict):
                known = sorted(error.schema.get("properties", {}))
                unknown = sorted(set(error.instance) - set(known))
                lines.append(f"unknown {where} config keys {unknown}; known: {known}")
            else:
                lines.append(f"config {where}: {error.message}")
        if len(errors) > 20:
            lines.append(f"... and {len(errors) - 20} more")
        raise ConfigError("\n".join(lines))


def schema_errors(path: str, value: Any) -> list[Any]:
    """The schema's errors (``jsonschema.ValidationError``) of the section at ``path`` with the
    schema's defaults filled in first, as Snakemake's validation fills them; sorted by key."""
    from jsonschema import Draft202012Validator

    node = schema_node(path)
    errors = Draft202012Validator(node).iter_errors(_complete(node, value))
    return sorted(errors, key=lambda e: list(map(str, e.absolute_path)))


def defaults(path: str) -> Any:
    """The schema's defaults of the section at ``path`` (a fresh copy)."""
    node = schema_node(path)
    return _complete(node, copy.deepcopy(node.get("default", {})))


def resolve(path: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The settings of the section at ``path``: schema defaults updated by ``overrides``,
    validated against the section's schema (every error named by its key)."""
    node = schema_node(path)
    value = _complete(node, overrides if overrides is not None else node.get("default", {}))
    _validate(node, value, path)
    return value


def variant_settings(family: Mapping[str, Any], framework: str, variant: str) -> dict[str, Any]:
    """The complete model settings one pretrained variant is built with: schema defaults <
    ``family['model']`` < ``family['variants'][variant]``."""
    variants = family["variants"]
    if variant not in variants:
        raise ConfigError(
            f"config pretrain.{framework}.variants: unknown variant {variant!r}; "
            f"configured: {sorted(variants)}"
        )
    override = variants[variant] or {}
    model = {**dict(family.get("model") or {}), **override}
    return resolve(f"pretrain.{framework}.model", model)


def candidate_settings(config: Mapping[str, Any], framework: str) -> list[dict[str, Any]]:
    """The framework's candidate settings ({name, variant, steps, cfg}); the schema's
    per-framework default (the paper's four) when the config gives none."""
    settings = (config.get("candidates") or {}).get("settings") or {}
    chosen = settings.get(framework)
    if chosen is None:
        chosen = defaults("candidates")["settings"][framework]
    return copy.deepcopy(list(chosen))


def job_settings(config: Mapping[str, Any], stage: str, **wildcards: str) -> dict[str, Any]:
    """The settings one job of ``stage`` runs with, as its ``--config`` argument receives them
    (the rules and ``python -m pipeline config`` both call this)."""
    if stage == "pretrain":
        framework = wildcards["framework"]
        family = resolve(f"pretrain.{framework}", (config.get("pretrain") or {}).get(framework))
        if "variant" in wildcards:  # the job's own variant, complete, and nothing else
            variant = wildcards["variant"]
            family["model"] = variant_settings(family, framework, variant)
            family["variants"] = {variant: {}}
        return family
    section = resolve(stage, config.get(stage))
    if stage == "candidates":
        section["settings"] = candidate_settings(config, wildcards["framework"])
    if stage == "train" and "method" in wildcards:
        section.update(contracts.method(wildcards["method"]).settings)
        if contracts.method(wildcards["method"]).loop in ("ddpo", "gdpo"):
            section["reward"] = reward_settings(config, wildcards.get("objective"))
    if stage == "train":
        ea_adam = section.pop("ea_adam", None)  # ea_adam jobs only, with what fitness needs
        if wildcards.get("method") == "ea_adam":
            section["ea_adam"] = ea_adam_settings(config, ea_adam)
    if stage == "report" and section.get("front_objectives") is None:
        section["front_objectives"] = multi_objective_weights(config)
    return section


def multi_objective_weights(config: Mapping[str, Any]) -> dict[str, Any]:
    """``{objective: {metric: weight}}`` of :data:`pipeline.contracts.MULTI_OBJECTIVES` as
    ``select.objectives`` defines them (those it lacks are left out)."""
    objectives = resolve("select", config.get("select"))["objectives"]
    return {name: objectives[name] for name in contracts.MULTI_OBJECTIVES if name in objectives}


def ea_adam_settings(
    config: Mapping[str, Any], section: Mapping[str, Any] | None
) -> dict[str, Any]:
    """``train.ea_adam`` of an ea_adam job: fitness objectives from ``select.objectives`` and
    the metric registry from the ``score`` section where the section leaves them null."""
    ea_adam = resolve("train.ea_adam", section or {})
    if ea_adam["objectives"] is None:
        ea_adam["objectives"] = multi_objective_weights(config)
    if ea_adam["score"] is None:
        score = resolve("score", config.get("score"))
        ea_adam["score"] = {
            key: score[key]
            for key in ("weights_dir", "weights", "options", "device", "min_crop_size")
        }
    return ea_adam


def reward_settings(config: Mapping[str, Any], objective: str | None = None) -> dict[str, Any]:
    """``train.reward`` of an online job (ddpo; not a schema key, the job's settings carry it):
    the score stage's metric registry settings (``score`` section) and ``objectives``, the
    ``{metric: weight}`` of the job's objective as ``select.objectives`` defines it (without an
    objective, of every configured objective: ``python -m pipeline config``)."""
    score = resolve("score", config.get("score"))
    objectives = resolve("select", config.get("select"))["objectives"]
    names = [objective] if objective else list(config.get("objectives") or objectives)
    registry = ("metrics", "weights_dir", "weights", "options", "device", "min_crop_size")
    return {
        "score": {key: copy.deepcopy(score[key]) for key in registry},
        "objectives": {name: dict(objectives[name]) for name in names if name in objectives},
    }


def effective_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Every stage's settings for this configuration, one key per stage (and ``run`` for the
    run-wide keys: seed, threads, frameworks, methods, ...); for pretraining,
    ``pretrain.<framework>.variants.<variant>`` holds the complete model settings of that
    variant, and ``train.methods.<method>`` the settings of each configured method."""
    root = resolve("", config)
    frameworks = root["frameworks"]
    stages = [key for key in STAGE_SECTIONS if key in root]
    out: dict[str, Any] = {"run": {key: root[key] for key in root if key not in stages}}
    for stage in stages:
        if stage == "pretrain":
            out[stage] = {}
            for framework in frameworks:
                family = job_settings(root, "pretrain", framework=framework)
                family["variants"] = {
                    name: variant_settings(family, framework, name) for name in family["variants"]
                }
                out[stage][framework] = family
        elif stage == "candidates":
            section = job_settings(root, stage, framework=frameworks[0])
            section["settings"] = {fw: candidate_settings(root, fw) for fw in frameworks}
            out[stage] = section
        elif stage == "train":
            section = job_settings(root, stage)
            section["methods"] = {
                method: job_settings(root, stage, method=method) for method in root["methods"]
            }
            out[stage] = section
        else:
            out[stage] = job_settings(root, stage)
    return out


def cli_config(value: str) -> dict[str, Any]:
    """A stage CLI's ``--config``: a JSON file written by the workflow (a job's settings) or
    inline JSON. The settings are echoed to stderr, so they land in the job's log."""
    import json
    import sys

    text = value
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"--config {value!r}: neither inline JSON nor an existing file")
        text = path.read_text()
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"--config {value[:80]!r}: not valid JSON: {error}") from error
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {value[:80]!r}: expected a JSON object")
    print(f"settings: {json.dumps(loaded, sort_keys=True)}", file=sys.stderr, flush=True)
    return loaded
