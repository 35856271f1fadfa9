"""Checks before the first job (pipeline/preflight.py): every problem named by key and file."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline import preflight
from pipeline.preflight import PreflightError, check, find_problems

REPO = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((REPO / "config.yaml").read_text())


def _preset(name: str) -> dict:
    return yaml.safe_load((REPO / "workflow" / "presets" / f"{name}.yaml").read_text())


def _set(config: dict, dotted: str, value) -> dict:
    node = config
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return config


def problems(root: Path, base: dict | None = None, **changes) -> dict[str, list[str]]:
    """key -> messages for the demo config (or ``base``) with ``changes`` (``__`` = ``.``)."""
    config = copy.deepcopy(DEMO if base is None else base)
    for dotted, value in changes.items():
        _set(config, dotted.replace("__", "."), value)
    found: dict[str, list[str]] = {}
    for key, message in find_problems(config, root):
        found.setdefault(key, []).append(message)
    return found


# --- the shipped configurations ------------------------------------------------------------------


def test_demo_and_ci_have_no_problems():
    assert find_problems(DEMO, REPO) == []
    assert find_problems(_preset("ci"), REPO) == []
    check(DEMO, REPO)  # no exception


PAPER_COMMON = [
    "segment.checkpoint",
    "caption.captioner",
    "score.weights_dir",
    "evaluate.weights_dir",
    "degrade.source",
    "testsets.RealSR.path",
    "testsets.DRealSR.path",
    "prompts.captioner",  # the prompts stage's captioner (the same BLIP folder)
]
PAPER_EXPECTED = {
    "paper_multistep": ["pretrain.multistep.weights", *PAPER_COMMON],
    "paper_onestep": [
        "pretrain.onestep.weights",
        "pretrain.onestep.model.perceptual_weights",
        "pretrain.onestep.model.perceptual_weights_dir",
        *PAPER_COMMON,
    ],
}


@pytest.mark.parametrize("preset", sorted(PAPER_EXPECTED))
def test_paper_preset_reports_every_missing_weight_at_once(tmp_path, preset):
    # Nothing of models/ or data/ exists in a fresh working directory: all at once, in one error.
    config = _preset(preset)
    found = find_problems(config, tmp_path)
    assert [key for key, _ in found] == PAPER_EXPECTED[preset]
    for key, message in found:
        value = config
        for part in key.split("."):
            value = value[part]
        assert f"{value!r} does not exist" in message
        assert str(tmp_path / value) in message  # where it was looked for
    with pytest.raises(PreflightError) as raised:
        check(config, tmp_path)
    assert raised.value.problems == found
    text = str(raised.value)
    assert f"has {len(found)} problem(s)" in text
    assert all(f"  {key}: {message}" in text for key, message in found)


def test_paper_preset_with_its_files_in_place_has_no_problems(tmp_path):
    config = _preset("paper_onestep")
    for folder in (
        "models/stable-diffusion-2-1-base",
        "models/blip-image-captioning-large",
        "models/pyiqa",
        "data/LSDIR",
        "data/RealSR",
        "data/DRealSR",
    ):
        (tmp_path / folder).mkdir(parents=True)
    for file in ("models/sam_vit_h_4b8939.pth", "models/pyiqa/LPIPS_v0.1_vgg-a78928a0.pth"):
        (tmp_path / file).write_bytes(b"")
    assert find_problems(config, tmp_path) == []


# --- weights ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "what", "kind"),
    [
        ("pretrain.onestep.weights", "base model weights", "dir"),
        ("pretrain.onestep.model.base_weights", "SD base weights", "dir"),
        ("pretrain.onestep.variants.rank16.base_weights", "SD base weights", "dir"),
        ("pretrain.onestep.model.perceptual_weights", "LPIPS-VGG checkpoint file", "file"),
        ("pretrain.onestep.model.perceptual_weights_dir", "torch hub folder of the VGG16", "dir"),
        ("segment.checkpoint", "SAM checkpoint", "file"),
        ("caption.captioner", "BLIP captioner folder", "dir"),
        ("caption.text_encoder", "sentence-similarity model folder", "dir"),
        ("score.weights_dir", "pyiqa weights folder", "dir"),
        ("evaluate.weights_dir", "pyiqa weights folder", "dir"),
        ("score.weights.psnr", "weights file of IQA metric 'psnr'", "file"),
        ("evaluate.weights.ssim", "weights file of IQA metric 'ssim'", "file"),
    ],
)
def test_a_missing_weight_path_names_its_key_and_path(tmp_path, key, what, kind):
    change = {key.replace(".", "__"): "nowhere/weights"}
    found = problems(tmp_path, **change)
    assert list(found) == [key]
    (message,) = found[key]
    assert message.startswith(f"'nowhere/weights' does not exist ({what}")
    assert str(tmp_path / "nowhere" / "weights") in message
    target = tmp_path / "nowhere" / "weights"  # in place, the same config has no problem
    target.parent.mkdir()
    target.mkdir() if kind == "dir" else target.write_bytes(b"")
    assert problems(tmp_path, **change) == {}


def test_a_folder_where_a_file_belongs_is_refused(tmp_path):
    (tmp_path / "sam").mkdir()
    found = problems(tmp_path, segment__checkpoint="sam")
    assert found == {"segment.checkpoint": ["'sam' is not a file (SAM checkpoint)"]}


def test_hub_ids_only_with_downloads_allowed(tmp_path):
    hub = {
        "pretrain__onestep__weights": "stabilityai/stable-diffusion-2-1-base",
        "caption__captioner": "Salesforce/blip-image-captioning-large",
    }
    offline = problems(tmp_path, **hub)
    assert list(offline) == ["pretrain.onestep.weights", "caption.captioner"]
    assert all("downloads are off (allow_downloads: false)" in m[0] for m in offline.values())
    assert problems(tmp_path, allow_downloads=True, **hub) == {}
    # two slashes is a path, never a hub id; a SAM checkpoint is always a local file
    deep = problems(
        tmp_path,
        allow_downloads=True,
        caption__captioner="org/name/extra",
        segment__checkpoint="facebook/sam",
    )
    assert list(deep) == ["segment.checkpoint", "caption.captioner"]
    assert "it is not a hub id (org/name)" in deep["caption.captioner"][0]


def test_variants_the_run_does_not_pretrain_are_not_checked(tmp_path):
    config = copy.deepcopy(DEMO)
    config["pretrain"]["onestep"]["variants"]["spare"] = {"base_weights": "gone"}
    assert find_problems(config, tmp_path) == []
    config["candidates"]["settings"]["onestep"][0]["variant"] = "spare"
    assert find_problems(config, tmp_path)[0][0] == "pretrain.onestep.variants.spare.base_weights"


def test_lpips_without_its_weights_file(tmp_path):
    found = problems(tmp_path, pretrain__onestep__model__perceptual="lpips")
    assert sorted(found) == [
        f"pretrain.onestep.variants.{v}.perceptual_weights"
        for v in ("base", "grad1", "grad4", "rank16", "rank64")
    ]
    assert (
        "perceptual 'lpips' needs perceptual_weights"
        in found["pretrain.onestep.variants.base.perceptual_weights"][0]
    )


def test_per_metric_weights_for_a_metric_not_scored(tmp_path):
    (tmp_path / "lpips.pth").write_bytes(b"")
    found = problems(tmp_path, score__weights={"lpips": "lpips.pth"})
    assert found == {
        "score.weights": [
            "metric(s) [lpips] are not in score.metrics [psnr, ssim, fsim, gmsd, vif, nlpd, piqe]"
        ]
    }


# --- metrics and objectives ------------------------------------------------------------------


def test_unknown_metrics_are_named(tmp_path):
    found = problems(
        tmp_path,
        score__metrics=["psnr", "ssim", "fsim", "gmsd", "piqe", "psnrr"],
        evaluate__metrics=["psnr", "maniqa", "notametric"],
    )
    assert list(found) == ["score.metrics", "evaluate.metrics"]
    assert found["score.metrics"][0].startswith("unknown IQA metric(s) [psnrr]")
    assert found["evaluate.metrics"][0].startswith("unknown IQA metric(s) [notametric]")


def test_metric_names_come_from_the_score_stage_and_pyiqa():
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    from pipeline.iqa import DSPO_METRICS, metric_info

    assert preflight.score_aliases() == {name: spec[0] for name, spec in DSPO_METRICS.items()}
    assert preflight.pyiqa_metric_ids() == frozenset(DEFAULT_CONFIGS)
    for name in ("psnr", "maniqa", "topiq_nr", "fsim", "psnrr", "maniqa-koniqq"):
        try:  # the score stage's own look-up
            metric_info(name)
            accepted = True
        except KeyError:
            accepted = False
        assert preflight.known_metric(name) == accepted, name
    assert not preflight.known_metric("psnrr")


def test_objective_metrics_must_be_scored(tmp_path):
    found = problems(
        tmp_path,
        select__objectives={
            "fidelity": {"psnr": 1.0, "lpips": 1.0},
            "perception": {},
            "united": {"piqe": 1.0},
        },
    )
    assert found == {
        "select.objectives.fidelity": [
            "metric(s) [lpips] are not in score.metrics [psnr, ssim, fsim, gmsd, vif, nlpd, piqe]"
        ],
        "select.objectives.perception": ["has no metrics (it could never choose a winner)"],
    }


def test_objectives_must_be_select_objectives(tmp_path):
    found = problems(tmp_path, objectives=["fidelity", "sharpness", "human"])
    assert found["objectives"] == [
        "'sharpness' is not a select objective (select.objectives: [fidelity, perception, "
        "united]; 'human' needs 'annotations')",
        "'human' is not a select objective (select.objectives: [fidelity, perception, "
        "united]; 'human' needs 'annotations')",
    ]
    (tmp_path / "votes.csv").write_text("annotator,image_id,instance_id,best,worst,flagged\n")
    assert problems(tmp_path, objectives=["human"], annotations="votes.csv") == {}


# --- data ------------------------------------------------------------------------------------


def test_missing_data_paths_are_named(tmp_path):
    found = problems(
        tmp_path,
        degrade__source="data/LSDIR",
        testsets={
            "synthetic": {"kind": "synthetic", "path": "results/data/test"},
            "RealSR": {"kind": "paired", "path": "data/RealSR"},
        },
        annotations="votes.csv",
    )
    assert list(found) == ["degrade.source", "testsets.RealSR.path", "annotations"]
    assert found["degrade.source"][0].startswith("'data/LSDIR' does not exist (folder of HQ")
    assert found["testsets.RealSR.path"][0].startswith(
        "'data/RealSR' does not exist (paired test set; put it there or remove it"
    )
    assert found["annotations"][0].startswith("'votes.csv' does not exist (human annotation")
    # results/... test sets are made by the degrade rule and never checked
    assert "testsets.synthetic.path" not in found


# --- models and candidate settings -----------------------------------------------------------


def test_candidate_settings_need_configured_variants_and_unique_names(tmp_path):
    settings = [
        {"name": "a", "variant": "rank16"},
        {"name": "a", "variant": "rank64"},
        {"name": "c", "variant": "rank32"},
    ]
    found = problems(tmp_path, candidates__settings__onestep=settings)
    assert found == {
        "candidates.settings.onestep": ["setting name(s) [a] used more than once"],
        "candidates.settings.onestep[2]": [
            "setting 'c': variant 'rank32' is not in pretrain.onestep.variants "
            "[base, rank16, rank64, grad1, grad4]"
        ],
    }


def test_a_base_variant_is_required(tmp_path):
    variants = {"rank16": {"lora_rank": 16}, "rank64": {"lora_rank": 64}}
    settings = [{"name": "r16", "variant": "rank16"}, {"name": "r64", "variant": "rank64"}]
    found = problems(
        tmp_path, pretrain__onestep__variants=variants, candidates__settings__onestep=settings
    )
    assert list(found) == ["pretrain.onestep.variants"]
    assert found["pretrain.onestep.variants"][0].startswith("needs a 'base' variant")


def test_onestep_settings_that_differ_only_in_steps_or_cfg_are_refused(tmp_path):
    settings = [
        {"name": "r16_cfg4", "variant": "rank16", "cfg": 4.0},
        {"name": "r16_cfg8", "variant": "rank16", "cfg": 8.0},
        {"name": "r64", "variant": "rank64"},
    ]
    found = problems(tmp_path, candidates__settings__onestep=settings)
    assert found == {
        "candidates.settings.onestep[0]": [
            "setting 'r16_cfg4' gives cfg, which one-step models ignore (one step, no sampling "
            "guidance): a setting picks a variant"
        ],
        "candidates.settings.onestep[1]": [
            "setting 'r16_cfg8' gives cfg, which one-step models ignore (one step, no sampling "
            "guidance): a setting picks a variant"
        ],
        "candidates.settings.onestep": [
            "settings [r16_cfg4, r16_cfg8] use the same variant 'rank16': one-step models "
            "ignore steps and cfg, so they would be identical"
        ],
    }


def test_onestep_variants_differing_only_in_vsd_keys_without_vsd_are_refused(tmp_path):
    # the old demo: cfg6/cfg12 with lambda_vsd 0 are the same model but for chance
    variants = {
        "base": {},
        "cfg6": {"cfg_vsd": 6.0},
        "cfg12": {"cfg_vsd": 12.0},
        "rank16": {"lora_rank": 16},
    }
    settings = [{"name": n, "variant": n} for n in ("cfg6", "cfg12", "rank16")]
    found = problems(
        tmp_path, pretrain__onestep__variants=variants, candidates__settings__onestep=settings
    )
    assert list(found) == ["candidates.settings.onestep"]
    assert found["candidates.settings.onestep"][0].startswith(
        "variants 'cfg6' and 'cfg12' have the same effective settings"
    )
    with_vsd = problems(
        tmp_path,
        pretrain__onestep__variants=variants,
        candidates__settings__onestep=settings,
        pretrain__onestep__model__lambda_vsd=1.0,
    )
    assert with_vsd == {}  # the VSD guidance now changes the models


def _multistep(**changes):
    config = copy.deepcopy(_preset("ci"))
    for dotted, value in changes.items():
        _set(config, dotted.replace("__", "."), value)
    return config


def test_multistep_settings_that_cannot_differ_are_refused(tmp_path):
    guidance_off = [
        {"name": "s2_cfg0.5", "variant": "base", "steps": 2, "cfg": 0.5},
        {"name": "s2_cfg1", "variant": "base", "steps": 2, "cfg": 1.0},
        {"name": "s4_cfg4.5", "variant": "base", "steps": 4, "cfg": 4.5},
    ]
    found = problems(tmp_path, _multistep(candidates__settings__multistep=guidance_off))
    assert found == {
        "candidates.settings.multistep": [
            "settings [s2_cfg0.5, s2_cfg1] would be identical (variant 'base', 2 steps; every "
            "cfg <= 1 runs the conditional branch only (no guidance))"
        ]
    }
    # a missing cfg is the model's default (pretrain.multistep.model.cfg), as candidates reads it
    default = [
        {"name": "s2", "variant": "base", "steps": 2},
        {"name": "s2_cfg3", "variant": "base", "steps": 2, "cfg": 3.0},
    ]
    config = _multistep(
        candidates__settings__multistep=default, pretrain__multistep__model__cfg=3.0
    )
    assert problems(tmp_path, config) == {
        "candidates.settings.multistep": [
            "settings [s2, s2_cfg3] would be identical (variant 'base', 2 steps; the same "
            "variant, steps and cfg)"
        ]
    }
    assert problems(tmp_path, _preset("ci")) == {}  # cfg 1.5 vs 4.5: guidance on, distinct


def test_segment_source_must_be_hq_or_a_setting(tmp_path):
    assert problems(tmp_path, segment__source="rank16") == {}
    found = problems(tmp_path, segment__source="rank32")
    assert found == {
        "segment.source": [
            "'rank32' is neither 'hq' nor a candidate setting of onestep "
            "[rank16, rank64, grad1, grad4]"
        ]
    }


def test_batch_sizes_must_split_over_the_gpus(tmp_path):
    found = problems(
        tmp_path, gpus={"pretrain": 3, "train": 3}, train__gradient_accumulation_steps=1
    )
    assert found == {
        "pretrain.onestep.batch_size": [
            "16 is not a multiple of gpus.pretrain (3): each DDP process takes an equal share"
        ],
        "train.batch_size": [
            "4 is not a multiple of gpus.train (3) x train.gradient_accumulation_steps (1)"
        ],
    }
    assert problems(tmp_path, gpus={"pretrain": 4, "train": 2}) == {}


# --- fast: no torch, no pyiqa ----------------------------------------------------------------


def test_check_is_fast_and_imports_neither_torch_nor_pyiqa():
    code = (
        "import sys, time, yaml; from pathlib import Path; start = time.monotonic(); "
        "from pipeline import preflight; "
        "config = yaml.safe_load(open('workflow/presets/paper_onestep.yaml')); "
        "n = len(preflight.find_problems(config, Path('.'))); "
        "print(n, 'torch' in sys.modules, 'pyiqa' in sys.modules, time.monotonic() - start)"
    )
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[:3] == [str(len(PAPER_EXPECTED["paper_onestep"])), "False", "False"]
    assert float(out[3]) < 2.0, out
    assert time.monotonic() - start < 10


def test_tiny_models_must_train_their_base(tmp_path):
    """Without weights the model is built from scratch: a frozen random base is refused (the
    schema's defaults, meant for a real SD base, would otherwise freeze it silently)."""
    model = {**DEMO["pretrain"]["onestep"]["model"], "train_base": False}
    found = problems(tmp_path, pretrain__onestep__model=model)
    assert list(found) == ["pretrain.onestep.model.train_base"]
    assert "'base'" in found["pretrain.onestep.model.train_base"][0]
    ci = _preset("ci")
    ci["pretrain"]["multistep"].pop("model")
    assert list(problems(tmp_path, ci)) == ["pretrain.multistep.model.train_unet"]
    weighted = copy.deepcopy(ci)
    weighted["pretrain"]["multistep"]["weights"] = str(tmp_path)
    assert "pretrain.multistep.model.train_unet" not in problems(tmp_path, weighted)


# --- the schema: a misspelt key named with its nearest valid names (docs/design.md §10) ------


def test_a_misspelt_key_is_named_with_the_nearest_names_and_its_file(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("trian: {max_steps: 3}\n")
    config = {**copy.deepcopy(DEMO), "trian": {"max_steps": 3}}
    with pytest.raises(PreflightError) as raised:
        preflight.check_schema(config, [str(REPO / "config.yaml"), str(mine)])
    assert raised.value.problems == [
        ("trian", f"unknown key at the top level (in {mine}); did you mean: train, pretrain?")
    ]
    assert len(str(raised.value).splitlines()) == 2  # no schema dump
    assert find_problems(config, REPO) == [
        ("trian", "unknown key at the top level; did you mean: train, pretrain?")
    ]


def test_a_nested_misspelt_key_and_a_bad_value_are_named(tmp_path):
    found = problems(tmp_path, train__max_stpes=3, degrade__crop_size=4, prompts__source="fixd")
    assert found == {
        "train.max_stpes": ["unknown key in train; did you mean: max_steps?"],
        "degrade.crop_size": ["4 is less than the minimum of 8"],
        "prompts.source": ["'fixd' is not one of ['fixed', 'captioner', 'tagger']"],
    }
    assert preflight.check_schema(DEMO, []) is None


# --- every key that names IQA metrics is checked against the registry the stages use ---------

#: each key with a misspelt metric ('piqee', for piqe) where it names metrics
METRIC_CASES = {
    "score.metrics": [*DEMO["score"]["metrics"], "piqee"],
    "evaluate.metrics": [*DEMO["evaluate"]["metrics"], "piqee"],
    "score.weights": {"piqee": "w.pth"},
    "score.options": {"piqee": {}},
    "evaluate.weights": {"piqee": "w.pth"},
    "evaluate.options": {"piqee": {}},
    "select.objectives": {"fidelity": {"psnr": 1.0}, "perception": {"piqee": 1.0}},
    "train.gdpo_fidelity_metrics": ["piqee"],
    "train.gdpo_detail_metrics": ["piqee"],
    "train.ea_adam.objectives": {"perception": {"piqee": 1.0}, "fidelity": {"psnr": 1.0}},
    "report.radar_metrics": ["piqee"],
    "report.front_objectives": {"perception": {"piqee": 1.0}, "fidelity": {"psnr": 1.0}},
    "human_eval.simulate.metric": "piqee",
}


def _schema_metric_keys(node: dict, path: str = "") -> set[str]:
    """Every schema key named for metrics or described as a {metric: ...} map."""
    import re

    found = set()
    for key, sub in (node.get("properties") or {}).items():
        dotted = f"{path}.{key}" if path else key
        text = str(sub.get("description", ""))
        if "metric" in key or re.search(r"\{metric|per metric|metric weights", text):
            found.add(dotted)
        found |= _schema_metric_keys(sub, dotted)
    return found


def test_every_key_that_names_metrics_is_checked():
    from pipeline import settings

    schema_keys = _schema_metric_keys(settings._schema())
    assert schema_keys == set(METRIC_CASES) == {key for key, *_ in preflight.METRIC_KEYS}


@pytest.mark.parametrize("key", sorted(METRIC_CASES))
def test_a_misspelt_metric_is_named_under_its_key(tmp_path, key):
    (tmp_path / "w.pth").write_bytes(b"")
    found = problems(tmp_path, **{key.replace(".", "__"): METRIC_CASES[key]})
    named = [(k, m) for k, messages in found.items() for m in messages if "piqee" in m]
    assert len(named) == 1, found
    where, message = named[0]
    assert where.startswith(key)
    assert message.startswith("unknown IQA metric(s) [piqee] (did you mean: piqe, ")


def test_metrics_a_key_reads_must_be_scored_or_evaluated(tmp_path):
    front = {"perception": {"piqe": 1.0}, "fidelity": {"lpips": 1.0}}
    found = problems(
        tmp_path, report__radar_metrics=["psnr", "lpips"], report__front_objectives=front
    )
    evaluated = "[psnr, ssim, fsim, gmsd, vif, nlpd, piqe]"
    assert found == {
        "report.radar_metrics": [f"metric(s) [lpips] are not in evaluate.metrics {evaluated}"],
        "report.front_objectives.fidelity": [
            f"metric(s) [lpips] are not in evaluate.metrics {evaluated}"
        ],
    }


def test_gdpo_metrics_are_checked_before_the_gdpo_job():
    ci = _preset("ci")  # runs gdpo and gdpo_instance
    assert problems(REPO, ci) == {}
    assert problems(REPO, ci, train__gdpo_fidelity_metrics=["lpips"]) == {
        "train.gdpo_fidelity_metrics": [
            "metric(s) [lpips] are not in score.metrics [psnr, ssim, gmsd, piqe]"
        ]
    }
    kinds = problems(
        REPO, ci, train__gdpo_fidelity_metrics=["piqe"], train__gdpo_detail_metrics=["psnr"]
    )
    assert kinds == {
        "train.gdpo_fidelity_metrics": ["[piqe] are not full-reference (gdpo's fidelity term)"],
        "train.gdpo_detail_metrics": ["[psnr] are not no-reference (gdpo's detail term)"],
    }
    shared = problems(
        REPO,
        ci,
        train__gdpo_fidelity_metrics=["psnr", "ssim"],
        train__gdpo_detail_metrics=["piqe", "ssim"],
    )
    assert shared["train.gdpo_detail_metrics"][0] == (
        "shares [ssim] with train.gdpo_fidelity_metrics"
    )
    # without a gdpo method the defaults (maniqa, musiq: not scored by the demo) are no problem
    assert "gdpo" not in DEMO["methods"] and problems(REPO) == {}


def test_gdpo_stage_refuses_what_preflight_refuses():
    from pipeline.settings import ConfigError, reward_settings
    from pipeline.training.config import TrainConfig
    from pipeline.training.gdpo import GroupReward

    ci = _set(_preset("ci"), "train.gdpo_fidelity_metrics", ["lpips"])
    assert list(problems(REPO, ci)) == ["train.gdpo_fidelity_metrics"]
    config = TrainConfig.from_dict({"gdpo_fidelity_metrics": ["lpips"]})
    with pytest.raises(ConfigError, match="lpips"):
        GroupReward(reward_settings(ci, "fidelity"), config, 0)


# --- ea_adam, prompts, degrade and the other run-time checks, up front -----------------------


def test_ea_adam_needs_the_perception_and_fidelity_objectives(tmp_path):
    fidelity_only = {"fidelity": DEMO["select"]["objectives"]["fidelity"]}
    found = problems(tmp_path, methods=["dspo", "ea_adam"], select__objectives=fidelity_only)
    assert found == {
        "select.objectives": [
            "methods has 'ea_adam', which trains on the pairs of objectives [perception, "
            "fidelity]; select.objectives has no [perception]"
        ]
    }
    fitness = {"perception": {"piqe": 1.0}}
    found = problems(tmp_path, methods=["dspo", "ea_adam"], train__ea_adam__objectives=fitness)
    assert found == {
        "train.ea_adam.objectives": [
            "ea_adam's fitness needs metric weights of [perception, fidelity]; it has no [fidelity]"
        ]
    }
    assert problems(tmp_path, methods=["dspo", "ea_adam"]) == {}


def test_a_fixed_prompt_equal_to_its_negative_prompt_is_refused(tmp_path):
    from pipeline import guidance

    same = {"source": "fixed", "prompt": "blurry", "added_prompt": "", "negative_prompt": "blurry"}
    message = (
        "equals the prompt 'blurry' (prompts.prompt + added_prompt, as the prompts stage joins "
        "them): guidance would change nothing (docs/design.md §9)"
    )
    assert problems(tmp_path, prompts=same) == {"prompts.negative_prompt": [message]}
    joined = {**same, "prompt": "blurry, ", "added_prompt": " blurry"}
    assert problems(tmp_path, prompts=joined) == {"prompts.negative_prompt": [message]}
    assert problems(tmp_path, prompts={**same, "added_prompt": "sharp"}) == {}
    # the prompts stage refuses the same rows
    import pandas as pd

    row = {
        "image_id": "a",
        "prompt": guidance.join_prompts("blurry, ", " blurry"),
        "negative_prompt": guidance.join_prompts("blurry"),
    }
    with pytest.raises(guidance.PromptsError):
        guidance.check_guidance(pd.DataFrame([row]))


def test_prompt_sources_need_their_model(tmp_path):
    found = problems(tmp_path, prompts={"source": "captioner"})
    assert found == {"prompts.captioner": ["source 'captioner' needs a BLIP folder (it is null)"]}
    found = problems(tmp_path, prompts={"source": "tagger"})
    assert found.pop("prompts.tagger") == ["source 'tagger' needs a RAM checkpoint (it is null)"]
    ram = "'tagger' needs the Python package 'ram' (recognize-anything), which is not installed"
    assert found == ({} if importlib.util.find_spec("ram") else {"prompts.source": [ram]})


def test_degrade_crop_size_must_be_a_multiple_of_the_scale(tmp_path):
    from pipeline import degrade

    assert problems(tmp_path, degrade__crop_size=30) == {
        "degrade.crop_size": [
            "30 is not a multiple of degrade.degradation.scale (4): the LQ is the crop "
            "downscaled by it"
        ]
    }
    with pytest.raises(ValueError, match="crop_size"):  # as the degrade stage refuses it
        degrade.stage_config({"crop_size": 30})
    assert problems(tmp_path, degrade__crop_size=30, degrade__degradation={"scale": 2}) == {}
    degrade.stage_config({"crop_size": 30, "degradation": {"scale": 2}})


def test_other_run_time_checks_come_first(tmp_path):
    from pipeline import report

    assert problems(tmp_path, report__radar_floor=1.0) == {  # the schema says so now
        "report.radar_floor": ["1.0 is greater than or equal to the maximum of 1"]
    }
    with pytest.raises(ValueError, match="radar_floor"):
        report.stage_config({"radar_floor": 1.0})
    ci = _preset("ci")  # runs ddpo
    assert problems(REPO, ci, train__stat_tracker_min_count=3) == {
        "train.stat_tracker_min_count": [
            "3 exceeds train.stat_tracker_buffer_size (2): ddpo's tracker could never use an "
            "LQ's own statistics"
        ]
    }


# --- after a kill: Snakemake's lock files (docs/design.md §10) -------------------------------


def test_lock_files_give_a_hint_naming_snakemake_unlock(tmp_path):
    assert preflight.lock_hint(tmp_path) is None
    locks = tmp_path / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    assert preflight.lock_hint(tmp_path) is None
    (locks / "0.input.lock").write_text(str(tmp_path / "results"))
    hint = preflight.lock_hint(tmp_path)
    assert "snakemake --unlock" in hint and ".snakemake/locks" in hint


def test_snakemake_names_a_misspelt_key_briefly_and_hints_at_locks(tmp_path):
    from tests.workflow_helpers import copy_workflow, snakemake

    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "mine.yaml").write_text("trian: {max_steps: 3}\n")
    locks = workdir / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.input.lock").write_text(str(workdir / "results"))
    result = snakemake(
        workdir, "--dry-run", "--configfile", "config.yaml", "mine.yaml", check=False
    )
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "trian: unknown key at the top level (in mine.yaml); did you mean: train" in out
    assert len(out.splitlines()) < 40, out
    assert "snakemake --unlock" in out
