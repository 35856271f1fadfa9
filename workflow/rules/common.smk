# Helpers only (no rules): config validation, input functions, code hashes for honest caching.
import hashlib
import json
import sys
from pathlib import Path

from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

# The interpreter running Snakemake runs the stages too, so rules work without an activated venv.
PYTHON = sys.executable
ROOT = Path(workflow.basedir)

# The pipeline modules each stage runs; their hash goes into the rule's params so that editing
# a stage's code reruns exactly that stage and what depends on it (Snakemake does not track
# imported code by itself).
SHARED_CODE = ["pipeline/__init__.py", "pipeline/__main__.py", "pipeline/io", "pipeline/seeding.py"]
STAGE_CODE = {
    "degrade": ["pipeline/degrade.py", "pipeline/degradations.py"],
}


def code_hash(stage):
    """sha256 over the source files a stage runs (shared io/seeding code included)."""
    digest = hashlib.sha256()
    for entry in SHARED_CODE + STAGE_CODE[stage]:
        path = ROOT / entry
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(ROOT)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def section(*keys):
    """A config section as canonical JSON: the stage's --config argument and a rerun trigger."""
    value = config
    for key in keys:
        value = value[key]
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def get_final_outputs():
    """What `rule all` asks for, stage by stage as the stages exist."""
    return expand("results/data/{split}", split=["train", "test"])
