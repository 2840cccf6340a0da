"""Verify a store: read every data file and check it against the crc32c recorded when it was written
(schemas/store_integrity.py): a scrub for stores copied between machines and buckets (`imzarr verify STORE`).

Stores written before checksums were recorded get the listing checks only, and say so.
"""

from __future__ import annotations

from schemas.progress_report import ProgressReport
from schemas.store_integrity import VerifyResult, planned_bytes, verify_store


def verify(url: str, storage_options: dict | None = None, show_progress: bool = True) -> VerifyResult:
    """Verify the store at `url` (a path or fsspec URL), with a progress report of bytes read on stderr."""
    progress = ProgressReport(planned_bytes(url, storage_options), f"verifying {url}", unit="B") if show_progress else None
    try:
        return verify_store(url, storage_options, progress)
    finally:
        if progress is not None:
            progress.close()
