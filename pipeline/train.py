"""Preference training: DSPO, Diffusion-DPO, SFT and Diffusion-DRO on one model (DSPO paper §4.2-4.4).

For every LQ of a batch (DESIGN.md point 3):

1. the distinct candidates that win or lose any of its pairs share ONE timestep ``t`` and ONE
   noise ``eps`` (:func:`draw_conditions`);
2. the policy runs once and the frozen reference runs once (``model.reference()``, no grad) over
   those distinct candidates (:func:`shared_error_maps`), NOT once per instance;
3. the error maps are pooled per instance mask on the latent grid and fed to the method's loss
   from :mod:`pipeline.losses` (:func:`lq_loss`); the batch loss is the mean over LQs.

Methods: ``dspo`` (instance pairs, Eq. 5), ``dpo`` (the image-level pair, ``instance_id -1``, one
full mask), ``sft`` (the image-level winner's plain error), ``dro`` (instance pairs, Diffusion-DRO's
hinge). The user description feedback (paper's M2) feeds each image's negative prompt to the
unconditional branch: with probability ``uncond_drop_rate`` an LQ's prompt is replaced by its
negative prompt (M2, ``negative_prompts: true``) or by the empty prompt (M1 only).

Batching: ``batch_size`` LQs per optimizer step IN TOTAL, split over processes and gradient
accumulation micro-steps, so one config gives the same update on 1 or several processes.
Every random draw is keyed by (seed, step, slot in the global batch, image id), so the
update does not depend on the process layout and a resumed run repeats a killed one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from pipeline import losses
from pipeline.distributed import finite_everywhere, make_accelerator
from pipeline.io.atomic import atomic_path
from pipeline.io.images import read_rgb, to_tensor
from pipeline.io.masks import read_label_map
from pipeline.io.tables import read_table, write_table
from pipeline.models.base import SRModel, upsample_lq
from pipeline.seeding import numpy_rng, torch_generator

STAGE = "train"
METHODS = ("dspo", "dpo", "sft", "dro")
IMAGE_LEVEL = -1  # instance_id of an image-level pair in the preference_pairs table
LOG_COLUMNS = ("step", "loss", *losses.STAT_KEYS, "lr", "grad_norm")


@dataclass(frozen=True)
class TrainConfig:
    """The ``train`` config section (defaults in brackets are the paper's where it gives one)."""

    max_steps: int = 100  # optimizer steps (the paper does not give its iteration count)
    batch_size: int = 4  # LQs per optimizer step over all processes and micro-steps [paper: 4]
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5  # [paper: 5e-5]
    lr_warmup_steps: int = 0  # linear warm-up, then constant
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0  # clip the global grad norm; 0 disables clipping
    beta: float = 8000.0  # [paper: 8000]
    k: float = 0.5  # logit = -k * beta * d; 0.5 as Diffusion-DPO's code, 1 for the literal Eq. 5
    dro_margin: float = 1e-3  # Diffusion-DRO's hinge margin
    prompt: str = ""  # the conditional-branch prompt of every LQ
    negative_prompts: bool = True  # M2: dropped prompts become the image's negative prompt
    uncond_drop_rate: float = 0.2  # probability of training an LQ on the unconditional branch
    checkpoint_every: int = 50  # optimizer steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept while training
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | no | bf16 | fp16
    gradient_checkpointing: bool = False
    device: str = "auto"  # auto | cpu | cuda

    @classmethod
    def from_dict(cls, section: dict[str, Any] | None) -> TrainConfig:
        section = dict(section or {})
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"unknown train config keys {unknown}; known: {sorted(known)}")
        config = cls(**section)
        if config.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(
                f"train.mixed_precision must be auto|no|bf16|fp16, got {config.mixed_precision!r}"
            )
        if config.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device must be auto|cpu|cuda, got {config.device!r}")
        if not 0.0 <= config.uncond_drop_rate <= 1.0:
            raise ValueError(
                f"train.uncond_drop_rate must be in [0, 1], got {config.uncond_drop_rate}"
            )
        for name in (
            "max_steps",
            "batch_size",
            "gradient_accumulation_steps",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            if getattr(config, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(config, name)}")
        return config


# -- preference items ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceItem:
    """One LQ's training pairs: distinct candidates and, per instance, winner/loser indices."""

    image_id: str
    candidates: tuple[str, ...]  # distinct candidate settings that win or lose any pair, sorted
    instance_ids: tuple[int, ...]  # label ids in the mask store; -1 = the whole image
    weights: tuple[float, ...]
    winners: tuple[int, ...]  # indices into ``candidates``
    losers: tuple[int, ...]
    negative_prompt: str


def preference_items(pairs: pd.DataFrame, method: str) -> list[PreferenceItem]:
    """Group the preference pairs by image into the items ``method`` trains on (sorted by image).

    ``dspo``/``dro`` use the instance pairs (``instance_id >= 0``); ``dpo`` the image-level pair
    (``instance_id == -1``) with one full mask; ``sft`` only that pair's winner.
    The image's negative prompt joins its rows' distinct non-empty negative prompts.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    image_level = pairs["instance_id"] == IMAGE_LEVEL
    rows = pairs[~image_level if method in ("dspo", "dro") else image_level]
    if rows.empty:
        kind = "instance-level" if method in ("dspo", "dro") else "image-level (instance_id -1)"
        raise ValueError(
            f"method {method!r} needs {kind} preference pairs; the pairs table has none"
        )
    items = []
    for image_id, group in rows.sort_values(["image_id", "instance_id"], kind="stable").groupby(
        "image_id", sort=True
    ):
        if method in ("dpo", "sft") and len(group) != 1:
            raise ValueError(f"image {image_id!r} has {len(group)} image-level pairs; expected one")
        winners = list(group["winner"])
        losers = winners if method == "sft" else list(group["loser"])
        candidates = tuple(sorted(set(winners) | set(losers)))
        index = {name: i for i, name in enumerate(candidates)}
        negatives = [
            text
            for text in dict.fromkeys(pairs.loc[pairs["image_id"] == image_id, "negative_prompt"])
            if text
        ]
        items.append(
            PreferenceItem(
                image_id=str(image_id),
                candidates=candidates,
                instance_ids=tuple(int(i) for i in group["instance_id"]),
                weights=(1.0,)
                if method in ("dpo", "sft")
                else tuple(float(w) for w in group["weight"]),
                winners=tuple(index[name] for name in winners),
                losers=tuple(index[name] for name in losers),
                negative_prompt=", ".join(negatives),
            )
        )
    return items


@dataclass
class LoadedItem:
    """An item's tensors: HQ-sized LQ ``[3, H, W]``, candidates ``[D, 3, H, W]``, masks ``[M, H, W]``."""

    item: PreferenceItem
    lq: torch.Tensor
    targets: torch.Tensor
    masks: torch.Tensor


class ItemLoader:
    """Reads an item's LQ, candidate images and instance masks from the stage inputs."""

    def __init__(
        self, candidates: pd.DataFrame, candidates_path: Path, data_dir: Path, masks_path: Path
    ):
        self.data_dir = Path(data_dir)
        self.masks_path = Path(masks_path)
        base = Path(candidates_path).parent
        self.paths: dict[tuple[str, str], Path] = {}
        for row in candidates.itertuples():
            path = Path(row.path)
            if not path.is_absolute() and not path.exists():
                path = base / path  # paths relative to the candidates table's folder
            self.paths[(str(row.image_id), str(row.setting))] = path

    def check(self, items: Sequence[PreferenceItem]) -> None:
        """Fail before training if a pair names a candidate the candidates table lacks."""
        missing = [
            (i.image_id, c)
            for i in items
            for c in i.candidates
            if (i.image_id, c) not in self.paths
        ]
        if missing:
            raise KeyError(f"candidates table has no row for (image_id, setting) {missing[:5]}")

    def load(self, item: PreferenceItem) -> LoadedItem:
        targets = torch.stack(
            [to_tensor(read_rgb(self.paths[(item.image_id, c)])) for c in item.candidates]
        )
        lq_path = self.data_dir / "lq" / f"{item.image_id}.png"
        if not lq_path.is_file():
            raise FileNotFoundError(f"LQ image not found: {lq_path}")
        size = tuple(targets.shape[-2:])
        lq = upsample_lq(to_tensor(read_rgb(lq_path))[None], size)[0]
        if all(i == IMAGE_LEVEL for i in item.instance_ids):
            masks = torch.ones((1, *size), dtype=torch.bool)
        else:
            label_map = torch.from_numpy(
                read_label_map(self.masks_path, item.image_id).astype(np.int64)
            )
            ids = torch.tensor(item.instance_ids, dtype=torch.int64)
            masks = label_map[None] == ids[:, None, None]
            if tuple(masks.shape[-2:]) != size:
                masks = (
                    nn.functional.interpolate(masks[None].float(), size=size, mode="nearest")[0]
                    > 0.5
                )
            empty = [i for i, mask in zip(item.instance_ids, masks, strict=True) if not mask.any()]
            if empty:
                raise ValueError(
                    f"image {item.image_id!r}: instances {empty} are absent from the label map"
                )
        return LoadedItem(item, lq, targets, masks)


# -- one training step ---------------------------------------------------------------------------


@dataclass
class Conditions:
    """An LQ's shared draws: timestep ``[1]``, noise ``[1, C, h, w]`` and the prompt it trains on."""

    timestep: torch.Tensor
    noise: torch.Tensor
    prompt: str


def draw_conditions(
    model: SRModel, loaded: LoadedItem, config: TrainConfig, seed: int, step: int, slot: int
) -> Conditions:
    """One ``t`` and ``eps`` shared by all candidates of the LQ, and the branch it trains on."""
    generator = torch_generator(seed, STAGE, step, slot, loaded.item.image_id)
    timestep, noise = model.draw_timesteps_and_noise(loaded.lq[None], generator)
    dropped = float(torch.rand(1, generator=generator)) < config.uncond_drop_rate
    prompt = config.prompt
    if dropped:
        prompt = loaded.item.negative_prompt if config.negative_prompts else ""
    return Conditions(timestep, noise, prompt)


def _shape_groups(loaded: Sequence[LoadedItem]) -> list[list[int]]:
    """Indices of the items sharing an image size (one batched forward per group)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, entry in enumerate(loaded):
        groups.setdefault(tuple(entry.targets.shape[-2:]), []).append(i)
    return list(groups.values())


def _error_maps_batched(
    model: SRModel,
    loaded: Sequence[LoadedItem],
    conditions: Sequence[Conditions],
    device: torch.device,
) -> list[torch.Tensor]:
    """Per-item error maps ``[D_i, h, w]``: one ``error_maps`` call per image size.

    Items with fewer distinct candidates are padded by repeating their first candidate; the
    padded maps are dropped (each target's map depends only on that target).
    """
    out: list[torch.Tensor | None] = [None] * len(loaded)
    for group in _shape_groups(loaded):
        width = max(loaded[i].targets.shape[0] for i in group)
        targets = []
        for i in group:
            t = loaded[i].targets
            pad = t[:1].expand(width - t.shape[0], *t.shape[1:])
            targets.append(torch.cat([t, pad]))
        maps = model.error_maps(
            torch.stack([loaded[i].lq for i in group]).to(device),
            torch.stack(targets).to(device),
            torch.cat([conditions[i].timestep for i in group]).to(device),
            torch.cat([conditions[i].noise for i in group]).to(device),
            [conditions[i].prompt for i in group],
        )
        for row, i in enumerate(group):
            out[i] = maps[row, : loaded[i].targets.shape[0]]
    return out


class PolicyErrors(nn.Module):
    """The policy's forward as one ``nn.Module`` call, so DDP sees one forward per micro-step."""

    def __init__(self, model: SRModel):
        super().__init__()
        self.model = model

    def forward(
        self, loaded: Sequence[LoadedItem], conditions: Sequence[Conditions]
    ) -> list[torch.Tensor]:
        return _error_maps_batched(
            self.model, loaded, conditions, next(self.model.parameters()).device
        )


def reference_errors(
    model: SRModel, loaded: Sequence[LoadedItem], conditions: Sequence[Conditions]
) -> list[torch.Tensor]:
    """The frozen reference's error maps under the same draws (no gradient)."""
    with torch.no_grad(), model.reference():
        return _error_maps_batched(model, loaded, conditions, next(model.parameters()).device)


def lq_loss(
    method: str,
    err_theta: torch.Tensor,
    err_ref: torch.Tensor | None,
    loaded: LoadedItem,
    config: TrainConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The method's loss for one LQ from its shared error maps (masks area-resized to the grid)."""
    item = loaded.item
    masks = losses.resize_masks_to_grid(loaded.masks, *err_theta.shape[-2:]).to(err_theta.device)
    weights = torch.tensor(item.weights)
    winners, losers = torch.tensor(item.winners), torch.tensor(item.losers)
    if method == "sft":
        return losses.sft_loss(err_theta, masks, weights, winners)
    if method == "dro":
        return losses.dro_loss(
            err_theta, err_ref, masks, weights, winners, losers, margin=config.dro_margin
        )
    # dspo, and dpo whose single full-image mask makes this exactly Diffusion-DPO
    return losses.dspo_loss(
        err_theta, err_ref, masks, weights, winners, losers, beta=config.beta, k=config.k
    )


def shared_error_maps(
    policy: nn.Module,
    model: SRModel,
    loaded: Sequence[LoadedItem],
    conditions: Sequence[Conditions],
    method: str,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Policy and reference maps over each LQ's distinct candidates (SFT needs no reference)."""
    err_ref: list[torch.Tensor | None] = [None] * len(loaded)
    if method != "sft":
        err_ref = reference_errors(model, loaded, conditions)
    return policy(loaded, conditions), err_ref


def losses_from_errors(
    err_theta: Sequence[torch.Tensor],
    err_ref: Sequence[torch.Tensor | None],
    loaded: Sequence[LoadedItem],
    method: str,
    config: TrainConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over LQs of the method's loss (computed in fp32, outside any autocast)."""
    return losses.mean_over_lqs(
        [
            lq_loss(method, et, er, entry, config)
            for et, er, entry in zip(err_theta, err_ref, loaded, strict=True)
        ]
    )


def batch_loss(
    policy: nn.Module,
    model: SRModel,
    loaded: Sequence[LoadedItem],
    conditions: Sequence[Conditions],
    method: str,
    config: TrainConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over LQs of the method's loss, with shared forwards per LQ."""
    err_theta, err_ref = shared_error_maps(policy, model, loaded, conditions, method)
    return losses_from_errors(err_theta, err_ref, loaded, method, config)


def instance_loop_loss(
    model: SRModel,
    loaded: Sequence[LoadedItem],
    conditions: Sequence[Conditions],
    method: str,
    config: TrainConfig,
) -> torch.Tensor:
    """The naive reference implementation: one policy and one reference forward PER INSTANCE.

    Same draws and same formula as :func:`batch_loss`; used by the tests (equality of loss and
    gradients) and by ``bench train_step`` (the speed-up of the shared forwards).
    """
    device = next(model.parameters()).device
    per_lq = []
    for entry, cond in zip(loaded, conditions, strict=True):
        item, total = entry.item, 0.0
        for m in range(len(item.instance_ids)):
            pair = [item.winners[m]] if method == "sft" else [item.winners[m], item.losers[m]]
            one = LoadedItem(
                dataclasses.replace(
                    item,
                    candidates=tuple(item.candidates[c] for c in pair),
                    instance_ids=item.instance_ids[m : m + 1],
                    weights=item.weights[m : m + 1],
                    winners=(0,),
                    losers=(len(pair) - 1,),
                ),
                entry.lq,
                entry.targets[pair],
                entry.masks[m : m + 1],
            )
            err_theta = _error_maps_batched(model, [one], [cond], device)[0]
            err_ref = None if method == "sft" else reference_errors(model, [one], [cond])[0]
            loss, _ = lq_loss(method, err_theta, err_ref, one, config)
            # sft_loss normalises by the weights; undo it to sum the per-instance terms
            total = total + (
                loss * item.weights[m] / sum(item.weights) if method == "sft" else loss
            )
        per_lq.append(total)
    return torch.stack(per_lq).mean()


# -- the training loop --------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _epoch_order(n_items: int, seed: int, epoch: int) -> np.ndarray:
    return numpy_rng(seed, STAGE, "order", epoch).permutation(n_items)


def step_slots(n_items: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Item indices of the global batch of ``step`` (0-based): seeded epoch permutations, back to back."""
    positions = range(step * batch_size, (step + 1) * batch_size)
    return [int(_epoch_order(n_items, seed, p // n_items)[p % n_items]) for p in positions]


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up over ``lr_warmup_steps`` optimizer steps, then constant."""
    if config.lr_warmup_steps <= 0:
        return config.learning_rate
    return config.learning_rate * min(1.0, (step + 1) / config.lr_warmup_steps)


def _configure_model(model: SRModel, config: TrainConfig) -> list[nn.Parameter]:
    """Freeze everything but the trainable parameters; switch on gradient checkpointing."""
    trainable = list(model.trainable_parameters())
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in trainable:
        parameter.requires_grad_(True)
    if config.gradient_checkpointing:
        switched = [
            module.enable_gradient_checkpointing()
            for module in model.modules()
            if getattr(module, "_supports_gradient_checkpointing", False)
        ]
        if not switched:
            raise ValueError(
                f"{type(model).__name__} has no module that supports gradient checkpointing"
            )
    return trainable


def _trainable_names(model: SRModel) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# -- checkpoints ---------------------------------------------------------------------------------


def save_checkpoint(
    directory: Path,
    step: int,
    model: SRModel,
    optimizer: torch.optim.Optimizer,
    log: list[dict],
    fingerprint: dict,
) -> Path:
    """Write ``step-NNNNNNNN/`` atomically: trainable weights, optimizer, RNG state, log, step."""
    final = directory / f"step-{step:08d}"
    with atomic_path(final) as folder:
        folder.mkdir()
        save_file(
            {n: p.detach().cpu().contiguous() for n, p in _trainable_names(model).items()},
            folder / "trainable.safetensors",
        )
        state = optimizer.state_dict()
        tensors = {
            f"{index}.{key}": value.detach().cpu().contiguous()
            for index, entries in state["state"].items()
            for key, value in entries.items()
        }
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(
            tensors,
            folder / "optimizer.safetensors",
            metadata={"param_groups": json.dumps(state["param_groups"])},
        )
        save_file(rng, folder / "rng.safetensors")
        write_table(
            pd.DataFrame(log, columns=list(LOG_COLUMNS)), folder / "train_log.parquet", "train_log"
        )
        (folder / "state.json").write_text(
            json.dumps({"step": step, "run": fingerprint}, indent=1, sort_keys=True)
        )
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint in ``directory`` (temporaries are ignored)."""
    found = sorted(p for p in directory.glob("step-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def load_checkpoint(
    path: Path, model: SRModel, optimizer: torch.optim.Optimizer, fingerprint: dict
) -> tuple[int, list[dict]]:
    """Restore weights, optimizer and RNG state; returns the step and the log so far."""
    state = json.loads((path / "state.json").read_text())
    if state["run"] != fingerprint:
        raise ValueError(
            f"checkpoint {path} belongs to a different run (config, inputs or seed changed); "
            "delete the checkpoint folder to start afresh"
        )
    weights = load_file(path / "trainable.safetensors")
    named = _trainable_names(model)
    if set(weights) != set(named):
        raise ValueError(f"checkpoint {path}: trainable parameters do not match the model")
    with torch.no_grad():
        for name, parameter in named.items():
            parameter.copy_(weights[name])
    with safe_open(path / "optimizer.safetensors", framework="pt") as handle:
        groups = json.loads(handle.metadata()["param_groups"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        optimizer_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": groups})
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available() and "torch_cuda_0" in rng:
        torch.cuda.set_rng_state_all(
            [rng[f"torch_cuda_{i}"] for i in range(torch.cuda.device_count())]
        )
    log = read_table(path / "train_log.parquet", "train_log").to_dict("records")
    return int(state["step"]), log


def _prune_checkpoints(directory: Path, keep: int) -> None:
    found = sorted(p for p in directory.glob("step-*") if (p / "state.json").is_file())
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# -- the stage -----------------------------------------------------------------------------------


_NOT_FINGERPRINTED = ("max_steps", "checkpoint_every", "keep_checkpoints")


def train(
    *,
    framework: str,
    method: str,
    objective: str,
    pairs_path: str | Path,
    candidates_path: str | Path,
    data_dir: str | Path,
    masks_path: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    config: dict[str, Any] | TrainConfig | None = None,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    model: SRModel | None = None,
) -> Path:
    """Train ``method`` on the pairs and write ``out_dir`` (``save_pretrained`` + train_log.parquet).

    Checkpoints go to ``checkpoint_dir`` (default ``<out_dir>.checkpoints``) every
    ``checkpoint_every`` steps; an existing one is resumed. A non-finite loss or gradient norm
    raises ``FloatingPointError`` naming the step; the last good checkpoint stays. ``model``
    (optional) is an already loaded model, otherwise ``pipeline.models.load_model(model_dir)``.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    out_dir = Path(out_dir)
    checkpoint_dir = (
        Path(checkpoint_dir) if checkpoint_dir else out_dir.with_name(out_dir.name + ".checkpoints")
    )
    accelerator = make_accelerator(cfg.device, cfg.mixed_precision)
    world = accelerator.num_processes
    per_micro, remainder = divmod(cfg.batch_size, world * cfg.gradient_accumulation_steps)
    if remainder or per_micro == 0:
        raise ValueError(
            f"train.batch_size {cfg.batch_size} must be a multiple of processes ({world}) x "
            f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps})"
        )

    pairs = read_table(pairs_path, "preference_pairs")
    items = preference_items(pairs, method)
    loader = ItemLoader(
        read_table(candidates_path, "candidates"),
        Path(candidates_path),
        Path(data_dir),
        Path(masks_path),
    )
    loader.check(items)
    if model is None:
        from pipeline.models import load_model

        model = load_model(model_dir)
    trainable = _configure_model(model, cfg)
    # models may build their frozen reference lazily on first use: make it capture the
    # pretrained weights before a checkpoint overwrites them
    with model.reference():
        pass
    optimizer = torch.optim.AdamW(
        trainable,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )
    # what a checkpoint must match to be resumed; max_steps and checkpointing may change
    resumable = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_FINGERPRINTED}
    fingerprint = {
        "framework": framework,
        "method": method,
        "objective": objective,
        "seed": int(seed),
        "config": resumable,
        "items": len(items),
        "pairs": str(pairs_path),
        "model": str(model_dir),
    }
    start, log = 0, []
    resumed_from = latest_checkpoint(checkpoint_dir) if checkpoint_dir.is_dir() else None
    if resumed_from is not None:
        start, log = load_checkpoint(resumed_from, model, optimizer, fingerprint)
    last_good = resumed_from

    policy, optimizer = accelerator.prepare(PolicyErrors(model), optimizer)
    model = accelerator.unwrap_model(policy).model
    rank = accelerator.process_index
    progress = tqdm(
        total=cfg.max_steps,
        initial=start,
        desc=f"train {method}",
        file=sys.stderr,
        mininterval=1,
        disable=not accelerator.is_main_process,
    )
    for step in range(start, cfg.max_steps):
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        slots = step_slots(len(items), step, cfg.batch_size, seed)
        totals = torch.zeros(1 + len(losses.STAT_KEYS), dtype=torch.float64)
        for micro in range(cfg.gradient_accumulation_steps):
            first = (micro * world + rank) * per_micro
            mine = range(first, first + per_micro)
            loaded = [loader.load(items[slots[s]]) for s in mine]
            conditions = [
                draw_conditions(model, e, cfg, seed, step, s)
                for e, s in zip(loaded, mine, strict=True)
            ]
            sync = micro == cfg.gradient_accumulation_steps - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(policy):
                with accelerator.autocast():
                    err_theta, err_ref = shared_error_maps(
                        policy, model, loaded, conditions, method
                    )
                loss, stats = losses_from_errors(err_theta, err_ref, loaded, method, cfg)
                if not finite_everywhere(accelerator, loss.detach()):
                    raise FloatingPointError(
                        f"non-finite loss at step {step + 1} (images {[e.item.image_id for e in loaded]}); "
                        f"training stopped; last good checkpoint: {last_good or 'none'}"
                    )
                accelerator.backward(loss / cfg.gradient_accumulation_steps)
            totals += torch.tensor(
                [float(loss.detach()), *(stats[k] for k in losses.STAT_KEYS)], dtype=torch.float64
            )
        if cfg.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in trainable])
            )
        if not finite_everywhere(accelerator, torch.as_tensor(grad_norm)):
            raise FloatingPointError(
                f"non-finite gradient norm at step {step + 1}; training stopped; "
                f"last good checkpoint: {last_good or 'none'}"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        means = accelerator.reduce(
            totals.to(accelerator.device) / cfg.gradient_accumulation_steps, reduction="mean"
        )
        row = dict(zip(("loss", *losses.STAT_KEYS), means.cpu().tolist(), strict=True))
        log.append({"step": step + 1, **row, "lr": lr, "grad_norm": float(grad_norm)})
        progress.update(1)
        progress.set_postfix(
            loss=f"{row['loss']:.4f}", acc=f"{row['implicit_accuracy']:.2f}", refresh=False
        )
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.max_steps:
            if accelerator.is_main_process:
                last_good = save_checkpoint(
                    checkpoint_dir, step + 1, model, optimizer, log, fingerprint
                )
                _prune_checkpoints(checkpoint_dir, cfg.keep_checkpoints)
            accelerator.wait_for_everyone()
    progress.close()

    if accelerator.is_main_process:
        metadata = {
            **fingerprint,
            "config": dataclasses.asdict(cfg),
            "candidates": str(candidates_path),
            "data": str(data_dir),
            "masks": str(masks_path),
            "model_describe": model.describe(),
            "processes": world,
            "mixed_precision": accelerator.mixed_precision,
            "device": str(accelerator.device),
            "resumed_from": str(resumed_from) if resumed_from else None,
        }
        with atomic_path(out_dir) as folder:
            model.save_pretrained(folder)
            write_table(
                pd.DataFrame(log, columns=list(LOG_COLUMNS)),
                folder / "train_log.parquet",
                "train_log",
                metadata,
            )
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline train", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--framework", required=True)
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--objective", required=True)
    parser.add_argument("--pairs", required=True, help="pairs/{framework}/{objective}.parquet")
    parser.add_argument(
        "--candidates", required=True, help="candidates/{framework}/candidates.parquet"
    )
    parser.add_argument("--data", required=True, help="data/{split}/ (holds lq/)")
    parser.add_argument("--masks", required=True, help="masks/{framework}.zarr")
    parser.add_argument("--model", required=True, help="pretrained model folder")
    parser.add_argument("--out", required=True, help="aligned/{framework}/{method}/{objective}/")
    parser.add_argument(
        "--checkpoints", default=None, help="checkpoint folder (default: <out>.checkpoints)"
    )
    parser.add_argument("--config", default="{}", help="the train config section as JSON")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train(
        framework=args.framework,
        method=args.method,
        objective=args.objective,
        pairs_path=args.pairs,
        candidates_path=args.candidates,
        data_dir=args.data,
        masks_path=args.masks,
        model_dir=args.model,
        out_dir=args.out,
        config=json.loads(args.config),
        seed=args.seed,
        checkpoint_dir=args.checkpoints,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
