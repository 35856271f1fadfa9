"""The Figure 1 study (pipeline/study.py): the planted candidates of the main arm and of the
controls have the intended property under the real select logic, the artifact measure equals a
hand computation, the decision rule puts the positive control first, the study's settings take
effect, the report and its section state the design before the numbers, and the study's rules
plan the jobs its settings ask for (in rule all when study.in_report)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import contracts, settings, study
from pipeline import select as select_stage
from pipeline.contracts import WHOLE_IMAGE_ID
from pipeline.io.tables import write_table
from pipeline.seeding import numpy_rng
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


def pairs_of(image_id, candidates, hq, label_map, arm=study.MAIN):
    """The real select logic on the study's scores under the arm's select settings:
    (image pair row, instance pairs, scores)."""
    scores = pd.DataFrame(study.score_rows(image_id, candidates, hq, label_map))
    weights = study.select_settings({}, arm)["objectives"][study.OBJECTIVE]
    chosen = select_stage.best_and_worst(select_stage.objective_scores(scores, weights))
    whole = chosen["instance_id"] == WHOLE_IMAGE_ID
    image = chosen[whole].iloc[0] if whole.any() else None
    return image, chosen[~whole], scores


def arm_scene(arm, strength=0.08, seed=0):
    hq, label_map, _ = scene(seed)
    kinds = study.region_kinds(study.unit(hq), label_map, 0.5)
    masks = study.kind_masks(label_map, kinds)
    rng = numpy_rng(0, study.STAGE, "noise", "a")
    candidates, planted = study.arm_candidates(arm, hq, masks, strength, 2.0, rng)
    return hq, label_map, masks, candidates, planted


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
    assert study.adoption(
        [delta], [study.checker_pattern(SIZE, SIZE)], [strong[4]["textured"]], 0.04
    ) == pytest.approx(3.0, abs=0.1)


def test_image_margin_below_one_removes_the_dilemma():
    hq, label_map, _, _, _, candidates, _ = planted(margin=0.5)
    image_pair, *_ = pairs_of("a", candidates, hq, label_map)
    assert image_pair["winner"] == study.CAST


def test_positive_control_pairs_the_checkerboard_over_the_clean_base():
    """Reversed objective (PSNR weight -1): the checkerboard candidate wins the image and every
    textured instance against the clean base; smooth instances are identical, so no pair."""
    hq, label_map, masks, candidates, planted = arm_scene(study.POSITIVE)
    assert set(candidates) == {study.CHECKER, study.CLEAN}
    assert np.array_equal(candidates[study.CLEAN], hq)
    assert study.select_settings({}, study.POSITIVE)["objectives"] == {
        study.OBJECTIVE: {study.METRIC: -1.0}
    }
    image_pair, instance_pairs, _ = pairs_of("a", candidates, hq, label_map, study.POSITIVE)
    assert (image_pair["winner"], image_pair["loser"]) == (study.CHECKER, study.CLEAN)
    assert sorted(instance_pairs["instance_id"]) == [0, 1]  # the textured ones
    assert set(instance_pairs["winner"]) == {study.CHECKER}
    # the winner minus the loser is exactly the planted checkerboard on textured instances
    delta = study.unit(candidates[study.CHECKER]) - study.unit(candidates[study.CLEAN])
    pattern = study.checker_pattern(SIZE, SIZE)
    assert study.adoption([delta], [pattern], [masks["textured"]], 0.08) == pytest.approx(
        1.0, abs=0.03
    )
    assert planted == {"textured": (study.CHECKER, 0.08), "smooth": ("", 0.0)}


def test_negative_control_pairs_carry_neither_artifact():
    """clean vs white noise: the clean base wins everywhere under PSNR; the noise (seeded per
    image) has almost no checkerboard or cast component."""
    hq, label_map, masks, candidates, planted = arm_scene(study.NEGATIVE)
    assert set(candidates) == {study.CLEAN, study.NOISE}
    image_pair, instance_pairs, _ = pairs_of("a", candidates, hq, label_map, study.NEGATIVE)
    assert image_pair["winner"] == study.CLEAN
    assert len(instance_pairs) == 4 and set(instance_pairs["winner"]) == {study.CLEAN}
    noise = study.unit(candidates[study.NOISE]) - study.unit(hq)
    assert 0.06 < noise.std() < 0.09  # about artifact_strength (0.08), clipped at 0 and 1
    # the noise projected on each signature: ~ 0.08 / sqrt(pixels) / 0.08, far below 1
    for signature in (study.checker_pattern(SIZE, SIZE), study.cast_pattern(SIZE, SIZE)):
        for region in study.REGIONS:
            assert abs(study.adoption([noise], [signature], [masks[region]], 0.08)) < 0.1
    # the same image's noise is the same draw; another image's differs
    again = arm_scene(study.NEGATIVE)[3][study.NOISE]
    assert np.array_equal(again, candidates[study.NOISE])
    other = study.arm_candidates(
        study.NEGATIVE, hq, masks, 0.08, 2.0, numpy_rng(0, study.STAGE, "noise", "b")
    )[0][study.NOISE]
    assert not np.array_equal(other, candidates[study.NOISE])
    assert planted == {"textured": (study.NOISE, 0.08), "smooth": (study.NOISE, 0.08)}


def test_controls_choose_the_arms():
    assert study.arms(study.study_settings({})) == [study.MAIN, study.POSITIVE, study.NEGATIVE]
    assert study.arms(study.study_settings({"study": {"controls": ["negative"]}})) == [
        study.MAIN,
        study.NEGATIVE,
    ]
    assert study.arms(study.study_settings({"study": {"controls": []}})) == [study.MAIN]
    with pytest.raises(settings.ConfigError, match="controls"):
        study.study_settings({"study": {"controls": ["sideways"]}})


def test_study_settings_come_from_the_schema_and_reach_the_jobs():
    assert study.study_settings({}) == settings.defaults("study")
    assert len(settings.defaults("study")["seeds"]) >= 3
    config = {
        "train": {"max_steps": 30, "learning_rate": 1e-4},
        "study": {"train": {"max_steps": 7}},
    }
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


def _summary(dpo_low, dspo_low, positive_low=0.02):
    rows = [
        {"arm": study.MAIN, "method": "dpo", "low": dpo_low},
        {"arm": study.MAIN, "method": "dspo", "low": dspo_low},
    ]
    if positive_low is not None:
        rows.append({"arm": study.POSITIVE, "method": "dpo", "low": positive_low})
    frame = pd.DataFrame(rows).assign(region="textured", signature=study.CHECKER)
    return frame.assign(mean=frame["low"] + 0.01, high=frame["low"] + 0.02)


def test_verdict_follows_the_stated_rule():
    assert study.verdict(_summary(0.01, -0.02), (0.03, 0.01, 0.05, 3)) == "supported"
    assert study.verdict(_summary(-0.01, -0.02), (0.0, -0.01, 0.01, 3)).startswith("not supported")
    assert study.verdict(_summary(0.01, 0.01), (0.0, -0.01, 0.01, 3)).startswith("not supported")
    assert study.verdict(_summary(0.01, 0.005), (0.01, 0.001, 0.02, 3)).startswith("partly")


def test_without_an_adopting_positive_control_the_main_arm_is_not_interpretable():
    # the main arm would read "supported", but the positive control's interval reaches 0
    outcome = study.verdict(_summary(0.01, -0.02, positive_low=-0.001), (0.03, 0.01, 0.05, 3))
    assert outcome.startswith("not interpretable")
    assert study.positive_control_adopts(_summary(0.0, 0.0, positive_low=-0.001)) is False
    # no positive control run: the main verdict, flagged as unchecked
    unchecked = study.verdict(_summary(0.01, -0.02, positive_low=None), (0.03, 0.01, 0.05, 3))
    assert unchecked.startswith("supported (no positive control run")
    assert study.positive_control_adopts(_summary(0.0, 0.0, positive_low=None)) is None


@pytest.mark.slow
def test_study_rules_plan_one_train_job_per_arm_method_and_seed(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    overlay = {"study": {"seeds": [3, 4], "controls": ["positive"], "in_report": False}}
    (workdir / "two.yaml").write_text(yaml.safe_dump(overlay))
    jobs = planned_jobs(workdir, "study", "--configfile", "config.yaml", "two.yaml")
    # arms main and positive x methods dspo, dpo x seeds 3, 4
    assert jobs["study_train"] == 8 and jobs["study_select"] == jobs["study_build"] == 2
    assert jobs["study_segment"] == 2  # the training and the held-out images
    # study.in_report false: the study is its own target, not part of rule all ...
    assert "study_train" not in planned_jobs(workdir, "--configfile", "config.yaml", "two.yaml")
    # ... true: rule all runs it (the report reads its section), every arm
    both = {"study": {"in_report": True, "controls": ["positive", "negative"]}}
    (workdir / "in.yaml").write_text(yaml.safe_dump(both))
    in_all = planned_jobs(workdir, "--configfile", "config.yaml", "in.yaml")
    assert in_all["study_train"] == 3 * 2 * 3 and in_all["study_report"] == 1
    assert in_all["report"] == 1


def test_in_report_puts_the_section_into_the_studys_framework_report_only():
    on = study.study_settings({"study": {"in_report": True}})
    assert study.report_inputs(on, "onestep") == {
        "section": "results/study/section.md",
        "plot": "results/study/adoption.png",
    }
    assert study.report_inputs(on, "multistep") == {}
    assert study.report_inputs(study.study_settings({}), "onestep") == {}


def test_study_artifacts_are_contract_paths():
    assert contracts.artifact("study_aligned", arm="main", method="dpo", seed=1) == (
        "results/study/main/aligned/dpo/seed1"
    )
    assert contracts.artifact("study_pairs", arm="positive", level="_image").endswith(
        f"positive/pairs/{study.OBJECTIVE}_image.parquet"
    )
    assert study.aligned_paths(["main", "negative"], ["dpo"], [0]) == {
        ("main", "dpo", 0): "results/study/main/aligned/dpo/seed0",
        ("negative", "dpo", 0): "results/study/negative/aligned/dpo/seed0",
    }


def test_train_overrides_rerun_the_train_jobs_only(tmp_path):
    plain = study.rule_jobs({}, tmp_path)
    changed = study.rule_jobs(
        {"study": {"train": {"beta": 80.0}, "seeds": [5, 6, 7], "controls": []}}, tmp_path
    )
    for job in ("study", "build", "select_main", "select_positive"):
        assert plain[job] == changed[job], job
    assert plain["train_dpo"] != changed["train_dpo"]
    assert '"beta":80.0' in changed["train_dspo"][0]
    assert (tmp_path / changed["train_dpo"][1].split("/")[-1]).is_file()
    # the measure and report settings do not rerun the candidates
    report_only = study.rule_jobs({"study": {"ci_level": 0.9, "max_images": 3}}, tmp_path)
    assert report_only["build"] == plain["build"] and report_only["study"] != plain["study"]
    assert study.rule_jobs({"study": {"image_margin": 3.0}}, tmp_path)["build"] != plain["build"]


def _adoption_frame(values):
    """values: {(arm, method): [adoption per seed]} of the checkerboard on textured instances;
    every other (region, signature) gets 0."""
    rows = []
    for (arm, method_name), seeds in values.items():
        for seed, value in enumerate(seeds):
            for region in study.REGIONS:
                for name in study.SETTINGS:
                    hit = (region, name) == ("textured", study.CHECKER)
                    rows.append(
                        {
                            "arm": arm,
                            "method": method_name,
                            "seed": seed,
                            "region": region,
                            "signature": name,
                            "adoption": value if hit else 0.0,
                            "amplitude": 0.08,
                            "n_images": 2,
                            "n_pixels": 100,
                        }
                    )
    return pd.DataFrame(rows)


STUDY_VALUES = {
    ("positive", "dpo"): [0.10, 0.12, 0.11],
    ("positive", "dspo"): [0.05, 0.06, 0.07],
    ("main", "dpo"): [0.00, 0.01, -0.01],
    ("main", "dspo"): [-0.03, -0.04, -0.02],
    ("negative", "dpo"): [0.001, -0.001, 0.0],
    ("negative", "dspo"): [-0.02, -0.03, -0.025],
}


def test_section_states_design_before_numbers_and_every_arm():
    frame = _adoption_frame(STUDY_VALUES)
    summary = study.summarise(frame)
    difference = study.paired_difference(frame, "dpo", "dspo", "textured", study.CHECKER)
    # paired by seed: 0.03, 0.05, 0.01 -> mean 0.03
    assert difference[0] == pytest.approx(0.03) and difference[3] == 3
    outcome = study.verdict(summary, difference)
    assert outcome.startswith("not supported (Diffusion-DPO")  # main dpo's interval covers 0
    text = study.section(
        summary=summary,
        difference=difference,
        outcome=outcome,
        config=study.study_settings({}),
        train={"max_steps": 30, "beta": 8000.0},
        seeds=[0, 1, 2],
        held_out=24,
    )
    first_number = text.index("| positive control | dpo |")
    for stated in ("**Hypothesis.**", "**Controls**", "**Measure.**", "**Decision rule.**"):
        assert text.index(stated) < first_number, stated
    # positive control dpo: mean 0.11, t(0.975, 2) * 0.01 / sqrt(3) = 0.0248
    assert "| positive control | dpo | +0.1100 [+0.0852, +0.1348] |" in text
    assert (
        text.index("| positive control |")
        < text.index("| main arm |")
        < text.index("| negative control |")
    )
    assert f"**Outcome: {outcome}.**" in text
    assert "Negative control" in text and "dspo -0.0250 [" in text and "(excludes 0)" in text


def test_report_copies_the_study_section_into_the_demo_report(tmp_path):
    from pipeline import report as report_stage

    (tmp_path / "report.md").write_text("# report\n\nbody\n")
    (tmp_path / "section.md").write_text("## Figure 1 study\n\nnumbers\n")
    (tmp_path / "adoption.png").write_bytes(b"png bytes")
    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.md").write_text("# report\n\nbody\n")
    name = report_stage.append_study_section(
        out / "report.md", tmp_path / "section.md", tmp_path / "adoption.png"
    )
    text = (out / "report.md").read_text()
    assert text.startswith("# report\n\nbody\n\n## Figure 1 study\n\nnumbers\n")
    assert text.rstrip().endswith(f"]({name})")
    assert (out / name).read_bytes() == b"png bytes"


def test_report_reads_every_arm_and_writes_report_plot_and_section(tmp_path):
    """study.report on one planted image per arm, its real select pairs and hand-made adoption
    and train logs: the truth lines per arm, the outcome and the three files."""
    hq, label_map, _ = scene()
    kinds = study.region_kinds(study.unit(hq), label_map, 0.5)
    masks = study.kind_masks(label_map, kinds)
    pairs_dirs, scores_paths, aligned = {}, {}, {}
    for arm in (study.POSITIVE, study.MAIN, study.NEGATIVE):
        rng = numpy_rng(0, study.STAGE, "noise", "a")
        candidates, _ = study.arm_candidates(arm, hq, masks, 0.08, 2.0, rng)
        image_pair, instance_pairs, scores = pairs_of("a", candidates, hq, label_map, arm)
        folder = tmp_path / arm / "pairs"
        chosen = pd.concat([instance_pairs, image_pair.to_frame().T], ignore_index=True)
        chosen = chosen.assign(weight=1.0, negative_prompt="", source="iqa")
        is_image = chosen["instance_id"] == WHOLE_IMAGE_ID
        write_table(chosen[~is_image], folder / f"{study.OBJECTIVE}.parquet", "preference_pairs")
        write_table(
            chosen[is_image], folder / f"{study.OBJECTIVE}_image.parquet", "preference_pairs"
        )
        write_table(scores, tmp_path / arm / "scores.parquet", "scores")
        pairs_dirs[arm], scores_paths[arm] = folder, tmp_path / arm / "scores.parquet"
        for method_name in ("dpo", "dspo"):
            for seed in range(3):
                log = pd.DataFrame(
                    {"step": [1, 2], "loss": [0.6931, 0.1], "implicit_accuracy": [0.0, 1.0]}
                )
                for column in (
                    "err_theta_winner",
                    "err_theta_loser",
                    "err_ref_winner",
                    "err_ref_loser",
                    "lr",
                    "grad_norm",
                ):
                    log[column] = 0.0
                path = tmp_path / arm / "aligned" / method_name / f"seed{seed}"
                write_table(log, path / "train_log.parquet", "train_log")
                aligned[(arm, method_name, seed)] = path
    regions = pd.DataFrame(
        [
            {
                "split": "train",
                "image_id": "a",
                "instance_id": i,
                "area": int((label_map == i).sum()),
                "texture": value,
                "kind": kind,
                "planted": study.CHECKER if kind == "textured" else study.CAST,
                "amplitude": 0.08,
            }
            for i, (kind, value) in kinds.items()
        ]
    )
    write_table(regions, tmp_path / "regions.parquet", "study_regions")
    write_table(
        _adoption_frame(STUDY_VALUES),
        tmp_path / "adoption.parquet",
        "study_adoption",
        {"images": ["t1", "t2"], "data": "test", "amplitudes": {"checker": 0.08, "cast": 0.06}},
    )
    outcome = study.report(
        adoption_path=tmp_path / "adoption.parquet",
        pairs_dirs=pairs_dirs,
        regions_path=tmp_path / "regions.parquet",
        scores_paths=scores_paths,
        aligned=aligned,
        out_path=tmp_path / "report.md",
        plot_path=tmp_path / "adoption.png",
        config=study.study_settings({}),
        train={"max_steps": 2, "beta": 8000.0},
        section_path=tmp_path / "section.md",
    )
    text = (tmp_path / "report.md").read_text()
    assert outcome.startswith("not supported") and f"**Outcome: {outcome}.**" in text
    # what select made of each arm: positive pairs only the 2 textured instances, checker wins
    assert "Image-level pairs: 1, winner `checker` in 1" in text
    assert "Instance-level pairs: 2 (intended: 2), winner as intended in 2." in text
    assert "Instance-level pairs: 4 (intended: 4), winner as intended in 4." in text
    assert "winner `clean` in 1" in text
    assert (
        text.index("### Positive control")
        < text.index("### Main arm")
        < text.index("### Negative control")
    )
    assert "Positive control: Diffusion-DPO adopts" in text
    assert (tmp_path / "adoption.png").stat().st_size > 0
    assert (tmp_path / "section.md").read_text().startswith("## Figure 1 study")
