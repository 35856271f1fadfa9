"""Honest caching of the degrade source: changing the images under it reruns degrade.

Snakemake sees only ``degrade.source``, a folder name, in the config; the rule's ``source``
param is a manifest of the folder's images, so adding, removing or changing one reruns degrade.
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


def test_changing_the_source_images_reruns_degrade(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    config = yaml.safe_load((ROOT / "workflow" / "presets" / "ci.yaml").read_text())
    config["degrade"] = {"source": "hq_source", "test_ids": ["c"], "crop_size": 32}
    (work / "tiny.yaml").write_text(yaml.safe_dump(config))
    source = work / "hq_source"
    source.mkdir()
    for seed, name in enumerate(("a", "b", "c")):
        _save(source / f"{name}.png", seed)
    args = (TRAIN, "--configfile", "tiny.yaml")

    snakemake(work, *args)
    manifest = read_metadata(work / TRAIN / "pairs.parquet")["source_manifest"]
    assert manifest == source_manifest(str(source), [])
    assert planned_jobs(work, *args) == {}

    _save(source / "d.png", 3)  # an added image
    assert planned_jobs(work, *args) == {"degrade": 1}
    (source / "d.png").unlink()  # back as it was
    assert planned_jobs(work, *args) == {}

    shutil.move(source / "a.png", tmp_path / "a.png")  # a removed image
    assert planned_jobs(work, *args) == {"degrade": 1}
    shutil.move(tmp_path / "a.png", source / "a.png")
    assert planned_jobs(work, *args) == {}

    stat = (source / "b.png").stat()
    _save(source / "b.png", 4)  # same name and size, new pixels
    os.utime(source / "b.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert (source / "b.png").stat().st_size == stat.st_size
    assert planned_jobs(work, *args) == {"degrade": 1}
