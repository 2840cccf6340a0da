"""The integrity pass a run makes before it marks a store complete: no NaN/Inf found, every shard recorded done."""

from __future__ import annotations

import numpy as np

from schemas.errors import RunFailedError
from schemas.store_lifecycle import read_done


class IntegrityError(RunFailedError):
    """A run that produced NaN/Inf values or left shards unwritten: the store stays incomplete; exit code 1."""


def nonfinite_summary(receipts: list[dict]) -> str | None:
    """'first bad sample i; name: samples [...]; …' over every task's NaN/Inf rows, or None when there are none."""
    found: dict[str, list[int]] = {}
    for receipt in receipts:
        for name, samples in ((receipt or {}).get("nonfinite") or {}).items():
            found.setdefault(name, []).extend(samples)
    if not found:
        return None
    first = min(min(samples) for samples in found.values())
    parts = [f"{name}: samples {sorted(samples)[:10]}{' …' if len(samples) > 10 else ''}" for name, samples in found.items()]
    return f"first bad sample {first}; " + "; ".join(parts[:5])


def integrity_pass(url: str, num_shards: int, receipts: list[dict], what: str = "the activations") -> None:
    """Refuse to finish a store whose tasks found NaN/Inf, or whose shards are not all recorded done."""
    summary = nonfinite_summary(receipts)
    if summary:
        raise IntegrityError(f"{url}: NaN/Inf in {what}, store left incomplete (nothing marked complete) — {summary}")
    done = read_done(url, num_shards)
    if not done.all():
        raise IntegrityError(f"{url}: shards {np.flatnonzero(~done)[:10].tolist()} were not written; re-run to finish")
