"""The workflow's human evaluation (config ``human_eval``; workflow/rules/annotate.smk).

Per framework, the votes the ``annotate_winrate`` rule reads: the table ``human_eval.votes``
names for it (a real round, ``annotate export``), else the votes of simulated annotators
(artifact ``simulated_votes``, rule ``annotate_simulate``) unless ``human_eval.simulate.enabled``
is false, else none (no human evaluation, no report section). Settings come from the schema
through :func:`pipeline.settings.resolve`, the only source of defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline import contracts, settings


def human_eval_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``human_eval`` section, schema defaults filled in and validated."""
    return settings.resolve("human_eval", config.get("human_eval"))


def votes_table(config: Mapping[str, Any], framework: str) -> str | None:
    """The votes table of ``framework`` (see the module docstring), or None."""
    section = human_eval_settings(config)
    named = (section["votes"] or {}).get(framework)
    if named:
        return str(named)
    if section["simulate"]["enabled"]:
        return contracts.artifact("simulated_votes", framework=framework)
    return None


def winrate_folders(config: Mapping[str, Any], framework: str) -> list[str]:
    """The report's input: the framework's win-rate folder, or nothing without votes."""
    if votes_table(config, framework) is None:
        return []
    return [contracts.artifact("human_winrates", framework=framework)]
