"""Pre-training phase (DSPO Sec. 4.1): train an SR model of either family on LQ/HQ pairs.

One run trains one ``(framework, variant)``: the family's settings from the config, overridden
by the variant's (one-step: LoRA rank 16 / 64, VSD cfg 6 / 12 around rank 4, cfg 7.5). Random
crops, flips and batches are drawn from ``torch_generator(seed, "pretrain", variant, step)``,
so a run killed and resumed from its last checkpoint ends with the same weights as an
uninterrupted one (bit for bit on the CPU). Checkpoints are :mod:`pipeline.checkpoints`'
``step-N/`` folders (the same as ``train``'s), resumed only by a run with the same fingerprint.
Each pair trains on its LQ's prompt and negative prompt from the prompts table (``--prompts``,
``prompts/train.parquet``): the prompt conditions the model, the negative prompt is the VSD real
score's unconditional branch (one-step), so cfg_vsd 6 and 12 give different losses. Without a
table (direct calls) prompts are empty and the negative prompt the model's ``negative_prompt``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from pipeline import checkpoints, contracts, guidance, settings
from pipeline.distributed import make_accelerator
from pipeline.io.atomic import atomic_path
from pipeline.io.images import read_rgb, signed_tensor
from pipeline.io.tables import read_table, write_table
from pipeline.models import model_class
from pipeline.models.base import SRModel, upsample_lq
from pipeline.seeding import torch_generator


def stage_config(config: dict[str, Any] | None, framework: str) -> dict[str, Any]:
    """The ``pretrain.<framework>`` section with the schema's defaults; bad keys or values raise
    :class:`pipeline.settings.ConfigError` naming them."""
    return settings.resolve(f"pretrain.{framework}", config)


def variant_settings(config: dict[str, Any], framework: str, variant: str) -> dict[str, Any]:
    """The complete model settings of ``variant``: schema defaults < ``model`` < the variant."""
    return settings.variant_settings(config, framework, variant)


def build_model(framework: str, config: dict[str, Any], variant: str, seed: int) -> SRModel:
    """A fresh model: tiny from scratch, or from the real base weights in ``config.weights``."""
    cls = model_class(framework)
    model_settings = variant_settings(config, framework, variant)
    if config["weights"]:
        return cls.from_sd_base(
            config["weights"],
            device=config["device"],
            weights_key=f"pretrain.{framework}.weights",
            **model_settings,
        )
    model = cls.build_tiny(seed=seed, **config["tiny"], **model_settings)
    return model.to_device(config["device"])


class PairSource:
    """The training pairs of ``pairs.parquet``; images are read when a batch needs them."""

    def __init__(self, data_dir: str | Path):
        self.root = Path(data_dir)
        self.pairs = read_table(self.root / contracts.DATA_TABLE, "degradation_pairs")
        if self.pairs.empty:
            raise ValueError(f"{self.root / contracts.DATA_TABLE} holds no pairs")
        self.pairs = self.pairs.sort_values("image_id").reset_index(drop=True)

    def crop(
        self, index: int, crop_size: int, generator: torch.Generator, hflip: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A random HQ crop and the LQ over the same region, bicubic-upsampled to the crop."""
        row = self.pairs.iloc[index]
        hq = read_rgb(self.root / row["hq_path"])
        lq = read_rgb(self.root / row["lq_path"])
        height, width = hq.shape[:2]
        factor = height // lq.shape[0]
        if height < crop_size or width < crop_size:
            raise ValueError(f"{row['hq_path']} ({height}x{width}) is smaller than the crop")
        top = int(torch.randint(0, (height - crop_size) // factor + 1, (1,), generator=generator))
        left = int(torch.randint(0, (width - crop_size) // factor + 1, (1,), generator=generator))
        flip = hflip and bool(torch.rand(1, generator=generator) < 0.5)
        top, left = top * factor, left * factor
        hq_crop = signed_tensor(hq[top : top + crop_size, left : left + crop_size].copy())
        lq_size = crop_size // factor
        lq_crop = lq[
            top // factor : top // factor + lq_size, left // factor : left // factor + lq_size
        ]
        lq_crop = upsample_lq(signed_tensor(lq_crop.copy())[None], (crop_size, crop_size))[0]
        if flip:
            hq_crop, lq_crop = hq_crop.flip(-1), lq_crop.flip(-1)
        return lq_crop, hq_crop

    def image_ids(self, seed: int, variant: str, step: int, batch_size: int) -> list[str]:
        """The image ids of batch ``step``, in batch order (the draws :meth:`batch` makes)."""
        generator = torch_generator(seed, "pretrain", variant, step)
        indices = torch.randint(0, len(self.pairs), (batch_size,), generator=generator).tolist()
        return [str(self.pairs.iloc[i]["image_id"]) for i in indices]

    def batch(
        self, seed: int, variant: str, step: int, batch_size: int, crop_size: int, hflip: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``step``: pairs drawn with replacement, crops and flips, all keyed by step."""
        generator = torch_generator(seed, "pretrain", variant, step)
        indices = torch.randint(0, len(self.pairs), (batch_size,), generator=generator).tolist()
        crops = [self.crop(i, crop_size, generator, hflip) for i in indices]
        return torch.stack([c[0] for c in crops]), torch.stack([c[1] for c in crops])


# -- checkpoints, fingerprint, clipping groups ---------------------------------------------------
#: config keys a resumed run may change: they do not alter the steps already taken
NOT_FINGERPRINTED = ("steps", "checkpoint_every", "keep_checkpoints")


def _named_trainable(model: SRModel, params: list[torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    wanted = {id(p) for p in params}
    return {name: p for name, p in model.named_parameters() if id(p) in wanted}


def parameter_groups(
    model: SRModel, params: list[torch.nn.Parameter]
) -> list[list[torch.nn.Parameter]]:
    """The groups whose gradients are clipped separately: the generator's parameters and, with
    the VSD regulariser (``model.regulariser``: the fake-score LoRA, with ``train_base`` also the
    score UNets), the regulariser's, as OSEDiff clips its two optimizers (generator and
    ``optimizer_reg``) each to ``max_grad_norm``. Without a regulariser: one group."""
    regulariser = getattr(model, "regulariser", None)
    if regulariser is None:
        return [list(params)]
    theirs = {id(p) for p in regulariser.parameters()}
    groups = [[p for p in params if id(p) not in theirs], [p for p in params if id(p) in theirs]]
    return [group for group in groups if group]


def run_fingerprint(
    framework: str,
    variant: str,
    data_dir: str | Path,
    config: dict[str, Any],
    seed: int,
    processes: int,
    device: str,
    prompts: str | Path | None = None,
) -> checkpoints.Fingerprint:
    """What a checkpoint must match to be resumed: the effective settings (the resolved section
    and the variant's model settings), seed, code, ``pairs.parquet``'s bytes (and the prompts
    table's, when given), the base weights' files and the process layout."""
    effective = {k: v for k, v in config.items() if k not in NOT_FINGERPRINTED}
    effective.update(
        framework=framework,
        variant=variant,
        model_settings=variant_settings(config, framework, variant),
    )
    return checkpoints.run_fingerprint(
        "pretrain",
        settings=effective,
        seed=seed,
        inputs={
            "pairs": Path(data_dir) / contracts.DATA_TABLE,
            **({"prompts": Path(prompts)} if prompts is not None else {}),
        },
        weights=checkpoints.base_weights(config["weights"]),
        processes=processes,
        device=device,
    )


# -- the stage ---------------------------------------------------------------------------------
class PretrainObjective(torch.nn.Module):
    """``model.pretrain_loss`` as one module call, so DDP sees one forward per step."""

    def __init__(self, model: SRModel):
        super().__init__()
        self.model = model

    def forward(self, lq, hq, prompts, generator, negative_prompts=None):
        return self.model.pretrain_loss(lq, hq, prompts, generator, negative_prompts)


def pretrain(
    framework: str,
    variant: str,
    data_dir: str | Path,
    out: str | Path,
    config: dict[str, Any] | None,
    seed: int,
    *,
    checkpoint_dir: str | Path | None = None,
    max_steps: int | None = None,
    prompts: str | Path | None = None,
) -> Path | None:
    """Train, checkpoint, and write the model folder ``out`` with ``train_log.parquet``.

    ``max_steps`` stops after that many steps in total (leaving only the checkpoint, returns
    None): used to test kill-and-resume. A later call resumes from the newest checkpoint in
    ``checkpoint_dir`` (default :func:`pipeline.checkpoints.default_location`) if its fingerprint
    matches this run's; otherwise the folder is moved aside and training starts afresh.
    A non-finite loss, gradient norm or weight raises ``FloatingPointError`` naming the step
    (the last step's weights are checked by one more forward, as the next step would).

    Under ``accelerate launch`` with K processes (DDP), every process draws the same batch of
    ``batch_size`` crops (keyed by the step) and trains on its ``batch_size / K`` share; DDP
    averages the gradients, so the update is the whole batch's. Draws inside the loss (noise,
    timesteps, prompt dropout) are keyed by the process as well when K > 1, so the weights
    depend on K there (recorded as ``processes`` in the log's metadata); the one-step loss
    without VSD draws nothing and gives the one-process update for any K.

    ``prompts``: the training split's prompts table (each pair's prompt and negative prompt).
    """
    config = stage_config(config, framework)
    _check_step_counts(config, max_steps)
    out = Path(out)
    checkpoint_dir = (
        Path(checkpoint_dir) if checkpoint_dir else checkpoints.default_location("pretrain", out)
    )
    accelerator = make_accelerator(config["device"])
    per_process = _per_process_batch(config["batch_size"], accelerator.num_processes)
    run = _start_run(
        framework, variant, data_dir, config, seed, accelerator, checkpoint_dir, prompts
    )
    source = PairSource(data_dir)
    where = f"pretrain {framework}/{variant}"
    texts, prompt_record = _pair_prompts(prompts, source, where)
    total = config["steps"]
    stop = total if max_steps is None else min(total, max_steps)
    _train(run, accelerator, source, texts, config, seed, variant, stop, per_process, where)
    if stop < total:
        if accelerator.is_main_process and run.saved < stop:
            checkpoints.save(
                checkpoint_dir, stop, run.named, run.optimizer, run.log, run.fingerprint, run.keep
            )
        accelerator.wait_for_everyone()
        return None
    if accelerator.is_main_process:
        metadata = _log_metadata(
            run, accelerator, framework, variant, seed, config, data_dir, prompt_record
        )
        _write_model(run, out, metadata)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return out


@dataclass
class _Run:
    """One run's model, optimizer, fingerprint, checkpoint state and log (what the loop updates)."""

    model: SRModel
    params: list[torch.nn.Parameter]
    groups: list[list[torch.nn.Parameter]]
    named: dict[str, torch.Tensor]
    objective: Any
    optimizer: Any  # prepared by the accelerator
    fingerprint: checkpoints.Fingerprint
    checkpoint_dir: Path
    keep: int
    resumed_from: Path | None
    start: int
    log: list[dict[str, Any]]
    last_good: Path | None
    saved: int


def _check_step_counts(config: dict[str, Any], max_steps: int | None) -> None:
    """Nothing; raises ``ValueError`` unless ``steps`` (and ``max_steps`` when given) is >= 1."""
    if config["steps"] < 1:
        raise ValueError(f"pretrain.steps must be >= 1, got {config['steps']}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"pretrain max_steps must be >= 1, got {max_steps}")


def _per_process_batch(batch_size: int, world: int) -> int:
    """Each process's share of the batch; raises ``ValueError`` unless it splits evenly."""
    per_process, remainder = divmod(batch_size, world)
    if remainder or per_process == 0:
        raise ValueError(
            f"pretrain.batch_size {batch_size} must be a multiple of the processes ({world})"
        )
    return per_process


def _start_run(
    framework: str,
    variant: str,
    data_dir: str | Path,
    config: dict[str, Any],
    seed: int,
    accelerator,
    checkpoint_dir: Path,
    prompts: str | Path | None,
) -> _Run:
    """The run's fresh model and optimizer, loaded from its newest matching checkpoint if any."""
    torch.manual_seed(0)  # nothing should draw from the global RNG; keep it fixed regardless
    model = build_model(framework, {**config, "device": str(accelerator.device)}, variant, seed)
    params = model.pretrain_parameters()
    groups = parameter_groups(model, params)
    named = _named_trainable(model, params)
    optimizer = torch.optim.AdamW(
        params,
        lr=config["lr"],
        betas=tuple(config["adam_betas"]),
        weight_decay=config["weight_decay"],
    )
    world, device_type = accelerator.num_processes, accelerator.device.type
    fingerprint = run_fingerprint(
        framework, variant, data_dir, config, seed, world, device_type, prompts
    )
    start, log = 0, []
    resumed_from = checkpoints.resume_point(checkpoint_dir, fingerprint, accelerator)
    if resumed_from is not None:
        start, log = checkpoints.load(resumed_from, named, optimizer, fingerprint)
    keep = config.get("keep_checkpoints", checkpoints.KEEP)
    objective, optimizer = accelerator.prepare(PretrainObjective(model), optimizer)
    return _Run(
        model=model,
        params=params,
        groups=groups,
        named=named,
        objective=objective,
        optimizer=optimizer,
        fingerprint=fingerprint,
        checkpoint_dir=checkpoint_dir,
        keep=keep,
        resumed_from=resumed_from,
        start=start,
        log=log,
        last_good=resumed_from,
        saved=start,
    )


def _pair_prompts(
    prompts: str | Path | None, source: PairSource, where: str
) -> tuple[dict[str, tuple[str, str]] | None, dict[str, Any]]:
    """Each pair's (prompt, negative prompt) by image id (None without a table) and their record."""
    if prompts is not None:
        return guidance.stage_prompts(prompts, source.pairs["image_id"].astype(str), where=where)
    return None, guidance.no_table_record(None)


def _train(
    run: _Run,
    accelerator,
    source: PairSource,
    texts: dict[str, tuple[str, str]] | None,
    config: dict[str, Any],
    seed: int,
    variant: str,
    stop: int,
    per_process: int,
    where: str,
) -> None:
    """Nothing: trains steps ``run.start`` to ``stop - 1``, logging each into ``run.log`` and
    checkpointing every ``checkpoint_every`` steps."""
    world, rank = accelerator.num_processes, accelerator.process_index
    bar = tqdm(
        range(run.start, stop),
        total=config["steps"],
        initial=run.start,
        file=sys.stderr,
        mininterval=1,
        desc=where,
        disable=not accelerator.is_main_process,
    )
    run.model.train()
    mine = slice(rank * per_process, (rank + 1) * per_process)
    for step in bar:
        lq, hq, step_prompts, negatives = _step_batch(
            source, texts, config, seed, variant, step, mine
        )
        keys = (variant, step) if world == 1 else (variant, step, "process", rank)
        loss, stats = run.objective(
            lq, hq, step_prompts, torch_generator(seed, "pretrain_loss", *keys), negatives
        )
        stopped = f"training stopped; last good checkpoint: {run.last_good or 'none'}"
        norm = _update(run, accelerator, loss, stats, config["max_grad_norm"], step, where, stopped)
        if step == stop - 1:  # no later step's forward will see these weights: look now
            with torch.no_grad():
                after, _ = run.model.pretrain_loss(
                    lq, hq, step_prompts, torch_generator(seed, "pretrain_loss", *keys), negatives
                )
            checkpoints.check_finite(
                accelerator,
                after,
                f"{where}: non-finite loss after the last step (step {step}) with its weights; "
                f"{stopped}",
            )
        averaged = _log_step(run, accelerator, stats, step, config["lr"], norm)
        bar.set_postfix(loss=f"{averaged['loss']:.4f}", refresh=False)
        _checkpoint_if_due(run, accelerator, step + 1, config)
    bar.close()


def _step_batch(
    source: PairSource,
    texts: dict[str, tuple[str, str]] | None,
    config: dict[str, Any],
    seed: int,
    variant: str,
    step: int,
    mine: slice,
) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str] | None]:
    """This process's share of batch ``step``: LQ and HQ crops, prompts and negative prompts."""
    lq, hq = source.batch(
        seed, variant, step, config["batch_size"], config["crop_size"], config["hflip"]
    )
    ids = source.image_ids(seed, variant, step, config["batch_size"])[mine]
    texts_now = [texts[i] for i in ids] if texts else [("", "")] * len(ids)
    step_prompts = [prompt for prompt, _ in texts_now]
    negatives = [negative for _, negative in texts_now] if texts else None
    return lq[mine], hq[mine], step_prompts, negatives


def _update(
    run: _Run,
    accelerator,
    loss: torch.Tensor,
    stats: dict[str, float],
    max_grad_norm: float,
    step: int,
    where: str,
    stopped: str,
) -> float:
    """The clipped gradients' total norm, after one optimizer step on ``loss``; raises
    ``FloatingPointError`` on a non-finite loss, gradient norm or weight."""
    rank = accelerator.process_index
    checkpoints.check_finite(
        accelerator,
        loss,
        f"{where}: non-finite loss at step {step} (process {rank}: {stats['loss']}); {stopped}",
    )
    run.optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    norm = checkpoints.total_norm(
        checkpoints.clip_gradients(accelerator, run.groups, max_grad_norm)
    )
    checkpoints.check_finite(
        accelerator, norm, f"{where}: non-finite gradient norm at step {step}; {stopped}"
    )
    run.optimizer.step()
    checkpoints.check_finite(
        accelerator,
        checkpoints.weights_flag(run.params),
        f"{where}: non-finite weights after step {step}; {stopped}",
    )
    return norm


def _log_step(
    run: _Run, accelerator, stats: dict[str, Any], step: int, lr: float, norm: float
) -> dict[str, float]:
    """The step's stats averaged over processes, after appending its row to ``run.log``."""
    names = sorted(stats)
    means = checkpoints.reduce_mean(accelerator, [stats[k] for k in names])
    averaged = dict(zip(names, means, strict=True))
    terms = {k: v for k, v in averaged.items() if k != "loss"}
    run.log.append(
        {
            "step": step,
            "loss": averaged["loss"],
            "terms": json.dumps(terms),
            "lr": lr,
            "grad_norm": norm,
        }
    )
    return averaged


def _checkpoint_if_due(run: _Run, accelerator, done: int, config: dict[str, Any]) -> None:
    """Nothing: saves the checkpoint of ``done`` steps when one is due (never of the last)."""
    every = config["checkpoint_every"]
    if every and done % every == 0 and done < config["steps"]:
        if accelerator.is_main_process:
            run.last_good = checkpoints.save(
                run.checkpoint_dir,
                done,
                run.named,
                run.optimizer,
                run.log,
                run.fingerprint,
                run.keep,
            )
        run.saved = done
        accelerator.wait_for_everyone()


def _log_metadata(
    run: _Run,
    accelerator,
    framework: str,
    variant: str,
    seed: int,
    config: dict[str, Any],
    data_dir: str | Path,
    prompt_record: dict[str, Any],
) -> dict[str, Any]:
    """The metadata of the finished run's ``train_log.parquet``."""
    return {
        "framework": framework,
        "variant": variant,
        "seed": seed,
        "config": config,
        "model": run.model.describe(),
        "data": str(data_dir),
        "processes": accelerator.num_processes,
        "prompts": prompt_record,
        "device": str(accelerator.device),
        "fingerprint": run.fingerprint.fields,
        "fingerprint_hash": run.fingerprint.hash,
        "resumed_from": str(run.resumed_from) if run.resumed_from else None,
    }


def _write_model(run: _Run, out: Path, metadata: dict[str, Any]) -> None:
    """Nothing: writes the model folder ``out`` (weights and the log with ``metadata``) atomically."""
    with atomic_path(out) as folder:
        run.model.save_pretrained(folder)
        write_table(
            pd.DataFrame(run.log, columns=["step", "loss", "terms", "lr", "grad_norm"]),
            folder / contracts.TRAIN_LOG,
            "pretrain_log",
            metadata,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline pretrain", description=__doc__)
    parser.add_argument("--framework", required=True, choices=["onestep", "multistep"])
    parser.add_argument("--variant", required=True)
    parser.add_argument("--data", required=True, help="data split folder with pairs.parquet")
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument("--config", default="{}", help="the pretrain config section (JSON)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoints",
        default=None,
        help="checkpoint folder (default: results/checkpoints/pretrain/... beside OUT's results/)",
    )
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (checkpoint)")
    parser.add_argument(
        "--prompts",
        default=None,
        help="prompts/train.parquet: each pair's prompt and negative prompt",
    )
    args = parser.parse_args(argv)
    pretrain(
        args.framework,
        args.variant,
        args.data,
        args.out,
        settings.cli_config(args.config),
        args.seed,
        checkpoint_dir=args.checkpoints,
        max_steps=args.max_steps,
        prompts=args.prompts,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
