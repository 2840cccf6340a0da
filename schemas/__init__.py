"""The contracts of both stores (names, dims, dtypes, attributes), their validators, and what every store
writer shares (lifecycle, class table, command line). From Python: `open_image_store`."""

from __future__ import annotations

from typing import Any

__all__ = ["open_image_store"]


def open_image_store(url: str, require_complete: bool = True) -> Any:
    """A validated image store, ready to read: `len(store)`, `store.take(indices)`, `store.read(a, b)`,
    `store.coordinate("label")`, `store.attrs`."""
    from schemas.image_store import validate_image_store

    return validate_image_store(url, require_complete=require_complete)
