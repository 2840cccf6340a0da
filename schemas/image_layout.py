"""The image store's array layout as code: creating its arrays, and writing one output shard per call.

Shared by every writer of image stores (the converter, and the generator in the extractor).

Layout (chosen with `make bench`, README "Chunking"):
- `image`: shards of DEFAULT_SHARD images; inner chunks of the largest power of two of images whose bytes fit
  INNER_CHUNK_BYTES, capped at the shard (512 for 64×64). xarray takes the inner chunk, not the shard, as its
  default dask chunk: 64-image (768 KiB) chunks left a default whole-store mean at ~0.6× the best explicit
  chunking, 512-image (6 MiB) ones at ≥ 1×. The store's own reader reads single images at any inner size.
- numeric coordinates (`label`, `global_index`, `source_row`): one chunk each, written once when the arrays are
  created by a writer that knows them all up front (the converter); `xr.open_zarr` then reads each in one
  request. Writers that learn them shard by shard (no values at creation) get one chunk per shard instead.
- text arrays (`synset`, `class_name`, `source_file`): one chunk per shard, written by the shard's task; not
  listed in `image`'s `coordinates` attribute, so they open as plain data variables (schemas/variable_attrs.py).
Each output shard is written by exactly one task, and no task writes a chunk another task writes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import zarr

from schemas.errors import ImzarrError
from schemas.shard_writer import ShardOutput
from schemas.image_store import COORDINATES, IMAGE_DIMS, IMAGE_VAR, SAMPLE_DIM, UNKNOWN_LABEL
from schemas.variable_attrs import image_store_array_attrs
from schemas.zarr_format import inner_chunk_length

DEFAULT_SHARD = 4096  # 48 MiB files at 64×64: full write speed, ~100 MB per task, ~313 files for 1.28 M images
INNER_CHUNK_BYTES = 8 << 20
# Numeric per-sample arrays: xarray coordinates, one chunk each when their values are known at creation.
NUMERIC_COORDINATES = tuple(name for name, kind in COORDINATES.items() if kind != "U")
TEXT_COORDINATES = tuple(name for name, kind in COORDINATES.items() if kind == "U")  # always one chunk per shard
# Version of this layout, part of the converter's settings so a store is resumed only by code that writes it the
# same way: 1 = every coordinate per shard, all listed as coordinates; 2 = the layout described above.
LAYOUT_VERSION = 2
_FILL = {"int16": UNKNOWN_LABEL, "int64": -1}


class ImageLayoutError(ImzarrError):
    """A writer asked for something the image-store layout does not allow (a bug in the writer, not in the data)."""


def preferred_inner_chunk(resolution: int) -> int:
    """Images per inner chunk where the shard allows: the largest power of two whose bytes fit INNER_CHUNK_BYTES."""
    return inner_chunk_length(3 * resolution * resolution, 1 << 62, INNER_CHUNK_BYTES)


def inner_chunk_for(resolution: int, shard: int) -> int:
    """Images per inner chunk of a shard of `shard` images (schemas.zarr_format.inner_chunk_length)."""
    return inner_chunk_length(3 * resolution * resolution, shard, INNER_CHUNK_BYTES)


def create_image_arrays(
    group: zarr.Group,
    num_samples: int,
    resolution: int,
    shard: int,
    inner: int | None = None,
    coordinates: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Empty `image` and coordinate arrays, each with its attributes; `inner=None` chooses the inner chunk.

    With `coordinates` (values of every numeric coordinate, in store order) the numeric coordinate arrays are
    one chunk each and written here; shard tasks then write only `image` and the text arrays. Without them,
    every coordinate array has one chunk per shard and shard tasks write all of them.
    """
    inner = inner_chunk_for(resolution, shard) if inner is None else min(inner, shard)
    attributes = image_store_array_attrs(list(COORDINATES))
    group.create_array(
        IMAGE_VAR,
        shape=(num_samples, 3, resolution, resolution),
        dtype="uint8",
        chunks=(inner, 3, resolution, resolution),
        shards=(shard, 3, resolution, resolution),
        compressors=None,  # photos compress by 1-17 %; raw bytes let readers pread single images
        fill_value=0,
        dimension_names=IMAGE_DIMS,
        attributes=attributes[IMAGE_VAR],
    )
    values = None
    if coordinates is not None:
        missing = [name for name in NUMERIC_COORDINATES if name not in coordinates]
        if missing:
            raise ImageLayoutError(f"coordinates given at creation lack {missing}")
        values = {name: coordinates[name] for name in NUMERIC_COORDINATES}
    create_coordinate_arrays(group, COORDINATES, num_samples, shard, values=values, attributes=attributes)


def create_coordinate_arrays(
    group: zarr.Group,
    coordinates: dict[str, str],
    num_samples: int,
    shard: int,
    values: Mapping[str, np.ndarray] | None = None,
    attributes: Mapping[str, dict] | None = None,
) -> None:
    """1-D arrays on `sample`: those given in `values` as one chunk, written now; the rest one chunk per shard.

    Per-shard chunks let each shard's task write only its own chunks; a one-chunk array must be written whole,
    by one writer, which is why only values known at creation get one.
    """
    values = values or {}
    attributes = attributes or {}
    for name, kind in coordinates.items():
        whole = name in values
        if whole and kind == "U":
            raise ImageLayoutError(f"{name}: text arrays stay chunked per shard (written by the shard tasks)")
        array = group.create_array(
            name,
            shape=(num_samples,),
            dtype=str if kind == "U" else kind,
            chunks=(max(num_samples, 1),) if whole else (shard,),
            fill_value="" if kind == "U" else _FILL[kind],
            compressors=None if kind != "U" else "auto",
            dimension_names=(SAMPLE_DIM,),
            attributes=dict(attributes.get(name, {})),
        )
        if whole:
            column = np.asarray(values[name], dtype=kind)
            if column.shape != (num_samples,):
                raise ImageLayoutError(f"{name}: {column.shape[0] if column.ndim == 1 else column.shape} values for {num_samples} samples")
            array[:] = column


def write_image_shard(url: str, start: int, images: np.ndarray, coords: dict[str, np.ndarray], generation: str | None = None) -> dict[str, int | None]:
    """Write samples [start, start+n) — exactly one output shard — of the store at url, through the shard writer
    every store shares (schemas/shard_writer.py); return the crc32c of each file written ("<array>/<key>").

    `coords` holds the coordinates this shard's task owns: the text arrays, plus the numeric ones when they
    were not written at creation. A coordinate stored as one chunk for the whole store is refused: two tasks
    writing one chunk silently lose data. `generation`: the store's as the task's run prepared it (nothing is
    written into a store rebuilt since).
    """
    group = zarr.open_group(url, mode="r", use_consolidated=False)
    image = group[IMAGE_VAR]
    stop = start + images.shape[0]
    per_shard = int(image.shards[0] if image.shards else image.chunks[0])
    arrays = {name: group[name] for name in coords}
    for name, array in arrays.items():
        if int(array.chunks[0]) != per_shard:
            raise ImageLayoutError(
                f"{url}: {name} is stored in chunks of {array.chunks[0]} samples, not one per shard ({per_shard}); "
                "it was written when the store was created, so shard tasks must not write it"
            )
    if start % per_shard or (stop % per_shard and stop != image.shape[0]):
        raise ImageLayoutError(f"{url}: samples [{start}, {stop}) are not one whole shard of {per_shard}")
    output = ShardOutput(url, start // per_shard, start, {IMAGE_VAR: np.ascontiguousarray(images)}, generation)
    output.ready(0, images.shape[0])
    output.commit(coords)
    return output.checksums
