"""The benchmark suite runs end to end (``--quick``, as CI does) and writes what the README table needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks.bench_int8_error import equalize
from factories import scene_image, tiny_model
from segcore.fast import fold_batchnorm
from segcore.quantize import calibrate, tensor_ranges

ROOT = Path(__file__).resolve().parent.parent


def test_quick_suite_writes_every_result(tmp_path):
    run = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    names = sorted(p.stem[len("bench_"):] for p in (ROOT / "benchmarks").glob("bench_*.py"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{n}_quick.json" for n in names]
    records = {n: json.loads((tmp_path / f"{n}_quick.json").read_text()) for n in names}
    for record in records.values():
        assert record["quick"] is True and record["result"]
        assert record["machine"]["cpu_count"] == os.cpu_count()
    inference = records["inference"]["result"]
    for setting in ("single_scale", "multi_scale"):
        figures = inference[setting]
        assert all(len(times) == figures["reps"] for times in figures["all_s"].values())
        # each speed-up is the plain fp32 path's median time over that path's (times rounded to 1 ms)
        for path, prefix in (("default", ""), ("fp32_fused", "fp32_fused_"), ("int8", "int8_")):
            ratio = figures["fp32_eager_s"] / figures[f"{path}_s"]
            assert figures[f"{prefix}speedup"] == pytest.approx(ratio, rel=0.1)
        assert 0.9 <= figures["agreement_min"] <= 1.0 and figures["fp32_fused_agreement_min"] >= 0.999
    peers = records["peers"]["result"]["random"]
    assert {"fp32_eager", "ours_default", "ours_int8"} <= set(peers)
    assert peers["fp32_eager"]["agreement_min"] == 1.0  # the reference of every agreement figure
    for name, figures in peers.items():
        if isinstance(figures, dict) and "s" in figures:
            assert figures["vs_fp32_eager"] == pytest.approx(peers["fp32_eager"]["s"] / figures["s"], rel=0.1)
            assert 0.5 <= figures["agreement_min"] <= figures["agreement_mean"] <= 1.0
    errors = records["int8_error"]["result"]
    # the simulation rounds as the int8 kernels do: its "all" row is the real int8 path's figure, give or take
    # the stem (bf16 in the real path) and accumulation order
    for calibration in ("own calibration", "shipped photos"):
        simulated = errors[calibration]["not equalised"]["all (the int8 path, simulated)"]
        assert simulated == pytest.approx(errors["real paths"][f"int8, {calibration}"], abs=0.02)
        assert all(0.5 <= v <= 1.0 for rows in errors[calibration].values() for v in rows.values())
    crf = records["crf"]["result"]
    for key in ("classes_21_synthetic", "classes_182_synthetic"):  # peaked inputs: the restricted CRF runs
        assert crf[key]["paths"][0].startswith("restricted") and crf[key]["agreement_min"] >= 0.999
    video = records["video"]["result"]
    model, total = video["throughput"]["model_seconds"], video["throughput"]["seconds"]  # rounded to 10 ms
    assert 0 < model < total
    rounding = 0.005 / total * (1 + model / total) + 1e-4  # how far 1 - model/total can move by the rounding
    assert video["throughput"]["outside_model_share"] == pytest.approx(1 - model / total, abs=rounding)
    assert video["memory"]["long_frames"] == 10 * video["memory"]["short_frames"]
    serve = records["serve"]["result"]
    assert serve["load"]["failures"] == 0 and serve["load"]["requests"] == 40
    assert sorted(serve["load"]["rss_mib_after"]) == ["20", "40"]
    abuse = serve["abuse"]
    assert abuse["hostile_answer"] == "finished" or abuse["hostile_answer"].startswith("Stopped")
    assert abuse["hostile_seconds"] < abuse["time_limit_s"] + 30 and abuse["other_requests"] > 0


def test_aspp_voc_comparison_script_runs_both_heads_end_to_end(tmp_path):
    # the GPU/VOC script on the generated smoke data: the same steps (train, evaluate, compare) on a CPU
    sets = ["solver.iterations=4", "data.synthetic.n_train=8", "data.synthetic.n_val=2", "log.val_every=0",
            "log.progress=false", "log.tensorboard=false"]
    run = subprocess.run([sys.executable, "-m", "benchmarks.compare_aspp_voc", "--out", str(tmp_path),
                          "--config", "train/configs/smoke.yaml", "--iterations", "4",
                          *[a for s in sets for a in ("--set", s)]],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "comparison.json").read_text())
    assert sorted(result) == ["v2", "v3"]
    for aspp in ("v2", "v3"):
        scores = json.loads((tmp_path / aspp / "evaluation/scores.json").read_text())
        assert result[aspp]["mean_iou"] == scores["mean_iou"]
        assert yaml.safe_load((tmp_path / aspp / "config.yaml").read_text())["model"]["aspp"] == aspp
    assert result["v3"]["parameters"] > result["v2"]["parameters"]
    assert "| v3 |" in (tmp_path / "comparison.md").read_text()


@pytest.mark.parametrize("aspp", ["v2", "v3"])
def test_equalisation_keeps_the_function_and_evens_the_ranges(aspp):
    """bench_int8_error's channel equalisation (measured, not adopted) is exact in real arithmetic: the
    folded model's logits stay, the ranges it returns are the ones a fresh calibration measures, and every
    live channel of an equalised tensor spans the same range (one grid wastes no levels on narrow ones)."""
    folded = fold_batchnorm(tiny_model(21, seed=5, aspp=aspp).base)
    x = torch.from_numpy(scene_image(70, 90, seed=2)).permute(2, 0, 1)[None].float() - 110
    with torch.inference_mode():
        before = folded(x)
        measured = calibrate(folded, [x], (1.0,))
        spread = {k: float(hi.max() / hi[hi > 0].min())
                  for k, (_, hi) in measured.items() if k.endswith("reduce")}
        predicted = equalize(folded, measured)
        after = folded(x)
        remeasured = calibrate(folded, [x], (1.0,))
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))
    for key, (lo, hi) in remeasured.items():
        assert torch.allclose(predicted[key][1], hi, rtol=1e-4, atol=1e-6), key
        assert torch.allclose(predicted[key][0], lo, rtol=1e-4, atol=1e-6), key
    assert tensor_ranges(predicted).keys() == tensor_ranges(measured).keys()
    for key, before_spread in spread.items():
        hi = remeasured[key][1]
        assert before_spread > 1.5 and float(hi.max() / hi[hi > 0].min()) < 1.001, key

