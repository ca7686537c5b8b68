"""Convert labelme files to class/instance maps in memory or to a VOC-style dataset (written by
:mod:`annotations.voc_writer`)."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .archive import (DEFAULT_MAX_BYTES, DEFAULT_MAX_FILES, ExtractionBudget, safe_extract_zip,
                      single_top_folder)
from .errors import AnnotationError, LabelSpaceError
from .label_spaces import LabelSpace, get_label_space
from .limits import MAX_IMAGE_PIXELS
from .mapping import LabelMapping
from .rasterize import rasterize
from .reader import Issue, LabelmeFile, read_labelme
from .voc_writer import check_output, staged_dataset, write_image, write_index

UNKNOWN_POLICIES = ("error", "ignore")
UNLABELED_POLICIES = ("auto", "background", "ignore")


@dataclass
class ConvertedImage:
    """One converted labelme file."""

    path: str  # the JSON file
    name: str  # dataset id (file name stem; sub-folders joined with "__")
    image: np.ndarray  # H x W x 3 uint8 RGB, as labelme decodes it
    class_map: np.ndarray  # H x W uint8, 255 = ignore
    instance_map: np.ndarray | None = None  # H x W int32, 0 = none (when instances=True)
    warnings: list[dict] = field(default_factory=list)


@dataclass
class ConversionReport:
    """What happened to a batch: per-file errors/warnings and per-class statistics."""

    label_space: str
    class_names: tuple[str, ...]
    files_total: int = 0
    converted: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)
    unknown_labels: dict[str, list[str]] = field(default_factory=dict)
    images_per_class: list[int] = field(default_factory=list)
    shapes_per_class: list[int] = field(default_factory=list)
    pixels_per_class: list[int] = field(default_factory=list)
    ignore_pixels: int = 0
    ignore_shapes: int = 0

    def __post_init__(self) -> None:
        n = len(self.class_names)
        for name in ("images_per_class", "shapes_per_class", "pixels_per_class"):
            if not getattr(self, name):
                setattr(self, name, [0] * n)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        per_class = {
            name: {"images": self.images_per_class[i], "shapes": self.shapes_per_class[i],
                   "pixels": self.pixels_per_class[i]}
            for i, name in enumerate(self.class_names)
        }
        return {
            "label_space": self.label_space,
            "files_total": self.files_total,
            "converted": len(self.converted),
            "failed": len(self.failed),
            "converted_files": self.converted,
            "failed_files": self.failed,
            "classes": per_class,
            "ignore": {"shapes": self.ignore_shapes, "pixels": self.ignore_pixels},
            "unknown_labels": self.unknown_labels,
            "errors": self.errors,
            "warnings": self.warnings,
        }

    def summary(self) -> str:
        lines = [f"{len(self.converted)}/{self.files_total} files converted, {len(self.failed)} failed, "
                 f"{len(self.warnings)} warning(s)"]
        if self.unknown_labels:
            lines.append("unknown labels (not in label space '%s' and not mapped):" % self.label_space)
            for name, files in sorted(self.unknown_labels.items()):
                shown = ", ".join(files[:5]) + (f" (+{len(files) - 5} more)" if len(files) > 5 else "")
                lines.append(f"  {name!r}: {shown}")
            lines.append("  map them with --map FILE or pass --unknown ignore")
        for e in self.errors[:20]:
            where = f" shape {e['shape']}" if "shape" in e else ""
            lines.append(f"error: {e['file']}{where}: {e['reason']}")
        if len(self.errors) > 20:
            lines.append(f"... and {len(self.errors) - 20} more errors (see report.json)")
        return "\n".join(lines)


@dataclass
class LoadedDataset:
    """Result of :func:`load_labelme_dataset`: the converted images and the report."""

    images: list[ConvertedImage]
    report: ConversionReport

    def __iter__(self) -> Iterator[ConvertedImage]:
        return iter(self.images)

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class _Options:
    space: LabelSpace
    mapping: LabelMapping
    unknown: str
    fill: int
    instances: bool
    max_pixels: int | None = MAX_IMAGE_PIXELS
    root: str | None = None  # imagePath must resolve inside this folder (the upload)


@dataclass
class _Result:
    path: str
    name: str
    converted: ConvertedImage | None = None
    errors: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    shapes_per_class: dict[int, int] = field(default_factory=dict)
    pixels: np.ndarray | None = None


def _make_options(label_space: str | Path | LabelSpace, mapping: Any, unknown: str, unlabeled: str,
                  instances: bool, max_pixels: int | None = MAX_IMAGE_PIXELS) -> _Options:
    space = get_label_space(label_space)
    m = LabelMapping.coerce(mapping)
    m.validate(space)
    if unknown not in UNKNOWN_POLICIES:
        raise ValueError(f"unknown must be one of {UNKNOWN_POLICIES}, got {unknown!r}")
    if unlabeled not in UNLABELED_POLICIES:
        raise ValueError(f"unlabeled must be one of {UNLABELED_POLICIES}, got {unlabeled!r}")
    if unlabeled == "background" and space.background_index is None:
        raise LabelSpaceError(f"label space {space.name!r} has no background class; use unlabeled='ignore'")
    if unlabeled == "ignore" or (unlabeled == "auto" and space.background_index is None):
        fill = space.ignore_index
    else:
        fill = int(space.background_index)  # type: ignore[arg-type]
    return _Options(space, m, unknown, fill, instances, max_pixels)


def _instance_ids(lf: LabelmeFile) -> list[int]:
    """labelme's ``shapes_to_label`` instance ids: one per (label, group_id), group_id None
    meaning a new instance for every shape; numbered 1.. in order of first appearance."""
    seen: dict[tuple, int] = {}
    ids = []
    for k, s in enumerate(lf.shapes):
        key = (s.label, s.group_id if s.group_id is not None else ("__shape__", k))
        if key not in seen:
            seen[key] = len(seen) + 1
        ids.append(seen[key])
    return ids


def _convert_loaded(lf: LabelmeFile, name: str, opt: _Options) -> _Result:
    res = _Result(lf.path, name, warnings=[w.to_dict() for w in lf.warnings])
    space = opt.space
    values: list[int] = []
    unknown_shapes: dict[str, list[int]] = {}
    for s in lf.shapes:
        v = opt.mapping.resolve(s.label, space)
        if v is None:
            unknown_shapes.setdefault(s.label, []).append(s.index)
            v = space.ignore_index
        values.append(v)
    if unknown_shapes:
        res.unknown = sorted(unknown_shapes)
        if opt.unknown == "error":
            for label, idx in sorted(unknown_shapes.items()):
                res.errors.append(Issue(lf.path, f"unknown label {label!r} (not in label space "
                                                 f"{space.name!r} and not mapped) in shape(s) {idx}",
                                        idx[0], label).to_dict())
            return res
        for label, idx in sorted(unknown_shapes.items()):
            res.warnings.append(Issue(lf.path, f"unknown label {label!r} in shape(s) {idx} set to ignore "
                                               f"({space.ignore_index})", idx[0], label).to_dict())
    w, h = lf.size
    cls = rasterize(lf.shapes, values, w, h, fill=opt.fill, mode="L")
    ins = None
    if opt.instances:
        ins = rasterize(lf.shapes, _instance_ids(lf), w, h, fill=0, mode="I")
        ins[cls == space.ignore_index] = 0
    for v in values:
        res.shapes_per_class[v] = res.shapes_per_class.get(v, 0) + 1
    res.pixels = np.bincount(cls.ravel(), minlength=256)
    res.converted = ConvertedImage(lf.path, name, lf.rgb_array(), cls, ins, res.warnings)
    return res


def convert_file(path: str | Path, label_space: str | Path | LabelSpace = "voc", *, mapping: Any = None,
                 unknown: str = "error", unlabeled: str = "auto", instances: bool = False,
                 root: str | Path | None = None, max_pixels: int | None = MAX_IMAGE_PIXELS) -> ConvertedImage:
    """Convert one labelme file in memory. Raises :class:`AnnotationError` subclasses on bad input
    (an unknown label raises :class:`UnknownLabelError` when ``unknown="error"``).

    ``root`` and ``max_pixels`` bound what is read, as in :func:`~annotations.reader.read_labelme`."""
    from .errors import UnknownLabelError

    opt = _make_options(label_space, mapping, unknown, unlabeled, instances, max_pixels)
    lf = read_labelme(path, root=root, max_pixels=max_pixels)
    res = _convert_loaded(lf, Path(path).stem, opt)
    if res.converted is None:
        raise UnknownLabelError(f"{path}: " + "; ".join(e["reason"] for e in res.errors), tuple(res.unknown))
    return res.converted


# ----------------------------------------------------------------------------- inputs

def find_label_files(input: str | Path | Sequence[str | Path]) -> tuple[list[Path], Path | None]:
    """``(json files, root)`` for a folder (recursive), one JSON file, or a list of JSON files."""
    if isinstance(input, (str, os.PathLike)):
        p = Path(input)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix.lower() == ".json" and f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            return files, p
        if p.is_file():
            return [p], p.parent
        raise AnnotationError(f"{p}: input not found")
    files = [Path(f) for f in input]
    if not files:
        return [], None
    root = Path(os.path.commonpath([str(f.resolve().parent) for f in files]))
    return files, root


def dataset_names(files: Sequence[Path], root: Path | None) -> list[str]:
    """Dataset ids of labelme files: the path below ``root`` without suffix, folders joined by ``__``, unique."""
    names = []
    for f in files:
        try:
            rel = f.resolve().relative_to(root.resolve()) if root is not None else Path(f.name)
        except ValueError:
            rel = Path(f.name)
        names.append("__".join(rel.with_suffix("").parts))
    # guarantee uniqueness (e.g. a.json and a.JSON)
    seen: dict[str, int] = {}
    out = []
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        out.append(n if k == 0 else f"{n}__{k + 1}")
    return out


class _Input:
    """Resolves an input (folder, file list, zip) to JSON files; cleans up a zip's extraction.

    A zip holding one top-level folder gives ids counted from inside it (``2011_000003``, not
    ``data_annotated__2011_000003``); ``base`` is the folder ``imagePath`` must stay inside.
    """

    def __init__(self, input: Any, budget: ExtractionBudget):
        self.tmp: str | None = None
        try:
            if isinstance(input, (str, os.PathLike)) and Path(input).suffix.lower() == ".zip" \
                    and Path(input).is_file():
                self.tmp = tempfile.mkdtemp(prefix="annotations-zip-")
                input = safe_extract_zip(input, Path(self.tmp) / "x", budget=budget)
            self.files, self.root = find_label_files(input)
        except BaseException:
            self.close()
            raise
        zipped = self.tmp is not None
        self.names = dataset_names(self.files, single_top_folder(input) if zipped else self.root)
        self.base = str(input) if zipped else (str(self.root) if self.root is not None else None)

    def close(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def display(self, path: str) -> str:
        """Path for reports: relative to the input folder (or the zip's root), so no local path leaks."""
        base = Path(self.tmp) / "x" if self.tmp is not None else self.root
        if base is None:
            return path
        try:
            return str(Path(path).resolve().relative_to(Path(base).resolve()))
        except ValueError:
            return path


# ----------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _worker_init(opt: _Options, out_dir: str | None, keep_arrays: bool) -> None:
    _WORKER["opt"] = opt
    _WORKER["out"] = out_dir
    _WORKER["keep"] = keep_arrays


def _process(task: tuple[str, str]) -> _Result:
    path, name = task
    opt: _Options = _WORKER["opt"]
    try:
        lf = read_labelme(path, root=opt.root, max_pixels=opt.max_pixels)
    except AnnotationError as e:
        entry: dict[str, Any] = {"file": path, "reason": str(e)}
        if getattr(e, "shape", None) is not None:
            entry["shape"] = e.shape  # type: ignore[attr-defined]
        return _Result(path, name, errors=[entry])
    except Exception as e:  # never let one file stop the batch
        return _Result(path, name, errors=[{"file": path, "reason": f"unexpected error: {type(e).__name__}: {e}"}])
    try:
        res = _convert_loaded(lf, name, opt)
        if res.converted is not None and _WORKER["out"] is not None:
            conv = res.converted
            write_image(Path(_WORKER["out"]), lf, conv.name, conv.image, conv.class_map, conv.instance_map, opt.space)
    except Exception as e:
        return _Result(path, name, errors=[{"file": path, "reason": f"conversion failed: {type(e).__name__}: {e}"}])
    if not _WORKER["keep"]:
        res.converted = None if res.converted is None else ConvertedImage(
            res.converted.path, name, np.empty((0, 0, 3), np.uint8), np.empty((0, 0), np.uint8))
    return res


def _run(tasks: list[tuple[str, str]], opt: _Options, out_dir: str | None, keep: bool, workers: int | None,
         ) -> Iterator[_Result]:
    workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
    workers = min(workers, max(1, len(tasks)))
    if workers == 1:
        _worker_init(opt, out_dir, keep)
        for t in tasks:
            yield _process(t)
        return
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with ctx.Pool(workers, initializer=_worker_init, initargs=(opt, out_dir, keep)) as pool:
        yield from pool.imap(_process, tasks, chunksize=1 if len(tasks) < 64 else 4)


def _collect(report: ConversionReport, res: _Result, inp: _Input) -> None:
    shown = inp.display(res.path)
    for e in res.errors:
        report.errors.append({**e, "file": inp.display(e["file"])})
    for w in res.warnings:
        report.warnings.append({**w, "file": inp.display(w["file"])})
    for label in res.unknown:
        files = report.unknown_labels.setdefault(label, [])
        if shown not in files:
            files.append(shown)
    if res.errors or res.converted is None:
        report.failed.append(shown)
        return
    report.converted.append(shown)
    n = len(report.class_names)
    for v, c in res.shapes_per_class.items():
        if v < n:
            report.shapes_per_class[v] += c
        else:
            report.ignore_shapes += c
    assert res.pixels is not None
    for i in range(n):
        report.pixels_per_class[i] += int(res.pixels[i])
        report.images_per_class[i] += int(res.pixels[i] > 0)
    report.ignore_pixels += int(res.pixels[255])


def load_labelme_dataset(input: str | Path | Sequence[str | Path], label_space: str | Path | LabelSpace = "voc",
                         *, mapping: Any = None, unknown: str = "error", unlabeled: str = "auto",
                         instances: bool = False, workers: int | None = 1,
                         max_zip_bytes: int = DEFAULT_MAX_BYTES, max_zip_files: int = DEFAULT_MAX_FILES,
                         budget: ExtractionBudget | None = None, max_pixels: int | None = MAX_IMAGE_PIXELS,
                         ) -> LoadedDataset:
    """Convert labelme files in memory (no files written).

    ``input``: a folder (searched recursively), a JSON file, a list of JSON files, or a ``.zip``.
    Bad files never stop the batch: they appear in ``result.report.errors``. A zip is extracted
    within ``budget`` (shared with the request's other zips; default: ``max_zip_bytes`` /
    ``max_zip_files`` for this zip alone) and removed before returning; images over ``max_pixels``
    are per-file errors.
    """
    opt = _make_options(label_space, mapping, unknown, unlabeled, instances, max_pixels)
    inp = _Input(input, budget if budget is not None else ExtractionBudget(max_zip_bytes, max_zip_files))
    opt.root = inp.base
    try:
        report = ConversionReport(opt.space.name, opt.space.class_names, files_total=len(inp.files))
        images = []
        tasks = [(str(f), n) for f, n in zip(inp.files, inp.names)]
        for res in _run(tasks, opt, None, True, workers):
            _collect(report, res, inp)
            if res.converted is not None and not res.errors:
                if inp.tmp is not None:  # the extracted zip is deleted below: name the file inside the zip
                    res.converted.path = inp.display(res.converted.path)
                images.append(res.converted)
        return LoadedDataset(images, report)
    finally:
        inp.close()


def convert_folder(input: str | Path | Sequence[str | Path], output: str | Path,
                   label_space: str | Path | LabelSpace = "voc", *, mapping: Any = None, unknown: str = "error",
                   unlabeled: str = "auto", instances: bool = False, overwrite: bool = False,
                   workers: int | None = None, max_zip_bytes: int = DEFAULT_MAX_BYTES,
                   max_zip_files: int = DEFAULT_MAX_FILES, budget: ExtractionBudget | None = None,
                   max_pixels: int | None = MAX_IMAGE_PIXELS,
                   progress: Callable[[int, int], None] | None = None) -> ConversionReport:
    """Write a VOC-style dataset to ``output`` and return the report (also ``report.json``).

    The dataset is built in a hidden sibling folder and renamed into place at the end, so
    ``output`` never holds a half-written dataset. An existing ``output`` is refused unless
    ``overwrite`` (and even then only if it is empty or looks like a dataset written here).
    ``budget`` and ``max_pixels`` bound a zip's extraction and every image as in
    :func:`load_labelme_dataset`.
    """
    output = Path(output)
    opt = _make_options(label_space, mapping, unknown, unlabeled, instances, max_pixels)
    check_output(output, overwrite)
    inp = _Input(input, budget if budget is not None else ExtractionBudget(max_zip_bytes, max_zip_files))
    opt.root = inp.base
    if not inp.files:
        inp.close()
        shown = os.fspath(input) if isinstance(input, (str, os.PathLike)) else "the input files"
        raise AnnotationError(f"{shown}: no labelme .json files found; give a folder of labelme files, "
                              "the .json files themselves, or a .zip of them")
    try:
        with staged_dataset(output, instances) as stage:
            report = ConversionReport(opt.space.name, opt.space.class_names, files_total=len(inp.files))
            tasks = [(str(f), n) for f, n in zip(inp.files, inp.names)]
            names = []
            for k, res in enumerate(_run(tasks, opt, str(stage), False, workers), 1):
                _collect(report, res, inp)
                if res.converted is not None and not res.errors:
                    names.append(res.name)
                if progress is not None:
                    progress(k, len(tasks))
            write_index(stage, opt.space.class_names, names, report.to_dict())
        return report
    finally:
        inp.close()
