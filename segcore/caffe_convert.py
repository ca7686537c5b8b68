"""DeepLab-v2 ResNet-101 Caffe layers -> this project's state dict, checked against the model it builds.

The steps, each a function below: read the file (:mod:`segcore.caffe_wire`), sort its layers by name
(:mod:`segcore.caffe_names`), check the multi-scale copies, infer the architecture from names and blob
shapes, build that model, copy every blob into it (checking shapes, convolution geometry and BatchNorm
eps against the model's modules), check that every parameter was filled, then describe the result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from annotations import get_label_space

from .caffe_names import SortedLayers, caffe_name_for, has_numbered_blocks, sort_layers
from .caffe_wire import Blob, Layer, read_caffemodel
from .errors import CheckpointError
from .model import DEFAULT_RATES, build_model

KINDS = ("deeplabv2-voc", "init-coco")
VOC_CLASSES = 21

_BLOCK_MODULE = re.compile(r"^base\.layer(\d)\.block(\d+)\.")


def convert_caffemodel(path: str | Path, *, kind: str = "deeplabv2-voc", keep_classifier: bool = False):
    """Convert a DeepLab-v2 ResNet-101 ``.caffemodel`` to this project's state dict.

    ``kind``: ``deeplabv2-voc`` (``train_iter_20000`` / ``train2_iter_20000``: full model, classifier kept,
    21 classes) or ``init-coco`` (``init.caffemodel``: backbone; the classifier is dropped unless
    ``keep_classifier``). Returns ``(state_dict, report)``; ``report["meta"]`` is the metadata to store
    with :func:`segcore.checkpoint.save_checkpoint`. Every tensor is checked against a model built with
    :func:`segcore.build_model` for the inferred architecture, and every convolution's kernel, stride,
    padding and dilation and every BatchNorm's eps against that model's modules.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    path = Path(path)
    layout, layers = read_caffemodel(path)
    sorted_layers = sort_layers(path, layers, kind, keep_classifier)
    warnings = _check_multiscale_copies(path, sorted_layers)
    arch = _infer_architecture(path, sorted_layers.mapped, kind, keep_classifier)
    model = build_model(
        arch.n_classes if arch.use_classifier else 1,
        n_blocks=tuple(arch.n_blocks),
        width=tuple(arch.width),
        atrous_rates=arch.model_rates,
        stride_in_1x1=arch.stride_in_1x1,
    )
    copied = _copy_layers(path, sorted_layers, model, arch)
    expected = model.state_dict()
    _check_every_parameter_filled(path, expected, copied.state, arch)
    state = {k: copied.state[k] for k in expected if k in copied.state}  # the model's key order
    meta = _checkpoint_meta(path, kind, arch)
    report = {
        "source": str(path),
        "kind": kind,
        "layout": layout,
        "layers": len(layers),
        "converted_layers": len(copied.converted),
        "ignored_layers": len(sorted_layers.ignored),
        "shared_layers_skipped": [layer.name for layer, _ in sorted_layers.shared],
        "classifier": (
            "kept"
            if arch.use_classifier
            else ("dropped: " + ", ".join(copied.dropped) if copied.dropped else "none")
        ),
        "classifier_classes": arch.n_classes if arch.classifier else None,
        "architecture": {
            "n_classes": arch.n_classes if arch.use_classifier else None,
            "n_blocks": list(arch.n_blocks),
            "width": arch.width,
            "atrous_rates": arch.rates,
            "stride_in_1x1": arch.stride_in_1x1,
        },
        "bn_factor_range": [min(copied.bn_factors), max(copied.bn_factors)] if copied.bn_factors else None,
        "tensors": len(state),
        "warnings": warnings,
        "meta": meta,
    }
    return state, report


def _check_multiscale_copies(path: Path, layers: SortedLayers) -> list[str]:
    """The multi-scale branches share the main branch's weights: a warning for each copy that differs."""
    warnings = []
    for layer, main_name in layers.shared:
        main = layers.by_name.get(main_name)
        if main is None or not main.blobs:
            raise CheckpointError(
                f"{path}: layer '{layer.name}' looks like a multi-scale copy of "
                f"'{main_name}', but there is no such layer with weights"
            )
        same = len(main.blobs) == len(layer.blobs) and all(
            a.data.shape == b.data.shape and np.array_equal(a.data, b.data)
            for a, b in zip(main.blobs, layer.blobs)
        )
        if not same:
            warnings.append(
                f"multi-scale layer '{layer.name}' differs from '{main_name}'; "
                f"the main branch's weights were used"
            )
    return warnings


@dataclass
class _Architecture:
    """What the layer names and blob shapes say about the network."""

    n_blocks: list[int]
    numbered_stages: set[int]  # stages whose blocks are numbered (res4b22) rather than lettered
    width: list[int]
    classifier: list[Layer]  # the ASPP branches c0, c1 ... in order; empty when the file has none
    n_classes: int  # of the file's classifier (1 without one)
    rates: list[int]  # the classifier's dilations
    use_classifier: bool
    stride_in_1x1: bool

    @property
    def model_rates(self) -> tuple[int, ...]:
        return tuple(self.rates) if self.use_classifier else DEFAULT_RATES


def _infer_architecture(path: Path, mapped: dict, kind: str, keep_classifier: bool) -> _Architecture:
    n_blocks, numbered_stages = _stage_blocks(path, mapped)
    width = _stage_widths(path, mapped)
    classifier = _classifier_branches(path, mapped, kind, keep_classifier)
    use_classifier = bool(classifier) and (kind == "deeplabv2-voc" or keep_classifier)
    n_classes, rates = _classifier_shape(path, classifier, kind, use_classifier)
    res3 = mapped.get(("base.layer3.block1.conv3x3.conv", "conv"))
    # a stride in res3a's 3x3 is a torchvision-style bottleneck; the copy still compares every stride
    torchvision_style = res3 is not None and res3.conv is not None and res3.conv.stride[0] == 2
    return _Architecture(
        n_blocks, numbered_stages, width, classifier, n_classes, rates, use_classifier, not torchvision_style
    )


def _stage_blocks(path: Path, mapped: dict) -> tuple[list[int], set[int]]:
    """Blocks per stage (res2..res5) and the stages whose block names are numbered."""
    n_blocks = [0, 0, 0, 0]
    numbered_stages: set[int] = set()
    for (module, _role), layer in mapped.items():
        m = _BLOCK_MODULE.match(module)
        if m:
            stage = int(m[1])
            n_blocks[stage - 2] = max(n_blocks[stage - 2], int(m[2]))
            if has_numbered_blocks(layer.name):
                numbered_stages.add(stage)
    if min(n_blocks) == 0:
        missing = [f"res{i + 2}" for i, n in enumerate(n_blocks) if n == 0]
        raise CheckpointError(
            f"{path}: no layers for stage(s) {', '.join(missing)}: not a ResNet DeepLab model "
            "(or the file is incomplete)"
        )
    return n_blocks, numbered_stages


def _stage_widths(path: Path, mapped: dict) -> list[int]:
    """Each stage's output channels, from its first block's last convolution (res2a..res5a_branch2c)."""
    width = []
    for stage in range(2, 6):
        layer = mapped.get((f"base.layer{stage}.block1.increase.conv", "conv"))
        if layer is None:
            raise CheckpointError(
                f"{path}: missing layer res{stage}a_branch2c (needed for the stage's width)"
            )
        width.append(int(layer.blobs[0].shape[0]) if layer.blobs[0].shape else 0)
    if any(w < 4 or w % 4 for w in width):
        raise CheckpointError(
            f"{path}: stage widths {width} (from res2a..res5a_branch2c) are not ResNet-like"
        )
    return width


def _classifier_branches(path: Path, mapped: dict, kind: str, keep_classifier: bool) -> list[Layer]:
    """The ASPP classifier layers in branch order; refused unless they are c0, c1, ... and fit ``kind``."""
    classifier = sorted(
        (
            (int(module.split(".")[2][1:]), layer)
            for (module, role), layer in mapped.items()
            if role == "classifier"
        ),
        key=lambda t: t[0],
    )
    branches = [i for i, _ in classifier]
    if classifier and branches != list(range(len(branches))):
        raise CheckpointError(
            f"{path}: ASPP classifier branches {branches} (from "
            f"{', '.join(layer.name for _, layer in classifier)}) are not c0, c1, ..."
        )
    if kind == "deeplabv2-voc" and not classifier:
        raise CheckpointError(
            f"{path}: no ASPP classifier layers (fc1_*_c0 ..): not a DeepLab-v2 model; "
            "for the COCO initialisation use kind init-coco"
        )
    if kind == "init-coco" and keep_classifier and not classifier:
        raise CheckpointError(f"{path}: keep_classifier was asked for, but the file has no classifier layers")
    return [layer for _, layer in classifier]


def _classifier_shape(path: Path, classifier: list[Layer], kind: str, use_classifier: bool):
    """``(n_classes, dilations)`` of the classifier branches; ``(1, [])`` without any."""
    if not classifier:
        return 1, []
    first = classifier[0]
    n_classes = int(first.blobs[0].shape[0]) if first.blobs[0].shape else 0
    if n_classes < 1:
        raise CheckpointError(f"{path}: classifier '{first.name}' has an empty weight blob")
    rates = [int(layer.conv.dilation[0] if layer.conv is not None else 1) for layer in classifier]
    if kind == "deeplabv2-voc" and n_classes != VOC_CLASSES:
        raise CheckpointError(
            f"{path}: its classifier '{first.name}' has {n_classes} classes; the VOC "
            f"models have {VOC_CLASSES} (for the COCO initialisation use kind init-coco)"
        )
    if use_classifier and any(r < 1 for r in rates):
        raise CheckpointError(f"{path}: classifier dilations {rates} are not positive")
    return n_classes, rates


@dataclass
class _Copied:
    state: dict[str, torch.Tensor]
    bn_factors: list[float]  # each BatchNorm layer's moving-average factor (for the report)
    converted: list[str]  # names of the layers copied
    dropped: list[str]  # names of the classifier layers left out


def _copy_layers(path: Path, layers: SortedLayers, model, arch: _Architecture) -> _Copied:
    """Every mapped layer's blobs into the model's parameter names, in file order."""
    expected = model.state_dict()
    modules = dict(model.named_modules())
    copied = _Copied({}, [], [], [layer.name for layer in layers.lone_fc])
    for (module_path, role), layer in sorted(layers.mapped.items(), key=lambda item: item[1].index):
        if role == "classifier" and not arch.use_classifier:
            copied.dropped.append(layer.name)
            continue
        module = modules.get(module_path)
        if module is None:
            raise CheckpointError(
                f"{path}: layer '{layer.name}' maps to {module_path}, which the model does not have"
            )
        for suffix, (array, exact) in _layer_arrays(path, layer, role, module).items():
            key = f"{module_path}.{suffix}"
            copied.state[key] = _fitted(path, expected.get(key), key, array, layer, exact, arch.n_blocks)
        if role == "bn":
            copied.bn_factors.append(float(layer.blobs[2].data[0]))
        copied.converted.append(layer.name)
    return copied


def _fitted(path: Path, target, key: str, array: np.ndarray, layer: Layer, exact_shape: bool, n_blocks):
    """``array`` as a tensor of ``target``'s shape; refused when there is no target or it does not fit."""
    if target is None:
        raise CheckpointError(
            f"{path}: layer '{layer.name}' maps to {key}, which the model "
            f"(n_blocks {tuple(n_blocks)}) does not have"
        )
    ok = tuple(array.shape) == tuple(target.shape) if exact_shape else array.size == target.numel()
    if not ok:
        raise CheckpointError(
            f"{path}: layer '{layer.name}': blob shape {tuple(array.shape)} does not fit "
            f"{key} {tuple(target.shape)}"
        )
    # blob arrays own their memory (copied out of the file buffer), so no further copy is needed
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).reshape(tuple(target.shape)))


def _check_every_parameter_filled(path: Path, expected: dict, state: dict, arch: _Architecture) -> None:
    unfilled = [
        k
        for k in expected
        if k not in state
        and not k.endswith("num_batches_tracked")
        and not (".aspp." in k and not arch.use_classifier)
    ]
    if unfilled:
        listed = ", ".join(
            f"{k} (from Caffe layer {caffe_name_for(k, arch.numbered_stages)})" for k in unfilled[:10]
        )
        raise CheckpointError(
            f"{path}: {len(unfilled)} model parameters have no layer in the file: {listed}"
            + (" ..." if len(unfilled) > 10 else "")
            + " (is the file complete?)"
        )


def _checkpoint_meta(path: Path, kind: str, arch: _Architecture) -> dict:
    """The metadata a converted checkpoint carries (see docs/caffe.md)."""
    meta: dict = {
        "source": path.name,
        "kind": kind,
        "converted_from": "caffe",
        "backbone_only": not arch.use_classifier,
        "stride_in_1x1": arch.stride_in_1x1,
    }
    if arch.use_classifier:
        meta["atrous_rates"] = list(arch.model_rates)
        meta["n_classes"] = arch.n_classes
    if kind == "deeplabv2-voc":
        meta["class_names"] = list(get_label_space("voc").class_names)
        meta["label_space"] = "voc"
    return meta


def _layer_arrays(path: Path, layer: Layer, role: str, module) -> dict[str, tuple[np.ndarray, bool]]:
    """The tensors one Caffe layer gives its module: ``{param: (array, shape must match exactly)}``.

    Checks blob counts, convolution geometry and BatchNorm eps against ``module`` on the way.
    """
    lname = f"'{layer.name}'"

    def arr(i):
        return _tensor(layer.blobs[i], f"{path}: layer {lname} blob {i}")

    if role in ("conv", "classifier"):
        want_bias = role == "classifier"
        if len(layer.blobs) != (2 if want_bias else 1):
            raise CheckpointError(
                f"{path}: layer {lname} has {len(layer.blobs)} blobs; expected "
                + (
                    "weight and bias (the ASPP classifiers have a bias)"
                    if want_bias
                    else "only a weight (the backbone convolutions have no bias)"
                )
            )
        _check_conv(path, layer, module)
        return {"weight": (arr(0), True), **({"bias": (arr(1), False)} if want_bias else {})}
    if role == "bn":
        if len(layer.blobs) != 3:
            raise CheckpointError(
                f"{path}: BatchNorm layer {lname} has {len(layer.blobs)} blobs; expected 3 "
                "(mean, variance, moving-average factor)"
            )
        eps = 1e-5 if layer.bn_eps is None else layer.bn_eps
        if not np.isclose(eps, module.eps, rtol=1e-3, atol=0):
            raise CheckpointError(
                f"{path}: BatchNorm layer {lname} has eps {eps:g}; the model uses {module.eps:g}"
            )
        factor = layer.blobs[2].data
        if factor.size != 1:
            raise CheckpointError(
                f"{path}: BatchNorm layer {lname}: its third blob (moving-average factor) "
                f"holds {factor.size} values, expected 1"
            )
        s = np.float32(factor[0])
        scale = np.float32(0) if s == 0 else np.float32(1) / s  # exactly as Caffe's BatchNormLayer
        return {"running_mean": (arr(0) * scale, False), "running_var": (arr(1) * scale, False)}
    if len(layer.blobs) != 2:
        raise CheckpointError(
            f"{path}: Scale layer {lname} has {len(layer.blobs)} blobs; expected 2 (scale and bias)"
        )
    return {"weight": (arr(0), False), "bias": (arr(1), False)}


def _check_conv(path: Path, layer: Layer, module: torch.nn.Conv2d) -> None:
    if layer.conv is None:
        raise CheckpointError(
            f"{path}: layer '{layer.name}' has no convolution_param, so its kernel, stride, "
            "padding and dilation cannot be checked"
        )
    p = layer.conv
    kernel = p.kernel or tuple(int(d) for d in layer.blobs[0].shape[-2:])
    got = {
        "kernel": tuple(kernel),
        "stride": tuple(p.stride),
        "pad": tuple(p.pad),
        "dilation": tuple(p.dilation),
        "group": p.group,
    }
    want = {
        "kernel": tuple(module.kernel_size),
        "stride": tuple(module.stride),
        "pad": tuple(module.padding),
        "dilation": tuple(module.dilation),
        "group": module.groups,
    }
    bad = [f"{k} {got[k]} (model {want[k]})" for k in got if got[k] != want[k]]
    if p.num_output is not None and p.num_output != module.out_channels:
        bad.append(f"num_output {p.num_output} (model {module.out_channels})")
    if bad:
        raise CheckpointError(
            f"{path}: convolution '{layer.name}' does not match the DeepLab-v2 architecture: "
            + "; ".join(bad)
        )


def _tensor(blob: Blob, where: str) -> np.ndarray:
    count = int(np.prod(blob.shape)) if blob.shape else 1
    if count != blob.data.size:
        raise CheckpointError(
            f"{where}: blob shape {blob.shape} holds {count} values but the file has {blob.data.size}"
        )
    return blob.data.reshape(blob.shape) if blob.shape else blob.data
