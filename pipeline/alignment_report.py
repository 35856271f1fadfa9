"""The report's view of what preference training did: alignment curves (a figure per framework,
a panel row per method) and per-instance win rates against the pretrained model (table + plot).
Read by the report stage from the train stage's ``train_curves`` tables and the winrates stage's
``win_rates`` tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline import contracts
from pipeline.io.atomic import atomic_path
from pipeline.io.tables import read_metadata, read_table

CURVE_PANELS = (
    ("implicit_accuracy", "implicit accuracy"),
    ("margin", "margin −d (error units)"),
    ("loss", "loss"),
)
PNG_METADATA = {"Software": None}


def read_curves(paths: Sequence[str | Path]) -> pd.DataFrame:
    frames = []
    for path in paths:
        frame = read_table(path, "train_curves")
        meta = read_metadata(path)
        frame["model"] = f"{meta.get('method', '?')}_{meta.get('objective', '?')}"
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _save(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100, bbox_inches="tight", metadata=PNG_METADATA)
    plt.close(figure)


def plot_curves(curves: pd.DataFrame, path: str | Path, title: str) -> None:
    """Rows: methods; columns: accuracy, margin, loss; train solid, held-out dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(curves["model"]))
    figure, axes = plt.subplots(
        len(models),
        len(CURVE_PANELS),
        squeeze=False,
        figsize=(4 * len(CURVE_PANELS), 2.6 * len(models)),
    )
    for row, model in enumerate(models):
        frame = curves[curves["model"] == model]
        for col, (key, label) in enumerate(CURVE_PANELS):
            ax = axes[row][col]
            for split, style in (("train", "-o"), ("heldout", "--s")):
                part = frame[frame["split"] == split]
                if len(part):
                    ax.plot(
                        part["step"],
                        part[key],
                        style,
                        markersize=3,
                        label=f"{split} ({int(part['items'].iloc[0])} LQs)",
                    )
            if frame[key].isna().all():  # sft: no loser and no reference, no margin
                ax.text(
                    0.5,
                    0.5,
                    "undefined (no loser / reference)",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                    fontsize="small",
                )
            ax.set_title(f"{model}: {label}", fontsize="small")
            ax.set_xlabel("optimizer step")
            if key == "margin":
                ax.axhline(0.0, color="grey", linewidth=0.5)
            if ax.get_legend_handles_labels()[0] and not frame[key].isna().all():
                ax.legend(fontsize="x-small")
    figure.suptitle(title)
    figure.tight_layout()
    _save(figure, Path(path))


def read_win_rates(paths: Sequence[str | Path]) -> pd.DataFrame:
    frames = [read_table(path, "win_rates") for path in paths]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def plot_win_rates(rates: pd.DataFrame, path: str | Path, title: str) -> None:
    """A point per (test set, model) with its 95% interval clustered by image (Wilson's on the
    effective number of instances, :func:`pipeline.winrates.clustered_interval`); 0.5 = no change."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.model} ({r.testset})" for r in rates.itertuples()]
    figure, ax = plt.subplots(figsize=(6, 0.5 * len(labels) + 1.2))
    y = list(range(len(labels)))
    ax.errorbar(
        rates["win_rate"],
        y,
        xerr=[rates["win_rate"] - rates["cluster_low"], rates["cluster_high"] - rates["win_rate"]],
        fmt="o",
        capsize=3,
    )
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_yticks(y, labels)
    ax.set_xlim(0, 1)
    ax.set_xlabel("per-instance win rate vs pretrained (ties ½), 95% clustered by image")
    ax.set_title(title)
    _save(figure, Path(path))


def sections(
    curves: pd.DataFrame, rates: pd.DataFrame, curves_png: str | None, rates_png: str | None
) -> list[str]:
    """The report.md lines of the alignment curves and the win rates."""
    lines = ["", "## What preference training did", ""]
    if curves_png:
        heldout = curves[curves["split"] == "heldout"]
        lines += [
            "### Alignment curves",
            "",
            "Implicit accuracy (share of instance weight whose margin favours the winner), "
            "mean margin −d = (E_ref(w) − E_θ(w)) − (E_ref(l) − E_θ(l)) and loss, on a fixed "
            "set of training LQs and on the LQs of whole photos held out of training "
            "(`train.heldout_fraction` of the photos), "
            "without gradients every `train.eval_every` steps (pipeline/training/curves.py). "
            "Rising held-out accuracy and margin: the model learns the preferences; training "
            "rising while held-out falls: it memorises them.",
            "",
            f"![alignment curves]({curves_png})",
            "",
            "| model | split | step | items | accuracy | margin | loss |",
            "|---|---|---|---|---|---|---|",
        ]
        last = curves.sort_values("step").groupby(["model", "split"], sort=False).tail(1)
        for r in last.itertuples():
            lines.append(
                f"| {r.model} | {r.split} | {r.step} | {r.items} | "
                f"{r.implicit_accuracy:.3f} | {r.margin:.3g} | {r.loss:.4g} |"
            )
        if heldout.empty:
            lines += ["", "No LQ was held out (train.heldout_fraction 0 or too few LQs)."]
        lines.append("")
    if rates_png:
        lines += [
            "### Per-instance win rates against the pretrained model",
            "",
            "Test HQ images segmented like the training images; per instance, the aligned "
            "and the pretrained outputs scored under the model's objective as select scores "
            "candidates (min–max over the two, flipped, weighted sum); ties count as half a "
            "win. Two 95% intervals: Wilson's on the instances (statsmodels), which treats "
            "them as independent and is optimistic because instances of one image share its "
            "content and outputs; and Wilson's on the effective number of instances "
            "(instances / design effect, the images as clusters: the cluster-robust variance "
            "of the win rate over the binomial one, at least 1; pipeline/winrates.py). The "
            "plot shows the clustered interval.",
            "",
            f"![win rates]({rates_png})",
            "",
            "| test set | model | objective | images | instances | wins | ties | losses "
            "| win rate | Wilson 95% (instances) | effective n | 95% clustered by image |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rates.itertuples():
            lines.append(
                f"| {r.testset} | {r.model} | {r.objective} | {r.images} | {r.instances} "
                f"| {r.wins} | {r.ties} | {r.losses} | {r.win_rate:.3f} "
                f"| [{r.ci_low:.3f}, {r.ci_high:.3f}] | {r.effective_n:.1f} "
                f"| [{r.cluster_low:.3f}, {r.cluster_high:.3f}] |"
            )
        lines.append("")
    return lines


def append_to_report(
    report_md: str | Path,
    curve_paths: Sequence[str | Path],
    rate_paths: Sequence[str | Path],
    framework: str,
) -> list[str]:
    """Plot, write the tables beside report.md and append the section; returns the new files."""
    out_dir = Path(report_md).parent
    curves, rates = read_curves(curve_paths), read_win_rates(rate_paths)
    written = []
    curves_png = rates_png = None
    if not curves.empty:
        curves_png = contracts.report_file("curves", framework=framework)
        plot_curves(curves, out_dir / curves_png, f"{framework}: alignment curves")
        written.append(curves_png)
    if not rates.empty:
        rates_png = contracts.report_file("win_rates", framework=framework)
        plot_win_rates(rates, out_dir / rates_png, f"{framework}: per-instance win rates")
        rates_csv = contracts.report_file("win_rates_csv")
        with atomic_path(out_dir / rates_csv) as temporary:
            rates.to_csv(temporary, index=False, float_format="%.6g")
        written += [rates_png, rates_csv]
    if written:
        text = Path(report_md).read_text(encoding="utf-8")
        with atomic_path(report_md) as temporary:
            body = "\n".join(sections(curves, rates, curves_png, rates_png))
            temporary.write_text(text + body + "\n", encoding="utf-8")
    return written
