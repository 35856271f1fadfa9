"""Offline by default: nothing reaches the model hub unless downloads are switched on.

``python -m pipeline`` calls :func:`apply_offline_default` before any stage imports
huggingface_hub, diffusers, transformers or datasets: those libraries read their offline and
telemetry switches from the environment once, at import time. Without them huggingface_hub
looks the caller's user agent up on the hub (an agent-registry request) whenever it builds
request headers, even for ``local_files_only`` loads, so every job would open a connection.

Downloads are allowed only when ``DSPO_ALLOW_DOWNLOADS=1`` (exported from the config flag
``allow_downloads``). Every loader in :mod:`pipeline.models` turns a configured path into the
place to load from with :func:`resolve_weights`: a missing local folder is then an error naming
the config key and the path, never a hub lookup (docs/design.md, real components offline).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

#: set to "1" to let the hub libraries download (config ``allow_downloads: true``)
ALLOW_DOWNLOADS_ENV = "DSPO_ALLOW_DOWNLOADS"

#: what the pinned libraries read (checked in their sources):
#: huggingface_hub 2.x ``constants.py``: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE),
#: HF_HUB_DISABLE_TELEMETRY (or DISABLE_TELEMETRY / DO_NOT_TRACK; it also skips the
#: user-agent/agent-registry lookup), HF_HUB_DISABLE_UPDATE_CHECK (CLI version checks);
#: diffusers 0.42 and transformers 5 take huggingface_hub's constants (diffusers has no
#: DIFFUSERS_OFFLINE of its own); datasets 5 ``config.py``: HF_DATASETS_OFFLINE.
OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
}

#: module-level copies of the switches, taken at import (patched if already imported)
_IMPORTED_SWITCHES = {
    "huggingface_hub.constants": (
        "HF_HUB_OFFLINE",
        "HF_HUB_DISABLE_TELEMETRY",
        "HF_HUB_DISABLE_UPDATE_CHECK",
    ),
    "diffusers.utils.hub_utils": ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"),
    "diffusers.loaders.lora_base": ("HF_HUB_OFFLINE",),
    "diffusers.models.attention_dispatch": ("HF_HUB_OFFLINE",),
    "datasets.config": ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "true", "yes", "on"}


def downloads_allowed() -> bool:
    """Whether ``DSPO_ALLOW_DOWNLOADS`` switches downloads on ("1", "true", "yes", "on")."""
    return os.environ.get(ALLOW_DOWNLOADS_ENV, "").strip().lower() in _TRUE


def apply_offline_default() -> bool:
    """Put the hub libraries offline unless downloads are allowed; returns True if it did.

    Sets :data:`OFFLINE_ENVIRONMENT` (inherited by every subprocess) and, for libraries this
    process has already imported, their import-time copies of the switches.
    """
    if downloads_allowed():
        return False
    os.environ.update(OFFLINE_ENVIRONMENT)
    for module_name, names in _IMPORTED_SWITCHES.items():
        module = sys.modules.get(module_name)
        for name in names:
            if module is not None and hasattr(module, name):
                setattr(module, name, True)
    return True


def is_hub_id(text: str) -> bool:
    """``org/name`` with nothing else: the only form taken for a hub id."""
    return bool(_HUB_ID.match(text))


def resolve_weights(path_or_id: str | Path, key: str) -> str:
    """Where a loader reads ``path_or_id`` (the value of config key ``key``) from.

    An existing path is returned absolute. A missing one is a ``FileNotFoundError`` naming
    ``key`` and the path, unless downloads are allowed and it has the form ``org/name``: then
    it is a hub id and returned unchanged.
    """
    text = str(path_or_id)
    if not text:
        raise FileNotFoundError(f"{key} is empty; give a local weights folder")
    path = Path(text).expanduser()
    if path.exists():
        return str(path.resolve())
    where = f"{text}" if path.is_absolute() else f"{text} (relative to {Path.cwd()})"
    if not downloads_allowed():
        raise FileNotFoundError(
            f"{key}: {where} does not exist; downloads are off (allow_downloads: false), "
            "so it is not looked up on the model hub"
        )
    if is_hub_id(text):
        return text
    raise FileNotFoundError(f"{key}: {where} does not exist and is not a hub id (org/name)")
