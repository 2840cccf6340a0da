"""Which samples of an image store to run: first N, an index file, some classes, or K per class."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from schemas.errors import ImzarrError


class SelectionError(ImzarrError):
    """A selection that cannot be made from this store."""


@dataclass(frozen=True)
class SelectionSpec:
    num_samples: int | None = None
    indices_file: str | None = None
    classes: tuple[str, ...] | None = None  # WNIDs
    per_class: int | None = None
    seed: int = 0


def select_samples(spec: SelectionSpec, labels: np.ndarray, synsets: np.ndarray) -> np.ndarray:
    """Store positions to run, ascending (so reads are sequential and shards fill in store order)."""
    n = labels.size
    chosen = np.arange(n, dtype=np.int64)
    if spec.indices_file is not None:
        chosen = _read_indices(spec.indices_file, n)
    if spec.classes:
        known = set(synsets[chosen].tolist())
        unknown = [w for w in spec.classes if w not in known]
        if unknown:
            raise SelectionError(f"classes {unknown} have no samples in this store")
        chosen = chosen[np.isin(synsets[chosen], np.array(spec.classes, dtype=object))]
    if spec.per_class is not None:
        if spec.per_class < 1:
            raise SelectionError(f"--per-class must be ≥ 1, got {spec.per_class}")
        rng = np.random.default_rng(spec.seed)
        picked = []
        for label in np.unique(labels[chosen]):
            members = chosen[labels[chosen] == label]
            picked.append(rng.choice(members, size=min(spec.per_class, members.size), replace=False))
        chosen = np.sort(np.concatenate(picked)) if picked else chosen[:0]
    if spec.num_samples is not None:
        if spec.num_samples < 1:
            raise SelectionError(f"--num-samples must be ≥ 1, got {spec.num_samples}")
        chosen = chosen[: spec.num_samples]
    if chosen.size == 0:
        raise SelectionError("the selection is empty")
    return chosen


def _read_indices(path: str, n: int) -> np.ndarray:
    p = Path(path)
    try:
        raw = np.load(p) if p.suffix == ".npy" else np.loadtxt(p, dtype=np.int64, ndmin=1)
    except (OSError, ValueError) as exc:
        raise SelectionError(f"{path}: cannot read sample indices ({exc})") from None
    idx = np.asarray(raw).astype(np.int64).reshape(-1)
    bad = (idx < 0) | (idx >= n)
    if bad.any():
        raise SelectionError(f"{path}: index {idx[bad][0]} outside 0..{n - 1}")
    return np.unique(idx)


def describe_selection(spec: SelectionSpec, chosen: np.ndarray) -> dict[str, Any]:
    """What the store records about its selection (the positions themselves are the source_sample coordinate)."""
    return {
        "num_samples": spec.num_samples,
        "indices_file": spec.indices_file,
        "classes": list(spec.classes) if spec.classes else None,
        "per_class": spec.per_class,
        "seed": spec.seed if spec.per_class is not None else None,
        "count": int(chosen.size),
        "sha256": hashlib.sha256(chosen.astype("<i8").tobytes()).hexdigest(),
    }
