"""``python -m pipeline config [--configfile FILE ...] [--config KEY=VALUE ...]``

Prints, as JSON, the settings every job of that configuration runs with, resolved by the same
code the workflow's rules and the stages use (:func:`pipeline.settings.effective_config`).
Files merge in order as Snakemake merges ``--configfile`` files (without one, ``config.yaml``
of the working directory, as the Snakefile does); ``--config`` values are YAML, and a dotted
key sets a nested value (``--config train.max_steps=3``; Snakemake's own ``--config`` takes
top-level keys only, e.g. ``--config 'train={max_steps: 3}'``, which works here too).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline import settings


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge as Snakemake's ``update_config``: nested dicts merge, other values replace."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dotted(config: dict[str, Any], assignment: str) -> dict[str, Any]:
    """``KEY=VALUE`` (VALUE parsed as YAML, KEY possibly dotted) applied to ``config``."""
    if "=" not in assignment:
        raise settings.ConfigError(f"--config {assignment!r}: expected KEY=VALUE")
    key, raw = assignment.split("=", 1)
    value: Any = yaml.safe_load(raw) if raw else ""
    for part in reversed(key.split(".")):
        value = {part: value}
    return merge(config, value)


def load_config(configfiles: list[str], assignments: list[str]) -> dict[str, Any]:
    """The raw config a Snakemake run with these arguments would see."""
    config: dict[str, Any] = {}
    for name in configfiles or ["config.yaml"]:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise settings.ConfigError(f"{path}: the top level is not a mapping")
        config = merge(config, loaded)
    for assignment in assignments:
        config = set_dotted(config, assignment)
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline config", description=__doc__)
    parser.add_argument("--configfile", nargs="+", action="extend", default=[], metavar="FILE")
    parser.add_argument("--config", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        effective = settings.effective_config(load_config(args.configfile, args.config))
    except (settings.ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    json.dump(effective, sys.stdout, indent=2, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
