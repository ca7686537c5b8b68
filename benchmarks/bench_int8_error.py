"""Where the int8 path loses pixels (issue 19): each of its roundings alone, simulated in fp32.

The int8 model (:mod:`segcore.quantize`) rounds the weights (int8 per output channel) and five kinds of
activation (uint8 per tensor): each block's input (the residual stream), the two ReLU outputs inside each
Bottleneck, the projection shortcuts and the ASPP's input. Here the BN-folded fp32 model runs with one kind
of rounding at a time (values snapped to the very grids the int8 path uses, from the same calibration), so
the share of fp32's pixels each one keeps says where the loss is. "all" rounds everything as the int8 kernels
do and should agree with the real int8 path, which is measured beside it, as is bf16 (the default path).
"float residual add" rounds every conv input but adds the shortcut in float: what a bf16 residual stream
(a quantise pass per block) would buy.

Every row is also run after **channel equalisation** (:func:`equalize`, SmoothQuant's and DFQ's idea: each
channel divided by its own range, the readers' weights multiplied back, so one grid per tensor fits every
channel), with the stand-in's own calibration mosaics and with the shipped photos: a technique measured
here and not adopted in :mod:`segcore.quantize`, for the reasons in docs/performance.md#int8.

Full run: the trained stand-in (:mod:`benchmarks.standin`) at 513x513 on three mosaics, calibrated on four
others. ``--quick``: a tiny random-weight model at 97x97.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.bench_peers import SIZE, _segmenter, _upsampled_labels
from benchmarks.standin import mosaic, trained_resnet101
from benchmarks.workloads import scene_image, tiny_model
from segcore.checkpoint import load_model
from segcore.fast import fold_batchnorm
from segcore.model import ASPP, DEFAULT_SCALES, ConvBnReLU
from segcore.quantize import (blocks_of, calibrate, calibration_images, quantize_weight, tensor_ranges,
                              uint8_params)

KINDS = {  # row name -> which of the int8 path's roundings it applies
    "weights": {"weights"},
    "block inputs (residual stream)": {"in"},
    "reduce outputs": {"reduce"},
    "conv3x3 outputs": {"conv3x3"},
    "projection shortcuts": {"shortcut"},
    "ASPP input": {"aspp"},
    "all activations": {"in", "reduce", "conv3x3", "shortcut", "aspp"},
    "all (the int8 path, simulated)": {"weights", "in", "reduce", "conv3x3", "shortcut", "aspp"},
    "all, float residual add": {"weights", "in", "reduce", "conv3x3", "shortcut", "aspp", "float residual"},
}


def _stages(folded: nn.Module) -> list[list[int]]:
    """Indices (into ``blocks_of``' list) of each ResNet stage's blocks."""
    layers = [m for name, m in folded.named_children() if name != "aspp"][1:]
    stages, start = [], 0
    for layer in layers:
        n = len(list(layer.children()))
        stages.append(list(range(start, start + n)))
        start += n
    return stages


def _channel_scales(ranges: torch.Tensor) -> torch.Tensor:
    """Per-channel divisors that give every live channel the same range (geometric mean 1).

    SmoothQuant's rule with migration strength 1 (weaker strengths, 0.5 to 0.9, kept fewer of the trained
    stand-in's pixels).
    """
    s = torch.ones_like(ranges)
    alive = ranges > 0
    if alive.any():
        s[alive] = ranges[alive] / ranges[alive].log().mean().exp()
    return s.clamp_(1e-4, 1e4)


def _rescale(channels: dict, key: str, s: torch.Tensor) -> None:
    lo, hi = channels[key]
    channels[key] = (lo / s, hi / s)


def _divide_outputs(conv: nn.Conv2d, s: torch.Tensor) -> None:
    conv.weight.data.div_(s.view(-1, 1, 1, 1))
    conv.bias.data.div_(s)


def _multiply_inputs(conv: nn.Conv2d, s: torch.Tensor) -> None:
    conv.weight.data.mul_(s.view(1, -1, 1, 1))


@torch.no_grad()
def equalize(folded: nn.Module, channels: dict) -> dict:
    """Rescale channels of the folded model so each per-tensor uint8 grid spends its levels evenly.

    Measured here, not adopted in :mod:`segcore.quantize` (docs/performance.md#int8). Exact in real
    arithmetic (ReLU commutes with positive scaling), applied in place to the private folded copy, and
    returns ``channels`` as they are after the rescaling (no second calibration pass). Inside each
    Bottleneck the two ReLU outputs are rescaled; the residual stream is rescaled per stage (one divisor
    per channel for every block's output in the stage). The stem's output and a v3 head's input keep their
    scale, so the stem and the head need no change.
    """
    _, blocks = blocks_of(folded)
    channels = dict(channels)
    for i, block in enumerate(blocks):
        for key, writer, reader in ((f"{i}.reduce", block.reduce.conv, block.conv3x3.conv),
                                    (f"{i}.conv3x3", block.conv3x3.conv, block.increase.conv)):
            s = _channel_scales(channels[key][1])
            _divide_outputs(writer, s)
            _multiply_inputs(reader, s)
            _rescale(channels, key, s)
    stages = _stages(folded)
    for n, stage in enumerate(stages):
        if n + 1 < len(stages):
            following = blocks[stages[n + 1][0]]
            readers = [following.reduce.conv, following.shortcut.conv]
        elif isinstance(folded.aspp, ASPP):
            readers = list(folded.aspp.children())
        else:
            break  # a v3 head reads the last stage's features in fp32: leave them as they are
        readers += [blocks[i].reduce.conv for i in stage[1:]]
        keys = [f"{i + 1}.in" for i in stage] + [f"{stage[0]}.shortcut"]
        ranges = torch.stack([torch.maximum(channels[k][1], -channels[k][0]) for k in keys]).amax(0)
        s = _channel_scales(ranges)
        _divide_outputs(blocks[stage[0]].shortcut.conv, s)
        for i in stage:
            _divide_outputs(blocks[i].increase.conv, s)
        for reader in readers:
            _multiply_inputs(reader, s)
        for key in keys:
            _rescale(channels, key, s)
    return channels


def _snap(x: torch.Tensor, grid) -> torch.Tensor:
    scale, zero = grid
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def _int8_weights(folded):
    """A copy whose ResNet and ASPP weights are rounded as the int8 path rounds them (the stem stays)."""
    out = copy.deepcopy(folded)
    stem = blocks_of(out)[0].conv1.conv
    for m in out.modules():
        if isinstance(m, torch.nn.Conv2d) and m is not stem:
            q, scale = quantize_weight(m.weight)
            m.weight.data = q.float() * scale.view(-1, 1, 1, 1)
    return out


def _simulated(folded, grids, kinds: set, x: torch.Tensor) -> torch.Tensor:
    """The folded model in fp32, laid out as the int8 path runs it, rounding the ``kinds`` named."""
    stem, blocks = blocks_of(folded)
    snap = lambda kind, key, t: _snap(t, grids[key]) if kind in kinds else t  # noqa: E731
    h = stem(x)
    for i, b in enumerate(blocks):
        conv_in = snap("in", f"{i}.in", h)
        residual = h if "float residual" in kinds else conv_in
        c = snap("conv3x3", f"{i}.conv3x3", b.conv3x3(snap("reduce", f"{i}.reduce", b.reduce(conv_in))))
        if isinstance(b.shortcut, ConvBnReLU):
            residual = snap("shortcut", f"{i}.shortcut", b.shortcut(conv_in))
        h = F.relu(b.increase(c) + residual)
    return folded.aspp(snap("aspp", f"{len(blocks)}.in", h))


def _agreement(outputs, references, size) -> float:
    kept = [float((_upsampled_labels(o, size) == _upsampled_labels(r, size)).float().mean())
            for o, r in zip(outputs, references)]
    return round(float(np.mean(kept)), 4)


@torch.inference_mode()
def run(quick: bool) -> dict:
    if quick:
        size, model = 97, tiny_model(21, seed=1, scales=())
        images = [scene_image(size, size, seed) for seed in range(2)]
        calibration = [scene_image(size, size, seed) for seed in range(10, 12)]
    else:
        size, model = SIZE, load_model(trained_resnet101(21), scales=())
        images = [mosaic(size, size, seed=200 + i) for i in range(3)]
        calibration = [mosaic(size, size, seed=300 + i) for i in range(4)]
    default = _segmenter(model, "auto", size)
    to_input = lambda image: default.to_tensor([default.preprocess(image)[1]])  # noqa: E731
    inputs = [to_input(im) for im in images]
    references = [model.base(x) for x in inputs]
    calibrations = {"own calibration": calibration, "shipped photos": calibration_images()}
    real = {"bf16 (default)": _agreement([default.logits(x) for x in inputs], references, size)}
    for name, images in calibrations.items():
        int8 = _segmenter(model, "int8", size, images)
        real[f"int8, {name}"] = _agreement([int8.logits(x) for x in inputs], references, size)
    result = {"weights": "trained stand-in" if not quick else "tiny random", "image": f"{size}x{size}",
              "note": "share of fp32's pixels kept (labels after upsampling), mean over the test images",
              "real paths": real}
    # the int8 path calibrates at the default scales and the Segmenter's (single scale here)
    scales = tuple(sorted(set(DEFAULT_SCALES) | {1.0}))
    for name, images in calibrations.items():
        batches = [to_input(im) for im in images]
        kinds = KINDS if name == "own calibration" else {k: KINDS[k] for k in KINDS if k.startswith("all (")}
        result[name] = {}
        for equalised in (False, True):
            folded = fold_batchnorm(model.base)
            channels = calibrate(folded, batches, scales)
            if equalised:
                channels = equalize(folded, channels)
            grids = {k: uint8_params(*v) for k, v in tensor_ranges(channels).items()}
            rounded = _int8_weights(folded)
            result[name]["equalised" if equalised else "not equalised"] = {
                row: _agreement([_simulated(rounded if "weights" in kind else folded, grids, kind, x)
                                 for x in inputs], references, size)
                for row, kind in kinds.items()}
    return result
