"""Caffe ``.caffemodel`` conversion (issue 9), on small synthetic files in the real binary format.

The files are written by a tiny protobuf encoder in this module (field numbers from Caffe's
``caffe.proto``), with the real models' layer names: MSRA ResNet (``conv1``/``bn_conv1``/
``scale_conv1``, ``res3b1_branch2b`` ...), layers without weights (data, ReLU, Eltwise, Interp ...),
multi-scale copies (``_res075``/``_res05``) and DeepLab's ASPP classifiers. Expected values are kept
per PyTorch key, and the Caffe names are derived from the keys here, in the opposite direction of
the converter's parsing.
"""

from __future__ import annotations

import io
import struct
import sys

import numpy as np
import pytest
import torch

from segcore import CheckpointError, build_model, load_model
from segcore.checkpoint import read_checkpoint
from segcore.caffe import (
    convert_caffe_file,
    convert_caffemodel,
    read_backbone,
    read_caffemodel,
)

WIDTH = (16, 32, 64, 128)
RATES = (6, 12, 18, 24)
FACTOR = 999.98  # a typical Caffe moving-average normaliser

# ------------------------------------------------------------------------------------------------
# a tiny protobuf encoder
# ------------------------------------------------------------------------------------------------


def varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def f_varint(field: int, n: int) -> bytes:
    return tag(field, 0) + varint(n)


def f_bytes(field: int, payload: bytes) -> bytes:
    return tag(field, 2) + varint(len(payload)) + payload


def f_string(field: int, text: str) -> bytes:
    return f_bytes(field, text.encode())


def f_float(field: int, x: float) -> bytes:
    return tag(field, 5) + struct.pack("<f", x)


def packed_varints(field: int, values) -> bytes:
    return f_bytes(field, b"".join(varint(int(v)) for v in values))


def blob(array, *, shape_style: str = "shape", data_style: str = "packed") -> bytes:
    """A BlobProto: shape as BlobShape dims or legacy num/channels/height/width; data packed, one float
    per field, or as packed doubles."""
    a = np.asarray(array)
    out = b""
    if shape_style == "shape":
        out += f_bytes(7, packed_varints(1, a.shape))
    elif shape_style == "legacy":
        dims = (1,) * (4 - a.ndim) + a.shape
        out += b"".join(f_varint(i + 1, d) for i, d in enumerate(dims))
    flat = a.reshape(-1)
    if data_style == "packed":
        out += f_bytes(5, flat.astype("<f4").tobytes())
    elif data_style == "unpacked":
        out += b"".join(f_float(5, float(x)) for x in flat)
    elif data_style == "double":
        out += f_bytes(8, flat.astype("<f8").tobytes())
    return out


def conv_param(num_output, kernel, stride=1, pad=0, dilation=1, bias=False, hw=False) -> bytes:
    out = f_varint(1, num_output)
    if not bias:
        out += f_varint(2, 0)
    if hw:  # the 2-D-only _h/_w fields
        out += f_varint(11, kernel) + f_varint(12, kernel)
        if stride != 1:
            out += f_varint(13, stride) + f_varint(14, stride)
        if pad:
            out += f_varint(9, pad) + f_varint(10, pad)
    else:
        out += f_varint(4, kernel)
        if stride != 1:
            out += f_varint(6, stride)
        if pad:
            out += f_varint(3, pad)
    if dilation != 1:
        out += f_varint(18, dilation)
    return out


V1_ENUM = {
    "Convolution": 4,
    "Data": 5,
    "Pooling": 17,
    "ReLU": 18,
    "Eltwise": 25,
    "Silence": 36,
    "SoftmaxWithLoss": 21,
    "BatchNorm": 0,
    "Scale": 0,
    "Interp": 0,
}


def layer_bytes(spec: dict, layout: str, shape_style: str) -> bytes:
    blobs = [
        blob(a, shape_style=shape_style, data_style=spec.get("data_style", "packed")) for a in spec["blobs"]
    ]
    conv = spec.get("conv")
    if layout == "layer":
        body = f_string(1, spec["name"]) + f_string(2, spec["type"])
        body += f_string(3, "bottom") + f_string(4, spec["name"])
        body += b"".join(f_bytes(7, b) for b in blobs)
        if conv is not None:
            body += f_bytes(106, conv_param(**conv))
        if spec.get("eps") is not None:
            body += f_bytes(139, f_varint(1, 1) + f_float(3, spec["eps"]))
        elif spec["type"] == "BatchNorm":
            body += f_bytes(139, f_varint(1, 1))
        return f_bytes(100, body)
    body = f_string(2, "bottom") + f_string(3, spec["name"]) + f_string(4, spec["name"])
    body += f_varint(5, V1_ENUM[spec["type"]])
    body += b"".join(f_bytes(6, b) for b in blobs)
    if conv is not None:
        body += f_bytes(10, conv_param(**conv))
    return f_bytes(2, body)


# ------------------------------------------------------------------------------------------------
# synthetic DeepLab-v2 nets: known values per PyTorch key, Caffe names derived from the keys
# ------------------------------------------------------------------------------------------------


def block_code(stage: int, block: int) -> str:
    """The real ResNet-101's naming: res2/res5 use letters, res3/res4 use a, b1, b2, ..."""
    if stage in (3, 4):
        return "a" if block == 1 else f"b{block - 1}"
    return "abcdefghij"[block - 1]


def make_net(
    n_blocks, *, n_classes=21, classifier="fc1_voc12", seed=0, factor=FACTOR, rates=RATES, multiscale=True
):
    """Return (layer specs in Caffe order, known tensors per PyTorch key)."""
    rng = np.random.default_rng(seed)
    known: dict[str, np.ndarray] = {}
    specs: list[dict] = [{"name": "data", "type": "Data", "blobs": []}]

    def conv(name, key, out_ch, in_ch, k, stride=1, pad=0, dilation=1, bias=False):
        w = (rng.standard_normal((out_ch, in_ch, k, k)) * (2.0 / (in_ch * k * k)) ** 0.5).astype(np.float32)
        known[key + ".weight"] = w
        blobs = [w]
        if bias:
            b = (rng.standard_normal(out_ch) * 0.1).astype(np.float32)
            known[key + ".bias"] = b
            blobs.append(b)
        specs.append(
            {
                "name": name,
                "type": "Convolution",
                "blobs": blobs,
                "conv": {
                    "num_output": out_ch,
                    "kernel": k,
                    "stride": stride,
                    "pad": pad,
                    "dilation": dilation,
                    "bias": bias,
                },
            }
        )

    def bn(bn_name, scale_name, key, ch):
        mean = (rng.standard_normal(ch) * 0.1).astype(np.float32)
        var = (rng.random(ch) * 1.5 + 0.5).astype(np.float32)
        gamma = (rng.random(ch) * 0.5 + 0.5).astype(np.float32)
        beta = (rng.standard_normal(ch) * 0.1).astype(np.float32)
        # Caffe stores the running sums and their normaliser; the converter must divide
        stored_mean = (mean.astype(np.float64) * factor).astype(np.float32)
        stored_var = (var.astype(np.float64) * factor).astype(np.float32)
        known[key + ".running_mean"] = stored_mean.astype(np.float64) / factor if factor else np.zeros(ch)
        known[key + ".running_var"] = stored_var.astype(np.float64) / factor if factor else np.zeros(ch)
        known[key + ".weight"] = gamma
        known[key + ".bias"] = beta
        specs.append(
            {
                "name": bn_name,
                "type": "BatchNorm",
                "blobs": [stored_mean, stored_var, np.array([factor], np.float32)],
            }
        )
        specs.append({"name": scale_name, "type": "Scale", "blobs": [gamma, beta]})

    stem = WIDTH[0] // 4
    conv("conv1", "base.layer1.conv1.conv", stem, 3, 7, stride=2, pad=3)
    bn("bn_conv1", "scale_conv1", "base.layer1.conv1.bn", stem)
    specs.append({"name": "conv1_relu", "type": "ReLU", "blobs": []})
    specs.append({"name": "pool1", "type": "Pooling", "blobs": []})
    in_ch = stem
    for si, stage in enumerate(range(2, 6)):
        out_ch = WIDTH[si]
        mid = out_ch // 4
        dilation = {2: 1, 3: 1, 4: 2, 5: 4}[stage]
        for block in range(1, n_blocks[si] + 1):
            code = block_code(stage, block)
            key = f"base.layer{stage}.block{block}"
            stride = 2 if (stage == 3 and block == 1) else 1
            if block == 1:
                conv(f"res{stage}{code}_branch1", key + ".shortcut.conv", out_ch, in_ch, 1, stride=stride)
                bn(f"bn{stage}{code}_branch1", f"scale{stage}{code}_branch1", key + ".shortcut.bn", out_ch)
            conv(f"res{stage}{code}_branch2a", key + ".reduce.conv", mid, in_ch, 1, stride=stride)
            bn(f"bn{stage}{code}_branch2a", f"scale{stage}{code}_branch2a", key + ".reduce.bn", mid)
            specs.append({"name": f"res{stage}{code}_branch2a_relu", "type": "ReLU", "blobs": []})
            conv(
                f"res{stage}{code}_branch2b",
                key + ".conv3x3.conv",
                mid,
                mid,
                3,
                pad=dilation,
                dilation=dilation,
            )
            bn(f"bn{stage}{code}_branch2b", f"scale{stage}{code}_branch2b", key + ".conv3x3.bn", mid)
            specs.append({"name": f"res{stage}{code}_branch2b_relu", "type": "ReLU", "blobs": []})
            conv(f"res{stage}{code}_branch2c", key + ".increase.conv", out_ch, mid, 1)
            bn(f"bn{stage}{code}_branch2c", f"scale{stage}{code}_branch2c", key + ".increase.bn", out_ch)
            specs.append({"name": f"res{stage}{code}", "type": "Eltwise", "blobs": []})
            specs.append({"name": f"res{stage}{code}_relu", "type": "ReLU", "blobs": []})
            in_ch = out_ch
    if classifier:
        for i, rate in enumerate(rates):
            conv(
                f"{classifier}_c{i}",
                f"base.aspp.c{i}",
                n_classes,
                WIDTH[3],
                3,
                pad=rate,
                dilation=rate,
                bias=True,
            )
        specs.append({"name": classifier, "type": "Eltwise", "blobs": []})
    if multiscale:
        # the multi-scale branches: same weights under suffixed names, plus weightless helpers
        main = [s for s in specs if s["blobs"]]
        for suffix, chosen in (("_res075", main), ("_res05", main[:5] + main[-2:])):
            specs.append({"name": "data" + suffix, "type": "Interp", "blobs": []})
            specs.extend({**s, "name": s["name"] + suffix} for s in chosen)
    specs.append({"name": "fc_fusion", "type": "Eltwise", "blobs": []})
    specs.append({"name": "loss", "type": "SoftmaxWithLoss", "blobs": []})
    specs.append({"name": "silence", "type": "Silence", "blobs": []})
    return specs, known


def write_net(path, specs, *, layout="layer", shape_style="shape"):
    body = f_string(1, "DeepLab-v2 ResNet-101 (synthetic)")
    body += f_string(3, "data") + b"".join(f_varint(4, d) for d in (1, 3, 321, 321))  # input / input_dim
    body += b"".join(layer_bytes(s, layout, shape_style) for s in specs)
    path.write_bytes(body)
    return path


def edit(specs, name, **changes):
    out = []
    for s in specs:
        if s["name"] == name:
            s = {**s, **changes}
            if "conv_changes" in changes:
                s["conv"] = {**s["conv"], **changes["conv_changes"]}
        out.append(s)
    return out


def check_all(state, known):
    assert set(state) == set(known), (sorted(set(state) ^ set(known)))[:10]
    for key, value in known.items():
        got = state[key].numpy()
        assert got.dtype == np.float32, key
        np.testing.assert_allclose(got, value.reshape(got.shape), rtol=1e-6, atol=1e-7, err_msg=key)


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


def test_current_layout_every_tensor_lands_with_its_value(tmp_path):
    n_blocks = (2, 2, 3, 3)  # res2a,b  res3a,b1  res4a,b1,b2  res5a,b,c
    specs, known = make_net(n_blocks)
    path = write_net(tmp_path / "train2_iter_20000.caffemodel", specs)
    state, report = convert_caffemodel(path)
    check_all(state, known)
    # the BN division by hand for one channel: stored sum / factor
    bn = next(s for s in specs if s["name"] == "bn4b2_branch2b")
    assert state["base.layer4.block3.conv3x3.bn.running_var"][0].item() == pytest.approx(
        float(bn["blobs"][1][0]) / FACTOR, rel=1e-6
    )
    assert report["layout"] == "layer"
    assert report["architecture"]["n_blocks"] == list(n_blocks)
    assert report["architecture"]["width"] == list(WIDTH)
    assert report["architecture"]["atrous_rates"] == list(RATES)
    assert "conv1_res075" in report["shared_layers_skipped"]
    assert "fc1_voc12_c3_res05" in report["shared_layers_skipped"]
    assert report["warnings"] == []
    meta = report["meta"]
    assert meta["kind"] == "deeplabv2-voc" and meta["source"] == "train2_iter_20000.caffemodel"
    assert (
        meta["class_names"][:3] == ["background", "aeroplane", "bicycle"] and len(meta["class_names"]) == 21
    )
    assert meta["backbone_only"] is False


def test_v1_layout_legacy_shapes_unpacked_and_double_data(tmp_path):
    n_blocks = (1, 2, 1, 3)  # res2a  res3a,b1  res4a  res5a,b,c
    specs, known = make_net(n_blocks, seed=3)
    # one blob written one float per field, one as double_data, one conv with the _h/_w fields
    specs = edit(specs, "res3b1_branch2b", data_style="unpacked")
    specs = edit(specs, "bn5c_branch2c", data_style="double")
    specs = edit(specs, "res5a_branch2b", conv_changes={"hw": True})
    specs = edit(specs, "res3a_branch1", conv_changes={"hw": True})
    path = write_net(tmp_path / "train_iter_20000.caffemodel", specs, layout="layers", shape_style="legacy")
    layout, layers = read_caffemodel(path)
    assert layout == "layers (V1)"
    assert [layer.name for layer in layers][:3] == ["data", "conv1", "bn_conv1"]
    assert next(layer for layer in layers if layer.name == "conv1").type == "Convolution"
    assert next(layer for layer in layers if layer.name == "conv1").blobs[0].shape == (4, 3, 7, 7)
    state, report = convert_caffemodel(path)
    check_all(state, known)
    assert report["layout"] == "layers (V1)"


def test_blob_without_any_shape(tmp_path):
    specs, _known = make_net((1, 1, 1, 1), multiscale=False)
    # a BatchNorm blob that states no shape at all is taken as a vector
    path = write_net(tmp_path / "a.caffemodel", specs, shape_style="none")
    with pytest.raises(CheckpointError, match="conv1"):
        convert_caffemodel(path)  # conv weights need their 4-D shape


def test_converted_model_gives_the_same_logits_as_one_built_from_the_values(tmp_path):
    n_blocks = (2, 2, 3, 3)
    specs, known = make_net(n_blocks, seed=7)
    path = write_net(tmp_path / "train2_iter_20000.caffemodel", specs)
    report = convert_caffe_file(path, tmp_path / "voc.pth")
    converted = load_model(tmp_path / "voc.pth")
    assert converted.meta["class_names"][0] == "background"

    reference = build_model(21, n_blocks=n_blocks, width=WIDTH)
    ref_state = reference.state_dict()
    ref_state.update(
        {k: torch.tensor(v, dtype=torch.float32).reshape(ref_state[k].shape) for k, v in known.items()}
    )
    reference.load_state_dict(ref_state)
    reference.eval()

    x = torch.randn(1, 3, 49, 41, generator=torch.Generator().manual_seed(0)) * 50
    with torch.no_grad():
        a, b = converted(x), reference(x)
    assert a.shape == (1, 21, 7, 6)
    # the reference's BN statistics are float64 quotients rounded once; Caffe's float32 x (1/s) may differ
    # by an ulp, which a dozen layers amplify to ~1e-5 of the logits' scale
    scale = b.abs().max().item()
    assert scale > 0.1
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale)
    assert report["tensors"] == len(known)

    from segcore import Segmenter

    segmenter = Segmenter.from_pretrained(str(tmp_path / "voc.pth"), scales=(), device="cpu", test_size=65)
    assert segmenter.class_names[:2] == ("background", "aeroplane")


def test_zero_moving_average_factor_gives_zero_statistics_like_caffe(tmp_path):
    specs, _known = make_net((1, 1, 1, 1), multiscale=False)
    bn = next(s for s in specs if s["name"] == "bn2a_branch2b")
    specs = edit(specs, "bn2a_branch2b", blobs=[bn["blobs"][0], bn["blobs"][1], np.zeros(1, np.float32)])
    state, _ = convert_caffemodel(write_net(tmp_path / "m.caffemodel", specs))
    assert torch.count_nonzero(state["base.layer2.block1.conv3x3.bn.running_mean"]) == 0
    assert torch.count_nonzero(state["base.layer2.block1.conv3x3.bn.running_var"]) == 0


def test_coco_init_backbone_dropped_or_kept(tmp_path):
    n_blocks = (1, 2, 2, 1)
    specs, known = make_net(n_blocks, n_classes=91, classifier="fc1", seed=5)
    path = write_net(tmp_path / "init.caffemodel", specs)
    backbone = {k: v for k, v in known.items() if ".aspp." not in k}

    state, report = convert_caffemodel(path, kind="init-coco")
    check_all(state, backbone)
    assert report["classifier"].startswith("dropped: fc1_c0")
    assert report["meta"]["backbone_only"] is True and "class_names" not in report["meta"]

    out = tmp_path / "init_backbone.pth"
    convert_caffe_file(path, out, kind="init-coco")
    check_all(read_backbone(out), backbone)
    check_all(read_backbone(path), backbone)  # straight from the .caffemodel too
    with pytest.raises(CheckpointError, match="aspp"):
        read_checkpoint(out)  # the strict reader wants a classifier; training uses read_backbone

    kept = tmp_path / "init_full.safetensors"
    convert_caffe_file(path, kept, kind="init-coco", keep_classifier=True)
    model = load_model(kept)
    assert model.config.n_classes == 91 and model.config.n_blocks == n_blocks
    check_all({k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, known)

    with pytest.raises(CheckpointError, match="91 classes.*init-coco"):
        convert_caffemodel(path)  # as a VOC model


def test_coco_init_with_a_single_classifier(tmp_path):
    """A DeepLab-v1-style init with one classifier conv: dropped by default, kept as the only ASPP branch."""
    n_blocks = (1, 1, 2, 1)
    specs, known = make_net(n_blocks, n_classes=91, classifier="fc1", rates=(12,), multiscale=False)
    specs = [{**s, "name": "fc1"} if s["name"] == "fc1_c0" else s for s in specs if s["name"] != "fc1"]
    specs.append({"name": "fc1000", "type": "InnerProduct", "blobs": [np.ones((10, 2048), np.float32)]})
    path = write_net(tmp_path / "init.caffemodel", specs)
    state, report = convert_caffemodel(path, kind="init-coco")
    check_all(state, {k: v for k, v in known.items() if ".aspp." not in k})
    assert report["classifier"] == "dropped: fc1, fc1000"
    with pytest.raises(CheckpointError, match="fc1, fc1000"):
        convert_caffemodel(path, kind="init-coco", keep_classifier=True)
    path = write_net(tmp_path / "init1.caffemodel", [s for s in specs if s["name"] != "fc1000"])
    state, report = convert_caffemodel(path, kind="init-coco", keep_classifier=True)
    check_all(state, known)
    assert report["meta"]["atrous_rates"] == [12]
    with pytest.raises(CheckpointError, match="fc1 "):
        convert_caffemodel(path)  # a VOC DeepLab-v2 has ASPP branches, not a lone fc1


@pytest.mark.slow
def test_full_size_resnet101_names_and_shapes(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "WIDTH", (256, 512, 1024, 2048))
    specs, known = make_net((3, 4, 23, 3), multiscale=False)
    names = [s["name"] for s in specs]
    assert {"res3b3_branch2c", "res4b22_branch2b", "scale4b22_branch2b", "res5c_branch2c"} <= set(names)
    state, _report = convert_caffemodel(write_net(tmp_path / "train2_iter_20000.caffemodel", specs))
    check_all(state, known)
    assert set(state) == {k for k in build_model(21).state_dict() if not k.endswith("num_batches_tracked")}


def test_training_starts_from_the_converted_backbone(tmp_path):
    from train import init_weights
    n_blocks = (1, 2, 2, 1)
    specs, known = make_net(n_blocks, n_classes=91, classifier="fc1", seed=11)
    path = write_net(tmp_path / "init.caffemodel", specs)
    convert_caffe_file(path, tmp_path / "init.pth", kind="init-coco")
    for source in (path, tmp_path / "init.pth"):
        model = build_model(21, n_blocks=n_blocks, width=WIDTH)
        summary = init_weights.initialise(model, str(source), "auto")
        assert summary["init"] == "backbone"
        state = model.state_dict()
        for key, value in known.items():
            if ".aspp." not in key:
                np.testing.assert_allclose(
                    state[key].numpy(), value.reshape(state[key].shape), rtol=1e-6, atol=1e-7, err_msg=key
                )


def test_multiscale_copy_that_differs_is_reported(tmp_path):
    specs, _ = make_net((1, 1, 1, 1))
    copy = next(s for s in specs if s["name"] == "res2a_branch2a_res075")
    specs = edit(specs, "res2a_branch2a_res075", blobs=[copy["blobs"][0] + 1])
    _, report = convert_caffemodel(write_net(tmp_path / "m.caffemodel", specs))
    assert any("res2a_branch2a_res075" in w for w in report["warnings"])


@pytest.mark.parametrize(
    "name, changes, message",
    [
        (
            "res3a_branch1",
            {"conv_changes": {"stride": 1}},
            r"res3a_branch1.*stride \(1, 1\) \(model \(2, 2\)\)",
        ),
        ("res3a_branch2a", {"conv_changes": {"stride": 1}}, r"res3a_branch2a.*stride"),
        ("res4a_branch2b", {"conv_changes": {"dilation": 1, "pad": 1}}, r"res4a_branch2b.*dilation \(1, 1\)"),
        ("res5a_branch2b", {"conv_changes": {"pad": 2}}, r"res5a_branch2b.*pad \(2, 2\) \(model \(4, 4\)\)"),
        ("conv1", {"conv_changes": {"pad": 0}}, r"'conv1'.*pad"),
        ("fc1_voc12_c2", {"conv_changes": {"pad": 6}}, r"fc1_voc12_c2.*pad \(6, 6\) \(model \(18, 18\)\)"),
        ("bn3a_branch2c", {"eps": 1e-3}, r"bn3a_branch2c.*eps 0.001"),
        (
            "res2a_branch2c",
            {"blobs": [np.zeros((16, 4, 1, 1), np.float32), np.zeros(16, np.float32)]},
            r"res2a_branch2c.*no bias",
        ),
        ("scale4a_branch1", {"blobs": [np.ones(64, np.float32)]}, r"scale4a_branch1.*1 blobs"),
        (
            "res2a_branch2a",
            {"blobs": [np.zeros((4, 4, 3, 1), np.float32)]},
            r"res2a_branch2a.*\(4, 4, 3, 1\)",
        ),
    ],
)
def test_architecture_mismatches_are_named(tmp_path, name, changes, message):
    specs, _ = make_net((1, 1, 1, 1), multiscale=False)
    path = write_net(tmp_path / "m.caffemodel", edit(specs, name, **changes))
    with pytest.raises(CheckpointError, match=message):
        convert_caffemodel(path)


EXTRA_CONV = {
    "name": "extra_conv",
    "type": "Convolution",
    "blobs": [np.ones((2, 2, 1, 1), np.float32)],
    "conv": {"num_output": 2, "kernel": 1},
}


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda specs: [s for s in specs if s["name"] != "bn3b1_branch2b"],
            r"base\.layer3\.block2\.conv3x3\.bn\.running_mean.*bn3b1_branch2b",
        ),
        (lambda specs: specs + [EXTRA_CONV], "extra_conv"),
        (
            lambda specs: edit(specs, "bn2a_branch1", type="Convolution"),
            "bn2a_branch1.*Convolution.*BatchNorm",
        ),
    ],
    ids=["missing", "unmapped", "mistyped"],
)
def test_missing_and_unmapped_layers_are_named(tmp_path, change, message):
    specs, _ = make_net((1, 2, 1, 1), multiscale=False)
    with pytest.raises(CheckpointError, match=message):
        convert_caffemodel(write_net(tmp_path / "a.caffemodel", change(specs)))


def cut_between_layers(good: bytes) -> bytes:
    """Cut exactly between two layers: the file parses, and the missing layers are named."""
    layers_start = good.index(layer_bytes(make_net((1, 1, 1, 1))[0][0], "layer", "shape"))
    ends, pos = [], layers_start
    while pos < len(good):  # walk the top-level 'layer' fields (tag 0xA2 0x06, then a varint length)
        length, n = 0, 0
        while True:
            b = good[pos + 2 + n]
            length |= (b & 0x7F) << (7 * n)
            n += 1
            if b < 0x80:
                break
        pos += 2 + n + length
        ends.append(pos)
    return good[: ends[len(ends) // 2]]


def pytorch_zip(_good: bytes) -> bytes:
    buffer = io.BytesIO()
    torch.save({"a": torch.zeros(2)}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("cut.caffemodel", lambda good: good[: len(good) // 2], r"cut\.caffemodel.*truncated"),
        (
            "noise.caffemodel",
            lambda good: np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
            "noise.caffemodel",
        ),
        ("train.prototxt", lambda good: b'name: "DeepLab"\nlayer {\n  name: "conv1"\n}\n', "prototxt"),
        ("model.caffemodel", pytorch_zip, "zip"),
        ("short.caffemodel", cut_between_layers, r"short\.caffemodel.*(res5|layer5).*complete"),
        ("empty.caffemodel", lambda good: b"", "empty"),
        # a valid protobuf without NetParameter layers (a BlobProto on its own)
        ("blob.caffemodel", lambda good: blob(np.ones(3, np.float32)), "no layers"),
        # known fields with the wrong wire type (protobuf's own parser would drop them silently)
        (
            "varint_name.caffemodel",
            lambda good: f_bytes(100, f_varint(1, 5) + f_string(2, "Convolution")),
            r"varint_name\.caffemodel.*layer name has wire type 0",
        ),
        (
            "fixed64_data.caffemodel",
            lambda good: f_bytes(100, f_string(1, "conv1") + f_bytes(7, tag(5, 1) + struct.pack("<d", 1.0))),
            "BlobProto.data has wire type 1",
        ),
    ],
    ids=["truncated", "noise", "prototxt", "pytorch", "cut-between-layers", "empty", "lone-blob",
         "name-as-varint", "data-as-fixed64"],
)
def test_truncated_and_foreign_files(tmp_path, name, content, message):
    specs, _ = make_net((1, 1, 1, 1), multiscale=False)
    good = write_net(tmp_path / "good.caffemodel", specs).read_bytes()
    path = tmp_path / name
    path.write_bytes(content(good))
    with pytest.raises(CheckpointError, match=message):
        convert_caffemodel(path)


def test_binary_file_whose_name_length_is_a_hash_sign_is_not_taken_for_text(tmp_path):
    specs, known = make_net((1, 1, 1, 1), multiscale=False)
    path = write_net(tmp_path / "m.caffemodel", specs)
    name = "x" * 35  # length byte 0x23 is '#', after a 0x0A (field 1) tag: "\n#xxx..."
    path.write_bytes(f_string(1, name) + path.read_bytes())
    state, _ = convert_caffemodel(path)
    check_all(state, known)


def test_vgg_deeplab_is_refused_by_name(tmp_path):
    specs = [{"name": "data", "type": "Data", "blobs": []}]
    for name, out_ch, in_ch in (
        ("conv1_1", 64, 3),
        ("conv1_2", 64, 64),
        ("fc6", 8, 64),
        ("fc8_voc12", 21, 8),
    ):
        specs.append(
            {
                "name": name,
                "type": "Convolution",
                "conv": {"num_output": out_ch, "kernel": 3, "pad": 1, "bias": True},
                "blobs": [np.zeros((out_ch, in_ch, 3, 3), np.float32), np.zeros(out_ch, np.float32)],
            }
        )
    path = write_net(tmp_path / "vgg16.caffemodel", specs)
    with pytest.raises(CheckpointError, match=r"vgg16\.caffemodel.*conv1_1.*not look like a ResNet DeepLab"):
        convert_caffemodel(path)


def test_cli_command(tmp_path, capsys):
    from segcore.cli import main

    specs, _ = make_net((1, 2, 2, 1))
    path = write_net(tmp_path / "train2_iter_20000.caffemodel", specs)
    assert main(["convert-caffe", str(path), str(tmp_path / "out" / "voc.pth")]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "voc.pth" in printed
    ckpt = read_checkpoint(tmp_path / "out" / "voc.pth")
    assert ckpt.meta["kind"] == "deeplabv2-voc" and ckpt.n_classes == 21
    with pytest.raises(SystemExit):
        main(["convert-caffe", str(path), "x.pth", "--kind", "imagenet"])
    assert main(["convert-caffe", str(tmp_path / "absent.caffemodel"), "x.pth"]) == 2
    assert "absent.caffemodel" in capsys.readouterr().err


def test_wire_reader_agrees_with_google_protobuf(tmp_path):
    """Cross-check the encoder above and the converter's reader against protobuf's own codec."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name="caffe_subset.proto", package="caffe_subset", syntax="proto2"
    )

    def message(name, fields):
        m = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name, packed in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = ".caffe_subset." + type_name
            if packed:
                f.options.packed = True

    OPT, REP = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message("BlobShape", [("dim", 1, F.TYPE_INT64, REP, None, True)])
    message(
        "BlobProto",
        [
            ("shape", 7, F.TYPE_MESSAGE, OPT, "BlobShape", False),
            ("data", 5, F.TYPE_FLOAT, REP, None, True),
            ("double_data", 8, F.TYPE_DOUBLE, REP, None, True),
            ("num", 1, F.TYPE_INT32, OPT, None, False),
            ("channels", 2, F.TYPE_INT32, OPT, None, False),
            ("height", 3, F.TYPE_INT32, OPT, None, False),
            ("width", 4, F.TYPE_INT32, OPT, None, False),
        ],
    )
    message(
        "ConvolutionParameter",
        [
            ("num_output", 1, F.TYPE_UINT32, OPT, None, False),
            ("bias_term", 2, F.TYPE_BOOL, OPT, None, False),
            ("pad", 3, F.TYPE_UINT32, REP, None, False),
            ("kernel_size", 4, F.TYPE_UINT32, REP, None, False),
            ("stride", 6, F.TYPE_UINT32, REP, None, False),
            ("dilation", 18, F.TYPE_UINT32, REP, None, False),
        ],
    )
    message(
        "BatchNormParameter",
        [("use_global_stats", 1, F.TYPE_BOOL, OPT, None, False), ("eps", 3, F.TYPE_FLOAT, OPT, None, False)],
    )
    message(
        "LayerParameter",
        [
            ("name", 1, F.TYPE_STRING, OPT, None, False),
            ("type", 2, F.TYPE_STRING, OPT, None, False),
            ("bottom", 3, F.TYPE_STRING, REP, None, False),
            ("top", 4, F.TYPE_STRING, REP, None, False),
            ("blobs", 7, F.TYPE_MESSAGE, REP, "BlobProto", False),
            ("convolution_param", 106, F.TYPE_MESSAGE, OPT, "ConvolutionParameter", False),
            ("batch_norm_param", 139, F.TYPE_MESSAGE, OPT, "BatchNormParameter", False),
        ],
    )
    message(
        "NetParameter",
        [
            ("name", 1, F.TYPE_STRING, OPT, None, False),
            ("input", 3, F.TYPE_STRING, REP, None, False),
            ("input_dim", 4, F.TYPE_INT32, REP, None, False),
            ("layer", 100, F.TYPE_MESSAGE, REP, "LayerParameter", False),
        ],
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    Net = message_factory.GetMessageClass(pool.FindMessageTypeByName("caffe_subset.NetParameter"))

    # 1. our encoder's bytes, decoded by protobuf
    specs, known = make_net((1, 1, 1, 1), multiscale=False)
    path = write_net(tmp_path / "ours.caffemodel", specs)
    net = Net()
    net.ParseFromString(path.read_bytes())
    by_name = {layer.name: layer for layer in net.layer}
    assert list(by_name["res3a_branch2a"].convolution_param.stride) == [2]
    assert list(by_name["res4a_branch2b"].convolution_param.dilation) == [2]
    assert list(by_name["conv1"].blobs[0].shape.dim) == [4, 3, 7, 7]
    np.testing.assert_array_equal(
        np.array(by_name["conv1"].blobs[0].data, np.float32),
        known["base.layer1.conv1.conv.weight"].reshape(-1),
    )
    assert by_name["bn_conv1"].blobs[2].data[0] == pytest.approx(FACTOR)

    # 2. protobuf's bytes, decoded by the converter's reader (the first layers, re-serialised)
    net2 = Net(name="x")
    net2.layer.extend(net.layer)
    layer = net2.layer.add(name="extra", type="Convolution")
    b = layer.blobs.add(num=1, channels=2, height=1, width=3)
    b.double_data.extend([0.5, -1.25, 2.0, 3.0, 4.0, 5.5])
    layer.convolution_param.kernel_size.append(3)
    layer.convolution_param.dilation.append(12)
    layer.convolution_param.pad.append(12)
    other = tmp_path / "theirs.caffemodel"
    other.write_bytes(net2.SerializeToString())
    _layout, layers = read_caffemodel(other)
    ours = {x.name: x for x in layers}
    assert ours["extra"].blobs[0].shape == (1, 2, 1, 3)
    np.testing.assert_array_equal(ours["extra"].blobs[0].data, np.float32([0.5, -1.25, 2.0, 3.0, 4.0, 5.5]))
    assert ours["extra"].conv.kernel == (3, 3) and ours["extra"].conv.dilation == (12, 12)
    assert ours["extra"].conv.pad == (12, 12) and ours["extra"].conv.bias_term is True
    assert ours["res3a_branch1"].conv.stride == (2, 2) and ours["res3a_branch1"].conv.bias_term is False
    assert ours["bn_conv1"].bn_eps is None or ours["bn_conv1"].bn_eps == pytest.approx(1e-5)
    np.testing.assert_array_equal(
        ours["conv1"].blobs[0].data, known["base.layer1.conv1.conv.weight"].reshape(-1)
    )
