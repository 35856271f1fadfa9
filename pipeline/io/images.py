"""Image I/O: every image the pipeline reads becomes 8-bit RGB, in one documented way.

Conversions done by :func:`read_rgb`:

- grayscale (``L``, ``1``, ``I``, ``I;16``, ``F``): the single channel is repeated three times;
- 16-bit and 32-bit integer / float data: scaled linearly from the type's full range
  (0–65535 for 16-bit) to 0–255 and rounded, never clipped at 255;
- RGBA / LA / palette with transparency: composited over a white background
  (the usual choice of SR data loaders, which drop alpha);
- palette (``P``) and CMYK / YCbCr: converted to RGB by Pillow;
- an EXIF orientation tag (phone and camera JPEGs) is applied, so pixels are as a viewer shows
  them (``PIL.ImageOps.exif_transpose``); :func:`image_size` reports that oriented size.

Refused with :class:`ImageError` naming the file: corrupt or truncated files (Pillow's lenient
loading of truncated files is switched off here) and files holding several frames or pages
(multi-page TIFF, animated GIF / WebP / PNG), where no single frame is "the image".
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps

from pipeline.io.atomic import atomic_path

if TYPE_CHECKING:  # torch is imported where used: Snakemake imports this module at parse time
    import torch

    from pipeline.shards import Shard

ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
EXIF_ORIENTATION = 0x0112
# orientations 5-8 turn the image by 90 degrees: width and height swap
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)
# how many problems one error message lists before "and N more"
LISTED_PROBLEMS = 20


class ImageError(ValueError):
    """An image file that cannot be read as an image."""


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        # Pillow opens 16-bit PNGs as int32 mode "I"; their range is still 0..65535
        maximum = 65535.0 if array.max(initial=0) > 255 or array.dtype.itemsize >= 2 else 255.0
        return np.clip(np.rint(array.astype(np.float64) * (255.0 / maximum)), 0, 255).astype(
            np.uint8
        )
    if np.issubdtype(array.dtype, np.floating):
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(np.rint(array.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    raise ImageError(f"unsupported pixel type {array.dtype}")


def decode_rgb(image: Image.Image, name: str = "<image>") -> np.ndarray:
    """Convert an opened Pillow image to uint8 ``[H, W, 3]`` as documented in the module."""
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba).convert("RGB")
        mode = "RGB"
    if mode in ("I", "I;16", "I;16B", "I;16L", "F", "1", "L"):
        array = _to_uint8(np.asarray(image))
        return np.ascontiguousarray(np.repeat(array[:, :, None], 3, axis=2))
    if mode != "RGB":
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageError(f"{name}: could not convert mode {mode} to RGB")
    return np.ascontiguousarray(_to_uint8(array))


def list_problems(problems: list[str], limit: int = LISTED_PROBLEMS) -> str:
    """One line per problem, the first ``limit`` of them, then ``... and N more``."""
    lines = problems[:limit]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more")
    return "\n".join(lines)


def _check_single_frame(image: Image.Image, path: Path) -> None:
    frames = getattr(image, "n_frames", 1)
    # camera JPEGs with an embedded preview open as MPO: frame 0 is the photo itself
    if frames > 1 and image.format != "MPO":
        raise ImageError(
            f"{path}: holds {frames} frames or pages (multi-page TIFF or animated image); "
            "only single-frame images are read: save the wanted frame as its own file"
        )


def _orientation(image: Image.Image, header_only: bool = False) -> int:
    try:
        if header_only and image.format == "PNG":
            # Pillow's PNG getexif() decodes the whole file to look past the pixel data
            exif = Image.Exif()
            exif.load(image.info.get("exif", b""))
        else:
            exif = image.getexif()
        return int(exif.get(EXIF_ORIENTATION, 1))
    except (TypeError, ValueError, SyntaxError):  # a malformed tag: the pixels as stored
        return 1


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` as :func:`read_rgb` returns the image, from the header only.

    Cheap enough to check every file of a large folder before decoding any; raises
    :class:`ImageError` for files Pillow cannot identify and for multi-frame files.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            _check_single_frame(image, path)
            width, height = image.size
            if _orientation(image, header_only=True) in _TRANSPOSED_ORIENTATIONS:
                width, height = height, width
            return width, height
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(f"cannot read image {path}: {error}") from error


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read any supported image file as uint8 RGB ``[H, W, 3]`` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            _check_single_frame(image, path)
            image.load()
            if _orientation(image) != 1:
                image = ImageOps.exif_transpose(image)
            # 16-bit RGB PNG/TIFF: Pillow cannot hold it as RGB; read the raw array instead
            if image.mode in ("RGB;16", "RGBA;16", "I;16") or "16" in image.mode:
                array = np.asarray(image)
                if array.ndim == 3:
                    return np.ascontiguousarray(_to_uint8(array[:, :, :3]))
            return decode_rgb(image, str(path))
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(f"cannot read image {path}: {error}") from error


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write uint8 ``[H, W, 3]`` as PNG through a temporary name (deterministic bytes)."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"{path}: expected uint8 [H, W, 3], got {array.dtype} {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buffer, format="PNG", optimize=False, compress_level=6)
    with atomic_path(path) as temporary:
        temporary.write_bytes(buffer.getvalue())


def list_images(
    folder: str | os.PathLike, extensions: Iterable[str] = IMAGE_EXTENSIONS
) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted, hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    wanted = {extension.lower() for extension in extensions}
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and path.suffix.lower() in wanted
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def demo_root() -> Path:
    """The folder of the photos shipped inside scikit-image (the ``demo`` source)."""
    from skimage import data

    return Path(data.data_dir)


def source_image_id(relative_path: str | os.PathLike) -> str:
    """The id of a source image (degrade): its path relative to the source root without the
    extension, folders joined by ``__``, other unsafe characters ``_``. Here, beside
    :func:`source_manifest`, because a shard's manifest picks its images by this id."""
    stem = Path(relative_path).with_suffix("")
    return re.sub(r"[^A-Za-z0-9._-]", "_", "__".join(stem.parts))


#: one entry of a source listing: (image id, the image's path, its stat line: relative path,
#: size and mtime in ns)
_Entry = tuple[str, Path, str]
#: ``degrade.manifest``: what a source manifest hashes of each image (:func:`source_manifest`)
MANIFEST_MODES = ("stat", "content")


@functools.lru_cache(maxsize=4)
def _source_listing(
    source: str, demo_images: tuple[str, ...]
) -> tuple[str | None, Path | None, tuple[_Entry, ...]]:
    """The manifest's first line, the source root and one entry per image of ``source``, in
    manifest order.

    Cached per process: the degrade rule asks for the manifest of each of its K shards, and
    85k files are listed and stat'ed once, not K times (:func:`source_manifest`, ``fresh``).
    A folder that does not exist gives ``(None, None, ())``.
    """
    if source == "demo":
        from importlib.metadata import version

        header = f"demo\0scikit-image {version('scikit-image')}\n"
        root = demo_root()
        paths = [root / name for name in demo_images]
    else:
        root = Path(source)
        if not root.is_dir():
            return None, None, ()
        header = ""
        paths = list_images(root)
    entries = []
    for path in paths:
        relative = path.relative_to(root).as_posix()
        try:
            stat = path.stat()
            entry = f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}"
        except OSError:
            entry = f"{relative}\0missing"
        entries.append((source_image_id(relative), path, entry))
    return header, root, tuple(entries)


@functools.lru_cache(maxsize=16)
def _shard_entries(
    source: str, demo_images: tuple[str, ...], count: int
) -> dict[int, tuple[_Entry, ...]]:
    """The listing's entries of each of ``count`` shards (1..count), in manifest order: each
    id is hashed once per count, however many shards ask."""
    from pipeline.shards import shard_of

    grouped: dict[int, list[_Entry]] = {index: [] for index in range(1, count + 1)}
    for entry in _source_listing(source, demo_images)[2]:
        grouped[shard_of(entry[0], count)].append(entry)
    return {index: tuple(entries) for index, entries in grouped.items()}


@functools.cache
def _content_line(path: Path, root: Path) -> str:
    """An image's line of a ``content`` manifest: relative path and the SHA-256 of its bytes
    (cached per process as the listing is; ``fresh`` reads the bytes again)."""
    relative = path.relative_to(root).as_posix()
    try:
        with path.open("rb") as handle:
            return f"{relative}\0sha256 {hashlib.file_digest(handle, 'sha256').hexdigest()}"
    except OSError:
        return f"{relative}\0missing"


def source_manifest(
    source: str,
    demo_images: Sequence[str],
    shard: str | Shard | None = None,
    *,
    fresh: bool = False,
    manifest: str = "stat",
) -> str:
    """A fingerprint of a source of images: it changes when one is added, removed or changed.

    ``source`` is a folder (its :func:`list_images`) or ``demo`` (``demo_images`` in
    :func:`demo_root`, with the scikit-image version). Snakemake sees only the folder's name
    in the config, so the degrade rule passes this as a param, a rerun trigger (docs/design.md,
    caching). A folder that does not exist gives a fixed value: a dry run plans without the
    data and the run itself names the missing folder.

    ``manifest`` (``degrade.manifest``) is what is hashed of each image: ``stat`` (the default)
    the sorted (relative path, size, mtime in ns), so 85k files cost a second or so, but a file
    replaced by one of the same size and mtime goes unseen; ``content`` the relative path and
    the SHA-256 of the bytes, which sees every change (and ignores a mere touch) at the cost
    of reading every image of the shard each time Snakemake plans.

    ``shard`` (a scatter item ``"I-of-K"`` or a :class:`pipeline.shards.Shard`; None: every
    image) hashes only the images whose :func:`source_image_id` lies in that shard, so degrade's
    shard I reruns only when one of its own images changes (docs/design.md §15); shard ``1-of-1``
    gives the same value as None. The folder is listed once per process and cached, so K calls
    cost one listing; ``fresh=True`` lists it again (the degrade stage records what it reads).
    """
    if manifest not in MANIFEST_MODES:
        raise ValueError(f"degrade.manifest: {manifest!r} is not one of {MANIFEST_MODES}")
    demo_images = tuple(demo_images)
    if fresh:
        _source_listing.cache_clear()
        _shard_entries.cache_clear()
        _content_line.cache_clear()
    header, root, entries = _source_listing(source, demo_images)
    if header is None or root is None:
        return f"missing folder {Path(source)}"
    entries, label = _shard_of_listing(source, demo_images, shard, entries)
    lines = [e[2] if manifest == "stat" else _content_line(e[1], root) for e in entries]
    kind = "" if manifest == "stat" else "content "
    digest = hashlib.sha256((header if manifest == "stat" else f"content\n{header}").encode())
    for line in lines:
        digest.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return f"{len(lines)} images{label}, {kind}sha256 {digest.hexdigest()}"


def _shard_of_listing(
    source: str, demo_images: tuple[str, ...], shard: str | Shard | None, entries
) -> tuple[tuple[_Entry, ...], str]:
    """The entries of ``shard`` (all for None or a shard of one) and the manifest's label."""
    if shard is None:
        return entries, ""
    from pipeline.shards import Shard

    shard = shard if isinstance(shard, Shard) else Shard.parse(str(shard))
    if shard.count == 1:
        return entries, ""
    return _shard_entries(source, demo_images, shard.count)[shard.index], f" of shard {shard.item}"


def unit_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` (or a stack ``[B, H, W, 3]``) → float32 ``[3, H, W]`` (``[B, 3, H, W]``)
    in [0, 1]: pyiqa's convention, what the score and evaluate stages measure."""
    import torch

    tensor = torch.from_numpy(np.array(array, dtype=np.uint8, copy=True))
    return tensor.movedim(-1, -3).to(torch.float32).div(255.0)


def signed_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` → float32 ``[3, H, W]`` in [-1, 1]: the models' convention (diffusers'
    image range; torchvision's ``to_tensor`` gives [0, 1], see :func:`unit_tensor`)."""
    import torch

    return (
        torch.from_numpy(np.array(array, dtype=np.uint8, copy=True))
        .permute(2, 0, 1)
        .float()
        .div(127.5)
        .sub(1.0)
    )


def signed_to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """float ``[3, H, W]`` in [-1, 1] (:func:`signed_tensor`'s range) → uint8 ``[H, W, 3]`` (clamped, rounded)."""
    import torch

    scaled = tensor.detach().float().cpu().clamp(-1.0, 1.0).add(1.0).mul(127.5).round()
    return scaled.to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
