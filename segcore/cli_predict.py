"""``python -m segcore predict``: images, folders or zips → label maps, overlays, labelme projects, npz.

Runs :func:`segcore.batch.predict_files`; see its module for resuming, atomic writes and torchrun sharding.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from annotations import AnnotationError

from .batch import FORMATS, LABELME_DIR, REPORT
from .prelabel import DEFAULT_MIN_AREA, DEFAULT_TOLERANCE


def add_arguments(parser):
    from .cli import add_model_arguments, unit_interval

    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                        help="image files, folders (searched recursively) or .zip files")
    add_model_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("predictions"),
                        help="output folder; outputs mirror the inputs' relative paths")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=["png"], dest="formats",
                        help="png: palette label map <name>.png + <name>_overlay.jpg (what `segcore evaluate "
                             "--format masks --pred OUT` reads); labelme: <name>.json polygons with the image "
                             f"(in OUT/{LABELME_DIR}/ when other formats are written too); npz: label map "
                             "(and --probabilities)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo every image; without it a rerun skips finished images")
    parser.add_argument("--opacity", type=unit_interval, default=0.5, help="overlay opacity (0..1)")
    parser.add_argument("--probabilities", action="store_true",
                        help="npz: also store float16 class probabilities (C x h x w, at the processing size)")
    labelme = parser.add_argument_group("labelme output")
    labelme.add_argument("--map", type=Path, default=None,
                         help="YAML/JSON file renaming classes in the JSON (tvmonitor: tv); __ignore__ leaves "
                              "a class out")
    labelme.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                         help="polygon simplification tolerance in pixels (0: every boundary pixel)")
    labelme.add_argument("--min-area", type=int, default=DEFAULT_MIN_AREA,
                         help="regions smaller than this many pixels are not written")
    labelme.add_argument("--with-background", action="store_true",
                         help="write background regions as shapes too")
    images = labelme.add_mutually_exclusive_group()
    images.add_argument("--embed-image", action="store_true", help="put the image into the JSON (imageData)")
    images.add_argument("--no-copy-image", action="store_true",
                        help="point imagePath at the input image instead of copying it beside the JSON")
    parser.add_argument("--decode-workers", type=int, default=2, help="threads decoding images ahead of the model")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from .batch import PredictError, StopFlag, predict_files
    from .cli import segmenter_from_args
    from .distributed import torchrun_process
    from .prelabel import read_name_map

    if args.no_copy_image and any(p.suffix.lower() == ".zip" for p in args.inputs) and "labelme" in args.formats:
        raise PredictError("--no-copy-image cannot point at images inside a .zip; drop it or use --embed-image")
    try:
        names = read_name_map(args.map) if args.map else None
    except AnnotationError as exc:
        raise PredictError(f"--map: {exc}") from exc
    with torchrun_process(args.device) as (rank, world, args.device):
        segmenter = segmenter_from_args(args)
        stop = StopFlag()
        with stop.on_signals(signal.SIGTERM):
            result = predict_files(segmenter, args.inputs, args.out, args.formats, progress=not args.no_progress,
                                   stop=stop, names=names, tolerance=args.tolerance, min_area=args.min_area,
                                   write_background=args.with_background, opacity=args.opacity,
                                   probabilities=args.probabilities, copy_images=not args.no_copy_image,
                                   embed_images=args.embed_image, overwrite=args.overwrite,
                                   decode_workers=args.decode_workers)
        if rank == 0:
            _summary(args, result)
        if result.stopped:
            return 128 + signal.SIGTERM
        return result.exit_code


def _summary(args, result) -> None:
    total = len(result.done) + len(result.skipped) + len(result.failed)
    line = f"{len(result.done)} of {total} images segmented into {args.out}"
    if result.skipped:
        line += f" ({len(result.skipped)} already done, skipped)"
    print(line)
    if result.round_trip:
        worst = min(result.round_trip, key=result.round_trip.get)
        mean = sum(result.round_trip.values()) / len(result.round_trip)
        print(f"labelme round trip: mean {mean:.2%} of pixels, lowest {result.round_trip[worst]:.2%} ({worst}); "
              f"per image in {args.out / REPORT}")
    if result.failed:
        print(f"failed ({len(result.failed)}):", file=sys.stderr)
        for name, message in sorted(result.failed.items()):
            print(f"  {name}: {message}", file=sys.stderr)
    if result.stopped:
        print("stopped by SIGTERM; run the same command again to continue where it stopped", file=sys.stderr)
