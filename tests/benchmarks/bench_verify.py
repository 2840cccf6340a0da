"""`imzarr verify` throughput against a bare read of the same bytes (goal ≥ 0.8×).

The store: one `image` array in the image store's layout (shards of 4,096 64×64 images, 48 MiB raw files,
written directly) with its checksum record; 20 shards, ~1 GB (`quick`: 4). The baseline reads every shard file
whole in 8 MiB reads into one reused buffer, no checksum; `verify_store` adds the listing, the record and the
crc32c (computed in this thread while a second one reads). Best of three each, alternated, two ways:
- from disk (the goal's row: a scrub reads a store that is not in memory): each file's cached pages are dropped
  (`posix_fadvise(DONTNEED)`, this store's files only) before every timing;
- from the page cache (context): the files are read right before every timing (this VM drops pages unused for a
  minute). There the baseline is a memory copy (~7-10 GB/s here) and the crc32c (~4 GB/s for google-crc32c on
  one core of this machine, measured) bounds verify.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import zarr

from tests.benchmarks.run import Row, make_row
from tests.support.page_cache import drop_cached

SHARD = 4096
RESOLUTION = 64
GOAL = 0.8


def make_store(workdir: Path, shards: int) -> Path:
    """The store (reused when a previous run left one of the same size)."""
    from schemas.image_layout import create_image_arrays, write_image_shard
    from schemas.store_integrity import record_checksums

    url = workdir / f"verify-{shards}.zarr"
    if (url / "_checksums" / "zarr.json").exists():
        return url
    n = shards * SHARD
    group = zarr.open_group(str(url), mode="w", zarr_format=3)
    index = np.arange(n, dtype=np.int64)
    create_image_arrays(group, n, RESOLUTION, SHARD, coordinates={"label": (index % 1000).astype(np.int16), "global_index": index, "source_row": index})
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (SHARD, 3, RESOLUTION, RESOLUTION), dtype=np.uint8)
    for k in range(shards):
        block[:, 0, 0, 0] = k  # every shard different
        write_image_shard(str(url), k * SHARD, block, {})
    record_checksums(str(url))
    return url


def shard_files(url: Path) -> list[Path]:
    return sorted(p for p in (url / "image" / "c").rglob("*") if p.is_file())


def bare_read(files: list[Path], block: int) -> int:
    """Read every file whole in `block`-byte reads into one reused buffer (what verify does, minus the crc)."""
    buffer = bytearray(block)
    total = 0
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            while got := os.readv(fd, [buffer]):
                total += got
        finally:
            os.close(fd)
    return total


BLOCK = 8 << 20


def run(workdir: Path, quick: bool = False) -> list[Row]:
    from schemas.store_integrity import verify_store

    shards = 4 if quick else 20
    url = make_store(workdir, shards)
    files = shard_files(url)
    nbytes = sum(p.stat().st_size for p in files)
    rows = []
    for cold, prepare in ((True, drop_cached), (False, lambda fs: bare_read(fs, BLOCK))):
        bare, verify = [], []
        for _ in range(3):
            prepare(files)
            started = time.perf_counter()
            assert bare_read(files, BLOCK) == nbytes
            bare.append(nbytes / (time.perf_counter() - started))
            prepare(files)
            started = time.perf_counter()
            result = verify_store(str(url))
            verify.append(result.bytes_read / (time.perf_counter() - started))
            assert result.damage == [] and result.bytes_read >= nbytes
        best_bare, best_verify = max(bare) / 1e6, max(verify) / 1e6
        where = "from disk" if cold else "from the page cache"
        note = f"{len(files)} shard files, {nbytes / 1e9:.2f} GB {where}; baseline: the same bytes read without crc32c"
        met = best_verify / best_bare >= GOAL
        rows.append(make_row("verify", f"imzarr verify, {where}", best_verify, "MB/s", baseline=best_bare,
                             goal=f"≥ {GOAL}× bare read" if cold else "context", met=met if cold else None, note=note))
    return rows
