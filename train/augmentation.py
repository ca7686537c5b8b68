"""Training-time augmentation as in the reference (kazuto1011/deeplab-pytorch ``_BaseDataset._augmentation``).

Order: random scale from a list (image bilinear, label nearest), pad to at least the crop (image with the
mean, label with 255), random crop, random horizontal flip; then BGR mean subtraction (no std) and HWC->CHW.

Differences from the reference, all deliberate:

* The random choices come from a ``random.Random`` seeded per *sample* (see :mod:`train.data`), not from
  the process-global ``random`` module, so a sample's crop does not depend on which worker or rank loads
  it. That is what makes resumed and multi-process runs reproduce single-process ones exactly.
* The image is resized with ``F.interpolate(bilinear, align_corners=False)`` on float32 BGR, which samples
  the same points as ``cv2.resize(INTER_LINEAR)`` on the float image the reference resizes (no OpenCV
  dependency at runtime).
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from annotations import IGNORE_INDEX
from PIL import Image



def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxWxC float32 -> size=(h, w), half-pixel-centre bilinear (cv2 INTER_LINEAR on floats)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    out = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
    return out[0].numpy().transpose(1, 2, 0)


def resize_nearest(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxW uint8 label -> size=(h, w) with PIL NEAREST (what the reference uses)."""
    h, w = size
    if label.shape == (h, w):
        return label
    return np.asarray(Image.fromarray(label).resize((w, h), resample=Image.NEAREST))


def augment(image_rgb: np.ndarray, label: np.ndarray, rng: random.Random, *, scales, crop_size: int,
            mean_bgr, flip: bool = True, ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """One training sample: (3xCxC float32 BGR minus mean, CxC int64 label)."""
    image = np.ascontiguousarray(image_rgb[:, :, ::-1]).astype(np.float32)  # RGB -> BGR
    mean = np.asarray(mean_bgr, dtype=np.float32)
    # Scaling
    h, w = label.shape
    s = rng.choice(list(scales))
    h, w = int(h * s), int(w * s)
    h, w = max(h, 1), max(w, 1)
    image = resize_bilinear(image, (h, w))
    label = resize_nearest(label, (h, w))
    # Padding to fit the crop (bottom/right, as the reference)
    pad_h, pad_w = max(crop_size - h, 0), max(crop_size - w, 0)
    if pad_h or pad_w:
        padded = np.empty((h + pad_h, w + pad_w, 3), np.float32)
        padded[:] = mean
        padded[:h, :w] = image
        image = padded
        lab = np.full((h + pad_h, w + pad_w), ignore_index, np.uint8)
        lab[:h, :w] = label
        label = lab
    # Cropping
    h, w = label.shape
    top = rng.randint(0, h - crop_size)
    left = rng.randint(0, w - crop_size)
    image = image[top:top + crop_size, left:left + crop_size]
    label = label[top:top + crop_size, left:left + crop_size]
    # Flipping
    if flip and rng.random() < 0.5:
        image = image[:, ::-1]
        label = label[:, ::-1]
    image = (image - mean).transpose(2, 0, 1)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label).astype(np.int64)

