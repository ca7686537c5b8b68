"""``python -m annotations convert`` end to end (subprocess): outputs and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from labelme_fixtures import generate_folder, make_image, write_labelme

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "annotations", "convert", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_good_folder_with_mapping_and_labels_file(tmp_path):
    src = tmp_path / "src"
    img = make_image(np.random.default_rng(0), 40, 30)
    write_labelme(src / "a.json", [{"label": "Motorcycle", "points": [[0, 0], [20, 0], [20, 20]]},
                                   {"label": "tv-2", "points": [[25, 5], [35, 5], [35, 25]], "shape_type": "polygon"}],
                  img)
    (tmp_path / "map.yaml").write_text("map:\n  motorcycle: motorbike\n  tv: tvmonitor\nstrip_instance_suffix: true\n")
    out = tmp_path / "out"
    r = run_cli(src, out, "--labels", "voc", "--map", tmp_path / "map.yaml", "--workers", "2", "--instances")
    assert r.returncode == 0, r.stderr
    assert "1/1 files converted" in r.stdout
    cls = np.array(Image.open(out / "SegmentationClass/a.png"))
    assert cls[5, 15] == 14 and cls[20, 33] == 20 and cls[29, 0] == 0
    assert (out / "SegmentationObject/a.png").exists()
    rep = json.loads((out / "report.json").read_text())
    assert rep["classes"]["motorbike"]["shapes"] == 1 and rep["classes"]["tvmonitor"]["images"] == 1

    # the output exists: refused (2); --overwrite works (0)
    r = run_cli(src, out, "--map", tmp_path / "map.yaml", "--strip-suffix")
    assert r.returncode == 2 and "exists" in r.stderr
    r = run_cli(src, out, "--map", tmp_path / "map.yaml", "--overwrite", "--quiet")
    assert r.returncode == 0, r.stderr

    labels = tmp_path / "labels.txt"
    labels.write_text("__ignore__\n_background_\nmotorcycle\ntv\n")
    r = run_cli(src, tmp_path / "out2", "--labels", labels, "--strip-suffix")
    assert r.returncode == 0, r.stderr
    cls = np.array(Image.open(tmp_path / "out2/SegmentationClass/a.png"))
    assert cls[5, 15] == 1 and cls[20, 33] == 2
    assert (tmp_path / "out2/class_names.txt").read_text().split() == ["_background_", "motorcycle", "tv"]


def test_cli_bad_files_exit_nonzero_but_convert_the_rest(tmp_path):
    src = tmp_path / "src"
    generate_folder(src, 3, seed=2, size=(40, 30))
    (src / "broken.json").write_text("{not json")
    write_labelme(src / "unknown.json", [{"label": "unicorn", "points": [[0, 0], [5, 0], [5, 5]]}],
                  make_image(np.random.default_rng(1), 40, 30))
    out = tmp_path / "out"
    r = run_cli(src, out, "--labels", "voc")
    assert r.returncode == 1
    assert "3/5 files converted" in r.stdout and "unicorn" in r.stdout and "broken.json" in r.stdout
    assert sorted(p.stem for p in (out / "SegmentationClass").iterdir()) == ["img_0000", "img_0001", "img_0002"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["failed"] == 2 and "unicorn" in rep["unknown_labels"]
    # with --unknown ignore the unknown file converts
    r = run_cli(src, tmp_path / "out2", "--unknown", "ignore", "--labels", "cocostuff")
    assert r.returncode == 1 and "4/5 files converted" in r.stdout


def test_cli_zip_inputs(tmp_path):
    src = tmp_path / "src"
    generate_folder(src, 2, seed=5, size=(32, 24))
    z = tmp_path / "in.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in src.iterdir():
            zf.write(p, p.name)
    r = run_cli(z, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "out/JPEGImages").iterdir())) == 2
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escape.json", "{}")
    r = run_cli(evil, tmp_path / "out3")
    assert r.returncode == 2 and "refusing" in r.stderr
    assert not (tmp_path / "out3").exists()


def test_cli_list_of_files(tmp_path):
    files = generate_folder(tmp_path / "src", 3, seed=7, size=(32, 24))
    r = run_cli(files[0], files[2], tmp_path / "out", "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out/ImageSets/Segmentation/all.txt").read_text().split() == ["img_0000", "img_0002"]


def test_cli_prints_its_warnings_the_first_twenty_and_where_the_rest_are(tmp_path):
    img = make_image(np.random.default_rng(1), 40, 30)
    outside = [{"label": "person", "points": [[-5, -5], [20, 0], [20, 20]], "shape_type": "polygon"}]
    write_labelme(tmp_path / "one" / "a.json", outside, img)
    r = run_cli(tmp_path / "one", tmp_path / "out1", "--quiet")
    assert r.returncode == 0, r.stderr
    shown = [line for line in r.stdout.splitlines() if line.startswith("warning: ")]
    assert len(shown) == 1 and shown[0].startswith("warning: a.json shape 0: ") and "outside" in shown[0]
    assert f"(all warnings are also in {tmp_path / 'out1' / 'report.json'})" in r.stdout

    for k in range(25):  # 25 warnings: 20 shown, the count of the rest and the report's path
        write_labelme(tmp_path / "many" / f"f{k:02d}.json", outside, img)
    r = run_cli(tmp_path / "many", tmp_path / "out2", "--quiet")
    assert r.returncode == 0, r.stderr
    shown = [line for line in r.stdout.splitlines() if line.startswith("warning: ")]
    assert len(shown) == 20 and shown[0].startswith("warning: f00.json")
    assert f"... and 5 more warning(s) in {tmp_path / 'out2' / 'report.json'}" in r.stdout
    assert len(json.loads((tmp_path / "out2" / "report.json").read_text())["warnings"]) == 25
