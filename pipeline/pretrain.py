"""Pre-training phase (DSPO Sec. 4.1): train an SR model of either family on LQ/HQ pairs.

One run trains one ``(framework, variant)``: the family's settings from the config, overridden
by the variant's (one-step: LoRA rank 16 / 64, VSD cfg 6 / 12 around rank 4, cfg 7.5). Random
crops, flips and batches are drawn from ``torch_generator(seed, "pretrain", variant, step)``,
so a run killed and resumed from its last checkpoint ends with the same weights as an
uninterrupted one (bit for bit on the CPU). Checkpoints hold the trainable parameters, the
AdamW state, the step and the log so far (safetensors + JSON); no RNG state is carried because
every draw is keyed by the step.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from pipeline.config_sections import with_defaults
from pipeline.distributed import finite_everywhere, make_accelerator
from pipeline.io.atomic import atomic_path
from pipeline.io.images import read_rgb, to_tensor
from pipeline.io.tables import read_table, write_table
from pipeline.models import model_class
from pipeline.models.base import SRModel, upsample_lq
from pipeline.seeding import torch_generator

DEFAULTS: dict[str, Any] = {
    "steps": 1000,  # optimizer steps
    "batch_size": 16,
    "crop_size": 64,  # HQ crop side (pixels); the LQ crop is the matching region
    "lr": 5e-5,  # OSEDiff / DSPO
    "weight_decay": 1e-2,  # AdamW default
    "adam_betas": [0.9, 0.999],
    "max_grad_norm": 1.0,
    "checkpoint_every": 100,  # steps; 0 = no checkpoints
    "device": "auto",
    "prompt": "",  # training prompt of every pair (OSEDiff uses RAM tags of the HQ)
    "hflip": True,
    "weights": "",  # real base weights (SD folder / hub id); "" = tiny model from scratch
    "tiny": {},  # build_tiny keyword arguments (codec, factor, block_out_channels, ...)
    "model": {},  # the family's settings (e.g. one-step lora_rank, cfg_vsd, lambda_*)
    "variants": {"base": {}},  # variant name -> settings overriding "model"
}


def stage_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """The config section with defaults filled in; unknown keys are an error."""
    return with_defaults("pretrain", DEFAULTS, config)


def variant_settings(config: dict[str, Any], variant: str) -> dict[str, Any]:
    """The family settings with the variant's overrides applied."""
    variants = config["variants"]
    if variant not in variants:
        raise KeyError(f"unknown variant {variant!r}; configured: {sorted(variants)}")
    return {**config["model"], **(variants[variant] or {})}


def build_model(framework: str, config: dict[str, Any], variant: str, seed: int) -> SRModel:
    """A fresh model: tiny from scratch, or from the real base weights in ``config.weights``."""
    cls = model_class(framework)
    settings = variant_settings(config, variant)
    if config["weights"]:
        return cls.from_sd_base(config["weights"], device=config["device"], **settings)
    model = cls.build_tiny(seed=seed, **config["tiny"], **settings)
    return model.to_device(config["device"])


class PairSource:
    """The training pairs of ``pairs.parquet``; images are read when a batch needs them."""

    def __init__(self, data_dir: str | Path):
        self.root = Path(data_dir)
        self.pairs = read_table(self.root / "pairs.parquet", "degradation_pairs")
        if self.pairs.empty:
            raise ValueError(f"{self.root / 'pairs.parquet'} holds no pairs")
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
        hq_crop = to_tensor(hq[top : top + crop_size, left : left + crop_size].copy())
        lq_size = crop_size // factor
        lq_crop = lq[
            top // factor : top // factor + lq_size, left // factor : left // factor + lq_size
        ]
        lq_crop = upsample_lq(to_tensor(lq_crop.copy())[None], (crop_size, crop_size))[0]
        if flip:
            hq_crop, lq_crop = hq_crop.flip(-1), lq_crop.flip(-1)
        return lq_crop, hq_crop

    def batch(
        self, seed: int, variant: str, step: int, batch_size: int, crop_size: int, hflip: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``step``: pairs drawn with replacement, crops and flips, all keyed by step."""
        generator = torch_generator(seed, "pretrain", variant, step)
        indices = torch.randint(0, len(self.pairs), (batch_size,), generator=generator).tolist()
        crops = [self.crop(i, crop_size, generator, hflip) for i in indices]
        return torch.stack([c[0] for c in crops]), torch.stack([c[1] for c in crops])


# -- checkpoints -------------------------------------------------------------------------------
def _named_trainable(model: SRModel, params: list[torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    wanted = {id(p) for p in params}
    return {name: p for name, p in model.named_parameters() if id(p) in wanted}


def save_checkpoint(
    folder: Path, model: SRModel, params, optimizer: torch.optim.Optimizer, step: int, log: list
) -> None:
    """``model.safetensors`` (trainable parameters), ``optimizer.safetensors`` (AdamW moments
    and step counts, by parameter index) and ``state.json`` (step, param groups, log)."""
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value.detach().cpu().contiguous().reshape(value.shape)
        for index, entry in state["state"].items()
        for key, value in entry.items()
    }
    with atomic_path(folder) as temporary:
        temporary.mkdir(parents=True)
        weights = {
            k: v.detach().cpu().contiguous() for k, v in _named_trainable(model, params).items()
        }
        save_file(weights, temporary / "model.safetensors")
        save_file(tensors, temporary / "optimizer.safetensors")
        document = {"step": step, "param_groups": state["param_groups"], "log": log}
        (temporary / "state.json").write_text(json.dumps(document))


def load_checkpoint(
    folder: Path, model: SRModel, params, optimizer: torch.optim.Optimizer
) -> tuple[int, list]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns (step, log)."""
    document = json.loads((folder / "state.json").read_text())
    named = _named_trainable(model, params)
    weights = load_file(folder / "model.safetensors")
    if set(weights) != set(named):
        raise ValueError(f"checkpoint {folder} does not match the model's trainable parameters")
    with torch.no_grad():
        for name, value in weights.items():
            named[name].copy_(value)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(folder / "optimizer.safetensors").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": document["param_groups"]})
    return int(document["step"]), document["log"]


# -- the stage ---------------------------------------------------------------------------------
class PretrainObjective(torch.nn.Module):
    """``model.pretrain_loss`` as one module call, so DDP sees one forward per step."""

    def __init__(self, model: SRModel):
        super().__init__()
        self.model = model

    def forward(self, lq, hq, prompts, generator):
        return self.model.pretrain_loss(lq, hq, prompts, generator)


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
) -> Path | None:
    """Train, checkpoint, and write the model folder ``out`` with ``train_log.parquet``.

    ``max_steps`` stops after that many steps in total (leaving only the checkpoint, returns
    None): used to test kill-and-resume. A later call resumes from the checkpoint.

    Under ``accelerate launch`` with K processes (DDP), every process draws the same batch of
    ``batch_size`` crops (keyed by the step) and trains on its ``batch_size / K`` share; DDP
    averages the gradients, so the update is the whole batch's. Draws inside the loss (noise,
    timesteps, prompt dropout) are keyed by the process as well when K > 1, so the weights
    depend on K there (recorded as ``processes`` in the log's metadata); the one-step loss
    without VSD draws nothing and gives the one-process update for any K.
    """
    config = stage_config(config)
    out = Path(out)
    checkpoint = Path(checkpoint_dir) if checkpoint_dir else out / "checkpoint"
    accelerator = make_accelerator(config["device"])
    world, rank = accelerator.num_processes, accelerator.process_index
    per_process, remainder = divmod(config["batch_size"], world)
    if remainder or per_process == 0:
        raise ValueError(
            f"pretrain.batch_size {config['batch_size']} must be a multiple of the processes ({world})"
        )
    torch.manual_seed(0)  # nothing should draw from the global RNG; keep it fixed regardless
    model = build_model(framework, {**config, "device": str(accelerator.device)}, variant, seed)
    params = model.pretrain_parameters()
    optimizer = torch.optim.AdamW(
        params, lr=config["lr"], betas=tuple(config["adam_betas"]),
        weight_decay=config["weight_decay"],
    )  # fmt: skip
    start, log = 0, []
    if (checkpoint / "state.json").is_file():
        start, log = load_checkpoint(checkpoint, model, params, optimizer)
    objective, optimizer = accelerator.prepare(PretrainObjective(model), optimizer)
    source = PairSource(data_dir)
    total = config["steps"]
    stop = total if max_steps is None else min(total, max_steps)
    bar = tqdm(range(start, stop), total=total, initial=start, file=sys.stderr, mininterval=1,
               desc=f"pretrain {framework}/{variant}",
               disable=not accelerator.is_main_process)  # fmt: skip
    model.train()
    mine = slice(rank * per_process, (rank + 1) * per_process)
    for step in bar:
        lq, hq = source.batch(seed, variant, step, config["batch_size"], config["crop_size"],
                              config["hflip"])  # fmt: skip
        keys = (variant, step) if world == 1 else (variant, step, "process", rank)
        loss, stats = objective(lq[mine], hq[mine], [config["prompt"]] * per_process,
                                torch_generator(seed, "pretrain_loss", *keys))  # fmt: skip
        if not finite_everywhere(accelerator, loss.detach()):
            raise FloatingPointError(
                f"pretrain {framework}/{variant}: non-finite loss at step {step} "
                f"(process {rank}: {float(loss)})"
            )
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        norm = accelerator.clip_grad_norm_(params, config["max_grad_norm"] or math.inf)
        optimizer.step()
        names = sorted(stats)
        means = accelerator.reduce(
            torch.tensor([stats[k] for k in names], dtype=torch.float64, device=accelerator.device),
            reduction="mean",
        )
        averaged = dict(zip(names, means.cpu().tolist(), strict=True))
        terms = {k: v for k, v in averaged.items() if k != "loss"}
        log.append({"step": step, "loss": averaged["loss"], "terms": json.dumps(terms),
                    "lr": config["lr"], "grad_norm": float(norm)})  # fmt: skip
        bar.set_postfix(loss=f"{averaged['loss']:.4f}", refresh=False)
        done = step + 1
        if config["checkpoint_every"] and done % config["checkpoint_every"] == 0 and done < total:
            if accelerator.is_main_process:
                save_checkpoint(checkpoint, model, params, optimizer, done, log)
            accelerator.wait_for_everyone()
    bar.close()
    if stop < total:
        if accelerator.is_main_process:
            save_checkpoint(checkpoint, model, params, optimizer, stop, log)
        accelerator.wait_for_everyone()
        return None
    if accelerator.is_main_process:
        metadata = {"framework": framework, "variant": variant, "seed": seed, "config": config,
                    "model": model.describe(), "data": str(data_dir), "processes": world,
                    "device": str(accelerator.device)}  # fmt: skip
        with atomic_path(out) as folder:
            model.save_pretrained(folder)
            write_table(pd.DataFrame(log, columns=["step", "loss", "terms", "lr", "grad_norm"]),
                        folder / "train_log.parquet", "pretrain_log", metadata)  # fmt: skip
        if checkpoint.exists():
            shutil.rmtree(checkpoint)
    accelerator.wait_for_everyone()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline pretrain", description=__doc__)
    parser.add_argument("--framework", required=True, choices=["onestep", "multistep"])
    parser.add_argument("--variant", required=True)
    parser.add_argument("--data", required=True, help="data split folder with pairs.parquet")
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument("--config", default="{}", help="the pretrain config section (JSON)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", default=None, help="default: OUT/checkpoint")
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (checkpoint)")
    args = parser.parse_args(argv)
    pretrain(args.framework, args.variant, args.data, args.out, json.loads(args.config),
             args.seed, checkpoint_dir=args.checkpoint_dir, max_steps=args.max_steps)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
