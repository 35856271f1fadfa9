"""Compare two results folders file by file, metadata aside (docs/design.md §15).

``python scripts/compare_results.py A B`` prints one line per file that differs or exists on one
side only, and a count; A and B may also be two tables, stores or files. Parquet tables are compared by their rows (the ``dspo`` metadata
document, which records paths, times and settings, is left out); Zarr stores by their arrays
(attributes left out); safetensors by their tensors; every other file by its bytes. Exit status
1 when a file differs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def _parquet_equal(a: Path, b: Path) -> bool:
    left, right = pq.read_table(a), pq.read_table(b)
    return left.replace_schema_metadata(None).equals(right.replace_schema_metadata(None))


def _zarr_equal(a: Path, b: Path) -> bool:
    import zarr

    left, right = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    if sorted(left.array_keys()) != sorted(right.array_keys()):
        return False
    return all(np.array_equal(left[k][...], right[k][...]) for k in left.array_keys())


def _safetensors_equal(a: Path, b: Path) -> bool:
    from safetensors.numpy import load_file

    left, right = load_file(str(a)), load_file(str(b))
    return left.keys() == right.keys() and all(np.array_equal(left[k], right[k]) for k in left)


def files(root: Path) -> dict[str, Path]:
    """Relative path -> path; a Zarr store counts as one file."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if any(part.endswith(".zarr") for part in path.relative_to(root).parts[:-1]):
            continue
        if path.is_file() or path.suffix == ".zarr":
            found[path.relative_to(root).as_posix()] = path
    return found


def same(a: Path, b: Path) -> bool:
    if a.suffix == ".parquet":
        return _parquet_equal(a, b)
    if a.suffix == ".zarr":
        return _zarr_equal(a, b)
    if a.suffix == ".safetensors":
        return _safetensors_equal(a, b)
    return a.read_bytes() == b.read_bytes()


def main(argv: list[str] | None = None) -> int:
    a_root, b_root = (Path(p) for p in (argv or sys.argv[1:]))
    if a_root.is_file() or a_root.suffix == ".zarr":  # one table, store or file: compare it
        equal = same(a_root, b_root)
        print(f"{'same' if equal else 'differs'}: {a_root.name}")
        return 0 if equal else 1
    a, b = files(a_root), files(b_root)
    differing = 0
    for name in sorted(a.keys() | b.keys()):
        if name not in b or name not in a:
            print(f"only in {'A' if name in a else 'B'}: {name}")
            differing += 1
        elif not same(a[name], b[name]):
            print(f"differs: {name}")
            differing += 1
    print(f"{differing} of {len(a.keys() | b.keys())} files differ or exist on one side only")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
