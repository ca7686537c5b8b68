"""The reference evaluation protocol against an independent transcription of deeplab-pytorch's test
loop (tests/reference_test_loop.py) on generated VOC, COCO-Stuff 10k and 164k layouts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dataset_files import SIZES, make_cocostuff10k, make_cocostuff164k, make_voc
from factories import TINY_BLOCKS, TINY_CH, randomize_, tiny_cfg, tiny_checkpoint
from reference_deeplab import reference_model
from reference_test_loop import cocostuff10k_items, cocostuff164k_items, run_test_loop, voc_items
from segcore_cli import run_cli

KEYS = {"pixel_accuracy": "Pixel Accuracy", "mean_accuracy": "Mean Accuracy", "mean_iou": "Mean IoU",
        "fw_iou": "Frequency Weighted IoU"}


LAYOUTS = {"voc": (make_voc, lambda r: voc_items(str(r), "val"), 21),
           "cocostuff10k": (make_cocostuff10k, lambda r: cocostuff10k_items(str(r), "test"), 182),
           "cocostuff164k": (make_cocostuff164k, lambda r: cocostuff164k_items(str(r), "val2017"), 182)}


CRF_SIZES = {"voc": SIZES, "cocostuff10k": SIZES[3:], "cocostuff164k": ((120, 160),)}
"""The CRF runs twice per image (ours and the reference's), 182 classes slowly: fewer pixels there."""


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    return {fmt: make(base / fmt) for fmt, (make, _, _) in LAYOUTS.items()}


@pytest.fixture(scope="module")
def crf_datasets(tmp_path_factory, datasets):
    base = tmp_path_factory.mktemp("crf_layouts")
    return {fmt: datasets[fmt] if CRF_SIZES[fmt] == SIZES else make(base / fmt, CRF_SIZES[fmt])
            for fmt, (make, _, _) in LAYOUTS.items()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpt")
    return {n: tiny_checkpoint(base / f"tiny{n}.pth", n_classes=n, seed=n) for n in (21, 182)}


def reference_scores(ckpt, fmt, root, crf, *, tiny=True):
    _, items, n = LAYOUTS[fmt]
    ref = reference_model(n, TINY_BLOCKS, ch=TINY_CH) if tiny else reference_model(n)
    ref.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    return run_test_loop(ref, items(root), n, crf=crf)


@pytest.mark.parametrize("crf", [False, True], ids=["plain", "crf"])
@pytest.mark.parametrize("fmt", list(LAYOUTS))
def test_reference_protocol_matches_the_reference_test_loop(tmp_path, datasets, crf_datasets, checkpoints, fmt, crf,
                                                           capsys):
    n = LAYOUTS[fmt][2]
    root = (crf_datasets if crf else datasets)[fmt]
    args = ["evaluate", "--weights", checkpoints[n], "--data", root, "--out", tmp_path / "out",
            "--precision", "fp32", "--no-progress", "--worst", "0"]
    assert run_cli(args + (["--crf"] if crf else [])) == 0
    doc = json.loads((tmp_path / "out/scores.json").read_text())
    expected = reference_scores(checkpoints[n], fmt, root, crf)
    for key, ref_key in KEYS.items():
        assert doc[key] == pytest.approx(expected[ref_key], abs=1e-4), key
    # pixel level: the same labelled pixels per class (the 10k warp included), almost every prediction equal
    hist = np.asarray(doc["confusion_matrix"])
    assert hist.sum(1).tolist() == expected["hist"].sum(1).astype(int).tolist()
    assert np.abs(hist - expected["hist"]).sum() <= 1e-4 * hist.sum()
    protocol = doc["options"]["protocol"]
    assert protocol["name"] == "reference" and protocol["precision"] == "fp32" and protocol["crf"] is crf
    assert protocol["scales"] == [1.0, 0.5, 0.75] and protocol["test_size"] is None
    assert protocol["image_size"] == ("warped to 513x513" if fmt == "cocostuff10k" else "native")
    assert "protocol reference" in capsys.readouterr().out


def test_the_old_resize_path_differs_from_the_reference_and_is_recorded(tmp_path, datasets, checkpoints):
    """The check above can fail: the resize protocol (long side 321) scores differently."""
    args = ["evaluate", "--weights", checkpoints[182], "--data", datasets["cocostuff10k"], "--out", tmp_path,
            "--no-progress", "--protocol", "resize", "--test-size", "321", "--worst", "0"]
    assert run_cli(args) == 0
    doc = json.loads((tmp_path / "scores.json").read_text())
    expected = reference_scores(checkpoints[182], "cocostuff10k", datasets["cocostuff10k"], False)
    assert abs(doc["mean_iou"] - expected["Mean IoU"]) > 1e-4
    protocol = doc["options"]["protocol"]
    assert protocol["name"] == "resize" and protocol["test_size"] == 321
    assert protocol["precision"] != "fp32"  # the resize protocol keeps the fast default
    assert "Protocol: <b>resize</b>" in (tmp_path / "report.html").read_text()


def test_full_size_model_matches_the_reference_loop(tmp_path):
    from segcore import build_model

    ckpt = tmp_path / "full.pth"
    torch.save(randomize_(build_model(21), seed=5).state_dict(), ckpt)
    root = make_voc(tmp_path / "voc", ((181, 241),))  # one small image keeps ResNet-101 on the CPU quick
    args = ["evaluate", "--weights", ckpt, "--data", root, "--out", tmp_path / "out", "--no-progress",
            "--worst", "0"]
    assert run_cli(args) == 0  # reference protocol and fp32 by default for the voc format
    doc = json.loads((tmp_path / "out/scores.json").read_text())
    assert doc["options"]["protocol"]["precision"] == "fp32"
    expected = reference_scores(ckpt, "voc", root, False, tiny=False)
    for key, ref_key in KEYS.items():
        assert doc[key] == pytest.approx(expected[ref_key], abs=1e-4), key


def test_published_figures_are_printed_beside_the_measured_ones(tmp_path, monkeypatch, capsys):
    """Registry weights (here tiny ones in the cache under voc12's file name) on their own format."""
    from segcore.weights import REGISTRY

    monkeypatch.setenv("SEGCORE_HOME", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    tiny_checkpoint(tmp_path / "cache" / REGISTRY["voc12"].filename, n_classes=21)
    data = make_voc(tmp_path / "voc", SIZES[:1])
    args = ["evaluate", "--weights", "voc12", "--data", data, "--out", tmp_path / "out", "--no-progress", "--worst", "0"]
    assert run_cli(args) == 0
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "out/scores.json").read_text())
    measured = 100 * doc["mean_iou"]
    assert f"mIoU 76.65 published, {measured:.2f} measured ({measured - 76.65:+.2f})" in out
    assert doc["published"]["scores"]["mean_iou"] == 76.65
    page = (tmp_path / "out/report.html").read_text()
    assert "<td>76.65</td>" in page and f"{measured - 76.65:+.2f}" in page
    # with CRF only the CRF figure counts; another precision or protocol is not comparable
    assert run_cli(args + ["--crf"]) == 0
    out = capsys.readouterr().out
    assert "mIoU 77.93 published" in out and "PA 94.64" not in out
    for extra in (["--precision", "bf16"], ["--protocol", "resize"]):
        assert run_cli(args + extra) == 0
        assert " published, " not in capsys.readouterr().out
        assert "published" not in json.loads((tmp_path / "out/scores.json").read_text())


def test_too_large_image_is_a_clear_failure_naming_the_option(tmp_path, datasets, checkpoints):
    import segcore
    from segcore.protocol import Protocol

    seg = segcore.Segmenter.from_pretrained(str(checkpoints[21]), precision="fp32")
    ds = segcore.open_dataset(datasets["voc"], "voc")
    budget = 2 * 4 * 21 * 500 * 500  # the 500x375 images fit, 640x480 does not
    result = segcore.evaluate(seg, ds, protocol=Protocol("reference", score_budget_bytes=budget), progress=False,
                              worst=0)
    assert len(result.per_image) == 3 and len(result.failures) == 1
    reason = result.failures[0]["reason"]
    assert "2007_000003.jpg" in reason and "640x480" in reason and "--protocol resize" in reason


def test_trainer_validation_equals_segcore_evaluate_on_the_saved_checkpoint(tmp_path):
    import train

    run = tmp_path / "run"
    assert train.train(tiny_cfg(), run).status == "finished"
    record = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    args = ["evaluate", "--weights", run / "checkpoints/final.pth", "--data", run / "data/synthetic",
            "--format", "voc", "--split", "val", "--out", tmp_path / "out", "--no-progress", "--worst", "0"]
    assert run_cli(args) == 0
    doc = json.loads((tmp_path / "out/scores.json").read_text())
    assert doc["options"]["protocol"]["name"] == "reference"
    for key in KEYS:
        assert record[f"val_{key}"] == doc[key], key
    assert record["val_class_iou"] == doc["class_iou"]
