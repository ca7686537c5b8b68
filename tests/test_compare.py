"""Comparing models on the same annotations: prediction-side mapping, bootstrap intervals, compare CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from dataset_files import make_voc
from factories import tiny_checkpoint
from reference_test_loop import scores as reference_scores
from segcore_cli import run_cli

SMALL = ((60, 80), (80, 60), (50, 70), (64, 48), (72, 72), (40, 90))


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc") / "VOC", SMALL)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpts")
    return {"a": tiny_checkpoint(base / "a.pth", 21, seed=1), "b": tiny_checkpoint(base / "b.pth", 21, seed=2),
            "coco": tiny_checkpoint(base / "coco.pth", 182, seed=3)}


def test_compare_scores_equal_separate_evaluate_runs(tmp_path, voc, ckpts, capsys):
    common = ["--data", voc, "--no-progress", "--precision", "fp32", "--worst", "0"]
    assert run_cli(["compare", "--weights", ckpts["a"], ckpts["b"], "--out", tmp_path / "cmp", *common]) == 0
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "cmp/comparison.json").read_text())
    assert [m["weights"] for m in doc["models"]] == [str(ckpts["a"]), str(ckpts["b"])]
    for key, model in zip("ab", doc["models"]):
        assert run_cli(["evaluate", "--weights", ckpts[key], "--out", tmp_path / key, *common]) == 0
        single = json.loads((tmp_path / key / "scores.json").read_text())
        for score in ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou", "class_iou"):
            assert model["scores"][score] == single[score], score
        assert model["scores"]["bootstrap"] == single["bootstrap"]
        assert model["scores"]["class_iou_by_name"]["background"] == single["class_iou"][0]
    (diff,) = doc["differences"]
    a, b = (m["scores"] for m in doc["models"])
    assert diff["mean_iou"] == pytest.approx(b["mean_iou"] - a["mean_iou"], abs=1e-15)
    assert diff["ci95"][0] <= diff["mean_iou"] <= diff["ci95"][1] and diff["ci95"][0] < diff["ci95"][1]
    with open(tmp_path / "cmp/per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(SMALL) and list(rows[0]) == ["image", f"mean_iou {ckpts['a']}", f"mean_iou {ckpts['b']}"]
    page = (tmp_path / "cmp/comparison.html").read_text()
    assert "Per-class IoU (%) by model" in page and "Per-image mIoU" in page and "data:image/png;base64," in page
    assert "model" in out and "mIoU" in out and "paired bootstrap over 6 images" in out


def test_identical_models_differ_by_exactly_zero(tmp_path, voc, ckpts):
    args = ["compare", "--weights", ckpts["a"], ckpts["a"], "--data", voc, "--out", tmp_path, "--no-progress"]
    assert run_cli(args) == 0
    (diff,) = json.loads((tmp_path / "comparison.json").read_text())["differences"]
    assert diff["mean_iou"] == 0 and diff["ci95"] == [0, 0]


def _random_matrices(n_images: int, n_classes: int, seed: int, skill: float):
    from segcore.bootstrap import ImageMatrices, sparse_matrix

    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(n_images):
        hist = np.zeros((n_classes, n_classes), np.int64)
        for c in rng.choice(n_classes, size=3, replace=False):
            total = int(rng.integers(50, 500))
            right = int(total * min(1.0, max(0.0, rng.normal(skill, 0.2))))
            hist[c, c] += right
            hist[c, rng.integers(n_classes)] += total - right
        cells.append(sparse_matrix(hist))
    return ImageMatrices(n_classes, cells)


def test_bootstrap_is_seeded_contains_the_observed_difference_and_narrows_with_more_images():
    from segcore.bootstrap import bootstrap, paired_bootstrap
    from segcore.metrics import compute_scores

    def observed(m):
        dense = np.zeros(m.n_classes ** 2, np.int64)
        for idx, counts in m.cells:
            dense[idx] += counts
        return compute_scores(dense.reshape(m.n_classes, m.n_classes))["mean_iou"]

    widths = []
    for n_images in (15, 240):
        a, b = _random_matrices(n_images, 8, 0, 0.6), _random_matrices(n_images, 8, 1, 0.7)
        first, again = paired_bootstrap(a, b, seed=7), paired_bootstrap(a, b, seed=7)
        assert first == again and first != paired_bootstrap(a, b, seed=8)
        low, high = first["ci95"]["mean_iou"]
        assert low <= observed(b) - observed(a) <= high
        single = bootstrap(a)["ci95"]["mean_iou"]
        assert single[0] <= observed(a) <= single[1]
        widths.append(high - low)
    assert widths[1] < widths[0] / 2


def test_cocostuff_model_on_voc_labelme_through_the_builtin_mapping(tmp_path, ckpts):
    import annotations
    from labelme_fixtures import generate_folder

    import segcore

    generate_folder(tmp_path / "lm", 3, seed=4, size=(72, 56), n_shapes=5)
    args = ["evaluate", "--weights", ckpts["coco"], "--labels", "voc", "--data", tmp_path / "lm",
            "--out", tmp_path / "out", "--no-progress", "--unknown", "ignore"]
    assert run_cli(args) == 0  # shapes reaching outside the images are warnings, not failures
    doc = json.loads((tmp_path / "out/scores.json").read_text())
    assert doc["options"]["pred_map"] == "cocostuff->voc" and len(doc["class_names"]) == 21
    assert doc["failures"] == [] and doc["summary"]["evaluated"] == 3

    # independent: predictions of the 182-class model mapped by a table written here, reference scores()
    table_names = {"airplane": "aeroplane", "bicycle": "bicycle", "bird": "bird", "boat": "boat",
                   "bottle": "bottle", "bus": "bus", "car": "car", "cat": "cat", "chair": "chair", "cow": "cow",
                   "dining table": "diningtable", "dog": "dog", "horse": "horse", "motorcycle": "motorbike",
                   "person": "person", "potted plant": "pottedplant", "sheep": "sheep", "couch": "sofa",
                   "train": "train", "tv": "tvmonitor"}
    coco = annotations.get_label_space("cocostuff").class_names
    voc = annotations.get_label_space("voc").class_names
    table = np.array([voc.index(table_names[c]) if c in table_names else 0 for c in coco])
    seg = segcore.Segmenter.from_pretrained(str(ckpts["coco"]))
    dataset = segcore.open_dataset(tmp_path / "lm", "labelme", label_space="voc", unknown="ignore")
    gts, preds = [], []
    for sample in dataset:
        raw = seg.predict(sample.image).label_map
        preds.append(table[raw])
        gts.append(sample.label.astype(np.int64))
    assert any(np.isin(p, np.arange(1, 21)).any() for p in preds)  # some object classes come through
    expected = reference_scores(gts, preds, 21)
    assert doc["mean_iou"] == pytest.approx(expected["Mean IoU"], abs=1e-12)
    assert doc["pixel_accuracy"] == pytest.approx(expected["Pixel Accuracy"], abs=1e-12)


def test_unmappable_classes_different_spaces_and_empty_data_are_clear_errors(tmp_path, voc, ckpts, capsys):
    five = tiny_checkpoint(tmp_path / "five.pth", 5, seed=0)
    base = ["--data", voc, "--out", tmp_path / "o", "--no-progress", "--labels", "voc"]
    assert run_cli(["compare", "--weights", ckpts["a"], five, *base]) == 2
    err = capsys.readouterr().err
    assert "label space (5 classes) differs from the evaluation's (voc)" in err and "--pred-map" in err
    partial = tmp_path / "partial.yaml"
    partial.write_text("class_0: background\nclass_1: person\n")
    assert run_cli(["evaluate", "--weights", five, "--pred-map", partial, *base]) == 2
    err = capsys.readouterr().err
    assert "'class_2', 'class_3', 'class_4' map to no class" in err
    (tmp_path / "empty").mkdir()
    assert run_cli(["compare", "--weights", ckpts["a"], ckpts["b"], "--data", tmp_path / "empty", "--out",
                    tmp_path / "o2", "--no-progress"]) == 2
    assert "the folder is empty" in capsys.readouterr().err


def test_torchrun_compare_gives_the_same_comparison(tmp_path, voc, ckpts):
    import os
    import subprocess
    import sys
    from pathlib import Path

    args = ["compare", "--weights", str(ckpts["a"]), str(ckpts["b"]), "--data", str(voc), "--no-progress"]
    assert run_cli([*args, "--out", tmp_path / "one"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "segcore", *args, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one = json.loads((tmp_path / "one/comparison.json").read_text())
    two = json.loads((tmp_path / "two/comparison.json").read_text())
    for model in two["models"]:
        assert model["options"].pop("processes") == 2
    assert one == two
    assert (tmp_path / "one/per_image.csv").read_text() == (tmp_path / "two/per_image.csv").read_text()


def test_grouped_bars_show_each_model_and_mark_absent_classes(tmp_path, voc, ckpts):
    from segcore import Segmenter, open_dataset
    from segcore.comparison import compare, comparison_figures

    segs = [Segmenter.from_pretrained(ckpts[k], scales=(), device="cpu", precision="fp32") for k in "ab"]
    result = compare(segs, open_dataset(voc, "voc"), labels=["a", "b"], progress=False)
    bars, _ = comparison_figures(result)
    names = list(result.results[0].class_names)
    gt_classes = {names[i] for i in range(len(names)) if any(r.scores["present"][i] for r in result.results)}
    model_traces = [t for t in bars.data if t.type == "bar"]
    assert [t.name for t in model_traces] == ["a", "b"] and all(set(t.x) == gt_classes for t in model_traces)
    for trace, r in zip(model_traces, result.results):  # the bars are each model's own IoU, in percent
        iou = dict(zip(trace.x, trace.y))
        assert all(iou[n] == pytest.approx(100 * r.scores["class_iou"][names.index(n)]) for n in gt_classes)
    (absent,) = [t for t in bars.data if t.type == "scatter"]
    assert set(absent.x) == set(names) - gt_classes and set(absent.text) == {"absent"}
    assert 0 < len(absent.x) < len(names)  # the generated set leaves some VOC classes out
