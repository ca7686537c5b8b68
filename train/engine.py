"""The DeepLab-v2 training loop: data, model, optimiser, resume, the iterations, validation, checkpoints.

The protocol's maths (parameter groups, frozen BN, poly lr, MSC loss) is in :mod:`train.protocol`, where
the run executes (device, torchrun, signals, RNG state) in :mod:`train.runtime`, what it records in
:mod:`train.run_log`.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from segcore.checkpoint import read_checkpoint_file, save_checkpoint
from segcore.distributed import barrier
from segcore.evaluation import evaluate as evaluate_dataset
from segcore.evaluation import failure_text
from segcore.model import build_model
from segcore.precision import resolve_precision
from segcore.segmenter import Segmenter

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
from .protocol import msc_loss, param_groups, poly_factor, set_lr, set_train_mode
from .run_log import MetricsLog, add_scalars, iteration_record, make_writer
from .runtime import (
    DistInfo,
    StopFlag,
    end_runtime,
    rng_state,
    set_rng_state,
    setup_runtime,
    share_head_statistics,
    sync_head_bn,
)

CHECKPOINT_FORMAT = 1


def save_run_checkpoint(path: Path, state_dict: dict, meta: dict, train_state: dict | None = None) -> Path:
    """Atomic checkpoint write (``segcore.checkpoint.save_checkpoint``); a failure says whether the old
    file survives."""
    path = Path(path)
    try:
        return save_checkpoint(path, state_dict, meta, extra={"train_state": train_state} if train_state else None)
    except (OSError, RuntimeError) as exc:
        kept = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
        raise TrainError(f"{path}: could not write the checkpoint ({exc}); {kept}") from exc


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


# ---------------------------------------------------------------------------------------------- validation
def evaluate(model: nn.Module, dataset, class_names, device, *, precision: str = "fp32",
             max_images=None) -> dict:
    """Validation through segcore's evaluation loop (:func:`segcore.evaluate`) with the protocol
    ``python -m segcore evaluate`` uses for the dataset's format, so the mIoU logged here is the one
    that command reports for the saved checkpoint. Shards over ranks; an unreadable or mislabelled
    validation image stops the run with its file named."""
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


def read_resume_checkpoint(path: Path, config_dict: dict) -> dict:
    """The saved run at ``path``; ConfigError when it was trained with settings that must not change."""
    payload = read_checkpoint_file(path)
    saved_cfg = _with_new_keys(payload.get("meta", {}).get("config", {}), TrainConfig().to_dict())
    diffs = [d for d in _diff(saved_cfg, config_dict) if not d.startswith(_RESUME_FREE)]
    if diffs:
        raise ConfigError(f"--resume: the config differs from the one {path} was trained with in "
                          f"{', '.join(diffs)}; resume with the same settings (log.*, runtime.*, "
                          "data.num_workers and data.root may change)")
    return payload


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
    info, device = setup_runtime(cfg.runtime.device)
    try:
        return _train(cfg, run_dir, resume, info, device)
    finally:
        end_runtime(info)


def _train(cfg: TrainConfig, run_dir: Path, resume: bool, info: DistInfo,
           device: torch.device) -> TrainResult:
    s = cfg.solver
    ckpt_dir = run_dir / "checkpoints"
    last_path = ckpt_dir / "last.pth"
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier(info.world_size)

    # data
    train_ds, val_ds = open_datasets(cfg, run_dir, is_main=info.is_main,
                                     barrier=lambda: barrier(info.world_size))
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
        payload = read_resume_checkpoint(last_path, config_dict)
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
                speed = images_per_iter * window_n / max(time.perf_counter() - window_t, 1e-9)
                record = iteration_record(done, window_loss / window_n, lr, speed, scores)
                metrics.write(record)
                if writer is not None:
                    add_scalars(writer, record, optimizer.param_groups)
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
        barrier(info.world_size)
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
