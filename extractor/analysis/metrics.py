"""Distribution metrics between two feature sets: Fréchet distance, streaming Gaussian statistics, and k-NN
precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020), in memory or blocked.

Everything here is NumPy/torch on the CPU and needs no SciPy. Features are rows of 2-D arrays.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from schemas.errors import ImzarrError

# Rows of one distance tile in the blocked passes: 1024 × block_size float32 is 32 MB at block_size 8192.
TILE_ROWS = 1024

# (start, stop) -> float rows [start, stop) of a feature set, shape (stop - start, dim).
RowReader = Callable[[int, int], np.ndarray]


class MetricInputError(ImzarrError):
    """Features a metric cannot be computed on (too few samples, mismatched dimensions, wrong shape)."""


# ---------------------------------------------------------------- Fréchet distance


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||μ1−μ2||² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) in float64.

    Tr((Σ1Σ2)^½) = Σ √λ over the eigenvalues of the symmetric PSD matrix Σ1^½ Σ2 Σ1^½ (similar to Σ1Σ2), so
    two symmetric eigendecompositions replace a general matrix square root; rounding can make tiny
    eigenvalues negative, and those are clipped to 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise MetricInputError(f"Fréchet distance: shapes μ1 {mu1.shape}, Σ1 {s1.shape}, μ2 {mu2.shape}, Σ2 {s2.shape} do not match")
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def frechet_distance_from_samples(x1: np.ndarray, x2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted (mean, unbiased covariance) to two sample sets.

    With few samples (n ≤ dim) the covariances have rank < n, and with centred samples A1, A2 the eigenvalues of
    Σ1Σ2 are the squared singular values of A1·A2ᵀ / √((n1−1)(n2−1)): an n1×n2 SVD instead of dim×dim
    eigendecompositions, exact in exact arithmetic. Larger sets go through the covariance form.
    """
    x1, x2 = _as_rows(x1, "first set"), _as_rows(x2, "second set")
    n1, n2 = x1.shape[0], x2.shape[0]
    if x1.shape[1] != x2.shape[1]:
        raise MetricInputError(f"Fréchet distance: feature dims differ ({x1.shape[1]} vs {x2.shape[1]})")
    if n1 < 2 or n2 < 2:
        raise MetricInputError(f"Fréchet distance needs at least 2 samples per set, got {n1} and {n2}")
    if max(n1, n2) > x1.shape[1]:
        return frechet_distance(x1.mean(0), np.cov(x1, rowvar=False), x2.mean(0), np.cov(x2, rowvar=False))
    mu1, mu2 = x1.mean(0), x2.mean(0)
    a1, a2 = x1 - mu1, x2 - mu2
    c1, c2 = n1 - 1, n2 - 1
    singular = np.linalg.svd(a1 @ a2.T, compute_uv=False)
    tr_sqrt = float(singular.sum()) / np.sqrt(c1 * c2)
    diff = mu1 - mu2
    return float(diff @ diff + np.einsum("ij,ij->", a1, a1) / c1 + np.einsum("ij,ij->", a2, a2) / c2 - 2.0 * tr_sqrt)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    eig, vec = np.linalg.eigh((s + s.T) / 2)
    return (vec * np.sqrt(np.clip(eig, 0.0, None))) @ vec.T


def _as_rows(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise MetricInputError(f"{what}: features must be 2-D (samples, dim), got shape {x.shape}")
    return x


# ---------------------------------------------------------------- streaming statistics


class GaussianAccumulator:
    """Mean and unbiased covariance of rows seen block by block, accumulated in float64.

    Each chunk of rows is centred on its own mean and its scatter matrix Cᵀ C formed, then merged into the
    running totals with the pairwise update of Chan, Golub & LeVeque (1979):
    M2 = M2_a + M2_b + δδᵀ·n_a·n_b/(n_a+n_b), δ = μ_b − μ_a. The textbook Σxxᵀ − nμμᵀ loses every digit when
    the mean is large next to the spread; centred chunks do not, whatever the order of the rows (sorted by
    class, say). `product_dtype` float32 forms each chunk's Cᵀ C in float32 (BLAS syrk at twice the float64
    rate here) and sums the chunks in float64: the centred values lose nothing that float16 or float32
    features held, and the covariance agrees with np.cov in float64 to ~1e-6 of its largest entry (tested).
    """

    def __init__(self, dim: int, product_dtype: type = np.float64, chunk_bytes: int = 64 << 20):
        self.dim = int(dim)
        self.count = 0
        self.product_dtype = np.dtype(product_dtype)
        self._chunk_rows = max(1, chunk_bytes // (self.product_dtype.itemsize * max(self.dim, 1)))
        self._mean = np.zeros(self.dim, dtype=np.float64)
        self._m2 = np.zeros((self.dim, self.dim), dtype=np.float64)

    def update(self, x_block: np.ndarray) -> None:
        """Add rows (n, dim) of any float dtype."""
        block = np.asarray(x_block)
        if block.ndim != 2 or block.shape[1] != self.dim:
            raise MetricInputError(f"GaussianAccumulator({self.dim}): block has shape {block.shape}")
        for a in range(0, block.shape[0], self._chunk_rows):
            chunk = block[a : a + self._chunk_rows]
            mean_b = np.asarray(chunk.mean(axis=0, dtype=np.float64))
            if chunk.dtype.itemsize > self.product_dtype.itemsize:
                # Rows the product dtype cannot hold (float64 into float32 products) are centred before they
                # are rounded: rounded first, a large mean would leave little of the spread (1e4 ± 1e-3).
                x = (np.asarray(chunk, dtype=np.float64) - mean_b).astype(self.product_dtype)
                centre = mean_b
            else:
                centre = mean_b.astype(self.product_dtype)
                x = np.array(chunk, dtype=self.product_dtype)  # always a copy: centred in place
                x -= centre
            n_b = x.shape[0]
            offset = mean_b - centre  # Σ(x−c)(x−c)ᵀ = M2 + n(μ−c)(μ−c)ᵀ: remove what rounding the centre added
            m2_b = (x.T @ x).astype(np.float64)
            m2_b -= n_b * np.outer(offset, offset)
            total = self.count + n_b
            delta = mean_b - self._mean
            self._m2 += m2_b
            if self.count:
                self._m2 += np.outer(delta, delta * (self.count * n_b / total))
            self._mean += delta * (n_b / total)
            self.count = total

    @property
    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise MetricInputError("GaussianAccumulator: no rows were added")
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        if self.count < 2:
            raise MetricInputError(f"GaussianAccumulator: covariance needs at least 2 rows, got {self.count}")
        cov = self._m2 / (self.count - 1)
        return (cov + cov.T) / 2


# ---------------------------------------------------------------- precision, recall, density, coverage


@dataclass(frozen=True)
class MetricValues:
    """A metric's values, recorded in a report as `as_dict()`: its fields in order."""

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class SubsetEstimate(MetricValues):
    """A metric estimated over random subsets (KID) or splits (Inception Score): mean and standard deviation
    (numpy's, ddof 0) of the per-subset values; each metric adds how its subsets were drawn."""

    mean: float
    std: float


@dataclass(frozen=True)
class PRDC(MetricValues):
    """k-NN precision and recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020)."""

    precision: float
    recall: float
    density: float
    coverage: float


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5, dtype: torch.dtype = torch.float64) -> PRDC:
    """All four metrics with every pairwise distance in memory: for small sets (a class)."""
    real_t, fake_t = _tensor(real, dtype, "real"), _tensor(fake, dtype, "fake")
    _check_sets(real_t.shape, fake_t.shape, k)
    real_sq, fake_sq = _sq_norms(real_t), _sq_norms(fake_t)
    r_real = _kth_nn_sq(_sq_dists(real_t, real_sq, real_t, real_sq), k)
    r_fake = _kth_nn_sq(_sq_dists(fake_t, fake_sq, fake_t, fake_sq), k)
    cross = _sq_dists(real_t, real_sq, fake_t, fake_sq)  # (real, fake)
    # Strictly inside, as in Naeem et al.'s code: a set against a copy of itself then has density 1, not 1 + 1/k.
    inside_real = cross < r_real[:, None]
    inside_fake = cross < r_fake[None, :]
    return PRDC(
        precision=float(inside_real.any(dim=0).double().mean()),
        recall=float(inside_fake.any(dim=1).double().mean()),
        density=float(inside_real.sum(dim=0).double().sum()) / (k * fake_t.shape[0]),
        coverage=float(inside_real.any(dim=1).double().mean()),
    )


def _kth_nn_sq(d_same: torch.Tensor, k: int) -> torch.Tensor:
    d_same.fill_diagonal_(float("inf"))  # a sample is not its own neighbour
    return torch.topk(d_same, k, dim=1, largest=False).values[:, -1]


def prdc_blocked(
    read_real: RowReader,
    n_real: int,
    read_fake: RowReader,
    n_fake: int,
    k: int = 5,
    block_size: int = 8192,
    dtype: torch.dtype = torch.float64,
    shift: np.ndarray | None = None,
) -> PRDC:
    """The same four metrics from two row readers, holding two blocks and per-row state (never a whole set).

    Three passes: k-th neighbour radii among reals and among fakes (each block pair once, both directions
    updated), then one real×fake pass counting ball memberships. `shift` (e.g. the real mean) is subtracted from
    every row first: distances do not change, and with float32 the ||a||²+||b||²−2ab form loses less.
    """
    if block_size < 1:
        raise MetricInputError(f"block_size must be positive, got {block_size}")
    probe_r, probe_f = read_real(0, min(1, n_real)), read_fake(0, min(1, n_fake))
    _check_sets((n_real, probe_r.shape[-1]), (n_fake, probe_f.shape[-1]), k)
    shift_t = None if shift is None else torch.as_tensor(np.asarray(shift, np.float64)).to(dtype)

    block_rows = min(block_size, max(n_real, n_fake))
    work = _Workspace(dtype, probe_r.shape[-1], min(TILE_ROWS, block_rows), block_rows)

    def loader(read: RowReader, name: str) -> Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]]:
        def load(a: int, b: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
            rows = _tensor(read(a, b), dtype, name)
            if rows.shape[0] != b - a:
                raise MetricInputError(f"{name} reader returned {rows.shape[0]} rows for [{a}, {b})")
            # Copied into a reused buffer: the reader's array may be the caller's own data, and is not shifted.
            return work.load(slot, rows, shift_t)

        return load

    load_real, load_fake = loader(read_real, "real"), loader(read_fake, "fake")
    r_real = _kth_nn_sq_blocked(load_real, n_real, k, block_size, work)
    r_fake = _kth_nn_sq_blocked(load_fake, n_fake, k, block_size, work)

    density_count = torch.zeros(n_fake, dtype=torch.int64)
    covered = torch.zeros(n_real, dtype=torch.bool)
    recalled = torch.zeros(n_real, dtype=torch.bool)
    for ra, rb in _blocks(n_real, block_size):
        real_block, real_sq = load_real(ra, rb, 0)
        for fa, fb in _blocks(n_fake, block_size):
            fake_block, fake_sq = load_fake(fa, fb, 1)
            for ta, tb in _blocks(rb - ra, TILE_ROWS):
                rows = slice(ra + ta, ra + tb)
                d = work.sq_dists(real_block[ta:tb], real_sq[ta:tb], fake_block, fake_sq)
                inside = torch.lt(d, r_real[rows, None], out=work.mask(tb - ta, fb - fa))
                density_count[fa:fb] += _column_counts(inside)
                covered[rows] |= inside.any(dim=1)
                inside = torch.lt(d, r_fake[None, fa:fb], out=inside)
                recalled[rows] |= inside.any(dim=1)
    return PRDC(
        precision=float((density_count > 0).double().mean()),
        recall=float(recalled.double().mean()),
        density=float(density_count.sum()) / (k * n_fake),
        coverage=float(covered.double().mean()),
    )


class _Workspace:
    """Two row blocks (with their squared norms), a distance tile and a mask tile, reused throughout.

    Fresh large allocations are mapped anew by the allocator each time, and first-touching new pages is slow on
    these machines (~0.5 GB/s); reusing buffers also keeps the peak at two blocks and one tile.
    """

    def __init__(self, dtype: torch.dtype, dim: int, tile_rows: int, block_rows: int):
        self.dtype = dtype
        self._blocks = [torch.empty((block_rows, dim), dtype=dtype) for _ in range(2)]
        self._norms = [torch.empty(block_rows, dtype=dtype) for _ in range(2)]
        self._dist = torch.empty(tile_rows * block_rows, dtype=dtype)
        self._mask = torch.empty(tile_rows * block_rows, dtype=torch.bool)

    def load(self, slot: int, rows: torch.Tensor, shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        n = rows.shape[0]
        block, norms = self._blocks[slot][:n], self._norms[slot][:n]
        if shift is None:
            block.copy_(rows)
        else:
            torch.sub(rows, shift, out=block)
        for a in range(0, n, TILE_ROWS):  # in slices: x*x of a whole block would be one more block-sized temporary
            norms[a : a + TILE_ROWS] = _sq_norms(block[a : a + TILE_ROWS])
        return block, norms

    def sq_dists(self, a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
        out = self._dist[: a.shape[0] * b.shape[0]].view(a.shape[0], b.shape[0])
        return _sq_dists(a, a_sq, b, b_sq, out=out)

    def mask(self, rows: int, cols: int) -> torch.Tensor:
        return self._mask[: rows * cols].view(rows, cols)


def _kth_nn_sq_blocked(
    load: Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]], n: int, k: int, block_size: int, work: _Workspace
) -> torch.Tensor:
    """Squared distance of every row to its k-th nearest other row; each pair of blocks is computed once."""
    best = torch.full((n, k), float("inf"), dtype=work.dtype)  # k smallest squared distances so far, per row
    blocks = list(_blocks(n, block_size))
    for i, (ia, ib) in enumerate(blocks):
        outer, outer_sq = load(ia, ib, 0)
        for ja, jb in blocks[i:]:
            inner, inner_sq = (outer, outer_sq) if ja == ia else load(ja, jb, 1)
            for ta, tb in _blocks(ib - ia, TILE_ROWS):
                d = work.sq_dists(outer[ta:tb], outer_sq[ta:tb], inner, inner_sq)
                if ja == ia:
                    rows = torch.arange(tb - ta)
                    d[rows, rows + ta] = float("inf")  # a sample is not its own neighbour
                _merge_smallest(best, ia + ta, ia + tb, torch.topk(d, min(k, d.shape[1]), dim=1, largest=False).values)
                if ja != ia:
                    # The same tile read down its columns gives the inner rows' distances to these outer rows.
                    down = torch.topk(d, min(k, d.shape[0]), dim=0, largest=False).values
                    _merge_smallest(best, ja, jb, down.T)
    return best[:, -1]


def _merge_smallest(best: torch.Tensor, a: int, b: int, candidates: torch.Tensor) -> None:
    k = best.shape[1]
    both = torch.cat([best[a:b], candidates], dim=1)
    best[a:b] = torch.topk(both, k, dim=1, largest=False).values  # ascending: column k-1 is the k-th


def _column_counts(mask: torch.Tensor, rows: int = 64) -> torch.Tensor:
    """True entries per column; summed in row slices because a bool sum first casts the whole tile to int64."""
    counts = torch.zeros(mask.shape[1], dtype=torch.int64)
    for a in range(0, mask.shape[0], rows):
        counts += mask[a : a + rows].sum(dim=0)
    return counts


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(dim=1)


def _sq_dists(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances (len(a), len(b)) as ||a||² + ||b||² − 2ab, clamped at 0 (rounding)."""
    d = torch.mm(a, b.T, out=out) if out is not None else a @ b.T
    d.mul_(-2.0)
    d.add_(a_sq[:, None])
    d.add_(b_sq[None, :])
    return d.clamp_(min=0.0)


def _blocks(n: int, size: int):
    for a in range(0, n, size):
        yield a, min(n, a + size)


def _tensor(x: np.ndarray, dtype: torch.dtype, name: str) -> torch.Tensor:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise MetricInputError(f"{name} features must be 2-D (samples, dim), got shape {arr.shape}")
    if not arr.flags.writeable:
        arr = arr.copy()  # torch warns on read-only buffers (np.frombuffer, some zarr reads)
    return torch.from_numpy(np.ascontiguousarray(arr)).to(dtype)


def _check_sets(real_shape: tuple[int, ...], fake_shape: tuple[int, ...], k: int) -> None:
    if k < 1:
        raise MetricInputError(f"k must be at least 1, got {k}")
    if real_shape[1] != fake_shape[1]:
        raise MetricInputError(f"real and fake feature dims differ ({real_shape[1]} vs {fake_shape[1]})")
    if real_shape[0] < k + 1 or fake_shape[0] < k + 1:
        raise MetricInputError(f"k-NN metrics with k={k} need at least {k + 1} samples per set, got {real_shape[0]} real and {fake_shape[0]} fake")
