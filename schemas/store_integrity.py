"""Complete means every byte is there: the data files a store must hold, their recorded checksums, and checks.

Which files: every array's chunk grid (zarr.json's `chunk_grid`) names one file per cell (`chunk_key`): a shard
file for a sharded array. Zarr itself may leave out any all-fill chunk or shard (its default
`write_empty_chunks=False`), so a missing file is damage only where the store records that it was written:
the checksum record below, which imzarr's writers make. A file recorded as written must be there, of exactly the
size its zarr.json implies (`data_file_size_bounds`: imzarr's writers store every inner chunk of a shard); stores
without a record (made before it existed, or by other tools) get the checks that hold for any Zarr writer: a
shard holds at least its index, raw chunks are whole.

Checksums (crc32c, Castagnoli, as the Zarr spec's `crc32c` codec): a writer computes each data file's crc32c as
it writes it and, before recording its unit done, writes them to `_progress/checksums/<unit>.json`
({"<array>/<key>": crc or null for no file}); `record_checksums` gathers them just before the store is marked
complete into the group `_checksums`: one int64 array per data array, named like it, of shape = its chunk grid,
holding each file's crc32c (−1: no file was written). Why there: the per-unit files go with the progress record
(a unit redone after a kill rewrites its own; a unit never recorded is checksummed from its file at the end), so
a resumed store gets the same record as an uninterrupted one; the final record is a Zarr group, so zarr and
xarray see no unknown files, and its values are in chunk files, so consolidated metadata (read by every open)
grows by a few hundred bytes per array, not by one entry per shard.

`missing_or_short` lists damage from a listing (no data read): what `info`, the validators and readers use.
`verify_store` also reads every file and compares its crc32c with the record (`imzarr verify`).
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem

from schemas.errors import RunFailedError
from schemas.zarr_format import (
    METADATA_FILE,
    chunk_grid_shape,
    chunk_key,
    data_file_size_bounds,
    decode_whole_array,
    read_node_metadata,
    whole_array_chunk,
)

try:  # zarr-python's own dependency for its crc32c codec
    import google_crc32c
except ImportError:  # pragma: no cover - zarr-python needs it for sharded arrays
    google_crc32c = None

CHECKSUM_GROUP = "_checksums"
UNIT_RECORDS = "_progress/checksums"
NO_FILE = -1
ALGORITHM = "crc32c"
READ_BLOCK = 8 << 20
INTERNAL_NODES = ("_progress", CHECKSUM_GROUP)


class DamagedStoreError(RunFailedError):
    """A store marked complete lacks a data file, or holds a short or altered one; the message names the file."""


class UnfinishedStoreError(RunFailedError):
    """A store whose run has not finished (interrupted, or still going): its data files cannot be verified yet."""


@dataclass(frozen=True)
class DataFile:
    """One chunk or shard file an array's chunk grid names."""

    array: str
    key: str  # relative to the array's folder
    cell: tuple[int, ...]
    least: int  # bytes, as imzarr's writers store it (every inner chunk)
    most: int | None
    least_any: int  # bytes any Zarr writer stores (inner chunks may be left out)

    @property
    def name(self) -> str:
        return f"{self.array}/{self.key}"


@dataclass(frozen=True)
class Damage:
    """What is wrong with one data file."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def store_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, root.rstrip("/")


def store_arrays(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """{name: zarr.json} of the store's top-level arrays (imzarr stores are flat), from the consolidated metadata
    when the root has it, else from a listing; the progress and checksum records are not data arrays."""
    root = read_node_metadata(url, "", storage_options)
    listed = (root.get("consolidated_metadata") or {}).get("metadata")
    if listed:
        return {name: meta for name, meta in sorted(listed.items()) if "/" not in name and meta.get("node_type") == "array" and name not in INTERNAL_NODES}
    return store_arrays_by_listing(url, storage_options)


def array_files(name: str, metadata: dict[str, Any]) -> list[DataFile]:
    """Every file the array's chunk grid names, with its size bounds."""
    files = []
    for cell in itertools.product(*(range(n) for n in chunk_grid_shape(metadata))):
        least, most = data_file_size_bounds(metadata, cell)
        least_any = data_file_size_bounds(metadata, cell, all_inner_chunks=False)[0]
        files.append(DataFile(name, chunk_key(metadata, cell), cell, least, most, least_any))
    return files


def _listing(fs: fsspec.AbstractFileSystem, base: str) -> dict[str, int]:
    """Relative path → size of every file under the store (one recursive listing)."""
    if isinstance(fs, LocalFileSystem):
        return _local_listing(base)
    found = fs.find(base, detail=True)
    prefix = base + "/"
    return {path[len(prefix):] if path.startswith(prefix) else path: int(info.get("size") or 0) for path, info in found.items()}


def _local_listing(base: str) -> dict[str, int]:
    """`_listing` of a local folder with os.scandir: fsspec's `find` builds an info dict per entry, which took
    ~3 ms of a store's ~12 ms open (bench_reads: cold sequential reads, open included)."""
    sizes: dict[str, int] = {}
    folders = [("", base)]
    while folders:
        prefix, folder = folders.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.is_dir():
                folders.append((f"{prefix}{entry.name}/", entry.path))
            elif entry.is_file():
                sizes[f"{prefix}{entry.name}"] = entry.stat().st_size
    return sizes


def recorded_checksums(url: str, array: str, storage_options: dict[str, Any] | None = None) -> np.ndarray | None:
    """One array's recorded crc32c per chunk-grid cell (−1: no file written); None where the store has no record."""
    return (read_checksum_record(url, storage_options) or {}).get(array)


def read_checksum_record(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, np.ndarray] | None:
    """{array: int64 crc32c per chunk-grid cell, −1 for no file} as recorded at completion; None if not recorded.

    Read from the spec's files directly: the group's zarr.json, a listing, then every array's zarr.json and its one
    raw chunk, each batch at once (fsspec's `cat` of many paths); zarr-python took 8 ms of CPU to open the group
    and its seven arrays, a third of opening a store (bench_reads). An array of another kind is read by zarr."""
    fs, base = store_fs(url, storage_options)
    folder = f"{base}/{CHECKSUM_GROUP}"
    try:
        group = json.loads(fs.cat_file(f"{folder}/{METADATA_FILE}"))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):  # stores made before checksums have none
        return None
    if not isinstance(group, dict) or group.get("node_type") != "group" or (group.get("attributes") or {}).get("algorithm") != ALGORITHM:
        return None
    names = sorted(entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(folder, detail=True) if entry.get("type") == "directory")
    metadata = {}
    for name, raw in zip(names, _cat_each(fs, [f"{folder}/{name}/{METADATA_FILE}" for name in names])):
        if raw is None:
            continue
        try:
            meta = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DamagedStoreError(f"{folder}/{name}/{METADATA_FILE}: the checksum record's metadata is not valid JSON ({exc})") from None
        if isinstance(meta, dict) and meta.get("node_type") == "array":
            metadata[name] = meta
    keys = {name: whole_array_chunk(meta) for name, meta in metadata.items()}
    raw_names = [name for name, key in keys.items() if key is not None]
    chunks = dict(zip(raw_names, _cat_each(fs, [f"{folder}/{name}/{keys[name]}" for name in raw_names])))
    record = {}
    for name, meta in metadata.items():
        values = decode_whole_array(meta, chunks[name]) if name in chunks else None
        if values is None:
            values = np.asarray(zarr.open_array(url, path=f"{CHECKSUM_GROUP}/{name}", mode="r", storage_options=storage_options)[...])
        record[name] = values
    return record


def _cat_each(fs: fsspec.AbstractFileSystem, paths: list[str]) -> list[bytes | None]:
    """Every file's bytes (None where there is none), fetched at once where the filesystem can."""
    if not paths:
        return []
    found = fs.cat(paths, on_error="return")  # {path: bytes or the exception}, paths as the filesystem's own
    result = []
    for path in paths:
        value = found[path]
        if isinstance(value, FileNotFoundError):
            value = None
        elif isinstance(value, BaseException):
            raise value
        result.append(value)
    return result


def missing_or_short(
    url: str, storage_options: dict[str, Any] | None = None, record: dict[str, np.ndarray] | None | bool = False
) -> list[Damage]:
    """Data files that a complete store must hold and lacks, or holds with an impossible size (a listing only).

    Required: every file the checksum record says was written, of its exact size. `record`: the checksum record
    if already read (False: read it here)."""
    if record is False:
        record = read_checksum_record(url, storage_options)
    fs, base = store_fs(url, storage_options)
    sizes = _listing(fs, base)
    damage = []
    for name, metadata in store_arrays(url, storage_options).items():
        recorded = None if record is None else record.get(name)
        for f in array_files(name, metadata):
            size = sizes.get(f.name)
            was_written = recorded is not None and recorded.shape == chunk_grid_shape(metadata) and recorded[f.cell] != NO_FILE
            if size is None:
                if was_written:
                    damage.append(Damage(f"{base}/{f.name}", "missing"))
                continue
            problem = size_problem(size, f, exact=was_written)
            if problem:
                damage.append(Damage(f"{base}/{f.name}", problem))
    return damage


def size_problem(size: int, f: DataFile, exact: bool = True) -> str | None:
    """Why a file of `size` bytes cannot be `f` (None: it can); `exact`: as imzarr writes it, every inner chunk."""
    if exact and f.most is not None and f.most == f.least and size != f.least:
        return f"{'truncated' if size < f.least else 'too long'}: {size} bytes, expected {f.least}"
    least = f.least if exact else f.least_any
    if size < least:
        return f"truncated: {size} bytes, expected at least {least}"
    if f.most is not None and size > f.most:
        return f"too long: {size} bytes, expected at most {f.most}"
    return None


def check_store_files(url: str, storage_options: dict[str, Any] | None = None, record: dict[str, np.ndarray] | None | bool = False) -> None:
    """Raise DamagedStoreError naming the first missing or short data file (and how many there are); `record` as
    missing_or_short takes it."""
    damage = missing_or_short(url, storage_options, record)
    if damage:
        more = f" (and {len(damage) - 1} more damaged files; `imzarr verify {url}` lists them)" if len(damage) > 1 else ""
        raise DamagedStoreError(f"{damage[0]}{more}; the store is marked complete but lacks data")


# --- checksums ---------------------------------------------------------------------------------------------


def crc32c_of(data: bytes | memoryview, crc: int = 0) -> int:
    """crc32c of `data`, continuing `crc` (0 to start)."""
    # The C extension refuses memoryviews (it wants bytes) but takes NumPy arrays: a view, no copy.
    return int(google_crc32c.extend(crc, data if isinstance(data, bytes) else np.frombuffer(data, dtype=np.uint8)))


def file_crc32c(fs: fsspec.AbstractFileSystem, path: str, buffer: bytearray | None = None) -> tuple[int, int] | None:
    """(crc32c, size) of a whole file read in blocks; None when there is no such file."""
    if isinstance(fs, LocalFileSystem):
        return _local_crc32c(path, buffer)
    try:
        with fs.open(path, "rb", block_size=READ_BLOCK, cache_type="none") as fh:
            crc, size = 0, 0
            while block := fh.read(READ_BLOCK):
                crc, size = crc32c_of(block, crc), size + len(block)
            return crc, size
    except FileNotFoundError:
        return None


def _local_crc32c(path: str, buffer: bytearray | None) -> tuple[int, int] | None:
    buffer = buffer if buffer is not None else bytearray(READ_BLOCK)
    view = memoryview(buffer)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        crc, size = 0, 0
        while got := os.readv(fd, [buffer]):
            crc, size = crc32c_of(view[:got], crc), size + got
        return crc, size
    finally:
        os.close(fd)


def record_unit_checksums(url: str, unit: int, checksums: dict[str, int | None]) -> None:
    """Record the crc32c of each data file one unit of work wrote ({"<array>/<key>": crc, None: no file}); call it
    after the files are written and before the unit is recorded done."""
    from schemas.output_paths import write_output_file

    fs, base = store_fs(url)
    body = json.dumps(dict(sorted(checksums.items())), separators=(",", ":")).encode()
    path = f"{base}/{UNIT_RECORDS}/{int(unit)}.json"
    if isinstance(fs, LocalFileSystem):
        write_output_file(path, body)
    else:
        fs.pipe_file(path, body)


def files_checksums(url: str, names: Iterable[str]) -> dict[str, int | None]:
    """{"<array>/<key>": crc32c or None} of files just written by zarr-python (read back once)."""
    fs, base = store_fs(url)
    buffer = bytearray(READ_BLOCK) if isinstance(fs, LocalFileSystem) else None
    result = {}
    for name in names:
        got = file_crc32c(fs, f"{base}/{name}", buffer)
        result[name] = None if got is None else got[0]
    return result


def chunk_file_name(array: str, metadata: dict[str, Any], first_coord: int) -> str:
    """"<array>/<key>" of the chunk (or shard) at `first_coord` along the first axis, 0 along the others."""
    return f"{array}/{chunk_key(metadata, (first_coord, *([0] * (len(metadata['shape']) - 1))))}"


def shard_file_names(url: str, arrays: Iterable[str], unit: int) -> list[str]:
    """"<array>/<key>" of chunk `unit` along the sample axis of each array (the files one shard's task writes)."""
    return [chunk_file_name(name, read_node_metadata(url, name), unit) for name in arrays]


def _unit_records(fs: fsspec.AbstractFileSystem, base: str) -> dict[str, int | None]:
    folder = f"{base}/{UNIT_RECORDS}"
    try:
        paths = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        return {}
    merged: dict[str, int | None] = {}
    for path, blob in sorted(fs.cat(paths, on_error="omit").items()):
        try:
            merged.update(json.loads(blob))
        except ValueError:
            continue  # cannot happen through the atomic write; such files are recomputed from the data
    return merged


def record_checksums(url: str) -> None:
    """Write the store's checksum record (`_checksums`) from the units' records; files no unit recorded (written
    at creation, or by a unit before checksums existed) are read once here. Call just before marking complete."""
    fs, base = store_fs(url)
    units = _unit_records(fs, base)
    buffer = bytearray(READ_BLOCK) if isinstance(fs, LocalFileSystem) else None
    arrays = store_arrays_by_listing(url)
    group = zarr.open_group(url, mode="r+", use_consolidated=False)
    record = group.require_group(CHECKSUM_GROUP)
    record.attrs.put(
        {
            "algorithm": ALGORITHM,
            "description": "crc32c (Castagnoli) of every data file of each array, by chunk-grid cell; -1: no file written",
        }
    )
    for name, metadata in arrays.items():
        grid = chunk_grid_shape(metadata)
        values = np.full(grid, NO_FILE, dtype=np.int64)
        for f in array_files(name, metadata):
            if f.name in units:
                crc = units[f.name]
            else:
                got = file_crc32c(fs, f"{base}/{f.name}", buffer)
                crc = None if got is None else got[0]
            values[f.cell] = NO_FILE if crc is None else crc
        dims = tuple(metadata.get("dimension_names") or (f"dim_{i}" for i in range(len(grid))))
        array = record.create_array(
            name,
            shape=grid,
            chunks=tuple(max(1, g) for g in grid),  # an empty array (a report without classes) has an empty grid
            dtype="int64",
            fill_value=NO_FILE,
            compressors=None,
            dimension_names=tuple(f"{name}.{d}.chunk" for d in dims),
            overwrite=True,
        )
        array[...] = values


def store_arrays_by_listing(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Like `store_arrays`, ignoring any consolidated metadata (a store being written has none that is current)."""
    fs, base = store_fs(url, storage_options)
    arrays = {}
    for entry in sorted(fs.ls(base, detail=False)):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name in INTERNAL_NODES or name == METADATA_FILE:
            continue
        try:
            meta = json.loads(fs.cat_file(f"{base}/{name}/{METADATA_FILE}"))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError):
            continue
        if meta.get("node_type") == "array":
            arrays[name] = meta
    return arrays


# --- verify ------------------------------------------------------------------------------------------------


@dataclass
class VerifyResult:
    """What `verify_store` found: damaged files, how many files and bytes it read, and whether a record existed."""

    damage: list[Damage]
    files: int
    bytes_read: int
    recorded: bool


def verify_store(url: str, storage_options: dict[str, Any] | None = None, progress: Any = None, threads: int | None = None) -> VerifyResult:
    """Check every data file: present, of a possible size, and (where recorded) of the recorded crc32c.

    `progress` gets `update(bytes)` as files are read. Local files are read in order by a second thread while
    this one checksums (`local_files_crc32c`); object stores (or any, given `threads`) `threads` files at once
    (default 8: one request each). An unfinished store (`complete: false`: a run interrupted or still going) is
    refused with UnfinishedStoreError: it has no record yet, and its missing files are expected."""
    if (read_node_metadata(url, "", storage_options).get("attributes") or {}).get("complete") is False:
        raise UnfinishedStoreError(f"{url}: unfinished (its run was interrupted, or is still going): re-run the command that made it to finish it, then verify")
    record = read_checksum_record(url, storage_options)
    damage = missing_or_short(url, storage_options, record)
    damaged = {d.path for d in damage}
    fs, base = store_fs(url, storage_options)
    todo = []
    for name, metadata in store_arrays(url, storage_options).items():
        recorded = None if record is None else record.get(name)
        usable = recorded is not None and recorded.shape == chunk_grid_shape(metadata)
        for f in array_files(name, metadata):
            path = f"{base}/{f.name}"
            if path in damaged or not usable or recorded[f.cell] == NO_FILE:
                continue
            todo.append((path, int(recorded[f.cell])))
    paths = [path for path, _ in todo]
    if isinstance(fs, LocalFileSystem) and not threads:
        results: Iterator = local_files_crc32c(paths)
        pool = None
    else:
        pool = ThreadPoolExecutor(threads or 8)
        results = pool.map(lambda path: (path, _crc_or_error(fs, path)), paths)
    total = 0
    try:
        for (path, got), (_, want) in zip(results, todo):
            if got is None:
                damage.append(Damage(path, "missing"))
                continue
            if isinstance(got, OSError):
                damage.append(Damage(path, f"unreadable: {got.strerror or got}"))
                continue
            crc, size = got
            total += size
            if progress is not None:
                progress.update(size)
            if crc != want:
                damage.append(Damage(path, f"checksum mismatch: crc32c {crc:08x}, recorded {want:08x}"))
    finally:
        if pool is not None:
            pool.shutdown()
        else:
            results.close()
    return VerifyResult(damage, len(todo), total, record is not None)


def _crc_or_error(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, int] | OSError | None:
    try:
        return file_crc32c(fs, path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return exc


LOCAL_BLOCK = 1 << 20  # small enough to stay in the CPU cache between the read that fills it and the crc
PIPELINE_BUFFERS = 4


def local_files_crc32c(paths: list[str]) -> Iterator[tuple[str, tuple[int, int] | OSError | None]]:
    """(path, (crc32c, size)) of local files in order (None: no such file; an OSError: unreadable), reading in a
    second thread while this one computes the crc32c, so reading and checksumming overlap (a bare read's speed
    rather than the sum of both times; `make bench`, verify)."""
    free: queue.Queue = queue.Queue()
    full: queue.Queue = queue.Queue()
    for _ in range(PIPELINE_BUFFERS):
        free.put(bytearray(LOCAL_BLOCK))
    stop = threading.Event()

    def read_all() -> None:
        for i, path in enumerate(paths):
            if stop.is_set():
                break
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                full.put((i, None, 0))
                continue
            except OSError as exc:
                full.put((i, exc, 0))
                continue
            try:
                while True:
                    buffer = free.get()
                    got = os.readv(fd, [buffer])
                    full.put((i, buffer, got))  # got == 0: end of this file
                    if not got or stop.is_set():
                        break
            except OSError as exc:
                full.put((i, exc, 0))
            finally:
                os.close(fd)
        full.put(None)

    reader = threading.Thread(target=read_all, name="verify-reader", daemon=True)
    reader.start()
    crc, size = 0, 0
    try:
        while (item := full.get()) is not None:
            i, buffer, got = item
            if buffer is None or isinstance(buffer, OSError):  # no such file, or it failed to read
                yield paths[i], buffer
                crc, size = 0, 0
                continue
            if got:
                crc, size = crc32c_of(np.frombuffer(buffer, dtype=np.uint8, count=got), crc), size + got
                free.put(buffer)
                continue
            free.put(buffer)
            yield paths[i], (crc, size)
            crc, size = 0, 0
    finally:
        stop.set()
        while reader.is_alive():  # let a reader waiting for a buffer finish its file and end
            free.put(bytearray(LOCAL_BLOCK))
            reader.join(0.05)


def planned_bytes(url: str, storage_options: dict[str, Any] | None = None) -> int:
    """Bytes `verify_store` will read: the sizes of the data files present (a listing)."""
    fs, base = store_fs(url, storage_options)
    sizes = _listing(fs, base)
    names = {f.name for name, meta in store_arrays(url, storage_options).items() for f in array_files(name, meta)}
    return sum(size for rel, size in sizes.items() if rel in names)
