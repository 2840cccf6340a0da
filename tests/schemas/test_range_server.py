"""The benchmarks' concurrent S3 endpoint (tests/support/range_server.py) serves a local store as S3 would: both
clients read the same bytes as from disk, and ranges, listings and missing keys answer as S3's do."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from schemas.image_layout import create_image_arrays, write_image_shard
from schemas.image_store import IMAGE_VAR, ImageStore, shard_range_reader
from tests.support.range_server import range_server

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("obstore")

SAMPLES, SHARD, RES = 64, 16, 8


def test_served_store_reads_as_on_disk(tmp_path, monkeypatch):
    for key, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    local = tmp_path / "bucket" / "s.zarr"
    images = np.random.default_rng(3).integers(0, 256, (SAMPLES, 3, RES, RES), dtype=np.uint8)
    create_image_arrays(zarr.open_group(str(local), mode="w", zarr_format=3), SAMPLES, RES, SHARD, None)
    for start in range(0, SAMPLES, SHARD):
        coords = {"label": np.zeros(SHARD, np.int16), "global_index": np.arange(start, start + SHARD)}
        write_image_shard(str(local), start, images[start : start + SHARD], coords)
    indices = np.random.default_rng(4).integers(0, SAMPLES, 40)
    with range_server(tmp_path) as endpoint:
        options = {"endpoint_url": endpoint, "key": "k", "secret": "s"}
        fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
        shard_file = "image/c/1/0/0/0"
        on_disk = (local / shard_file).read_bytes()
        assert fs.cat_file(f"bucket/s.zarr/{shard_file}") == on_disk
        assert fs.cat_file(f"bucket/s.zarr/{shard_file}", start=10, end=99) == on_disk[10:99]
        assert fs.cat_file(f"bucket/s.zarr/{shard_file}", start=-7) == on_disk[-7:]
        assert fs.info(f"bucket/s.zarr/{shard_file}")["size"] == len(on_disk)
        assert sorted(fs.ls("bucket/s.zarr/image/c")) == [f"bucket/s.zarr/image/c/{k}" for k in range(SAMPLES // SHARD)]
        with pytest.raises(FileNotFoundError):
            fs.cat_file("bucket/s.zarr/image/c/9/0/0/0")
        for use_obstore, client in ((True, "obstore"), (False, "fsspec")):
            reader = shard_range_reader("s3://bucket/s.zarr", IMAGE_VAR, options, use_obstore=use_obstore)
            assert reader.range_client == client
            assert np.array_equal(reader.take(indices).reshape(-1, 3, RES, RES), images[indices])
        group = zarr.open_group("s3://bucket/s.zarr", mode="r", storage_options=options)
        assert np.array_equal(ImageStore("s3://bucket/s.zarr", group, storage_options=options).take(indices), images[indices])
