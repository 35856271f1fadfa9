"""Stage `report`: the paper's result tables and plots from the per-image metrics (DSPO Sec. 5).

Inputs are the evaluation folders ``eval/{framework}/{testset}/{model}`` of one framework: their
``metrics.parquet`` and their image manifest ``images.parquet`` (:mod:`pipeline.contracts`).
The steps, each a function below:

1. :func:`summarise` — per test set, model and metric: the mean over images, a 95% confidence
   interval of the mean, the number of images and the difference to the baseline model
   (``pretrained``). The interval is Student's t interval ``mean ± t(0.975, n-1)·s/√n``
   (``ci_method: t``, the default) or a percentile bootstrap over images with
   ``bootstrap_samples`` resamples drawn from ``numpy_rng(seed, "report", "bootstrap",
   testset, model, metric)`` (``ci_method: bootstrap``); one image gives no interval (NaN);
2. :func:`format_tables` — Tables 1 and 2 of the paper in one layout: per test set, one row per
   method with the metric means (best in bold, second best in italics, as the paper's red and
   blue), and under every method but the baseline a row of its differences to the baseline
   (improvements in bold, as Table 2's red). The ablations of Table 2 sit under their DSPO
   row: ``dspo_m1_<objective>`` (trained without the feedback negatives, M1 only) and
   ``dspo_<objective>_nom2`` (the DSPO model sampled without them: M2 in sampling off, see
   docs/prompts.md). Markdown (``tables.md``) and CSV (``tables.csv``);
3. :func:`radar_values` / :func:`plot_radar` — Figure 4: per test set, each metric min–max
   normalised across the models and sign-flipped where lower is better, so outward is better
   and the best model of every axis sits at 1 (the worst at ``radar_floor``). Figure 4 leaves
   NIQE out and compares the aligned models without the bicubic baseline; both are defaults;
4. :func:`plot_crop_grid` — a visual comparison (Fig. 5): centre crops of a few images, LQ
   (nearest-neighbour enlarged), every model's SR output, HQ;
5. :func:`write_report_markdown` and :func:`provenance_markdown` — ``report.md``, top-down: the
   protocol (seed, baseline, intervals) and the result tables with their plots first, the
   later sections (front, rounds, curves and win rates, study, human evaluation) next, and
   last what every stage recorded in its table metadata (backend, stand-ins, weights), read
   with :func:`pipeline.io.tables.read_metadata` from the ``--provenance`` files.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import alignment_report, contracts, model_names, settings
from pipeline.io.atomic import atomic_path
from pipeline.io.images import read_rgb
from pipeline.io.tables import read_metadata, read_table, write_table
from pipeline.seeding import numpy_rng

CI_METHODS = ("t", "bootstrap")
#: paper order of the metrics in the tables; other metrics follow in order of appearance
PAPER_METRICS = ("psnr", "ssim", "lpips", "dists", "niqe", "musiq", "maniqa", "clipiqa")
PNG_METADATA = {"Software": None}  # no matplotlib version in the PNG: same bytes across versions


def stage_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    config = settings.resolve("report", overrides)
    if config["ci_method"] not in CI_METHODS:
        raise ValueError(f"report config 'ci_method' must be one of {CI_METHODS}")
    if not 0.0 <= float(config["radar_floor"]) < 1.0:
        raise ValueError(f"report config 'radar_floor' must be in [0, 1): {config['radar_floor']}")
    return config


def read_evaluations(
    folders: Iterable[str | Path],
) -> tuple[pd.DataFrame, dict[tuple[str, str], dict], dict[tuple[str, str], pd.DataFrame]]:
    """All per-image metrics of the evaluation folders, each folder's metrics metadata and its
    image manifest, both keyed by (testset, model)."""
    frames, metadata, manifests = [], {}, {}
    for folder in folders:
        path = Path(folder) / contracts.EVAL_METRICS
        frame = read_table(path, "eval_metrics")
        manifest = contracts.evaluation_images(folder)
        for key in set(zip(manifest["testset"], manifest["model"], strict=True)):
            if key in metadata:
                raise ValueError(f"{folder}: test set {key[0]!r}, model {key[1]!r} given twice")
            metadata[key] = {**read_metadata(path), "path": str(path)}
            manifests[key] = manifest
        frames.append(frame)
    if not frames:
        raise ValueError("report: no evaluation folders given")
    return pd.concat(frames, ignore_index=True), metadata, manifests


#: Table 2's ablation rows: what each ablation of a dspo model is (its dspo_m1 model and its
#: sampling without M2, :meth:`pipeline.model_names.ModelSpec.ablations`)
ABLATIONS = {
    model_names.M1_ONLY: "DSPO trained without the feedback negatives (M1 only)",
    model_names.NO_M2: "DSPO sampled without the feedback negatives (no M2 in sampling)",
}


def ablations_of(model: str) -> list[str]:
    """The names of a dspo model's ablations (Table 2), [] for other models."""
    spec = model_names.parse_or_none(model)
    return [ablation.name for ablation in spec.ablations()] if spec else []


def ablation_label(model: str) -> str | None:
    """What an ablation row is (for the legend), None for other models."""
    spec = model_names.parse_or_none(model)
    return ABLATIONS[spec.ablation] if spec and spec.is_ablation else None


def model_order(models: Iterable[str], config: dict[str, Any]) -> list[str]:
    """``model_order`` first, then ``bicubic``, the baseline, the rest as first seen, each DSPO
    model's ablations (:data:`ABLATIONS`) right under it unless ``model_order`` places them."""
    seen = list(dict.fromkeys(models))
    leading = [*config["model_order"], "bicubic", config["baseline_model"]]
    ordered = [m for m in dict.fromkeys(leading) if m in seen]
    placed = set(ordered)
    under = {ablation for model in seen for ablation in ablations_of(model)} - placed
    rest = []
    for model in seen:
        if model in placed or model in under:
            continue
        rest.append(model)
        placed.add(model)
        for ablation in ablations_of(model):
            if ablation in seen and ablation not in placed:
                rest.append(ablation)
                placed.add(ablation)
    return ordered + rest


def metric_order(metrics: Iterable[str]) -> list[str]:
    seen = list(dict.fromkeys(metrics))
    return [m for m in PAPER_METRICS if m in seen] + [m for m in seen if m not in PAPER_METRICS]


# ----------------------------------------------------------------------------- 1. summary


def confidence_interval(
    values: np.ndarray,
    method: str = "t",
    samples: int = 2000,
    rng: np.random.Generator | None = None,
) -> tuple[float, float]:
    """95% interval of the mean of ``values`` (see the module docstring); NaN for one value."""
    values = np.asarray(values, dtype=np.float64)
    count = len(values)
    if count < 2:
        return math.nan, math.nan
    mean = float(values.mean())
    if method == "t":
        from scipy import stats

        half = stats.t.ppf(0.975, count - 1) * values.std(ddof=1) / math.sqrt(count)
        return mean - float(half), mean + float(half)
    if method == "bootstrap":
        if rng is None:
            raise ValueError("the bootstrap interval needs a seeded generator")
        picks = rng.integers(0, count, size=(int(samples), count))
        means = values[picks].mean(axis=1)
        low, high = np.quantile(means, [0.025, 0.975])
        return float(low), float(high)
    raise ValueError(f"unknown confidence interval method {method!r}; expected one of {CI_METHODS}")


def summarise(metrics: pd.DataFrame, config: dict[str, Any], seed: int = 0) -> pd.DataFrame:
    """Step 1: the ``eval_summary`` table (mean, 95% CI, n_images, delta vs the baseline)."""
    baseline = config["baseline_model"]
    for testset, frame in metrics.groupby("testset", sort=False):
        image_sets = {
            model: frozenset(group["image_id"]) for model, group in frame.groupby("model")
        }
        if len(set(image_sets.values())) > 1:
            counts = {model: len(ids) for model, ids in image_sets.items()}
            raise ValueError(
                f"test set {testset!r}: models were evaluated on different images ({counts})"
            )
    rows = []
    for (testset, model, metric), group in metrics.groupby(
        ["testset", "model", "metric"], sort=False
    ):
        values = group["value"].to_numpy(np.float64)
        rng = numpy_rng(seed, "report", "bootstrap", testset, model, metric)
        low, high = confidence_interval(
            values, config["ci_method"], int(config["bootstrap_samples"]), rng
        )
        rows.append(
            {
                "testset": testset,
                "model": model,
                "metric": metric,
                "mean": float(values.mean()),
                "ci95_low": low,
                "ci95_high": high,
                "n_images": len(values),
                "lower_better": bool(group["lower_better"].iloc[0]),
            }
        )
    summary = pd.DataFrame(rows)
    baseline_means = summary[summary["model"] == baseline].set_index(["testset", "metric"])["mean"]
    keys = pd.MultiIndex.from_frame(summary[["testset", "metric"]])
    summary["delta_vs_baseline"] = summary["mean"].to_numpy() - baseline_means.reindex(
        keys
    ).to_numpy(np.float64)
    return summary


# ----------------------------------------------------------------------------- 2. tables


def metric_label(metric: str, lower_better: bool) -> str:
    return f"{metric.upper()}{'↓' if lower_better else '↑'}"


def decimals(values: Iterable[float]) -> int:
    """Paper style: 2 decimals for metrics in the tens (PSNR, MUSIQ), 4 for the others."""
    finite = [abs(v) for v in values if math.isfinite(v)]
    return 2 if finite and max(finite) >= 10 else 4


def table_frame(summary: pd.DataFrame, testset: str, config: dict[str, Any]) -> pd.DataFrame:
    """One test set as the paper lays it out: rows (model, kind) with kind ``mean`` or
    ``delta_vs_baseline`` (every model but the baseline), columns the metrics."""
    part = summary[summary["testset"] == testset]
    metrics = metric_order(part["metric"])
    means = part.pivot(index="model", columns="metric", values="mean")
    deltas = part.pivot(index="model", columns="metric", values="delta_vs_baseline")
    has_baseline = config["baseline_model"] in means.index
    rows = []
    for model in model_order(part["model"], config):
        rows.append({"model": model, "kind": "mean", **means.loc[model, metrics].to_dict()})
        if has_baseline and model != config["baseline_model"]:
            rows.append(
                {
                    "model": model,
                    "kind": "delta_vs_baseline",
                    **deltas.loc[model, metrics].to_dict(),
                }
            )
    return pd.DataFrame(rows, columns=["model", "kind", *metrics])


def format_tables(summary: pd.DataFrame, config: dict[str, Any]) -> tuple[str, pd.DataFrame]:
    """Step 2: the Markdown text of every test set's table, and all tables as one CSV frame."""
    lower_better = summary.groupby("metric")["lower_better"].first().to_dict()
    blocks, frames = [], []
    baseline = config["baseline_model"]
    for testset in dict.fromkeys(summary["testset"]):
        frame = table_frame(summary, testset, config)
        frames.append(frame.assign(testset=testset))
        metrics = list(frame.columns[2:])
        n_images = int(summary.loc[summary["testset"] == testset, "n_images"].max())
        means = frame[frame["kind"] == "mean"]
        header = ["Method", *[metric_label(m, lower_better[m]) for m in metrics]]
        lines = [
            f"## {testset} ({n_images} images)",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        places = {m: decimals(means[m]) for m in metrics}
        ranks = {}
        for metric in metrics:
            signed = means[metric] * (-1 if lower_better[metric] else 1)
            distinct = sorted({v for v in signed if math.isfinite(v)}, reverse=True)
            ranks[metric] = {v: i for i, v in enumerate(distinct[:2])}
        for _, row in frame.iterrows():
            cells = []
            for metric in metrics:
                value = row[metric]
                if not math.isfinite(value):
                    cells.append("–")
                    continue
                if row["kind"] == "mean":
                    text = f"{value:.{places[metric]}f}"
                    rank = ranks[metric].get(value * (-1 if lower_better[metric] else 1))
                    text = {0: f"**{text}**", 1: f"*{text}*"}.get(rank, text)
                else:
                    text = f"{value:+.{places[metric]}f}"
                    improved = value < 0 if lower_better[metric] else value > 0
                    text = f"**{text}**" if improved else text
                cells.append(text)
            label = row["model"] if row["kind"] == "mean" else f"Δ {row['model']} vs {baseline}"
            lines.append("| " + " | ".join([label, *cells]) + " |")
        blocks.append("\n".join(lines))
    legend = (
        f"Means over the test images. Bold / italics: best / second best per metric "
        f"(the paper's red / blue). Δ rows: difference to `{baseline}`, improvements in bold "
        f"(Table 2's red). ↑ higher is better, ↓ lower is better."
    )
    shown = [m for m in dict.fromkeys(summary["model"]) if ablation_label(m)]
    if shown:
        legend += (
            " Ablations (Table 2): " + "; ".join(f"`{m}`: {ablation_label(m)}" for m in shown) + "."
        )
    text = "# Results\n\n" + legend + "\n\n" + "\n\n".join(blocks) + "\n"
    table = pd.concat(frames, ignore_index=True)
    return text, table[["testset", *[c for c in table.columns if c != "testset"]]]


# ----------------------------------------------------------------------------- 3. radar plots


def radar_values(summary: pd.DataFrame, testset: str, config: dict[str, Any]) -> pd.DataFrame:
    """Figure 4's normalisation: models × metrics, min–max over models after flipping the sign
    of lower-is-better metrics, mapped to ``[radar_floor, 1]`` (all-equal axes sit at 1)."""
    part = summary[
        (summary["testset"] == testset) & ~summary["model"].isin(config["radar_exclude_models"])
    ]
    wanted = config["radar_metrics"]
    metrics = [m for m in metric_order(part["metric"]) if m != "niqe"] if wanted is None else wanted
    missing = [m for m in metrics if m not in set(part["metric"])]
    if missing:
        raise KeyError(f"radar metrics {missing} were not evaluated on {testset!r}")
    means = part.pivot(index="model", columns="metric", values="mean")
    means = means.loc[model_order(part["model"], config), metrics]
    flip = part.groupby("metric")["lower_better"].first()
    signed = means * np.where(flip[metrics].to_numpy(), -1.0, 1.0)
    span = signed.max() - signed.min()
    normalised = (signed - signed.min()) / span.where(span > 0, 1.0)
    normalised.loc[:, span <= 0] = 1.0
    floor = float(config["radar_floor"])
    return floor + (1.0 - floor) * normalised


def plot_radar(values: pd.DataFrame, path: str | Path, title: str) -> None:
    """One radar chart: a closed polygon per model (rows) over the metric axes (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lower_better = values.attrs.get("lower_better", {})
    labels = [metric_label(m, lower_better.get(m, False)) for m in values.columns]
    angles = np.linspace(0, 2 * np.pi, len(labels), endpoint=False).tolist()
    figure, axes = plt.subplots(figsize=(6, 6), subplot_kw={"projection": "polar"})
    colours = plt.get_cmap("tab10")
    for index, (model, row) in enumerate(values.iterrows()):
        radii = row.to_list()
        axes.plot(angles + angles[:1], radii + radii[:1], color=colours(index % 10), label=model)
        axes.fill(angles + angles[:1], radii + radii[:1], color=colours(index % 10), alpha=0.08)
    axes.set_xticks(angles)
    axes.set_xticklabels(labels)
    axes.set_ylim(0, 1.05)
    axes.set_yticklabels([])
    axes.set_title(f"{title}\n(normalised across models, outward = better)", pad=18)
    axes.legend(loc="upper right", bbox_to_anchor=(1.3, 1.1), fontsize="small")
    _save_figure(figure, path)


def _save_figure(figure, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100, bbox_inches="tight", metadata=PNG_METADATA)
    plt.close(figure)


# ----------------------------------------------------------------------------- 4. crop grid


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    height, width = image.shape[:2]
    top, left = max(0, (height - size) // 2), max(0, (width - size) // 2)
    return image[top : top + size, left : left + size]


def enlarge_nearest(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """LQ pixels shown as blocks at the HQ size (height, width)."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.NEAREST))


def grid_panels(
    testset: str,
    models: Sequence[str],
    manifests: dict[tuple[str, str], pd.DataFrame],
    config: dict[str, Any],
) -> list[tuple[str, list[np.ndarray]]]:
    """Per grid image: its id and the crops ``[LQ, model..., HQ]`` of the first ``grid_images``
    image ids every model has, the files as each evaluation's manifest (``images.parquet``,
    :func:`pipeline.contracts.evaluation_images`) names them."""
    rows = {model: manifests[(testset, model)].set_index("image_id") for model in models}
    ids = sorted(set.intersection(*(set(frame.index) for frame in rows.values())))
    ids = ids[: int(config["grid_images"])]
    if not ids:
        raise FileNotFoundError(f"no SR images of test set {testset!r} found for the crop grid")
    first = rows[models[0]]
    panels = []
    for image_id in ids:
        hq = read_rgb(first.loc[image_id, "hq_path"])
        lq = enlarge_nearest(read_rgb(first.loc[image_id, "lq_path"]), hq.shape[:2])
        outputs = [read_rgb(rows[model].loc[image_id, "sr_path"]) for model in models]
        crops = [centre_crop(image, int(config["grid_crop"])) for image in [lq, *outputs, hq]]
        panels.append((image_id, crops))
    return panels


def plot_crop_grid(
    panels: Sequence[tuple[str, Sequence[np.ndarray]]],
    column_titles: Sequence[str],
    path: str | Path,
    title: str,
) -> None:
    """Rows = images, columns = LQ, each model, HQ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, columns = len(panels), len(column_titles)
    figure, axes = plt.subplots(
        rows, columns, figsize=(1.8 * columns, 1.9 * rows + 0.4), squeeze=False
    )
    for row, (image_id, crops) in enumerate(panels):
        for column, crop in enumerate(crops):
            axis = axes[row][column]
            axis.imshow(crop, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(column_titles[column], fontsize="small")
            if column == 0:
                axis.set_ylabel(image_id, fontsize="x-small")
    figure.suptitle(title)
    _save_figure(figure, path)


# ----------------------------------------------------------------------------- 5. report.md

#: metadata keys worth a line of their own in report.md (matched as substrings, recursively)
PROVENANCE_KEYS = ("backend", "stand_in", "weights", "describe", "device", "segmenter", "source")


def provenance_highlights(document: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """The (dotted key, value) pairs of ``document`` whose key names one of PROVENANCE_KEYS."""
    found = []
    if isinstance(document, dict):
        for key, value in document.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if any(word in str(key).lower() for word in PROVENANCE_KEYS):
                found.append((dotted, value))
            elif isinstance(value, dict):
                found.extend(provenance_highlights(value, dotted))
    return found


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _cell(value: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_report_markdown(
    path: str | Path,
    framework: str,
    config: dict[str, Any],
    artifacts: Sequence[str],
    seed: int,
    tables: str,
    testsets: Sequence[str],
) -> None:
    """Step 5, the head of ``report.md``: how the numbers were made (seed, baseline, intervals),
    the result tables and each test set's plots. The later sections follow; what every stage
    used (:func:`provenance_markdown`) closes the report."""
    interval = (
        f"{config['bootstrap_samples']} bootstrap resamples over the images"
        if config["ci_method"] == "bootstrap"
        else "Student's t over the images, 95%"
    )
    lines = [
        f"# DSPO evaluation report: {framework}",
        "",
        f"- global seed: {seed}",
        f"- baseline for the deltas: `{config['baseline_model']}`",
        f"- confidence intervals: {config['ci_method']} ({interval})",
        f"- artifacts: {', '.join(f'`{a}`' for a in artifacts)}",
        "- what every stage used (weights, backends, stand-ins): the last section",
        "",
        "## Results",
        "",
        *_nested(tables),
        "",
    ]
    for testset in testsets:
        radar, grid = (contracts.report_file(k, testset=testset) for k in ("radar", "grid"))
        lines += [f"![{testset}: metrics, outward is better]({radar})", ""]
        lines += [f"![{testset}: crops of every model]({grid})", ""]
    with atomic_path(path) as temporary:
        temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _nested(markdown: str) -> list[str]:
    """``tables.md`` inside the report's Results section: its title dropped, its headings one
    level deeper."""
    lines = markdown.rstrip("\n").splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    while lines and not lines[0].strip():
        lines = lines[1:]
    return [f"#{line}" if line.startswith("#") else line for line in lines]


def provenance_markdown(
    metadata: dict[tuple[str, str], dict], provenance: Sequence[str | Path]
) -> str:
    """The report's last section: the evaluated models (weights, metrics, stand-ins), the
    evaluation settings and what every upstream stage recorded in its table metadata (backend,
    stand-ins, weights; all of it folded), read with :func:`pipeline.io.tables.read_metadata`
    from the ``--provenance`` files."""
    lines = [
        "## Provenance",
        "",
        "### Evaluations",
        "",
        "| test set | model | images | model weights | metrics | stand-ins |",
        "|---|---|---|---|---|---|",
    ]
    for (testset, model), recorded in metadata.items():
        weights = recorded.get("model_describe", {}).get("weights", "")
        # the config keeps the metrics in the order they were asked for (metadata is key-sorted)
        metrics = ", ".join(
            recorded.get("config", {}).get("metrics") or recorded.get("metrics", {})
        )
        stand_ins = _json(recorded.get("stand_ins", {})) if recorded.get("stand_ins") else "none"
        cells = [testset, model, recorded.get("n_images", ""), weights, metrics, stand_ins]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "### Evaluation settings", ""]
    settings = {_json(m.get("config", {})) for m in metadata.values()}
    for text in sorted(settings):
        lines += ["```json", json.dumps(json.loads(text), indent=2, sort_keys=True), "```"]
    lines += ["", "### Upstream stages", ""]
    if not provenance:
        lines.append("No provenance files were given.")
    for file in provenance:
        document = read_metadata(file)
        lines += [f"#### `{file}` (table `{document.get('table', '?')}`)", ""]
        highlights = provenance_highlights(document)
        lines += [f"- **{key}**: `{_json(value)}`" for key, value in highlights] or [
            "- no backend, stand-in or weights entries recorded"
        ]
        lines += [
            "",
            "<details><summary>all recorded metadata</summary>",
            "",
            "```json",
            json.dumps(document, indent=2, sort_keys=True, default=str),
            "```",
            "",
            "</details>",
            "",
        ]
    return "\n".join(lines)


def append_markdown(report_md: str | Path, text: str) -> None:
    """Append a section to ``report_md`` (atomically)."""
    before = Path(report_md).read_text(encoding="utf-8")
    with atomic_path(report_md) as temporary:
        temporary.write_text(
            before.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n", encoding="utf-8"
        )


# ----------------------------------------------------------------------------- EA-Adam front


def member_index(model: str) -> int | None:
    """The population index of an ea_adam member's model, None for other models."""
    spec = model_names.parse_or_none(model)
    return spec.member if spec is not None and spec.kind == model_names.MEMBER else None


def front_points(summary: pd.DataFrame, testset: str, config: dict[str, Any]) -> pd.DataFrame:
    """(perception, fidelity) score per plotted model of one test set: the ea_adam members and
    fused model, the single-objective DSPO models and the pretrained model. Each metric of
    ``front_objectives`` is min-max normalised over these models, flipped where lower is better,
    and weighted; ``non_dominated`` marks the members on the front (among members). Empty
    without members."""
    part = summary[summary["testset"] == testset]
    specs = {m: model_names.parse_or_none(m) for m in set(part["model"])}
    members = sorted((m for m in specs if member_index(m) is not None), key=member_index)
    objectives = config.get("front_objectives") or {}
    if not members or any(o not in objectives for o in contracts.MULTI_OBJECTIVES):
        return pd.DataFrame()
    singles = sorted(
        m
        for m, spec in specs.items()
        if spec is not None
        and spec.kind == model_names.ALIGNED
        and spec.method == model_names.DSPO
        and not spec.is_ablation
    )
    fused, pretrained = model_names.ModelSpec.ea_adam_front().name, model_names.PRETRAINED
    models = [m for m in (*members, fused, *singles, pretrained) if m in specs]
    means = part.pivot_table(index="model", columns="metric", values="mean").reindex(models)
    flip = part.groupby("metric")["lower_better"].first()
    frame = pd.DataFrame(index=pd.Index(models, name="model"))
    for objective in contracts.MULTI_OBJECTIVES:
        total = pd.Series(0.0, index=models)
        for metric, weight in objectives[objective].items():
            if metric not in means:
                continue
            values = means[metric] * (-1.0 if flip[metric] else 1.0)
            spread = values.max() - values.min()
            total += float(weight) * ((values - values.min()) / spread if spread > 0 else 0.0)
        frame[objective] = total
    import torch

    from pipeline.population import pareto_mask

    points = torch.tensor(frame.loc[members, list(contracts.MULTI_OBJECTIVES)].to_numpy())
    mask = pareto_mask(points, (True, True)).tolist()
    frame["non_dominated"] = [mask[members.index(m)] if m in members else None for m in models]
    return frame.reset_index()


def write_front(summary: pd.DataFrame, out_dir: Path, framework: str, config: dict[str, Any]):
    """The EA-Adam front of every test set: ``front_{testset}.png`` (fidelity vs perception;
    members, the non-dominated ones ringed, the fused model, single-objective DSPO models and
    the pretrained model as points) and ``front.md`` (a row per plotted model). Returns the
    files written and the markdown (empty without ea_adam members)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files, lines = [], []
    for testset in dict.fromkeys(summary["testset"]):
        frame = front_points(summary, testset, config)
        if frame.empty:
            continue
        figure, axes = plt.subplots(figsize=(5, 4))
        member = frame["model"].map(lambda m: member_index(m) is not None).astype(bool)
        front = frame[member & frame["non_dominated"].eq(True)]
        axes.plot(
            frame.loc[member, "perception"],
            frame.loc[member, "fidelity"],
            "o-",
            color="tab:blue",
            label="EA-Adam members",
        )
        axes.scatter(
            front["perception"],
            front["fidelity"],
            s=160,
            facecolors="none",
            edgecolors="tab:red",
            label="non-dominated",
        )
        for _, row in frame[~member].iterrows():
            axes.scatter(row["perception"], row["fidelity"], marker="s", label=row["model"])
        for _, row in frame.iterrows():
            index = member_index(row["model"])
            label = row["model"] if index is None else f"m{index}"
            axes.annotate(label, (row["perception"], row["fidelity"]), fontsize="x-small")
        axes.set_xlabel("perception score (normalised, higher = better)")
        axes.set_ylabel("fidelity score (normalised, higher = better)")
        axes.set_title(f"{framework}: {testset}, EA-Adam front")
        axes.legend(fontsize="x-small")
        plot = contracts.report_file("front", testset=testset)
        _save_figure(figure, out_dir / plot)
        files.append(plot)
        lines += [
            f"### {testset}",
            "",
            f"![front]({plot})",
            "",
            "| model | perception | fidelity | non-dominated |",
            "|---|---|---|---|",
        ]
        for _, row in frame.iterrows():
            mark = "" if row["non_dominated"] is None else ("yes" if row["non_dominated"] else "no")
            lines.append(
                f"| {row['model']} | {row['perception']:.4f} | {row['fidelity']:.4f} | {mark} |"
            )
        lines.append("")
    if not lines:
        return [], ""
    text = "\n".join(
        [
            "## EA-Adam front",
            "",
            "Scores: each metric of `front_objectives` min-max "
            "normalised over the plotted models, flipped where lower is better, "
            "weighted.",
            "",
            *lines,
        ]
    )
    with atomic_path(out_dir / contracts.report_file("front_md")) as temporary:
        temporary.write_text(text + "\n", encoding="utf-8")
    return [*files, contracts.report_file("front_md")], text


# ----------------------------------------------------------------------------- rounds

ROUNDS_COLUMNS = ["testset", "method", "objective", "round", "model"]


def rounds_frame(summary: pd.DataFrame) -> pd.DataFrame:
    """The metrics per alignment round (docs/design.md §14): for every run with a later round's
    model (:class:`pipeline.model_names.ModelSpec` of round r >= 2), one row per round, round 1
    being the run's own model; columns :data:`ROUNDS_COLUMNS`, then each metric's mean. Empty
    without later rounds."""
    later: dict[model_names.ModelSpec, list[tuple[int, str]]] = {}
    for model in dict.fromkeys(summary["model"]):
        spec = model_names.parse_or_none(model)
        if spec is not None and spec.round > 1:
            later.setdefault(spec.base, []).append((spec.round, model))
    rows = []
    for testset in dict.fromkeys(summary["testset"]):
        part = summary[summary["testset"] == testset]
        means = part.pivot(index="model", columns="metric", values="mean")
        metrics = metric_order(part["metric"])
        for base, numbered in later.items():
            method, objective = base.method, base.objective
            for number, model in [(1, base.name), *sorted(numbered)]:
                if model in means.index:
                    rows.append(
                        {
                            "testset": testset,
                            "method": method,
                            "objective": objective,
                            "round": number,
                            "model": model,
                            **means.loc[model, metrics].to_dict(),
                        }
                    )
    if not rows:
        return pd.DataFrame(columns=ROUNDS_COLUMNS)
    frame = pd.DataFrame(rows)
    metrics = [c for c in frame.columns if c not in ROUNDS_COLUMNS]
    return frame[ROUNDS_COLUMNS + metric_order(metrics)]


def write_rounds(summary: pd.DataFrame, out_dir: Path) -> tuple[list[str], str]:
    """``rounds.csv`` and ``rounds.md`` (the "Rounds" section of report.md: per test set, a row
    per method, objective and round with every metric's mean); nothing without later rounds."""
    frame = rounds_frame(summary)
    if frame.empty:
        return [], ""
    lower_better = summary.groupby("metric")["lower_better"].first().to_dict()
    metrics = [c for c in frame.columns if c not in ROUNDS_COLUMNS]
    lines = [
        "## Rounds",
        "",
        "Iterative alignment (docs/design.md §14): round r + 1 of a run "
        "samples its candidates from round r's model, re-scores and re-selects them on the "
        "same masks and trains from round r's weights, round r's model being its reference. "
        "Round 1 is the run's model, round r its `_r{r}` model; means over the test images.",
        "",
    ]
    for testset, part in frame.groupby("testset", sort=False):
        header = [
            "method",
            "objective",
            "round",
            *(metric_label(m, lower_better[m]) for m in metrics),
        ]
        lines += [
            f"### {testset}",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        places = {m: decimals(part[m]) for m in metrics}
        for _, row in part.iterrows():
            cells = [f"{row[m]:.{places[m]}f}" if math.isfinite(row[m]) else "–" for m in metrics]
            lines.append(
                "| "
                + " | ".join([row["method"], row["objective"], str(row["round"]), *cells])
                + " |"
            )
        lines.append("")
    text = "\n".join(lines)
    csv, markdown = contracts.report_file("rounds_csv"), contracts.report_file("rounds_md")
    with atomic_path(out_dir / csv) as temporary:
        frame.to_csv(temporary, index=False, float_format="%.6g")
    with atomic_path(out_dir / markdown) as temporary:
        temporary.write_text(text + "\n", encoding="utf-8")
    return [csv, markdown], text


# ----------------------------------------------------------------------------- the stage


def report(
    evaluations: Sequence[str | Path],
    out_dir: str | Path,
    config: dict[str, Any] | None = None,
    seed: int = 0,
    provenance: Sequence[str | Path] = (),
    framework: str | None = None,
    curves: Sequence[str | Path] = (),
    win_rates: Sequence[str | Path] = (),
    study: tuple[str | Path, str | Path] | None = None,
    human_eval: str | Path | None = None,
) -> pd.DataFrame:
    """Write summary.parquet, tables.md/.csv, radar/grid PNGs and report.md into ``out_dir``.
    report.md reads top-down: the protocol and the result tables with their plots first, then
    the EA-Adam front, the rounds, the alignment curves and win rates (``curves`` /
    ``win_rates``, :mod:`pipeline.alignment_report`), the Figure 1 study (``study``: its section
    and plot) and the human evaluation (``human_eval``: an ``annotate winrate`` folder), and
    last what every stage used (:func:`provenance_markdown`)."""
    config = stage_config(config)
    out_dir = Path(out_dir)
    framework = framework or out_dir.name
    metrics, metadata, manifests = read_evaluations(evaluations)
    summary = summarise(metrics, config, seed)
    summary_metadata = {
        "framework": framework,
        "config": config,
        "seed": seed,
        "inputs": [str(p) for p in evaluations],
    }
    write_table(
        summary, out_dir / contracts.report_file("summary"), "eval_summary", summary_metadata
    )
    markdown, table = format_tables(summary, config)
    with atomic_path(out_dir / contracts.report_file("tables_md")) as temporary:
        temporary.write_text(markdown, encoding="utf-8")
    with atomic_path(out_dir / contracts.report_file("tables_csv")) as temporary:
        table.to_csv(temporary, index=False, float_format="%.6g")
    artifacts = [
        contracts.report_file("summary"),
        contracts.report_file("tables_md"),
        contracts.report_file("tables_csv"),
    ]
    lower_better = summary.groupby("metric")["lower_better"].first().to_dict()
    for testset in dict.fromkeys(summary["testset"]):
        values = radar_values(summary, testset, config)
        values.attrs["lower_better"] = lower_better
        radar, grid = (contracts.report_file(k, testset=testset) for k in ("radar", "grid"))
        plot_radar(values, out_dir / radar, f"{framework}: {testset}")
        models = model_order(metrics.loc[metrics["testset"] == testset, "model"], config)
        panels = grid_panels(testset, models, manifests, config)
        plot_crop_grid(panels, ["LQ", *models, "HQ"], out_dir / grid, f"{framework}: {testset}")
        artifacts += [radar, grid]
    front_files, front_text = write_front(summary, out_dir, framework, config)
    artifacts += front_files
    rounds_files, rounds_text = write_rounds(summary, out_dir)
    artifacts += rounds_files
    report_md = out_dir / contracts.report_file("report")
    testsets = list(dict.fromkeys(summary["testset"]))
    write_report_markdown(report_md, framework, config, artifacts, seed, markdown, testsets)
    for text in (front_text, rounds_text):  # the EA-Adam front, then the metrics per round
        if text:
            append_markdown(report_md, text)
    alignment_report.append_to_report(report_md, curves, win_rates, framework)
    if study is not None:  # the controlled study, before the human evaluation
        append_study_section(report_md, *study)
    if human_eval is not None:  # the human evaluation (maybe SIMULATED)
        from pipeline.annotate.report_section import append_to_report

        append_to_report(report_md, human_eval)
    append_markdown(report_md, provenance_markdown(metadata, provenance))  # closes the report
    return summary


#: the study's plot, copied beside report.md
STUDY_PLOT = contracts.report_file("study_plot")


def append_study_section(report_md: str | Path, section: str | Path, plot: str | Path) -> str:
    """Append the Figure 1 study's section (``section``: markdown the study's report rule wrote,
    design before numbers) to ``report_md`` and copy its ``plot`` beside it; returns the plot's
    file name."""
    import shutil

    out_dir = Path(report_md).parent
    with atomic_path(out_dir / STUDY_PLOT) as temporary:
        shutil.copyfile(plot, temporary)
    text = Path(report_md).read_text(encoding="utf-8")
    body = Path(section).read_text(encoding="utf-8").rstrip("\n")
    figure = f"![Figure 1 study: adoption per arm, method and region]({STUDY_PLOT})"
    with atomic_path(report_md) as temporary:
        temporary.write_text(f"{text.rstrip()}\n\n{body}\n\n{figure}\n", encoding="utf-8")
    return STUDY_PLOT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline report", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--evaluations",
        nargs="+",
        required=True,
        type=Path,
        help="eval/{framework}/{testset}/{model} folders (evaluate's outputs)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder eval/{framework}")
    parser.add_argument(
        "--provenance",
        nargs="*",
        default=[],
        type=Path,
        help="upstream Parquet tables whose metadata report.md lists",
    )
    parser.add_argument("--framework", default=None, help="name in titles (default: --out name)")
    parser.add_argument(
        "--curves",
        nargs="*",
        default=[],
        type=Path,
        help="aligned models' train_curves.parquet (alignment curves)",
    )
    parser.add_argument(
        "--win-rates",
        nargs="*",
        default=[],
        type=Path,
        help="winrates/{framework}/{testset}.parquet tables",
    )
    parser.add_argument("--config", default="{}", help="the `report` config section as JSON")
    parser.add_argument("--seed", type=int, required=True, help="global seed (bootstrap)")
    parser.add_argument(
        "--human-eval",
        type=Path,
        default=None,
        help="an `annotate winrate` folder: report.md's Fig. 3 section",
    )
    parser.add_argument(
        "--study-section",
        type=Path,
        default=None,
        help="the Figure 1 study's section (results/study/section.md)",
    )
    parser.add_argument("--study-plot", type=Path, default=None, help="the study's plot")
    args = parser.parse_args(argv)
    if args.study_section is not None and args.study_plot is None:
        parser.error("--study-section needs --study-plot")
    summary = report(
        args.evaluations,
        args.out,
        settings.cli_config(args.config),
        args.seed,
        args.provenance,
        args.framework,
        args.curves,
        args.win_rates,
        study=(args.study_section, args.study_plot) if args.study_section else None,
        human_eval=args.human_eval,
    )
    print(f"report: {len(summary)} summary rows in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
