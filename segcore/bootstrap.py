"""Bootstrap confidence intervals over images, from compact per-image confusion matrices.

Each image keeps only the non-zero cells of its confusion matrix (flat index, count): a handful of
classes per image, so memory grows by tens of bytes per image, not n_classes². A resample draws the
images with replacement (seeded) and recomputes the scores from the summed matrix, exactly as the
whole-set scores are computed (classes absent from the resampled ground truth are left out of the
means). A paired interval resamples the same images for two models and takes the difference.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BOOTSTRAP_MAX_IMAGES", "RESAMPLES", "SEED", "ImageMatrices", "bootstrap", "paired_bootstrap"]

RESAMPLES = 1000
SEED = 0
BOOTSTRAP_MAX_IMAGES = 50_000
"""Above this many images the interval is skipped (with a note): it is narrow there anyway and the
resampling would cost minutes."""
KEYS = ("mean_iou", "pixel_accuracy", "fw_iou")
_CHUNK = 50  # resamples computed together: (chunk x images) weights times (images x cells)


def sparse_matrix(hist) -> tuple[np.ndarray, np.ndarray]:
    """(flat indices, counts) of the non-zero cells of one image's confusion matrix."""
    flat = np.asarray(hist).ravel()
    idx = np.flatnonzero(flat)
    return idx.astype(np.int32), flat[idx].astype(np.int64)


class ImageMatrices:
    """Per-image sparse confusion matrices of one run, in image order."""

    def __init__(self, n_classes: int, cells: list[tuple[np.ndarray, np.ndarray]]):
        self.n_classes = int(n_classes)
        self.cells = cells

    def __len__(self) -> int:
        return len(self.cells)

    def dense(self, columns: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(images x K counts, the K flat indices): the cells any image uses, as one dense table."""
        if columns is None:
            columns = np.unique(np.concatenate([c[0] for c in self.cells] or [np.zeros(0, np.int32)]))
        table = np.zeros((len(self.cells), len(columns)), np.float64)
        for row, (idx, counts) in enumerate(self.cells):
            table[row, np.searchsorted(columns, idx)] = counts
        return table, columns


def _scores(summed: np.ndarray, columns: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """The three scores of each row of ``summed`` (resamples x K cells at flat ``columns``)."""
    rows, cols = columns // n, columns % n
    onehot_r = np.zeros((len(columns), n))
    onehot_r[np.arange(len(columns)), rows] = 1
    onehot_c = np.zeros((len(columns), n))
    onehot_c[np.arange(len(columns)), cols] = 1
    gt = summed @ onehot_r
    pred = summed @ onehot_c
    tp = summed @ (onehot_r * (rows == cols)[:, None])
    total = gt.sum(1)
    present = gt > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(present, tp / (gt + pred - tp), 0.0)
        return {"mean_iou": iou.sum(1) / present.sum(1), "pixel_accuracy": tp.sum(1) / total,
                "fw_iou": (gt / total[:, None] * iou).sum(1)}


def _weights(n_images: int, resamples: int, seed: int):
    """Chunks of resampling weights: how often each image is drawn in each resample."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, _CHUNK):
        k = min(_CHUNK, resamples - start)
        draws = rng.integers(0, n_images, size=(k, n_images)) + n_images * np.arange(k)[:, None]
        yield np.bincount(draws.ravel(), minlength=k * n_images).reshape(k, n_images).astype(np.float64)


def _interval(values: np.ndarray) -> list[float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return [float("nan"), float("nan")]
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def _note(n_images: int) -> str | None:
    if n_images < 2:
        return "fewer than 2 images: no interval"
    if n_images > BOOTSTRAP_MAX_IMAGES:
        return f"more than {BOOTSTRAP_MAX_IMAGES} images: interval skipped"
    return None


def bootstrap(mats: ImageMatrices, *, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """``{"ci95": {key: [low, high]}, "resamples", "seed", "images"}`` (percentile intervals), or a note."""
    info = {"method": "percentile bootstrap over images", "resamples": resamples, "seed": seed, "images": len(mats)}
    note = _note(len(mats))
    if note:
        return {**info, "ci95": None, "note": note}
    table, columns = mats.dense()
    out = {k: [] for k in KEYS}
    for w in _weights(len(mats), resamples, seed):
        for k, v in _scores(w @ table, columns, mats.n_classes).items():
            out[k].append(v)
    return {**info, "ci95": {k: _interval(np.concatenate(v)) for k, v in out.items()}}


def paired_bootstrap(a: ImageMatrices, b: ImageMatrices, *, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Interval of ``score(b) - score(a)`` resampling the same images for both (same image order)."""
    if len(a) != len(b):
        raise ValueError("paired bootstrap needs the same images for both models")
    info = {"resamples": resamples, "seed": seed, "images": len(a)}
    note = _note(len(a))
    if note:
        return {**info, "ci95": None, "note": note}
    columns = np.union1d(*(np.unique(np.concatenate([c[0] for c in m.cells])) for m in (a, b)))
    ta, _ = a.dense(columns)
    tb, _ = b.dense(columns)
    out = {k: [] for k in KEYS}
    for w in _weights(len(a), resamples, seed):
        sa, sb = _scores(w @ ta, columns, a.n_classes), _scores(w @ tb, columns, b.n_classes)
        for k in KEYS:
            out[k].append(sb[k] - sa[k])
    return {**info, "ci95": {k: _interval(np.concatenate(v)) for k, v in out.items()}}


def interval_line(info: dict) -> str:
    """'95% interval (bootstrap over 12 images, 1000 resamples): mIoU 40.1..47.3, PA ..., FWIoU ...'."""
    if not info.get("ci95"):
        return f"95% interval: {info.get('note', 'none')}"
    short = {"mean_iou": "mIoU", "pixel_accuracy": "PA", "fw_iou": "FWIoU"}
    parts = [f"{short[k]} {100 * lo:.2f}..{100 * hi:.2f}" for k, (lo, hi) in info["ci95"].items()]
    return (f"95% interval (bootstrap over {info['images']} images, {info['resamples']} resamples): "
            + ", ".join(parts))
