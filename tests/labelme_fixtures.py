"""Generators of labelme JSON files for the annotations tests and benchmark (seeded, random)."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

VOC_LABELS = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
              "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
              "train", "tvmonitor")
LABELME_VOC_NAME_TO_ID = {"__ignore__": -1, "_background_": 0, **{n: i + 1 for i, n in enumerate(VOC_LABELS)}}


def make_image(rng: np.random.Generator, width: int, height: int, noise: int = 40) -> np.ndarray:
    """A smooth-ish RGB image (gradients + uniform noise of amplitude ``noise``)."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                     (xx + yy) * 255 // max(width + height - 2, 1)], axis=-1)
    jitter = rng.integers(0, max(noise, 1), size=(height, width, 3))
    return np.clip(base + jitter, 0, 255).astype(np.uint8)


def encode_image(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def mask_b64(patch: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(patch.astype(bool)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _coord(rng, lo, hi, frac=True):
    v = rng.uniform(lo, hi)
    return round(float(v), int(rng.integers(0, 4))) if frac else float(int(v))


def random_shape(rng: np.random.Generator, width: int, height: int, shape_type: str, label: str,
                 group_id=None) -> dict:
    """One labelme shape of ``shape_type``; coordinates fractional, some beyond/at the borders."""
    mx, my = width * 0.15, height * 0.15

    def pt():
        r = rng.random()
        if r < 0.1:  # exactly on a border
            return [float(rng.choice([0, width - 1, width])), _coord(rng, 0, height)]
        if r < 0.2:
            return [_coord(rng, 0, width), float(rng.choice([0, height - 1, height]))]
        return [_coord(rng, -mx, width + mx), _coord(rng, -my, height + my)]

    if shape_type == "polygon":
        n = int(rng.integers(3, 9))
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(5, max(width, height) / 2)
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        if rng.random() < 0.3:  # self-intersecting / random order
            rng.shuffle(ang)
        rad = r * rng.uniform(0.3, 1.0, n)
        pts = [[round(float(cx + a * np.cos(t)), 2), round(float(cy + a * np.sin(t)), 2)] for a, t in zip(rad, ang)]
    elif shape_type == "oriented_rectangle":
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        w2, h2, t = rng.uniform(3, width / 3), rng.uniform(3, height / 3), rng.uniform(0, np.pi)
        c, s = np.cos(t), np.sin(t)
        pts = [[round(float(cx + dx * c - dy * s), 3), round(float(cy + dx * s + dy * c), 3)]
               for dx, dy in ((-w2, -h2), (w2, -h2), (w2, h2), (-w2, h2))]
    elif shape_type in ("rectangle", "line", "circle"):
        pts = [pt(), pt()]
        if shape_type == "circle":
            pts[1] = [pts[0][0] + _coord(rng, -25, 25), pts[0][1] + _coord(rng, -25, 25)]
    elif shape_type == "linestrip":
        pts = [pt() for _ in range(int(rng.integers(2, 6)))]
    elif shape_type == "point":
        pts = [pt()]
    elif shape_type == "mask":
        pw, ph = int(rng.integers(1, width // 2)), int(rng.integers(1, height // 2))
        x1, y1 = int(rng.integers(0, width - pw + 1)), int(rng.integers(0, height - ph + 1))
        patch = rng.random((ph, pw)) < 0.6
        return {"label": label, "points": [[x1, y1], [x1 + pw - 1, y1 + ph - 1]], "group_id": group_id,
                "description": "", "shape_type": "mask", "flags": {}, "mask": mask_b64(patch)}
    else:
        raise ValueError(shape_type)
    return {"label": label, "points": pts, "group_id": group_id, "description": "", "shape_type": shape_type,
            "flags": {}, "mask": None}


ALL_TYPES = ("polygon", "rectangle", "circle", "line", "linestrip", "point", "oriented_rectangle", "mask")


def random_annotation(rng: np.random.Generator, width: int, height: int, n_shapes: int,
                      labels=VOC_LABELS, types=ALL_TYPES) -> list[dict]:
    """Shapes of every type; some later ``_background_`` shapes (holes), ``__ignore__`` shapes,
    and shared group_ids (multi-part instances)."""
    shapes = []
    for k in range(n_shapes):
        t = types[k % len(types)] if k < len(types) else str(rng.choice(types))
        r = rng.random()
        label = "_background_" if r < 0.12 else "__ignore__" if r < 0.2 else str(rng.choice(labels))
        gid = int(rng.integers(1, 3)) if rng.random() < 0.3 else None
        shapes.append(random_shape(rng, width, height, t, label, gid))
    return shapes


def write_labelme(path: Path, shapes: list[dict], image: np.ndarray, *, embed: bool = True, fmt: str = "PNG",
                  version: str = "5.4.1", image_name: str | None = None, windows_path: bool = False,
                  image_subdir: str | None = None, extra: dict | None = None) -> Path:
    """Write a labelme JSON (and the image file when not embedded)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = {"PNG": ".png", "JPEG": ".jpg"}[fmt]
    kw = {"quality": 92} if fmt == "JPEG" else {}
    data = encode_image(image, fmt, **kw)
    image_name = image_name or path.stem + ext
    rel = image_name if image_subdir is None else f"{image_subdir}/{image_name}"
    if not embed:
        (path.parent / rel).parent.mkdir(parents=True, exist_ok=True)
        (path.parent / rel).write_bytes(data)
    doc = {"version": version, "flags": {}, "shapes": shapes,
           "imagePath": rel.replace("/", "\\") if windows_path else rel,
           "imageData": base64.b64encode(data).decode() if embed else None,
           "imageHeight": int(image.shape[0]), "imageWidth": int(image.shape[1])}
    doc.update(extra or {})
    path.write_text(json.dumps(doc))
    return path


def generate_folder(root: Path, n_files: int, seed: int = 0, size=(160, 120), n_shapes: int = 12,
                    embed_every: int = 2, noise: int = 40) -> list[Path]:
    """A folder of random labelme files (half embedded, half referencing PNG/JPEG files)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_files):
        w, h = size
        img = make_image(rng, w, h, noise)
        shapes = random_annotation(rng, w, h, n_shapes)
        embed = i % embed_every == 0
        fmt = "JPEG" if i % 3 == 1 else "PNG"
        out.append(write_labelme(root / f"img_{i:04d}.json", shapes, img, embed=embed, fmt=fmt))
    return out


def costly_labelme(path: Path, *, side: int = 2000, crossings_per_row: float = 900, seed: int = 0,
                   **write_kw) -> Path:
    """A labelme file that is legitimately expensive within the caps: one polygon of random vertices over a
    blank ``side`` x ``side`` image (a few kilobytes of PNG), with enough vertices for its edges to cross
    about ``crossings_per_row`` image rows per row (annotations.ShapeWork allows 1,000), i.e. about a
    second of Pillow drawing at 25 megapixels. Integer coordinates keep the JSON small; ``write_kw`` go
    to :func:`write_labelme` (``embed=False, image_name="blank.png"``: one image shared by many files)."""
    rng = np.random.default_rng(seed)
    n = max(3, int(3 * crossings_per_row))  # an edge between uniform random heights crosses side/3 rows
    points = rng.integers(0, side, size=(n, 2)).tolist()
    shapes = [{"label": "cat", "points": points, "shape_type": "polygon", "group_id": None, "flags": {}}]
    return write_labelme(path, shapes, np.zeros((side, side, 3), np.uint8), **write_kw)


def costly_request(folder: Path, files: int = 60) -> list[Path]:
    """What a hostile visitor uploads at once: :func:`costly_labelme` files within every cap (25-megapixel
    image, shapes under the work bound), about a second of drawing each, sharing one blank image; together
    they run far past a short time limit."""
    first = costly_labelme(Path(folder) / "costly_00.json", side=5000, embed=False, image_name="blank.png")
    copies = [first]
    for i in range(1, files):
        copies.append(Path(folder) / f"costly_{i:02}.json")
        shutil.copyfile(first, copies[-1])
    return [*copies, Path(folder) / "blank.png"]
