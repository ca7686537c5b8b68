"""``python -m segcore video IN OUT``: the colour overlay of every frame as an H.264 video, audio kept."""

from __future__ import annotations

from pathlib import Path


def smoothing_weight(text: str) -> float:
    """argparse type of --smoothing: the weight of the past, in [0, 1)."""
    import argparse

    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


def add_arguments(parser):
    from .cli import add_model_arguments, positive_int, unit_interval

    parser.add_argument("input", type=Path, help="video file (anything FFmpeg reads)")
    parser.add_argument("output", type=Path, help="output video (.mp4 recommended)")
    add_model_arguments(parser)
    parser.add_argument("--opacity", type=unit_interval, default=0.5, help="overlay opacity (0..1)")
    parser.add_argument("--stride", type=positive_int, default=1,
                        help="segment every K-th frame and carry its labels to the frames between")
    parser.add_argument("--smoothing", type=smoothing_weight, default=0.0,
                        help="temporal smoothing of class probabilities, 0 (off) .. <1 (weight of the past)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="frames per model batch")


def run(args) -> int:
    from tqdm.auto import tqdm

    from .cli import segmenter_from_args
    from .video import segment_video

    segmenter = segmenter_from_args(args)
    bar = None  # opened with the first frame, so a file that cannot be read leaves only the error line

    def progress(done, total):
        nonlocal bar
        if bar is None:
            bar = tqdm(desc="video", unit="frame")
        if total and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        res = segment_video(segmenter, args.input, args.output, opacity=args.opacity, frame_stride=args.stride,
                            smoothing=args.smoothing, batch_size=args.batch_size, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(f"{res.frames} frames {res.width}x{res.height} at {res.fps:.3g} fps"
          f"{', audio kept' if res.audio else ''} -> {res.path} "
          f"({res.seconds:.1f} s, {res.model_seconds:.1f} s in the model)")
    return 0
