"""The labelme pre-label writer: nested regions and holes, names, options, and the round trip back through
``annotations`` and labelme 6.3.1's own ``shapes_to_label``."""

from __future__ import annotations

import json

import labelme
import labelme.utils
import numpy as np
import pytest
from PIL import Image

import annotations
from segcore.prelabel import LabelmeWriter, dumps, read_name_map, round_trip, write_inverse_map

NAMES = ("background", "disc", "square", "triangle")


def nested_map(h=120, w=160):
    """A square (2) holding a background hole that holds a disc (1); a triangle (3) on the border; a
    disc (1) inside a triangle-free square corner."""
    lm = np.zeros((h, w), np.uint8)
    lm[10:100, 10:100] = 2
    lm[30:80, 30:80] = 0          # background hole in the square
    yy, xx = np.mgrid[0:h, 0:w]
    lm[(yy - 55) ** 2 + (xx - 55) ** 2 < 12 ** 2] = 1  # disc inside the hole
    lm[(xx > 120) & (yy > 2 * (xx - 120))] = 3        # triangle touching the right and bottom borders
    lm[12:22, 85:97] = 1          # a disc-class patch inside the square's wall (a class inside another)
    return lm


def write_project(folder, writer, lm, name="img"):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(lm.shape + (3,), 128, np.uint8)).save(folder / f"{name}.png")
    doc = writer.document(lm, f"{name}.png")
    (folder / f"{name}.json").write_text(dumps(doc))
    return folder / f"{name}.json", doc


def through_labelme(json_path, values):
    lf = labelme.LabelFile(filename=str(json_path))
    img = labelme.utils.img_data_to_arr(lf.image_data)
    cls, _ = labelme.utils.shapes_to_label(img.shape, lf.shapes, values)
    return cls


def test_nested_regions_and_holes_come_back_through_annotations_and_labelme(tmp_path):
    lm = nested_map()
    writer = LabelmeWriter(NAMES, description="predicted by test.pth")
    path, doc = write_project(tmp_path, writer, lm)
    labels = [s["label"] for s in doc["shapes"]]
    # the square first, then its background hole, then the disc inside the hole
    assert labels.index("square") < labels.index("background") < max(i for i, l in enumerate(labels) if l == "disc")
    assert labels.count("disc") == 2 and labels.count("background") == 1  # the border background is not written
    assert all(s["description"] == "predicted by test.pth" and s["shape_type"] == "polygon" for s in doc["shapes"])
    raw = json.loads(path.read_text())
    assert raw["imagePath"] == "img.png" and raw["imageData"] is None
    assert (raw["imageHeight"], raw["imageWidth"]) == lm.shape and raw["flags"] == {} and "version" in raw

    space = annotations.label_space_for_names(NAMES)
    ours = annotations.convert_file(path, space).class_map
    theirs = through_labelme(path, {n: i for i, n in enumerate(NAMES)})
    for back in (ours, theirs):
        assert (back == lm).mean() >= 0.995
        assert back[55, 55] == 1 and back[40, 40] == 0 and back[20, 20] == 2 and back[17, 90] == 1
        assert back[110, 125] == 3 and back[5, 150] == 0 and back[110, 5] == 0
    assert round_trip(doc, writer, lm) == pytest.approx((ours == lm).mean())


def test_mapped_names_appear_and_ignored_classes_are_left_out(tmp_path):
    voc = annotations.VOC
    lm = np.zeros((80, 100), np.uint8)
    lm[10:60, 10:50] = voc.index_of("tvmonitor")
    lm[20:70, 60:95] = voc.index_of("person")
    lm[25:45, 20:40] = voc.index_of("person")  # a person in front of the tv: a hole in the tv region
    map_file = tmp_path / "names.yaml"
    map_file.write_text("tvmonitor: tv\nperson: __ignore__\n")
    writer = LabelmeWriter(voc.class_names, names=read_name_map(map_file))
    path, doc = write_project(tmp_path / "project", writer, lm)
    assert {s["label"] for s in doc["shapes"]} == {"tv", "background"}  # the ignored person's hole -> background
    # the project's own map file reads the renamed labels back into the model's label set
    inverse = write_inverse_map(writer, tmp_path / "inverse.yaml")
    back = annotations.convert_file(path, voc, mapping=inverse).class_map
    expected = np.where(lm == voc.index_of("person"), 0, lm)
    assert (back == expected).mean() >= 0.995 and back[35, 30] == 0 and back[15, 15] == voc.index_of("tvmonitor")


def test_min_area_drops_small_regions_and_tolerance_simplifies(tmp_path):
    lm = nested_map()
    lm[110:113, 60:63] = 3  # 9 pixels
    small = [s for s in LabelmeWriter(NAMES, min_area=4).shapes(lm) if s["label"] == "triangle"]
    big = [s for s in LabelmeWriter(NAMES, min_area=10).shapes(lm) if s["label"] == "triangle"]
    assert len(small) == len(big) + 1
    exact = LabelmeWriter(NAMES, tolerance=0).shapes(lm)
    loose = LabelmeWriter(NAMES, tolerance=3).shapes(lm)
    assert sum(len(s["points"]) for s in loose) < sum(len(s["points"]) for s in exact)
    disc = next(s for s in exact if s["label"] == "disc" and len(s["points"]) > 20)
    assert all(float(x).is_integer() for p in disc["points"] for x in p)


def test_a_map_renaming_an_unknown_class_is_refused():
    with pytest.raises(ValueError, match="tvmoniter"):
        LabelmeWriter(annotations.VOC.class_names, names={"tvmoniter": "tv"})


def test_predictions_of_a_briefly_trained_model_round_trip(smoke_model, tmp_path):
    import segcore
    from factories import upscaled_images

    ckpt, run = smoke_model
    seg = segcore.Segmenter.from_pretrained(ckpt, scales=(), test_size=64, device="cpu", precision="fp32")
    writer = LabelmeWriter(seg.class_names, description=f"predicted by {ckpt.name}")
    values = {n: i for i, n in enumerate(seg.class_names)}
    space = annotations.label_space_for_names(seg.class_names)
    classes_seen = set()
    for image in upscaled_images(run, tmp_path / "images", 6):
        lm = seg.predict(image).label_map
        classes_seen |= set(np.unique(lm).tolist())
        Image.open(image).save(tmp_path / image.name)
        doc = writer.document(lm, image.name)
        path = tmp_path / f"{image.stem}.json"
        path.write_text(dumps(doc))
        assert (annotations.convert_file(path, space).class_map == lm).mean() >= 0.995
        assert (through_labelme(path, values) == lm).mean() >= 0.995
    assert len(classes_seen) >= 3  # the model predicts shapes, not one class everywhere
