"""Prediction-side label mapping: a model's classes translated into the evaluation's label space.

A COCO-Stuff model can then be scored on VOC-named annotations (``cocostuff->voc``), or any model
through a user file in the annotation mapping's style (``annotations.LabelMapping``: model class
name -> evaluation class name or ``__ignore__``). Pixels predicted as an ``__ignore__`` class are
left out of the scores, like ground-truth ignore pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from annotations import AnnotationError, LabelMapping, builtin_label_space, label_space_for_names

from .errors import SegcoreError

__all__ = ["BUILTIN", "PredictionMap", "PredictionMapError", "prediction_map"]

IGNORE = 255

_COCOSTUFF_TO_VOC = {
    "airplane": "aeroplane", "bicycle": "bicycle", "bird": "bird", "boat": "boat", "bottle": "bottle",
    "bus": "bus", "car": "car", "cat": "cat", "chair": "chair", "cow": "cow", "dining table": "diningtable",
    "dog": "dog", "horse": "horse", "motorcycle": "motorbike", "person": "person", "potted plant": "pottedplant",
    "sheep": "sheep", "couch": "sofa", "train": "train", "tv": "tvmonitor",
}

BUILTIN = {
    ("cocostuff", "voc"): {"map": _COCOSTUFF_TO_VOC, "rules": [{"pattern": ".*", "to": "background"}]},
}
"""Built-in mappings by (model label space, evaluation label space); CLI name ``cocostuff->voc``."""


class PredictionMapError(SegcoreError):
    """The model's classes cannot be put into the evaluation's label space."""


@dataclass(frozen=True)
class PredictionMap:
    """A lookup table: model class id -> evaluation class id (255: leave the pixel out)."""

    name: str
    table: np.ndarray

    def __call__(self, pred: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mapped prediction, label with the pixels of ignored predictions set to ignore)."""
        mapped = self.table[pred]
        dropped = mapped == IGNORE
        if dropped.any():
            label = np.where(dropped, IGNORE, label).astype(label.dtype)
            mapped = np.where(dropped, 0, mapped)
        return mapped.astype(np.uint8 if len(self.table) <= 256 else np.int32), label

    def describe(self) -> dict:
        return {"name": self.name, "table": [int(v) for v in self.table]}


def _space_name(names) -> str | None:
    space = builtin_label_space(tuple(names))
    return None if space is None else space.name


def _build(name: str, rules, model_names, eval_names) -> PredictionMap:
    try:
        mapping = LabelMapping.coerce(rules)
        space = label_space_for_names(tuple(eval_names))
        mapping.validate(space)
    except AnnotationError as exc:
        raise PredictionMapError(f"prediction mapping {name}: {exc}") from exc
    table = np.full(len(model_names), IGNORE, np.int64)
    unmapped = []
    for i, cls in enumerate(model_names):
        idx = mapping.resolve(cls, space)
        if idx is None:
            unmapped.append(cls)
        else:
            table[i] = idx
    if unmapped:
        shown = ", ".join(repr(c) for c in unmapped[:10]) + (" ..." if len(unmapped) > 10 else "")
        raise PredictionMapError(f"prediction mapping {name}: the model's classes {shown} map to no class of "
                                 f"the evaluation's label space; map them (to a class or __ignore__)")
    return PredictionMap(name, table)


def prediction_map(model_names, eval_names, pred_map=None) -> PredictionMap | None:
    """The mapping from ``model_names`` to ``eval_names``, or None when the two are the same.

    ``pred_map``: None (automatic: a built-in mapping when the label spaces differ and one exists),
    a built-in name such as ``"cocostuff->voc"``, or a YAML/JSON file path.
    """
    model_names, eval_names = tuple(model_names), tuple(eval_names)
    if pred_map is None:
        if model_names == eval_names:
            return None
        key = (_space_name(model_names), _space_name(eval_names))
        if key in BUILTIN:
            return _build(f"{key[0]}->{key[1]}", BUILTIN[key], model_names, eval_names)
        model = key[0] or f"{len(model_names)} classes"
        target = key[1] or f"{len(eval_names)} classes"
        raise PredictionMapError(f"the model's label space ({model}) differs from the evaluation's ({target}) and "
                                 "there is no built-in mapping between them; pass --pred-map FILE (YAML/JSON: "
                                 "model class: evaluation class or __ignore__) or evaluate against the model's "
                                 "classes")
    text = str(pred_map)
    if "->" in text and not text.lower().endswith((".yaml", ".yml", ".json")):
        source, _, target = text.partition("->")
        key = (source.strip(), target.strip())
        if key not in BUILTIN:
            known = ", ".join(f"{a}->{b}" for a, b in BUILTIN)
            raise PredictionMapError(f"unknown built-in prediction mapping {text!r} (built in: {known})")
        if _space_name(model_names) != key[0] or _space_name(eval_names) != key[1]:
            raise PredictionMapError(f"prediction mapping {text} needs a {key[0]} model evaluated against {key[1]} "
                                     f"classes; this model has {len(model_names)} classes, the evaluation "
                                     f"{len(eval_names)}")
        return _build(text, BUILTIN[key], model_names, eval_names)
    from pathlib import Path

    if not Path(text).is_file():
        raise PredictionMapError(f"{text}: prediction mapping file not found (or use a built-in: "
                                 f"{', '.join(f'{a}->{b}' for a, b in BUILTIN)})")
    return _build(text, text, model_names, eval_names)
