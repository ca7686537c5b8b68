"""The DeepLab-v2 training protocol's maths: parameter groups, frozen BatchNorm, poly lr, MSC loss.

Protocol, following kazuto1011/deeplab-pytorch ``main.py``:

* SGD, momentum 0.9. Groups as the reference ``get_params``: backbone conv weights at the base lr with
  weight decay; ASPP weights at 10x with weight decay; ASPP biases at 20x with weight decay 0. The
  backbone's BatchNorm is frozen (eval mode, ``requires_grad=False``) and in no group.
* The v3 head (``model.aspp: v3``) trains its BatchNorm: its scales at 10x and its shifts with the
  biases at 20x, neither with weight decay; under DDP its running statistics are rank 0's, sent to every
  process after each update (with ``model.sync_bn``, SyncBatchNorm on CUDA, they come from all
  processes' batches).
* Poly lr: iteration ``i`` (1-based) uses ``lr * (1 - s / max_iter) ** power`` with
  ``s = lr_step * floor((i - 1) / lr_step)``; that is the reference's ``PolynomialLR(step_size=10)``
  stepped with ``scheduler.step(epoch=iteration)`` after each update (it changes the lr only when
  ``iteration % step_size == 0``). ``solver.lr_step: 1`` gives the smooth schedule.
* MSC loss: cross-entropy (ignore 255) on each scale's logits and on their max, each against the labels
  resized by nearest neighbour (PIL's rule) to that logit size, summed; divided by ``iter_size`` for
  gradient accumulation.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from annotations import IGNORE_INDEX


def _in_head(name: str) -> bool:
    return "aspp" in name


def freeze_bn(model: nn.Module) -> nn.Module:
    """The backbone's BatchNorm layers to eval mode (running stats stay put), affine parameters frozen.

    BatchNorm in the ASPP head (the v3 head's) keeps training.
    """
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not _in_head(name):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
    return model


def set_train_mode(model: nn.Module) -> nn.Module:
    model.train()
    return freeze_bn(model)


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """The reference ``get_params`` groups: [backbone convs 1x, ASPP weights 10x, ASPP biases 20x (wd 0)].

    A head with BatchNorm (v3) adds its BN scales as a fourth group, 10x without weight decay; its BN
    shifts join the biases.
    """
    backbone, aspp_w, aspp_b, aspp_norm = [], [], [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and _in_head(name):
            aspp_norm.append(m.weight)
            aspp_b.append(m.bias)
        if not isinstance(m, nn.Conv2d):
            continue
        if _in_head(name):
            aspp_w.append(m.weight)
            if m.bias is not None:
                aspp_b.append(m.bias)
        elif "layer" in name:
            backbone.extend(m.parameters())
    return [
        {"params": backbone, "lr": lr, "weight_decay": weight_decay, "name": "backbone", "lr_mult": 1.0},
        {"params": aspp_w, "lr": 10 * lr, "weight_decay": weight_decay, "name": "aspp_weight",
         "lr_mult": 10.0},
        {"params": aspp_b, "lr": 20 * lr, "weight_decay": 0.0, "name": "aspp_bias", "lr_mult": 20.0},
    ] + ([{"params": aspp_norm, "lr": 10 * lr, "weight_decay": 0.0, "name": "aspp_norm", "lr_mult": 10.0}]
         if aspp_norm else [])


def poly_factor(done: int, max_iter: int, power: float, step: int = 10) -> float:
    """Multiplier of the base lr for the iteration after ``done`` completed ones (see module docstring)."""
    s = step * (done // step)
    return max(0.0, 1.0 - s / max_iter) ** power


def set_lr(optimizer, base_lr: float, factor: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group.get("lr_mult", 1.0) * factor
    return base_lr * factor


def resize_labels(labels: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour resize of BxHxW labels with PIL's rule: source = floor((dst + 0.5) * in / out)."""
    h_in, w_in = labels.shape[-2:]
    h, w = int(size[0]), int(size[1])
    if (h, w) == (h_in, w_in):
        return labels
    dev = labels.device
    iy = torch.floor((torch.arange(h, dtype=torch.float64) + 0.5) * (h_in / h)).long().clamp_(0, h_in - 1)
    ix = torch.floor((torch.arange(w, dtype=torch.float64) + 0.5) * (w_in / w)).long().clamp_(0, w_in - 1)
    return labels.index_select(-2, iy.to(dev)).index_select(-1, ix.to(dev))


def msc_loss(logits_list, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum over ``[logits_1.0, *logits_scaled, logits_max]`` of CE against labels resized to each size."""
    if isinstance(logits_list, torch.Tensor):
        logits_list = [logits_list]
    total = 0.0
    for logits in logits_list:
        target = resize_labels(labels, logits.shape[-2:])
        total = total + F.cross_entropy(logits.float(), target, ignore_index=ignore_index)
    return total
