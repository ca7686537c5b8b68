"""``python -m segcore convert-caffe``: a DeepLab-v2 ``.caffemodel`` to a checkpoint, without Caffe."""

from __future__ import annotations

from pathlib import Path

from .caffe import KINDS, convert_caffe_file


def add_arguments(parser) -> None:
    parser.add_argument(
        "model", type=Path, help="the .caffemodel file (e.g. train2_iter_20000.caffemodel, init.caffemodel)"
    )
    parser.add_argument("out", type=Path, help="checkpoint to write (.pth or .safetensors)")
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default="deeplabv2-voc",
        help="deeplabv2-voc: a PASCAL VOC DeepLab-v2 model (21 classes, default); "
        "init-coco: the MS-COCO initialisation (backbone for training)",
    )
    parser.add_argument(
        "--keep-classifier",
        action="store_true",
        help="init-coco: keep its classifier (the checkpoint then loads as a full model)",
    )


def run(args) -> int:
    """Run the conversion for parsed arguments; prints a summary and returns the exit code."""
    report = convert_caffe_file(args.model, args.out, kind=args.kind, keep_classifier=args.keep_classifier)
    arch = report["architecture"]
    print(
        f"{args.model}: {report['layers']} layers ({report['layout']}), "
        f"{report['converted_layers']} converted, "
        f"{report['ignored_layers']} without weights ignored, {len(report['shared_layers_skipped'])} "
        "multi-scale copies skipped"
    )
    print(
        f"  n_blocks {tuple(arch['n_blocks'])}, width {tuple(arch['width'])}, "
        f"classifier {report['classifier']}"
        + (
            f" ({report['classifier_classes']} classes, rates {tuple(arch['atrous_rates'])})"
            if report["classifier_classes"]
            else ""
        )
    )
    for warning in report["warnings"]:
        print(f"  warning: {warning}")
    print(
        f"wrote {report['output']} ({report['tensors']} tensors"
        + (
            ", backbone only: train from it with model.init.format backbone)"
            if report["meta"]["backbone_only"]
            else ")"
        )
    )
    return 0
