"""A stalled object store (moto's server stopped with SIGSTOP mid-run) fails `convert npz -o s3://…` and `extract`
from s3:// within the timeouts, in one line naming the endpoint; after SIGCONT the same command resumes to the
store an uninterrupted run makes. Short timeouts and one botocore attempt per request come through
--storage-options, so each stall costs seconds (s3fs's own retries still run: what a user's command meets)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

from tests.support.commands import checkout_env, run_imzarr  # noqa: E402

pytestmark = pytest.mark.slow

# Runs an imzarr command and stops the S3 server (pid argv[1]) right after the command records its N-th shard
# (argv[2]) done: a server that goes silent in the middle of a run.
STOP_SERVER_AFTER_SHARD = r"""
import os, signal, sys
server, count, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
import schemas.store_lifecycle as lifecycle
from schemas.cli.dispatch import main
from schemas.cli.running import exit_process

original, calls = lifecycle.mark_done, [0]
def mark_done(*args, **kwargs):
    result = original(*args, **kwargs)
    calls[0] += 1
    if calls[0] == count:
        os.kill(server, signal.SIGSTOP)
    return result
lifecycle.mark_done = mark_done
exit_process(main(argv))
"""
# The longest a stalled run may take here: requests give up after 5 s3fs tries × 1 botocore attempt × 1 s.
STALL_LIMIT_S = 120


def _options(s3) -> str:
    config = {"connect_timeout": 1, "read_timeout": 1, "retries": {"mode": "standard", "total_max_attempts": 1}}
    return json.dumps({"endpoint_url": s3.endpoint, "config_kwargs": config})


def _imzarr(s3, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return run_imzarr(*args, "--storage-options", _options(s3), cwd=cwd, env=s3.env(), timeout=300)


def _stalled(s3, cwd: Path, after_shards: int, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run the command, stopping the server after `after_shards` shards; resume the server once the command ended."""
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", STOP_SERVER_AFTER_SHARD, str(s3.pid), str(after_shards), *args, "--storage-options", _options(s3)],
            cwd=cwd, env=checkout_env(s3.env()), capture_output=True, text=True, timeout=STALL_LIMIT_S + 60,
        )  # fmt: skip
    finally:
        os.kill(s3.pid, signal.SIGCONT)
    return proc, time.monotonic() - started


def _one_timeout_line(proc: subprocess.CompletedProcess, s3, prog: str) -> str:
    errors = [line for line in proc.stderr.splitlines() if ": error:" in line]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-2000:]
    line = errors[0]
    assert line.startswith(f"{prog}: error: {s3.endpoint}/") and "timed out" in line, line
    return line


def _same_arrays(a: str, b: str) -> None:
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    assert ga.attrs["complete"] is True and gb.attrs["complete"] is True
    assert ga.attrs["settings_fingerprint"] == gb.attrs["settings_fingerprint"]
    assert sorted(k for k, _ in ga.arrays()) == sorted(k for k, _ in gb.arrays())
    for name, array in ga.arrays():
        np.testing.assert_array_equal(array[:], gb[name][:], err_msg=name)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, s3) -> Path:
    work = tmp_path_factory.mktemp("stall")
    made = run_imzarr("sample", "src", "--per-shard", "96", "--train-shards", "2", "--val-size", "10", cwd=work)
    assert made.returncode == 0, made.stderr
    return work


CONVERT = ["convert", "npz", "src/train", "--shard-size", "16", "--inner-chunk", "16", "--workers", "2"]


def test_convert_to_a_stalled_store_times_out_in_one_line_and_resumes(workdir, s3):
    target = s3.url("stalled.zarr")
    proc, seconds = _stalled(s3, workdir, 3, *CONVERT, "-o", target)
    _one_timeout_line(proc, s3, "imzarr convert")
    assert seconds < STALL_LIMIT_S, seconds
    assert zarr.open_group(target, mode="r", storage_options=_storage(s3)).attrs["complete"] is False
    resumed = _imzarr(s3, workdir, *CONVERT, "-o", target)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = _imzarr(s3, workdir, *CONVERT, "-o", s3.url("whole.zarr"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    _same_arrays_on_s3(s3, target, s3.url("whole.zarr"))


def test_extract_from_a_stalled_store_times_out_in_one_line_and_resumes(workdir, s3):
    images = s3.url("images.zarr")
    made = _imzarr(s3, workdir, *CONVERT, "-o", images)
    assert made.returncode == 0, made.stderr[-2000:]
    extract = ["extract", images, "--preset", "tiny-random", "--layers", "midblock", "--pool", "mean", "--device", "cpu", "--shard-size", "16", "--batch-size", "16"]
    proc, seconds = _stalled(s3, workdir, 2, *extract, "-o", "stalled_acts.zarr")
    _one_timeout_line(proc, s3, "imzarr extract")
    assert seconds < STALL_LIMIT_S, seconds
    assert zarr.open_group(str(workdir / "stalled_acts.zarr"), mode="r").attrs["complete"] is False
    for output in ("stalled_acts.zarr", "whole_acts.zarr"):  # the rerun resumes; the other runs uninterrupted
        done = _imzarr(s3, workdir, *extract, "-o", output)
        assert done.returncode == 0, done.stderr[-2000:]
    _same_arrays(str(workdir / "stalled_acts.zarr"), str(workdir / "whole_acts.zarr"))


def _storage(s3) -> dict:
    return dict(s3.storage_options)


def _same_arrays_on_s3(s3, a: str, b: str) -> None:
    import fsspec.config

    saved = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = _storage(s3)
    try:
        _same_arrays(a, b)
    finally:
        if saved is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved
