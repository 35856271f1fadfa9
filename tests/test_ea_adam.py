"""pipeline.training.ea_adam (issue 16): a population of one with preference (1, 0) trains as DSPO
on the perception pairs; the fused model with one-hot weights is that member; resume is bit for
bit; population size and EA cadence change what the stage does; the train CLI takes both tables."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from pipeline import contracts, population, settings
from pipeline import train as T
from pipeline.io.images import write_png
from pipeline.io.tables import read_metadata, read_table, write_table
from pipeline.models import build_tiny_model, load_model
from pipeline.training import ea_adam as E
from pipeline.training.run import step_slots
from tests.test_train import IMAGES, SIZE
from tests.test_train import inputs as train_inputs  # noqa: F401  (the fixture)

OBJECTIVES = {"perception": {"gmsd": 1.0}, "fidelity": {"psnr": 1.0, "ssim": 1.0}}
BASE = {
    "max_steps": 4,
    "batch_size": 2,
    "checkpoint_every": 2,
    "learning_rate": 1e-3,
    "uncond_drop_rate": 0.5,
}
EA = {
    "population_size": 2,
    "neighbourhood_size": 2,
    "ea_every": 1,
    "ea_iterations": 1,
    "fitness_images": 2,
    "fitness_crop": 16,
    "fusion_images": 2,
    "fusion_steps": 2,
    "p_mutation": 1.0,
    "objectives": OBJECTIVES,
    "score": {"device": "cpu"},
}


@pytest.fixture
def inputs(train_inputs, tmp_path):  # noqa: F811
    """test_train's inputs (one-step model) with HQ images and a fidelity table (the perception
    table's instance pairs with winners and losers swapped)."""
    rng = np.random.default_rng(1)
    for image_id in IMAGES:
        hq = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        write_png(train_inputs["data_dir"] / "hq" / f"{image_id}.png", hq)
    pairs = read_table(train_inputs["pairs_path"], "preference_pairs")
    swapped = pairs.assign(winner=pairs["loser"], loser=pairs["winner"])
    write_table(swapped, tmp_path / "fidelity.parquet", "preference_pairs")
    return {
        **train_inputs,
        "framework": "onestep",
        "objective": contracts.FRONT_OBJECTIVE,
        "pairs_path": [train_inputs["pairs_path"], tmp_path / "fidelity.parquet"],
    }


def tiny():
    return build_tiny_model("onestep", seed=0)


def run(inputs, out: Path, ea: dict, base: dict = BASE) -> Path:
    return T.train(
        **inputs,
        method="ea_adam",
        out_dir=out,
        config={**base, "ea_adam": ea},
        seed=3,
        model=tiny(),
    )


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in load_model(folder).named_parameters()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_a_population_of_one_trains_exactly_like_dspo_on_the_perception_pairs(inputs, tmp_path):
    dspo_inputs = {**inputs, "pairs_path": inputs["pairs_path"][0], "objective": "perception"}
    dspo = T.train(
        **dspo_inputs, method="dspo", out_dir=tmp_path / "dspo", config=BASE, seed=3, model=tiny()
    )
    # no EA phase within the run (one member's EA could mutate it) and no fusion to learn
    out = run(inputs, tmp_path / "ea", {**EA, "population_size": 1, "ea_every": 100})
    expected = weights(dspo)
    assert same(weights(out / "members" / "0"), expected)
    assert same(weights(out), expected)  # the fused model of one member is that member
    dspo_log = read_table(dspo / "train_log.parquet", "train_log")
    log = read_table(out / "train_log.parquet", "ea_adam_log")
    assert log["loss_perception"].tolist() == dspo_log["loss"].tolist()
    assert log["grad_norm"].tolist() == dspo_log["grad_norm"].tolist()
    assert log["loss_fidelity"].isna().all()  # a one-hot member skips the other objective


def test_the_fused_model_with_one_hot_weights_is_that_member(inputs, tmp_path):
    out = run(inputs, tmp_path / "ea", EA)
    table = read_table(out / contracts.POPULATION_TABLE, "population")
    assert table["member"].tolist() == [0, 1]
    assert table[["preference_perception", "preference_fidelity"]].to_numpy().tolist() == [
        [1.0, 0.0],
        [0.0, 1.0],
    ]
    assert np.isfinite(table[["fitness_perception", "fitness_fidelity"]].to_numpy()).all()
    state = population.PopulationState.from_flat(load_file(out / contracts.POPULATION_STATE))
    members = [weights(out / path) for path in table["path"]]
    assert not same(members[0], members[1])
    layers = population.layer_names(state.members[0])
    fused_folder = weights(out)
    for i in range(2):
        fused = population.fuse_adapters(
            state.members, population.one_hot_weights(len(layers), 2, i), layers
        )
        # member i's folder holds exactly the one-hot fusion's adapter tensors, and everything
        # else as the fused model's folder: the fused model with these weights is member i
        assert set(fused) < set(members[i])
        assert all(torch.equal(fused[key], members[i][key]) for key in fused)
        assert all(
            torch.equal(value, fused_folder[key])
            for key, value in members[i].items()
            if key not in fused
        )
        assert not all(torch.equal(fused[key], fused_folder[key]) for key in fused)
    meta = read_metadata(out / contracts.POPULATION_TABLE)
    assert meta["ea_rounds"] == 4 and len(meta["fusion_loss"]) == 2
    assert np.allclose(np.asarray(meta["fusion_weights"]).sum(axis=1), 1.0)


def test_resume_is_bit_identical(inputs, tmp_path, monkeypatch):
    full = run(inputs, tmp_path / "full", EA)
    original = E.step_slots

    def killed_at_step_three(n_items, step, batch_size, seed):
        if step == 2:
            raise KeyboardInterrupt("killed")
        return original(n_items, step, batch_size, seed)

    monkeypatch.setattr(E, "step_slots", killed_at_step_three)
    with pytest.raises(KeyboardInterrupt):
        run(inputs, tmp_path / "resumed", EA)
    folder = tmp_path / "checkpoints" / "train" / "resumed"
    assert [p.name for p in folder.glob("step-*")] == ["step-00000002"]
    monkeypatch.setattr(E, "step_slots", original)
    resumed = run(inputs, tmp_path / "resumed", EA)
    assert read_metadata(resumed / "train_log.parquet")["resumed_from"].endswith("step-00000002")
    pd.testing.assert_frame_equal(
        read_table(full / "train_log.parquet", "ea_adam_log"),
        read_table(resumed / "train_log.parquet", "ea_adam_log"),
    )
    a, b = (
        load_file(full / contracts.POPULATION_STATE),
        load_file(resumed / contracts.POPULATION_STATE),
    )
    assert same(a, b)
    assert same(weights(full), weights(resumed))
    for i in range(2):
        assert same(weights(full / "members" / str(i)), weights(resumed / "members" / str(i)))
    # resumed = uninterrupted for the metadata too (the fitness evaluations are checkpointed)
    for table in ("train_log.parquet", contracts.POPULATION_TABLE):
        before, after = (read_metadata(folder / table) for folder in (full, resumed))
        assert after.pop("resumed_from") and before.pop("resumed_from") is None
        assert after["fitness_evaluations"] == before["fitness_evaluations"] > 1
        assert after == before


def test_population_size_and_ea_cadence_change_the_run(inputs, tmp_path):
    two = run(inputs, tmp_path / "two", EA)
    three = run(inputs, tmp_path / "three", {**EA, "population_size": 3})
    rarely = run(inputs, tmp_path / "rarely", {**EA, "ea_every": 2})
    assert sorted(p.name for p in (three / "members").iterdir()) == ["0", "1", "2"]
    assert len(read_table(three / "train_log.parquet", "ea_adam_log")) == 3 * BASE["max_steps"]
    assert read_table(three / contracts.POPULATION_TABLE, "population")[
        "preference_fidelity"
    ].tolist() == [0.0, 0.5, 1.0]
    meta = {
        k: read_metadata(f / contracts.POPULATION_TABLE)
        for k, f in {"two": two, "rarely": rarely}.items()
    }
    assert meta["two"]["ea_rounds"] == 4 and meta["rarely"]["ea_rounds"] == 2
    assert meta["rarely"]["fitness_evaluations"] < meta["two"]["fitness_evaluations"]
    assert not same(weights(two / "members" / "1"), weights(rarely / "members" / "1"))


def test_a_changed_ea_setting_does_not_resume_the_old_checkpoints(inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(
        E,
        "step_slots",
        lambda *a: (_ for _ in ()).throw(KeyboardInterrupt) if a[1] == 2 else step_slots(*a),
    )
    with pytest.raises(KeyboardInterrupt):
        run(inputs, tmp_path / "out", EA)
    monkeypatch.undo()
    run(inputs, tmp_path / "out", {**EA, "mutation_sigma": 0.1})
    assert len(list((tmp_path / "checkpoints" / "train").glob("out.stale-*"))) == 1


def test_the_cli_takes_both_tables_and_refuses_one(inputs, tmp_path):
    with pytest.raises(ValueError, match="2 pairs tables"):
        E.pairs_paths(inputs["pairs_path"][0])
    assert E.pairs_paths([str(p) for p in inputs["pairs_path"]]) == tuple(inputs["pairs_path"])


def test_job_settings_fill_fitness_objectives_and_registry_for_ea_adam_only():
    config = {
        "select": {"objectives": OBJECTIVES},
        "score": {"metrics": ["psnr"], "device": "cpu"},
        "train": {"ea_adam": {"population_size": 2}},
    }
    job = settings.job_settings(config, "train", method="ea_adam")
    assert job["ea_adam"]["population_size"] == 2 and job["ea_adam"]["objectives"] == OBJECTIVES
    assert job["ea_adam"]["score"]["device"] == "cpu"
    assert "ea_adam" not in settings.job_settings(config, "train", method="dspo")
    assert settings.job_settings(config, "report")["front_objectives"] == OBJECTIVES
    assert contracts.train_pairs_artifacts("onestep", "front", "ea_adam") == [
        "results/pairs/onestep/perception.parquet",
        "results/pairs/onestep/fidelity.parquet",
    ]


def test_the_report_plots_the_front_and_marks_the_non_dominated_members(tmp_path):
    from pipeline import report

    means = {
        "ea_adam_member0": (0.2, 30.0),
        "ea_adam_member1": (0.1, 28.0),
        "ea_adam_member2": (0.3, 27.0),
        "ea_adam_front": (0.15, 29.0),
        "dspo_fidelity": (0.3, 31.0),
        "pretrained": (0.4, 25.0),
        "dspo_m1_fidelity": (0, 0),
    }
    rows = [
        {"testset": "t", "model": m, "metric": metric, "mean": v, "lower_better": lower}
        for m, (gmsd, psnr) in means.items()
        for metric, v, lower in (("gmsd", gmsd, True), ("psnr", psnr, False))
    ]
    config = {"front_objectives": {"perception": {"gmsd": 1.0}, "fidelity": {"psnr": 1.0}}}
    frame = report.front_points(pd.DataFrame(rows), "t", config)
    assert frame["model"].tolist() == [
        "ea_adam_member0",
        "ea_adam_member1",
        "ea_adam_member2",
        "ea_adam_front",
        "dspo_fidelity",
        "pretrained",
    ]
    # member 2 is worse than member 0 on both; members 0 and 1 trade off
    assert frame["non_dominated"].tolist()[:3] == [True, True, False]
    files, text = report.write_front(pd.DataFrame(rows), tmp_path, "onestep", config)
    assert files == ["front_t.png", "front.md"] and (tmp_path / "front_t.png").is_file()
    assert text.count("| ea_adam_member") == 3
