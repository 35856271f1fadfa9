"""The train stage: preference training of one model by one method (DSPO paper §4.2-4.4).

This module is the stage's command line and its door, :func:`train`; the run's life cycle is
:mod:`pipeline.training.session`'s, written once for every method, and each method is one
module of :mod:`pipeline.training` (``contracts.Method.loop``: the offline loop over selected
pairs for dspo, dspo_m1, dpo, sft and dro; ddpo, gdpo, dro_online and ea_adam their own). A
method declares what differs (docs/design.md §16, docs/adding_a_method.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipeline import contracts, settings
from pipeline.models.base import SRModel
from pipeline.training import session
from pipeline.training.config import TrainConfig


def train(
    *,
    framework: str,
    method: str,
    objective: str,
    data_dir: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    config: dict[str, Any] | TrainConfig | None = None,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    model: SRModel | None = None,
    prompts_path: str | Path | None = None,
    pairs_path: Any = None,
    candidates_path: str | Path | None = None,
    masks_path: str | Path | None = None,
) -> Path:
    """Train ``method`` (a name of :data:`pipeline.contracts.METHODS`) and write ``out_dir``
    (``save_pretrained`` + the log, :data:`pipeline.contracts.TRAIN_LOG`).

    Checkpoints go to ``checkpoint_dir`` (default :func:`pipeline.checkpoints.default_location`)
    every ``checkpoint_every`` steps and are resumed (:func:`pipeline.training.session.train`).
    ``model`` (optional) is an already loaded model, otherwise ``pipeline.models.load_model
    (model_dir)``. ``prompts_path`` is the training split's prompts table (each LQ's prompt and
    negative prompt). ``pairs_path``: the pairs table (none for a method of pair level
    ``none``; one per ``contracts.MULTI_OBJECTIVES`` for pair level ``objectives``).
    """
    contracts.method(method)  # an unknown method fails before anything is read
    job = session.Job(
        framework=framework,
        method=method,
        objective=objective,
        data_dir=data_dir,
        model_dir=model_dir,
        out_dir=out_dir,
        config=config,
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        model=model,
        prompts_path=prompts_path,
        pairs_path=pairs_path,
        candidates_path=candidates_path,
        masks_path=masks_path,
    )
    return session.train(job)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline train", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--framework", required=True)
    parser.add_argument("--method", required=True, choices=sorted(contracts.METHODS))
    parser.add_argument("--objective", required=True)
    parser.add_argument(
        "--pairs",
        nargs="+",
        default=None,  # none for ddpo: it samples its own
        help="pairs/{framework}/{objective}.parquet; a method of pair level "
        "objectives (ea_adam) takes one table per contracts.MULTI_OBJECTIVES, "
        "in that order",
    )
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
    parser.add_argument(
        "--prompts",
        default=None,
        help="prompts/train.parquet: each LQ's prompt and negative prompt",
    )
    args = parser.parse_args(argv)
    train(
        framework=args.framework,
        method=args.method,
        objective=args.objective,
        pairs_path=args.pairs[0] if args.pairs and len(args.pairs) == 1 else args.pairs,
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
