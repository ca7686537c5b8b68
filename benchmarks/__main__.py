"""``python -m benchmarks [--quick] [--only NAME ...]``: run every ``benchmarks/bench_<name>.py``.

Each module's ``run(quick) -> dict`` measures ratios side by side in one run; results are written to
``benchmarks/results/<name>.json`` together with a description of the machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).parent


def machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu": platform.processor()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    info["cpu_count"] = os.cpu_count()
    try:
        import torch

        info["torch"] = torch.__version__
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def available() -> list[str]:
    return sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI and a first look")
    parser.add_argument("--only", nargs="+", choices=available(), help="run only these benchmarks")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.only or available():
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            result = importlib.import_module(f"benchmarks.bench_{name}").run(args.quick)
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others
            traceback.print_exc()
            failed.append(name)
            continue
        record = {"benchmark": name, "quick": args.quick, "date": datetime.now(timezone.utc).isoformat(),
                  "seconds": round(time.perf_counter() - start, 1), "machine": machine(), "result": result}
        path = args.out / f"{name}{'_quick' if args.quick else ''}.json"
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
        print(json.dumps(result, indent=2, default=str))
        print(f"-> {path}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
