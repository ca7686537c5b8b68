"""Training data: dataset opening, the deterministic global-batch sampler, and a synthetic dataset.

Determinism design. The stream of training samples is a function of ``seed`` alone: sample position
``p`` (0, 1, 2, ... over the whole run, across epochs) is dataset index ``perm(seed, p // N)[p % N]``
with augmentation seed ``hash(seed, p)``. Micro-batch ``m`` is positions ``[m G, (m + 1) G)`` with
``G = batch_size x world_size``; rank ``r`` takes the ``r``-th slice of ``batch_size``. Therefore

* resuming at micro-batch ``m`` only needs ``m`` (recreate the sampler there);
* two processes with batch ``b`` see exactly the samples (and crops) one process with batch ``2b`` sees;
* DataLoader workers only decode and augment: their own seeds (seed, rank, worker id) never reach a crop.
"""

from __future__ import annotations

import hashlib
import random
import signal
from pathlib import Path

import numpy as np
import torch

from annotations import IGNORE_INDEX, voc_colormap
from segcore.datasets import invalid_label_values

from .augmentation import augment
from .errors import TrainError


def _mix(*parts: int) -> int:
    digest = hashlib.blake2b(b",".join(str(int(p)).encode() for p in parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class GlobalBatchSampler:
    """Infinite batch sampler yielding this rank's ``[(index, aug_seed), ...]`` for each micro-batch."""

    def __init__(self, n_samples: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start: int = 0):
        if n_samples < 1:
            raise TrainError("the training set is empty")
        self.n = n_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self._perm_epoch = -1
        self._perm = None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng(_mix(self.seed, epoch, 0x5EED)).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, micro_batch: int) -> list[tuple[int, int]]:
        g = self.batch_size * self.world_size
        first = micro_batch * g + self.rank * self.batch_size
        out = []
        for p in range(first, first + self.batch_size):
            idx = int(self.permutation(p // self.n)[p % self.n])
            out.append((idx, _mix(self.seed, p, 0xA06)))
        return out

    def __iter__(self):
        m = self.start
        while True:
            yield self.batch(m)
            m += 1


class TrainSet(torch.utils.data.Dataset):
    """Wraps a segcore dataset: index ``(i, aug_seed)`` -> augmented (image, label, i)."""

    def __init__(self, dataset, n_classes: int, *, scales, crop_size: int, mean_bgr, flip: bool = True):
        self.dataset = dataset
        self.n_classes = n_classes
        self.scales = tuple(scales)
        self.crop_size = crop_size
        self.mean_bgr = tuple(mean_bgr)
        self.flip = flip

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, aug_seed = key
        sample = self.dataset[index]
        check_label(sample.label, self.n_classes, source_of(self.dataset, index, sample.name))
        image, label = augment(sample.image, sample.label, random.Random(aug_seed), scales=self.scales,
                               crop_size=self.crop_size, mean_bgr=self.mean_bgr, flip=self.flip)
        return torch.from_numpy(image), torch.from_numpy(label), index


def source_of(dataset, index: int, default: str) -> str:
    """The label file of a sample (else ``SegmentationDataset.source``, the image), for error messages."""
    item = getattr(dataset, "items", None)
    label = getattr(item[index], "label", None) if item is not None else None
    if label is not None:
        return str(label)
    try:
        return str(dataset.source(index))
    except Exception:  # noqa: BLE001 - a reader without source(): fall back to the sample name
        return default


def check_label(label: np.ndarray, n_classes: int, name: str) -> None:
    """Raise :class:`TrainError` naming the file when a label holds values outside [0, n) other than 255."""
    values = invalid_label_values(label, n_classes, IGNORE_INDEX)
    if values.size:
        shown = ", ".join(str(int(v)) for v in values[:10]) + (" ..." if len(values) > 10 else "")
        raise TrainError(f"{name}: label values {shown} are outside the {n_classes} classes "
                         f"[0, {n_classes}) and are not {IGNORE_INDEX} (ignore); "
                         f"{int(np.isin(label, values).sum())} pixel(s). "
                         "Fix the mask, map the values (data.mapping) or set model.n_classes.")


def worker_init_fn(base_seed: int, rank: int):
    """Per-worker seeding from (seed, rank, worker id); workers ignore SIGINT (the main handles it)."""

    def init(worker_id: int):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        s = _mix(base_seed, rank, worker_id, 0x3013)
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)

    return init


def make_loader(train_set: TrainSet, sampler: GlobalBatchSampler, num_workers: int, seed: int, rank: int,
                pin_memory: bool = False):
    kwargs = {}
    if num_workers > 0:
        kwargs.update(worker_init_fn=worker_init_fn(seed, rank), persistent_workers=False, prefetch_factor=2)
    return torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=pin_memory, **kwargs)


def open_datasets(cfg, run_dir: Path, *, is_main: bool = True, barrier=None):
    """(train dataset, val dataset or None) through :func:`segcore.datasets.open_dataset`."""
    from segcore.datasets import DatasetError, open_dataset

    d = cfg.data
    if d.synthetic.enabled:
        root = run_dir / "data" / "synthetic"
        if is_main:
            make_synthetic_voc(root, n_train=d.synthetic.n_train, n_val=d.synthetic.n_val,
                               size=d.synthetic.size,
                               n_classes=d.synthetic.n_classes, seed=d.synthetic.seed)
        if barrier is not None:
            barrier()
        root, fmt, train_split = str(root), "voc", "train"
        val_split = "val" if d.synthetic.n_val else None
    else:
        root, fmt, train_split, val_split = d.root, d.format, d.train_split, d.val_split
    kwargs = dict(label_space=d.label_space, mapping=d.mapping, unknown=d.unknown)
    try:
        train = open_dataset(root, fmt, split=train_split, **kwargs)
    except DatasetError as exc:
        raise DatasetError(f"{exc}\n(data.root in the config; override with --set data.root=PATH)") from exc
    val = open_dataset(root, fmt, split=val_split, **kwargs) if val_split else None
    return train, val


# ------------------------------------------------------------------------------------------ synthetic data
SYNTHETIC_CLASSES = ("background", "disc", "square", "triangle")
_CLASS_COLOURS = {1: (220, 60, 50), 2: (40, 170, 70), 3: (50, 80, 220)}


def synthetic_sample(size: int, n_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Coloured shapes (disc, square, triangle) on a textured background; labels 0..n_classes-1."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = rng.uniform(60, 190, 3)
    fx, fy = rng.uniform(0.05, 0.4, 2)
    texture = 25 * np.sin(xx * fx + rng.uniform(0, 6)) * np.cos(yy * fy + rng.uniform(0, 6))
    image = base[None, None, :] + texture[..., None] + rng.normal(0, 8, (size, size, 3))
    label = np.zeros((size, size), np.uint8)
    n_shapes = int(rng.integers(1, 4))
    for _ in range(n_shapes):
        cls = int(rng.integers(1, n_classes))
        r = rng.uniform(0.15, 0.3) * size
        cy, cx = rng.uniform(r, size - r, 2)
        if cls == 1:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        elif cls == 2:
            mask = (np.abs(yy - cy) < r * 0.85) & (np.abs(xx - cx) < r * 0.85)
        else:  # upward triangle
            mask = (yy < cy + r * 0.8) & (yy - (cy - r) > 2 * np.abs(xx - cx))
        colour = np.asarray(_CLASS_COLOURS[cls], np.float32) + rng.normal(0, 12, 3)
        image[mask] = colour + rng.normal(0, 6, (int(mask.sum()), 3))
        label[mask] = cls
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_synthetic_voc(root: Path, *, n_train: int, n_val: int, size: int, n_classes: int, seed: int) -> Path:
    """Write a VOC-layout dataset (JPEGImages, SegmentationClass, ImageSets/Segmentation/{train,val}.txt)."""
    from PIL import Image

    root = Path(root)
    done = root / ".complete"
    if done.is_file():
        return root
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    palette = voc_colormap(256).ravel().tolist()
    names = {"train": [], "val": []}
    for i in range(n_train + n_val):
        split = "train" if i < n_train else "val"
        name = f"{split}_{i:04d}"
        image, label = synthetic_sample(size, n_classes, rng)
        Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
        mask = Image.fromarray(label, mode="P")
        mask.putpalette(palette)
        mask.save(root / "SegmentationClass" / f"{name}.png")
        names[split].append(name)
    for split, items in names.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(n + "\n" for n in items))
    (root / "class_names.txt").write_text("".join(n + "\n" for n in SYNTHETIC_CLASSES[:n_classes]))
    done.write_text("ok\n")
    return root
