"""Fully connected CRF refinement (Krähenbühl & Koltun), as the DeepLab-v2 reference applies it.

The reference runs pydensecrf's mean field on every class: for COCO-Stuff's 182 classes that is about ten
times the 21-class cost, although an image holds a handful of them. :class:`DenseCRF` therefore runs the
mean field only on the classes that can matter, when it can prove that the others cannot win anywhere.

**The update** (pydensecrf ``DenseCRF::inference``, Potts compatibility ``compat=w``, kernels normalised
``NORMALIZE_SYMMETRIC``): with ``p̂ = clip(p, 1e-5, 1)`` (``unary_from_softmax``),
``Q⁰ = p̂ / Σ p̂`` and ``Qᵗ⁺¹_c(i) = p̂_c(i) · exp(m_c(i)) / Z(i)``, where the message
``m_c = Σ_k w_k K̃_k Qᵗ_c``, ``K̃_k = D^-½ K_k D^-½`` is the k-th Gaussian kernel (the permutohedral
lattice's non-negative weights, ``D`` its row sums) and ``Z(i)`` the sum over classes. Classes interact
only through ``Z(i)``. With ``B(i) = Σ_k w_k (K̃_k 1)(i)`` (measured on the lattice with one mean-field
step on ``Q = 1``; it exceeds ``Σ w_k`` at some pixels, 3.9–8.6 for the reference's 3 + 4 on a 513x385
photo) and ``w_k ≥ 0``: ``0 ≤ m_c(i) ≤ B(i) · max_j Q_c(j)`` and ``Z(i) ≥ Σ_c p̂_c(i) =: Ẑ(i)``
(≥ 1 for a softmax).

**Restriction.** Kept classes ``S``: peak probability ``≥ restrict_threshold`` somewhere in the image.
The dropped classes ``D`` become one *rest* channel with unary ``r(i) = Σ_D p̂_d(i)`` and no pairwise
term, so the mean field runs on ``|S| + 1`` channels. ``Q⁰`` is then exactly the full CRF's on ``S``.

**Bounds, known before the iterations run.** Let ``P = max_{d∈D, i} p̂_d(i) / Ẑ(i)`` and
``B̄ = max_i B(i)``. In the *full* CRF every dropped class obeys ``max Qᵗ⁺¹_d ≤ P · exp(B̄ · max Qᵗ_d)``,
so ``ū = u_{T-1}`` of ``u₀ = P, uₙ₊₁ = P · exp(B̄ uₙ)`` bounds every dropped class's probability in every
iteration that feeds a message (``ū ≈ P`` while ``P · B̄ · e < 1``; it explodes beyond). Then:

* **(A) no dropped class wins anywhere**, exactly: the full CRF's final score of ``d`` at ``i`` is
  ``p̂_d(i) exp(m_d(i)) ≤ p̂_d(i) exp(B(i) ū)`` and the kept winner's is at least ``max_S p̂_c(i)``
  (messages are ≥ 0). If ``max_D p̂_d(i) · exp(B(i) ū) < max_S p̂_c(i)`` at every pixel (with a 1e-4
  relative margin for float32 rounding), the full CRF's argmax is a kept class everywhere, and so is ours
  (the output's dropped rows are ``p̂_d / Z``).
* **(B) the kept classes see the full CRF's normaliser** to a relative error of at most
  ``η = max_i r(i) · (exp(B(i) ū) − 1) / Ẑ(i)`` at every step (the rest channel holds ``r(i)``, the
  dropped classes hold between ``r(i)`` and ``r(i) exp(B(i) ū)``), i.e. the restricted mean field is the
  full one with each kept probability scaled by a factor within ``1 ± η``.

When (A) fails or ``η > restrict_tolerance``, the full CRF runs instead (``path="fallback"``). With
``η = 0`` the restricted mean field *is* the full one on ``S``; for ``η > 0`` mean field can amplify a
perturbation by up to ``B̄ / 2`` per iteration (softmax's Lipschitz constant is ½), so the order of two
kept classes that end within about ``B̄ η`` of each other is not proven. It is measured: the benchmark
compares labels with the full CRF (``python -m benchmarks --only crf``).

The output keeps the full CRF's shape and normalisation: kept rows are the mean field's, dropped rows
share the rest channel's probability in proportion to ``p̂_d`` (the full CRF's value up to the factor
``exp(m_d) ≤ exp(B ū)``). The restriction is skipped when it would not be cheaper: the lattice is built
either way and one extra step measures ``B``, so it needs ``(|S| + 1 + 3)(T + 1) < (C + 3) T``, a step on
``M`` channels costing about ``M + 3`` channels' work (``STEP_OVERHEAD_CHANNELS``, measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CLIP = 1e-5  # pydensecrf.utils.unary_from_softmax's floor: every class keeps at least this much unary mass
# One mean-field step on M channels costs about as much as M + 3 channels' arithmetic: the lattice's per-step
# work that does not grow with M (513x385 photo, 10 steps, one run: 1 channel 0.42 s, 6: 0.97 s, 21: 2.7 s).
STEP_OVERHEAD_CHANNELS = 3
FLOAT_MARGIN = 1e-4  # check A's slack for pydensecrf's float32 exp and normalisation


@dataclass(frozen=True)
class CRFRun:
    """One refinement: the probabilities and which mean field produced them (for tests and benchmarks)."""

    probs: np.ndarray
    path: str  # "full", "restricted", or "fallback" (the restriction's checks failed; the full CRF ran)
    reason: str
    kept: tuple[int, ...]  # the classes the mean field ran on (every class unless path == "restricted")
    dropped_bound: float = 0.0  # ū: no dropped class exceeds this probability in the full CRF's iterations
    normaliser_error: float = 0.0  # η: relative error of the kept classes' normaliser vs the full CRF's


@dataclass(frozen=True)
class DenseCRF:
    """Refines class probabilities with the image's colours; defaults are the reference's VOC settings.

    ``restrict`` (default on) runs the mean field only on the classes whose probability reaches
    ``restrict_threshold`` somewhere, when the bounds in this module's docstring prove the others cannot
    win; ``restrict=False`` forces the reference's full CRF.
    """

    iter_max: int = 10
    pos_w: float = 3
    pos_xy_std: float = 1
    bi_w: float = 4
    bi_xy_std: float = 67
    bi_rgb_std: float = 3
    restrict: bool = True
    restrict_threshold: float = 1e-3
    restrict_tolerance: float = 1e-3

    def __call__(self, image: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """``image``: HxWx3 uint8; ``probs``: CxHxW softmax. Returns refined CxHxW probabilities.

        The colour kernel uses one standard deviation for all channels, so RGB and BGR give the same result.
        """
        return self.refine(image, probs).probs

    def refine(self, image: np.ndarray, probs: np.ndarray) -> CRFRun:
        """Like calling the CRF, and also says which mean field ran and why."""
        n_classes, h, w = probs.shape
        if image.shape[:2] != (h, w):
            raise ValueError(f"CRF image {image.shape[:2]} and probabilities {(h, w)} differ in size")
        image = np.ascontiguousarray(image, dtype=np.uint8)
        flat = np.asarray(probs, dtype=np.float32).reshape(n_classes, h * w)
        everything = tuple(range(n_classes))
        if not self.restrict:
            return CRFRun(self._full(image, flat, h, w), "full", "restriction off", everything)
        if self.pos_w < 0 or self.bi_w < 0:
            return CRFRun(self._full(image, flat, h, w), "full", "negative kernel weight", everything)
        peak = flat.max(axis=1)
        kept = np.flatnonzero(peak >= self.restrict_threshold)
        if len(kept) == 0 or len(kept) == n_classes:
            return CRFRun(self._full(image, flat, h, w), "full", "no class to drop", everything)
        restricted_cost = (len(kept) + 1 + STEP_OVERHEAD_CHANNELS) * (self.iter_max + 1)
        if restricted_cost >= (n_classes + STEP_OVERHEAD_CHANNELS) * self.iter_max:
            return CRFRun(self._full(image, flat, h, w), "full", "restriction not cheaper", everything)
        return self._restricted(image, flat, h, w, kept, peak)

    # -- the two mean fields ----------------------------------------------------------------------

    def _crf(self, image, unary, h, w, pos_compat, bi_compat):
        import pydensecrf.densecrf as dcrf

        crf = dcrf.DenseCRF2D(w, h, unary.shape[0])
        crf.setUnaryEnergy(unary)
        crf.addPairwiseGaussian(sxy=self.pos_xy_std, compat=pos_compat)
        crf.addPairwiseBilateral(sxy=self.bi_xy_std, srgb=self.bi_rgb_std, rgbim=image, compat=bi_compat)
        return crf

    def _full(self, image, flat, h, w) -> np.ndarray:
        """The reference: pydensecrf on every class (``unary_from_softmax``'s values; one copy of probs)."""
        unary = np.clip(flat, CLIP, 1.0)
        np.log(unary, out=unary)
        np.negative(unary, out=unary)
        crf = self._crf(image, unary, h, w, self.pos_w, self.bi_w)
        del unary
        q = crf.inference(self.iter_max)
        return np.asarray(q, dtype=np.float32).reshape(flat.shape[0], h, w)

    def _restricted(self, image, flat, h, w, kept, peak) -> CRFRun:
        import pydensecrf.eigen as eigen

        n_classes, n = flat.shape
        dropped = np.setdiff1d(np.arange(n_classes), kept)
        clipped = np.empty(n, np.float32)
        # rest(i) = Σ_D p̂_d(i), dmax(i) = max_D p̂_d(i); classes under the floor everywhere add CLIP each
        floor = dropped[peak[dropped] <= CLIP]
        rest = np.full(n, CLIP * len(floor), np.float32)
        dmax = np.full(n, CLIP, np.float32)
        for d in dropped[peak[dropped] > CLIP]:
            np.maximum(flat[d], CLIP, out=clipped)
            rest += clipped
            np.maximum(dmax, clipped, out=dmax)
        unary = np.empty((len(kept) + 1, n), np.float32)
        np.clip(flat[kept], CLIP, 1.0, out=unary[:-1])
        kmax = unary[:-1].max(axis=0)
        z_hat = unary[:-1].sum(axis=0) + rest  # Ẑ(i) = Σ_c p̂_c(i)
        unary[-1] = rest
        np.log(unary, out=unary)
        np.negative(unary, out=unary)

        # Potts on the kept channels (compat -w is pydensecrf's Potts, -w·Q), nothing on the rest channel
        def compat(weight):
            return np.array([-weight] * len(kept) + [0.0], np.float32)

        crf = self._crf(image, unary, h, w, compat(self.pos_w), compat(self.bi_w))
        # B(i): one mean-field step on Q = 1 leaves -U + B in the logits of every Potts channel
        logits = eigen.matrixXf(np.zeros(unary.shape, np.float32))
        crf.stepInference(eigen.matrixXf(np.ones(unary.shape, np.float32)), logits, eigen.matrixXf(
            np.zeros((1, 1), np.float32)))
        b = np.asarray(logits)[0] + unary[0]
        b = np.maximum(b, 0) * (1 + 1e-5) + 1e-5  # float32 rounding of -U + B + U, rounded up
        del logits

        bound = _dropped_bound(float((dmax / z_hat).max()), float(b.max()), self.iter_max)
        with np.errstate(over="ignore", invalid="ignore"):
            growth = np.exp(b * bound)  # exp(B(i) ū): how far a dropped class's score can grow at i
            eta = float((rest * (growth - 1) / z_hat).max())
            could_win = not (dmax * growth * (1 + FLOAT_MARGIN) < kmax).all()
        if not could_win and eta <= self.restrict_tolerance:
            return CRFRun(self._map_back(crf, flat, kept, dropped, rest, h, w), "restricted",
                          f"{len(kept)} of {n_classes} classes", tuple(int(c) for c in kept), bound, eta)
        del crf
        reason = ("a dropped class could win (check A)" if could_win else
                  f"normaliser error {eta:.2g} > tolerance {self.restrict_tolerance:g} (check B)")
        return CRFRun(self._full(image, flat, h, w), "fallback", reason, tuple(range(n_classes)), bound, eta)

    def _map_back(self, crf, flat, kept, dropped, rest, h, w) -> np.ndarray:
        """CxHxW probabilities: kept rows from the mean field, dropped rows share the rest channel's."""
        q = np.asarray(crf.inference(self.iter_max))
        out = np.empty(flat.shape, np.float32)
        out[kept] = q[:-1]
        share = q[-1] / rest
        for d in dropped:
            np.maximum(flat[d], CLIP, out=out[d])
            out[d] *= share
        return out.reshape(flat.shape[0], h, w)


def _dropped_bound(p: float, b: float, iterations: int) -> float:
    """ū = u_{T-1} of u₀ = p, uₙ₊₁ = p·exp(b·uₙ): a dropped class's largest probability in any iteration."""
    u = p
    for _ in range(max(iterations - 1, 0)):
        if b * u > 700:  # past float range: no useful bound
            return math.inf
        u = p * math.exp(b * u)
    return u
