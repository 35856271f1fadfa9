"""A tiny synthetic results tree in the pipeline's layout, to try the app and to test it.

``write_synthetic_results(root)`` writes, under ``root`` (a stand-in for ``results/``):
``data/train`` and ``data/test`` (``hq/``, ``lq/``, ``pairs.parquet``), four candidate settings
in ``candidates/{F}/`` with ``candidates.parquet``, ``masks/{F}.zarr`` with
``masks/{F}/instances.parquet`` (three box instances and a remainder per image) and SR outputs
with a PSNR ``metrics.parquet`` per model in ``eval/{F}/{testset}/{model}/``. Candidates and
SR outputs are the HQ plus noise whose strength grows with the setting's / model's index.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import contracts
from pipeline.annotate.tasks import evaluation_dir
from pipeline.io.images import write_png
from pipeline.io.masks import write_label_maps
from pipeline.io.tables import SCHEMAS, write_table

SETTINGS = ("rank16", "rank64", "grad1", "grad4")
MODELS = ("bicubic", "pretrained", "dspo_fidelity", "sft_fidelity")
BOXES = ((4, 6, 30, 24), (36, 8, 24, 40), (10, 38, 22, 22))  # x, y, w, h


def hq_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A gradient with three coloured boxes (the instances)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.stack([yy * 200, xx * 200, (1 - yy) * 120 + 40], axis=-1)
    for x, y, w, h in BOXES:
        image[y : y + h, x : x + w] = rng.integers(30, 255, size=3)
    return image.astype(np.uint8)


def label_map(size: int) -> np.ndarray:
    labels = np.zeros((size, size), np.uint16)
    for index, (x, y, w, h) in enumerate(BOXES, start=1):
        labels[y : y + h, x : x + w] = index
    return labels


def noisy(image: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    return np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)


def lq_of(hq: np.ndarray, scale: int) -> np.ndarray:
    height, width = hq.shape[:2]
    blocks = hq.reshape(height // scale, scale, width // scale, scale, 3).mean(axis=(1, 3))
    return np.rint(blocks).astype(np.uint8)


def write_pairs(folder: Path, images: dict[str, np.ndarray], scale: int) -> None:
    rows = []
    for image_id, hq in images.items():
        write_png(folder / "hq" / f"{image_id}.png", hq)
        write_png(folder / "lq" / f"{image_id}.png", lq_of(hq, scale))
        row = dict.fromkeys(SCHEMAS["degradation_pairs"].names)
        row.update(image_id=image_id, source_id=image_id, source="synthetic", split=folder.name)
        row.update(scale=scale, hq_path=f"hq/{image_id}.png", lq_path=f"lq/{image_id}.png")
        rows.append(row)
    write_table(pd.DataFrame(rows), folder / contracts.DATA_TABLE, "degradation_pairs")


def write_synthetic_results(
    root: str | Path,
    framework: str = "onestep",
    n_train: int = 2,
    n_test: int = 3,
    size: int = 64,
    scale: int = 4,
    testset: str = "synthetic",
    models: tuple[str, ...] = MODELS,
    seed: int = 0,
) -> Path:
    """Write the tree (see the module docstring); returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    train = {f"train{i}": hq_image(rng, size) for i in range(n_train)}
    test = {f"test{i}": hq_image(rng, size) for i in range(n_test)}
    write_pairs(root / "data" / "train", train, scale)
    write_pairs(root / "data" / "test", test, scale)
    folder = contracts.artifact_in(root, "candidates", framework=framework)
    rows = []
    for index, setting in enumerate(SETTINGS):
        for image_id, hq in train.items():
            write_png(folder / setting / f"{image_id}.png", noisy(hq, rng, 4.0 + 8.0 * index))
            rows.append((image_id, setting, setting, 1, 0.0, 0, "", f"{setting}/{image_id}.png"))
    write_table(
        pd.DataFrame(rows, columns=SCHEMAS["candidates"].names),
        folder / contracts.CANDIDATES_TABLE,
        "candidates",
    )
    labels = {image_id: label_map(size) for image_id in train}
    write_label_maps(
        contracts.artifact_in(root, "masks", framework=framework), labels, {"backend": "synthetic"}
    )
    rows = []
    for image_id, labels_ in labels.items():
        ids, areas = np.unique(labels_, return_counts=True)
        for instance_id, area in zip(ids.tolist(), areas.tolist(), strict=True):
            ys, xs = np.nonzero(labels_ == instance_id)
            box = (int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1)
            rows.append((image_id, instance_id, area, *box, area / size**2, 1.0, instance_id == 0))
    write_table(
        pd.DataFrame(rows, columns=SCHEMAS["instances"].names),
        contracts.artifact_in(root, "instances", framework=framework),
        "instances",
    )
    for index, model in enumerate(models):
        out = evaluation_dir(root, framework, testset, model)
        rows = []
        for image_id, hq in test.items():
            sr = noisy(hq, rng, 20.0 - 5.0 * index)
            write_png(out / "images" / f"{image_id}.png", sr)
            mse = float(np.mean((sr.astype(float) - hq) ** 2))
            psnr = 10 * np.log10(255.0**2 / max(mse, 1e-10))
            rows.append((testset, model, image_id, "psnr", psnr, False))
        write_table(
            pd.DataFrame(rows, columns=SCHEMAS["eval_metrics"].names),
            out / contracts.EVAL_METRICS,
            "eval_metrics",
        )
    return root
