"""Tests for segcore.metrics: hand-computed matrices, torchmetrics, the reference formulas, gloo."""

from __future__ import annotations

import json
import math
import socket
import warnings

import numpy as np
import pytest
import torch

from segcore.metrics import (
    ConfusionMatrix,
    MetricsError,
    _torch_hist,
    compute_scores,
    image_scores,
    to_json_dict,
)

# ---------------------------------------------------------------- hand-computed cases

# 3 classes, one ignored pixel.  Counted (gt, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,0)
GT1 = np.array([[0, 0, 1], [1, 2, 255]], dtype=np.uint8)
PRED1 = np.array([[0, 1, 1], [1, 0, 2]], dtype=np.int64)
M1 = [[1, 1, 0], [0, 2, 0], [1, 0, 0]]

# 4 classes: class 2 occurs nowhere, class 3 only in the prediction.
GT2 = np.array([0, 0, 1, 1])
PRED2 = np.array([0, 3, 1, 1])


def test_hand_computed_matrix_and_scores():
    cm = ConfusionMatrix(3)
    cm.update(GT1, PRED1)
    s = cm.compute()
    assert s["confusion_matrix"] == M1
    assert s["n_classes"] == 3
    assert s["gt_pixels"] == [2, 2, 1]
    assert s["pred_pixels"] == [2, 3, 0]
    assert s["present"] == [True, True, True]
    assert s["pixel_accuracy"] == pytest.approx(3 / 5)
    assert s["class_accuracy"] == pytest.approx([1 / 2, 1.0, 0.0])
    assert s["mean_accuracy"] == pytest.approx(1 / 2)
    assert s["class_iou"] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert s["mean_iou"] == pytest.approx(1 / 3)
    assert s["fw_iou"] == pytest.approx(2 / 5 * 1 / 3 + 2 / 5 * 2 / 3 + 1 / 5 * 0)
    assert s["class_precision"][:2] == pytest.approx([1 / 2, 2 / 3])
    assert math.isnan(s["class_precision"][2])  # class 2 is never predicted: 0/0
    assert s["class_dice"] == pytest.approx([2 / 4, 4 / 5, 0.0])
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou"):
        assert isinstance(s[key], float)


def test_absent_and_prediction_only_classes_are_absent_not_zero():
    cm = ConfusionMatrix(4)
    cm.update(GT2, PRED2)
    s = cm.compute()
    assert s["confusion_matrix"] == [[1, 0, 0, 1], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert s["present"] == [True, True, False, False]
    assert s["pred_pixels"] == [1, 2, 0, 1]
    assert s["class_iou"][:2] == pytest.approx([0.5, 1.0])
    for key in ("class_iou", "class_accuracy", "class_precision", "class_dice"):
        assert math.isnan(s[key][2]) and math.isnan(s[key][3]), key
    assert s["mean_iou"] == pytest.approx(0.75)  # not (0.5 + 1 + 0) / 3
    assert s["mean_accuracy"] == pytest.approx(0.75)
    assert s["fw_iou"] == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)
    assert s["pixel_accuracy"] == pytest.approx(0.75)


def test_empty_matrix_gives_nan_without_crashing():
    cm = ConfusionMatrix(3)
    s = cm.compute()
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou"):
        assert math.isnan(s[key])
    cm.update(np.full((4, 4), 255, np.uint8), np.zeros((4, 4), np.int64))
    s = cm.compute()
    assert s["gt_pixels"] == [0, 0, 0] and s["present"] == [False] * 3
    assert all(math.isnan(v) for v in s["class_iou"])
    assert math.isnan(s["mean_iou"]) and math.isnan(s["fw_iou"])
    # an image with zero pixels is fine too
    cm.update(np.zeros((0, 5), np.uint8), np.zeros((0, 5), np.uint8))
    assert math.isnan(image_scores(np.zeros((0,), int), np.zeros((0,), int), 3)["mean_iou"])


def test_out_of_range_ground_truth_is_ignored_and_predictions_there_are_not_checked():
    cm = ConfusionMatrix(3, ignore_index=255)
    gt = np.array([5, -1, 0, 255, 3])
    pred = np.array([7, -3, 0, 99, 1])  # only the third pixel is counted
    cm.update(gt, pred)
    assert cm.compute()["confusion_matrix"] == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_ignore_index_inside_the_class_range_is_skipped():
    cm = ConfusionMatrix(3, ignore_index=0)
    cm.update(np.array([0, 1, 2]), np.array([1, 1, 1]))
    assert cm.compute()["confusion_matrix"] == [[0, 0, 0], [0, 1, 0], [0, 1, 0]]


@pytest.mark.parametrize("as_torch", [False, True])
def test_prediction_out_of_range_names_the_values(as_torch):
    gt = np.array([0, 1, 1, 255])
    pred = np.array([0, 7, -2, 300])  # 300 sits on an ignored pixel: fine
    cm = ConfusionMatrix(3)
    if as_torch:
        gt, pred = torch.from_numpy(gt), torch.from_numpy(pred)
    with pytest.raises(MetricsError) as err:
        cm.update(gt, pred, name="img_007.png")
    msg = str(err.value)
    assert "img_007.png" in msg and "-2" in msg and "7" in msg and "300" not in msg
    assert isinstance(err.value, ValueError)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError) as err:
        ConfusionMatrix(3).update(np.zeros((4, 5), np.uint8), np.zeros((5, 4), np.int64))
    assert "(4, 5)" in str(err.value) and "(5, 4)" in str(err.value)
    with pytest.raises(ValueError) as err:
        ConfusionMatrix(3).update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    assert "(2, 3)" in str(err.value) and "(3,)" in str(err.value)


def test_float_labels_are_rejected():
    with pytest.raises(MetricsError, match="float"):
        ConfusionMatrix(3).update(np.zeros(3, np.float32), np.zeros(3, np.int64))


def test_uint8_inputs_do_not_overflow_and_matrix_is_int64():
    n = 182
    gt = np.array([181, 181, 100], np.uint8)
    pred = np.array([181, 180, 3], np.uint8)
    cm = ConfusionMatrix(n)
    cm.update(gt, pred)
    m = cm.matrix
    assert m.dtype == np.int64
    assert m[181, 181] == 1 and m[181, 180] == 1 and m[100, 3] == 1 and m.sum() == 3
    cm_t = ConfusionMatrix(n)
    cm_t.update(torch.from_numpy(gt), torch.from_numpy(pred))
    assert cm_t._mat.dtype == torch.int64
    np.testing.assert_array_equal(cm_t.matrix, m)


def test_counts_beyond_int32_survive():
    cm = ConfusionMatrix(2)
    big = np.array([[2**31 + 5, 0], [0, 2**31]], dtype=np.int64)
    other = ConfusionMatrix(2)
    other._mat = big.copy()  # as if ~30k full-size images had been counted
    cm.update(np.array([0, 1]), np.array([0, 1]))
    cm.merge(other)
    s = cm.compute()
    assert s["confusion_matrix"] == [[2**31 + 6, 0], [0, 2**31 + 1]]
    assert s["gt_pixels"] == [2**31 + 6, 2**31 + 1]


# ---------------------------------------------------------------- streaming behaviour


def _random_set(n_classes, n_images=6, shape=(37, 41), seed=0, ignore_frac=0.1):
    rng = np.random.default_rng(seed)
    gts, preds = [], []
    for _ in range(n_images):
        gt = rng.integers(0, n_classes, size=shape).astype(np.uint8)
        gt[rng.random(shape) < ignore_frac] = 255
        # predictions right ~60% of the time
        pred = np.where(rng.random(shape) < 0.6, gt, rng.integers(0, n_classes, size=shape))
        pred = np.where(gt == 255, rng.integers(0, n_classes, size=shape), pred).astype(np.int64)
        gts.append(gt)
        preds.append(pred)
    return gts, preds


def _loop_matrix(gts, preds, n):
    """Independent count: one pixel at a time."""
    m = np.zeros((n, n), np.int64)
    for gt, pred in zip(gts, preds):
        for g, p in zip(gt.ravel().tolist(), pred.ravel().tolist()):
            if 0 <= g < n:
                m[g, p] += 1
    return m


def test_numpy_and_torch_inputs_agree_with_a_pixel_loop():
    n = 7
    gts, preds = _random_set(n, n_images=3, shape=(13, 11))
    expected = _loop_matrix(gts, preds, n)
    cm_np, cm_t, cm_mixed = ConfusionMatrix(n), ConfusionMatrix(n), ConfusionMatrix(n)
    for gt, pred in zip(gts, preds):
        per_image = cm_np.update(gt, pred)
        assert isinstance(per_image, np.ndarray)
        np.testing.assert_array_equal(per_image, _loop_matrix([gt], [pred], n))
        per_image_t = cm_t.update(torch.from_numpy(gt), torch.from_numpy(pred))
        assert isinstance(per_image_t, torch.Tensor)
        cm_mixed.update(gt, torch.from_numpy(pred))
    np.testing.assert_array_equal(cm_np.matrix, expected)
    np.testing.assert_array_equal(cm_t.matrix, expected)
    np.testing.assert_array_equal(cm_mixed.matrix, expected)
    assert _same(cm_t.compute(), cm_np.compute())


def _same(a: dict, b: dict) -> bool:
    return json.dumps(to_json_dict(a), sort_keys=True) == json.dumps(to_json_dict(b), sort_keys=True)


def test_batch_update_equals_per_image_updates():
    n = 5
    gts, preds = _random_set(n, n_images=4)
    one = ConfusionMatrix(n)
    for gt, pred in zip(gts, preds):
        one.update(gt, pred)
    batch = ConfusionMatrix(n)
    batch.update(torch.from_numpy(np.stack(gts)), torch.from_numpy(np.stack(preds)))
    np.testing.assert_array_equal(one.matrix, batch.matrix)


def test_merge_equals_single_stream_and_reset_clears():
    n = 6
    gts, preds = _random_set(n, n_images=6, seed=3)
    single = ConfusionMatrix(n)
    for gt, pred in zip(gts, preds):
        single.update(gt, pred)
    a, b = ConfusionMatrix(n), ConfusionMatrix(n)
    for gt, pred in zip(gts[:2], preds[:2]):
        a.update(gt, pred)
    for gt, pred in zip(gts[2:], preds[2:]):
        b.update(torch.from_numpy(gt), torch.from_numpy(pred))  # torch + numpy halves
    a.merge(b)
    np.testing.assert_array_equal(a.matrix, single.matrix)
    assert _same(a.compute(), single.compute())
    with pytest.raises(MetricsError):
        a.merge(ConfusionMatrix(n + 1))
    a.reset()
    assert a.matrix.sum() == 0 and a.device is None


def test_all_reduce_is_a_noop_without_a_process_group():
    cm = ConfusionMatrix(3)
    cm.update(GT1, PRED1)
    assert cm.all_reduce() is cm
    assert cm.compute()["confusion_matrix"] == M1


def test_image_scores_hand_computed():
    s = image_scores(GT1, PRED1, 3)
    assert s["pixel_accuracy"] == pytest.approx(0.6)
    assert s["mean_iou"] == pytest.approx(1 / 3)
    assert s["valid_pixels"] == 5
    s_t = image_scores(torch.from_numpy(GT1), torch.from_numpy(PRED1), 3)
    assert s_t["mean_iou"] == pytest.approx(1 / 3)


def test_to_json_dict_writes_null_for_nan():
    cm = ConfusionMatrix(4)
    cm.update(GT2, PRED2)
    d = cm.to_json_dict()
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back["class_iou"][2] is None and back["class_iou"][3] is None
    assert back["class_iou"][1] == pytest.approx(1.0)
    assert to_json_dict({"a": np.float32("nan"), "b": [np.int64(3), float("inf")], "c": np.bool_(True)}) == {
        "a": None,
        "b": [3, None],
        "c": True,
    }
    empty = json.loads(json.dumps(ConfusionMatrix(2).to_json_dict(), allow_nan=False))
    assert empty["mean_iou"] is None and empty["pixel_accuracy"] is None


# ---------------------------------------------------------------- torchmetrics


def test_agrees_with_torchmetrics_when_every_class_occurs():
    import torchmetrics.classification as tm
    n = 5
    gts, preds = _random_set(n, n_images=4, shape=(31, 29), seed=7)
    cm = ConfusionMatrix(n, ignore_index=255)
    kw = dict(num_classes=n, ignore_index=255)
    metrics = {
        "iou_none": tm.MulticlassJaccardIndex(average=None, **kw),
        "iou_macro": tm.MulticlassJaccardIndex(average="macro", **kw),
        "acc_none": tm.MulticlassAccuracy(average=None, **kw),
        "acc_micro": tm.MulticlassAccuracy(average="micro", **kw),
        "acc_macro": tm.MulticlassAccuracy(average="macro", **kw),
        "prec_none": tm.MulticlassPrecision(average=None, **kw),
        "cm": tm.MulticlassConfusionMatrix(**kw),
    }
    for gt, pred in zip(gts, preds):
        cm.update(gt, pred)
        for m in metrics.values():
            m.update(torch.from_numpy(pred), torch.from_numpy(gt).long())
    s = cm.compute()
    assert all(s["present"])
    r = {k: m.compute() for k, m in metrics.items()}
    np.testing.assert_array_equal(np.array(s["confusion_matrix"]), r["cm"].numpy())  # same orientation
    assert s["class_iou"] == pytest.approx(r["iou_none"].tolist(), abs=1e-6)
    assert s["mean_iou"] == pytest.approx(float(r["iou_macro"]), abs=1e-6)
    assert s["class_accuracy"] == pytest.approx(r["acc_none"].tolist(), abs=1e-6)
    assert s["pixel_accuracy"] == pytest.approx(float(r["acc_micro"]), abs=1e-6)
    assert s["mean_accuracy"] == pytest.approx(float(r["acc_macro"]), abs=1e-6)
    assert s["class_precision"] == pytest.approx(r["prec_none"].tolist(), abs=1e-6)


def test_agrees_with_torchmetrics_per_class_on_present_classes_only():
    import torchmetrics.classification as tm
    n = 4
    pred, gt = torch.from_numpy(PRED2), torch.from_numpy(GT2)
    s = compute_scores(ConfusionMatrix(n).update(GT2, PRED2))
    iou = tm.MulticlassJaccardIndex(n, average=None, ignore_index=255)(pred, gt).tolist()
    acc = tm.MulticlassAccuracy(n, average=None, ignore_index=255)(pred, gt).tolist()
    present = [i for i in range(n) if s["present"][i]]
    assert [s["class_iou"][i] for i in present] == pytest.approx([iou[i] for i in present])
    assert [s["class_accuracy"][i] for i in present] == pytest.approx([acc[i] for i in present])
    # torchmetrics reports absent classes as 0 and averages the prediction-only class in;
    # we report them absent (NaN) and leave them out of the means (docs/metrics.md).
    assert iou[3] == 0.0 and math.isnan(s["class_iou"][3])
    macro = float(tm.MulticlassJaccardIndex(n, average="macro", ignore_index=255)(pred, gt))
    assert macro == pytest.approx((0.5 + 1.0 + 0.0) / 3) and s["mean_iou"] == pytest.approx(0.75)


# ---------------------------------------------------------------- reference scores()


def _reference_scores(label_trues, label_preds, n_class, *, valid_rows_only=True):
    """The formulas of kazuto1011/deeplab-pytorch ``libs/utils/metric.py`` ``scores()``.

    Restated for the test: a float64 histogram of ``n*gt + pred`` over pixels with
    ``0 <= gt < n``; class IoU = diag / (row + col - diag) (NaN only where that is 0/0);
    mean IoU = nanmean of class IoU over rows with pixels (commit b88e760, the
    ``valid = hist.sum(axis=1) > 0`` line) or over all classes (``valid_rows_only=False``,
    the earlier revision 07c9ce5); mean accuracy = nanmean of diag / row;
    FW IoU = sum of freq * IoU over classes with freq > 0.
    """
    hist = np.zeros((n_class, n_class))
    for lt, lp in zip(label_trues, label_preds):
        lt, lp = lt.ravel(), lp.ravel()
        keep = (lt >= 0) & (lt < n_class)
        hist += np.bincount(n_class * lt[keep].astype(int) + lp[keep], minlength=n_class**2).reshape(
            n_class, n_class
        )
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an empty slice
        diag, rows, cols = np.diag(hist), hist.sum(axis=1), hist.sum(axis=0)
        acc = diag.sum() / hist.sum()
        acc_cls = np.nanmean(diag / rows)
        iu = diag / (rows + cols - diag)
        mean_iu = np.nanmean(iu[rows > 0]) if valid_rows_only else np.nanmean(iu)
        freq = rows / hist.sum()
        fwavacc = (freq[freq > 0] * iu[freq > 0]).sum()
    return {
        "Pixel Accuracy": acc,
        "Mean Accuracy": acc_cls,
        "Frequency Weighted IoU": fwavacc,
        "Mean IoU": mean_iu,
        "Class IoU": dict(zip(range(n_class), iu)),
    }


def _ours(gts, preds, n):
    cm = ConfusionMatrix(n)
    for gt, pred in zip(gts, preds):
        cm.update(gt, pred)
    return cm.compute()


@pytest.mark.parametrize("valid_rows_only", [True, False])
def test_same_numbers_as_reference_without_prediction_only_classes(valid_rows_only):
    n = 6
    gts, preds = _random_set(n, n_images=3, seed=11)
    gts[0][:5, :] = 4  # class 5 never occurs in gt and never in predictions: absent everywhere
    for gt, pred in zip(gts, preds):
        gt[gt == 5] = 255
        pred[pred == 5] = 0
    ours = _ours(gts, preds, n)
    ref = _reference_scores(gts, preds, n, valid_rows_only=valid_rows_only)
    assert not ours["present"][5]
    assert ours["pixel_accuracy"] == pytest.approx(ref["Pixel Accuracy"], rel=1e-12)
    assert ours["mean_accuracy"] == pytest.approx(ref["Mean Accuracy"], rel=1e-12)
    assert ours["mean_iou"] == pytest.approx(ref["Mean IoU"], rel=1e-12)
    assert ours["fw_iou"] == pytest.approx(ref["Frequency Weighted IoU"], rel=1e-12)
    ref_iou = [ref["Class IoU"][i] for i in range(n)]
    assert ours["class_iou"] == pytest.approx(ref_iou, rel=1e-12, nan_ok=True)


def test_documented_difference_from_reference_for_prediction_only_class():
    ours = _ours([GT2], [PRED2], 4)
    current = _reference_scores([GT2], [PRED2], 4, valid_rows_only=True)
    older = _reference_scores([GT2], [PRED2], 4, valid_rows_only=False)
    # Means agree with the current reference ...
    for key, ref_key in [
        ("pixel_accuracy", "Pixel Accuracy"),
        ("mean_accuracy", "Mean Accuracy"),
        ("mean_iou", "Mean IoU"),
        ("fw_iou", "Frequency Weighted IoU"),
    ]:
        assert ours[key] == pytest.approx(current[ref_key]), key
    # ... but its per-class table says 0.0 for the prediction-only class, we say absent.
    assert current["Class IoU"][3] == 0.0 and math.isnan(ours["class_iou"][3])
    assert math.isnan(current["Class IoU"][2]) and math.isnan(ours["class_iou"][2])
    # The earlier reference revision averaged that 0 into the mean IoU.
    assert older["Mean IoU"] == pytest.approx(0.5) and ours["mean_iou"] == pytest.approx(0.75)


def test_documented_difference_from_reference_on_empty_input():
    gt = np.full((3, 3), 255)
    pred = np.zeros((3, 3), int)
    ours = _ours([gt], [pred], 3)
    ref = _reference_scores([gt], [pred], 3)
    assert ref["Frequency Weighted IoU"] == 0.0 and math.isnan(ours["fw_iou"])
    assert math.isnan(ref["Mean IoU"]) and math.isnan(ours["mean_iou"])


# ---------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank, world_size, init_method, n, gts, preds, use_torch, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        cm = ConfusionMatrix(n)
        for gt, pred in list(zip(gts, preds))[rank::world_size]:
            if use_torch:
                gt, pred = torch.from_numpy(gt), torch.from_numpy(pred)
            cm.update(gt, pred)
        cm.all_reduce()
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(cm.to_json_dict(), f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("use_torch", [False, True])
def test_all_reduce_over_two_gloo_processes_matches_one_process(tmp_path, use_torch):
    import torch.multiprocessing as mp

    n = 5
    gts, preds = _random_set(n, n_images=5, seed=5)
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    args = (2, init_method, n, gts, preds, use_torch, str(tmp_path))
    mp.spawn(_gloo_worker, args=args, nprocs=2, join=True)
    expected = _ours(gts, preds, n)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == to_json_dict(expected)


# ---------------------------------------------------------------- CUDA


def test_device_counting_path_on_cpu_tensors():
    """The sync-free counter used on CUDA, exercised on CPU so it is tested without a GPU."""
    n = 7
    gts, preds = _random_set(n, n_images=2, shape=(17, 19), seed=4)
    gt, pred = torch.from_numpy(np.stack(gts)), torch.from_numpy(np.stack(preds))
    pred[0, 0, :3] = torch.tensor([9, -4, 7])
    gt[0, 0, :3] = torch.tensor([1, 2, 255])  # the third bad value sits on an ignored pixel
    hist, count, lo, hi = _torch_hist(gt, pred, n, 255)
    ok = pred.clone()
    ok[0, 0, :2] = 0
    expected = _loop_matrix([gt.numpy()], [ok.numpy()], n)
    expected[1, 0] -= 1
    expected[2, 0] -= 1
    np.testing.assert_array_equal(hist.numpy(), expected)
    assert (int(count), int(lo), int(hi)) == (2, -4, 9)
    hist, count, _, _ = _torch_hist(gt[1], torch.from_numpy(preds[1]), n, 255)
    assert int(count) == 0
    np.testing.assert_array_equal(hist.numpy(), _loop_matrix([gts[1]], [preds[1]], n))



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_numpy_and_defers_the_range_check():
    n = 21
    gts, preds = _random_set(n, n_images=4, shape=(65, 63), seed=2)
    cm_np, cm_cuda = ConfusionMatrix(n), ConfusionMatrix(n)
    for gt, pred in zip(gts, preds):
        cm_np.update(gt, pred)
        per_image = cm_cuda.update(torch.from_numpy(gt).cuda(), torch.from_numpy(pred).cuda())
        assert per_image.is_cuda
    assert cm_cuda.device.type == "cuda"
    np.testing.assert_array_equal(cm_cuda.matrix, cm_np.matrix)
    assert _same(cm_cuda.compute(), cm_np.compute())
    bad = ConfusionMatrix(n)
    pred = torch.from_numpy(preds[0]).cuda()
    pred[0, 0], pred[0, 1] = 40, -1
    gt = torch.from_numpy(gts[0]).cuda()
    gt[0, :2] = 3
    bad.update(gt, pred)  # no error yet: checking here would synchronise
    with pytest.raises(MetricsError, match="between -1 and 40"):
        bad.compute()
