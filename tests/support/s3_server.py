"""A local S3-compatible server (moto) on a free loopback port, for tests and benchmarks; nothing leaves 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass(frozen=True)
class LocalS3:
    endpoint: str
    bucket: str
    pid: int = 0  # the server process (tests stop and resume it to play a stalled object store)

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.endpoint, "key": CREDENTIALS["AWS_ACCESS_KEY_ID"], "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}

    @property
    def storage_options_json(self) -> str:
        return json.dumps({"endpoint_url": self.endpoint})

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def env(self) -> dict[str, str]:
        """Environment for a child process: credentials only (the endpoint goes in --storage-options)."""
        return {**os.environ, **CREDENTIALS}


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_s3(bucket: str = "imzarr-test") -> Iterator[LocalS3]:
    """Start moto's S3 server in its own process on 127.0.0.1, make a bucket, stop the server on exit.

    Its own process, so the server and the client under test never share one interpreter lock.
    """
    import s3fs

    port = free_loopback_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        s3 = LocalS3(f"http://127.0.0.1:{port}", bucket, server.pid)
        _wait_for_port(port, server)
        fs = s3fs.S3FileSystem(**s3.storage_options, skip_instance_cache=True)
        fs.mkdir(bucket)
        yield s3
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def with_bucket(server: LocalS3, bucket: str) -> LocalS3:
    """The same server with a new, empty bucket: what one test module writes, apart from the others'."""
    import s3fs

    s3fs.S3FileSystem(**server.storage_options, skip_instance_cache=True).mkdir(bucket)
    return replace(server, bucket=bucket)


def _wait_for_port(port: int, server: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"local server on port {port} exited with {server.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"local server did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s")
