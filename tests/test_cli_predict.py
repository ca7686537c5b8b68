"""``python -m segcore predict`` end to end in subprocesses: formats and layout, bad input, resuming after
SIGTERM, torchrun sharding, and a run scored directly by ``segcore evaluate --format masks``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import labelme
import numpy as np
import pytest
from factories import scene_image, tiny_checkpoint, upscaled_images
from PIL import Image

import annotations

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--scales", "--test-size", "64", "--precision", "fp32", "--no-progress"]


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def predict(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "segcore", "predict", *map(str, args)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def tree(folder: Path) -> dict[str, object]:
    """Every file under ``folder`` by relative path: bytes, npz arrays, or the report's records."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(folder).as_posix()
        if p.suffix == ".npz":  # zip members carry their write time; compare what they hold
            with np.load(p) as z:
                out[rel] = {k: z[k].tobytes() for k in z.files}
        elif p.name == "predict_report.jsonl":
            out[rel] = {json.loads(line)["image"]: line for line in p.read_text().splitlines()}
        else:
            out[rel] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def photos(smoke_model, tmp_path_factory):
    """12 smoke images at 256 px in a folder with a subfolder, and the checkpoint."""
    ckpt, run = smoke_model
    folder = tmp_path_factory.mktemp("photos")
    images = upscaled_images(run, folder, 12)
    (folder / "sub").mkdir()
    for p in images[8:]:
        p.rename(folder / "sub" / p.name)
    return ckpt, folder


def test_formats_mirror_the_input_and_labelme_loads_every_file(photos, tmp_path):
    ckpt, folder = photos
    out = tmp_path / "out"
    proc = predict(folder, "--weights", ckpt, *FAST, "--out", out, "--format", "png", "labelme", "npz",
                   "--probabilities")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "12 of 12 images segmented" in proc.stdout and "labelme round trip" in proc.stdout
    sources = sorted(p.relative_to(folder) for p in folder.rglob("*.jpg"))
    report = {json.loads(line)["image"]: json.loads(line) for line in (out / "predict_report.jsonl").read_text().splitlines()}
    for rel in sources:
        stem = rel.with_suffix("")
        label_map = np.asarray(Image.open(out / f"{stem}.png"))
        assert Image.open(out / f"{stem}.png").mode == "P" and label_map.shape == (256, 256)
        assert Image.open(out / f"{stem}_overlay.jpg").size == (256, 256)
        with np.load(out / f"{stem}.npz") as z:
            np.testing.assert_array_equal(z["label_map"], label_map)
            assert z["probabilities"].dtype == np.float16 and z["probabilities"].shape == (4, 64, 64)
        json_path = out / "labelme" / f"{stem}.json"
        lf = labelme.LabelFile(filename=str(json_path))  # labelme itself opens it
        assert lf.image_path == rel.name and (out / "labelme" / rel).read_bytes() == (folder / rel).read_bytes()
        assert all(s["description"] == f"predicted by {ckpt.name}" for s in lf.shapes)
        back = annotations.convert_file(json_path, annotations.label_space_for_names(
            ["background", "disc", "square", "triangle"])).class_map
        agreement = (back == label_map).mean()
        assert agreement >= 0.995
        assert report[rel.as_posix()]["round_trip"] == pytest.approx(agreement, abs=1e-6)
    # a labelme project holds only images and their JSON, nothing labelme would offer to annotate twice
    assert {p.suffix for p in (out / "labelme").rglob("*") if p.is_file()} == {".jpg", ".json"}


def test_map_file_names_the_labels(photos, tmp_path):
    ckpt, folder = photos
    (tmp_path / "names.json").write_text(json.dumps({"disc": "circle", "triangle": "__ignore__"}))
    out = tmp_path / "out"
    proc = predict(folder / "sub", "--weights", ckpt, *FAST, "--out", out, "--format", "labelme",
                   "--map", tmp_path / "names.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = {s["label"] for p in out.glob("*.json") for s in json.loads(p.read_text())["shapes"]}
    assert "circle" in labels and not labels & {"disc", "triangle"}
    assert json.loads((out / "label_names.yaml").read_text()) == {"circle": "disc"}


def test_evaluate_scores_a_predict_run_directly(smoke_model, tmp_path):
    ckpt, run = smoke_model
    data = run / "data" / "synthetic"
    images = sorted((data / "JPEGImages").glob("val_*.jpg"))
    out = tmp_path / "pred"
    proc = predict(*images, "--weights", ckpt, *FAST, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gt = tmp_path / "gt"
    gt.mkdir()
    for p in images:
        (gt / f"{p.stem}.png").write_bytes((data / "SegmentationClass" / f"{p.stem}.png").read_bytes())
    proc = subprocess.run([sys.executable, "-m", "segcore", "evaluate", "--format", "masks", "--data", gt,
                           "--pred", out, "--labels", data / "class_names.txt", "--out", tmp_path / "report"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"{len(images)} of {len(images)} images evaluated" in proc.stdout
    # every predicted <name>.png was paired with its ground truth: the pixel accuracy is that of all the files
    pred = np.stack([np.asarray(Image.open(out / f"{p.stem}.png")) for p in images])
    truth = np.stack([np.asarray(Image.open(gt / f"{p.stem}.png")) for p in images])
    scores = json.loads((tmp_path / "report" / "scores.json").read_text())
    assert scores["pixel_accuracy"] == pytest.approx((pred == truth)[truth != 255].mean())


def test_bad_images_are_named_and_skipped_with_nothing_left_behind(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pth", n_classes=21)
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(scene_image(60, 80)).save(src / "a.jpg")
    Image.fromarray(scene_image(50, 40, seed=1)).save(src / "b.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (src / "gone.jpg").symlink_to(src / "missing.jpg")  # a folder entry that cannot be read
    out = tmp_path / "out"
    proc = predict(src, "--weights", ckpt, "--scales", "--test-size", "65", "--out", out, "--format", "png",
                   "labelme")
    assert proc.returncode == 1, proc.stderr
    assert "broken.jpg: not an image" in proc.stderr and "gone.jpg: no such file" in proc.stderr
    assert "2 of 4 images" in proc.stdout
    mask = Image.open(out / "a.png")
    assert mask.mode == "P" and mask.size == (80, 60) and np.asarray(mask).max() < 21
    assert Image.open(out / "b_overlay.jpg").size == (40, 50)
    assert not list(out.rglob("broken*")) and not list(out.rglob("gone*")) and not list(out.rglob("*.part"))


def test_existing_outputs_and_changed_settings_need_overwrite(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pth", n_classes=21)
    Image.fromarray(scene_image(60, 80)).save(tmp_path / "a.jpg")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"someone else's file")
    proc = predict(tmp_path / "a.jpg", "--weights", ckpt, *FAST, "--out", out)
    assert proc.returncode == 2 and "a.png already exists" in proc.stderr and "--overwrite" in proc.stderr
    assert (out / "a.png").read_bytes() == b"someone else's file"
    assert predict(tmp_path / "a.jpg", "--weights", ckpt, *FAST, "--out", out, "--overwrite").returncode == 0
    assert Image.open(out / "a.png").mode == "P"
    again = predict(tmp_path / "a.jpg", "--weights", ckpt, *FAST, "--out", out, "--opacity", "0.7")
    assert again.returncode == 2 and "other settings (opacity)" in again.stderr
    same = predict(tmp_path / "a.jpg", "--weights", ckpt, *FAST, "--out", out)
    assert same.returncode == 0 and "1 already done, skipped" in same.stdout


def test_zip_input_mirrors_its_members_and_a_hostile_zip_is_refused(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pth", n_classes=21)
    Image.fromarray(scene_image(60, 80)).save(tmp_path / "a.jpg")
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as zf:
        zf.write(tmp_path / "a.jpg", "trip/day1/a.jpg")
        zf.writestr("trip/notes.txt", "not an image")
    proc = predict(tmp_path / "photos.zip", "--weights", ckpt, *FAST, "--out", tmp_path / "out", "--format",
                   "labelme")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out/trip/day1/a.json").is_file() and (tmp_path / "out/trip/day1/a.jpg").is_file()
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("../escape.jpg", b"x")
    proc = predict(tmp_path / "evil.zip", tmp_path / "a.jpg", "--weights", ckpt, *FAST, "--out", tmp_path / "out2")
    # the hostile zip is named and skipped like a bad image; the other input still runs
    assert proc.returncode == 1 and "escapes the target folder" in proc.stderr and "Traceback" not in proc.stderr
    assert "FAILED " + str(tmp_path / "evil.zip") in proc.stderr and (tmp_path / "out2/a.png").is_file()
    assert not (tmp_path / "escape.jpg").exists()


def test_sigterm_then_rerun_gives_the_files_of_an_uninterrupted_run(photos, tmp_path):
    ckpt, folder = photos
    args = [folder, "--weights", ckpt, *FAST, "--format", "png", "labelme", "npz", "--decode-workers", "1"]
    whole = predict(*args, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]

    out = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, "-m", "segcore", "predict", *map(str, args), "--out", str(out)],
                            cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while len(list(out.glob("labelme/*.json"))) < 2:  # wait for observable progress: 2 images written
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by SIGTERM" in stderr
    written = len(list(out.rglob("*.json")))
    assert 2 <= written < 12 and not list(out.rglob("*.part"))

    rest = predict(*args, "--out", out)
    assert rest.returncode == 0, rest.stderr[-2000:]
    assert f"{12 - written} of 12 images segmented" in rest.stdout and f"({written} already done" in rest.stdout
    assert tree(out) == tree(tmp_path / "whole")


def test_torchrun_two_processes_write_the_files_of_one(photos, tmp_path):
    ckpt, folder = photos
    args = [folder, "--weights", ckpt, *FAST, "--format", "png", "labelme"]
    one = predict(*args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "segcore", "predict", *map(str, args), "--out", str(tmp_path / "two")],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    assert "12 of 12 images segmented" in two.stdout
    assert tree(tmp_path / "two") == tree(tmp_path / "one")


def test_unknown_weights_is_a_clear_error(tmp_path):
    Image.fromarray(scene_image(60, 80)).save(tmp_path / "a.jpg")
    proc = predict(tmp_path / "a.jpg", "--weights", tmp_path / "nope.pth")
    assert proc.returncode == 2 and "no such checkpoint file" in proc.stderr


@pytest.mark.parametrize("mode", ["copy", "embed"])
def test_exif_rotated_photos_open_in_labelme_at_the_label_maps_size(tmp_path, mode):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pth", n_classes=21)
    photo = Image.fromarray(scene_image(40, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees: 40 wide, 64 high
    photo.save(tmp_path / "phone.jpg", exif=exif)
    out = tmp_path / "out"
    flags = ["--embed-image"] if mode == "embed" else []
    proc = predict(tmp_path / "phone.jpg", "--weights", ckpt, *FAST, "--out", out, "--format", "labelme", "png",
                   *flags)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.asarray(Image.open(out / "phone.png")).shape == (64, 40)
    lf = labelme.LabelFile(filename=str(out / "labelme" / "phone.json"))  # checks imageHeight / imageWidth
    assert labelme.utils.img_data_to_arr(lf.image_data).shape[:2] == (64, 40)
    assert (out / "labelme" / "phone.jpg").exists() == (mode == "copy")
