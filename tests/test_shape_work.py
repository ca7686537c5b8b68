"""The work bound on a labelme file's shapes (annotations.ShapeWork): edges crossing rows, mask memory."""

from __future__ import annotations

import numpy as np
import pytest
from labelme_fixtures import costly_labelme, generate_folder, mask_b64, write_labelme

import annotations as A
from annotations.limits import MAX_CROSSINGS_PER_ROW, MAX_MASK_COVER


def polygon(points, label="cat", shape_type="polygon"):
    return {"label": label, "points": points, "shape_type": shape_type, "group_id": None, "flags": {}}


def test_crossings_are_the_rows_edges_cross_inside_the_image():
    work = A.ShapeWork(30, 20, "f.json")
    work.add_shape("polygon", [(0, 0), (10, 0), (10, 10), (0, 10)], None, 0)
    assert work.crossings == 0 + 10 + 0 + 10 + 4  # closed: the last edge goes back up; one per vertex
    work.add_shape("linestrip", [(0, 0), (5, 15)], None, 1)
    assert work.crossings == 24 + 15 + 2  # open: no edge back
    work.add_shape("polygon", [(0, -5000), (9, 90000), (3, -70000)], None, 2)
    assert work.crossings == 41 + 2 * 21 + 3  # far outside the image: edges count the image's rows only
    work.add_shape("circle", [(15, 10), (999990, 10)], None, 3)
    assert work.crossings == 86 + 21 + 2  # a giant circle costs the image's rows, not its radius


def test_costly_polygon_is_refused_before_it_is_drawn(tmp_path):
    over = costly_labelme(tmp_path / "over.json", side=400, crossings_per_row=1.2 * MAX_CROSSINGS_PER_ROW)
    with pytest.raises(A.ShapeWorkError, match=r"over\.json: shape 0: .* over the cap of 400,000 \(1,000"):
        A.read_labelme(over)
    under = costly_labelme(tmp_path / "under.json", side=400, crossings_per_row=0.9 * MAX_CROSSINGS_PER_ROW)
    assert len(A.read_labelme(under).shapes[0].points) > 1000


def test_masks_may_cover_the_image_a_bounded_number_of_times(tmp_path):
    image = np.zeros((20, 30, 3), np.uint8)
    full = polygon([[0, 0], [29, 19]], shape_type="mask")
    full["mask"] = mask_b64(np.ones((20, 30), bool))
    write_labelme(tmp_path / "ok.json", [full] * MAX_MASK_COVER, image)
    assert len(A.read_labelme(tmp_path / "ok.json").shapes) == MAX_MASK_COVER
    write_labelme(tmp_path / "over.json", [full] * (MAX_MASK_COVER + 1), image)
    with pytest.raises(A.ShapeWorkError, match=rf"shape {MAX_MASK_COVER}: the mask shapes hold"):
        A.read_labelme(tmp_path / "over.json")


def test_a_costly_file_fails_alone_in_a_conversion(tmp_path):
    src = tmp_path / "in"
    generate_folder(src, 2, seed=3, size=(48, 40), n_shapes=4)
    costly_labelme(src / "costly.json", side=300, crossings_per_row=2 * MAX_CROSSINGS_PER_ROW)
    report = A.convert_folder(src, tmp_path / "out", "voc", workers=1)
    assert report.failed == ["costly.json"] and len(report.converted) == 2
    assert "drawing them would take too long" in str(report.errors)
