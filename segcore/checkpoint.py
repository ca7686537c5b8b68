"""Loading DeepLab-v2 checkpoints safely and strictly.

Accepts the state dicts released by kazuto1011/deeplab-pytorch (``base.layer1.conv1.conv.weight``
...), the same without ``base.`` or with ``module.`` prefixes, ``.safetensors`` files, and the
checkpoints this project's trainer writes (a dict holding ``state_dict`` and ``meta``).

``.pth`` files are read with ``torch.load(weights_only=True)``: its unpickler only rebuilds tensors
and plain containers, so a file that would run code on loading is refused before anything runs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .caffe_convert import convert_caffemodel
from .aspp_v3 import V3_CHANNELS
from .errors import CheckpointError
from .model import HEADS, MSC, build_model, default_rates

META_KEY = "segcore"
"""safetensors metadata key (and dict key in ``.pth`` files) holding the JSON metadata."""

_BLOCK_KEY = re.compile(r"^base\.layer([2-5])\.block(\d+)\.")
_ASPP_KEY = re.compile(r"^base\.aspp\.c(\d+)\.weight$")
_V3_BRANCH_KEY = re.compile(r"^base\.aspp\.c(\d+)\.conv\.weight$")
V3_CLASSIFIER_KEY = "base.aspp.classifier.weight"


def head_of(state: dict) -> str:
    """Which ASPP head a state dict holds, from its keys: "v3" has ``base.aspp.classifier``, "v2" does not."""
    return "v3" if V3_CLASSIFIER_KEY in state else "v2"


def classifier_key(state: dict) -> str:
    """The key whose first dimension is the class count: the v2 head's first branch or v3's classifier."""
    return V3_CLASSIFIER_KEY if head_of(state) == "v3" else "base.aspp.c0.weight"


@dataclass
class Checkpoint:
    """A validated state dict plus whatever the file says about itself."""

    state_dict: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def n_classes(self) -> int:
        return int(self.state_dict[classifier_key(self.state_dict)].shape[0])

    @property
    def class_names(self) -> list[str] | None:
        names = self.meta.get("class_names")
        return list(names) if names else None

    def architecture(self) -> dict:
        """Keyword arguments of :func:`build_model` that reproduce this checkpoint's shapes."""
        sd = self.state_dict
        blocks = [0, 0, 0, 0]
        for key in sd:
            m = _BLOCK_KEY.match(key)
            if m:
                stage = int(m.group(1)) - 2
                blocks[stage] = max(blocks[stage], int(m.group(2)))
        if min(blocks) == 0:
            raise CheckpointError(f"{self._where()}: no blocks found for stages {[i + 2 for i, b in enumerate(blocks) if not b]}"
                                  " (expected keys like base.layer2.block1.reduce.conv.weight)")
        found = head_of(sd)
        # the head the file records wins: one that says v3 and holds v2 keys fails strict loading, keys listed
        head = self.meta.get("aspp") if self.meta.get("aspp") in HEADS else found
        if found == "v3":  # c0 is the 1x1 branch; c1.. are the atrous ones
            n_branches = len([k for k in sd if _V3_BRANCH_KEY.match(k)]) - 1
        else:
            n_branches = len([k for k in sd if _ASPP_KEY.match(k)])
        rates = tuple(self.meta.get("atrous_rates") or default_rates(head)[:n_branches])
        if len(rates) != n_branches and found == head:
            raise CheckpointError(f"{self._where()}: {n_branches} atrous ASPP branches but no atrous rates for "
                                  "them (the published models have 4: rates 6, 12, 18, 24)")
        width = []
        for stage in range(2, 6):
            key = f"base.layer{stage}.block1.increase.conv.weight"
            if key not in sd:
                raise CheckpointError(f"{self._where()}: missing key {key}")
            width.append(int(sd[key].shape[0]))
        return {
            "n_classes": self.n_classes,
            "n_blocks": tuple(blocks),
            "atrous_rates": rates,
            "stride_in_1x1": bool(self.meta.get("stride_in_1x1", True)),
            "width": tuple(width),
            "aspp": head,
        }

    def _where(self) -> str:
        return str(self.path) if self.path else "checkpoint"


# ----------------------------------------------------------------------------- bounds
# A checkpoint is checked from its names and shapes before any model is built: a 1 KB file can
# describe a model of many gigabytes (zero-size or stride-0 tensors, huge channel counts, block20000).

MAX_PARAMETERS = 200_000_000
"""Values a checkpoint may hold, and parameters a model built from it may have (DeepLab-v2 ResNet-101: 43 M)."""
MAX_CLASSES = 4096
MAX_BLOCKS_PER_STAGE = 64
MAX_WIDTH = 8192
MAX_ASPP_BRANCHES = 8
MAX_ATROUS_RATE = 512
MAX_DIM = 65536
"""Largest size of any one tensor dimension."""

_INDEXED_KEY = re.compile(r"^base\.(?:layer[2-5]\.block|aspp\.c)(\d+)\.")


def check_storage(state: dict, where: str = "checkpoint") -> None:
    """Refuse tensors whose storage does not hold their values: stride-0 (expanded) or overlapping
    views look like huge tensors in a tiny file and would be materialised at full size on loading."""
    for key, t in state.items():
        need = t.numel() * t.element_size()
        have = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
        if need > have:
            raise CheckpointError(f"{where}: refused: tensor {key} of shape {tuple(t.shape)} is backed by only "
                                  f"{max(have, 0)} bytes (an expanded or overlapping view, not stored weights)")


def check_shapes(shapes: dict, where: str = "checkpoint") -> int:
    """Check a state dict's names and shapes against sane bounds; returns the number of values.

    Works on ``{name: shape}`` alone (no tensor data), so any head's keys pass through it: refuses
    zero-size tensors, more than 4 dimensions or a dimension over :data:`MAX_DIM`, block or ASPP
    branch indices over :data:`MAX_BLOCKS_PER_STAGE` / :data:`MAX_ASPP_BRANCHES`, and more than
    :data:`MAX_PARAMETERS` values in all.
    """
    total = 0
    for key, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        if len(shape) > 4:
            raise CheckpointError(
                f"{where}: refused: tensor {key} has {len(shape)} dimensions {shape} (at most 4)")
        if any(d <= 0 for d in shape):
            raise CheckpointError(f"{where}: refused: tensor {key} has a zero-size shape {shape}")
        if any(d > MAX_DIM for d in shape):
            raise CheckpointError(
                f"{where}: refused: tensor {key} of shape {shape} has a dimension over {MAX_DIM}")
        m = _INDEXED_KEY.match(key)
        if m:
            cap = MAX_ASPP_BRANCHES - 1 if ".aspp." in key else MAX_BLOCKS_PER_STAGE
            if int(m.group(1)) > cap:
                raise CheckpointError(f"{where}: refused: {key} has index {int(m.group(1))}, over the limit of "
                                      f"{cap}")
        n = 1
        for d in shape:
            n *= d
        total += n
        if total > MAX_PARAMETERS:
            raise CheckpointError(f"{where}: refused: the checkpoint holds more than {MAX_PARAMETERS:,} values")
    return total


def _conv_bn(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + 4 * cout  # conv weight + BatchNorm weight, bias, running mean and variance


def estimate_parameters(arch: dict) -> int:
    """Values in the state dict of ``build_model(**arch)`` (BatchNorm counters left out), by formula.

    Computed from the numbers alone, so a hostile architecture is measured without building it."""
    width, blocks = [int(w) for w in arch["width"]], [int(b) for b in arch["n_blocks"]]
    cin = width[0] // 4
    total = _conv_bn(3, cin, 7)  # stem
    for w, n in zip(width, blocks):
        mid = w // 4
        block = _conv_bn(mid, mid, 3) + _conv_bn(mid, w, 1)
        total += _conv_bn(cin, mid, 1) + block + _conv_bn(cin, w, 1)  # first block, with its shortcut
        total += (n - 1) * (_conv_bn(w, mid, 1) + block)
        cin = w
    n_classes, rates = int(arch["n_classes"]), len(arch["atrous_rates"])
    if arch.get("aspp", "v2") == "v3":  # 1x1 + one 3x3 per rate + image pool, projection, classifier
        c = V3_CHANNELS
        head = _conv_bn(cin, c, 1) * 2 + rates * _conv_bn(cin, c, 3) + _conv_bn(c * (rates + 2), c, 1)
        return total + head + c * n_classes + n_classes
    return total + rates * (cin * n_classes * 9 + n_classes)


_SLACK = 1_000_000


def check_architecture(arch: dict, values: int, where: str = "checkpoint") -> int:
    """Refuse an architecture outside sane bounds, or one whose model would need far more values than
    the checkpoint holds (``values``; it could never load strictly, and building it first would cost
    memory out of proportion to the file). Returns the estimated size."""
    problems = []
    if not 1 <= int(arch["n_classes"]) <= MAX_CLASSES:
        problems.append(f"{arch['n_classes']} classes (1..{MAX_CLASSES})")
    if not all(1 <= int(b) <= MAX_BLOCKS_PER_STAGE for b in arch["n_blocks"]):
        problems.append(f"blocks per stage {tuple(arch['n_blocks'])} (1..{MAX_BLOCKS_PER_STAGE})")
    if not all(4 <= int(w) <= MAX_WIDTH for w in arch["width"]):
        problems.append(f"stage widths {tuple(arch['width'])} (4..{MAX_WIDTH})")
    rates = tuple(arch["atrous_rates"])
    if not 1 <= len(rates) <= MAX_ASPP_BRANCHES or not all(
            isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= MAX_ATROUS_RATE for r in rates):
        problems.append(f"atrous rates {rates} (1..{MAX_ASPP_BRANCHES} integers in 1..{MAX_ATROUS_RATE})")
    if problems:
        raise CheckpointError(f"{where}: refused: the architecture it describes is out of bounds: "
                              + "; ".join(problems))
    size = estimate_parameters(arch)
    if size > MAX_PARAMETERS:
        raise CheckpointError(f"{where}: refused: it describes a model of {size:,} parameters "
                              f"(limit {MAX_PARAMETERS:,})")
    if size > 2 * values + _SLACK:  # near misses are left to the strict loader, which lists every key
        raise CheckpointError(f"{where}: refused: it describes a model of {size:,} parameters but holds only "
                              f"{values:,} values; it cannot be a complete checkpoint of that model")
    return size


def normalize_keys(state_dict: dict) -> dict:
    """Strip ``module.`` prefixes (DataParallel/DDP) and add the ``base.`` prefix where it is missing."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith("module."):
            key = key[len("module."):]
        if not key.startswith("base."):
            key = "base." + key
        out[key] = value
    return out


def read_checkpoint_file(path: str | Path) -> dict:
    """Everything a ``.pth`` or ``.safetensors`` file holds, read without running any of its code.

    Returns ``{"state_dict": {name: tensor}, "meta": dict, **other top-level entries}`` (a trainer's
    ``train_state`` ...), unwrapping ``{"state_dict": ...}`` and ``{"model": ...}`` files. The one
    place checkpoint files are opened: :func:`read_checkpoint`, :func:`read_backbone`, the trainer's
    resume and its starting weights all read through it. CheckpointError on anything unsafe or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta_text = (f.metadata() or {}).get(META_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
        try:
            meta = json.loads(meta_text) if meta_text else {}
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: its '{META_KEY}' metadata is not valid JSON") from exc
        return _tensors_only(path, {"state_dict": tensors, "meta": meta})
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure here means "refuse the file"
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        culprit = [ln for ln in lines if ln.startswith("Unsupported") or "GLOBAL" in ln]
        msg = (culprit or lines or [type(exc).__name__])[0]
        if "weights_only" in str(exc) or culprit or "Unpickl" in type(exc).__name__:
            raise CheckpointError(
                f"{path}: refused: the file holds Python objects other than tensors (it could run code "
                f"when unpickled), so it was not loaded. Re-save its state_dict alone. Detail: {msg}") from exc
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({msg})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    payload = {"state_dict": obj, "meta": {}}
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        payload = {**obj, "meta": obj.get("meta") or obj.get(META_KEY) or {}}
    elif "model" in obj and isinstance(obj["model"], dict):
        payload = {**obj, "state_dict": obj["model"], "meta": obj.get("meta") or {}}
        del payload["model"]
    if not isinstance(payload["meta"], dict):
        raise CheckpointError(f"{path}: its metadata is a {type(payload['meta']).__name__}, expected a dict")
    return _tensors_only(path, payload)


def _tensors_only(path: Path, payload: dict) -> dict:
    bad = sorted(str(k) for k, v in payload["state_dict"].items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(bad[:10])}")
    return payload


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint file without building a model; refuses anything that is not tensors."""
    path = Path(path)
    payload = read_checkpoint_file(path)
    tensors, meta = payload["state_dict"], payload["meta"]
    state = normalize_keys(tensors)
    check_shapes({k: tuple(v.shape) for k, v in state.items()}, str(path))
    check_storage(state, str(path))
    if "base.aspp.c0.weight" not in state and V3_CLASSIFIER_KEY not in state:
        raise CheckpointError(f"{path}: not a DeepLab-v2 checkpoint: no 'base.aspp.c0.weight' "
                              f"(nor the v3 head's '{V3_CLASSIFIER_KEY}'; first keys: "
                              f"{', '.join(list(state)[:5])})")
    return Checkpoint(state, dict(meta), path)


def read_backbone(path: str | Path) -> dict[str, torch.Tensor]:
    """Backbone weights (``base.layer*`` keys, no ASPP) from a converted checkpoint or a ``.caffemodel``.

    :func:`read_checkpoint` refuses files without ``base.aspp.c0.weight``, which a converted COCO
    initialisation (``backbone_only``) is; training starts from this instead. A ``.caffemodel`` is
    converted on the fly as ``init-coco`` (classifier dropped).
    """
    path = Path(path)
    if path.suffix == ".caffemodel":
        state, _ = convert_caffemodel(path, kind="init-coco", keep_classifier=False)
        return state
    tensors = read_checkpoint_file(path)["state_dict"]
    state = {k: v for k, v in normalize_keys(tensors).items() if ".aspp." not in k}
    if "base.layer1.conv1.conv.weight" not in state:
        raise CheckpointError(
            f"{path}: not a DeepLab-v2 backbone: no 'base.layer1.conv1.conv.weight' "
            f"(first keys: {', '.join(list(state)[:5])})"
        )
    return state


def state_mismatch(expected: dict, state: dict) -> str | None:
    """Every missing, unexpected or mis-shaped key of ``state`` against ``expected``, or None if it fits.

    BatchNorm's ``num_batches_tracked`` counters may be absent (the published files predate them).
    """
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)):
        if items:
            shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
            parts.append(f"  {title} ({len(items)}):\n    {shown}")
    return "\n".join(parts) or None


def load_state_strict(model: MSC, state: dict, where: str = "checkpoint") -> None:
    """Copy ``state`` into ``model``, failing with every missing, unexpected or mis-shaped key listed."""
    expected = model.state_dict()
    problems = state_mismatch(expected, state)
    if problems:
        head, found = getattr(getattr(model, "config", None), "aspp", "v2"), head_of(state)
        heads = f" (the model has the {head} ASPP head, the file's keys are a {found} head's)" if head != found else ""
        raise CheckpointError(f"{where} does not match the DeepLab-v2 architecture{heads}:\n{problems}")
    full = {k: state.get(k, expected[k]) for k in expected}
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in full.items()}, strict=True)


def validate_checkpoint(checkpoint) -> Checkpoint:
    """Read and check a checkpoint (path, registry name or :class:`Checkpoint`) without building a model.

    Raises :class:`CheckpointError` for anything :func:`load_model` would refuse before building: unsafe
    pickles, non-tensors, hostile shapes and out-of-bounds architectures. Cheap enough to run on every
    upload before it is kept."""
    ckpt = resolve_checkpoint(checkpoint)
    values = check_shapes({k: tuple(v.shape) for k, v in ckpt.state_dict.items()}, ckpt._where())
    arch = ckpt.architecture()
    held = {**arch, "aspp": head_of(ckpt.state_dict)}
    check_architecture(held, values, ckpt._where())  # in proportion to what the file holds
    if held != arch:  # metadata names the other head: bound it absolutely; strict loading lists the keys
        check_architecture(arch, MAX_PARAMETERS, ckpt._where())
    return ckpt


def load_model(checkpoint, *, device="cpu", scales=None) -> MSC:
    """Build the model a checkpoint describes and load it: fp32, eval mode, on ``device``.

    ``checkpoint`` is a path, a registry name (``voc12``, ``cocostuff164k``, ``cocostuff10k``;
    fetched into the cache if needed) or a :class:`Checkpoint`.
    """
    ckpt = validate_checkpoint(checkpoint)  # bounds checked before build_model allocates anything
    kwargs = ckpt.architecture()
    if scales is not None:
        kwargs["scales"] = tuple(scales)
    model = build_model(**kwargs)
    load_state_strict(model, ckpt.state_dict, ckpt._where())
    model.checkpoint = ckpt.path
    model.meta = ckpt.meta
    return model.float().eval().to(device)


def resolve_checkpoint(checkpoint) -> Checkpoint:
    """A :class:`Checkpoint` from a Checkpoint, a file path or a registry name."""
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    from .weights import REGISTRY

    if isinstance(checkpoint, str) and checkpoint in REGISTRY:
        weights = REGISTRY[checkpoint]
        ckpt = read_checkpoint(weights.fetch())
        ckpt.meta.setdefault("class_names", list(weights.label_space().class_names))
        ckpt.meta.setdefault("label_space", weights.label_space_name)
        return ckpt
    path = Path(checkpoint)
    if not path.exists() and isinstance(checkpoint, str) and "/" not in checkpoint and "." not in checkpoint:
        raise CheckpointError(f"unknown weights '{checkpoint}': not a file, and not one of {', '.join(REGISTRY)}")
    return read_checkpoint(path)


def save_checkpoint(path: str | Path, state_dict: dict, meta: dict | None = None, *, extra: dict | None = None) -> Path:
    """Write a checkpoint ``load_model`` reads: ``.safetensors`` or a ``.pth`` of plain data, atomically.

    ``extra`` adds top-level keys to a ``.pth`` (the trainer's optimizer and RNG state); they must be
    tensors, numbers, strings and containers of those, so ``torch.load(weights_only=True)`` reads them
    and :func:`read_checkpoint` ignores them. The file is synced before it replaces the old one, so a
    full disk or a crash leaves the previous checkpoint intact.
    """
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        if path.suffix == ".safetensors":
            if extra:
                raise ValueError("safetensors files hold tensors and string metadata only; use .pth for extra state")
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)})
        else:
            torch.save({"state_dict": tensors, "meta": meta, **(extra or {})}, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
