"""Predicted label maps as labelme projects, so a person corrects drafted polygons instead of tracing them.

Each connected region of each written class becomes one ``polygon`` shape (OpenCV ``findContours`` on the
class mask, simplified within ``tolerance`` pixels, regions under ``min_area`` pixels dropped). labelme has
no holes: it paints shapes in file order, later ones on top. Shapes are therefore written largest filled
area first, a container always before what it contains, and a hole whose pixels belong to no written class
(background, or a class mapped to ``__ignore__``) is written as a shape of its own, labelled
:attr:`LabelmeWriter.fill_label`, after its container. :func:`round_trip` rasterises the shapes back with
``annotations`` (labelme's own drawing rules) and says how many pixels come back as predicted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

import annotations
from annotations.label_spaces import BACKGROUND_ALIASES, IGNORE_NAME, normalize_name

LABELME_VERSION = "5.5.0"
"""The file format written: labelme 5.x's keys (``description``, ``mask`` per shape), which 6.x opens too."""
DEFAULT_TOLERANCE = 1.0
DEFAULT_MIN_AREA = 10


def background_index(class_names) -> int | None:
    """0 when the first class is a background (VOC's ``background``, as ``annotations`` reads a labels.txt),
    None for label sets without one (COCO-Stuff)."""
    names = tuple(class_names)
    return 0 if names and normalize_name(names[0]) in BACKGROUND_ALIASES else None


def read_name_map(path) -> dict[str, str]:
    """A ``--map`` file (YAML or JSON, ``class: written name``) as {normalised class name: written name}.

    Read with ``annotations``' mapping reader, so the file format is the converter's; ``__ignore__`` as a
    target means "do not write this class"."""
    mapping = annotations.LabelMapping.from_file(path)
    if mapping.rules or mapping.strip_instance_suffix:
        raise annotations.MappingError(f"{path}: a prediction name map takes 'class: label' pairs only "
                                       "(no rules, no strip_instance_suffix)")
    return dict(mapping.names)


@dataclass
class LabelmeWriter:
    """Turns label maps of one label set into labelme shapes and documents."""

    class_names: tuple[str, ...]
    names: dict[str, str] = field(default_factory=dict)
    """{normalised class name: written label}; a target of ``__ignore__`` leaves the class out."""
    tolerance: float = DEFAULT_TOLERANCE
    min_area: int = DEFAULT_MIN_AREA
    write_background: bool = False
    description: str = ""
    """Written into every shape (e.g. ``predicted by voc12``), so a reviewer knows what drafted it."""

    def __post_init__(self) -> None:
        self.class_names = tuple(self.class_names)
        if self.tolerance < 0 or self.min_area < 0:
            raise ValueError("tolerance and min_area must be >= 0")
        unknown = sorted(set(self.names) - {normalize_name(n) for n in self.class_names})
        if unknown:
            raise ValueError(f"the name map renames classes the model does not have: {', '.join(unknown)}")
        self.background = background_index(self.class_names)
        self.labels = [self.names.get(normalize_name(n), n) for n in self.class_names]
        self.written = np.array([label != IGNORE_NAME and (i != self.background or self.write_background)
                                 for i, label in enumerate(self.labels)] + [False] * (256 - len(self.labels)))

    @property
    def fill_label(self) -> str:
        """The label of holes that belong to no written class: the background's name, else ``__ignore__``."""
        return self.labels[self.background] if self.background is not None else IGNORE_NAME

    @property
    def fill_value(self) -> int:
        """What unpainted pixels read back as: the background class, else 255 (ignore)."""
        return self.background if self.background is not None else annotations.IGNORE_INDEX

    def expected(self, label_map: np.ndarray) -> np.ndarray:
        """The label map as the written shapes should reproduce it: unwritten classes read as the fill."""
        out = label_map.astype(np.int64, copy=True)
        out[~self._is_written(label_map)] = self.fill_value
        return out

    def _is_written(self, label_map: np.ndarray) -> np.ndarray:
        """Boolean map of the pixels whose class is written (a table look-up; OpenCV's LUT for uint8 maps)."""
        if label_map.dtype == np.uint8:
            return cv2.LUT(label_map, self.written[:256].astype(np.uint8)).view(bool)
        return self.written[np.minimum(label_map, len(self.written) - 1)]

    def shapes(self, label_map: np.ndarray) -> list[dict]:
        """labelme shape dicts for ``label_map`` (HxW class ids), in the order that draws it right."""
        if label_map.ndim != 2:
            raise ValueError(f"expected an HxW label map, got shape {label_map.shape}")
        label_map = np.asarray(label_map)
        regions: list[tuple[float, int, np.ndarray]] = []
        for c in _present(label_map):
            if c < len(self.labels) and self.written[c]:
                regions += [(a, int(c), p) for a, p in self._regions(label_map == c, border_ok=True)]
        unwritten = ~self._is_written(label_map)
        if unwritten.any():
            # only holes need painting: an unwritten region that reaches the border is never covered
            regions += [(a, -1, p) for a, p in self._regions(unwritten, border_ok=False)]
        regions.sort(key=lambda r: -r[0])  # a container's filled area exceeds everything inside it
        return [self._shape(self.labels[c] if c >= 0 else self.fill_label, p) for _, c, p in regions]

    def _regions(self, mask: np.ndarray, *, border_ok: bool):
        """(filled area, simplified outline) of each connected region of ``mask`` (8-connected)."""
        h, w = mask.shape
        contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
        if hierarchy is None:
            return
        for contour, (_, _, _, parent) in zip(contours, hierarchy[0]):
            if parent >= 0:  # a hole: drawn by whatever fills it
                continue
            pts = contour[:, 0, :]
            if not border_ok and (pts.min() == 0 or pts[:, 0].max() == w - 1 or pts[:, 1].max() == h - 1):
                continue
            area = cv2.contourArea(contour) + len(pts) / 2 + 1  # pixel count of the filled region, about
            if area < self.min_area or len(pts) < 3:
                continue
            simple = cv2.approxPolyDP(contour, self.tolerance, True)[:, 0, :] if self.tolerance > 0 else pts
            regions_pts = simple if len(simple) >= 3 else pts
            yield area, regions_pts

    def _shape(self, label: str, points: np.ndarray) -> dict:
        return {"label": label, "points": [[float(x), float(y)] for x, y in points], "group_id": None,
                "description": self.description, "shape_type": "polygon", "flags": {}, "mask": None}

    def document(self, label_map: np.ndarray, image_path: str, *, image_data: str | None = None) -> dict:
        """A labelme file's contents; ``image_path`` relative to the JSON, ``image_data`` base64 or None."""
        h, w = label_map.shape
        return {"version": LABELME_VERSION, "flags": {}, "shapes": self.shapes(label_map), "imagePath": image_path,
                "imageData": image_data, "imageHeight": int(h), "imageWidth": int(w)}

    def label_values(self) -> dict[str, int]:
        """{written label: class id} to read the shapes back (labelme's ``label_name_to_value``)."""
        values = {self.fill_label: self.fill_value}
        for i, label in enumerate(self.labels):
            if self.written[i]:
                values[label] = i
        return values


def _present(label_map: np.ndarray) -> np.ndarray:
    """The class ids present (a 256-bin histogram for uint8 maps: much faster than ``np.unique``)."""
    if label_map.dtype == np.uint8:
        return np.flatnonzero(cv2.calcHist([label_map], [0], None, [256], [0, 256]).ravel())
    return np.unique(label_map)


def round_trip(document: dict, writer: LabelmeWriter, label_map: np.ndarray) -> float:
    """Share of pixels where ``document``'s shapes, drawn with labelme's rules by ``annotations``, give
    ``writer.expected(label_map)``."""
    values = writer.label_values()
    shapes = [annotations.Shape(index=i, label=s["label"], points=[tuple(p) for p in s["points"]])
              for i, s in enumerate(document["shapes"])]
    h, w = label_map.shape
    drawn = annotations.rasterize(shapes, [values[s.label] for s in shapes], w, h, fill=writer.fill_value)
    return float((drawn == writer.expected(label_map)).mean())


def dumps(document: dict) -> str:
    return json.dumps(document, ensure_ascii=False, indent=1)


def inverse_name_map(writer: LabelmeWriter) -> dict[str, str]:
    """{written label: class name} for the labels that differ: the ``--map`` file ``annotations`` needs to
    read the project back into the model's label set."""
    out = {label: name for name, label, on in zip(writer.class_names, writer.labels, writer.written)
           if on and label != name}
    if writer.background is not None and writer.fill_label != writer.class_names[writer.background]:
        out[writer.fill_label] = writer.class_names[writer.background]
    return out


def write_inverse_map(writer: LabelmeWriter, path: Path) -> Path | None:
    inverse = inverse_name_map(writer)
    if not inverse:
        return None
    path.write_text(json.dumps(inverse, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
