"""The package's layering: stages meet only through files and the shared modules
(pipeline.contracts, pipeline.io, pipeline.models, ...), never by importing each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline import contracts, preflight, settings, shards
from pipeline.codehash import module_closure

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
STAGES = contracts.STAGES


def imported_modules(path: Path) -> set[str]:
    """Every pipeline module ``path`` imports, at the top or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "pipeline":  # from pipeline import x
                found.update(f"pipeline.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("pipeline")}


def rules_by_file() -> dict[str, set[str]]:
    """The rules each file declares: ``rule NAME:`` and ``use rule BASE as NAME with:``."""
    return {
        path.name: {
            line.split()[1].rstrip(":") if line.startswith("rule ") else line.split()[4]
            for line in path.read_text().splitlines()
            if line.startswith("rule ") or line.startswith("use rule ")
        }
        for path in (PACKAGE.parent / "workflow" / "rules").glob("*.smk")
    }


#: rule files that are not stages: their rules run stages (through `python -m pipeline STAGE`)
#: or tools, and are named after the file (`study`, `study_*`; `annotate_*`: the annotate CLI)
NON_STAGE_RULE_FILES = ("study.smk", "annotate.smk", "rounds.smk")


def test_every_stage_has_a_rule():
    files = rules_by_file()
    rules = set().union(
        *(names for name, names in files.items() if name not in NON_STAGE_RULE_FILES)
    )
    # a sharded stage's rule runs one shard; its gather is {stage}_gather (docs/design.md §15)
    assert rules == {*STAGES, *(f"{stage}_gather" for stage in shards.STAGES)}


@pytest.mark.parametrize("filename", NON_STAGE_RULE_FILES)
def test_non_stage_rules_are_named_after_their_file(filename):
    prefix = filename.removesuffix(".smk")
    names = rules_by_file()[filename]
    assert names and all(n == prefix or n.startswith(f"{prefix}_") for n in names)
    assert not names & set(STAGES)


def test_the_study_imports_no_stage():
    """The study runs the stages through its rules (python -m pipeline STAGE), never imports them."""
    stages = {f"pipeline.{name}" for name in STAGES}
    assert imported_modules(PACKAGE / "study.py") & stages == set()


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_another(stage):
    others = {f"pipeline.{name}" for name in STAGES if name != stage}
    assert imported_modules(PACKAGE / f"{stage}.py") & others == set()


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_reaches_another_through_shared_modules(stage):
    """The whole import closure (what codehash hashes): a shared module importing a stage would
    make that stage part of every stage importing the shared module."""
    closure = {
        path.relative_to(PACKAGE.parent).as_posix()
        for path in module_closure(PACKAGE.parent, f"pipeline.{stage}")
    }
    others = {f"pipeline/{name}.py" for name in STAGES if name != stage}
    assert closure & others == set()


def test_the_parser_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "def f():\n    from pipeline.evaluate import x\n    from pipeline import score\n"
    )
    assert imported_modules(module) == {"pipeline.evaluate", "pipeline", "pipeline.score"}


def test_the_method_table_is_the_one_list_of_methods():
    """The schema names no methods (a method file adds its own, docs/adding_a_method.md): its
    description names the package's, and preflight checks names against the table."""
    node = settings.schema_node("methods")
    assert "enum" not in node["items"]
    assert all(
        f"{name} (" in node["description"] or f"{name}," in node["description"]
        for name in contracts.METHODS
    )
    [(key, problem)] = preflight.method_problems({"methods": ["dspo", "dpoo"]})
    assert key == "methods" and "'dpoo'" in problem and "did you mean: dpo" in problem
    assert preflight.method_problems({"methods": sorted(contracts.METHODS)}) == []


def test_rules_take_every_path_from_the_contracts():
    """Artifact paths are declared once (pipeline.contracts.ARTIFACTS): no rule spells one."""
    spelled = [
        f"{path.name}:{number}"
        for path in sorted((PACKAGE.parent / "workflow" / "rules").glob("*.smk"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "results/" in line
    ]
    assert spelled == []


def test_artifact_fills_the_given_wildcards_and_keeps_the_others():
    assert contracts.artifact("model", variant="base") == "results/models/{framework}/base"
    assert (
        contracts.pairs_artifact("onestep", "united", "dpo")
        == "results/pairs/onestep/united_image.parquet"
    )
    with pytest.raises(KeyError, match="no wildcard"):
        contracts.artifact("scores", split="train")
    with pytest.raises(KeyError, match="unknown artifact"):
        contracts.artifact("score")


# ------------------------------------------------------------------ file names decided once

#: the endings of the files result folders hold
_FILE_ENDINGS = (".parquet", ".zarr", ".safetensors", ".json", ".md", ".csv", ".png")


def contracts_file_names() -> set[str]:
    """Every file name the contracts decide: the names of file constants (``DATA_TABLE``,
    ``TRAIN_LOG``, ...) and the last part of each artifact's path."""
    names = {Path(path).name for path in contracts.ARTIFACTS.values()}
    for value in vars(contracts).values():
        value = tuple(value.values()) if isinstance(value, dict) else value
        values = value if isinstance(value, tuple) else (value,)
        names.update(Path(v).name for v in values if isinstance(v, str))
    return {n for n in names if n.endswith(_FILE_ENDINGS) and "{" not in n and n[0] != "."}


def spelled_file_names(path: Path, names: set[str]) -> list[tuple[int, str]]:
    """(line, text) of each string in ``path``'s code, docstrings and ``help=`` texts aside,
    that is one of ``names`` or a path ending in one."""
    tree = ast.parse(path.read_text())
    prose = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    } | {
        id(keyword.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        for keyword in node.keywords
        if keyword.arg == "help"
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in prose or not isinstance(node, ast.Constant):
            continue
        if isinstance(node.value, str) and node.value.rsplit("/", 1)[-1] in names:
            found.append((node.lineno, node.value))
    return found


#: modules that keep their own file layouts: benchmarks build scratch folders of their own
_OWN_LAYOUTS = ("bench",)


def test_only_the_contracts_spell_the_file_names_of_result_folders():
    names = contracts_file_names()
    assert {"train_log.parquet", "pairs.parquet", "instances.parquet", "report.md"} <= names
    spelled = {
        path.relative_to(PACKAGE).as_posix(): found
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "contracts.py" and path.relative_to(PACKAGE).parts[0] not in _OWN_LAYOUTS
        if (found := spelled_file_names(path, names))
    }
    assert spelled == {}


def test_the_file_name_check_sees_a_spelled_name(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        '"""Writes train_log.parquet."""\n'
        "def f(folder, parser):\n"
        '    parser.add_argument("--x", help="train_log.parquet")\n'
        '    return folder / "train_log.parquet", "logs/train_log.parquet"\n'
    )
    found = spelled_file_names(module, {"train_log.parquet"})
    assert sorted(found) == [(4, "logs/train_log.parquet"), (4, "train_log.parquet")]
