"""Evaluation protocols side by side: images/s and peak memory of ``segcore.evaluate`` under the
``reference`` protocol (native size, fp32; what reproduces the published scores) and under ``resize``
(long side 513) in fp32 and in the fast default precision, on full-size images (500x375, 375x500,
333x500, 640x480; VOC layout, DeepLab-v2 ResNet-101 with random weights, multi-scale).

Each setting runs in its own process so its peak RSS (and on CUDA, peak allocated GPU memory) is its own.
``--quick`` uses the tiny test model and small images.
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
import sys
import tempfile
import time
from pathlib import Path

from .memory import current_rss_mb, peak_rss_mb, reset_peak

ROOT = Path(__file__).resolve().parent.parent
FULL_SIZES = ((375, 500), (500, 375), (500, 333), (480, 640))
QUICK_SIZES = ((75, 100), (100, 75))
SETTINGS = (("reference", "fp32"), ("resize", "fp32"), ("resize", "auto"))


def _child(ckpt: str, data: str, protocol: str, precision: str, repeats: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch

    import segcore

    seg = segcore.Segmenter.from_pretrained(ckpt, precision=precision)
    dataset = segcore.open_dataset(data, "voc")
    segcore.evaluate(seg, dataset, protocol=protocol, progress=False, worst=0, distributed=False,
                     max_images=1)  # warm-up (and the fast path's one-off build)
    peak_reset = reset_peak()
    base = current_rss_mb() if peak_reset else peak_rss_mb()
    if seg.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(seg.device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = segcore.evaluate(seg, dataset, protocol=protocol, progress=False, worst=0, distributed=False)
        if seg.device.type == "cuda":
            torch.cuda.synchronize(seg.device)
        times.append(time.perf_counter() - start)
    out = {"protocol": protocol, "precision": seg.precision, "device": str(seg.device),
           "images_per_s": round(len(dataset) / min(times), 3), "peak_rss_growth_mb": round(peak_rss_mb() - base, 1),
           "peak_rss_mb": round(peak_rss_mb(), 1), "peak_reset": peak_reset,
           "mean_iou": result.scores["mean_iou"]}
    if seg.device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(seg.device) / 2**20, 1)
    return out


def write_checkpoint(path: Path, quick: bool, seed: int = 0) -> str:
    """A 21-class checkpoint with seeded random weights: the tiny test model, or the full ResNet-101."""
    import torch

    from .workloads import resnet101, tiny_checkpoint

    if quick:
        tiny_checkpoint(path, n_classes=21, seed=seed)
    else:
        torch.save(resnet101(21, seed=seed).state_dict(), path)
    return str(path)


def run(quick: bool) -> dict:
    from .workloads import make_voc

    sizes = QUICK_SIZES if quick else FULL_SIZES
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        tmp = Path(tmp)
        make_voc(tmp / "voc", sizes)
        ckpt = write_checkpoint(tmp / "model.pth", quick)
        ctx = mp.get_context("spawn")
        rows = []
        for protocol, precision in SETTINGS:
            with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                rows.append(pool.submit(_child, str(ckpt), str(tmp / "voc"), protocol, precision,
                                        1 if quick else 2).result())
    by_key = {f"{r['protocol']}_{r['precision']}": r for r in rows}
    reference = rows[0]
    return {"images": [f"{w}x{h}" for h, w in sizes], "model": "tiny" if quick else "resnet101",
            "settings": by_key,
            "reference_vs_resize_fp32_time_ratio": round(by_key["resize_fp32"]["images_per_s"]
                                                         / reference["images_per_s"], 2),
            "note": "images/s over the whole set (best of the repeats); peak RSS growth above the warmed-up "
                    "process; side by side in one run"}
