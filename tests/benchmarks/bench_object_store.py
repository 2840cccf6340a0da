"""Random reads from an object store: `ImageStore.take` on a local S3 server (moto, 127.0.0.1) against a bare
fsspec `cat_ranges` of exactly the same byte ranges, in the same run.

The store's reader reads each needed shard's index once (cached), then asks for every needed byte range in
one concurrent `cat_ranges` call, adjacent images merged. Goal (issue "Object storage"): ≥ 0.5 × the bare
call and ≥ 20 × the 120 img/s that zarr-python's one-request-after-another path gave (2,400 img/s).

moto's server answers a ranged GET by reading the whole object first (measured: 36 ms per 12 KB range of a 48 MB
object, 3 ms of a 1 MB one), so on it every reader is bound by the shard size; the rows therefore cover the
default 4,096-image shards (48 MB) and 256-image shards (3 MB). A last row measures the server's own ceiling: a
bare `cat_ranges` of one image-sized range from each of 100 small (64 KB) objects, where reading an object costs
next to nothing — a client that fetches only the needed bytes takes random single images at about that rate at best.

Client CPU (issue 26, goal ≤ 0.3 ms per random image): the same random takes through obstore and through s3fs
(`shard_range_reader(..., use_obstore=...)`), interleaved, on a 256-image-shard store with indexes cached: this
process's CPU time (`time.process_time`, every thread, s3fs's event loop included; the server runs in its own
process) divided by the images read, and img/s of the same rounds. Measured against two servers:
- tests/support/range_server.py, a read-only S3 endpoint over a local folder that answers requests concurrently on
  keep-alive connections, as S3 does: the goal row;
- moto, for context: it answers one request after another (about 400 per second here) over HTTP/1.0, so every
  response wakes the client on its own and every request opens a connection, costs an S3 endpoint does not
  cause (perf: context switches and connection set-up were a quarter of the client's samples).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import fsspec
import fsspec.config
import numpy as np
import zarr

from schemas.image_layout import create_image_arrays, write_image_shard
from schemas.image_store import (
    IMAGE_VAR,
    ImageStore,
    shard_range_reader,
    take_with_zarr,
)
from schemas.obstore_ranges import obstore_ranges_for
from tests.benchmarks.run import make_row
from tests.support.range_server import range_server
from tests.support.s3_server import CREDENTIALS, local_s3

GROUP = "object store"
SAMPLES, RESOLUTION, TAKE, ROUNDS = 8192, 64, 100, 7
SHARDS = (4096, 256)
CPU_ROUNDS, CPU_ROUNDS_QUICK = 30, 8
CPU_GOAL_MS = 0.3
OLD_PATH_IMG_S = 120.0  # zarr-python fallback on the same server, measured when the issue was filed


def run(workdir: Path, quick: bool = False) -> list[dict]:
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as exc:  # the s3 extra or the dev extra is not installed
        return [make_row(GROUP, "random take, 100 of 8,192", None, "", note=f"skipped: {exc}")]
    os.environ.update(CREDENTIALS)
    rng = np.random.default_rng(0)
    rows = []
    with local_s3("imzarr-bench") as s3:
        fsspec.config.conf["s3"] = dict(s3.storage_options)
        for shard in SHARDS:
            rows += _rows_for_layout(s3.url(f"bench-{shard}.zarr"), shard, rng, quick)
        moto_rows = _client_cpu_rows(s3.url(f"bench-{SHARDS[-1]}.zarr"), SHARDS[-1], rng, quick, None, "moto (one request at a time, HTTP/1.0)")
        rows.append(_server_ceiling_row(s3.url("ceiling/object"), rng, quick))
    fsspec.config.conf.pop("s3", None)
    served = workdir / "range-server"
    local = served / "imzarr-bench" / f"bench-{SHARDS[-1]}.zarr"
    _write_store(str(local), SHARDS[-1], rng)
    with range_server(served) as endpoint:
        options = {"endpoint_url": endpoint, "key": CREDENTIALS["AWS_ACCESS_KEY_ID"], "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}
        rows += _client_cpu_rows(f"s3://imzarr-bench/{local.name}", SHARDS[-1], rng, quick, options, "a concurrent keep-alive S3 endpoint (tests/support/range_server.py)")
    return rows + moto_rows


def _write_store(url: str, shard: int, rng: np.random.Generator) -> None:
    """An 8,192-image store of random pixels in `shard`-image shards."""
    group = zarr.open_group(url, mode="w", zarr_format=3)
    create_image_arrays(group, SAMPLES, RESOLUTION, shard, None)
    for start in range(0, SAMPLES, shard):
        images = rng.integers(0, 256, (shard, 3, RESOLUTION, RESOLUTION), dtype=np.uint8)
        coords = {"label": np.zeros(shard, np.int16), "global_index": np.arange(start, start + shard)}
        write_image_shard(url, start, images, coords)


def _server_ceiling_row(url: str, rng: np.random.Generator, quick: bool) -> dict:
    """Ranges per second of the server itself: one image-sized range from each of 100 small objects, one bare
    `cat_ranges` call (separate objects: moto serializes requests to one object behind a per-object lock)."""
    fs, path = fsspec.core.url_to_fs(url)
    item, size = 3 * RESOLUTION**2, 64_000
    paths = [f"{path}-{k}" for k in range(TAKE)]
    fs.pipe({p: rng.integers(0, 256, size, dtype=np.uint8).tobytes() for p in paths})
    times = []
    for _ in range(3 if quick else ROUNDS):
        starts = rng.integers(0, size - item, TAKE).tolist()
        t0 = time.perf_counter()
        fs.cat_ranges(paths, starts, [s + item for s in starts])
        times.append(time.perf_counter() - t0)
    rate = TAKE / min(times)
    return make_row(GROUP, "server ceiling: 100 image-sized ranges of 100 small objects, bare cat_ranges", rate, "ranges/s",
                    note=f"moto on 127.0.0.1, client and server on the same 2 cores; one image per range caps random takes near {rate:,.0f} img/s here")


def _rows_for_layout(url: str, shard: int, rng: np.random.Generator, quick: bool) -> list[dict]:
    _write_store(url, shard, rng)
    store = ImageStore(url, zarr.open_group(url, mode="r"))
    reader = store.fast_reader
    cold, warm, bare, via_zarr = [], [], [], []
    for round_ in range(3 if quick else ROUNDS):
        idx = rng.integers(0, SAMPLES, TAKE)
        fresh = ImageStore(url, zarr.open_group(url, mode="r"))
        t0 = time.perf_counter()
        fresh.take(idx)  # indexes not cached yet: one index read per shard, then the data
        cold.append(time.perf_counter() - t0)
        idx = rng.integers(0, SAMPLES, TAKE)
        t0 = time.perf_counter()
        store.take(idx)
        warm.append(time.perf_counter() - t0)
        paths, starts, ends = _same_ranges(reader, idx)
        t0 = time.perf_counter()
        reader.fs.cat_ranges(paths, starts, ends)
        bare.append(time.perf_counter() - t0)
        if round_ < 2:  # zarr-python's path, one inner chunk after another: slow, two rounds are enough
            t0 = time.perf_counter()
            take_with_zarr(store.image, idx)
            via_zarr.append(time.perf_counter() - t0)
    best = lambda times: TAKE / min(times)
    size = f"{shard:,}-image shards ({shard * 3 * RESOLUTION**2 / 1e6:.0f} MB)"
    return [
        make_row(GROUP, f"random take, 100 of 8,192, {size}, index cached", best(warm), "img/s", baseline=best(bare),
                 goal="≥ 0.5× bare cat_ranges, ≥ 2,400 img/s", met=best(warm) >= 0.5 * best(bare) and best(warm) >= 20 * OLD_PATH_IMG_S,
                 note=f"baseline: bare fsspec cat_ranges of the same ranges; {best(warm) / OLD_PATH_IMG_S:.1f}× the issue's 120 img/s"),
        make_row(GROUP, f"random take, 100 of 8,192, {size}, first call", best(cold), "img/s", baseline=best(via_zarr),
                 goal="≥ 20× zarr-python's path", met=best(cold) >= 20 * best(via_zarr), note="baseline: zarr-python slicing of the same samples, same run"),
    ]


def _client_cpu_rows(url: str, shard: int, rng: np.random.Generator, quick: bool, storage_options: dict | None, server: str) -> list[dict]:
    """Client CPU per random image and img/s, obstore against s3fs: the same indices, rounds interleaved. The goal
    is judged on the concurrent server (`storage_options` given); moto's rows are context."""
    judged = storage_options is not None
    on = "" if judged else ", moto"
    try:
        import obstore  # noqa: F401
    except ImportError as exc:
        return [make_row(GROUP, f"random take, client CPU per image, obstore vs s3fs{on}", None, "", note=f"skipped: {exc}")]
    readers = {name: shard_range_reader(url, IMAGE_VAR, storage_options, use_obstore=name == "obstore") for name in ("obstore", "s3fs")}
    assert readers["obstore"].range_client == "obstore" and readers["s3fs"].range_client == "fsspec"
    for reader in readers.values():
        reader.shard_indexes(list(range(SAMPLES // shard)))
    bare = _bare_obstore(readers["obstore"])
    names = [*readers, "bare obstore"]
    cpu = {name: 0.0 for name in names}
    wall = {name: 0.0 for name in names}
    for round_ in range(CPU_ROUNDS_QUICK if quick else CPU_ROUNDS):
        idx = rng.integers(0, SAMPLES, TAKE)
        ranges = _same_ranges(readers["obstore"], idx)
        for name in sorted(names, reverse=round_ % 2 == 1):  # alternate which goes first
            c0, t0 = time.process_time(), time.perf_counter()
            if name == "bare obstore":
                bare(*ranges)
            else:
                readers[name].take(idx)
            cpu[name] += time.process_time() - c0
            wall[name] += time.perf_counter() - t0
    images = TAKE * (CPU_ROUNDS_QUICK if quick else CPU_ROUNDS)
    ms = {name: 1e3 * cpu[name] / images for name in names}
    rate = {name: images / wall[name] for name in names}
    load = os.getloadavg()[0]
    where = f"{server} on 127.0.0.1, {shard:,}-image shards, 100 random images per take, indexes cached; load avg {load:.1f} on {os.cpu_count()} cores"
    return [
        make_row(GROUP, f"random take, client CPU per image, obstore{on}", ms["obstore"], "ms/img", baseline=ms["s3fs"], goal=f"≤ {CPU_GOAL_MS} ms" if judged else "",
                 met=ms["obstore"] <= CPU_GOAL_MS if judged else None, note=f"baseline: s3fs, same ranges, same run (lower is better); {where}"),
        make_row(GROUP, f"random take, img/s, obstore{on}", rate["obstore"], "img/s", baseline=rate["s3fs"], note=f"baseline: s3fs, same rounds; {where}"),
        make_row(GROUP, f"client CPU per image, bare obstore (the floor){on}", ms["bare obstore"], "ms/img", baseline=ms["obstore"],
                 note=f"obstore alone: one get_range_async per range of the same takes, all at once on one event loop, no imzarr code; baseline: ImageStore.take through obstore; {where}"),
    ]


def _bare_obstore(reader) -> Callable[[list[str], list[int], list[int]], list]:
    """obstore's own cost of a take's ranges: every range one `get_range_async`, gathered on one loop."""
    import asyncio

    from obstore import get_range_async

    ranges = obstore_ranges_for(reader.fs)  # the S3Store settings the reader's own ranges use
    loop = asyncio.new_event_loop()

    def fetch(paths: list[str], starts: list[int], ends: list[int]) -> list:
        async def every() -> list:
            gets = []
            for path, start, end in zip(paths, starts, ends):
                bucket, _, key = path.removeprefix("s3://").partition("/")
                gets.append(get_range_async(ranges.store(bucket), key, start=start, end=end))
            return await asyncio.gather(*gets)

        return loop.run_until_complete(every())

    return fetch


def _same_ranges(reader, indices: np.ndarray) -> tuple[list[str], list[int], list[int]]:
    """The byte ranges the reader asks for (sorted, adjacent images merged), computed from its cached indexes."""
    layout = reader.layout
    idx = np.sort(indices)
    paths, starts, ends = [], [], []
    for k in np.unique(idx // layout.samples_per_shard):
        local = idx[idx // layout.samples_per_shard == k] - k * layout.samples_per_shard
        index = reader.shard_indexes([int(k)])[int(k)]
        pos = index[local // layout.samples_per_inner, 0].astype(np.int64) + (local % layout.samples_per_inner) * layout.item_bytes
        breaks = np.flatnonzero(np.diff(pos) != layout.item_bytes) + 1
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, pos.size]):
            paths.append(reader.shard_path(int(k)))
            starts.append(int(pos[a]))
            ends.append(int(pos[a]) + int(b - a) * layout.item_bytes)
    return paths, starts, ends
