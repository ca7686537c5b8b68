"""Label spaces: class names, palette, ignore index, background handling."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ._label_data import COCOSTUFF_CLASSES, VOC_CLASSES
from .errors import LabelSpaceError

IGNORE_INDEX = 255
IGNORE_NAME = "__ignore__"
BACKGROUND_ALIASES = ("_background_", "background", "__background__")


def voc_colormap(n: int = 256) -> np.ndarray:
    """The standard PASCAL VOC colour map (bit-interleaving), ``n x 3`` uint8."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def normalize_name(name: str) -> str:
    """Case- and whitespace-insensitive key of a class name (``"Dining Table"`` -> ``"diningtable"``)."""
    return re.sub(r"\s+", "", str(name)).lower()


@dataclass(frozen=True, eq=False)
class LabelSpace:
    """A set of classes with ids ``0..N-1``, a palette, and an ignore index.

    ``background_index`` is the class that unannotated pixels get when the unlabeled policy is
    ``"background"`` (VOC: 0); ``None`` when the space has no background class (COCO-Stuff), in
    which case unannotated pixels are ``ignore_index``.
    """

    name: str
    class_names: tuple[str, ...]
    palette: np.ndarray = field(repr=False)
    ignore_index: int = IGNORE_INDEX
    background_index: int | None = 0

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.class_names)
        object.__setattr__(self, "class_names", names)
        if not names:
            raise LabelSpaceError(f"label space {self.name!r} has no classes")
        if len(names) > 255:
            raise LabelSpaceError(f"label space {self.name!r} has {len(names)} classes; at most 255 fit a uint8 map")
        if not 0 <= self.ignore_index <= 255 or self.ignore_index < len(names):
            raise LabelSpaceError(f"ignore_index {self.ignore_index} collides with class ids 0..{len(names) - 1}")
        if self.background_index is not None and not 0 <= self.background_index < len(names):
            raise LabelSpaceError(f"background_index {self.background_index} out of range")
        seen: dict[str, str] = {}
        for n in names:
            key = normalize_name(n)
            if key in seen:
                raise LabelSpaceError(f"label space {self.name!r}: names {seen[key]!r} and {n!r} collide "
                                      "(matching is case- and whitespace-insensitive)")
            seen[key] = n
        pal = np.asarray(self.palette, dtype=np.uint8)
        if pal.ndim != 2 or pal.shape[1] != 3 or pal.shape[0] < len(names):
            raise LabelSpaceError(f"palette must be Nx3 with N >= {len(names)}, got {pal.shape}")
        if pal.shape[0] < 256:
            full = voc_colormap(256)
            full[: pal.shape[0]] = pal
            pal = full
        pal = pal[:256].copy()
        pal.setflags(write=False)
        object.__setattr__(self, "palette", pal)
        object.__setattr__(self, "_index", {normalize_name(n): i for i, n in enumerate(names)})

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def index_of(self, name: str) -> int | None:
        """Class id of ``name`` (case- and whitespace-insensitive), 255 for ``__ignore__``,
        the background id for ``_background_``/``background``; ``None`` if unknown."""
        key = normalize_name(name)
        idx = self._index.get(key)  # type: ignore[attr-defined]
        if idx is not None:
            return idx
        if key == IGNORE_NAME:
            return self.ignore_index
        if key in BACKGROUND_ALIASES and self.background_index is not None:
            return self.background_index
        return None

    def colorize(self, label_map: np.ndarray) -> tuple[Image.Image, np.ndarray]:
        """Return ``(palette PIL image mode "P", RGB uint8 array)`` for a uint8 class map."""
        return colorize(label_map, self.palette)

    def to_labels_txt(self) -> str:
        """The labels in labelme2voc's labels.txt format."""
        names = list(self.class_names)
        if self.background_index == 0:
            names[0] = "_background_"
        return "\n".join(["__ignore__", *names]) + "\n"

    @classmethod
    def from_file(cls, path: str | Path, name: str | None = None) -> LabelSpace:
        """Read labelme2voc's ``labels.txt``: ``__ignore__``, ``_background_``, one name a line.

        ``__ignore__`` (optional, must be first) maps to 255; ``_background_`` (optional, must
        then be the first class) becomes class 0 and the background; the remaining lines are
        classes 1.. (or 0.. without ``_background_``). Blank lines and ``#`` comments are skipped.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise LabelSpaceError(f"{path}: cannot read labels file: {e}") from e
        lines = [ln.strip() for ln in text.splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        if lines and lines[0] == IGNORE_NAME:
            lines = lines[1:]
        if IGNORE_NAME in lines:
            raise LabelSpaceError(f"{path}: __ignore__ must be the first line")
        background: int | None = None
        if lines and lines[0] in BACKGROUND_ALIASES:
            background = 0
        if any(ln in BACKGROUND_ALIASES for ln in lines[1:]):
            raise LabelSpaceError(f"{path}: _background_ must be the first class")
        if not lines:
            raise LabelSpaceError(f"{path}: no class names")
        try:
            return cls(name=name or path.stem, class_names=tuple(lines), palette=voc_colormap(256),
                       background_index=background)
        except LabelSpaceError as e:
            raise LabelSpaceError(f"{path}: {e}") from e


def _uint8_label_map(label_map) -> np.ndarray:
    lbl = np.asarray(label_map)
    if lbl.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {lbl.shape}")
    if lbl.dtype != np.uint8:
        if lbl.size and (lbl.min() < 0 or lbl.max() > 255):
            raise ValueError("label map values must lie in 0..255 (palette PNGs hold at most 256 labels)")
        lbl = lbl.astype(np.uint8)
    return np.ascontiguousarray(lbl)


def palette_image(label_map: np.ndarray, palette: np.ndarray | None = None) -> Image.Image:
    """A class map as a palette ("P" mode) image, index = class id: the one way every package writes masks.

    ``palette`` (Nx3, default VOC's) may be shorter than 256 colours; the rest of the PNG palette is black.
    """
    lbl = _uint8_label_map(label_map)
    pal = np.zeros((256, 3), np.uint8)
    given = voc_colormap(256) if palette is None else np.asarray(palette, dtype=np.uint8)[:256]
    pal[: len(given)] = given
    img = Image.frombytes("P", (lbl.shape[1], lbl.shape[0]), lbl.tobytes())
    img.putpalette(pal.reshape(-1).tolist())
    return img


def colorize(label_map: np.ndarray, palette: np.ndarray | None = None) -> tuple[Image.Image, np.ndarray]:
    """Colour a uint8 class map: ``(PIL image mode "P" with the palette, RGB uint8 array)``."""
    pal = voc_colormap(256) if palette is None else np.asarray(palette, dtype=np.uint8)
    return palette_image(label_map, pal), pal[_uint8_label_map(label_map)]


def _voc() -> LabelSpace:
    return LabelSpace("voc", VOC_CLASSES, voc_colormap(256), IGNORE_INDEX, 0)


def _cocostuff() -> LabelSpace:
    # A fixed distinct palette: class i gets VOC colour i+1 (all distinct, none black);
    # 255 (unlabeled) is black.
    cmap = voc_colormap(256)
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[: len(COCOSTUFF_CLASSES)] = cmap[1: len(COCOSTUFF_CLASSES) + 1]
    pal[IGNORE_INDEX] = (0, 0, 0)
    return LabelSpace("cocostuff", COCOSTUFF_CLASSES, pal, IGNORE_INDEX, None)


_BUILTIN = {"voc": _voc, "cocostuff": _cocostuff}
_CACHE: dict[str, LabelSpace] = {}


def get_label_space(name: str | Path | LabelSpace) -> LabelSpace:
    """``"voc"``, ``"cocostuff"`` (aliases ``voc12``/``pascal``, ``cocostuff182``/``coco-stuff``),
    a path to a labels.txt file, or a :class:`LabelSpace` (returned as is)."""
    if isinstance(name, LabelSpace):
        return name
    key = str(name).strip().lower()
    aliases = {"voc12": "voc", "pascal": "voc", "pascalvoc": "voc", "voc2012": "voc",
               "cocostuff182": "cocostuff", "coco-stuff": "cocostuff", "cocostuff164k": "cocostuff",
               "cocostuff10k": "cocostuff", "coco_stuff": "cocostuff"}
    key = aliases.get(key, key)
    if key in _BUILTIN:
        if key not in _CACHE:
            _CACHE[key] = _BUILTIN[key]()
        return _CACHE[key]
    path = Path(name)
    if path.is_file():
        return LabelSpace.from_file(path)
    raise LabelSpaceError(f"unknown label space {str(name)!r}: use 'voc', 'cocostuff' or a labels.txt path")


def builtin_label_space(names) -> LabelSpace | None:
    """The built-in label space (voc, cocostuff) whose class names are exactly ``names``, if any."""
    names = tuple(str(n) for n in names)
    for key in _BUILTIN:
        space = get_label_space(key)
        if space.class_names == names:
            return space
    return None


def label_space_for_names(names, *, palette=None, name: str = "custom") -> LabelSpace:
    """:func:`builtin_label_space` of ``names``, else a new space of them.

    As in a labels.txt file, a first class named like ``_background_`` is the background.
    """
    names = tuple(str(n) for n in names)
    space = builtin_label_space(names)
    if space is not None:
        return space
    background = 0 if names and normalize_name(names[0]) in BACKGROUND_ALIASES else None
    return LabelSpace(name, names, voc_colormap(256) if palette is None else palette, IGNORE_INDEX, background)

