"""A training method from a file outside the package (docs/adding_a_method.md): registered from
the config's method_files, planned by the rules, trained through the session, hashed on its own."""

import math
import shutil

import pytest
import torch

from pipeline import contracts, losses
from pipeline.codehash import code_hash
from pipeline.io.tables import read_metadata, read_table
from pipeline.training import step
from pipeline.training.config import TrainConfig
from tests.test_train import BASE, _run, _trained_weights
from tests.test_train import inputs as train_inputs  # noqa: F401  (the fixture)
from tests.workflow_helpers import ROOT, copy_workflow, planned_jobs

TOY = ROOT / "tests/methods/toy_ipo.py"
CI = ("--configfile", "workflow/presets/ci.yaml")


@pytest.fixture
def registered(monkeypatch):
    """The toy method registered for this test only (the tables restored afterwards)."""
    monkeypatch.setattr(contracts, "METHODS", dict(contracts.METHODS))
    monkeypatch.setattr(contracts, "_METHOD_FILE_MODULES", {})
    monkeypatch.setattr(step, "LOSSES", dict(step.LOSSES))
    assert contracts.load_method_files([TOY]) == ["toy_ipo"]
    return contracts.method_file_module("toy_ipo")


def test_a_method_file_registers_its_method_once(registered):
    method = contracts.method("toy_ipo")
    assert (method.loss, method.pair_level, method.file) == ("toy_ipo", "instance", str(TOY))
    assert contracts.load_method_files([TOY]) == ["toy_ipo"]  # loaded once
    assert step.LOSSES["toy_ipo"] is registered.ipo_loss


def test_bad_method_files_are_refused_by_name(registered, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.py"):
        contracts.load_method_files([tmp_path / "missing.py"])
    clash = tmp_path / "clash.py"
    clash.write_text(TOY.read_text().replace('Method("toy_ipo", "toy_ipo"', 'Method("dspo", "x"'))
    with pytest.raises(ValueError, match="'dspo' is already in the method table"):
        contracts.load_method_files([clash])
    empty = tmp_path / "empty.py"
    empty.write_text("METHOD = None\n")
    with pytest.raises(ValueError, match="defines METHOD"):
        contracts.load_method_files([empty])


def test_the_toy_loss_is_ipos_squared_loss_on_dspos_margins(registered):
    torch.manual_seed(0)
    err_theta, err_ref = torch.rand(3, 4, 4), torch.rand(3, 4, 4)
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2], masks[1, 2:] = True, True
    weights, winners, losers = [0.25, 0.75], torch.tensor([0, 2]), torch.tensor([1, 0])
    config = TrainConfig(beta=2.0, k=0.5)
    loss, _ = registered.ipo_loss(err_theta, err_ref, masks, weights, winners, losers, config)
    expected = 0.0
    for m in range(2):  # d_m by hand: policy minus reference error gap, winner minus loser

        def mean(err, i, m=m):
            return float(err[i][masks[m]].mean())

        gap = (mean(err_theta, winners[m]) - mean(err_ref, winners[m])) - (
            mean(err_theta, losers[m]) - mean(err_ref, losers[m])
        )
        expected += weights[m] * (-0.5 * 2.0 * gap - 1.0 / (2.0 * registered.TAU)) ** 2
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    margins, _ = losses.preference_margins(err_theta, err_ref, masks, weights, winners, losers)
    assert margins.shape == (2,)


def test_the_method_trains_through_the_session(registered, train_inputs, tmp_path):  # noqa: F811
    toy = _run(train_inputs, tmp_path / "toy", BASE, method="toy_ipo")
    dspo = _run(train_inputs, tmp_path / "dspo", BASE, method="dspo")
    metadata = read_metadata(toy / contracts.TRAIN_LOG)
    assert (metadata["method"], metadata["loss"]) == ("toy_ipo", "toy_ipo")
    toy_log, dspo_log = (read_table(p / contracts.TRAIN_LOG, "train_log") for p in (toy, dspo))
    assert len(toy_log) == BASE["max_steps"]
    assert toy_log["loss"].tolist() != dspo_log["loss"].tolist()  # its loss took effect
    # before the first update the policy is the reference: every margin is 0, so each LQ's
    # loss is (0 - 1 / (2 tau))^2 = 1 over weights summing to 1, and dspo's is log 2
    assert toy_log["loss"][0] == pytest.approx(1.0 / (2.0 * registered.TAU) ** 2, rel=1e-6)
    assert dspo_log["loss"][0] == pytest.approx(math.log(2.0), rel=1e-6)
    # the same draws: the first step's errors are dspo's
    assert toy_log["err_theta_winner"][0] == pytest.approx(dspo_log["err_theta_winner"][0])
    assert _trained_weights(toy).keys() == _trained_weights(dspo).keys()


def test_a_method_files_code_hash_is_its_own(tmp_path):
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline")
    toy = tmp_path / "toy_ipo.py"
    shutil.copy(TOY, toy)

    def hashes() -> tuple[str, str]:
        gdpo = code_hash(tmp_path, "pipeline.train", contracts.method_module("gdpo"))
        return code_hash(tmp_path, "pipeline.train", files=(toy,)), gdpo

    before = hashes()
    toy.write_text(toy.read_text() + "\n# edited\n")
    assert hashes()[0] != before[0] and hashes()[1] == before[1]
    edited = hashes()
    offline = tmp_path / "pipeline/training/offline.py"  # the file imports the offline method
    offline.write_text(offline.read_text() + "\n# edited\n")
    assert hashes()[0] != edited[0] and hashes()[1] == edited[1]


@pytest.mark.slow
def test_the_workflow_plans_a_method_files_jobs(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    shutil.copy(TOY, workdir / "toy_ipo.py")
    ci = contracts.METHODS.keys() & set(_ci_methods())
    base = planned_jobs(workdir, *CI)
    methods = f"methods=[{','.join(sorted(ci))},toy_ipo]"
    added = planned_jobs(workdir, *CI, "--config", "method_files=[toy_ipo.py]", methods)
    assert added["train"] == base["train"] + 2  # one per framework
    evaluations = added["evaluate"] - base["evaluate"]  # toy_ipo_fidelity per test set
    assert evaluations > 0 and evaluations % 2 == 0


def _ci_methods() -> list[str]:
    import yaml

    return yaml.safe_load((ROOT / "workflow/presets/ci.yaml").read_text())["methods"]
