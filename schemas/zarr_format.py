"""What the Zarr v3 specification says about an array, read from its `zarr.json` alone.

Readers and writers that bypass zarr-python (the image store's fast reader, raw shard writers) decide from this
documented format, never from zarr-python's in-memory classes, which change between releases. Spec sections:
array metadata (`shape`, `data_type`, `chunk_grid`, `chunk_key_encoding`, `fill_value`, `codecs`,
`dimension_names`) and the `sharding_indexed` codec (`chunk_shape`, `codecs`, `index_codecs`, `index_location`;
the index is one (offset, nbytes) little-endian uint64 pair per inner chunk, 2⁶⁴−1 for an empty chunk).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from schemas.errors import StoreValidationError

METADATA_FILE = "zarr.json"
EMPTY_CHUNK = (1 << 64) - 1
INDEX_ENTRY_BYTES = 16  # offset and nbytes, uint64 each
CRC32C_BYTES = 4
# Spellings of the variable-length UTF-8 string type: "string" in current zarr-python, the longer one in 3.0.x.
STRING_DATA_TYPES = frozenset({"string", "variable_length_utf8"})


def read_node_metadata(url: str, path: str = "", storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The parsed `zarr.json` of the group or array at `path` inside the store at `url`."""
    metadata = node_metadata_if_present(url, path, storage_options)
    if metadata is None:
        raise StoreValidationError(f"{url}: no {METADATA_FILE} at {path or 'the root'}")
    return metadata


def node_metadata_if_present(url: str, path: str = "", storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The parsed `zarr.json` at `path`, or None where there is no node (no zarr.json)."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    location = "/".join(p for p in (root.rstrip("/"), path.strip("/"), METADATA_FILE) if p)
    try:
        return json.loads(fs.cat_file(location))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreValidationError(f"{url}: {path or 'root'}/{METADATA_FILE} is not valid JSON ({exc})") from None


def is_string_data_type(data_type: Any) -> bool:
    """Whether an array metadata `data_type` is variable-length UTF-8 text."""
    name = data_type.get("name") if isinstance(data_type, dict) else data_type
    return name in STRING_DATA_TYPES


def chunk_key(metadata: dict[str, Any], chunk_coords: tuple[int, ...]) -> str:
    """The store key, relative to the array, of the chunk (or shard) at `chunk_coords`."""
    encoding = metadata.get("chunk_key_encoding") or {"name": "default"}
    name = encoding.get("name")
    separator = (encoding.get("configuration") or {}).get("separator")
    parts = [str(int(c)) for c in chunk_coords]
    if name == "default":
        return (separator or "/").join(["c", *parts])
    if name == "v2":
        return (separator or ".").join(parts) if parts else "0"
    raise StoreValidationError(f"unknown chunk_key_encoding {name!r}")


def inner_chunk_length(bytes_per_sample: int, shard: int, budget_bytes: int) -> int:
    """Samples per inner chunk of a shard: the whole shard when it fits `budget_bytes`, else the largest power of
    two that fits and divides the shard (the sharding codec takes only shards of whole inner chunks)."""
    fit = max(1, budget_bytes // max(int(bytes_per_sample), 1))
    if shard <= fit:
        return int(shard)
    return int(min(1 << (fit.bit_length() - 1), shard & -shard))  # shard & -shard: the largest power of two dividing it


@dataclass(frozen=True)
class UncompressedShardLayout:
    """A sharded array whose inner chunks are raw bytes: one sample is one contiguous byte range of a shard file.

    Holds only for a regular chunk grid sharded along the first axis alone, with the `bytes` codec inside the
    shard and the index (`bytes` little-endian then `crc32c`) at the start or end of the file.
    """

    shape: tuple[int, ...]
    shard_shape: tuple[int, ...]
    inner_shape: tuple[int, ...]
    index_at_end: bool
    item_bytes: int  # bytes of one sample (one index along the first axis)
    fill_value: Any
    metadata: dict[str, Any]

    @property
    def samples_per_shard(self) -> int:
        return self.shard_shape[0]

    @property
    def samples_per_inner(self) -> int:
        return self.inner_shape[0]

    @property
    def inner_per_shard(self) -> int:
        return -(-self.shard_shape[0] // self.inner_shape[0])

    @property
    def index_bytes(self) -> int:
        return self.inner_per_shard * INDEX_ENTRY_BYTES + CRC32C_BYTES

    def shard_key(self, shard: int) -> str:
        return chunk_key(self.metadata, (shard, *([0] * (len(self.shape) - 1))))


_ITEMSIZE = {"uint8": 1, "int8": 1, "uint16": 2, "int16": 2, "float16": 2, "uint32": 4, "int32": 4, "float32": 4,
             "uint64": 8, "int64": 8, "float64": 8}


def uncompressed_shard_layout(metadata: dict[str, Any]) -> UncompressedShardLayout | None:
    """The layout when `metadata` (an array's zarr.json) allows direct byte-range access, else None."""
    if metadata.get("node_type") != "array" or metadata.get("zarr_format") != 3:
        return None
    if metadata.get("storage_transformers") or metadata.get("data_type") not in _ITEMSIZE:
        return None
    grid = metadata.get("chunk_grid") or {}
    codecs = metadata.get("codecs") or []
    if grid.get("name") != "regular" or len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return None
    shape = tuple(int(s) for s in metadata["shape"])
    shard_shape = tuple(int(s) for s in grid["configuration"]["chunk_shape"])
    config = codecs[0].get("configuration") or {}
    inner_shape = tuple(int(s) for s in config.get("chunk_shape", ()))
    inner_codecs = config.get("codecs") or []
    index_codecs = config.get("index_codecs") or []
    itemsize = _ITEMSIZE[metadata["data_type"]]
    inner_ok = len(inner_codecs) == 1 and inner_codecs[0].get("name") == "bytes" and (
        itemsize == 1 or (inner_codecs[0].get("configuration") or {}).get("endian", "little") == "little"
    )
    index_ok = [c.get("name") for c in index_codecs] == ["bytes", "crc32c"] and (
        (index_codecs[0].get("configuration") or {}).get("endian", "little") == "little"
    )
    rest = shape[1:]
    if not (
        inner_ok
        and index_ok
        and len(shard_shape) == len(shape) == len(inner_shape)
        and shard_shape[1:] == rest
        and inner_shape[1:] == rest
        and shard_shape[0] % inner_shape[0] == 0
        and config.get("index_location", "end") in ("start", "end")
    ):
        return None
    item_bytes = itemsize
    for s in rest:
        item_bytes *= s
    return UncompressedShardLayout(
        shape=shape,
        shard_shape=shard_shape,
        inner_shape=inner_shape,
        index_at_end=config.get("index_location", "end") == "end",
        item_bytes=item_bytes,
        fill_value=metadata.get("fill_value", 0),
        metadata=metadata,
    )


def whole_array_chunk(metadata: dict[str, Any]) -> str | None:
    """The key of the one chunk that holds the whole array, when the array is stored raw: a fixed-size numeric
    type, the `bytes` codec alone, one regular chunk covering the shape, a numeric fill value (as imzarr writes its
    small records). None for any other array (read it with zarr-python). Decode with `decode_whole_array`."""
    if metadata.get("node_type") != "array" or metadata.get("zarr_format") != 3 or metadata.get("storage_transformers"):
        return None
    grid = metadata.get("chunk_grid") or {}
    shape = [int(s) for s in metadata.get("shape", ())]
    chunk_shape = [int(c) for c in (grid.get("configuration") or {}).get("chunk_shape", ())]
    fill = metadata.get("fill_value")
    if grid.get("name") != "regular" or chunk_shape != shape or isinstance(fill, bool) or not isinstance(fill, (int, float)):
        return None
    if _fixed_item_bytes(metadata, metadata.get("codecs") or []) is None:
        return None
    return chunk_key(metadata, (0,) * len(shape))


def decode_whole_array(metadata: dict[str, Any], data: bytes | None) -> np.ndarray | None:
    """The array of `whole_array_chunk`'s metadata from its chunk's bytes (None: no chunk file, so every element is
    the fill value); None where the bytes are not the chunk's size (let zarr-python say what is wrong)."""
    shape = tuple(int(s) for s in metadata["shape"])
    endian = ((metadata["codecs"][0].get("configuration") or {}).get("endian") or "little")
    dtype = np.dtype(metadata["data_type"]).newbyteorder("<" if endian == "little" else ">")
    if data is None:
        return np.full(shape, metadata["fill_value"], dtype=dtype.newbyteorder("="))
    if len(data) != dtype.itemsize * _product(list(shape)):
        return None
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def chunk_grid_shape(metadata: dict[str, Any]) -> tuple[int, ...]:
    """Chunks (shards, for a sharded array) along each axis of a regular chunk grid: ⌈shape / chunk_shape⌉."""
    grid = metadata.get("chunk_grid") or {}
    if grid.get("name") != "regular":
        raise StoreValidationError(f"chunk grid {grid.get('name')!r} is not the spec's regular grid")
    chunk_shape = [int(c) for c in grid["configuration"]["chunk_shape"]]
    return tuple(-(-int(s) // max(c, 1)) for s, c in zip(metadata["shape"], chunk_shape))


def _fixed_item_bytes(metadata: dict[str, Any], codecs: list[dict[str, Any]]) -> int | None:
    """Bytes per element when `codecs` is the `bytes` codec alone on a fixed-size numeric type, else None."""
    if [c.get("name") for c in codecs] != ["bytes"] or metadata.get("data_type") not in _ITEMSIZE:
        return None
    return _ITEMSIZE[metadata["data_type"]]


def data_file_size_bounds(metadata: dict[str, Any], chunk_coords: tuple[int, ...], all_inner_chunks: bool = True) -> tuple[int, int | None]:
    """(least, most) bytes the file of the chunk or shard at `chunk_coords` may hold, from zarr.json alone; most is
    None where no bound follows. Both are the exact size for raw-byte chunks, for a shard whose inner chunks are
    raw bytes too when every inner chunk inside the array is stored (as imzarr's writers always store them).

    Sharded (the `sharding_indexed` codec): the index (16 bytes per inner chunk, plus 4 for its crc32c) and, for
    raw inner chunks, each stored inner chunk whole: ⌈m / I⌉ chunks along an axis where the shard holds m of the
    array's elements in chunks of I. Unsharded raw chunks are stored whole, edge chunks included (spec: the chunk
    is always the grid's chunk shape). `all_inner_chunks=False`: the least for any writer, which may leave out
    all-fill inner chunks (zarr-python's default): the index alone."""
    grid = (metadata.get("chunk_grid") or {}).get("configuration") or {}
    chunk_shape = [int(c) for c in grid.get("chunk_shape", ())]
    codecs = metadata.get("codecs") or []
    if codecs and codecs[0].get("name") == "sharding_indexed":
        config = codecs[0].get("configuration") or {}
        inner = [int(c) for c in config.get("chunk_shape", ())]
        inner_count = 1
        stored = 1
        for size, shard, chunk, k in zip(metadata["shape"], chunk_shape, inner, chunk_coords):
            inner_count *= -(-shard // chunk)
            held = max(0, min(shard, int(size) - int(k) * shard))
            stored *= -(-held // chunk)
        index = inner_count * INDEX_ENTRY_BYTES + CRC32C_BYTES
        item = _fixed_item_bytes(metadata, config.get("codecs") or [])
        if item is None or len(codecs) != 1:
            return index, None
        exact = index + stored * item * _product(inner)
        return (exact if all_inner_chunks else index), exact
    item = _fixed_item_bytes(metadata, codecs)
    if item is None:
        return 1, None
    exact = item * _product(chunk_shape)
    return exact, exact


def _product(values: list[int]) -> int:
    result = 1
    for v in values:
        result *= int(v)
    return result
