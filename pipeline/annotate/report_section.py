"""The report's "Human evaluation (Fig. 3)" section, from an ``annotate winrate`` folder.

:func:`append_to_report` copies the Fig. 3 bar plot beside ``report.md`` (as
:data:`PLOT_NAME`, so the link is relative to the report) and appends the section: where the
votes came from, the focus model's win rates with their Wilson and bootstrap 95% intervals,
and the Bradley–Terry scores. Simulated votes (``annotate simulate``) are said to be SIMULATED
in the heading, in a banner naming the simulation's settings, and in the plot's title.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from pipeline import contracts
from pipeline.io.atomic import atomic_path

#: the plot's name beside report.md
PLOT_NAME = contracts.report_file("human_plot")
WINRATE_COLUMNS = [
    "testset",
    "model",
    "opponent",
    "n",
    "win_rate",
    "wilson_low",
    "wilson_high",
    "boot_low",
    "boot_high",
]
BT_COLUMNS = ["testset", "model", "reference", "score", "boot_low", "boot_high", "n"]


def _table(frame: pd.DataFrame) -> str:
    def cell(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join(lines)


def section(winrate_dir: str | Path, plot: str | None = PLOT_NAME) -> str:
    """The section's markdown from ``winrate_dir`` (``winrates.csv``, ``bradley_terry.csv``,
    ``summary.json``); ``plot``: the plot's path relative to the report (None: no image)."""
    folder = Path(winrate_dir)
    rates = pd.read_csv(folder / contracts.HUMAN_WINRATES_CSV)
    scores = pd.read_csv(folder / contracts.HUMAN_BRADLEY_TERRY)
    summary_path = folder / contracts.HUMAN_WINRATE_SUMMARY
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    simulated = bool(summary.get("simulated", False)) or bool(rates["simulated"].any())
    title = "## Human evaluation (Fig. 3)" + (" — SIMULATED" if simulated else "")
    lines = [title, ""]
    if simulated:
        setup = summary.get("simulation") or {}
        detail = ", ".join(f"{key} {setup[key]}" for key in sorted(setup))
        lines += [
            "**SIMULATED annotators, not human judgements**: the votes were made by `annotate "
            "simulate` from the evaluation metric"
            + (f" ({detail})" if detail else "")
            + "; they show the Fig. 3 layout, not what people prefer. Real votes: "
            "`human_eval.votes` in the config (docs/annotation.md).",
            "",
        ]
    else:
        lines += [
            f"Votes of {len(summary.get('annotators', []))} annotators over rounds "
            f"{summary.get('rounds', [])} (`{summary.get('votes', '?')}`).",
            "",
        ]
    lines += [
        "Win rate: wins plus half the ties (both bad counts as a tie) over all answers; "
        "Wilson and (annotator, round) cluster bootstrap 95% intervals; gold pairs and "
        f"repeats left out. All tables in `{folder}`.",
        "",
    ]
    if plot:
        lines += [f"![human win rates{' (SIMULATED)' if simulated else ''}]({plot})", ""]
    lines += [
        "### Win rates" + (" (SIMULATED)" if simulated else ""),
        "",
        _table(rates[WINRATE_COLUMNS]),
        "",
    ]
    lines += [
        "### Bradley–Terry scores" + (" (SIMULATED)" if simulated else ""),
        "",
        _table(scores[BT_COLUMNS]),
        "",
    ]
    return "\n".join(lines)


def append_to_report(report_md: str | Path, winrate_dir: str | Path) -> list[str]:
    """Copy the plot beside ``report_md`` and append the section; returns the files written."""
    report_md = Path(report_md)
    folder = Path(winrate_dir)
    written = []
    plot = None
    if (folder / contracts.HUMAN_WINRATES_PLOT).is_file():
        with atomic_path(report_md.parent / PLOT_NAME) as temporary:
            shutil.copyfile(folder / contracts.HUMAN_WINRATES_PLOT, temporary)
        plot = PLOT_NAME
        written.append(PLOT_NAME)
    text = report_md.read_text(encoding="utf-8")
    with atomic_path(report_md) as temporary:
        temporary.write_text(
            text.rstrip("\n") + "\n\n" + section(folder, plot) + "\n", encoding="utf-8"
        )
    return written
