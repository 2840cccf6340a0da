"""Independent reference computations of the comparison metrics, written out from their definitions with SciPy,
for the tests that check extractor/analysis/metrics.py and compare_stores against them.

Fréchet distance: Heusel et al. 2017 (arXiv:1706.08500), d² = |μ₁ − μ₂|² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½).
Precision, recall, density, coverage: Naeem et al. 2020 (arXiv:2002.09797), k-nearest-neighbour balls."""

from __future__ import annotations

import numpy as np
import scipy.linalg
from scipy.spatial.distance import cdist


def reference_fd(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians, with SciPy's matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def reference_fd_of_samples(x1: np.ndarray, x2: np.ndarray) -> float:
    """Fréchet distance of the Gaussians fitted to two sample sets (rows are samples; unbiased covariance)."""
    return reference_fd(x1.mean(0), np.cov(x1, rowvar=False), x2.mean(0), np.cov(x2, rowvar=False))


def reference_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """Precision, recall, density and coverage by their definitions, with SciPy distances and sorting."""
    d_rr, d_ff, d_rf = cdist(real, real), cdist(fake, fake), cdist(real, fake)
    r_real = np.sort(d_rr, axis=1)[:, k]  # column 0 is the sample itself
    r_fake = np.sort(d_ff, axis=1)[:, k]
    inside = d_rf < r_real[:, None]  # strictly, as the authors' code (clovaai/generative-evaluation-prdc) counts
    return {
        "precision": float(inside.any(axis=0).mean()),
        "recall": float((d_rf < r_fake[None, :]).any(axis=1).mean()),
        "density": float(inside.sum() / (k * fake.shape[0])),
        "coverage": float((d_rf.min(axis=1) < r_real).mean()),
    }
