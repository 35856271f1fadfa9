"""DSPO dataset preparation, step 1 (Sec. 4.1): four SR candidates per LQ image.

Multi-step: one pretrained model sampled with four (steps, cfg) settings. One-step: the four
pretrained variants (LoRA rank 16 / 64, VSD cfg 6 / 12), one step each. Every (image, setting)
draws from its own generator ``torch_generator(seed, "candidates", image_id, setting)`` and
the network runs batch-invariantly on the CPU (see :func:`batch_invariant`), so reruns are
byte-identical and no image depends on which others share its batch.

Prompts (docs/prompts.md): with ``--prompts`` (``prompts/train.parquet``) every image is sampled
with its own prompt (the conditional branch) and negative prompt (the unconditional branch of
multi-step CFG), so the cfg 4.5 and 10.5 settings differ by more than their seed. A
``--negative-prompts`` table (M2 feedback: pairs or captions) puts each image's hallucination
captions before the table's negative prompt (``load_prompts(..., mode="image")``). Without a
prompts table (direct calls) prompts are empty and the negative prompt is the feedback text or
the model's default.

Rounds (docs/design.md §14): a later round's candidates come from the previous round's aligned
model (``--model`` names it for every variant; it is loaded once). ``--round r`` (r >= 2) adds
the round to every draw's key; ``--policy-std s`` samples one-step models through their one-step
Gaussian policy (``sample_policy``) instead of their deterministic one step, so settings that
share one model still differ. Round 1 without a policy std is this stage as it always was.

Shards (docs/design.md §15): a shard job gets its shard's data folder and prompts table and
processes every image of them. LQs are read per batch (never all at once); each batch runs
every setting, then each of its images is marked complete in the job's :class:`ShardWork`, so a
killed job's rerun skips the images already done and ends with the same bytes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from pipeline import contracts, guidance, settings, shards
from pipeline.io.images import image_size, read_rgb, signed_tensor, signed_to_uint8, write_png
from pipeline.io.tables import write_table
from pipeline.models import load_model
from pipeline.models.base import SRModel, batch_invariant, upsample_lq
from pipeline.seeding import derive_seed, torch_generator


def stage_config(config: Mapping[str, Any] | None, framework: str) -> dict[str, Any]:
    """The ``candidates`` section with the schema's defaults; ``settings`` is this framework's
    list (the schema's default is the paper's four), given as the list or per framework."""
    config = dict(config or {})
    chosen = config.pop("settings", None)
    if not isinstance(chosen, Mapping):
        chosen = {framework: chosen}
    resolved = settings.resolve("candidates", {**config, "settings": chosen})
    resolved["settings"] = settings.candidate_settings({"candidates": resolved}, framework)
    names = [s["name"] for s in resolved["settings"]]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate setting names must be unique: {names}")
    return resolved


#: the candidates table's columns, in the order the stage writes them
COLUMNS = ["image_id", "setting", "variant", "steps", "cfg", "seed", "negative_prompt", "path"]


def pair_images(data_dir: Path) -> list[tuple[str, Path, tuple[int, int]]]:
    """(image_id, LQ path, HQ size (H, W)) of every pair, sorted by image id; the HQ size from
    its header only, so listing a large split decodes no pixels."""
    hq_paths, lq_paths = (
        contracts.data_images(data_dir, "hq"),
        contracts.data_images(data_dir, "lq"),
    )
    pairs = []
    for image_id in sorted(hq_paths):
        width, height = image_size(hq_paths[image_id])
        pairs.append((image_id, lq_paths[image_id], (height, width)))
    return pairs


def load_lq(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """One LQ, signed and bicubic-upsampled to its HQ size ``(H, W)``: ``[3, H, W]``."""
    return upsample_lq(signed_tensor(read_rgb(path))[None], size)[0]


def size_batches(
    pairs: list[tuple[str, Path, tuple[int, int]]], batch_size: int
) -> list[list[tuple[str, Path, tuple[int, int]]]]:
    """Batches of at most ``batch_size`` pairs of one HQ size: sizes in the order they first
    appear, pairs in their given (image-id) order."""
    by_size: dict[tuple[int, int], list] = {}
    for pair in pairs:
        by_size.setdefault(pair[2], []).append(pair)
    return [
        group[i : i + batch_size]
        for group in by_size.values()
        for i in range(0, len(group), batch_size)
    ]


def setting_steps_cfg(model: SRModel, setting: dict[str, Any]) -> tuple[int, float]:
    """The (steps, cfg) recorded for a setting: one-step models run 1 step and report the
    VSD cfg they were trained with."""
    if model.framework == "onestep":
        return 1, float(model.settings.cfg_vsd)
    return int(setting.get("steps") or model.settings.steps), float(
        setting.get("cfg") or model.settings.cfg
    )


def generate_candidates(
    framework: str,
    model_dirs: dict[str, str | Path],
    data_dir: str | Path,
    out_dir: str | Path,
    config: dict[str, Any] | None,
    seed: int,
    negative_prompts: str | Path | None = None,
    prompts: str | Path | None = None,
    policy_std: float | None = None,
    round_number: int = 1,
) -> pd.DataFrame:
    """Write ``{out}/{setting}/{image_id}.png`` and ``{out}/candidates.parquet``; ``prompts`` is
    the training split's prompts table; ``policy_std`` and ``round_number`` (a later round's
    candidates) as the module docstring says."""
    config = stage_config(config, framework)
    if policy_std is not None and (framework != "onestep" or policy_std <= 0):
        raise ValueError(f"policy_std {policy_std}: a positive std, for one-step models only")
    round_keys = () if round_number == 1 else ("round", int(round_number))
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    pairs = pair_images(data_dir)
    ids_all = [image_id for image_id, _, _ in pairs]
    texts, prompt_record = _image_prompts(ids_all, prompts, negative_prompts)
    used = _used_model_dirs(config["settings"], model_dirs)
    work = shards.ShardWork(
        out_dir,
        shards.fingerprint(
            "candidates",
            inputs=[data_dir, prompts, negative_prompts, *sorted(set(used.values()))],
            framework=framework,
            config=config,
            seed=seed,
            models=used,
            policy_std=policy_std,
            round=int(round_number),
        ),
        stage="candidates",
    )
    todo = set(work.todo(ids_all))
    # every model once, before any batch (variants naming one folder, a later round, share it)
    models = _load_models(used, config["device"])
    steps_cfg = {s["name"]: setting_steps_cfg(models[s["variant"]], s) for s in config["settings"]}
    sampling = _Sampling(config["settings"], models, steps_cfg, texts, seed, round_keys, policy_std)
    batches = size_batches([pair for pair in pairs if pair[0] in todo], config["batch_size"])
    for batch in tqdm(batches, file=sys.stderr, mininterval=1, desc="candidates"):
        rows = _sample_batch(batch, sampling, work.files)
        # an image is complete once every setting's PNG is in place (docs/design.md §15)
        for image_id, image_rows in rows.items():
            work.finish(image_id, sorted(image_rows, key=lambda row: row["setting"]))
    table = work.rows(ids_all, COLUMNS)  # sorted by image_id, then setting
    metadata = {
        "framework": framework,
        "seed": seed,
        "config": config,
        "models": {v: {"path": str(model_dirs[v]), **m.describe()} for v, m in models.items()},
        "negative_prompts": str(negative_prompts) if negative_prompts else None,
        "prompts": prompt_record,
        "paths": "relative to the folder of this table",
    }
    if round_number != 1 or policy_std is not None:  # round 1's metadata stays as it was
        metadata["round"] = {
            "round": int(round_number),
            "policy_std": policy_std,
            "sampling": next(iter(models.values())).POLICY_NAME
            if policy_std is not None
            else "the model's sample",
        }
    write_table(table, work.files / contracts.CANDIDATES_TABLE, "candidates", metadata)
    work.commit_folder()
    return table


def _image_prompts(
    ids: list[str], prompts: str | Path | None, negative_prompts: str | Path | None
) -> tuple[dict[str, tuple[str, str]], dict[str, Any]]:
    """Each image's (prompt, negative prompt) and the record of where they came from."""
    if prompts is not None:
        return guidance.stage_prompts(
            prompts, ids, feedback=negative_prompts, mode="image", where="candidates"
        )
    feedback = (
        guidance.feedback_by_image(pd.read_parquet(negative_prompts)) if negative_prompts else {}
    )
    texts = {i: ("", guidance.join_prompts(feedback.get(i, []))) for i in ids}
    return texts, guidance.no_table_record("feedback text" if negative_prompts else None)


def _used_model_dirs(
    candidate_settings: list[dict[str, Any]], model_dirs: dict[str, str | Path]
) -> dict[str, str]:
    """The model folder of every variant the settings use; raises ``KeyError`` on a missing one."""
    for setting in candidate_settings:
        if setting["variant"] not in model_dirs:
            raise KeyError(
                f"setting {setting['name']!r} needs model variant "
                f"{setting['variant']!r}; given: {sorted(model_dirs)}"
            )
    return {s["variant"]: str(model_dirs[s["variant"]]) for s in candidate_settings}


def _load_models(used: dict[str, str], device: str) -> dict[str, SRModel]:
    """Every variant's model, each folder loaded once (variants naming one folder share it)."""
    models: dict[str, SRModel] = {}
    by_dir: dict[str, SRModel] = {}
    for variant, folder in used.items():
        if folder not in by_dir:
            by_dir[folder] = load_model(folder, device=device).eval()
        models[variant] = by_dir[folder]
    return models


@dataclass(frozen=True)
class _Sampling:
    """How every batch is sampled: the settings, their models, (steps, cfg), prompts and keys."""

    settings: list[dict[str, Any]]
    models: dict[str, SRModel]
    steps_cfg: dict[str, tuple[int, float]]  # by setting name
    texts: dict[str, tuple[str, str]]  # (prompt, negative prompt) by image id
    seed: int
    round_keys: tuple
    policy_std: float | None


def _sample_batch(
    batch: list[tuple[str, Path, tuple[int, int]]], sampling: _Sampling, files: Path
) -> dict[str, list[dict[str, Any]]]:
    """Each image's candidates-table rows, one per setting, after writing the batch's PNGs."""
    seed, round_keys, texts = sampling.seed, sampling.round_keys, sampling.texts
    ids = [image_id for image_id, _, _ in batch]
    lqs = [load_lq(path, size) for _, path, size in batch]  # this batch's LQs only
    image_rows: dict[str, list[dict[str, Any]]] = {image_id: [] for image_id in ids}
    for setting in sampling.settings:
        variant, model = setting["variant"], sampling.models[setting["variant"]]
        steps, cfg = sampling.steps_cfg[setting["name"]]
        generators = [
            torch_generator(seed, "candidates", i, setting["name"], *round_keys) for i in ids
        ]
        outputs = _sample_setting(sampling, model, lqs, ids, steps, cfg, generators)
        for image_id, output in zip(ids, outputs, strict=True):
            relative = f"{setting['name']}/{image_id}.png"
            write_png(files / relative, signed_to_uint8(output.cpu()))
            image_rows[image_id].append(
                {
                    "image_id": image_id,
                    "setting": setting["name"],
                    "variant": variant,
                    "steps": steps,
                    "cfg": cfg,
                    "seed": derive_seed(seed, "candidates", image_id, setting["name"], *round_keys),
                    "negative_prompt": texts[image_id][1],
                    "path": relative,
                }
            )
    return image_rows


def _sample_setting(
    sampling: _Sampling,
    model: SRModel,
    lqs: list[torch.Tensor],
    ids: list[str],
    steps: int,
    cfg: float,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """One setting's SR images of a batch (signed ``[B, 3, H, W]``), batch-invariantly."""
    texts = sampling.texts
    with batch_invariant(model):
        if sampling.policy_std is not None:  # the one-step Gaussian policy (a later round)
            return model.sample_policy(
                torch.stack(lqs),
                prompts=[texts[i][0] for i in ids],
                std=float(sampling.policy_std),
                generators=generators,
            ).images
        return model.sample(
            torch.stack(lqs),
            prompts=[texts[i][0] for i in ids],
            negative_prompts=[texts[i][1] for i in ids],
            steps=steps,
            cfg=cfg,
            generators=generators,
        )


def _model_arg(text: str) -> tuple[str, str]:
    variant, sep, path = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--model expects VARIANT=DIR, got {text!r}")
    return variant, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline candidates", description=__doc__)
    parser.add_argument("--framework", required=True, choices=["onestep", "multistep"])
    parser.add_argument(
        "--model",
        action="append",
        type=_model_arg,
        required=True,
        metavar="VARIANT=DIR",
        help="a pretrained model folder per variant",
    )
    parser.add_argument("--data", required=True, help="data split folder with pairs.parquet")
    parser.add_argument("--out", required=True, help="candidates/{framework} folder")
    parser.add_argument(
        "--prompts",
        default=None,
        help="prompts/train.parquet: each image's prompt and negative prompt",
    )
    parser.add_argument(
        "--negative-prompts",
        default=None,
        help="M2 feedback table (image_id, negative_prompt): joined before the negative prompts",
    )
    parser.add_argument("--config", default="{}", help="the candidates config section (JSON)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--round",
        type=int,
        default=1,
        help="the alignment round (>= 2: a later round; keys every draw)",
    )
    parser.add_argument(
        "--policy-std",
        type=float,
        default=None,
        help="one-step models: sample the one-step Gaussian policy with this std",
    )
    args = parser.parse_args(argv)
    generate_candidates(
        args.framework,
        dict(args.model),
        args.data,
        args.out,
        settings.cli_config(args.config),
        args.seed,
        args.negative_prompts,
        args.prompts,
        args.policy_std,
        args.round,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
