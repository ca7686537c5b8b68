"""Readers of segmentation datasets: VOC folders, COCO-Stuff 10k / 164k, labelme, mask folders.

Every reader is an indexable :class:`SegmentationDataset` whose items are :class:`Sample` objects
(``name``, RGB uint8 ``image``, uint8 ``label`` with 255 = ignore). Nothing here needs torch, so
the trainer's data loaders and the evaluator share one code path. Files are read only when an
item is asked for, so a bad file raises :class:`DatasetError` (naming it) for that item alone and a
batch can record it and go on. See docs/evaluation.md for the folder layouts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from annotations import (
    IGNORE_INDEX,
    AnnotationError,
    LabelMapping,
    convert_file,
    dataset_names,
    find_label_files,
    get_label_space,
    label_space_for_names,
    safe_extract_zip,
    single_top_folder,
)
from annotations.limits import MAX_IMAGE_PIXELS, ImageTooLargeError, check_pixels

from .errors import SegcoreError

__all__ = ["FORMATS", "DatasetError", "annotation_label_space", "Sample", "SegmentationDataset", "detect_format", "invalid_label_values",
           "open_dataset",
           "read_label"]

FORMATS = ("auto", "voc", "cocostuff10k", "cocostuff164k", "labelme", "masks")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")

LAYOUTS = {
    "voc": """\
  ROOT/                                (or ROOT/VOC2012/, ROOT/VOCdevkit/VOC2012/)
    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png         palette or grayscale PNG of class indices, 255 = ignore
    SegmentationClassAug/<id>.png      (alternatively, as in VOC12 train_aug)
    ImageSets/Segmentation/<split>.txt one id per line (val.txt; all.txt from `annotations`)
    ImageSets/SegmentationAug/<split>.txt  or lines '/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png'
    class_names.txt                    (optional) one class name per line""",
    "cocostuff10k": """\
  ROOT/
    images/<id>.jpg
    annotations/<id>.mat               MATLAB file with the label map in key "S" (0 = unlabeled)
    imageLists/{train,test,all}.txt    one id per line""",
    "cocostuff164k": """\
  ROOT/
    images/{train2017,val2017}/<id>.jpg
    annotations/{train2017,val2017}/<id>.png   grayscale PNG of class indices 0..181, 255 = unlabeled""",
    "labelme": """\
  ROOT/ (or ROOT.zip)
    **/<name>.json                     labelme files; images embedded or beside them (imagePath)""",
    "masks": """\
  PRED_DIR/<stem>.png                  predicted class indices (palette or grayscale PNG)
  GT_DIR/<stem>.png                    ground-truth class indices, 255 = ignore; paired by file stem""",
}


class DatasetError(SegcoreError):
    """A dataset folder or one of its files cannot be used; the message names the path."""


def invalid_label_values(label: np.ndarray, n_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Distinct values of a uint8 label map outside ``[0, n_classes)`` other than ``ignore_index``."""
    present = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    return present[(present >= n_classes) & (present != ignore_index)]


def _layout_error(path, problem: str, fmt: str | None = None) -> DatasetError:
    shown = [fmt] if fmt in LAYOUTS else [k for k in LAYOUTS]
    layouts = "\n".join(f"{k}:\n{LAYOUTS[k]}" for k in shown)
    return DatasetError(f"{path}: {problem}\nexpected layout{'s' if len(shown) > 1 else ''}:\n{layouts}")


@dataclass
class Sample:
    """One dataset item. ``image`` is HxWx3 uint8 RGB, ``label`` HxW uint8 (255 = ignore) or None.

    ``prediction`` is set only by the ``masks`` format (a stored prediction, HxW; ``image`` is None
    there since no model runs). ``warnings`` are the labelme conversion's (file, shape, reason).
    """

    name: str
    image: np.ndarray | None
    label: np.ndarray | None
    prediction: np.ndarray | None = None
    warnings: tuple[dict, ...] = ()
    label_dtype: str | None = None
    """The label's dtype in its file where it matters: COCO-Stuff 10k's ``S`` (uint8 or uint16), which
    decides how PIL's NEAREST warps it in the reference (see :func:`segcore.protocol.resize_nearest`)."""


@dataclass
class _Item:
    name: str
    image: Path | None
    label: Path | None
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- file readers


def read_image(path: Path) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB (EXIF orientation applied); DatasetError naming the file."""
    from .image import load_image

    try:
        return load_image(Path(path))
    except SegcoreError as exc:
        raise DatasetError(str(exc)) from exc


def read_label(path, *, what: str = "label") -> np.ndarray:
    """A label PNG as an HxW uint8 array of class indices.

    Palette ("P") PNGs give their indices and grayscale ("L") PNGs their values; colours are never
    decoded. 16/32-bit grayscale is accepted when every value fits 0..255. RGB masks are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: {what} file not found")
    try:
        with warnings.catch_warnings():  # the cap below decides, not Pillow's DecompressionBombWarning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            check_pixels(*img.size, MAX_IMAGE_PIXELS, str(path))  # from the header, before decoding
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: cannot read the {what} image ({exc})") from exc
    except ImageTooLargeError as exc:
        raise DatasetError(str(exc)) from exc
    if mode in ("P", "L"):
        return np.ascontiguousarray(arr, dtype=np.uint8)
    if mode == "1":
        return arr.astype(np.uint8)
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        return _to_uint8(arr, path, what)
    raise DatasetError(f"{path}: the {what} image is mode {mode!r}; it must be a palette (P) or "
                       "grayscale (L) PNG holding class indices (colour masks are not decoded into classes)")


def _to_uint8(arr: np.ndarray, path, what: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise DatasetError(f"{path}: the {what} must be a 2-D map of class indices, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        bad = np.unique(arr[(arr < 0) | (arr > 255)])
        shown = ", ".join(str(int(v)) for v in bad[:10])
        raise DatasetError(f"{path}: {what} values {shown} do not fit 0..255 (class indices, 255 = ignore)")
    return arr.astype(np.uint8)


def read_cocostuff10k_label(path) -> np.ndarray:
    """COCO-Stuff 10k ``.mat`` label (key "S", 0 = unlabeled) shifted like the reference: S - 1, 0 → 255."""
    return _read_cocostuff10k(path)[0]


def _read_cocostuff10k(path) -> tuple[np.ndarray, str]:
    """(uint8 label, dtype of ``S`` in the file)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: label file not found")
    try:
        import scipy.io
    except ImportError as exc:  # pragma: no cover - scipy is a runtime requirement
        raise DatasetError(f"{path}: reading COCO-Stuff 10k .mat labels needs scipy") from exc
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError...
        raise DatasetError(f"{path}: cannot read the .mat label file ({type(exc).__name__}: {exc})") from exc
    if "S" not in mat:
        keys = ", ".join(k for k in mat if not k.startswith("__"))
        raise DatasetError(f"{path}: no label map under key 'S' (keys: {keys or 'none'})")
    s = np.asarray(mat["S"])
    if s.dtype.kind not in "iub":
        raise DatasetError(f"{path}: 'S' must hold integer labels, got dtype {s.dtype}")
    label = s.astype(np.int64) - 1
    label[label == -1] = IGNORE_INDEX
    return _to_uint8(label, path, "label"), str(s.dtype)


# ----------------------------------------------------------------------------- datasets


class SegmentationDataset:
    """An indexable list of :class:`Sample`; files are read on access (no torch needed)."""

    ignore_index = IGNORE_INDEX
    format = "base"

    def __init__(self, name: str, root: Path, items: list[_Item], class_names=None, *,
                 split: str | None = None, label_space=None):
        self.name = name
        self.root = Path(root)
        self.items = items
        self.class_names: tuple[str, ...] | None = tuple(class_names) if class_names is not None else None
        self.split = split
        self.label_space = label_space

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"dataset indices must be integers, got {type(i).__name__}")
        item = self.items[int(i)]
        return self._load(item)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def source(self, i: int) -> str:
        """The file item ``i`` comes from (for error reports), without reading it."""
        item = self.items[int(i)]
        return str(item.label if item.image is None else item.image)

    def names(self) -> list[str]:
        return [item.name for item in self.items]

    @property
    def palette(self) -> np.ndarray | None:
        if self.label_space is not None:
            return np.asarray(self.label_space.palette, np.uint8)
        return None

    def describe(self) -> dict:
        return {"name": self.name, "format": self.format, "root": str(self.root), "split": self.split,
                "images": len(self), "n_classes": None if self.class_names is None else len(self.class_names),
                "class_names": None if self.class_names is None else list(self.class_names),
                "ignore_index": self.ignore_index}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, format={self.format!r}, split={self.split!r}, "
                f"{len(self)} images)")

    def close(self) -> None:
        """Release what opening the dataset made (a labelme zip's extraction); nothing for folders."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # at once, on success or failure: not left to garbage collection

    # -- loading ---------------------------------------------------------------------------------

    def _read_label(self, item: _Item) -> np.ndarray:
        return read_label(item.label)

    def _load(self, item: _Item) -> Sample:
        if item.label is None or not item.label.is_file():
            where = item.label if item.label is not None else "(no label path)"
            raise DatasetError(f"{item.image}: image without a ground-truth mask (looked for {where})")
        image = read_image(item.image)
        label = self._read_label(item)
        _check_same_size(image, label, item.image, item.label)
        return Sample(item.name, image, label)


def _check_same_size(image: np.ndarray, label: np.ndarray, image_path, label_path) -> None:
    if image.shape[:2] != label.shape[:2]:
        ih, iw = image.shape[:2]
        lh, lw = label.shape[:2]
        raise DatasetError(f"{label_path}: mask is {lw}x{lh} pixels but its image {image_path} is {iw}x{ih}")


class VOCDataset(SegmentationDataset):
    format = "voc"


class CocoStuff10kDataset(SegmentationDataset):
    format = "cocostuff10k"

    def _load(self, item: _Item) -> Sample:
        image = read_image(item.image)
        label, dtype = _read_cocostuff10k(item.label)
        _check_same_size(image, label, item.image, item.label)
        return Sample(item.name, image, label, label_dtype=dtype)


class CocoStuff164kDataset(SegmentationDataset):
    format = "cocostuff164k"


class LabelmeDataset(SegmentationDataset):
    """labelme files converted one at a time in memory (``annotations.convert_file``)."""

    format = "labelme"

    def __init__(self, *args, mapping=None, unknown: str = "error", tmp: str | None = None, display_root=None,
                 upload_root=None, max_pixels: int | None = MAX_IMAGE_PIXELS, **kwargs):
        super().__init__(*args, **kwargs)
        self.mapping = mapping
        self.unknown = unknown
        self.upload_root = upload_root  # imagePath may not point outside it (the folder or extracted zip)
        self.max_pixels = max_pixels
        self._tmp = tmp
        self._display_root = display_root
        self._finalizer = weakref.finalize(self, shutil.rmtree, tmp, True) if tmp else None

    def __getstate__(self):  # copies in loader workers read the extraction but never delete it
        state = dict(self.__dict__)
        state["_finalizer"] = None
        return state

    def close(self) -> None:
        """Remove the folder a ``.zip`` was extracted to (also done when the dataset is collected)."""
        if self._finalizer is not None:
            self._finalizer()

    def _display(self, path: Path) -> str:
        if self._tmp is not None:
            try:
                return f"{self._display_root}:{path.relative_to(self._tmp)}"
            except ValueError:
                pass
        return str(path)

    def source(self, i: int) -> str:
        return self._display(self.items[int(i)].label)

    def _load(self, item: _Item) -> Sample:
        try:
            conv = convert_file(item.label, self.label_space, mapping=self.mapping, unknown=self.unknown,
                                root=self.upload_root, max_pixels=self.max_pixels)
        except AnnotationError as exc:
            message = str(exc)
            if self._tmp is not None:
                message = message.replace(str(self._tmp) + os.sep, f"{self._display_root}:")
            shown = self._display(item.label)
            raise DatasetError(message if shown in message else f"{shown}: {message}") from exc
        warnings = tuple({**w, "file": self._display(Path(w["file"]))} for w in conv.warnings)
        return Sample(item.name, conv.image, conv.class_map, warnings=warnings)


class MaskPairDataset(SegmentationDataset):
    """Stored prediction masks against ground-truth masks, paired by file stem (no images)."""

    format = "masks"

    def source(self, i: int) -> str:
        item = self.items[int(i)]
        return str(item.label if item.label is not None else item.image)

    def _load(self, item: _Item) -> Sample:
        pred_path = item.extra.get("prediction")
        if item.label is None:
            raise DatasetError(f"{pred_path}: prediction without a ground-truth mask "
                               f"(no {item.name}.* in {self.root})")
        if pred_path is None:
            raise DatasetError(f"{item.label}: ground-truth mask without a prediction "
                               f"(no {item.name}.* in {self.extra_root})")
        label = read_label(item.label)
        pred = read_label(pred_path, what="prediction")
        if pred.shape != label.shape:
            raise DatasetError(f"{pred_path}: prediction is {pred.shape[1]}x{pred.shape[0]} pixels but the "
                               f"ground truth {item.label} is {label.shape[1]}x{label.shape[0]}")
        return Sample(item.name, None, label, pred)

    def describe(self) -> dict:
        return {**super().describe(), "predictions": str(self.extra_root)}


# ----------------------------------------------------------------------------- building


def _read_list(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read the list file ({exc})") from exc
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _voc_root(path: Path) -> Path:
    for candidate in (path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    return path


def _read_class_names(path: Path) -> tuple[str, ...] | None:
    f = path / "class_names.txt"
    if not f.is_file():
        return None
    names = _read_list(f)
    return tuple(names) or None


def _space(label_space):
    if label_space is None:
        return None
    try:
        return get_label_space(label_space)
    except AnnotationError as exc:
        raise DatasetError(str(exc)) from exc


def _find_image(folder: Path, stem: str) -> Path:
    for suffix in (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG"):
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return p
    return folder / f"{stem}.jpg"


def _open_voc(path: Path, split: str | None, space) -> SegmentationDataset:
    root = _voc_root(path)
    if not (root / "JPEGImages").is_dir():
        raise _layout_error(path, "no JPEGImages/ folder", "voc")
    sets = [root / "ImageSets" / "Segmentation", root / "ImageSets" / "SegmentationAug"]
    list_file: Path | None = None
    if split is not None and Path(split).suffix == ".txt" and Path(split).is_file():
        list_file = Path(split)
    elif split is not None:
        found = [d / f"{split}.txt" for d in sets if (d / f"{split}.txt").is_file()]
        if not found:
            available = sorted({p.stem for d in sets if d.is_dir() for p in d.glob("*.txt")})
            raise _layout_error(root, f"no list file for split {split!r} "
                                      f"(available: {', '.join(available) or 'none'})", "voc")
        list_file = found[0]
    else:
        for name in ("val", "all"):
            found = [d / f"{name}.txt" for d in sets if (d / f"{name}.txt").is_file()]
            if found:
                list_file, split = found[0], name
                break
    aug_first = list_file is not None and list_file.parent.name == "SegmentationAug"
    label_dirs = ["SegmentationClassAug", "SegmentationClass"] if aug_first else \
        ["SegmentationClass", "SegmentationClassAug"]
    label_dirs = [root / d for d in label_dirs if (root / d).is_dir()]
    if not label_dirs:
        raise _layout_error(root, "no SegmentationClass/ or SegmentationClassAug/ folder", "voc")

    def label_for(stem: str) -> Path:
        for d in label_dirs:
            p = d / f"{stem}.png"
            if p.is_file():
                return p
        return label_dirs[0] / f"{stem}.png"

    items = []
    if list_file is not None:
        for line in _read_list(list_file):
            parts = line.split()
            if len(parts) >= 2:  # '/JPEGImages/x.jpg /SegmentationClassAug/x.png'
                image, label = (root / p.lstrip("/") for p in parts[:2])
                items.append(_Item(Path(parts[0]).stem, image, label))
            else:
                stem = parts[0]
                items.append(_Item(stem, _find_image(root / "JPEGImages", stem), label_for(stem)))
    else:  # no ImageSets: every image in JPEGImages
        split = None
        for p in sorted((root / "JPEGImages").iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                items.append(_Item(p.stem, p, label_for(p.stem)))
    names = _read_class_names(root)
    if names is None and space is not None:
        names = space.class_names
    if space is None and names is not None:
        space = _space_for_names(names)
    if list_file is not None and not items:
        raise _layout_error(list_file, "the list file is empty: no images to read", "voc")
    if not items:
        raise _layout_error(root, "no images found in JPEGImages/", "voc")
    return VOCDataset(root.name, root, items, names, split=split, label_space=space)


def _space_for_names(names, palette=None, name: str = "custom"):
    """The built-in label space with these class names, else one made from them."""
    try:
        return label_space_for_names(names, palette=palette, name=name)
    except AnnotationError as exc:
        raise DatasetError(f"class names: {exc}") from exc


def annotation_label_space(labels=None, segmenter=None):
    """The label space annotations are converted against, one rule for the CLI and the app: ``labels``
    (a built-in name, a labels.txt path or a LabelSpace), else the model's own classes (names and palette),
    else VOC."""
    if labels is not None:
        return _space(labels)
    if segmenter is None:
        return _space("voc")
    return _space_for_names(segmenter.class_names, segmenter.palette, segmenter.name or "model")


def _open_cocostuff10k(path: Path, split: str | None, space) -> SegmentationDataset:
    if not (path / "images").is_dir() or not (path / "annotations").is_dir():
        raise _layout_error(path, "no images/ and annotations/ folders", "cocostuff10k")
    split = split or "test"
    lists = path / "imageLists"
    list_file = lists / f"{split}.txt"
    if list_file.is_file():
        ids = _read_list(list_file)
    elif split == "all" and not lists.is_dir():
        ids = sorted(p.stem for p in (path / "images").glob("*.jpg"))
    else:
        available = sorted(p.stem for p in lists.glob("*.txt")) if lists.is_dir() else []
        raise _layout_error(path, f"no imageLists/{split}.txt (available: {', '.join(available) or 'none'})",
                            "cocostuff10k")
    items = [_Item(i, path / "images" / f"{i}.jpg", path / "annotations" / f"{i}.mat") for i in ids]
    if not items:
        raise _layout_error(list_file, f"split {split!r} lists no images", "cocostuff10k")
    space = space or _space("cocostuff")
    return CocoStuff10kDataset(path.name, path, items, space.class_names, split=split, label_space=space)


def _open_cocostuff164k(path: Path, split: str | None, space) -> SegmentationDataset:
    if not (path / "images").is_dir() or not (path / "annotations").is_dir():
        raise _layout_error(path, "no images/ and annotations/ folders", "cocostuff164k")
    split = {None: "val2017", "val": "val2017", "train": "train2017"}.get(split, split)
    folder = path / "images" / split
    if not folder.is_dir():
        available = sorted(p.name for p in (path / "images").iterdir() if p.is_dir())
        raise _layout_error(path, f"no images/{split}/ (available: {', '.join(available) or 'none'})",
                            "cocostuff164k")
    items = [_Item(p.stem, p, path / "annotations" / split / f"{p.stem}.png")
             for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise _layout_error(folder, "no images found", "cocostuff164k")
    space = space or _space("cocostuff")
    return CocoStuff164kDataset(path.name, path, items, space.class_names, split=split, label_space=space)


def _open_labelme(path: Path, space, mapping, unknown: str, budget=None, max_pixels=None) -> SegmentationDataset:
    space = space or _space("voc")
    if mapping is not None:
        try:
            mapping = LabelMapping.coerce(mapping)
            mapping.validate(space)
        except AnnotationError as exc:
            raise DatasetError(str(exc)) from exc
    if unknown not in ("error", "ignore"):
        raise ValueError(f"unknown must be 'error' or 'ignore', got {unknown!r}")
    tmp = None
    folder = path
    if path.is_file() and path.suffix.lower() == ".zip":
        tmp = tempfile.mkdtemp(prefix="segcore-labelme-")
        try:
            safe_extract_zip(path, tmp, budget=budget)
        except AnnotationError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DatasetError(str(exc)) from exc
        folder = Path(tmp)
    try:
        files, top = find_label_files(folder)
        if not files:
            raise _layout_error(path, "no labelme .json files found", "labelme")
    except BaseException:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    # the converter's ids (sub-folders joined by "__"), counted from the folder the user gave or, in a
    # zip of one folder, from inside that folder
    ids_root = single_top_folder(folder) if tmp else folder
    items = [_Item(n, None, f) for n, f in zip(dataset_names(files, ids_root), files)]
    return LabelmeDataset(path.stem if tmp else path.name, path, items, space.class_names, label_space=space,
                          mapping=mapping, unknown=unknown, tmp=tmp, display_root=str(path), upload_root=top,
                          max_pixels=MAX_IMAGE_PIXELS if max_pixels is None else max_pixels)


def _mask_files(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in MASK_SUFFIXES:
            out.setdefault(p.stem, p)
    return out


def _open_masks(gt: Path, predictions, space) -> SegmentationDataset:
    if predictions is None:
        raise DatasetError(f"{gt}: the masks format compares two folders: pass predictions= "
                           "(CLI: --pred DIR)")
    pred = Path(predictions)
    for folder, what in ((gt, "ground-truth"), (pred, "prediction")):
        if not folder.is_dir():
            raise _layout_error(folder, f"{what} folder not found", "masks")
    gts, preds = _mask_files(gt), _mask_files(pred)
    if not gts and not preds:
        raise _layout_error(gt, f"no mask files in {gt} or {pred}", "masks")
    if not gts:
        raise _layout_error(gt, "no ground-truth mask files", "masks")
    items = [_Item(stem, None, gts.get(stem), {"prediction": preds.get(stem)})
             for stem in sorted(set(gts) | set(preds))]
    ds = MaskPairDataset(gt.name, gt, items, None if space is None else space.class_names, label_space=space)
    ds.extra_root = pred
    return ds


def detect_format(path) -> str:
    """The format of a dataset folder (or labelme ``.zip``) judged by its layout."""
    path = Path(path)
    if not path.exists():
        raise _layout_error(path, "dataset not found")
    if path.is_file():
        if path.suffix.lower() in (".zip", ".json"):
            return "labelme"
        raise _layout_error(path, "is a file; pass a dataset folder or a labelme .zip")
    if (_voc_root(path) / "JPEGImages").is_dir():
        return "voc"
    if (path / "images").is_dir() and (path / "annotations").is_dir():
        if (path / "imageLists").is_dir() or any((path / "annotations").glob("*.mat")):
            return "cocostuff10k"
        if (path / "images" / "train2017").is_dir() or (path / "images" / "val2017").is_dir():
            return "cocostuff164k"
    if next((p for p in path.rglob("*.json") if p.is_file()), None) is not None:
        return "labelme"
    empty = not any(path.iterdir())
    raise _layout_error(path, "the folder is empty" if empty else
                        "cannot tell the dataset format from the layout")


def open_dataset(path, format: str = "auto", *, split: str | None = None, label_space=None, mapping=None,
                 unknown: str = "error", predictions=None, budget=None, max_pixels=None) -> SegmentationDataset:
    """Open a dataset folder (or labelme ``.zip``) for reading.

    ``format``: auto, voc, cocostuff10k, cocostuff164k, labelme or masks (``predictions`` is then the
    folder of predicted masks and ``path`` the ground truth). ``label_space`` (``"voc"``,
    ``"cocostuff"``, a labels.txt path or an ``annotations.LabelSpace``) gives the class names where
    the dataset has none, and is what labelme files are converted against (default VOC) with
    ``mapping``/``unknown`` as in ``annotations``. Raises :class:`DatasetError` for a missing or
    empty dataset or an unknown layout; bad single files raise only when their item is read.

    For uploads: ``budget`` (an ``annotations.ExtractionBudget`` shared by the request) bounds a
    labelme zip's extraction, ``max_pixels`` caps labelme images (default ``annotations.MAX_IMAGE_PIXELS``),
    and ``imagePath`` never leaves the folder or zip. Use ``with open_dataset(...) as ds:`` so a zip's
    extraction is removed as soon as the work ends or fails.
    """
    if format not in FORMATS:
        raise DatasetError(f"{path}: unknown dataset format {format!r}; use one of {', '.join(FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise _layout_error(path, "dataset not found", None if format == "auto" else format)
    space = _space(label_space)
    if format == "auto":
        format = "masks" if predictions is not None else detect_format(path)
    if format == "voc":
        return _open_voc(path, split, space)
    if format == "cocostuff10k":
        return _open_cocostuff10k(path, split, space)
    if format == "cocostuff164k":
        return _open_cocostuff164k(path, split, space)
    if format == "labelme":
        return _open_labelme(path, space, mapping, unknown, budget, max_pixels)
    return _open_masks(path, predictions, space)
