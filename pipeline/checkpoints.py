"""Checkpoints, run fingerprints and the checked optimizer step shared by ``pretrain`` and ``train``.

A checkpoint is a folder ``<checkpoints>/step-NNNNNNNN/`` written atomically
(:func:`pipeline.io.atomic.atomic_path`), safetensors only (no pickles):

- ``weights.safetensors``: the trainable parameters by name;
- ``optimizer.safetensors``: the optimizer state by parameter index, its param groups as metadata;
- ``rng.safetensors``: the torch CPU/CUDA, numpy and Python RNG states (both stages key their draws
  by step, so these matter only to code that draws from a global RNG);
- ``state.json``: the step, the log so far and the run's fingerprint (and a loop's JSON-able
  ``extra`` state);
- ``extra.safetensors`` (optional): a loop's own tensors (``extra_tensors``, e.g. an online
  method's buffer of policy trajectories), by name.

The fingerprint (:func:`run_fingerprint`) is a JSON-able dict of everything that decides the run
(effective settings, seed, the stage's code hash, content hashes of the input tables and of the
base weights, the process layout) and its hash. A checkpoint folder whose newest checkpoint has
another fingerprint is never resumed: :func:`resume_point` moves it aside to
``<checkpoints>.stale-<hash>`` and logs one line naming the fields that differ.

The step helpers (:func:`check_finite`, :func:`clip_gradients`, :func:`reduce_mean`) make both
training loops stop on a non-finite loss, gradient or weight at every step, the last included.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import random
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import pipeline
from pipeline.codehash import code_hash
from pipeline.distributed import finite_everywhere
from pipeline.io.atomic import atomic_path

logger = logging.getLogger(__name__)

PREFIX = "step-"
KEEP = 2  # newest checkpoints kept while training, where the stage's config does not say
CHUNK = 1 << 20  # bytes read at a time when hashing files
EXTRA_TENSORS = "extra.safetensors"  # a checkpoint's optional loop tensors (save's extra_tensors)


# -- content hashes ------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (big weight files never sit in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def content_hash(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder (e.g. a Zarr store): its files' relative paths and hashes."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        raise FileNotFoundError(f"input not found: {path}")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(file_sha256(file).encode() + b"\0")
    return digest.hexdigest()


def weight_files_hashes(folder: str | os.PathLike) -> dict[str, str]:
    """``{relative path: sha256}`` of every ``*.safetensors`` file under a model folder, and of
    its ``*.json`` files (the settings that say how the weights are put together)."""
    folder = Path(folder)
    files = [*folder.rglob("*.safetensors"), *folder.rglob("*.json")]
    return {file.relative_to(folder).as_posix(): file_sha256(file) for file in sorted(files)}


def module_state_hash(module: torch.nn.Module) -> str:
    """sha256 over an in-memory model's state dict (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def base_weights(source: str | os.PathLike | None, model: torch.nn.Module | None = None) -> Any:
    """The fingerprint entry of a run's base weights: the safetensors files' hashes of a local
    folder; else the hash of the in-memory ``model`` if one is given; else the name (a hub id)."""
    if source and Path(source).is_dir():
        return weight_files_hashes(source)
    if model is not None:
        return {"in_memory_state": module_state_hash(model)}
    return str(source or "")


# -- fingerprints --------------------------------------------------------------------------------


def _canonical(value: Any) -> Any:
    """JSON round trip: tuples become lists, keys strings, so a stored fingerprint compares equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


@dataclass(frozen=True)
class Fingerprint:
    """What decides a run (``fields``, JSON-able) and the sha256 of its canonical JSON."""

    fields: dict[str, Any]

    @property
    def hash(self) -> str:
        text = json.dumps(self.fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def short(self) -> str:
        return self.hash[:12]


@functools.cache
def stage_code_hash(root: Path, stage: str) -> str:
    """The stage's code hash (:func:`pipeline.codehash.code_hash`), computed once per process:
    the code a process runs is what it imported, not what the files say later."""
    return code_hash(root, f"pipeline.{stage}")


def run_fingerprint(
    stage: str,
    *,
    settings: Mapping[str, Any],
    seed: int,
    inputs: Mapping[str, str | os.PathLike],
    weights: Any,
    processes: int,
    device: str = "",
    root: str | os.PathLike | None = None,
) -> Fingerprint:
    """The fingerprint of a ``stage`` run.

    ``settings`` are the stage's effective settings (resolved config, without the keys that may
    change between a kill and a resume: step limits and checkpoint cadence); ``inputs`` maps a
    name to an input table or store, hashed by content; ``weights`` is :func:`base_weights`'s entry;
    ``processes`` and ``device`` are the process layout. ``root`` holds the ``pipeline`` package
    (default: the installed one) for the stage's code hash.
    """
    root = Path(root) if root else Path(pipeline.__file__).resolve().parent.parent
    fields = {
        "stage": stage,
        "settings": dict(settings),
        "seed": int(seed),
        "code": stage_code_hash(root, stage),
        "inputs": {name: content_hash(path) for name, path in sorted(inputs.items())},
        "weights": weights,
        "layout": {"processes": int(processes), "device": str(device)},
    }
    return Fingerprint(_canonical(fields))


def differing_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the leaves where two fingerprints' fields differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                found.append(name)
            else:
                found += differing_fields(old[key], new[key], name)
        return found
    return [] if old == new else [prefix or "<all>"]


# -- where checkpoints live ----------------------------------------------------------------------


def default_location(stage: str, out: str | os.PathLike) -> Path:
    """``results/checkpoints/<stage>/<rest>`` for an output ``results/<kind>/<rest>`` (the
    Snakemake rules' layout); else ``<out's folder>/checkpoints/<stage>/<out's name>``.

    Outside the output folder, so a failed job's outputs can be deleted without them."""
    out = Path(out)
    parts = out.parts
    if "results" in parts[:-2]:
        at = len(parts) - 1 - parts[::-1].index("results")
        if at + 2 < len(parts):
            return Path(*parts[: at + 1], "checkpoints", stage, *parts[at + 2 :])
    return out.parent / "checkpoints" / stage / out.name


def complete_checkpoints(directory: Path) -> list[Path]:
    """The complete checkpoints in ``directory``, oldest first (temporaries are ignored)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"{PREFIX}*") if (p / "state.json").is_file())


def latest_checkpoint(directory: Path) -> Path | None:
    found = complete_checkpoints(directory)
    return found[-1] if found else None


def prune(directory: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints."""
    for old in complete_checkpoints(directory)[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)


def _stale_name(directory: Path, old_hash: str) -> Path:
    base = directory.with_name(f"{directory.name}.stale-{old_hash[:12]}")
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def resume_point(directory: Path, fingerprint: Fingerprint, accelerator=None) -> Path | None:
    """The newest checkpoint of this run in ``directory``, or None to start afresh.

    If the newest checkpoint belongs to another run (any fingerprint field differs, or it has
    none), the whole folder is moved aside to ``<directory>.stale-<its hash>`` (by the main
    process) with one log line naming the differing fields; it is never resumed.
    """
    directory = Path(directory)
    latest = latest_checkpoint(directory)
    if latest is None:
        return None
    state = json.loads((latest / "state.json").read_text())
    old = state.get("fingerprint")
    if old == fingerprint.fields:
        return latest
    old_hash = state.get("fingerprint_hash") or "unknown"
    fields = differing_fields(old, fingerprint.fields) if isinstance(old, dict) else ["<missing>"]
    if accelerator is not None:
        accelerator.wait_for_everyone()  # every process has read the folder before it moves
    if accelerator is None or accelerator.is_main_process:
        stale = _stale_name(directory, old_hash)
        os.replace(directory, stale)
        logger.warning(
            "checkpoints %s belong to another run (differing: %s); moved to %s; starting afresh",
            directory,
            ", ".join(fields),
            stale,
        )
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return None


# -- saving and loading --------------------------------------------------------------------------


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    metadata = {
        "numpy": json.dumps([kind, int(position), int(has_gauss), float(gauss)]),
        "python": json.dumps(random.getstate()),
    }
    return tensors, metadata


def _set_rng_state(path: Path) -> None:
    tensors = load_file(path)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors.get(f"torch_cuda_{i}") for i in range(torch.cuda.device_count())]
    if torch.cuda.is_available() and cuda and all(s is not None for s in cuda):
        torch.cuda.set_rng_state_all(cuda)
    if "numpy" in metadata:
        kind, position, has_gauss, gauss = json.loads(metadata["numpy"])
        keys = tensors["numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state((kind, keys, position, has_gauss, gauss))
    if "python" in metadata:
        version, internal, gauss = json.loads(metadata["python"])
        random.setstate((version, tuple(internal), gauss))


def save(
    directory: Path,
    step: int,
    named: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    log: Sequence[Mapping[str, Any]],
    fingerprint: Fingerprint,
    keep: int | None = None,
    extra: Mapping[str, Any] | None = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``<directory>/step-<step>/`` atomically; with ``keep``, prune older checkpoints.
    ``extra`` (JSON-able, e.g. an online method's stat tracker) goes into ``state.json``;
    :func:`load_extra` returns it. ``extra_tensors`` (``{name: tensor}``) go to
    ``extra.safetensors``; :func:`load_extra_tensors` returns them."""
    final = Path(directory) / f"{PREFIX}{step:08d}"
    state = optimizer.state_dict()
    with atomic_path(final) as folder:
        folder.mkdir()
        save_file(
            {name: p.detach().cpu().contiguous() for name, p in named.items()},
            folder / "weights.safetensors",
        )
        save_file(
            {
                f"{index}.{key}": value.detach().cpu().contiguous()
                for index, entries in state["state"].items()
                for key, value in entries.items()
            },
            folder / "optimizer.safetensors",
            metadata={"param_groups": json.dumps(state["param_groups"])},
        )
        tensors, metadata = _rng_state()
        save_file(tensors, folder / "rng.safetensors", metadata=metadata)
        document = {
            "step": int(step),
            "log": list(log),
            "fingerprint": fingerprint.fields,
            "fingerprint_hash": fingerprint.hash,
        }
        if extra is not None:
            document["extra"] = dict(extra)
        if extra_tensors is not None:
            save_file(
                {name: t.detach().cpu().contiguous() for name, t in extra_tensors.items()},
                folder / EXTRA_TENSORS,
            )
        (folder / "state.json").write_text(json.dumps(document, indent=1, sort_keys=True))
    if keep is not None:
        prune(Path(directory), keep)
    return final


def load(
    path: Path,
    named: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    fingerprint: Fingerprint,
) -> tuple[int, list[dict[str, Any]]]:
    """Restore weights, optimizer and RNG state from a checkpoint; returns (step, log)."""
    state = json.loads((path / "state.json").read_text())
    if state.get("fingerprint") != fingerprint.fields:
        raise ValueError(f"checkpoint {path} belongs to another run (fingerprint differs)")
    weights = load_file(path / "weights.safetensors")
    if set(weights) != set(named):
        raise ValueError(f"checkpoint {path}: trainable parameters do not match the model")
    with torch.no_grad():
        for name, parameter in named.items():
            parameter.copy_(weights[name])
    with safe_open(path / "optimizer.safetensors", framework="pt") as handle:
        groups = json.loads(handle.metadata()["param_groups"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    entries: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        entries.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": entries, "param_groups": groups})
    _set_rng_state(path / "rng.safetensors")
    return int(state["step"]), list(state["log"])


def load_extra(path: Path) -> dict[str, Any] | None:
    """The ``extra`` state a checkpoint was saved with (None if it has none)."""
    return json.loads((Path(path) / "state.json").read_text()).get("extra")


def load_extra_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    """The ``extra_tensors`` a checkpoint was saved with (None if it has none)."""
    file = Path(path) / EXTRA_TENSORS
    return load_file(file) if file.is_file() else None


# -- the checked optimizer step ------------------------------------------------------------------


def check_finite(accelerator, value: torch.Tensor | float, message: str) -> None:
    """Raise ``FloatingPointError(message)`` unless ``value`` is finite on every process."""
    if not finite_everywhere(accelerator, torch.as_tensor(value).detach()):
        raise FloatingPointError(message)


def weights_flag(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """0. if every value of ``params`` is finite, else NaN (for :func:`check_finite`)."""
    flags = [torch.isfinite(p.detach()).all() for p in params]
    finite = bool(torch.stack(flags).all()) if flags else True  # one device sync
    return torch.tensor(0.0 if finite else math.nan)


def _grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def clip_gradients(
    accelerator, groups: Sequence[Sequence[torch.Tensor]], max_norm: float | None
) -> list[torch.Tensor]:
    """Clip each parameter group's gradient norm to ``max_norm`` separately (0/None: no clipping,
    as OSEDiff clips each of its optimizers); returns the groups' norms before clipping.

    Gradients are unscaled once (mixed precision), then each group is clipped on its own."""
    accelerator.unscale_gradients()
    norms = []
    for params in groups:
        params = list(params)
        if max_norm and max_norm > 0:
            norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm))
        else:
            norms.append(_grad_norm(params))
    return norms


def total_norm(norms: Sequence[torch.Tensor]) -> float:
    """The norm of all groups' gradients together, from the per-group norms."""
    return math.sqrt(sum(float(n) ** 2 for n in norms))


def reduce_mean(accelerator, values: Sequence[float]) -> list[float]:
    """The mean over processes of a few scalars (float64)."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction="mean").cpu().tolist()
