"""Random takes from s3:// through obstore equal s3fs's and local disk's byte for byte; s3fs stays the fallback;
the s3fs options in effect map to obstore's settings; a missing object or a stalled server gives the same errors."""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import timedelta

import fsspec
import fsspec.config
import numpy as np
import pytest
import zarr

from schemas.image_layout import create_image_arrays, write_image_shard
from schemas.image_store import ImageStore, shard_range_reader
from schemas import obstore_ranges
from schemas.obstore_ranges import obstore_ranges_for, obstore_settings
from schemas.remote_storage import RemoteStorageTimeoutError, install_remote_defaults

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")
pytest.importorskip("obstore")

from tests.support.s3_server import CREDENTIALS  # noqa: E402

SAMPLES, SHARD, RES = 96, 32, 8


@pytest.fixture(scope="module")
def stores(s3, tmp_path_factory):
    """The same random images written to local disk and to the S3 server (three shards)."""
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (SAMPLES, 3, RES, RES), dtype=np.uint8)
    local = str(tmp_path_factory.mktemp("obstore") / "local.zarr")
    remote = s3.url("obstore.zarr")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(fsspec.config.conf, "s3", dict(s3.storage_options))
        for url in (local, remote):
            create_image_arrays(zarr.open_group(url, mode="w", zarr_format=3), SAMPLES, RES, SHARD, None)
            for start in range(0, SAMPLES, SHARD):
                coords = {"label": np.zeros(SHARD, np.int16), "global_index": np.arange(start, start + SHARD)}
                write_image_shard(url, start, images[start : start + SHARD], coords)
    return local, remote, images


@pytest.fixture
def s3_env(s3, monkeypatch):
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(fsspec.config.conf, "s3", dict(s3.storage_options))
    install_remote_defaults()
    return s3


def test_obstore_take_equals_s3fs_and_local_disk(stores, s3_env):
    local, remote, images = stores
    indices = np.random.default_rng(1).integers(0, SAMPLES, 200)  # repeats, any order, every shard
    indices[:4] = [95, 0, 95, 31]
    store = ImageStore(remote, zarr.open_group(remote, mode="r"))
    assert store.fast_reader.range_client == "obstore"
    via_obstore = store.take(indices)
    s3fs_reader = shard_range_reader(remote, "image", use_obstore=False)
    assert s3fs_reader.range_client == "fsspec"
    via_s3fs = s3fs_reader.take(indices).reshape(via_obstore.shape)
    via_disk = ImageStore(local, zarr.open_group(local, mode="r")).take(indices)
    np.testing.assert_array_equal(via_obstore, images[indices])
    assert via_obstore.tobytes() == via_s3fs.tobytes() == via_disk.tobytes()
    np.testing.assert_array_equal(store.read(10, 70), images[10:70])  # long runs of adjacent images, merged


@pytest.mark.parametrize("in_flight", [64, 2], ids=["unbounded", "bounded"])
def test_obstore_takes_of_separate_images_equal_the_source(stores, s3_env, monkeypatch, in_flight):
    """Every other image (no two adjacent: one request each), with all requests at once and with at most
    `in_flight` calls of 2 ranges in flight (the semaphore that bounds large takes)."""
    monkeypatch.setattr(obstore_ranges, "RANGES_PER_CALL", 2)
    monkeypatch.setattr(obstore_ranges, "CALLS_IN_FLIGHT", in_flight)
    made = []

    class CountedSemaphore(asyncio.Semaphore):
        def __init__(self, value: int = 1):
            made.append(value)
            super().__init__(value)

    monkeypatch.setattr(obstore_ranges.asyncio, "Semaphore", CountedSemaphore)
    local, remote, images = stores
    indices = np.random.default_rng(2).permutation(np.arange(0, SAMPLES, 2))  # 48 ranges: over 2 × 2, under 2 × 64
    store = ImageStore(remote, zarr.open_group(remote, mode="r"))
    assert store.fast_reader.range_client == "obstore"
    np.testing.assert_array_equal(store.take(indices), images[indices])
    assert made == ([in_flight] if in_flight == 2 else [])


@pytest.mark.parametrize("use_obstore", [True, False])
def test_a_forked_child_reads_after_its_parent(stores, s3_env, use_obstore):
    """A DataLoader worker is a fork: neither obstore's runtime nor s3fs's event loop came along (obstore would wait
    forever, s3fs refuses: "not fork-safe"), so the child makes its own filesystem and reads through s3fs."""
    _, remote, images = stores
    reader = shard_range_reader(remote, "image", use_obstore=use_obstore)
    assert reader.range_client == ("obstore" if use_obstore else "fsspec")
    assert reader.take(np.array([5, 70])).tobytes() == images[[5, 70]].tobytes()  # the parent's clients run now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report the bytes it read, or nothing, and leave at once
        os.close(read)
        try:
            signal.alarm(60)  # a child stuck on the parent's runtime must not hang the suite
            os.write(write, reader.take(np.array([1, 94, 40])).tobytes() + reader.range_client.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        got = pipe.read()
    os.waitpid(pid, 0)
    assert got == images[[1, 94, 40]].tobytes() + b"fsspec"
    assert reader.take(np.array([2])).tobytes() == images[[2]].tobytes() and reader.range_client == ("obstore" if use_obstore else "fsspec")


def test_s3fs_is_the_fallback_without_obstore_or_with_options_it_cannot_honour(stores, s3_env):
    _, remote, _ = stores
    fs, _ = fsspec.core.url_to_fs(remote)
    assert obstore_ranges_for(fs) is not None
    assert obstore_ranges_for(fs, importable=lambda: False) is None
    assert obstore_ranges_for(fsspec.filesystem("memory")) is None
    assert obstore_settings({"profile": "work", "endpoint_url": "http://h:1"}, {}) is None  # credentials from a profile: s3fs
    assert obstore_settings({"endpoint_url": "http://h:1"}, {}) is None  # botocore would look in ~/.aws: s3fs
    assert obstore_settings({"key": "k", "secret": "s"}, {}) is None  # no endpoint, no region: s3fs asks AWS


def test_s3fs_options_map_to_obstore_settings():
    options = {
        "endpoint_url": "http://127.0.0.1:9000",
        "key": "k",
        "secret": "s",
        "client_kwargs": {"region_name": "eu-west-1"},
        "config_kwargs": {"connect_timeout": 2, "read_timeout": 3, "retries": {"mode": "standard", "total_max_attempts": 3}},
    }
    got = obstore_settings(options, {})
    assert got == {
        "endpoint": "http://127.0.0.1:9000",
        "region": "eu-west-1",
        "access_key_id": "k",
        "secret_access_key": "s",
        "client_options": {"allow_http": True, "connect_timeout": timedelta(seconds=2), "read_timeout": timedelta(seconds=3), "timeout": timedelta(seconds=600)},
        "retry_config": {"max_retries": 2, "retry_timeout": timedelta(seconds=3 * (2 + 6) + 2)},
    }
    env = {"AWS_ACCESS_KEY_ID": "ek", "AWS_SECRET_ACCESS_KEY": "es", "AWS_SESSION_TOKEN": "et", "AWS_ENDPOINT_URL": "https://s3.example", "AWS_DEFAULT_REGION": "us-west-2"}
    from_env = obstore_settings({}, env)
    assert (from_env["endpoint"], from_env["region"], from_env["access_key_id"], from_env["session_token"]) == ("https://s3.example", "us-west-2", "ek", "et")
    assert from_env["client_options"]["allow_http"] is False
    assert obstore_settings({"anon": True, "endpoint_url": "http://h:1"}, {})["skip_signature"] is True


def test_missing_object_and_stalled_server_give_the_same_one_line_errors(stores, s3, s3_env):
    _, remote, _ = stores
    fs, root = fsspec.core.url_to_fs(remote)
    missing = f"{root}/image/c/9/0/0/0"
    (blob,) = obstore_ranges_for(fs).cat_ranges([missing], [0], [10])
    assert isinstance(blob, FileNotFoundError) and missing in str(blob)
    assert isinstance(fs.cat_ranges([missing], [0], [10])[0], FileNotFoundError)  # as s3fs answers it

    fsspec.config.conf["s3"] = {**fsspec.config.conf["s3"], "config_kwargs": {"connect_timeout": 1, "read_timeout": 1, "retries": {"total_max_attempts": 1}}}
    stalled = shard_range_reader(remote, "image", use_obstore=True)
    stalled.shard_indexes([0])
    os.kill(s3.pid, signal.SIGSTOP)
    try:
        with pytest.raises(RemoteStorageTimeoutError, match=f"^{s3.endpoint}: timed out") as err:
            stalled.take(np.array([3]))
    finally:
        os.kill(s3.pid, signal.SIGCONT)
    assert len(str(err.value).splitlines()) == 1
