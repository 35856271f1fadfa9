"""Select stage: normalisation, sign, ties, pair counts, human votes and bad annotation rows."""

import json

import pandas as pd
import pytest

from pipeline.io.tables import SCHEMAS, read_table, write_table
from pipeline.select import (
    AnnotationError,
    NoPairsError,
    best_and_worst,
    check_annotations,
    main,
    objective_scores,
    read_annotations,
    vote,
)

# (instance_id, candidate, psnr, lpips); lpips is lower-better
VALUES = [
    (1, "x", 30.0, 0.3),
    (1, "y", 20.0, 0.1),
    (1, "z", 25.0, 0.2),
    (2, "x", 25.0, 0.1),
    (2, "y", 25.0, 0.2),
    (2, "z", 25.0, 0.3),
    (3, "x", 30.0, 0.2),
    (3, "y", 30.0, 0.2),
    (3, "z", 20.0, 0.2),
    (-1, "x", 20.0, 0.3),
    (-1, "y", 30.0, 0.1),
    (-1, "z", 25.0, 0.2),
]


def scores_table():
    rows = []
    for instance_id, candidate, psnr, lpips in VALUES:
        rows.append(("a", instance_id, candidate, "psnr", psnr, False))
        rows.append(("a", instance_id, candidate, "lpips", lpips, True))
    return pd.DataFrame(rows, columns=SCHEMAS["scores"].names)


def instances_table():
    rows = [("a", i, 10 * i, 0, 0, 4, 4, w, 1.0, i == 3) for i, w in [(1, 0.1), (2, 0.3), (3, 0.6)]]
    return pd.DataFrame(rows, columns=SCHEMAS["instances"].names)


def score_of(table, instance_id, candidate):
    row = table[(table["instance_id"] == instance_id) & (table["candidate"] == candidate)]
    return float(row["score"].iloc[0])


def test_normalisation_and_sign_flip_by_hand():
    table = objective_scores(scores_table(), {"psnr": 2.0, "lpips": 1.0})
    # instance 1: psnr -> x 1, y 0, z .5 ; lpips flipped -> x 0, y 1, z .5
    assert score_of(table, 1, "x") == pytest.approx(2.0)
    assert score_of(table, 1, "y") == pytest.approx(1.0)
    assert score_of(table, 1, "z") == pytest.approx(1.5)
    # instance 2: psnr all equal contributes nothing; lpips x best
    assert [score_of(table, 2, c) for c in "xyz"] == pytest.approx([1.0, 0.5, 0.0])


def test_best_worst_ties_and_all_equal():
    equal_weights = best_and_worst(objective_scores(scores_table(), {"psnr": 1.0, "lpips": 1.0}))
    # instance 1 sums to 1 for every candidate; instance 3 ties for best (psnr) and lpips is flat
    assert sorted(equal_weights["instance_id"]) == [-1, 2]
    pair = equal_weights.set_index("instance_id").loc[2]
    assert (pair["winner"], pair["loser"], pair["margin"]) == ("x", "z", pytest.approx(1.0))
    weighted = best_and_worst(
        objective_scores(scores_table(), {"psnr": 2.0, "lpips": 1.0})
    ).set_index("instance_id")
    assert (weighted.loc[1, "winner"], weighted.loc[1, "loser"]) == ("x", "y")
    assert (weighted.loc[-1, "winner"], weighted.loc[-1, "loser"]) == ("y", "x")
    only_flat = best_and_worst(
        objective_scores(scores_table()[lambda t: t["instance_id"] == 3], {"lpips": 1.0})
    )
    assert only_flat.empty


def test_metric_missing_from_scores_is_named():
    with pytest.raises(KeyError, match="niqe"):
        objective_scores(scores_table(), {"niqe": 1.0})


def annotations_table():
    rows = [
        ("ann1", "a", 1, "x", "y", "y;z"),
        ("ann2", "a", 1, "x", "z", "y"),
        ("ann3", "a", 1, "y", "z", ""),
        ("ann1", "a", 2, "x", "y", ""),
        ("ann2", "a", 2, "y", "z", ""),
        ("ann3", "a", 2, "z", "x", ""),
        ("ann1", "a", -1, "y", "x", ""),
    ]
    return pd.DataFrame(rows, columns=SCHEMAS["annotations"].names)


def test_majority_vote():
    pairs = vote(annotations_table()).set_index("instance_id")
    assert sorted(pairs.index) == [-1, 1]  # instance 2: every candidate has one best vote
    assert (pairs.loc[1, "winner"], pairs.loc[1, "loser"]) == ("x", "z")
    assert pairs.loc[1, "margin"] == pytest.approx(4 / 6)


def test_bad_annotation_rows_are_listed():
    bad = pd.concat(
        [
            annotations_table(),
            pd.DataFrame(
                [
                    ("ann4", "q", 1, "x", "y", ""),
                    ("ann4", "a", 1, "x", "w", ""),
                    ("ann5", "a", 1, "x", "x", ""),
                    ("ann4", "a", 9, "x", "y", ""),
                    ("ann6", "a", 2, "x", "y", "v"),
                ],
                columns=SCHEMAS["annotations"].names,
            ),
        ],
        ignore_index=True,
    )
    with pytest.raises(AnnotationError) as error:
        check_annotations(bad, instances_table(), {"a": {"x", "y", "z"}})
    message = str(error.value)
    assert "row 7" in message and "unknown image 'q'" in message
    assert "row 8" in message and "unknown candidates ['w']" in message
    assert "row 9" in message and "best == worst" in message
    assert "row 10" in message and "unknown instance 9" in message
    assert "row 11" in message and "['v']" in message
    assert "row 0" not in message
    check_annotations(annotations_table(), instances_table(), {"a": {"x", "y", "z"}})


def test_select_stage_writes_pairs(tmp_path):
    write_table(scores_table(), tmp_path / "scores.parquet", "scores")
    write_table(instances_table(), tmp_path / "instances.parquet", "instances")
    captions = pd.DataFrame(
        [
            ("a", 1, "hq", "a red car", 1.0, False),
            ("a", 1, "y", "a dog", 0.05, True),
            ("a", 1, "z", "a cat", 0.5, False),
            ("a", 2, "x", "a lamp", 0.02, True),
        ],
        columns=SCHEMAS["captions"].names,
    )
    write_table(captions, tmp_path / "captions.parquet", "captions")
    annotations_table().to_csv(tmp_path / "votes.csv", index=False)
    out = tmp_path / "pairs"
    config = {"objectives": {"fid": {"psnr": 2.0, "lpips": 1.0}}, "include_remainder": False}
    argv = [
        "--scores",
        str(tmp_path / "scores.parquet"),
        "--instances",
        str(tmp_path / "instances.parquet"),
    ]
    argv += [
        "--captions",
        str(tmp_path / "captions.parquet"),
        "--annotations",
        str(tmp_path / "votes.csv"),
    ]
    argv += ["--out-dir", str(out), "--config", json.dumps(config)]
    assert main(argv) == 0

    instance_pairs = read_table(out / "fid.parquet", "preference_pairs")
    assert list(instance_pairs.columns) == SCHEMAS["preference_pairs"].names
    # instance 1 and 2 give pairs; instance 3 is the remainder, excluded by config
    assert instance_pairs["instance_id"].tolist() == [1, 2]
    assert instance_pairs["weight"].tolist() == pytest.approx([0.1, 0.3])
    assert set(instance_pairs["negative_prompt"]) == {"a lamp, a dog"}
    assert set(instance_pairs["source"]) == {"iqa"}
    image_pairs = read_table(out / "fid_image.parquet", "preference_pairs")
    assert image_pairs[["instance_id", "winner", "loser", "weight"]].values.tolist() == [
        [-1, "y", "x", 1.0]
    ]

    human = read_table(out / "human.parquet", "preference_pairs")
    assert human[["instance_id", "winner", "loser", "source"]].values.tolist() == [
        [1, "x", "z", "human"]
    ]
    assert human["negative_prompt"].tolist() == ["a dog"]  # y flagged by 2 of 3 annotators
    assert len(read_table(out / "human_image.parquet", "preference_pairs")) == 1


def test_stage_rejects_bad_annotations_file(tmp_path):
    write_table(scores_table(), tmp_path / "scores.parquet", "scores")
    write_table(instances_table(), tmp_path / "instances.parquet", "instances")
    bad = annotations_table()
    bad.loc[0, "best"] = "nope"
    bad.to_csv(tmp_path / "votes.csv", index=False)
    argv = [
        "--scores",
        str(tmp_path / "scores.parquet"),
        "--instances",
        str(tmp_path / "instances.parquet"),
    ]
    argv += ["--annotations", str(tmp_path / "votes.csv"), "--out-dir", str(tmp_path / "pairs")]
    argv += ["--config", json.dumps({"objectives": {"fid": {"psnr": 1.0}}})]
    with pytest.raises(AnnotationError, match="row 0.*nope"):
        main(argv)


def test_long_lists_of_bad_rows_are_cut():
    rows = [("ann1", "q", 1, "x", "y", "")] * 100_000
    bad = pd.DataFrame(rows, columns=SCHEMAS["annotations"].names)
    with pytest.raises(AnnotationError) as error:
        check_annotations(bad, instances_table(), {"a": {"x", "y", "z"}})
    lines = str(error.value).splitlines()
    assert lines[0] == "100000 bad annotation rows (of 100000):"
    assert lines[1].startswith("row 0:") and lines[20].startswith("row 19:")
    assert lines[21:] == ["... and 99980 more rows"]
    assert len(str(error.value)) < 5000


def test_unreadable_annotation_files_are_named(tmp_path):
    cases = {
        "empty.csv": (b"", "is empty"),
        "latin1.csv": (
            "annotator,image_id,instance_id,best,worst,flagged\nJos\xe9,a,1,x,y,\n".encode(
                "latin-1"
            ),
            "not UTF-8",
        ),
        "ragged.csv": (
            b'annotator,image_id,instance_id,best,worst,flagged\nann1,a,1,x,y,,extra,"\n',
            "not a valid CSV",
        ),
        "header_only.csv": (b"annotator,image_id,instance_id,best,worst,flagged\n", "no rows"),
    }
    for name, (content, reason) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(AnnotationError, match=rf"{name}.*{reason}"):
            read_annotations(tmp_path / name)


def _stage_argv(tmp_path, scores, config):
    write_table(scores, tmp_path / "scores.parquet", "scores")
    write_table(instances_table(), tmp_path / "instances.parquet", "instances")
    return [
        "--scores",
        str(tmp_path / "scores.parquet"),
        "--instances",
        str(tmp_path / "instances.parquet"),
        "--out-dir",
        str(tmp_path / "pairs"),
        "--config",
        json.dumps(config),
    ]


def test_an_objective_without_pairs_names_the_cause(tmp_path):
    identical = scores_table().assign(value=1.0)
    argv = _stage_argv(tmp_path, identical, {"objectives": {"fid": {"psnr": 1.0, "lpips": 1.0}}})
    with pytest.raises(NoPairsError, match=r"'fid'.*instance-level.*identical images"):
        main(argv)
    # differing values, but x and y tie for best everywhere
    tied = scores_table()
    tied.loc[tied["candidate"] == "y", "value"] = tied.loc[tied["candidate"] == "x", "value"].values
    argv = _stage_argv(tmp_path, tied, {"objectives": {"fid": {"psnr": 1.0, "lpips": 1.0}}})
    with pytest.raises(NoPairsError, match=r"'fid'.*best or the worst score is shared"):
        main(argv)
    # only the remainder instance 3 gives a pair (psnr 30 / 25 / 20)
    remainder_only = scores_table()
    others = (remainder_only["instance_id"] != 3) & (remainder_only["instance_id"] != -1)
    remainder_only.loc[others, "value"] = 1.0
    third_y = (remainder_only["instance_id"] == 3) & (remainder_only["candidate"] == "y")
    remainder_only.loc[third_y & (remainder_only["metric"] == "psnr"), "value"] = 25.0
    config = {"objectives": {"fid": {"psnr": 1.0}}, "include_remainder": False}
    with pytest.raises(NoPairsError, match=r"remainder instances.*include_remainder is false"):
        main(_stage_argv(tmp_path, remainder_only, config))
    assert not (tmp_path / "pairs" / "fid.parquet").exists()
