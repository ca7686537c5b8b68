"""Datasets tests write to disk: VOC and COCO-Stuff layouts, palette PNG masks, labelme files.

Two kinds of labels: random ones with scattered ignore pixels (reader tests, where every pixel is checked)
and smooth regions with a thin ignore band at their borders (``label_map``, the protocol tests, where
a model's predictions should look like a real data set's)."""

from __future__ import annotations

import numpy as np
import scipy.io
from factories import scene_image
from labelme_fixtures import write_labelme
from PIL import Image

import annotations as A

SIZES = ((375, 500), (500, 375), (500, 333), (480, 640))  # (h, w): VOC's usual image sizes


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save_palette_png(path, label, palette=None):
    """A "P" PNG whose colours are NOT the indices (a reader decoding RGB would get other values)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    pal = A.voc_colormap(256) if palette is None else palette
    img.putpalette(np.asarray(pal, np.uint8).ravel().tolist())
    img.save(path)
    return path


def save_image(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def random_label(h, w, n, seed=0, ignore=True):
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, n, (h, w)).astype(np.uint8)
    if ignore:
        lab[rng.random((h, w)) < 0.1] = 255
    return lab


def labelme_json(folder, stem, image, shapes):
    """A labelme file plus its PNG beside it (imagePath); ``shapes`` are (label, shape_type, points)."""
    return write_labelme(folder / f"{stem}.json",
                         [{"label": label, "points": [[float(x), float(y)] for x, y in pts], "group_id": None,
                           "shape_type": kind, "flags": {}, "description": ""} for label, kind, pts in shapes],
                         image, embed=False)


def labelme_folder(folder, count=4, h=40, w=56):
    """``count`` labelme files with person/dog/car rectangles and polygons."""
    rng = np.random.default_rng(7)
    for k in range(count):
        shapes = []
        for label in ("person", "dog", "car")[: 1 + k % 3]:
            x0, y0 = rng.uniform(0, w * 0.6), rng.uniform(0, h * 0.6)
            x1, y1 = x0 + rng.uniform(8, w * 0.4), y0 + rng.uniform(8, h * 0.4)
            if k % 2:
                shapes.append((label, "rectangle", [(x0, y0), (x1, y1)]))
            else:
                shapes.append((label, "polygon", [(x0, y0), (x1, y0 + 3), (x0 + 4, y1)]))
        labelme_json(folder, f"img{k}", scene_image(h, w, seed=k), shapes)
    return folder


def voc_folder(root, ids, n=21, h=24, w=32, label_dir="SegmentationClass"):
    """A VOC layout without list files: random images and random palette-PNG labels; returns {id: label}."""
    labels = {}
    for k, i in enumerate(ids):
        save_image(root / "JPEGImages" / f"{i}.jpg", rgb(h, w, k))
        labels[i] = random_label(h, w, n, seed=k)
        save_palette_png(root / label_dir / f"{i}.png", labels[i])
    return labels


def label_map(h: int, w: int, classes, seed: int) -> np.ndarray:
    """Smooth regions of a few classes with a thin ignore (255) band, like VOC object borders."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    field = np.zeros((h, w), np.float32)
    for _ in range(4):
        fy, fx = rng.uniform(0.005, 0.03, 2)
        field += np.sin(yy * fy + rng.uniform(0, 6)) * np.cos(xx * fx + rng.uniform(0, 6))
    bins = np.quantile(field, np.linspace(0, 1, len(classes) + 1)[1:-1])
    idx = np.digitize(field, bins)
    label = np.asarray(classes, np.int64)[idx]
    edge = np.zeros((h, w), bool)
    edge[:, 1:] |= idx[:, 1:] != idx[:, :-1]
    edge[1:] |= idx[1:] != idx[:-1]
    label[edge] = 255
    return label


def _jpeg(path, h, w, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(scene_image(h, w, seed)).save(path, quality=92)


def make_voc(root, sizes=SIZES):
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    (root / "SegmentationClass").mkdir(parents=True)
    ids = []
    for k, (h, w) in enumerate(sizes):
        name = f"2007_{k:06d}"
        _jpeg(root / "JPEGImages" / f"{name}.jpg", h, w, k)
        img = Image.fromarray(label_map(h, w, [0, 15, 3, 7, 12][: 3 + k % 3], k).astype(np.uint8), mode="P")
        img.putpalette(list(np.random.default_rng(0).integers(0, 255, 768)))
        img.save(root / "SegmentationClass" / f"{name}.png")
        ids.append(name)
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    return root


def make_cocostuff10k(root, sizes=SIZES):
    (root / "imageLists").mkdir(parents=True)
    (root / "annotations").mkdir(parents=True)
    ids = []
    for k, (h, w) in enumerate(sizes):
        name = f"COCO_train2014_{k:012d}"
        _jpeg(root / "images" / f"{name}.jpg", h, w, 10 + k)
        label = label_map(h, w, [0, 1, 96, 150, 182], 10 + k)  # S: 0 = unlabeled, classes 1..182
        label[label == 255] = 0
        scipy.io.savemat(root / "annotations" / f"{name}.mat", {"S": label.astype(np.uint16 if k % 2 else np.uint8)})
        ids.append(name)
    (root / "imageLists/test.txt").write_text("\n".join(ids) + "\n")
    return root


def make_cocostuff164k(root, sizes=SIZES):
    for k, (h, w) in enumerate(sizes):
        name = f"{k:012d}"
        _jpeg(root / "images/val2017" / f"{name}.jpg", h, w, 20 + k)
        (root / "annotations/val2017").mkdir(parents=True, exist_ok=True)
        Image.fromarray(label_map(h, w, [0, 1, 95, 181], 20 + k).astype(np.uint8), mode="L").save(
            root / "annotations/val2017" / f"{name}.png")
    return root
