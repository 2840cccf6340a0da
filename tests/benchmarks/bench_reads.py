"""Reads at the disk's limit: cold sequential `ImageStore.read` against TensorStore and plain file reads, and a
shuffled DataLoader over `ImageStoreDataset` against a numpy-memmap Dataset, warm and cold (issue 26).

One store, made by the real CLI (`imzarr convert npz`) from photo-like NPZ shards: 20,000 64×64 images
(`quick`: 4,000). Every setting runs in one child process, interleaved (A B C, B C A, C A B …, `ROUNDS` rounds:
each reader goes first as often as the others); the median counts, min and max go in the note, with the machine's load (`os.getloadavg`, as `uptime` shows it).

Sequential reads of all N images, each timed from opening to the last byte:
- `ImageStore`: `validate_image_store(url).read(0, N)`;
- TensorStore: `tensorstore.open({"driver": "zarr3", ...})` of the same `image` array, `[0:N].read()`;
- plain reads: the shard files' bytes, `preadv` of 4 MiB blocks by 8 threads into one buffer (the disk's limit:
  no index, no layout, no checks);
- and, as context, `ImageStore.read` alone, of a store opened (validated) before the page cache was dropped.
"Cold" drops every file of the store from the page cache first (`posix_fadvise(POSIX_FADV_DONTNEED)`, written
back first; no root needed), and checks that it did: a `preadv(RWF_NOWAIT)` of a shard file's first page must
then find it uncached. "Warm" reads every file once right before; the warm rows show the contrast.

DataLoader epochs (batch 256, one seeded permutation as the sampler, default collate), timed from building the
DataLoader (worker start included) to the last batch, for num_workers 0 and 2, warm and cold:
- `ImageStoreDataset(url)`;
- the baseline: a map-style Dataset over a raw `.npy` of the same uint8 images, `np.load(mmap_mode="r")`, whose
  `__getitems__` fancy-indexes the memmap: the plainest fast Dataset over the same pixels ("cold" also drops the
  `.npy` from the page cache).
Before timing, every batch of both (0 and 2 workers) is checked equal, pixels and labels, to the NPZ shards'.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tests.benchmarks.run import Row, make_row, run_child
from tests.support.page_cache import drop_cached

FULL_IMAGES = 20_000
QUICK_IMAGES = 4_000
ROUNDS = 7
QUICK_ROUNDS = 3
BATCH_SIZE = 256
SEED = 20261207
PLAIN_BLOCK = 4 << 20
PLAIN_THREADS = 8
SEQUENTIAL_GOALS = {"tensorstore": 1.0, "plain": 0.9}
LOADER_GOAL = 1.0


def _log(message: str) -> None:
    print(f"[bench_reads {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- page cache


def store_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def data_files(store: Path) -> list[Path]:
    return sorted(p for p in (store / "image" / "c").rglob("*") if p.is_file())


def is_cached(path: Path) -> bool:
    """Whether the first page of `path` is in the page cache (a read that may not wait for the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def warm(files: list[Path]) -> None:
    for path in files:
        with open(path, "rb") as f:
            while f.read(16 << 20):
                pass


def make_cold(files: list[Path], patience_s: float = 10.0) -> None:
    """Drop the files from the page cache, and check: pages still mapped by a process stay (a DataLoader worker
    of the epoch before may take a moment to exit), so try again until they are gone."""
    gc.collect()  # readers no longer used close their memory maps
    deadline = time.perf_counter() + patience_s
    while True:
        drop_cached(files)
        if not is_cached(files[0]):
            return
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{files[0]}: still in the page cache after POSIX_FADV_DONTNEED: the cold rows would be warm")
        time.sleep(0.1)


# ---------------------------------------------------------------- sequential reads


def read_imzarr(store: Path, n: int) -> np.ndarray:
    from schemas.image_store import validate_image_store

    return validate_image_store(str(store)).read(0, n)


def read_tensorstore(store: Path, n: int) -> np.ndarray:
    import tensorstore

    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store / "image")}}
    return tensorstore.open(spec, read=True).result()[0:n].read().result()


def read_plain(store: Path, n: int) -> np.ndarray:
    """Every shard file's bytes, in blocks, by a pool of threads, into one buffer."""
    files = data_files(store)
    sizes = [p.stat().st_size for p in files]
    out = np.empty(sum(sizes), dtype=np.uint8)
    flat = memoryview(out)
    jobs, at = [], 0
    for path, size in zip(files, sizes):
        jobs += [(path, offset, at + offset, min(PLAIN_BLOCK, size - offset)) for offset in range(0, size, PLAIN_BLOCK)]
        at += size

    def one(job: tuple[Path, int, int, int]) -> int:
        path, offset, into, length = job
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.preadv(fd, [flat[into : into + length]], offset)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(PLAIN_THREADS) as pool:
        if sum(pool.map(one, jobs)) != out.size:
            raise RuntimeError("plain reads came short")
    return out


# ---------------------------------------------------------------- DataLoader


class MemmapDataset:
    """The baseline: a map-style Dataset over a memory-mapped `.npy` of the images, batches by fancy indexing."""

    def __init__(self, npy: Path, labels: np.ndarray):
        self.images = np.load(npy, mmap_mode="r")
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> list[Any]:
        import torch

        rows = np.asarray(indices)
        images = torch.from_numpy(np.asarray(self.images[rows]))
        return list(zip(images.unbind(0), self.labels[rows].tolist()))


def loader_epoch(dataset: Any, order: np.ndarray, workers: int, consume: Callable[[Any, Any, int], None] | None = None) -> int:
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=BATCH_SIZE, sampler=order.tolist(), num_workers=workers)
    delivered = 0
    for images, labels in loader:
        if consume is not None:
            consume(images, labels, delivered)
        delivered += len(labels)
    if delivered != order.size:
        raise AssertionError(f"the DataLoader delivered {delivered} of {order.size} samples")
    return delivered


# ---------------------------------------------------------------- the child


def _child(workdir: Path, n: int, rounds: int) -> dict[str, Any]:
    import torch

    from extractor.image_dataset import ImageStoreDataset
    from schemas.image_store import validate_image_store
    from tests.support.synthetic import read_shard_rows

    store, npy = workdir / "images.zarr", workdir / "images.npy"
    shards = sorted((workdir / "shards").glob("*.npz"))
    images, labels = read_shard_rows(shards)
    all_files, npy_files = data_files(store) + [p for p in store_files(store) if p not in data_files(store)], [npy]

    # Exactness first: every sequential reader and every DataLoader batch against the NPZ shards.
    if not np.array_equal(read_imzarr(store, n), images) or not np.array_equal(read_tensorstore(store, n), images):
        raise AssertionError("a sequential read differs from the NPZ shards")
    if read_plain(store, n).size < images.nbytes:
        raise AssertionError("plain reads read less than the images' bytes")
    order = np.random.default_rng(SEED).permutation(n)
    # Each epoch gets datasets made afresh (untimed): pages a process has mapped stay in the page cache whatever
    # POSIX_FADV_DONTNEED says, and both readers map files (ImageStoreDataset its shard files, the baseline its .npy).
    factories = {"imzarr": lambda: ImageStoreDataset(str(store)), "memmap": lambda: MemmapDataset(npy, labels.astype(np.int64))}

    def check(images_batch: Any, labels_batch: Any, at: int) -> None:
        rows = order[at : at + len(labels_batch)]
        if not (torch.equal(images_batch, torch.from_numpy(images[rows])) and torch.equal(labels_batch, torch.from_numpy(labels[rows].astype(np.int64)))):
            raise AssertionError(f"batch at {at} differs from the NPZ shards")

    for factory in factories.values():
        for workers in (0, 2):
            loader_epoch(factory(), order, workers, check)
    _log("every reader and batch equals the NPZ shards; timing")

    sequential = {"imzarr": lambda: read_imzarr(store, n), "tensorstore": lambda: read_tensorstore(store, n), "plain": lambda: read_plain(store, n)}
    times: dict[str, list[float]] = {}
    load = [os.getloadavg()[0]]
    for round_ in range(rounds):
        for state in ("cold", "warm"):
            # Each round starts with the next reader, so that none always runs right after the DataLoader epochs
            # (worker processes still exiting) or always right after another reader.
            names = list(sequential)
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                read = sequential[name]
                make_cold(all_files) if state == "cold" else warm(all_files)
                started = time.perf_counter()
                read()
                times.setdefault(f"seq/{name}/{state}", []).append(time.perf_counter() - started)
            opened = validate_image_store(str(store))  # the read alone: the store opened (untimed) before the drop
            make_cold(all_files) if state == "cold" else warm(all_files)
            started = time.perf_counter()
            opened.read(0, n)
            times.setdefault(f"seq/imzarr-opened/{state}", []).append(time.perf_counter() - started)
            del opened
        for workers in (0, 2):
            for state in ("warm", "cold"):
                for name in sorted(factories, reverse=round_ % 2 == 1):  # alternate which goes first
                    dataset = factories[name]()
                    files = all_files if name == "imzarr" else npy_files
                    make_cold(files) if state == "cold" else warm(files)
                    started = time.perf_counter()
                    loader_epoch(dataset, order, workers)
                    times.setdefault(f"loader/{name}/{workers}/{state}", []).append(time.perf_counter() - started)
                    del dataset
                    gc.collect()
        load.append(os.getloadavg()[0])
        _log(f"round {round_ + 1} of {rounds} done (load {load[-1]:.2f})")
    return {"times": times, "images": n, "load": load}


def prepare(workdir: Path, n: int) -> None:
    """The NPZ shards and the store (bench_dataset's: the real CLI), and the baseline's `.npy` of the same images."""
    from tests.benchmarks.bench_dataset import prepare_inputs
    from tests.support.synthetic import read_shard_rows

    inputs = prepare_inputs(workdir, n)
    images, _ = read_shard_rows(inputs.shards)
    np.save(workdir / "images.npy", images)
    os.sync()


def _spread(values: list[float], n: int) -> str:
    rates = sorted(n / t for t in values)
    return f"median of {len(values)}, {rates[0]:,.0f}–{rates[-1]:,.0f} img/s"


def run(workdir: Path, quick: bool = False) -> list[Row]:
    n, rounds = (QUICK_IMAGES, QUICK_ROUNDS) if quick else (FULL_IMAGES, ROUNDS)
    _log(f"writing {n:,} photo-like 64×64 images as NPZ shards, converting them, and a .npy of the same images …")
    prepare(workdir, n)
    _log("timing in a child process (interleaved rounds) …")
    child = run_child([sys.executable, "-m", "tests.benchmarks.bench_reads", str(workdir), str(n), str(rounds)], timeout_s=1800)
    if not child.ok:
        raise RuntimeError(f"bench_reads child: {child.describe_failure()}")
    result = child.last_json()
    times, load = result["times"], result["load"]
    rate = {key: n / statistics.median(values) for key, values in times.items()}
    load_note = f"load average {min(load):.1f}–{max(load):.1f} on {os.cpu_count()} shared cores"
    rows = []
    for name, goal in SEQUENTIAL_GOALS.items():
        label = "TensorStore zarr3" if name == "tensorstore" else f"plain preadv, {PLAIN_THREADS} threads"
        rows.append(
            make_row(
                "reads", f"cold sequential ImageStore.read(0, {n:,}), open included, vs {label}", rate["seq/imzarr/cold"], "images/s",
                baseline=rate[f"seq/{name}/cold"], goal=f"≥ {goal:g}× {label}", met=rate["seq/imzarr/cold"] >= goal * rate[f"seq/{name}/cold"],
                note=f"ImageStore {_spread(times['seq/imzarr/cold'], n)}; baseline {_spread(times[f'seq/{name}/cold'], n)}; {load_note}",
            )
        )
    rows.append(
        make_row(
            "reads", f"cold sequential read(0, {n:,}) alone, the store opened before (context: what the open costs)", rate["seq/imzarr-opened/cold"],
            "images/s", baseline=rate["seq/plain/cold"], note=f"baseline = plain preadv; {_spread(times['seq/imzarr-opened/cold'], n)}",
        )
    )
    for name in ("imzarr", "tensorstore", "plain"):
        rows.append(
            make_row(
                "reads", f"warm sequential read, {name} (context: cold/warm contrast)", rate[f"seq/{name}/warm"], "images/s",
                baseline=rate[f"seq/{name}/cold"], note=f"baseline = the same reader cold; {_spread(times[f'seq/{name}/warm'], n)}",
            )
        )
    for workers in (0, 2):
        for state in ("warm", "cold"):
            ours, base = f"loader/imzarr/{workers}/{state}", f"loader/memmap/{workers}/{state}"
            rows.append(
                make_row(
                    "reads", f"DataLoader(batch {BATCH_SIZE}, shuffled, num_workers={workers}) {state}: ImageStoreDataset vs numpy memmap",
                    rate[ours], "images/s", baseline=rate[base], goal=f"≥ {LOADER_GOAL:g}× memmap", met=rate[ours] >= LOADER_GOAL * rate[base],
                    note=f"ImageStoreDataset {_spread(times[ours], n)}; memmap {_spread(times[base], n)}; worker start included; {load_note}",
                )
            )
    shutil.rmtree(workdir / "images.zarr", ignore_errors=True)
    shutil.rmtree(workdir / "shards", ignore_errors=True)
    (workdir / "images.npy").unlink(missing_ok=True)
    return rows


if __name__ == "__main__":
    out = _child(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
    print(json.dumps(out))
