"""segcore.evaluate and ``python -m segcore evaluate``: numbers checked against an independent count."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dataset_files import labelme_folder, labelme_json, random_label, rgb, save_palette_png, voc_folder
from factories import scene_image, tiny_checkpoint
from PIL import Image

import annotations as A
from segcore.cli import main
from segcore.datasets import SegmentationDataset, open_dataset
from segcore.evaluation import EvaluationError, evaluate

TEST_SIZE = 65


def _hand_scores(gt_list, pred_list, n):
    """Confusion matrix by np.bincount and the DeepLab formulas over present classes, from scratch."""
    m = np.zeros((n, n), np.int64)
    for gt, pred in zip(gt_list, pred_list):
        keep = gt != 255
        m += np.bincount(gt[keep].astype(int) * n + pred[keep].astype(int), minlength=n * n).reshape(n, n)
    tp, rows, cols = np.diag(m), m.sum(1), m.sum(0)
    present = rows > 0
    iou = tp[present] / (rows + cols - tp)[present]
    return m, {"pixel_accuracy": tp.sum() / m.sum(), "mean_accuracy": np.mean(tp[present] / rows[present]),
               "mean_iou": iou.mean(), "fw_iou": float((rows[present] / m.sum() * iou).sum())}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", n_classes=21)


@pytest.fixture(scope="module")
def segmenter(ckpt):
    from segcore import Segmenter

    return Segmenter.from_pretrained(str(ckpt), scales=(), test_size=TEST_SIZE, device="cpu")


def _run_cli(args):
    return main(["evaluate", *map(str, args), "--no-progress"])


def test_labelme_end_to_end_and_torchrun_give_the_same_report(tmp_path, ckpt, segmenter, capsys):
    data = labelme_folder(tmp_path / "lm", count=5)
    (data / "broken.json").write_text("{not json")
    out = tmp_path / "out"
    code = _run_cli(["--weights", ckpt, "--data", data, "--test-size", TEST_SIZE, "--scales",
                     "--device", "cpu", "--out", out])
    printed = capsys.readouterr().out
    assert code == 1  # one file failed
    assert "Mean IoU:" in printed and "person:" in printed and "5 of 6 images evaluated, 1 failed" in printed
    assert str(out) in printed

    # independent: annotations' conversion + the Segmenter + a numpy confusion matrix
    gts, preds = [], []
    for k in range(5):
        conv = A.convert_file(data / f"img{k}.json", "voc")
        gts.append(conv.class_map)
        preds.append(segmenter.predict(conv.image).label_map)
    matrix, expect = _hand_scores(gts, preds, 21)

    doc = json.loads((out / "scores.json").read_text())
    for key, value in expect.items():
        assert doc[key] == pytest.approx(value, abs=1e-12), key
    assert doc["confusion_matrix"] == matrix.tolist()
    assert doc["class_names"][15] == "person" and doc["class_names"][12] == "dog"
    assert doc["checkpoint"] == {"file": "tiny.pth", "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest()}
    assert doc["options"]["model"]["test_size"] == TEST_SIZE and doc["options"]["format"] == "labelme"
    assert doc["summary"] == {"images": 6, "evaluated": 5, "failed": 1, "warnings": 0}
    assert len(doc["failures"]) == 1 and doc["failures"][0]["file"].endswith("broken.json")
    assert "not valid JSON" in doc["failures"][0]["reason"]

    with open(out / "per_class.csv") as f:
        per_class = list(csv.DictReader(f))
    assert [r["class_name"] for r in per_class] == list(A.VOC.class_names)
    assert int(per_class[15]["gt_pixels"]) == int(matrix[15].sum()) > 0
    with open(out / "per_image.csv") as f:
        per_image = {r["image"]: r for r in csv.DictReader(f)}
    assert set(per_image) == {f"img{k}" for k in range(5)}
    _, img3 = _hand_scores([gts[3]], [preds[3]], 21)
    assert float(per_image["img3"]["mean_iou"]) == pytest.approx(img3["mean_iou"], abs=1e-12)
    assert int(per_image["img3"]["valid_pixels"]) == int((gts[3] != 255).sum())
    html = (out / "report.html").read_text()
    assert "broken.json" in html and "not valid JSON" in html
    assert "person" in html and "plotly" in html.lower()
    assert "broken.json" in (out / "failures.csv").read_text()
    worst = sorted(doc["worst_images"], key=lambda w: w["mean_iou"])
    assert worst == doc["worst_images"] and len(worst) == 5 and (out / worst[0]["thumbnail"]).is_file()

    # the same run on two CPU processes (gloo): identical numbers, rows and failures
    out2 = tmp_path / "out2"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "segcore", "evaluate",
                           "--weights", str(ckpt), "--data", str(data),
                           "--test-size", str(TEST_SIZE), "--scales", "--device", "cpu", "--out", str(out2),
                           "--no-progress"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0 and proc.stdout.count("Mean IoU:") == 1, proc.stdout + proc.stderr
    doc2 = json.loads((out2 / "scores.json").read_text())
    assert doc2["options"].pop("processes") == 2
    for d in (doc, doc2):
        d.pop("date")
        for w in d["worst_images"]:
            w.pop("thumbnail")
    doc2["options"]["data"] = doc["options"]["data"] = None
    doc2["options"]["dataset"]["root"] = doc["options"]["dataset"]["root"]
    assert doc2 == doc
    assert (out2 / "per_image.csv").read_text() == (out / "per_image.csv").read_text()
    assert (out2 / "per_class.csv").read_text() == (out / "per_class.csv").read_text()


def test_bad_files_are_recorded_and_the_run_goes_on(tmp_path, segmenter):
    labels = voc_folder(tmp_path, ["good", "nomask", "small", "outofrange", "good2"])
    (tmp_path / "SegmentationClass" / "nomask.png").unlink()
    save_palette_png(tmp_path / "SegmentationClass" / "small.png", np.zeros((5, 7), np.uint8))
    bad = labels["outofrange"].copy()
    bad[3, 4] = 30
    save_palette_png(tmp_path / "SegmentationClass" / "outofrange.png", bad)
    ds = open_dataset(tmp_path)
    result = evaluate(segmenter, ds, protocol="resize", out_dir=tmp_path / "out", progress=False)
    assert result.exit_code == 1 and [r["image"] for r in result.per_image] == ["good", "good2"]
    reasons = {f["image"]: f["reason"] for f in result.failures}
    assert set(reasons) == {"nomask", "small", "outofrange"}
    assert "nomask.jpg: image without a ground-truth mask" in reasons["nomask"]
    assert "small.png: mask is 7x5 pixels" in reasons["small"]
    assert "outofrange.jpg: label values 30 are outside [0, 21)" in reasons["outofrange"]
    gts = [labels["good"], labels["good2"]]
    preds = [segmenter.predict(tmp_path / "JPEGImages" / f"{n}.jpg").label_map for n in ("good", "good2")]
    _, expect = _hand_scores(gts, preds, 21)
    assert result.scores["mean_iou"] == pytest.approx(expect["mean_iou"], abs=1e-12)
    doc = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert {f["image"] for f in doc["failures"]} == set(reasons)
    assert result.worst[0]["thumbnail"].dtype == np.uint8 and result.worst[0]["path"].is_file()


def test_masks_mode_cli(tmp_path, capsys):
    rng = np.random.default_rng(0)
    gts, preds = [], []
    for k in range(3):
        gt = random_label(12, 16, 21, seed=k)
        pred = np.where(rng.random(gt.shape) < 0.7, np.where(gt == 255, 0, gt), rng.integers(0, 21, gt.shape))
        save_palette_png(tmp_path / "gt" / f"m{k}.png", gt)
        save_palette_png(tmp_path / "pred" / f"m{k}.png", pred.astype(np.uint8))
        gts.append(gt)
        preds.append(pred)
    save_palette_png(tmp_path / "gt" / "wrong.png", np.full((12, 16), 40, np.uint8))
    save_palette_png(tmp_path / "pred" / "wrong.png", np.zeros((12, 16), np.uint8))
    code = _run_cli(["--format", "masks", "--pred", tmp_path / "pred", "--data", tmp_path / "gt",
                     "--labels", "voc", "--out", tmp_path / "out"])
    assert code == 1
    matrix, expect = _hand_scores(gts, preds, 21)
    doc = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert doc["mean_iou"] == pytest.approx(expect["mean_iou"], abs=1e-12)
    assert doc["confusion_matrix"] == matrix.tolist() and doc["checkpoint"] is None
    assert "wrong.png: label values 40 are outside [0, 21)" in doc["failures"][0]["reason"]
    assert "Frequency Weighted IoU:" in capsys.readouterr().out


def test_empty_and_unusable_inputs_are_clear_errors(tmp_path, ckpt, segmenter, capsys):
    with pytest.raises(EvaluationError, match="has no images to evaluate"):
        evaluate(segmenter, SegmentationDataset("x", tmp_path, [], A.VOC.class_names), progress=False)
    (tmp_path / "empty").mkdir()
    assert _run_cli(["--weights", ckpt, "--data", tmp_path / "empty", "--test-size", TEST_SIZE]) == 2
    assert "empty: the folder is empty" in capsys.readouterr().err
    assert _run_cli(["--format", "masks", "--data", tmp_path / "empty", "--labels", "voc"]) == 2
    assert "needs --pred DIR" in capsys.readouterr().err
    # 182-class COCO-Stuff data against a 21-class model
    (tmp_path / "c" / "images" / "val2017").mkdir(parents=True)
    (tmp_path / "c" / "annotations" / "val2017").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(tmp_path / "c" / "images" / "val2017" / "1.jpg")
    from segcore.pred_map import PredictionMapError

    with pytest.raises(PredictionMapError, match=r"model's label space \(voc\) differs from the evaluation's "
                                                 r"\(cocostuff\) and there is no built-in mapping"):
        evaluate(segmenter, open_dataset(tmp_path / "c"), progress=False)


def test_labelme_mapping_file_and_unknown_labels(tmp_path, ckpt, capsys):
    labelme_json(tmp_path / "lm", "a", rgb(24, 24), [("human", "rectangle", [(2, 2), (14, 14)])])
    assert _run_cli(["--weights", ckpt, "--data", tmp_path / "lm", "--test-size", TEST_SIZE, "--scales",
                     "--device", "cpu", "--out", tmp_path / "o1"]) == 2  # nothing scored: a message, no report
    assert "'human' in " in capsys.readouterr().err and not (tmp_path / "o1").exists()
    (tmp_path / "map.json").write_text(json.dumps({"human": "person"}))
    assert _run_cli(["--weights", ckpt, "--data", tmp_path / "lm", "--map", tmp_path / "map.json", "--scales",
                     "--test-size", TEST_SIZE, "--device", "cpu", "--out", tmp_path / "o2"]) == 0
    doc = json.loads((tmp_path / "o2" / "scores.json").read_text())
    assert doc["gt_pixels"][15] == 13 * 13 and doc["failures"] == []  # labelme fills corners inclusively
    capsys.readouterr()


@pytest.mark.gpu
def test_cuda_evaluation_matches_a_direct_count(tmp_path, ckpt):
    from segcore import Segmenter

    seg = Segmenter.from_pretrained(str(ckpt), scales=(), test_size=TEST_SIZE, device="cuda",
                                    precision="fp32")
    labels = voc_folder(tmp_path, ["a", "b"])
    result = evaluate(seg, open_dataset(tmp_path), protocol="resize", progress=False)
    preds = [seg.predict(tmp_path / "JPEGImages" / f"{n}.jpg").label_map for n in ("a", "b")]
    matrix, _ = _hand_scores([labels["a"], labels["b"]], preds, 21)
    assert result.scores["confusion_matrix"] == matrix.tolist() and result.ok


def test_conversion_warnings_are_kept_and_reported(tmp_path, segmenter):
    data = labelme_folder(tmp_path / "lm", count=2)
    # shape 1 is a two-point polygon: labelme draws nothing for it, so the file converts with a warning
    labelme_json(data, "thin", scene_image(40, 56, seed=3),
                 [("dog", "polygon", [(5, 5), (30, 8), (10, 30)]), ("cat", "polygon", [(1, 1), (20, 20)])])
    result = evaluate(segmenter, open_dataset(data, "labelme", label_space="voc"), out_dir=tmp_path / "out",
                      progress=False)
    assert result.ok and len(result.per_image) == 3
    assert len(result.warnings) == 1
    warning = result.warnings[0]
    assert warning["file"].endswith("thin.json") and warning["shape"] == 1 and "point" in warning["reason"]
    assert "1 conversion warning" in result.summary()
    saved = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert saved["warnings"] == [warning] and saved["summary"]["warnings"] == 1
