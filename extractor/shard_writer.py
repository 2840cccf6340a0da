"""Writes whole shard files of uncompressed sharded arrays directly, per the Zarr v3 sharding spec.

For an array whose `zarr.json` describes a regular grid sharded along the sample axis alone, inner chunks with
only the `bytes` codec (little-endian) and a `bytes`+`crc32c` index (`schemas.zarr_format.uncompressed_shard_layout`),
shard k of S samples holding m = min(S, n − k·S) of them is the file

    data   inner chunks 0 … c−1 in order, c = ⌈m / I⌉, each I samples of raw C-order bytes (the last padded with
           the fill value), i.e. the shard's samples as one contiguous block
    index  per inner chunk i < S/I: (offset, nbytes) as little-endian uint64, (2⁶⁴−1, 2⁶⁴−1) for i ≥ c;
           then crc32c of those bytes (uint32 little-endian); at the end of the file, or at the start
           (offsets then count from the start of the file, index included)

Bytes arrive in pieces (`write`), possibly from a writer thread while the next batch computes, into a temporary
file next to the shard; `commit` adds padding and index and renames it into place, so a killed process never
leaves a half shard under the shard's key. Local filesystem paths only: other stores go through zarr-python.
Each file's crc32c is computed from the bytes as they are written (`ShardFileWriter.crc32c`, `write_chunk_file`'s
return value), for the store's checksum record (schemas/store_integrity.py); bytes that do not arrive in file
order (an index at the start of the file) are read back once at commit instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from numcodecs import VLenUTF8, Zstd

from schemas.errors import ImzarrError
from schemas.vocabulary import LOCAL_FILE_PROTOCOLS
from schemas.store_integrity import crc32c_of, file_crc32c
from schemas.zarr_format import (
    CRC32C_BYTES,
    EMPTY_CHUNK,
    UncompressedShardLayout,
    chunk_key,
    is_string_data_type,
    read_node_metadata,
    uncompressed_shard_layout,
)

try:  # zarr-python's own dependency for its crc32c codec
    import google_crc32c
except ImportError:  # pragma: no cover - then every write goes through zarr-python
    google_crc32c = None

PARTIAL_MARK = ".partial-"


class ShardWriteError(ImzarrError):
    """A direct shard write was given data that does not fit its shard."""


def local_directory(url: str) -> Path | None:
    """The local directory of a store URL or path, or None for any other filesystem."""
    fs, path = fsspec.core.url_to_fs(url)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return Path(path) if protocol in LOCAL_FILE_PROTOCOLS else None


def direct_layout(url: str, array: str) -> UncompressedShardLayout | None:
    """The array's layout when its shards can be written here directly (local store, raw inner chunks), else None."""
    if google_crc32c is None or local_directory(url) is None:
        return None
    layout = uncompressed_shard_layout(read_node_metadata(url, array))
    if layout is None or not _plain_fill(layout):
        return None
    return layout


def _plain_fill(layout: UncompressedShardLayout) -> bool:
    # Numeric fill values only; spec spellings such as "NaN" or hex bit patterns go through zarr-python.
    return isinstance(layout.fill_value, (int, float)) and not isinstance(layout.fill_value, bool)


def shard_index_bytes(layout: UncompressedShardLayout, written_chunks: int, data_offset: int) -> bytes:
    """The shard index: (offset, nbytes) uint64 LE per inner chunk (empty past `written_chunks`), then its crc32c."""
    chunk_bytes = layout.samples_per_inner * layout.item_bytes
    entries = np.full((layout.inner_per_shard, 2), EMPTY_CHUNK, dtype="<u8")
    entries[:written_chunks, 0] = data_offset + np.arange(written_chunks, dtype=np.uint64) * np.uint64(chunk_bytes)
    entries[:written_chunks, 1] = chunk_bytes
    raw = entries.tobytes()
    return raw + int(google_crc32c.value(raw)).to_bytes(CRC32C_BYTES, "little")


def remove_stale_partials(path: Path) -> None:
    """Delete what a killed writer left of this file: never read (no key points at it), removed before rewriting."""
    for stale in path.parent.glob(f"{path.name}{PARTIAL_MARK}*"):
        stale.unlink(missing_ok=True)


class ShardFileWriter:
    """One shard file of one array, filled piecewise into a temporary file and renamed into place on commit."""

    def __init__(self, array_dir: Path, layout: UncompressedShardLayout, shard: int, dtype: np.dtype):
        self.layout = layout
        self.shard = shard
        self.dtype = np.dtype(dtype)
        first = shard * layout.samples_per_shard
        if not 0 <= first < layout.shape[0]:
            raise ShardWriteError(f"{array_dir}: shard {shard} is outside the array's {layout.shape[0]} samples")
        self.count = min(layout.samples_per_shard, layout.shape[0] - first)
        self.path = array_dir / layout.shard_key(shard)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.path)
        self.temp = self.path.with_name(f"{self.path.name}{PARTIAL_MARK}{uuid.uuid4().hex}")
        self.data_offset = 0 if layout.index_at_end else layout.index_bytes
        self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        # crc32c of the file so far while bytes arrive in file order (they do, batch after batch, index last);
        # None once they do not: then commit reads the file back.
        self._crc: int | None = 0 if layout.index_at_end else None
        self._end = self.data_offset
        self.crc32c: int | None = None  # the committed file's, set by commit

    def _extend_crc(self, offset: int, data: memoryview | bytes) -> None:
        if self._crc is not None and offset == self._end:
            self._crc = crc32c_of(data, self._crc)
            self._end += len(data)
        else:
            self._crc = None

    def write(self, first: int, values: np.ndarray) -> None:
        """Samples [first, first + len(values)) of this shard (positions within the shard)."""
        if values.dtype != self.dtype or values.shape[1:] != self.layout.shape[1:] or not 0 <= first <= first + len(values) <= self.count:
            raise ShardWriteError(
                f"{self.path}: got {values.dtype} {values.shape} at {first}, shard holds {self.count} × {self.layout.shape[1:]} {self.dtype}"
            )
        view = memoryview(np.ascontiguousarray(values)).cast("B")
        offset = self.data_offset + first * self.layout.item_bytes
        self._extend_crc(offset, view)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def commit(self) -> None:
        """Pad the last inner chunk, write the index, and rename the file to the shard's key."""
        inner = self.layout.samples_per_inner
        chunks = -(-self.count // inner)
        padding = chunks * inner - self.count
        if padding:
            fill = np.full((padding, *self.layout.shape[1:]), self.layout.fill_value, dtype=self.dtype).tobytes()
            os.pwrite(self.fd, fill, self.data_offset + self.count * self.layout.item_bytes)
            self._extend_crc(self.data_offset + self.count * self.layout.item_bytes, fill)
        index = shard_index_bytes(self.layout, chunks, self.data_offset)
        data_end = self.data_offset + chunks * inner * self.layout.item_bytes
        os.pwrite(self.fd, index, data_end if self.layout.index_at_end else 0)
        self._extend_crc(data_end if self.layout.index_at_end else 0, index)
        size = data_end + (len(index) if self.layout.index_at_end else 0)
        os.ftruncate(self.fd, size)
        os.close(self.fd)
        self.fd = -1
        if self._crc is None or self._end != size:
            self._crc = file_crc32c(LocalFileSystem(), str(self.temp))[0]
        self.crc32c = self._crc
        os.replace(self.temp, self.path)

    def abort(self) -> None:
        """Drop the temporary file: nothing of this shard becomes visible."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.temp.unlink(missing_ok=True)


def write_whole_shard(url: str, array: str, shard: int, values: np.ndarray, layout: UncompressedShardLayout | None = None) -> None:
    """Write one complete shard of an array directly (the layout must allow it: `direct_layout`)."""
    layout = layout or direct_layout(url, array)
    if layout is None:
        raise ShardWriteError(f"{url}/{array}: layout does not allow direct shard writes")
    writer = ShardFileWriter(local_directory(url) / array, layout, shard, values.dtype)
    try:
        writer.write(0, values)
        writer.commit()
    except BaseException:
        writer.abort()
        raise




_NUMERIC_TYPES = {"int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64"}


def chunk_encoder(metadata: dict) -> Callable[[np.ndarray], bytes] | None:
    """Whole-chunk encoder of an unsharded array's codec chain, for the chains written here; else None.

    `bytes` (little-endian) alone: the values' raw bytes. `vlen-utf8` then `zstd`: per the vlen-utf8 codec, a
    uint32 LE item count, then each item's uint32 LE byte length and UTF-8 bytes; then a zstd frame at the
    configured level and checksum flag (numcodecs' codecs, the ones zarr-python applies for these names).
    """
    codecs = metadata.get("codecs") or []
    names = [c.get("name") for c in codecs]
    data_type = metadata.get("data_type")
    if metadata.get("storage_transformers") or (metadata.get("chunk_grid") or {}).get("name") != "regular":
        return None
    if names == ["bytes"] and data_type in _NUMERIC_TYPES and (codecs[0].get("configuration") or {}).get("endian", "little") == "little":
        dtype = np.dtype(data_type).newbyteorder("<")
        return lambda chunk: np.ascontiguousarray(chunk, dtype=dtype).tobytes()
    if names == ["vlen-utf8", "zstd"] and is_string_data_type(data_type):
        config = codecs[1].get("configuration") or {}
        zstd = Zstd(level=int(config.get("level", 0)), checksum=bool(config.get("checksum", False)))
        utf8 = VLenUTF8()
        return lambda chunk: bytes(zstd.encode(utf8.encode(np.ascontiguousarray(chunk, dtype=object))))
    return None


def write_chunk_file(path: Path, payload: bytes) -> int:
    """A chunk (or shard) file written whole under a temporary name, then renamed into place; its crc32c."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    temp = path.with_name(f"{path.name}{PARTIAL_MARK}{uuid.uuid4().hex}")
    try:
        temp.write_bytes(payload)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return crc32c_of(payload)


def write_sample_chunk(url: str, array: str, start: int, values: np.ndarray) -> int | None:
    """Write values as the one whole chunk of a 1-D sample array that starts at `start`, directly, when its
    layout allows (local store, chunk boundary, an encoder above), and return the file's crc32c; None (nothing
    written) otherwise."""
    root = local_directory(url)
    if root is None:
        return None
    metadata = read_node_metadata(url, array)
    encode = chunk_encoder(metadata)
    shape = metadata.get("shape") or []
    chunk_shape = (metadata.get("chunk_grid") or {}).get("configuration", {}).get("chunk_shape") or []
    if encode is None or len(shape) != 1 or len(chunk_shape) != 1:
        return None
    size = int(chunk_shape[0])
    if start % size or len(values) > size or start + len(values) != min(start + size, int(shape[0])):
        return None
    fill = "" if is_string_data_type(metadata.get("data_type")) else metadata.get("fill_value")
    if not isinstance(fill, (int, float, str)):
        return None
    full = np.full(size, fill, dtype=object if isinstance(fill, str) else np.dtype(metadata["data_type"]))
    full[: len(values)] = values  # edge chunks are stored whole, padded with the fill value
    return write_chunk_file(root / array / chunk_key(metadata, (start // size,)), encode(full))
