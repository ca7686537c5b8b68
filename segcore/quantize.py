"""CPU int8 inference (issue 19): post-training static quantisation run as oneDNN int8 convolutions.

The ResNet and the ASPP run in int8 (VNNI / AMX):

* weights: per output channel, symmetric int8, from the BN-folded fp32 weights;
* activations: uint8, one scale per tensor (every conv input in the ResNet follows a ReLU), from the
  min/max over calibration images (by default the photos shipped in ``segcore/calibration``);
* each Bottleneck: three int8 convs writing uint8 directly (ReLU and requantisation fused in); the last
  adds the shortcut (uint8 on its own grid) and applies the ReLU in the same kernel; a projection shortcut
  is an int8 conv writing uint8 with a zero point;
* the ASPP: one int8 1x1 conv over its 36 taps, then shifted fp32 sums (:class:`_TapASPP`);
* the 7x7 stem stays bf16 (3 input channels: nothing to gain); a v3 head runs in fp32 on the
  dequantised features.

These are the kernels PyTorch's own x86 int8 path (PT2E quantisation lowered by Inductor) calls; calling
them directly needs neither ``torch.compile`` nor a C++ compiler at run time. Calibration is the only slow
step, so the quantised state (int8 weights and all scales) is cached per checkpoint and calibration set
under ``$SEGCORE_HOME/int8`` and the second start skips it. Measured figures: docs/performance.md#int8.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fast import FastPath, PackedConv, fused_conv_supported
from .model import ASPP, ConvBnReLU, msc_forward
from .weights import cache_dir

log = logging.getLogger(__name__)

CALIBRATION_DIR = Path(__file__).resolve().parent / "calibration"
FORMAT_VERSION = 2


def calibration_images() -> list[Path]:
    """The photos shipped for calibration (public-domain and CC0 pictures from scikit-image's sample data)."""
    return sorted(CALIBRATION_DIR.glob("*.jpg"))


# -- calibration ----------------------------------------------------------------------------------------


def blocks_of(folded: nn.Module):
    """(stem, every Bottleneck in order) of a DeepLab-v2 base."""
    layers = [m for name, m in folded.named_children() if name != "aspp"]
    return layers[0], [block for layer in layers[1:] for block in layer.children()]


class _Observer:
    """Each observed tensor's value range per channel over the calibration inputs.

    Plain min/max: on the trained stand-in and the smoke model, clipping the top 0.1% or 0.01% of values
    (percentile calibration) kept fewer pixels, never more (docs/performance.md). Kept per channel: the int8
    path needs only each tensor's range (:func:`tensor_ranges`), the channel equalisation measured in
    ``benchmarks/bench_int8_error.py`` needs the channels'.
    """

    def __init__(self):
        self.channels: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, key: str, x: torch.Tensor) -> torch.Tensor:
        lo, hi = x.detach().float().amin(dim=(0, 2, 3)), x.detach().float().amax(dim=(0, 2, 3))
        if key in self.channels:
            old_lo, old_hi = self.channels[key]
            lo, hi = torch.minimum(lo, old_lo), torch.maximum(hi, old_hi)
        self.channels[key] = (lo, hi)
        return x


def tensor_ranges(channels: dict) -> dict[str, tuple[float, float]]:
    """Per-tensor (min, max) from per-channel ranges: what one uint8 grid per tensor has to cover."""
    return {key: (min(0.0, float(lo.min())), max(1e-6, float(hi.max())))
            for key, (lo, hi) in channels.items()}


def _observed_forward(stem, blocks, aspp, observe: _Observer, x: torch.Tensor) -> torch.Tensor:
    """The folded model in fp32, step by step as the int8 model runs it, observing what it quantises."""
    h = observe("0.in", stem(x))
    for i, block in enumerate(blocks):
        r = observe(f"{i}.reduce", block.reduce(h))
        c = observe(f"{i}.conv3x3", block.conv3x3(r))
        shortcut = observe(f"{i}.shortcut", block.shortcut(h)) if isinstance(block.shortcut, ConvBnReLU) else h
        h = observe(f"{i + 1}.in", F.relu(block.increase(c) + shortcut))
    return aspp(h)


@torch.inference_mode()
def calibrate(folded: nn.Module, batches, scales) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel value ranges of every quantised tensor of the folded fp32 model over ``batches`` at MSC
    ``scales``."""
    stem, blocks = blocks_of(folded)
    observe = _Observer()

    class Observed(nn.Module):
        def forward(self, x):
            return _observed_forward(stem, blocks, folded.aspp, observe, x)

    for batch in batches:
        msc_forward(Observed(), batch, scales)
    return observe.channels


# -- the quantised model --------------------------------------------------------------------------------


def uint8_params(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero point) of the uint8 grid covering [lo, hi] (lo <= 0; zero point 0 after a ReLU)."""
    lo = min(lo, 0.0)
    scale = max(hi - lo, 1e-8) / 255
    return scale, int(round(-lo / scale))


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (int8 weight, fp32 scales)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=(1, 2, 3)).clamp_min(1e-12) / 127
    q = torch.round(w / scale.view(-1, 1, 1, 1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


@dataclass
class QuantizedConv:
    """One conv in int8: weights and their scales, the fp32 bias, geometry, input and output grids.

    ``output`` is the uint8 grid (scale, zero point) the conv writes, or None for float output.
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor
    stride: list
    padding: list
    dilation: list
    input: tuple[float, int]
    output: tuple[float, int] | None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, input_grid, output_grid):
        q, scale = quantize_weight(conv.weight)
        return cls(q, scale, conv.bias.detach().float().clone(), list(conv.stride), list(conv.padding),
                   list(conv.dilation), input_grid, output_grid)


class _Kernel:
    """A :class:`QuantizedConv` prepacked for oneDNN."""

    def __init__(self, q: QuantizedConv):
        self.q = q
        self.packed = torch.ops.onednn.qconv_prepack(q.weight, q.weight_scale, q.input[0], q.input[1], q.stride,
                                                     q.padding, q.dilation, 1, None)
        self.zero_points = torch.zeros(len(q.weight_scale), dtype=torch.int64)
        self.args = (q.weight_scale, self.zero_points)

    def __call__(self, qx: torch.Tensor, *, relu: bool) -> torch.Tensor:
        q = self.q
        out_scale, out_zp = q.output or (1.0, 0)
        return torch.ops.onednn.qconv2d_pointwise(
            qx, q.input[0], q.input[1], self.packed, *self.args, q.bias, q.stride, q.padding, q.dilation, 1,
            out_scale, out_zp, None if q.output else torch.float32, "relu" if relu else "none", [], "")

    def add_relu(self, qx: torch.Tensor, residual: torch.Tensor, residual_grid) -> torch.Tensor:
        """``relu(conv(x) + residual)`` in one kernel, both uint8."""
        q = self.q
        return torch.ops.onednn.qconv2d_pointwise.binary(
            qx, q.input[0], q.input[1], self.packed, *self.args, residual, q.bias, q.stride, q.padding,
            q.dilation, 1, q.output[0], q.output[1], None, residual_grid[0], residual_grid[1], "sum", 1.0,
            "relu", [], "")


class Int8ResNet:
    """The DeepLab-v2 ResNet and ASPP on uint8 activations and int8 weights (see the module docstring)."""

    def __init__(self, stem: nn.Module, quantized: dict):
        self.stem = PackedConv(stem.conv1.conv, torch.bfloat16, fused_conv_supported())
        self.pool = stem.pool
        self.input_grid = quantized["input"]
        self.blocks = [{k: _Kernel(q) if q is not None else None for k, q in b.items()}
                       for b in quantized["blocks"]]
        self.aspp = _TapASPP(quantized["aspp"]) if quantized["aspp"] else None
        self.output_grid = quantized["output"]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.stem(x.to(dtype=torch.bfloat16, memory_format=torch.channels_last), relu=True))
        scale, zero = self.input_grid
        h = h.float().div_(scale).round_().add_(zero).clamp_(0, 255).to(torch.uint8)
        for k in self.blocks:
            c = k["conv3x3"](k["reduce"](h, relu=True), relu=True)
            if k["shortcut"] is not None:
                residual, grid = k["shortcut"](h, relu=False), k["shortcut"].q.output
            else:
                residual, grid = h, k["reduce"].q.input
            h = k["increase"].add_relu(c, residual, grid)
        if self.aspp is None:  # a head the int8 path does not cover (v3): it gets the dequantised features
            return h.float().mul_(self.output_grid[0])
        return self.aspp(h)


class _TapASPP:
    """The ASPP classifier as one int8 1x1 convolution over all its taps, then shifted sums in fp32.

    A 3x3 conv with dilation r is the sum of nine 1x1 convs, each read at an offset of (-r, 0, r) rows and
    columns. oneDNN's int8 kernels run dilated 3x3 convs with few output channels poorly (the four ASPP
    branches took a third of the int8 model's time at 513); as one 1x1 conv with 36 x classes outputs the
    same arithmetic runs at the kernels' full rate, and the 36 shifted adds are cheap. Each tap's filters
    get their own int8 scales, which is finer than one per class.
    """

    def __init__(self, state: dict):
        self.kernel = _Kernel(state["taps"])
        self.bias, self.rates, self.n_classes = state["bias"], state["rates"], state["n_classes"]

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        taps = self.kernel(h, relu=False)  # (N, 9 * len(rates) * C, H, W) float32
        n, _, height, width = taps.shape
        c = self.n_classes
        out = self.bias.view(1, c, 1, 1).expand(n, c, height, width).contiguous(memory_format=torch.channels_last)
        k = 0
        for rate in self.rates:
            for dy in (-rate, 0, rate):
                for dx in (-rate, 0, rate):
                    y0, y1, x0, x1 = max(0, -dy), min(height, height - dy), max(0, -dx), min(width, width - dx)
                    if y0 < y1 and x0 < x1:
                        out[:, :, y0:y1, x0:x1] += taps[:, k * c:(k + 1) * c, y0 + dy:y1 + dy, x0 + dx:x1 + dx]
                    k += 1
        return out


def _aspp_taps(aspp: ASPP, input_grid) -> dict:
    """The v2 ASPP's four dilated 3x3 convs as one 1x1 conv over their 36 taps (see :class:`_TapASPP`)."""
    convs = list(aspp.children())
    rows = [conv.weight.detach()[:, :, i, j] for conv in convs for i in range(3) for j in range(3)]
    weight = torch.cat(rows)[:, :, None, None]
    taps = QuantizedConv(*quantize_weight(weight), torch.zeros(weight.shape[0]), [1, 1], [0, 0], [1, 1],
                         input_grid, None)
    return {"taps": taps, "bias": sum(conv.bias.detach().float() for conv in convs),
            "rates": [int(conv.dilation[0]) for conv in convs], "n_classes": aspp.n_classes}


def quantize_folded(folded: nn.Module, channels: dict) -> dict:
    """The quantised state of a BN-folded v2 model (int8 weights, every grid): cacheable with ``torch.save``.

    ``channels``: the per-channel ranges :func:`calibrate` measured on this model.
    """
    stem, blocks = blocks_of(folded)
    grid = {k: uint8_params(*v) for k, v in tensor_ranges(channels).items()}
    state = []
    for i, block in enumerate(blocks):
        projection = isinstance(block.shortcut, ConvBnReLU)
        state.append({
            "reduce": QuantizedConv.from_conv(block.reduce.conv, grid[f"{i}.in"], grid[f"{i}.reduce"]),
            "conv3x3": QuantizedConv.from_conv(block.conv3x3.conv, grid[f"{i}.reduce"], grid[f"{i}.conv3x3"]),
            "increase": QuantizedConv.from_conv(block.increase.conv, grid[f"{i}.conv3x3"], grid[f"{i + 1}.in"]),
            "shortcut": (QuantizedConv.from_conv(block.shortcut.conv, grid[f"{i}.in"], grid[f"{i}.shortcut"])
                         if projection else None),
        })
    aspp = _aspp_taps(folded.aspp, grid[f"{len(blocks)}.in"]) if isinstance(folded.aspp, ASPP) else None
    return {"version": FORMAT_VERSION, "input": grid["0.in"], "output": grid[f"{len(blocks)}.in"],
            "blocks": state, "aspp": aspp}


class Int8Model(nn.Module):
    """The int8 model, called by :class:`segcore.fast.FastPath` like the bf16 one."""

    def __init__(self, folded: nn.Module, quantized: dict):
        super().__init__()
        self.net = Int8ResNet(blocks_of(folded)[0], quantized)
        self.head = None if quantized["aspp"] else folded.aspp

    def forward(self, x):
        out = self.net(x)
        return out if self.head is None else self.head(out)


# -- the cache ------------------------------------------------------------------------------------------


def _to_plain(state: dict) -> dict:
    """The quantised state with every conv as a dict (so ``torch.load(weights_only=True)`` reads it)."""
    conv = lambda q: dataclasses.asdict(q) if q is not None else None  # noqa: E731
    aspp = state["aspp"] and {**state["aspp"], "taps": conv(state["aspp"]["taps"])}
    return {**state, "blocks": [{k: conv(q) for k, q in b.items()} for b in state["blocks"]], "aspp": aspp}


def _from_plain(state: dict) -> dict:
    conv = lambda d: QuantizedConv(**d) if d is not None else None  # noqa: E731
    aspp = state["aspp"] and {**state["aspp"], "taps": conv(state["aspp"]["taps"])}
    return {**state, "blocks": [{k: conv(d) for k, d in b.items()} for b in state["blocks"]], "aspp": aspp}


def cache_key(base: nn.Module, batches, scales) -> str:
    """What the quantised state depends on: the weights, the calibration inputs and scales, the recipe."""
    digest = hashlib.sha256(f"v{FORMAT_VERSION} s{tuple(scales)}".encode())
    for name, tensor in base.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for batch in batches:
        digest.update(str(tuple(batch.shape)).encode())
        digest.update(batch.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def int8_cache_dir() -> Path:
    return cache_dir() / "int8"


def quantized_state(base: nn.Module, folded: nn.Module, batches, scales) -> tuple[dict, bool]:
    """(quantised state, whether it came from the cache), calibrating and caching on a miss.

    A cache that cannot be written (read-only home) only costs the calibration at the next start.
    """
    path = int8_cache_dir() / f"{cache_key(base, batches, scales)}.pt"
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("version") == FORMAT_VERSION:
                return _from_plain(state), True
        except Exception as exc:  # a damaged cache file is rebuilt, never trusted
            log.warning("ignoring the int8 cache %s: %s", path, exc)
    state = quantize_folded(folded, calibrate(folded, batches, scales))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".int8.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        torch.save(_to_plain(state), tmp)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not cache the int8 weights in %s: %s", path.parent, exc)
    return state, False


class Int8Path(FastPath):
    """:class:`~segcore.fast.FastPath` with the int8 model, calibrated on preprocessed ``batches``."""

    def __init__(self, base: nn.Module, batches, scales):
        self.batches, self.scales, self.base = list(batches), tuple(scales), base
        super().__init__(base, torch.device("cpu"), "int8")
        del self.batches, self.base

    def cpu_model(self, folded: nn.Module) -> nn.Module:
        state, self.cache_hit = quantized_state(self.base, folded, self.batches, self.scales)
        return Int8Model(folded, state)
