"""Image latency at 513x513: the default (``precision="auto"``) path vs plain fp32 eager PyTorch.

Both run the same random-weight DeepLab-v2 ResNet-101 (no trained checkpoint is available here; random
weights are *more* rounding-sensitive than trained ones, so the agreement is a pessimistic figure)
through ``Segmenter.predict`` end to end (resize, model, upsampling, argmax), single-scale and with the
default multi-scale inputs (1.0, 0.5, 0.75). A third path, ``fp32-fused`` (what ``auto`` picks on CPUs
without bf16), and ``int8`` (calibrated on the photos shipped in ``segcore/calibration``; its agreement on
a trained model is in ``bench_peers``) are measured alongside. The paths alternate rep by rep on the same images, and the figures
are medians after a warm-up, so load from other processes hits them alike. Agreement is the share of
pixels whose label equals the fp32 path's. On a CUDA machine the GPU fp32 vs bf16 batch-8
throughput is measured too; elsewhere it is reported as not measured.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from benchmarks.workloads import resnet101, scene_image, voc_segmenter

SIZE = 513


def _segmenters(model, scales, size, device="cpu"):
    """plain fp32 eager, the default (``auto``) path, ``fp32-fused`` (what ``auto`` gives without bf16) and
    ``int8`` (calibrated on the shipped photos)."""
    return tuple(voc_segmenter(model, precision, scales=scales, test_size=size, device=device)
                 for precision in ("fp32", "auto", "fp32-fused", "int8"))


def _compare(plain, others: dict, images, reps):
    names = ["fp32_eager", *others]
    paths = {"fp32_eager": plain, **others}
    times = {name: [] for name in names}
    agree = {name: [] for name in others}
    for seg in paths.values():  # warm-up: builds the fast copies, primes oneDNN
        seg.predict(images[0])
    for r in range(reps):
        img = images[r % len(images)]
        labels = {}
        for name in names:
            t = time.perf_counter()
            labels[name] = paths[name].predict(img).label_map
            times[name].append(time.perf_counter() - t)
        for name in others:
            agree[name].append(float((labels[name] == labels["fp32_eager"]).mean()))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {f"{name}_s": round(med[name], 3) for name in names}
    for name in others:
        prefix = "" if name == "default" else f"{name}_"
        out[f"{prefix}speedup"] = round(med["fp32_eager"] / med[name], 2)
        # each rep runs the paths back to back; the median of those pairwise ratios is the figure least
        # moved by load from other processes
        out[f"{prefix}speedup_median_of_pairs"] = round(statistics.median(
            a / b for a, b in zip(times["fp32_eager"], times[name])), 2)
        out[f"{prefix}agreement_min"] = round(min(agree[name]), 4)
        out[f"{prefix}agreement_mean"] = round(float(np.mean(agree[name])), 4)
    out["reps"] = reps
    out["all_s"] = {k: [round(x, 3) for x in v] for k, v in times.items()}
    return out


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
    model = resnet101()
    images = [scene_image(size, size, seed) for seed in range(3)]
    result = {"image": f"{size}x{size}", "weights": "random (seeded) ResNet-101, 21 classes",
              "threads": torch.get_num_threads(), "physical_cores": physical_cores(),
              "cpu_bf16": cpu_bf16_supported(),
              "cpu_flags": sorted(f for f in cpu_flags() if f in ("avx512_bf16", "amx_bf16", "avx512_vnni",
                                                                  "amx_int8", "avx512f")),
              "note": "ratios are side by side in one run (interleaved, medians after warm-up)"}
    plain0, default0, fused0, int80 = _segmenters(model, (), size)
    for label, scales in (("single_scale", ()), ("multi_scale", (0.5, 0.75))):
        # with_options shares the model and each path's fast copy between the two settings
        plain, default = plain0.with_options(scales=scales), default0.with_options(scales=scales)
        result["default_precision"] = default.precision
        result[label] = _compare(plain, {"default": default, "fp32_fused": fused0.with_options(scales=scales),
                                         "int8": int80.with_options(scales=scales)}, images, reps)
        result[label]["int8_vs_default"] = round(result[label]["default_s"] / result[label]["int8_s"], 2)
    result["threads_after"] = torch.get_num_threads()
    result["gpu"] = _gpu(model, quick)
    return result
