"""What every image source gives the converter: parts of rows in canonical order, readable at random.

A source is a list of parts (an NPZ member, a pickle batch, a block of JPEG files). A part's rows are either
readable in place (`row_file()`: an uncompressed NPZ member) or must first be materialized into a raw scratch
file by a stage-1 task (`materialize()`: inflate, unpickle, decode and resize).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Protocol

import numpy as np

from converter.sources.row_checksums import READ_BLOCK, MemberChecksum, Pieces, row_run_checksums
from converter.sources.source_files import read_items_into, read_range
from schemas.errors import ImzarrError, OutputWriteError, PathError  # noqa: F401 - OutputWriteError: re-exported


class SourceError(PathError):
    """Bad input: the message names the file and the reason."""


class ConvertOptionError(ImzarrError):
    """An option value no conversion can use; raised before anything is read or written."""

    def __init__(self, option: str, value: object, reason: str):
        super().__init__(f"{option} {value}: {reason}")
        self.option, self.value, self.reason = option, value, reason


@dataclass(frozen=True)
class SourceFile:
    """One input file as recorded in the store's `sources` attribute."""

    path: str  # relative to the source root
    size: int
    fingerprint: str


@dataclass(frozen=True)
class RowFile:
    """Uncompressed rows in a local file or at a URL: row r is bytes [offset + r·row_bytes, +row_bytes)."""

    path: str
    offset: int
    num_rows: int
    resolution: int
    layout: str = "chw"  # "chw": R, G, B planes; "hwc": interleaved pixels (ADM sample files)
    # Rows read in place from a zip member: the member's CRC-32, which the conversion checks from what its tasks
    # read (converter/sources/row_checksums.py); None where nothing records one, or it was checked already.
    checksum: MemberChecksum | None = None

    @property
    def row_bytes(self) -> int:
        return 3 * self.resolution * self.resolution

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows (sorted or not) as uint8 (n, 3, S, S)."""
        out = np.empty((len(rows), 3, self.resolution, self.resolution), dtype=np.uint8)
        self.read_into(rows, out, np.arange(len(rows)))
        return out

    def read_into(self, rows: np.ndarray, out: np.ndarray, dest: np.ndarray) -> None:
        """out[dest[i]] = row rows[i]; `out` is a C-contiguous uint8 (m, 3, S, S) buffer."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        byte_pos = self.offset + rows[order] * self.row_bytes
        if self.layout == "chw":
            flat = out.reshape(out.shape[0], self.row_bytes)
            read_items_into(self.path, byte_pos, self.row_bytes, flat, np.asarray(dest)[order])
            return
        flat = np.empty((rows.size, self.row_bytes), dtype=np.uint8)
        read_items_into(self.path, byte_pos, self.row_bytes, flat, order)
        s = self.resolution
        out[dest] = flat.reshape(-1, s, s, 3).transpose(0, 3, 1, 2)

    def read_blocks(self, first: int, count: int) -> Iterator[bytes]:
        """The bytes of rows [first, first + count) as they lie in the file, in blocks of bounded size."""
        per_block = max(1, READ_BLOCK // self.row_bytes)
        for a in range(first, first + count, per_block):
            n = min(per_block, first + count - a)
            yield read_range(self.path, self.offset + a * self.row_bytes, self.offset + (a + n) * self.row_bytes)

    def piece_checksums(self, part: int, rows: np.ndarray, out: np.ndarray, dest: np.ndarray) -> Pieces:
        """The CRC-32 of each run of consecutive `rows` just read into out[dest] (bytes as in the file: HWC rows
        are turned back)."""
        order = np.argsort(rows, kind="stable")
        rows, dest = np.asarray(rows)[order], np.asarray(dest)[order]

        def file_bytes(i: int, n: int) -> np.ndarray:
            lo, run = int(dest[i]), dest[i : i + n]
            # One slice where the run's rows lie in order in `out` (an unshuffled shard); else gathered.
            block = out[lo : lo + n] if np.array_equal(run, np.arange(lo, lo + n)) else out[run]
            return np.ascontiguousarray(block if self.layout == "chw" else block.transpose(0, 2, 3, 1))

        return row_run_checksums(part, rows, file_bytes)


@dataclass(frozen=True)
class MaterializedPart:
    """A stage-1 result: the rows in a scratch file, which rows are usable, and why the others are not."""

    row_file: RowFile
    kept: np.ndarray  # bool [num_rows]
    rejected: list[tuple[str, str]] = field(default_factory=list)


class SourcePart(Protocol):
    relpath: str
    num_rows: int
    resolution: int

    def labels(self) -> np.ndarray:
        """Labels in sorted-WNID order (int16, -1 unknown), one per row."""

    def row_sources(self) -> tuple[np.ndarray, np.ndarray]:
        """(source_file object array, source_row int64 array), one per row."""

    def row_file(self) -> RowFile | None:
        """Rows readable in place, or None when the part must be materialized first."""

    def materialize(self, dest: str) -> MaterializedPart:
        """Write the part's rows to the raw file `dest` (atomically) and report unusable rows."""


@dataclass(frozen=True)
class ImageSource:
    """An opened source: its parts in canonical order and what the store records about it."""

    format: str
    label_order: str
    resolution: int
    parts: list[SourcePart]
    files: list[SourceFile]
    attrs: dict = field(default_factory=dict)  # format-specific attributes for the store
    settings: dict = field(default_factory=dict)  # format-specific options that change the output
    ignored: list[str] = field(default_factory=list)
    # The files and folders read, as given (for checks that the output overlaps none of them).
    input_paths: tuple[str, ...] = ()
    # Labels numbered from folder names (not ImageNet classes): synset and class_name come from here.
    label_synsets: tuple[str, ...] | None = None
    # (path, fingerprint) of the input files whose rows are read after the source was opened (NPZ shards, a label
    # file): a conversion takes their fingerprints again (one stat or HEAD each) before it marks the store complete.
    input_stamps: tuple[tuple[str, str], ...] = ()
