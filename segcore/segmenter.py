"""High-level inference: image in, label map out, following the reference demo's pipeline.

Pipeline: resize so the long side is ``test_size`` (bilinear, OpenCV-compatible) → BGR, mean
subtracted → model (multi-scale max) → logits upsampled bilinearly to the resized size → optional
DenseCRF on the resized image and its softmax → upsampled bilinearly to the original size → argmax.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from annotations import builtin_label_space, get_label_space, palette_image, voc_colormap

from .checkpoint import load_model, resolve_checkpoint
from .crf import DenseCRF
from .errors import LabelCountError, OptionError
from .image import MAX_IMAGE_PIXELS, load_image, resize_long_side
from .model import BGR_MEAN, DEFAULT_SCALES, msc_forward
from .fast import FastPath, uses_fast_path
from .precision import resolve_precision
from .quantize import Int8Path, calibration_images

_UPSAMPLE_BUDGET_BYTES = 64 << 20


@dataclass
class Prediction:
    """One image's result: the label map at the image's own size, and what it means."""

    label_map: np.ndarray
    class_names: tuple[str, ...]
    palette: np.ndarray
    image: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    """Class probabilities (C x h x w, float32) at the processing size, when asked for."""
    processing_size: tuple[int, int] | None = None

    def class_fractions(self) -> dict[str, float]:
        """Share of the image's pixels per class present, largest first."""
        counts = np.bincount(self.label_map.ravel(), minlength=len(self.class_names))
        total = counts.sum()
        order = np.argsort(-counts, kind="stable")
        return {self.class_names[i]: float(counts[i] / total) for i in order if counts[i] > 0 and i < len(self.class_names)}

    def colorize(self) -> np.ndarray:
        """The label map in the label set's colours, HxWx3 uint8."""
        return self.palette[self.label_map]

    def overlay(self, opacity: float = 0.5, image: np.ndarray | None = None) -> np.ndarray:
        """The colour map blended over the image; ``opacity`` 0 shows the image, 1 the colours."""
        base = self.image if image is None else image
        if base is None:
            raise ValueError("no image to overlay on: pass image=")
        if not 0.0 <= opacity <= 1.0:
            raise OptionError(f"opacity must be in [0, 1], got {opacity}")
        return blend_overlay(base, self.label_map, self.palette, opacity)

    def to_pil(self) -> Image.Image:
        """A palette ("P" mode) PNG-ready image: index = class id, colours from the label set."""
        return palette_image(self.label_map, self.palette)

    def save(self, path) -> Path:
        path = Path(path)
        self.to_pil().save(path)
        return path


def blend_overlay(image: np.ndarray, label_map: np.ndarray, palette: np.ndarray, opacity: float) -> np.ndarray:
    """The label colours blended over ``image``: ``opacity`` 0 gives the image, 1 the colours."""
    blend = image.astype(np.float32) * (1 - opacity) + palette[label_map].astype(np.float32) * opacity
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise OptionError(f"device {device!r}: not a device name; use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index or 0) >= count:
            raise OptionError(f"device {device!r}: this machine has {count or 'no'} CUDA GPU(s); "
                              "use auto or cpu" + (f", or cuda:0..cuda:{count - 1}" if count else ""))
    return resolved


def class_argmax(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(0)`` for CxHxW scores (first maximum on ties), 4x faster than argmax's strided loop."""
    return scores.max(0).indices


def upsample_argmax(scores: torch.Tensor, size: tuple[int, int],
                    budget_bytes: int = _UPSAMPLE_BUDGET_BYTES) -> torch.Tensor:
    """Bilinear resize of CxHxW ``scores`` to ``size`` (align_corners=False), then argmax over classes.

    Works in bands of rows so a 182-class map of a 12-megapixel photo never exists whole in memory;
    each band samples exactly the points ``F.interpolate`` would.
    """
    c, _, _ = scores.shape
    out_h, out_w = size
    rows = max(1, budget_bytes // (4 * c * out_w))
    xs = (2 * torch.arange(out_w, device=scores.device, dtype=torch.float32) + 1) / out_w - 1
    labels = torch.empty(size, dtype=torch.int64, device=scores.device)
    src = scores[None].float()
    for top in range(0, out_h, rows):
        ys = (2 * torch.arange(top, min(top + rows, out_h), device=scores.device, dtype=torch.float32) + 1) / out_h - 1
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1)[None]
        band = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
        labels[top:top + len(ys)] = class_argmax(band[0])
    return labels


class Segmenter:
    """A loaded model plus the options of the inference pipeline; one model serves many option sets."""

    def __init__(self, model, class_names, palette, *, scales=DEFAULT_SCALES, crf: bool = False,
                 crf_params: DenseCRF | None = None, test_size: int = 513, device="auto", precision="auto",
                 max_pixels: int | None = MAX_IMAGE_PIXELS, batch_size: int = 4, name: str | None = None,
                 calibration=None):
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        if int(test_size) < 8:
            raise OptionError(f"test size must be at least 8 pixels, got {test_size}")
        self.model = model.to(self.device).eval()
        self.class_names = tuple(class_names)
        self.palette = np.asarray(palette, dtype=np.uint8)
        if len(self.class_names) != self.n_classes:
            raise ValueError(f"{len(self.class_names)} class names for a model with {self.n_classes} classes")
        self.scales = tuple(float(s) for s in scales)
        self.crf = bool(crf)
        self.crf_params = crf_params or DenseCRF()
        self.test_size = int(test_size)
        self.max_pixels = max_pixels
        self.batch_size = int(batch_size)
        self.name = name
        self.calibration = None if calibration is None else list(calibration)  # int8: images that set the ranges
        self._mean = torch.tensor(BGR_MEAN, dtype=torch.float64, device=self.device).view(1, 3, 1, 1)
        self._fast: dict = {}  # the accelerated copy (segcore.fast), built on first use, shared by with_options

    @classmethod
    def from_pretrained(cls, name_or_path, *, scales=DEFAULT_SCALES, crf: bool = False, test_size: int = 513,
                        device="auto", precision="auto", label_space=None, **kwargs) -> "Segmenter":
        """Load registry weights (``voc12``, ``cocostuff164k``, ``cocostuff10k``) or a checkpoint file.

        Class names come from the registry, the checkpoint's metadata, ``label_space``, or the class
        count (21: PASCAL VOC, 182: COCO-Stuff), in that order.
        """
        ckpt = resolve_checkpoint(name_or_path)
        names, palette = _labels_for(ckpt, label_space)
        model = load_model(ckpt, device="cpu")
        name = name_or_path if isinstance(name_or_path, str) and ckpt.path and name_or_path != str(ckpt.path) \
            else (ckpt.path.name if ckpt.path else None)
        return cls(model, names, palette, scales=scales, crf=crf, test_size=test_size, device=device,
                   precision=precision, name=name, **kwargs)

    @property
    def n_classes(self) -> int:
        return int(self.model.base.aspp.n_classes)

    def with_options(self, **changes) -> "Segmenter":
        """A Segmenter sharing this one's model with some options changed (scales, crf, test_size, ...)."""
        clone = object.__new__(Segmenter)
        clone.__dict__.update(self.__dict__)
        for key, value in changes.items():
            if key not in ("scales", "crf", "crf_params", "test_size", "max_pixels", "batch_size"):
                raise TypeError(f"cannot change {key!r} on a loaded Segmenter")
            if key == "scales":
                value = tuple(float(s) for s in value)
            setattr(clone, key, value)
        return clone

    # -- pipeline steps --------------------------------------------------------------------------

    def preprocess(self, image) -> tuple[np.ndarray, np.ndarray]:
        """(original RGB uint8, resized RGB uint8) for any accepted image input."""
        rgb = load_image(image, max_pixels=self.max_pixels)
        return rgb, resize_long_side(rgb, self.test_size)

    def to_tensor(self, resized: list[np.ndarray]) -> torch.Tensor:
        """Same-sized RGB uint8 images → Bx3xHxW float32, BGR, reference mean subtracted."""
        batch = torch.from_numpy(np.stack(resized)).to(self.device)
        batch = batch.flip(-1).permute(0, 3, 1, 2).to(torch.float64)
        return (batch - self._mean).to(torch.float32).contiguous()

    def _autocast(self):
        if self.precision in ("fp32", "fp32-fused"):
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def fast_path(self):
        """The accelerated model copy (:class:`segcore.fast.FastPath`) this Segmenter runs, or None for fp32.

        Built on first use from ``self.model`` (BatchNorm folded, channels-last, fused kernels, bf16/fp16
        where asked); the original model is never modified, so the fp32 path keeps the reference's
        numerics exactly.
        """
        if not uses_fast_path(self.device, self.precision):
            return None
        cache = self.__dict__.setdefault("_fast", {})
        if "path" not in cache:
            if self.precision == "int8":
                # ranges over the default scales and this Segmenter's: one calibration serves every option set
                scales = tuple(sorted(set(DEFAULT_SCALES) | set(self.scales)))
                cache["path"] = Int8Path(self.model.base, self.calibration_batches(), scales)
            else:
                cache["path"] = FastPath(self.model.base, self.device, self.precision)
        return cache["path"]

    def calibration_batches(self) -> list[torch.Tensor]:
        """The int8 calibration images (``calibration``, else the shipped photos), preprocessed as inputs are."""
        images = self.calibration if self.calibration is not None else calibration_images()
        if not images:
            raise OptionError("precision int8 needs calibration images; none were given")
        return [self.to_tensor([self.preprocess(image)[1]]) for image in images]

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Model logits (float32, output stride 8) for a preprocessed batch."""
        fast = self.fast_path()
        if fast is not None:
            return fast(batch, self.scales)
        with self._autocast():
            out = msc_forward(self.model.base, batch, self.scales)
        return out.float()

    @torch.inference_mode()
    def processing_scores(self, logits: torch.Tensor, resized: np.ndarray, *, probabilities: bool = False):
        """One image's logits (CxH8xW8) → ``(scores, probs)`` at the processing size.

        ``scores`` are what the labels come from: the upsampled logits, or the CRF's probabilities when
        CRF is on. ``probs`` (softmax, refined by the CRF when on) is None unless asked for or CRF is on.
        """
        h, w = resized.shape[:2]
        scores = F.interpolate(logits[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        probs = None
        if self.crf or probabilities:
            probs = F.softmax(scores, dim=0)
        if self.crf:
            probs = torch.from_numpy(self.crf_params(resized, probs.cpu().numpy())).to(scores.device)
            scores = probs
        return scores, probs

    @torch.inference_mode()
    def labels_from_scores(self, scores: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """Label map at ``size`` (the original image's) from processing-size scores."""
        labels = class_argmax(scores) if tuple(scores.shape[-2:]) == tuple(size) else upsample_argmax(scores, size)
        dtype = np.uint8 if self.n_classes <= 256 else np.int32
        return labels.cpu().numpy().astype(dtype)

    def postprocess(self, logits: torch.Tensor, original: np.ndarray, resized: np.ndarray,
                    return_probs: bool = False) -> Prediction:
        """One image's logits (CxH8xW8) → :class:`Prediction` at the original size."""
        scores, probs = self.processing_scores(logits, resized, probabilities=return_probs)
        return Prediction(self.labels_from_scores(scores, original.shape[:2]), self.class_names, self.palette,
                          image=original, probabilities=probs.cpu().numpy() if return_probs else None,
                          processing_size=resized.shape[:2])

    # -- public entry points ---------------------------------------------------------------------

    def predict(self, image, *, return_probs: bool = False) -> Prediction:
        """Segment one image (path, bytes, PIL image or RGB array)."""
        return self.predict_batch([image], return_probs=return_probs)[0]

    def predict_batch(self, images, *, return_probs: bool = False) -> list[Prediction]:
        """Segment several images; those that share a processing size run through the model together."""
        return self.predict_prepared([self.preprocess(image) for image in images], return_probs=return_probs)

    def predict_prepared(self, prepared, *, return_probs: bool = False) -> list[Prediction]:
        """Segment ``(original, resized)`` pairs from :meth:`preprocess`, so callers can decode elsewhere
        (a background thread) while the model runs."""
        results: list[Prediction | None] = [None] * len(prepared)
        by_size: dict[tuple, list[int]] = {}
        for i, (_, resized) in enumerate(prepared):
            by_size.setdefault(resized.shape, []).append(i)
        for indices in by_size.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                logits = self.logits(self.to_tensor([prepared[i][1] for i in chunk]))
                for row, i in enumerate(chunk):
                    results[i] = self.postprocess(logits[row], *prepared[i], return_probs=return_probs)
        return results

    def describe(self) -> dict:
        """The options that determine the output, for reports."""
        return {"weights": self.name, "scales": list(self.scales), "crf": self.crf, "test_size": self.test_size,
                "device": str(self.device), "precision": self.precision, "n_classes": self.n_classes,
                **({"calibration": len(self.calibration) if self.calibration is not None else "shipped"}
                   if self.precision == "int8" else {})}


def _labels_for(ckpt, label_space) -> tuple[tuple[str, ...], np.ndarray]:
    if label_space is not None:
        space = get_label_space(label_space)
    elif ckpt.meta.get("label_space") in ("voc", "cocostuff") and not ckpt.meta.get("class_names"):
        space = get_label_space(ckpt.meta["label_space"])
    elif ckpt.meta.get("class_names"):
        names = tuple(ckpt.meta["class_names"])
        space = builtin_label_space(names)
        if space is None:
            return names, voc_colormap(len(names))
    else:
        by_count = {21: "voc", 182: "cocostuff"}
        if ckpt.n_classes not in by_count:
            names = tuple(f"class_{i}" for i in range(ckpt.n_classes))
            return names, voc_colormap(ckpt.n_classes)
        space = get_label_space(by_count[ckpt.n_classes])
    names = tuple(space.class_names)
    if len(names) != ckpt.n_classes:
        raise LabelCountError(f"{ckpt.path or 'checkpoint'}: the checkpoint has {ckpt.n_classes} classes but the label set "
                              f"{getattr(space, 'name', '?')!r} has {len(names)}; give a labels file with "
                              f"{ckpt.n_classes} class names (one per line), or weights trained on that label set")
    return names, np.asarray(space.palette, np.uint8)[: len(names)]


