"""Reading small arrays from the spec's files alone (zarr.json and one raw chunk), checked against zarr-python."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from schemas.zarr_format import decode_whole_array, whole_array_chunk


@pytest.mark.parametrize("dtype", ["int64", "int16", "uint8", "float32", "float64"])
@pytest.mark.parametrize("endian", ["little", "big"])
def test_a_raw_single_chunk_array_decodes_as_zarr_reads_it(dtype, endian, tmp_path):
    values = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype) if "int" in dtype and dtype != "uint8" else np.arange(24, dtype=dtype).reshape(2, 3, 4)
    array = zarr.create_array(str(tmp_path / "a"), shape=values.shape, dtype=dtype, chunks=values.shape, fill_value=3,
                              serializer=zarr.codecs.BytesCodec(endian=endian), compressors=None)
    array[...] = values
    metadata = json.loads((tmp_path / "a" / "zarr.json").read_text())
    key = whole_array_chunk(metadata)
    assert key == "c/0/0/0"
    decoded = decode_whole_array(metadata, (tmp_path / "a" / key).read_bytes())
    assert decoded.dtype == np.dtype(dtype) and np.array_equal(decoded, zarr.open_array(str(tmp_path / "a"), mode="r")[...])
    assert np.array_equal(decode_whole_array(metadata, None), np.full(values.shape, 3, dtype=dtype))  # no chunk file
    assert decode_whole_array(metadata, (tmp_path / "a" / key).read_bytes()[:-1]) is None  # not the chunk's size


def test_other_arrays_are_left_to_zarr(tmp_path):
    zarr.create_array(str(tmp_path / "compressed"), shape=(8,), dtype="int64", chunks=(8,), compressors=zarr.codecs.ZstdCodec())
    zarr.create_array(str(tmp_path / "chunked"), shape=(8,), dtype="int64", chunks=(4,), compressors=None)
    zarr.create_array(str(tmp_path / "text"), shape=(8,), dtype=str, chunks=(8,))
    for name in ("compressed", "chunked", "text"):
        assert whole_array_chunk(json.loads((tmp_path / name / "zarr.json").read_text())) is None, name
