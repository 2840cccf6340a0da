"""`imzarr verify STORE`: read every data file of a store and check it against the crc32c recorded when it was
written (schemas/store_integrity.py): a scrub for stores copied between machines and buckets.

Prints one line per damaged file (missing, truncated or too long, checksum mismatch) and exits 1 if there is
any; 0 otherwise. Stores written before checksums were recorded get the listing checks only, and say so.
"""

from __future__ import annotations

import argparse
import sys

from schemas.cli import add_command
from schemas.progress_report import ProgressReport
from schemas.store_integrity import DamagedStoreError, VerifyResult, planned_bytes, verify_store


def verify(url: str, storage_options: dict | None = None, show_progress: bool = True) -> VerifyResult:
    """Verify the store at `url` (a path or fsspec URL), with a progress report of bytes read on stderr."""
    progress = ProgressReport(planned_bytes(url, storage_options), f"verifying {url}", unit="B") if show_progress else None
    try:
        return verify_store(url, storage_options, progress)
    finally:
        if progress is not None:
            progress.close()


def add_verify_command(sub) -> None:
    """`imzarr verify STORE`."""
    parser = add_command(
        sub,
        "verify",
        "read every data file of a store and check it against the crc32c recorded when it was written",
        description=(
            "Read every chunk and shard file of a store (images or activations) and compare its crc32c with the one "
            "recorded when it was written; one line per damaged file (missing, truncated, checksum mismatch), exit 1 "
            "if any. Stores written before checksums were recorded get the presence and size checks only."
        ),
    )
    parser.add_argument("store", help="store path or fsspec URL (s3://…, memory://…)")
    parser.set_defaults(handler=_verify)


def _verify(args: argparse.Namespace) -> int:
    result = verify(args.store)
    for damage in result.damage:
        print(damage)
    what = f"{result.files} files, {result.bytes_read / 1e6:,.1f} MB read"
    if not result.recorded:
        print(f"{args.store}: no checksum record (written before imzarr recorded checksums): checked presence and sizes only", file=sys.stderr)
    if result.damage:
        raise DamagedStoreError(f"{args.store}: {len(result.damage)} damaged data file{'s' if len(result.damage) > 1 else ''} ({what})")
    print(f"{args.store}: ok ({what}, every crc32c as recorded)" if result.recorded else f"{args.store}: ok (presence and sizes)")
    return 0
