"""Run the real Snakemake workflow from tests: dry-run job counts and full runs in a copy."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = (
    "Snakefile",
    "config.yaml",
    "workflow",
    "profiles",
    "envs",
    "pipeline",
    "pyproject.toml",
)


def copy_workflow(destination: Path) -> Path:
    """A copy of the workflow (code included) where a test may run and edit things."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(
                source, destination / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(source, destination / name)
    return destination


def snakemake(
    workdir: Path,
    *args: str,
    check: bool = True,
    cores: int = 2,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``snakemake --cores CORES ARGS`` in ``workdir`` with this interpreter (so rules use it);
    ``env`` adds to the environment."""
    command = [sys.executable, "-m", "snakemake", "--cores", str(cores), *args]
    # the rules call `python`: make it this interpreter, as an activated venv would
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, **(env or {}), "PATH": path}
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
            f"{result.stderr[-4000:]}"
        )
    return result


def planned_jobs(workdir: Path, *args: str) -> Counter:
    """Jobs a dry run would run, by rule (empty when nothing is to be done)."""
    result = snakemake(workdir, "--dry-run", *args)
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return Counter()
    table = text.split("Job stats:", 1)[1]
    counts = Counter()
    for rule, count in re.findall(r"^(\w+)\s+(\d+)$", table, re.M):
        if rule != "total":
            counts[rule] = int(count)
    return counts
