"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs", arXiv:1801.01401).

KID is the unbiased estimate of the squared maximum mean discrepancy between the real and generated feature
distributions under the cubic polynomial kernel

    k(x, y) = (xᵀy / D + 1)³                              (D: feature dimension)
    MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m(m−1)) + Σ_{i≠j} k(y_i, y_j) / (n(n−1)) − 2 Σ_{i,j} k(x_i, y_j) / (mn)

averaged over random subsets of m real and m generated samples, with the standard deviation over subsets
reported beside it. Defaults are torch-fidelity's (`kid_subsets` 100, `kid_subset_size` 1000, `rng_seed` 2020),
and subsets are drawn as torch-fidelity draws them (one `numpy.random.RandomState(seed)`; per subset first m
real positions, then m generated ones, each `choice(n, m, replace=False)`), so the same seed gives the same
subsets and the same value as torch-fidelity given the real features first (`kid_features_to_metric(real,
generated)`, `input1` real). Its command line is usually given the generated samples as `input1`: then it draws
other subsets, and its value differs by about the estimate's spread (`kid_std`). The kernel sums are float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from extractor.analysis.metrics import MetricInputError, SubsetEstimate

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 2020

# indices (sorted int64) -> float rows of those samples, shape (len(indices), dim)
RowTaker = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class KID(SubsetEstimate):
    """KID's mean and standard deviation (numpy's, ddof 0) over `subsets` subsets of `subset_size` per side."""

    subsets: int
    subset_size: int
    seed: int


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (xᵀy / D + 1)³ for every row pair, float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    k = x @ y.T
    k /= x.shape[1]
    k += 1.0
    return k**3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD² estimate above between row sets x (m, D) and y (n, D), m, n ≥ 2."""
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise MetricInputError(f"MMD² needs at least 2 samples per set, got {m} and {n}")
    k_xx, k_yy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * polynomial_kernel(x, y).mean())


def subset_indices(n_real: int, n_fake: int, subsets: int, subset_size: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (real, generated) positions of every subset, drawn in torch-fidelity's order from RandomState(seed)."""
    if subsets < 1:
        raise MetricInputError(f"KID needs at least one subset, got {subsets}")
    if subset_size < 2 or subset_size > min(n_real, n_fake):
        raise MetricInputError(f"KID subset size {subset_size} must be at least 2 and at most the smaller set ({n_real} real, {n_fake} generated)")
    rng = np.random.RandomState(seed)
    drawn = []
    for _ in range(subsets):
        real = rng.choice(n_real, subset_size, replace=False)
        fake = rng.choice(n_fake, subset_size, replace=False)
        drawn.append((real, fake))
    return drawn


def kid_from_takers(
    take_real: RowTaker, n_real: int, take_fake: RowTaker, n_fake: int,
    subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED,
) -> KID:  # fmt: skip
    """KID from two row gatherers (a spill file, a store): only one subset per side is in memory at a time."""
    values = np.empty(subsets, dtype=np.float64)
    for i, (idx_r, idx_f) in enumerate(subset_indices(n_real, n_fake, subsets, subset_size, seed)):
        # Sorted gathers read faster; MMD² does not depend on the order of the rows.
        values[i] = mmd2_unbiased(take_real(np.sort(idx_r)), take_fake(np.sort(idx_f)))
    return KID(float(values.mean()), float(values.std()), int(subsets), int(subset_size), int(seed))


def kid(
    real: np.ndarray, fake: np.ndarray, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED
) -> KID:
    """KID between two in-memory feature sets (n, D)."""
    real, fake = np.asarray(real), np.asarray(fake)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise MetricInputError(f"KID: features must be 2-D with the same dimension, got {real.shape} and {fake.shape}")
    return kid_from_takers(lambda i: real[i], real.shape[0], lambda i: fake[i], fake.shape[0], subsets, subset_size, seed)


def class_subset_size(n_real: int, n_fake: int, subset_size: int = KID_SUBSET_SIZE) -> int:
    """Per-class KID: the default subset size, limited by the class's smaller side."""
    return int(min(subset_size, n_real, n_fake))
