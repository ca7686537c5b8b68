"""Convert the DeepLab authors' Caffe ``.caffemodel`` files (ResNet-101 DeepLab-v2) without Caffe.

One module per step: :mod:`segcore.caffe_wire` reads the binary protobuf into layers,
:mod:`segcore.caffe_names` maps MSRA ResNet-101 / DeepLab layer names (``res4b22_branch2b``,
``fc1_voc12_c0`` ...) to this project's modules, :mod:`segcore.caffe_convert` turns the layers into a
checked state dict, and this module writes it as a checkpoint (``python -m segcore convert-caffe``,
see ``segcore/cli_convert_caffe.py``). See ``docs/caffe.md``.
"""

from __future__ import annotations

from pathlib import Path

from .caffe_convert import KINDS, VOC_CLASSES, convert_caffemodel
from .caffe_names import block_index, map_layer_name
from .caffe_wire import V1_TYPES, Blob, ConvParam, Layer, read_caffemodel
from .checkpoint import load_model, read_backbone, save_checkpoint
from .errors import CheckpointError

__all__ = ["KINDS", "V1_TYPES", "VOC_CLASSES", "Blob", "ConvParam", "Layer", "block_index",
           "convert_caffe_file", "convert_caffemodel", "map_layer_name", "read_backbone", "read_caffemodel"]


def convert_caffe_file(
    path: str | Path,
    out: str | Path,
    *,
    kind: str = "deeplabv2-voc",
    keep_classifier: bool = False,
    verify: bool = True,
) -> dict:
    """Convert ``path`` and write ``out`` (``.pth`` or ``.safetensors``) with its metadata; return the report.

    With ``verify`` the written file is read back: a full model through :func:`segcore.load_model`, a
    backbone through :func:`read_backbone`.
    """
    state, report = convert_caffemodel(path, kind=kind, keep_classifier=keep_classifier)
    written = save_checkpoint(out, state, report["meta"])
    report["output"] = str(written)
    if verify:
        if report["meta"]["backbone_only"]:
            back = read_backbone(written)
            if set(back) != set(state):
                raise CheckpointError(f"{written}: reading the written backbone back gave different keys")
        else:
            load_model(written, scales=())
    return report
