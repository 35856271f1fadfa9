"""Iterative alignment rounds (docs/design.md §14): which runs iterate, and with what.

Config ``rounds: {count: R, methods: [...], onestep_policy_std: s}``. Round 1 is the DAG without
rounds (``candidates`` ... ``train``, today's paths). For R >= 2, round r + 1 of each
(framework, method, objective) run:

- regenerates the candidates from round r's aligned model (``--model VARIANT=round r's model``
  for every variant the framework's candidate settings name): multi-step settings keep their
  steps x cfg; one-step settings all sample the one aligned model through the one-step Gaussian
  policy with std ``onestep_policy_std`` (its one-step sample is deterministic: without the
  policy the four candidates would be one image). Draws are keyed by the round too;
- re-captions and re-scores them on the SAME masks and instances (the HQ is segmented once);
- re-selects pairs for its own objective only;
- trains from round r's weights, with round r's model as the frozen reference (iterative DPO).

Only methods that train on selected pairs iterate (offline loop, pair level instance or image);
online methods (ddpo) sample their own outputs and multi-objective ones (ea_adam) read several
objectives' pairs, so both are refused. Only automatic objectives iterate: human pairs rate
round 1's candidates. Round r >= 2 of a run's model is evaluated as its own model
(:class:`pipeline.model_names.ModelSpec`, round r).

This module is shared (no stage): the workflow (``workflow/rules/rounds.smk``, ``common.smk``)
and :mod:`pipeline.model_names` (the models a configuration evaluates) read it; it imports no
stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline import contracts, settings

#: Snakemake's constraint of the ``round`` wildcard: 2, 3, ..., 10, ... (round 1 has none)
ROUND_WILDCARD = "[2-9]|[1-9][0-9]+"


def rounds_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``rounds`` section with the schema's defaults."""
    return settings.resolve("rounds", config.get("rounds"))


def can_iterate(method_name: str) -> bool:
    """Whether a method trains on selected pairs of one objective (the offline loop, pair level
    instance or image): the methods rounds can regenerate pairs for."""
    method = contracts.method(method_name)
    return method.loop == "offline" and method.pair_level in contracts.PAIR_LEVELS


def _configured(config: Mapping[str, Any], key: str) -> list[str]:
    value = config.get(key)
    return list(value if value is not None else settings.schema_node(key)["default"])


def iterating_methods(config: Mapping[str, Any]) -> list[str]:
    """The methods of ``rounds.methods`` (null: every configured method that can iterate), in
    the order of ``methods``; a method not configured or one that cannot iterate is an error
    naming the key."""
    chosen = rounds_settings(config)["methods"]
    configured = _configured(config, "methods")
    if chosen is None:
        return [m for m in configured if can_iterate(m)]
    missing = [m for m in chosen if m not in configured]
    if missing:
        raise settings.ConfigError(f"config rounds.methods: {missing} not in methods {configured}")
    refused = [m for m in chosen if not can_iterate(m)]
    if refused:
        raise settings.ConfigError(
            f"config rounds.methods: {refused} cannot iterate (online methods sample from the "
            "policy already; multi-objective ones have no pairs of their own); rounds take "
            "methods that train on selected pairs: "
            f"{[m for m in contracts.METHODS if can_iterate(m)]}"
        )
    return [m for m in configured if m in chosen]


def iterating_objectives(config: Mapping[str, Any]) -> list[str]:
    """The configured objectives whose pairs select computes (``select.objectives``); the
    human objective does not iterate (its annotations rate round 1's candidates)."""
    automatic = settings.resolve("select", config.get("select"))["objectives"]
    return [o for o in _configured(config, "objectives") if o in automatic]


def later_rounds(config: Mapping[str, Any]) -> list[int]:
    """Rounds 2..count (empty for count 1)."""
    return list(range(2, rounds_settings(config)["count"] + 1))


def runs(config: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    """Every (method, objective, round) of the later rounds, per framework."""
    later = later_rounds(config)
    if not later:
        return []
    return [
        (method, objective, round_number)
        for method in iterating_methods(config)
        for objective in iterating_objectives(config)
        for round_number in later
    ]


def check(config: Mapping[str, Any]) -> None:
    """Fail before the first job on a bad ``rounds`` section (see :func:`iterating_methods`),
    and on rounds with nothing to iterate."""
    if later_rounds(config) and not runs(config):
        raise settings.ConfigError(
            f"config rounds.count {rounds_settings(config)['count']}: no run iterates (methods "
            f"{iterating_methods(config)}, automatic objectives {iterating_objectives(config)})"
        )


def job_settings(config: Mapping[str, Any], stage: str, **wildcards: str) -> dict[str, Any]:
    """The settings of one round job: round 1's (:func:`pipeline.settings.job_settings`), except
    that a round's select computes only its run's objective."""
    names = {"candidates": ("framework",), "train": ("method", "objective")}.get(stage, ())
    section = settings.job_settings(config, stage, **{k: wildcards[k] for k in names})
    if stage == "select":
        objective = wildcards["objective"]
        section["objectives"] = {objective: section["objectives"][objective]}
    return section


def candidate_models(
    config: Mapping[str, Any], framework: str, method: str, objective: str, round_number: int
) -> dict[str, str]:
    """``{variant: model folder}`` of a round's candidates: every variant the framework's
    candidate settings name is round ``round_number - 1``'s aligned model."""
    variants = sorted({s["variant"] for s in settings.candidate_settings(config, framework)})
    model = contracts.aligned_artifact(framework, method, objective, round_number - 1)
    return {variant: model for variant in variants}


def policy_std(config: Mapping[str, Any], framework: str) -> float | None:
    """The one-step Gaussian policy's std of a round's candidates (one-step only; multi-step
    sampling draws its own noise per setting)."""
    if framework != "onestep":
        return None
    return float(rounds_settings(config)["onestep_policy_std"])
