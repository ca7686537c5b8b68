"""Accelerated inference paths (issue 8): BatchNorm folding, bf16/fp16, channels-last, thread count.

The fp32 path of :class:`~segcore.segmenter.Segmenter` keeps the original model untouched so its numerics
stay exactly the reference's. Every accelerated path works on a *private copy* built here:

* BatchNorm folded into the preceding convolution (``fuse_conv_bn_eval``: w' = w·γ/σ, b' = β − μ·γ/σ),
  which removes one memory pass per conv;
* channels-last (NHWC) tensors, the layout oneDNN and cuDNN run fastest;
* **CPU**: the backbone's weights stored in bfloat16 when the CPU has native bf16 dot products
  (AVX512-BF16 or AMX), so oneDNN runs its bf16 kernels (fp32 accumulation inside each conv); the ASPP
  classifier and everything after it stay fp32, which keeps the class scores' last sums in full precision;
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
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .model import ConvBnReLU, msc_forward


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
    if not mkldnn_ok or not torch.backends.mkldnn.is_available():
        return False
    flags = cpu_flags()
    if flags:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    return "AMX" in torch.backends.cpu.get_cpu_capability()


@functools.lru_cache(maxsize=1)
def physical_cores() -> int:
    """Physical cores this process may run on (hyper-thread siblings counted once)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:
        allowed = set(range(os.cpu_count() or 1))
    cores, cpu, phys = set(), None, "0"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "processor":
                cpu = int(value)
            elif key == "physical id":
                phys = value
            elif key == "core id" and cpu in allowed:
                cores.add((phys, value))
    except (OSError, ValueError):
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


class _MixedBackbone(nn.Module):
    """DeepLabV2 with the ResNet in a low-precision dtype and the ASPP classifier in fp32."""

    def __init__(self, base: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.resnet = nn.Sequential(*[m for name, m in base.named_children() if name != "aspp"]).to(dtype)
        self.aspp = base.aspp.float()

    def forward(self, x):
        h = self.resnet(x.to(dtype=self.dtype, memory_format=torch.channels_last))
        return self.aspp(h.float())


class FastPath:
    """A private, inference-only copy of a DeepLabV2 base prepared for one device and precision."""

    def __init__(self, base: nn.Module, device: torch.device, precision: str):
        self.device = torch.device(device)
        self.precision = precision
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
        folded = fold_batchnorm(base).to(self.device).to(memory_format=torch.channels_last)
        for p in folded.parameters():
            p.requires_grad_(False)
        if self.device.type == "cpu":
            configure_threads()
            self.autocast = False
            self.model = _MixedBackbone(folded, self.dtype) if self.dtype != torch.float32 else folded
        else:
            if self.device.type == "cuda":
                torch.backends.cudnn.benchmark = True
            self.autocast = self.dtype != torch.float32
            self.model = folded
        self.model.eval()

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
        return precision == "bf16"
    return device.type == "cuda"
