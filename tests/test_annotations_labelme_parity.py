"""Class and instance maps must equal labelme 6.3.1's own conversion, pixel for pixel.

Reference = labelme's labelme2voc loop: ``LabelFile`` -> ``img_data_to_arr`` ->
``utils.shapes_to_label`` (+ ``ins[cls == -1] = 0`` from the instance example).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np
import pytest
from PIL import Image

import annotations as A
from labelme_fixtures import (ALL_TYPES, LABELME_VOC_NAME_TO_ID, VOC_LABELS, generate_folder,
                              make_image, random_annotation, random_shape, write_labelme)

import labelme  # noqa: E402
import labelme.utils  # noqa: E402


def labelme_reference(json_path, name_to_id=LABELME_VOC_NAME_TO_ID):
    lf = labelme.LabelFile(filename=str(json_path))
    img = labelme.utils.img_data_to_arr(lf.image_data)
    cls, ins = labelme.utils.shapes_to_label(img_shape=img.shape, shapes=lf.shapes, label_name_to_value=name_to_id)
    ins[cls == -1] = 0
    return img, cls, ins


def as_ours(cls, ignore=255):
    return np.where(cls == -1, ignore, cls).astype(np.int64)


def assert_same(conv, ref_cls, ref_ins):
    assert conv.class_map.shape == ref_cls.shape
    np.testing.assert_array_equal(conv.class_map.astype(np.int64), as_ours(ref_cls))
    if ref_ins is not None:
        np.testing.assert_array_equal(conv.instance_map, ref_ins)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_folders_match_labelme(tmp_path, seed):
    files = generate_folder(tmp_path, 6, seed=seed, size=(96 + 16 * seed, 72), n_shapes=14)
    result = A.load_labelme_dataset(tmp_path, "voc", instances=True, workers=1)
    assert result.report.ok, result.report.errors
    assert len(result) == len(files)
    by_path = {c.path: c for c in result}
    for f in files:
        img, cls, ins = labelme_reference(f)
        conv = by_path[str(f)]
        assert_same(conv, cls, ins)
        assert conv.image.shape[:2] == img.shape[:2]


def test_every_shape_type_alone_and_overlapping(tmp_path):
    rng = np.random.default_rng(42)
    w, h = 80, 60
    img = make_image(rng, w, h)
    for t in ALL_TYPES:
        for k in range(8):
            shapes = [random_shape(rng, w, h, t, str(rng.choice(VOC_LABELS)), None) for _ in range(3)]
            f = write_labelme(tmp_path / f"{t}_{k}.json", shapes, img, embed=True)
            _, cls, ins = labelme_reference(f)
            assert_same(A.convert_file(f, "voc", instances=True), cls, ins)


def test_holes_as_later_background_shapes_and_borders(tmp_path):
    rng = np.random.default_rng(3)
    w, h = 64, 48
    img = make_image(rng, w, h)
    shapes = [
        {"label": "person", "points": [[0, 0], [64, 0], [64, 48], [0, 48]], "shape_type": "polygon"},
        {"label": "_background_", "points": [[10.5, 10.5], [30.25, 12], [20, 30.75]], "shape_type": "polygon"},
        {"label": "dog", "points": [[63.9, 47.9], [40.2, 30.1]], "shape_type": "rectangle"},
        {"label": "__ignore__", "points": [[-5, -5], [8.5, 9.5]], "shape_type": "rectangle"},
        {"label": "cat", "points": [[0, 47], [63, 0]], "shape_type": "line"},
        {"label": "bird", "points": [[63.5, 0.5]], "shape_type": "point"},
    ]
    for s in shapes:
        s.setdefault("group_id", None)
        s.setdefault("flags", {})
    f = write_labelme(tmp_path / "holes.json", shapes, img, embed=False, fmt="PNG")
    _, cls, ins = labelme_reference(f)
    conv = A.convert_file(f, "voc", instances=True)
    assert_same(conv, cls, ins)
    # the hole really is background, independent of labelme: its centroid
    assert conv.class_map[17, 20] == 0
    assert conv.class_map[2, 2] == 255


def test_referenced_images_windows_paths_and_subfolders(tmp_path):
    rng = np.random.default_rng(5)
    for k, (fmt, win, sub) in enumerate([("PNG", True, "imgs"), ("JPEG", True, "a/b"), ("JPEG", False, None)]):
        img = make_image(rng, 70, 50)
        shapes = random_annotation(rng, 70, 50, 10)
        f = write_labelme(tmp_path / f"r{k}.json", shapes, img, embed=False, fmt=fmt, windows_path=win,
                          image_subdir=sub)
        if win:
            assert "\\" in json.loads(f.read_text())["imagePath"] or sub is None
        _, cls, ins = labelme_reference(f)
        assert_same(A.convert_file(f, "voc", instances=True), cls, ins)


def test_missing_or_null_shape_type_is_polygon(tmp_path):
    """labelme 3.x files have no shape_type; labelme's shapes_to_label treats None as polygon."""
    rng = np.random.default_rng(8)
    img = make_image(rng, 60, 40)
    shapes = [random_shape(rng, 60, 40, "polygon", str(rng.choice(VOC_LABELS))) for _ in range(6)]
    for k, s in enumerate(shapes):
        if k % 2:
            del s["shape_type"]
        else:
            s["shape_type"] = None
        s.pop("mask")
    f = write_labelme(tmp_path / "v3.json", shapes, img, embed=False, version="3.16.7",
                      extra={"lineColor": [0, 255, 0, 128], "fillColor": [255, 0, 0, 128]})
    # labelme 6.3.1's LabelFile rejects these files, so call its shapes_to_label directly.
    cls, ins = labelme.utils.shapes_to_label((40, 60), json.loads(f.read_text())["shapes"], LABELME_VOC_NAME_TO_ID)
    ins[cls == -1] = 0
    assert_same(A.convert_file(f, "voc", instances=True), cls, ins)


def test_exif_orientation_follows_labelme(tmp_path):
    rng = np.random.default_rng(9)
    img = make_image(rng, 60, 40)  # stored 60 wide, 40 high; orientation 6 -> shown 40 x 60
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(img).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    shapes = random_annotation(rng, 40, 60, 10, types=("polygon", "rectangle", "circle", "point"))
    doc = {"version": "5.0.1", "flags": {}, "shapes": shapes, "imagePath": "rot.jpg", "imageData": None,
           "imageHeight": 60, "imageWidth": 40}
    (tmp_path / "rot.json").write_text(json.dumps(doc))
    ref_img, cls, ins = labelme_reference(tmp_path / "rot.json")
    conv = A.convert_file(tmp_path / "rot.json", "voc", instances=True)
    assert conv.image.shape == (60, 40, 3) == ref_img.shape
    assert_same(conv, cls, ins)
    # same pixels as labelme's decoded (rotated, re-encoded q95) image, within JPEG error
    assert np.abs(conv.image.astype(int) - ref_img.astype(int)).mean() < 3


def test_cocostuff_with_unlabeled_ignore_matches(tmp_path):
    rng = np.random.default_rng(11)
    space = A.get_label_space("cocostuff")
    names = ["person", "dog", "grass", "sky-other", "tv", "hair brush"]
    img = make_image(rng, 80, 60)
    shapes = [random_shape(rng, 80, 60, t, names[k % len(names)]) for k, t in enumerate(ALL_TYPES * 2)]
    f = write_labelme(tmp_path / "c.json", shapes, img)
    name_to_id = {n: space.class_names.index(n) for n in names}
    _, cls, _ = labelme_reference(f, name_to_id)
    conv = A.convert_file(f, "cocostuff")
    # labelme leaves unannotated pixels 0; COCO-Stuff marks them 255 (unlabeled).
    painted = labelme.utils.shapes_to_label((60, 80), labelme.LabelFile(str(f)).shapes,
                                            {n: 1 for n in names})[0].astype(bool)
    expected = np.where(painted, cls, 255)
    np.testing.assert_array_equal(conv.class_map, expected)


def test_parallel_equals_serial(tmp_path):
    generate_folder(tmp_path, 8, seed=21, size=(64, 48))
    a = A.load_labelme_dataset(tmp_path, "voc", instances=True, workers=1)
    b = A.load_labelme_dataset(tmp_path, "voc", instances=True, workers=2)
    assert [c.name for c in a] == [c.name for c in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.class_map, y.class_map)
        np.testing.assert_array_equal(x.instance_map, y.instance_map)
    assert a.report.to_dict() == b.report.to_dict()
