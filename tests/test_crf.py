"""The class-restricted dense CRF: the full CRF's labels when the dropped classes are negligible, the full CRF
itself when they are not, and the reference's output shape and normalisation either way."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from factories import scene_image, tiny_checkpoint
from reference_deeplab import DenseCRF as RefCRF

from segcore import DenseCRF, Segmenter

H, W = 48, 64


def smooth_logits(n_classes, seed, *, active, low=-14.0, faint=0, faint_level=-8.0):
    """Smooth random logits where ``active`` classes compete, ``faint`` more sit near ``faint_level`` and
    the others at ``low`` (a trained model's peaked softmax over many classes)."""
    rng = np.random.default_rng(seed)
    coarse = np.full((n_classes, H // 8 + 1, W // 8 + 1), low, np.float32)
    coarse[:active] = rng.normal(0, 3, (active, *coarse.shape[1:]))
    coarse[active:active + faint] = faint_level + rng.normal(0, 1, (faint, *coarse.shape[1:]))
    rows = np.linspace(0, coarse.shape[1] - 1, H)
    cols = np.linspace(0, coarse.shape[2] - 1, W)
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    r1, c1 = np.minimum(r0 + 1, coarse.shape[1] - 1), np.minimum(c0 + 1, coarse.shape[2] - 1)
    fr, fc = (rows - r0)[:, None], (cols - c0)[None, :]
    up = (coarse[:, r0][:, :, c0] * (1 - fr) * (1 - fc) + coarse[:, r1][:, :, c0] * fr * (1 - fc)
          + coarse[:, r0][:, :, c1] * (1 - fr) * fc + coarse[:, r1][:, :, c1] * fr * fc)
    return np.ascontiguousarray(up, dtype=np.float32)


def softmax(logits):
    e = np.exp(logits - logits.max(0))
    return (e / e.sum(0)).astype(np.float32)


@pytest.fixture(scope="module")
def image():
    return scene_image(H, W, seed=3)


@pytest.mark.parametrize("seed,active,faint", [(0, 3, 0), (1, 4, 8), (2, 5, 12)])
def test_restricted_crf_gives_the_full_crf_labels_when_few_classes_carry_mass(image, seed, active, faint):
    probs = softmax(smooth_logits(182, seed, active=active, faint=faint))
    run = DenseCRF().refine(image, probs)
    full = RefCRF()(image, probs)
    assert run.path == "restricted", run.reason
    assert active <= len(run.kept) <= active + faint < 20
    assert set(range(active)) <= set(run.kept)
    assert 0 < run.normaliser_error <= DenseCRF().restrict_tolerance
    labels = full.argmax(0)
    assert len(np.unique(labels)) > 1  # not a comparison of two constant maps
    assert np.array_equal(run.probs.argmax(0), labels)
    assert np.abs(run.probs - full).max() < 1e-4


def test_output_keeps_the_full_crfs_shape_and_normalisation(image):
    probs = softmax(smooth_logits(182, 4, active=4, faint=6))
    run = DenseCRF().refine(image, probs)
    assert run.path == "restricted"
    assert run.probs.shape == probs.shape and run.probs.dtype == np.float32
    assert run.probs.min() >= 0 and np.allclose(run.probs.sum(0), 1, atol=1e-5)
    dropped = np.setdiff1d(np.arange(182), run.kept)
    assert run.probs[dropped].max() <= run.dropped_bound * 1.01  # the full CRF's bound holds here too
    assert np.array_equal(DenseCRF()(image, probs), run.probs)  # __call__ is refine's probabilities


def test_a_dropped_class_that_would_win_makes_the_full_crf_run(image):
    """Class 3 never reaches the 0.3 threshold but leads on the right half: check A fails → full CRF."""
    probs = np.full((30, H, W), 1e-6, np.float32)
    probs[0, :, : W // 2] = 0.9
    probs[1, : H // 2, : W // 2] = 0.09  # class 1 and 2 reach the threshold on the left half only
    probs[1, : H // 4, : W // 4] = 0.5
    probs[2, H // 2:, : W // 2] = 0.09
    probs[2, H - H // 4:, : W // 4] = 0.5
    probs[[0, 1, 2, 3], :, W // 2:] = np.array([0.24, 0.23, 0.23, 0.29], np.float32)[:, None, None]
    probs /= probs.sum(0)
    assert probs[3].max() < 0.3 <= min(probs[c].max() for c in (0, 1, 2))
    crf = DenseCRF(restrict_threshold=0.3)
    run = crf.refine(image, probs)
    assert run.path == "fallback" and "check A" in run.reason
    full = RefCRF()(image, probs)
    assert (full.argmax(0) == 3).mean() > 0.2  # the dropped class does matter
    assert np.array_equal(run.probs, full.astype(np.float32))


def test_mass_spread_over_many_dropped_classes_makes_the_full_crf_run(image):
    """179 classes just under the threshold everywhere hold 18% of the mass: check B's bound exceeds the
    tolerance, so the full CRF runs."""
    logits = smooth_logits(182, 5, active=3)
    probs = softmax(logits)
    probs[3:] = 0.99e-3
    probs[:3] *= (1 - probs[3:].sum(0)) / probs[:3].sum(0)
    run = DenseCRF().refine(image, probs)
    assert run.path == "fallback" and "check B" in run.reason
    assert run.normaliser_error > 1.2 * DenseCRF().restrict_tolerance, run.normaliser_error
    assert np.array_equal(run.probs, RefCRF()(image, probs).astype(np.float32))


def test_full_path_is_the_reference_crf(image):
    probs = softmax(smooth_logits(21, 6, active=21))
    expected = RefCRF()(image, probs).astype(np.float32)
    for crf in (DenseCRF(), DenseCRF(restrict=False)):
        run = crf.refine(image, probs)
        assert run.path == "full" and run.kept == tuple(range(21))
        assert np.array_equal(run.probs, expected)
    assert DenseCRF().refine(image, probs).reason == "no class to drop"
    assert DenseCRF(restrict=False).refine(image, softmax(smooth_logits(182, 1, active=4))).path == "full"


def test_restriction_runs_only_when_it_is_cheaper(image):
    probs = softmax(smooth_logits(21, 7, active=18))  # (18 + 1 + 3) x 11 steps ≥ (21 + 3) x 10
    run = DenseCRF().refine(image, probs)
    assert run.path == "full" and run.reason == "restriction not cheaper"
    assert len(DenseCRF().refine(image, softmax(smooth_logits(21, 7, active=17))).kept) == 17  # 231 < 240


def _peak_numpy_bytes(fn):
    fn()  # imports and first-call allocations are not the CRF's
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("n_classes,active", [(21, 21), (182, 4)])
def test_no_extra_full_size_copies(image, n_classes, active):
    """The full path holds one CxHxW array at a time (the unary, then the result); the restricted one the
    result and a few rows. The reference's unary_from_softmax path peaks at three."""
    probs = softmax(smooth_logits(n_classes, 8, active=active))
    peak = _peak_numpy_bytes(lambda: DenseCRF().refine(image, probs))
    limit = 1.3
    assert peak <= limit * probs.nbytes, peak / probs.nbytes


def test_segmenter_uses_the_restricted_crf_by_default(tmp_path):
    """A 182-class model with CRF on: the default DenseCRF restricts, and the labels are the full CRF's."""
    ckpt = tiny_checkpoint(tmp_path / "tiny182.pth", n_classes=182, seed=1)
    seg = Segmenter.from_pretrained(str(ckpt), crf=True, scales=(), test_size=65, device="cpu",
                                    precision="fp32")
    rgb = scene_image(49, 65, seed=2)  # long side == test_size: the CRF sees this very image
    probs = seg.with_options(crf=False).predict(rgb, return_probs=True).probabilities
    assert seg.crf_params.refine(rgb, probs).path == "restricted"
    reference = seg.with_options(crf_params=DenseCRF(restrict=False)).predict(rgb).label_map
    assert len(np.unique(reference)) > 1
    assert np.array_equal(seg.predict(rgb).label_map, reference)
