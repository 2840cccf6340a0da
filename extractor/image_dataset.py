"""A PyTorch map-style Dataset over an image store, for training and evaluation loops.

    from torch.utils.data import DataLoader
    from extractor.image_dataset import ImageStoreDataset

    dataset = ImageStoreDataset("train64.zarr", per_class=50, output="float")
    loader = DataLoader(dataset, batch_size=256, shuffle=True, num_workers=2)
    for images, labels in loader:   # images (B, 3, S, S) float32 in [0, 1], labels (B,) int64
        ...

An item is `(image, label)`: `image` a (3, S, S) tensor, uint8 RGB as stored (`output="uint8"`) or float32
in [0, 1] (`output="float"`: the stored value / 255, as torchvision's `to_tensor` gives), then `transform`
if one is given; `label` an int, the sorted-WNID class index 0..999 (what EDM, ADM, DMD2 and torchvision models
are conditioned on), or -1 where the store does not know the class.

The DataLoader fetches a whole batch through `__getitems__`, which reads it with one `ImageStore.take` into one
tensor; its items are rows of that tensor, and `default_collate` hands the tensor on as the batch instead of
stacking a copy (the items' type is registered in `default_collate_fn_map`, the extension point that function
documents). The dataset pickles as its URL, selected positions and the store's shard reader (the layout and
shard indexes it read when validating the store, no open files), so a DataLoader worker reads without opening
or validating the store again, with fork, spawn and forkserver alike; a shard file gone or cut short since
still raises DamagedStoreError in the worker.
"""

from __future__ import annotations

import operator
import os
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info
from torch.utils.data._utils.collate import collate, default_collate_fn_map

from extractor.selection import SelectionSpec, checked_positions, class_entries, select_samples
from schemas.errors import ImzarrError, SampleIndexError
from schemas.keywords import keyword_names, refuse_unknown_keywords
from schemas.image_store import ImageStore, ShardRangeReader, validate_image_store
from schemas.output_paths import absolute_url, local_path, url_protocol
from schemas.store_identity import ROOT_METADATA, InputChangedError, StoreIdentity, check_unchanged

Output = Literal["uint8", "float"]
OUTPUTS: tuple[str, ...] = ("uint8", "float")
Item = tuple[torch.Tensor, int]


class ImageDatasetError(ImzarrError):
    """An ImageStoreDataset option that cannot be honoured."""


class ImageBatch:
    """One batch read at once: its images (one tensor) and labels."""

    __slots__ = ("images", "labels")

    def __init__(self, images: torch.Tensor, labels: list[int]):
        self.images, self.labels = images, labels


class BatchItem(Sequence[Any]):
    """The `(image, label)` item at `row` of an ImageBatch: unpacks and indexes like that tuple, and makes the
    image (a row of the batch's tensor) only when asked; `default_collate` passes the batch's tensor on whole."""

    __slots__ = ("batch", "row")

    def __init__(self, batch: ImageBatch, row: int):
        self.batch, self.row = batch, row

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> Any:  # type: ignore[override]
        return (self.batch.images[self.row], self.batch.labels[self.row])[index]

    def __iter__(self) -> Iterator[Any]:
        yield self.batch.images[self.row]
        yield self.batch.labels[self.row]

    def __repr__(self) -> str:
        return repr(tuple(self))


def collate_batch_items(batch: Sequence[BatchItem], *, collate_fn_map: dict[Any, Callable[..., Any]] | None = None) -> list[Any]:
    """What `default_collate` gives for `(image, label)` tuples, `[images (B, ...), labels (B,) int64]`: the tensor
    of the ImageBatch itself where the items are all its rows in order (no copy), else the rows stacked."""
    whole = batch[0].batch
    if len(batch) == whole.images.shape[0] and all(type(item) is BatchItem and item.batch is whole and item.row == k for k, item in enumerate(batch)):
        images = whole.images
        if get_worker_info() is not None:
            # A worker's batch reaches the main process through shared memory. default_collate puts it there
            # itself (one copy); left to pickling, the tensor's own move there costs ~5× more (bench_reads).
            images = collate([images], collate_fn_map=collate_fn_map)[0]
        return [images, torch.tensor(whole.labels)]
    return [collate(list(samples), collate_fn_map=collate_fn_map) for samples in zip(*(tuple(item) for item in batch))]


# `default_collate`'s documented extension point: a collate function for one more element type.
default_collate_fn_map[BatchItem] = collate_batch_items


class ImageStoreDataset(Dataset[Item]):
    """Selected samples of an image store as `(image (3, S, S) tensor, label int)` items.

    Selection follows `extractor.selection` (the rules of `imzarr extract`), applied in this order:
    `indices` (store positions, taken sorted; a position listed twice is refused, like `--indices`), `classes` (WNIDs,
    class names or label indices), `per_class` (K per class, drawn with `seed`), `num_samples` (the first N
    remaining: a uniform random sample when the store was written with `--shuffle-seed`). Items are in
    ascending store order; shuffle with the DataLoader.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        indices: Iterable[int] | np.ndarray | None = None,
        num_samples: int | None = None,
        classes: str | int | Iterable[str | int] | None = None,
        per_class: int | None = None,
        seed: int = 0,
        transform: Callable[[torch.Tensor], Any] | None = None,
        output: Output = "uint8",
        **unknown: Any,
    ):
        # A misspelt keyword is named with its close match, as every API entry does (not Python's bare TypeError).
        refuse_unknown_keywords(unknown, keyword_names(ImageStoreDataset.__init__), "ImageStoreDataset")
        if output not in OUTPUTS:
            raise ImageDatasetError(f"output={output!r}: expected one of {', '.join(map(repr, OUTPUTS))}")
        self.url = str(absolute_url(os.fspath(url)))  # workers and later batches read the store meant now, whatever the working folder
        self.transform = transform
        self.output = output
        store = validate_image_store(self.url)
        all_labels = store.coordinate("label")
        all_synsets = store.coordinate("synset")
        n = all_labels.size
        given = np.arange(n, dtype=np.int64) if indices is None else checked_positions(_as_array(indices), n, "indices")
        spec = SelectionSpec(num_samples=num_samples, classes=class_entries(classes), per_class=per_class, seed=seed)
        # select_samples works on positions within the arrays it is given: run it on the given positions' labels,
        # then map its answer back to store positions (the same result as `--indices-file` with these positions).
        self.store_positions: np.ndarray = given[select_samples(spec, all_labels[given], all_synsets[given])]
        self._labels = all_labels[self.store_positions].astype(np.int64)
        self._store: ImageStore | None = store
        self._image_shape = store.image_shape[1:]
        # The validated store's direct reader, with the index of every shard the selection reads (checked
        # against each file's size now): workers get it pickled and read at once. None: read through zarr.
        self._reader: ShardRangeReader | None = store.fast_reader
        if self._reader is not None and self.store_positions.size:
            shards = np.unique(self.store_positions // self._reader.layout.samples_per_shard)
            self._reader.shard_indexes(shards.tolist())
        self._opened_in_pid = os.getpid()
        self._text_coordinates: dict[str, np.ndarray] = {}
        # The store this dataset's labels and positions belong to: a rewrite of it (`convert --overwrite`) since is
        # refused at the next read, rather than pairing new images with old labels.
        self._identity = StoreIdentity.of(self.url, store.attrs)
        local = local_path(self.url)
        self._root_json = None if local is None else os.path.join(local, ROOT_METADATA)
        self._seen: tuple[int, tuple[int, int, int] | None] | None = None  # (process, zarr.json's stat) checked
        self._check_store()

    def __len__(self) -> int:
        return int(self.store_positions.size)

    def __getitem__(self, index: int) -> Item:
        """One sample: (image (3, S, S) uint8 or float tensor, label int, -1 when unknown)."""
        image, label = self.__getitems__([operator.index(index)])[0]
        return image, label

    def __getitems__(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> list[Item]:
        """Samples at dataset indices, read with one `ImageStore.take`; a list of items, as default_collate takes
        (without a transform, rows of one tensor that default_collate passes on as the batch: see BatchItem)."""
        local = self._local_indices(indices)
        self._check_store()
        images = torch.from_numpy(self._take(self.store_positions[local]))
        if self.output == "float":
            images = images.to(torch.float32).div_(255)
        labels = self._labels[local].tolist()
        if self.transform is None:
            batch = ImageBatch(images, labels)
            return [BatchItem(batch, row) for row in range(len(labels))]
        return [(self.transform(image), label) for image, label in zip(images.unbind(0), labels)]

    def _take(self, positions: np.ndarray) -> np.ndarray:
        """uint8 images at store positions (checked in range when selected)."""
        if self._reader is None:
            return self.store.take(positions)
        return self._reader.take(positions).reshape(positions.size, *self._image_shape)

    @property
    def store(self) -> ImageStore:
        """The open store, opened again in a new process (a DataLoader worker) on first use there."""
        if self._store is None or self._opened_in_pid != os.getpid():
            self._store = validate_image_store(self.url)
            self._opened_in_pid = os.getpid()
        return self._store

    @property
    def labels(self) -> np.ndarray:
        """int64 label of every selected sample (sorted-WNID index, -1 unknown), in dataset order."""
        return self._labels.copy()

    @property
    def synsets(self) -> np.ndarray:
        """WNID of every selected sample (object array of str)."""
        return self._text_coordinate("synset")

    @property
    def class_names(self) -> np.ndarray:
        """Class name of every selected sample (object array of str)."""
        return self._text_coordinate("class_name")

    @property
    def resolution(self) -> int:
        """Image side S in pixels."""
        return self.store.resolution

    def _text_coordinate(self, name: str) -> np.ndarray:
        if name not in self._text_coordinates:
            self._text_coordinates[name] = self.store.coordinate(name)[self.store_positions]
        return self._text_coordinates[name].copy()

    def _check_store(self) -> None:
        """InputChangedError when the store was rewritten since this dataset opened it. Checked once per process,
        and again locally whenever the store's zarr.json changed (one stat per batch: the checks cost nothing)."""
        stamp = None
        if self._root_json is not None:
            try:
                found = os.stat(self._root_json)
                stamp = (found.st_ino, found.st_size, found.st_mtime_ns)
            except FileNotFoundError:
                pass
        if self._seen is not None and self._seen[0] == os.getpid() and (self._root_json is None or stamp == self._seen[1]):
            return
        try:
            check_unchanged(self._identity)
        except InputChangedError:
            if url_protocol(self.url) == "memory" and os.getpid() != self._opened_in_pid:
                raise ImageDatasetError(
                    f"{self.url}: a memory:// store lives only in the process that made it, and this worker process "
                    "(a spawned DataLoader worker) has none: put the store on disk or in an object store, or use "
                    "workers started by fork"
                ) from None
            raise InputChangedError(
                f"{self.url}: rewritten since this ImageStoreDataset opened it (its labels and selection are the old "
                "store's, its images would be the new one's): make the dataset again"
            ) from None
        self._seen = (os.getpid(), stamp)

    def _local_indices(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        local = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        outside = (local < -n) | (local >= n)
        if outside.any():
            raise SampleIndexError(f"index {int(local[outside][0])} is outside 0..{n - 1} (dataset of {n} samples)")
        return np.where(local < 0, local + n, local)

    def __getstate__(self) -> dict[str, Any]:
        # Workers get the URL, the selection and the shard reader: an open zarr group does not pickle cheaply, if at all.
        state = self.__dict__.copy()
        state["_store"] = None
        state["_text_coordinates"] = {}
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, {len(self)} samples, output={self.output!r})"


def _as_array(indices: Iterable[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    return np.asarray(indices if isinstance(indices, (np.ndarray, torch.Tensor)) else list(indices))
