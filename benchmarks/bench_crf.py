"""Dense CRF (pydensecrf, the reference's 10 mean-field iterations): the full CRF against the class-restricted
one ``DenseCRF`` runs by default (``segcore/crf.py``), 21 and 182 classes at 513x513, per input kind:

* ``trained``: the trained stand-in (:mod:`benchmarks.standin`): the full-size ResNet-101 DeepLab-v2
  trained on the generated shapes data with its classifier at 21 or 182 classes (4 are used; training
  pushes the others down, as a real model's absent classes are), cached outside the repository. Images:
  mosaics of the generated scenes at the size it trained at, single-scale fp32 softmax.
* ``synthetic``: smooth random logits where 4 classes compete and 8 more are faint (a peaked model's shape).
* ``random_weights``: a tiny random-weight DeepLab-v2: a flatter softmax, many classes carry some mass.

Full and restricted alternate rep by rep on the first image (medians); every image adds one full and one
restricted run to the argmax agreement. ``--quick``: 97x129, no trained stand-in, one rep.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.standin import mosaic, trained_resnet101

ROOT = Path(__file__).resolve().parent.parent


def model_probs(segmenter, image: np.ndarray) -> np.ndarray:
    return segmenter.predict(image, return_probs=True).probabilities


def synthetic_probs(n_classes: int, h: int, w: int, seed: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    coarse = torch.full((1, n_classes, h // 8 + 1, w // 8 + 1), -14.0)
    coarse[0, :4] = torch.randn(4, h // 8 + 1, w // 8 + 1, generator=g) * 3
    coarse[0, 4:12] = -8 + torch.randn(8, h // 8 + 1, w // 8 + 1, generator=g)
    up = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    return F.softmax(up, 0).contiguous().numpy()


def inputs(kind: str, n_classes: int, h: int, w: int, n_images: int):
    """(image, probabilities) pairs for one input kind."""
    from factories import scene_image, tiny_model

    from segcore import Segmenter

    palette = np.zeros((n_classes, 3), np.uint8)
    if kind == "synthetic":
        return [(scene_image(h, w, seed=i), synthetic_probs(n_classes, h, w, seed=n_classes + i))
                for i in range(n_images)]
    if kind == "trained":
        seg = Segmenter.from_pretrained(str(trained_resnet101(n_classes)), scales=(), test_size=max(h, w),
                                        device="cpu", precision="fp32")
        images = [mosaic(h, w, seed=100 + i) for i in range(n_images)]
    else:
        seg = Segmenter(tiny_model(n_classes, seed=n_classes, scales=()), [str(c) for c in range(n_classes)],
                        palette, scales=(), test_size=max(h, w), device="cpu", precision="fp32")
        images = [scene_image(h, w, seed=i) for i in range(n_images)]
    return [(image, model_probs(seg, image)) for image in images]


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def compare(pairs, reps: int) -> dict:
    """Full vs restricted CRF: interleaved reps on the first pair, argmax agreement over all pairs."""
    from segcore.crf import DenseCRF

    full, restricted = DenseCRF(restrict=False), DenseCRF()
    full_times, restricted_times, agreement, runs = [], [], [], []
    for index, (image, probs) in enumerate(pairs):
        for _ in range(reps if index == 0 else 1):
            reference, full_s = timed(full, image, probs)
            run, restricted_s = timed(restricted.refine, image, probs)
            if index == 0:
                full_times.append(full_s)
                restricted_times.append(restricted_s)
        agreement.append(float((run.probs.argmax(0) == reference.argmax(0)).mean()))
        runs.append(run)
    full_s, restricted_s = statistics.median(full_times), statistics.median(restricted_times)
    return {"full_s": round(full_s, 3), "restricted_s": round(restricted_s, 3),
            "speedup": round(full_s / restricted_s, 2),
            "agreement_min": min(agreement), "agreement_mean": round(statistics.fmean(agreement), 6),
            "images": len(pairs), "reps": reps,
            "paths": [f"{r.path}: {r.reason}" for r in runs],
            "kept_classes": [len(r.kept) for r in runs],
            "dropped_bound_max": max(r.dropped_bound for r in runs),
            "normaliser_error_max": max(r.normaliser_error for r in runs)}


def run(quick: bool) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    h, w = (97, 129) if quick else (513, 513)
    kinds = {"synthetic": 1, "random_weights": 1} if quick else {"trained": 3, "synthetic": 1,
                                                                  "random_weights": 1}
    result = {"image": f"{w}x{h}", "iterations": 10,
              "note": "full vs class-restricted CRF side by side in one run (interleaved reps, medians); "
                      "trained = ResNet-101 DeepLab-v2 trained on generated shapes, synthetic = smooth "
                      "random logits, random_weights = tiny random-weight model"}
    for n_classes in (21, 182):
        for kind, n_images in kinds.items():
            reps = 1 if quick or kind == "random_weights" else 3
            print(f"   {n_classes} classes, {kind}", flush=True)
            result[f"classes_{n_classes}_{kind}"] = compare(inputs(kind, n_classes, h, w, n_images), reps)
    return result
