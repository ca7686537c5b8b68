"""Dense CRF (pydensecrf, the reference's 10 mean-field iterations) time per image, 21 and 182 classes.

The input is a 513x385 scene_image (a 4:3 photo at the default test size) with softmax probabilities
from smoothed random scores; medians after a warm-up.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def run(quick: bool) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    import torch.nn.functional as F
    from factories import scene_image

    from segcore.crf import DenseCRF

    h, w = (97, 129) if quick else (385, 513)
    reps = 1 if quick else 3
    image = scene_image(h, w, seed=0)
    crf = DenseCRF()
    result = {"image": f"{w}x{h}", "iterations": crf.iter_max,
              "note": "side by side in one run, medians after warm-up"}
    for n in (21, 182):
        g = torch.Generator().manual_seed(n)
        coarse = torch.randn(1, n, h // 8 + 1, w // 8 + 1, generator=g) * 3
        probs = F.softmax(F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0], 0).numpy()
        crf(image, probs)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            crf(image, probs)
            ts.append(time.perf_counter() - t)
        result[f"classes_{n}_s"] = round(statistics.median(ts), 3)
    return result
