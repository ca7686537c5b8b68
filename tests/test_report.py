"""Tests for segcore.report: figures, console table and report files."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re

import numpy as np
import plotly.offline
import pytest

from segcore.report import (
    class_iou_figure,
    confusion_figure,
    format_score_table,
    sha256_file,
    write_report,
)


def _scores(matrix):
    """A scores dict built by hand from a matrix (rows = gt), independent of segcore.metrics."""
    m = np.asarray(matrix, dtype=np.int64)
    n = m.shape[0]
    rows, cols, tp = m.sum(1), m.sum(0), np.diag(m)
    present = rows > 0
    nan = float("nan")
    iou = [tp[i] / (rows[i] + cols[i] - tp[i]) if present[i] else nan for i in range(n)]
    acc = [tp[i] / rows[i] if present[i] else nan for i in range(n)]
    prec = [tp[i] / cols[i] if present[i] and cols[i] else nan for i in range(n)]
    dice = [2 * tp[i] / (rows[i] + cols[i]) if present[i] else nan for i in range(n)]
    total = m.sum()
    pi = [i for i in range(n) if present[i]]
    return {
        "pixel_accuracy": tp.sum() / total,
        "mean_accuracy": sum(acc[i] for i in pi) / len(pi),
        "mean_iou": sum(iou[i] for i in pi) / len(pi),
        "fw_iou": sum(rows[i] / total * iou[i] for i in pi),
        "class_iou": [float(v) for v in iou],
        "class_accuracy": [float(v) for v in acc],
        "class_precision": [float(v) for v in prec],
        "class_dice": [float(v) for v in dice],
        "gt_pixels": rows.tolist(),
        "pred_pixels": cols.tolist(),
        "present": present.tolist(),
        "confusion_matrix": m.tolist(),
        "n_classes": n,
    }


# class 0 IoU 8/12, class 1 IoU 6/10, class 2 absent everywhere, class 3 only predicted,
# class 4 IoU 5/7.
MATRIX = [
    [8, 2, 0, 2, 0],
    [0, 6, 0, 0, 2],
    [0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0],
    [0, 0, 0, 0, 5],
]
NAMES = ["background", "person", "cat", "dog", "car"]
PALETTE = np.array([[0, 0, 0], [192, 128, 128], [64, 0, 128], [64, 128, 0], [128, 128, 128]], np.uint8)


@pytest.fixture
def scores():
    return _scores(MATRIX)


def test_class_iou_figure_order_colours_and_absent(scores):
    fig = class_iou_figure(scores, NAMES, PALETTE)
    bars, absent = fig.data[0], fig.data[1]
    # IoU: car 5/7, background 8/12, person 6/10 -> best first
    assert list(bars.y) == ["car", "background", "person"]
    assert list(bars.x) == pytest.approx([100 * 5 / 7, 100 * 8 / 12, 100 * 6 / 10])
    assert list(bars.marker.color) == ["rgb(128,128,128)", "rgb(0,0,0)", "rgb(192,128,128)"]
    assert set(absent.y) == {"cat", "dog"} and "cat" not in bars.y and "dog" not in bars.y
    assert set(absent.text) == {"absent"}
    # hover carries accuracy, gt and predicted pixels: car acc 100%, 5 gt px, 7 predicted
    car = list(bars.customdata[0])
    assert car[:3] == pytest.approx([100.0, 5, 7])
    assert "ground-truth pixels" in bars.hovertemplate and "predicted pixels" in bars.hovertemplate
    # bars on top, absent rows listed below them; best at the top
    assert list(fig.layout.yaxis.categoryarray)[:3] == ["car", "background", "person"]
    assert fig.layout.yaxis.autorange == "reversed"


def test_class_iou_figure_grows_with_many_classes():
    n = 182
    rng = np.random.default_rng(0)
    m = np.diag(rng.integers(1, 50, n))
    m[:, 0] += 3
    m[170:, :] = 0  # 12 absent classes
    s = _scores(m)
    names = [f"c{i}" for i in range(n)]
    pal = rng.integers(0, 256, (n, 3)).astype(np.uint8)
    fig = class_iou_figure(s, names, pal)
    assert len(fig.data[0].y) == 170 and len(fig.data[1].y) == 12
    assert fig.layout.height >= 182 * 15
    small = class_iou_figure(_scores(MATRIX), NAMES, PALETTE)
    assert small.layout.height < fig.layout.height
    heat = confusion_figure(s, names).data[0]
    assert not heat.texttemplate  # no per-cell text at this size
    assert len(heat.x) == 170


def test_confusion_figure_restricts_and_normalises_rows(scores):
    fig = confusion_figure(scores, NAMES)
    heat = fig.data[0]
    # "cat" (class 2) occurs nowhere; "dog" (3) only as a prediction
    assert list(heat.x) == ["background", "person", "dog", "car"]
    assert list(heat.y) == ["background", "person", "dog", "car"]
    z = np.array(heat.z, dtype=float)
    for label, row in zip(heat.y, z):
        if label == "dog":
            assert np.isnan(row).all()
        else:
            assert np.nansum(row) == pytest.approx(1.0)
    assert z[0].tolist() == pytest.approx([8 / 12, 2 / 12, 2 / 12, 0.0])
    assert np.array(heat.customdata).tolist()[1] == [0, 6, 0, 2]
    assert heat.texttemplate  # small matrices get cell text


def test_duplicate_class_names_stay_separate_rows():
    names = ["thing", "thing", "sky", "x", "y"]
    fig = class_iou_figure(_scores(MATRIX), names, PALETTE)
    assert len(set(fig.data[0].y)) == 3


def test_palette_and_names_are_checked(scores):
    with pytest.raises(ValueError, match="class names"):
        class_iou_figure(scores, NAMES[:3], PALETTE)
    with pytest.raises(ValueError, match="palette"):
        class_iou_figure(scores, NAMES, PALETTE[:2])


def test_format_score_table(scores):
    text = format_score_table({**scores, "pixel_accuracy": 0.94641, "mean_accuracy": 0.865,
                               "mean_iou": 0.76654, "fw_iou": 0.90409})
    assert text.splitlines() == [
        "Pixel Accuracy:         94.64",
        "Mean Accuracy:          86.50",
        "Mean IoU:               76.65",
        "Frequency Weighted IoU: 90.41",
    ]
    with_classes = format_score_table(scores, NAMES).splitlines()
    assert with_classes[4] == "Class IoU:"
    assert re.fullmatch(r"\s+car:\s+71\.43", with_classes[9])
    assert with_classes[7].split() == ["cat:", "absent"]
    empty = format_score_table({**scores, "mean_iou": float("nan")})
    assert "Mean IoU:               n/a" in empty


def test_sha256_file_matches_hashlib(tmp_path):
    p = tmp_path / "weights.pth"
    data = np.random.default_rng(1).bytes(3 * (1 << 20) + 17)  # spans several chunks
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    assert sha256_file(p, chunk_size=1000) == hashlib.sha256(data).hexdigest()


def test_write_report_files(tmp_path, scores):
    ck = tmp_path / "deeplabv2_voc.pth"
    ck.write_bytes(b"\x00checkpoint bytes" * 5000)
    per_image = [
        {"image": "a.png", "pixel_accuracy": 0.9, "mean_iou": 0.8},
        {"image": "b.png", "pixel_accuracy": 0.5, "mean_iou": 0.3},
        {"image": "empty.png", "pixel_accuracy": float("nan"), "mean_iou": float("nan")},
        {"image": "c.png", "pixel_accuracy": 0.7, "mean_iou": 0.55},
    ]
    options = {"crf": False, "scales": [0.75, 1.0], "ignore_index": 255}
    paths = write_report(
        tmp_path / "out", scores, NAMES, PALETTE, options=options, checkpoint=ck, per_image=per_image
    )
    assert set(paths) == {"scores_json", "per_class_csv", "per_image_csv", "report_html"}
    for p in paths.values():
        assert p.is_file() and p.parent == tmp_path / "out"

    # scores.json: same keys as compute() plus four, NaN as null, real checksum
    text = paths["scores_json"].read_text()
    assert "NaN" not in text
    doc = json.loads(text)
    assert set(doc) == set(scores) | {"class_names", "options", "checkpoint", "date"}
    assert doc["class_iou"][2] is None and doc["class_iou"][3] is None
    assert doc["class_iou"][4] == pytest.approx(5 / 7)
    assert doc["class_names"] == NAMES
    assert doc["options"] == options
    assert doc["confusion_matrix"] == MATRIX
    assert doc["checkpoint"] == {
        "file": "deeplabv2_voc.pth",
        "sha256": hashlib.sha256(ck.read_bytes()).hexdigest(),
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", doc["date"])

    # per_class.csv
    with open(paths["per_class_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["class_name"] for r in rows] == NAMES
    assert [r["class_id"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert float(rows[0]["iou"]) == pytest.approx(8 / 12)
    assert rows[3]["iou"] == "" and rows[3]["present"] == "0" and rows[3]["pred_pixels"] == "2"
    assert rows[4]["gt_pixels"] == "5"

    # per_image.csv: worst mean IoU first, unscored images last
    with open(paths["per_image_csv"], newline="") as f:
        imgs = list(csv.DictReader(f))
    assert [r["image"] for r in imgs] == ["b.png", "c.png", "a.png", "empty.png"]
    assert imgs[-1]["mean_iou"] == ""

    # report.html: one self-contained page, plotly.js inline exactly once
    page = paths["report_html"].read_text()
    assert not re.search(r"<script[^>]+src=[\"']?https?:", page)
    assert '<script src="http' not in page
    js = plotly.offline.get_plotlyjs()
    assert js[:2000] in page
    assert page.count(js[:2000]) == 1
    assert page.count("Plotly.newPlot") == 2
    for label, value in [
        ("Pixel Accuracy", 100 * 19 / 25),
        ("Mean Accuracy", 100 * (8 / 12 + 6 / 8 + 1) / 3),
        ("Mean IoU", 100 * (8 / 12 + 6 / 10 + 5 / 7) / 3),
    ]:
        assert f"<tr><th>{label}</th><td>{value:.2f}</td></tr>" in page
    assert "Frequency Weighted IoU" in page
    assert "deeplabv2_voc.pth" in page


def test_write_report_without_checkpoint_or_images(tmp_path, scores):
    paths = write_report(tmp_path, scores, NAMES, PALETTE, options={}, checkpoint=None, per_image=[])
    doc = json.loads(paths["scores_json"].read_text())
    assert doc["checkpoint"] is None
    with open(paths["per_image_csv"], newline="") as f:
        assert list(csv.reader(f))[0][:1] == ["image"]
    with pytest.raises(ValueError, match="not found"):
        write_report(
            tmp_path, scores, NAMES, PALETTE, options={}, checkpoint=tmp_path / "nope.pth", per_image=[]
        )


def test_report_accepts_metrics_output(tmp_path):
    from segcore.metrics import ConfusionMatrix

    cm = ConfusionMatrix(5)
    gt = np.array([0, 0, 1, 4, 255])
    pred = np.array([0, 3, 1, 4, 2])
    cm.update(gt, pred)
    s = cm.compute()
    paths = write_report(tmp_path, s, NAMES, PALETTE, options={}, checkpoint=None, per_image=[])
    doc = json.loads(paths["scores_json"].read_text())
    assert doc["class_iou"][3] is None and doc["mean_iou"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert math.isfinite(doc["fw_iou"])
