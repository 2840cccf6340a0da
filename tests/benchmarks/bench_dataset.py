"""ImageStoreDataset through a DataLoader (batch 256, shuffled) against reading the same samples from NPZ shards.

The store is converted from the very shards the baseline reads, by the real CLI. Both sides walk one seeded
permutation of all samples in batches of 256 and deliver (uint8 (B, 3, S, S) tensor, int64 labels) batches:
- the store: `DataLoader(ImageStoreDataset(store), batch_size=256, sampler=permutation, num_workers=W)`, timed
  from building the loader (worker start included) to the last batch;
- the baseline: `np.load` of every shard's `data` and `labels`, the R/G/B-plane reshape, labels remapped to the
  sorted-WNID order, then fancy indexing of the same batches, timed from the first `np.load`.
Each setting is checked once (untimed) against the baseline's pixels and labels, then timed as the median of
a few epochs with the shard files in the page cache. Sizes: 20,000 64×64 images in two shards (`quick`: 4,000).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tests.benchmarks.run import QuietGate, Row, make_row, run_child

RESOLUTION = 64
BATCH_SIZE = 256
SHARDS = 2
SEED = 20240613
EPOCHS = 3  # timed epochs per setting; the median counts
PER_ITEM_SAMPLES = 5_120  # the per-item reference reads this many (it is ~20× slower per image)
GOAL_RATIO = 1.0
FULL_IMAGES = 20_000
QUICK_IMAGES = 4_000

_quiet = QuietGate(budget_s=60.0, per_call_s=10.0)


def _log(message: str) -> None:
    print(f"[bench_dataset {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Inputs:
    shards: list[Path]
    store: Path
    num_images: int


def prepare_inputs(workdir: Path, num_images: int) -> Inputs:
    """Photo-like NPZ shards (stored, as released) and the store the CLI converts them into."""
    from tests.synthetic import photo_like, write_npz_shard

    folder = workdir / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = num_images // SHARDS
    rng = np.random.default_rng(SEED)
    shards = []
    for k in range(SHARDS):
        path = folder / f"train_data_batch_{k + 1}.npz"
        write_npz_shard(path, photo_like(per_shard, RESOLUTION, seed=SEED + k), rng.integers(1, 1001, per_shard))
        shards.append(path)
    store = workdir / "images.zarr"
    shutil.rmtree(store, ignore_errors=True)
    child = run_child([sys.executable, "-m", "schemas", "convert", "npz", *map(str, shards), "-o", str(store)], timeout_s=600)
    if not child.ok:
        raise RuntimeError(f"convert npz: {child.describe_failure()}")
    return Inputs(shards, store, per_shard * SHARDS)


Consume = Callable[[np.ndarray, Any, Any], None]  # (sample numbers of the batch, images tensor, labels tensor)


def npz_epoch(shards: list[Path], order: np.ndarray, consume: Consume) -> None:
    """The baseline: load the shards' arrays, reshape rows from R, G, B planes, then index batches in `order`."""
    import torch

    from schemas.classes import class_table

    table = class_table()
    images, labels = [], []
    for shard in shards:
        with np.load(shard) as npz:
            images.append(npz["data"].reshape(-1, 3, RESOLUTION, RESOLUTION))
            labels.append(table.from_downsampled(npz["labels"]))
    all_images, all_labels = np.concatenate(images), np.concatenate(labels).astype(np.int64)
    for start in range(0, order.size, BATCH_SIZE):
        batch = order[start : start + BATCH_SIZE]
        consume(batch, torch.from_numpy(all_images[batch]), torch.from_numpy(all_labels[batch]))


def npz_in_memory_epochs(shards: list[Path], order: np.ndarray) -> list[float]:
    """The baseline's indexing alone, arrays already loaded (what later epochs cost a process that keeps them)."""
    import torch

    arrays = [np.load(shard)["data"].reshape(-1, 3, RESOLUTION, RESOLUTION) for shard in shards]
    all_images = np.concatenate(arrays)
    times = []
    for _ in range(EPOCHS):
        _quiet.wait()
        started = time.perf_counter()
        for start in range(0, order.size, BATCH_SIZE):
            torch.from_numpy(all_images[order[start : start + BATCH_SIZE]])
        times.append(time.perf_counter() - started)
    return times


def store_epoch(dataset: Any, order: np.ndarray, num_workers: int, consume: Consume) -> None:
    """One pass of a DataLoader over the dataset in `order` (a list is a valid sampler)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=BATCH_SIZE, sampler=order.tolist(), num_workers=num_workers)
    for start, (images, labels) in zip(range(0, order.size, BATCH_SIZE), loader):
        consume(order[start : start + BATCH_SIZE], images, labels)


def timed_epochs(epoch: Callable[[], None]) -> list[float]:
    times = []
    for _ in range(EPOCHS):
        _quiet.wait()
        started = time.perf_counter()
        epoch()
        times.append(time.perf_counter() - started)
    return times


class Expected:
    """The baseline's batches, kept to check the store's (pixels and labels) batch by batch."""

    def __init__(self, shards: list[Path], order: np.ndarray):
        self.batches: dict[int, tuple[Any, Any]] = {}
        npz_epoch(shards, order, lambda batch, images, labels: self.batches.__setitem__(int(batch[0]), (images, labels)))

    def check(self, batch: np.ndarray, images: Any, labels: Any) -> None:
        import torch

        want_images, want_labels = self.batches[int(batch[0])]
        if not (torch.equal(images, want_images) and torch.equal(labels, want_labels)):
            raise AssertionError(f"batch starting at sample {int(batch[0])} differs from the NPZ shards")


class PerItemOnly:
    """The dataset without `__getitems__`: what the DataLoader does for a dataset that reads one image at a time."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]


def _spread(times: list[float]) -> str:
    return f"median of {len(times)} epochs {float(np.median(times)):.3f} s (min {min(times):.3f}, max {max(times):.3f})"


def run(workdir: Path, quick: bool = False) -> list[Row]:
    from extractor.image_dataset import ImageStoreDataset

    num_images = QUICK_IMAGES if quick else FULL_IMAGES
    _log(f"writing {num_images:,} photo-like {RESOLUTION}×{RESOLUTION} images as {SHARDS} NPZ shards and converting them …")
    inputs = prepare_inputs(workdir, num_images)
    order = np.random.default_rng(SEED).permutation(inputs.num_images)
    n = inputs.num_images
    expected = Expected(inputs.shards, order)
    ignore = lambda *_: None  # noqa: E731 - the timed epochs only deliver the batches

    _log("NPZ baseline …")
    npz_times = timed_epochs(lambda: npz_epoch(inputs.shards, order, ignore))
    npz_rate = n / float(np.median(npz_times))
    memory_times = npz_in_memory_epochs(inputs.shards, order)
    load_before = os.getloadavg()[0]
    rows = [
        make_row(
            "dataset", f"NPZ baseline: np.load {SHARDS} shards + plane reshape + index, {n:,} img", npz_rate, "images/s",
            note=f"{_spread(npz_times)}; holds all {n * 3 * RESOLUTION**2 / 1e6:,.0f} MB of pixels in memory",
        ),
        make_row(
            "dataset", "NPZ arrays already in memory: index only", n / float(np.median(memory_times)), "images/s",
            note=f"{_spread(memory_times)}; reference only (later epochs of a process that keeps every shard loaded)",
        ),
    ]
    dataset = ImageStoreDataset(str(inputs.store))
    for num_workers in (0, 2):
        _log(f"DataLoader, num_workers={num_workers}: checking, then timing …")
        store_epoch(dataset, order, num_workers, expected.check)
        times = timed_epochs(lambda: store_epoch(dataset, order, num_workers, ignore))
        rate = n / float(np.median(times))
        rows.append(
            make_row(
                "dataset", f"ImageStoreDataset, DataLoader(batch {BATCH_SIZE}, num_workers={num_workers}), shuffled", rate, "images/s",
                baseline=npz_rate, goal=f"≥ {GOAL_RATIO:g}× NPZ baseline", met=rate >= GOAL_RATIO * npz_rate,
                note=f"{_spread(times)}; worker start included; pixels and labels equal the NPZ shards'; baseline = NPZ",
            )
        )
    _log("per-item reference (no __getitems__) …")
    subset = order[:PER_ITEM_SAMPLES]
    per_item_times = timed_epochs(lambda: store_epoch(PerItemOnly(dataset), subset, 0, ignore))
    rows.append(
        make_row(
            "dataset", f"same, num_workers=0, one __getitem__ per image ({subset.size:,} img)", subset.size / float(np.median(per_item_times)),
            "images/s", baseline=npz_rate, note=f"{_spread(per_item_times)}; reference only: why the batched __getitems__",
        )
    )
    rows.append(
        make_row(
            "dataset", "machine load: 1-min load average after the timed runs", os.getloadavg()[0], "",
            note=f"{load_before:.2f} before the store runs; {os.cpu_count()} cores, shared; waited {_quiet.waited_s:.0f} s in all for "
            "other users' jobs to leave the cores free",
        )
    )
    shutil.rmtree(inputs.store, ignore_errors=True)
    shutil.rmtree(workdir / "shards", ignore_errors=True)
    return rows
