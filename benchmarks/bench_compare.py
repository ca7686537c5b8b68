"""``compare`` with two models against two ``evaluate`` runs on the same set: time, peak memory and
how many times images are read (compare reads each once; the disagreement strips re-read a few).

VOC layout of full-size images (500x375, 375x500, 333x500, 640x480), two DeepLab-v2 ResNet-101s with
random weights, resize protocol in the default precision; each setting in its own process.
``--quick``: tiny models, small images.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .bench_evaluate import FULL_SIZES, QUICK_SIZES, ROOT, write_checkpoint
from .memory import current_rss_mb, peak_rss_mb, reset_peak


def _child(ckpts: list[str], data: str, mode: str, out: str) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import segcore
    from segcore.comparison import compare

    segs = [segcore.Segmenter.from_pretrained(c) for c in ckpts]
    dataset = segcore.open_dataset(data, "voc")
    reads = {"n": 0}
    load = dataset._load

    def counting_load(item):
        reads["n"] += 1
        return load(item)

    segcore.evaluate(segs[0], dataset, progress=False, worst=0, distributed=False, max_images=1)  # warm-up
    dataset._load = counting_load
    peak_reset = reset_peak()
    base = current_rss_mb() if peak_reset else peak_rss_mb()
    start = time.perf_counter()
    if mode == "compare":
        compare(segs, dataset, out_dir=out, progress=False, distributed=False)
    else:
        for k, seg in enumerate(segs):
            segcore.evaluate(seg, dataset, out_dir=f"{out}/{k}", progress=False, distributed=False)
    seconds = time.perf_counter() - start
    return {"mode": mode, "seconds": round(seconds, 2), "image_reads": reads["n"],
            "peak_rss_growth_mb": round(peak_rss_mb() - base, 1), "peak_reset": peak_reset}


def run(quick: bool) -> dict:
    from .workloads import make_voc

    sizes = QUICK_SIZES if quick else FULL_SIZES
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        tmp = Path(tmp)
        make_voc(tmp / "voc", sizes)
        ckpts = [write_checkpoint(tmp / f"model{seed}.pth", quick, seed) for seed in (0, 1)]
        ctx = mp.get_context("spawn")
        rows = {}
        for mode in ("compare", "two_evaluates"):
            with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                rows[mode] = pool.submit(_child, ckpts, str(tmp / "voc"), mode, str(tmp / mode)).result()
    return {"images": len(sizes), "model": "tiny" if quick else "resnet101", **rows,
            "time_ratio_compare_vs_two_evaluates": round(rows["compare"]["seconds"]
                                                         / rows["two_evaluates"]["seconds"], 2),
            "note": "side by side in one run; compare re-reads only the images of its disagreement strips"}
