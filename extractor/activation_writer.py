"""Creates the activation-store arrays and writes one output shard of every variable per call."""

from __future__ import annotations

import numpy as np
import zarr

from schemas.activation_store import COORDINATES, RECONSTRUCTION_DIMS, RECONSTRUCTION_VAR, layer_dims
from schemas.image_layout import create_coordinate_arrays

TARGET_SHARD_BYTES = 64 << 20  # per variable: few files, and a task's working set stays ~100 MB
INNER_CHUNK = 64


def default_shard_size(layer_shapes: dict[str, tuple[int, ...]], storage_dtype: str) -> int:
    """Largest power of two of samples whose biggest variable fits TARGET_SHARD_BYTES, within 64..4096."""
    itemsize = np.dtype(storage_dtype).itemsize
    bytes_per_sample = max([int(np.prod(shape)) * itemsize for shape in layer_shapes.values()], default=1)
    fit = max(1, TARGET_SHARD_BYTES // max(bytes_per_sample, 1))
    return int(min(4096, max(64, 1 << (fit.bit_length() - 1))))


def create_activation_arrays(
    group: zarr.Group,
    num_samples: int,
    layer_shapes: dict[str, tuple[int, ...]],
    storage_dtype: str,
    shard: int,
    reconstruction_shape: tuple[int, ...] | None,
) -> None:
    """One array per layer (per-sample shape given), optional reconstructions, and the coordinates."""
    inner = min(INNER_CHUNK, shard)
    coord_names = " ".join(COORDINATES)
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
            attributes={"coordinates": coord_names},
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
            attributes={"coordinates": coord_names},
        )
    create_coordinate_arrays(group, COORDINATES, num_samples, shard)


def write_activation_shard(url: str, start: int, variables: dict[str, np.ndarray], coords: dict[str, np.ndarray]) -> None:
    """Write samples [start, start+n) of every variable and coordinate: exactly one output shard."""
    group = zarr.open_group(url, mode="r+", use_consolidated=False)
    for name, values in variables.items():
        # As for images: skipping zarr's scan for all-zero chunks changes no value read and speeds the write.
        group[name].with_config({"write_empty_chunks": True})[start : start + values.shape[0]] = values
    for name, values in coords.items():
        group[name][start : start + values.shape[0]] = values
