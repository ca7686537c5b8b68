"""``python -m segcore evaluate``: score a model (or stored masks) on a dataset and write the report.

Under ``torchrun --nproc_per_node N -m segcore evaluate ...`` the images are shared among the
processes and rank 0 prints and writes the same report a single process would.
"""

from __future__ import annotations

from pathlib import Path

from .cli import add_model_arguments
from .datasets import FORMATS
from .errors import LabelCountError
from .protocol import PROTOCOLS


def add_arguments(parser, *, several_models: bool = False, out: str = "evaluation", worst: int = 8) -> None:
    """evaluate's options; ``compare`` takes the same ones with several models, its own report folder
    and no worst-image thumbnails."""
    add_model_arguments(parser, required=False, several=several_models)
    parser.add_argument("--protocol", default=None, choices=PROTOCOLS,
                        help="reference: deeplab-pytorch's test loop, each image at its native size "
                             "(COCO-Stuff 10k warped to 513x513), the published scores' protocol; "
                             "resize: long side to --test-size. Default: reference for voc, cocostuff10k "
                             "and cocostuff164k, resize for labelme")
    parser.add_argument("--pred-map", default=None,
                        help="map the model's classes into the evaluation's: a built-in (cocostuff->voc) or a "
                             "YAML/JSON file (model class: evaluation class or __ignore__); default: built-in "
                             "when the label spaces differ")
    parser.set_defaults(precision=None)  # the protocol's default: fp32 for reference (see run)
    parser.add_argument("--data", type=Path, required=True,
                        help="dataset folder (or labelme .zip); with --format masks the ground-truth masks")
    parser.add_argument("--format", default="auto", choices=FORMATS,
                        help="dataset layout (default: detect)")
    parser.add_argument("--split", default=None,
                        help="split or list name (voc: val, else all; cocostuff10k: test; "
                             "cocostuff164k: val2017)")
    parser.add_argument("--map", type=Path, default=None, help="label mapping file for labelme data")
    parser.add_argument("--unknown", default="error", choices=["error", "ignore"],
                        help="labelme labels neither in the label set nor mapped: "
                             "fail the file, or ignore them")
    parser.add_argument("--pred", type=Path, default=None, help="prediction masks folder (--format masks)")
    parser.add_argument("--out", type=Path, default=Path(out), help="report folder")
    parser.add_argument("--worst", type=int, default=worst,
                        help="how many lowest-mIoU images to keep as thumbnails")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def protocol_from_args(args):
    """(dataset format, Protocol) of the command line; fills in the protocol's default precision."""
    from .datasets import detect_format
    from .protocol import default_precision, protocol_for

    fmt = detect_format(args.data) if args.format == "auto" else args.format
    protocol = protocol_for(args.protocol, fmt)
    if args.precision is None:
        args.precision = default_precision(protocol.name)
    return fmt, protocol


def model_from_args(args, weights=None):
    """The Segmenter of ``weights`` (default ``--weights``). ``--labels`` names the checkpoint's classes
    when it has that many, else only the evaluation's label space (the predictions are then mapped)."""
    import copy

    from .cli import segmenter_from_args

    args = copy.copy(args)
    args.weights = weights or args.weights
    try:
        return segmenter_from_args(args)
    except LabelCountError:
        if args.labels is None:
            raise
        args.labels = None  # --labels is the evaluation's label space; the checkpoint keeps its own
        return segmenter_from_args(args)


def run(args) -> int:
    from .datasets import annotation_label_space, open_dataset
    from .distributed import torchrun_process
    from .evaluation import EvaluationError, evaluate
    from .bootstrap import interval_line
    from .evaluation_advice import raise_if_nothing_evaluated
    from .protocol import published_lines, protocol_line
    from .report import format_score_table

    masks = args.format == "masks" or (args.format == "auto" and args.pred is not None)
    if masks:
        if args.weights is not None:
            raise EvaluationError("--format masks compares stored predictions; drop --weights")
        if args.pred is None:
            raise EvaluationError("--format masks needs --pred DIR (the predicted masks)")
        if args.labels is None:
            raise EvaluationError("--format masks needs --labels voc|cocostuff|FILE (the class names)")
    elif args.weights is None:
        raise EvaluationError("--weights NAME|PATH is required (or --format masks --pred DIR)")

    with torchrun_process("cpu" if masks else args.device) as (rank, world, device):
        if not masks:
            args.device = device
        segmenter = protocol = None
        if masks:
            dataset = open_dataset(args.data, "masks", predictions=args.pred, label_space=args.labels)
        else:
            fmt, protocol = protocol_from_args(args)
            segmenter = model_from_args(args)
            space = annotation_label_space(args.labels, segmenter)
            dataset = open_dataset(args.data, fmt, split=args.split, label_space=space,
                                   mapping=args.map, unknown=args.unknown)
        options = {"data": str(args.data), "format": dataset.format, "split": dataset.split}
        if dataset.format == "labelme":
            options.update({"label_space": dataset.label_space.name,
                            "mapping": None if args.map is None else str(args.map), "unknown": args.unknown})
        result = evaluate(segmenter, dataset, protocol=protocol, out_dir=args.out, progress=not args.no_progress,
                          options=options, worst=args.worst, pred_map=args.pred_map)
        raise_if_nothing_evaluated(result)
        if rank == 0:
            print(format_score_table(result.scores, result.class_names))
            if segmenter is not None:
                print(protocol_line(result.options["protocol"]))
            if result.published is not None:
                print("\n".join(published_lines(result.published, result.scores)))
            if result.bootstrap is not None:
                print(interval_line(result.bootstrap))
            print(result.summary())
            print(f"report written to {args.out} ({', '.join(p.name for p in result.report.values())})")
        return result.exit_code
