"""Test sets as the evaluation and the prompts stage list them: a synthetic one is a degrade
output folder (``hq/``, ``lq/``), a paired one an LR/HR folder pair (RealSR, DRealSR layouts),
matched by file name after stripping the suffixes of ``evaluate.name_suffix_pattern``."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline import contracts, settings
from pipeline.io.images import list_images

TESTSET_KINDS = ("synthetic", "paired")
#: (LQ folder, HQ folder) names tried in order under a paired test set's root
PAIRED_LAYOUTS = (
    ("LR", "HR"),
    ("test_LR", "test_HR"),
    ("LQ", "HQ"),
    ("lr", "hr"),
    ("lq", "hq"),
    ("test_lr", "test_hr"),
)
#: suffixes stripped from file stems before LQ and HQ names are matched
DEFAULT_SUFFIX_PATTERN = settings.defaults("evaluate")["name_suffix_pattern"]
#: in a folder holding both kinds, which stems are HQ and which LQ
HQ_STEM = re.compile(r"[_-](?:HR|GT|x1)$", re.IGNORECASE)
LQ_STEM = re.compile(r"[_-](?:LR\d*|LQ|x[2-9]\d*)$", re.IGNORECASE)


@dataclass(frozen=True)
class TestImage:
    image_id: str
    lq: Path
    hq: Path


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def match_key(path: Path, root: Path, suffix_pattern: str) -> str:
    """The name an LQ or HQ file is matched by: its path below ``root`` without extension,
    folders joined by ``__``, with the suffixes of ``suffix_pattern`` stripped from the stem."""
    stem = path.stem
    pattern = re.compile(suffix_pattern, re.IGNORECASE)
    while True:
        stripped = pattern.sub("", stem)
        if stripped == stem or not stripped:
            break
        stem = stripped
    parts = [*path.relative_to(root).parent.parts, stem]
    return _safe_id("__".join(parts))


def match_pairs(
    lq_files: Sequence[Path],
    hq_files: Sequence[Path],
    lq_root: Path,
    hq_root: Path,
    suffix_pattern: str = DEFAULT_SUFFIX_PATTERN,
) -> list[TestImage]:
    """Pair LQ and HQ files by :func:`match_key`; unmatched or ambiguous names raise ValueError."""
    sides = {}
    problems = []
    for side, files, root in (("LQ", lq_files, lq_root), ("HQ", hq_files, hq_root)):
        by_key: dict[str, list[Path]] = {}
        for path in files:
            by_key.setdefault(match_key(path, root, suffix_pattern), []).append(path)
        for key, paths in sorted(by_key.items()):
            if len(paths) > 1:
                problems.append(f"{side} files share the name {key!r}: {[str(p) for p in paths]}")
        sides[side] = {key: paths[0] for key, paths in by_key.items()}
    lq_only = sorted(set(sides["LQ"]) - set(sides["HQ"]))
    hq_only = sorted(set(sides["HQ"]) - set(sides["LQ"]))
    if lq_only:
        problems.append(f"LQ without HQ: {[str(sides['LQ'][k]) for k in lq_only]}")
    if hq_only:
        problems.append(f"HQ without LQ: {[str(sides['HQ'][k]) for k in hq_only]}")
    if problems:
        raise ValueError(
            f"cannot pair LQ files of {lq_root} with HQ files of {hq_root}: " + "; ".join(problems)
        )
    return [TestImage(key, sides["LQ"][key], sides["HQ"][key]) for key in sorted(sides["LQ"])]


def _child(root: Path, name: str) -> Path | None:
    """The sub-folder of ``root`` called exactly ``name`` (case-sensitive even on macOS)."""
    for child in root.iterdir():
        if child.is_dir() and child.name == name:
            return child
    return None


def find_paired_folders(root: str | Path) -> tuple[Path, Path]:
    """``(lq_dir, hq_dir)`` of a paired test set: the first layout of :data:`PAIRED_LAYOUTS`
    present under ``root``, else ``(root, root)`` when ``root`` itself holds both kinds."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"paired test set folder not found: {root}")
    for lq_name, hq_name in PAIRED_LAYOUTS:
        lq_dir, hq_dir = _child(root, lq_name), _child(root, hq_name)
        if lq_dir is not None and hq_dir is not None:
            return lq_dir, hq_dir
    stems = [path.stem for path in list_images(root)]
    if any(HQ_STEM.search(s) for s in stems) and any(LQ_STEM.search(s) for s in stems):
        return root, root
    tried = ", ".join(f"{lq}/ + {hq}/" for lq, hq in PAIRED_LAYOUTS)
    raise FileNotFoundError(
        f"{root}: no LQ/HQ folders found (tried {tried}) and no *_HR / *_LR4 files side by side"
    )


def load_paired(root: str | Path, suffix_pattern: str = DEFAULT_SUFFIX_PATTERN) -> list[TestImage]:
    """The matched pairs of a RealSR / DRealSR style folder (see the module docstring)."""
    lq_dir, hq_dir = find_paired_folders(root)
    if lq_dir == hq_dir:
        files = list_images(lq_dir)
        hq_files = [path for path in files if HQ_STEM.search(path.stem)]
        lq_files = [path for path in files if LQ_STEM.search(path.stem)]
    else:
        lq_files, hq_files = list_images(lq_dir), list_images(hq_dir)
    if not hq_files:
        raise FileNotFoundError(f"no HQ images found in {hq_dir}")
    return match_pairs(lq_files, hq_files, lq_dir, hq_dir, suffix_pattern)


def load_synthetic(folder: str | Path) -> list[TestImage]:
    """The pairs of a degraded data folder (``hq/``, ``lq/``, ``pairs.parquet``)."""
    folder = Path(folder)
    lq, hq = contracts.data_images(folder, "lq"), contracts.data_images(folder, "hq")
    images = [TestImage(i, lq[i], hq[i]) for i in sorted(lq)]
    missing = [str(p) for image in images for p in (image.lq, image.hq) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: images listed in pairs.parquet are missing: {missing}")
    return images


def load_testset(
    kind: str, path: str | Path, suffix_pattern: str = DEFAULT_SUFFIX_PATTERN, max_images: int = 0
) -> list[TestImage]:
    """Step 1: the test images of a ``synthetic`` or ``paired`` test set, sorted by id."""
    if kind == "synthetic":
        images = load_synthetic(path)
    elif kind == "paired":
        images = load_paired(path, suffix_pattern)
    else:
        raise ValueError(f"unknown test set kind {kind!r}; expected one of {TESTSET_KINDS}")
    if not images:
        raise ValueError(f"test set {path} has no images")
    return images[:max_images] if max_images else images
