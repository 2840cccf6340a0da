"""The image store's direct shard reader: chosen from zarr.json alone, and byte-identical to zarr-python."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from schemas.image_store import ImageStore, ShardRangeReader, take_with_zarr
from schemas.zarr_format import chunk_key, is_string_data_type, read_node_metadata, uncompressed_shard_layout


def _array_store(url: str, data: np.ndarray, shard: int, inner: int, **kwargs) -> zarr.Array:
    group = zarr.open_group(url, mode="w", zarr_format=3)
    arr = group.create_array(
        "image",
        shape=data.shape,
        dtype=data.dtype,
        chunks=(inner, *data.shape[1:]),
        shards=(shard, *data.shape[1:]),
        compressors=None,
        fill_value=0,
        **kwargs,
    )
    arr[:] = data
    return arr


def _images(n: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


@pytest.mark.parametrize("url_kind", ["local", "memory"])
def test_fast_reader_is_used_and_matches_zarr(tmp_path, url_kind):
    url = str(tmp_path / "s.zarr") if url_kind == "local" else f"memory://reader-{tmp_path.name}/s.zarr"
    images = _images(300)
    group = zarr.open_group(url, mode="w", zarr_format=3)
    _array_store(url, images, shard=128, inner=16)
    store = ImageStore(url, zarr.open_group(url, mode="r"))
    assert isinstance(store.fast_reader, ShardRangeReader)
    assert store.fast_reader.local == (url_kind == "local")
    idx = np.random.default_rng(1).integers(0, 300, 500)  # unsorted, repeats, across every shard
    fast = store.take(idx)
    np.testing.assert_array_equal(fast, images[idx])
    np.testing.assert_array_equal(take_with_zarr(group["image"], idx), fast)  # the fallback: same bytes
    np.testing.assert_array_equal(store.read(0, 300), images)
    assert store.take(np.array([], dtype=np.int64)).shape == (0, 3, 8, 8)


def test_missing_shards_and_empty_inner_chunks_read_as_fill(tmp_path):
    url = str(tmp_path / "s.zarr")
    images = _images(256)
    images[:128] = 0  # a whole shard of zeros: zarr's default skips writing it
    images[160:176] = 0  # one inner chunk of zeros: left out of its shard
    arr = _array_store(url, images, shard=128, inner=16)
    assert not (tmp_path / "s.zarr" / "image" / "c" / "0" / "0" / "0" / "0").exists()
    store = ImageStore(url, zarr.open_group(url, mode="r"))
    idx = np.arange(256)[::-1]
    np.testing.assert_array_equal(store.take(idx), images[idx])
    np.testing.assert_array_equal(take_with_zarr(arr, idx), images[idx])


def test_layouts_the_reader_refuses_fall_back_to_zarr(tmp_path):
    images = _images(64)
    compressed = str(tmp_path / "c.zarr")
    group = zarr.open_group(compressed, mode="w", zarr_format=3)
    group.create_array("image", shape=images.shape, dtype="uint8", chunks=(8, 3, 8, 8), shards=(32, 3, 8, 8))[:] = images
    unsharded = str(tmp_path / "u.zarr")
    group2 = zarr.open_group(unsharded, mode="w", zarr_format=3)
    group2.create_array("image", shape=images.shape, dtype="uint8", chunks=(8, 3, 8, 8), compressors=None)[:] = images
    for url in (compressed, unsharded):
        store = ImageStore(url, zarr.open_group(url, mode="r"))
        assert store.fast_reader is None
        np.testing.assert_array_equal(store.take(np.array([63, 0, 17])), images[[63, 0, 17]])


def test_index_at_start_and_v2_chunk_keys(tmp_path):
    """Layouts the spec allows but imzarr does not write are still read right, or left to zarr."""
    images = _images(96)
    url = str(tmp_path / "s.zarr")
    group = zarr.open_group(url, mode="w", zarr_format=3)
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec  # public codec classes

    codec = ShardingCodec(chunk_shape=(16, 3, 8, 8), codecs=[BytesCodec()], index_codecs=[BytesCodec(), Crc32cCodec()], index_location="start")
    arr = group.create_array("image", shape=images.shape, dtype="uint8", chunks=(32, 3, 8, 8), serializer=codec, compressors=None)
    arr[:] = images
    meta = read_node_metadata(url, "image")
    layout = uncompressed_shard_layout(meta)
    assert layout is not None and not layout.index_at_end
    store = ImageStore(url, zarr.open_group(url, mode="r"))
    np.testing.assert_array_equal(store.take(np.arange(96)[::-1]), images[::-1])


def test_zarr_json_helpers():
    assert chunk_key({"chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}}}, (3, 0)) == "c/3/0"
    assert chunk_key({"chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}}}, (3, 0)) == "c.3.0"
    assert chunk_key({"chunk_key_encoding": {"name": "v2", "configuration": {"separator": "."}}}, (3, 0)) == "3.0"
    assert is_string_data_type("string") and is_string_data_type("variable_length_utf8") and not is_string_data_type("uint8")


def test_zarr_json_of_current_zarr_matches_the_spec_fields(tmp_path):
    """The fields the reader depends on, as the installed zarr-python writes them."""
    url = str(tmp_path / "s.zarr")
    _array_store(url, _images(32), shard=32, inner=8, dimension_names=("sample", "channel", "y", "x"))
    meta = json.loads((tmp_path / "s.zarr" / "image" / "zarr.json").read_text())
    sharding = meta["codecs"][0]
    assert sharding["name"] == "sharding_indexed"
    assert [c["name"] for c in sharding["configuration"]["index_codecs"]] == ["bytes", "crc32c"]
    assert sharding["configuration"].get("index_location", "end") == "end"
    assert meta["dimension_names"] == ["sample", "channel", "y", "x"]
