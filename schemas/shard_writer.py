"""Writes one output shard of every array of a store per task, for image and activation stores alike; shard
files of uncompressed sharded arrays are written directly, per the Zarr v3 sharding spec.

For an array whose `zarr.json` describes a regular grid sharded along the sample axis alone, inner chunks with
only the `bytes` codec (little-endian) and a `bytes`+`crc32c` index (`schemas.zarr_format.uncompressed_shard_layout`),
shard k of S samples holding m = min(S, n − k·S) of them is the file

    data   inner chunks 0 … c−1 in order, c = ⌈m / I⌉, each I samples of raw C-order bytes (the last padded with
           the fill value), i.e. the shard's samples as one contiguous block
    index  per inner chunk i < S/I: (offset, nbytes) as little-endian uint64, (2⁶⁴−1, 2⁶⁴−1) for i ≥ c;
           then crc32c of those bytes (uint32 little-endian); at the end of the file, or at the start
           (offsets then count from the start of the file, index included)

Bytes arrive in pieces (`write`), possibly from a writer thread while the next batch computes, into a temporary
file next to the shard (schemas/atomic_files.py); `commit` adds padding and index and renames it into place, so a
killed process never leaves a half shard under the shard's key. Local filesystem paths only: other stores, and
arrays of other layouts, go through zarr-python once the shard is complete (`ShardOutput`).
Each file's crc32c is computed from the bytes as they are written (`ShardFileWriter.crc32c`, `write_chunk_file`'s
return value), for the store's checksum record (schemas/store_integrity.py); bytes that do not arrive in file
order (an index at the start of the file) are read back once at commit instead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from numcodecs import VLenUTF8, Zstd

from schemas.atomic_files import AtomicFile, remove_stale_temporaries, write_atomically
from schemas.errors import ImzarrError
from schemas.output_paths import local_path
from schemas.store_identity import check_output_generation
from schemas.store_integrity import crc32c_of, file_crc32c, files_checksums, shard_file_names
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


class ShardWriteError(ImzarrError):
    """A direct shard write was given data that does not fit its shard (a bug in the writer, not in the data)."""


class ChunkOwnershipError(ImzarrError):
    """A shard task asked to write part of a chunk it does not own (a bug in the writer, not in the data)."""


def local_directory(url: str) -> Path | None:
    """The local directory of a store URL or path, or None for any other filesystem."""
    path = local_path(url)
    return None if path is None else Path(path)


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
        remove_stale_temporaries(self.path)  # one task owns a shard: what else is there, a killed writer left
        self.file = AtomicFile(self.path)
        self.data_offset = 0 if layout.index_at_end else layout.index_bytes
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
        self.file.write_at(offset, view)

    def commit(self) -> None:
        """Pad the last inner chunk, write the index, and rename the file to the shard's key."""
        inner = self.layout.samples_per_inner
        chunks = -(-self.count // inner)
        padding = chunks * inner - self.count
        if padding:
            fill = np.full((padding, *self.layout.shape[1:]), self.layout.fill_value, dtype=self.dtype).tobytes()
            self.file.write_at(self.data_offset + self.count * self.layout.item_bytes, fill)
            self._extend_crc(self.data_offset + self.count * self.layout.item_bytes, fill)
        index = shard_index_bytes(self.layout, chunks, self.data_offset)
        data_end = self.data_offset + chunks * inner * self.layout.item_bytes
        self.file.write_at(data_end if self.layout.index_at_end else 0, index)
        self._extend_crc(data_end if self.layout.index_at_end else 0, index)
        size = data_end + (len(index) if self.layout.index_at_end else 0)
        self.file.truncate(size)
        self.file.close()
        if self._crc is None or self._end != size:
            self._crc = file_crc32c(LocalFileSystem(), self.file.temp)[0]
        self.crc32c = self._crc
        self.file.commit()

    def abort(self) -> None:
        """Drop the temporary file: nothing of this shard becomes visible."""
        self.file.abort()


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
    remove_stale_temporaries(path)  # one task owns a chunk: what else is there, a killed writer left
    write_atomically(path, [payload])
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


class ShardOutput:
    """One task's output shard of several arrays of one store, fed batch by batch, committed whole.

    `buffers[name]` are the shard's host arrays; `ready(first, stop, wait)` queues rows [first, stop) for the
    writer threads (one per directly written array, so the arrays' bytes go to the page cache on several cores at
    once), which call `wait()` (e.g. a device copy's event) before reading them. `commit` writes what is left and
    the coordinates, and returns only when every byte is written: then (and only then) the caller records
    `checksums` (crc32c of every file written, schemas.store_integrity) and marks the shard done. `abort` leaves
    nothing of the shard behind.
    """

    def __init__(self, url: str, shard: int, start: int, buffers: dict[str, np.ndarray], generation: str | None = None):
        self.url, self.shard, self.start, self.buffers = url, shard, start, buffers
        self.generation = generation  # the store's, as its run prepared it: commit writes nothing into another
        root = local_directory(url)
        layouts = {name: direct_layout(url, name) for name in buffers}
        self.files = {
            name: ShardFileWriter(root / name, layout, shard, buffers[name].dtype)
            for name, layout in layouts.items()
            if layout is not None and layout.samples_per_shard * shard == start and buffers[name].shape[1:] == layout.shape[1:]
        }
        self.error: BaseException | None = None
        self.checksums: dict[str, int | None] = {}  # "<array>/<key>" → crc32c of each file committed
        self.queues: dict[str, queue.Queue] = {name: queue.Queue() for name in self.files}
        self.threads = [
            threading.Thread(target=self._drain, args=(name,), name=f"shard-writer-{shard}-{name}", daemon=True) for name in self.files
        ]
        for thread in self.threads:
            thread.start()

    def ready(self, first: int, stop: int, wait: Callable[[], None] | None = None) -> None:
        """Rows [first, stop) of every buffer are final once `wait()` returns: write them in the background."""
        for pending in self.queues.values():
            pending.put((first, stop, wait))

    def _drain(self, name: str) -> None:
        pending, file, buffer = self.queues[name], self.files[name], self.buffers[name]
        while (item := pending.get()) is not None:
            if self.error is not None:
                continue
            first, stop, wait = item
            try:
                if wait is not None:
                    wait()
                file.write(first, buffer[first:stop])
            except BaseException as exc:  # noqa: BLE001 - re-raised on the task's thread by commit
                self.error = exc

    def _join(self) -> None:
        for pending in self.queues.values():
            pending.put(None)
        for thread in self.threads:
            thread.join()

    def commit(self, coords: dict[str, np.ndarray]) -> None:
        """Write the coordinates this task owns (one chunk per shard each), finish every array's shard (renamed
        into place); raise what the writer hit."""
        try:
            check_output_generation(self.url, self.generation)
            # Coordinates first, while the writer thread may still be writing data: one chunk per shard, written
            # directly where the layout allows (zarr-python took ~10-20 ms per shard for them, a third of a
            # 100 MB shard's raw write time). Nothing counts as written before the caller marks the shard done.
            direct = {name: write_sample_chunk(self.url, name, self.start, np.asarray(values)) for name, values in coords.items()}
            slow = {name: values for name, values in coords.items() if direct[name] is None}
            check_whole_chunks(self.url, self.start, slow)
            direct_names = [name for name in coords if direct[name] is not None]
            self.checksums.update(zip(shard_file_names(self.url, direct_names, self.shard), (direct[name] for name in direct_names)))
        except BaseException:
            self.abort()
            raise
        self._join()
        if self.error is not None:
            self.abort()
            raise self.error
        try:
            for name, file in self.files.items():
                file.commit()
                self.checksums[f"{name}/{file.layout.shard_key(self.shard)}"] = file.crc32c
            rest = {name: values for name, values in self.buffers.items() if name not in self.files}
            write_with_zarr(self.url, self.start, rest, slow)
            # What zarr-python wrote is read back once (object stores, other layouts): its encoder is not ours.
            self.checksums.update(files_checksums(self.url, shard_file_names(self.url, [*rest, *slow], self.shard)))
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop every temporary shard file (committed shards stay: their data is complete)."""
        if any(thread.is_alive() for thread in self.threads):
            self._join()
        for file in self.files.values():
            file.abort()


def check_whole_chunks(url: str, start: int, coords: Mapping[str, np.ndarray]) -> None:
    """Refuse a coordinate write that covers part of a chunk: the rest of it belongs to another task (or was
    written whole at creation), and two writers of one chunk silently lose data."""
    if not coords:
        return
    group = zarr.open_group(url, mode="r", use_consolidated=False)
    for name, values in coords.items():
        array = group[name]
        size, total, stop = int(array.chunks[0]), int(array.shape[0]), start + len(values)
        if start % size or (stop % size and stop != total):
            raise ChunkOwnershipError(
                f"{url}: {name} is stored in chunks of {size} samples; samples [{start}, {stop}) cover part of one "
                "(numeric coordinates written at creation are not written again by shard tasks)"
            )


def write_with_zarr(url: str, start: int, variables: dict[str, np.ndarray], coords: dict[str, np.ndarray]) -> None:
    """Samples [start, start+n) of variables and coordinates through zarr-python (one output shard)."""
    if not variables and not coords:
        return
    group = zarr.open_group(url, mode="r+", use_consolidated=False)
    for name, values in variables.items():
        # As for images: skipping zarr's scan for all-zero chunks changes no value read and speeds the write.
        group[name].with_config({"write_empty_chunks": True})[start : start + values.shape[0]] = values
    for name, values in coords.items():
        group[name][start : start + values.shape[0]] = values
