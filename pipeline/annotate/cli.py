"""``python -m pipeline annotate {serve,add-annotator,export,winrate,simulate}`` (docs/annotation.md)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import contracts
from pipeline.annotate import export as export_module
from pipeline.annotate import winrates
from pipeline.annotate.store import Store, db_path
from pipeline.annotate.tasks import (
    HQ_MODEL,
    RoundSettings,
    TaskError,
    compare_tasks,
    default_focus,
    evaluated_models,
    evaluation_dir,
    instance_tasks,
)
from pipeline.io.tables import SCHEMAS, read_metadata, read_table, write_table
from pipeline.seeding import numpy_rng

#: ``shown_at`` and ``answered_at`` of every simulated vote: a fixed stamp (the Unix epoch), so
#: that a rerun with the same settings writes byte-identical votes and win-rate tables
SIMULATED_AT = pd.Timestamp(0, unit="s", tz="UTC")
#: what ``annotate winrate`` writes into ``--out-dir`` (the ``human_winrates`` artifact)
WINRATE_FILES = contracts.HUMAN_WINRATE_FILES


def parse_testsets(values: list[str] | None, config: Path | None) -> dict[str, str]:
    """``NAME=PATH`` arguments; without any, the ``testsets`` of ``config`` (if it exists)."""
    if values:
        pairs = [value.partition("=") for value in values]
        bad = [value for value, (_, sep, path) in zip(values, pairs, strict=True) if not path]
        if bad:
            raise SystemExit(f"--testset takes NAME=PATH, got {bad}")
        return {name: path for name, _, path in pairs}
    if config is not None and config.is_file():
        import yaml

        testsets = (yaml.safe_load(config.read_text()) or {}).get("testsets") or {}
        return {name: str(entry["path"]) for name, entry in testsets.items()}
    return {}


def round_settings(args: argparse.Namespace, results: Path, testsets: dict[str, str]):
    models = tuple(m for m in (args.models or "").split(",") if m)
    focus = args.focus
    if focus is None:
        found = models or tuple(
            m for name in testsets for m in evaluated_models(results, args.framework, name)
        )
        focus = default_focus(list(found))
    return RoundSettings(
        round=args.round,
        seed=args.seed,
        testsets=testsets,
        models=models,
        focus=focus,
        repeat_fraction=args.repeat_fraction,
        gold_count=args.gold,
    )


def add_round_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--testset", action="append", help="NAME=PATH of a test set (repeat)")
    parser.add_argument(
        "--configfile",
        type=Path,
        default=Path("config.yaml"),
        help="where the test sets are read from without --testset (its `testsets`)",
    )
    parser.add_argument("--round", type=int, default=1, help="compare round number")
    parser.add_argument("--models", help="comma-separated models to compare (default: all)")
    parser.add_argument("--focus", help="the model compared against each other (default dspo_*)")
    parser.add_argument("--repeat-fraction", type=float, default=0.1, help="pairs shown twice")
    parser.add_argument("--gold", type=int, default=0, help="gold pairs (HQ vs bicubic) per set")
    parser.add_argument("--seed", type=int, default=0, help="global seed (sides, order, repeats)")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback address (127.0.0.0/8, ::1); any other
    name counts as remote (it is not resolved)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback ``host`` without ``--allow-remote``; warn with it
    (docs/design.md §11: the app speaks plain HTTP, tokens included)."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise SystemExit(
            f"--host {host} is not a loopback address: the annotation app (plain HTTP, tokens "
            "included) would be reachable beyond this machine; add --allow-remote to serve anyway"
        )
    print(
        f"warning: listening on {host}: reachable beyond this machine over plain HTTP",
        file=sys.stderr,
        flush=True,
    )


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pipeline.annotate.server import AppState, create_app

    check_host(args.host, args.allow_remote)
    results = Path(args.results)
    store = Store(db_path(results, args.framework))
    instances = instance_tasks(results, args.framework, args.top_k, args.seed)
    testsets = {} if args.no_compare else parse_testsets(args.testset, args.configfile)
    settings = round_settings(args, results, testsets) if testsets else None
    if settings is not None:
        compare_tasks(settings, results, args.framework, "check")  # fail before serving
        stored = store.round_settings(settings.round, settings.to_json())
        if json.loads(stored) != json.loads(settings.to_json()):
            raise SystemExit(
                f"{store.path}: round {settings.round} was started with settings {stored}; "
                f"this server has {settings.to_json()} (use a new --round)"
            )
    state = AppState(store, results, args.framework, instances, settings, {}, {}, threading.Lock())
    print(
        f"annotate: http://{args.host}:{args.port}/ ({len(instances)} instance tasks, "
        f"compare round {settings.round if settings else 'none'}; store {store.path})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="warning")
    return 0


def add_annotator(args: argparse.Namespace) -> int:
    store = Store(db_path(args.results, args.framework))
    print(store.add_annotator(args.name))
    return 0


def export(args: argparse.Namespace) -> int:
    store = Store(db_path(args.results, args.framework))
    out = Path(args.out_dir or Path(args.results) / "annotations" / args.framework)
    print(json.dumps(export_module.export(store, out)), file=sys.stderr)
    return 0


def winrate(args: argparse.Namespace) -> int:
    votes = read_table(args.votes, "votes")
    if votes.empty:
        raise SystemExit(f"{args.votes}: no votes")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rates = winrates.win_rates(votes, args.focus, args.seed, args.bootstrap)
    tables = {
        "Win rates (ties count half)": rates,
        "Bradley-Terry scores": winrates.bradley_terry(
            votes, args.reference, args.seed, args.bt_bootstrap
        ),
        "Inter-annotator agreement": winrates.agreement(votes),
        "Repeat-pair consistency": winrates.consistency(votes),
        "Gold-pair accuracy": winrates.gold_accuracy(votes),
    }
    simulated = bool(votes["simulated"].any())
    rates.to_csv(out / contracts.HUMAN_WINRATES_CSV, index=False)
    tables["Bradley-Terry scores"].to_csv(out / contracts.HUMAN_BRADLEY_TERRY, index=False)
    (out / contracts.HUMAN_WINRATES_MD).write_text(winrates.markdown(tables, simulated))
    winrates.plot_win_rates(rates, out / contracts.HUMAN_WINRATES_PLOT)
    metadata = read_metadata(args.votes)
    summary = {
        "simulated": simulated,
        "votes": str(args.votes),
        "n_votes": len(votes),
        "annotators": sorted(map(str, set(votes["annotator"]))),
        "rounds": sorted(int(r) for r in set(votes["round"])),
        "simulation": metadata.get("simulation") if simulated else None,
    }
    (out / contracts.HUMAN_WINRATE_SUMMARY).write_text(
        json.dumps(summary, indent=1, sort_keys=True) + "\n"
    )
    print(json.dumps({"pairs": len(rates), "simulated": simulated}), file=sys.stderr)
    return 0


def simulated_answer(scores: dict[str, float], left: str, right: str, lower_better: bool) -> str:
    """The answer a noise-free annotator gives: the better metric value, tie if equal."""
    a, b = scores[left], scores[right]
    if np.isclose(a, b):
        return "tie"
    return "left" if (a < b) == lower_better else "right"


def simulate(args: argparse.Namespace) -> int:
    """Votes of ``--annotators`` simulated annotators over ``--rounds`` rounds: the answer the
    metric prefers (HQ always wins gold pairs), replaced with probability ``--noise`` by a
    uniformly drawn one. Every row has ``simulated = true`` and the fixed stamp
    :data:`SIMULATED_AT`; all draws are seeded by ``--seed`` (pipeline.seeding), so the same
    settings give the same bytes."""
    results = Path(args.results)
    testsets = parse_testsets(args.testset, args.configfile)
    if not testsets:
        raise SystemExit("simulate: no test set (give --testset NAME=PATH)")
    metrics = {}
    for name in testsets:
        for model in evaluated_models(results, args.framework, name):
            path = evaluation_dir(results, args.framework, name, model) / contracts.EVAL_METRICS
            table = read_table(path, "eval_metrics")
            table = table[table["metric"] == args.metric]
            if table.empty:
                raise TaskError(f"{path}: no {args.metric!r} values")
            for row in table.itertuples(index=False):
                metrics[(name, model, str(row.image_id))] = (
                    float(row.value),
                    bool(row.lower_better),
                )
    rows = []
    stamp = SIMULATED_AT
    for round_number in range(1, args.rounds + 1):
        args.round = round_number
        settings = round_settings(args, results, testsets)
        for k in range(1, args.annotators + 1):
            name = f"simulated-{k}"
            rng = numpy_rng(args.seed, "annotate-simulate", round_number, name)
            for task in compare_tasks(settings, results, args.framework, name):
                if task.gold:
                    answer = "left" if task.left == HQ_MODEL else "right"
                else:
                    left = metrics[(task.testset, task.left, task.image_id)]
                    right = metrics[(task.testset, task.right, task.image_id)]
                    scores = {task.left: left[0], task.right: right[0]}
                    answer = simulated_answer(scores, task.left, task.right, left[1])
                if rng.random() < args.noise:
                    answer = str(rng.choice(["left", "right", "tie", "both_bad"]))
                rows.append(
                    (
                        name,
                        round_number,
                        task.testset,
                        task.image_id,
                        task.left,
                        task.right,
                        answer,
                        task.repeated,
                        task.gold,
                        True,
                        stamp,
                        stamp,
                    )
                )
    out = Path(
        args.out or contracts.artifact_in(results, "simulated_votes", framework=args.framework)
    )
    frame = pd.DataFrame(rows, columns=SCHEMAS["votes"].names)
    simulation = {
        "annotators": args.annotators,
        "rounds": args.rounds,
        "noise": args.noise,
        "metric": args.metric,
        "repeat_fraction": args.repeat_fraction,
        "gold": args.gold,
        "seed": args.seed,
    }
    write_table(
        frame,
        out,
        "votes",
        {"simulated": True, "noise": args.noise, "metric": args.metric, "simulation": simulation},
    )
    print(json.dumps({"votes": len(frame), "out": str(out), "simulated": True}), file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(prog="python -m pipeline annotate", description=__doc__)
    commands = main_parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, framework: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if framework:
            sub.add_argument("--results", default="results", help="the results folder")
            sub.add_argument("--framework", required=True, help="onestep or multistep")
        return sub

    sub = command("serve", "serve the annotation app")
    sub.add_argument("--host", default="127.0.0.1", help="address to bind (default local only)")
    sub.add_argument("--port", type=int, default=8765)
    sub.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --host that is not a loopback address (warns: plain HTTP)",
    )
    sub.add_argument("--top-k", type=int, default=5, help="largest instances per image")
    sub.add_argument("--no-compare", action="store_true", help="serve the instance task only")
    add_round_arguments(sub)
    sub.set_defaults(run=serve)
    sub = command("add-annotator", "register an annotator; prints the token")
    sub.add_argument("name")
    sub.set_defaults(run=add_annotator)
    sub = command("export", "write annotations.parquet and votes.parquet")
    sub.add_argument("--out-dir", help="default RESULTS/annotations/FRAMEWORK")
    sub.set_defaults(run=export)
    sub = command("winrate", "win rates, intervals, BT scores, agreement", framework=False)
    sub.add_argument("--votes", type=Path, required=True, help="a votes table")
    sub.add_argument("--out-dir", type=Path, required=True)
    sub.add_argument("--focus", help="the model whose win rates are reported (default dspo_*)")
    sub.add_argument("--reference", default="pretrained", help="BT score 0")
    sub.add_argument("--bootstrap", type=int, default=1000, help="win-rate resamples")
    sub.add_argument("--bt-bootstrap", type=int, default=200, help="BT resamples")
    sub.add_argument("--seed", type=int, default=0)
    sub.set_defaults(run=winrate)
    sub = command("simulate", "votes of simulated annotators from the IQA scores")
    add_round_arguments(sub)
    sub.add_argument("--annotators", type=int, default=3)
    sub.add_argument("--rounds", type=int, default=3)
    sub.add_argument("--noise", type=float, default=0.2, help="chance of a random answer")
    sub.add_argument("--metric", default="psnr", help="the metric simulated annotators follow")
    sub.add_argument("--out", type=Path, help="default .../annotations/F/votes_simulated.parquet")
    sub.set_defaults(run=simulate)
    return main_parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.run(args) or 0)
