"""ImageStoreDataset through a DataLoader (batch 256, shuffled) against reading the same samples from NPZ shards.

The store is converted from the very shards the baseline reads, by the real CLI. Both sides walk one seeded
permutation of all samples in batches of 256 and deliver (uint8 (B, 3, S, S) tensor, int64 labels) batches:
- the store: `DataLoader(ImageStoreDataset(store), batch_size=256, sampler=permutation, num_workers=W)`, timed
  from building the loader (worker start included) to the last batch;
- the baseline: `np.load` of every shard's `data` and `labels`, the R/G/B-plane reshape, labels remapped to the
  sorted-WNID order, then fancy indexing of the same batches, timed from the first `np.load`.
Each setting is first checked (untimed) against the baseline's pixels and labels, batch by batch. Each is then
timed in a child process of its own: one untimed warm-up epoch, then a few timed ones (median counts; min and
max in the note). Separate processes matter: an epoch of one setting leaves the allocator in a state that made
the next setting's epoch up to 5× slower when they shared a process. Shard files are in the page cache.
Sizes: 20,000 64×64 images in two shards (`quick`: 4,000).
"""

from __future__ import annotations

import json
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
EPOCHS = 5  # timed epochs per setting, after one warm-up; the median counts
PER_ITEM_SAMPLES = 5_120  # the per-item reference reads this many (it is ~20× slower per image)
GOAL_RATIO = 1.0
FULL_IMAGES = 20_000
QUICK_IMAGES = 4_000

_quiet = QuietGate(budget_s=40.0, per_call_s=4.0)


def _log(message: str) -> None:
    print(f"[bench_dataset {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Inputs:
    shards: list[Path]
    store: Path
    num_images: int

    @classmethod
    def existing(cls, workdir: Path, num_images: int) -> "Inputs":
        """The inputs prepare_inputs wrote into workdir."""
        shards = [workdir / "shards" / f"train_data_batch_{k + 1}.npz" for k in range(SHARDS)]
        return cls(shards, workdir / "images.zarr", num_images)


def prepare_inputs(workdir: Path, num_images: int) -> Inputs:
    """Photo-like NPZ shards (stored, as released) and the store the CLI converts them into."""
    from tests.support.synthetic import photo_like, write_npz_shard

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


def store_epoch(dataset: Any, order: np.ndarray, num_workers: int, consume: Consume) -> None:
    """One pass of a DataLoader over the dataset in `order` (a list is a valid sampler)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=BATCH_SIZE, sampler=order.tolist(), num_workers=num_workers)
    delivered = 0
    for images, labels in loader:
        consume(order[delivered : delivered + len(labels)], images, labels)
        delivered += len(labels)
    if delivered != order.size:
        raise AssertionError(f"the DataLoader delivered {delivered} of {order.size} samples")


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


class InMemoryBatches:
    """The same items from arrays held in memory: what a DataLoader with workers costs when reading costs nothing."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> list[Any]:
        import torch

        return list(zip(torch.from_numpy(self.images[indices]).unbind(0), self.labels[indices].tolist()))


def _spread(times: list[float]) -> str:
    return f"median of {len(times)} epochs {float(np.median(times)):.3f} s (min {min(times):.3f}, max {max(times):.3f})"


def permutation(num_images: int) -> np.ndarray:
    """The one shuffled order every setting walks."""
    return np.random.default_rng(SEED).permutation(num_images)


def check_store_batches(inputs: Inputs) -> None:
    """Every batch the DataLoader yields (0 and 2 workers) equals the baseline's, pixels and labels."""
    from extractor.image_dataset import ImageStoreDataset

    order = permutation(inputs.num_images)
    expected = Expected(inputs.shards, order)
    dataset = ImageStoreDataset(str(inputs.store))
    for num_workers in (0, 2):
        store_epoch(dataset, order, num_workers, expected.check)


def epoch_function(setting: str, inputs: Inputs) -> tuple[Callable[[], None], int]:
    """One epoch of a setting, and how many images it delivers."""
    from extractor.image_dataset import ImageStoreDataset

    order = permutation(inputs.num_images)
    ignore: Consume = lambda *_: None  # noqa: E731 - timed epochs only deliver the batches
    if setting == "npz":
        return (lambda: npz_epoch(inputs.shards, order, ignore)), order.size
    if setting == "npz-in-memory":
        import torch

        images = np.concatenate([np.load(shard)["data"].reshape(-1, 3, RESOLUTION, RESOLUTION) for shard in inputs.shards])
        def index_batches() -> None:
            for start in range(0, order.size, BATCH_SIZE):
                torch.from_numpy(images[order[start : start + BATCH_SIZE]])

        return index_batches, order.size
    dataset = ImageStoreDataset(str(inputs.store))
    if setting.startswith("workers="):
        workers = int(setting.removeprefix("workers="))
        return (lambda: store_epoch(dataset, order, workers, ignore)), order.size
    if setting == "in-memory-workers=2":
        in_memory = InMemoryBatches(dataset.store.read(0, len(dataset)), dataset.labels)
        return (lambda: store_epoch(in_memory, order, 2, ignore)), order.size
    if setting == "per-item":
        subset = order[:PER_ITEM_SAMPLES]
        return (lambda: store_epoch(PerItemOnly(dataset), subset, 0, ignore)), subset.size
    raise ValueError(f"unknown setting {setting!r}")


def _child_main(argv: list[str]) -> int:
    """`python -m tests.benchmarks.bench_dataset SETTING WORKDIR NUM_IMAGES`: print the epoch times as JSON."""
    setting, workdir, num_images = argv
    epoch, count = epoch_function(setting, Inputs.existing(Path(workdir), int(num_images)))
    epoch()  # warm-up: imports, the shard indexes, the page cache
    times = []
    for _ in range(EPOCHS):
        started = time.perf_counter()
        epoch()
        times.append(time.perf_counter() - started)
    print(json.dumps({"times": times, "images": count}))
    return 0


def timed_setting(setting: str, inputs: Inputs, workdir: Path) -> tuple[list[float], int, float]:
    """(epoch times, images per epoch, others' busy cores) of one setting, run in a fresh child process."""
    _quiet.wait()
    child = run_child([sys.executable, "-m", "tests.benchmarks.bench_dataset", setting, str(workdir), str(inputs.num_images)], timeout_s=600)
    if not child.ok:
        raise RuntimeError(f"setting {setting}: {child.describe_failure()}")
    result = child.last_json()
    return result["times"], result["images"], child.others_cores


SETTINGS = ("npz", "npz-in-memory", "workers=0", "workers=2", "in-memory-workers=2", "per-item")


def run(workdir: Path, quick: bool = False) -> list[Row]:
    global _quiet
    _quiet = QuietGate(budget_s=_quiet.budget_s, per_call_s=_quiet.per_call_s)  # a fresh waiting budget per run
    num_images = QUICK_IMAGES if quick else FULL_IMAGES
    _log(f"writing {num_images:,} photo-like {RESOLUTION}×{RESOLUTION} images as {SHARDS} NPZ shards and converting them …")
    inputs = prepare_inputs(workdir, num_images)
    _log("checking DataLoader batches (num_workers 0 and 2) against the NPZ shards …")
    check_store_batches(inputs)
    load_before = os.getloadavg()[0]
    measured: dict[str, tuple[float, str]] = {}
    per_item_count = 0
    for setting in SETTINGS:
        _log(f"timing {setting} in a child process …")
        times, count, others = timed_setting(setting, inputs, workdir)
        measured[setting] = (count / float(np.median(times)), f"{_spread(times)}; others used {others:.1f} of {os.cpu_count()} cores meanwhile")
        per_item_count = count if setting == "per-item" else per_item_count
    npz_rate, npz_note = measured["npz"]
    n = inputs.num_images
    rows = [
        make_row(
            "dataset", f"NPZ baseline: np.load {SHARDS} shards + plane reshape + index, {n:,} img", npz_rate, "images/s",
            note=f"{npz_note}; holds all {n * 3 * RESOLUTION**2 / 1e6:,.0f} MB of pixels in memory",
        ),
        make_row(
            "dataset", "NPZ arrays already in memory: index only", measured["npz-in-memory"][0], "images/s",
            note=f"{measured['npz-in-memory'][1]}; reference only (later epochs of a process that keeps every shard loaded)",
        ),
    ]
    for workers in (0, 2):
        rate, note = measured[f"workers={workers}"]
        rows.append(
            make_row(
                "dataset", f"ImageStoreDataset, DataLoader(batch {BATCH_SIZE}, num_workers={workers}), shuffled", rate, "images/s",
                baseline=npz_rate, goal=f"≥ {GOAL_RATIO:g}× NPZ baseline", met=rate >= GOAL_RATIO * npz_rate,
                note=f"{note}; worker start included; batches equal the NPZ shards' (checked); baseline = NPZ",
            )
        )
    rate, note = measured["in-memory-workers=2"]
    rows.append(
        make_row(
            "dataset", "same batches from arrays in memory, num_workers=2", rate, "images/s", baseline=npz_rate,
            note=f"{note}; reference only: what the DataLoader's worker processes cost here when reading costs nothing",
        )
    )
    rate, note = measured["per-item"]
    rows.append(
        make_row(
            "dataset", f"ImageStoreDataset, num_workers=0, one __getitem__ per image ({per_item_count:,} img)", rate, "images/s",
            baseline=npz_rate, note=f"{note}; reference only: why the batched __getitems__",
        )
    )
    rows.append(
        make_row(
            "dataset", "machine load: 1-min load average after the timed runs", os.getloadavg()[0], "",
            note=f"{load_before:.2f} before them; {os.cpu_count()} cores, shared; waited {_quiet.waited_s:.0f} s in all for "
            "other users' jobs to leave the cores free",
        )
    )
    shutil.rmtree(inputs.store, ignore_errors=True)
    shutil.rmtree(workdir / "shards", ignore_errors=True)
    return rows


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
