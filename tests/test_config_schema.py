"""The config schema: presets validate, typos and wrong types fail naming the key, and the
schema's defaults are the stage modules' own defaults (one set of numbers, two places)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from pipeline import caption, degradations, degrade, evaluate, pretrain, report, score, segment
from pipeline import select as select_stage
from pipeline.models.multistep import MultiStepSettings
from pipeline.models.onestep import OneStepSettings
from pipeline.train import TrainConfig
from tests.workflow_helpers import ROOT, copy_workflow, snakemake

SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
PRESETS = [
    "config.yaml",
    *sorted(f"workflow/presets/{p.name}" for p in (ROOT / "workflow/presets").glob("*.yaml")),
]


def load(path):
    return yaml.safe_load((ROOT / path).read_text())


def validated(config):
    config = copy.deepcopy(config)
    validate(config, str(SCHEMA))
    return config


@pytest.mark.parametrize("path", PRESETS)
def test_presets_validate(path):
    config = validated(load(path))
    assert config["frameworks"] and config["seed"] == 0


def test_ci_preset_runs_both_frameworks():
    assert validated(load("workflow/presets/ci.yaml"))["frameworks"] == ["onestep", "multistep"]


@pytest.mark.parametrize(
    "broken, key",
    [
        ({"degrade": {"crop_sise": 64}}, "crop_sise"),
        ({"train": {"beta": "large"}}, "beta"),
        ({"segment": {"generator": {"points_per_sid": 8}}}, "points_per_sid"),
        ({"pretrain": {"multistep": {"model": {"samplr": "ddim"}}}}, "samplr"),
        ({"seeed": 1}, "seeed"),
    ],
)
def test_bad_keys_and_types_fail_naming_the_key(broken, key):
    with pytest.raises(WorkflowError, match=key):
        validated(broken)


def test_misspelt_key_stops_snakemake_before_any_job(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "bad.yaml").write_text("degrade:\n  crop_sise: 64\n")
    result = snakemake(workdir, "--dry-run", "--configfile", "bad.yaml", check=False)
    assert result.returncode != 0
    assert "crop_sise" in result.stdout + result.stderr
    assert not (workdir / "results").exists()


def _schema_defaults(properties):
    return {key: spec.get("default") for key, spec in properties.items()}


def _section(name):
    return yaml.safe_load(SCHEMA.read_text())["properties"][name]["properties"]


@pytest.mark.parametrize(
    "name, defaults",
    [
        ("caption", caption.DEFAULTS),
        ("score", score.DEFAULTS),
        ("select", select_stage.DEFAULTS),
        ("evaluate", evaluate.DEFAULTS),
        ("report", report.DEFAULTS),
        ("train", {f.name: f.default for f in dataclasses.fields(TrainConfig)}),
    ],
)
def test_schema_defaults_match_stage_defaults(name, defaults):
    assert _schema_defaults(_section(name)) == defaults


def test_nested_schema_defaults_match():
    degrade_section = _section("degrade")
    expected = {k: v for k, v in degrade.DEFAULT_CONFIG.items() if k != "workers"}
    assert _schema_defaults(degrade_section) == expected
    degradation = degrade_section["degradation"]["properties"]
    assert _schema_defaults(degradation) == degradations.DEFAULT_DEGRADATION
    segment_section = _section("segment")
    assert _schema_defaults(segment_section["generator"]["properties"]) == (
        segment.SAM_GENERATOR_DEFAULTS
    )
    for framework, settings in (("onestep", OneStepSettings), ("multistep", MultiStepSettings)):
        section = _section("pretrain")[framework]["properties"]
        plain = {k: v for k, v in _schema_defaults(section).items() if k != "variants"}
        assert plain == {k: v for k, v in pretrain.DEFAULTS.items() if k != "variants"}
        model = section["model"]["properties"]
        # seed and weights are bookkeeping the builders fill from the global seed / weights path
        fields = dataclasses.fields(settings)
        expected = {f.name: f.default for f in fields if f.name not in ("seed", "weights")}
        assert _schema_defaults(model) == expected


def test_missing_external_testset_stops_snakemake_naming_it(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["testsets"]["RealSR"] = {"kind": "paired", "path": "data/RealSR"}
    (workdir / "paired.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(workdir, "--dry-run", "--configfile", "paired.yaml", check=False)
    assert result.returncode != 0
    assert "testsets.RealSR.path: 'data/RealSR' does not exist" in result.stdout + result.stderr
    (workdir / "data" / "RealSR").mkdir(parents=True)
    snakemake(workdir, "--dry-run", "--configfile", "paired.yaml")
