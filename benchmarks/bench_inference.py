"""Image latency at 513x513: the default (``precision="auto"``) path vs plain fp32 eager PyTorch.

Both run the same random-weight DeepLab-v2 ResNet-101 (no trained checkpoint is available here; random
weights are *more* rounding-sensitive than trained ones, so the agreement is a pessimistic figure)
through ``Segmenter.predict`` end to end (resize, model, upsampling, argmax), single-scale and with the
default multi-scale inputs (1.0, 0.5, 0.75). The two paths alternate rep by rep on the same images, and
the figures are medians after a warm-up, so load from other processes hits both alike. Agreement is the
share of pixels whose label equals the fp32 path's. On a CUDA machine the GPU fp32 vs bf16 batch-8
throughput is measured too; elsewhere it is reported as not measured.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

SIZE = 513


def _image(h, w, seed):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from factories import scene_image

    return scene_image(h, w, seed)


def _model(n_classes=21, seed=0):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from factories import randomize_

    from segcore import build_model

    return randomize_(build_model(n_classes), seed).eval()


def _segmenters(model, scales, size, device="cpu"):
    import annotations

    from segcore import Segmenter

    voc = annotations.get_label_space("voc")
    plain = Segmenter(model, voc.class_names, voc.palette, scales=scales, test_size=size, device=device,
                      precision="fp32")
    default = Segmenter(model, voc.class_names, voc.palette, scales=scales, test_size=size, device=device)
    return plain, default


def _compare(plain, default, images, reps):
    times = {"fp32_eager": [], "default": []}
    agree = []
    default.predict(images[0])  # warm-up: builds the fast copy, primes oneDNN
    plain.predict(images[0])
    for r in range(reps):
        img = images[r % len(images)]
        t = time.perf_counter()
        a = plain.predict(img).label_map
        times["fp32_eager"].append(time.perf_counter() - t)
        t = time.perf_counter()
        b = default.predict(img).label_map
        times["default"].append(time.perf_counter() - t)
        agree.append(float((a == b).mean()))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"fp32_eager_s": round(med["fp32_eager"], 3), "default_s": round(med["default"], 3),
            "speedup": round(med["fp32_eager"] / med["default"], 2),
            # each rep runs the two paths back to back; the median of those pairwise ratios is the figure
            # least moved by load from other processes
            "speedup_median_of_pairs": round(statistics.median(
                a / b for a, b in zip(times["fp32_eager"], times["default"])), 2),
            "agreement_min": round(min(agree), 4), "agreement_mean": round(float(np.mean(agree)), 4),
            "reps": reps, "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()}}


def _gpu(model, quick):
    if not torch.cuda.is_available():
        return "not measured (no CUDA GPU on this machine)"
    from segcore.fast import FastPath

    size = 257 if quick else SIZE
    x = torch.randn(8, 3, size, size, device="cuda") * 60
    base = model.base.to("cuda")
    half = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    fast = FastPath(base, torch.device("cuda"), half)

    def fp32():
        with torch.inference_mode():
            return base(x)

    out = {}
    for name, fn in (("fp32", fp32), (half, lambda: fast(x, ()))):
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(3 if quick else 10):
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        out[f"{name}_batch8_s"] = round(statistics.median(ts), 4)
    out["speedup"] = round(out["fp32_batch8_s"] / out[f"{half}_batch8_s"], 2)
    out["device"] = torch.cuda.get_device_name(0)
    model.base.to("cpu")
    return out


def run(quick: bool) -> dict:
    from segcore.fast import cpu_bf16_supported, cpu_flags, physical_cores

    size = 97 if quick else SIZE
    reps = 1 if quick else 5
    model = _model()
    images = [_image(size, size, seed) for seed in range(3)]
    result = {"image": f"{size}x{size}", "weights": "random (seeded) ResNet-101, 21 classes",
              "threads": torch.get_num_threads(), "physical_cores": physical_cores(),
              "cpu_bf16": cpu_bf16_supported(),
              "cpu_flags": sorted(f for f in cpu_flags() if f in ("avx512_bf16", "amx_bf16", "avx512_vnni",
                                                                  "amx_int8", "avx512f")),
              "note": "ratios are side by side in one run (interleaved, medians after warm-up)"}
    plain0, default0 = _segmenters(model, (), size)
    for label, scales in (("single_scale", ()), ("multi_scale", (0.5, 0.75))):
        # with_options shares the model and the default path's fast copy between the two settings
        plain, default = plain0.with_options(scales=scales), default0.with_options(scales=scales)
        result["default_precision"] = default.precision
        result[label] = _compare(plain, default, images, reps)
    result["threads_after"] = torch.get_num_threads()
    result["gpu"] = _gpu(model, quick)
    return result
