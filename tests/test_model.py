import pytest
import torch
from factories import TINY_BLOCKS, TINY_CH, TINY_WIDTH, randomize_, tiny_model
from reference_deeplab import reference_model

from segcore import build_model
from segcore.model import msc_forward


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_full_model_has_the_published_keys_and_size():
    ours = build_model(21).state_dict()
    ref = reference_model(21).state_dict()
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ours)
    for key in ("base.layer1.conv1.conv.weight", "base.layer1.conv1.bn.running_var",
                "base.layer2.block1.reduce.conv.weight", "base.layer2.block1.shortcut.bn.weight",
                "base.layer4.block23.conv3x3.conv.weight", "base.layer5.block3.increase.bn.bias",
                "base.aspp.c0.weight", "base.aspp.c3.bias"):
        assert key in ours
    n_params = sum(v.numel() for k, v in ours.items() if "running" not in k and "num_batches" not in k)
    resnet101_without_fc = 44_549_160 - (2048 * 1000 + 1000)  # torchvision's published resnet101 count
    aspp = 4 * (2048 * 3 * 3 * 21 + 21)
    assert n_params == resnet101_without_fc + aspp
    assert "base.layer4.block24.reduce.conv.weight" not in ours


def test_architecture_details():
    model = build_model(21)
    base = model.base
    assert base.layer1.pool.ceil_mode and base.layer1.pool.kernel_size == 3 and base.layer1.pool.stride == 2
    assert base.layer3.block1.reduce.conv.stride == (2, 2) and base.layer3.block1.conv3x3.conv.stride == (1, 1)
    assert base.layer4.block1.reduce.conv.stride == (1, 1) and base.layer4.block5.conv3x3.conv.dilation == (2, 2)
    assert base.layer5.block2.conv3x3.conv.dilation == (4, 4) and base.layer5.block2.conv3x3.conv.padding == (4, 4)
    assert [c.dilation[0] for c in base.aspp.children()] == [6, 12, 18, 24]
    assert all(c.in_channels == 2048 and c.bias is not None for c in base.aspp.children())
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_torchvision_style_bottleneck_moves_the_stride():
    model = build_model(5, n_blocks=TINY_BLOCKS, width=TINY_WIDTH, stride_in_1x1=False)
    block = model.base.layer3.block1
    assert block.reduce.conv.stride == (1, 1) and block.conv3x3.conv.stride == (2, 2)
    assert block.shortcut.conv.stride == (2, 2)


@pytest.mark.parametrize("scales", [(0.5, 0.75), (), (0.5,)])
def test_tiny_model_matches_reference_logits(scales):
    ours = tiny_model(21, seed=3, scales=scales).eval()
    ref = reference_model(21, TINY_BLOCKS, ch=TINY_CH, scales=scales or (1.0,)).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 97, 129) * 60
    with torch.no_grad():
        a = ours(x)
        b = ref(x) if scales else ref.base(x)
    assert a.shape == (2, 21, 13, 17)
    assert rel_err(a, b) <= 1e-4


def test_training_mode_returns_every_scale_and_the_max():
    model = tiny_model(7, scales=(0.5, 0.75)).train()
    ref = reference_model(7, TINY_BLOCKS, ch=TINY_CH).train()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 65, 65) * 50
    outs = model(x)
    ref_outs = ref(x)
    assert len(outs) == 4 and [o.shape for o in outs] == [o.shape for o in ref_outs]
    for a, b in zip(outs, ref_outs):
        assert rel_err(a, b) <= 1e-4
    assert msc_forward(model.base, x, (), training=True)[0].shape == outs[0].shape


@pytest.mark.slow
def test_full_resnet101_matches_reference_logits():
    torch.manual_seed(0)
    ours = randomize_(build_model(21), seed=1).eval()
    ref = reference_model(21).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 161, 129) * 60
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == (1, 21, 21, 17)
    assert rel_err(a, b) <= 1e-4


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError):
        build_model(0)
    with pytest.raises(ValueError):
        build_model(21, n_blocks=(3, 4, 23))
    with pytest.raises(ValueError):
        build_model(21, scales=(0.0,))
