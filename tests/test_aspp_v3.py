"""The v3 ASPP head (issue 20): size and shapes derived by hand, its forward pass against a functional
transcription of the design, and checkpoints that know their head (round trip, v2/v3 mismatches listed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from factories import TINY_BLOCKS, TINY_WIDTH, randomize_, tiny_checkpoint, tiny_model

from segcore import CheckpointError, build_model, load_model
from segcore.checkpoint import read_checkpoint, save_checkpoint
from segcore.checkpoint import load_state_strict


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_v3_parameter_count_is_the_designs():
    resnet101_without_fc = 44_549_160 - (2048 * 1000 + 1000)  # torchvision's published resnet101 count
    c, k = 256, 21
    conv_bn = 2 * c  # each branch's BatchNorm: scale and shift
    head = ((2048 * c + conv_bn)                 # c0: 1x1
            + 3 * (2048 * 9 * c + conv_bn)       # c1..c3: 3x3 at 6, 12, 18
            + (2048 * c + conv_bn)               # image pooling: 1x1 on the pooled features
            + (5 * c * c + conv_bn)              # projection of the five concatenated branches
            + (c * k + k))                       # classifier with bias
    assert head == 15_540_501
    assert n_params(build_model(21, aspp="v3")) == resnet101_without_fc + head
    # v2 stays the published size
    assert n_params(build_model(21)) == resnet101_without_fc + 4 * (2048 * 9 * 21 + 21)


def _stride8_size(n: int) -> int:
    """7x7/2 pad 3 conv, 3x3/2 pad 1 max pool with ceil, one more stride 2: output stride 8, by hand."""
    n = (n + 2 * 3 - 7) // 2 + 1
    n = -(-(n + 2 * 1 - 3) // 2) + 1
    return (n - 1) // 2 + 1


@pytest.mark.parametrize("hw", [(97, 129), (65, 49), (33, 40)])
def test_v3_output_shape_matches_v2(hw):
    x = torch.randn(2, 3, *hw) * 60
    with torch.no_grad():
        out = tiny_model(7, aspp="v3", scales=()).eval()(x)
        ref = tiny_model(7, scales=()).eval()(x)
    assert out.shape == ref.shape == (2, 7, _stride8_size(hw[0]), _stride8_size(hw[1]))


def test_v3_structure_and_keys():
    aspp = build_model(21, aspp="v3").base.aspp
    assert [aspp.c0.conv.kernel_size, aspp.c0.conv.dilation] == [(1, 1), (1, 1)]
    assert [getattr(aspp, f"c{i}").conv.dilation[0] for i in (1, 2, 3)] == [6, 12, 18]
    assert [getattr(aspp, f"c{i}").conv.padding[0] for i in (1, 2, 3)] == [6, 12, 18]
    assert not hasattr(aspp, "c4")
    assert aspp.project.conv.in_channels == 5 * 256 and aspp.classifier.bias is not None
    keys = [k for k in build_model(21, aspp="v3").state_dict() if k.startswith("base.aspp.")]
    for key in ("base.aspp.c0.conv.weight", "base.aspp.c3.bn.running_var", "base.aspp.image_pool.conv.weight",
                "base.aspp.image_pool.bn.weight", "base.aspp.project.conv.weight", "base.aspp.classifier.bias"):
        assert key in keys
    assert [k for k in build_model(21, aspp="v3", atrous_rates=(2, 4)).state_dict()
            if k.endswith(".conv.weight") and ".aspp.c" in k] == [f"base.aspp.c{i}.conv.weight" for i in range(3)]
    with pytest.raises(ValueError, match="aspp"):
        build_model(21, aspp="v4")
    with pytest.raises(ValueError, match="rate"):
        build_model(21, aspp="v3", atrous_rates=(0, 6))


def _bn(x, sd, prefix):
    return F.batch_norm(x, sd[prefix + "running_mean"], sd[prefix + "running_var"], sd[prefix + "weight"],
                        sd[prefix + "bias"], training=False, eps=1e-5)


def test_v3_head_computes_what_the_design_says():
    # a transcription of the design with functional ops on the state dict (eval mode)
    model = randomize_(build_model(5, n_blocks=TINY_BLOCKS, width=TINY_WIDTH, aspp="v3",
                                   atrous_rates=(2, 3, 5)), seed=2).eval()
    sd = {k[len("base.aspp."):]: v for k, v in model.state_dict().items() if k.startswith("base.aspp.")}
    h = torch.randn(2, 128, 11, 9)
    branches = [F.relu(_bn(F.conv2d(h, sd["c0.conv.weight"]), sd, "c0.bn."))]
    for i, rate in zip((1, 2, 3), (2, 3, 5)):
        y = F.conv2d(h, sd[f"c{i}.conv.weight"], padding=rate, dilation=rate)
        branches.append(F.relu(_bn(y, sd, f"c{i}.bn.")))
    pooled = h.mean(dim=(2, 3), keepdim=True)
    pooled = F.relu(_bn(F.conv2d(pooled, sd["image_pool.conv.weight"]), sd, "image_pool.bn."))
    branches.append(pooled.expand(-1, -1, 11, 9))  # bilinear upsampling of a 1x1 map is a constant
    y = F.relu(_bn(F.conv2d(torch.cat(branches, 1), sd["project.conv.weight"]), sd, "project.bn."))
    expected = F.conv2d(y, sd["classifier.weight"], sd["classifier.bias"])
    with torch.no_grad():
        got = model.base.aspp(h)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fresh_v3_head_initialisation():
    aspp = build_model(21, aspp="v3").base.aspp
    w = aspp.classifier.weight
    assert 0.008 < w.std().item() < 0.012 and (aspp.classifier.bias == 0).all()
    for unit in (*aspp.branches(), aspp.image_pool, aspp.project):
        assert (unit.bn.weight == 1).all() and (unit.bn.bias == 0).all()
        fan_out = unit.conv.weight.shape[0] * unit.conv.weight[0, 0].numel()
        assert unit.conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_v3_checkpoint_round_trip(tmp_path, suffix):
    model = tiny_model(6, seed=3, aspp="v3", scales=(0.5,)).eval()
    path = save_checkpoint(tmp_path / f"v3{suffix}", model.state_dict(),
                           {"aspp": "v3", "atrous_rates": [6, 12, 18], "class_names": list("abcdef")})
    ckpt = read_checkpoint(path)
    assert ckpt.n_classes == 6 and ckpt.architecture()["aspp"] == "v3"
    loaded = load_model(path, scales=(0.5,))
    assert loaded.config.aspp == "v3" and loaded.config.atrous_rates == (6, 12, 18)
    x = torch.randn(1, 3, 57, 73) * 50
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_v3_keys_alone_give_the_head_and_its_rate_count(tmp_path):
    # a bare state dict (no metadata): the head comes from the keys, the rates from the head's defaults
    path = tiny_checkpoint(tmp_path / "bare.pth", n_classes=4, aspp="v3")
    assert load_model(path).config.aspp == "v3" and load_model(path).config.atrous_rates == (6, 12, 18)
    two = randomize_(build_model(4, n_blocks=TINY_BLOCKS, width=TINY_WIDTH, aspp="v3", atrous_rates=(6, 12)))
    torch.save(two.state_dict(), tmp_path / "two.pth")
    assert load_model(tmp_path / "two.pth").config.atrous_rates == (6, 12)
    assert load_model(tiny_checkpoint(tmp_path / "v2.pth", n_classes=4)).config.aspp == "v2"


@pytest.mark.parametrize("keys,says", [("v2", "v3"), ("v3", "v2")])
def test_a_file_holding_the_other_head_fails_with_the_keys_listed(tmp_path, keys, says):
    path = tiny_checkpoint(tmp_path / "x.pth", n_classes=5, aspp=keys, meta={"aspp": says})
    with pytest.raises(CheckpointError) as exc:
        load_model(path)
    msg = str(exc.value)
    assert f"the model has the {says} ASPP head, the file's keys are a {keys} head's" in msg
    missing, unexpected = msg.split("unexpected keys")
    missing_keys = {line.strip() for line in missing.splitlines()}
    unexpected_keys = {line.strip() for line in unexpected.splitlines()}
    v2_only, v3_only = "base.aspp.c0.weight", "base.aspp.c0.conv.weight"
    assert (v3_only if says == "v3" else v2_only) in missing_keys
    assert (v2_only if keys == "v2" else v3_only) in unexpected_keys
    assert not any(k.startswith("base.layer") for k in missing_keys | unexpected_keys)  # the backbone fits
    # loading into a model built with the other head directly fails the same way
    with pytest.raises(CheckpointError, match="missing keys"):
        load_state_strict(tiny_model(5, aspp=says), tiny_model(5, aspp=keys).state_dict())


def test_a_v3_checkpoint_serves_predict_evaluate_and_video(tmp_path):
    import subprocess
    import sys

    import numpy as np
    from factories import scene_image
    from PIL import Image
    from video_files import make_video, read_video

    from segcore import Segmenter, evaluate, open_dataset, segment_video

    ckpt = tiny_checkpoint(tmp_path / "v3.pth", n_classes=21, seed=4, aspp="v3")
    seg = Segmenter.from_pretrained(ckpt, scales=(), test_size=65, device="cpu", precision="fp32")
    assert seg.n_classes == 21 and seg.model.config.aspp == "v3"
    images = [scene_image(60, 80, seed=s) for s in range(3)]
    preds = [seg.predict(img).label_map for img in images]
    assert len(set(np.concatenate([p.ravel() for p in preds]).tolist())) > 1

    # predict (the CLI): the masks are the Segmenter's
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    proc = subprocess.run([sys.executable, "-m", "segcore", "predict", str(tmp_path / "a.png"), "--weights",
                           str(ckpt), "--test-size", "65", "--scales", "--precision", "fp32", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out/a.png")), preds[0])

    # evaluation: labels made from other predictions, so the IoUs are known by hand
    root = tmp_path / "voc"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    label = preds[1].copy()
    label[:20] = 0
    Image.fromarray(images[1]).save(root / "JPEGImages/x.jpg", quality=100)
    Image.fromarray(label.astype(np.uint8)).save(root / "SegmentationClass/x.png")
    (root / "ImageSets/Segmentation/val.txt").write_text("x\n")
    # protocol "resize" is the Segmenter's own path (the VOC default, "reference", runs at native size)
    result = evaluate(seg, open_dataset(root, "voc", split="val"), protocol="resize", progress=False,
                      distributed=False)
    pred = seg.predict(np.asarray(Image.open(root / "JPEGImages/x.jpg").convert("RGB"))).label_map
    ious = [((pred == k) & (label == k)).sum() / ((pred == k) | (label == k)).sum()
            for k in range(21) if (label == k).any()]  # the project's protocol: classes in the ground truth
    assert result.scores["mean_iou"] == pytest.approx(np.mean(ious))

    # video: with opacity 1 the frames are the colour maps of the image pipeline
    src = make_video(tmp_path / "in.mp4", frames=4, size=(96, 64), fps=4)
    res = segment_video(seg, src, tmp_path / "out.mp4", opacity=1.0, batch_size=2)
    (_, _, _, _, _, inputs), (_, _, _, _, _, outputs) = read_video(src), read_video(res.path)
    for rgb, out in zip(inputs, outputs):
        assert np.abs(out.astype(int) - seg.predict(rgb).colorize().astype(int)).mean() < 12


def test_benchmark_counts_the_heads_cost_as_derived_by_hand():
    from benchmarks.bench_aspp import model_cost

    positions = 65 * 65  # 513 at output stride 8
    v2_macs = 4 * 2048 * 9 * 21 * positions
    v3_macs = (2048 * 256 + 3 * 2048 * 9 * 256 + 5 * 256 * 256 + 256 * 21) * positions + 2048 * 256  # + pooled
    v2, v3 = model_cost("v2"), model_cost("v3")
    assert v2["head_gflop_513"] == round(2 * v2_macs / 1e9, 1)
    assert v3["head_gflop_513"] == round(2 * v3_macs / 1e9, 1)
    assert v3["gflop_513"] - v2["gflop_513"] == pytest.approx(2 * (v3_macs - v2_macs) / 1e9, abs=0.2)
    assert v3["parameters"] - v3["head_parameters"] == v2["parameters"] - v2["head_parameters"]
