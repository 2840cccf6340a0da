"""The image store's array layout as code: creating its arrays, and writing one output shard per call.

Shared by every writer of image stores (the converter, and the generator in the extractor)."""

from __future__ import annotations

import numpy as np
import zarr

from schemas.image_store import COORDINATES, IMAGE_DIMS, IMAGE_VAR, SAMPLE_DIM, UNKNOWN_LABEL

# Chosen by `make bench` (README, "Chunking"): 64 images (768 KiB) per inner chunk keep xarray's default dask
# chunks coarse and zarr-python reads cheap, while the store's own reader fetches single images from inside
# a chunk; 4,096-image shards (48 MiB files) write at full speed and keep a 1.28 M store to ~313 files per array.
DEFAULT_SHARD = 4096
DEFAULT_INNER = 64
_FILL = {"int16": UNKNOWN_LABEL, "int64": -1}


def create_image_arrays(group: zarr.Group, num_samples: int, resolution: int, shard: int, inner: int) -> None:
    """Empty `image` and coordinate arrays; each output shard is one chunk of every coordinate array."""
    inner = min(inner, shard)
    group.create_array(
        IMAGE_VAR,
        shape=(num_samples, 3, resolution, resolution),
        dtype="uint8",
        chunks=(inner, 3, resolution, resolution),
        shards=(shard, 3, resolution, resolution),
        compressors=None,  # photos compress by 1-17 %; raw bytes let readers pread single images
        fill_value=0,
        dimension_names=IMAGE_DIMS,
        attributes={"coordinates": " ".join(COORDINATES)},
    )
    create_coordinate_arrays(group, COORDINATES, num_samples, shard)


def create_coordinate_arrays(group: zarr.Group, coordinates: dict[str, str], num_samples: int, shard: int) -> None:
    """1-D arrays on `sample`, one chunk per output shard (so each task writes only its own chunks)."""
    for name, kind in coordinates.items():
        group.create_array(
            name,
            shape=(num_samples,),
            dtype=str if kind == "U" else kind,
            chunks=(shard,),
            fill_value="" if kind == "U" else _FILL[kind],
            compressors=None if kind != "U" else "auto",
            dimension_names=(SAMPLE_DIM,),
        )


def write_image_shard(url: str, start: int, images: np.ndarray, coords: dict[str, np.ndarray]) -> None:
    """Write samples [start, start+n) — exactly one output shard — of the store at url."""
    group = zarr.open_group(url, mode="r+", use_consolidated=False)
    stop = start + images.shape[0]
    # zarr's default scans every inner chunk to skip writing all-fill ones; storing black images like any other
    # changes no value read and halves the time of a shard write (24 MB: 32 ms instead of 68 ms, measured).
    group[IMAGE_VAR].with_config({"write_empty_chunks": True})[start:stop] = images
    for name, values in coords.items():
        group[name][start:stop] = values
