"""Full ASPP comparison on PASCAL VOC 2012 (issue 20), for a machine with CUDA GPUs and the data.

    python -m benchmarks.compare_aspp_voc --out runs/aspp_voc [--nproc 4] [--iterations 20000]
        [--set data.root=... --set model.init.path=...]

Trains ``train/configs/voc12.yaml`` twice, identically except for ``model.aspp`` (v2: the published
ASPP-L; v3: BatchNorm and image pooling), then scores each ``final.pth`` on the val split with
``python -m segcore evaluate`` (its defaults: scale 1.0 plus 0.5 and 0.75, no CRF, fp32) and
writes ``comparison.json`` and ``comparison.md`` with mIoU, pixel accuracy, training images/s and
parameters side by side. Each step is the ordinary CLI, run as a subprocess; an interrupted run
continues with ``--resume`` where its checkpoint says. With ``--nproc`` > 1 training runs under
torchrun, and v3 then uses SyncBatchNorm (``model.sync_bn``); a batch of 1 per process is refused.
A config with generated data (``--config train/configs/smoke.yaml``) runs the same steps on a CPU in a
few minutes, which is how the tests check this script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HEADS = ("v2", "v3")


def train_command(args, aspp: str, run: Path) -> list[str]:
    launcher = [sys.executable, "-m", "train"]
    if args.nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={args.nproc}", "-m", "train"]
    sets = [f"model.aspp={aspp}", f"solver.iterations={args.iterations}", *args.set]
    if aspp == "v3" and args.nproc > 1:
        sets.append("model.sync_bn=true")
    cmd = [*launcher, "--config", args.config, "--out", str(run)]
    for s in sets:
        cmd += ["--set", s]
    if (run / "checkpoints/last.pth").is_file():
        cmd.append("--resume")
    return cmd


def evaluate_command(cfg, run: Path) -> list[str]:
    data_root = run / "data/synthetic" if cfg.data.synthetic.enabled else cfg.data.root
    return [sys.executable, "-m", "segcore", "evaluate", "--weights", str(run / "checkpoints/final.pth"),
            "--data", str(data_root), "--format", "voc", "--split", cfg.data.val_split or "val",
            "--precision", "fp32", "--no-progress", "--out", str(run / "evaluation")]


def summarise(run: Path) -> dict:
    from segcore import load_model

    scores = json.loads((run / "evaluation/scores.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_s"] for r in records if r.get("images_per_s")]
    model = load_model(run / "checkpoints/final.pth")
    return {"mean_iou": scores.get("mean_iou"), "pixel_accuracy": scores.get("pixel_accuracy"),
            "train_images_per_s": round(statistics.median(speeds), 2) if speeds else None,
            "parameters": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare_aspp_voc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for both runs and the comparison")
    p.add_argument("--config", default="train/configs/voc12.yaml")
    p.add_argument("--iterations", type=int, default=20000)
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run, through torchrun")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for both runs (e.g. data.root=..., model.init.path=...)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from train import load_config

    cfg = load_config(args.config, args.set)
    results = {}
    for aspp in HEADS:
        run = args.out / aspp
        steps = [("training", train_command(args, aspp, run), run / "checkpoints/final.pth"),
                 ("evaluation", evaluate_command(cfg, run), run / "evaluation/scores.json")]
        for what, cmd, done in steps:
            if done.is_file():
                continue
            rc = subprocess.run(cmd).returncode
            if rc:
                print(f"error: the {aspp} {what} exited with {rc} ({' '.join(cmd)}); run this script again "
                      "to continue where it stopped", file=sys.stderr)
                return rc
        results[aspp] = summarise(run)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = ["| head | val mIoU | pixel acc. | train images/s | parameters |", "|---|---|---|---|---|"]
    for aspp, r in results.items():
        rows.append(f"| {aspp} | {100 * r['mean_iou']:.2f} | {100 * r['pixel_accuracy']:.2f} | "
                    f"{r['train_images_per_s']} | {r['parameters']:,} |")
    (args.out / "comparison.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
