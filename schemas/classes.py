"""The ImageNet-1k class table shipped with the package: one meaning for every label.

`index` is the 0-based position in sorted-WNID order (what EDM, ADM, DMD2 and torchvision models are
conditioned on); `downsampled_label` is the 1-based ILSVRC2012_ID of the devkit's map_clsloc order, used by
the downsampled-ImageNet NPZ release and by the devkit's validation ground truth.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

from schemas.errors import ImzarrError

NUM_CLASSES = 1000


class UnknownClassError(ImzarrError):
    """A WNID or label that is not one of the 1000 ImageNet-1k classes."""


@dataclass(frozen=True)
class ClassTable:
    wnids: tuple[str, ...]
    names: tuple[str, ...]
    downsampled_labels: np.ndarray  # int64 [1000], indexed by sorted index

    def index_of_wnid(self, wnid: str) -> int:
        try:
            return self._wnid_to_index()[wnid]
        except KeyError:
            raise UnknownClassError(f"{wnid!r} is not an ImageNet-1k WNID") from None

    def is_wnid(self, name: str) -> bool:
        return name in self._wnid_to_index()

    def _wnid_to_index(self) -> dict[str, int]:
        return _wnid_index(self.wnids)

    def from_downsampled(self, labels: np.ndarray) -> np.ndarray:
        """Map 1-based map_clsloc labels (NPZ release, devkit ground truth) to sorted-WNID indices."""
        labels = np.asarray(labels)
        bad = (labels < 1) | (labels > NUM_CLASSES)
        if bad.any():
            raise UnknownClassError(f"label {labels[bad][0]} is outside 1..{NUM_CLASSES}")
        return _downsampled_to_sorted(self.downsampled_labels)[labels]

    def synsets_of(self, labels: np.ndarray) -> np.ndarray:
        """WNIDs of sorted-order labels as an object array ('' for -1 = unknown)."""
        return _lookup(np.asarray(self.wnids + ("",), dtype=object), labels)

    def names_of(self, labels: np.ndarray) -> np.ndarray:
        """Class names of sorted-order labels as an object array ('' for -1 = unknown)."""
        return _lookup(np.asarray(self.names + ("",), dtype=object), labels)


def _lookup(table: np.ndarray, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    return table[np.where(labels < 0, len(table) - 1, labels)]


@lru_cache(maxsize=4)
def _wnid_index(wnids: tuple[str, ...]) -> dict[str, int]:
    return {w: i for i, w in enumerate(wnids)}


def _downsampled_to_sorted(downsampled_labels: np.ndarray) -> np.ndarray:
    lut = np.full(NUM_CLASSES + 1, -1, dtype=np.int16)
    lut[downsampled_labels] = np.arange(NUM_CLASSES, dtype=np.int16)
    return lut


@lru_cache(maxsize=1)
def class_table() -> ClassTable:
    """The packaged ImageNet-1k class table (loaded once)."""
    text = resources.files("schemas").joinpath("imagenet1k_classes.tsv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
    rows.sort(key=lambda r: int(r["index"]))
    if [int(r["index"]) for r in rows] != list(range(NUM_CLASSES)):
        raise ImzarrError("packaged class table is damaged: indices are not 0..999")
    return ClassTable(
        wnids=tuple(r["wnid"] for r in rows),
        names=tuple(r["name"] for r in rows),
        downsampled_labels=np.array([int(r["downsampled_label"]) for r in rows], dtype=np.int64),
    )
