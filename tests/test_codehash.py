"""Rule code hashes follow each stage's imports, lazy ones included."""

import shutil

from pipeline.codehash import code_hash, module_closure
from tests.workflow_helpers import ROOT


def test_closure_follows_imports_and_lazy_module_names():
    files = {p.relative_to(ROOT).as_posix() for p in module_closure(ROOT, "pipeline.train")}
    assert {"pipeline/train.py", "pipeline/losses.py", "pipeline/io/tables.py"} <= files
    # pipeline.models loads its families by name (importlib): they count too
    assert {"pipeline/models/multistep.py", "pipeline/models/onestep.py"} <= files
    assert "pipeline/degrade.py" not in files and "pipeline/select.py" not in files


def test_editing_a_module_changes_exactly_its_dependants(tmp_path):
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline")
    before = {s: code_hash(tmp_path, f"pipeline.{s}") for s in ("degrade", "select", "train")}
    losses = tmp_path / "pipeline/losses.py"
    losses.write_text(losses.read_text() + "\n# edited\n")
    after = {s: code_hash(tmp_path, f"pipeline.{s}") for s in ("degrade", "select", "train")}
    assert after["train"] != before["train"]
    assert after["degrade"] == before["degrade"] and after["select"] == before["select"]
    tables = tmp_path / "pipeline/io/tables.py"
    tables.write_text(tables.read_text() + "\n# edited\n")
    assert all(code_hash(tmp_path, f"pipeline.{s}") != after[s] for s in after)
