"""Things tests build for themselves: random DeepLab weights, tiny checkpoints, synthetic images."""

from __future__ import annotations

import numpy as np
import torch

TINY_BLOCKS = (1, 1, 1, 1)
TINY_WIDTH = (16, 32, 64, 128)
TINY_CH = (4, 16, 32, 64, 128)  # stem + stages, the reference transcription's ``ch``


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter and BatchNorm buffer with seeded random values that keep activations finite.

    Conv weights use He scaling; BatchNorm gets non-trivial statistics and affine terms, so a test
    that swapped mean and variance, or skipped BN, would see different logits.
    """
    g = torch.Generator().manual_seed(seed)
    state = module.state_dict()
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            out[key] = value
        elif key.endswith("running_var"):
            out[key] = torch.rand(value.shape, generator=g) * 1.5 + 0.5
        elif key.endswith("running_mean"):
            out[key] = torch.randn(value.shape, generator=g) * 0.1
        elif ".bn.weight" in key:
            out[key] = torch.rand(value.shape, generator=g) * 0.5 + 0.5
        elif ".bn.bias" in key or key.endswith(".bias"):
            out[key] = torch.randn(value.shape, generator=g) * 0.1
        else:
            fan_in = value[0].numel()
            out[key] = torch.randn(value.shape, generator=g) * (2.0 / fan_in) ** 0.5
    module.load_state_dict(out)
    return module


def tiny_model(n_classes: int = 21, seed: int = 0, scales=(0.5, 0.75), aspp: str = "v2"):
    from segcore import build_model

    return randomize_(build_model(n_classes, n_blocks=TINY_BLOCKS, width=TINY_WIDTH, scales=scales, aspp=aspp),
                      seed)


def tiny_checkpoint(path, n_classes: int = 21, seed: int = 0, meta: dict | None = None, aspp: str = "v2"):
    """Write a tiny random checkpoint in the published key layout (``base.layer...``) and return its path."""
    from segcore.checkpoint import save_checkpoint

    model = tiny_model(n_classes, seed, aspp=aspp)
    if meta is None:
        torch.save(model.state_dict(), path)
        return path
    return save_checkpoint(path, model.state_dict(), meta)


def tiny_cfg(**sections):
    """A training config for seconds on a CPU: tiny ResNet, synthetic 32 px data, 6 iterations; ``sections``
    update (a dict) or replace one section."""
    from train.config import config_from_dict

    base = {
        "name": "t",
        "model": {"n_blocks": list(TINY_BLOCKS), "width": list(TINY_WIDTH), "atrous_rates": [1, 2],
                  "msc_scales": [0.5, 0.75]},
        "data": {"synthetic": {"enabled": True, "n_train": 8, "n_val": 3, "size": 32, "n_classes": 4},
                 "scales": [0.75, 1.0, 1.25], "crop_size": 32, "num_workers": 0},
        "solver": {"iterations": 6, "batch_size": 2, "iter_size": 2, "lr": 1e-3, "lr_step": 1, "seed": 3},
        "log": {"every": 1, "val_every": 0, "save_every": 100, "tensorboard": False, "progress": False},
        "runtime": {"device": "cpu"},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            base.setdefault(section, {}).update(values)
        else:
            base[section] = values
    return config_from_dict(base)


def scene_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth synthetic RGB photo stand-in: gradients plus a few coloured discs and boxes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w * 200 + 30, yy / h * 180 + 40, (xx + yy) / (h + w) * 150 + 60], -1)
    for _ in range(5):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(0.1, 0.3) * min(h, w)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[mask] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def train_smoke_model(run, *, iterations: int = 150, timeout: int = 300):
    """Train ``train/configs/smoke.yaml`` briefly (seconds on a CPU) into ``run``; return the checkpoint.

    Its predictions are blobs with smooth, slightly wrong edges, as a real model's are, unlike a random
    tiny checkpoint's speckle. The generated data set (64 px images) is in ``run/data/synthetic``."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-m", "train", "--config", "train/configs/smoke.yaml", "--out", str(run),
                           "--set", f"solver.iterations={iterations}", "--set", "log.val_every=0",
                           "--set", "log.progress=false", "--set", "log.tensorboard=false",
                           "--set", f"log.save_every={iterations}"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(run) / "checkpoints" / "final.pth"


def upscaled_images(run, dest, n: int, size: int = 256, split: str = "val"):
    """``n`` of the smoke data set's images enlarged to ``size`` px (bilinear), as JPEGs in ``dest``."""
    from pathlib import Path

    from PIL import Image

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    sources = sorted((Path(run) / "data" / "synthetic" / "JPEGImages").glob(f"{split}_*.jpg"))[:n]
    assert len(sources) == n, f"the smoke data set has {len(sources)} {split} images"
    for p in sources:
        Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR).save(dest / p.name, quality=95)
    return sorted(dest.iterdir())


def shape_bomb_checkpoints(folder) -> dict:
    """Checkpoints of a few KB (``torch.save``'s zip adds about 1 KB) that describe enormous models."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    one = torch.zeros(1)
    files = {
        # a 2048x2048x3x3 weight, all views of one float: 38 M values (150 MB once copied) in 1 KB
        "stride0": {"base.aspp.c0.weight": one.expand(2048, 2048, 3, 3)},
        # zero-size tensors whose other dimensions set huge widths and class counts
        "zero": {"base.aspp.c0.weight": torch.zeros(60000, 0, 3, 3),
                 **{f"base.layer{s}.block1.increase.conv.weight": torch.zeros(60000, 0, 1, 1) for s in range(2, 6)},
                 **{f"base.layer{s}.block1.reduce.conv.weight": torch.zeros(1, 0, 1, 1) for s in range(2, 6)}},
        # small real tensors naming huge widths: the model would have billions of parameters
        "wide": {"base.aspp.c0.weight": torch.zeros(2, 1, 1, 1),
                 **{f"base.layer{s}.block1.increase.conv.weight": torch.zeros(8192, 1, 1, 1)
                    for s in range(2, 6)},
                 **{f"base.layer{s}.block{b}.reduce.conv.weight": torch.zeros(1, 1, 1, 1)
                    for s in range(2, 6) for b in range(1, 64)}},
        # a block index that would build twenty thousand blocks
        "block20000": {"base.aspp.c0.weight": torch.zeros(2, 1, 1, 1),
                       **{f"base.layer{s}.block1.increase.conv.weight": torch.zeros(4, 1, 1, 1) for s in range(2, 6)},
                       "base.layer4.block20000.reduce.conv.weight": torch.zeros(1, 1, 1, 1)},
    }
    out = {}
    for name, sd in files.items():
        torch.save(sd, folder / f"{name}.pth")
        out[name] = folder / f"{name}.pth"
    return out
