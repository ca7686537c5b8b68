"""Fully connected CRF refinement (Krähenbühl & Koltun), as the DeepLab-v2 reference applies it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DenseCRF:
    """Refines class probabilities with the image's colours; defaults are the reference's VOC settings."""

    iter_max: int = 10
    pos_w: float = 3
    pos_xy_std: float = 1
    bi_w: float = 4
    bi_xy_std: float = 67
    bi_rgb_std: float = 3

    def __call__(self, image: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """``image``: HxWx3 uint8; ``probs``: CxHxW softmax. Returns refined CxHxW probabilities.

        The colour kernel uses one standard deviation for all channels, so RGB and BGR give the same result.
        """
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax

        n_classes, h, w = probs.shape
        if image.shape[:2] != (h, w):
            raise ValueError(f"CRF image {image.shape[:2]} and probabilities {(h, w)} differ in size")
        unary = np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32)))
        crf = dcrf.DenseCRF2D(w, h, n_classes)
        crf.setUnaryEnergy(unary)
        crf.addPairwiseGaussian(sxy=self.pos_xy_std, compat=self.pos_w)
        crf.addPairwiseBilateral(sxy=self.bi_xy_std, srgb=self.bi_rgb_std,
                                 rgbim=np.ascontiguousarray(image, dtype=np.uint8), compat=self.bi_w)
        q = crf.inference(self.iter_max)
        return np.asarray(q, dtype=np.float32).reshape(n_classes, h, w)
