"""DeepLab-v2 with a ResNet-101 backbone and multi-scale inputs (MSC).

Module names mirror the checkpoints released by kazuto1011/deeplab-pytorch
(``base.layer2.block1.reduce.conv.weight`` ...), so those state dicts load
without any renaming: ``layer1`` is the stem, ``layer2``-``layer5`` are the four
residual stages and ``aspp`` holds the four dilated classifiers. ``aspp="v3"`` swaps in the
improved head of :mod:`segcore.aspp_v3` (BatchNorm and image pooling) on the same backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

BGR_MEAN = (104.008, 116.669, 122.675)
"""Per-channel mean (B, G, R) the published models were trained with; no std division."""

RESNET101_BLOCKS = (3, 4, 23, 3)
DEFAULT_RATES = (6, 12, 18, 24)
DEFAULT_SCALES = (0.5, 0.75)
STAGE_CHANNELS = (256, 512, 1024, 2048)
BN_EPS = 1e-5
HEADS = ("v2", "v3")
"""ASPP heads: v2, the published ASPP-L (default); v3, BatchNorm in the branches plus image pooling."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything that determines the architecture (and so the checkpoint's keys and shapes)."""

    n_classes: int
    n_blocks: tuple[int, ...] = RESNET101_BLOCKS
    atrous_rates: tuple[int, ...] = DEFAULT_RATES
    scales: tuple[float, ...] = DEFAULT_SCALES
    stride_in_1x1: bool = True
    """MSRA/Caffe bottleneck (stride in the first 1x1); False gives torchvision's (stride in the 3x3)."""
    width: tuple[int, ...] = field(default=STAGE_CHANNELS)
    """Output channels of the four stages; the stem has a quarter of the first (64 in ResNet-101)."""
    aspp: str = "v2"
    """Which ASPP head (see ``HEADS``)."""

    def __post_init__(self):
        if self.n_classes < 1:
            raise ValueError(f"n_classes must be positive, got {self.n_classes}")
        if len(self.n_blocks) != 4 or min(self.n_blocks) < 1:
            raise ValueError(f"n_blocks needs four positive counts, got {self.n_blocks}")
        if not self.atrous_rates or min(self.atrous_rates) < 1:
            raise ValueError(f"atrous_rates must name at least one positive rate, got {self.atrous_rates}")
        if self.aspp not in HEADS:
            raise ValueError(f"aspp must be one of {', '.join(HEADS)}, got {self.aspp!r}")
        if len(self.width) != 4 or min(self.width) < 4 or any(c % 4 for c in self.width):
            raise ValueError(f"width needs four channel counts divisible by 4, got {self.width}")
        if any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive, got {self.scales}")


class ConvBnReLU(nn.Sequential):
    """Conv (no bias) + BatchNorm (+ ReLU): the unit every backbone layer is made of."""

    def __init__(self, in_ch, out_ch, kernel_size, stride, padding, dilation, relu=True):
        super().__init__()
        self.add_module("conv", nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, dilation, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_ch, eps=BN_EPS, momentum=1 - 0.999))
        if relu:
            self.add_module("relu", nn.ReLU())


class Bottleneck(nn.Module):
    def __init__(self, in_ch, out_ch, stride, dilation, downsample, stride_in_1x1=True):
        super().__init__()
        mid_ch = out_ch // 4
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.reduce = ConvBnReLU(in_ch, mid_ch, 1, s1, 0, 1, True)
        self.conv3x3 = ConvBnReLU(mid_ch, mid_ch, 3, s3, dilation, dilation, True)
        self.increase = ConvBnReLU(mid_ch, out_ch, 1, 1, 0, 1, False)
        self.shortcut = ConvBnReLU(in_ch, out_ch, 1, stride, 0, 1, False) if downsample else nn.Identity()

    def forward(self, x):
        h = self.increase(self.conv3x3(self.reduce(x)))
        return F.relu(h + self.shortcut(x))


class ResLayer(nn.Sequential):
    def __init__(self, n_blocks, in_ch, out_ch, stride, dilation, stride_in_1x1=True):
        super().__init__()
        for i in range(n_blocks):
            first = i == 0
            self.add_module(
                f"block{i + 1}",
                Bottleneck(in_ch if first else out_ch, out_ch, stride if first else 1, dilation,
                           downsample=first, stride_in_1x1=stride_in_1x1),
            )


class Stem(nn.Sequential):
    def __init__(self, out_ch):
        super().__init__()
        self.add_module("conv1", ConvBnReLU(3, out_ch, 7, 2, 3, 1))
        self.add_module("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))


class ASPP(nn.Module):
    """DeepLab-v2 ASPP-L: parallel dilated 3x3 classifiers whose scores are summed."""

    def __init__(self, in_ch, n_classes, rates):
        super().__init__()
        for i, rate in enumerate(rates):
            self.add_module(f"c{i}", nn.Conv2d(in_ch, n_classes, 3, 1, padding=rate, dilation=rate, bias=True))
        for conv in self.children():
            nn.init.normal_(conv.weight, mean=0, std=0.01)
            nn.init.constant_(conv.bias, 0)

    @property
    def n_classes(self) -> int:
        return self.c0.out_channels

    def forward(self, x):
        convs = list(self.children())
        out = convs[0](x)
        for conv in convs[1:]:
            out = out + conv(x)
        return out


class DeepLabV2(nn.Sequential):
    """Single-scale DeepLab-v2: ResNet at output stride 8 followed by ASPP."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        w = config.width
        s1 = config.stride_in_1x1
        stem = w[0] // 4
        self.add_module("layer1", Stem(stem))
        self.add_module("layer2", ResLayer(config.n_blocks[0], stem, w[0], 1, 1, s1))
        self.add_module("layer3", ResLayer(config.n_blocks[1], w[0], w[1], 2, 1, s1))
        self.add_module("layer4", ResLayer(config.n_blocks[2], w[1], w[2], 1, 2, s1))
        self.add_module("layer5", ResLayer(config.n_blocks[3], w[2], w[3], 1, 4, s1))
        self.add_module("aspp", make_head(config, w[3]))


def make_head(config: ModelConfig, in_ch: int) -> nn.Module:
    if config.aspp == "v3":
        from .aspp_v3 import ASPPv3  # it builds on this module's ConvBnReLU

        return ASPPv3(in_ch, config.n_classes, config.atrous_rates)
    return ASPP(in_ch, config.n_classes, config.atrous_rates)


def default_rates(aspp: str = "v2") -> tuple[int, ...]:
    """The head's atrous rates when none are given: 6, 12, 18, 24 (ASPP-L) for v2; 6, 12, 18 for v3."""
    if aspp == "v3":
        from .aspp_v3 import V3_RATES

        return V3_RATES
    return DEFAULT_RATES


class MSC(nn.Module):
    """Multi-scale inputs: the model runs at scale 1.0 and at each extra scale.

    Eval mode returns the pixel-wise max of all scales' logits (resized to the 1.0
    logits' size). Training mode returns ``[logits_1.0, *logits_scaled, logits_max]``
    so the loss can supervise each scale and the fused output.
    """

    def __init__(self, base: DeepLabV2, scales=DEFAULT_SCALES, config: ModelConfig | None = None):
        super().__init__()
        self.base = base
        self.scales = tuple(scales)
        self.config = config

    def forward(self, x):
        return msc_forward(self.base, x, self.scales, training=self.training)


def msc_forward(base: nn.Module, x: torch.Tensor, scales, *, training: bool = False):
    """Run ``base`` at scale 1.0 and at ``scales``; see :class:`MSC` for what comes back.

    A free function so callers sharing one model can pick scales per call.
    """
    logits = base(x)
    if not scales:
        return [logits] if training else logits
    size = logits.shape[-2:]
    pyramid = [base(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)) for s in scales]
    resized = [F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in pyramid]
    logits_max = torch.stack([logits, *resized]).amax(dim=0)
    if training:
        return [logits, *pyramid, logits_max]
    return logits_max


def build_model(n_classes: int = 21, *, n_blocks=RESNET101_BLOCKS, atrous_rates=None,
                scales=DEFAULT_SCALES, stride_in_1x1: bool = True, width=STAGE_CHANNELS, aspp: str = "v2") -> MSC:
    """Build an (untrained) DeepLab-v2 MSC model.

    The forward pass takes Bx3xHxW float tensors in BGR order with ``BGR_MEAN``
    subtracted and returns logits at output stride 8. ``aspp`` picks the head (``HEADS``);
    ``atrous_rates`` defaults to that head's rates (:func:`default_rates`).
    """
    if atrous_rates is None:
        atrous_rates = default_rates(aspp)
    config = ModelConfig(int(n_classes), tuple(int(b) for b in n_blocks), tuple(int(r) for r in atrous_rates),
                         tuple(float(s) for s in scales), bool(stride_in_1x1), tuple(int(c) for c in width),
                         str(aspp))
    return MSC(DeepLabV2(config), config.scales, config)
