"""The pixel cap every image source shares, checked from the file header before any pixel is decoded.

Pillow opens images lazily: ``Image.open`` reads only the header, so ``.size`` is known before
``.load()`` allocates width x height x bands bytes. Every reader (image files, labelme ``imageData``,
``mask`` shape patches, files inside zips, video and webcam frames) calls :func:`open_image` or
:func:`check_pixels` so a 10000x10000 PNG of a few kilobytes is refused before it costs memory.
``segcore`` takes its default from here (the dependency points segcore -> annotations).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ImageLoadError, LabelmeFormatError

MAX_IMAGE_PIXELS = 50_000_000
"""Default cap on width x height of any image read (50 megapixels; servers pass a lower one)."""

MAX_CROSSINGS_PER_ROW = 1_000
"""How many shape edges may cross each image row, on average over a labelme file (see :class:`ShapeWork`)."""
MAX_MASK_COVER = 8
"""How many times over a labelme file's ``mask`` patches may cover its image, together."""


class ShapeWorkError(LabelmeFormatError):
    """A labelme file whose shapes would cost more to draw or hold than the caps allow."""


class ShapeWork:
    """The drawing work and mask memory of one labelme file's shapes, counted as they are read.

    Clipped to the image, a shape's area costs next to nothing to fill (Pillow fills 25 megapixels in
    2 ms, without releasing the interpreter); what costs is its edges: Pillow's polygon fill sorts the
    edges crossing each row, so one polygon of 20,000 random vertices over a 5000-row image takes 4 s,
    and a few megabytes of JSON could hold an hour of it. A shape's work is the rows its edges cross
    inside the image (a line's segments count the same, a circle its diameter); a file's shapes may cross
    ``max_crossings_per_row`` edges per image row on average (1,000: about 1 s of drawing at 25
    megapixels on a 2-core machine; an annotation with a hundred objects crosses a few hundred).
    ``mask`` patches are decoded and kept: together they may cover the image ``max_mask_cover`` times.
    """

    def __init__(self, width: int, height: int, where: str,
                 max_crossings_per_row: int | None = MAX_CROSSINGS_PER_ROW,
                 max_mask_cover: int | None = MAX_MASK_COVER):
        self.width, self.height, self.where = int(width), int(height), where
        self.max_crossings = max_crossings_per_row * max(self.height, 1) if max_crossings_per_row else None
        self.max_mask_pixels = max_mask_cover * self.width * self.height if max_mask_cover else None
        self.crossings = 0
        self.mask_pixels = 0

    def add_edges(self, points, closed: bool, shape: int) -> None:
        """Count the rows a shape's edges cross inside the image (``closed``: back to the first point)."""
        if self.max_crossings is None or not points:
            return
        ys = np.clip(np.asarray([p[1] for p in points], dtype=np.float64), -1, self.height)
        steps = np.abs(np.diff(ys, append=ys[:1] if closed else ys[-1:]))
        self.crossings += int(steps.sum()) + len(points)
        if self.crossings > self.max_crossings:
            per_row = self.max_crossings // max(self.height, 1)
            raise ShapeWorkError(
                f"{self.where}: shape {shape}: the shapes' edges cross {self.crossings:,} image rows, over "
                f"the cap of {self.max_crossings:,} ({per_row:,} per row of this {self.width}x{self.height} "
                "image): drawing them would take too long. Simplify the polygons (fewer points) or split "
                "the shapes over several files")

    def add_shape(self, shape_type: str, points, mask, shape: int) -> None:
        """Count one parsed shape (its type, its points, its decoded ``mask`` patch or None)."""
        if mask is not None:
            self.add_mask(mask.size, shape)
        elif shape_type == "circle":  # drawn row by row over its diameter
            (cx, cy), (px, py) = points
            r = float(np.hypot(cx - px, cy - py))
            self.add_edges([(cx, cy - r), (cx, cy + r)], False, shape)
        else:
            self.add_edges(points, shape_type not in ("line", "linestrip", "point"), shape)

    def add_mask(self, patch_pixels: int, shape: int) -> None:
        self.mask_pixels += int(patch_pixels)
        if self.max_mask_pixels is not None and self.mask_pixels > self.max_mask_pixels:
            times = self.max_mask_pixels // max(self.width * self.height, 1)
            raise ShapeWorkError(
                f"{self.where}: shape {shape}: the mask shapes hold {self.mask_pixels:,} pixels, over the "
                f"cap of {self.max_mask_pixels:,} ({times} times the image): crop each mask to its object, "
                "as labelme does")


class ImageTooLargeError(ImageLoadError):
    """An image's header declares more pixels than the cap; nothing was decoded."""


def check_pixels(width: int, height: int, max_pixels: int | None = MAX_IMAGE_PIXELS,
                 where: str = "image") -> None:
    """Raise :class:`ImageTooLargeError` when ``width x height`` exceeds ``max_pixels`` (None, 0: no cap)."""
    width, height = int(width), int(height)
    if max_pixels and width * height > max_pixels:
        raise ImageTooLargeError(f"{where}: {width}x{height} = {width * height:,} pixels exceeds the cap of "
                                 f"{int(max_pixels):,} pixels")


def open_image(source: bytes | str | os.PathLike, max_pixels: int | None = MAX_IMAGE_PIXELS,
               where: str | None = None) -> Image.Image:
    """Open ``source`` (bytes or a path) lazily and check its header size against ``max_pixels``.

    The returned image is not decoded yet (call ``.load()``); raises :class:`ImageTooLargeError`
    for an oversized header and :class:`ImageLoadError` for data Pillow cannot identify.
    """
    if where is None:
        where = "image data" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
    try:
        with warnings.catch_warnings():  # our cap, not Pillow's DecompressionBombWarning, decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(source, (bytes, bytearray, memoryview)):
                img = Image.open(io.BytesIO(bytes(source)))
            else:
                img = Image.open(Path(source))
    except Image.DecompressionBombError as e:  # Pillow's own cap (2x its warning size) in the header
        raise ImageTooLargeError(f"{where}: the image exceeds the cap of pixels accepted here ({e})") from e
    except Exception as e:  # PIL raises many types for bad data
        raise ImageLoadError(f"{where}: cannot decode image: {e}") from e
    try:
        check_pixels(*img.size, max_pixels, where)
    except ImageTooLargeError:
        img.close()
        raise
    return img


def image_size(source: bytes | str | os.PathLike, where: str | None = None) -> tuple[int, int]:
    """``(width, height)`` from the header alone (no cap applied, nothing decoded)."""
    img = open_image(source, None, where)
    try:
        return img.size
    finally:
        img.close()
