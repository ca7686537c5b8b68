"""The benchmark suite runs end to end (``--quick``, as CI does) and writes what the README table needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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
