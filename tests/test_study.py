"""The Figure 1 study (pipeline/study.py): the planted candidates have the intended property under
the real select logic, the artifact measure equals a hand computation, the study's settings take
effect, and the study's rules plan the jobs its settings ask for."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import contracts, settings, study
from pipeline import select as select_stage
from pipeline.contracts import WHOLE_IMAGE_ID
from tests.workflow_helpers import copy_workflow, planned_jobs

SIZE = 32


def scene(seed: int = 0):
    """An HQ whose left half is textured (noise), right half smooth (a flat colour with a faint
    ramp), cut into four instances (two per half), and a base output close to the HQ."""
    rng = np.random.default_rng(seed)
    hq = np.empty((SIZE, SIZE, 3))
    hq[:, : SIZE // 2] = rng.uniform(0.2, 0.8, (SIZE, SIZE // 2, 3))
    hq[:, SIZE // 2 :] = 0.5 + np.linspace(0, 0.02, SIZE // 2)[None, :, None]
    hq = np.rint(hq * 255).astype(np.uint8)
    label_map = np.zeros((SIZE, SIZE), dtype=np.uint16)
    label_map[SIZE // 2 :, : SIZE // 2] = 1
    label_map[: SIZE // 2, SIZE // 2 :] = 2
    label_map[SIZE // 2 :, SIZE // 2 :] = 3
    base = np.clip(hq.astype(int) + rng.integers(-3, 4, hq.shape), 0, 255).astype(np.uint8)
    return hq, label_map, base


def planted(strength=0.08, margin=2.0, seed=0):
    hq, label_map, base = scene(seed)
    kinds = study.region_kinds(study.unit(hq), label_map, 0.5)
    masks = study.kind_masks(label_map, kinds)
    candidates, amplitude = study.plant(base, masks, strength, margin)
    return hq, label_map, base, kinds, masks, candidates, amplitude


def pairs_of(image_id, candidates, hq, label_map):
    """The real select logic on the study's scores: (image pair row, instance pairs)."""
    scores = pd.DataFrame(study.score_rows(image_id, candidates, hq, label_map))
    chosen = select_stage.best_and_worst(select_stage.objective_scores(scores, {study.METRIC: 1.0}))
    whole = chosen["instance_id"] == WHOLE_IMAGE_ID
    return chosen[whole].iloc[0], chosen[~whole], scores


def test_candidates_on_the_hq_give_pairs_under_the_real_select_logic():
    """With the HQ as base a clean instance has zero error: PSNR stays finite (100 dB) so
    select's min-max normalisation gives every instance a pair."""
    hq, label_map, _ = scene()
    masks = study.kind_masks(label_map, study.region_kinds(study.unit(hq), label_map, 0.5))
    candidates, _ = study.plant(hq, masks, 0.08, 2.0)
    image_pair, instance_pairs, scores = pairs_of("a", candidates, hq, label_map)
    assert scores["value"].max() == pytest.approx(100.0)
    assert image_pair["winner"] == study.CHECKER and len(instance_pairs) == 4


def test_regions_split_by_the_hq_texture():
    hq, label_map, *_ = scene()
    kinds = study.region_kinds(study.unit(hq), label_map, 0.5)
    assert {i: kind for i, (kind, _) in kinds.items()} == {
        0: "textured",
        1: "textured",
        2: "smooth",
        3: "smooth",
    }


def test_image_winner_is_better_overall_yet_carries_the_artifact_on_textured_instances():
    hq, label_map, base, kinds, masks, candidates, _ = planted()
    image_pair, instance_pairs, scores = pairs_of("a", candidates, hq, label_map)
    # image level: the checkerboard candidate wins (higher whole-image PSNR) ...
    assert (image_pair["winner"], image_pair["loser"]) == (study.CHECKER, study.CAST)
    whole = scores[scores["instance_id"] == WHOLE_IMAGE_ID].set_index("candidate")["value"]
    assert whole[study.CHECKER] > whole[study.CAST] + 1.0  # dB
    # ... yet carries the full artifact on every textured instance
    delta = study.unit(candidates[study.CHECKER]) - study.unit(base)
    pattern = study.checker_pattern(SIZE, SIZE)
    carried = study.adoption([delta], [pattern], [masks["textured"]], 0.08)
    assert carried == pytest.approx(1.0, abs=0.03)
    # instance level: every instance's winner is the candidate that is clean there
    winners = dict(zip(instance_pairs["instance_id"], instance_pairs["winner"], strict=True))
    assert winners == {0: study.CAST, 1: study.CAST, 2: study.CHECKER, 3: study.CHECKER}
    for instance_id, winner in winners.items():
        inside = label_map == instance_id
        assert np.array_equal(candidates[winner][inside], base[inside]), instance_id
        assert kinds[instance_id][0] == ("textured" if winner == study.CAST else "smooth")


def test_cast_amplitude_sets_the_whole_image_error_ratio():
    _, _, base, _, masks, candidates, amplitude = planted(strength=0.05, margin=3.0)
    errors = {n: ((study.unit(c) - study.unit(base)) ** 2).sum() for n, c in candidates.items()}
    # up to the rounding to grey levels (0.05 * 255 = 12.75 -> 13)
    assert errors[study.CAST] / errors[study.CHECKER] == pytest.approx(3.0, rel=0.08)
    textured, smooth = masks["textured"].sum(), masks["smooth"].sum()
    assert amplitude == pytest.approx(0.05 * np.sqrt(3.0 * textured / smooth))


def test_adoption_equals_a_hand_computation():
    # 2 x 2 image, one channel carries a change; the checkerboard is [[1, -1], [-1, 1]]
    delta = np.zeros((2, 2, 3))
    delta[0, 0] = [0.02, 0.0, 0.0]  # pattern +1
    delta[0, 1] = [0.01, 0.01, 0.01]  # pattern -1
    delta[1, 1] = [0.0, 0.03, 0.0]  # pattern +1
    pattern = study.checker_pattern(2, 2)
    mask = np.array([[True, True], [False, True]])
    # sum(delta * p) over the 3 masked pixels = 0.02 - 0.03 + 0.03 = 0.02; sum(p^2) = 9
    expected = 0.02 / (9 * 0.1)
    assert study.adoption([delta], [pattern], [mask], 0.1) == pytest.approx(expected)
    # pooled over two images: numerators and energies add
    second = np.full((2, 2, 3), 0.01) * pattern  # +0.01 along the pattern everywhere
    both = study.adoption([delta, second], [pattern, pattern], [mask, np.ones((2, 2), bool)], 0.1)
    assert both == pytest.approx((0.02 + 0.12) / ((9 + 12) * 0.1))
    cast = study.cast_pattern(2, 2)
    assert study.adoption([delta], [cast], [mask], 1.0) == pytest.approx((0.02 + 0.01 + -0.03) / 9)


def test_artifact_strength_changes_the_candidates_and_the_pairs():
    weak = planted(strength=0.04)
    strong = planted(strength=0.12)
    assert not np.array_equal(weak[5][study.CHECKER], strong[5][study.CHECKER])
    weak_pairs = pairs_of("a", weak[5], weak[0], weak[1])[2]
    strong_pairs = pairs_of("a", strong[5], strong[0], strong[1])[2]
    assert not np.allclose(weak_pairs["value"], strong_pairs["value"])
    delta = study.unit(strong[5][study.CHECKER]) - study.unit(strong[2])
    assert study.adoption([delta], [study.checker_pattern(SIZE, SIZE)], [strong[4]["textured"]],
                          0.04) == pytest.approx(3.0, abs=0.1)  # fmt: skip


def test_image_margin_below_one_removes_the_dilemma():
    hq, label_map, _, _, _, candidates, _ = planted(margin=0.5)
    image_pair, *_ = pairs_of("a", candidates, hq, label_map)
    assert image_pair["winner"] == study.CAST


def test_study_settings_come_from_the_schema_and_reach_the_jobs():
    assert study.study_settings({}) == settings.defaults("study")
    assert len(settings.defaults("study")["seeds"]) >= 3
    config = {"train": {"max_steps": 30, "learning_rate": 1e-4},
              "study": {"train": {"max_steps": 7}}}  # fmt: skip
    dpo = study.train_settings(config, "dpo")
    assert (dpo["max_steps"], dpo["learning_rate"]) == (7, 1e-4)
    with pytest.raises(settings.ConfigError, match="max_stepz"):
        study.train_settings({"study": {"train": {"max_stepz": 7}}}, "dpo")
    assert study.select_settings({})["objectives"] == {study.OBJECTIVE: {study.METRIC: 1.0}}
    assert study.segment_settings({"segment": {"source": "rank16"}})["source"] == "hq"
    with pytest.raises(settings.ConfigError, match="artifact_strength"):
        study.study_settings({"study": {"artifact_strength": 0}})


def test_interval_is_students_t_over_seeds():
    mean, low, high = study.interval([1.0, 2.0, 3.0])
    # t(0.975, 2) = 4.3027; sem = 1 / sqrt(3)
    assert (mean, high - mean) == pytest.approx((2.0, 4.302653 / np.sqrt(3)), rel=1e-5)
    assert low == pytest.approx(2 * mean - high)


def test_verdict_follows_the_stated_rule():
    def summary(dpo_low, dspo_low):
        return pd.DataFrame([
            {"method": "dpo", "region": "textured", "signature": study.CHECKER, "low": dpo_low},
            {"method": "dspo", "region": "textured", "signature": study.CHECKER, "low": dspo_low},
        ])  # fmt: skip

    assert study.verdict(summary(0.01, -0.02), (0.03, 0.01, 0.05, 3)) == "supported"
    assert study.verdict(summary(-0.01, -0.02), (0.0, -0.01, 0.01, 3)).startswith("not supported")
    assert study.verdict(summary(0.01, 0.01), (0.0, -0.01, 0.01, 3)).startswith("not supported")
    assert study.verdict(summary(0.01, 0.005), (0.01, 0.001, 0.02, 3)).startswith("partly")


@pytest.mark.slow
def test_study_rules_plan_one_train_job_per_method_and_seed(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "two.yaml").write_text(yaml.safe_dump({"study": {"seeds": [3, 4]}}))
    jobs = planned_jobs(workdir, "study", "--configfile", "config.yaml", "two.yaml")
    assert jobs["study_train"] == 4 and jobs["study_select"] == 1
    assert jobs["study_segment"] == 2  # the training and the held-out images
    # the study is its own target, not part of the demo's rule all
    assert "study_train" not in planned_jobs(workdir)


def test_study_artifacts_are_contract_paths():
    assert contracts.artifact("study_aligned", method="dpo", seed=1) == (
        "results/study/aligned/dpo/seed1"
    )
    assert contracts.artifact("study_pairs", level="_image").endswith(
        f"{study.OBJECTIVE}_image.parquet"
    )


def test_train_overrides_rerun_the_train_jobs_only(tmp_path):
    plain = study.rule_jobs({}, tmp_path)
    changed = study.rule_jobs({"study": {"train": {"beta": 80.0}, "seeds": [5, 6, 7]}}, tmp_path)
    assert plain["study"] == changed["study"] and plain["select"] == changed["select"]
    assert plain["train_dpo"] != changed["train_dpo"]
    assert '"beta":80.0' in changed["train_dspo"][0]
    assert (tmp_path / changed["train_dpo"][1].split("/")[-1]).is_file()
