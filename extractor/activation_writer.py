"""Creates the activation-store arrays; their shards are written by `schemas.shard_writer.ShardOutput`.

Layout (schemas/activation_store.py): one inner chunk size for every array of a store, from its largest
variable; numeric coordinates one chunk each, written here at creation when the writer knows them (extract and
generate do: the selection); text arrays one chunk per shard.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr

from schemas.activation_store import COORDINATES, RECONSTRUCTION_DIMS, RECONSTRUCTION_VAR, activation_inner_chunk, layer_dims
from schemas.image_layout import create_coordinate_arrays
from schemas.variable_attrs import coordinates_attribute

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
