"""The config schema and its resolver: presets validate, typos, wrong types and out-of-range
values fail naming the key, the schema is the only source of defaults, and what
``python -m pipeline config`` prints is what each file says."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import subprocess
import sys

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from pipeline import (
    caption,
    degradations,
    degrade,
    evaluate,
    pretrain,
    report,
    score,
    segment,
    settings,
)
from pipeline import select as select_stage
from pipeline.models.multistep import MultiStepSettings
from pipeline.models.onestep import OneStepSettings
from pipeline.training.config import TrainConfig
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


def test_stage_settings_come_from_the_schema_alone():
    """Every stage resolves its section through pipeline.settings, whose only source of
    defaults is the schema: no stage module keeps a DEFAULTS dict of its own."""
    for module in (caption, degrade, evaluate, pretrain, report, score, segment, select_stage):
        assert not hasattr(module, "DEFAULTS"), module.__name__
    assert evaluate.stage_config() == settings.defaults("evaluate")
    assert report.stage_config() == settings.defaults("report")
    assert segment.resolve_config({}) == settings.defaults("segment")
    assert dataclasses.asdict(TrainConfig()) == settings.defaults("train")
    assert degradations.degradation_config() == settings.defaults("degrade.degradation")
    for framework, cls in (("onestep", OneStepSettings), ("multistep", MultiStepSettings)):
        model = settings.defaults(f"pretrain.{framework}.model")
        fields = {f.name: f.default for f in dataclasses.fields(cls) if f.name in model}
        assert fields == model


def test_sam_generator_defaults_are_segment_anythings_own():
    """The schema's generator defaults are SamAutomaticMaskGenerator's keyword defaults."""
    from segment_anything import SamAutomaticMaskGenerator

    signature = inspect.signature(SamAutomaticMaskGenerator.__init__).parameters
    for key, value in settings.defaults("segment")["generator"].items():
        assert signature[key].default == pytest.approx(value), key


def test_variant_keeps_only_the_keys_it_names():
    """Schema defaults < model < variant: a family setting reaches every variant that does
    not name it (Snakemake used to fill each variant with the schema defaults)."""
    config = validated(
        {
            "pretrain": {
                "multistep": {
                    "model": {"sampler": "ddim", "cfg": 7.0, "train_unet": True},
                    "variants": {"base": {}, "cfg3": {"cfg": 3.0}},
                }
            }
        }
    )
    assert config["pretrain"]["multistep"]["variants"] == {"base": {}, "cfg3": {"cfg": 3.0}}
    family = settings.job_settings(config, "pretrain", framework="multistep")
    base = settings.variant_settings(family, "multistep", "base")
    cfg3 = settings.variant_settings(family, "multistep", "cfg3")
    assert (base["sampler"], base["cfg"], base["train_unet"]) == ("ddim", 7.0, True)
    assert (cfg3["sampler"], cfg3["cfg"], cfg3["train_unet"]) == ("ddim", 3.0, True)
    assert base["steps"] == settings.defaults("pretrain.multistep.model")["steps"]


@pytest.mark.parametrize(
    "broken, key",
    [
        ({"pretrain": {"onestep": {"model": {"perceptual": "lpip"}}}}, "perceptual"),
        ({"pretrain": {"onestep": {"variants": {"v": {"perceptual": "lpip"}}}}}, "perceptual"),
        ({"report": {"ci_method": "bootsrap"}}, "ci_method"),
        ({"candidates": {"batch_size": 0}}, "batch_size"),
        ({"pretrain": {"onestep": {"steps": 0}}}, "steps"),
        ({"pretrain": {"multistep": {"steps": -5}}}, "steps"),
        ({"degrade": {"test_fraction": 1.5}}, "test_fraction"),
        ({"train": {"uncond_drop_rate": -0.1}}, "uncond_drop_rate"),
        ({"threads": 0}, "threads"),
    ],
)
def test_bad_values_fail_in_the_schema_and_in_the_resolver(broken, key):
    with pytest.raises(WorkflowError, match=key):
        validated(broken)
    with pytest.raises(settings.ConfigError, match=key):
        settings.effective_config(broken)


def effective(*args):
    """``python -m pipeline config ARGS`` run in the repository, parsed."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "config", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def test_config_command_shows_what_each_file_says():
    demo = effective()
    assert set(demo) == {"run", *[s for s in settings.STAGE_SECTIONS if s in demo]}
    variants = demo["pretrain"]["onestep"]["variants"]
    assert sorted(variants) == ["base", "grad1", "grad4", "rank16", "rank64"]
    assert {v["lambda_vsd"] for v in variants.values()} == {0.0}  # the README: VSD is off
    assert variants["grad4"]["lambda_lpips"] == 4.0
    assert variants["rank16"]["lora_rank"] == 16 and variants["base"]["lora_rank"] == 4
    assert demo["train"]["methods"]["dspo"]["max_steps"] == 30
    assert demo["run"]["threads"] == 1

    paper = effective("--configfile", "workflow/presets/paper_onestep.yaml")
    preset = load("workflow/presets/paper_onestep.yaml")["pretrain"]["onestep"]
    for name, variant in paper["pretrain"]["onestep"]["variants"].items():
        assert variant["perceptual"] == "lpips", name
        assert variant["perceptual_weights"] == preset["model"]["perceptual_weights"], name
        for key, value in {**preset["model"], **(preset["variants"][name] or {})}.items():
            assert variant[key] == value, (name, key)
    assert paper["pretrain"]["onestep"]["variants"]["cfg6"]["cfg_vsd"] == 6.0

    multi = effective("--configfile", "workflow/presets/paper_multistep.yaml")
    written = load("workflow/presets/paper_multistep.yaml")["pretrain"]["multistep"]["model"]
    for variant in multi["pretrain"]["multistep"]["variants"].values():
        assert {key: variant[key] for key in written} == written
    assert multi["candidates"]["settings"]["multistep"][3]["cfg"] == 10.5


def test_config_command_overlays_files_and_dotted_keys(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("train: {max_steps: 3}\n")
    overlaid = effective("--configfile", "config.yaml", str(mine), "--config", "seed=7")
    assert overlaid["train"]["max_steps"] == 3 and overlaid["run"]["seed"] == 7
    assert overlaid["degrade"]["crop_size"] == 64  # the demo's, kept under the overlay
    alone = effective("--configfile", str(mine))  # a file alone replaces config.yaml
    assert alone["degrade"]["crop_size"] == settings.defaults("degrade")["crop_size"]
    dotted = effective("--config", "pretrain.onestep.model.lambda_vsd=0.5")
    assert {v["lambda_vsd"] for v in dotted["pretrain"]["onestep"]["variants"].values()} == {0.5}


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
