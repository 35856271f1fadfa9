"""scripts/compare_results.py: tables by rows, stores by arrays, metadata aside."""

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

ROOT = Path(__file__).resolve().parents[1]


def _compare():
    spec = importlib.util.spec_from_file_location(
        "compare_results", ROOT / "scripts/compare_results.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _store(path: Path, values: np.ndarray, attrs: dict) -> Path:
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs.update(attrs)
    root.create_array("image", shape=values.shape, dtype=values.dtype)[...] = values
    return path


def test_a_store_given_directly_is_compared_by_its_arrays(tmp_path):
    compare = _compare()
    values = np.arange(12, dtype=np.uint16).reshape(3, 4)
    a = _store(tmp_path / "a.zarr", values, {"shards": 1})
    b = _store(tmp_path / "b.zarr", values, {"shards": 2})  # metadata differs: same
    c = _store(tmp_path / "c.zarr", values + 1, {"shards": 1})
    assert compare.main([str(a), str(b)]) == 0
    assert compare.main([str(a), str(c)]) == 1


def test_folders_name_each_differing_file(tmp_path, capsys):
    compare = _compare()
    for side, value in (("a", 1), ("b", 2)):
        (tmp_path / side).mkdir()
        pd.DataFrame({"x": [value]}).to_parquet(tmp_path / side / "t.parquet")
        (tmp_path / side / "same.txt").write_text("same")
    (tmp_path / "a" / "only.txt").write_text("a")
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    printed = capsys.readouterr().out
    assert "differs: t.parquet" in printed and "only in A: only.txt" in printed
    assert "same.txt" not in printed
