"""Caffe layer names of MSRA's ResNet-101 and DeepLab-v2 -> this project's module paths.

MSRA names: ``conv1``/``bn_conv1``/``scale_conv1`` (stem), ``res4b22_branch2b``/``bn4b22_branch2b``/
``scale4b22_branch2b`` (block convolution, BatchNorm statistics, BatchNorm affine terms); blocks are
lettered ``a, b, c`` in stages 2 and 5 and ``a, b1, b2 ...`` in the deep stages. DeepLab adds the
ASPP classifiers ``fc1_voc12_c0`` .. ``c3`` (``fc1_c0`` .. in the COCO initialisation) and the
multi-scale copies ``*_res075`` / ``*_res05`` that share the main branch's weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .caffe_wire import Layer
from .errors import CheckpointError

SHARED_COPY = re.compile(r"^(?P<main>.+)_res0\d*$")
"""A multi-scale branch's copy of the layer ``main`` (same weights)."""

_STEM = {"conv1": "conv", "bn_conv1": "bn", "scale_conv1": "scale"}
_BLOCK = re.compile(
    r"^(?P<prefix>res|bn|scale)(?P<stage>[2-5])(?P<block>[a-z]\d*)_branch(?P<part>1|2a|2b|2c)$"
)
_NUMBERED_BLOCK = re.compile(r"\d[a-z]\d+_")
_PARTS = {"1": "shortcut", "2a": "reduce", "2b": "conv3x3", "2c": "increase"}
_ROLES = {"res": "conv", "bn": "bn", "scale": "scale"}
_CLASSIFIER = re.compile(r"^fc\d*_(?:.*_)?c(?P<branch>\d+)$")
_LONE_FC = re.compile(r"^fc\d*(?:_[A-Za-z0-9]+)*$")
_ROLE_TYPES = {
    "conv": ("Convolution",),
    "bn": ("BatchNorm",),
    "scale": ("Scale",),
    "classifier": ("Convolution",),
}
_KEY = re.compile(r"^base\.layer(\d)\.block(\d+)\.(\w+)\.(conv|bn)\.(\w+)$")


def block_index(code: str) -> int:
    """``a`` -> 1, ``b`` -> 2, ``c`` -> 3 ...; ``b1`` -> 2, ``b2`` -> 3, ... ``b22`` -> 23."""
    if len(code) == 1:
        return ord(code) - ord("a") + 1
    if code[0] != "b":
        raise ValueError(code)
    return int(code[1:]) + 1


def map_layer_name(name: str) -> tuple[str, str] | None:
    """``(module path, role)`` of a Caffe layer name, or None when it is not a DeepLab-v2 ResNet layer.

    Roles: ``conv`` (backbone convolution), ``bn`` (BatchNorm statistics), ``scale`` (BatchNorm affine
    terms) and ``classifier`` (an ASPP branch; the module path is ``base.aspp.cN``).
    """
    if name in _STEM:
        role = _STEM[name]
        return ("base.layer1.conv1.conv" if role == "conv" else "base.layer1.conv1.bn"), role
    m = _BLOCK.match(name)
    if m:
        try:
            block = block_index(m["block"])
        except ValueError:
            return None
        role = _ROLES[m["prefix"]]
        unit = f"base.layer{m['stage']}.block{block}.{_PARTS[m['part']]}"
        return (unit + ".conv" if role == "conv" else unit + ".bn"), role
    m = _CLASSIFIER.match(name)
    if m:
        return f"base.aspp.c{int(m['branch'])}", "classifier"
    return None


def has_numbered_blocks(name: str) -> bool:
    """Whether a block layer's name numbers its blocks (``res4b22_branch2b``) instead of lettering them."""
    return bool(_NUMBERED_BLOCK.search(name))


def caffe_name_for(key: str, numbered_stages: set[int]) -> str:
    """The Caffe layer a model key would come from (for error messages)."""
    m = _KEY.match(key)
    if m:
        stage, block, part, kind, param = int(m[1]), int(m[2]), m[3], m[4], m[5]
        if stage in numbered_stages:
            code = "a" if block == 1 else f"b{block - 1}"
        else:
            code = chr(ord("a") + block - 1)
        branch = {v: k for k, v in _PARTS.items()}[part]
        prefix = "res" if kind == "conv" else ("bn" if param.startswith("running") else "scale")
        return f"{prefix}{stage}{code}_branch{branch}"
    if key.startswith("base.layer1.conv1.conv"):
        return "conv1"
    if key.startswith("base.layer1.conv1.bn"):
        return "bn_conv1" if "running" in key else "scale_conv1"
    if key.startswith("base.aspp.c"):
        return f"fc1_*_c{key.split('.')[2][1:]}"
    return "?"


@dataclass
class SortedLayers:
    """A file's layers sorted by what their names say (see :func:`sort_layers`)."""

    mapped: dict[tuple[str, str], Layer] = field(default_factory=dict)
    """``(module path, role)`` -> the layer that fills it."""
    shared: list[tuple[Layer, str]] = field(default_factory=list)
    """Multi-scale copies and the name of the main layer they copy."""
    ignored: list[str] = field(default_factory=list)
    """Layers without weights (data, ReLU, Eltwise ...)."""
    lone_fc: list[Layer] = field(default_factory=list)
    """Classifiers that are not ASPP branches (``fc1``, ``fc1000``: COCO initialisation only)."""
    by_name: dict[str, Layer] = field(default_factory=dict)


def sort_layers(path: Path, layers: list[Layer], kind: str, keep_classifier: bool) -> SortedLayers:
    """Map each layer with blobs to ``(module path, role)``; set multi-scale copies and weightless aside.

    Refuses layers with weights and no place in the model, two layers for one module, a layer whose
    type contradicts its name, and a file without ``conv1``.
    """
    out = SortedLayers()
    unknown: list[str] = []
    duplicates: list[str] = []
    for layer in layers:
        if layer.name in out.by_name and layer.blobs:
            raise CheckpointError(f"{path}: two layers named '{layer.name}' carry weights")
        out.by_name.setdefault(layer.name, layer)
        if not layer.blobs:
            out.ignored.append(layer.name)
            continue
        m = SHARED_COPY.match(layer.name)
        if m:
            out.shared.append((layer, m["main"]))
            continue
        target = map_layer_name(layer.name)
        if target is None:
            if kind == "init-coco" and _LONE_FC.match(layer.name):
                out.lone_fc.append(layer)  # a single (DeepLab-v1 style) or foreign classifier
            else:
                unknown.append(f"{layer.name} ({layer.type or 'no type'})")
            continue
        if target in out.mapped:
            duplicates.append(
                f"'{out.mapped[target].name}' and '{layer.name}' both map to {target[0]} ({target[1]})"
            )
            continue
        _check_type_and_shape(path, layer, target[1])
        out.mapped[target] = layer
    if unknown:
        hint = ""
        if not any(t[1] == "conv" for t in out.mapped):
            hint = (
                " - this does not look like a ResNet DeepLab (VGG-16 DeepLab-v1/v2 models are not supported)"
            )
        raise CheckpointError(
            f"{path}: {len(unknown)} layers with weights have no place in DeepLab-v2 "
            f"ResNet-101: {', '.join(unknown[:12])}{' ...' if len(unknown) > 12 else ''}{hint}"
        )
    has_aspp = any(role == "classifier" for _, role in out.mapped)
    if out.lone_fc and keep_classifier:
        if len(out.lone_fc) > 1 or has_aspp:
            raise CheckpointError(
                f"{path}: cannot keep the classifier: layers "
                f"{', '.join(layer.name for layer in out.lone_fc)} do not fit the ASPP branches "
                "fc*_c0, fc*_c1, ..."
            )
        out.mapped[("base.aspp.c0", "classifier")] = out.lone_fc.pop()
    if duplicates:
        raise CheckpointError(f"{path}: layers {'; '.join(duplicates[:5])}")
    if ("base.layer1.conv1.conv", "conv") not in out.mapped:
        raise CheckpointError(
            f"{path}: no 'conv1' layer with weights: not an MSRA ResNet DeepLab model "
            f"(layers: {', '.join(layer.name for layer in layers[:8])} ...)"
        )
    return out


def _check_type_and_shape(path: Path, layer: Layer, role: str) -> None:
    expected_types = _ROLE_TYPES[role]
    if (
        layer.type
        and layer.type != "NONE"
        and not layer.type.startswith("V1 type")
        and layer.type not in expected_types
    ):
        raise CheckpointError(
            f"{path}: layer '{layer.name}' is a {layer.type} layer; its name says "
            f"{' or '.join(expected_types)}"
        )
    if role in ("conv", "classifier") and len(layer.blobs[0].shape) != 4:
        raise CheckpointError(
            f"{path}: convolution '{layer.name}' has a weight blob of shape "
            f"{layer.blobs[0].shape}; expected 4-D (out, in, kh, kw)"
        )
