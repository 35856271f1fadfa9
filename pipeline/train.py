"""Preference training: DSPO, Diffusion-DPO, SFT and Diffusion-DRO on one model (DSPO paper §4.2-4.4).

For every LQ of a batch (docs/design.md §3):

1. the distinct candidates that win or lose any of its pairs share ONE timestep ``t`` and ONE
   noise ``eps`` (:func:`draw_conditions`);
2. the policy runs once and the frozen reference runs once (``model.reference()``, no grad) over
   those distinct candidates (:func:`shared_error_maps`), NOT once per instance;
3. the error maps are pooled per instance mask on the latent grid and fed to the method's loss
   from :mod:`pipeline.losses` (:func:`lq_loss`); the batch loss is the mean over LQs.

Methods: ``dspo`` (instance pairs, Eq. 5), ``dpo`` (the image-level pair, ``instance_id -1``, one
full mask), ``sft`` (the image-level winner's plain error), ``dro`` (instance pairs, Diffusion-DRO's
hinge). Each LQ trains on its prompt from the prompts table (``--prompts``,
``prompts/train.parquet``); the user description feedback (paper's M2) feeds the unconditional
branch: with probability ``uncond_drop_rate`` an LQ's prompt is replaced by its feedback texts
followed by its negative prompt from the table (M2, ``negative_prompts: true``; docs/prompts.md)
or by the empty prompt (M1 only). Without a table (direct calls) the prompt is empty and the
dropped prompt the feedback texts alone.

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
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from pipeline import checkpoints, guidance, losses, settings
from pipeline.distributed import make_accelerator
from pipeline.guidance import image_negative_prompt
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


_DEFAULTS = settings.defaults("train")


@dataclass(frozen=True)
class TrainConfig:
    """The ``train`` config section; the values and their meaning are in the schema
    (``workflow/schemas/config.schema.yaml``, the only copy of the defaults)."""

    max_steps: int = _DEFAULTS["max_steps"]
    batch_size: int = _DEFAULTS["batch_size"]
    gradient_accumulation_steps: int = _DEFAULTS["gradient_accumulation_steps"]
    learning_rate: float = _DEFAULTS["learning_rate"]
    lr_warmup_steps: int = _DEFAULTS["lr_warmup_steps"]
    adam_beta1: float = _DEFAULTS["adam_beta1"]
    adam_beta2: float = _DEFAULTS["adam_beta2"]
    adam_epsilon: float = _DEFAULTS["adam_epsilon"]
    weight_decay: float = _DEFAULTS["weight_decay"]
    max_grad_norm: float = _DEFAULTS["max_grad_norm"]
    beta: float = _DEFAULTS["beta"]
    k: float = _DEFAULTS["k"]
    dro_margin: float = _DEFAULTS["dro_margin"]
    negative_prompts: bool = _DEFAULTS["negative_prompts"]
    uncond_drop_rate: float = _DEFAULTS["uncond_drop_rate"]
    checkpoint_every: int = _DEFAULTS["checkpoint_every"]
    keep_checkpoints: int = _DEFAULTS["keep_checkpoints"]
    mixed_precision: str = _DEFAULTS["mixed_precision"]
    gradient_checkpointing: bool = _DEFAULTS["gradient_checkpointing"]
    device: str = _DEFAULTS["device"]

    @classmethod
    def from_dict(cls, section: dict[str, Any] | None) -> TrainConfig:
        """The section with the schema's defaults; bad keys, types or ranges raise
        :class:`pipeline.settings.ConfigError` naming them."""
        return cls(**settings.resolve("train", section))


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
    """An LQ's shared draws: timestep ``[1]``, noise ``[1, C, h, w]``, the prompt it trains on
    and the negative prompt of guided error maps (multi-step ``error_map_cfg > 1``)."""

    timestep: torch.Tensor
    noise: torch.Tensor
    prompt: str
    negative: str = ""


def draw_conditions(
    model: SRModel,
    loaded: LoadedItem,
    config: TrainConfig,
    seed: int,
    step: int,
    slot: int,
    texts: dict[str, tuple[str, str]] | None = None,
) -> Conditions:
    """One ``t`` and ``eps`` shared by all candidates of the LQ, and the branch it trains on:
    the image's prompt of ``texts`` (``{image_id: (prompt, negative_prompt)}``, the prompts
    table), or on the unconditional branch its feedback texts then its negative prompt (M2) or
    the empty prompt (M1)."""
    item = loaded.item
    generator = torch_generator(seed, STAGE, step, slot, item.image_id)
    timestep, noise = model.draw_timesteps_and_noise(loaded.lq[None], generator)
    dropped = float(torch.rand(1, generator=generator)) < config.uncond_drop_rate
    prompt, base_negative = texts[item.image_id] if texts else ("", "")
    negative = (
        image_negative_prompt(base_negative, item.negative_prompt)
        if config.negative_prompts
        else ""
    )
    return Conditions(timestep, noise, negative if dropped else prompt, negative)


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
            [conditions[i].negative for i in group],
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


# -- checkpoints -----------------------------------------------------------------------------------

#: config keys a resumed run may change: they do not alter the steps already taken
_NOT_FINGERPRINTED = ("max_steps", "checkpoint_every", "keep_checkpoints")


def run_fingerprint(
    cfg: TrainConfig,
    *,
    framework: str,
    method: str,
    objective: str,
    seed: int,
    pairs_path: str | Path,
    candidates_path: str | Path,
    data_dir: str | Path,
    masks_path: str | Path,
    model_dir: str | Path,
    model: SRModel | None,
    processes: int,
    device: str,
    prompts_path: str | Path | None = None,
) -> checkpoints.Fingerprint:
    """What a checkpoint must match to be resumed: the effective settings, seed, code, the bytes
    of the pairs and candidates tables, of the mask store (and of ``data/pairs.parquet`` where
    there is one, and of the prompts table when one is given), the base model's weight files
    (or the in-memory model's state) and the process layout."""
    effective = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_FINGERPRINTED}
    effective.update(framework=framework, method=method, objective=objective)
    inputs = {"pairs": pairs_path, "candidates": candidates_path, "masks": masks_path}
    if (Path(data_dir) / "pairs.parquet").is_file():
        inputs["data_pairs"] = Path(data_dir) / "pairs.parquet"
    if prompts_path is not None:
        inputs["prompts"] = prompts_path
    return checkpoints.run_fingerprint(
        STAGE,
        settings=effective,
        seed=seed,
        inputs=inputs,
        weights=checkpoints.base_weights(model_dir, model),
        processes=processes,
        device=device,
    )


# -- the stage -----------------------------------------------------------------------------------


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
    prompts_path: str | Path | None = None,
) -> Path:
    """Train ``method`` on the pairs and write ``out_dir`` (``save_pretrained`` + train_log.parquet).

    Checkpoints go to ``checkpoint_dir`` (default :func:`pipeline.checkpoints.default_location`)
    every ``checkpoint_every`` steps; the newest is resumed if its fingerprint matches this run's,
    otherwise the folder is moved aside and training starts afresh. A non-finite loss, gradient
    norm or weight raises ``FloatingPointError`` naming the step (the last step's weights are
    checked by one more forward, as the next step would); the last good checkpoint stays. ``model``
    (optional) is an already loaded model, otherwise ``pipeline.models.load_model(model_dir)``.
    ``prompts_path`` is the training split's prompts table (each LQ's prompt and negative
    prompt; see the module docstring).
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    for key in ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"train.{key} must be >= 1, got {getattr(cfg, key)}")
    out_dir = Path(out_dir)
    checkpoint_dir = (
        Path(checkpoint_dir) if checkpoint_dir else checkpoints.default_location(STAGE, out_dir)
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
    if prompts_path is not None:
        texts, prompt_record = guidance.stage_prompts(
            prompts_path, [item.image_id for item in items], where=f"train {method}"
        )
    else:
        texts, prompt_record = None, guidance.no_table_record(None)
    if model is None:
        from pipeline.models import load_model

        model = load_model(model_dir)
    fingerprint = run_fingerprint(
        cfg, framework=framework, method=method, objective=objective, seed=seed,
        pairs_path=pairs_path, candidates_path=candidates_path, data_dir=data_dir,
        masks_path=masks_path, model_dir=model_dir, model=model, processes=world,
        device=accelerator.device.type, prompts_path=prompts_path,
    )  # fmt: skip
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
    named = _trainable_names(model)
    start, log = 0, []
    resumed_from = checkpoints.resume_point(checkpoint_dir, fingerprint, accelerator)
    if resumed_from is not None:
        start, log = checkpoints.load(resumed_from, named, optimizer, fingerprint)
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
                draw_conditions(model, e, cfg, seed, step, s, texts)
                for e, s in zip(loaded, mine, strict=True)
            ]
            sync = micro == cfg.gradient_accumulation_steps - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(policy):
                with accelerator.autocast():
                    err_theta, err_ref = shared_error_maps(
                        policy, model, loaded, conditions, method
                    )
                loss, stats = losses_from_errors(err_theta, err_ref, loaded, method, cfg)
                stopped = f"training stopped; last good checkpoint: {last_good or 'none'}"
                checkpoints.check_finite(
                    accelerator, loss, f"non-finite loss at step {step + 1} "
                    f"(images {[e.item.image_id for e in loaded]}); {stopped}",
                )  # fmt: skip
                accelerator.backward(loss / cfg.gradient_accumulation_steps)
            totals += torch.tensor(
                [float(loss.detach()), *(stats[k] for k in losses.STAT_KEYS)], dtype=torch.float64
            )
        grad_norm = checkpoints.total_norm(
            checkpoints.clip_gradients(accelerator, [trainable], cfg.max_grad_norm)
        )
        checkpoints.check_finite(
            accelerator, grad_norm, f"non-finite gradient norm at step {step + 1}; {stopped}"
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        checkpoints.check_finite(
            accelerator, checkpoints.weights_flag(trainable),
            f"non-finite weights after step {step + 1}; {stopped}",
        )  # fmt: skip
        if step + 1 == cfg.max_steps:  # no later step's forward will see these weights: look now
            with torch.no_grad():
                with accelerator.autocast():
                    err_theta, err_ref = shared_error_maps(
                        PolicyErrors(model), model, loaded, conditions, method
                    )
                after, _ = losses_from_errors(err_theta, err_ref, loaded, method, cfg)
            checkpoints.check_finite(
                accelerator, after,
                f"non-finite loss after the last step (step {step + 1}) with its weights; {stopped}",
            )  # fmt: skip
        means = checkpoints.reduce_mean(
            accelerator, (totals / cfg.gradient_accumulation_steps).tolist()
        )
        row = dict(zip(("loss", *losses.STAT_KEYS), means, strict=True))
        log.append({"step": step + 1, **row, "lr": lr, "grad_norm": grad_norm})
        progress.update(1)
        progress.set_postfix(
            loss=f"{row['loss']:.4f}", acc=f"{row['implicit_accuracy']:.2f}", refresh=False
        )
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.max_steps:
            if accelerator.is_main_process:
                last_good = checkpoints.save(
                    checkpoint_dir, step + 1, named, optimizer, log, fingerprint,
                    cfg.keep_checkpoints,
                )  # fmt: skip
            accelerator.wait_for_everyone()
    progress.close()

    if accelerator.is_main_process:
        metadata = {
            "framework": framework,
            "method": method,
            "objective": objective,
            "seed": int(seed),
            "pairs": str(pairs_path),
            "prompts": prompt_record,
            "model": str(model_dir),
            "items": len(items),
            "fingerprint": fingerprint.fields,
            "fingerprint_hash": fingerprint.hash,
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
        "--checkpoints",
        default=None,
        help="checkpoint folder (default: results/checkpoints/train/... beside OUT's results/)",
    )
    parser.add_argument("--config", default="{}", help="the train config section as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", default=None,
                        help="prompts/train.parquet: each LQ's prompt and negative prompt")  # fmt: skip
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
        config=settings.cli_config(args.config),
        seed=args.seed,
        checkpoint_dir=args.checkpoints,
        prompts_path=args.prompts,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
