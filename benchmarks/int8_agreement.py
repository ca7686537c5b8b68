"""Would int8 keep the model's answers? ``python -m benchmarks.int8_agreement [--size 513]``.

Issue 8 allows int8 (PT2E, x86 backend) where it pays off and keeps >= 99% of pixels equal to fp32. Before
building it, this script simulates the *most favourable* int8 recipe in fp32 arithmetic: per-channel
symmetric int8 weights, per-tensor activations (uint8 after a ReLU, int8 otherwise) calibrated by their
maximum on three calibration images, and everything else (residual sums, optionally the ASPP) left in
fp32. A real int8 path rounds at least this much, so its agreement can only be lower than the figure
printed here. It is not part of ``python -m benchmarks`` because it measures a decision, not a speed.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn as nn

from benchmarks.workloads import resnet101, scene_image, voc_segmenter
from segcore.fast import FastPath, cpu_bf16_supported, fold_batchnorm


def _fake_quantize_input(stats: dict):
    def hook(conv, args):
        x = args[0]
        top = stats[conv]
        if x.min() >= 0:
            return (torch.fake_quantize_per_tensor_affine(x, top / 255, 0, 0, 255),)
        return (torch.fake_quantize_per_tensor_affine(x, top / 127, 0, -128, 127),)
    return hook


def _agreement(labels, reference) -> dict:
    """Share of pixels equal to the fp32 labels: the worst image and the mean."""
    agree = [float((got == ref).float().mean()) for got, ref in zip(labels, reference)]
    return {"agreement_min": round(min(agree), 4), "agreement_mean": round(sum(agree) / len(agree), 4)}


def simulated_int8(base: nn.Module, calibration, quantize_aspp: bool) -> nn.Module:
    """A BN-folded copy of ``base`` whose convolutions see int8-rounded weights and inputs."""
    model = fold_batchnorm(base)
    skip = set() if quantize_aspp else {id(m) for m in model.aspp.children()}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and id(m) not in skip]
    stats: dict[nn.Module, float] = {}

    def observe(conv, args):
        stats[conv] = max(stats.get(conv, 0.0), args[0].abs().max().item())

    with torch.inference_mode():
        hooks = [c.register_forward_pre_hook(observe) for c in convs]
        for x in calibration:
            model(x)
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for conv in convs:
            scale = conv.weight.abs().amax(dim=(1, 2, 3)).clamp_min(1e-12) / 127
            zero = torch.zeros_like(scale, dtype=torch.int32)
            conv.weight.copy_(torch.fake_quantize_per_channel_affine(conv.weight, scale, zero, 0, -128, 127))
            conv.register_forward_pre_hook(_fake_quantize_input(stats))
    return model


def run(size: int) -> dict:
    model = resnet101()
    plain = voc_segmenter(model, "fp32", scales=(), test_size=size, device="cpu")

    def tensor(seed):
        return plain.to_tensor([plain.preprocess(scene_image(size, size, seed))[1]])

    calibration = [tensor(seed) for seed in (10, 11, 12)]
    images = [tensor(seed) for seed in (0, 1, 2)]  # the inference benchmark's images
    result = {"image": f"{size}x{size}", "weights": "random (seeded) ResNet-101, 21 classes",
              "compared": "argmax of the logits at output stride 8, vs the fp32 model"}
    with torch.inference_mode():
        reference = [model.base(x).argmax(1) for x in images]
        for quantize_aspp in (False, True):
            int8 = simulated_int8(model.base, calibration, quantize_aspp)
            key = "aspp_int8" if quantize_aspp else "aspp_fp32"
            result[key] = _agreement([int8(x).argmax(1) for x in images], reference)
        if cpu_bf16_supported():  # the shipped bf16 path on the same footing, for comparison
            fast = FastPath(model.base, torch.device("cpu"), "bf16")
            result["bf16_fast_path"] = _agreement([fast(x, ()).argmax(1) for x in images], reference)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8_agreement", description=__doc__)
    parser.add_argument("--size", type=int, default=513)
    print(json.dumps(run(parser.parse_args(argv).size), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
