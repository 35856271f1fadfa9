"""Writes that go to a temporary name and are renamed into place.

A killed job therefore never leaves a file or folder that looks complete: either the old
output (or nothing) is there, or the new one in full.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    Works for files and directories: the caller creates whatever it likes at the yielded
    path. An existing ``path`` is replaced only once the new content is complete. On an
    exception the temporary is removed and the old ``path`` stays untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    _remove(temporary)
    try:
        yield temporary
        if not temporary.exists():
            raise FileNotFoundError(f"nothing was written to the temporary for {final}")
        if temporary.is_dir() and final.exists():
            # os.replace cannot replace a non-empty directory: move the old one aside first
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            _remove(old)
            os.replace(final, old)
            os.replace(temporary, final)
            _remove(old)
        else:
            os.replace(temporary, final)
    except BaseException:
        _remove(temporary)
        raise
