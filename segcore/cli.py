"""``python -m segcore``: one parser, one subcommand per module.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int`` (the exit code), so
shared set-up (device, weights, logging) lives here once instead of in every command.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from annotations import AnnotationError
from annotations.cli_errors import CliParser, run_cli

from .batch import IMAGE_SUFFIXES
from .errors import OptionError
from .precision import PRECISIONS

COMMANDS = {
    "predict": ("segcore.cli_predict", "segment images and write palette masks and overlays"),
    "evaluate": ("segcore.cli_evaluate", "score a model or stored masks on a dataset and write the report"),
    "compare": ("segcore.cli_compare", "score several models on the same images and compare them"),
    "convert-caffe": ("segcore.cli_convert_caffe", "convert an original DeepLab-v2 .caffemodel to a checkpoint"),
    "video": ("segcore.cli_video", "segment a video: colour overlay as H.264 with the audio kept"),
}


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def unit_interval(text: str) -> float:
    """argparse type: a number in [0, 1] (an opacity)."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser, *, required: bool = True,
                        several: bool = False) -> None:
    """Options every model-running command shares; ``several``: ``--weights`` takes two or more models."""
    if several:
        parser.add_argument("--weights", required=True, nargs="+",
                            help="two or more registry names or checkpoint paths; "
                                 "differences are against the first")
    else:
        parser.add_argument("--weights", required=required,
                            help="registry name (voc12, cocostuff164k, cocostuff10k) or checkpoint path")
    parser.add_argument("--crf", action="store_true", help="refine with the dense CRF")
    parser.add_argument("--scales", type=positive_float, nargs="*", default=None,
                        help="extra input scales besides 1.0 (default 0.5 0.75; none for single scale)")
    parser.add_argument("--test-size", type=positive_int, default=513, help="long side the image is resized to")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto: bf16 where the CPU/GPU has it, else fp32-fused (fp32 through fused kernels); "
                             "fp32: the original model, the reference's numbers exactly; int8: the fastest on a "
                             "CPU (calibrated once per checkpoint, then cached)")
    parser.add_argument("--calibration", action="append", type=Path, default=None, metavar="IMAGE_OR_FOLDER",
                        help="int8: pictures like yours that set the activation ranges, an image or a folder "
                             "(repeat for more; default: the photos shipped with segcore)")
    parser.add_argument("--labels", default=None, help="label set for a checkpoint without names: voc, cocostuff or FILE")


def segmenter_from_args(args):
    from .model import DEFAULT_SCALES
    from .segmenter import Segmenter

    scales = DEFAULT_SCALES if args.scales is None else tuple(args.scales)
    return Segmenter.from_pretrained(args.weights, scales=scales, crf=args.crf, test_size=args.test_size,
                                     device=args.device, precision=args.precision, label_space=args.labels,
                                     calibration=calibration_files(args.calibration))


def calibration_files(paths) -> list[Path] | None:
    """``--calibration`` files, folders expanded to the images in them (sorted); None when not given."""
    if paths is None:
        return None
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise OptionError(f"{path}: no such file or folder (--calibration takes images or folders of them)")
    if not files:
        raise OptionError(f"--calibration {' '.join(map(str, paths))}: no images there")
    return files


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="python -m segcore", description="DeepLab-v2 semantic segmentation")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(command)
        command.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    """Exit codes: 0 done, 1 some files failed (named in the output), 2 bad input, 130 interrupted."""
    from .errors import SegcoreError

    args = build_parser().parse_args(argv)
    return run_cli(lambda: args._run(args), (SegcoreError, AnnotationError))
