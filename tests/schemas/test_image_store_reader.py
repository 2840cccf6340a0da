"""The image store's direct shard reader: chosen from zarr.json alone, byte-identical to zarr-python on every read
path (memory maps, thread pool, pickled into a worker), and refusing damaged files."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import zarr

from schemas import image_store
from schemas.image_store import ImageStore, ShardRangeReader, take_with_zarr
from schemas.store_integrity import DamagedStoreError
from schemas.zarr_format import chunk_key, is_string_data_type, read_node_metadata, uncompressed_shard_layout
from tests.support.page_cache import drop_cached


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


@pytest.mark.parametrize(("cached", "read_around"), [(True, True), (False, True), (False, False)], ids=["page-cache", "disk", "disk-exact"])
def test_local_reads_equal_the_source_on_every_path(tmp_path, monkeypatch, cached, read_around):
    """Shuffled batches (copied from the memory maps when cached, read by the thread pool when not: each small
    piece with its aligned window, or alone for a store larger than memory), sequential reads split into pieces
    (the thread pool), repeats, reversed runs and single images: the source's bytes."""
    monkeypatch.setattr(image_store, "LOCAL_PIECE_BYTES", 2048)  # pieces of 10 images here: many, on small data
    monkeypatch.setattr(image_store, "BIG_PIECE_BYTES", 1024)
    monkeypatch.setattr(image_store, "READ_AROUND_BYTES", 1000)  # windows of ~5 images, not aligned to them
    monkeypatch.setattr(image_store, "READ_AROUND_MEMORY_SHARE", 0.5 if read_around else 0.0)
    url = str(tmp_path / "s.zarr")
    images = _images(700)
    _array_store(url, images, shard=128, inner=32)
    reader = ImageStore(url, zarr.open_group(url, mode="r")).fast_reader
    assert reader._read_around is read_around
    rng = np.random.default_rng(3)
    requests = [rng.permutation(700)[:256], np.arange(700), np.arange(699, -1, -1), rng.integers(0, 700, 300), np.array([5]), np.arange(100, 140)]
    for idx in requests:
        if not cached:
            drop_cached(sorted(p for p in (tmp_path / "s.zarr" / "image").rglob("*") if p.is_file()))
        got = reader.take(idx).reshape(idx.size, 3, 8, 8)
        np.testing.assert_array_equal(got, images[idx])


def test_a_pickled_reader_reads_without_metadata_and_still_detects_damage(tmp_path):
    """What a DataLoader worker gets: the layout and indexes travel; a file cut short or gone since raises."""
    url = str(tmp_path / "s.zarr")
    images = _images(400)
    _array_store(url, images, shard=128, inner=32)
    reader = ImageStore(url, zarr.open_group(url, mode="r")).fast_reader
    reader.shard_indexes([0, 1, 2, 3])
    copy = pickle.loads(pickle.dumps(reader))
    (tmp_path / "s.zarr" / "image" / "zarr.json").unlink()  # a worker never reads metadata again
    idx = np.random.default_rng(0).permutation(400)
    np.testing.assert_array_equal(copy.take(idx).reshape(400, 3, 8, 8), images[idx])
    shard_dir = tmp_path / "s.zarr" / "image" / "c"
    cut, gone = shard_dir / "1" / "0" / "0" / "0", shard_dir / "2" / "0" / "0" / "0"
    os.truncate(cut, cut.stat().st_size // 2)
    for opened in (copy, pickle.loads(pickle.dumps(reader))):  # files opened before the damage, and after it
        for idx in (np.array([3, 130, 250]), np.array([250]), np.arange(128, 256)):  # 250: past the cut
            with pytest.raises(DamagedStoreError, match=f"^{cut}: truncated"):
                opened.take(idx)
    os.truncate(cut, 0)
    gone.unlink()
    with pytest.raises(DamagedStoreError, match=f"^{gone}: missing"):
        pickle.loads(pickle.dumps(reader)).take(np.array([300]))


def test_a_mapped_shard_cut_short_raises_instead_of_crashing(tmp_path):
    """A shard file cut while its memory map is held: the reader refuses it (touching the lost pages would kill
    the process with SIGBUS)."""
    url = str(tmp_path / "s.zarr")
    images = _images(256)
    _array_store(url, images, shard=128, inner=32)
    reader = ImageStore(url, zarr.open_group(url, mode="r")).fast_reader
    batch = np.random.default_rng(0).permutation(256)[:64]
    np.testing.assert_array_equal(reader.take(batch).reshape(64, 3, 8, 8), images[batch])  # maps both shards
    shard = tmp_path / "s.zarr" / "image" / "c" / "1" / "0" / "0" / "0"
    size = shard.stat().st_size
    os.truncate(shard, size // 3)
    with pytest.raises(DamagedStoreError, match=f"^{shard}: truncated: {size // 3} bytes, {size} when it was opened"):
        reader.take(batch)


def test_long_runs_are_cut_at_aligned_file_offsets():
    """Pieces of a sequential read start at multiples of the block in their file (except a run's first), cover
    each run's bytes once, and keep each byte's place in the output; short runs stay whole."""
    shard, pos, dest, nbytes = (np.array(v, dtype=np.int64) for v in ([0, 1, 1], [100, 5000, 9000], [0, 7000, 12000], [2500, 1000, 900]))
    cut = image_store.aligned_pieces(shard, pos, dest, nbytes, 1024)
    pieces = list(zip(*(c.tolist() for c in cut)))
    assert pieces[:4] == [(0, 100, 0, 924), (0, 1024, 924, 1024), (0, 2048, 1948, 552), (1, 5000, 7000, 1000)]
    assert pieces[4:] == [(1, 9000, 12000, 900)]  # no longer than the block: not cut, even across a multiple


@pytest.mark.parametrize(
    "given, message",
    [
        ([1.5], r"must be whole numbers, got float64 values such as 1\.5"),
        (np.arange(120) < 3, r"not a boolean mask \(use np\.flatnonzero\(mask\)\)"),
        (np.zeros((2, 2), np.int64), r"1-D sequence, got an array of shape \(2, 2\)"),
        (5, r"1-D sequence, got an array of shape \(\)"),
        ([0, 120], r"sample index out of range 0\.\.119"),
        (["1"], r"must be whole numbers, got <U1"),
    ],
    ids=["fraction", "mask", "2-D", "scalar", "outside", "text"],
)
def test_take_refuses_what_names_no_sample(image_store, given, message):
    """What numpy would quietly take (1.5 as 1, a mask as rows 0 and 1) is refused, naming the store."""
    from schemas.errors import SampleIndexError
    from schemas.image_store import validate_image_store

    store = validate_image_store(image_store)
    with pytest.raises(SampleIndexError, match=message) as caught:
        store.take(given)
    assert str(caught.value).startswith(image_store)
    exact = store.take([2.0, 0, 2])  # whole numbers given as floats are positions, as `indices=` takes them
    np.testing.assert_array_equal(exact, store.image[[2, 0, 2]])
    np.testing.assert_array_equal(store.take(np.array([2, 0], dtype=object)), store.image[[2, 0]])  # Python ints
    from pathlib import Path

    np.testing.assert_array_equal(validate_image_store(Path(image_store)).take([1]), store.image[[1]])  # a Path opens too
