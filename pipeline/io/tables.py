"""The Parquet data contracts of docs/design.md, defined once.

Every table a later stage reads is written with :func:`write_table` and read with
:func:`read_table`; both check the columns against the schema registered here under the
table's name and raise :class:`TableError` naming the file and the offending columns.
A JSON document describing how the table was made (weights, backends, stand-ins) travels
inside the Parquet file's metadata under the key ``dspo``; :func:`read_metadata` returns it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.atomic import atomic_path

METADATA_KEY = b"dspo"


class TableError(ValueError):
    """A table whose columns do not match its contract."""


def _schema(*fields: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema([pa.field(name, dtype) for name, dtype in fields])


def _kernel_fields(prefix: str) -> list[tuple[str, pa.DataType]]:
    """The drawn parameters of one blur or sinc kernel."""
    return [
        (f"{prefix}_type", pa.string()),
        (f"{prefix}_size", pa.int32()),
        (f"{prefix}_sigma_x", pa.float64()),
        (f"{prefix}_sigma_y", pa.float64()),
        (f"{prefix}_rotation", pa.float64()),
        (f"{prefix}_beta", pa.float64()),
        (f"{prefix}_omega_c", pa.float64()),
    ]


SCHEMAS: dict[str, pa.Schema] = {
    # data/{split}/pairs.parquet: one row per HQ/LQ pair (image_id = file stem; several crops of
    # one source image share source_id) and every degradation parameter drawn, None where it
    # does not apply (pipeline.degradations.sample_degradation_params)
    "degradation_pairs": _schema(
        ("image_id", pa.string()),
        ("source_id", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("source_height", pa.int32()),
        ("source_width", pa.int32()),
        ("crop_index", pa.int32()),
        ("crop_top", pa.int32()),
        ("crop_left", pa.int32()),
        ("crop_size", pa.int32()),
        ("padded", pa.bool_()),
        ("hflip", pa.bool_()),
        ("scale", pa.int32()),
        ("seed", pa.int64()),
        *_kernel_fields("kernel1"),
        ("resize1_direction", pa.string()),
        ("resize1_scale", pa.float64()),
        ("resize1_mode", pa.string()),
        ("noise1_type", pa.string()),
        ("noise1_sigma", pa.float64()),
        ("noise1_poisson_scale", pa.float64()),
        ("noise1_gray", pa.bool_()),
        ("noise1_seed", pa.int64()),
        ("jpeg1_quality", pa.int32()),
        ("blur2_applied", pa.bool_()),
        *_kernel_fields("kernel2"),
        ("resize2_direction", pa.string()),
        ("resize2_scale", pa.float64()),
        ("resize2_mode", pa.string()),
        ("noise2_type", pa.string()),
        ("noise2_sigma", pa.float64()),
        ("noise2_poisson_scale", pa.float64()),
        ("noise2_gray", pa.bool_()),
        ("noise2_seed", pa.int64()),
        ("final_order", pa.string()),
        ("final_resize_mode", pa.string()),
        ("final_sinc_applied", pa.bool_()),
        ("final_sinc_size", pa.int32()),
        ("final_sinc_omega_c", pa.float64()),
        ("jpeg2_quality", pa.int32()),
        ("resize_back", pa.bool_()),
        ("resize_back_mode", pa.string()),
        ("hq_path", pa.string()),
        ("lq_path", pa.string()),
    ),
    # candidates/{framework}/candidates.parquet
    "candidates": _schema(
        ("image_id", pa.string()),
        ("setting", pa.string()),
        ("variant", pa.string()),
        ("steps", pa.int32()),
        ("cfg", pa.float64()),
        ("seed", pa.int64()),
        ("negative_prompt", pa.string()),
        ("path", pa.string()),
    ),
    # masks/{framework}/instances.parquet; instance_id is the label in the Zarr label map
    "instances": _schema(
        ("image_id", pa.string()),
        ("instance_id", pa.int32()),
        ("area", pa.int64()),
        ("bbox_x", pa.int32()),
        ("bbox_y", pa.int32()),
        ("bbox_w", pa.int32()),
        ("bbox_h", pa.int32()),
        ("weight", pa.float64()),
        ("score", pa.float64()),
        ("is_remainder", pa.bool_()),
    ),
    # prompts/{split}.parquet: the text every LQ is sampled with (pipeline.prompts); source is
    # fixed, captioner or tagger, model the captioner / tagger weights ('none' for fixed)
    "prompts": _schema(
        ("image_id", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("source", pa.string()),
        ("model", pa.string()),
    ),
    # captions/{framework}.parquet; candidate is 'hq' or a candidate setting
    "captions": _schema(
        ("image_id", pa.string()),
        ("instance_id", pa.int32()),
        ("candidate", pa.string()),
        ("caption", pa.string()),
        ("similarity", pa.float64()),
        ("hallucinated", pa.bool_()),
    ),
    # scores/{framework}.parquet, long form
    "scores": _schema(
        ("image_id", pa.string()),
        ("instance_id", pa.int32()),
        ("candidate", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("lower_better", pa.bool_()),
    ),
    # pairs/{framework}/{objective}.parquet; instance_id -1 marks an image-level pair
    "preference_pairs": _schema(
        ("image_id", pa.string()),
        ("instance_id", pa.int32()),
        ("weight", pa.float64()),
        ("winner", pa.string()),
        ("loser", pa.string()),
        ("margin", pa.float64()),
        ("negative_prompt", pa.string()),
        ("source", pa.string()),
    ),
    # human annotations (input file, CSV or Parquet; `annotate export` writes it), plus the
    # optional description column (OPTIONAL_COLUMNS)
    "annotations": _schema(
        ("annotator", pa.string()),
        ("image_id", pa.string()),
        ("instance_id", pa.int32()),
        ("best", pa.string()),
        ("worst", pa.string()),
        ("flagged", pa.string()),
    ),
    # annotations/{framework}/votes.parquet: blind A/B answers of `annotate` (pipeline/annotate);
    # answer is left, right, tie or both_bad; simulated marks `annotate simulate` votes
    "votes": _schema(
        ("annotator", pa.string()),
        ("round", pa.int32()),
        ("testset", pa.string()),
        ("image_id", pa.string()),
        ("left", pa.string()),
        ("right", pa.string()),
        ("answer", pa.string()),
        ("repeated", pa.bool_()),
        ("gold", pa.bool_()),
        ("simulated", pa.bool_()),
        ("shown_at", pa.timestamp("us", tz="UTC")),
        ("answered_at", pa.timestamp("us", tz="UTC")),
    ),
    # models/{framework}/{variant}/train_log.parquet: pretraining; `terms` is a JSON object of
    # the family's loss terms (l2, lpips, vsd, ...) at that step
    "pretrain_log": _schema(
        ("step", pa.int64()),
        ("loss", pa.float64()),
        ("terms", pa.string()),
        ("lr", pa.float64()),
        ("grad_norm", pa.float64()),
    ),
    # aligned/{framework}/{method}/{objective}/train_log.parquet: preference training
    "train_log": _schema(
        ("step", pa.int64()),
        ("loss", pa.float64()),
        ("implicit_accuracy", pa.float64()),
        ("err_theta_winner", pa.float64()),
        ("err_theta_loser", pa.float64()),
        ("err_ref_winner", pa.float64()),
        ("err_ref_loser", pa.float64()),
        ("lr", pa.float64()),
        ("grad_norm", pa.float64()),
    ),
    # aligned/{framework}/ea_adam/front/train_log.parquet: one row per member and Adam step
    "ea_adam_log": _schema(
        ("step", pa.int64()),
        ("member", pa.int64()),
        ("loss_perception", pa.float64()),  # NaN where the member's preference skips it
        ("loss_fidelity", pa.float64()),
        ("lr", pa.float64()),
        ("grad_norm", pa.float64()),
    ),
    # aligned/{framework}/ea_adam/front/population.parquet: one row per member (docs/ea_adam.md)
    "population": _schema(
        ("member", pa.int64()),
        ("preference_perception", pa.float64()),
        ("preference_fidelity", pa.float64()),
        ("fitness_perception", pa.float64()),  # losses of the last EA phase (NaN: none ran)
        ("fitness_fidelity", pa.float64()),
        ("fusion_weight", pa.float64()),  # the member's mean fusion weight over layers
        ("path", pa.string()),  # the member's save_pretrained folder, relative to the table's
    ),
    # aligned/{framework}/{method}/{objective}/train_curves.parquet: alignment curves, one row per
    # (step, split) with split train or heldout (pipeline.training.curves)
    "train_curves": _schema(
        ("step", pa.int64()),
        ("split", pa.string()),
        ("items", pa.int64()),
        ("loss", pa.float64()),
        ("implicit_accuracy", pa.float64()),
        ("margin", pa.float64()),
        ("reward_margin", pa.float64()),
    ),
    # winrates/{framework}/{testset}.parquet: per aligned model, its per-instance win rate
    # against the pretrained model under its objective (ties count half; pipeline.winrates)
    "win_rates": _schema(
        ("testset", pa.string()),
        ("model", pa.string()),
        ("objective", pa.string()),
        ("instances", pa.int64()),
        ("images", pa.int64()),
        ("wins", pa.int64()),
        ("ties", pa.int64()),
        ("losses", pa.int64()),
        ("win_rate", pa.float64()),
        ("ci_low", pa.float64()),  # Wilson 95%, instances as independent
        ("ci_high", pa.float64()),
        ("effective_n", pa.float64()),  # instances / design effect (images as clusters)
        ("cluster_low", pa.float64()),  # Wilson 95% on effective_n (pipeline.winrates)
        ("cluster_high", pa.float64()),
    ),
    # a winrates shard's per-instance scores (pipeline.winrates.shard_instances; docs/design.md
    # §15): per test image, each aligned model's and the pretrained model's score on each
    # instance for every metric of the model's objective; the gather computes win_rates from them
    "win_instances": _schema(
        ("testset", pa.string()),
        ("model", pa.string()),
        ("objective", pa.string()),
        ("image_id", pa.string()),
        ("instance_id", pa.int64()),
        ("candidate", pa.string()),  # "pretrained" or "aligned"
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("lower_better", pa.bool_()),
    ),
    # aligned/{framework}/ddpo/{objective}/train_log.parquet: DDPO (pipeline.training.ddpo), one row
    # per step; reward_* of the normalised objective over the global batch, scores a JSON object
    # of the raw metric means, PPO's stats averaged over inner epochs and timesteps
    "ddpo_log": _schema(
        ("step", pa.int64()),
        ("loss", pa.float64()),
        ("reward_mean", pa.float64()),
        ("reward_std", pa.float64()),
        ("scores", pa.string()),
        ("approx_kl", pa.float64()),
        ("clipfrac", pa.float64()),
        ("ratio_mean", pa.float64()),
        ("lr", pa.float64()),
        ("grad_norm", pa.float64()),
    ),
    # aligned/{framework}/gdpo*/{objective}/train_log.parquet: GDPO (pipeline.training.gdpo), one
    # row per step; reward_* of the group-normalised reward over the global batch (instances
    # weighted by area), scores a JSON object of the raw metric means, the reward weights used,
    # the loss's advantage-weighted error gap (margin), implicit accuracy and mean errors
    "gdpo_log": _schema(
        ("step", pa.int64()),
        ("loss", pa.float64()),
        ("reward_mean", pa.float64()),
        ("reward_std", pa.float64()),
        ("scores", pa.string()),
        ("fidelity_weight", pa.float64()),
        ("detail_weight", pa.float64()),
        ("margin", pa.float64()),
        ("implicit_accuracy", pa.float64()),
        ("err_theta", pa.float64()),
        ("err_ref", pa.float64()),
        ("lr", pa.float64()),
        ("grad_norm", pa.float64()),
    ),
    # aligned/{framework}/dro_online/{objective}/train_log.parquet: Diffusion-DRO's online
    # negatives (pipeline.training.dro_online), one row per optimizer step: the hinge's mean,
    # the weighted share of (example, instance) terms where it is active, the implicit rewards
    # r = err_ref - err_theta of the policy states and of the experts, the trained model's error
    # on the policy states, the buffer's trajectories after the step and the syncs so far
    "dro_online_log": _schema(
        ("step", pa.int64()),
        ("loss", pa.float64()),
        ("hinge_active", pa.float64()),
        ("r_policy", pa.float64()),
        ("r_expert", pa.float64()),
        ("err_policy", pa.float64()),
        ("buffer_size", pa.int64()),
        ("syncs", pa.int64()),
        ("lr", pa.float64()),
        ("grad_norm", pa.float64()),
    ),
    # eval/{framework}/{testset}/{model}/metrics.parquet: per image
    "eval_metrics": _schema(
        ("testset", pa.string()),
        ("model", pa.string()),
        ("image_id", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("lower_better", pa.bool_()),
    ),
    # eval/{framework}/{testset}/{model}/images.parquet: the evaluation's manifest, what the
    # report reads (sr_path relative to that folder; lq_path, hq_path as the test set lists them)
    "eval_images": _schema(
        ("testset", pa.string()),
        ("model", pa.string()),
        ("image_id", pa.string()),
        ("sr_path", pa.string()),
        ("lq_path", pa.string()),
        ("hq_path", pa.string()),
    ),
    # study/candidates/regions.parquet (pipeline/study.py): each training instance's kind
    # (textured or smooth, from the HQ's mean luminance gradient), the candidate that plants its
    # artifact there and the planted amplitude ([0, 1] units)
    "study_regions": _schema(
        ("split", pa.string()),
        ("image_id", pa.string()),
        ("instance_id", pa.int32()),
        ("area", pa.int64()),
        ("texture", pa.float64()),
        ("kind", pa.string()),
        ("planted", pa.string()),
        ("amplitude", pa.float64()),
    ),
    # study/adoption.parquet: per aligned model (arm, method, seed), region kind and artifact
    # signature, the fraction of the planted amplitude it reproduces on held-out images
    "study_adoption": _schema(
        ("arm", pa.string()),
        ("method", pa.string()),
        ("seed", pa.int64()),
        ("region", pa.string()),
        ("signature", pa.string()),
        ("adoption", pa.float64()),
        ("amplitude", pa.float64()),
        ("n_images", pa.int64()),
        ("n_pixels", pa.int64()),
    ),
    # eval/{framework}/summary.parquet
    "eval_summary": _schema(
        ("testset", pa.string()),
        ("model", pa.string()),
        ("metric", pa.string()),
        ("mean", pa.float64()),
        ("ci95_low", pa.float64()),
        ("ci95_high", pa.float64()),
        ("n_images", pa.int64()),
        ("lower_better", pa.bool_()),
        ("delta_vs_baseline", pa.float64()),  # mean minus report.baseline_model's mean
    ),
}


#: string columns a table may lack when written or read; they are added, empty, so every table
#: written or read has them (files made before they existed stay valid). annotations.description:
#: the annotator's words for what a flagged hallucination shows (`annotate`, select's negatives)
OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {"annotations": ("description",)}


def _fill_optional(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    missing = [c for c in OPTIONAL_COLUMNS.get(name, ()) if c not in frame.columns]
    return frame.assign(**dict.fromkeys(missing, "")) if missing else frame


def full_schema(name: str) -> pa.Schema:
    """The schema of table ``name`` with its optional columns (what is written and read)."""
    schema = schema_for(name)
    for column in OPTIONAL_COLUMNS.get(name, ()):
        schema = schema.append(pa.field(column, pa.string()))
    return schema


def schema_for(name: str) -> pa.Schema:
    """The registered schema of table ``name``."""
    try:
        return SCHEMAS[name]
    except KeyError:
        raise KeyError(f"unknown table {name!r}; known: {', '.join(sorted(SCHEMAS))}") from None


def _check_columns(columns: list[str], schema: pa.Schema, where: str, name: str) -> None:
    expected = schema.names
    missing = [column for column in expected if column not in columns]
    unexpected = [column for column in columns if column not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing columns {missing}")
        if unexpected:
            parts.append(f"unexpected columns {unexpected}")
        raise TableError(f"{where}: not a valid {name!r} table: {'; '.join(parts)}")


def to_arrow(frame: pd.DataFrame, name: str, where: str = "<table>") -> pa.Table:
    """Check ``frame`` against the contract ``name`` and cast it to the exact schema."""
    schema = full_schema(name)
    frame = _fill_optional(frame, name)
    _check_columns(list(frame.columns), schema, where, name)
    arrays = []
    for field in schema:
        column = frame[field.name]
        try:
            arrays.append(pa.array(column.tolist(), type=field.type, from_pandas=True))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as error:
            raise TableError(
                f"{where}: column {field.name!r} of table {name!r} is not {field.type}: {error}"
            ) from error
    return pa.Table.from_arrays(arrays, schema=schema)


def runtime() -> dict[str, Any]:
    """What the process computed with that can change bytes: its intra-op thread count (fixed
    by the config's ``threads``, so results do not depend on ``--cores``)."""
    info: dict[str, Any] = {"omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    torch = sys.modules.get("torch")  # tables are written by stages that may not use torch
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
    return info


def write_table(
    frame: pd.DataFrame,
    path: str | os.PathLike,
    name: str,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``frame`` as the contract table ``name`` (checked, cast, atomic, deterministic)."""
    path = Path(path)
    table = to_arrow(frame, name, str(path))
    document = {"table": name, "runtime": runtime(), **(metadata or {})}
    encoded = json.dumps(document, sort_keys=True, default=str).encode("utf-8")
    table = table.replace_schema_metadata({METADATA_KEY: encoded})
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary, compression="zstd")
    return path


def read_table(path: str | os.PathLike, name: str) -> pd.DataFrame:
    """Read a contract table, checking its columns and types; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table not found: {path} (expected a {name!r} table)")
    schema = full_schema(name)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise TableError(f"{path}: not a readable Parquet file: {error}") from error
    for column in OPTIONAL_COLUMNS.get(name, ()):
        if column not in table.schema.names:
            table = table.append_column(column, pa.array([""] * table.num_rows, pa.string()))
    _check_columns(table.schema.names, schema, str(path), name)
    wrong_types = [
        f"{field.name} is {table.schema.field(field.name).type}, expected {field.type}"
        for field in schema
        if table.schema.field(field.name).type != field.type
        and table.schema.field(field.name).type != pa.null()
    ]
    if wrong_types:
        raise TableError(f"{path}: wrong column types in {name!r} table: {'; '.join(wrong_types)}")
    return table.select(schema.names).cast(schema).to_pandas()


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata document stored by :func:`write_table` (empty if none)."""
    raw = pq.read_schema(path).metadata or {}
    return json.loads(raw[METADATA_KEY]) if METADATA_KEY in raw else {}
