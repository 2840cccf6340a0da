"""The contracts of both stores (names, dims, dtypes, attributes), their validators, and what every store
writer shares (lifecycle, class table, command line). From Python: `open_image_store`, and
`apply_storage_options` (what `--storage-options` does: endpoint, credentials and timeouts for s3:// and other
remote URLs)."""

from __future__ import annotations

from typing import Any

from schemas.remote_storage import install_remote_defaults

__all__ = ["apply_storage_options", "open_image_store"]

# Every S3 filesystem this process makes gets connect/read timeouts and bounded retries unless told otherwise
# (schemas/remote_storage.py): from the command line and from Python alike.
install_remote_defaults()


def apply_storage_options(options: dict[str, Any], protocols: Any = ("s3",)) -> None:
    """Filesystem options (e.g. `{"endpoint_url": "http://127.0.0.1:9000", "key": …, "secret": …}`) for every
    remote URL of these protocols opened from now on in this process, as `--storage-options` gives a command."""
    from schemas.storage_options import apply_storage_options as apply

    apply(options, protocols)


def open_image_store(url: str, require_complete: bool = True) -> Any:
    """A validated image store, ready to read: `len(store)`, `store.take(indices)`, `store.read(a, b)`,
    `store.coordinate("label")`, `store.attrs`."""
    from schemas.image_store import validate_image_store

    return validate_image_store(url, require_complete=require_complete)
