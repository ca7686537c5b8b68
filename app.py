"""Gradio app: `python app.py [--weights NAME|PATH]` (also a Hugging Face Space entry point).

Host and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (default 127.0.0.1:7860; Spaces set
0.0.0.0). Weights: --weights, else SEGCORE_WEIGHTS, else voc12; they load on first use. See docs/app.md.
"""

from __future__ import annotations

import argparse
import logging
import os


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None,
                        help="registry name (voc12, cocostuff164k, cocostuff10k) or a checkpoint path "
                             "(default: $SEGCORE_WEIGHTS or voc12)")
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1 ...")
    parser.add_argument("--precision", default=None,
                        help="auto (default: $SEGCORE_PRECISION or auto), fp32, fp32-fused, bf16, fp16 or int8 "
                             "(the fastest on a CPU; calibrated once per checkpoint, then cached)")
    parser.add_argument("--host", default=None, help="default: $GRADIO_SERVER_NAME or 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default: $GRADIO_SERVER_PORT or 7860")
    parser.add_argument("--shared-uploads", action="store_true", default=None,
                        help="uploaded checkpoints visible to every visitor (default: each browser sees only its "
                             "own; also $SEGCORE_SHARED_UPLOADS=1)")
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from demo import AppConfig, build_app, launch

    config = AppConfig.from_env(weights=args.weights, device=args.device, precision=args.precision,
                                shared_uploads=args.shared_uploads)
    problem = config.problem()
    if problem:
        parser.error(problem)
    demo = build_app(config)
    host = args.host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    port = args.port or int(os.environ.get("GRADIO_SERVER_PORT") or 7860)
    launch(demo, server_name=host, server_port=port)


if __name__ == "__main__":
    main()
