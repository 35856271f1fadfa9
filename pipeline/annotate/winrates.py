"""Human evaluation statistics from the ``votes`` table (DSPO Fig. 3).

Rules (docs/annotation.md):

- A *win rate* of model A against B counts A's wins plus half of the ties, over all answers:
  ``(wins + ties / 2) / (wins + losses + ties)``; "both bad" is a tie (as GenAI-Arena maps
  ``bothbad_vote``). Only first showings of regular pairs count: gold pairs and repeats are
  left out. A pair is oriented with the focus model first (``dspo_*`` by default), else the
  alphabetically first model.
- Its *Wilson* 95% interval is ``statsmodels.stats.proportion.proportion_confint(wins + ties/2,
  n, method="wilson")``; its *bootstrap* 95% interval resamples whole (annotator, round)
  clusters with ``scipy.stats.bootstrap`` (paired, percentile, seeded) and is NaN with fewer
  than two clusters.
- *Bradley–Terry* scores: a logistic regression (``statsmodels`` GLM, binomial, ridge
  ``BT_RIDGE`` so that a model that always wins stays finite) of "left wins" on +1 / −1 model
  indicators, a tie entered as half a win each way; the reference model scores 0 (log-odds
  units); bootstrap intervals resample votes.
- *Agreement*: Fleiss' κ (``statsmodels.stats.inter_rater``) over the regular pairs of a round
  rated by the most annotators, categories first wins / second wins / tie.
- *Consistency*: the share of repeated pairs answered the same way (sides mapped back) as the
  first time; *gold accuracy*: the share of gold pairs where the HQ was chosen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa
from statsmodels.stats.proportion import proportion_confint

from pipeline.annotate.tasks import HQ_MODEL, default_focus
from pipeline.seeding import derive_seed

BT_RIDGE = 1e-3
WINRATE_COLUMNS = [
    "testset",
    "model",
    "opponent",
    "wins",
    "losses",
    "ties",
    "n",
    "win_rate",
    "wilson_low",
    "wilson_high",
    "boot_low",
    "boot_high",
    "clusters",
    "simulated",
]


def winner(votes: pd.DataFrame) -> pd.Series:
    """The preferred model of each vote, "" for a tie or both bad."""
    return pd.Series(
        np.select(
            [votes["answer"] == "left", votes["answer"] == "right"],
            [votes["left"], votes["right"]],
            default="",
        ),
        index=votes.index,
    )


def regular(votes: pd.DataFrame) -> pd.DataFrame:
    return votes[~votes["gold"].astype(bool) & ~votes["repeated"].astype(bool)]


def orient(a: str, b: str, focus: str) -> tuple[str, str]:
    if b == focus or (a != focus and b < a):
        return b, a
    return a, b


def wilson(score: float, n: int) -> tuple[float, float]:
    low, high = proportion_confint(score, n, alpha=0.05, method="wilson")
    return float(low), float(high)


def cluster_bootstrap(
    scores: np.ndarray, counts: np.ndarray, seed: int, resamples: int
) -> tuple[float, float]:
    """Percentile 95% interval of sum(scores)/sum(counts) over resampled clusters."""
    if len(scores) < 2:
        return float("nan"), float("nan")
    result = stats.bootstrap(
        (scores, counts),
        lambda s, c: s.sum() / c.sum(),
        paired=True,
        vectorized=False,
        n_resamples=resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def win_rates(
    votes: pd.DataFrame, focus: str | None = None, seed: int = 0, resamples: int = 1000
) -> pd.DataFrame:
    """Per test set and model pair, the first model's win rate with both intervals."""
    votes = regular(votes).copy()
    votes["winner"] = winner(votes)
    focus = focus if focus is not None else default_focus(sorted(set(votes["left"])))
    votes["pair"] = [
        orient(a, b, focus) for a, b in zip(votes["left"], votes["right"], strict=True)
    ]
    rows = []
    for (testset, (model, opponent)), group in votes.groupby(["testset", "pair"], sort=True):
        wins = int((group["winner"] == model).sum())
        losses = int((group["winner"] == opponent).sum())
        ties = len(group) - wins - losses
        n = len(group)
        score = wins + ties / 2
        points = np.where(group["winner"] == model, 1.0, np.where(group["winner"] == "", 0.5, 0.0))
        clusters = group.assign(points=points).groupby(["annotator", "round"])["points"]
        boot_seed = derive_seed(seed, "winrate", testset, model, opponent)
        boot = cluster_bootstrap(
            clusters.sum().to_numpy(float), clusters.size().to_numpy(float), boot_seed, resamples
        )
        rows.append(
            (
                testset,
                model,
                opponent,
                wins,
                losses,
                ties,
                n,
                score / n,
                *wilson(score, n),
                *boot,
                clusters.ngroups,
                bool(group["simulated"].any()),
            )
        )
    return pd.DataFrame(rows, columns=WINRATE_COLUMNS)


def bt_fit(votes: pd.DataFrame, models: list[str], reference: str) -> np.ndarray:
    """Bradley–Terry log-strengths of ``models`` (``reference`` = 0) from votes."""
    import statsmodels.api as sm

    index = {m: i for i, m in enumerate(m for m in models if m != reference)}
    design, outcome, weight = [], [], []
    for left, right, answer in zip(votes["left"], votes["right"], votes["answer"], strict=True):
        row = np.zeros(len(index))
        if left in index:
            row[index[left]] += 1.0
        if right in index:
            row[index[right]] -= 1.0
        outcomes = {"left": [(1.0, 1.0)], "right": [(0.0, 1.0)]}.get(
            answer, [(1.0, 0.5), (0.0, 0.5)]
        )
        for y, w in outcomes:
            design.append(row)
            outcome.append(y)
            weight.append(w)
    model = sm.GLM(
        np.asarray(outcome),
        np.asarray(design),
        family=sm.families.Binomial(),
        var_weights=np.asarray(weight),
    )
    params = np.asarray(model.fit_regularized(alpha=BT_RIDGE, L1_wt=0.0).params)
    return np.array([0.0 if m == reference else params[index[m]] for m in models])


def bradley_terry(
    votes: pd.DataFrame, reference: str = "pretrained", seed: int = 0, resamples: int = 200
) -> pd.DataFrame:
    """Per test set, every model's BT score with a vote-bootstrap 95% interval."""
    rows = []
    for testset, group in regular(votes).groupby("testset", sort=True):
        models = sorted(set(group["left"]) | set(group["right"]))
        ref = reference if reference in models else models[0]
        scores = bt_fit(group, models, ref)
        rng = np.random.default_rng(derive_seed(seed, "winrate", "bt", testset))
        boot = np.array(
            [
                bt_fit(group.iloc[rng.integers(len(group), size=len(group))], models, ref)
                for _ in range(resamples)
            ]
        )
        low, high = np.percentile(boot, [2.5, 97.5], axis=0)
        simulated = bool(group["simulated"].any())
        for i, model in enumerate(models):
            rows.append((testset, model, ref, scores[i], low[i], high[i], len(group), simulated))
    columns = ["testset", "model", "reference", "score", "boot_low", "boot_high", "n", "simulated"]
    return pd.DataFrame(rows, columns=columns)


def canonical_answer(left: str, right: str, answer: str) -> tuple[tuple[str, str], str]:
    """((first, second) alphabetically, "first" | "second" | "tie") of one vote."""
    first, second = sorted((left, right))
    if answer in ("tie", "both_bad"):
        return (first, second), "tie"
    chosen = left if answer == "left" else right
    return (first, second), "first" if chosen == first else "second"


def agreement(votes: pd.DataFrame) -> pd.DataFrame:
    """Per test set and round, Fleiss' κ over the pairs rated by the most annotators."""
    rows = []
    for (testset, round_number), group in regular(votes).groupby(["testset", "round"]):
        keyed = [
            (image, *canonical_answer(left, right, answer))
            for image, left, right, answer in zip(
                group["image_id"], group["left"], group["right"], group["answer"], strict=True
            )
        ]
        frame = pd.DataFrame(
            {"item": [(i, p) for i, p, _ in keyed], "label": [c for _, _, c in keyed]},
        ).assign(annotator=group["annotator"].to_numpy())
        table = frame.pivot_table(
            index="item", columns="annotator", values="label", aggfunc="first"
        )
        raters = table.notna().sum(axis=1)
        full = table[raters == raters.max()].dropna(axis=1, how="all")
        kappa = float("nan")
        if raters.max() >= 2 and len(full):
            codes = full.apply(lambda c: c.map({"first": 0, "second": 1, "tie": 2}))
            counts, _ = aggregate_raters(codes.to_numpy(int), n_cat=3)
            kappa = float(fleiss_kappa(counts, method="fleiss"))
        rows.append((testset, int(round_number), kappa, len(full), int(raters.max())))
    return pd.DataFrame(rows, columns=["testset", "round", "fleiss_kappa", "items", "raters"])


def consistency(votes: pd.DataFrame) -> pd.DataFrame:
    """Per annotator (and ``*`` for all), repeated pairs and the share answered alike."""
    keys = ["annotator", "round", "testset", "image_id", "pair"]
    frame = votes[~votes["gold"].astype(bool)].copy()
    canon = [
        canonical_answer(a, b, c)
        for a, b, c in zip(frame["left"], frame["right"], frame["answer"], strict=True)
    ]
    frame["pair"] = [p for p, _ in canon]
    frame["label"] = [c for _, c in canon]
    first = frame[~frame["repeated"].astype(bool)].drop_duplicates(keys).set_index(keys)["label"]
    again = frame[frame["repeated"].astype(bool)].set_index(keys)["label"]
    matched = pd.DataFrame({"again": again, "first": first.reindex(again.index)}).dropna()
    matched["same"] = matched["again"] == matched["first"]
    rows = [
        (name, len(group), float(group["same"].mean()))
        for name, group in matched.groupby(level="annotator")
    ]
    rows.append(("*", len(matched), float(matched["same"].mean()) if len(matched) else np.nan))
    return pd.DataFrame(rows, columns=["annotator", "repeats", "consistency"])


def gold_accuracy(votes: pd.DataFrame) -> pd.DataFrame:
    """Per annotator (and ``*``), gold pairs answered and the share where the HQ won."""
    gold = votes[votes["gold"].astype(bool)]
    correct = winner(gold) == HQ_MODEL
    rows = [(name, int(len(c)), float(c.mean())) for name, c in correct.groupby(gold["annotator"])]
    rows.append(("*", int(len(correct)), float(correct.mean()) if len(correct) else np.nan))
    return pd.DataFrame(rows, columns=["annotator", "gold", "accuracy"])


def plot_win_rates(rates: pd.DataFrame, path: Path) -> None:
    """The Fig. 3 layout: per test set, the focus model's win rate against each opponent with
    its Wilson interval, a line at 50%; "SIMULATED" in the title for simulated votes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    testsets = sorted(set(rates["testset"]))
    fig, axes = plt.subplots(1, len(testsets), figsize=(4.5 * len(testsets), 3.6), squeeze=False)
    for ax, testset in zip(axes[0], testsets, strict=True):
        part = rates[rates["testset"] == testset]
        x = np.arange(len(part))
        rate = part["win_rate"].to_numpy() * 100
        errors = np.clip(
            np.vstack([rate - part["wilson_low"] * 100, part["wilson_high"] * 100 - rate]), 0, None
        )
        ax.bar(x, rate, yerr=errors, capsize=4, color="#4c72b0")
        ax.axhline(50, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(x, [f"vs {o}" for o in part["opponent"]], rotation=20, ha="right")
        ax.set_ylim(0, 100)
        ax.set_ylabel(f"{part['model'].iloc[0]} win rate (%)")
        ax.set_title(testset)
    simulated = " (SIMULATED annotators)" if rates["simulated"].any() else ""
    fig.suptitle(f"Human win rates, 95% Wilson intervals{simulated}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(frame: pd.DataFrame) -> str:
    """A pipe table; floats with 3 decimals."""

    def cell(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join(lines)


def markdown(tables: dict[str, pd.DataFrame], simulated: bool) -> str:
    lines = ["# Human evaluation (DSPO Fig. 3)", ""]
    if simulated:
        lines += ["**SIMULATED annotators** (`annotate simulate`): not human judgements.", ""]
    for title, frame in tables.items():
        lines += [f"## {title}", "", markdown_table(frame), ""]
    return "\n".join(lines)
