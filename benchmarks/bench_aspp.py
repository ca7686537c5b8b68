"""ASPP heads side by side (issue 20): v2 (ASPP-L, the published head) vs v3 (BatchNorm + image pooling).

* Size and cost of the full ResNet-101 model with each head: parameters, and GFLOP of one single-scale
  forward pass at 513x513 counted by ``torch.utils.flop_counter`` on the meta device (2 FLOP per
  multiply-add; nothing is computed).
* The same training on the same data: ``train/configs/smoke.yaml`` (v2) and ``smoke_v3.yaml`` (v3) for
  the same iterations on the generated smoke data, on the CPU: validation mIoU, training images/s.
* With a CUDA GPU, the same on the full ResNet-101 at 321x321 (generated data, random initialisation,
  a few hundred iterations, bf16 where supported). Without one that part is skipped and says so.

For the full comparison on PASCAL VOC see ``python -m benchmarks.compare_aspp_voc``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import torch

HEADS = {"v2": "train/configs/smoke.yaml", "v3": "train/configs/smoke_v3.yaml"}
ROOT = Path(__file__).resolve().parent.parent
QUIET = ["log.progress=false", "log.tensorboard=false"]


def model_cost(aspp: str, size: int = 513, n_classes: int = 21) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from segcore import build_model

    with torch.device("meta"):
        model = build_model(n_classes, aspp=aspp, scales=()).eval()
        x = torch.empty(1, 3, size, size)
    head = sum(p.numel() for p in model.base.aspp.parameters())
    with FlopCounterMode(display=False) as counter:
        model(x)
    head_flops = sum(counter.get_flop_counts()["MSC.base.aspp"].values())
    return {"parameters": sum(p.numel() for p in model.parameters()), "head_parameters": head,
            f"gflop_{size}": round(counter.get_total_flops() / 1e9, 1),
            f"head_gflop_{size}": round(head_flops / 1e9, 1)}


def train_run(config: str, overrides: list[str], out: Path) -> dict:
    """Train with a shipped config and return the final validation scores and the training speed."""
    import train
    from segcore import load_model

    cfg = train.load_config(ROOT / config, [*QUIET, *overrides])
    result = train.train(cfg, out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_s"] for r in records[1:]] or [records[0]["images_per_s"]]
    first_loss = records[0]["loss"]
    return {"iterations": result.iteration, "val_mean_iou": round(result.final_scores["mean_iou"], 4),
            "val_pixel_accuracy": round(result.final_scores["pixel_accuracy"], 4),
            "loss_first_log": round(first_loss, 4), "loss_last_log": round(records[-1]["loss"], 4),
            "train_images_per_s": round(statistics.median(speeds), 2),
            "parameters": sum(p.numel() for p in load_model(out / "checkpoints/final.pth").parameters())}


def run(quick: bool) -> dict:
    result = {"what": "ASPP v2 (ASPP-L) vs v3 (BatchNorm + image pooling): same backbone, same data, "
                      "same iterations"}
    result["resnet101"] = {aspp: model_cost(aspp) for aspp in HEADS}
    iterations = 30 if quick else 400
    with tempfile.TemporaryDirectory(prefix="bench_aspp_") as tmp:
        result["smoke_cpu"] = {
            "setting": f"shipped smoke configs (tiny ResNet, 48x48 crops, batch 4, 4 generated classes, "
                       f"12 val images), {iterations} iterations, CPU fp32, threads {torch.get_num_threads()}",
            **{aspp: train_run(config, [f"solver.iterations={iterations}", f"log.val_every={iterations}"],
                               Path(tmp) / f"smoke_{aspp}") for aspp, config in HEADS.items()}}
        if torch.cuda.is_available():
            result["resnet101_cuda"] = gpu_comparison(Path(tmp), 20 if quick else 300)
        else:
            result["resnet101_cuda"] = "skipped: no CUDA GPU (full ResNet-101 at 321x321 needs one)"
    return result


def gpu_comparison(tmp: Path, iterations: int) -> dict:
    """Full ResNet-101 MSC at 321x321, batch 5 x iter_size 2, random init, generated 4-class data."""
    full = ["model.n_blocks=[3, 4, 23, 3]", "model.width=[256, 512, 1024, 2048]", "model.atrous_rates=null",
            "data.synthetic.size=400", "data.synthetic.n_train=200", "data.synthetic.n_val=20",
            "data.crop_size=321", "data.scales=[0.5, 0.75, 1.0, 1.25, 1.5]", "data.num_workers=4",
            "solver.batch_size=5", "solver.iter_size=2", "solver.lr=2.5e-4", "solver.lr_step=10",
            f"solver.iterations={iterations}", f"log.val_every={iterations}", f"log.save_every={iterations}",
            "runtime.device=cuda", "runtime.precision=auto"]
    out = {"gpu": torch.cuda.get_device_name(0),
           "setting": f"ResNet-101 MSC, 321x321 crops, batch 5 x iter_size 2, {iterations} iterations, "
                      "random init, generated data (400 px, 4 classes), precision auto"}
    for aspp in HEADS:
        out[aspp] = train_run("train/configs/smoke.yaml", [*full, f"model.aspp={aspp}"], tmp / f"full_{aspp}")
    return out
