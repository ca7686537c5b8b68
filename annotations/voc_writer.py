"""Writing a VOC-style dataset folder: the per-image files and the folder's index, staged so the
output never holds a half-written dataset (see docs/annotations.md for the layout)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import OutputExistsError
from .label_spaces import LabelSpace, palette_image
from .reader import LabelmeFile

JPEG_QUALITY = 100  # used only when the original bytes cannot be copied (see docs/annotations.md)
FOLDERS = ("JPEGImages", "SegmentationClass", "SegmentationClassVisualization", "ImageSets/Segmentation")
INSTANCE_FOLDER = "SegmentationObject"


def check_output(output: Path, overwrite: bool) -> None:
    """OutputExistsError unless ``output`` is absent, or ``overwrite`` and it is empty or one of ours."""
    if not output.exists():
        return
    if not overwrite:
        raise OutputExistsError(f"{output}: output folder exists (pass overwrite=True / --overwrite)")
    if not output.is_dir() or not _looks_like_dataset(output):
        raise OutputExistsError(f"{output}: exists and does not look like a dataset written by this tool; "
                                "refusing to overwrite it")


def _looks_like_dataset(p: Path) -> bool:
    if not any(p.iterdir()):
        return True
    return (p / "report.json").exists() or (p / "class_names.txt").exists()


@contextlib.contextmanager
def staged_dataset(output: Path, instances: bool) -> Iterator[Path]:
    """A hidden sibling folder with the dataset's sub-folders, renamed to ``output`` when the block
    completes and removed when it raises."""
    output.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        for sub in FOLDERS + ((INSTANCE_FOLDER,) if instances else ()):
            (stage / sub).mkdir(parents=True, exist_ok=True)
        yield stage
        if output.exists():
            shutil.rmtree(output)
        os.replace(stage, output)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def write_index(folder: Path, class_names: Sequence[str], names: Sequence[str], report: dict) -> None:
    """class_names.txt, the ``all`` image set and report.json."""
    (folder / "class_names.txt").write_text("\n".join(class_names) + "\n", encoding="utf-8")
    (folder / "ImageSets" / "Segmentation" / "all.txt").write_text(
        "".join(f"{n}\n" for n in sorted(names)), encoding="utf-8")
    (folder / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")


def write_image(folder: Path, lf: LabelmeFile, name: str, image: np.ndarray, class_map: np.ndarray,
                instance_map: np.ndarray | None, space: LabelSpace) -> None:
    """One converted image's JPEG, class PNG, visualisation and (when given) instance PNG."""
    (folder / "JPEGImages" / f"{name}.jpg").write_bytes(_jpeg_bytes(lf, image))
    cls_img = palette_image(class_map, space.palette)
    cls_img.save(folder / "SegmentationClass" / f"{name}.png", format="PNG", compress_level=1)
    base = lf.image if lf.image.mode == "RGB" else Image.fromarray(image)
    visual = _visualize(base, cls_img, space)
    visual.save(folder / "SegmentationClassVisualization" / f"{name}.jpg", quality=90)
    if instance_map is not None:
        path = folder / INSTANCE_FOLDER / f"{name}.png"
        if instance_map.max(initial=0) < 255:
            palette_image(instance_map.astype(np.uint8)).save(path, format="PNG", compress_level=1)
        else:  # more than 254 instances: 16-bit grey PNG
            Image.fromarray(instance_map.astype(np.uint16)).save(path, format="PNG")


def _visualize(image: Image.Image, cls_img: Image.Image, space: LabelSpace) -> Image.Image:
    """50% blend of the image with the class colours; background (or, without a background
    class, ignore) pixels keep the image. All in Pillow's C code."""
    base = image if image.mode == "RGB" else image.convert("RGB")
    colour = cls_img.convert("RGB")
    keep = space.background_index if space.background_index is not None else space.ignore_index
    lut = [255] * 256
    lut[keep] = 0
    mask = Image.frombytes("L", cls_img.size, cls_img.tobytes()).point(lut)
    return Image.composite(Image.blend(base, colour, 0.5), base, mask)


def _jpeg_bytes(lf: LabelmeFile, rgb: np.ndarray) -> bytes:
    """The original bytes when they are a plain RGB JPEG whose pixels labelme uses unchanged;
    otherwise a quality-100, 4:4:4 JPEG of the decoded (EXIF-rotated for files) pixels."""
    img = lf.image
    if lf.image_format == "JPEG" and img.mode == "RGB" and not lf.exif_rotated:
        try:
            orientation = img.getexif().get(0x0112)
        except Exception:
            orientation = -1
        if orientation in (None, 1):
            return lf.image_bytes
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()
