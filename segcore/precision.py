"""The numeric precisions inference and training run in, and the one rule that resolves ``auto``.

Inference (:class:`~segcore.segmenter.Segmenter`) accepts all of :data:`PRECISIONS`; training accepts a
subset (``train.config.TRAIN_PRECISIONS``) and resolves it through the same :func:`resolve_precision`.
"""

from __future__ import annotations

import torch

from . import fast
from .errors import OptionError

PRECISIONS = ("auto", "fp32", "fp32-fused", "bf16", "fp16", "int8")


def resolve_precision(precision: str, device: torch.device, allowed: tuple[str, ...] = PRECISIONS) -> str:
    """``precision`` as run on ``device``; OptionError when it is not one of ``allowed``.

    ``auto``: bf16 on CUDA GPUs that have it (fp16 otherwise); on the CPU bf16 where it has native
    bf16 dot products (AVX512-BF16 or AMX, see :func:`segcore.fast.cpu_bf16_supported`), otherwise
    ``fp32-fused``: fp32 arithmetic through the fast path's folded, fused kernels. A choice that
    ``allowed`` leaves out falls back to ``fp32``.

    ``fp32`` runs the original model untouched, so its numbers are the reference's to the last bit."""
    if precision not in allowed:
        raise OptionError(f"precision must be one of {allowed}, got {precision!r}")
    if precision == "int8" and device.type != "cpu":
        raise OptionError(f"precision int8 runs on the CPU (oneDNN int8 kernels); on {device.type} use auto or bf16")
    if precision == "int8" and not fast.cpu_int8_supported():
        raise OptionError("precision int8 needs oneDNN's int8 convolutions, which this PyTorch build cannot run "
                          "here; use auto")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    elif device.type == "cpu":
        choice = "bf16" if fast.cpu_bf16_supported() else "fp32-fused"
    else:
        choice = "fp32"
    return choice if choice in allowed else "fp32"
