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

from PIL import Image

from .errors import ImageLoadError

MAX_IMAGE_PIXELS = 50_000_000
"""Default cap on width x height of any image read (50 megapixels; servers pass a lower one)."""


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
