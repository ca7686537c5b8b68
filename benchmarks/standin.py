"""A trained full-size stand-in: DeepLab-v2 ResNet-101 trained briefly on generated shapes (issue 19).

The published checkpoints cannot be downloaded here, and random weights say little about rounding: their
logits are nearly flat, so any change of arithmetic flips pixels (a random ResNet-101 keeps 94.7–97.4% of its
pixels under int8). The stand-in has the published architecture (ResNet-101, ASPP rates 6/12/18/24) and is
trained with ``python -m train`` on the smoke generator's shapes, so its logits are peaked as a trained
model's are. Training from scratch with the protocol's frozen BatchNorm needs sensible statistics, so the
starting checkpoint's BatchNorm running statistics are first measured on generated images (a forward pass in
training mode); after that the trainer runs its usual loop. Both steps are cached outside the repository
(``SEGCORE_BENCH_CACHE``, default ``~/.cache/segcore-bench``); the first run takes a while on a CPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
TILE = 64  # the generated scenes' size, in training and in the test mosaics
ITERATIONS = 2000
FINE_TUNE = 300  # iterations of the other class counts, started from the trained 21-class stand-in


def cache_dir() -> Path:
    return Path(os.environ.get("SEGCORE_BENCH_CACHE", Path.home() / ".cache" / "segcore-bench"))


def class_names(n_classes: int) -> list[str]:
    return ["background", "disc", "square", "triangle"] + [f"unused{i}" for i in range(4, n_classes)]


def scenes(n: int, seed: int, size: int = TILE) -> np.ndarray:
    """``n`` generated RGB scenes (n, size, size, 3) uint8, the trainer's own kind of picture."""
    from train.data import synthetic_sample

    rng = np.random.default_rng(seed)
    return np.stack([synthetic_sample(size, 4, rng)[0] for _ in range(n)])


def mosaic(h: int, w: int, seed: int, tile: int = TILE) -> np.ndarray:
    """An ``h`` x ``w`` image of generated scenes side by side (the stand-in's test picture)."""
    cols, rows = -(-w // tile), -(-h // tile)
    tiles = scenes(cols * rows, seed, tile)
    grid = tiles.reshape(rows, cols, tile, tile, 3).transpose(0, 2, 1, 3, 4).reshape(rows * tile, cols * tile, 3)
    return np.ascontiguousarray(grid[:h, :w])


@torch.no_grad()
def calibrated_start(n_classes: int, path: Path) -> Path:
    """A fresh ResNet-101 DeepLab-v2 whose BatchNorm statistics are measured on generated scenes."""
    from segcore.checkpoint import save_checkpoint
    from segcore.model import BGR_MEAN, build_model

    torch.manual_seed(0)
    model = build_model(n_classes, scales=())
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches below
    model.train()
    for i in range(4):
        rgb = torch.from_numpy(scenes(4, seed=10_000 + i, size=2 * TILE)).float()
        model((rgb.flip(-1) - torch.tensor(BGR_MEAN)).permute(0, 3, 1, 2).contiguous())
    model.eval()
    for conv in model.base.aspp.children():  # class scores start near zero, as the reference's do
        torch.nn.init.normal_(conv.weight, std=0.01)
        torch.nn.init.zeros_(conv.bias)
    save_checkpoint(path, model.state_dict(), {"class_names": class_names(n_classes)})
    return path


def trained_resnet101(n_classes: int) -> Path:
    """The cached stand-in checkpoint for ``n_classes`` (trained on first use).

    The 21-class model trains from BN-calibrated random weights; other class counts start from it with a
    fresh classifier (as the reference's COCO-to-VOC schedule does) and train ``FINE_TUNE`` iterations.
    """
    iterations = ITERATIONS if n_classes == 21 else FINE_TUNE
    out = cache_dir() / f"resnet101-standin-{n_classes}-{iterations}"
    final = out / "checkpoints" / "final.pth"
    if final.is_file():
        return final
    shutil.rmtree(out, ignore_errors=True)  # an interrupted run of ours: start again
    out.mkdir(parents=True)
    start = calibrated_start(n_classes, out / "start.pth") if n_classes == 21 else trained_resnet101(21)
    names = class_names(n_classes)
    cmd = [sys.executable, "-m", "train", "--config", "train/configs/smoke.yaml", "--out", str(out),
           "--set", "model.n_blocks=[3,4,23,3]", "--set", "model.width=[256,512,1024,2048]",
           "--set", "model.atrous_rates=[6,12,18,24]", "--set", "model.msc_scales=[]",
           "--set", f"model.n_classes={n_classes}", "--set", f"data.class_names=[{','.join(names)}]",
           "--set", f"model.init.path={start}", "--set", f"data.synthetic.size={TILE}",
           "--set", "data.crop_size=49", "--set", f"solver.iterations={iterations}", "--set", "solver.lr=0.0001",
           "--set", "log.progress=false", "--set", f"log.every={max(1, iterations // 20)}", "--set", "log.tensorboard=false",
           "--set", f"log.val_every={iterations}", "--set", f"log.save_every={iterations}"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"training the ResNet-101 stand-in failed:\n{run.stderr[-2000:]}")
    return final


if __name__ == "__main__":  # python -m benchmarks.standin [n_classes ...]: train (or find) the stand-ins
    for n in [int(a) for a in sys.argv[1:]] or [21, 182]:
        print(trained_resnet101(n))
