"""Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs", arXiv:1606.03498).

From the classifier's logits z (N, C), p(y|x) = softmax(z) over all C outputs (1,008 for FID Inception: the
TensorFlow graph's 1,000 classes plus 8 unused, as torch-fidelity's `logits_unbiased` feeds them). The samples
are shuffled with `numpy.random.RandomState(seed).permutation(N)` and cut into `splits` consecutive parts
[⌊iN/s⌋, ⌊(i+1)N/s⌋); for each part,

    IS_i = exp( mean_x KL(p(y|x) ‖ p(y)) ),  p(y) = the part's mean of p(y|x)
         = exp( mean_x Σ_y p log p  −  Σ_y p(y) log p(y) )

and the score is the mean and standard deviation (numpy's, ddof 0) of IS_i over the parts: torch-fidelity's
defaults (10 splits, seed 2020) and order, so the same logits give the same numbers. Only per-part sums are kept
(splits × C float64), so a store's logits are read once in blocks, in any order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from extractor.analysis.metrics import MetricInputError, SubsetEstimate

IS_SPLITS = 10
IS_SEED = 2020
IS_LAYER = "logits"  # fid-inception's 1008-way classifier output


@dataclass(frozen=True)
class InceptionScoreSettings:
    """Where the logits are (a store's layer) and how the samples are split: one setting for compare and stats."""

    layer: str = IS_LAYER
    splits: int = IS_SPLITS
    seed: int = IS_SEED


@dataclass(frozen=True)
class InceptionScore(SubsetEstimate):
    """IS's mean and standard deviation over `splits` parts of the `samples`, drawn with `seed`."""

    splits: int
    seed: int
    samples: int


class InceptionScoreAccumulator:
    """Per-part sums of p(y|x) and of Σ p log p, fed with logits in blocks of store positions."""

    def __init__(self, n: int, classes: int, splits: int = IS_SPLITS, seed: int = IS_SEED):
        if splits < 1 or n < splits:
            raise MetricInputError(f"Inception Score: {n} samples cannot make {splits} splits (need at least one sample per split)")
        self.n, self.classes, self.splits, self.seed = int(n), int(classes), int(splits), int(seed)
        order = np.random.RandomState(seed).permutation(n)  # position in the shuffled order → store position
        boundaries = np.arange(splits + 1) * n // splits
        part_of_rank = np.repeat(np.arange(splits), np.diff(boundaries))
        self._part = np.empty(n, dtype=np.int64)
        self._part[order] = part_of_rank
        self._sizes = np.diff(boundaries).astype(np.float64)
        self._sum_p = np.zeros((splits, classes), dtype=np.float64)
        self._sum_plogp = np.zeros(splits, dtype=np.float64)
        self._seen = 0

    def update(self, start: int, logits: np.ndarray) -> None:
        """Logits (b, C) of store positions start … start+b−1."""
        z = np.asarray(logits, dtype=np.float64)
        if z.ndim != 2 or z.shape[1] != self.classes:
            raise MetricInputError(f"Inception Score: logits must be (n, {self.classes}), got shape {z.shape}")
        log_p = z - z.max(axis=1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        p = np.exp(log_p)
        part = self._part[start : start + z.shape[0]]
        np.add.at(self._sum_p, part, p)
        self._sum_plogp += np.bincount(part, weights=(p * log_p).sum(axis=1), minlength=self.splits)
        self._seen += z.shape[0]

    def result(self) -> InceptionScore:
        if self._seen != self.n:
            raise MetricInputError(f"Inception Score: saw {self._seen} samples, expected {self.n}")
        q = self._sum_p / self._sizes[:, None]
        q_log_q = np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0).sum(axis=1)
        scores = np.exp(self._sum_plogp / self._sizes - q_log_q)
        return InceptionScore(float(scores.mean()), float(scores.std()), self.splits, self.seed, self.n)


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS, seed: int = IS_SEED) -> InceptionScore:
    """Inception Score of in-memory logits (N, C)."""
    z = np.asarray(logits)
    if z.ndim != 2:
        raise MetricInputError(f"Inception Score: logits must be 2-D (samples, classes), got shape {z.shape}")
    acc = InceptionScoreAccumulator(z.shape[0], z.shape[1], splits, seed)
    acc.update(0, z)
    return acc.result()


def inception_score_attrs(score: InceptionScore, prefix: str = "inception_score") -> dict[str, float | int]:
    """Flat report attributes: `inception_score`, `…_std`, `…_splits`, `…_seed`, `…_samples`."""
    return {prefix: score.mean, f"{prefix}_std": score.std, f"{prefix}_splits": score.splits, f"{prefix}_seed": score.seed, f"{prefix}_samples": score.samples}
