"""s3:// end to end against a real S3 API (moto's server on 127.0.0.1): results identical to local disk."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import fsspec.config
import numpy as np
import pytest
import zarr

from schemas.image_store import ShardRangeReader, validate_image_store

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

from tests.support.commands import checkout_env, run_imzarr  # noqa: E402
from tests.support.s3_server import CREDENTIALS  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, s3) -> Path:
    work = tmp_path_factory.mktemp("s3")
    assert _imzarr(s3, work, "sample", "src", "--per-shard", "120", "--train-shards", "2", "--val-size", "20").returncode == 0
    return work


@pytest.fixture
def s3_in_process(s3, monkeypatch):
    """This process's fsspec defaults for s3:// as the CLI's --storage-options sets them."""
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(fsspec.config.conf, "s3", dict(s3.storage_options))
    return s3


def _imzarr(s3, cwd: Path, *args: str, storage: bool = True) -> subprocess.CompletedProcess:
    extra = ["--storage-options", s3.storage_options_json] if storage and args[0] not in ("sample",) else []
    return run_imzarr(*args, *extra, cwd=cwd, env=s3.env())


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr
    return proc


def _arrays(url: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(url, mode="r")
    return {name: arr[:] for name, arr in group.arrays()}


def test_convert_extract_compare_show_on_s3_match_local(workdir, s3, s3_in_process):
    run = lambda *a: _ok(_imzarr(s3, workdir, *a))  # noqa: E731
    convert = ["convert", "npz", "src/train", "--shard-size", "64", "--inner-chunk", "16"]
    run(*convert, "-o", "local.zarr")
    run(*convert, "-o", s3.url("images.zarr"))
    assert "complete: yes" in run("info", s3.url("images.zarr")).stdout
    local, remote = _arrays(str(workdir / "local.zarr")), _arrays(s3.url("images.zarr"))
    assert sorted(local) == sorted(remote)
    for name in local:
        np.testing.assert_array_equal(local[name], remote[name], err_msg=name)

    store = validate_image_store(s3.url("images.zarr"))
    assert isinstance(store.fast_reader, ShardRangeReader) and not store.fast_reader.local
    idx = np.random.default_rng(0).integers(0, store.num_samples, 100)
    np.testing.assert_array_equal(store.take(idx), local["image"][idx])

    extract = ["extract", "--preset", "tiny-random", "--layers", "midblock", "--pool", "mean", "--sigma", "0.5", "--device", "cpu"]
    run(*extract, "local.zarr", "-o", "local_acts.zarr")
    run(*extract, s3.url("images.zarr"), "-o", s3.url("acts.zarr"))
    local_acts, remote_acts = _arrays(str(workdir / "local_acts.zarr")), _arrays(s3.url("acts.zarr"))
    for name in local_acts:
        np.testing.assert_array_equal(local_acts[name], remote_acts[name], err_msg=name)

    # Two different feature sets (σ 0.5 against σ 2), so the report holds real distances, not a store against itself.
    noisier = [*extract[:-4], "--sigma", "2", "--device", "cpu"]
    run(*noisier, "local.zarr", "-o", "local_noisier.zarr")
    run(*noisier, s3.url("images.zarr"), "-o", s3.url("noisier.zarr"))
    run("compare", "local_acts.zarr", "local_noisier.zarr", "--layer", "midblock", "-o", "report.zarr")
    run("compare", s3.url("acts.zarr"), s3.url("noisier.zarr"), "--layer", "midblock", "-o", s3.url("report.zarr"), "--plot", s3.url("compare.png"))
    local_report, remote_report = _arrays(str(workdir / "report.zarr")), _arrays(s3.url("report.zarr"))
    assert zarr.open_group(str(workdir / "report.zarr"), mode="r").attrs["fd"] > 0
    assert sorted(local_report) == sorted(remote_report) and "fd" in local_report
    for name in local_report:
        np.testing.assert_array_equal(local_report[name], remote_report[name], err_msg=name)

    run("show", s3.url("images.zarr"), "-o", s3.url("grid.png"))
    fs = fsspec.filesystem("s3")
    assert fs.cat_file(s3.url("grid.png"))[:8] == b"\x89PNG\r\n\x1a\n"
    assert fs.cat_file(s3.url("compare.png"))[:8] == b"\x89PNG\r\n\x1a\n"

    # The checksum records written through s3fs verify, and verify names a damaged object by its URL path.
    for url in (s3.url("images.zarr"), s3.url("acts.zarr")):
        assert "every crc32c as recorded" in run("verify", url).stdout
    shard = s3.url("images.zarr/image/c/1/0/0/0").removeprefix("s3://")
    fs.rm(shard)
    proc = _imzarr(s3, workdir, "verify", s3.url("images.zarr"))
    assert proc.returncode == 1 and proc.stdout.splitlines() == [f"{shard}: missing"]


def test_killed_conversion_to_s3_resumes_to_the_same_store(workdir, s3, s3_in_process):
    from tests.support.faults import KILL_AT_STEP

    args = ["convert", "npz", "src/train", "--shard-size", "32", "--inner-chunk", "16", "--storage-options", s3.storage_options_json]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AT_STEP, "after_shard", "3", *args, "-o", s3.url("killed.zarr")],
        cwd=workdir, env=checkout_env(s3.env()), capture_output=True, text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert zarr.open_group(s3.url("killed.zarr"), mode="r").attrs["complete"] is False
    _ok(run_imzarr(*args, "-o", s3.url("killed.zarr"), cwd=workdir, env=s3.env()))
    _ok(_imzarr(s3, workdir, "convert", "npz", "src/train", "--shard-size", "32", "--inner-chunk", "16", "-o", s3.url("whole.zarr")))
    a, b = _arrays(s3.url("killed.zarr")), _arrays(s3.url("whole.zarr"))
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    record = lambda url: {name: arr[...] for name, arr in zarr.open_group(url, path="_checksums", mode="r").arrays()}  # noqa: E731
    killed_record, whole_record = record(s3.url("killed.zarr")), record(s3.url("whole.zarr"))
    assert sorted(killed_record) == sorted(whole_record)
    for name in killed_record:
        np.testing.assert_array_equal(killed_record[name], whole_record[name], err_msg=name)


def test_file_urls_work_and_memory_urls_are_refused(workdir, s3):
    out = workdir / "via-file-url.zarr"
    _ok(_imzarr(s3, workdir, "convert", "npz", "src/train", "-o", f"file://{out}", storage=False))
    assert validate_image_store(str(out)).num_samples == 240
    proc = _imzarr(s3, workdir, "convert", "npz", "src/train", "-o", "memory://x/y.zarr", storage=False)
    assert proc.returncode == 2 and "memory://" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_python_gives_the_endpoint_and_credentials_set_after_a_refusal_count(workdir, s3, monkeypatch):
    """From Python, `schemas.apply_storage_options` is `--storage-options`; credentials exported after a "no
    credentials" error are read by the next try in the same process (fsspec had kept the filesystem it made)."""
    import converter
    import schemas
    from schemas.remote_storage import RemoteStorageCredentialsError

    for name in (*CREDENTIALS, "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(workdir / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(workdir / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(fsspec.config, "conf", {})
    fsspec.get_filesystem_class("s3").clear_instance_cache()  # one made by an earlier test, with credentials then set
    schemas.apply_storage_options({"endpoint_url": s3.endpoint}, ["s3"])
    url = s3.url("python-options.zarr")
    with pytest.raises(RemoteStorageCredentialsError, match=r"no credentials .*schemas\.apply_storage_options"):
        converter.convert_npz(str(workdir / "src" / "val" / "val_data.npz"), url)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    converter.convert_npz(str(workdir / "src" / "val" / "val_data.npz"), url)
    local = str(workdir / "python-options-local.zarr")
    converter.convert_npz(str(workdir / "src" / "val" / "val_data.npz"), local)
    np.testing.assert_array_equal(schemas.open_image_store(url).read(0, 20), schemas.open_image_store(local).read(0, 20))
    from schemas.storage_options import StorageOptionsError

    with pytest.raises(StorageOptionsError, match="endpoint_url: 9000 is not an http"):
        schemas.apply_storage_options({"endpoint_url": 9000})
