"""``python -m segcore compare --weights A B [C ...] --data PATH --out DIR``: every model on the same
images in one pass (each image read once), with ``evaluate``'s options; writes comparison.json,
per_image.csv and comparison.html. Works under torchrun like ``evaluate``."""

from __future__ import annotations

from .cli_evaluate import add_arguments as add_evaluate_arguments


def add_arguments(parser):
    add_evaluate_arguments(parser, several_models=True, out="comparison", worst=0)


def run(args) -> int:
    from .cli_evaluate import model_from_args, protocol_from_args
    from .comparison import compare, format_comparison_table
    from .datasets import annotation_label_space, open_dataset
    from .distributed import torchrun_process
    from .evaluation import EvaluationError

    if args.format == "masks" or args.pred is not None:
        raise EvaluationError("compare runs models; stored prediction masks are scored with evaluate --format masks")
    if len(args.weights) < 2:
        raise EvaluationError("compare needs at least two --weights")
    with torchrun_process(args.device) as (rank, world, args.device):
        fmt, protocol = protocol_from_args(args)
        segmenters = [model_from_args(args, w) for w in args.weights]
        space = annotation_label_space(args.labels, segmenters[0])
        dataset = open_dataset(args.data, fmt, split=args.split, label_space=space, mapping=args.map,
                               unknown=args.unknown)
        names = tuple(dataset.class_names or segmenters[0].class_names)
        pred_maps = [None if tuple(s.class_names) == names else args.pred_map for s in segmenters]
        options = {"data": str(args.data), "format": dataset.format, "split": dataset.split}
        result = compare(segmenters, dataset, labels=list(args.weights), protocol=protocol, pred_maps=pred_maps,
                         out_dir=args.out, progress=not args.no_progress, options=options)
        if rank == 0:
            print(format_comparison_table(result))
            for label, r in zip(result.labels, result.results):
                print(f"{label}: {r.summary()}")
            print(f"report written to {args.out} ({', '.join(p.name for p in result.report.values())})")
        return result.exit_code
