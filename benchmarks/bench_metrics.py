"""Confusion-matrix throughput and peak memory: streaming ConfusionMatrix vs the reference.

The reference evaluation (kazuto1011/deeplab-pytorch ``main.py test`` + ``scores()``)
keeps every prediction and label map in Python lists and builds a float64 histogram
afterwards, one image at a time with a boolean-masked ``np.bincount``.  Ours counts
each image as it arrives.  Each method runs in its own subprocess so that the peak
resident-memory growth of one cannot hide inside another's.

Images are 513x513 (the DeepLab crop), int64 labels and predictions as they leave
``argmax`` / the data loader, 5% ignore pixels, ~70% correct predictions.  A small pool
of distinct images is cycled; the reference collects a copy of each, as ``list(...)``
of fresh model outputs would.  Timings cover only the metric work (update/compute for
ours, ``scores()`` for the reference), medians of several passes after a warm-up.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .memory import current_rss_mb, peak_rss_mb, reset_peak

ROOT = Path(__file__).resolve().parent.parent
H = W = 513
POOL = 8
METHODS = ("reference_lists", "stream_numpy", "stream_torch_cpu")


def _images(n_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(POOL):
        gt = rng.integers(0, n_classes, (H, W), dtype=np.int64)
        gt[rng.random((H, W)) < 0.05] = 255
        pred = np.where(rng.random((H, W)) < 0.7, gt, rng.integers(0, n_classes, (H, W)))
        pred = np.where(gt == 255, rng.integers(0, n_classes, (H, W)), pred).astype(np.int64)
        pool.append((gt, pred))
    return pool


def _reference_fast_hist(label_true, label_pred, n_class):
    mask = (label_true >= 0) & (label_true < n_class)
    return np.bincount(
        n_class * label_true[mask].astype(int) + label_pred[mask], minlength=n_class**2
    ).reshape(n_class, n_class)


def _reference_hist(label_trues, label_preds, n_class):
    """The histogram loop of the reference ``scores()`` (float64 accumulator)."""
    hist = np.zeros((n_class, n_class))
    for lt, lp in zip(label_trues, label_preds):
        hist += _reference_fast_hist(lt.flatten(), lp.flatten(), n_class)
    return hist


def _child(method: str, n_classes: int, n_images: int, repeats: int) -> dict:
    """One method in this process: times, peak RSS growth and a checksum of the matrix."""
    pool = _images(n_classes)
    if method == "stream_torch_cpu":
        import torch

        torch.set_num_threads(1)
        pool = [(torch.from_numpy(g), torch.from_numpy(p)) for g, p in pool]
    from segcore.metrics import ConfusionMatrix, compute_scores

    def one_pass():
        if method == "reference_lists":
            gts, preds = [], []
            for i in range(n_images):
                g, p = pool[i % POOL]
                gts.append(g.copy())  # the reference keeps every map until the end
                preds.append(p.copy())
            t0 = time.perf_counter()
            hist = _reference_hist(gts, preds, n_classes)
            compute_scores(hist.astype(np.int64))
            dt = time.perf_counter() - t0
            del gts, preds
            return dt, hist.astype(np.int64)
        cm = ConfusionMatrix(n_classes)
        dt = 0.0
        for i in range(n_images):
            g, p = pool[i % POOL]
            t0 = time.perf_counter()
            cm.update(g, p)
            dt += time.perf_counter() - t0
        t0 = time.perf_counter()
        cm.compute()
        dt += time.perf_counter() - t0
        return dt, cm.matrix

    # warm-up on a couple of images, then the baseline for the memory growth
    saved = n_images
    n_images = 2
    one_pass()
    n_images = saved
    peak_reset = reset_peak()
    base = current_rss_mb() if peak_reset else peak_rss_mb()
    times, matrix = [], None
    for _ in range(repeats):
        dt, matrix = one_pass()
        times.append(dt)
    peak = peak_rss_mb()
    med = statistics.median(times)
    return {
        "method": method,
        "n_classes": n_classes,
        "n_images": n_images,
        "seconds_median": med,
        "mpixel_per_s": n_images * H * W / med / 1e6,
        "peak_rss_growth_mb": max(0.0, peak - base),
        "baseline_rss_mb": base,
        "peak_rss_mb": peak,
        "peak_reset": peak_reset,
        "matrix_checksum": int((matrix * (np.arange(matrix.size).reshape(matrix.shape) % 9973 + 1)).sum()),
        "matrix_total": int(matrix.sum()),
    }


def _run_child(method: str, n_classes: int, n_images: int, repeats: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_metrics", "--child", method]
        + [str(n_classes), str(n_images), str(repeats)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool) -> dict:
    n_images = 12 if quick else 100
    repeats = 2 if quick else 3
    cases = []
    for n_classes in (21, 182):
        rows = {m: _run_child(m, n_classes, n_images, repeats) for m in METHODS}
        ref = rows["reference_lists"]
        sums = {(r["matrix_checksum"], r["matrix_total"]) for r in rows.values()}
        case = {
            "n_classes": n_classes,
            "n_images": n_images,
            "image_size": [H, W],
            "same_matrix": len(sums) == 1,
            "methods": rows,
            "ratios_vs_reference": {
                m: {
                    "throughput_x": rows[m]["mpixel_per_s"] / ref["mpixel_per_s"],
                    "peak_memory_ratio": (rows[m]["peak_rss_growth_mb"] / ref["peak_rss_growth_mb"])
                    if ref["peak_rss_growth_mb"] > 0
                    else None,
                    "peak_rss_total_ratio": rows[m]["peak_rss_mb"] / ref["peak_rss_mb"],
                }
                for m in METHODS
                if m != "reference_lists"
            },
        }
        cases.append(case)
    return {
        "quick": quick,
        "repeats": repeats,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "numpy": np.__version__,
        },
        "note": "peak_rss_growth_mb: peak resident memory (VmHWM, reset after warm-up) minus the "
        "resident memory at that point, one subprocess per method; peak_rss_mb includes the "
        "interpreter, numpy/torch and the image pool; throughput covers only the metric work",
        "cases": cases,
    }


def _main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        method, n_classes, n_images, repeats = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
        print(json.dumps(_child(method, n_classes, n_images, repeats)))
        return
    quick = "--quick" in argv
    # `python -m benchmarks` stores results/metrics.json; run alone, just print.
    print(json.dumps(run(quick), indent=2))


if __name__ == "__main__":
    _main(sys.argv[1:])
