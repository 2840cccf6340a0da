"""Downsampled-ImageNet shards (`.npz` with `data`/`labels`, legacy pickles) and ADM sample files (`arr_0`)."""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converter.sources.base import (
    ImageSource,
    MaterializedPart,
    RowFile,
    SourceError,
    SourceFile,
    fingerprint_file,
    write_atomically,
)
from schemas.classes import NUM_CLASSES, class_table

try:  # ISA-L inflates ~1.7× faster than zlib and, like zlib, releases the GIL
    from isal import isal_zlib as _inflate_lib
except ImportError:  # pragma: no cover - isal is a dependency, zlib is the fallback
    import zlib as _inflate_lib

RESOLUTIONS = (64, 32, 16)
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGIC = b"\x80"
INFLATE_BLOCK = 8 << 20


def natural_key(name: str) -> list:
    """`train_data_batch_2` sorts before `train_data_batch_10`."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def find_shards(sources: list[str | Path]) -> list[tuple[Path, str]]:
    """Shard files under the given files/folders, naturally ordered, with their paths relative to the root given."""
    found: list[tuple[Path, str]] = []
    for src in map(Path, sources):
        if src.is_file():
            found.append((src, src.name))
        elif src.is_dir():
            names = sorted((p for p in src.iterdir() if p.is_file() and not p.name.startswith(".")), key=lambda p: natural_key(p.name))
            found += [(p, p.name) for p in names if p.suffix == ".npz" or (not p.suffix and _magic(p) in ("zip", "pickle"))]
        else:
            raise SourceError(src, "no such file or folder")
    if not found:
        raise SourceError(", ".join(map(str, sources)), "no shards found (expected .npz files or extension-less batches)")
    kinds = {("val" if "val" in rel.lower() else "train" if "train" in rel.lower() else "other") for _, rel in found}
    if {"train", "val"} <= kinds:
        raise SourceError(", ".join(map(str, sources)), "train and val shards found together; convert them in separate runs")
    return found


def _magic(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if head == ZIP_MAGIC:
        return "zip"
    if head[:1] == PICKLE_MAGIC:
        return "pickle"
    if not head:
        return "empty"
    return "unknown"


def resolution_of_row(path: object, row_len: int) -> int:
    for s in RESOLUTIONS:
        if row_len == 3 * s * s:
            return s
    raise SourceError(path, f"row length {row_len} is not 3·S·S for S in {RESOLUTIONS}")


def remap_labels(path: object, labels: np.ndarray, order: str) -> np.ndarray:
    """Source labels → sorted-WNID index (int16), checking the range of the declared order."""
    labels = np.asarray(labels).astype(np.int64, copy=False)
    lo, hi = (1, NUM_CLASSES) if order == "downsampled" else (0, NUM_CLASSES - 1)
    bad = (labels < lo) | (labels > hi)
    if bad.any():
        raise SourceError(path, f"label {labels[bad][0]} outside {lo}..{hi} (label order {order!r})")
    return class_table().from_downsampled(labels) if order == "downsampled" else labels.astype(np.int16)


@dataclass(frozen=True)
class _Member:
    name: str
    stored: bool
    data_offset: int  # start of the member's bytes in the zip file
    compressed_size: int


def _zip_members(path: Path) -> dict[str, _Member]:
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
            members = {}
            for info in zf.infolist():
                f.seek(info.header_offset)
                header = f.read(30)
                if header[:4] != ZIP_MAGIC:
                    raise SourceError(path, f"corrupt zip: bad local header for {info.filename}")
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise SourceError(path, f"member {info.filename} uses unsupported compression {info.compress_type}")
                members[info.filename.removesuffix(".npy")] = _Member(
                    info.filename,
                    info.compress_type == zipfile.ZIP_STORED,
                    info.header_offset + 30 + name_len + extra_len,
                    info.compress_size,
                )
            return members
    except zipfile.BadZipFile as exc:
        raise SourceError(path, f"truncated or corrupt zip ({exc})") from None


def _npy_header(path: Path, member: _Member) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) of a .npy member, inflating only its first block when deflated."""
    with open(path, "rb") as f:
        f.seek(member.data_offset)
        if member.stored:
            head = io.BytesIO(f.read(min(member.compressed_size, 1 << 16)))
        else:
            try:
                head = io.BytesIO(_inflate_lib.decompressobj(-15).decompress(f.read(min(member.compressed_size, 1 << 16))))
            except Exception as exc:
                raise SourceError(path, f"corrupt deflate stream in {member.name} ({exc})") from None
    try:
        version = np.lib.format.read_magic(head)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(head)
    except Exception as exc:
        raise SourceError(path, f"{member.name} is not a valid .npy array ({exc})") from None
    if fortran:
        raise SourceError(path, f"{member.name} is stored in Fortran order")
    return shape, dtype, head.tell()


def _read_small_member(path: Path, name: str) -> np.ndarray:
    try:
        with zipfile.ZipFile(path) as zf, zf.open(name) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise SourceError(path, f"cannot read {name} ({exc})") from None


class _RowsOfOneFile:
    """Parts whose rows are one file's rows: source_file is that file, source_row the row."""

    relpath: str
    num_rows: int
    label_values: np.ndarray

    def labels(self) -> np.ndarray:
        return self.label_values

    def row_sources(self) -> tuple[np.ndarray, np.ndarray]:
        return np.full(self.num_rows, self.relpath, dtype=object), np.arange(self.num_rows, dtype=np.int64)


@dataclass(frozen=True)
class NpzPart(_RowsOfOneFile):
    """The image member of one `.npz` file (`data` rows of planes, or `arr_0` NHWC samples)."""

    path: str
    relpath: str
    num_rows: int
    resolution: int
    layout: str
    member: _Member
    header_len: int
    label_values: np.ndarray

    def _row_file(self, path: str, offset: int) -> RowFile:
        return RowFile(path, offset, self.num_rows, self.resolution, self.layout)

    def row_file(self) -> RowFile | None:
        if not self.member.stored:
            return None
        return self._row_file(self.path, self.member.data_offset + self.header_len)

    def materialize(self, dest: str) -> MaterializedPart:
        """Inflate the member in fixed-size blocks into a raw file (bounded memory)."""
        expected = self.num_rows * 3 * self.resolution**2
        write_atomically(dest, self._inflate_rows(expected))
        return MaterializedPart(self._row_file(dest, 0), np.ones(self.num_rows, dtype=bool))

    def _inflate_rows(self, expected: int):
        inflater = _inflate_lib.decompressobj(-15)
        skip, produced = self.header_len, 0
        with open(self.path, "rb") as f:
            f.seek(self.member.data_offset)
            remaining = self.member.compressed_size
            while remaining > 0:
                block = f.read(min(INFLATE_BLOCK, remaining))
                if not block:
                    break
                remaining -= len(block)
                try:
                    out = inflater.decompress(block)
                except Exception as exc:
                    raise SourceError(self.path, f"corrupt deflate stream in {self.member.name} ({exc})") from None
                if skip:
                    cut = min(skip, len(out))
                    out, skip = out[cut:], skip - cut
                produced += len(out)
                yield out
        if produced != expected:
            raise SourceError(self.path, f"{self.member.name} holds {produced} bytes of pixels, expected {expected} (truncated?)")


@dataclass(frozen=True)
class PicklePart(_RowsOfOneFile):
    """A legacy extension-less batch (a pickled dict with `data`, `labels`); loaded only on explicit opt-in."""

    path: str
    relpath: str
    num_rows: int
    resolution: int
    label_values: np.ndarray

    def row_file(self) -> RowFile | None:
        return None

    def materialize(self, dest: str) -> MaterializedPart:
        data, _ = _load_pickle_batch(Path(self.path))
        write_atomically(dest, [np.ascontiguousarray(data, dtype=np.uint8).data])
        return MaterializedPart(RowFile(dest, 0, self.num_rows, self.resolution), np.ones(self.num_rows, dtype=bool))


def _load_pickle_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f)  # noqa: S301 - only reached with --allow-pickle
    except Exception as exc:
        raise SourceError(path, f"cannot unpickle batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise SourceError(path, "pickled batch is not a dict with 'data' and 'labels'")
    return np.asarray(batch["data"]), np.asarray(batch["labels"])


def _check_rows(path: Path, shape: tuple[int, ...], dtype: np.dtype, n_labels: int | None, layout: str) -> tuple[int, int]:
    if dtype != np.uint8:
        raise SourceError(path, f"image data has dtype {dtype}, expected uint8")
    if layout == "chw":
        if len(shape) != 2:
            raise SourceError(path, f"data has shape {shape}, expected (N, 3·S·S)")
        resolution = resolution_of_row(path, shape[1])
    else:
        if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2]:
            raise SourceError(path, f"arr_0 has shape {shape}, expected (N, S, S, 3)")
        resolution = resolution_of_row(path, 3 * shape[1] * shape[2])
    if n_labels is not None and n_labels != shape[0]:
        raise SourceError(path, f"data has {shape[0]} rows but labels has {n_labels}")
    return shape[0], resolution


def open_npz_source(sources: list[str | Path], label_order: str | None = None, allow_pickle: bool = False) -> ImageSource:
    """Find, check and describe shards; reads only headers and labels (never the pixels)."""
    parts, files, kinds = [], [], set()
    for path, rel in find_shards(sources):
        magic = _magic(path)
        if magic == "pickle":
            if not allow_pickle:
                raise SourceError(path, "is a pickle, which can run code when loaded; pass --allow-pickle if you trust it")
            kind, order = "downsampled-imagenet", label_order or "downsampled"
            data, raw_labels = _load_pickle_batch(path)
            n, res = _check_rows(path, data.shape, data.dtype, len(raw_labels), "chw")
            part = PicklePart(str(path), rel, n, res, remap_labels(path, raw_labels, order))
        elif magic == "zip":
            members = _zip_members(path)
            if "data" in members:
                kind, layout, image_name, label_name = "downsampled-imagenet", "chw", "data", "labels"
            elif "arr_0" in members:
                kind, layout, image_name, label_name = "adm-samples", "hwc", "arr_0", "arr_1"
            else:
                raise SourceError(path, f"no 'data' (or 'arr_0') array; members are {sorted(members)}")
            if kind == "downsampled-imagenet" and "labels" not in members:
                raise SourceError(path, "no 'labels' array")
            order = label_order or ("downsampled" if kind == "downsampled-imagenet" else "sorted")
            shape, dtype, header_len = _npy_header(path, members[image_name])
            raw_labels = _read_small_member(path, members[label_name].name) if label_name in members else None
            n, res = _check_rows(path, shape, dtype, None if raw_labels is None else len(raw_labels), layout)
            labels = (
                np.full(n, -1, dtype=np.int16) if raw_labels is None else remap_labels(path, raw_labels.reshape(-1), order)
            )
            part = NpzPart(str(path), rel, n, res, layout, members[image_name], header_len, labels)
        else:
            raise SourceError(path, f"not an .npz (zip) file or a pickled batch ({magic} content)")
        kinds.add((kind, order))
        parts.append(part)
        files.append(SourceFile(rel, os.path.getsize(path), fingerprint_file(path)))
    if len({p.resolution for p in parts}) > 1:
        sizes = {p.relpath: p.resolution for p in parts}
        raise SourceError(", ".join(map(str, sources)), f"mixed resolutions {sizes}")
    if len(kinds) > 1:
        raise SourceError(", ".join(map(str, sources)), f"mixed file kinds/label orders {sorted(kinds)}")
    (kind, order), = kinds
    return ImageSource(
        format="npz" if kind == "downsampled-imagenet" else "adm-npz",
        label_order=order,
        resolution=parts[0].resolution,
        parts=parts,
        files=files,
        attrs={"source_kind": kind},
        settings={"label_order": order, "allow_pickle": allow_pickle},
    )
