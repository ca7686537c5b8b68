"""``python -m annotations convert INPUT OUTPUT --labels voc|cocostuff|FILE ...``"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from .archive import DEFAULT_MAX_BYTES, DEFAULT_MAX_FILES
from .cli_errors import CliParser, run_cli
from .convert import ConversionReport, convert_folder
from .errors import AnnotationError

WARNINGS_SHOWN = 20


def _parser() -> CliParser:
    p = CliParser(prog="python -m annotations", description="labelme -> VOC-style dataset")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert labelme JSON files into a VOC-style dataset folder")
    c.add_argument("input", nargs="+", help="a folder (recursive), JSON file(s), or a .zip of a folder")
    c.add_argument("output", help="output dataset folder (must not exist unless --overwrite)")
    c.add_argument("--labels", default="voc", help="voc, cocostuff, or a labelme2voc labels.txt (default: voc)")
    c.add_argument("--map", dest="mapping", help="YAML or JSON mapping file: annotation name -> label name")
    c.add_argument("--unknown", choices=("error", "ignore"), default="error",
                   help="unknown labels fail their file (error, default) or become 255 (ignore)")
    c.add_argument("--unlabeled", choices=("auto", "background", "ignore"), default="auto",
                   help="unannotated pixels: background (0) or ignore (255); auto = background if the "
                        "label space has one (VOC), else ignore (COCO-Stuff)")
    c.add_argument("--strip-suffix", action="store_true",
                   help="map 'person-2' / 'person_2' to 'person' when the full name is unknown")
    c.add_argument("--instances", action="store_true", help="also write SegmentationObject/")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output dataset")
    c.add_argument("--workers", type=int, default=None, help="worker processes (default: number of cores)")
    c.add_argument("--max-zip-bytes", type=int, default=DEFAULT_MAX_BYTES, help="cap on unpacked zip size")
    c.add_argument("--max-zip-files", type=int, default=DEFAULT_MAX_FILES, help="cap on zip entries")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def warning_lines(report: ConversionReport, report_path: str) -> list[str]:
    """The first WARNINGS_SHOWN warnings, one line each, and where the rest are."""
    lines = []
    for w in report.warnings[:WARNINGS_SHOWN]:
        where = f" shape {w['shape']}" if w.get("shape") is not None else ""
        lines.append(f"warning: {w['file']}{where}: {w['reason']}")
    if len(report.warnings) > WARNINGS_SHOWN:
        lines.append(f"... and {len(report.warnings) - WARNINGS_SHOWN} more warning(s) in {report_path}")
    elif report.warnings:
        lines.append(f"(all warnings are also in {report_path})")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 all converted, 1 some files failed (named), 2 bad input, 130 interrupted."""
    args = _parser().parse_args(argv)
    return run_cli(lambda: _convert(args), (AnnotationError, ValueError))


def _convert(args) -> int:
    from .mapping import LabelMapping

    inputs = args.input[0] if len(args.input) == 1 else list(args.input)
    bar = None
    progress = None
    if not args.quiet:
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is optional
            tqdm = None
        if tqdm is not None:
            def progress(done: int, total: int) -> None:
                nonlocal bar
                if bar is None:
                    bar = tqdm(total=total, unit="img", desc="converting", file=sys.stderr)
                bar.update(1)
    try:
        mapping = LabelMapping.from_file(args.mapping) if args.mapping else LabelMapping()
        if args.strip_suffix:
            mapping.strip_instance_suffix = True
        report = convert_folder(inputs, args.output, args.labels, mapping=mapping, unknown=args.unknown,
                                unlabeled=args.unlabeled, instances=args.instances, overwrite=args.overwrite,
                                workers=args.workers, max_zip_bytes=args.max_zip_bytes,
                                max_zip_files=args.max_zip_files, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    report_path = os.path.join(args.output, "report.json")
    print(report.summary())
    for line in warning_lines(report, report_path):
        print(line)
    print(f"dataset written to {os.fspath(args.output)} (report: {report_path})")
    return 0 if report.ok else 1
