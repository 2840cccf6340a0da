"""Metrics: Fréchet distance against SciPy's matrix square root, streaming statistics against np.mean/np.cov,
and precision/recall/density/coverage against hand-worked point sets and a brute-force reference."""

import numpy as np
import pytest

from extractor.analysis import metrics
from extractor.analysis.metrics import (
    PRDC,
    GaussianAccumulator,
    MetricInputError,
    frechet_distance,
    frechet_distance_from_samples,
    prdc,
    prdc_blocked,
)
from tests.support.reference_metrics import reference_fd, reference_prdc


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def readers(x):
    return lambda a, b: x[a:b]


# ---------------------------------------------------------------- Fréchet distance


def test_fd_of_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(300, 12))
    assert abs(frechet_distance_from_samples(x, x)) < 1e-9
    s = np.cov(x, rowvar=False)
    assert abs(frechet_distance(x.mean(0), s, x.mean(0), s)) < 1e-9


def test_fd_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    v1, v2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)


def test_fd_general_gaussians_equal_scipy_sqrtm():
    rng = np.random.default_rng(2)
    for d in (3, 20, 64):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d) + 1
        s1, s2 = random_spd(rng, d), random_spd(rng, d)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference_fd(mu1, s1, mu2, s2), rel=1e-9)


def test_fd_of_shifted_samples_equals_reference_on_same_statistics():
    rng = np.random.default_rng(3)
    mix = rng.normal(size=(10, 10))
    x1 = rng.normal(size=(500, 10)) @ mix
    x2 = rng.normal(size=(400, 10)) @ mix * 1.3 + 0.7
    mu1, s1, mu2, s2 = x1.mean(0), np.cov(x1, rowvar=False), x2.mean(0), np.cov(x2, rowvar=False)
    expected = reference_fd(mu1, s1, mu2, s2)
    assert expected > 1
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance_from_samples(x1, x2) == pytest.approx(expected, rel=1e-9)  # covariance path (n > dim)


def test_fd_from_few_samples_uses_rank_deficient_covariances():
    # n ≤ dim: the n1×n2 SVD path; the covariance path and SciPy agree on the same rank-deficient statistics.
    rng = np.random.default_rng(4)
    x1, x2 = rng.normal(size=(15, 40)), rng.normal(size=(9, 40)) + 0.5
    mu1, s1, mu2, s2 = x1.mean(0), np.cov(x1, rowvar=False), x2.mean(0), np.cov(x2, rowvar=False)
    got = frechet_distance_from_samples(x1, x2)
    assert got == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-6)
    # sqrtm of a singular product is ill-conditioned; it still agrees to a few digits.
    assert got == pytest.approx(reference_fd(mu1, s1, mu2, s2), rel=1e-4)
    with pytest.raises(MetricInputError, match="at least 2 samples"):
        frechet_distance_from_samples(x1[:1], x2)


# ---------------------------------------------------------------- streaming statistics


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_accumulator_equals_numpy_mean_and_cov(dtype):
    rng = np.random.default_rng(5)
    # A large mean next to a small spread: the unshifted Σxxᵀ − nμμᵀ would lose most digits here.
    x = (rng.normal(size=(1003, 7)) * 0.5 + 300).astype(dtype)
    acc = GaussianAccumulator(7)
    for a, b in [(0, 1), (1, 400), (400, 400), (400, 1003)]:
        acc.update(x[a:b])
    ref = x.astype(np.float64)
    assert acc.count == 1003
    np.testing.assert_allclose(acc.mean, ref.mean(0), rtol=1e-13)
    np.testing.assert_allclose(acc.cov, np.cov(ref, rowvar=False), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("offset, spread", [(1e4, 1e-3), (1e3, 1e-2), (0.0, 1.0)])
def test_float32_products_keep_float64_rows_digits(offset, spread):
    """float64 rows centred before they are rounded to the float32 products: statistics_from_features' path."""
    from extractor.analysis.reference_statistics import statistics_from_features

    x = np.random.default_rng(8).normal(size=(2000, 8)) * spread + offset
    want = np.cov(x, rowvar=False)
    got = statistics_from_features(x)
    np.testing.assert_allclose(got.mu, x.mean(0), rtol=1e-13)
    assert np.abs(got.sigma - want).max() <= 1e-6 * np.abs(want).max()  # README: within ~1e-6 of np.cov


def test_accumulator_errors():
    acc = GaussianAccumulator(3)
    with pytest.raises(MetricInputError, match="no rows"):
        acc.mean
    acc.update(np.ones((1, 3)))
    with pytest.raises(MetricInputError, match="at least 2 rows"):
        acc.cov
    with pytest.raises(MetricInputError, match="shape"):
        acc.update(np.ones((2, 4)))


# ---------------------------------------------------------------- precision, recall, density, coverage


def on_line(xs):
    return np.array([[x, 0.0] for x in xs])


def test_prdc_hand_worked_on_a_line():
    # k=1. Reals 0,1,2,3,6: radii 1,1,1,1,3. Fakes 0.5,2.5,10,11: radii 2,2,1,1.
    # precision: 0.5 and 2.5 are in real balls, 10 and 11 are not → 2/4.
    # recall: reals 0..3 lie in the balls of 0.5 or 2.5 (radius 2); 6 is 3.5 from 2.5 and 4 from 10 → 4/5.
    # density: 0.5 is in the balls of 0 and 1, 2.5 in those of 2 and 3 (not of 6: 3.5 > 3) → 4/(1·4).
    # coverage: reals 0..3 have a fake within 0.5 ≤ 1; 6's nearest fake is 3.5 > 3 → 4/5.
    real, fake = on_line([0, 1, 2, 3, 6]), on_line([0.5, 2.5, 10, 11])
    expected = PRDC(precision=0.5, recall=0.8, density=1.0, coverage=0.8)
    assert prdc(real, fake, k=1) == expected
    assert prdc_blocked(readers(real), 5, readers(fake), 4, k=1, block_size=2) == expected


def test_prdc_hand_worked_on_a_grid_with_k2():
    # Reals: the 3×3 integer grid. With k=2 every radius is 1 (each point has ≥ 2 neighbours at distance 1).
    # Fakes: (0.1, 0.1), (1, 1.2), (5, 5), (5, 6), (6, 5): radii 2-NN among fakes.
    real = np.array([[x, y] for x in range(3) for y in range(3)], dtype=float)
    fake = np.array([[0.1, 0.1], [1, 1.2], [5, 5], [5, 6], [6, 5]])
    # (0.1,0.1) lies within 1 of (0,0) (0.14), (0,1) and (1,0) (0.906) but not of (1,1) (1.27) → 3 balls;
    # (1,1.2) within 1 of (1,1) 0.2, (1,2) 0.8, (0,1) 1.02 no, (2,1) 1.02 no → 2 balls; the far three: 0.
    precision, density = 2 / 5, (3 + 2) / (2 * 5)
    # coverage: reals with a fake within 1: (0,0),(0,1),(1,0) from the first, (1,1),(1,2) from the second → 5/9.
    coverage = 5 / 9
    # recall: fake radii: (0.1,0.1)'s 2nd NN among fakes is far, so its ball (≈6.9) holds every real;
    # hence all 9 reals are recalled.
    recall = 1.0
    expected = PRDC(precision=precision, recall=recall, density=density, coverage=coverage)
    got = prdc(real, fake, k=2)
    for name, value in expected.as_dict().items():
        assert getattr(got, name) == pytest.approx(value, abs=1e-12), name
    assert prdc_blocked(readers(real), 9, readers(fake), 5, k=2, block_size=4) == got


def test_prdc_identical_and_disjoint_sets():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(500, 5))
    same = prdc(x, x.copy(), k=5)
    assert same.precision == 1 and same.recall == 1 and same.coverage == 1
    # Each real ball holds its centre and its k − 1 nearest others strictly inside (the k-th lies on its edge: the
    # authors' code counts d < R), and every point is also a fake: Σ_j Σ_i 1[d(f_j, r_i) < R_i] = N·k, density 1
    # as Naeem et al. state for identical sets (with ≤ it would be (k+1)/k).
    assert same.density == pytest.approx(1.0, abs=1e-12)
    far = prdc(x, x + 1000.0, k=5)
    assert far == PRDC(0.0, 0.0, 0.0, 0.0)
    far_blocked = prdc_blocked(readers(x), 500, readers(x + 1000.0), 500, k=5, block_size=123)
    assert far_blocked == far


@pytest.mark.parametrize("block_size", [1000, 64, 37])
def test_blocked_equals_in_memory_and_reference(monkeypatch, block_size):
    rng = np.random.default_rng(7)
    real = rng.normal(size=(203, 6)).astype(np.float32)
    fake = (rng.normal(size=(157, 6)) * 1.2 + 0.3).astype(np.float32)
    fake[:5] = real[:5]  # duplicates across the sets
    real[10] = real[11]  # and a duplicate inside one set: distance 0 to another sample counts
    monkeypatch.setattr(metrics, "TILE_ROWS", 7)  # tiles smaller than blocks, not dividing them
    in_memory = prdc(real, fake, k=5)
    blocked = prdc_blocked(readers(real), 203, readers(fake), 157, k=5, block_size=block_size)
    assert blocked == in_memory
    ref = reference_prdc(real.astype(np.float64), fake.astype(np.float64), 5)
    for name, value in ref.items():
        assert getattr(in_memory, name) == pytest.approx(value, abs=1e-12), name
    assert 0.3 < in_memory.precision < 1 and 0 < in_memory.density


def test_blocked_float32_with_shift_matches_float64():
    import torch

    rng = np.random.default_rng(8)
    real = rng.normal(size=(400, 32)) + 50.0  # far from the origin: the shift keeps float32 accurate
    fake = rng.normal(size=(350, 32)) * 1.1 + 50.2
    exact = prdc(real, fake, k=3)
    fast = prdc_blocked(readers(real), 400, readers(fake), 350, k=3, block_size=128, dtype=torch.float32, shift=real.mean(0))
    for name, value in exact.as_dict().items():
        assert getattr(fast, name) == pytest.approx(value, abs=0.01), name


def test_prdc_needs_more_than_k_samples():
    x = np.zeros((5, 3))
    with pytest.raises(MetricInputError, match="at least 6 samples"):
        prdc(x, np.ones((10, 3)), k=5)
    with pytest.raises(MetricInputError, match="dims differ"):
        prdc(np.zeros((10, 3)), np.ones((10, 4)), k=5)
    with pytest.raises(MetricInputError, match="at least 6 samples"):
        prdc_blocked(readers(np.ones((10, 3))), 10, readers(x), 5, k=5)
