"""segcore.datasets: VOC, COCO-Stuff 10k/164k, labelme and mask-pair layouts, and bad input."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
from dataset_files import (labelme_folder, labelme_json, random_label, rgb, save_image, save_palette_png,
                           voc_folder)
from PIL import Image

import annotations as A
from segcore.datasets import DatasetError, Sample, detect_format, open_dataset

# ----------------------------------------------------------------------------- VOC


def test_voc_folder_reads_indices_and_defaults_to_val(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    labels = voc_folder(root, ["a", "b", "c"])
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("a\nc\n")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("b\n")
    assert detect_format(tmp_path) == "voc"
    ds = open_dataset(tmp_path, label_space="voc")
    assert (len(ds), ds.split, ds.class_names[15]) == (2, "val", "person")
    s = ds[1]
    assert isinstance(s, Sample) and s.name == "c"
    assert s.image.shape == (24, 32, 3) and s.image.dtype == np.uint8
    assert s.label.dtype == np.uint8 and np.array_equal(s.label, labels["c"])
    assert [x.name for x in open_dataset(root, "voc", split="train")] == ["b"]
    assert ds.describe()["images"] == 2 and ds.describe()["format"] == "voc"


def test_voc_train_aug_two_path_lines(tmp_path):
    labels = voc_folder(tmp_path, ["x1", "x2"], label_dir="SegmentationClassAug")
    # SegmentationClassAug masks are plain grayscale PNGs
    Image.fromarray(labels["x2"], mode="L").save(tmp_path / "SegmentationClassAug" / "x2.png")
    (tmp_path / "ImageSets" / "SegmentationAug").mkdir(parents=True)
    (tmp_path / "ImageSets" / "SegmentationAug" / "train_aug.txt").write_text(
        "/JPEGImages/x1.jpg /SegmentationClassAug/x1.png\n/JPEGImages/x2.jpg /SegmentationClassAug/x2.png\n")
    ds = open_dataset(tmp_path, split="train_aug")
    assert [s.name for s in ds] == ["x1", "x2"]
    assert np.array_equal(ds[0].label, labels["x1"]) and np.array_equal(ds[1].label, labels["x2"])


def test_annotations_converter_output_is_a_voc_dataset(tmp_path):
    labelme_folder(tmp_path / "lm", count=3)
    report = A.convert_folder(tmp_path / "lm", tmp_path / "voc", "voc", workers=1)
    assert report.ok
    ds = open_dataset(tmp_path / "voc")
    assert ds.format == "voc" and ds.split == "all" and len(ds) == 3
    assert ds.class_names == A.VOC.class_names  # from class_names.txt
    direct = A.convert_file(tmp_path / "lm" / "img1.json", "voc")
    sample = ds[[s.name for s in ds].index("img1")]
    assert np.array_equal(sample.label, direct.class_map)


# ----------------------------------------------------------------------------- COCO-Stuff


def test_cocostuff10k_mat_labels_are_shifted_like_the_reference(tmp_path):
    from scipy.io import savemat

    h, w = 20, 30
    rng = np.random.default_rng(3)
    raw = {}
    for k, i in enumerate(["COCO_train2014_000000000077", "COCO_train2014_000000000078"]):
        save_image(tmp_path / "images" / f"{i}.jpg", rgb(h, w, k))
        s = rng.integers(0, 183, (h, w)).astype(np.uint16)  # 0 = unlabeled, 1..182 classes
        s[0, :4] = [0, 1, 182, 92]
        (tmp_path / "annotations").mkdir(exist_ok=True)
        savemat(tmp_path / "annotations" / f"{i}.mat", {"S": s})
        raw[i] = s
    (tmp_path / "imageLists").mkdir()
    (tmp_path / "imageLists" / "test.txt").write_text("COCO_train2014_000000000078\n")
    (tmp_path / "imageLists" / "train.txt").write_text("COCO_train2014_000000000077\n")
    assert detect_format(tmp_path) == "cocostuff10k"
    ds = open_dataset(tmp_path)
    assert ds.split == "test" and len(ds) == 1 and len(ds.class_names) == 182
    lab = ds[0].label
    assert lab[0, :4].tolist() == [255, 0, 181, 91]
    s = raw["COCO_train2014_000000000078"].astype(int)
    assert np.array_equal(lab, np.where(s == 0, 255, s - 1))


def test_cocostuff164k_pngs_used_as_is(tmp_path):
    h, w = 18, 26
    lab = random_label(h, w, 182, seed=5)
    save_image(tmp_path / "images" / "val2017" / "000000000139.jpg", rgb(h, w))
    (tmp_path / "annotations" / "val2017").mkdir(parents=True)
    Image.fromarray(lab, mode="L").save(tmp_path / "annotations" / "val2017" / "000000000139.png")
    save_image(tmp_path / "images" / "train2017" / "000000000009.jpg", rgb(h, w))
    assert detect_format(tmp_path) == "cocostuff164k"
    ds = open_dataset(tmp_path)
    assert ds.split == "val2017" and [s.name for s in ds] == ["000000000139"]
    assert np.array_equal(ds[0].label, lab) and ds.class_names[0] == A.COCOSTUFF.class_names[0]


# ----------------------------------------------------------------------------- labelme and masks


def test_labelme_folder_and_zip_match_the_converter(tmp_path):
    folder = labelme_folder(tmp_path / "lm", count=2)
    ds = open_dataset(folder)
    assert ds.format == "labelme" and len(ds) == 2 and ds.class_names == A.VOC.class_names
    expect = A.convert_file(folder / "img0.json", "voc")
    assert np.array_equal(ds[0].label, expect.class_map) and np.array_equal(ds[0].image, expect.image)
    with zipfile.ZipFile(tmp_path / "lm.zip", "w") as z:
        for p in sorted(folder.iterdir()):
            z.write(p, f"set/{p.name}")
    zds = open_dataset(tmp_path / "lm.zip")
    assert [s.name for s in zds] == ["img0", "img1"]  # a zip of one folder: ids as in the folder (issue 15)
    assert np.array_equal(zds[1].label, ds[1].label)
    tmp = zds._tmp
    zds.close()
    assert not (tmp and __import__("os").path.exists(tmp))


def test_labelme_unknown_label_names_the_file_and_mapping_fixes_it(tmp_path):
    labelme_json(tmp_path, "odd", rgb(20, 20), [("human", "rectangle", [(2, 2), (12, 12)])])
    ds = open_dataset(tmp_path, "labelme")
    with pytest.raises(DatasetError, match=r"odd\.json.*unknown label 'human'"):
        ds[0]
    mapped = open_dataset(tmp_path, "labelme", mapping={"human": "person"})
    assert (mapped[0].label == 15).sum() > 0


def test_masks_pairs_by_stem_and_reports_unpaired(tmp_path):
    gt, pred = random_label(10, 12, 21, 1), random_label(10, 12, 21, 2, ignore=False)
    save_palette_png(tmp_path / "gt" / "a.png", gt)
    save_palette_png(tmp_path / "pred" / "a.png", pred)
    save_palette_png(tmp_path / "gt" / "only_gt.png", gt)
    ds = open_dataset(tmp_path / "gt", "masks", predictions=tmp_path / "pred", label_space="voc")
    assert len(ds) == 2 and np.array_equal(ds[0].prediction, pred) and np.array_equal(ds[0].label, gt)
    with pytest.raises(DatasetError, match="only_gt.png: ground-truth mask without a prediction"):
        ds[1]


# ----------------------------------------------------------------------------- bad input


def test_image_without_mask_and_mask_of_other_size_name_the_file(tmp_path):
    voc_folder(tmp_path, ["ok", "nomask", "small"])
    (tmp_path / "SegmentationClass" / "nomask.png").unlink()
    save_palette_png(tmp_path / "SegmentationClass" / "small.png", np.zeros((5, 7), np.uint8))
    ds = open_dataset(tmp_path)  # no ImageSets: every image
    assert ds.split is None and len(ds) == 3
    with pytest.raises(DatasetError, match=r"nomask\.jpg: image without a ground-truth mask"):
        ds[[s.name for s in ds.items].index("nomask")]
    with pytest.raises(DatasetError, match=r"small\.png: mask is 7x5 pixels but its image .*small\.jpg"):
        ds[[s.name for s in ds.items].index("small")]


def test_unreadable_and_rgb_masks_are_errors(tmp_path):
    voc_folder(tmp_path, ["a", "b"])
    (tmp_path / "SegmentationClass" / "a.png").write_bytes(b"not a png")
    Image.fromarray(rgb(24, 32)).save(tmp_path / "SegmentationClass" / "b.png")
    ds = open_dataset(tmp_path)
    with pytest.raises(DatasetError, match=r"a\.png: cannot read the label image"):
        ds[0]
    with pytest.raises(DatasetError, match=r"b\.png: the label image is mode 'RGB'"):
        ds[1]


def test_empty_missing_and_unknown(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: the folder is empty\nexpected layouts:\nvoc:"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="nope: dataset not found"):
        open_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="unknown dataset format 'kitti'"):
        open_dataset(tmp_path / "empty", "kitti")
    voc_folder(tmp_path / "v", ["a"])
    (tmp_path / "v" / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "v" / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    with pytest.raises(DatasetError, match=r"(?s)val\.txt: the list file is empty.*JPEGImages/<id>\.jpg"):
        open_dataset(tmp_path / "v")
    with pytest.raises(DatasetError, match=r"no list file for split 'test' \(available: val\)"):
        open_dataset(tmp_path / "v", split="test")
