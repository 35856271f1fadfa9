"""Honest caching of the degrade source: changing the images under it reruns degrade.

Snakemake sees only ``degrade.source``, a folder name, in the config; each degrade shard's
``source`` param is a manifest of the folder's images in that shard (docs/design.md §15), so
adding, removing or changing one reruns its shard of degrade (and the gather), not the others.
"""

import os
import shutil

import numpy as np
import yaml
from PIL import Image

from pipeline.io.images import source_manifest
from pipeline.io.tables import read_metadata
from tests.workflow_helpers import ROOT, copy_workflow, planned_jobs, snakemake

TRAIN = "results/data/train"


def _save(path, seed, size=40):
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_changing_the_source_images_reruns_their_degrade_shard(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    config = yaml.safe_load((ROOT / "workflow" / "presets" / "ci.yaml").read_text())
    config["degrade"] = {"source": "hq_source", "test_ids": ["c"], "crop_size": 32}
    config["shards"] = 2  # shard_of: a, b, c, d in shard 1 of 2; e, f in shard 2
    (work / "tiny.yaml").write_text(yaml.safe_dump(config))
    source = work / "hq_source"
    source.mkdir()
    for seed, name in enumerate(("a", "b", "c", "e", "f")):
        _save(source / f"{name}.png", seed)
    args = (TRAIN, "--configfile", "tiny.yaml")
    one_shard = {"degrade": 1, "degrade_gather": 1}

    assert planned_jobs(work, *args) == {"degrade": 2, "degrade_gather": 1}
    snakemake(work, *args)
    manifest = read_metadata(work / TRAIN / "pairs.parquet")["source_manifest"]
    shards = [source_manifest(str(source), [], shard=f"{i}-of-2", fresh=True) for i in (1, 2)]
    assert manifest == {"per_shard": shards}
    assert shards[0].startswith("3 images of shard 1-of-2")  # the test image c too
    assert planned_jobs(work, *args) == {}

    _save(source / "d.png", 3)  # an added image
    assert planned_jobs(work, *args) == one_shard
    (source / "d.png").unlink()  # back as it was
    assert planned_jobs(work, *args) == {}

    shutil.move(source / "e.png", tmp_path / "e.png")  # a removed image
    assert planned_jobs(work, *args) == one_shard
    shutil.move(tmp_path / "e.png", source / "e.png")
    assert planned_jobs(work, *args) == {}

    stat = (source / "b.png").stat()
    _save(source / "b.png", 4)  # same name and size, new pixels
    os.utime(source / "b.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert (source / "b.png").stat().st_size == stat.st_size
    assert planned_jobs(work, *args) == one_shard


# -- one manifest per degrade shard (docs/design.md §15) -----------------------------------------


def _old_manifest(folder):
    """The whole folder's manifest as it was always computed (the value must not move)."""
    import hashlib

    from pipeline.io.images import list_images

    digest = hashlib.sha256()
    paths = list_images(folder)
    for path in paths:
        stat = path.stat()
        entry = f"{path.relative_to(folder).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}"
        digest.update(entry.encode() + b"\n")
    return f"{len(paths)} images, sha256 {digest.hexdigest()}"


def _count(manifest):
    return int(manifest.split(" ", 1)[0])


def test_whole_manifest_is_unchanged_and_one_shard_of_one_is_the_whole(tmp_path):
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    for seed, name in enumerate(("a.png", "b.png", "sub/c d.png")):
        _save(source / name, seed)
    expected = _old_manifest(source)
    assert source_manifest(str(source), [], fresh=True) == expected
    assert source_manifest(str(source), [], shard="1-of-1") == expected


def test_a_shard_manifest_changes_only_with_its_own_images(tmp_path):
    from pipeline.shards import shard_of

    source = tmp_path / "src"
    source.mkdir()
    names = [f"img{i}" for i in range(8)]
    for seed, name in enumerate(names):
        _save(source / f"{name}.png", seed)
    items = ["1-of-3", "2-of-3", "3-of-3"]

    def manifests():
        source_manifest(str(source), [], fresh=True)
        return {item: source_manifest(str(source), [], shard=item) for item in items}

    before = manifests()
    assert [_count(before[item]) for item in items] == [
        sum(shard_of(n, 3) == i for n in names) for i in (1, 2, 3)
    ]
    assert all(f"of shard {item}, sha256 " in before[item] for item in items)
    assert len(set(before.values())) == 3

    added = next(f"new{i}" for i in range(100) if shard_of(f"new{i}", 3) == 2)
    _save(source / f"{added}.png", 50)
    after = manifests()
    assert [after[i] == before[i] for i in items] == [True, False, True]
    (source / f"{added}.png").unlink()
    assert manifests() == before

    changed = next(n for n in names if shard_of(n, 3) == 3)
    stat = (source / f"{changed}.png").stat()
    os.utime(source / f"{changed}.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    after = manifests()
    assert [after[i] == before[i] for i in items] == [True, True, False]


def test_the_folder_is_listed_once_for_every_shard(tmp_path, monkeypatch):
    from pipeline.io import images

    source = tmp_path / "src"
    source.mkdir()
    for seed in range(5):
        _save(source / f"p{seed}.png", seed)
    calls = []
    listing = images.list_images
    monkeypatch.setattr(
        images, "list_images", lambda folder: calls.append(folder) or listing(folder)
    )
    whole = source_manifest(str(source), [], fresh=True)
    counts = [_count(source_manifest(str(source), [], shard=f"{i}-of-4")) for i in range(1, 5)]
    assert sum(counts) == 5 and len(calls) == 1
    _save(source / "p5.png", 5)
    assert source_manifest(str(source), []) == whole  # cached: the same process, the same listing
    assert source_manifest(str(source), [], fresh=True) != whole and len(calls) == 2
    assert _count(source_manifest(str(source), [])) == 6


def test_missing_folder_and_demo_shards(tmp_path):
    missing = str(tmp_path / "nowhere")
    assert source_manifest(missing, [], shard="2-of-3") == f"missing folder {missing}"
    demo = ["astronaut.png", "chelsea.png", "rocket.jpg", "coffee.png"]
    whole = source_manifest("demo", demo)
    assert whole.startswith("4 images, sha256 ")
    shards = [source_manifest("demo", demo, shard=f"{i}-of-3") for i in (1, 2, 3)]
    # astronaut, rocket, coffee and chelsea lie in shards 1, 2, 3, 3 of 3
    assert [_count(manifest) for manifest in shards] == [1, 1, 2]


# -- degrade.manifest: stat (size, mtime; the default) or content (the files' bytes) ------------


def _save_bmp(path, seed, size=24):
    """An uncompressed image: new pixels keep the file's size exactly."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="BMP")


def _manifests(source, mode):
    whole = source_manifest(str(source), [], fresh=True, manifest=mode)
    shards = [source_manifest(str(source), [], shard=f"{i}-of-2", manifest=mode) for i in (1, 2)]
    return [whole, *shards]


def test_content_manifest_sees_a_replacement_of_the_same_size_and_mtime(tmp_path):
    from pipeline.shards import shard_of

    source = tmp_path / "src"
    source.mkdir()
    for seed, name in enumerate(("a", "b", "c", "e", "f")):
        _save_bmp(source / f"{name}.bmp", seed)
    before = {mode: _manifests(source, mode) for mode in ("stat", "content")}
    assert before["stat"][0] == _old_manifest(source)  # stat: the value it always had
    assert before["content"][0].startswith("5 images, content sha256 ")
    assert before["content"][1].startswith(f"{_count(before['content'][1])} images of shard 1-of-2")

    path = source / "b.bmp"
    stat = path.stat()
    _save_bmp(path, 99)  # a replacement: same name, size and mtime, other pixels
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    after = {mode: _manifests(source, mode) for mode in ("stat", "content")}
    assert after["stat"] == before["stat"]  # stat cannot see it
    changed = [after["content"][i] != before["content"][i] for i in range(3)]
    assert changed == [True, shard_of("b", 2) == 1, shard_of("b", 2) == 2]

    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: same bytes
    assert _manifests(source, "content") == after["content"]
    assert _manifests(source, "stat") != before["stat"]


def test_content_manifest_of_the_demo_and_a_missing_folder(tmp_path):
    demo = ["astronaut.png", "coffee.png"]
    assert source_manifest("demo", demo, manifest="content") != source_manifest("demo", demo)
    missing = str(tmp_path / "nowhere")
    assert source_manifest(missing, [], manifest="content") == f"missing folder {missing}"


def test_the_manifest_setting_its_default_and_the_paper_presets():
    import pytest

    from pipeline import settings

    assert settings.defaults("degrade")["manifest"] == "stat"
    node = settings.schema_node("degrade.manifest")
    assert node["enum"] == ["stat", "content"] and "content" in node["description"]
    with pytest.raises(settings.ConfigError, match="manifest"):
        settings.resolve("degrade", {"manifest": "hash"})
    for preset in ("paper_onestep", "paper_multistep"):
        config = yaml.safe_load((ROOT / "workflow" / "presets" / f"{preset}.yaml").read_text())
        assert config["degrade"]["manifest"] == "content", preset


def test_the_degrade_stage_records_the_manifest_of_its_setting(tmp_path):
    from pipeline import degrade

    source = tmp_path / "src"
    source.mkdir()
    for seed, name in enumerate(("a", "b")):
        _save_bmp(source / f"{name}.bmp", seed, size=32)
    config = {"source": str(source), "crop_size": 32, "test_fraction": 0.0, "manifest": "content"}
    degrade.degrade_split("train", tmp_path / "out", config, seed=0)
    recorded = read_metadata(tmp_path / "out" / "pairs.parquet")["source_manifest"]
    assert recorded == source_manifest(str(source), [], fresh=True, manifest="content")


def test_the_degrade_rule_reruns_on_a_content_change_with_manifest_content(tmp_path):
    """The rule's param follows degrade.manifest: with content, a replaced image of the same
    size and mtime reruns its shard (with stat it would not be seen)."""
    work = copy_workflow(tmp_path / "wf")
    config = yaml.safe_load((ROOT / "workflow" / "presets" / "ci.yaml").read_text())
    config["degrade"] = {
        "source": "hq_source",
        "test_fraction": 0.0,
        "crop_size": 32,
        "manifest": "content",
    }
    (work / "tiny.yaml").write_text(yaml.safe_dump(config))
    source = work / "hq_source"
    source.mkdir()
    for seed, name in enumerate(("a", "b")):
        _save_bmp(source / f"{name}.bmp", seed, size=32)
    args = (TRAIN, "--configfile", "tiny.yaml")
    snakemake(work, *args)
    assert planned_jobs(work, *args) == {}
    path = source / "b.bmp"
    stat = path.stat()
    _save_bmp(path, 99, size=32)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert planned_jobs(work, *args) == {"degrade": 1, "degrade_gather": 1}
