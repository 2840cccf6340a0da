"""The contracts of both stores (names, dims, dtypes, attributes), their validators, and what every store
writer shares (lifecycle, class table, command line). From Python: `open_image_store`."""

from __future__ import annotations

from typing import Any

from schemas.remote_storage import install_remote_defaults

__all__ = ["open_image_store"]

# Every S3 filesystem this process makes gets connect/read timeouts and bounded retries unless told otherwise
# (schemas/remote_storage.py): from the command line and from Python alike.
install_remote_defaults()


def open_image_store(url: str, require_complete: bool = True) -> Any:
    """A validated image store, ready to read: `len(store)`, `store.take(indices)`, `store.read(a, b)`,
    `store.coordinate("label")`, `store.attrs`."""
    from schemas.image_store import validate_image_store

    return validate_image_store(url, require_complete=require_complete)
