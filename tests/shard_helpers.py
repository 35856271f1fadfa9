"""Kill a stage's shard job mid-way, as SIGKILL would, and rerun it (docs/design.md §15).

:func:`run_killed_after` runs ``python -m pipeline ARGV`` in a child process that kills itself
with SIGKILL right after its ``n``-th image is marked complete (:meth:`ShardWork.finish`), so the
test knows exactly how far the shard got: no timing, no race.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_KILLER = """
import os, signal, sys
import pipeline.shards as shards
after = int(sys.argv[1])
finish = shards.ShardWork.finish
calls = []
def finish_then_die(self, key, rows):
    finish(self, key, rows)
    calls.append(key)
    if len(calls) >= after:
        os.kill(os.getpid(), signal.SIGKILL)
shards.ShardWork.finish = finish_then_die
from pipeline.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


def _env(threads: int = 1) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}


def run_killed_after(n: int, argv: Sequence[str], cwd: Path | None = None) -> int:
    """Run ``python -m pipeline *argv``, SIGKILLed after its ``n``-th completed image; the
    return code (-9 when it was killed, 0 when it finished first)."""
    done = subprocess.run(
        [sys.executable, "-c", _KILLER, str(n), *argv],
        cwd=cwd or ROOT,
        env=_env(),
        capture_output=True,
        text=True,
    )
    if done.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"the killed run failed otherwise:\n{done.stderr[-3000:]}")
    return done.returncode


def run_stage(argv: Sequence[str], cwd: Path | None = None) -> str:
    """Run ``python -m pipeline *argv`` to the end; its stderr (the log)."""
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *argv],
        cwd=cwd or ROOT,
        env=_env(),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise AssertionError(f"python -m pipeline {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return done.stderr
