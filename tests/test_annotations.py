"""annotations: label spaces, mapping, bad input, dataset writer, hostile zips."""

from __future__ import annotations

import base64
import json
import os
import struct
import sys
import zipfile

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np
import pytest
from PIL import Image

import annotations as A
from labelme_fixtures import encode_image, generate_folder, make_image, random_annotation, write_labelme


def _shape(label, points, shape_type="polygon", group_id=None):
    return {"label": label, "points": points, "shape_type": shape_type, "group_id": group_id, "flags": {}}


def _img(w=40, h=30, seed=0):
    return make_image(np.random.default_rng(seed), w, h)


# ----------------------------------------------------------------------------- label spaces

def test_voc_label_space_names_and_colormap():
    voc = A.get_label_space("voc")
    assert voc.num_classes == 21 and voc.class_names[0] == "background" and voc.class_names[20] == "tvmonitor"
    assert voc.class_names[15] == "person" and voc.ignore_index == 255 and voc.background_index == 0
    # standard VOC colours (hand-checked values from the VOC devkit)
    assert voc.palette[1].tolist() == [128, 0, 0]
    assert voc.palette[15].tolist() == [192, 128, 128]
    assert voc.palette[20].tolist() == [0, 64, 128]
    assert voc.palette[255].tolist() == [224, 224, 192]
    import imgviz
    np.testing.assert_array_equal(voc.palette, imgviz.label_colormap())


def test_cocostuff_label_space():
    cs = A.get_label_space("cocostuff")
    n = cs.class_names
    assert len(n) == 182 and cs.background_index is None and cs.ignore_index == 255
    expected = {0: "person", 11: "street sign", 25: "hat", 28: "shoe", 29: "eye glasses", 44: "plate",
                65: "mirror", 67: "window", 68: "desk", 70: "door", 82: "blender", 89: "toothbrush",
                90: "hair brush", 91: "banner", 181: "wood", 92: "blanket", 156: "sky-other"}
    for i, name in expected.items():
        assert n[i] == name
    colours = {tuple(c) for c in cs.palette[:182].tolist()} | {tuple(cs.palette[255].tolist())}
    assert len(colours) == 183  # distinct


def test_label_space_from_labels_txt(tmp_path):
    p = tmp_path / "labels.txt"
    p.write_text("__ignore__\n_background_\ncat\ndog\n\n")
    s = A.LabelSpace.from_file(p)
    assert s.class_names == ("_background_", "cat", "dog") and s.background_index == 0
    assert s.index_of("__ignore__") == 255 and s.index_of(" Dog ") == 2 and s.index_of("background") == 0
    assert A.get_label_space(str(p)).class_names == s.class_names
    (tmp_path / "bad.txt").write_text("cat\n__ignore__\n")
    with pytest.raises(A.LabelSpaceError, match="bad.txt"):
        A.LabelSpace.from_file(tmp_path / "bad.txt")
    with pytest.raises(A.LabelSpaceError):
        A.get_label_space("nope")


def test_colorize():
    voc = A.get_label_space("voc")
    lbl = np.array([[0, 1], [15, 255]], dtype=np.uint8)
    pil, rgb = voc.colorize(lbl)
    assert pil.mode == "P" and np.array(pil).tolist() == lbl.tolist()
    assert rgb[1, 0].tolist() == [192, 128, 128] and rgb[1, 1].tolist() == [224, 224, 192]
    assert A.colorize(lbl)[1].shape == (2, 2, 3)


# ----------------------------------------------------------------------------- mapping

def test_mapping_rules(tmp_path):
    voc = A.get_label_space("voc")
    m = A.LabelMapping.from_dict({"map": {"Motorcycle": "motorbike", "tv": "tvmonitor", "crowd": "__ignore__"},
                                  "rules": [{"pattern": r"^car\s*#\d+$", "to": "car"}],
                                  "strip_instance_suffix": True})
    assert m.resolve("motorcycle", voc) == 14
    assert m.resolve("  MOTOR cycle ", voc) == 14
    assert m.resolve("TV", voc) == 20
    assert m.resolve("crowd", voc) == 255
    assert m.resolve("Dining Table", voc) == 11
    assert m.resolve("person-2", voc) == 15 and m.resolve("person_13", voc) == 15
    assert m.resolve("car #3", voc) == 7
    assert m.resolve("unicorn", voc) is None
    assert A.LabelMapping().resolve("person-2", voc) is None  # suffix stripping is opt-in
    # YAML and JSON files, flat form
    (tmp_path / "m.yaml").write_text("motorcycle: motorbike\ntv: tvmonitor\n")
    (tmp_path / "m.json").write_text(json.dumps({"map": {"tv": "tvmonitor"}}))
    assert A.LabelMapping.from_file(tmp_path / "m.yaml").resolve("tv", voc) == 20
    assert A.LabelMapping.from_file(tmp_path / "m.json").resolve("tv", voc) == 20
    bad = A.LabelMapping.from_dict({"tv": "television"})
    with pytest.raises(A.MappingError, match="television"):
        bad.validate(voc)
    with pytest.raises(A.MappingError):
        A.LabelMapping.from_dict({"rules": [{"pattern": "(", "to": "car"}]})


def test_mapping_and_unknown_policies(tmp_path):
    img = _img()
    write_labelme(tmp_path / "a.json", [_shape("motorcycle", [[0, 0], [20, 0], [20, 20]]),
                                        _shape("unicorn", [[25, 5], [35, 5], [35, 25]])], img)
    write_labelme(tmp_path / "b.json", [_shape("unicorn", [[0, 0], [5, 0], [5, 5]])], img)
    write_labelme(tmp_path / "c.json", [_shape("person", [[0, 0], [10, 0], [10, 10]])], img)
    r = A.load_labelme_dataset(tmp_path, "voc", mapping={"motorcycle": "motorbike"})
    assert sorted(os.path.basename(f) for f in r.report.unknown_labels["unicorn"]) == ["a.json", "b.json"]
    assert [c.name for c in r] == ["c"] and len(r.report.failed) == 2
    assert any(e["shape"] == 1 and "unicorn" in e["reason"] for e in r.report.errors if e["file"].endswith("a.json"))
    assert "unicorn" in r.report.summary() and "b.json" in r.report.summary()
    r2 = A.load_labelme_dataset(tmp_path, "voc", mapping={"motorcycle": "motorbike"}, unknown="ignore")
    assert r2.report.ok and len(r2) == 3
    a = next(c for c in r2 if c.name == "a")
    assert a.class_map[5, 15] == 14 and a.class_map[20, 33] == 255 and a.class_map[29, 0] == 0
    assert any("unicorn" in w["reason"] for w in r2.report.warnings)


def test_unlabeled_policy(tmp_path):
    f = write_labelme(tmp_path / "a.json", [_shape("person", [[0, 0], [10, 0], [10, 10]])], _img())
    assert A.convert_file(f, "voc").class_map[29, 39] == 0
    assert A.convert_file(f, "voc", unlabeled="ignore").class_map[29, 39] == 255
    cs = A.convert_file(f, "cocostuff")
    assert cs.class_map[29, 39] == 255 and cs.class_map[1, 5] == 0
    with pytest.raises(A.LabelSpaceError):
        A.convert_file(f, "cocostuff", unlabeled="background")


# ----------------------------------------------------------------------------- bad input

def _bad_folder(tmp_path):
    img = _img()
    good = [write_labelme(tmp_path / f"good{i}.json", random_annotation(np.random.default_rng(i), 40, 30, 6,
                                                                        types=("polygon", "rectangle")), img)
            for i in range(2)]
    (tmp_path / "malformed.json").write_text('{"shapes": [ {"label": "cat", ')
    write_labelme(tmp_path / "noimage.json", [], img, embed=False)
    (tmp_path / "noimage.png").unlink()
    doc = json.loads(good[0].read_text())
    doc["imageData"] = base64.b64encode(b"this is not an image").decode()
    (tmp_path / "undecodable.json").write_text(json.dumps(doc))
    write_labelme(tmp_path / "polygon2.json", [_shape("cat", [[0, 0], [30, 20], [0, 25]]),
                                               _shape("dog", [[1, 1], [5, 5]])], img)
    write_labelme(tmp_path / "rect1.json", [_shape("cat", [[0, 0], [30, 20], [0, 25]]),
                                            _shape("dog", [[1, 1]], "rectangle")], img)
    (tmp_path / "nan.json").write_text(json.dumps(
        {"shapes": [_shape("cat", [[0, 0], [30, 20], [0, 25]]), _shape("dog", [[1, float("nan")], [5, 5], [9, 1]])],
         "imagePath": "x.png", "imageData": base64.b64encode(encode_image(img)).decode(),
         "imageHeight": 30, "imageWidth": 40}))
    write_labelme(tmp_path / "far.json", [_shape("cat", [[0, 0], [1e12, 20], [0, 25]])], img)
    write_labelme(tmp_path / "outside.json", [_shape("cat", [[-50, -20], [90, 10], [10, 60]])], img)
    write_labelme(tmp_path / "badsize.json", [], img, extra={"imageHeight": 31})
    return good


def test_bad_inputs_are_reported_and_good_files_still_convert(tmp_path):
    _bad_folder(tmp_path)
    r = A.load_labelme_dataset(tmp_path, "voc", workers=2)
    rep = r.report
    errs = {os.path.basename(e["file"]): e for e in rep.errors}
    warns = {}
    for w in rep.warnings:
        warns.setdefault(os.path.basename(w["file"]), []).append(w)
    assert {c.name for c in r} == {"good0", "good1", "polygon2", "outside"}
    assert sorted(os.path.basename(f) for f in rep.failed) == sorted(
        ["malformed.json", "noimage.json", "undecodable.json", "rect1.json", "nan.json", "far.json",
         "badsize.json"])
    assert "not valid JSON" in errs["malformed.json"]["reason"]
    assert "not found" in errs["noimage.json"]["reason"]
    assert "cannot decode image" in errs["undecodable.json"]["reason"]
    assert errs["rect1.json"]["shape"] == 1 and "exactly 2 point" in errs["rect1.json"]["reason"]
    assert errs["nan.json"]["shape"] == 1 and "NaN" in errs["nan.json"]["reason"]
    assert errs["far.json"]["shape"] == 0 and "far outside" in errs["far.json"]["reason"]
    assert "imageHeight mismatch" in errs["badsize.json"]["reason"]
    # degenerate polygon: skipped with a warning, the rest of the file converts
    (w,) = warns["polygon2.json"]
    assert w["shape"] == 1 and "skipped" in w["reason"]
    poly2 = next(c for c in r if c.name == "polygon2")
    assert poly2.class_map[10, 5] == 8 and (poly2.class_map == 12).sum() == 0
    # points outside the image: a warning, drawn clipped like labelme
    (w,) = warns["outside.json"]
    assert w["shape"] == 0 and "outside" in w["reason"]
    assert not rep.ok


def test_outside_points_match_labelme(tmp_path):
    import labelme.utils
    from labelme_fixtures import LABELME_VOC_NAME_TO_ID

    f = write_labelme(tmp_path / "o.json", [_shape("cat", [[-50.5, -20], [90, 10.2], [10, 60]]),
                                            _shape("dog", [[-3, 25], [45, 33]], "line")], _img())
    lf = labelme.LabelFile(str(f))
    cls, _ = labelme.utils.shapes_to_label((30, 40), lf.shapes, LABELME_VOC_NAME_TO_ID)
    np.testing.assert_array_equal(A.convert_file(f).class_map, cls)


def test_mask_patch_cropped_at_border(tmp_path):
    patch = np.ones((10, 12), dtype=bool)
    patch[0, 0] = False
    from labelme_fixtures import mask_b64
    s = {"label": "cat", "points": [[33.7, 25.2], [44, 34]], "shape_type": "mask", "mask": mask_b64(patch)}
    f = write_labelme(tmp_path / "m.json", [s], _img())
    cm = A.convert_file(f).class_map
    expected = np.zeros((30, 40), np.uint8)
    expected[25:30, 33:40] = 8  # placed at (int(33.7), int(25.2)), cropped to the 40x30 image
    expected[25, 33] = 0
    np.testing.assert_array_equal(cm, expected)


def test_convert_file_raises_package_errors(tmp_path):
    (tmp_path / "x.json").write_text("nope")
    with pytest.raises(A.LabelmeFormatError, match="x.json"):
        A.convert_file(tmp_path / "x.json")
    f = write_labelme(tmp_path / "u.json", [_shape("unicorn", [[0, 0], [5, 0], [5, 5]])], _img())
    with pytest.raises(A.UnknownLabelError, match="unicorn"):
        A.convert_file(f)
    assert issubclass(A.UnsafeArchiveError, A.AnnotationError)


# ----------------------------------------------------------------------------- writer

def test_convert_folder_writes_voc_dataset(tmp_path):
    src = tmp_path / "src"
    generate_folder(src, 4, seed=3, size=(48, 36))
    sub = src / "sub"
    write_labelme(sub / "img_0000.json", [_shape("person", [[0, 0], [20, 0], [20, 20]], group_id=1),
                                          _shape("person", [[22, 0], [30, 0], [30, 20]], group_id=1),
                                          _shape("person", [[31, 0], [40, 0], [40, 20]])], _img(48, 36))
    out = tmp_path / "out"
    rep = A.convert_folder(src, out, "voc", instances=True, workers=2)
    assert rep.ok and len(rep.converted) == 5
    mem = {c.name: c for c in A.load_labelme_dataset(src, "voc", instances=True)}
    names = (out / "ImageSets/Segmentation/all.txt").read_text().split()
    assert sorted(names) == sorted(mem) and "sub__img_0000" in names
    assert (out / "class_names.txt").read_text().split("\n")[:2] == ["background", "aeroplane"]
    for name, conv in mem.items():
        png = Image.open(out / "SegmentationClass" / f"{name}.png")
        assert png.mode == "P"
        np.testing.assert_array_equal(np.array(png), conv.class_map)
        assert np.array(png.getpalette()[:6]).tolist() == [0, 0, 0, 128, 0, 0]
        obj = Image.open(out / "SegmentationObject" / f"{name}.png")
        np.testing.assert_array_equal(np.array(obj), conv.instance_map)
        jpg = np.array(Image.open(out / "JPEGImages" / f"{name}.jpg").convert("RGB"))
        assert jpg.shape == conv.image.shape and np.abs(jpg.astype(int) - conv.image).mean() < 2
        assert Image.open(out / "SegmentationClassVisualization" / f"{name}.jpg").size == png.size
    ins = mem["sub__img_0000"].instance_map
    assert ins[5, 5] == ins[5, 25] == 1 and ins[5, 35] == 2  # same group_id -> one instance
    report = json.loads((out / "report.json").read_text())
    assert report["converted"] == 5 and report["failed"] == 0
    assert report["classes"]["person"]["shapes"] >= 3
    total = sum(c["pixels"] for c in report["classes"].values()) + report["ignore"]["pixels"]
    assert total == sum(c.class_map.size for c in mem.values())
    # JPEG sources referenced by path are copied byte for byte
    doc = json.loads((src / "img_0001.json").read_text())
    assert doc["imageData"] is None and doc["imagePath"].endswith(".jpg")
    assert (out / "JPEGImages/img_0001.jpg").read_bytes() == (src / doc["imagePath"]).read_bytes()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_output_exists_and_overwrite(tmp_path):
    src = tmp_path / "src"
    generate_folder(src, 2, seed=4, size=(32, 24))
    out = tmp_path / "out"
    A.convert_folder(src, out, workers=1)
    with pytest.raises(A.OutputExistsError):
        A.convert_folder(src, out, workers=1)
    rep = A.convert_folder(src, out, workers=1, overwrite=True)
    assert rep.ok and (out / "report.json").exists()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("x")
    with pytest.raises(A.OutputExistsError, match="does not look like a dataset"):
        A.convert_folder(src, precious, overwrite=True)
    assert (precious / "thesis.tex").exists()


def test_failed_batch_leaves_no_partial_dataset(tmp_path, monkeypatch):
    src = tmp_path / "src"
    generate_folder(src, 2, seed=4, size=(32, 24))
    import annotations.convert as C

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "_collect", boom)
    with pytest.raises(KeyboardInterrupt):
        A.convert_folder(src, tmp_path / "out", workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_embedded_jpeg_with_exif_orientation_is_not_rotated(tmp_path):
    """labelme ignores EXIF for embedded imageData; the written JPEG must then carry no rotation."""
    img = _img(40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode_image(img, "JPEG", exif=exif, quality=95)
    doc = {"version": "4.5.6", "flags": {}, "shapes": [_shape("cat", [[0, 0], [10, 0], [10, 10]])],
           "imagePath": "e.jpg", "imageData": base64.b64encode(data).decode(), "imageHeight": 30, "imageWidth": 40}
    (tmp_path / "src").mkdir()
    (tmp_path / "src/e.json").write_text(json.dumps(doc))
    A.convert_folder(tmp_path / "src", tmp_path / "out")
    out = Image.open(tmp_path / "out/JPEGImages/e.jpg")
    assert out.size == (40, 30) and out.getexif().get(0x0112) in (None, 1)


# ----------------------------------------------------------------------------- zips

def _zip_folder(src, zpath, prefix="data/"):
    with zipfile.ZipFile(zpath, "w") as z:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                z.write(p, prefix + p.relative_to(src).as_posix())
    return zpath


def test_zip_input(tmp_path):
    src = tmp_path / "src"
    generate_folder(src, 3, seed=6, size=(32, 24))
    z = _zip_folder(src, tmp_path / "in.zip")
    r = A.load_labelme_dataset(z, "voc")
    # one top-level folder (what zipping a folder gives): ids as in the folder itself (issue 15)
    assert r.report.ok and len(r) == 3 and sorted(c.name for c in r) == ["img_0000", "img_0001", "img_0002"]
    rep = A.convert_folder(z, tmp_path / "out", workers=2)
    assert rep.ok and len(list((tmp_path / "out/SegmentationClass").iterdir())) == 3


def _hostile(tmp_path, kind):
    z = tmp_path / f"{kind}.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("data/ok.json", "{}")
        if kind == "slip":
            zf.writestr("data/../../evil.json", "{}")
        elif kind == "absolute":
            zf.writestr("/tmp/evil.json", "{}")
        elif kind == "symlink":
            info = zipfile.ZipInfo("data/link.json")
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, "/etc/passwd")
        elif kind == "bomb_size":
            zf.writestr("data/zeros.bin", b"\0" * (3 << 20))
        elif kind == "bomb_count":
            for i in range(30):
                zf.writestr(f"data/f{i}.json", "{}")
    return z


@pytest.mark.parametrize("kind,match", [("slip", r"\.\."), ("absolute", "absolute"), ("symlink", "symbolic link"),
                                        ("bomb_size", "cap of"), ("bomb_count", "exceed the cap of 10 files")])
def test_hostile_zips_refused(tmp_path, kind, match):
    z = _hostile(tmp_path, kind)
    target = tmp_path / "x"
    with pytest.raises(A.UnsafeArchiveError, match=match):
        A.safe_extract_zip(z, target, max_bytes=1 << 20, max_files=10)
    assert not target.exists() or not any(target.rglob("*"))
    assert not (tmp_path.parent / "evil.json").exists()
    with pytest.raises(A.UnsafeArchiveError):
        A.load_labelme_dataset(z, "voc", max_zip_bytes=1 << 20, max_zip_files=10)
    with pytest.raises(A.UnsafeArchiveError):
        A.convert_folder(z, tmp_path / "out", max_zip_bytes=1 << 20, max_zip_files=10)
    assert not (tmp_path / "out").exists()


def test_zip_lying_about_sizes_is_refused(tmp_path):
    """Declared sizes small, real data big: the bytes actually written are what counts."""
    z = tmp_path / "liar.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("data/zeros.bin", b"\0" * (4 << 20))
    raw = bytearray(z.read_bytes())
    lh = raw.index(b"PK\x03\x04")
    struct.pack_into("<I", raw, lh + 22, 100)  # local header: uncompressed size
    cd = raw.index(b"PK\x01\x02")
    struct.pack_into("<I", raw, cd + 24, 100)  # central directory: uncompressed size
    z.write_bytes(bytes(raw))
    with pytest.raises(A.UnsafeArchiveError):
        A.safe_extract_zip(z, tmp_path / "x", max_bytes=1 << 20)
    assert not (tmp_path / "x").exists()


def test_package_imports_no_heavy_dependencies():
    import subprocess

    code = ("import sys, annotations; bad = [m for m in ('torch', 'segcore', 'gradio', 'yaml', 'labelme') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_written_report_names_files_relative_to_the_input(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _bad_folder(src)
    (src / "sub").mkdir()
    (src / "sub" / "broken.json").write_text("{")
    rep = A.convert_folder(src.resolve(), tmp_path / "out", "voc", workers=1)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    files = [e["file"] for e in saved["errors"] + saved["warnings"]]
    assert "malformed.json" in files and os.path.join("sub", "broken.json") in files
    assert not any(str(tmp_path) in f for f in files)  # no local path leaks into a shared dataset
    assert len(rep.errors) == len(saved["errors"])


def test_label_space_for_names_reuses_builtins_and_builds_custom_ones():
    voc_names = A.get_label_space("voc").class_names
    assert A.builtin_label_space(list(voc_names)) is A.get_label_space("voc")
    assert A.label_space_for_names(voc_names) is A.get_label_space("voc")
    assert A.builtin_label_space(("sky", "road")) is None
    custom = A.label_space_for_names(["_background_", "sky", "road"], name="mine")
    assert custom.name == "mine" and custom.background_index == 0 and custom.class_names[2] == "road"
    assert A.label_space_for_names(["sky", "road"]).background_index is None
    palette = np.array([[1, 2, 3], [4, 5, 6]], np.uint8)
    assert (A.label_space_for_names(["sky", "road"], palette=palette).palette[:2] == palette).all()


def test_palette_image_keeps_indices_and_pads_a_short_palette():
    lbl = np.array([[0, 1], [2, 255]], np.uint8)
    img = A.palette_image(lbl, np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90]], np.uint8))
    assert img.mode == "P" and (np.asarray(img) == lbl).all()
    pal = np.array(img.getpalette(), np.uint8).reshape(-1, 3)
    assert pal[:3].tolist() == [[10, 20, 30], [40, 50, 60], [70, 80, 90]] and not pal[3:].any()
    assert np.array(A.palette_image(lbl).getpalette(), np.uint8).reshape(-1, 3)[1].tolist() == [128, 0, 0]  # VOC
    with pytest.raises(ValueError, match="0..255"):
        A.palette_image(np.array([[0, 300]]))
