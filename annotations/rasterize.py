"""Rasterise labelme shapes with labelme 6.3.1's semantics (``utils.shape_to_mask`` /
``utils.shapes_to_label``), drawing straight into the label image.

Drawing shape ``k`` with value ``v`` (fill and outline) over the image is the same as
labelme's ``cls[shape_to_mask(...)] = v`` because Pillow draws the same pixel set whatever
the (non-antialiased) value is; shapes are drawn in file order, so later shapes win.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .reader import Shape

LINE_WIDTH = 10
POINT_SIZE = 5


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, value: int) -> None:
    xy = [tuple(p) for p in shape.points]
    t = shape.shape_type
    if t == "circle":
        (cx, cy), (px, py) = xy
        d = math.sqrt((cx - px) ** 2 + (cy - py) ** 2)
        draw.ellipse(((cx - d, cy - d), (cx + d, cy + d)), outline=value, fill=value)
    elif t == "rectangle":
        (x0, y0), (x1, y1) = xy
        draw.rectangle(((min(x0, x1), min(y0, y1)), (max(x0, x1), max(y0, y1))), outline=value, fill=value)
    elif t in ("line", "linestrip"):
        draw.line(xy=xy, fill=value, width=LINE_WIDTH)
    elif t == "point":
        cx, cy = xy[0]
        r = POINT_SIZE
        draw.ellipse(((cx - r, cy - r), (cx + r, cy + r)), outline=value, fill=value)
    elif t in ("polygon", "oriented_rectangle"):
        draw.polygon(xy=xy, outline=value, fill=value)
    else:  # pragma: no cover - the reader rejects other types
        raise ValueError(f"shape_type={t!r} is not supported")


def mask_placement(shape: Shape, width: int, height: int) -> tuple[slice, slice, np.ndarray]:
    """Where a ``mask`` shape's patch lands: ``(rows, cols, patch)`` cropped to the image.

    The patch's top-left corner is the first point truncated to int (labelme:
    ``np.asarray(points).astype(int)``); the patch keeps its own size and is cropped to the image.
    """
    assert shape.mask is not None
    x1, y1 = (int(v) for v in shape.points[0])
    patch = shape.mask
    ph, pw = patch.shape
    r0, c0 = max(y1, 0), max(x1, 0)
    r1, c1 = min(y1 + ph, height), min(x1 + pw, width)
    if r1 <= r0 or c1 <= c0:
        return slice(0, 0), slice(0, 0), patch[:0, :0]
    return slice(r0, r1), slice(c0, c1), patch[r0 - y1: r1 - y1, c0 - x1: c1 - x1]


def shape_to_mask(shape: Shape, width: int, height: int) -> np.ndarray:
    """Boolean mask of one shape (labelme's ``shape_to_mask``; masks placed and cropped)."""
    if shape.shape_type == "mask":
        out = np.zeros((height, width), dtype=bool)
        rows, cols, patch = mask_placement(shape, width, height)
        out[rows, cols] = patch
        return out
    img = Image.new("L", (width, height), 0)
    _draw(ImageDraw.Draw(img), shape, 1)
    return np.asarray(img, dtype=bool)


def rasterize(shapes: Sequence[Shape], values: Sequence[int], width: int, height: int,
              fill: int = 0, mode: str = "L") -> np.ndarray:
    """Draw ``shapes`` in order, shape ``k`` with ``values[k]``, over a ``fill`` background.

    ``mode`` ``"L"`` gives a uint8 map, ``"I"`` an int32 map (instance ids above 255)."""
    img = Image.new(mode, (width, height), fill)
    draw = ImageDraw.Draw(img)
    for shape, value in zip(shapes, values, strict=True):
        if shape.shape_type == "mask":
            arr = np.array(img)
            rows, cols, patch = mask_placement(shape, width, height)
            arr[rows, cols][patch] = value  # basic slices: a view into arr
            img = Image.fromarray(arr)
            draw = ImageDraw.Draw(img)
        else:
            _draw(draw, shape, value)
    arr = np.array(img)
    return arr.astype(np.uint8 if mode == "L" else np.int32, copy=False)
