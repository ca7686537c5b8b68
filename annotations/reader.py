"""Reader for labelme JSON files (labelme 3.x to 6.x)."""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageLoadError, LabelmeFormatError
from .limits import MAX_IMAGE_PIXELS, ShapeWork, open_image

SHAPE_TYPES = ("polygon", "rectangle", "circle", "line", "linestrip", "point", "oriented_rectangle", "mask")
# Exact point counts labelme requires; a different count is ambiguous -> file error.
_EXACT_POINTS = {"rectangle": 2, "circle": 2, "line": 2, "point": 1, "oriented_rectangle": 4, "mask": 2}
# Minimum counts for free-form shapes; fewer points enclose no area -> shape skipped with a warning.
_MIN_POINTS = {"polygon": 3, "linestrip": 2}
# Beyond this many pixels Pillow's integer rasteriser silently wraps around (it draws garbage
# for e.g. 1e12), so such a shape cannot be drawn faithfully by labelme or by us.
MAX_ABS_COORD = 1_000_000.0


@dataclass
class Shape:
    """One labelme shape. ``shape_type`` is never ``None`` (missing/null -> ``"polygon"``)."""

    index: int
    label: str
    points: list[tuple[float, float]]
    shape_type: str = "polygon"
    group_id: Any = None
    flags: dict = field(default_factory=dict)
    description: str = ""
    mask: np.ndarray | None = field(default=None, repr=False)
    other: dict = field(default_factory=dict, repr=False)


@dataclass
class Issue:
    """A warning or error about a file (``shape`` is the shape index in the file, or None)."""

    file: str
    reason: str
    shape: int | None = None
    label: str | None = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"file": self.file, "reason": self.reason}
        if self.shape is not None:
            d["shape"] = self.shape
        if self.label is not None:
            d["label"] = self.label
        return d


@dataclass
class LabelmeFile:
    """A parsed labelme file with its decoded image."""

    path: str
    version: str | None
    image: Image.Image = field(repr=False)
    image_bytes: bytes = field(repr=False)
    image_format: str | None
    image_source: str  # "embedded" or "path"
    image_path: str | None
    exif_rotated: bool
    shapes: list[Shape]
    flags: dict
    warnings: list[Issue] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)``."""
        return self.image.size

    def rgb_array(self) -> np.ndarray:
        img = self.image
        if img.mode != "RGB":
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(img, dtype=np.float64)
                lo, hi = float(arr.min()), float(arr.max())
                arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
                img = Image.fromarray(arr.astype(np.uint8)).convert("RGB")
            else:
                img = img.convert("RGB")
        return np.asarray(img, dtype=np.uint8)


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/mirror by the EXIF Orientation tag exactly as labelme's ``apply_exif_orientation``."""
    try:
        exif = image._getexif()  # type: ignore[attr-defined]
    except AttributeError:
        exif = None
    except Exception:  # corrupt EXIF: labelme would fail; we keep the image as stored
        exif = None
    if not exif:
        return image
    orientation = exif.get(0x0112)
    if orientation == 2:
        return ImageOps.mirror(image)
    if orientation == 3:
        return image.transpose(Image.Transpose.ROTATE_180)
    if orientation == 4:
        return ImageOps.flip(image)
    if orientation == 5:
        return ImageOps.mirror(image.transpose(Image.Transpose.ROTATE_270))
    if orientation == 6:
        return image.transpose(Image.Transpose.ROTATE_270)
    if orientation == 7:
        return ImageOps.mirror(image.transpose(Image.Transpose.ROTATE_90))
    if orientation == 8:
        return image.transpose(Image.Transpose.ROTATE_90)
    return image


def _decode_image(data: bytes, where: str, max_pixels: int | None) -> Image.Image:
    """Decode ``data`` after checking its header against ``max_pixels`` (nothing decoded when over)."""
    img = open_image(data, max_pixels, where)
    try:
        img.load()
    except Exception as e:  # PIL raises many types for bad data
        raise ImageLoadError(f"{where}: cannot decode image: {e}") from e
    return img


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _decode_mask(b64: Any, path: str, i: int, max_pixels: int | None) -> np.ndarray:
    if not isinstance(b64, str):
        raise _shape_error(f"{path}: shape {i}: mask shape needs a base64 PNG in 'mask'", i)
    try:
        img = open_image(base64.b64decode(b64), max_pixels, f"{path}: shape {i}: mask PNG")
        img.load()
    except ImageLoadError as e:
        raise _shape_error(str(e), i) from e
    except Exception as e:
        raise _shape_error(f"{path}: shape {i}: cannot decode mask PNG: {e}", i) from e
    arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr.any(axis=2)
    return arr.astype(bool)


def _shape_error(message: str, shape: int) -> LabelmeFormatError:
    err = LabelmeFormatError(message)
    err.shape = shape  # type: ignore[attr-defined]
    return err


def parse_shape(obj: Any, i: int, path: str, warnings: list[Issue],
                max_pixels: int | None = MAX_IMAGE_PIXELS) -> Shape | None:
    """Validate one shape. Raises :class:`LabelmeFormatError` for file-level problems; returns
    ``None`` (with a warning appended) for a degenerate shape that is skipped. A ``mask`` shape's
    patch is refused from its header when it has more than ``max_pixels`` pixels."""
    if not isinstance(obj, dict):
        raise _shape_error(f"{path}: shape {i}: not a JSON object", i)
    label = obj.get("label")
    if not isinstance(label, str):
        raise _shape_error(f"{path}: shape {i}: 'label' missing or not a string", i)
    shape_type = obj.get("shape_type")
    if shape_type is None:
        shape_type = "polygon"
    if shape_type not in SHAPE_TYPES:
        raise _shape_error(f"{path}: shape {i} ({label!r}): unsupported shape_type {shape_type!r}", i)
    raw = obj.get("points")
    if not isinstance(raw, list):
        raise _shape_error(f"{path}: shape {i} ({label!r}): 'points' missing or not a list", i)
    points: list[tuple[float, float]] = []
    for p in raw:
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_number(v) for v in p)):
            raise _shape_error(f"{path}: shape {i} ({label!r}): point {p!r} is not [x, y] numbers", i)
        x, y = p
        if not (math.isfinite(x) and math.isfinite(y)):
            raise _shape_error(f"{path}: shape {i} ({label!r}): point {p!r} has NaN or infinite coordinates", i)
        if abs(x) > MAX_ABS_COORD or abs(y) > MAX_ABS_COORD:
            raise _shape_error(
                f"{path}: shape {i} ({label!r}): point {p!r} lies far outside any image "
                f"(|coordinate| > {MAX_ABS_COORD:g}); it cannot be rasterised faithfully", i)
        points.append((x, y))
    n = len(points)
    if shape_type in _EXACT_POINTS and n != _EXACT_POINTS[shape_type]:
        raise _shape_error(
            f"{path}: shape {i} ({label!r}): {shape_type} needs exactly {_EXACT_POINTS[shape_type]} "
            f"point(s), got {n}", i)
    if shape_type in _MIN_POINTS and n < _MIN_POINTS[shape_type]:
        warnings.append(Issue(path, f"{shape_type} with {n} point(s) (needs at least "
                                    f"{_MIN_POINTS[shape_type]}) encloses no area; shape skipped", i, label))
        return None
    mask = _decode_mask(obj.get("mask"), path, i, max_pixels) if shape_type == "mask" else None
    flags = obj.get("flags") or {}
    description = obj.get("description") or ""
    group_id = obj.get("group_id")
    if group_id is not None and not isinstance(group_id, (int, str)):
        raise _shape_error(f"{path}: shape {i} ({label!r}): group_id {group_id!r} is not an integer", i)
    known = {"label", "points", "shape_type", "group_id", "flags", "description", "mask"}
    return Shape(index=i, label=label, points=points, shape_type=shape_type, group_id=group_id,
                 flags=flags if isinstance(flags, dict) else {}, description=str(description), mask=mask,
                 other={k: v for k, v in obj.items() if k not in known})


def _inside(candidate: Path, root: str) -> bool:
    """Whether ``candidate`` (symbolic links followed) is a file below ``root`` (already resolved)."""
    real = os.path.realpath(candidate)
    return os.path.commonpath([root, real]) == root and os.path.isfile(real)


def resolve_image_path(json_path: str | Path, image_path: str, root: str | Path | None = None) -> Path | None:
    """The file ``imagePath`` names, or None when it is not a file inside ``root``.

    ``root`` (default: the JSON file's folder) is the uploaded folder or extracted zip. Absolute
    paths (POSIX, ``C:\\...``, ``\\\\server``) are never looked up; relative ones (``/`` or ``\\``
    separators) must stay inside ``root`` once ``..`` and symbolic links are resolved. A path that
    exists outside ``root`` and one that does not exist at all give the same None, so no caller can
    tell the two apart (nothing about the server's files leaks into a message).
    """
    json_path = Path(json_path)
    top = os.path.realpath(root if root is not None else json_path.parent)
    win = PureWindowsPath(image_path)
    if win.drive or win.root or PurePosixPath(image_path).is_absolute():
        return None
    candidate = json_path.parent / win.as_posix()
    return candidate if _inside(candidate, top) else None


def read_labelme(path: str | Path, *, root: str | Path | None = None,
                 max_pixels: int | None = MAX_IMAGE_PIXELS) -> LabelmeFile:
    """Read a labelme JSON file and its image.

    ``root`` bounds where ``imagePath`` may point (default: the JSON file's folder; pass the
    uploaded folder or extracted zip); see :func:`resolve_image_path`. Images (files or embedded
    ``imageData``) and ``mask`` patches with more than ``max_pixels`` pixels are refused from their
    header, before decoding. Raises :class:`LabelmeFormatError` (bad JSON, missing keys, invalid
    shapes) or :class:`ImageLoadError` (missing/undecodable/oversized image, size mismatch).
    """
    path = Path(path)
    p = str(path)
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise LabelmeFormatError(f"{p}: not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise LabelmeFormatError(f"{p}: not a labelme file (top level is not an object)")
    if "shapes" not in raw or not isinstance(raw["shapes"], list):
        raise LabelmeFormatError(f"{p}: not a labelme file ('shapes' list missing)")
    warnings: list[Issue] = []

    image_path = raw.get("imagePath")
    if image_path is not None and not isinstance(image_path, str):
        raise LabelmeFormatError(f"{p}: 'imagePath' is not a string")
    image_data = raw.get("imageData")
    exif_rotated = False
    if image_data:
        if not isinstance(image_data, str):
            raise ImageLoadError(f"{p}: 'imageData' is not a base64 string")
        try:
            data = base64.b64decode(image_data)
        except (binascii.Error, ValueError) as e:
            raise ImageLoadError(f"{p}: 'imageData' is not valid base64: {e}") from e
        img = _decode_image(data, f"{p} (embedded imageData)", max_pixels)
        source = "embedded"
    else:
        if not image_path:
            raise ImageLoadError(f"{p}: no embedded imageData and no imagePath")
        candidate = resolve_image_path(path, image_path, root)
        if candidate is None:
            fallback = resolve_image_path(path, PureWindowsPath(image_path).name, root)
            if fallback is None:
                raise ImageLoadError(
                    f"{p}: image {image_path!r} not found in the input folder or zip (imagePath must be "
                    "a relative path to an image inside it, e.g. the image's name when it sits beside the "
                    "JSON file; or embed the image with labelme's 'Save With Image Data')")
            warnings.append(Issue(p, f"imagePath {image_path!r} not found in the input folder or zip; used "
                                     f"{fallback.name!r} beside the JSON file"))
            candidate = fallback
        try:
            data = candidate.read_bytes()
        except OSError as e:
            raise ImageLoadError(f"{p}: cannot read image {candidate.name}: {e}") from e
        img = _decode_image(data, f"{p} (image {candidate.name})", max_pixels)
        oriented = apply_exif_orientation(img)
        exif_rotated = oriented is not img
        if exif_rotated:
            fmt = img.format
            img = oriented
            img.format = fmt  # type: ignore[misc]
        source = "path"

    w, h = img.size
    for key, actual in (("imageHeight", h), ("imageWidth", w)):
        declared = raw.get(key)
        if declared is not None and declared != actual:
            raise ImageLoadError(f"{p}: {key} mismatch: declared {declared}, image has {actual}")

    shapes: list[Shape] = []
    work = ShapeWork(w, h, p)  # what drawing and holding the shapes costs is bounded as they are read
    for i, obj in enumerate(raw["shapes"]):
        s = parse_shape(obj, i, p, warnings, max_pixels)
        if s is None:
            continue
        work.add_shape(s.shape_type, s.points, s.mask, i)
        xs = [pt[0] for pt in s.points]
        ys = [pt[1] for pt in s.points]
        if s.shape_type != "mask" and (min(xs) < 0 or min(ys) < 0 or max(xs) > w or max(ys) > h):
            warnings.append(Issue(p, f"{s.shape_type} has points outside the {w}x{h} image; "
                                     "drawn clipped to the image as labelme does", i, s.label))
        shapes.append(s)
    flags = raw.get("flags") or {}
    version = raw.get("version")
    return LabelmeFile(path=p, version=str(version) if version is not None else None, image=img,
                       image_bytes=data, image_format=img.format, image_source=source,
                       image_path=image_path, exif_rotated=exif_rotated, shapes=shapes,
                       flags=flags if isinstance(flags, dict) else {}, warnings=warnings)
