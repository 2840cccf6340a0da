"""Downsampled-ImageNet shards (`.npz` with `data`/`labels`, legacy pickles) and ADM sample files (`arr_0`)."""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from converter.sources.base import (
    ConvertOptionError,
    ImageSource,
    MaterializedPart,
    RowFile,
    SourceError,
    SourceFile,
)
from converter.sources import source_files
from converter.sources.row_checksums import MemberChecksum
from converter.sources.source_files import SMALL_BLOCK, is_remote
from schemas.atomic_files import write_atomically
from schemas.classes import NUM_CLASSES, class_table
from schemas.errors import printable_path
from schemas.option_values import one_of

# How a file's labels number the classes: "downsampled" 1..1000 in map_clsloc order (the downsampled-ImageNet
# shards), "sorted" 0..999 in sorted-WNID order (the model label itself).
LABEL_ORDERS = ("downsampled", "sorted")

try:  # ISA-L inflates ~1.7× faster than zlib and, like zlib, releases the GIL
    from isal import isal_zlib as _inflate_lib
except ImportError:  # pragma: no cover - isal is a dependency, zlib is the fallback
    import zlib as _inflate_lib

RESOLUTIONS = (64, 32, 16)
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGIC = b"\x80"
INFLATE_BLOCK = 8 << 20
# Deflate cannot expand input by more than 1032:1; a member declaring more is corrupt or crafted.
MAX_DEFLATE_RATIO = 1032
NPY_HEADER_LIMIT = 1 << 16  # numpy itself refuses .npy headers over 10,000 bytes


def natural_key(name: str) -> list:
    """`train_data_batch_2` sorts before `train_data_batch_10`."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def find_shards(sources: list[str | Path]) -> list[tuple[Path | str, str]]:
    """Shard files under the given files/folders (paths or URLs), naturally ordered, with their paths relative
    to the root given. Folders keep the order given, each one's shards in natural order; files named one after
    another are put in natural order too, folder by folder (a shell's `train_data_batch_*.npz` lists _1, _10, _2:
    the global index, and the noise keyed by it, would otherwise depend on how the files were named)."""
    found: list[tuple[Path | str, str]] = []
    named_run = 0  # how many files named one after another end `found`
    for given in sources:
        shards, named = _shards_of(given)
        found += shards
        named_run = named_run + 1 if named else 0
        if named_run > 1:
            found[-named_run:] = sorted(found[-named_run:], key=_named_file_order)
    refuse_repeated_shards(found)
    if not found:
        hint = "".join(source_files.other_format_hint(given, "npz") for given in sources[:1])
        raise SourceError(", ".join(map(str, sources)), "no shards found (expected .npz files or extension-less batches)" + hint)
    kinds = {("val" if "val" in rel.lower() else "train" if "train" in rel.lower() else "other") for _, rel in found}
    if {"train", "val"} <= kinds:
        raise SourceError(", ".join(map(str, sources)), "train and val shards found together; convert them in separate runs")
    return _distinct_names(found)


def _named_file_order(item: tuple[Path | str, str]) -> tuple[str, list]:
    """Files named one by one: by folder (as an absolute path, however typed), then naturally by name, so that a
    shell's `a/* b/*` lists a's shards, then b's, as naming the folders does."""
    path = str(item[0])
    folder = path.rsplit("/", 1)[0] if is_remote(path) else os.path.dirname(os.path.abspath(path))
    return folder, natural_key(os.path.basename(path))


def _distinct_names(found: list[tuple[Path | str, str]]) -> list[tuple[Path | str, str]]:
    """Shards of one name from several folders (s32/train_data_batch_1.npz, s64/train_data_batch_1.npz) are named
    by their paths below the folders' common parent (URLs whole): `source_file` and `sources` would otherwise say
    the same name for two files, and no image could be traced to its file."""
    names = [rel for _, rel in found]
    if len(set(names)) == len(names):
        return found
    local = [str(path) for path, _ in found if not is_remote(path)]
    common = os.path.commonpath([os.path.dirname(os.path.abspath(path)) for path in local]) if local else ""
    return [(path, str(path) if is_remote(path) else printable_path(os.path.relpath(os.path.abspath(path), common))) for path, _ in found]


def _shards_of(given: str | Path) -> tuple[list[tuple[Path | str, str]], bool]:
    """The shards one given path or URL stands for, and whether it named a file."""
    if is_remote(given):
        shards = _find_remote_shards(given)
        return shards, len(shards) == 1 and shards[0][0] == given
    src = Path(given)
    if src.is_file():
        return [(src, printable_path(src.name))], True
    if not src.is_dir():
        raise SourceError(src, "no such file or folder")
    entries = [p for p in src.iterdir() if not p.name.startswith(".")]
    for p in entries:
        # A shard's name on something that is no file (a link to a disk not mounted, a folder, a FIFO) is
        # a shard missing: refused, rather than converting the others without it.
        if p.suffix.lower() == ".npz" and not p.is_file():
            what = "a link to nothing" if p.is_symlink() and not p.exists() else "a folder" if p.is_dir() else "not a regular file"
            raise SourceError(p, f"named like a shard but {what}: its images would be missing from the store; restore it or move it away")
    names = sorted((p for p in entries if p.is_file()), key=lambda p: natural_key(p.name))
    return [(p, printable_path(p.name)) for p in names if p.suffix.lower() == ".npz" or (not p.suffix and _magic(p) in ("zip", "pickle"))], False


def refuse_repeated_shards(found: list[tuple[Path | str, str]]) -> None:
    """A shard reached twice (named twice, or named and inside a folder also given) would be converted twice: its
    images made up a second time under new indices. Refused, naming it."""
    seen: dict[object, Path | str] = {}
    for path, _ in found:
        # Locally the file itself (device and inode): a symlink or a hard link to a shard given is that shard.
        key = str(path) if is_remote(path) else (os.stat(path).st_dev, os.stat(path).st_ino)
        if key in seen:
            if is_remote(path) or os.path.realpath(path) == os.path.realpath(seen[key]):
                raise SourceError(path, "given twice (named twice, or named and inside a folder also given): its images would be converted twice")
            raise SourceError(path, f"is the same file as {printable_path(seen[key])} (a hard link): its images would be converted twice")
        seen[key] = path


def refuse_copied_shards(parts: list) -> None:
    """Two `.npz` files with the same images (the image member's size and CRC-32, from the zip's directory) and
    the same labels are one shard copied: converting both would make up each image twice. Refused, naming both."""
    seen: dict[tuple[int, int, bytes], str] = {}
    for part in parts:
        if not isinstance(part, NpzPart) or part.num_rows == 0:  # empty shards are alike, and hold nothing to repeat
            continue
        key = (part.member.size, part.member.crc, np.ascontiguousarray(part.label_values).tobytes())
        if key in seen:
            raise SourceError(part.path, f"holds the same images and labels as {printable_path(seen[key])} (a copy): its images would be converted twice")
        seen[key] = part.path


def _find_remote_shards(url: str) -> list[tuple[str, str]]:
    """A shard URL, or the shards in a folder URL (one listing), as find_shards finds them locally."""
    try:
        entry = source_files.info(url)
    except OSError as exc:  # a bucket we may not read, a refused connection: one line naming the URL
        raise SourceError(url, f"cannot read ({exc.strerror or exc})") from None
    if entry is None:
        raise SourceError(url, "no such file or folder")
    if entry.get("type") != "directory":
        return [(url, printable_path(source_files.basename(url)))]
    names = sorted(
        ((name, file_url) for name, file_url in source_files.list_files(url) if not name.startswith(".")),
        key=lambda item: natural_key(item[0]),
    )
    return [
        (file_url, printable_path(name))
        for name, file_url in names
        if os.path.splitext(name)[1].lower() == ".npz" or (not os.path.splitext(name)[1] and _magic(file_url) in ("zip", "pickle"))
    ]


def _magic(path: Path | str) -> str:
    if is_remote(path):
        head = source_files.read_range(path, 0, 4)
    else:
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
    labels = np.asarray(labels)
    lo, hi = (1, NUM_CLASSES) if order == "downsampled" else (0, NUM_CLASSES - 1)
    bad = (labels < lo) | (labels > hi)  # in the given dtype: a cast first would wrap 1e30 or 2**64-1 around
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        # The one case where the other order is a likely reading: a 0 in 1-based labels, a 1000 in 0-based ones.
        other = "sorted" if order == "downsampled" else "downsampled"
        hint = f"; if the file's labels are {'0-based sorted-WNID indices' if other == 'sorted' else '1-based map_clsloc labels'}, pass --label-order {other}"
        likely = labels[row].item() == (0 if order == "downsampled" else NUM_CLASSES)
        raise SourceError(path, f"label {labels[row].item()} outside {lo}..{hi} (row {row}; label order {order!r}){hint if likely else ''}")
    labels = labels.astype(np.int64)
    return class_table().from_downsampled(labels) if order == "downsampled" else labels.astype(np.int16)


def check_labels(path: object, what: str, labels: np.ndarray, num_rows: int, order: str) -> np.ndarray:
    """Labels as given → sorted-WNID int16, refusing any shape, type or value that is not one class per row.

    Accepted: 1-D integers, or floats holding exact integers (how some exports store them); refused: any
    other shape (an (N, 2) array would otherwise be read as 2N labels), fractions, NaN, bools, strings."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise SourceError(path, f"{what} has shape {labels.shape}, expected one label per row ({num_rows},)")
    if labels.size != num_rows:
        raise SourceError(path, f"data has {num_rows} rows but {what} has {labels.size}")
    if labels.dtype.kind == "f":
        fractional = ~np.isfinite(labels) | (labels != np.round(labels))
        if fractional.any():
            row = int(np.flatnonzero(fractional)[0])
            raise SourceError(path, f"{what}[{row}] is {labels[row].item()!r}, not a whole class number")
    elif labels.dtype.kind not in "iu":
        raise SourceError(path, f"{what} has dtype {labels.dtype}, expected integers")
    return remap_labels(path, labels, order)


@dataclass(frozen=True)
class _Member:
    name: str
    stored: bool
    data_offset: int  # start of the member's bytes in the zip file
    compressed_size: int
    size: int  # uncompressed size, as the zip's central directory declares it
    crc: int


def _zip_members(path: Path | str) -> tuple[dict[str, _Member], str]:
    """The members of a zip (by name without `.npy`), each checked to lie inside the file without overlapping
    another, and a fingerprint: size, mtime (or ETag) and every member's CRC-32 from the central directory."""
    file_size = source_files.file_size(path)
    try:
        with source_files.open_input(path, SMALL_BLOCK) as f, zipfile.ZipFile(f) as zf:
            members = {}
            spans = []
            for info in zf.infolist():
                f.seek(info.header_offset)
                header = f.read(30)
                if header[:4] != ZIP_MAGIC:
                    raise SourceError(path, f"corrupt zip: bad local header for {info.filename}")
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise SourceError(path, f"member {info.filename} uses unsupported compression {info.compress_type}")
                stored = info.compress_type == zipfile.ZIP_STORED
                member = _Member(
                    info.filename,
                    stored,
                    info.header_offset + 30 + name_len + extra_len,
                    info.compress_size,
                    info.file_size,
                    info.CRC,
                )
                _check_member_sizes(path, member, file_size)
                members[info.filename.removesuffix(".npy")] = member
                spans.append((info.header_offset, member.data_offset + member.compressed_size, info.filename))
    except zipfile.BadZipFile as exc:
        raise SourceError(path, f"truncated or corrupt zip ({exc})") from None
    spans.sort()
    for (_, end, name), (start, _, next_name) in zip(spans, spans[1:]):
        if start < end:
            raise SourceError(path, f"corrupt zip: member {name} overlaps member {next_name}")
    digest = hashlib.sha256(source_files.fingerprint(path).encode())
    for name in sorted(members):
        m = members[name]
        digest.update(f"{m.name}\0{m.size}\0{m.compressed_size}\0{m.crc:08x}\n".encode("utf-8", "surrogateescape"))
    return members, "sha256-size-mtime-member-crcs:" + digest.hexdigest()


def _check_member_sizes(path: Path, member: _Member, file_size: int) -> None:
    """Refuse a member whose declared sizes cannot be true, before any of its bytes are read."""
    if member.data_offset + member.compressed_size > file_size:
        raise SourceError(path, f"member {member.name} runs past the end of the file (truncated or corrupt zip)")
    if member.stored and member.size != member.compressed_size:
        raise SourceError(
            path, f"member {member.name} is stored but declares {member.size} bytes in {member.compressed_size}"
        )
    if not member.stored and member.size > member.compressed_size * MAX_DEFLATE_RATIO + NPY_HEADER_LIMIT:
        raise SourceError(
            path,
            f"member {member.name} declares {member.size} bytes from {member.compressed_size} deflated bytes, "
            "more than deflate can produce (corrupt, or a decompression bomb)",
        )


def _npy_header(path: Path | str, member: _Member) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) of a .npy member, inflating at most its first 64 KiB when deflated;
    the array the header declares must fill the member exactly (its size in the central directory)."""
    raw = source_files.read_range(path, member.data_offset, member.data_offset + min(member.compressed_size, NPY_HEADER_LIMIT))
    if member.stored:
        head = io.BytesIO(raw)
    else:
        try:
            head = io.BytesIO(_inflate_lib.decompressobj(-15).decompress(raw, NPY_HEADER_LIMIT))
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
    header_len = head.tell()
    if dtype.hasobject:  # a pickle follows the header: its size says nothing (the caller refuses or opts in)
        return shape, dtype, header_len
    declared = header_len + math.prod(shape) * dtype.itemsize
    if declared != member.size:
        raise SourceError(
            path,
            f"{member.name}: its .npy header declares shape {shape} of {dtype} ({declared - header_len} bytes), "
            f"but the zip member holds {member.size - header_len} bytes after the header",
        )
    return shape, dtype, header_len


def _read_small_member(path: Path | str, member: _Member) -> np.ndarray:
    """A member whose header has been checked against its declared size (so its size is bounded)."""
    # Remotely, one request covers the member's header and bytes (the block starts at the zip's local header).
    block = member.compressed_size + SMALL_BLOCK
    try:
        with source_files.open_input(path, block) as raw, zipfile.ZipFile(raw) as zf, zf.open(member.name) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise SourceError(path, f"cannot read {member.name} ({exc})") from None


class _RowsOfOneFile:
    """Parts whose rows are one file's rows: source_file is that file, source_row the row."""

    relpath: str
    num_rows: int
    label_values: np.ndarray

    def labels(self) -> np.ndarray:
        return self.label_values

    def row_sources(self) -> tuple[np.ndarray, np.ndarray]:
        return np.full(self.num_rows, self.relpath, dtype=object), np.arange(self.num_rows, dtype=np.int64)


class _RowsUnpickledWhole(_RowsOfOneFile):
    """Parts whose rows exist only once the whole file is unpickled: none readable in place, all materialized."""

    path: str
    resolution: int
    layout: str  # of the rows as unpickled (RowFile.layout)

    def rows_in_memory(self) -> np.ndarray:
        """The file's rows, unpickled, as one uint8 array in `layout`."""
        raise NotImplementedError

    def row_file(self) -> RowFile | None:
        return None

    def materialize(self, dest: str) -> MaterializedPart:
        write_atomically(dest, [np.ascontiguousarray(self.rows_in_memory(), dtype=np.uint8).data])
        return MaterializedPart(RowFile(dest, 0, self.num_rows, self.resolution, self.layout), np.ones(self.num_rows, dtype=bool))


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
        """The stored member's rows in place, with the member's CRC-32 to check them against (its header's part
        read now: a few hundred bytes)."""
        if not self.member.stored:
            return None
        head = source_files.read_range(self.path, self.member.data_offset, self.member.data_offset + self.header_len)
        checksum = MemberChecksum(self.member.name, self.member.crc, zlib.crc32(head), self.header_len)
        return replace(self._row_file(self.path, self.member.data_offset + self.header_len), checksum=checksum)

    def materialize(self, dest: str) -> MaterializedPart:
        """Inflate the member (or copy a stored one, from object storage) in fixed-size blocks into a raw file
        (bounded memory)."""
        write_atomically(dest, self._inflate_rows() if not self.member.stored else self._stored_rows())
        return MaterializedPart(self._row_file(dest, 0), np.ones(self.num_rows, dtype=bool))

    def _stored_rows(self) -> Iterator[bytes]:
        """A stored member's pixel bytes in blocks, fetched sequentially (a download of a shuffled conversion's
        input: see converter.convert)."""
        blocks = source_files.read_blocks(self.path, self.member.data_offset, self.member.size, INFLATE_BLOCK)
        try:
            yield from self._checked_pixels(blocks, "holds")
        finally:
            blocks.close()

    def _inflate_rows(self) -> Iterator[bytes]:
        """The member's pixel bytes in blocks of at most INFLATE_BLOCK; never inflates past the member's declared
        size (a bomb stops there)."""
        blocks = source_files.read_blocks(self.path, self.member.data_offset, self.member.compressed_size, INFLATE_BLOCK)
        try:
            yield from self._checked_pixels(self._inflated(blocks), "inflates to")
        finally:
            blocks.close()  # a remote reader's prefetch thread ends with it

    def _inflated(self, blocks: Iterator[bytes]) -> Iterator[bytes]:
        member, path = self.member, self.path
        inflater = _inflate_lib.decompressobj(-15)
        remaining, produced, pending = member.compressed_size, 0, b""
        while not inflater.eof:
            if not pending and remaining > 0:
                pending = next(blocks, b"")
                if not pending:
                    break
                remaining -= len(pending)
            try:
                # max_length bounds what one call can produce: 8 MiB, not 1032 × 8 MiB of a bomb
                out = inflater.decompress(pending, INFLATE_BLOCK)
            except Exception as exc:
                raise SourceError(path, f"corrupt deflate stream in {member.name} ({exc})") from None
            pending = inflater.unconsumed_tail
            if not out and not pending and remaining == 0:
                break
            produced += len(out)
            if produced > member.size:
                raise SourceError(
                    path,
                    f"{member.name} inflates past its declared size of {member.size} bytes "
                    "(corrupt, or a decompression bomb); stopped there",
                )
            yield out

    def _checked_pixels(self, member_bytes: Iterator[bytes], verb: str) -> Iterator[bytes]:
        """The member's bytes past its .npy header; at the end, its size and CRC-32 checked against the central
        directory's."""
        member, skip, produced, crc = self.member, self.header_len, 0, 0
        for out in member_bytes:
            produced += len(out)
            crc = _inflate_lib.crc32(out, crc)
            if skip:
                cut = min(skip, len(out))
                out, skip = out[cut:], skip - cut
            if out:
                yield out
        if produced != member.size:
            raise SourceError(self.path, f"{member.name} {verb} {produced} bytes, expected {member.size} (truncated?)")
        if crc != member.crc:
            raise SourceError(self.path, f"{member.name} fails its CRC-32 check (corrupt data)")


@dataclass(frozen=True)
class PicklePart(_RowsUnpickledWhole):
    """A legacy extension-less batch (a pickled dict with `data`, `labels`); loaded only on explicit opt-in."""

    path: str
    relpath: str
    num_rows: int
    resolution: int
    label_values: np.ndarray
    layout: str = "chw"

    def rows_in_memory(self) -> np.ndarray:
        return _load_pickle_batch(self.path)[0]


def _load_pickle_batch(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with source_files.open_input(path) as f:
            batch = pickle.load(f)  # noqa: S301 - only reached with --allow-pickle
    except Exception as exc:
        raise SourceError(path, f"cannot unpickle batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise SourceError(path, "pickled batch is not a dict with 'data' and 'labels'")
    return np.asarray(batch["data"]), np.asarray(batch["labels"])


def _check_rows(path: Path, shape: tuple[int, ...], dtype: np.dtype, layout: str) -> tuple[int, int]:
    """(rows, resolution) of an image array's declared shape and dtype, or a SourceError saying what is wrong."""
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
    return shape[0], resolution


def read_npz_labels(path: Path, member: _Member, num_rows: int, order: str) -> np.ndarray:
    """A label member → sorted-WNID int16; its header is checked (1-D, one per row) before a byte is inflated."""
    what = member.name.removesuffix(".npy")
    shape, _, _ = _npy_header(path, member)
    if len(shape) != 1 or shape[0] != num_rows:
        # Checked from the header, so a member declaring 10¹¹ labels is refused without allocating them.
        if len(shape) == 1:
            raise SourceError(path, f"data has {num_rows} rows but {what} has {shape[0]}")
        raise SourceError(path, f"{what} has shape {shape}, expected one label per row ({num_rows},)")
    return check_labels(path, what, _read_small_member(path, member), num_rows, order)


def open_npz_part(path: Path, rel: str, label_order: str | None, allow_pickle: bool = False) -> tuple[NpzPart | ObjectArrayPart, str, str, str]:
    """One `.npz` file → (its part, kind, label order, fingerprint); reads headers and labels, never the pixels
    (but for a pickled object array, read whole, and only with `allow_pickle`)."""
    members, fingerprint = _zip_members(path)
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
    pickled = dtype.hasobject
    if pickled:
        if not allow_pickle:
            raise SourceError(path, f"{image_name} is a pickled object array (dtype {dtype}), which can run code when loaded; pass --allow-pickle if you trust it")
        shape, dtype = _read_object_member(path, image_name).shape, np.dtype(np.uint8)
    n, res = _check_rows(path, shape, dtype, layout)
    if label_name in members:
        labels = read_npz_labels(path, members[label_name], n, order)
    else:
        labels = np.full(n, -1, dtype=np.int16)
    if pickled:
        return ObjectArrayPart(str(path), rel, n, res, layout, image_name, labels), kind, order, fingerprint
    return NpzPart(str(path), rel, n, res, layout, members[image_name], header_len, labels), kind, order, fingerprint


@dataclass(frozen=True)
class ObjectArrayPart(_RowsUnpickledWhole):
    """An `.npz` whose image member is a pickled object array of rows (read only with --allow-pickle)."""

    path: str
    relpath: str
    num_rows: int
    resolution: int
    layout: str
    member_name: str
    label_values: np.ndarray

    def rows_in_memory(self) -> np.ndarray:
        return _read_object_member(self.path, self.member_name)


def _read_object_member(path: Path | str, name: str) -> np.ndarray:
    """A pickled object array of uint8 rows (or images), unpickled (only reached with --allow-pickle) and stacked."""
    try:
        with source_files.open_input(path) as raw, zipfile.ZipFile(raw) as zf, zf.open(f"{name}.npy") as f:
            rows = np.lib.format.read_array(f, allow_pickle=True)  # noqa: S301 - only reached with --allow-pickle
        # One object per row (arrays), or an object array of the image's own shape (Python ints).
        stacked = np.stack([np.asarray(row) for row in rows]) if rows.ndim == 1 else np.asarray(rows.tolist())
    except Exception as exc:  # unpickling may raise anything the pickle's objects raise
        raise SourceError(path, f"cannot read the pickled object array {name} ({type(exc).__name__}: {exc})") from None
    if stacked.dtype.kind in "iu" and stacked.size and 0 <= stacked.min() and stacked.max() <= 255:
        stacked = stacked.astype(np.uint8)
    if stacked.dtype != np.uint8:
        raise SourceError(path, f"the pickled object array {name} holds {stacked.dtype} rows, expected uint8")
    return np.ascontiguousarray(stacked)


def open_npz_source(sources: list[str | Path], label_order: str | None = None, allow_pickle: bool = False) -> ImageSource:
    """Find, check and describe shards; reads only headers and labels (never the pixels)."""
    if label_order is not None:
        try:
            one_of(label_order, LABEL_ORDERS)
        except ValueError as exc:  # any other name would read the labels as sorted: every class wrong, silently
            raise ConvertOptionError("--label-order", repr(label_order), str(exc)) from None
    parts, files, kinds = [], [], set()
    for path, rel in find_shards(sources):
        magic = _magic(path)
        if magic == "pickle":
            if not allow_pickle:
                raise SourceError(path, "is a pickle, which can run code when loaded; pass --allow-pickle if you trust it")
            kind, order = "downsampled-imagenet", label_order or "downsampled"
            data, raw_labels = _load_pickle_batch(path)
            n, res = _check_rows(path, data.shape, data.dtype, "chw")
            part = PicklePart(str(path), rel, n, res, check_labels(path, "labels", raw_labels, n, order))
            fingerprint = source_files.fingerprint(path)
        elif magic == "zip":
            part, kind, order, fingerprint = open_npz_part(path, rel, label_order, allow_pickle)
        else:
            raise SourceError(path, f"not an .npz (zip) file or a pickled batch ({magic} content)")
        kinds.add((kind, order))
        parts.append(part)
        files.append(SourceFile(rel, source_files.file_size(path), fingerprint))
    refuse_copied_shards(parts)
    if len({p.resolution for p in parts}) > 1:
        # Named by the first file of each resolution, as found (relative names alone repeat across folders).
        first: dict[int, str] = {}
        for p in parts:
            first.setdefault(p.resolution, str(p.path))
        counts = {res: sum(q.resolution == res for q in parts) for res in first}
        sizes = "; ".join(f"{res}×{res} ({counts[res]} file{'' if counts[res] == 1 else 's'}, e.g. {path})" for res, path in first.items())
        raise SourceError(", ".join(map(str, sources)), f"mixed resolutions: {sizes}; convert each resolution into its own store")
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
        input_paths=tuple(str(p) for p in sources),
        input_stamps=tuple((str(part.path), source_files.fingerprint(part.path)) for part in parts),
    )
