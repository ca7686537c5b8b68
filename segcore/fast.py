"""Accelerated inference paths (issue 8): BatchNorm folding, bf16/fp16, channels-last, fused kernels.

The fp32 path of :class:`~segcore.segmenter.Segmenter` keeps the original model untouched so its numerics
stay exactly the reference's. Every accelerated path works on a *private copy* built here:

* BatchNorm folded into the preceding convolution (``fuse_conv_bn_eval``: w' = w·γ/σ, b' = β − μ·γ/σ),
  which removes one memory pass per conv;
* channels-last (NHWC) tensors, the layout oneDNN and cuDNN run fastest;
* **CPU**: the ResNet's weights in bfloat16 when the CPU has native bf16 dot products (AVX512-BF16 or
  AMX), run as oneDNN convolutions with the ReLU and the residual add fused in (fp32 accumulation inside
  each conv); the ASPP classifier and everything after it stay fp32, which keeps the class scores' last
  sums in full precision, with its filters padded to a channel count oneDNN runs well (the v3 head runs
  as its BN-folded fp32 module: its classifier sees 256 channels, not 2048); ``fp32-fused``
  (``auto`` on CPUs without native bf16) runs the same structure with fp32 weights;
* **CUDA**: autocast to bf16 (fp16 where the GPU lacks bf16) with ``cudnn.benchmark``.

The thread count is set once to the number of physical cores (hyper-threads share the vector units
that these kernels saturate, so more threads only add contention); ``SEGCORE_THREADS`` overrides it.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .model import ASPP, ConvBnReLU, msc_forward


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS, Windows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_bf16_supported() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX) *and* oneDNN will use them.

    Without them bf16 is emulated and slower than fp32, so ``precision="auto"`` stays fp32 there.
    """
    try:
        mkldnn_ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        mkldnn_ok = False
    return native_bf16(mkldnn_ok and torch.backends.mkldnn.is_available(), cpu_flags(),
                       torch.backends.cpu.get_cpu_capability())


@functools.lru_cache(maxsize=1)
def cpu_int8_supported() -> bool:
    """True when oneDNN's int8 convolutions (the int8 path, :mod:`segcore.quantize`) run here and give the
    right answer; without VNNI or AMX they run, only slower (``auto`` never picks int8)."""
    try:
        x = torch.full((1, 8, 4, 4), 3, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        w = torch.ones(4, 8, 1, 1, dtype=torch.int8)
        scales = torch.ones(4)
        packed = torch.ops.onednn.qconv_prepack(w, scales, 1.0, 0, [1, 1], [0, 0], [1, 1], 1, list(x.shape))
        out = torch.ops.onednn.qconv2d_pointwise(x, 1.0, 0, packed, scales, torch.zeros(4, dtype=torch.int64),
                                                 None, [1, 1], [0, 0], [1, 1], 1, 1.0, 0, torch.float32,
                                                 "none", [], "")
        return bool(torch.equal(out, torch.full_like(out, 24.0)))
    except (AttributeError, RuntimeError):
        return False


def native_bf16(onednn_bf16: bool, flags: frozenset[str], capability: str) -> bool:
    """The rule behind :func:`cpu_bf16_supported`, on given facts: oneDNN must do bf16, and the CPU must
    have AVX512-BF16 or AMX by its flags (or, where no flags are readable, by torch's capability string)."""
    if not onednn_bf16:
        return False
    if flags:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    return "AMX" in capability


@functools.lru_cache(maxsize=1)
def physical_cores() -> int:
    """Physical cores this process may run on (hyper-thread siblings counted once)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:
        allowed = set(range(os.cpu_count() or 1))
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return count_physical_cores(cpuinfo, allowed)


def count_physical_cores(cpuinfo: str, allowed: set[int]) -> int:
    """Distinct (socket, core) pairs among the ``allowed`` logical CPUs of a /proc/cpuinfo text;
    ``len(allowed)`` where the text says nothing usable."""
    cores, cpu, phys = set(), None, "0"
    try:
        for line in cpuinfo.splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "processor":
                cpu = int(value)
            elif key == "physical id":
                phys = value
            elif key == "core id" and cpu in allowed:
                cores.add((phys, value))
    except ValueError:
        cores = set()
    return max(1, len(cores) or len(allowed))


_threads_set = False


def configure_threads() -> int:
    """Set torch's intra-op threads to the physical core count once (``SEGCORE_THREADS`` overrides)."""
    global _threads_set
    if not _threads_set:
        wanted = int(os.environ.get("SEGCORE_THREADS", "0") or 0) or physical_cores()
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
        _threads_set = True
    return torch.get_num_threads()


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every ConvBnReLU's BatchNorm folded into its conv (eval statistics).

    The original is not modified. In fp32 the folded model's logits equal the original's up to rounding.
    """
    folded = copy.deepcopy(module).eval()
    for unit in folded.modules():
        if isinstance(unit, ConvBnReLU) and isinstance(unit.bn, nn.BatchNorm2d):
            unit.conv = fuse_conv_bn_eval(unit.conv, unit.bn)
            unit.bn = nn.Identity()
    return folded


@functools.lru_cache(maxsize=1)
def fused_conv_supported() -> bool:
    """True when oneDNN's fused convolutions (conv+ReLU, conv+add+ReLU in place) run and give conv's answer.

    They are PyTorch's private ops behind ``torch.compile``'s CPU backend; one tiny call each checks them
    against ``F.conv2d`` so a build without them (or with a changed signature) falls back to plain ops.
    """
    try:
        ops = torch.ops.mkldnn
        x = torch.arange(2 * 8 * 5 * 5, dtype=torch.float32).reshape(2, 8, 5, 5).sin()
        x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        w = torch.linspace(-1, 1, 4 * 8 * 9).reshape(4, 8, 3, 3).to(torch.bfloat16)
        b = torch.linspace(-0.5, 0.5, 4).to(torch.bfloat16)
        ref = F.conv2d(x.float(), w.float(), b.float(), 1, 2, 2)
        got = ops._convolution_pointwise(x, w, b, [2, 2], [1, 1], [2, 2], 1, "relu", [None], "")
        other = torch.ones_like(got)
        summed = ops._convolution_pointwise_.binary(other, x, w, b, [2, 2], [1, 1], [2, 2], 1, "add", None,
                                                    "relu", [None], "")
        tol = dict(rtol=0.02, atol=0.05)
        return (summed.data_ptr() == other.data_ptr()
                and torch.allclose(got.float(), ref.relu(), **tol)
                and torch.allclose(summed.float(), (ref + 1).relu(), **tol))
    except (AttributeError, RuntimeError):
        return False


class PackedConv:
    """One BN-folded convolution's weights in the kernel's dtype and layout, with its geometry."""

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype, fused: bool):
        self.weight = conv.weight.detach().to(dtype).contiguous(memory_format=torch.channels_last)
        self.bias = conv.bias.detach().to(dtype)
        self.geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        self.fused = fused

    def __call__(self, x: torch.Tensor, relu: bool) -> torch.Tensor:
        padding, stride, dilation, groups = self.geometry
        if self.fused:
            return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, padding, stride, dilation,
                                                           groups, "relu" if relu else "none", [None], "")
        y = F.conv2d(x, self.weight, self.bias, stride, padding, dilation, groups)
        return y.relu_() if relu else y

    def add_relu_(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``relu(conv(x) + residual)`` written into ``residual`` (one pass, no new buffer when fused)."""
        padding, stride, dilation, groups = self.geometry
        if self.fused:
            return torch.ops.mkldnn._convolution_pointwise_.binary(
                residual, x, self.weight, self.bias, padding, stride, dilation, groups, "add", None, "relu",
                [None], "")
        return residual.add_(F.conv2d(x, self.weight, self.bias, stride, padding, dilation, groups)).relu_()


class _FusedResNet:
    """The DeepLab-v2 ResNet run as fused oneDNN convolutions in the path's dtype (bf16, or fp32).

    Every Bottleneck becomes conv+ReLU, conv+ReLU and one conv+add+ReLU that writes into the shortcut's
    buffer: no separate ReLU or add passes and no fresh output buffer for the residual sum, which on
    small machines costs as much as the arithmetic it saves (each new buffer is page-faulted in).
    """

    def __init__(self, folded: nn.Module, dtype: torch.dtype):
        fused = fused_conv_supported()
        self.dtype = dtype
        layers = [m for name, m in folded.named_children() if name != "aspp"]
        stem, res_layers = layers[0], layers[1:]
        self.stem = PackedConv(stem.conv1.conv, dtype, fused)
        self.pool = stem.pool
        self.blocks = [
            (PackedConv(block.reduce.conv, dtype, fused), PackedConv(block.conv3x3.conv, dtype, fused),
             PackedConv(block.increase.conv, dtype, fused),
             PackedConv(block.shortcut.conv, dtype, fused) if isinstance(block.shortcut, ConvBnReLU) else None)
            for layer in res_layers for block in layer.children()
        ]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.stem(x.to(dtype=self.dtype, memory_format=torch.channels_last), relu=True))
        for reduce, conv3x3, increase, shortcut in self.blocks:
            # the block's input is ours (made by the step before), so the identity shortcut may take the sum
            residual = shortcut(h, relu=False) if shortcut is not None else h
            h = increase.add_relu_(conv3x3(reduce(h, relu=True), relu=True), residual)
        return h


class _PaddedASPP:
    """The ASPP classifier in fp32 with its output channels padded with zero filters to a multiple of 16.

    oneDNN's convolutions are several times slower for an odd channel count such as VOC's 21 than for 32;
    the padded filters add exact zeros and are sliced off, so the scores are the ASPP's own.
    """

    MULTIPLE = 16

    def __init__(self, aspp: nn.Module):
        convs = list(aspp.children())
        self.n_classes = convs[0].out_channels
        padded = -(-self.n_classes // self.MULTIPLE) * self.MULTIPLE
        self.branches = []
        for conv in convs:
            weight = conv.weight.new_zeros((padded, *conv.weight.shape[1:]))
            weight[: self.n_classes] = conv.weight.detach()
            bias = conv.bias.new_zeros(padded)
            bias[: self.n_classes] = conv.bias.detach()
            self.branches.append((weight.contiguous(memory_format=torch.channels_last), bias, conv.padding,
                                  conv.dilation))

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        out = None
        for weight, bias, padding, dilation in self.branches:
            y = F.conv2d(h, weight, bias, 1, padding, dilation)
            out = y if out is None else out.add_(y)
        return out[:, : self.n_classes]


class _CpuModel(nn.Module):
    """DeepLabV2 for the CPU fast path: fused bf16 (or fp32) ResNet, fp32 ASPP (the class scores' sums)."""

    def __init__(self, folded: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.resnet = _FusedResNet(folded, dtype)
        self.aspp = _PaddedASPP(folded.aspp) if isinstance(folded.aspp, ASPP) else folded.aspp

    def forward(self, x):
        return self.aspp(self.resnet(x).float())


class FastPath:
    """A private, inference-only copy of a DeepLabV2 base prepared for one device and precision."""

    def __init__(self, base: nn.Module, device: torch.device, precision: str):
        self.device = torch.device(device)
        self.precision = precision
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        folded = fold_batchnorm(base).to(self.device).to(memory_format=torch.channels_last)
        for p in folded.parameters():
            p.requires_grad_(False)
        if self.device.type == "cpu":
            configure_threads()
            self.autocast = False
            self.model = self.cpu_model(folded)
        else:
            if self.device.type == "cuda":
                torch.backends.cudnn.benchmark = True
            self.autocast = self.dtype != torch.float32
            self.model = folded
        self.model.eval()

    def cpu_model(self, folded: nn.Module) -> nn.Module:
        """The CPU model built from the BN-folded copy (the int8 path, :mod:`segcore.quantize`, overrides it)."""
        return _CpuModel(folded, self.dtype)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor, scales) -> torch.Tensor:
        """Float32 logits (output stride 8) for a preprocessed NCHW float32 batch, multi-scale max."""
        x = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        if self.autocast:
            with torch.autocast(device_type=self.device.type, dtype=self.dtype):
                out = msc_forward(self.model, x, scales)
        else:
            out = msc_forward(self.model, x, scales)
        return out.float().contiguous()


def uses_fast_path(device: torch.device, precision: str) -> bool:
    """Which Segmenter configurations run through :class:`FastPath` (fp32 always uses the original model)."""
    if precision == "fp32":
        return False
    if device.type == "cpu":
        return precision in ("bf16", "fp32-fused", "int8")
    return device.type == "cuda"
