"""Hostile uploads at library level (issue 13): giant shapes, oversized images, zip budgets per request,
imagePath outside the upload; and zips of one folder keep labelme's ids (issue 15, point 4)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np
import pytest
from labelme_fixtures import LABELME_VOC_NAME_TO_ID, encode_image, make_image, mask_b64
from PIL import Image, ImageDraw, ImageFile

import annotations as A
from annotations.rasterize import PILLOW_MAX_RADIUS
from segcore import DatasetError, ImageError, open_dataset
from segcore.image import check_image_size

# labelme's examples/semantic_segmentation/data_annotated (wkentaro/labelme@51e50e4): file names, labelme
# version, imagePath, image sizes and labels as there; shapes and pixels generated (labelme is GPL-3.0,
# so its files are not copied here)
LABELME_EXAMPLE = {"2011_000003": ((500, 338), ("person", "bottle", "__ignore__")),
                   "2011_000006": ((500, 375), ("person", "chair", "sofa", "__ignore__")),
                   "2011_000025": ((500, 375), ("bus", "car"))}


def _shape(label, points, shape_type="polygon", **extra):
    return {"label": label, "points": [list(map(float, p)) for p in points], "group_id": None,
            "shape_type": shape_type, "flags": {}, **extra}


def _write(path: Path, shapes, width=64, height=48, *, image_path=None, image_data=None, seed=0) -> Path:
    """A labelme file; embeds a generated image unless ``image_path`` (or ``image_data``) says otherwise."""
    if image_data is None and image_path is None:
        image_data = encode_image(make_image(np.random.default_rng(seed), width, height))
    doc = {"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": image_path or f"{path.stem}.png",
           "imageData": base64.b64encode(image_data).decode() if image_data is not None else None,
           "imageHeight": height, "imageWidth": width}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def _labelme_classes(path: Path) -> np.ndarray:
    import labelme
    import labelme.utils

    lf = labelme.LabelFile(filename=str(path))
    img = labelme.utils.img_data_to_arr(lf.image_data)
    cls, _ = labelme.utils.shapes_to_label(img_shape=img.shape, shapes=lf.shapes,
                                           label_name_to_value=LABELME_VOC_NAME_TO_ID)
    return np.where(cls == -1, 255, cls)


# ----------------------------------------------------------------------------- 1. giant shapes


@pytest.fixture
def pillow_radii(monkeypatch):
    """Radii of every ellipse handed to Pillow; a huge one (what made a 400-byte file cost minutes)
    fails the test at once instead of being drawn."""
    seen = []
    original = ImageDraw.ImageDraw.ellipse

    def ellipse(self, xy, *args, **kwargs):
        (x0, y0), (x1, _) = xy
        seen.append((x1 - x0) / 2)
        assert seen[-1] <= PILLOW_MAX_RADIUS, f"Pillow asked to draw a circle of radius {seen[-1]}"
        return original(self, xy, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "ellipse", ellipse)
    return seen


@pytest.mark.parametrize("centre,edge", [((30, 20), (999999, 999999)),    # covers the whole image
                                         ((-999000, 20), (40, 20)),        # its edge crosses the image
                                         ((999999, -999999), (0, 0)),      # edge crosses a corner
                                         ((999999, 999999), (500000, 999999))])  # far away, misses it
def test_giant_circles_are_clipped_to_the_image(tmp_path, pillow_radii, centre, edge):
    w, h = 64, 48
    f = _write(tmp_path / "c.json", [_shape("cat", [centre, edge], "circle")], w, h)
    cls = A.convert_file(f, "voc").class_map
    assert max(pillow_radii, default=0) <= PILLOW_MAX_RADIUS  # Pillow's ellipse never walks a huge circle
    # independent expectation: pixel centres within the radius, exact away from the boundary
    r = np.hypot(centre[0] - edge[0], centre[1] - edge[1])
    yy, xx = np.mgrid[0:h, 0:w]
    dist = np.hypot(xx - centre[0], yy - centre[1])
    sure = np.abs(dist - r) > 1.5
    expect = np.where(dist <= r, 8, 0)  # cat = 8
    np.testing.assert_array_equal(cls[sure], expect[sure])
    assert (cls[~sure] != expect[~sure]).sum() <= max(w, h)  # boundary pixels only


def test_giant_circle_of_the_issue_costs_a_span_per_row(tmp_path, monkeypatch, pillow_radii):
    """Two circles whose edge point is at 999999,999999 (issue 13's file; with a radius of exactly a
    million, Pillow's ellipse took 172 s here): drawn as one span per image row each."""
    calls = []
    original = ImageDraw.ImageDraw.rectangle
    monkeypatch.setattr(ImageDraw.ImageDraw, "rectangle", lambda self, *a, **k: (calls.append(1),
                                                                                 original(self, *a, **k))[1])
    f = _write(tmp_path / "c.json", [_shape("cat", [(999999, -1), (999999, 999999)], "circle"),
                                     _shape("dog", [(-1, 999999), (999999, 999999)], "circle")], 64, 48)
    assert f.stat().st_size < 20_000
    cls = A.convert_file(f, "voc").class_map
    assert (cls == 12).all()  # dog, drawn last, covers everything
    assert len(calls) <= 2 * 48


@pytest.mark.parametrize("shape", [
    _shape("cat", [(10, 10), (999999, 20), (999999, 999999), (5, 999999)]),
    _shape("cat", [(-999999, -999999), (999999, 30), (20, 999999)]),
    _shape("dog", [(-999999, -999999), (30, 20)], "rectangle"),
    _shape("dog", [(999999, 999999), (-999999, -999999)], "rectangle"),
    _shape("cat", [(5, 5), (999999, 999999)], "line"),
    _shape("cat", [(5, 40), (999999, -999999), (-999999, 999999), (60, 2)], "linestrip"),
    _shape("cat", [(999999, 999999)], "point"),
    _shape("cat", [(-999990, 24)], "point"),
    _shape("cat", [(30, 20), (30, 60000)], "circle"),         # radius under the cap: Pillow, as labelme
    _shape("cat", [(-59990, 24), (0, 24)], "circle"),
], ids=lambda s: s["shape_type"])
def test_off_image_shapes_match_labelme(tmp_path, shape):
    """Shapes reaching far outside the image: labelme 6.3.1's result inside the image, pixel for pixel."""
    f = _write(tmp_path / "s.json", [_shape("person", [(2, 2), (60, 3), (30, 45)]), shape], 64, 48)
    ours = A.convert_file(f, "voc").class_map
    np.testing.assert_array_equal(ours.astype(np.int64), _labelme_classes(f))


def test_circles_just_over_the_cap_agree_with_labelme_up_to_boundary_pixels(tmp_path):
    """Radii labelme (Pillow) still draws quickly and correctly: the row spans agree but for a few
    boundary pixels, for circles covering, crossing and missing the image."""
    w, h = 64, 48
    rng = np.random.default_rng(3)
    for k in range(6):
        r = float(rng.uniform(PILLOW_MAX_RADIUS + 1, 200_000))
        angle = rng.uniform(0, 2 * np.pi)
        off = rng.uniform(-30, 30)
        cx, cy = 32 + np.cos(angle) * (r + off), 24 + np.sin(angle) * (r + off)
        f = _write(tmp_path / f"c{k}.json", [_shape("cat", [(cx, cy), (cx + r, cy)], "circle")], w, h)
        ours = A.convert_file(f, "voc").class_map.astype(np.int64)
        ref = _labelme_classes(f)
        assert (ours != ref).sum() <= 24, k


# ----------------------------------------------------------------------------- 2. pixel cap


def _big_png(width=10_000, height=10_000) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails the test if Pillow decodes an image of more than a megapixel."""
    original = ImageFile.ImageFile.load

    def load(self):
        if self.size[0] * self.size[1] > 1_000_000:
            raise AssertionError(f"decoded a {self.size} image")
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_embedded_image_over_the_cap_is_refused_from_its_header(tmp_path, no_decoding):
    data = _big_png()
    assert len(data) < 100_000  # 100 megapixels in a few kilobytes
    f = _write(tmp_path / "big.json", [_shape("cat", [(1, 1), (5, 1), (5, 5)])], 10_000, 10_000, image_data=data)
    with pytest.raises(A.ImageTooLargeError, match=r"10000x10000 = 100,000,000 pixels exceeds the cap"):
        A.read_labelme(f)
    with pytest.raises(A.ImageTooLargeError, match="cap of 1,000,000"):
        A.read_labelme(f, max_pixels=1_000_000)


def test_mask_patch_over_the_cap_is_refused(tmp_path, no_decoding):
    patch = base64.b64encode(_big_png(8000, 8000)).decode()
    f = _write(tmp_path / "m.json", [_shape("cat", [(0, 0), (8000, 8000)], "mask", mask=patch)],
               image_data=encode_image(np.zeros((48, 64, 3), np.uint8)))
    with pytest.raises(A.LabelmeFormatError, match=r"shape 0: mask PNG: 8000x8000 = 64,000,000 pixels"):
        A.read_labelme(f)


def test_cap_applies_to_image_files_zips_and_conversion(tmp_path):
    """A referenced image file over the cap is a per-file error in a folder, a zip and convert_folder;
    the other files still convert."""
    src = tmp_path / "set"
    _write(src / "ok.json", [_shape("cat", [(1, 1), (30, 1), (30, 30)])])
    Image.fromarray(make_image(np.random.default_rng(1), 400, 300)).save(src / "big.png")
    _write(src / "big.json", [_shape("cat", [(1, 1), (30, 1), (30, 30)])], 400, 300, image_path="big.png")
    z = tmp_path / "set.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted(src.iterdir()):
            zf.write(p, f"set/{p.name}")
    for source in (src, z):
        loaded = A.load_labelme_dataset(source, "voc", max_pixels=100_000)
        assert [c.name for c in loaded] == ["ok"]
        assert len(loaded.report.errors) == 1 and "exceeds the cap of 100,000" in loaded.report.errors[0]["reason"]
        assert loaded.report.errors[0]["file"].endswith("big.json")
    report = A.convert_folder(z, tmp_path / "out", "voc", max_pixels=100_000, workers=1)
    assert report.converted == ["set/ok.json"] and report.failed == ["set/big.json"]
    ds = open_dataset(src, "labelme", max_pixels=100_000)
    with pytest.raises(DatasetError, match="exceeds the cap"):
        ds[[s for s in range(len(ds)) if ds.names()[s] == "big"][0]]
    assert A.load_labelme_dataset(src, "voc").report.ok  # under the default cap both convert


def test_frame_size_is_checked_from_the_header(tmp_path, no_decoding):
    """What the webcam and image callbacks call before decoding a frame."""
    data = _big_png(12_000, 12_000)  # 144 megapixels
    with pytest.raises(ImageError, match="144,000,000 pixels exceeds the cap of 25,000,000"):
        check_image_size(data, max_pixels=25_000_000, name="webcam frame")
    (tmp_path / "f.png").write_bytes(_big_png(640, 480))
    assert check_image_size(tmp_path / "f.png", max_pixels=25_000_000) == (640, 480)
    assert A.image_size(tmp_path / "f.png") == (640, 480)
    stream = io.BytesIO(_big_png(640, 480))
    assert check_image_size(stream) == (640, 480) and stream.tell() == 0  # ready to be decoded next
    with pytest.raises(ImageError, match="exceeds the cap"):
        check_image_size(np.zeros((600, 500, 3), np.uint8), max_pixels=100_000)


# ----------------------------------------------------------------------------- 3. zip budget per request


def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def test_budget_is_shared_by_every_zip_of_a_request(tmp_path):
    zips = [_zip(tmp_path / f"part{k}.zip", {f"d/f{k}.bin": bytes(400_000)}) for k in range(3)]
    budget = A.ExtractionBudget(max_bytes=1_000_000, max_files=100)
    A.safe_extract_zip(zips[0], tmp_path / "x0", budget=budget)
    A.safe_extract_zip(zips[1], tmp_path / "x1", budget=budget)
    assert budget.bytes_used == 800_000 and budget.files_used == 2
    with pytest.raises(A.UnsafeArchiveError, match=r"^part2\.zip: declared unpacked size exceeds the cap of "
                                                   r"200,000 bytes \(what is left of this request's 1,000,000"):
        A.safe_extract_zip(zips[2], tmp_path / "x2", budget=budget)
    assert not (tmp_path / "x2").exists() and budget.bytes_used == 800_000
    # each zip alone is within the old per-zip cap: only the shared budget refuses the third
    A.safe_extract_zip(zips[2], tmp_path / "alone", max_bytes=1_000_000)


def test_budget_counts_files_across_zips(tmp_path):
    a = _zip(tmp_path / "a.zip", {f"a/{i}.json": b"{}" for i in range(6)})
    b = _zip(tmp_path / "b.zip", {f"b/{i}.json": b"{}" for i in range(6)})
    budget = A.ExtractionBudget(max_bytes=10**6, max_files=10)
    with pytest.raises(A.UnsafeArchiveError, match=r"^b\.zip: 6 entries exceed the cap of 4 files"):
        with A.extracted_zips([a, b], budget):
            pass


def test_budget_counts_bytes_actually_inflated_not_declared(tmp_path):
    """A zip whose headers declare 100 bytes but which inflates to 4 MB is stopped while streaming."""
    import struct

    z = _zip(tmp_path / "liar.zip", {"d/zeros.bin": bytes(4 << 20)})
    raw = bytearray(z.read_bytes())
    struct.pack_into("<I", raw, raw.index(b"PK\x03\x04") + 22, 100)
    struct.pack_into("<I", raw, raw.index(b"PK\x01\x02") + 24, 100)
    z.write_bytes(bytes(raw))
    budget = A.ExtractionBudget(max_bytes=1 << 20)
    with pytest.raises(A.UnsafeArchiveError, match=r"^liar\.zip: "):
        A.safe_extract_zip(z, tmp_path / "x", budget=budget)
    assert not (tmp_path / "x").exists() and budget.bytes_used == 0


def test_extractions_are_removed_when_the_work_fails(tmp_path):
    z = _zip(tmp_path / "set.zip", {"set/a.json": b"{}"})
    with pytest.raises(RuntimeError):
        with A.extracted_zips(z) as folders:
            kept = folders[0]
            assert (kept / "set" / "a.json").is_file()
            raise RuntimeError("evaluation failed")
    assert not kept.exists()
    src = tmp_path / "lm"
    _write(src / "a.json", [_shape("cat", [(1, 1), (30, 1), (30, 30)])])
    with zipfile.ZipFile(tmp_path / "lm.zip", "w") as zf:
        zf.write(src / "a.json", "lm/a.json")
    with pytest.raises(RuntimeError):
        with open_dataset(tmp_path / "lm.zip", "labelme") as ds:
            extraction = Path(ds._tmp)
            assert extraction.is_dir()
            raise RuntimeError("evaluation failed")
    assert not extraction.exists()  # at once, not at garbage collection (ds is still referenced)
    assert ds is not None
    with pytest.raises(DatasetError, match=r"lm\.zip: declared unpacked size exceeds the cap"):
        open_dataset(tmp_path / "lm.zip", "labelme", budget=A.ExtractionBudget(max_bytes=10))


# ----------------------------------------------------------------------------- 4. imagePath stays inside


@pytest.fixture
def server_files(tmp_path):
    """An image outside the upload (a server file) and the upload folder."""
    outside = tmp_path / "server"
    outside.mkdir()
    Image.fromarray(make_image(np.random.default_rng(2), 64, 48)).save(outside / "secret.png")
    upload = tmp_path / "upload"
    upload.mkdir()
    return outside / "secret.png", upload


def _path_error(json_path: Path, root=None) -> str:
    with pytest.raises(A.ImageLoadError) as err:
        A.read_labelme(json_path, root=root)
    return str(err.value)


def test_absolute_image_paths_are_never_read_and_say_nothing(server_files):
    secret, upload = server_files
    poly = [_shape("cat", [(1, 1), (30, 1), (30, 30)])]
    existing = _write(upload / "a.json", poly, image_path=str(secret))
    missing = _write(upload / "b.json", poly, image_path=str(secret.with_name("nothing.png")))
    msg_existing = _path_error(existing).replace(str(secret), "P").replace("a.json", "X")
    msg_missing = _path_error(missing).replace(str(secret.with_name("nothing.png")), "P").replace("b.json", "X")
    assert msg_existing == msg_missing and "not found in the input folder or zip" in msg_existing
    win = _write(upload / "w.json", poly, image_path="C:\\Users\\x\\secret.png")
    assert "not found in the input folder or zip" in _path_error(win)


def test_dotdot_and_symlinks_out_of_the_upload_are_refused(server_files):
    secret, upload = server_files
    poly = [_shape("cat", [(1, 1), (30, 1), (30, 30)])]
    up = _write(upload / "up.json", poly, image_path="../server/secret.png")
    up_missing = _write(upload / "up2.json", poly, image_path="../server/none.png")
    assert _path_error(up).replace("../server/secret.png", "P").replace("up.json", "X") == \
        _path_error(up_missing).replace("../server/none.png", "P").replace("up2.json", "X")
    (upload / "link.png").symlink_to(secret)
    link = _write(upload / "link.json", poly, image_path="link.png")
    assert "not found in the input folder or zip" in _path_error(link)
    # inside the upload, '..' and sub-folders are fine (labelme's images/ beside annotations/ layout)
    (upload / "images").mkdir()
    shutil.copyfile(secret, upload / "images" / "ok.png")
    inside = _write(upload / "annotations" / "ok.json", poly, image_path="../images/ok.png")
    assert A.read_labelme(inside, root=upload).size == (64, 48)
    assert "not found" in _path_error(inside)  # without the root, the JSON's own folder bounds it


def test_conversion_and_evaluation_never_copy_a_server_file(server_files, tmp_path):
    secret, upload = server_files
    poly = [_shape("cat", [(1, 1), (30, 1), (30, 30)])]
    _write(upload / "abs.json", poly, image_path=str(secret))
    _write(upload / "rel.json", poly, image_path="../server/secret.png")
    _write(upload / "ok.json", poly)
    report = A.convert_folder(upload, tmp_path / "out", "voc", workers=1)
    assert report.converted == ["ok.json"] and sorted(report.failed) == ["abs.json", "rel.json"]
    for e in report.errors:  # the message echoes the imagePath the user sent, and says nothing else of it
        assert "server" not in e["reason"].replace(str(secret), "").replace("../server/secret.png", "")
    assert sorted(p.name for p in (tmp_path / "out" / "JPEGImages").iterdir()) == ["ok.jpg"]
    ds = open_dataset(upload, "labelme")
    for i, name in enumerate(ds.names()):
        if name == "ok":
            assert ds[i].image.shape == (48, 64, 3)
        else:
            with pytest.raises(DatasetError, match="not found in the input folder or zip"):
                ds[i]


# ----------------------------------------------------------------------------- 7. ids of a zipped folder


def _labelme_example(folder: Path) -> list[str]:
    """A folder laid out as labelme's data_annotated: ``<id>.json`` beside ``<id>.jpg``, imageData null."""
    rng = np.random.default_rng(15)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, ((w, h), labels) in LABELME_EXAMPLE.items():
        shapes = [_shape(label, rng.uniform((0, 0), (w, h), size=(int(rng.integers(3, 12)), 2)))
                  for label in labels]
        Image.fromarray(make_image(rng, w, h)).save(folder / f"{stem}.jpg", quality=95)
        doc = {"version": "4.0.0", "flags": {}, "shapes": shapes, "imagePath": f"{stem}.jpg", "imageData": None,
               "imageHeight": h, "imageWidth": w}
        (folder / f"{stem}.json").write_text(json.dumps(doc, indent=2))
    return list(LABELME_EXAMPLE)


def test_zip_of_labelme_example_folder_keeps_its_ids(tmp_path):
    stems = _labelme_example(tmp_path / "data_annotated")
    assert stems == ["2011_000003", "2011_000006", "2011_000025"]
    z = tmp_path / "data_annotated.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("data_annotated/", b"")
        for p in sorted((tmp_path / "data_annotated").iterdir()):
            zf.write(p, f"data_annotated/{p.name}")
        zf.writestr("__MACOSX/data_annotated/._2011_000003.json", b"\0")  # what macOS adds
    loaded = A.load_labelme_dataset(z, "voc")
    assert loaded.report.ok, loaded.report.errors
    assert [c.name for c in loaded] == stems
    out = tmp_path / "voc"
    A.convert_folder(z, out, "voc", workers=1)
    assert sorted(p.stem for p in (out / "JPEGImages").iterdir()) == stems
    assert (out / "ImageSets/Segmentation/all.txt").read_text().split() == stems
    assert open_dataset(z, "labelme").names() == stems
    # the same folder, not zipped, gives the same ids
    assert [c.name for c in A.load_labelme_dataset(tmp_path / "data_annotated", "voc")] == stems


def test_deeper_folders_keep_their_prefix_and_ids_never_collide(tmp_path):
    poly = [_shape("cat", [(1, 1), (30, 1), (30, 30)])]
    src = tmp_path / "src"
    for rel in ("top/a.json", "top/sub/a.json", "top/sub__a.json"):
        _write(src / rel, poly)
    z = tmp_path / "one.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted(src.rglob("*.json")):
            zf.write(p, p.relative_to(src).as_posix())
    names = [c.name for c in A.load_labelme_dataset(z, "voc")]
    assert sorted(names) == ["a", "sub__a", "sub__a__2"]
    two = tmp_path / "two.zip"
    with zipfile.ZipFile(two, "w") as zf:
        zf.write(src / "top/a.json", "x/a.json")
        zf.write(src / "top/a.json", "y/a.json")
    assert sorted(c.name for c in A.load_labelme_dataset(two, "voc")) == ["x__a", "y__a"]
    assert sorted(open_dataset(two, "labelme").names()) == ["x__a", "y__a"]


def test_mask_files_over_the_cap_are_refused_from_the_header(tmp_path, no_decoding):
    from segcore.datasets import read_label

    (tmp_path / "gt.png").write_bytes(_big_png(10_000, 10_000))
    with pytest.raises(DatasetError, match="100,000,000 pixels exceeds the cap"):
        read_label(tmp_path / "gt.png")
