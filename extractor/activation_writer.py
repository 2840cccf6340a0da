"""Creates the activation-store arrays and writes one output shard of every variable per task.

Layout (schemas/activation_store.py): one inner chunk size for every array of a store, from its largest
variable; numeric coordinates one chunk each, written here at creation when the writer knows them (extract and
generate do: the selection); text arrays one chunk per shard. Shard files of raw-byte sharded arrays on local
disk are written directly (`extractor.shard_writer`), batch by batch from a writer thread while the next batch
computes; anything else (object stores, other layouts) goes through zarr-python once the shard is complete.
Per-shard coordinate chunks are written directly where the layout allows, else through zarr-python.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import zarr

from extractor.shard_writer import ShardFileWriter, direct_layout, local_directory, write_sample_chunk
from schemas.activation_store import COORDINATES, RECONSTRUCTION_DIMS, RECONSTRUCTION_VAR, activation_inner_chunk, layer_dims
from schemas.errors import ImzarrError
from schemas.image_layout import create_coordinate_arrays
from schemas.store_integrity import files_checksums, shard_file_names
from schemas.variable_attrs import coordinates_attribute

class ChunkOwnershipError(ImzarrError):
    """A shard task asked to write part of a chunk it does not own (a bug in the writer, not in the data)."""


TARGET_SHARD_BYTES = 64 << 20  # per variable: few files, and a task's working set stays ~100 MB
# Numeric per-sample arrays (xarray coordinates): one chunk each when their values are known at creation.
NUMERIC_COORDINATES = tuple(name for name, kind in COORDINATES.items() if kind != "U")
TEXT_COORDINATES = tuple(name for name, kind in COORDINATES.items() if kind == "U")  # always one chunk per shard


def default_shard_size(layer_shapes: dict[str, tuple[int, ...]], storage_dtype: str) -> int:
    """Largest power of two of samples whose biggest variable fits TARGET_SHARD_BYTES, within 64..4096."""
    fit = max(1, TARGET_SHARD_BYTES // largest_sample_bytes(layer_shapes, storage_dtype, None))
    return int(min(4096, max(64, 1 << (fit.bit_length() - 1))))


def largest_sample_bytes(layer_shapes: dict[str, tuple[int, ...]], storage_dtype: str, reconstruction_shape: tuple[int, ...] | None) -> int:
    """Bytes of one sample of the store's largest variable (layers in the storage dtype, reconstructions uint8)."""
    sizes = [int(np.prod(shape)) * np.dtype(storage_dtype).itemsize for shape in layer_shapes.values()]
    if reconstruction_shape is not None:
        sizes.append(int(np.prod(reconstruction_shape)))
    return max(sizes, default=1)


def create_activation_arrays(
    group: zarr.Group,
    num_samples: int,
    layer_shapes: dict[str, tuple[int, ...]],
    storage_dtype: str,
    shard: int,
    reconstruction_shape: tuple[int, ...] | None,
    variable_attributes: Mapping[str, dict[str, Any]] | None = None,
    coordinates: Mapping[str, np.ndarray] | None = None,
) -> None:
    """One array per layer (per-sample shape given), optional reconstructions, and the coordinate arrays.

    `variable_attributes` gives attributes per array name (layers, reconstruction, coordinates); they win over
    the default `coordinates` attribute. `coordinates` gives the values of the numeric coordinates (store
    order): those arrays are then one chunk each, written here, and shard tasks write only the text arrays;
    without it every coordinate has one chunk per shard and shard tasks write them all.
    """
    inner = activation_inner_chunk(largest_sample_bytes(layer_shapes, storage_dtype, reconstruction_shape), shard)
    coord_names = coordinates_attribute(list(COORDINATES))
    extra = variable_attributes or {}
    for var, shape in layer_shapes.items():
        group.create_array(
            var,
            shape=(num_samples, *shape),
            dtype=storage_dtype,
            chunks=(inner, *shape),
            shards=(shard, *shape),
            compressors=None,  # measured: float16 maps compress little and zstd halves write speed
            fill_value=0.0,
            dimension_names=layer_dims(var, pooled=len(shape) == 1),
            attributes={"coordinates": coord_names, **extra.get(var, {})},
        )
    if reconstruction_shape is not None:
        group.create_array(
            RECONSTRUCTION_VAR,
            shape=(num_samples, *reconstruction_shape),
            dtype="uint8",
            chunks=(inner, *reconstruction_shape),
            shards=(shard, *reconstruction_shape),
            compressors=None,
            fill_value=0,
            dimension_names=RECONSTRUCTION_DIMS,
            attributes={"coordinates": coord_names, **extra.get(RECONSTRUCTION_VAR, {})},
        )
    values = None if coordinates is None else {name: coordinates[name] for name in NUMERIC_COORDINATES}
    create_coordinate_arrays(group, COORDINATES, num_samples, shard, values=values, attributes=extra)


class ShardOutput:
    """One task's output shard of several arrays of one store, fed batch by batch, committed whole.

    `buffers[name]` are the shard's host arrays; `ready(first, stop, wait)` queues rows [first, stop) for the
    writer threads (one per directly written array, so the arrays' bytes go to the page cache on several cores at
    once), which call `wait()` (e.g. a device copy's event) before reading them. `commit` writes what is left and
    the coordinates, and returns only when every byte is written: then (and only then) the caller records
    `checksums` (crc32c of every file written, schemas.store_integrity) and marks the shard done. `abort` leaves
    nothing of the shard behind.
    """

    def __init__(self, url: str, shard: int, start: int, buffers: dict[str, np.ndarray]):
        self.url, self.shard, self.start, self.buffers = url, shard, start, buffers
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


def write_activation_shard(url: str, start: int, variables: dict[str, np.ndarray], coords: dict[str, np.ndarray], shard: int | None = None) -> None:
    """Write samples [start, start+n) of every variable and coordinate: exactly one output shard.

    With `shard` (its index), variables whose layout allows it are written as whole shard files directly.
    """
    if shard is None:
        write_with_zarr(url, start, variables, coords)
        return
    output = ShardOutput(url, shard, start, variables)
    output.ready(0, next(iter(variables.values())).shape[0] if variables else 0)
    output.commit(coords)
