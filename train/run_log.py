"""What a training run records: metrics.jsonl (one JSON object per logged iteration) and TensorBoard."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

VAL_KEYS = ("mean_iou", "pixel_accuracy", "mean_accuracy", "fw_iou")


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


def iteration_record(iteration: int, loss: float, lr: float, images_per_s: float,
                     scores: dict | None) -> dict:
    """One metrics.jsonl line: the window's mean loss, the base lr, the speed and any validation scores."""
    record = {"iteration": iteration, "loss": loss, "lr": lr, "images_per_s": images_per_s}
    if scores is not None:
        for key in VAL_KEYS:
            record[f"val_{key}"] = _clean(float(scores[key]))
        record["val_class_iou"] = _clean([float(v) for v in scores["class_iou"]])
    return record


def add_scalars(writer, record: dict, param_groups) -> None:
    """``record`` to TensorBoard, with each parameter group's own lr."""
    step = record["iteration"]
    writer.add_scalar("loss/train", record["loss"], step)
    for gi, group in enumerate(param_groups):
        writer.add_scalar(f"lr/{group.get('name', gi)}", group["lr"], step)
    writer.add_scalar("speed/images_per_s", record["images_per_s"], step)
    for key in VAL_KEYS:
        if record.get(f"val_{key}") is not None:
            writer.add_scalar(f"val/{key}", record[f"val_{key}"], step)
