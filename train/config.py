"""Training configs: plain YAML loaded into dataclasses, validated, with ``--set a.b=value`` overrides.

Unknown keys are errors that list the valid ones; values are type-checked; ``--set`` values are parsed
with ``yaml.safe_load`` (never ``eval``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from segcore.model import (
    BGR_MEAN,
    DEFAULT_SCALES,
    HEADS,
    RESNET101_BLOCKS,
    STAGE_CHANNELS,
    ModelConfig,
    default_rates,
)

from .errors import ConfigError

TRAIN_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""The inference precisions (``segcore.precision.PRECISIONS``) training runs in: mixed precision is autocast
with a GradScaler; the fused fp32 kernels are inference-only."""

@dataclass
class InitSection:
    path: str | None = None
    """Weights to start from (a file path, or a segcore registry name such as voc12); None: random init."""
    format: str = "auto"
    """auto, checkpoint (a full DeepLab-v2 model), backbone (Caffe COCO init, no ASPP) or torchvision."""


@dataclass
class ModelSection:
    n_classes: int | None = None
    """None: the number of class names (data.class_names or the dataset's)."""
    n_blocks: list[int] = field(default_factory=lambda: list(RESNET101_BLOCKS))
    width: list[int] = field(default_factory=lambda: list(STAGE_CHANNELS))
    aspp: str = ModelConfig.aspp
    """The ASPP head: v2 (the published ASPP-L) or v3 (BatchNorm in the branches plus image pooling)."""
    atrous_rates: list[int] | None = None
    """One rate per atrous branch; None: the head's default (v2: 6, 12, 18, 24; v3: 6, 12, 18)."""
    sync_bn: bool = False
    """v3 under DDP: the head's BatchNorm uses statistics over all processes' images (SyncBatchNorm, CUDA)."""
    msc_scales: list[float] = field(default_factory=lambda: list(DEFAULT_SCALES))
    stride_in_1x1: bool = ModelConfig.stride_in_1x1
    init: InitSection = field(default_factory=InitSection)


@dataclass
class SyntheticSection:
    """Generated VOC-style data (coloured shapes on textured backgrounds) written into the run folder."""

    enabled: bool = False
    n_train: int = 48
    n_val: int = 12
    size: int = 64
    n_classes: int = 4
    seed: int = 1234


@dataclass
class DataSection:
    root: str | None = None
    format: str = "auto"
    train_split: str | None = None
    val_split: str | None = None
    label_space: str | None = None
    mapping: str | None = None
    unknown: str = "error"
    class_names: list[str] | None = None
    """Overrides the dataset's class names (their count sets model.n_classes when that is None)."""
    scales: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5])
    crop_size: int = 321
    flip: bool = True
    mean_bgr: list[float] = field(default_factory=lambda: list(BGR_MEAN))
    num_workers: int = 2
    val_max_images: int | None = None
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)


@dataclass
class SolverSection:
    iterations: int = 20000
    batch_size: int = 5
    """Images per process per forward pass; the global batch is batch_size x processes x iter_size."""
    iter_size: int = 2
    lr: float = 2.5e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    lr_step: int = 10
    """The learning rate is recomputed every lr_step iterations (the reference's PolynomialLR step_size)."""
    seed: int = 0


@dataclass
class LogSection:
    every: int = 20
    val_every: int = 0
    """Validate every N iterations (0: only after the last one; validation needs data.val_split)."""
    save_every: int = 1000
    tensorboard: bool = True
    progress: bool = True


@dataclass
class RuntimeSection:
    device: str = "auto"
    precision: str = "auto"
    """auto (bf16 on CUDA where supported, else fp16 with a GradScaler; fp32 on CPU), fp32, bf16, fp16."""
    channels_last: bool = True
    """Use channels-last memory format on CUDA (ignored on the CPU)."""
    stop_after: int | None = None
    """Stop as if interrupted after this iteration (saves last.pth); for tests and time-boxed jobs."""


@dataclass
class TrainConfig:
    name: str = "run"
    out: str | None = None
    """Run folder; None: runs/<name>. The --out option overrides it."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    solver: SolverSection = field(default_factory=SolverSection)
    log: LogSection = field(default_factory=LogSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- parsing
def _check_value(value, tp, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(value, inner[0], where)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2.5e-4 as a string; accept numbers written that way
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover - schema bug


def _from_dict(cls, data, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(prefix + str(k) for k in unknown)}; valid keys"
                          f"{' in ' + where if where else ''}: {', '.join(names)}")
    kwargs = {k: _check_value(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _validate(cfg: TrainConfig) -> TrainConfig:
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    m, d, s, lg, r = cfg.model, cfg.data, cfg.solver, cfg.log, cfg.runtime
    _validate_head(m, s)
    need(m.n_classes is None or m.n_classes >= 1, "model.n_classes must be positive")
    need(len(m.n_blocks) == 4 and min(m.n_blocks) >= 1, "model.n_blocks needs four positive counts")
    need(len(m.width) == 4 and all(w >= 4 and w % 4 == 0 for w in m.width),
         "model.width needs four channel counts divisible by 4")
    need(len(m.atrous_rates) >= 1 and min(m.atrous_rates) >= 1, "model.atrous_rates needs positive rates")
    need(all(x > 0 for x in m.msc_scales), "model.msc_scales must be positive")
    need(m.init.format in ("auto", "checkpoint", "backbone", "torchvision"),
         f"model.init.format must be auto, checkpoint, backbone or torchvision, got {m.init.format!r}")
    need(d.synthetic.enabled or d.root,
         "data.root is required (the dataset folder), or data.synthetic.enabled")
    need(d.crop_size >= 8, "data.crop_size must be at least 8")
    need(len(d.scales) >= 1 and all(x > 0 for x in d.scales), "data.scales needs positive scales")
    need(len(d.mean_bgr) == 3, "data.mean_bgr needs three values (B, G, R)")
    need(d.num_workers >= 0, "data.num_workers must be >= 0")
    need(d.unknown in ("error", "ignore"), f"data.unknown must be error or ignore, got {d.unknown!r}")
    need(d.class_names is None or len(d.class_names) >= 1, "data.class_names must not be empty")
    need(d.synthetic.n_classes >= 2 and d.synthetic.n_classes <= 4, "data.synthetic.n_classes must be 2-4")
    need(d.synthetic.n_train >= 1 and d.synthetic.n_val >= 0 and d.synthetic.size >= 16,
         "data.synthetic needs n_train >= 1, n_val >= 0, size >= 16")
    need(s.iterations >= 1, "solver.iterations must be >= 1")
    need(s.batch_size >= 1 and s.iter_size >= 1, "solver.batch_size and solver.iter_size must be >= 1")
    need(s.lr > 0 and s.momentum >= 0 and s.weight_decay >= 0 and s.poly_power >= 0,
         "solver: lr must be > 0; momentum, weight_decay and poly_power >= 0")
    need(s.lr_step >= 1, "solver.lr_step must be >= 1")
    need(lg.every >= 1 and lg.val_every >= 0 and lg.save_every >= 1,
         "log.every and log.save_every must be >= 1, log.val_every >= 0")
    need(r.precision in TRAIN_PRECISIONS,
         f"runtime.precision must be {', '.join(TRAIN_PRECISIONS[:-1])} or {TRAIN_PRECISIONS[-1]}")
    need(r.stop_after is None or r.stop_after >= 1, "runtime.stop_after must be >= 1")
    if m.init.format == "torchvision" and m.stride_in_1x1:
        raise ConfigError("model.init.format torchvision needs model.stride_in_1x1: false "
                          "(torchvision's bottleneck strides in the 3x3 convolution)")
    return cfg


def _validate_head(m: ModelSection, s: SolverSection) -> None:
    """The ASPP head's options; fills in the head's default atrous rates."""
    if m.aspp not in HEADS:
        raise ConfigError(f"model.aspp must be {' or '.join(HEADS)}, got {m.aspp!r}")
    if m.atrous_rates is None:
        m.atrous_rates = list(default_rates(m.aspp))
    if m.sync_bn and m.aspp != "v3":
        raise ConfigError("model.sync_bn needs model.aspp: v3 (the v2 model's BatchNorms are all frozen, "
                          "so there are no batch statistics to synchronise)")
    if m.aspp == "v3" and s.batch_size < 2:
        raise ConfigError(f"solver.batch_size is {s.batch_size} but model.aspp: v3 trains its BatchNorm on "
                          "batch statistics, which need at least 2 images per process; set solver.batch_size "
                          ">= 2 (solver.iter_size accumulates more)")


def parse_override(text: str) -> tuple[list[str], object]:
    """``a.b=value`` -> (["a", "b"], yaml.safe_load(value))."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. solver.iterations=100")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"--set {text!r}: empty key component")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({exc})") from exc
    return path, value


def apply_overrides(data: dict, overrides) -> dict:
    for text in overrides or ():
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {'.'.join(path[:i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return data


def config_from_dict(data: dict, overrides=()) -> TrainConfig:
    data = apply_overrides(_deepcopy(data or {}), overrides)
    return _validate(_from_dict(TrainConfig, data, ""))


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def find_config(path: str | Path) -> Path:
    """A config file, or the name of one shipped in train/configs (``smoke``, ``voc12``, ...), so the
    installed ``segcore-train --config smoke`` works from any folder."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = SHIPPED_CONFIGS / f"{path.name}.yaml"
    if path.parent == Path(".") and not path.suffix and shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"{path}: no such config file (or give a shipped config by name: {names})")


def load_config(path: str | Path, overrides=()) -> TrainConfig:
    """Read a YAML config, apply ``--set`` overrides, validate, and return a :class:`TrainConfig`."""
    path = find_config(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    try:
        return config_from_dict(data or {}, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _deepcopy(x):
    if isinstance(x, dict):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x
