"""An independent transcription of the reference implementation (kazuto1011/deeplab-pytorch, master):
``libs/models/{resnet,deeplabv2,msc}.py``, ``demo.py`` (preprocessing/inference) and ``libs/utils/crf.py``.

Tests load the same weights into this and into segcore and compare outputs. Nothing here imports segcore.
"""

import cv2
import numpy as np
import pydensecrf.densecrf as dcrf
import pydensecrf.utils as crf_utils
import torch
import torch.nn as nn
import torch.nn.functional as F


class _ConvBnReLU(nn.Sequential):
    def __init__(self, in_ch, out_ch, kernel_size, stride, padding, dilation, relu=True):
        super().__init__()
        self.add_module("conv", nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, dilation, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_ch, eps=1e-5, momentum=1 - 0.999))
        if relu:
            self.add_module("relu", nn.ReLU())


class _Bottleneck(nn.Module):
    def __init__(self, in_ch, out_ch, stride, dilation, downsample):
        super().__init__()
        mid_ch = out_ch // 4
        self.reduce = _ConvBnReLU(in_ch, mid_ch, 1, stride, 0, 1, True)
        self.conv3x3 = _ConvBnReLU(mid_ch, mid_ch, 3, 1, dilation, dilation, True)
        self.increase = _ConvBnReLU(mid_ch, out_ch, 1, 1, 0, 1, False)
        self.shortcut = _ConvBnReLU(in_ch, out_ch, 1, stride, 0, 1, False) if downsample else (lambda x: x)

    def forward(self, x):
        h = self.reduce(x)
        h = self.conv3x3(h)
        h = self.increase(h)
        h += self.shortcut(x)
        return F.relu(h)


class _ResLayer(nn.Sequential):
    def __init__(self, n_layers, in_ch, out_ch, stride, dilation):
        super().__init__()
        for i in range(n_layers):
            self.add_module(
                "block{}".format(i + 1),
                _Bottleneck(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, dilation, i == 0),
            )


class _Stem(nn.Sequential):
    def __init__(self, out_ch):
        super().__init__()
        self.add_module("conv1", _ConvBnReLU(3, out_ch, 7, 2, 3, 1))
        self.add_module("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))


class _ASPP(nn.Module):
    def __init__(self, in_ch, out_ch, rates):
        super().__init__()
        for i, rate in enumerate(rates):
            self.add_module("c{}".format(i), nn.Conv2d(in_ch, out_ch, 3, 1, padding=rate, dilation=rate, bias=True))

    def forward(self, x):
        return sum([stage(x) for stage in self.children()])


class DeepLabV2(nn.Sequential):
    def __init__(self, n_classes, n_blocks, atrous_rates, ch=(64, 256, 512, 1024, 2048)):
        super().__init__()
        self.add_module("layer1", _Stem(ch[0]))
        self.add_module("layer2", _ResLayer(n_blocks[0], ch[0], ch[1], 1, 1))
        self.add_module("layer3", _ResLayer(n_blocks[1], ch[1], ch[2], 2, 1))
        self.add_module("layer4", _ResLayer(n_blocks[2], ch[2], ch[3], 1, 2))
        self.add_module("layer5", _ResLayer(n_blocks[3], ch[3], ch[4], 1, 4))
        self.add_module("aspp", _ASPP(ch[4], n_classes, atrous_rates))


class MSC(nn.Module):
    def __init__(self, base, scales=None):
        super().__init__()
        self.base = base
        self.scales = scales if scales else [0.5, 0.75]

    def forward(self, x):
        logits = self.base(x)
        _, _, H, W = logits.shape
        interp = lambda l: F.interpolate(l, size=(H, W), mode="bilinear", align_corners=False)  # noqa: E731
        logits_pyramid = []
        for p in self.scales:
            h = F.interpolate(x, scale_factor=p, mode="bilinear", align_corners=False)
            logits_pyramid.append(self.base(h))
        logits_all = [logits] + [interp(l) for l in logits_pyramid]
        logits_max = torch.max(torch.stack(logits_all), dim=0)[0]
        if self.training:
            return [logits] + logits_pyramid + [logits_max]
        return logits_max


def reference_model(n_classes, n_blocks=(3, 4, 23, 3), atrous_rates=(6, 12, 18, 24), scales=(0.5, 0.75),
                    ch=(64, 256, 512, 1024, 2048)):
    return MSC(DeepLabV2(n_classes, n_blocks, atrous_rates, ch), list(scales))


MEAN_BGR = np.array([104.008, 116.669, 122.675])


def reference_preprocessing(image_bgr, test_size):
    scale = test_size / max(image_bgr.shape[:2])
    image = cv2.resize(image_bgr, dsize=None, fx=scale, fy=scale)
    raw_image = image.astype(np.uint8)
    image = image.astype(np.float32)
    image -= MEAN_BGR
    image = torch.from_numpy(image.transpose(2, 0, 1)).float().unsqueeze(0)
    return image, raw_image


class DenseCRF:
    def __init__(self, iter_max=10, pos_w=3, pos_xy_std=1, bi_w=4, bi_xy_std=67, bi_rgb_std=3):
        self.iter_max, self.pos_w, self.pos_xy_std = iter_max, pos_w, pos_xy_std
        self.bi_w, self.bi_xy_std, self.bi_rgb_std = bi_w, bi_xy_std, bi_rgb_std

    def __call__(self, image, probmap):
        C, H, W = probmap.shape
        U = np.ascontiguousarray(crf_utils.unary_from_softmax(probmap))
        image = np.ascontiguousarray(image)
        d = dcrf.DenseCRF2D(W, H, C)
        d.setUnaryEnergy(U)
        d.addPairwiseGaussian(sxy=self.pos_xy_std, compat=self.pos_w)
        d.addPairwiseBilateral(sxy=self.bi_xy_std, srgb=self.bi_rgb_std, rgbim=image, compat=self.bi_w)
        Q = d.inference(self.iter_max)
        return np.array(Q).reshape((C, H, W))


def reference_inference(model, image, raw_image=None, postprocessor=None):
    _, _, H, W = image.shape
    with torch.no_grad():
        logits = model(image)
        logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        probs = F.softmax(logits, dim=1)[0].cpu().numpy()
    if postprocessor and raw_image is not None:
        probs = postprocessor(raw_image, probs)
    return np.argmax(probs, axis=0)
