import subprocess
import sys

import numpy as np
from factories import scene_image, tiny_checkpoint
from PIL import Image


def test_predict_writes_masks_and_survives_a_bad_file(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pth", n_classes=21)
    Image.fromarray(scene_image(60, 80)).save(tmp_path / "a.jpg")
    Image.fromarray(scene_image(50, 40, seed=1)).save(tmp_path / "b.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "segcore", "predict", str(tmp_path / "a.jpg"),
                           str(tmp_path / "broken.jpg"), str(tmp_path / "b.png"), "--weights", str(ckpt),
                           "--test-size", "65", "--scales", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "broken.jpg" in proc.stderr and "2 of 3 images" in proc.stdout
    mask = Image.open(out / "a_mask.png")
    assert mask.mode == "P" and mask.size == (80, 60)
    assert np.asarray(mask).max() < 21
    assert Image.open(out / "b_overlay.jpg").size == (40, 50)
    assert "a.jpg  80x60" in proc.stdout


def test_predict_unknown_weights_is_a_clear_error(tmp_path):
    Image.fromarray(scene_image(60, 80)).save(tmp_path / "a.jpg")
    proc = subprocess.run([sys.executable, "-m", "segcore", "predict", str(tmp_path / "a.jpg"),
                           "--weights", str(tmp_path / "nope.pth")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no such checkpoint file" in proc.stderr
