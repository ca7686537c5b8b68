"""Every command line answers a user's mistake with one readable line and exit code 2, never a traceback.

Each row runs a real command (`python -m segcore ...`, `python -m annotations convert`, `python -m train`)
in a subprocess on one kind of wrong input and checks the exit code, the words the user needs (the file
or option, the problem) and that no traceback reached stderr.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from factories import scene_image, tiny_checkpoint
from labelme_fixtures import write_labelme
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--scales", "--test-size", "65", "--device", "cpu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli_errors")
    tiny_checkpoint(d / "four.pth", n_classes=4)
    tiny_checkpoint(d / "voc.pth", n_classes=21)
    Image.fromarray(scene_image(40, 48)).save(d / "a.jpg")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (d / "corrupt.pth").write_bytes(b"this is not a checkpoint")
    (d / "garbage.mp4").write_bytes(b"not a video at all")
    (d / "garbage.caffemodel").write_bytes(b"\x0e\x0f junk")
    (d / "empty").mkdir()
    write_labelme(d / "zebras" / "z.json", [{"label": "zebra", "points": [[2, 2], [30, 2], [30, 30]],
                                            "shape_type": "polygon"}], np.full((40, 40, 3), 90, np.uint8))
    (d / "bad_type.yaml").write_text("name: bad\nsolver:\n  iterations: many\n")
    return d


# (command, arguments, expected exit code, words the one error line must hold)
CASES = {
    "predict: label count vs --labels": (
        "segcore", ["predict", "a.jpg", "--weights", "four.pth", "--labels", "voc", *FAST], 2,
        ["four.pth", "4 classes", "'voc' has 21", "labels file"]),
    "predict: corrupt checkpoint": (
        "segcore", ["predict", "a.jpg", "--weights", "corrupt.pth", *FAST], 2, ["corrupt.pth"]),
    "predict: missing checkpoint": (
        "segcore", ["predict", "a.jpg", "--weights", "nope.pth", *FAST], 2, ["no such checkpoint file"]),
    "predict: unknown label set": (
        "segcore", ["predict", "a.jpg", "--weights", "voc.pth", "--labels", "klingon", *FAST], 2,
        ["'klingon'", "voc", "cocostuff"]),
    "predict: test size out of range": (
        "segcore", ["predict", "a.jpg", "--weights", "voc.pth", "--test-size", "0"], 2, ["--test-size", "at least 1"]),
    "predict: opacity out of range": (
        "segcore", ["predict", "a.jpg", "--weights", "voc.pth", "--opacity", "3", *FAST], 2, ["--opacity", "0 and 1"]),
    "predict: device this machine lacks": (
        "segcore", ["predict", "a.jpg", "--weights", "voc.pth", "--scales", "--device", "cuda:64"], 2,
        ["device 'cuda:64'", "cpu"]),
    "predict: not a device": (
        "segcore", ["predict", "a.jpg", "--weights", "voc.pth", "--scales", "--device", "banana"], 2,
        ["device 'banana'", "cuda:N"]),
    "predict: unreadable image (a batch: named, exit 1)": (
        "segcore", ["predict", "broken.jpg", "--weights", "voc.pth", *FAST], 1, ["broken.jpg", "not an image"]),
    "predict: missing image (a batch: named, exit 1)": (
        "segcore", ["predict", "missing.jpg", "--weights", "voc.pth", *FAST], 1, ["missing.jpg", "no such file"]),
    "predict: no weights": ("segcore", ["predict", "a.jpg"], 2, ["--weights"]),
    "video: missing file": (
        "segcore", ["video", "nope.mp4", "out.mp4", "--weights", "voc.pth", *FAST], 2, ["nope.mp4", "no such file"]),
    "video: unreadable file": (
        "segcore", ["video", "garbage.mp4", "out.mp4", "--weights", "voc.pth", *FAST], 2,
        ["garbage.mp4", "not a readable video"]),
    "video: label count vs --labels": (
        "segcore", ["video", "a.jpg", "out.mp4", "--weights", "four.pth", "--labels", "voc", *FAST], 2,
        ["four.pth", "4 classes"]),
    "video: stride 0": (
        "segcore", ["video", "a.jpg", "out.mp4", "--weights", "voc.pth", "--stride", "0"], 2, ["--stride", "at least 1"]),
    "video: smoothing 1": (
        "segcore", ["video", "a.jpg", "out.mp4", "--weights", "voc.pth", "--smoothing", "1"], 2,
        ["--smoothing", "below 1"]),
    # evaluate's --labels is the evaluation's label space (issue 17): the model's 4 classes need a mapping
    "evaluate: label count vs --labels": (
        "segcore", ["evaluate", "--weights", "four.pth", "--data", "zebras", "--labels", "voc", *FAST], 2,
        ["four.pth", "4 classes", "(voc)", "--pred-map"]),
    "evaluate: empty folder": (
        "segcore", ["evaluate", "--weights", "voc.pth", "--data", "empty", *FAST], 2, ["empty", "the folder is empty"]),
    "evaluate: missing folder": (
        "segcore", ["evaluate", "--weights", "voc.pth", "--data", "nowhere", *FAST], 2, ["nowhere", "not found"]),
    "evaluate: missing mapping file": (
        "segcore", ["evaluate", "--weights", "voc.pth", "--data", "zebras", "--map", "nomap.yaml", *FAST], 2,
        ["nomap.yaml", "cannot read mapping file"]),
    "evaluate: no weights": ("segcore", ["evaluate", "--data", "zebras"], 2, ["--weights NAME|PATH is required"]),
    "convert-caffe: missing file": (
        "segcore", ["convert-caffe", "nope.caffemodel", "out.pth"], 2, ["nope.caffemodel", "no such"]),
    "convert-caffe: not a Caffe model": (
        "segcore", ["convert-caffe", "garbage.caffemodel", "out.pth"], 2, ["garbage.caffemodel", "not a Caffe model"]),
    "annotations: missing input": (
        "annotations", ["convert", "nowhere", "out_a"], 2, ["nowhere", "not found"]),
    "annotations: empty folder": (
        "annotations", ["convert", "empty", "out_b"], 2, ["empty", "no labelme .json files"]),
    "annotations: unknown label set": (
        "annotations", ["convert", "zebras", "out_c", "--labels", "klingon"], 2, ["'klingon'"]),
    "annotations: missing mapping file": (
        "annotations", ["convert", "zebras", "out_d", "--map", "nomap.yaml"], 2, ["nomap.yaml"]),
    "annotations: bad option value": (
        "annotations", ["convert", "zebras", "out_e", "--unknown", "maybe"], 2, ["--unknown", "invalid choice"]),
    "train: missing config": ("train", ["--config", "nope.yaml"], 2, ["nope.yaml", "no such config file"]),
    "train: wrong value type": ("train", ["--config", "bad_type.yaml"], 2, ["bad_type.yaml", "solver.iterations"]),
    "train: malformed --set": (
        "train", ["--config", "bad_type.yaml", "--set", "nonsense"], 2, ["--set 'nonsense'", "key=value"]),
    "train: unknown option": ("train", ["--config", "bad_type.yaml", "--fast"], 2, ["--fast", "--help"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_mistake_is_one_line_and_the_documented_exit_code(files, case):
    package, args, code, words = CASES[case]
    proc = subprocess.run([sys.executable, "-m", package, *args], cwd=files, capture_output=True, text=True,
                          timeout=300, env=_env())
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "FAILED"))]
    assert len(lines) == 1, proc.stderr  # one message, named once
    for word in words:
        assert word in lines[0], (word, lines[0])


def _env():
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT), "SEGCORE_HOME": "segcore-home"}


def test_evaluate_with_only_unknown_labels_explains_and_writes_no_report(files):
    proc = subprocess.run([sys.executable, "-m", "segcore", "evaluate", "--weights", "voc.pth", "--data", "zebras",
                           "--out", "no_report", *FAST], cwd=files, capture_output=True, text=True, timeout=300,
                          env=_env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    message = proc.stderr[proc.stderr.index("error: "):]
    assert message.startswith("error: nothing could be evaluated: 1 of 1 files use labels the model does not know")
    assert "'zebra' in zebras/z.json" in message
    assert "--map FILE" in message and "--unknown ignore" in message and "--weights" in message
    assert "Mean IoU" not in proc.stdout  # no table of n/a scores
    assert not (files / "no_report").exists()  # no report of NaNs
