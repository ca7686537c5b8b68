"""Convert the DeepLab authors' Caffe ``.caffemodel`` files (ResNet-101 DeepLab-v2) without Caffe.

A ``.caffemodel`` is a binary protobuf ``NetParameter``. It is read here with a small wire-format
reader of our own (no ``caffe_pb2``, no ``caffe.proto`` at run time); field numbers follow Caffe's
``caffe.proto``:

* ``NetParameter``: ``layer`` = 100 (``LayerParameter``), legacy ``layers`` = 2 (``V1LayerParameter``).
* ``LayerParameter``: name 1, type 2 (string), blobs 7, convolution_param 106, batch_norm_param 139.
* ``V1LayerParameter``: name 4, type 5 (enum, CONVOLUTION = 4 ...), blobs 6, convolution_param 10.
* ``BlobProto``: shape 7 (``BlobShape.dim`` = 1, packed int64), data 5 (packed or not), double_data 8,
  legacy num 1 / channels 2 / height 3 / width 4.
* ``ConvolutionParameter``: num_output 1, bias_term 2, pad 3, kernel_size 4, group 5, stride 6,
  dilation 18, pad_h 9, pad_w 10, kernel_h 11, kernel_w 12, stride_h 13, stride_w 14.
* ``BatchNormParameter``: use_global_stats 1, eps 3 (default 1e-5).

Layer names follow MSRA's ResNet-101 (``conv1``/``bn_conv1``/``scale_conv1``,
``res4b22_branch2b``/``bn4b22_branch2b``/``scale4b22_branch2b`` ...) plus DeepLab's ASPP classifiers
(``fc1_voc12_c0`` .. ``c3``; ``fc1_c0`` .. in the COCO initialisation). See ``docs/caffe.md``.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError

KINDS = ("deeplabv2-voc", "init-coco")
VOC_CLASSES = 21

# --------------------------------------------------------------------------------------------------
# Protobuf wire format
# --------------------------------------------------------------------------------------------------

_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5


class _WireError(Exception):
    """Malformed or truncated protobuf; turned into a CheckpointError naming the file."""

    def __init__(self, message: str, truncated: bool = False):
        super().__init__(message)
        self.truncated = truncated


def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise _WireError(f"a varint runs past the end of its message at byte {pos}", truncated=True)
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _WireError(f"a varint longer than 10 bytes at byte {pos}")


def _next_field(buf, pos: int, end: int):
    """``(field_number, wire_type, value, next_pos)`` of the field at ``pos``.

    ``value`` is the integer for varints, ``(begin, stop)`` for length-delimited fields and the raw
    position for fixed 32/64-bit fields.
    """
    key, pos = _read_varint(buf, pos, end)
    number, wire = key >> 3, key & 7
    if number == 0:
        raise _WireError(f"field number 0 at byte {pos}")
    if wire == _VARINT:
        value, pos = _read_varint(buf, pos, end)
        return number, wire, value, pos
    if wire == _LEN:
        length, pos = _read_varint(buf, pos, end)
        stop = pos + length
        if stop > end:
            raise _WireError(
                f"field {number} declares {length} bytes at byte {pos} but its message ends "
                f"{end - pos} bytes later",
                truncated=end == len(buf),
            )
        return number, wire, (pos, stop), stop
    if wire == _I32:
        if pos + 4 > end:
            raise _WireError(f"a 4-byte field runs past the end at byte {pos}", truncated=True)
        return number, wire, pos, pos + 4
    if wire == _I64:
        if pos + 8 > end:
            raise _WireError(f"an 8-byte field runs past the end at byte {pos}", truncated=True)
        return number, wire, pos, pos + 8
    # groups (3, 4) never occur in caffe.proto; 6 and 7 are not wire types at all
    raise _WireError(f"wire type {wire} (field {number}) at byte {pos}, which caffe.proto never uses")


def _fields(buf, start: int, end: int):
    """Yield ``(field_number, wire_type, value)`` for each field of one message (see :func:`_next_field`)."""
    pos = start
    while pos < end:
        number, wire, value, pos = _next_field(buf, pos, end)
        yield number, wire, value


def _int32(value: int) -> int:
    """Reinterpret a varint as a signed 64-bit integer (negative int32 values use 10 bytes)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _expect(wire: int, allowed: tuple[int, ...], what: str, pos) -> None:
    if wire not in allowed:
        raise _WireError(
            f"{what} has wire type {wire} (expected {' or '.join(map(str, allowed))}) near byte "
            f"{pos if isinstance(pos, int) else pos[0]}"
        )


def _string(buf, span) -> str:
    return bytes(buf[span[0] : span[1]]).decode("utf-8", errors="replace")


def _repeated_uint(buf, wire, value, what) -> list[int]:
    """A repeated integer field: one varint, or a packed run of them."""
    if wire == _VARINT:
        return [_int32(value)]
    _expect(wire, (_LEN,), what, value)
    out = []
    pos, stop = value
    while pos < stop:
        v, pos = _read_varint(buf, pos, stop)
        out.append(_int32(v))
    return out


def _floats(buf, wire, value, end, dtype: str, width: int, tag: int):
    """``(array, next_pos or None)`` for a repeated float/double field, packed or not.

    A non-packed run (tag, value, tag, value ...) is read in one go with numpy; ``next_pos`` is where
    the run stops so the caller can carry on after it.
    """
    if wire == _LEN:
        pos, stop = value
        if (stop - pos) % width:
            raise _WireError(
                f"a packed {dtype} run of {stop - pos} bytes is not a multiple of {width} at byte {pos}"
            )
        return np.frombuffer(buf, dtype=dtype, count=(stop - pos) // width, offset=pos), None
    if buf[value - 1] != tag:  # a tag written in more bytes than needed: take the one value
        return np.frombuffer(buf, dtype=dtype, count=1, offset=value), value + width
    pos = value - 1  # the one-byte tag in front of the value (fields 5 and 8 have one-byte tags)
    rec = 1 + width
    n_max = (end - pos) // rec
    rows = np.frombuffer(buf, dtype=np.uint8, count=n_max * rec, offset=pos).reshape(n_max, rec)
    bad = np.flatnonzero(rows[:, 0] != tag)
    n = int(bad[0]) if bad.size else n_max
    values = np.ascontiguousarray(rows[:n, 1:]).view(dtype).reshape(-1)
    return values, pos + n * rec


@dataclass
class Blob:
    shape: tuple[int, ...]
    data: np.ndarray  # float32, flat


@dataclass
class ConvParam:
    num_output: int | None = None
    bias_term: bool = True
    kernel: tuple[int, int] | None = None
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    group: int = 1


@dataclass
class Layer:
    index: int
    name: str
    type: str
    blobs: list[Blob] = field(default_factory=list)
    conv: ConvParam | None = None
    bn_eps: float | None = None  # None: no batch_norm_param (Caffe's default 1e-5 applies)


def _parse_blob(buf, start, end) -> Blob:
    dims: list[int] | None = None
    legacy = [0, 0, 0, 0]
    has_legacy = False
    floats: list[np.ndarray] = []
    doubles: list[np.ndarray] = []
    pos = start
    while pos < end:
        number, wire, value, pos = _next_field(buf, pos, end)
        if number == 7:
            _expect(wire, (_LEN,), "BlobProto.shape", value)
            dims = []
            for n2, w2, v2 in _fields(buf, *value):
                if n2 == 1:
                    dims.extend(_repeated_uint(buf, w2, v2, "BlobShape.dim"))
        elif number in (1, 2, 3, 4):
            _expect(wire, (_VARINT,), "BlobProto num/channels/height/width", pos)
            legacy[number - 1] = _int32(value)
            has_legacy = True
        elif number == 5:
            _expect(wire, (_LEN, _I32), "BlobProto.data", value)
            arr, run_end = _floats(buf, wire, value, end, "<f4", 4, 0x2D)
            floats.append(arr)
            pos = run_end if run_end is not None else pos
        elif number == 8:
            _expect(wire, (_LEN, _I64), "BlobProto.double_data", value)
            arr, run_end = _floats(buf, wire, value, end, "<f8", 8, 0x41)
            doubles.append(arr)
            pos = run_end if run_end is not None else pos
    if floats:
        data = np.concatenate(floats) if len(floats) > 1 else floats[0]
    elif doubles:
        data = np.concatenate(doubles)
    else:
        data = np.zeros(0, np.float32)
    data = data.astype(np.float32)  # copies out of the file buffer (and to native byte order)
    if dims is not None:
        shape = tuple(int(d) for d in dims)
    elif has_legacy:
        shape = tuple(int(d) for d in legacy)
    else:
        shape = (int(data.size),)
    return Blob(shape, data)


def _parse_conv(buf, start, end) -> ConvParam:
    p = ConvParam()
    kernel, stride, pad, dilation = [], [], [], []
    kh = kw = sh = sw = ph = pw = None
    for number, wire, value in _fields(buf, start, end):
        if number in (3, 4, 6, 18):
            vals = _repeated_uint(buf, wire, value, "ConvolutionParameter")
            {3: pad, 4: kernel, 6: stride, 18: dilation}[number].extend(vals)
            continue
        if number not in (1, 2, 5, 9, 10, 11, 12, 13, 14):
            continue
        _expect(wire, (_VARINT,), f"ConvolutionParameter field {number}", start)
        if number == 1:
            p.num_output = value
        elif number == 2:
            p.bias_term = bool(value)
        elif number == 5:
            p.group = value
        elif number == 9:
            ph = value
        elif number == 10:
            pw = value
        elif number == 11:
            kh = value
        elif number == 12:
            kw = value
        elif number == 13:
            sh = value
        elif number == 14:
            sw = value

    def pair(values, default):
        if not values:
            return (default, default)
        if len(values) == 1:
            return (values[0], values[0])
        return (values[0], values[1])

    # Caffe's precedence: the _h/_w fields win over the repeated field when given
    p.kernel = (kh, kw) if kh is not None or kw is not None else (pair(kernel, 0) if kernel else None)
    p.stride = (sh or 1, sw or 1) if sh is not None or sw is not None else pair(stride, 1)
    p.pad = (ph or 0, pw or 0) if ph is not None or pw is not None else pair(pad, 0)
    p.dilation = pair(dilation, 1)
    return p


def _parse_bn_eps(buf, start, end) -> float:
    eps = 1e-5
    for number, wire, value in _fields(buf, start, end):
        if number == 3:
            _expect(wire, (_I32,), "BatchNormParameter.eps", value)
            eps = struct.unpack_from("<f", buf, value)[0]
    return eps


V1_TYPES = {
    0: "NONE",
    1: "Accuracy",
    2: "BNLL",
    3: "Concat",
    4: "Convolution",
    5: "Data",
    6: "Dropout",
    7: "EuclideanLoss",
    8: "Flatten",
    9: "HDF5Data",
    10: "HDF5Output",
    11: "Im2col",
    12: "ImageData",
    13: "InfogainLoss",
    14: "InnerProduct",
    15: "LRN",
    16: "MultinomialLogisticLoss",
    17: "Pooling",
    18: "ReLU",
    19: "Sigmoid",
    20: "Softmax",
    21: "SoftmaxWithLoss",
    22: "Split",
    23: "TanH",
    24: "WindowData",
    25: "Eltwise",
    26: "Power",
    27: "SigmoidCrossEntropyLoss",
    28: "HingeLoss",
    29: "MemoryData",
    30: "ArgMax",
    31: "Threshold",
    32: "DummyData",
    33: "Slice",
    34: "MVN",
    35: "AbsVal",
    36: "Silence",
    37: "ContrastiveLoss",
    38: "Exp",
    39: "Deconvolution",
}
"""``V1LayerParameter.LayerType`` (caffe.proto) to the string type names of ``LayerParameter``."""

_LAYOUTS = {
    # field in NetParameter: (layout name, name, type, blobs, convolution_param, batch_norm_param)
    100: ("layer", 1, 2, 7, 106, 139),
    2: ("layers (V1)", 4, 5, 6, 10, None),
}


def _parse_layer(buf, start, end, index: int, net_field: int) -> Layer:
    _, f_name, f_type, f_blobs, f_conv, f_bn = _LAYOUTS[net_field]
    layer = Layer(index, "", "")
    for number, wire, value in _fields(buf, start, end):
        if number == f_name:
            _expect(wire, (_LEN,), "layer name", value)
            layer.name = _string(buf, value)
        elif number == f_type:
            if net_field == 100:
                _expect(wire, (_LEN,), "layer type", value)
                layer.type = _string(buf, value)
            else:
                _expect(wire, (_VARINT,), "V1 layer type", start)
                layer.type = V1_TYPES.get(value, f"V1 type {value}")
        elif number == f_blobs:
            _expect(wire, (_LEN,), "layer blobs", value)
            layer.blobs.append(_parse_blob(buf, *value))
        elif number == f_conv:
            _expect(wire, (_LEN,), "convolution_param", value)
            layer.conv = _parse_conv(buf, *value)
        elif f_bn is not None and number == f_bn:
            _expect(wire, (_LEN,), "batch_norm_param", value)
            layer.bn_eps = _parse_bn_eps(buf, *value)
    return layer


def read_caffemodel(path: str | Path) -> tuple[str, list[Layer]]:
    """Parse a binary ``.caffemodel`` into ``(layout, layers)`` without Caffe or generated protobuf code.

    ``layout`` is ``"layer"`` (current ``LayerParameter``, field 100) or ``"layers (V1)"`` (legacy field 2).
    Raises :class:`CheckpointError` for unreadable, truncated or non-Caffe files.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such Caffe model file")
    data = path.read_bytes()
    if not data:
        raise CheckpointError(f"{path}: the file is empty")
    _refuse_known_foreign(path, data)
    layers: list[Layer] = []
    seen_fields = set()
    try:
        for number, wire, value in _fields(data, 0, len(data)):
            if number in _LAYOUTS:
                _expect(wire, (_LEN,), f"NetParameter field {number}", value)
                seen_fields.add(number)
                layers.append(_parse_layer(data, *value, index=len(layers), net_field=number))
    except _WireError as exc:
        if exc.truncated:
            raise CheckpointError(
                f"{path}: the file is truncated or corrupt ({exc}); "
                f"{len(data)} bytes were read - download it again"
            ) from exc
        raise CheckpointError(f"{path}: not a Caffe model (binary NetParameter protobuf): {exc}") from exc
    if not layers:
        raise CheckpointError(
            f"{path}: not a Caffe model: no layers (NetParameter fields 100 or 2) in {len(data)} bytes"
        )
    if len(seen_fields) > 1:
        raise CheckpointError(
            f"{path}: holds both 'layer' and legacy 'layers' fields, which Caffe itself refuses"
        )
    if not any(layer.name for layer in layers):
        raise CheckpointError(f"{path}: not a Caffe model: its {len(layers)} 'layers' have no names")
    return _LAYOUTS[seen_fields.pop()][0], layers


def _refuse_known_foreign(path: Path, data: bytes) -> None:
    head = data[:16]
    known = [
        (b"PK\x03\x04", "a zip archive (a PyTorch .pth checkpoint?)"),
        (
            b"\x89HDF",
            "an HDF5 file (Caffe's .caffemodel.h5 snapshots are not supported; save as binary proto)",
        ),
        (b"\x80\x02", "a Python pickle"),
        (b"\x89PNG", "a PNG image"),
        (b"\xff\xd8\xff", "a JPEG image"),
    ]
    for magic, what in known:
        if head.startswith(magic):
            raise CheckpointError(f"{path}: not a Caffe model: this is {what}")
    head = data[:4096]
    is_text = not re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", head)
    if is_text and re.match(rb"^\s*(name\s*:|layers?\s*\{|input\s*:|#)", head):
        raise CheckpointError(
            f"{path}: this is a text .prototxt (the network description), not a binary "
            ".caffemodel; it holds no weights"
        )


# --------------------------------------------------------------------------------------------------
# Name mapping: MSRA ResNet-101 / DeepLab-v2 layer names -> this project's module paths
# --------------------------------------------------------------------------------------------------

_SHARED = re.compile(r"^(?P<main>.+)_res0\d*$")
_STEM = {"conv1": "conv", "bn_conv1": "bn", "scale_conv1": "scale"}
_BLOCK = re.compile(
    r"^(?P<prefix>res|bn|scale)(?P<stage>[2-5])(?P<block>[a-z]\d*)_branch(?P<part>1|2a|2b|2c)$"
)
_PARTS = {"1": "shortcut", "2a": "reduce", "2b": "conv3x3", "2c": "increase"}
_ROLES = {"res": "conv", "bn": "bn", "scale": "scale"}
_CLASSIFIER = re.compile(r"^fc\d*_(?:.*_)?c(?P<branch>\d+)$")
_LONE_FC = re.compile(r"^fc\d*(?:_[A-Za-z0-9]+)*$")
_ROLE_TYPES = {
    "conv": ("Convolution",),
    "bn": ("BatchNorm",),
    "scale": ("Scale",),
    "classifier": ("Convolution",),
}


def block_index(code: str) -> int:
    """``a`` -> 1, ``b`` -> 2, ``c`` -> 3 ...; ``b1`` -> 2, ``b2`` -> 3, ... ``b22`` -> 23."""
    if len(code) == 1:
        return ord(code) - ord("a") + 1
    if code[0] != "b":
        raise ValueError(code)
    return int(code[1:]) + 1


def map_layer_name(name: str) -> tuple[str, str] | None:
    """``(module path, role)`` of a Caffe layer name, or None when it is not a DeepLab-v2 ResNet layer.

    Roles: ``conv`` (backbone convolution), ``bn`` (BatchNorm statistics), ``scale`` (BatchNorm affine
    terms) and ``classifier`` (an ASPP branch; the module path is ``base.aspp.cN``).
    """
    if name in _STEM:
        role = _STEM[name]
        return ("base.layer1.conv1.conv" if role == "conv" else "base.layer1.conv1.bn"), role
    m = _BLOCK.match(name)
    if m:
        try:
            block = block_index(m["block"])
        except ValueError:
            return None
        role = _ROLES[m["prefix"]]
        unit = f"base.layer{m['stage']}.block{block}.{_PARTS[m['part']]}"
        return (unit + ".conv" if role == "conv" else unit + ".bn"), role
    m = _CLASSIFIER.match(name)
    if m:
        return f"base.aspp.c{int(m['branch'])}", "classifier"
    return None


def _caffe_names_for(key: str, numeric_stages: set[int]) -> str:
    """The Caffe layer a model key would come from (for error messages)."""
    m = re.match(r"^base\.layer(\d)\.block(\d+)\.(\w+)\.(conv|bn)\.(\w+)$", key)
    if m:
        stage, block, part, kind, param = int(m[1]), int(m[2]), m[3], m[4], m[5]
        code = (
            ("a" if block == 1 else f"b{block - 1}") if stage in numeric_stages else chr(ord("a") + block - 1)
        )
        branch = {v: k for k, v in _PARTS.items()}[part]
        prefix = "res" if kind == "conv" else ("bn" if param.startswith("running") else "scale")
        return f"{prefix}{stage}{code}_branch{branch}"
    if key.startswith("base.layer1.conv1.conv"):
        return "conv1"
    if key.startswith("base.layer1.conv1.bn"):
        return "bn_conv1" if "running" in key else "scale_conv1"
    if key.startswith("base.aspp.c"):
        return f"fc1_*_c{key.split('.')[2][1:]}"
    return "?"


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------


def _tensor(blob: Blob, where: str) -> np.ndarray:
    count = int(np.prod(blob.shape)) if blob.shape else 1
    if count != blob.data.size:
        raise CheckpointError(
            f"{where}: blob shape {blob.shape} holds {count} values but the file has {blob.data.size}"
        )
    return blob.data.reshape(blob.shape) if blob.shape else blob.data


def convert_caffemodel(path: str | Path, *, kind: str = "deeplabv2-voc", keep_classifier: bool = False):
    """Convert a DeepLab-v2 ResNet-101 ``.caffemodel`` to this project's state dict.

    ``kind``: ``deeplabv2-voc`` (``train_iter_20000`` / ``train2_iter_20000``: full model, classifier kept,
    21 classes) or ``init-coco`` (``init.caffemodel``: backbone; the classifier is dropped unless
    ``keep_classifier``). Returns ``(state_dict, report)``; ``report["meta"]`` is the metadata to store
    with :func:`segcore.checkpoint.save_checkpoint`. Every tensor is checked against a model built with
    :func:`segcore.build_model` for the inferred architecture, and every convolution's kernel, stride,
    padding and dilation and every BatchNorm's eps against that model's modules.
    """
    from .model import build_model

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    path = Path(path)
    layout, layers = read_caffemodel(path)
    warnings: list[str] = []

    # 1. sort layers: mapped, shared multi-scale copies, ignored (no blobs), unknown (blobs, no mapping)
    mapped, shared, ignored, lone_fc, by_name = _sort_layers(path, layers, kind, keep_classifier)

    # 2. shared multi-scale branches: they share weights with the main branch; check, then skip
    for layer, main_name in shared:
        main = by_name.get(main_name)
        if main is None or not main.blobs:
            raise CheckpointError(
                f"{path}: layer '{layer.name}' looks like a multi-scale copy of "
                f"'{main_name}', but there is no such layer with weights"
            )
        same = len(main.blobs) == len(layer.blobs) and all(
            a.data.shape == b.data.shape and np.array_equal(a.data, b.data)
            for a, b in zip(main.blobs, layer.blobs)
        )
        if not same:
            warnings.append(
                f"multi-scale layer '{layer.name}' differs from '{main_name}'; "
                f"the main branch's weights were used"
            )

    # 3. architecture from names and blob shapes
    n_blocks = [0, 0, 0, 0]
    numeric_stages: set[int] = set()
    for (module, role), layer in mapped.items():
        m = re.match(r"^base\.layer(\d)\.block(\d+)\.", module)
        if m:
            stage = int(m[1])
            n_blocks[stage - 2] = max(n_blocks[stage - 2], int(m[2]))
            if re.search(r"\d[a-z]\d+_", layer.name):
                numeric_stages.add(stage)
    if min(n_blocks) == 0:
        missing = [f"res{i + 2}" for i, n in enumerate(n_blocks) if n == 0]
        raise CheckpointError(
            f"{path}: no layers for stage(s) {', '.join(missing)}: not a ResNet DeepLab model "
            "(or the file is incomplete)"
        )
    width = []
    for stage in range(2, 6):
        layer = mapped.get((f"base.layer{stage}.block1.increase.conv", "conv"))
        if layer is None:
            raise CheckpointError(
                f"{path}: missing layer res{stage}a_branch2c (needed for the stage's width)"
            )
        width.append(int(layer.blobs[0].shape[0]) if layer.blobs[0].shape else 0)
    if any(w < 4 or w % 4 for w in width):
        raise CheckpointError(
            f"{path}: stage widths {width} (from res2a..res5a_branch2c) are not ResNet-like"
        )
    classifier = sorted(
        (
            (int(module.split(".")[2][1:]), layer)
            for (module, role), layer in mapped.items()
            if role == "classifier"
        ),
        key=lambda t: t[0],
    )
    branches = [i for i, _ in classifier]
    if classifier and branches != list(range(len(branches))):
        raise CheckpointError(
            f"{path}: ASPP classifier branches {branches} (from "
            f"{', '.join(layer.name for _, layer in classifier)}) are not c0, c1, ..."
        )
    if kind == "deeplabv2-voc" and not classifier:
        raise CheckpointError(
            f"{path}: no ASPP classifier layers (fc1_*_c0 ..): not a DeepLab-v2 model; "
            "for the COCO initialisation use kind init-coco"
        )
    if kind == "init-coco" and keep_classifier and not classifier:
        raise CheckpointError(f"{path}: keep_classifier was asked for, but the file has no classifier layers")
    use_classifier = bool(classifier) and (kind == "deeplabv2-voc" or keep_classifier)
    rates: list[int] = []
    n_classes = 1
    if classifier:
        first = classifier[0][1]
        n_classes = int(first.blobs[0].shape[0]) if first.blobs[0].shape else 0
        if n_classes < 1:
            raise CheckpointError(f"{path}: classifier '{first.name}' has an empty weight blob")
        for _, layer in classifier:
            rate = layer.conv.dilation[0] if layer.conv is not None else 1
            rates.append(int(rate))
    if kind == "deeplabv2-voc" and n_classes != VOC_CLASSES:
        raise CheckpointError(
            f"{path}: its classifier '{classifier[0][1].name}' has {n_classes} classes; the VOC "
            f"models have {VOC_CLASSES} (for the COCO initialisation use kind init-coco)"
        )
    stride_in_1x1 = True
    res3 = mapped.get(("base.layer3.block1.conv3x3.conv", "conv"))
    if res3 is not None and res3.conv is not None and res3.conv.stride[0] == 2:
        stride_in_1x1 = False  # torchvision-style bottleneck; the checks below still compare every stride
    model_rates = tuple(rates) if use_classifier else (6, 12, 18, 24)
    if use_classifier and any(r < 1 for r in rates):
        raise CheckpointError(f"{path}: classifier dilations {rates} are not positive")
    model = build_model(
        n_classes if use_classifier else 1,
        n_blocks=tuple(n_blocks),
        width=tuple(width),
        atrous_rates=model_rates,
        stride_in_1x1=stride_in_1x1,
    )
    expected = model.state_dict()
    modules = dict(model.named_modules())

    # 4. copy, checking shapes and geometry against the model
    state: dict[str, torch.Tensor] = {}
    bn_factors: list[float] = []
    converted: list[str] = []

    def put(key: str, array: np.ndarray, layer: Layer, exact_shape: bool):
        target = expected.get(key)
        if target is None:
            raise CheckpointError(
                f"{path}: layer '{layer.name}' maps to {key}, which the model "
                f"(n_blocks {tuple(n_blocks)}) does not have"
            )
        ok = tuple(array.shape) == tuple(target.shape) if exact_shape else array.size == target.numel()
        if not ok:
            raise CheckpointError(
                f"{path}: layer '{layer.name}': blob shape {tuple(array.shape)} does not fit "
                f"{key} {tuple(target.shape)}"
            )
        # blob arrays own their memory (copied out of the file buffer), so no further copy is needed
        state[key] = torch.from_numpy(
            np.ascontiguousarray(array, dtype=np.float32).reshape(tuple(target.shape))
        )

    dropped = [layer.name for layer in lone_fc]
    for (module_path, role), layer in sorted(mapped.items(), key=lambda item: item[1].index):
        if role == "classifier" and not use_classifier:
            dropped.append(layer.name)
            continue
        module = modules.get(module_path)
        if module is None:
            raise CheckpointError(
                f"{path}: layer '{layer.name}' maps to {module_path}, which the model does not have"
            )
        for suffix, (array, exact) in _layer_arrays(path, layer, role, module).items():
            put(f"{module_path}.{suffix}", array, layer, exact)
        if role == "bn":
            bn_factors.append(float(layer.blobs[2].data[0]))
        converted.append(layer.name)

    # 5. every model parameter must be filled
    unfilled = [
        k
        for k in expected
        if k not in state
        and not k.endswith("num_batches_tracked")
        and not (".aspp." in k and not use_classifier)
    ]
    if unfilled:
        listed = ", ".join(
            f"{k} (from Caffe layer {_caffe_names_for(k, numeric_stages)})" for k in unfilled[:10]
        )
        raise CheckpointError(
            f"{path}: {len(unfilled)} model parameters have no layer in the file: {listed}"
            + (" ..." if len(unfilled) > 10 else "")
            + " (is the file complete?)"
        )
    out = {k: state[k] for k in expected if k in state}  # the model's key order

    meta: dict = {
        "source": path.name,
        "kind": kind,
        "converted_from": "caffe",
        "backbone_only": not use_classifier,
        "stride_in_1x1": stride_in_1x1,
    }
    if use_classifier:
        meta["atrous_rates"] = list(model_rates)
        meta["n_classes"] = n_classes
    if kind == "deeplabv2-voc":
        names = _voc_class_names()
        if names is not None:
            meta["class_names"] = names
            meta["label_space"] = "voc"
        else:
            warnings.append("the annotations package has no VOC label space; class_names were left out")
    report = {
        "source": str(path),
        "kind": kind,
        "layout": layout,
        "layers": len(layers),
        "converted_layers": len(converted),
        "ignored_layers": len(ignored),
        "shared_layers_skipped": [layer.name for layer, _ in shared],
        "classifier": (
            "kept" if use_classifier else ("dropped: " + ", ".join(dropped) if dropped else "none")
        ),
        "classifier_classes": n_classes if classifier else None,
        "architecture": {
            "n_classes": n_classes if use_classifier else None,
            "n_blocks": list(n_blocks),
            "width": width,
            "atrous_rates": rates,
            "stride_in_1x1": stride_in_1x1,
        },
        "bn_factor_range": [min(bn_factors), max(bn_factors)] if bn_factors else None,
        "tensors": len(out),
        "warnings": warnings,
        "meta": meta,
    }
    return out, report


def _sort_layers(path: Path, layers: list[Layer], kind: str, keep_classifier: bool):
    """Map each layer with blobs to ``(module path, role)``; set multi-scale copies and weightless aside."""
    mapped: dict[tuple[str, str], Layer] = {}
    shared: list[tuple[Layer, str]] = []
    ignored: list[str] = []
    unknown: list[str] = []
    duplicates: list[str] = []
    lone_fc: list[Layer] = []
    by_name: dict[str, Layer] = {}
    for layer in layers:
        if layer.name in by_name and layer.blobs:
            raise CheckpointError(f"{path}: two layers named '{layer.name}' carry weights")
        by_name.setdefault(layer.name, layer)
        if not layer.blobs:
            ignored.append(layer.name)
            continue
        m = _SHARED.match(layer.name)
        if m:
            shared.append((layer, m["main"]))
            continue
        target = map_layer_name(layer.name)
        if target is None:
            if kind == "init-coco" and _LONE_FC.match(layer.name):
                lone_fc.append(layer)  # a single (DeepLab-v1 style) or foreign classifier
            else:
                unknown.append(f"{layer.name} ({layer.type or 'no type'})")
            continue
        if target in mapped:
            duplicates.append(
                f"'{mapped[target].name}' and '{layer.name}' both map to {target[0]} ({target[1]})"
            )
            continue
        expected_types = _ROLE_TYPES[target[1]]
        if (
            layer.type
            and layer.type != "NONE"
            and not layer.type.startswith("V1 type")
            and layer.type not in expected_types
        ):
            raise CheckpointError(
                f"{path}: layer '{layer.name}' is a {layer.type} layer; its name says "
                f"{' or '.join(expected_types)}"
            )
        if target[1] in ("conv", "classifier") and len(layer.blobs[0].shape) != 4:
            raise CheckpointError(
                f"{path}: convolution '{layer.name}' has a weight blob of shape "
                f"{layer.blobs[0].shape}; expected 4-D (out, in, kh, kw)"
            )
        mapped[target] = layer
    if unknown:
        hint = ""
        if not any(t[1] == "conv" for t in mapped):
            hint = (
                " - this does not look like a ResNet DeepLab (VGG-16 DeepLab-v1/v2 models are not supported)"
            )
        raise CheckpointError(
            f"{path}: {len(unknown)} layers with weights have no place in DeepLab-v2 "
            f"ResNet-101: {', '.join(unknown[:12])}{' ...' if len(unknown) > 12 else ''}{hint}"
        )
    has_aspp = any(role == "classifier" for _, role in mapped)
    if lone_fc and keep_classifier:
        if len(lone_fc) > 1 or has_aspp:
            raise CheckpointError(
                f"{path}: cannot keep the classifier: layers "
                f"{', '.join(layer.name for layer in lone_fc)} do not fit the ASPP branches "
                "fc*_c0, fc*_c1, ..."
            )
        mapped[("base.aspp.c0", "classifier")] = lone_fc.pop()
    if duplicates:
        raise CheckpointError(f"{path}: layers {'; '.join(duplicates[:5])}")
    if ("base.layer1.conv1.conv", "conv") not in mapped:
        raise CheckpointError(
            f"{path}: no 'conv1' layer with weights: not an MSRA ResNet DeepLab model "
            f"(layers: {', '.join(layer.name for layer in layers[:8])} ...)"
        )

    return mapped, shared, ignored, lone_fc, by_name


def _layer_arrays(path: Path, layer: Layer, role: str, module) -> dict[str, tuple[np.ndarray, bool]]:
    """The tensors one Caffe layer gives its module: ``{param: (array, shape must match exactly)}``.

    Checks blob counts, convolution geometry and BatchNorm eps against ``module`` on the way.
    """
    lname = f"'{layer.name}'"

    def arr(i):
        return _tensor(layer.blobs[i], f"{path}: layer {lname} blob {i}")

    if role in ("conv", "classifier"):
        want_bias = role == "classifier"
        if len(layer.blobs) != (2 if want_bias else 1):
            raise CheckpointError(
                f"{path}: layer {lname} has {len(layer.blobs)} blobs; expected "
                + (
                    "weight and bias (the ASPP classifiers have a bias)"
                    if want_bias
                    else "only a weight (the backbone convolutions have no bias)"
                )
            )
        _check_conv(path, layer, module)
        return {"weight": (arr(0), True), **({"bias": (arr(1), False)} if want_bias else {})}
    if role == "bn":
        if len(layer.blobs) != 3:
            raise CheckpointError(
                f"{path}: BatchNorm layer {lname} has {len(layer.blobs)} blobs; expected 3 "
                "(mean, variance, moving-average factor)"
            )
        eps = 1e-5 if layer.bn_eps is None else layer.bn_eps
        if not np.isclose(eps, module.eps, rtol=1e-3, atol=0):
            raise CheckpointError(
                f"{path}: BatchNorm layer {lname} has eps {eps:g}; the model uses {module.eps:g}"
            )
        factor = layer.blobs[2].data
        if factor.size != 1:
            raise CheckpointError(
                f"{path}: BatchNorm layer {lname}: its third blob (moving-average factor) "
                f"holds {factor.size} values, expected 1"
            )
        s = np.float32(factor[0])
        scale = np.float32(0) if s == 0 else np.float32(1) / s  # exactly as Caffe's BatchNormLayer
        return {"running_mean": (arr(0) * scale, False), "running_var": (arr(1) * scale, False)}
    if len(layer.blobs) != 2:
        raise CheckpointError(
            f"{path}: Scale layer {lname} has {len(layer.blobs)} blobs; expected 2 (scale and bias)"
        )
    return {"weight": (arr(0), False), "bias": (arr(1), False)}


def _check_conv(path: Path, layer: Layer, module: torch.nn.Conv2d) -> None:
    if layer.conv is None:
        raise CheckpointError(
            f"{path}: layer '{layer.name}' has no convolution_param, so its kernel, stride, "
            "padding and dilation cannot be checked"
        )
    p = layer.conv
    kernel = p.kernel or tuple(int(d) for d in layer.blobs[0].shape[-2:])
    got = {
        "kernel": tuple(kernel),
        "stride": tuple(p.stride),
        "pad": tuple(p.pad),
        "dilation": tuple(p.dilation),
        "group": p.group,
    }
    want = {
        "kernel": tuple(module.kernel_size),
        "stride": tuple(module.stride),
        "pad": tuple(module.padding),
        "dilation": tuple(module.dilation),
        "group": module.groups,
    }
    bad = [f"{k} {got[k]} (model {want[k]})" for k in got if got[k] != want[k]]
    if p.num_output is not None and p.num_output != module.out_channels:
        bad.append(f"num_output {p.num_output} (model {module.out_channels})")
    if bad:
        raise CheckpointError(
            f"{path}: convolution '{layer.name}' does not match the DeepLab-v2 architecture: "
            + "; ".join(bad)
        )


def _voc_class_names() -> list[str] | None:
    try:
        from annotations import get_label_space
    except ImportError:
        return None
    try:
        return list(get_label_space("voc").class_names)
    except Exception:  # noqa: BLE001 - the label space is optional metadata
        return None


def convert_caffe_file(
    path: str | Path,
    out: str | Path,
    *,
    kind: str = "deeplabv2-voc",
    keep_classifier: bool = False,
    verify: bool = True,
) -> dict:
    """Convert ``path`` and write ``out`` (``.pth`` or ``.safetensors``) with its metadata; return the report.

    With ``verify`` the written file is read back: a full model through :func:`segcore.load_model`, a
    backbone through :func:`read_backbone`.
    """
    from .checkpoint import save_checkpoint

    state, report = convert_caffemodel(path, kind=kind, keep_classifier=keep_classifier)
    written = save_checkpoint(out, state, report["meta"])
    report["output"] = str(written)
    if verify:
        if report["meta"]["backbone_only"]:
            back = read_backbone(written)
            if set(back) != set(state):
                raise CheckpointError(f"{written}: reading the written backbone back gave different keys")
        else:
            from .checkpoint import load_model

            load_model(written, scales=())
    return report


def read_backbone(path: str | Path) -> dict[str, torch.Tensor]:
    """Backbone weights (``base.layer*`` keys, no ASPP) from a converted checkpoint or a ``.caffemodel``.

    :func:`segcore.checkpoint.read_checkpoint` refuses files without ``base.aspp.c0.weight``, which a
    converted COCO initialisation (``backbone_only``) is; training starts from this instead. A
    ``.caffemodel`` is converted on the fly as ``init-coco`` (classifier dropped).
    """
    from .checkpoint import _read_file, normalize_keys

    path = Path(path)
    if path.suffix == ".caffemodel":
        state, _ = convert_caffemodel(path, kind="init-coco", keep_classifier=False)
        return state
    tensors, _meta = _read_file(path)
    bad = sorted(str(k) for k, v in tensors.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(bad[:10])}")
    state = {k: v for k, v in normalize_keys(tensors).items() if ".aspp." not in k}
    if "base.layer1.conv1.conv.weight" not in state:
        raise CheckpointError(
            f"{path}: not a DeepLab-v2 backbone: no 'base.layer1.conv1.conv.weight' "
            f"(first keys: {', '.join(list(state)[:5])})"
        )
    return state


# --------------------------------------------------------------------------------------------------
# Command line (wired as ``python -m segcore convert-caffe``)
# --------------------------------------------------------------------------------------------------
