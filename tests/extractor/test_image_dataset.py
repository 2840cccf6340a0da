"""ImageStoreDataset on a store made by the real CLI: exact pixels and labels, batched fetches, DataLoader workers,
and the same selection as `imzarr extract`."""

from __future__ import annotations

import pickle
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from tests.support.synthetic import read_shard_rows

from extractor.image_dataset import ImageDatasetError, ImageStoreDataset, SampleIndexError
from extractor.selection import SelectionError, SelectionSpec, select_samples
from schemas.classes import class_table
from schemas.errors import ImzarrError
from schemas.image_store import validate_image_store
from schemas.store_identity import InputChangedError
from schemas.store_integrity import DamagedStoreError
from tests.support.commands import run_imzarr

TABLE = class_table()
PER_SHARD = 300
SHUFFLE_SEED = 5


def imzarr(*args: str, cwd: Path) -> None:
    """Run the `imzarr` command (`python -m schemas`) and fail with its output."""
    done = run_imzarr(*args, cwd=cwd, timeout=300)
    assert done.returncode == 0, f"imzarr {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"




@pytest.fixture(scope="module")
def sample_store(tmp_path_factory) -> tuple[str, np.ndarray, np.ndarray]:
    """(store URL, source images and labels by store position): the embedded sample, converted with a shuffle."""
    root = tmp_path_factory.mktemp("dataset")
    imzarr("sample", "shards", "--per-shard", str(PER_SHARD), "--train-shards", "2", "--val-size", "10", cwd=root)
    imzarr("convert", "npz", "shards/train", "-o", "sample.zarr", "--shuffle-seed", str(SHUFFLE_SEED), "--shard-size", "256", cwd=root)
    url = str(root / "sample.zarr")
    images, labels = read_shard_rows([root / "shards/train/train_data_batch_1.npz", root / "shards/train/train_data_batch_2.npz"])
    source_of = validate_image_store(url).coordinate("global_index")
    assert not np.array_equal(source_of, np.arange(source_of.size)), "the store should be shuffled"
    return url, images[source_of], labels[source_of]


def test_items_are_the_source_rows_exactly(sample_store):
    url, images, labels = sample_store
    dataset = ImageStoreDataset(url)
    assert len(dataset) == 2 * PER_SHARD
    items = dataset.__getitems__(list(range(len(dataset))))
    np.testing.assert_array_equal(torch.stack([image for image, _ in items]).numpy(), images)
    assert [label for _, label in items] == labels.tolist()
    image, label = dataset[7]
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64) and type(label) is int
    np.testing.assert_array_equal(image.numpy(), images[7])
    np.testing.assert_array_equal(dataset.labels, labels)
    assert dataset.synsets.tolist() == [TABLE.wnids[i] for i in labels]
    assert dataset.class_names.tolist() == [TABLE.names[i] for i in labels]


def test_getitems_equals_getitem(sample_store):
    url, images, _ = sample_store
    for output in ("uint8", "float"):
        dataset = ImageStoreDataset(url, output=output)
        wanted = [5, 599, 0, 5, -1, 300, 42]  # unsorted, a repeat, a negative index, two shards
        batch = dataset.__getitems__(wanted)
        assert len(batch) == len(wanted)
        for index, (image, label) in zip(wanted, batch):
            single_image, single_label = dataset[index]
            assert torch.equal(image, single_image) and label == single_label
    image, _ = ImageStoreDataset(url, output="float")[3]
    assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    torch.testing.assert_close(image, torch.from_numpy(images[3]).float() / 255, rtol=0, atol=0)


def test_transform_applies_to_each_image(sample_store):
    url, images, _ = sample_store
    dataset = ImageStoreDataset(url, transform=lambda image: image.flip(-1))
    for image, index in zip([image for image, _ in dataset.__getitems__([1, 2])], (1, 2)):
        np.testing.assert_array_equal(image.numpy(), images[index][..., ::-1])


# fork copies the opened dataset (the store is opened again in the worker); spawn unpickles it (URL and selection).
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_dataloader_workers_yield_the_same_batches(sample_store, start_method):
    url, images, _ = sample_store
    dataset = ImageStoreDataset(url, num_samples=200)
    dataset[0]  # open the store in this process before workers start

    def batches(num_workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.Generator().manual_seed(11)  # the sampler draws in the main process: same order for any workers
        context = start_method if num_workers else None
        loader = DataLoader(dataset, batch_size=16, shuffle=True, generator=order, num_workers=num_workers, multiprocessing_context=context)
        return list(loader)

    single, workers = batches(0), batches(2)
    assert len(single) == len(workers) == 13
    seen = []
    for (a_images, a_labels), (b_images, b_labels) in zip(single, workers):
        assert a_images.dtype == torch.uint8 and a_labels.dtype == torch.int64
        assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
        seen.append(a_images.numpy())
    np.testing.assert_array_equal(np.sort(np.concatenate(seen).reshape(200, -1), axis=0), np.sort(images[:200].reshape(200, -1), axis=0))


@pytest.mark.parametrize(
    "options",
    [
        {"num_samples": 40},
        {"per_class": 7, "seed": 3},
        {"classes": ["n01440764", "278", "Orange"]},
        {"classes": "volcano", "per_class": 4, "seed": 1, "num_samples": 3},
        {"classes": 0},
    ],
    ids=["num_samples", "per_class", "classes", "combined", "one-index"],
)
def test_selection_is_the_extractors(sample_store, options):
    url, images, _ = sample_store
    store = validate_image_store(url)
    labels, synsets = store.coordinate("label"), store.coordinate("synset")
    classes = options.get("classes")
    entries = None if classes is None else tuple(str(c) for c in ([classes] if isinstance(classes, (str, int)) else classes))
    spec = SelectionSpec(num_samples=options.get("num_samples"), classes=entries, per_class=options.get("per_class"), seed=options.get("seed", 0))
    dataset = ImageStoreDataset(url, **options)
    expected = select_samples(spec, labels, synsets)
    np.testing.assert_array_equal(dataset.store_positions, expected)
    np.testing.assert_array_equal(dataset.labels, labels[expected])
    np.testing.assert_array_equal(torch.stack([image for image, _ in dataset.__getitems__(range(len(dataset)))]).numpy(), images[expected])


def test_indices_select_like_an_indices_file(sample_store, tmp_path):
    url, _, _ = sample_store
    store = validate_image_store(url)
    labels, synsets = store.coordinate("label"), store.coordinate("synset")
    given = np.random.default_rng(0).choice(600, 250, replace=False)  # unsorted
    np.save(tmp_path / "indices.npy", given)
    spec = SelectionSpec(indices_file=str(tmp_path / "indices.npy"), per_class=6, seed=2)
    dataset = ImageStoreDataset(url, indices=given.tolist(), per_class=6, seed=2)
    np.testing.assert_array_equal(dataset.store_positions, select_samples(spec, labels, synsets))


def test_pickles_as_url_and_selection(sample_store):
    url, images, _ = sample_store
    dataset = ImageStoreDataset(url, num_samples=100)
    dataset[0]
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._store is None  # opened on first use in the process that unpickled it
    np.testing.assert_array_equal(copy[99][0].numpy(), images[99])
    # positions, labels and the shard reader (its layout and the shard indexes read when validating), no zarr objects
    pickled = pickle.dumps(dataset)
    assert len(pickled) < 8 * 100 * 3 + len(pickle.dumps(dataset._reader)) and b"zarr.core" not in pickled
    fresh = pickle.loads(pickled)
    assert 0 in fresh._reader._index_cache and not fresh._reader._open  # the indexes travel; files open on first read


def test_bad_requests_say_what_is_wrong(sample_store):
    url, _, _ = sample_store
    dataset = ImageStoreDataset(url, num_samples=10)
    with pytest.raises(SampleIndexError, match="index 10 is outside 0..9") as caught:
        dataset[10]
    assert isinstance(caught.value, IndexError) and isinstance(caught.value, ImzarrError)
    assert len([item for item in dataset]) == 10  # iteration stops at the end
    with pytest.raises(ImageDatasetError, match="'rgb'"):
        ImageStoreDataset(url, output="rgb")
    with pytest.raises(SelectionError, match="600"):
        ImageStoreDataset(url, indices=[3, 600])
    with pytest.raises(SelectionError, match="goldfish|n01443537"):
        ImageStoreDataset(url, classes="goldfish")


def test_batches_reach_the_dataloader_as_read_and_collate_like_tuples(sample_store):
    """default_collate hands on the tensor `__getitems__` read (no stacking copy); items taken apart or mixed
    collate exactly as `(image, label)` tuples do."""
    url, images, labels = sample_store
    dataset = ImageStoreDataset(url)
    wanted = [9, 4, 598, 4, 300]
    items = dataset.__getitems__(wanted)
    images_batch, labels_batch = default_collate(items)
    assert images_batch.data_ptr() == items[0][0].data_ptr()  # the very tensor the items are rows of
    np.testing.assert_array_equal(images_batch.numpy(), images[wanted])
    assert labels_batch.dtype == torch.int64 and labels_batch.tolist() == labels[wanted].tolist()
    image, label = items[2]
    assert len(items[2]) == 2 and torch.equal(image, items[2][0]) and label == items[2][1] == int(labels[598])
    for subset in (items[1:], items[::-1], [*items[:2], *dataset.__getitems__([7])]):
        expected = default_collate([tuple(item) for item in subset])
        got = default_collate(subset)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert got[0].data_ptr() != items[0][0].data_ptr()  # stacked: not all rows of one batch, in order


# The damage happens after the dataset validated the store: each worker must still name the file, not yield zeros.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")
@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_shard_damaged_after_opening_fails_in_the_workers(sample_store, tmp_path, damage):
    url, _, _ = sample_store
    copy = tmp_path / "copy.zarr"
    shutil.copytree(url, copy)
    dataset = ImageStoreDataset(str(copy))
    dataset[0]  # files opened in this process; the workers open their own
    shard = next(p for p in sorted((copy / "image" / "c" / "1").rglob("*")) if p.is_file())
    os.truncate(shard, 100) if damage == "truncated" else shard.unlink()
    loader = DataLoader(dataset, batch_size=64, num_workers=2, multiprocessing_context="fork")
    with pytest.raises(DamagedStoreError, match=f"{shard}: {damage}"):
        list(loader)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")
@pytest.mark.parametrize("workers", [0, 2])
def test_a_store_rewritten_under_a_dataset_is_refused_not_mixed(sample_store, tmp_path, workers):
    """`convert --overwrite` while a training job holds the dataset: the next batch raises, instead of pairing the
    new store's images with the old store's labels."""
    url, _, _ = sample_store
    copy = tmp_path / "copy.zarr"
    shutil.copytree(url, copy)
    dataset = ImageStoreDataset(str(copy))
    loader = DataLoader(dataset, batch_size=64, num_workers=workers, multiprocessing_context="fork" if workers else None)
    assert sum(len(labels) for _, labels in loader) == len(dataset)  # the first epoch, as made
    shards = Path(url).parent / "shards" / "train"
    imzarr("convert", "npz", str(shards), "-o", str(copy), "--shuffle-seed", str(SHUFFLE_SEED + 1), "--shard-size", "256", "--overwrite", cwd=tmp_path)
    with pytest.raises(InputChangedError, match=r"copy\.zarr: rewritten since this ImageStoreDataset opened it \(its labels and selection are the old store's"):
        list(loader)
    assert len(ImageStoreDataset(str(copy))) == len(dataset)  # a dataset made again reads the new store


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")
@pytest.mark.parametrize("workers", [0, 2])
def test_a_relative_path_keeps_reading_its_store_after_the_working_folder_changes(sample_store, tmp_path, monkeypatch, workers):
    """A notebook's `%cd` to a folder holding another store of the same name: the store and the dataset opened
    before it go on reading the store they opened (not the other one's pixels with their labels)."""
    url, images, labels = sample_store
    mine, other = tmp_path / "mine", tmp_path / "other"
    shutil.copytree(url, mine / "data" / "s.zarr")
    shards = Path(url).parent / "shards" / "train"
    other.mkdir()
    imzarr("convert", "npz", str(shards), "-o", "data/s.zarr", "--shuffle-seed", str(SHUFFLE_SEED + 1), "--shard-size", "256", cwd=other)
    monkeypatch.chdir(mine)
    store = validate_image_store("data/s.zarr")
    dataset = ImageStoreDataset("data/s.zarr", num_samples=100)
    monkeypatch.chdir(other)
    np.testing.assert_array_equal(store.take(np.arange(100)), images[:100])
    np.testing.assert_array_equal(store.coordinate("label")[:100], labels[:100])
    loader = DataLoader(dataset, batch_size=50, num_workers=workers, multiprocessing_context="fork" if workers else None)
    got_images, got_labels = (torch.cat(parts) for parts in zip(*loader))
    np.testing.assert_array_equal(got_images.numpy(), images[:100])
    np.testing.assert_array_equal(got_labels.numpy(), labels[:100])


def test_a_memory_store_in_spawned_workers_is_named_as_per_process(sample_store):
    import fsspec

    url, _, _ = sample_store
    memory = fsspec.filesystem("memory")
    target = "memory://spawned-dataset.zarr"
    for path in Path(url).rglob("*"):
        if path.is_file():
            memory.pipe(f"{target}/{path.relative_to(url).as_posix()}", path.read_bytes())
    dataset = ImageStoreDataset(target, num_samples=8)
    assert len(next(iter(DataLoader(dataset, batch_size=8)))[0]) == 8  # read in this process
    loader = DataLoader(dataset, batch_size=8, num_workers=1, multiprocessing_context="spawn")
    with pytest.raises(ImageDatasetError, match=r"memory://spawned-dataset\.zarr: a memory:// store lives only in the process that made it"):
        list(loader)
