"""The instance-mask store: one Zarr group of partition label maps per framework.

Layout of ``masks/{framework}.zarr`` (Zarr format 3, defined here and nowhere else):

- root group attributes: ``format`` (``"dspo-label-maps/1"``), ``backend`` (``"sam"`` or
  ``"classical"``), ``sam_used``, ``model_type``, ``checkpoint``, ``generator`` (every SAM or
  classical segmenter setting), ``top_k``, ``source`` (``"hq"`` or a candidate setting) and
  whatever else the writer adds;
- one array per image, named by the image id: uint16 ``[H, W]``, Zstd-compressed, chunked
  in tiles of at most 256 x 256. Each pixel holds exactly one instance id (a partition,
  docs/design.md §2). Array attributes: ``instance_ids``, ``areas``, ``weights``,
  ``remainder_id`` (``None`` when the masks cover the image) and any extra keys given.

A store is written whole (:func:`write_label_maps`) or one label map at a time
(:func:`open_label_store`, then :func:`write_label_map` per image: the segment stage, which
holds one label map in memory and resumes a killed shard, docs/design.md §15); both give the
same bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from pipeline.io.atomic import atomic_path

STORE_FORMAT = "dspo-label-maps/1"
CHUNK_EDGE = 256


def _json_ready(value: Any) -> Any:
    """Attributes as plain JSON types (NumPy scalars and arrays become numbers and lists)."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"attribute value of type {type(value).__name__} is not JSON serialisable")


def _check_image_id(image_id: str) -> None:
    # a "/" would make Zarr create a nested group; leading dots/underscores are reserved names
    if not image_id or "/" in image_id or image_id.startswith((".", "__")):
        raise ValueError(f"image id {image_id!r} cannot name a Zarr array")


def label_map_attrs(label_map: np.ndarray, remainder_id: int | None) -> dict[str, Any]:
    """Per-array attributes derived from the label map itself (ids, areas, weights)."""
    instance_ids, areas = np.unique(label_map, return_counts=True)
    return {
        "instance_ids": instance_ids.tolist(),
        "areas": areas.tolist(),
        "weights": (areas / areas.sum()).tolist(),
        "remainder_id": remainder_id if remainder_id in instance_ids else None,
    }


def _prepared(
    image_id: str, label_map: np.ndarray, array_attrs: Mapping[str, Any] | None
) -> tuple[np.ndarray, dict[str, Any]]:
    """One label map checked and cast to uint16, with its attributes completed by
    :func:`label_map_attrs` when they lack ``instance_ids``."""
    _check_image_id(image_id)
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"label map {image_id!r}: expected [H, W], got {label_map.shape}")
    if label_map.dtype != np.uint16:
        if label_map.size and (label_map.min() < 0 or label_map.max() > 65535):
            raise ValueError(f"label map {image_id!r}: labels outside uint16 range")
        label_map = label_map.astype(np.uint16)
    these_attrs = dict(array_attrs or {})
    if "instance_ids" not in these_attrs:
        these_attrs = {**label_map_attrs(label_map, these_attrs.get("remainder_id")), **these_attrs}
    return label_map, these_attrs


def _array_settings(label_map: np.ndarray, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """How every label map is stored (the module docstring's layout), in one place, so an
    array written alone (:func:`write_label_map`) has the bytes of one written with its store
    (:func:`write_label_maps`)."""
    return {
        "shape": label_map.shape,
        "dtype": "uint16",
        "chunks": tuple(min(CHUNK_EDGE, max(1, edge)) for edge in label_map.shape),
        "compressors": ZstdCodec(level=3),
        "fill_value": 0,
        "attributes": _json_ready(attrs),
    }


def _root_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    return _json_ready({"format": STORE_FORMAT, **attrs})


def write_label_maps(
    store_path: str | os.PathLike,
    label_maps: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any],
    array_attrs: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Write ``{image_id: uint16 [H, W]}`` as a new store, atomically.

    The whole group is built in a temporary directory beside ``store_path`` and renamed
    onto it, so a killed job leaves either the previous store or none. ``attrs`` become
    the root attributes; ``array_attrs[image_id]`` (optional) the array's attributes,
    completed by :func:`label_map_attrs` when it lacks ``instance_ids``.
    """
    array_attrs = array_attrs or {}
    with atomic_path(store_path) as temporary:
        root = zarr.open_group(temporary, mode="w", zarr_format=3)
        root.attrs.update(_root_attrs(attrs))
        for image_id, label_map in label_maps.items():
            label_map, these_attrs = _prepared(image_id, label_map, array_attrs.get(image_id))
            array = root.create_array(image_id, **_array_settings(label_map, these_attrs))
            array[...] = label_map


@contextlib.contextmanager
def _scratch(store_path: Path, what: str) -> Iterator[Path]:
    """A temporary folder beside the store (never inside it, where a leftover of a killed
    job would look like a label map), removed afterwards."""
    scratch = store_path.with_name(f".{store_path.name}.{what}.tmp-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def open_label_store(store_path: str | os.PathLike, attrs: Mapping[str, Any]) -> Path:
    """Create the store at ``store_path`` with root attributes ``attrs`` (as
    :func:`write_label_maps` writes them), or give a store an earlier, killed attempt began
    these attributes again, keeping its label maps: the start of a store written one label
    map at a time (:func:`write_label_map`; docs/design.md §15). The root's ``zarr.json`` is
    built beside the store and renamed in, so it is never half written."""
    path = Path(store_path)
    path.mkdir(parents=True, exist_ok=True)
    with _scratch(path, "root") as scratch:
        zarr.open_group(scratch, mode="w", zarr_format=3).attrs.update(_root_attrs(attrs))
        os.replace(scratch / "zarr.json", path / "zarr.json")
    return path


def write_label_map(
    store_path: str | os.PathLike,
    image_id: str,
    label_map: np.ndarray,
    array_attrs: Mapping[str, Any] | None = None,
) -> None:
    """Add one image's label map to a store :func:`open_label_store` began, replacing one of
    the same id: the array :func:`write_label_maps` would write (same layout, codec, chunks
    and attributes, so the same bytes). The array is built beside the store and renamed in,
    so the store holds each label map whole or not at all, and a stage holds one label map
    in memory at a time."""
    path = Path(store_path)
    if not (path / "zarr.json").is_file():
        raise FileNotFoundError(f"mask store not found: {path} (open_label_store first)")
    label_map, these_attrs = _prepared(image_id, label_map, array_attrs)
    with _scratch(path, "array") as scratch:
        array = zarr.create_array(
            store=str(scratch), zarr_format=3, **_array_settings(label_map, these_attrs)
        )
        array[...] = label_map
        final = path / image_id
        if final.exists():
            shutil.rmtree(final)
        os.replace(scratch, final)


def _open_store(store_path: str | os.PathLike) -> zarr.Group:
    store_path = Path(store_path)
    if not (store_path / "zarr.json").is_file():
        raise FileNotFoundError(f"mask store not found: {store_path}")
    return zarr.open_group(store_path, mode="r")


def _label_array(store_path: str | os.PathLike, image_id: str) -> zarr.Array:
    """One image's array, opened by its key: never a listing of the store, whose cost grows
    with the number of images in it (a gathered store holds every training image)."""
    root = _open_store(store_path)
    try:
        array = root[image_id] if image_id and "/" not in image_id else None
    except (KeyError, ValueError):  # absent, or not a key (zarr refuses '..' segments)
        array = None
    if not isinstance(array, zarr.Array):
        raise KeyError(f"mask store {store_path} has no label map for image {image_id!r}")
    return array


def read_label_map(store_path: str | os.PathLike, image_id: str) -> np.ndarray:
    """The uint16 ``[H, W]`` label map of one image (KeyError naming store and image)."""
    return np.asarray(_label_array(store_path, image_id)[...])


def read_label_map_attrs(store_path: str | os.PathLike, image_id: str) -> dict[str, Any]:
    """The attributes of one image's label map."""
    return dict(_label_array(store_path, image_id).attrs)


def read_store_attrs(store_path: str | os.PathLike) -> dict[str, Any]:
    """The root attributes: backend, model type, checkpoint, generator settings, ..."""
    return dict(_open_store(store_path).attrs)


def list_image_ids(store_path: str | os.PathLike) -> list[str]:
    """Image ids held by the store, sorted."""
    return sorted(_open_store(store_path).array_keys())


def instance_masks(label_map: np.ndarray, instance_ids: Any) -> np.ndarray:
    """Boolean masks ``[M, H, W]``, one per id in ``instance_ids`` (in that order)."""
    ids = np.asarray(instance_ids, dtype=np.int64).reshape(-1)
    return np.asarray(label_map)[None, :, :] == ids[:, None, None]
