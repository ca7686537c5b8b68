"""What the benchmarks run: the seeded random-weight DeepLab-v2 ResNet-101 (no trained checkpoint can be
downloaded here), tiny checkpoints, synthetic photos and VOC data sets, and VOC-labelled Segmenters around a
model. The test helpers build the weights, images and data sets, so ``tests/`` goes on the import path
here, once."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent.parent / "tests")
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

import annotations  # noqa: E402
from dataset_files import make_voc  # noqa: E402
from factories import randomize_, scene_image, tiny_checkpoint, tiny_model  # noqa: E402

from segcore import Segmenter, build_model  # noqa: E402

__all__ = ["make_voc", "resnet101", "scene_image", "tiny_checkpoint", "tiny_model", "voc_segmenter"]


def resnet101(n_classes: int = 21, seed: int = 0):
    """The full-size DeepLab-v2 ResNet-101 with seeded random weights, in eval mode."""
    return randomize_(build_model(n_classes), seed).eval()


def voc_segmenter(model, precision: str = "auto", *, scales, test_size: int, device="auto") -> Segmenter:
    """``model`` behind a Segmenter with the PASCAL VOC class names and palette."""
    voc = annotations.get_label_space("voc")
    return Segmenter(model, voc.class_names, voc.palette, scales=scales, test_size=test_size, device=device,
                     precision=precision)
