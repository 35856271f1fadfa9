"""SR model families behind one interface (:class:`pipeline.models.base.SRModel`).

``load_model`` reads ``dspo_model.json`` to pick the family; the family modules are imported
lazily so a stage only pays for the one it uses.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from pipeline.models.base import SRModel

FAMILIES = {
    "multistep": ("pipeline.models.multistep", "MultiStepSR"),
    "onestep": ("pipeline.models.onestep", "OneStepSR"),
}
MODEL_FILE = "dspo_model.json"


def model_class(framework: str) -> type[SRModel]:
    """The ``SRModel`` subclass of ``framework`` ("multistep" or "onestep")."""
    if framework not in FAMILIES:
        raise ValueError(f"unknown framework {framework!r}; expected one of {sorted(FAMILIES)}")
    module_name, class_name = FAMILIES[framework]
    return getattr(importlib.import_module(module_name), class_name)


def load_model(path: str | Path, framework: str | None = None, **overrides) -> SRModel:
    """Load a model folder written by ``save_pretrained``; ``overrides`` go to ``from_pretrained``
    (``device``, ``dtype``, settings). A folder without ``dspo_model.json`` (real SD weights or a
    hub id) needs ``framework``."""
    description_file = Path(path) / MODEL_FILE
    if description_file.is_file():
        framework = json.loads(description_file.read_text())["framework"]
    elif framework is None:
        raise FileNotFoundError(
            f"{description_file} not found; pass framework= to load base weights from {path}"
        )
    return model_class(framework).from_pretrained(path, **overrides)


def build_tiny_model(framework: str, **kwargs) -> SRModel:
    """A tiny randomly initialised model of ``framework`` (tests, CPU demo)."""
    return model_class(framework).build_tiny(**kwargs)
