"""The improved ASPP the study proposes (DeepLab-v3's head): BatchNorm in every branch plus image pooling.

DeepLab-v2's ASPP-L sums four dilated 3x3 classifiers; at large rates most of a filter's taps fall
outside the feature map, so the head loses global context. This head adds an image-level branch
(global average pool -> 1x1 conv -> BN -> ReLU -> bilinear upsample) and normalises every branch:

    c0: 1x1 conv + BN + ReLU            (256 channels)
    c1..cN: 3x3 conv at each rate + BN + ReLU
    image_pool: GAP -> 1x1 conv + BN + ReLU -> upsample
    concat -> project: 1x1 conv + BN + ReLU -> classifier: 1x1 conv with bias

Checkpoint keys live under ``base.aspp.`` (``c0.conv.weight``, ``image_pool.bn.running_mean``,
``project.conv.weight``, ``classifier.bias`` ...), so :mod:`segcore.checkpoint` tells the heads apart
from the keys alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import ConvBnReLU

V3_RATES = (6, 12, 18)
V3_CHANNELS = 256
HEAD_BN_MOMENTUM = 0.1
"""The head's BatchNorm trains (the backbone's is frozen). PyTorch's default momentum lets its running
statistics follow the weights within a few dozen iterations; the backbone's Caffe value (0.001) would
leave them at their initial values for thousands of iterations, and evaluation would use those."""


class HeadUnit(ConvBnReLU):
    """Conv (no bias) + trainable BatchNorm + ReLU; a ConvBnReLU, so BatchNorm folding treats it alike."""

    def __init__(self, in_ch, out_ch, kernel_size=1, dilation=1):
        super().__init__(in_ch, out_ch, kernel_size, 1, dilation * (kernel_size // 2), dilation, relu=True)
        self.bn.momentum = HEAD_BN_MOMENTUM


class ImagePool(HeadUnit):
    """Image-level features: global average pool, 1x1 conv + BN + ReLU, upsampled back to the input size."""

    def forward(self, x):
        pooled = super().forward(F.adaptive_avg_pool2d(x, 1))
        return F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPPv3(nn.Module):
    """ASPP with BatchNorm and image pooling; ``rates`` gives one 3x3 branch each (default 6, 12, 18)."""

    def __init__(self, in_ch, n_classes, rates=V3_RATES, channels=V3_CHANNELS):
        super().__init__()
        self.add_module("c0", HeadUnit(in_ch, channels, 1))
        for i, rate in enumerate(rates, start=1):
            self.add_module(f"c{i}", HeadUnit(in_ch, channels, 3, rate))
        self.n_branches = len(rates) + 1
        self.image_pool = ImagePool(in_ch, channels, 1)
        self.project = HeadUnit(channels * (self.n_branches + 1), channels, 1)
        self.classifier = nn.Conv2d(channels, n_classes, 1, bias=True)
        self.reset_parameters()

    @property
    def n_classes(self) -> int:
        return self.classifier.out_channels

    def branches(self) -> list[nn.Module]:
        return [getattr(self, f"c{i}") for i in range(self.n_branches)]

    def reset_parameters(self) -> None:
        """A fresh head: He-normal convs, BN at identity (γ=1, β=0, unit statistics), classifier N(0, 0.01)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.classifier:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_parameters()
        nn.init.normal_(self.classifier.weight, mean=0.0, std=0.01)
        nn.init.constant_(self.classifier.bias, 0.0)

    def forward(self, x):
        features = [unit(x) for unit in self.branches()]
        features.append(self.image_pool(x))
        return self.classifier(self.project(torch.cat(features, dim=1)))
