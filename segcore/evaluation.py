"""Evaluation runner: stream a dataset through a Segmenter (or stored masks) into one confusion matrix.

Memory stays constant however many images there are: each image updates the confusion matrix and
leaves only a few per-image numbers behind, plus small thumbnails of the worst images. A bad file is
recorded (file, reason) and the run goes on. Under ``torchrun`` every process takes the images
``rank::world``; the matrices are summed and the rows gathered so rank 0 writes the same report a
single process would. See docs/evaluation.md.
"""

from __future__ import annotations

import csv
import heapq
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from annotations import voc_colormap

from .datasets import invalid_label_values
from .distributed import gather_objects, init_distributed, rank_and_world
from .errors import SegcoreError
from .evaluation_advice import unknown_labels_of
from .metrics import ConfusionMatrix, compute_scores
from .bootstrap import ImageMatrices, bootstrap, sparse_matrix
from .pred_map import PredictionMapError, prediction_map
from .protocol import Protocol, predict_sample, protocol_for, published_scores

__all__ = ["EvaluationError", "EvaluationResult", "evaluate", "evaluate_models"]

WORST_COUNT = 8
THUMBNAIL_SIDE = 160


class EvaluationError(SegcoreError):
    """The evaluation cannot run at all (empty dataset, classes that do not fit the model)."""


@dataclass
class EvaluationResult:
    """Scores of a whole run plus what the report and the app's gallery need."""

    scores: dict
    """:meth:`ConfusionMatrix.compute` of every counted pixel (fractions; NaN for absent classes)."""
    class_names: tuple[str, ...]
    per_image: list[dict]
    """One row per evaluated image: ``image``, ``pixel_accuracy``, ``mean_iou``, ``valid_pixels``."""
    failures: list[dict]
    """One entry per image that could not be evaluated: ``index``, ``image``, ``file``, ``reason``."""
    warnings: list[dict]
    """Problems that did not stop an image (labelme shapes skipped or clipped): ``file``, ``shape``, ``reason``."""
    worst: list[dict]
    """Lowest-mIoU images, worst first: scores, ``thumbnail`` (image | ground truth | prediction
    strip, uint8 RGB) and ``path`` of the written PNG when there is an output folder."""
    options: dict
    images: int = 0
    report: dict[str, Path] = field(default_factory=dict)
    published: dict | None = None
    """The registry's published figures this run is comparable with (see
    :func:`segcore.protocol.published_scores`), else None."""
    image_matrices: ImageMatrices | None = None
    """Each evaluated image's confusion matrix, sparse, in ``per_image`` order (for bootstraps)."""
    bootstrap: dict | None = None
    """95% bootstrap intervals over images (:func:`segcore.bootstrap.bootstrap`)."""
    palette: np.ndarray | None = None
    image_indices: list[int] = field(default_factory=list)
    """Dataset index of each ``per_image`` row (to pair the images of two models)."""

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def summary(self) -> str:
        done = len(self.per_image)
        line = f"{done} of {self.images} images evaluated"
        if self.failures:
            line += f", {len(self.failures)} failed:"
            shown = [f"  {failure_text(f)}" for f in self.failures[:20]]
            if len(self.failures) > 20:
                shown.append(f"  ... and {len(self.failures) - 20} more (see scores.json)")
            line = "\n".join([line, *shown])
        if self.warnings:
            line += f"\n{len(self.warnings)} conversion warning(s) (shapes skipped or clipped; see scores.json)"
        return line


# ----------------------------------------------------------------------------- helpers


def _thumb(array: np.ndarray, side: int) -> np.ndarray:
    h, w = array.shape[:2]
    scale = min(1.0, side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = Image.fromarray(array)
    if size != (w, h):
        img = img.resize(size, Image.Resampling.NEAREST if array.ndim == 2 else Image.Resampling.BILINEAR)
    return np.asarray(img)


def thumbnail_strip(image, label, pred, palette: np.ndarray, side: int) -> np.ndarray:
    """image | ground truth | prediction, each at most ``side`` px on its long side (ignore = white)."""
    pal = np.zeros((256, 3), np.uint8)
    pal[: min(len(palette), 256)] = palette[:256]
    pal[255] = 255
    lab = pal[_thumb(label, side)]
    prd = pal[_thumb(np.clip(pred, 0, 255).astype(np.uint8), side)]
    parts = [lab, prd] if image is None else [_thumb(image, side), lab, prd]
    h = max(p.shape[0] for p in parts)
    gap = np.full((h, 4, 3), 255, np.uint8)
    padded = []
    for k, p in enumerate(parts):
        if p.shape[0] < h:
            p = np.concatenate([p, np.full((h - p.shape[0], p.shape[1], 3), 255, np.uint8)], 0)
        padded += [p] if k == 0 else [gap, p]
    return np.concatenate(padded, 1)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80] or "image"


def _palette_for(segmenter, dataset, n: int) -> np.ndarray:
    for pal in (getattr(segmenter, "palette", None), getattr(dataset, "palette", None)):
        if pal is not None and len(pal) >= n:
            return np.asarray(pal, np.uint8)
    return voc_colormap(256)


# ----------------------------------------------------------------------------- runner


def evaluate(segmenter, dataset, *, protocol=None, out_dir=None, progress: bool = True, class_names=None,
             palette=None, checkpoint=None, options: dict | None = None, worst: int = WORST_COUNT,
             thumbnail_side: int = THUMBNAIL_SIDE, distributed: bool = True,
             max_images: int | None = None, pred_map=None, intervals: bool = True) -> EvaluationResult:
    """Score ``segmenter`` (a :class:`~segcore.Segmenter`, or None for datasets of stored
    predictions) on ``dataset`` (a :class:`~segcore.datasets.SegmentationDataset`). ``class_names``,
    when given, is the evaluation's label space (the labels are indices into it), else the dataset's.

    ``protocol`` (``"reference"``, ``"resize"``, a :class:`~segcore.protocol.Protocol` or None for
    the dataset format's default) decides how each image is run; see :mod:`segcore.protocol`. This
    is the one loop behind ``segcore evaluate``, ``segcore compare``, the app's Evaluate tab and the
    trainer's validation. ``max_images`` scores only the first images. ``pred_map`` (a built-in name
    such as ``"cocostuff->voc"`` or a mapping file; see :mod:`segcore.pred_map`) maps the model's
    classes into the dataset's; without it, a built-in one is used when the class counts differ.
    ``intervals``: 95% bootstrap intervals over images (:mod:`segcore.bootstrap`) in ``bootstrap``.

    Predictions are compared at the label's size (the warped label's for COCO-Stuff 10k under
    ``reference``). Files that cannot be read, images without a mask, masks of another size, and
    label values outside ``[0, n_classes)`` other than 255 become ``failures`` (file and reason) and
    the run goes on. With ``out_dir``, the report (scores.json, per_class.csv, per_image.csv,
    failures.csv, report.html and ``worst/`` thumbnails) is written there (by rank 0 only when
    distributed). Under torchrun (``distributed=True``), images are sharded ``rank::world`` and the
    results combined.
    """
    (result,) = evaluate_models([segmenter], dataset, protocol=protocol, progress=progress,
                                class_names=class_names, palette=palette, options=options, worst=worst,
                                thumbnail_side=thumbnail_side, distributed=distributed, max_images=max_images,
                                pred_maps=[pred_map], intervals=intervals)
    if checkpoint is None and segmenter is not None:
        checkpoint = getattr(segmenter.model, "checkpoint", None)
    if out_dir is not None and rank_and_world()[0] == 0 and result.per_image:  # no report of NaNs: see evaluation_advice
        result.report = write_outputs(result, out_dir, result.palette, checkpoint=checkpoint)
    return result


class _Run:
    """One model's share of a pass over the dataset: its mapping, matrix, rows, failures, worst images."""

    def __init__(self, segmenter, dataset, names, pred_map, palette, eval_names=None):
        self.segmenter = segmenter
        # the evaluation's label space: the caller's class names when given, else the dataset's
        ds_names = eval_names if eval_names is not None else getattr(dataset, "class_names", None)
        self.mapper = None
        if segmenter is not None and ds_names is not None and (pred_map is not None
                                                               or len(ds_names) != len(segmenter.class_names)):
            try:
                self.mapper = prediction_map(segmenter.class_names, ds_names, pred_map)
            except PredictionMapError as exc:  # several models may run: say which one needs the mapping
                raise PredictionMapError(f"{segmenter.name}: {exc}") from exc
            if self.mapper is not None:
                names = tuple(ds_names)
        self.names = tuple(names)
        self.palette = np.asarray(palette, np.uint8) if palette is not None else \
            _palette_for(None if self.mapper is not None else segmenter, dataset, len(self.names))
        self.cm = ConfusionMatrix(len(self.names), int(getattr(dataset, "ignore_index", 255)))
        self.rows: list[tuple[int, dict, tuple]] = []  # (index, row, sparse confusion matrix)
        self.failures: list[dict] = []
        self.heap: list[tuple] = []  # (-mean_iou, -index, row, thumbnail): the `worst` lowest mIoU images

    def predict(self, sample, protocol, where: str):
        if self.segmenter is None:
            return sample.prediction, sample.label
        pred, label = predict_sample(self.segmenter, sample, protocol, where)
        if self.mapper is not None:
            pred, label = self.mapper(pred, label)
        return pred, label

    def add(self, i: int, sample, label, pred, hist, worst: int, thumbnail_side: int) -> None:
        s = compute_scores(hist)
        row = {"image": sample.name, "pixel_accuracy": s["pixel_accuracy"], "mean_iou": s["mean_iou"],
               "valid_pixels": int(sum(s["gt_pixels"]))}
        self.rows.append((i, row, sparse_matrix(hist.cpu().numpy() if hasattr(hist, "cpu") else hist)))
        if worst > 0 and not math.isnan(row["mean_iou"]):
            key = (-row["mean_iou"], -i)
            if len(self.heap) < worst or key > self.heap[0][:2]:
                strip = thumbnail_strip(sample.image, label, pred, self.palette, thumbnail_side)
                entry = (*key, {**row, "index": i}, strip)
                (heapq.heappush if len(self.heap) < worst else heapq.heapreplace)(self.heap, entry)


def evaluate_models(segmenters, dataset, *, protocol=None, progress: bool = True, class_names=None, palette=None,
                    options: dict | None = None, worst: int = WORST_COUNT, thumbnail_side: int = THUMBNAIL_SIDE,
                    distributed: bool = True, max_images: int | None = None, pred_maps=None,
                    intervals: bool = True) -> list[EvaluationResult]:
    """:func:`evaluate` for several models in one pass: each image is read once and run through
    every model (same protocol and options); one :class:`EvaluationResult` per model, in order.

    ``pred_maps``: one prediction mapping (or None) per model. An image that cannot be read fails for
    every model; a model-specific failure (e.g. too large for that model's class count) only for it.
    """
    from tqdm.auto import tqdm

    segmenters = list(segmenters)
    pred_maps = list(pred_maps) if pred_maps is not None else [None] * len(segmenters)
    first = segmenters[0]
    if distributed:
        init_distributed(str(getattr(first, "device", "auto")) if first is not None else "cpu")
        rank, world = rank_and_world()
    else:
        rank, world = 0, 1
    total = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    if total == 0:
        raise EvaluationError(f"{getattr(dataset, 'root', dataset)}: the dataset has no images to evaluate")

    names = tuple(class_names) if class_names is not None else None
    if names is None and first is not None:
        names = tuple(first.class_names)
    if names is None:
        names = getattr(dataset, "class_names", None)
    if names is None:
        raise EvaluationError(f"{getattr(dataset, 'root', dataset)}: the class names are unknown; "
                              "pass a label space (voc, cocostuff or a labels file)")
    if first is None and getattr(dataset, "format", None) != "masks":
        raise EvaluationError("no model given: only the masks format carries its own predictions")
    given = tuple(class_names) if class_names is not None else None
    runs = [_Run(seg, dataset, names, pm, palette, given) for seg, pm in zip(segmenters, pred_maps)]
    for k, run in enumerate(runs[1:], 2):
        if run.names != runs[0].names:
            raise EvaluationError(f"model {k} ({run.segmenter.name}) predicts {len(run.names)} classes, model 1 "
                                  f"{len(runs[0].names)}, with no mapping between them; evaluate against one label "
                                  "space (--labels) and map the others (--pred-map)")
    names = runs[0].names
    n = len(names)
    fmt = getattr(dataset, "format", None)
    if not isinstance(protocol, Protocol):
        protocol = protocol_for(protocol, fmt)
    ignore = int(getattr(dataset, "ignore_index", 255))

    warnings: list[tuple[int, dict]] = []
    indices = range(rank, total, world)
    bar = tqdm(indices, desc="evaluate", unit="img", disable=not progress or rank != 0, dynamic_ncols=True)
    for i in bar:
        name = _item_name(dataset, i)
        try:
            sample = dataset[i]
            name = sample.name
            warnings.extend((i, w) for w in sample.warnings)
            if sample.label is None:
                raise EvaluationError(f"{dataset.source(i)}: no ground-truth mask")
            bad = invalid_label_values(sample.label, n, ignore)
            if bad.size:
                shown = ", ".join(str(int(v)) for v in bad[:10])
                raise EvaluationError(f"{dataset.source(i)}: label values {shown} are outside [0, {n}) and "
                                      f"not {ignore} (ignore); wrong label space or a colour mask?")
        except (SegcoreError, OSError, ValueError, MemoryError) as exc:
            for run in runs:
                _fail(run, i, name, dataset, exc, rank == 0 and progress and run is runs[0])
            continue
        for run in runs:
            try:
                pred, label = run.predict(sample, protocol, dataset.source(i))
                if pred.shape != label.shape:
                    raise EvaluationError(f"{dataset.source(i)}: prediction is {pred.shape[1]}x{pred.shape[0]} "
                                          f"pixels, the label {label.shape[1]}x{label.shape[0]}")
                hist = run.cm.update(label, pred, name=dataset.source(i))
            except (SegcoreError, OSError, ValueError, MemoryError) as exc:
                _fail(run, i, name, dataset, exc, rank == 0 and progress)
                continue
            run.add(i, sample, label, pred, hist, worst, thumbnail_side)
            del label, pred
        del sample
    bar.close()

    gathered_warnings = gather_objects(warnings, world)
    all_warnings = [w for _, w in sorted((w for g in gathered_warnings for w in g), key=lambda iw: iw[0])]
    results = []
    for run in runs:
        run.cm.all_reduce()
        scores = run.cm.compute()
        gathered = gather_objects((run.rows, run.failures, [(e[2], e[3]) for e in run.heap]), world)
        all_rows = sorted((r for g in gathered for r in g[0]), key=lambda r: r[0])
        matrices = ImageMatrices(n, [r[2] for r in all_rows])
        all_failures = sorted((f for g in gathered for f in g[1]), key=lambda f: f["index"])
        worst_rows = sorted((w for g in gathered for w in g[2]), key=lambda w: (w[0]["mean_iou"], w[0]["index"]))
        worst_rows = worst_rows[:worst]
        seg = run.segmenter
        opts = dict(options or {})
        if seg is not None:
            opts.setdefault("model", seg.describe())
            opts.setdefault("protocol", protocol.describe(seg))
        opts.setdefault("dataset", dataset.describe() if hasattr(dataset, "describe") else str(dataset))
        if world > 1:
            opts.setdefault("processes", world)
        if run.mapper is not None:
            opts.setdefault("pred_map", run.mapper.name)
        results.append(EvaluationResult(
            scores=scores, class_names=names, per_image=[r[1] for r in all_rows], failures=all_failures,
            warnings=all_warnings, worst=[{**row, "thumbnail": thumb} for row, thumb in worst_rows], options=opts,
            images=total, published=None if seg is None else published_scores(seg, fmt, protocol),
            image_matrices=matrices, bootstrap=bootstrap(matrices) if intervals and rank == 0 else None,
            palette=run.palette, image_indices=[r[0] for r in all_rows]))
    return results


def _fail(run: _Run, i: int, name: str, dataset, exc: BaseException, show: bool) -> None:
    from tqdm.auto import tqdm

    run.failures.append({"index": i, "image": name, "file": _source(dataset, i), "reason": _reason(exc),
                         "unknown_labels": unknown_labels_of(exc)})
    if show:
        tqdm.write(f"FAILED {failure_text(run.failures[-1])}", file=sys.stderr)


def _item_name(dataset, i: int) -> str:
    items = getattr(dataset, "items", None)
    if items is not None:
        return items[i].name
    return str(i)


def _source(dataset, i: int) -> str:
    try:
        return dataset.source(i)
    except Exception:  # a dataset without source(): the index is all we have
        return f"item {i}"


def failure_text(failure: dict) -> str:
    """``file: reason``, naming the file once (most reasons already start with it)."""
    file, reason = str(failure["file"]), str(failure["reason"])
    return reason if reason.startswith(file) else f"{file}: {reason}"


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, SegcoreError) else f"{type(exc).__name__}: {text}"


# ----------------------------------------------------------------------------- files


def write_outputs(result: EvaluationResult, out_dir, palette, *, checkpoint=None) -> dict[str, Path]:
    """The report files of ``result``: write_report's four, failures.csv and the worst thumbnails."""
    from .report import write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    worst_dir = out / "worst"
    if worst_dir.is_dir():
        for old in worst_dir.glob("*.png"):
            old.unlink()
    worst_meta = []
    for k, w in enumerate(result.worst, 1):
        path = worst_dir / f"{k:02d}_{_safe_name(w['image'])}.png"
        worst_dir.mkdir(exist_ok=True)
        Image.fromarray(w["thumbnail"]).save(path)
        w["path"] = path
        worst_meta.append({"image": w["image"], "mean_iou": w["mean_iou"],
                           "pixel_accuracy": w["pixel_accuracy"], "thumbnail": str(path.relative_to(out))})
    summary = {"images": result.images, "evaluated": len(result.per_image), "failed": len(result.failures),
               "warnings": len(result.warnings)}
    failures = [{"image": f["image"], "file": f["file"], "reason": f["reason"]} for f in result.failures]
    extra = {"summary": summary, "worst_images": worst_meta, "warnings": result.warnings}
    if result.published is not None:
        extra["published"] = result.published
    if result.bootstrap is not None:
        extra["bootstrap"] = result.bootstrap
    paths = write_report(out, result.scores, result.class_names, palette, options=result.options,
                         checkpoint=checkpoint, per_image=result.per_image, failures=failures, extra=extra)
    paths["failures_csv"] = out / "failures.csv"
    with open(paths["failures_csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "file", "reason"])
        writer.writeheader()
        writer.writerows(failures)
    if worst_meta:
        paths["worst"] = worst_dir
    return paths
