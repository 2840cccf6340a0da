"""Conversion on an existing dask.distributed cluster (workers in their own processes) equals the local run."""

from __future__ import annotations

import numpy as np
import zarr
from distributed import LocalCluster
from tests.support.commands import run_imzarr


def test_convert_on_a_local_cluster_of_processes_matches_the_local_run(tmp_path):
    assert run_imzarr("sample", "src", "--per-shard", "10", "--train-shards", "1", "--val-size", "200", cwd=tmp_path).returncode == 0
    shards = ["--shard-size", "64", "--inner-chunk", "16"]
    # val_data.npz is deflated: stage 1 inflates it into scratch on the workers, stage 2 writes shards there too.
    local = run_imzarr("convert", "npz", "src/val", *shards, "-o", "local.zarr", cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = run_imzarr("convert", "npz", "src/val", *shards, "-o", "cluster.zarr", "--scheduler", cluster.scheduler_address, cwd=tmp_path)
    assert remote.returncode == 0, remote.stderr
    a, b = zarr.open_group(tmp_path / "local.zarr", mode="r"), zarr.open_group(tmp_path / "cluster.zarr", mode="r")
    assert sorted(n for n, _ in a.arrays()) == sorted(n for n, _ in b.arrays())
    for name, arr in a.arrays():
        np.testing.assert_array_equal(arr[:], b[name][:], err_msg=name)
    assert dict(a.attrs)["settings"] == dict(b.attrs)["settings"]
    assert not list(tmp_path.glob("*.scratch-*"))  # scratch tidied after both runs


def test_memory_urls_are_refused_where_other_processes_would_use_them(tmp_path):
    """memory:// is this process's memory: a cluster's workers, or local worker processes, find nothing there."""
    import pytest

    import converter
    from schemas.task_runner import SchedulerError, SchedulerSpec, refuse_memory_urls

    assert run_imzarr("sample", "src", "--per-shard", "10", "--train-shards", "1", "--val-size", "20", cwd=tmp_path).returncode == 0
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with pytest.raises(SchedulerError, match=rf"^memory://m/img\.zarr: memory:// lives in this process's memory, which workers in other processes \(dask\.distributed at {cluster.scheduler_address}\) cannot see"):
            converter.convert_npz(str(tmp_path / "src" / "val"), "memory://m/img.zarr", scheduler=cluster.scheduler_address)
    # Workers that are threads of this process share its memory.
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp", dashboard_address=None) as cluster:
        assert converter.convert_npz(str(tmp_path / "src" / "val"), "memory://m/threads.zarr", scheduler=cluster.scheduler_address).num_samples == 20
    refuse_memory_urls(SchedulerSpec(), ["memory://m/img.zarr"])  # local threads share it
    refuse_memory_urls(SchedulerSpec(processes=True), ["/data/img.zarr", None])
    with pytest.raises(SchedulerError, match=r"\(2 local processes\) cannot see"):
        refuse_memory_urls(SchedulerSpec(processes=True), ["memory://src"])
