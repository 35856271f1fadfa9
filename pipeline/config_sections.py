"""One config section of a stage: its defaults with the given overrides, unknown keys refused.

Every stage validates its section this way before its own checks (Snakemake has already
validated the whole config against the JSON schema; this also guards direct calls and CLIs).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any


class UnknownConfigKeys(KeyError, ValueError):
    """A config section names keys its stage does not know (a ``KeyError`` and, for the CLIs
    that always reported it so, a ``ValueError``)."""


def with_defaults(
    section: str, defaults: Mapping[str, Any], overrides: Mapping[str, Any] | None
) -> dict[str, Any]:
    """A fresh dict of ``defaults`` updated by ``overrides`` (both deep-copied, so neither is
    changed through the result); a key not in ``defaults`` raises :class:`UnknownConfigKeys` naming it."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise UnknownConfigKeys(
            f"unknown {section} config keys {unknown}; known: {sorted(defaults)}"
        )
    return {**copy.deepcopy(dict(defaults)), **copy.deepcopy(overrides)}
