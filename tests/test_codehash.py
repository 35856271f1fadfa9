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


def _train_hashes(root) -> dict[str, str]:
    """Each method's train job code hash, as the train rule computes it (train_code_hash)."""
    from pipeline import contracts

    return {
        method: code_hash(root, "pipeline.train", contracts.method_module(method))
        for method in contracts.METHODS
    }


def test_editing_one_method_reruns_only_that_methods_train_jobs(tmp_path):
    rules = (ROOT / "workflow/rules/train.smk").read_text()
    assert "code=train_code_hash," in rules  # the rule hashes per method (common.smk)
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline")
    before = _train_hashes(tmp_path)
    assert len(set(before.values())) == 5  # offline, ddpo, gdpo, dro_online, ea_adam
    gdpo = tmp_path / "pipeline/training/gdpo.py"
    gdpo.write_text(gdpo.read_text() + "\n# edited\n")
    after = _train_hashes(tmp_path)
    assert {m for m in before if after[m] != before[m]} == {"gdpo", "gdpo_instance"}
    # the offline method's module: its five methods and ea_adam, which builds on it
    offline = tmp_path / "pipeline/training/offline.py"
    offline.write_text(offline.read_text() + "\n# edited\n")
    changed = {m for m, h in _train_hashes(tmp_path).items() if h != after[m]}
    assert changed == {"dspo", "dspo_m1", "dpo", "sft", "dro", "ea_adam"}
    # the session is every method's
    door = tmp_path / "pipeline/training/session.py"
    door.write_text(door.read_text() + "\n# edited\n")
    edited = _train_hashes(tmp_path)
    door.write_text(door.read_text().removesuffix("\n# edited\n"))
    unedited = _train_hashes(tmp_path)
    assert all(edited[m] != unedited[m] for m in before)
