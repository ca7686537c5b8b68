"""Trainer protocol and engineering: config, param groups, frozen BN, poly lr, MSC loss, augmentation,
sampler, initialisation, resume equality and failure handling (all in-process, tiny models, CPU)."""

from __future__ import annotations

import errno
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from factories import TINY_BLOCKS, TINY_WIDTH, tiny_cfg, tiny_model

import train
from train import engine
from train.augmentation import augment
from train.config import config_from_dict
from train.data import GlobalBatchSampler, make_synthetic_voc


def load_pth(path):
    return torch.load(str(path), map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------------- config
def test_config_unknown_keys_list_valid_ones():
    with pytest.raises(train.ConfigError) as exc:
        config_from_dict({"solver": {"iteratons": 5}, "data": {"synthetic": {"enabled": True}}})
    msg = str(exc.value)
    assert "solver.iteratons" in msg and "iterations" in msg and "batch_size" in msg


def test_set_overrides_use_yaml_values_never_eval():
    cfg = config_from_dict({"data": {"synthetic": {"enabled": True}}},
                           ["solver.iterations=12", "solver.lr=1e-3", "model.msc_scales=[0.5]",
                            "name=__import__('os').getcwd()"])
    assert cfg.solver.iterations == 12 and cfg.solver.lr == 1e-3 and cfg.model.msc_scales == [0.5]
    assert cfg.name == "__import__('os').getcwd()"
    with pytest.raises(train.ConfigError, match="expected an integer"):
        config_from_dict({"data": {"synthetic": {"enabled": True}}}, ["solver.iterations=many"])
    with pytest.raises(train.ConfigError, match="key=value"):
        config_from_dict({}, ["solver.iterations"])


def test_head_options_are_validated():
    data = {"data": {"synthetic": {"enabled": True}}}
    assert config_from_dict(data).model.atrous_rates == [6, 12, 18, 24]
    assert config_from_dict(data, ["model.aspp=v3"]).model.atrous_rates == [6, 12, 18]
    assert config_from_dict(data, ["model.aspp=v3", "model.atrous_rates=[2, 4]"]).model.atrous_rates == [2, 4]
    with pytest.raises(train.ConfigError, match="model.aspp must be v2 or v3"):
        config_from_dict(data, ["model.aspp=v4"])
    with pytest.raises(train.ConfigError, match="atrous_rates"):
        config_from_dict(data, ["model.aspp=v3", "model.atrous_rates=[0, 4]"])
    with pytest.raises(train.ConfigError, match="solver.batch_size is 1 .*at least 2 images per process"):
        config_from_dict(data, ["model.aspp=v3", "solver.batch_size=1"])
    with pytest.raises(train.ConfigError, match="model.sync_bn needs model.aspp: v3"):
        config_from_dict(data, ["model.sync_bn=true"])
    for name in ("smoke_v3", "labelme_finetune"):
        cfg = train.load_config(f"train/configs/{name}.yaml", ["model.aspp=v3"])
        assert cfg.model.aspp == "v3"


def test_sync_bn_converts_the_head_only_and_needs_cuda():
    from train.engine import DistInfo, sync_head_bn

    model = tiny_model(4, aspp="v3")
    assert sync_head_bn(model, DistInfo(), torch.device("cpu")) is model  # one process: nothing to sync
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    with pytest.raises(train.ConfigError, match="SyncBatchNorm runs on CUDA"):
        sync_head_bn(model, DistInfo(rank=0, world_size=2), torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sync_head_bn(model, DistInfo(rank=0, world_size=2), torch.device("cuda", 0))  # conversion itself is CPU-only
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert all((t is nn.SyncBatchNorm) == ("aspp" in n) for n, t in kinds.items())
    assert sum(t is nn.SyncBatchNorm for t in kinds.values()) == 6
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    train.set_train_mode(model)
    assert model.base.aspp.project.bn.training and model.base.aspp.project.bn.weight.requires_grad


def test_shipped_configs_load_and_match_the_reference_protocol():
    for name in ("voc12", "cocostuff10k"):
        cfg = train.load_config(f"train/configs/{name}.yaml")
        s = cfg.solver
        assert (s.iterations, s.batch_size, s.iter_size, s.momentum, s.lr, s.weight_decay,
                cfg.data.crop_size) == \
            (20000, 5, 2, 0.9, 2.5e-4, 5e-4, 321)
        assert cfg.data.scales == [0.5, 0.75, 1.0, 1.25, 1.5]
        assert cfg.model.n_classes == {"voc12": 21, "cocostuff10k": 182}[name]
    for name in ("cocostuff164k", "labelme_finetune", "smoke", "smoke_v3"):
        train.load_config(f"train/configs/{name}.yaml")


# ----------------------------------------------------------------------------------------------- protocol
def test_param_groups_match_reference_get_params():
    model = tiny_model(5)
    groups = train.param_groups(model, 0.01, 5e-4)
    backbone_convs = [m for n, m in model.base.named_modules()
                      if isinstance(m, nn.Conv2d) and not n.startswith("aspp")]
    aspp = list(model.base.aspp.children())
    assert [id(p) for p in groups[0]["params"]] == [id(m.weight) for m in backbone_convs]
    assert [id(p) for p in groups[1]["params"]] == [id(c.weight) for c in aspp]
    assert [id(p) for p in groups[2]["params"]] == [id(c.bias) for c in aspp]
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.1, 0.2])
    assert [g["weight_decay"] for g in groups] == [5e-4, 5e-4, 0.0]
    bn_params = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert not bn_params & in_groups
    assert in_groups | bn_params == {id(p) for p in model.parameters()}
    # the optimizer's effective lrs follow the poly factor with the multipliers kept
    opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    engine.set_lr(opt, 0.01, 0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.05, 0.1])


def test_v3_param_groups_put_the_head_bn_at_10x_and_20x_without_weight_decay():
    model = tiny_model(5, aspp="v3")
    groups = {g["name"]: g for g in train.param_groups(model, 0.01, 5e-4)}
    aspp = model.base.aspp
    units = [*aspp.branches(), aspp.image_pool, aspp.project]
    ids = {name: [id(p) for p in g["params"]] for name, g in groups.items()}
    assert ids["aspp_weight"] == [id(u.conv.weight) for u in units] + [id(aspp.classifier.weight)]
    assert sorted(ids["aspp_bias"]) == sorted([id(u.bn.bias) for u in units] + [id(aspp.classifier.bias)])
    assert ids["aspp_norm"] == [id(u.bn.weight) for u in units]
    expected = {"backbone": (0.01, 5e-4), "aspp_weight": (0.1, 5e-4), "aspp_bias": (0.2, 0.0),
                "aspp_norm": (0.1, 0.0)}
    assert {n: (pytest.approx(g["lr"]), g["weight_decay"]) for n, g in groups.items()} == expected
    backbone_bn = {id(p) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and "aspp" not in n
                   for p in m.parameters()}
    in_groups = [id(p) for g in groups.values() for p in g["params"]]
    assert len(in_groups) == len(set(in_groups)) and not backbone_bn & set(in_groups)
    assert set(in_groups) | backbone_bn == {id(p) for p in model.parameters()}
    assert "aspp_norm" not in {g["name"] for g in train.param_groups(tiny_model(5), 0.01, 5e-4)}  # v2 as before


def test_v3_head_bn_trains_while_the_backbone_bn_stays_frozen():
    torch.manual_seed(0)
    model = train.set_train_mode(tiny_model(4, aspp="v3"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(train.param_groups(model, 0.01, 5e-4), lr=0.01, momentum=0.9)
    x = torch.randn(2, 3, 33, 33) * 50
    # training-mode head BN normalises with this batch's statistics: check one unit against them
    captured = {}

    def keep(name):
        def hook(module, inputs, output):
            captured.setdefault(name, output.detach())  # the first call's: the 1.0 scale of the first step
        return hook

    unit = model.base.aspp.project
    unit.conv.register_forward_hook(keep("conv"))
    unit.bn.register_forward_hook(keep("bn"))
    for _ in range(2):
        opt.zero_grad()
        train.msc_loss(model(x), torch.randint(0, 4, (2, 33, 33))).backward()
        opt.step()
    y = captured["conv"]
    mean, var = y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=False)
    gamma, beta = state["base.aspp.project.bn.weight"], state["base.aspp.project.bn.bias"]
    expected = (y - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5) * gamma[:, None, None] \
        + beta[:, None, None]
    torch.testing.assert_close(captured["bn"], expected, rtol=1e-4, atol=1e-4)
    after = model.state_dict()
    for k, v in after.items():
        if ".bn." in k and ".aspp." not in k:
            assert torch.equal(v, state[k]), k  # backbone BN: statistics and affine terms untouched
    for part in ("running_mean", "running_var", "weight", "bias"):
        for unit in ("c0", "c2", "image_pool", "project"):
            key = f"base.aspp.{unit}.bn.{part}"
            assert not torch.equal(after[key], state[key]), key
    assert int(after["base.aspp.project.bn.num_batches_tracked"]) == 2 * 3  # 3 MSC scales per step
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.training == ("aspp" in name), name
    # after validation (eval mode) training mode comes back with the same split
    model.eval()
    train.set_train_mode(model)
    assert model.base.aspp.project.bn.training and not model.base.layer2.block1.reduce.bn.training


def test_batchnorm_is_frozen_during_training_steps():
    torch.manual_seed(0)
    model = train.set_train_mode(tiny_model(4))
    before = {k: v.clone() for k, v in model.state_dict().items() if "bn" in k}
    conv_before = model.base.layer2.block1.reduce.conv.weight.detach().clone()
    opt = torch.optim.SGD(train.param_groups(model, 0.01, 5e-4), lr=0.01, momentum=0.9)
    for _ in range(2):
        x = torch.randn(2, 3, 33, 33) * 50
        labels = torch.randint(0, 4, (2, 33, 33))
        opt.zero_grad()
        train.msc_loss(model(x), labels).backward()
        opt.step()
    for k, v in model.state_dict().items():
        if "bn" in k:
            assert torch.equal(v, before[k]), k
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert not m.training
            assert all(not p.requires_grad and p.grad is None for p in m.parameters())
    assert model.training and not torch.equal(model.base.layer2.block1.reduce.conv.weight, conv_before)


def _reference_poly_lrs(base, max_iter, power, step_size):
    """Transcription of the reference PolynomialLR stepped by ``scheduler.step(epoch=iteration)``."""
    lr, used = base, []
    for iteration in range(1, max_iter + 1):
        used.append(lr)  # optimizer.step() of this iteration runs with the current lr
        last_epoch = iteration
        if not (last_epoch == 0 or last_epoch % step_size != 0 or last_epoch > max_iter):
            lr = base * (1 - float(last_epoch) / max_iter) ** power
    return used


def test_poly_lr_matches_reference_scheduler():
    for step in (10, 1, 7):
        ref = _reference_poly_lrs(2.5e-4, 95, 0.9, step)
        ours = [2.5e-4 * train.poly_factor(i, 95, 0.9, step) for i in range(95)]
        assert ours == pytest.approx(ref, rel=1e-12, abs=0)
    assert train.poly_factor(0, 100, 0.9, 10) == 1.0
    assert train.poly_factor(19, 100, 0.9, 10) == pytest.approx(0.9 ** 0.9)
    assert train.poly_factor(99, 100, 0.9, 1) == pytest.approx(0.01 ** 0.9)


@pytest.mark.parametrize("src,dst", [((41, 41), (21, 21)), ((41, 41), (31, 31)), ((50, 37), (7, 13)),
                                     ((9, 9), (20, 17))])
def test_label_resize_matches_pil_nearest(src, dst):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 256, (2,) + src).astype(np.uint8)
    ours = train.resize_labels(torch.from_numpy(labels.astype(np.int64)), dst).numpy()
    for b in range(2):
        pil = np.asarray(Image.fromarray(labels[b]).resize((dst[1], dst[0]), resample=Image.NEAREST))
        np.testing.assert_array_equal(ours[b], pil)


def test_msc_loss_is_sum_of_ce_against_nearest_resized_labels():
    torch.manual_seed(0)
    sizes = [(41, 41), (21, 21), (31, 31), (41, 41)]
    logits = [torch.randn(2, 5, h, w) for h, w in sizes]
    labels = torch.randint(0, 5, (2, 321, 321))
    labels[:, :40] = 255
    expected = 0.0
    for lg in logits:
        h, w = lg.shape[-2:]
        resized = np.stack([np.asarray(Image.fromarray(lab.numpy().astype(np.uint8)).resize((w, h),
                                                                                            Image.NEAREST))
                            for lab in labels])
        expected += F.cross_entropy(lg, torch.from_numpy(resized).long(), ignore_index=255)
    assert torch.allclose(train.msc_loss(logits, labels), expected, rtol=1e-6, atol=1e-6)
    # on a real tiny MSC model: 4 terms (1.0, 0.5, 0.75, max)
    model = train.set_train_mode(tiny_model(5))
    out = model(torch.randn(2, 3, 48, 48))
    assert len(out) == 4


# ------------------------------------------------------------------------------------------- augmentation
def test_augmentation_pads_crops_flips_and_subtracts_bgr_mean():
    mean = (104.008, 116.669, 122.675)
    image = np.zeros((20, 30, 3), np.uint8)
    image[..., 0] = 200  # red in RGB
    label = np.full((20, 30), 3, np.uint8)
    img, lab = augment(image, label, random.Random(0), scales=[1.0], crop_size=40, mean_bgr=mean, flip=False)
    assert img.shape == (3, 40, 40) and lab.shape == (40, 40) and lab.dtype == np.int64
    # the padded area: image equal to the mean (0 after subtraction), label 255; the image sits top-left
    assert (lab[20:] == 255).all() and (lab[:, 30:] == 255).all() and (lab[:20, :30] == 3).all()
    assert np.allclose(img[:, 20:], 0) and np.allclose(img[:, :, 30:], 0)
    assert np.allclose(img[2, :20, :30], 200 - mean[2]) and np.allclose(img[0, :20, :30], -mean[0])
    # same seed, same sample; flip mirrors image and label together
    a = augment(image, label, random.Random(5), scales=[0.5, 1.5], crop_size=16, mean_bgr=mean)
    b = augment(image, label, random.Random(5), scales=[0.5, 1.5], crop_size=16, mean_bgr=mean)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_augmentation_keeps_labels_aligned_with_pixels():
    yy, xx = np.mgrid[0:60, 0:80]
    label = ((xx // 20) % 4).astype(np.uint8)
    image = np.stack([label * 60, label * 20, np.zeros_like(label)], -1).astype(np.uint8)
    for seed in range(6):
        img, lab = augment(image, label, random.Random(seed), scales=[0.75, 1.0, 1.5], crop_size=40,
                           mean_bgr=(0, 0, 0))
        red = img[2]
        inner = np.ones_like(lab, bool)
        inner[:, 1:] &= lab[:, 1:] == lab[:, :-1]
        inner[:, :-1] &= lab[:, 1:] == lab[:, :-1]
        ok = inner & (lab != 255)
        assert np.allclose(red[ok], lab[ok] * 60, atol=1e-3)


def test_global_batch_sampler_splits_the_global_batch_by_rank():
    one = GlobalBatchSampler(11, 4, seed=7, world_size=1)
    two = [GlobalBatchSampler(11, 2, seed=7, rank=r, world_size=2) for r in range(2)]
    for m in range(8):
        assert one.batch(m) == two[0].batch(m) + two[1].batch(m)
    it = iter(GlobalBatchSampler(11, 4, seed=7, start=5))
    assert next(it) == one.batch(5)
    seen = [i for m in range(11) for i, _ in GlobalBatchSampler(11, 1, seed=7).batch(m)]
    assert sorted(seen) == list(range(11))  # each epoch is a permutation


# -------------------------------------------------------------------------------------------- initialising
def test_torchvision_weights_convert_to_our_layout():
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    tv = ResNet(Bottleneck, [1, 1, 1, 1]).eval()
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.0)
                m.bias.uniform_(-0.1, 0.1)
    from segcore import build_model

    ours = build_model(6, n_blocks=(1, 1, 1, 1), stride_in_1x1=False)
    train.initialise(ours, None)
    sd = train.convert_torchvision(tv.state_dict())
    assert not any(k.startswith("base.aspp") or "fc" in k for k in sd)
    missing = set(ours.state_dict()) - set(sd)
    assert missing == {k for k in ours.state_dict() if ".aspp." in k}
    ours.load_state_dict({**ours.state_dict(), **sd})
    ours.eval()
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        expected = tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))
        got = ours.base.layer3(ours.base.layer2(ours.base.layer1(x)))
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_v2_checkpoint_initialises_a_v3_backbone_with_a_fresh_head(tmp_path, capsys):
    from factories import tiny_checkpoint

    path = tiny_checkpoint(tmp_path / "pub.pth", n_classes=21, seed=1)
    file_sd = load_pth(path)
    torch.manual_seed(0)
    model = tiny_model(21, aspp="v3", seed=5)
    info = train.initialise(model, str(path), "checkpoint")
    assert "v3 ASPP head is initialised fresh" in info["head"] and "its ASPP head is v2" in info["head"]
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in file_sd.items() if ".aspp." not in k)
    head = model.base.aspp
    assert (head.project.bn.weight == 1).all() and (head.project.bn.running_var == 1).all()
    assert (head.classifier.bias == 0).all() and 0.008 < head.classifier.weight.std().item() < 0.012
    # the trainer says so in its log
    cfg = tiny_cfg(model={"aspp": "v3", "init": {"path": str(path), "format": "checkpoint"}},
                   data={"class_names": [f"c{i}" for i in range(21)]}, solver={"iterations": 1})
    train.train(cfg, tmp_path / "run")
    assert "backbone from" in capsys.readouterr().err
    assert load_pth(tmp_path / "run/checkpoints/final.pth")["meta"]["init"]["classifier"] == "re-initialised"


def test_initialise_from_files(tmp_path):
    from factories import tiny_checkpoint
    from segcore import build_model

    def tiny(n):
        return build_model(n, n_blocks=TINY_BLOCKS, width=TINY_WIDTH)

    path = tiny_checkpoint(tmp_path / "pub.pth", n_classes=21, seed=1)
    file_sd = load_pth(path)
    # published checkpoint, different class count: backbone copied, classifier normal(0, 0.01) / zero bias
    torch.manual_seed(0)
    m = tiny(7)
    info = train.initialise(m, str(path))
    assert "re-initialised" in info["classifier"]
    assert torch.equal(m.state_dict()["base.layer5.block1.increase.conv.weight"],
                       file_sd["base.layer5.block1.increase.conv.weight"])
    w = torch.cat([c.weight.flatten() for c in m.base.aspp.children()])
    assert 0.008 < w.std().item() < 0.012 and abs(w.mean().item()) < 0.002
    assert all((c.bias == 0).all() for c in m.base.aspp.children())
    # same class count: everything copied
    m = tiny(21)
    train.initialise(m, str(path), "checkpoint")
    assert all(torch.equal(v, file_sd[k]) for k, v in m.state_dict().items() if k in file_sd)
    # backbone-only file (Caffe COCO init layout): no aspp keys
    bb = {k: v for k, v in file_sd.items() if ".aspp." not in k}
    torch.save(bb, tmp_path / "coco_init.pth")
    m = tiny(4)
    assert train.initialise(m, str(tmp_path / "coco_init.pth"))["init"] == "backbone"
    assert torch.equal(m.state_dict()["base.layer1.conv1.conv.weight"], bb["base.layer1.conv1.conv.weight"])
    del bb["base.layer3.block1.reduce.conv.weight"]
    torch.save(bb, tmp_path / "broken.pth")
    with pytest.raises(train.TrainError, match="layer3.block1.reduce.conv.weight"):
        train.initialise(tiny(4), str(tmp_path / "broken.pth"), "backbone")
    with pytest.raises(train.TrainError, match="no such weights file"):
        train.initialise(tiny(4), str(tmp_path / "absent.pth"), "backbone")


# ---------------------------------------------------------------------------------------- runs in-process
@pytest.mark.parametrize("aspp", ["v2", "v3"])
def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path, aspp):
    def cfg(**sections):
        return tiny_cfg(model={"aspp": aspp}, **sections)

    straight = train.train(cfg(), tmp_path / "a")
    assert straight.status == "finished" and straight.iteration == 6
    half = train.train(cfg(runtime={"device": "cpu", "stop_after": 3}), tmp_path / "b")
    assert half.status == "stopped" and half.iteration == 3
    assert load_pth(tmp_path / "b/checkpoints/last.pth")["train_state"]["iteration"] == 3
    assert not (tmp_path / "b/checkpoints/final.pth").exists()
    if aspp == "v2":  # a run saved before the head options existed still resumes
        last = load_pth(tmp_path / "b/checkpoints/last.pth")
        for key in ("aspp", "sync_bn"):
            del last["meta"]["config"]["model"][key]
        torch.save(last, tmp_path / "b/checkpoints/last.pth")
    resumed = train.train(cfg(), tmp_path / "b", resume=True)
    assert resumed.status == "finished" and resumed.iteration == 6
    a = load_pth(tmp_path / "a/checkpoints/final.pth")["state_dict"]
    b = load_pth(tmp_path / "b/checkpoints/final.pth")["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    import json

    records = [json.loads(line) for line in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5, 6]
    lrs = [r["lr"] for r in records]
    assert lrs == pytest.approx([1e-3 * (1 - i / 6) ** 0.9 for i in range(6)])
    assert "val_mean_iou" in records[-1]
    # the checkpoint is a segcore model with its names and options
    from segcore import load_model

    model = load_model(tmp_path / "b/checkpoints/final.pth")
    assert model.meta["class_names"] == ["background", "disc", "square", "triangle"]
    assert model.meta["atrous_rates"] == [1, 2] and model.meta["stride_in_1x1"] is True
    assert model.meta["config"]["solver"]["iterations"] == 6
    assert model.meta["aspp"] == model.config.aspp == aspp
    with pytest.raises(train.TrainError, match="already holds a run"):
        train.train(cfg(), tmp_path / "b")
    with pytest.raises(train.ConfigError, match="solver.lr"):
        train.train(cfg(solver={"lr": 0.5}), tmp_path / "b", resume=True)


def test_non_finite_loss_stops_with_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = engine.msc_loss

    def flaky(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * float("nan") if calls["n"] > 8 else loss  # iteration 5 (iter_size 2)

    monkeypatch.setattr(engine, "msc_loss", flaky)
    with pytest.raises(train.TrainError, match=r"non-finite loss.*iteration 5") as exc:
        train.train(tiny_cfg(log={"save_every": 2, "every": 1, "tensorboard": False, "progress": False}),
                    tmp_path / "r")
    assert "last.pth" in str(exc.value)
    state = load_pth(tmp_path / "r/checkpoints/last.pth")
    assert state["train_state"]["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(train.TrainError, match="No space left on device.*previous last.pth is unchanged"):
        train.train(tiny_cfg(log={"save_every": 2, "every": 1, "tensorboard": False, "progress": False}),
                    tmp_path / "r")
    ckpt = tmp_path / "r/checkpoints"
    assert load_pth(ckpt / "last.pth")["train_state"]["iteration"] == 2
    assert [p.name for p in ckpt.iterdir()] == ["last.pth"]  # no temp files left behind


def test_out_of_range_labels_are_reported_with_the_file(tmp_path):
    root = make_synthetic_voc(tmp_path / "r/data/synthetic", n_train=8, n_val=3, size=32, n_classes=4,
                              seed=1234)
    bad = root / "SegmentationClass" / "train_0002.png"
    arr = np.array(Image.open(bad))
    arr[0, :3] = 7
    Image.fromarray(arr).save(bad)
    with pytest.raises(train.TrainError, match=r"train_0002\.png: label values 7 are outside"):
        train.train(tiny_cfg(solver={"iterations": 20, "batch_size": 4, "iter_size": 1}), tmp_path / "r")


def test_missing_dataset_shows_the_expected_layout(tmp_path):
    from segcore.datasets import DatasetError

    cfg = tiny_cfg(data={"synthetic": {"enabled": False}, "root": str(tmp_path / "nowhere"), "format": "voc",
                         "train_split": "train"})
    with pytest.raises(DatasetError, match=r"(?s)nowhere.*not found.*JPEGImages"):
        train.train(cfg, tmp_path / "r")
