"""Starting weights: a published DeepLab-v2 checkpoint, a Caffe-converted backbone, or torchvision ResNet.

Nothing is downloaded here except a segcore registry name given on purpose (``model.init.path: voc12``);
files are read by :mod:`segcore.checkpoint` (tensors only: ``torch.load(weights_only=True)``, safetensors).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from segcore.aspp_v3 import ASPPv3
from segcore.checkpoint import (classifier_key, head_of, normalize_keys, read_backbone, read_checkpoint_file,
                                resolve_checkpoint, state_mismatch)
from segcore.errors import CheckpointError

from .errors import TrainError


def reset_classifier(model: nn.Module) -> None:
    """Re-initialise the ASPP class scores as the reference does: weights normal(0, 0.01), biases 0.

    The v3 head is initialised fresh as a whole (its own ``reset_parameters``).
    """
    aspp = model.base.aspp
    if isinstance(aspp, ASPPv3):
        aspp.reset_parameters()
        return
    for conv in aspp.children():
        nn.init.normal_(conv.weight, mean=0.0, std=0.01)
        nn.init.constant_(conv.bias, 0.0)


_TV_PARTS = {"conv1": "reduce.conv", "bn1": "reduce.bn", "conv2": "conv3x3.conv", "bn2": "conv3x3.bn",
             "conv3": "increase.conv", "bn3": "increase.bn", "downsample.0": "shortcut.conv",
             "downsample.1": "shortcut.bn"}
_TV_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(conv[123]|bn[123]|downsample\.[01])\.(.+)$")


def convert_torchvision(state: dict) -> dict:
    """torchvision ResNet keys -> this project's ``base.*`` keys (``fc`` dropped).

    torchvision ``layer1..4`` are our ``layer2..5``; block ``.0`` is ``block1``; conv1/bn1 -> reduce,
    conv2/bn2 -> conv3x3, conv3/bn3 -> increase, downsample.0/.1 -> shortcut.conv/.bn; the stem's conv1/bn1
    -> layer1.conv1.conv/.bn. The model must be built with ``stride_in_1x1=False``.
    """
    out = {}
    unknown = []
    for key, value in state.items():
        k = key[len("module."):] if key.startswith("module.") else key
        if k.startswith("fc."):
            continue
        if k.startswith("conv1."):
            out["base.layer1.conv1.conv." + k[len("conv1."):]] = value
            continue
        if k.startswith("bn1."):
            out["base.layer1.conv1.bn." + k[len("bn1."):]] = value
            continue
        m = _TV_BLOCK.match(k)
        if not m:
            unknown.append(key)
            continue
        stage, block, part, rest = m.groups()
        out[f"base.layer{int(stage) + 1}.block{int(block) + 1}.{_TV_PARTS[part]}.{rest}"] = value
    if unknown:
        raise TrainError(f"not a torchvision ResNet state dict: unexpected keys {', '.join(unknown[:8])}")
    return out


def _read_weights(path: Path) -> dict:
    """The file's tensors, by segcore's checkpoint reader (a ``.caffemodel`` is converted as a backbone)."""
    if not path.is_file():
        raise TrainError(f"{path}: no such weights file (model.init.path); nothing is downloaded")
    try:
        if path.suffix == ".caffemodel":
            return read_backbone(path)
        return read_checkpoint_file(path)["state_dict"]
    except CheckpointError as exc:
        raise TrainError(str(exc)) from exc


def detect_format(state: dict) -> str:
    keys = [k[len("module."):] if k.startswith("module.") else k for k in state]
    if "conv1.weight" in keys and any(k.startswith("layer1.0.") for k in keys):
        return "torchvision"
    if any("aspp." in k for k in keys):
        return "checkpoint"
    return "backbone"


def _copy_into(model: nn.Module, state: dict, where: str, *, skip_aspp: bool) -> None:
    expected = model.state_dict()
    own = {k: v for k, v in expected.items() if not (skip_aspp and ".aspp." in k)}
    state = {k: v for k, v in state.items() if not (skip_aspp and ".aspp." in k)}
    problems = state_mismatch(own, state)
    if problems:
        raise TrainError(f"{where} does not fit the configured model (check model.n_blocks, width, "
                         "stride_in_1x1):\n" + problems)
    with torch.no_grad():
        for k, v in state.items():
            if k in own:
                expected[k].copy_(v.to(expected[k].dtype))


def initialise(model: nn.Module, path: str | None, fmt: str = "auto") -> dict:
    """Load starting weights into ``model`` (an MSC); returns a summary for the log and the meta."""
    if not path:
        return {"init": "random"}
    p = Path(path)
    if fmt == "auto" and not p.exists():
        fmt = "checkpoint"  # a registry name such as voc12
    if fmt in ("auto", "checkpoint") and (not p.exists() or fmt == "checkpoint"):
        try:
            ckpt = resolve_checkpoint(path)
        except CheckpointError as exc:
            raise TrainError(str(exc)) from exc
        return _init_from_checkpoint(model, ckpt.state_dict, str(path), ckpt.class_names)
    raw = _read_weights(p)
    if fmt == "auto":
        fmt = detect_format(raw)
    if fmt == "torchvision":
        if model.config is not None and model.config.stride_in_1x1:
            raise TrainError(f"{p}: torchvision weights need model.stride_in_1x1: false")
        _copy_into(model, convert_torchvision(raw), str(p), skip_aspp=True)
        reset_classifier(model)
        return {"init": "torchvision", "path": str(p)}
    if fmt == "checkpoint":
        return _init_from_checkpoint(model, normalize_keys(raw), str(p), None)
    _copy_into(model, normalize_keys(raw), str(p), skip_aspp=True)
    reset_classifier(model)
    return {"init": "backbone", "path": str(p)}


def _init_from_checkpoint(model, state: dict, where: str, class_names) -> dict:
    n_model = model.base.aspp.n_classes
    n_file = int(state[classifier_key(state)].shape[0]) if classifier_key(state) in state else None
    head_model, head_file = head_of(model.state_dict()), head_of(state)
    if head_file != head_model:  # e.g. the published v2 model as the backbone of a v3 run
        _copy_into(model, state, where, skip_aspp=True)
        reset_classifier(model)
        return {"init": "checkpoint", "path": where, "classifier": "re-initialised",
                "head": f"backbone from {where} (its ASPP head is {head_file}); the {head_model} ASPP head "
                        "is initialised fresh", "source_class_names": class_names}
    same = n_file == n_model
    aspp_file = sorted(k for k in state if ".aspp." in k)
    aspp_model = sorted(k for k in model.state_dict() if ".aspp." in k)
    if same and aspp_file != aspp_model:
        raise TrainError(f"{where}: its ASPP has keys {aspp_file[:4]}..., the model {aspp_model[:4]}... "
                         "(check model.atrous_rates)")
    _copy_into(model, state, where, skip_aspp=not same)
    if not same:
        reset_classifier(model)
    return {"init": "checkpoint", "path": where, "classifier": "kept" if same else
            f"re-initialised ({n_file} -> {n_model} classes)", "source_class_names": class_names}
