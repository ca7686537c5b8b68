"""``python -m segcore predict``: palette mask + overlay per image, and a one-line summary each."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from PIL import Image


def add_arguments(parser):
    from .cli import add_model_arguments, unit_interval

    parser.add_argument("images", nargs="+", type=Path, help="image files")
    add_model_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output folder")
    parser.add_argument("--opacity", type=unit_interval, default=0.5, help="overlay opacity (0..1)")


def run(args) -> int:
    from tqdm.auto import tqdm

    from .cli import segmenter_from_args
    from .errors import SegcoreError

    segmenter = segmenter_from_args(args)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for path in tqdm(args.images, desc="predict", unit="img", disable=len(args.images) < 2):
        start = time.perf_counter()
        try:
            pred = segmenter.predict(path)
        except SegcoreError as exc:
            failed.append(path)
            tqdm.write(f"FAILED {path}: {exc}", file=sys.stderr)
            continue
        mask_path = args.out / f"{path.stem}_mask.png"
        overlay_path = args.out / f"{path.stem}_overlay.jpg"
        pred.save(mask_path)
        Image.fromarray(pred.overlay(args.opacity)).save(overlay_path, quality=92)
        h, w = pred.label_map.shape
        top = ", ".join(f"{name} {share:.1%}" for name, share in list(pred.class_fractions().items())[:5])
        tqdm.write(f"{path.name}  {w}x{h}  {top}  ({time.perf_counter() - start:.2f} s) -> {mask_path}")
    done = len(args.images) - len(failed)
    print(f"{done} of {len(args.images)} images segmented into {args.out}"
          + (f"; failed: {', '.join(map(str, failed))}" if failed else ""))
    return 1 if failed else 0
