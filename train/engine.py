"""The DeepLab-v2 training loop: protocol (param groups, frozen BN, poly lr, MSC loss), DDP, resume.

Protocol, following kazuto1011/deeplab-pytorch ``main.py``:

* SGD, momentum 0.9. Groups as the reference ``get_params``: backbone conv weights at the base lr with
  weight decay; ASPP weights at 10x with weight decay; ASPP biases at 20x with weight decay 0. The
  backbone's BatchNorm is frozen (eval mode, ``requires_grad=False``) and in no group.
* The v3 head (``model.aspp: v3``) trains its BatchNorm: its scales at 10x and its shifts with the
  biases at 20x, neither with weight decay; under DDP its running statistics are rank 0's, sent to every
  process after each update (with ``model.sync_bn``, SyncBatchNorm on CUDA, they come from all
  processes' batches).
* Poly lr: iteration ``i`` (1-based) uses ``lr * (1 - s / max_iter) ** power`` with
  ``s = lr_step * floor((i - 1) / lr_step)``; that is the reference's ``PolynomialLR(step_size=10)``
  stepped with ``scheduler.step(epoch=iteration)`` after each update (it changes the lr only when
  ``iteration % step_size == 0``). ``solver.lr_step: 1`` gives the smooth schedule.
* MSC loss: cross-entropy (ignore 255) on each scale's logits and on their max, each against the labels
  resized by nearest neighbour (PIL's rule) to that logit size, summed; divided by ``iter_size`` for
  gradient accumulation.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from annotations import IGNORE_INDEX
from segcore.checkpoint import read_checkpoint_file, save_checkpoint
from segcore.model import build_model
from segcore.precision import resolve_precision

from . import init_weights
from .config import TRAIN_PRECISIONS, ConfigError, TrainConfig, dump_config
from .data import (
    SYNTHETIC_CLASSES,
    GlobalBatchSampler,
    TrainSet,
    make_loader,
    open_datasets,
)
from .errors import TrainError

CHECKPOINT_FORMAT = 1


# ------------------------------------------------------------------------------------------------ protocol
def _in_head(name: str) -> bool:
    return "aspp" in name


def freeze_bn(model: nn.Module) -> nn.Module:
    """The backbone's BatchNorm layers to eval mode (running stats stay put), affine parameters frozen.

    BatchNorm in the ASPP head (the v3 head's) keeps training.
    """
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not _in_head(name):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
    return model


def set_train_mode(model: nn.Module) -> nn.Module:
    model.train()
    return freeze_bn(model)


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """The reference ``get_params`` groups: [backbone convs 1x, ASPP weights 10x, ASPP biases 20x (wd 0)].

    A head with BatchNorm (v3) adds its BN scales as a fourth group, 10x without weight decay; its BN
    shifts join the biases.
    """
    backbone, aspp_w, aspp_b, aspp_norm = [], [], [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and _in_head(name):
            aspp_norm.append(m.weight)
            aspp_b.append(m.bias)
        if not isinstance(m, nn.Conv2d):
            continue
        if _in_head(name):
            aspp_w.append(m.weight)
            if m.bias is not None:
                aspp_b.append(m.bias)
        elif "layer" in name:
            backbone.extend(m.parameters())
    return [
        {"params": backbone, "lr": lr, "weight_decay": weight_decay, "name": "backbone", "lr_mult": 1.0},
        {"params": aspp_w, "lr": 10 * lr, "weight_decay": weight_decay, "name": "aspp_weight",
         "lr_mult": 10.0},
        {"params": aspp_b, "lr": 20 * lr, "weight_decay": 0.0, "name": "aspp_bias", "lr_mult": 20.0},
    ] + ([{"params": aspp_norm, "lr": 10 * lr, "weight_decay": 0.0, "name": "aspp_norm", "lr_mult": 10.0}]
         if aspp_norm else [])


def share_head_statistics(model: nn.Module, info: "DistInfo") -> None:
    """Rank 0's running statistics of the head's BatchNorm to every process.

    Each process updates its own from its own batch; without this the ranks would validate with
    different statistics than the checkpoint (rank 0's) holds.
    """
    if info.enabled:
        for buffer in model.base.aspp.buffers():
            dist.broadcast(buffer, 0)


def sync_head_bn(model: nn.Module, info: "DistInfo", device: torch.device) -> nn.Module:
    """The head's BatchNorm as SyncBatchNorm for ``model.sync_bn`` under DDP (the backbone's stays frozen)."""
    if not info.enabled:
        return model
    if device.type != "cuda":
        raise ConfigError("model.sync_bn: PyTorch's SyncBatchNorm runs on CUDA devices only; on CPU processes "
                          "set model.sync_bn: false (each process then normalises its own batch)")
    model.base.aspp = nn.SyncBatchNorm.convert_sync_batchnorm(model.base.aspp)
    return model


def poly_factor(done: int, max_iter: int, power: float, step: int = 10) -> float:
    """Multiplier of the base lr for the iteration after ``done`` completed ones (see module docstring)."""
    s = step * (done // step)
    return max(0.0, 1.0 - s / max_iter) ** power


def set_lr(optimizer, base_lr: float, factor: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group.get("lr_mult", 1.0) * factor
    return base_lr * factor


def resize_labels(labels: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour resize of BxHxW labels with PIL's rule: source = floor((dst + 0.5) * in / out)."""
    h_in, w_in = labels.shape[-2:]
    h, w = int(size[0]), int(size[1])
    if (h, w) == (h_in, w_in):
        return labels
    dev = labels.device
    iy = torch.floor((torch.arange(h, dtype=torch.float64) + 0.5) * (h_in / h)).long().clamp_(0, h_in - 1)
    ix = torch.floor((torch.arange(w, dtype=torch.float64) + 0.5) * (w_in / w)).long().clamp_(0, w_in - 1)
    return labels.index_select(-2, iy.to(dev)).index_select(-1, ix.to(dev))


def msc_loss(logits_list, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum over ``[logits_1.0, *logits_scaled, logits_max]`` of CE against labels resized to each size."""
    if isinstance(logits_list, torch.Tensor):
        logits_list = [logits_list]
    total = 0.0
    for logits in logits_list:
        target = resize_labels(labels, logits.shape[-2:])
        total = total + F.cross_entropy(logits.float(), target, ignore_index=ignore_index)
    return total


# ------------------------------------------------------------------------------------------ RNG and saving
def rng_state() -> dict:
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "python": {"version": int(version), "state": torch.tensor(state, dtype=torch.int64),
                   "gauss": None if gauss is None else float(gauss)},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def save_run_checkpoint(path: Path, state_dict: dict, meta: dict, train_state: dict | None = None) -> Path:
    """Atomic checkpoint write (see ``segcore.checkpoint.save_checkpoint``); a failure says whether the old file survives."""
    path = Path(path)
    try:
        return save_checkpoint(path, state_dict, meta, extra={"train_state": train_state} if train_state else None)
    except (OSError, RuntimeError) as exc:
        kept = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
        raise TrainError(f"{path}: could not write the checkpoint ({exc}); {kept}") from exc


# ------------------------------------------------------------------------------------------------- runtime
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    """Read torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*) and init the group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_pref == "auto":
        use_cuda = torch.cuda.is_available()
        device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    else:
        device = torch.device(device_pref)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    info = DistInfo(rank, world, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
    return info, device


class StopFlag:
    """SIGINT/SIGTERM -> finish the current step, save last.pth, exit. A second SIGINT stops at once."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def install(self):
        if threading_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing the current step, then saving "
              "checkpoints/last.pth "
              "(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@dataclass
class TrainResult:
    status: str  # finished | interrupted | stopped
    iteration: int
    run_dir: Path
    signum: int = 0
    final_scores: dict | None = None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.status == "interrupted" else 0


# ------------------------------------------------------------------------------------------------- logging
class MetricsLog:
    def __init__(self, path: Path, enabled: bool, resume_at: int | None):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        if resume_at is None:
            path.write_text("")
        elif path.exists():  # drop records written after the checkpoint we resume from
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("iteration", 0) <= resume_at:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue
            path.write_text("".join(k + "\n" for k in keep))

    def write(self, record: dict):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, allow_nan=False, default=_json_default) + "\n")


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    raise TypeError(type(x).__name__)


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


_TB_WARNED = False


def make_writer(path: Path, enabled: bool):
    global _TB_WARNED
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as exc:  # noqa: BLE001 - tensorboard missing or broken: say so once, go on
        if not _TB_WARNED:
            print(f"TensorBoard logging is off: tensorboard is not importable ({exc}); "
                  "pip install tensorboard==2.21.0 to enable it", file=sys.stderr)
            _TB_WARNED = True
        return None
    return SummaryWriter(str(path))


# ---------------------------------------------------------------------------------------------- validation
def evaluate(model: nn.Module, dataset, class_names, device, *, precision: str = "fp32",
             max_images=None) -> dict:
    """Validation through segcore's evaluation loop (:func:`segcore.evaluate`) with the protocol
    ``python -m segcore evaluate`` uses for the dataset's format, so the mIoU logged here is the one
    that command reports for the saved checkpoint. Shards over ranks; an unreadable or mislabelled
    validation image stops the run with its file named."""
    from segcore.evaluation import evaluate as evaluate_dataset
    from segcore.evaluation import failure_text
    from segcore.segmenter import Segmenter

    was_training = model.training
    n = len(class_names)
    try:
        # the palette only colours report thumbnails, and validation writes no report
        segmenter = Segmenter(model, class_names, np.zeros((n, 3), np.uint8), scales=model.scales, device=device,
                              precision=precision, max_pixels=None)
        # the labels are indices into the trainer's classes, whatever names the dataset carries
        result = evaluate_dataset(segmenter, dataset, progress=False, worst=0, max_images=max_images,
                                  intervals=False, class_names=class_names)
    finally:
        if was_training:
            set_train_mode(model)
    if result.failures:
        reason = failure_text(result.failures[0])
        more = f" (and {len(result.failures) - 1} more)" if len(result.failures) > 1 else ""
        raise TrainError(f"validation image {reason}{more}")
    return result.scores


# ------------------------------------------------------------------------------------------------- trainer
def _class_names(cfg: TrainConfig, dataset) -> list[str]:
    if cfg.data.class_names:
        return list(cfg.data.class_names)
    if cfg.data.synthetic.enabled:
        return list(SYNTHETIC_CLASSES[:cfg.data.synthetic.n_classes])
    names = list(getattr(dataset, "class_names", None) or [])
    if cfg.model.n_classes and (not names or len(names) != cfg.model.n_classes):
        return names[:cfg.model.n_classes] + [f"class_{i}" for i in range(len(names), cfg.model.n_classes)]
    if not names:
        raise ConfigError("the dataset has no class names: set data.class_names or model.n_classes")
    return names


_RESUME_FREE = ("name", "out", "log.", "runtime.", "data.num_workers", "data.val_max_images", "data.root")


def _diff(a, b, prefix=""):
    out = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix[:-1]]


def _with_new_keys(saved: dict, defaults: dict) -> dict:
    """``saved`` with the keys added to the config since it was written set to their defaults.

    A new key's default reproduces the old behaviour (``model.aspp: v2``), so older runs still resume.
    """
    if not isinstance(saved, dict) or not isinstance(defaults, dict):
        return saved
    out = dict(saved)
    for key, value in defaults.items():
        out[key] = _with_new_keys(saved[key], value) if key in saved else value
    return out


def resolve_run_dir(cfg: TrainConfig, out) -> Path:
    return Path(out or cfg.out or Path("runs") / cfg.name)


def train(cfg: TrainConfig, out=None, *, resume: bool = False) -> TrainResult:
    """Run (or resume) training as ``cfg`` says; returns how it ended; SegcoreError on bad input."""
    run_dir = resolve_run_dir(cfg, out)
    ckpt_dir = run_dir / "checkpoints"
    last_path = ckpt_dir / "last.pth"
    if resume and not last_path.is_file():
        raise TrainError(f"--resume: {last_path} does not exist (nothing to resume in {run_dir})")
    if not resume and last_path.is_file():
        raise TrainError(f"{run_dir} already holds a run ({last_path}); use --resume to continue it "
                         "or --out to start a new one")
    info, device = setup_distributed(cfg.runtime.device)
    try:
        return _train(cfg, run_dir, resume, info, device)
    finally:
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _barrier(info: DistInfo):
    if info.enabled:
        dist.barrier()


def _train(cfg: TrainConfig, run_dir: Path, resume: bool, info: DistInfo,
           device: torch.device) -> TrainResult:
    s = cfg.solver
    ckpt_dir = run_dir / "checkpoints"
    last_path = ckpt_dir / "last.pth"
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    _barrier(info)

    # data
    train_ds, val_ds = open_datasets(cfg, run_dir, is_main=info.is_main, barrier=lambda: _barrier(info))
    class_names = _class_names(cfg, train_ds)
    n_classes = cfg.model.n_classes or len(class_names)
    if len(class_names) != n_classes:
        raise ConfigError(f"model.n_classes is {n_classes} but there are {len(class_names)} class names "
                          f"({', '.join(class_names[:5])}...); set data.class_names")
    cfg.model.n_classes = n_classes
    if info.is_main:
        print(f"train: {_describe(train_ds)}", file=sys.stderr)
        if val_ds is not None:
            print(f"val:   {_describe(val_ds)}", file=sys.stderr)

    # model
    torch.manual_seed(s.seed)
    model = build_model(n_classes, n_blocks=cfg.model.n_blocks, atrous_rates=cfg.model.atrous_rates,
                        scales=cfg.model.msc_scales, stride_in_1x1=cfg.model.stride_in_1x1,
                        width=cfg.model.width, aspp=cfg.model.aspp)
    init_summary = {"init": "resumed"} if resume else init_weights.initialise(model, cfg.model.init.path,
                                                                              cfg.model.init.format)
    if info.is_main and init_summary.get("head"):
        print(f"init: {init_summary['head']}", file=sys.stderr)
    if cfg.model.sync_bn:
        sync_head_bn(model, info, device)
    set_train_mode(model)
    # mixed precision trains on CUDA only; elsewhere the run (and its validation) is plain fp32
    precision = resolve_precision(cfg.runtime.precision if device.type == "cuda" else "fp32", device,
                                  TRAIN_PRECISIONS)
    channels_last = cfg.runtime.channels_last and device.type == "cuda"
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    optimizer = torch.optim.SGD(param_groups(model, s.lr, s.weight_decay), lr=s.lr, momentum=s.momentum)
    scaler = torch.amp.GradScaler("cuda", enabled=(precision == "fp16"))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast():
        if amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    config_dict = cfg.to_dict()
    meta_base = {"class_names": class_names, "aspp": cfg.model.aspp, "atrous_rates": list(cfg.model.atrous_rates),
                 "stride_in_1x1": bool(cfg.model.stride_in_1x1), "n_blocks": list(cfg.model.n_blocks),
                 "width": list(cfg.model.width), "msc_scales": list(cfg.model.msc_scales),
                 "mean_bgr": list(cfg.data.mean_bgr), "config": config_dict, "format": CHECKPOINT_FORMAT}

    start = 0
    position = 0
    if resume:
        payload = read_checkpoint_file(last_path)
        saved_cfg = payload.get("meta", {}).get("config", {})
        saved_cfg = _with_new_keys(saved_cfg, TrainConfig().to_dict())
        diffs = [d for d in _diff(saved_cfg, config_dict) if not d.startswith(_RESUME_FREE)]
        if diffs:
            raise ConfigError(f"--resume: the config differs from the one {last_path} was trained with in "
                              f"{', '.join(diffs)}; resume with the same settings (log.*, runtime.*, "
                              "data.num_workers and data.root may change)")
        model.load_state_dict(payload["state_dict"])
        ts = payload["train_state"]
        optimizer.load_state_dict(ts["optimizer"])
        if ts.get("scaler"):
            scaler.load_state_dict(ts["scaler"])
        set_rng_state(ts["rng"])
        start = int(ts["iteration"])
        position = int(ts["position"])
        init_summary = payload["meta"].get("init", init_summary)
        del payload
    meta_base["init"] = init_summary

    if info.is_main:
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    g = s.batch_size * info.world_size
    if position % g:
        raise TrainError(f"cannot resume at sample {position} with a global batch of {g} "
                         "(batch_size x processes); use a process count that divides it")

    ddp = model
    if info.enabled:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    train_set = TrainSet(train_ds, n_classes, scales=cfg.data.scales, crop_size=cfg.data.crop_size,
                         mean_bgr=cfg.data.mean_bgr, flip=cfg.data.flip)
    sampler = GlobalBatchSampler(len(train_ds), s.batch_size, seed=s.seed, rank=info.rank,
                                 world_size=info.world_size, start=position // g)
    loader = make_loader(train_set, sampler, cfg.data.num_workers, s.seed, info.rank,
                         pin_memory=device.type == "cuda")
    batches = iter(loader)

    metrics = MetricsLog(run_dir / "metrics.jsonl", info.is_main, start if resume else None)
    writer = make_writer(run_dir / "tensorboard", info.is_main and cfg.log.tensorboard)
    stop = StopFlag().install()

    def save(path: Path, iteration: int, with_state: bool):
        if not info.is_main:
            return
        meta = dict(meta_base, iteration=iteration)
        state = None
        if with_state:
            state = {"iteration": iteration, "position": iteration * s.iter_size * g,
                     "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "rng": rng_state(), "world_size": info.world_size}
        save_run_checkpoint(path, model.state_dict(), meta, state)

    def validate(iteration: int) -> dict | None:
        if val_ds is None:
            return None
        scores = evaluate(model, val_ds, class_names, device, precision=precision,
                          max_images=cfg.data.val_max_images)
        if info.is_main:
            print(f"iteration {iteration}: val mIoU {scores['mean_iou']:.4f}, pixel accuracy "
                  f"{scores['pixel_accuracy']:.4f}", file=sys.stderr)
        return scores

    progress = None
    if info.is_main and cfg.log.progress:
        from tqdm import tqdm

        progress = tqdm(total=s.iterations, initial=start, dynamic_ncols=True, mininterval=1.0, unit="it",
                        file=sys.stderr)
    images_per_iter = s.batch_size * s.iter_size * info.world_size
    window_loss, window_n, window_t = 0.0, 0, time.perf_counter()
    status, final_scores, it = "finished", None, start
    try:
        for it in range(start, s.iterations):
            lr = set_lr(optimizer, s.lr, poly_factor(it, s.iterations, s.poly_power, s.lr_step))
            optimizer.zero_grad(set_to_none=True)
            loss_acc = torch.zeros((), device=device)
            for k in range(s.iter_size):
                images, labels, _ = next(batches)
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                sync = nullcontext() if (not info.enabled or k == s.iter_size - 1) else ddp.no_sync()
                with sync:
                    with autocast():
                        logits = ddp(images)
                    loss = msc_loss(logits, labels) / s.iter_size
                    scaler.scale(loss).backward()
                loss_acc += loss.detach()
            stats = torch.stack([loss_acc.float(), torch.tensor(float(stop.signum), device=device)])
            if info.enabled:
                dist.all_reduce(stats)
                stats[0] /= info.world_size
            loss_value, stop_requested = stats.tolist()
            if not math.isfinite(loss_value):
                kept = (f"the last good checkpoint is {last_path}" if last_path.is_file()
                        else "no checkpoint was saved yet")
                raise TrainError(f"non-finite loss ({loss_value}) at iteration {it + 1}; the weights were "
                                 "not "
                                 f"updated and training stopped; {kept}. Lower solver.lr or check the data.")
            scaler.step(optimizer)
            scaler.update()
            if cfg.model.aspp == "v3":
                share_head_statistics(model, info)
            done = it + 1
            window_loss += loss_value
            window_n += 1
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}",
                                     img_s=f"{images_per_iter * (progress.format_dict.get('rate') or 0):.1f}",
                                     refresh=False)
            is_last = done == s.iterations
            scores = None
            if (cfg.log.val_every and done % cfg.log.val_every == 0) or is_last:
                scores = validate(done)
            if done % cfg.log.every == 0 or scores is not None or is_last:
                now = time.perf_counter()
                record = {"iteration": done, "loss": window_loss / window_n, "lr": lr,
                          "images_per_s": images_per_iter * window_n / max(now - window_t, 1e-9)}
                if scores is not None:
                    for key in ("mean_iou", "pixel_accuracy", "mean_accuracy", "fw_iou"):
                        record[f"val_{key}"] = _clean(float(scores[key]))
                    record["val_class_iou"] = _clean([float(v) for v in scores["class_iou"]])
                metrics.write(record)
                if writer is not None:
                    writer.add_scalar("loss/train", record["loss"], done)
                    for gi, group in enumerate(optimizer.param_groups):
                        writer.add_scalar(f"lr/{group.get('name', gi)}", group["lr"], done)
                    writer.add_scalar("speed/images_per_s", record["images_per_s"], done)
                    if scores is not None:
                        for key in ("mean_iou", "pixel_accuracy", "mean_accuracy", "fw_iou"):
                            if record[f"val_{key}"] is not None:
                                writer.add_scalar(f"val/{key}", record[f"val_{key}"], done)
                window_loss, window_n, window_t = 0.0, 0, time.perf_counter()
            if is_last:
                final_scores = scores
                break
            if stop_requested or (cfg.runtime.stop_after and done >= cfg.runtime.stop_after):
                status = "interrupted" if stop_requested else "stopped"
                save(last_path, done, True)
                break
            if done % cfg.log.save_every == 0:
                save(last_path, done, True)
        else:
            done = start
        if status == "finished":
            done = s.iterations
            save(last_path, done, True)
            save(ckpt_dir / "final.pth", done, False)
        _barrier(info)
    finally:
        stop.restore()
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()
        del batches
    if info.is_main:
        if status == "finished":
            print(f"finished {done} iterations; model: {ckpt_dir / 'final.pth'}", file=sys.stderr)
        else:
            print(f"stopped after iteration {done}; state saved to {last_path}; continue with --resume",
                  file=sys.stderr)
    return TrainResult(status, done, run_dir, int(stop.signum) if status == "interrupted" else 0,
                       final_scores)


def _describe(ds) -> str:
    try:
        return str(ds.describe())
    except Exception:  # noqa: BLE001 - description is cosmetic
        return f"{type(ds).__name__} with {len(ds)} samples"
