"""Rasterise labelme shapes with labelme 6.3.1's semantics (``utils.shape_to_mask`` /
``utils.shapes_to_label``), drawing straight into the label image.

Drawing shape ``k`` with value ``v`` (fill and outline) over the image is the same as
labelme's ``cls[shape_to_mask(...)] = v`` because Pillow draws the same pixel set whatever
the (non-antialiased) value is; shapes are drawn in file order, so later shapes win.

Bounded work for hostile coordinates: Pillow clips polygons, lines, rectangles and points to the
image row by row (their cost does not grow with the coordinates), but its ellipse walks the whole
circumference and its integer arithmetic breaks down for radii near a million pixels (a 300-byte
file with such a circle took 30 s, and larger radii draw garbage). A circle wider than
:data:`PILLOW_MAX_RADIUS` is therefore drawn from its equation, one span per image row (cost
proportional to the image's height); every smaller circle, i.e. every circle labelme draws
faithfully, is drawn by Pillow exactly as labelme does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .reader import Shape

LINE_WIDTH = 10
POINT_SIZE = 5
PILLOW_MAX_RADIUS = 65_536
"""Largest circle radius handed to Pillow's ellipse (exact and about 2 ms); larger ones are clipped."""


def _draw_large_circle(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, value: int) -> None:
    """Fill the circle's pixels one span per image row, clipped to the image first.

    Follows Pillow's own convention (bounding box truncated to integers, the pixel centres within half a
    pixel beyond it), which agrees with Pillow's ellipse up to a few boundary pixels where both work."""
    width, height = draw.im.size
    x0, y0, x1, y1 = int(cx - r), int(cy - r), int(cx + r), int(cy + r)
    ccx, ccy = (x0 + x1) / 2, (y0 + y1) / 2
    a, b = (x1 - x0) / 2 + 0.5, (y1 - y0) / 2 + 0.5
    top, bottom = max(0, math.ceil(ccy - b)), min(height - 1, math.floor(ccy + b))
    if top > bottom:
        return
    rows = np.arange(top, bottom + 1, dtype=np.float64)
    half = a * np.sqrt(np.maximum(1.0 - ((rows - ccy) / b) ** 2, 0.0))
    left = np.maximum(np.ceil(ccx - half), 0).astype(np.int64)
    right = np.minimum(np.floor(ccx + half), width - 1).astype(np.int64)
    for y, xl, xr in zip(rows.astype(np.int64).tolist(), left.tolist(), right.tolist()):
        if xl <= xr:
            draw.rectangle(((xl, y), (xr, y)), fill=value)


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, value: int) -> None:
    xy = [tuple(p) for p in shape.points]
    t = shape.shape_type
    if t == "circle":
        (cx, cy), (px, py) = xy
        d = math.sqrt((cx - px) ** 2 + (cy - py) ** 2)
        if d > PILLOW_MAX_RADIUS:
            _draw_large_circle(draw, cx, cy, d, value)
        else:
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
