"""One layer of an activation store as feature vectors: opening and checking it, reading it block by block
(reduced to (n, dim) float32 rows, checked finite), and spilling the rows to a raw scratch file for passes that
need them again (k-NN, per-class gathers). Shared by `compare`, `stats` and the Inception Score."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

import numpy as np
import zarr

from schemas.activation_store import validate_activation_store
from schemas.errors import ImzarrError
from schemas.vocabulary import POOL_MODES

MAX_FLAT_DIM = 4096  # flattened maps beyond this make k-NN in that space meaningless and the covariance huge
READ_BUDGET_BYTES = 128 << 20  # stored bytes of one read block (unpooled maps are ~100 KB per sample)


class AnalysisInputError(ImzarrError):
    """A store, layer or option an analysis cannot work on: the message names the store (or file) and why."""


class LayerMismatchError(AnalysisInputError):
    """The layer is missing from a store, or its features differ in shape or reduction between the inputs."""


class NonFiniteFeaturesError(AnalysisInputError):
    """A store holds inf or NaN activations (float16 overflow, or a diverged network)."""


@dataclass
class LayerFeatures:
    """One store's layer and how its samples become feature vectors."""

    role: str  # "real", "generated", "store": for messages
    url: str
    var: str
    array: zarr.Array
    reduce: str | None  # spatial reduction applied here (None: the store is pooled already)
    reduction: str  # what each feature is, whoever did it: "mean", "max" or "none" (flattened)
    dim: int
    labels: np.ndarray
    attrs: dict  # the store's group attributes: model, σ, layers (provenance)

    @property
    def n(self) -> int:
        return int(self.array.shape[0])

    @property
    def module_path(self) -> str:
        return str(self.attrs["layers"][self.var])


def open_layer(role: str, url: str, layer: str, pool: str | None = None) -> LayerFeatures:
    """Open `layer` (a variable name or the module path it was captured from) of the activation store at `url`.

    `pool` reduces an unpooled layer (None: "mean"); a layer pooled at extraction keeps its pooling, and another
    `pool` asked for it is refused rather than ignored."""
    if pool is not None and pool not in POOL_MODES:
        raise AnalysisInputError(f"pool must be one of {POOL_MODES}, got {pool!r}")
    group = validate_activation_store(url)
    attrs = dict(group.attrs)
    layers: dict[str, str] = attrs["layers"]
    var = layer if layer in layers else next((v for v, path in layers.items() if path == layer), None)
    if var is None:
        raise LayerMismatchError(f"{url}: no layer {layer!r}; this {'' if role == 'store' else role + ' '}store has {sorted(layers)}")
    array = group[var]
    if array.ndim == 2:
        pooled = str(attrs["pooling"])
        # The layer's own record: "none" for a layer that is one vector per sample by itself (pool3, cls, logits),
        # which any --pool leaves as it is; stores written before per-layer records have only the store's.
        own = str(dict(array.attrs).get("pooling", pooled))
        if pool is not None and own != "none" and pool != own:
            raise LayerMismatchError(
                f"{url}: layer {var} was pooled {own!r} at extraction, so --pool {pool} (pool={pool!r}) cannot apply; "
                f"leave it out, or extract the layer again with --pool {pool}" + (" (unpooled)" if pool == "none" else "")
            )
        return LayerFeatures(role, url, var, array, None, pooled, int(array.shape[1]), group["label"][:], attrs)
    pool = pool or "mean"
    dim = int(np.prod(array.shape[1:])) if pool == "none" else int(array.shape[1])
    if dim > MAX_FLAT_DIM:
        raise LayerMismatchError(
            f"{url}: layer {var} flattened is {dim} values per sample (shape {tuple(array.shape[1:])}), over {MAX_FLAT_DIM}; "
            f"use --pool mean (or max) to compare its channel means"
        )
    return LayerFeatures(role, url, var, array, pool, pool, dim, group["label"][:], attrs)


def check_compatible(real: LayerFeatures, fake: LayerFeatures, layer: str) -> None:
    """Refuse two layers whose feature vectors do not mean the same thing (shape, reduction)."""
    same_shape = real.array.shape[1:] == fake.array.shape[1:] if real.array.ndim == fake.array.ndim else True
    if real.dim != fake.dim or real.reduction != fake.reduction or not same_shape:
        raise LayerMismatchError(
            f"layer {layer}: features differ: {real.url} has per-sample shape {tuple(real.array.shape[1:])} → "
            f"{real.dim} features ({describe(real)}), {fake.url} has {tuple(fake.array.shape[1:])} → {fake.dim} "
            f"({describe(fake)})"
        )


def describe(side: LayerFeatures) -> str:
    if side.reduce is None:
        return f"pooled '{side.reduction}' at extraction"
    return "flattened" if side.reduction == "none" else f"spatial {side.reduction} here"


def rows_per_read(array: zarr.Array, block_size: int) -> int:
    """Rows per read: at most block_size and READ_BUDGET_BYTES, a whole number of inner chunks when possible."""
    row_bytes = int(np.prod(array.shape[1:])) * array.dtype.itemsize
    rows = max(1, min(block_size, READ_BUDGET_BYTES // max(row_bytes, 1)))
    chunk = int(array.chunks[0])
    return rows if rows < chunk else rows - rows % chunk


def reduce_block(block: np.ndarray, reduce: str | None) -> np.ndarray:
    """(n, C[, H, W]) stored values → (n, dim) float32 features."""
    if reduce is None:
        return block.astype(np.float32, copy=False)
    if reduce == "mean":
        return block.mean(axis=(2, 3), dtype=np.float32)  # accumulates float16 in float32 without a full copy
    if reduce == "max":
        return block.max(axis=(2, 3)).astype(np.float32)
    return block.reshape(block.shape[0], -1).astype(np.float32)


def feature_blocks(side: LayerFeatures, block_size: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, stop, float32 features) over the whole layer, in store order; refuses inf/NaN with its position."""
    rows = rows_per_read(side.array, block_size)
    for a in range(0, side.n, rows):
        b = min(side.n, a + rows)
        feats = reduce_block(side.array[a:b], side.reduce)
        finite = np.isfinite(feats).all(axis=1)
        if not finite.all():
            bad = a + int(np.flatnonzero(~finite)[0])
            raise NonFiniteFeaturesError(
                f"{side.url}: layer {side.var} has inf/NaN activations (first at sample {bad}, "
                f"{int((~finite).sum())} samples in rows {a}..{b - 1}); float16 storage overflows beyond ±65504"
            )
        yield a, b, feats


class RowFile:
    """Float32 features spilled to a raw file: block reads for the k-NN passes, row gathers for classes."""

    def __init__(self, path: Path, n: int, dim: int):
        self.path, self.n, self.dim = path, n, dim
        self.row_bytes = dim * 4

    def read(self, start: int, stop: int) -> np.ndarray:
        count = (stop - start) * self.dim
        return np.fromfile(self.path, dtype=np.float32, count=count, offset=start * self.row_bytes).reshape(-1, self.dim)

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Rows at sorted indices; one pread per run of adjacent rows."""
        out = np.empty((indices.size, self.dim), dtype=np.float32)
        if indices.size == 0:
            return out
        breaks = np.flatnonzero(np.diff(indices) != 1) + 1
        starts, stops = np.concatenate([[0], breaks]), np.concatenate([breaks, [indices.size]])
        with open(self.path, "rb") as f:
            fd = f.fileno()
            for a, b in zip(starts.tolist(), stops.tolist()):
                raw = os.pread(fd, (b - a) * self.row_bytes, int(indices[a]) * self.row_bytes)
                out[a:b] = np.frombuffer(raw, dtype=np.float32).reshape(b - a, self.dim)
        return out

    def reader(self, indices: np.ndarray) -> Callable[[int, int], np.ndarray]:
        """A (start, stop) reader over the given rows, for the blocked metrics."""
        return lambda a, b: self.take(indices[a:b])


def stream_layer(
    side: LayerFeatures,
    block_size: int,
    consumers: list[Callable[[int, int, np.ndarray], None]],
    spill_dir: Path | None = None,
    log: TextIO | None = None,
) -> RowFile | None:
    """Read the layer once, handing every block to each consumer; with `spill_dir`, also write the rows there."""
    started = time.monotonic()
    spill = None if spill_dir is None else open(spill_dir / f"{side.role}.f32", "wb")
    try:
        for a, b, feats in feature_blocks(side, block_size):
            for consume in consumers:
                consume(a, b, feats)
            if spill is not None:
                feats.tofile(spill)
    finally:
        if spill is not None:
            spill.close()
    if log is not None:
        print(f"[analysis] {side.role} {side.url}: {side.n} samples × {side.dim} features read in {time.monotonic() - started:.1f} s", file=log, flush=True)
    return None if spill_dir is None else RowFile(spill_dir / f"{side.role}.f32", side.n, side.dim)


def class_rows(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Sorted sample positions of every known label (-1, unknown, is left out)."""
    order = np.argsort(labels, kind="stable")  # stable: positions stay ascending within a class
    sorted_labels = labels[order]
    uniq, starts = np.unique(sorted_labels, return_index=True)
    stops = np.append(starts[1:], labels.size)
    return {int(c): order[a:b] for c, a, b in zip(uniq, starts, stops) if c >= 0}
