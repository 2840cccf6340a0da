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

The DataLoader fetches a whole batch through `__getitems__`, which reads it with one `ImageStore.take` (one
`pread` per run of adjacent images). The dataset pickles as its URL and selected positions; each process opens
the store itself on first use, so `num_workers > 0` works with fork, spawn and forkserver alike.
"""

from __future__ import annotations

import operator
import os
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from extractor.selection import SelectionSpec, checked_positions, class_entries, select_samples
from schemas.errors import ImzarrError
from schemas.image_store import ImageStore, validate_image_store

Output = Literal["uint8", "float"]
OUTPUTS: tuple[str, ...] = ("uint8", "float")
Item = tuple[torch.Tensor, int]


class ImageDatasetError(ImzarrError):
    """An ImageStoreDataset option that cannot be honoured."""


class SampleIndexError(ImzarrError, IndexError):
    """A dataset index outside 0..len-1 (an IndexError too, so `for item in dataset` stops at the end)."""


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
    ):
        if output not in OUTPUTS:
            raise ImageDatasetError(f"output={output!r}: expected one of {', '.join(map(repr, OUTPUTS))}")
        self.url = os.fspath(url)
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
        self._opened_in_pid = os.getpid()
        self._text_coordinates: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.store_positions.size)

    def __getitem__(self, index: int) -> Item:
        """One sample: (image (3, S, S) uint8 or float tensor, label int, -1 when unknown)."""
        return self.__getitems__([operator.index(index)])[0]

    def __getitems__(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> list[Item]:
        """Samples at dataset indices, read with one `ImageStore.take`; a list of items, as default_collate takes."""
        local = self._local_indices(indices)
        images = torch.from_numpy(self.store.take(self.store_positions[local]))
        if self.output == "float":
            images = images.to(torch.float32).div_(255)
        labels = self._labels[local].tolist()
        if self.transform is None:
            return list(zip(images.unbind(0), labels))
        return [(self.transform(image), label) for image, label in zip(images.unbind(0), labels)]

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

    def _local_indices(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        local = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        outside = (local < -n) | (local >= n)
        if outside.any():
            raise SampleIndexError(f"index {int(local[outside][0])} is outside 0..{n - 1} (dataset of {n} samples)")
        return np.where(local < 0, local + n, local)

    def __getstate__(self) -> dict[str, Any]:
        # Workers get the URL and the selection only: an open zarr group does not pickle cheaply, if at all.
        state = self.__dict__.copy()
        state["_store"] = None
        state["_text_coordinates"] = {}
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, {len(self)} samples, output={self.output!r})"


def _as_array(indices: Iterable[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    return np.asarray(indices if isinstance(indices, (np.ndarray, torch.Tensor)) else list(indices))
