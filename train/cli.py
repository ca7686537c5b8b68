"""``python -m train --config train/configs/NAME.yaml [--set key=value ...] [--resume] [--out DIR]``.

Exit codes: 0 finished (or stopped by runtime.stop_after), 2 bad input (config, data, weights, a
non-finite loss, a checkpoint that could not be written), 130/143 interrupted by SIGINT/SIGTERM after
saving checkpoints/last.pth.
"""

from __future__ import annotations

from annotations import AnnotationError
from annotations.cli_errors import CliParser, run_cli


def build_parser() -> CliParser:
    p = CliParser(prog="python -m train", description="Train DeepLab-v2 (ResNet-101, MSC). "
                                "Multi-GPU/multi-node: launch the same command with torchrun.")
    p.add_argument("--config", required=True,
                   help="YAML config (e.g. train/configs/voc12.yaml), or a shipped config's name: smoke, voc12, "
                        "cocostuff10k, cocostuff164k, labelme_finetune")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (YAML syntax), e.g. --set solver.iterations=100; repeatable")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pth")
    p.add_argument("--out", default=None, help="run folder (default: the config's out, else runs/NAME)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def _run(args) -> int:
    from .config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from .engine import train

    return train(cfg, args.out, resume=args.resume).exit_code


def main(argv=None) -> int:
    from segcore.errors import SegcoreError

    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args), (SegcoreError, AnnotationError),
                   interrupted="interrupted (no checkpoint written for the unfinished step)")
