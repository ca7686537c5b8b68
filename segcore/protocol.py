"""Evaluation protocols: how one dataset image becomes the (prediction, label) pair that is scored.

``reference`` is deeplab-pytorch's ``main.py test`` / ``main.py crf``, the loop that produced the
published scores: the image runs through the model at its native size (COCO-Stuff 10k: warped to
513x513 first, image bilinear, label nearest, as its ``warp_image=True``), the MSC logits are
upsampled bilinearly to the label's size, softmax, (CRF,) argmax. ``resize`` is the
:class:`~segcore.Segmenter` path (long side to ``test_size``, prediction upsampled to the label);
it bounds the work on large photos. See docs/evaluation.md for the table of what each reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import SegcoreError
from .model import BGR_MEAN

__all__ = ["PROTOCOLS", "Protocol", "ProtocolError", "default_protocol", "predict_sample", "protocol_for"]

PROTOCOLS = ("reference", "resize")
REFERENCE_FORMATS = ("voc", "cocostuff10k", "cocostuff164k")
WARP_SIZES = {"cocostuff10k": 513}
"""Formats the reference scores after warping image and label to a square (``warp_image=True``)."""
SCORE_BUDGET_BYTES = 4 << 30
"""Largest native-size class-score map (upsampled logits plus softmax, float32) the reference
protocol builds for one image; a larger image is refused with a pointer to ``--protocol resize``."""


class ProtocolError(SegcoreError):
    """An image the chosen protocol cannot process (too large for native-size scoring)."""


@dataclass(frozen=True)
class Protocol:
    """Which loop scores the images, and its one format-dependent detail (the 10k warp)."""

    name: str
    warp: int | None = None
    score_budget_bytes: int = SCORE_BUDGET_BYTES

    def describe(self, segmenter=None) -> dict:
        """What a report records: protocol, precision, scales, CRF and the size images run at."""
        out: dict = {"name": self.name}
        if self.name == "reference":
            out["image_size"] = f"warped to {self.warp}x{self.warp}" if self.warp else "native"
            out["test_size"] = None
        if segmenter is not None:
            out.update({"precision": segmenter.precision, "scales": [1.0, *segmenter.scales],
                        "crf": segmenter.crf})
            if self.name == "resize":
                out["test_size"] = segmenter.test_size
                out["image_size"] = f"long side {segmenter.test_size}"
        return out


def default_protocol(fmt: str | None) -> str:
    """``reference`` for the published datasets' layouts, ``resize`` for labelme folders and uploads."""
    return "reference" if fmt in REFERENCE_FORMATS else "resize"


def protocol_for(name: str | None, fmt: str | None) -> Protocol:
    """The :class:`Protocol` called ``name`` (None: the format's default) for a dataset of ``fmt``."""
    name = name or default_protocol(fmt)
    if name not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol {name!r}; use one of {', '.join(PROTOCOLS)}")
    return Protocol(name, WARP_SIZES.get(fmt) if name == "reference" else None)


def default_precision(protocol: str) -> str:
    """The published numbers are fp32; the resize path keeps the Segmenter's fast default."""
    return "fp32" if protocol == "reference" else "auto"


# ----------------------------------------------------------------------------- reference steps


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxWxC float32 to ``size`` (h, w): half-pixel-centre bilinear, the points cv2 INTER_LINEAR
    samples on a float image."""
    if image.shape[:2] == tuple(size):
        return image
    t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    out = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)
    return out[0].numpy().transpose(1, 2, 0)


def resize_nearest(label: np.ndarray, size: tuple[int, int], dtype: str | None = None) -> np.ndarray:
    """HxW uint8 label to ``size`` (h, w) with PIL NEAREST, as the reference warps its labels.

    PIL picks slightly different source pixels for 16-bit images than for 8-bit ones, and the
    reference hands PIL the label in the file's own dtype, so ``dtype`` (e.g. ``"uint16"``) is used
    for the resize; the values come back as uint8."""
    if label.shape == tuple(size):
        return label
    arr = label if dtype is None else label.astype(dtype)
    out = np.asarray(Image.fromarray(arr).resize((size[1], size[0]), resample=Image.Resampling.NEAREST))
    return out.astype(np.uint8)


def reference_input(image_rgb: np.ndarray, warp: int | None) -> np.ndarray:
    """The reference's network input: float32 BGR (warped when asked), mean subtracted, HxWx3."""
    bgr = np.ascontiguousarray(image_rgb[:, :, ::-1]).astype(np.float32)
    if warp:
        bgr = resize_bilinear(bgr, (warp, warp))
    # numpy's float32 -= float64 computes in float64 and rounds once, like the reference's `image -= mean`
    return (bgr.astype(np.float64) - np.asarray(BGR_MEAN, np.float64)).astype(np.float32)


def reference_crf_image(net_input: np.ndarray) -> np.ndarray:
    """The image ``main.py crf`` hands the CRF: the mean-subtracted input cast to uint8.

    The reference casts the *mean-subtracted* float image (numpy truncates toward zero and wraps
    modulo 256 on x86), so the colour kernel sees shifted, wrapped colours. The published CRF
    figures come from exactly that image, so the reference protocol reproduces it on every platform.
    """
    return (np.trunc(net_input).astype(np.int64) % 256).astype(np.uint8)


def _bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _check_budget(protocol: Protocol, n_classes: int, size: tuple[int, int], where: str) -> None:
    h, w = size
    need = 2 * 4 * n_classes * h * w
    if need > protocol.score_budget_bytes:
        raise ProtocolError(
            f"{where}: {w}x{h} pixels is too large for the reference protocol, which scores every "
            f"image at its native size ({_bytes(need)} of class scores for {n_classes} classes, "
            f"limit {_bytes(protocol.score_budget_bytes)}); use --protocol resize (long side to --test-size)")


@torch.inference_mode()
def reference_predict(segmenter, image_rgb: np.ndarray, label: np.ndarray, protocol: Protocol,
                      where: str = "image", label_dtype: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, label) as ``main.py test`` (or ``main.py crf`` when the segmenter has CRF on)."""
    x = reference_input(image_rgb, protocol.warp)
    if protocol.warp:
        label = resize_nearest(label, (protocol.warp, protocol.warp), label_dtype)
    size = label.shape[:2]
    _check_budget(protocol, segmenter.n_classes, size, where)
    batch = torch.from_numpy(x.transpose(2, 0, 1).copy())[None].to(segmenter.device)
    logits = segmenter.logits(batch).float()
    probs = F.softmax(F.interpolate(logits, size=size, mode="bilinear", align_corners=False), dim=1)[0]
    if segmenter.crf:
        refined = segmenter.crf_params(reference_crf_image(x), probs.cpu().numpy())
        pred = np.argmax(refined, axis=0)
    else:
        pred = probs.argmax(0).cpu().numpy()
    dtype = np.uint8 if segmenter.n_classes <= 256 else np.int32
    return pred.astype(dtype), label


def predict_sample(segmenter, sample, protocol: Protocol, where: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """One dataset sample's (prediction, label) pair under ``protocol``; both the same size."""
    if protocol.name == "reference":
        return reference_predict(segmenter, sample.image, sample.label, protocol, where,
                                 getattr(sample, "label_dtype", None))
    # one image per forward pass, not predict_batch: a batched pass moves the logits in their last bits
    # (up to 3e-5 measured on the CPU), so the scores would depend on which images share a batch and
    # on the number of processes sharding the dataset
    return segmenter.predict(sample.image).label_map, sample.label


# ----------------------------------------------------------------------------- published figures

SCORE_KEYS = ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou")


def published_scores(segmenter, fmt: str | None, protocol: Protocol) -> dict | None:
    """The registry's published figures (percent) comparable with this run, else None.

    Comparable means: registry weights on their own dataset format, the reference protocol, fp32 and
    the published multi-scale inputs (1.0, 0.5, 0.75). With CRF only the figures published with CRF
    count (VOC's mIoU). Returns ``{"dataset": ..., "crf": bool, "scores": {key: percent}}``.
    """
    from .model import DEFAULT_SCALES
    from .weights import REGISTRY

    weights = REGISTRY.get(getattr(segmenter, "name", None) or "")
    if (weights is None or weights.dataset_format != fmt or protocol.name != "reference"
            or segmenter.precision != "fp32" or tuple(segmenter.scales) != tuple(DEFAULT_SCALES)):
        return None
    suffix = "_crf" if segmenter.crf else ""
    figures = {key: weights.published[key + suffix] for key in SCORE_KEYS if key + suffix in weights.published}
    if not figures:
        return None
    return {"weights": weights.name, "dataset": weights.dataset, "crf": segmenter.crf, "scores": figures}


def published_lines(published: dict, scores: dict) -> list[str]:
    """One console line per published figure: 'mIoU 76.65 published, 76.62 measured (-0.03)'."""
    short = {"pixel_accuracy": "PA", "mean_accuracy": "MA", "mean_iou": "mIoU", "fw_iou": "FWIoU"}
    head = f"published ({published['weights']} on {published['dataset']}{', CRF' if published['crf'] else ''}):"
    lines = [head]
    for key, figure in published["scores"].items():
        measured = 100.0 * float(scores[key])
        lines.append(f"  {short[key]} {figure:.2f} published, {measured:.2f} measured ({measured - figure:+.2f})")
    return lines


def protocol_line(described: dict) -> str:
    """'protocol reference: images native, precision fp32, scales 1, 0.5, 0.75, CRF off'."""
    scales = ", ".join(f"{s:g}" for s in described.get("scales") or [])
    return (f"protocol {described['name']}: images {described.get('image_size')}, precision "
            f"{described.get('precision')}, scales {scales}, CRF {'on' if described.get('crf') else 'off'}")
