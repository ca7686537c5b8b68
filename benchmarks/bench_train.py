"""Training throughput: images/s and peak memory of the training step (MSC forward, loss, backward, SGD).

On CUDA: the full DeepLab-v2 ResNet-101 MSC at 321x321, batch 5, bf16 autocast vs fp32 (channels-last
both), side by side in one run, with the GPU's name. On the CPU the full model is skipped (it would take
minutes per step) and a tiny model's images/s is reported instead.
"""

from __future__ import annotations

import statistics
import time

import torch


def _step_fn(model, optimizer, images, labels, amp_dtype):
    from train import msc_loss

    def step():
        optimizer.zero_grad(set_to_none=True)
        if amp_dtype is not None:
            with torch.autocast("cuda", dtype=amp_dtype):
                logits = model(images)
        else:
            logits = model(images)
        loss = msc_loss(logits, labels)
        loss.backward()
        optimizer.step()
        return loss

    return step


def _measure(n_classes, batch, size, device, amp_dtype, *, tiny, warmup, steps, channels_last):
    from segcore import build_model
    from train import param_groups, set_train_mode

    torch.manual_seed(0)
    kwargs = dict(n_blocks=(1, 1, 1, 1), width=(16, 32, 64, 128)) if tiny else {}
    model = set_train_mode(build_model(n_classes, **kwargs)).to(device)
    images = torch.randn(batch, 3, size, size, device=device) * 50
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, n_classes, (batch, size, size), device=device)
    optimizer = torch.optim.SGD(param_groups(model, 2.5e-4, 5e-4), lr=2.5e-4, momentum=0.9)
    step = _step_fn(model, optimizer, images, labels, amp_dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out = {"images_per_s": round(batch / med, 2), "median_step_s": round(med, 4),
           "loss_finite": bool(torch.isfinite(loss))}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def run(quick: bool) -> dict:
    result = {"what": "training step (MSC forward 1.0/0.5/0.75 + max, summed CE, backward, SGD)"}
    if torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        result["gpu"] = torch.cuda.get_device_name(0)
        result["setting"] = "ResNet-101 DeepLab-v2 MSC, 21 classes, 321x321, batch 5, channels-last"
        steps, warmup = (5, 3) if quick else (20, 5)
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
                result[name] = "skipped: no bf16 on this GPU"
                continue
            result[name] = _measure(21, 5, 321, device, dtype, tiny=False, warmup=warmup, steps=steps,
                                    channels_last=True)
        if isinstance(result.get("bf16"), dict) and isinstance(result.get("fp32"), dict):
            result["bf16_speedup"] = round(result["bf16"]["images_per_s"] / result["fp32"]["images_per_s"], 2)
            mem = result["bf16"]["peak_memory_gib"] / result["fp32"]["peak_memory_gib"]
            result["bf16_memory_ratio"] = round(mem, 2)
    else:
        result["full_model"] = "skipped: no CUDA GPU (the ResNet-101 bf16/fp32 comparison needs one)"
    steps, warmup = (3, 1) if quick else (10, 2)
    result["cpu_tiny"] = {"setting": "tiny model (1,1,1,1 blocks, widths 16-128), 4 classes, 64x64, "
                                     "batch 4, fp32",
                          "threads": torch.get_num_threads(),
                          **_measure(4, 4, 64, torch.device("cpu"), None, tiny=True, warmup=warmup,
                                     steps=steps,
                                     channels_last=False)}
    return result
