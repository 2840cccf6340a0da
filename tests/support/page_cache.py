"""Cold reads on demand: evict files from the page cache (no root needed), for tests and benchmarks of disk reads."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def drop_cached(files: Iterable[Path]) -> None:
    """Evict these files' pages from the page cache (theirs only): written back first, as dirty pages of a
    store just made would stay."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
