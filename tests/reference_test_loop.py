"""An independent transcription of the reference TEST LOOP (kazuto1011/deeplab-pytorch, master):
``main.py test`` and ``main.py crf``, ``libs/datasets/{base,voc,cocostuff}.py`` (augment=False,
CocoStuff10k ``warp_image=True``) and ``libs/utils/metric.py`` ``scores()``.

The model is tests/reference_deeplab.py's transcription. Nothing here imports segcore: tests run this
and ``python -m segcore evaluate`` on the same files and weights and compare the four scores.
"""

import os.path as osp
from glob import glob

import cv2
import numpy as np
import scipy.io as sio
import torch
import torch.nn.functional as F
from PIL import Image

from reference_deeplab import MEAN_BGR, DenseCRF


# -- libs/datasets -----------------------------------------------------------------------------------

def _finish(image, label):
    """_BaseDataset.__getitem__ with augment=False: mean subtraction, HWC -> CHW."""
    image -= MEAN_BGR
    image = image.transpose(2, 0, 1)
    return image.astype(np.float32), label.astype(np.int64)


def voc_items(root, split):
    """VOC: ImageSets/Segmentation/<split>.txt, JPEGImages/<id>.jpg, SegmentationClass/<id>.png."""
    ids = [line.rstrip() for line in open(osp.join(root, "ImageSets/Segmentation", split + ".txt"))]

    def load(image_id):
        image = cv2.imread(osp.join(root, "JPEGImages", image_id + ".jpg"), cv2.IMREAD_COLOR).astype(np.float32)
        label = np.asarray(Image.open(osp.join(root, "SegmentationClass", image_id + ".png")), dtype=np.int32)
        return _finish(image, label)

    return [(i, lambda i=i: load(i)) for i in ids]


def cocostuff10k_items(root, split, warp_image=True):
    ids = [line.rstrip() for line in open(osp.join(root, "imageLists", split + ".txt"))]

    def load(image_id):
        image = cv2.imread(osp.join(root, "images", image_id + ".jpg"), cv2.IMREAD_COLOR).astype(np.float32)
        label = sio.loadmat(osp.join(root, "annotations", image_id + ".mat"))["S"]
        label -= 1  # unlabeled (0 -> -1)
        label[label == -1] = 255
        if warp_image:
            image = cv2.resize(image, (513, 513), interpolation=cv2.INTER_LINEAR)
            label = Image.fromarray(label).resize((513, 513), resample=Image.NEAREST)
            label = np.asarray(label)
        return _finish(image, label)

    return [(i, lambda i=i: load(i)) for i in ids]


def cocostuff164k_items(root, split):
    files = sorted(glob(osp.join(root, "images", split, "*.jpg")))
    ids = [f.split("/")[-1].replace(".jpg", "") for f in files]

    def load(image_id):
        image = cv2.imread(osp.join(root, "images", split, image_id + ".jpg"), cv2.IMREAD_COLOR).astype(np.float32)
        label = cv2.imread(osp.join(root, "annotations", split, image_id + ".png"), cv2.IMREAD_GRAYSCALE)
        return _finish(image, label)

    return [(i, lambda i=i: load(i)) for i in ids]


# -- libs/utils/metric.py ---------------------------------------------------------------------------

def _fast_hist(label_true, label_pred, n_class):
    mask = (label_true >= 0) & (label_true < n_class)
    hist = np.bincount(n_class * label_true[mask].astype(int) + label_pred[mask],
                       minlength=n_class ** 2).reshape(n_class, n_class)
    return hist


def scores(label_trues, label_preds, n_class):
    hist = np.zeros((n_class, n_class))
    for lt, lp in zip(label_trues, label_preds):
        hist += _fast_hist(lt.flatten(), lp.flatten(), n_class)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = np.diag(hist).sum() / hist.sum()
        acc_cls = np.diag(hist) / hist.sum(axis=1)
        acc_cls = np.nanmean(acc_cls)
        iu = np.diag(hist) / (hist.sum(axis=1) + hist.sum(axis=0) - np.diag(hist))
    valid = hist.sum(axis=1) > 0  # added
    mean_iu = np.nanmean(iu[valid])
    freq = hist.sum(axis=1) / hist.sum()
    fwavacc = (freq[freq > 0] * iu[freq > 0]).sum()
    return {"Pixel Accuracy": acc, "Mean Accuracy": acc_cls, "Frequency Weighted IoU": fwavacc,
            "Mean IoU": mean_iu, "hist": hist}  # hist: not in the reference's dict, for pixel-level checks


# -- main.py test / main.py crf ---------------------------------------------------------------------

def run_test_loop(model, items, n_classes, crf=False):
    """``main.py test`` (batch size 1), or ``main.py crf`` on the logits it would have saved."""
    model.eval()
    postprocessor = DenseCRF() if crf else None
    preds, gts = [], []
    with torch.no_grad():
        for _, load in items:
            image, gt_label = load()
            logit = model(torch.from_numpy(image)[None])[0].numpy()  # what `test` saves as <id>.npy
            if postprocessor is None:
                _, H, W = gt_label[None].shape
                logits = F.interpolate(torch.from_numpy(logit)[None], size=(H, W), mode="bilinear",
                                       align_corners=False)
                probs = F.softmax(logits, dim=1)
                label = torch.argmax(probs, dim=1)[0].numpy()
            else:
                _, H, W = image.shape
                logit = torch.FloatTensor(logit)[None, ...]
                logit = F.interpolate(logit, size=(H, W), mode="bilinear", align_corners=False)
                prob = F.softmax(logit, dim=1)[0].numpy()
                with np.errstate(invalid="ignore"):  # numpy warns on the cast of negatives; values as on x86
                    raw = image.astype(np.uint8).transpose(1, 2, 0)
                prob = postprocessor(raw, prob)
                label = np.argmax(prob, axis=0)
            preds.append(label)
            gts.append(gt_label)
    return scores(gts, preds, n_class=n_classes)
