"""Accelerated paths (issue 8): BN folding is exact in fp32, bf16/fp16 paths agree with fp32, fp32 untouched."""

from __future__ import annotations

import pytest
import torch
from factories import TINY_BLOCKS, TINY_WIDTH, randomize_, scene_image, tiny_model

import annotations
import segcore.fast as segcore_fast
from segcore import Segmenter, build_model
from segcore.model import msc_forward
from segcore.fast import (
    FastPath,
    fold_batchnorm,
    count_physical_cores,
    fused_conv_supported,
    native_bf16,
    uses_fast_path,
)
from segcore.segmenter import resolve_precision

VOC = annotations.get_label_space("voc")


def _segmenter(model, precision, device="cpu", **kw):
    return Segmenter(model, VOC.class_names, VOC.palette, device=device, precision=precision, **kw)


def _images():
    return [scene_image(150, 200, seed=s) for s in range(3)]


@pytest.mark.parametrize("aspp", ["v2", "v3"])
def test_bn_folding_matches_unfolded_in_fp32(aspp):
    model = tiny_model(21, seed=1, aspp=aspp).eval()
    folded = fold_batchnorm(model.base)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.base.modules())  # original untouched
    x = torch.randn(2, 3, 97, 81) * 60
    with torch.inference_mode():
        ref, got = model.base(x), folded(x)
        ref_msc, got_msc = msc_forward(model.base, x, (0.5, 0.75)), msc_forward(folded, x, (0.5, 0.75))
    # an independent check of the folding formula on one unit: conv(x)·γ/σ + β − μγ/σ
    unit = model.base.layer1.conv1
    bn = unit.bn
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    with torch.no_grad():
        expected = torch.nn.functional.conv2d(x, unit.conv.weight, None, 2, 3) * scale[:, None, None] \
            + (bn.bias - bn.running_mean * scale)[:, None, None]
        folded_conv = folded.layer1.conv1.conv(x)
    torch.testing.assert_close(folded_conv, expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3 * ref.abs().max().item())
    torch.testing.assert_close(got_msc, ref_msc, rtol=1e-4, atol=1e-3 * ref_msc.abs().max().item())


def test_fp32_path_keeps_the_original_model_and_numerics():
    model = tiny_model(21, seed=2)
    seg = _segmenter(model, "fp32", test_size=97)
    assert seg.fast_path() is None and seg.model is model
    x = seg.to_tensor([seg.preprocess(scene_image(73, 97))[1]])
    with torch.inference_mode():
        expected = msc_forward(model.base, x, seg.scales)
    assert torch.equal(seg.logits(x), expected)


@pytest.mark.parametrize("aspp", ["v2", "v3"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernels", "plain-kernels"])
@pytest.mark.parametrize("scales", [(), (0.5, 0.75)])
def test_cpu_bf16_path_agrees_with_fp32(scales, fused, aspp, monkeypatch):
    import segcore.fast

    if not fused:  # the path a PyTorch build without oneDNN's fused convolutions takes
        monkeypatch.setattr(segcore.fast, "fused_conv_supported", lambda: False)
    model = tiny_model(21, seed=4, aspp=aspp)
    fp32 = _segmenter(model, "fp32", scales=scales, test_size=129)
    fast = _segmenter(model, "bf16", scales=scales, test_size=129, batch_size=3)
    assert isinstance(fast.fast_path(), FastPath)
    got = fast.predict_batch(_images())
    for img, pred in zip(_images(), got):
        ref = fp32.predict(img).label_map
        assert (pred.label_map == ref).mean() >= 0.99
        assert len(set(ref.ravel().tolist())) > 1
    # the fast path works on a copy: the shared model still has its BatchNorms and fp32 weights
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fused_kernels_are_available_where_onednn_is():
    # a silent fallback to plain kernels would cost a third of the CPU speed-up, so CI notices it here
    import platform

    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available():
        assert fused_conv_supported()


def test_fused_and_plain_kernels_compute_the_same_resnet(monkeypatch):
    import segcore.fast

    model = randomize_(build_model(21, n_blocks=TINY_BLOCKS, width=TINY_WIDTH), seed=8).eval()
    x = torch.randn(2, 3, 65, 49) * 60
    x_before = x.clone()
    fused = FastPath(model.base, torch.device("cpu"), "bf16")
    monkeypatch.setattr(segcore.fast, "fused_conv_supported", lambda: False)
    plain = FastPath(model.base, torch.device("cpu"), "bf16")
    with torch.inference_mode():
        a, b, ref = fused(x, ()), plain(x, ()), model.base(x)
    assert torch.equal(x, x_before)  # in-place sums only ever touch the path's own buffers
    assert a.shape == b.shape == ref.shape and a.dtype == torch.float32
    scale = ref.abs().max().item()
    # both round to bf16 at each layer, in slightly different places: they differ by bf16 noise only
    torch.testing.assert_close(a, b, rtol=0, atol=0.05 * scale)
    torch.testing.assert_close(a, ref, rtol=0, atol=0.1 * scale)


@pytest.mark.parametrize("n_classes", [21, 182, 32])
def test_padded_aspp_gives_the_aspp_scores(n_classes):
    from segcore.fast import _PaddedASPP

    aspp = build_model(n_classes, n_blocks=TINY_BLOCKS, width=TINY_WIDTH).base.aspp.eval()
    for conv in aspp.children():
        torch.nn.init.normal_(conv.bias)
    h = torch.relu(torch.randn(2, aspp.c0.in_channels, 33, 27)).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got, ref = _PaddedASPP(aspp)(h), aspp(h)
    assert got.shape == ref.shape == (2, n_classes, 33, 27)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_fast_path_is_shared_by_with_options():
    seg = _segmenter(tiny_model(21, seed=5), "bf16", test_size=65)
    other = seg.with_options(scales=())
    assert other.fast_path() is seg.fast_path()


def test_full_resnet101_bf16_agrees_with_fp32():
    # random full-size weights are more rounding-sensitive than a trained model; the bar is still 99%
    model = randomize_(build_model(21), seed=0)
    fp32 = _segmenter(model, "fp32", scales=(), test_size=161)
    fast = _segmenter(model, "bf16", scales=(), test_size=161)
    img = scene_image(121, 161, seed=7)
    assert (fast.predict(img).label_map == fp32.predict(img).label_map).mean() >= 0.99


def test_auto_precision_follows_the_cpu(monkeypatch):
    import segcore.fast

    monkeypatch.setattr(segcore.fast, "cpu_bf16_supported", lambda: True)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(segcore.fast, "cpu_bf16_supported", lambda: False)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32-fused"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    cpu = torch.device("cpu")
    assert uses_fast_path(cpu, "bf16") and uses_fast_path(cpu, "fp32-fused") and not uses_fast_path(cpu, "fp32")


def _cpuinfo(cpus):
    """A /proc/cpuinfo text: one block per (processor, physical id, core id)."""
    return "\n\n".join(f"processor\t: {p}\nphysical id\t: {s}\ncore id\t\t: {c}\nflags\t\t: fpu"
                       for p, s, c in cpus)


def test_physical_cores_count_hyperthread_siblings_once():
    smt = _cpuinfo([(0, 0, 0), (1, 0, 1), (2, 0, 0), (3, 0, 1)])  # 2 cores, 2 threads each
    assert count_physical_cores(smt, {0, 1, 2, 3}) == 2
    assert count_physical_cores(smt, {0, 2}) == 1  # both threads of core 0
    two_sockets = _cpuinfo([(0, 0, 0), (1, 1, 0)])  # same core id on different sockets
    assert count_physical_cores(two_sockets, {0, 1}) == 2
    assert count_physical_cores("", {0, 1, 2}) == 3  # nothing readable: the allowed CPUs
    assert count_physical_cores("processor : x", {0, 1}) == 2


@pytest.mark.parametrize("aspp", ["v2", "v3"])
@pytest.mark.parametrize("scales", [(), (0.5, 0.75)])
def test_fp32_fused_path_gives_the_fp32_answers(scales, aspp):
    # the path CPUs without bf16 take under "auto": same arithmetic, fused kernels, folded BN, padded ASPP
    model = randomize_(build_model(21, n_blocks=TINY_BLOCKS, width=TINY_WIDTH, aspp=aspp), seed=9).eval()
    fused = FastPath(model.base, torch.device("cpu"), "fp32-fused")
    assert isinstance(fused.model, segcore_fast._CpuModel)
    x = torch.randn(2, 3, 97, 81) * 60
    x_before = x.clone()
    with torch.inference_mode():
        got, ref = fused(x, scales), msc_forward(model.base, x, scales)
    assert torch.equal(x, x_before) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.999
    seg = _segmenter(model, "fp32-fused", scales=scales, test_size=97)
    plain = _segmenter(model, "fp32", scales=scales, test_size=97)
    img = scene_image(80, 97, seed=3)
    assert (seg.predict(img).label_map == plain.predict(img).label_map).mean() >= 0.999


@pytest.mark.parametrize("onednn, flags, capability, expected", [
    (True, {"avx512f", "avx512_vnni"}, "AVX512", False),  # VNNI is int8, not bf16
    (True, {"avx512f", "avx512_bf16"}, "AVX512", True),
    (True, {"avx512f", "amx_bf16"}, "AVX512", True),
    (False, {"avx512f", "amx_bf16"}, "AMX", False),  # oneDNN would emulate bf16: slower than fp32
    (True, set(), "AMX", True),  # no /proc/cpuinfo: torch's capability decides
    (True, set(), "AVX2", False),
])
def test_cpu_flags_decide_bf16(onednn, flags, capability, expected):
    assert native_bf16(onednn, frozenset(flags), capability) is expected


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_fast_path_agrees_with_cpu_fp32(precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("GPU without bf16")
    model = tiny_model(21, seed=6)
    cpu = _segmenter(model, "fp32", test_size=129)
    gpu = _segmenter(tiny_model(21, seed=6), precision, device="cuda", test_size=129, batch_size=8)
    assert isinstance(gpu.fast_path(), FastPath)
    imgs = [scene_image(96, 129, seed=s) for s in range(8)]
    for img, pred in zip(imgs, gpu.predict_batch(imgs)):
        assert (pred.label_map == cpu.predict(img).label_map).mean() >= 0.99


@pytest.mark.gpu
def test_cuda_auto_precision_is_half():
    seg = _segmenter(tiny_model(21), "auto", device="cuda")
    assert seg.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
