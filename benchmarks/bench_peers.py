"""Peers side by side (issue 19): the same weights and 513x513 input through plain fp32 PyTorch, our default
path, our int8 path, ONNX Runtime fp32 and OpenVINO bf16 / int8 (NNCF post-training quantisation).

Two sets of weights: the **trained stand-in** (full-size ResNet-101 DeepLab-v2 trained briefly on generated
shapes, :mod:`benchmarks.standin`; its logits are peaked as a trained model's are) and **random** weights
(flat logits that flip under any rounding: a pessimistic bound). Single scale, batch 1, model time only
(the preprocessed tensor in, logits out); every path gets the same tensors. Agreement is the share of pixels
whose label, after upsampling the logits to the image, equals plain fp32's. The int8 paths (ours and
NNCF's) are calibrated on the same images: for the stand-in, other generated mosaics (pictures of the kind it
segments); for random weights, the photos shipped in ``segcore/calibration``. Our int8 path on the stand-in is
also measured with the shipped photos (what ``precision="int8"`` does with no option).

The paths alternate within each rep; figures are medians. ONNX Runtime and OpenVINO are optional
(``pip install -r requirements-bench.txt``); a peer that is not installed is reported as such.
"""

from __future__ import annotations

import io
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from annotations import voc_colormap
from benchmarks.standin import mosaic, trained_resnet101
from benchmarks.workloads import resnet101, scene_image
from segcore import Segmenter
from segcore.checkpoint import load_model
from segcore.quantize import calibration_images

SIZE = 513


def _upsampled_labels(logits: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(logits.float(), size=(size, size), mode="bilinear", align_corners=False).argmax(1)


def _segmenter(model, precision, size, calibration=None):
    names = [f"class{i}" for i in range(model.base.aspp.n_classes)]
    return Segmenter(model, names, voc_colormap(len(names)), scales=(), test_size=size, device="cpu",
                     precision=precision, calibration=calibration)


def _onnxruntime(base, example):
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "not installed"
    buf = io.BytesIO()
    try:
        torch.onnx.export(base, (example,), buf, dynamo=False, input_names=["x"], output_names=["y"],
                          opset_version=17)
    except Exception as exc:  # noqa: BLE001 - e.g. the onnx package missing: report, do not fail the suite
        return None, f"export failed: {type(exc).__name__}: {str(exc)[:120]}"
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])
    return (lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])), ort.__version__


def _openvino(base, example, calibration):
    try:
        import nncf
        import openvino as ov
    except ImportError:
        return {}, "not installed"
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"}
    fp32 = ov.convert_model(base, example_input=example)
    int8 = nncf.quantize(fp32, nncf.Dataset(calibration), preset=nncf.QuantizationPreset.PERFORMANCE,
                         subset_size=len(calibration))
    paths = {"openvino_bf16": core.compile_model(fp32, "CPU", {**config, "INFERENCE_PRECISION_HINT": "bf16"}),
             "openvino_int8": core.compile_model(int8, "CPU", config)}
    return ({name: (lambda x, c=compiled: torch.from_numpy(c(x.numpy())[0])) for name, compiled in paths.items()},
            f"openvino {ov.__version__}, nncf {nncf.__version__}")


def _measure(paths: dict, inputs: list, reps: int, size: int) -> dict:
    times = {name: [] for name in paths}
    agree = {name: [] for name in paths}
    with torch.inference_mode():
        for fn in paths.values():  # warm-up
            fn(inputs[0])
        for r in range(reps):
            x = inputs[r % len(inputs)]
            labels = {}
            for name, fn in paths.items():
                t = time.perf_counter()
                out = fn(x)
                times[name].append(time.perf_counter() - t)
                labels[name] = _upsampled_labels(out, size)
            for name in paths:
                agree[name].append(float((labels[name] == labels["fp32_eager"]).float().mean()))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {name: {"s": round(med[name], 3), "vs_fp32_eager": round(med["fp32_eager"] / med[name], 2),
                   "vs_ours_default": round(med["ours_default"] / med[name], 2),
                   "agreement_min": round(min(agree[name]), 4),
                   "agreement_mean": round(float(np.mean(agree[name])), 4)} for name in paths}


def _weights(kind: str, size: int):
    """(model, test images, calibration images) for one set of weights."""
    if kind == "trained":
        model = load_model(trained_resnet101(21), scales=())
        return model, [mosaic(size, size, seed=200 + i) for i in range(3)], \
            [mosaic(size, size, seed=300 + i) for i in range(4)]
    return resnet101(), [scene_image(size, size, seed) for seed in range(3)], calibration_images()


def run(quick: bool) -> dict:
    """``quick``: random weights at 97 px, one rep (CI); the full run adds the trained stand-in at 513."""
    size, reps, kinds = (97, 1, ("random",)) if quick else (SIZE, 5, ("trained", "random"))
    result = {"image": f"{size}x{size}, single scale, batch 1, model time only", "threads": torch.get_num_threads(),
              "note": "agreement = share of pixels equal to plain fp32's labels after upsampling"}
    for kind in kinds:
        model, images, calibration = _weights(kind, size)
        default = _segmenter(model, "auto", size)
        ours_int8 = _segmenter(model, "int8", size, calibration)
        inputs = [default.to_tensor([default.preprocess(image)[1]]) for image in images]
        paths = {"fp32_eager": lambda x, m=model: m.base(x), "ours_default": default.logits,
                 "ours_int8": ours_int8.logits}
        if kind == "trained":
            paths["ours_int8_shipped_calibration"] = _segmenter(model, "int8", size).logits
        runtime, ort_version = _onnxruntime(model.base, inputs[0])
        if runtime is not None:
            paths["onnxruntime_fp32"] = runtime
        openvino, ov_version = _openvino(model.base, inputs[0], ours_int8.calibration_batches())
        paths.update(openvino)
        entry = _measure(paths, inputs, reps, size)
        entry["default_precision"] = default.precision
        entry["versions"] = {"onnxruntime": ort_version, "openvino": ov_version, "torch": torch.__version__}
        result[kind] = entry
    if "trained" in result:
        trained = result["trained"]["ours_int8"]
        result["targets"] = {
            "int8_vs_fp32_eager (>= 4)": trained["vs_fp32_eager"],
            "int8_vs_ours_default (>= 1.9)": trained["vs_ours_default"],
            "int8_agreement_trained (>= 0.99)": trained["agreement_min"],
            "int8_agreement_random (reported)": result["random"]["ours_int8"]["agreement_min"],
        }
    return result
