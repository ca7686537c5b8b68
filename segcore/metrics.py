"""Streaming semantic-segmentation scores (DeepLab / FCN definitions).

The confusion matrix ``M`` has **rows = ground truth, columns = prediction**:
``M[i, j]`` is the number of pixels whose ground-truth label is ``i`` and whose
predicted label is ``j``.  Only pixels whose ground truth lies in
``[0, n_classes)`` and differs from ``ignore_index`` are counted; every other
ground-truth value (255 "void", negative values, labels beyond the class range)
is skipped.  Predictions must lie in ``[0, n_classes)`` on the counted pixels;
anything else is an error (a model or a colour-to-label mapping is wrong).

Scores (see ``docs/metrics.md`` for the comparison with the reference
``scores()`` of kazuto1011/deeplab-pytorch)::

    pixel_accuracy  = sum(diag) / sum(M)
    class_accuracy  = diag / row_sum                    (recall)
    class_iou       = diag / (row_sum + col_sum - diag)
    class_precision = diag / col_sum
    class_dice      = 2 diag / (row_sum + col_sum)
    mean_accuracy   = mean of class_accuracy over present classes
    mean_iou        = mean of class_iou over present classes
    fw_iou          = sum over present classes of (row_sum / sum(M)) * class_iou

A class is *present* when it has at least one ground-truth pixel (row sum > 0).
Classes that are not present are reported as absent: their per-class values are
NaN (``null`` in JSON), they are not counted as 0 and they are not inside the
means.  With no counted pixel at all every score is NaN.

The matrix is kept as int64 (an int32 matrix overflows on a few thousand
full-size images).  Torch inputs are counted on the tensor's device without a
host round-trip, so a CUDA evaluation loop never synchronises per image.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from annotations import IGNORE_INDEX

from .errors import SegcoreError

__all__ = [
    "MetricsError",
    "ConfusionMatrix",
    "compute_scores",
    "image_scores",
    "to_json_dict",
]

_SCALAR_KEYS = ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou")


class MetricsError(SegcoreError, ValueError):
    """Bad input to the metrics code (shapes, dtypes, predictions out of range)."""


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _where(name: str | None) -> str:
    return f"{name}: " if name else ""


def _check_n_classes(n_classes: int) -> int:
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise MetricsError(f"n_classes must be a positive integer, got {n_classes!r}")
    return int(n_classes)


def _check_pair(gt: Any, pred: Any, name: str | None) -> None:
    gshape, pshape = tuple(gt.shape), tuple(pred.shape)
    if gshape != pshape:
        raise MetricsError(
            f"{_where(name)}ground-truth shape {gshape} and prediction shape {pshape} differ"
        )
    for what, arr in (("ground truth", gt), ("prediction", pred)):
        if _is_tensor(arr):
            ok = not (arr.is_floating_point() or arr.is_complex())
        else:
            ok = arr.dtype.kind in "iub"
        if not ok:
            raise MetricsError(f"{_where(name)}{what} must hold integer labels, got dtype {arr.dtype}")


def _bad_values_message(values: np.ndarray, n_classes: int, count: int, name: str | None) -> str:
    shown = ", ".join(str(int(v)) for v in values[:10])
    more = "" if len(values) <= 10 else f", ... ({len(values)} distinct values)"
    return (
        f"{_where(name)}{count} predicted pixel(s) outside [0, {n_classes}) "
        f"on labelled pixels: values {shown}{more}"
    )


# --------------------------------------------------------------------------- counting


def _numpy_hist(gt: np.ndarray, pred: np.ndarray, n: int, ignore_index: int, name: str | None) -> np.ndarray:
    gt = np.asarray(gt).reshape(-1)
    pred = np.asarray(pred).reshape(-1)
    valid = (gt >= 0) & (gt < n)
    if 0 <= ignore_index < n:
        valid &= gt != ignore_index
    bad = valid & ((pred < 0) | (pred >= n))
    if bad.any():
        values = np.unique(pred[bad])
        raise MetricsError(_bad_values_message(values, n, int(bad.sum()), name))
    # One flat index per pixel; uncounted pixels go to the spare bin n*n, which is
    # cheaper than compacting both arrays with a boolean mask.
    idx = gt.astype(np.intp) * n
    idx += pred
    idx[~valid] = n * n
    return np.bincount(idx, minlength=n * n + 1)[: n * n].reshape(n, n).astype(np.int64, copy=False)


def _torch_hist(gt, pred, n: int, ignore_index: int):
    """Per-image matrix on an accelerator plus device-side bad-prediction stats (no sync)."""
    gt = gt.reshape(-1).to(torch.int64)
    pred = pred.reshape(-1).to(torch.int64)
    valid = (gt >= 0) & (gt < n)
    if 0 <= ignore_index < n:
        valid &= gt != ignore_index
    bad = valid & ((pred < 0) | (pred >= n))
    ok = valid & ~bad
    idx = torch.where(ok, gt * n + pred, torch.full_like(gt, n * n))
    # torch.bincount reads the maximum back to the host to size its output; a
    # scatter into a fixed-size histogram stays on the device.
    hist = torch.zeros(n * n + 1, dtype=torch.int64, device=idx.device)
    hist.scatter_add_(0, idx, torch.ones_like(idx))
    hist = hist[: n * n].view(n, n)
    big = torch.iinfo(torch.int64).max
    bad_count = bad.sum()
    bad_min = torch.where(bad, pred, torch.full_like(pred, big)).min() if pred.numel() else None
    bad_max = torch.where(bad, pred, torch.full_like(pred, -big)).max() if pred.numel() else None
    return hist, bad_count, bad_min, bad_max


# --------------------------------------------------------------------------- scores


def compute_scores(matrix: Any) -> dict:
    """Scores of an ``(n, n)`` confusion matrix (rows = ground truth, columns = prediction).

    Returns the dict described in the module docstring: four scalar fractions,
    per-class lists (NaN for absent classes), pixel counts, ``present``, the
    matrix as a list of lists and ``n_classes``.
    """
    if _is_tensor(matrix):
        matrix = matrix.detach().cpu().numpy()
    hist = np.asarray(matrix, dtype=np.int64)
    if hist.ndim != 2 or hist.shape[0] != hist.shape[1]:
        raise MetricsError(f"confusion matrix must be square, got shape {hist.shape}")
    n = hist.shape[0]
    tp = np.diag(hist).astype(np.float64)
    gt_pix = hist.sum(axis=1)
    pred_pix = hist.sum(axis=0)
    total = int(gt_pix.sum())
    present = gt_pix > 0
    rows = gt_pix.astype(np.float64)
    cols = pred_pix.astype(np.float64)

    nan = np.full(n, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        class_acc = np.where(present, tp / rows, nan)
        class_iou = np.where(present, tp / (rows + cols - tp), nan)
        class_prec = np.where(present & (pred_pix > 0), tp / cols, nan)
        class_dice = np.where(present, 2.0 * tp / (rows + cols), nan)

    if total > 0:
        pixel_accuracy = float(tp.sum() / total)
        mean_accuracy = float(class_acc[present].mean())
        mean_iou = float(class_iou[present].mean())
        freq = rows / total
        fw_iou = float((freq[present] * class_iou[present]).sum())
    else:
        pixel_accuracy = mean_accuracy = mean_iou = fw_iou = math.nan

    return {
        "pixel_accuracy": pixel_accuracy,
        "mean_accuracy": mean_accuracy,
        "mean_iou": mean_iou,
        "fw_iou": fw_iou,
        "class_iou": [float(v) for v in class_iou],
        "class_accuracy": [float(v) for v in class_acc],
        "class_precision": [float(v) for v in class_prec],
        "class_dice": [float(v) for v in class_dice],
        "gt_pixels": [int(v) for v in gt_pix],
        "pred_pixels": [int(v) for v in pred_pix],
        "present": [bool(v) for v in present],
        "confusion_matrix": hist.tolist(),
        "n_classes": int(n),
    }


def image_scores(
    gt: Any, pred: Any, n_classes: int, ignore_index: int = IGNORE_INDEX, *, name: str | None = None
) -> dict:
    """Pixel accuracy and mean IoU of one image (to rank the worst images).

    Same definitions as :func:`compute_scores` on the image's own confusion
    matrix; returns ``{"pixel_accuracy", "mean_iou", "valid_pixels"}`` (NaN
    scores when the image has no labelled pixel).
    """
    cm = ConfusionMatrix(n_classes, ignore_index)
    hist = cm.update(gt, pred, name=name)
    if _is_tensor(hist):
        hist = hist.cpu().numpy()
    s = compute_scores(hist)
    return {
        "pixel_accuracy": s["pixel_accuracy"],
        "mean_iou": s["mean_iou"],
        "valid_pixels": int(sum(s["gt_pixels"])),
    }


def to_json_dict(obj: Any) -> Any:
    """Copy of a scores dict (or any nesting of dicts/lists) with NaN/inf as None.

    ``json.dump`` would otherwise write the non-standard token ``NaN``.
    numpy scalars and arrays are turned into Python numbers and lists.
    """
    if isinstance(obj, dict):
        return {k: to_json_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_dict(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json_dict(obj.tolist())
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


# --------------------------------------------------------------------------- streaming


class ConfusionMatrix:
    """Streaming int64 confusion matrix; rows = ground truth, columns = prediction.

    ``update`` takes numpy arrays or torch tensors of any matching shape (one
    image ``HxW`` or a batch ``NxHxW``).  Torch inputs are counted on their own
    device; the matrix then lives there as a torch int64 tensor.  On CUDA the
    prediction range check is deferred (it would otherwise synchronise every
    image): offending pixels are left out and :meth:`compute`,
    :meth:`all_reduce` or :meth:`check` raise :class:`MetricsError` naming the
    values.  numpy and CPU inputs are checked at once.
    """

    def __init__(self, n_classes: int, ignore_index: int = IGNORE_INDEX):
        self.n_classes = _check_n_classes(n_classes)
        self.ignore_index = int(ignore_index)
        self.reset()

    # ---- state
    def reset(self) -> None:
        n = self.n_classes
        self._mat: Any = np.zeros((n, n), dtype=np.int64)
        self._bad_count: Any = 0
        self._bad_min: Any = None
        self._bad_max: Any = None

    @property
    def matrix(self) -> np.ndarray:
        """The accumulated matrix as a numpy int64 array (synchronises on CUDA)."""
        if _is_tensor(self._mat):
            return self._mat.detach().cpu().numpy().copy()
        return self._mat.copy()

    @property
    def device(self):
        """``None`` while the matrix is a numpy array, else the torch device."""
        return self._mat.device if _is_tensor(self._mat) else None

    def _add(self, hist) -> None:
        if _is_tensor(self._mat):
            if not _is_tensor(hist):
                hist = torch.from_numpy(np.ascontiguousarray(hist))
            self._mat += hist.to(self._mat.device, non_blocking=True)
        elif _is_tensor(hist):
            self._mat = torch.from_numpy(self._mat).to(hist.device) + hist
        else:
            self._mat += hist

    # ---- counting
    def update(self, gt: Any, pred: Any, *, name: str | None = None):
        """Count one image or batch; returns that input's own ``(n, n)`` matrix.

        ``name`` (e.g. the image file) is put into error messages.  The returned
        matrix is a numpy array for numpy input and a device tensor for torch
        input; pass it to :func:`compute_scores` for per-image scores.
        """
        _check_pair(gt, pred, name)
        n = self.n_classes
        if _is_tensor(gt) or _is_tensor(pred):
            devices = [x.device for x in (gt, pred) if _is_tensor(x)]
            device = next((d for d in devices if d.type != "cpu"), devices[0])
            gt_t = gt if _is_tensor(gt) else torch.from_numpy(np.asarray(gt))
            pred_t = pred if _is_tensor(pred) else torch.from_numpy(np.asarray(pred))
            gt_t = gt_t.to(device)
            pred_t = pred_t.to(device)
            if device.type == "cpu":
                # CPU tensors share memory with numpy; np.bincount is the faster counter.
                hist = torch.from_numpy(
                    _numpy_hist(gt_t.detach().numpy(), pred_t.detach().numpy(), n, self.ignore_index, name)
                )
            else:
                hist, bad_count, bad_min, bad_max = _torch_hist(gt_t, pred_t, n, self.ignore_index)
                self._bad_count = bad_count + self._bad_count
                if bad_min is not None:
                    if self._bad_min is None:
                        self._bad_min, self._bad_max = bad_min, bad_max
                    else:
                        self._bad_min = torch.minimum(self._bad_min, bad_min.to(self._bad_min.device))
                        self._bad_max = torch.maximum(self._bad_max, bad_max.to(self._bad_max.device))
        else:
            hist = _numpy_hist(np.asarray(gt), np.asarray(pred), n, self.ignore_index, name)
        self._add(hist)
        return hist

    def check(self) -> None:
        """Raise the deferred out-of-range prediction error, if any (syncs on CUDA)."""
        count = int(self._bad_count)
        if count:
            lo, hi = int(self._bad_min), int(self._bad_max)
            values = f"value {lo}" if lo == hi else f"values between {lo} and {hi}"
            raise MetricsError(
                f"{count} predicted pixel(s) outside [0, {self.n_classes}) on labelled pixels: {values}"
            )

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix (same ``n_classes``) into this one; returns self."""
        if not isinstance(other, ConfusionMatrix):
            raise MetricsError(f"can only merge a ConfusionMatrix, got {type(other).__name__}")
        if other.n_classes != self.n_classes:
            raise MetricsError(f"cannot merge {other.n_classes} classes into {self.n_classes} classes")
        other.check()
        self._add(other._mat)
        return self

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the matrix over all processes of the default group; no-op without one.

        Works with gloo (CPU tensor) and nccl (CUDA tensor on the current
        device).  Every rank must call it.  Returns self.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        n = self.n_classes
        if _is_tensor(self._mat):
            flat = self._mat.reshape(-1)
            bad = torch.as_tensor(self._bad_count, dtype=torch.int64, device=flat.device).reshape(1)
        else:
            flat = torch.from_numpy(self._mat.reshape(-1).copy())
            bad = torch.tensor([int(self._bad_count)], dtype=torch.int64)
        # The bad-pixel count travels with the matrix so that every rank raises
        # together instead of one rank leaving the others waiting in the collective.
        buf = torch.cat([flat, bad.to(flat.device)])
        backend = dist.get_backend()
        if backend == "nccl" and buf.device.type != "cuda":
            buf = buf.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        total_bad = int(buf[-1])
        mat = buf[:-1].view(n, n)
        if _is_tensor(self._mat):
            self._mat = mat.to(self._mat.device)
        else:
            self._mat = mat.cpu().numpy().astype(np.int64, copy=False)
        if total_bad:
            local = int(self._bad_count)
            if local:
                self.check()
            raise MetricsError(
                f"{total_bad} predicted pixel(s) outside [0, {n}) on labelled pixels in another process"
            )
        return self

    def compute(self) -> dict:
        """Scores of everything counted so far (see module docstring)."""
        self.check()
        return compute_scores(self._mat)

    def to_json_dict(self) -> dict:
        """:meth:`compute` with NaN as None, ready for ``json.dump``."""
        return to_json_dict(self.compute())

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(n_classes={self.n_classes}, ignore_index={self.ignore_index}, "
            f"device={self.device})"
        )

