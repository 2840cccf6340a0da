"""Many byte ranges of s3:// objects at once through obstore (Rust), when it is installed and the s3fs options in
effect can be said in its terms; otherwise None, and the caller keeps s3fs's `cat_ranges`.

Why: s3fs spends 1.2–1.5 ms of client CPU per ranged GET (botocore signing and parsing in Python, aiohttp), which
caps random single-image reads near 700–800 img/s per core whatever the server; obstore does the same requests in
Rust for a fraction of that (tests/benchmarks/bench_object_store.py measures both, same server, same ranges).

The obstore store is built from the options the s3fs filesystem was made with (`fs.storage_options`: the
command's `--storage-options` on top of fsspec's configuration and schemas/remote_storage.py's defaults):
- `endpoint_url` (top level or in `client_kwargs`; else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) → `endpoint`,
  with plain http allowed only when the endpoint is http://;
- `key`, `secret`, `token` (or `client_kwargs`' aws_access_key_id, aws_secret_access_key, aws_session_token) →
  access_key_id, secret_access_key, session_token; without them the AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/
  AWS_SESSION_TOKEN variables, as both clients read them; `anon` → skip_signature;
- `region_name` (in `client_kwargs` or `config_kwargs`; else AWS_REGION / AWS_DEFAULT_REGION) → region;
- `config_kwargs`' connect_timeout and read_timeout → the same timeouts; retries' total_max_attempts (or
  max_attempts) → max_retries = attempts − 1, and a retry deadline of attempts × (connect + 2 × read) + 2 s.
Anything else (a profile, requester-pays, version-aware reads, extra request arguments, a boto session), or no
credentials of the kinds above (botocore would look in ~/.aws or the instance metadata), keeps s3fs: obstore never
reads other credentials or settings than s3fs would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from schemas.remote_storage import CONNECT_TIMEOUT_S, READ_TIMEOUT_S, RemoteStorageError, RemoteStorageTimeoutError

# s3fs options that change nothing about a ranged GET (caching of listings, the instance cache, our own HTTP
# session class that bounds aiohttp's sends: obstore's timeouts bound its requests itself).
IGNORED_OPTIONS = frozenset({"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths", "asynchronous", "loop"})
IGNORED_CONFIG = frozenset({"connect_timeout", "read_timeout", "retries", "http_session_cls", "region_name", "max_pool_connections"})
CLIENT_KEYS = {"endpoint_url", "region_name", "aws_access_key_id", "aws_secret_access_key", "aws_session_token"}
# Ranges per obstore call (it runs a call's requests concurrently, up to 10) and calls in flight at once: about
# the 128 requests fsspec's cat_ranges keeps in flight.
RANGES_PER_CALL = 8
CALLS_IN_FLIGHT = 16
# A request that keeps answering may take this long in all (large merged runs on a slow link); stalls are bounded
# by the connect and read timeouts.
WHOLE_REQUEST_S = 600


def obstore_available() -> bool:
    try:
        import obstore  # noqa: F401
    except ImportError:
        return False
    return True


class ObstoreRanges:
    """`cat_ranges` for s3:// paths ("bucket/key") through obstore, one store per bucket, same answers: bytes per
    range, or the exception for that range (FileNotFoundError for a missing object); timeouts and unreachable
    endpoints raise schemas.remote_storage's one-line errors naming the endpoint."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings
        self.endpoint = settings.get("endpoint") or "the storage endpoint"
        self._stores: dict[str, Any] = {}
        self._lock = threading.Lock()

    def store(self, bucket: str) -> Any:
        from obstore.store import S3Store

        with self._lock:
            if bucket not in self._stores:
                self._stores[bucket] = S3Store(bucket, **self.settings)
            return self._stores[bucket]

    def cat_ranges(self, paths: Sequence[str], starts: Sequence[int], ends: Sequence[int]) -> list[bytes | BaseException]:
        """Bytes [start, end) of each path, in order (empty lists allowed)."""
        by_object: dict[str, list[int]] = {}
        for i, path in enumerate(paths):
            by_object.setdefault(path, []).append(i)
        calls = [(path, rows[c : c + RANGES_PER_CALL]) for path, rows in by_object.items() for c in range(0, len(rows), RANGES_PER_CALL)]
        out: list[bytes | BaseException] = [b""] * len(paths)
        if not calls:
            return out
        results = _run(self._gather(calls, starts, ends))
        for (path, rows), result in zip(calls, results):
            if isinstance(result, BaseException):
                error = self._translate(path, result)
                for i in rows:
                    out[i] = error
            else:
                for i, blob in zip(rows, result):
                    out[i] = blob
        return out

    async def _gather(self, calls: list[tuple[str, list[int]]], starts: Sequence[int], ends: Sequence[int]) -> list[Any]:
        from obstore import get_ranges_async

        # Bounded only where the ranges exceed what may be in flight at once: the semaphore's waits cost about a
        # tenth of a random take's client CPU (0.31 against 0.28 ms per image, bench_object_store's rounds).
        bounded = sum(len(rows) for _, rows in calls) > RANGES_PER_CALL * CALLS_IN_FLIGHT
        limit = asyncio.Semaphore(CALLS_IN_FLIGHT) if bounded else contextlib.nullcontext()

        async def one(path: str, rows: list[int]) -> list[bytes]:
            bucket, _, key = path.removeprefix("s3://").partition("/")
            async with limit:
                # coalesce=0: exactly the requests s3fs would make (adjacent images are merged by the caller already)
                got = await get_ranges_async(self.store(bucket), key, starts=[int(starts[i]) for i in rows], ends=[int(ends[i]) for i in rows], coalesce=0)
            return [bytes(b) for b in got]

        return await asyncio.gather(*(one(p, rows) for p, rows in calls), return_exceptions=True)

    def _translate(self, path: str, exc: BaseException) -> BaseException:
        """A missing object as FileNotFoundError (as s3fs returns it); a timeout or no connection raised at once."""
        from obstore.exceptions import NotFoundError

        if isinstance(exc, (NotFoundError, FileNotFoundError)):  # obstore raises the builtin one
            return FileNotFoundError(f"{path}: no such object")
        # obstore's message ends with the Rust error's debug text, whose HttpError kind says what failed.
        text = str(exc).lower()
        if "kind: timeout" in text or "timedout" in text:
            raise RemoteStorageTimeoutError(f"{self.endpoint}: timed out reading from the object store, after retries (the server stalled, or answers slowly: "
                "a slow server needs more time, e.g. storage options {\"config_kwargs\": {\"read_timeout\": 60}}); re-run the same command to resume") from None
        if "kind: connect" in text or "connection refused" in text:
            raise RemoteStorageError(f"{self.endpoint}: cannot connect to the object store ({str(exc).splitlines()[0]}); check the endpoint, then re-run the same command") from None
        return exc


def _run(coro: Any) -> Any:
    """Run a coroutine to its end from sync code, on this process's background event loop (also from a thread
    that runs a loop of its own, as in a notebook)."""
    return asyncio.run_coroutine_threadsafe(coro, _background_loop()).result()


# One event loop per process on a daemon thread: a loop started and closed per call (asyncio.run) cost about a
# fifth of a random read's client CPU (measured, tests/benchmarks/bench_object_store.py). Keyed by process id: a
# forked child (a DataLoader worker) inherits the loop object but not its thread, and starts its own.
_LOOP: tuple[int, asyncio.AbstractEventLoop] | None = None
_LOOP_GUARD = threading.Lock()


def _background_loop() -> asyncio.AbstractEventLoop:
    global _LOOP
    with _LOOP_GUARD:
        if _LOOP is None or _LOOP[0] != os.getpid():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="imzarr-obstore-loop", daemon=True).start()
            _LOOP = (os.getpid(), loop)
        return _LOOP[1]


def obstore_runs_here() -> bool:
    """False in a process forked after obstore ran in its parent (a DataLoader worker): obstore is not fork-safe,
    the threads of the runtime it inherited stayed behind, and a call would wait forever."""
    return _LOOP is None or _LOOP[0] == os.getpid()


def obstore_settings(storage_options: dict[str, Any], environ: dict[str, str] | None = None) -> dict[str, Any] | None:
    """S3Store keyword arguments equal to these s3fs options (see the module docstring), or None when some option
    has no obstore equivalent or the credentials would come from elsewhere than the options or environment."""
    env = os.environ if environ is None else environ
    options = dict(storage_options)
    client = dict(options.pop("client_kwargs", None) or {})
    config = dict(options.pop("config_kwargs", None) or {})
    if set(client) - CLIENT_KEYS or set(config) - IGNORED_CONFIG:
        return None
    known = {"endpoint_url", "key", "secret", "token", "anon", "use_ssl"}
    if set(options) - known - IGNORED_OPTIONS:
        return None
    settings: dict[str, Any] = {}
    endpoint = options.get("endpoint_url") or client.get("endpoint_url") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = client.get("region_name") or config.get("region_name") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if endpoint:
        settings["endpoint"] = endpoint
    elif not region:
        return None  # s3fs finds a bucket's region by asking AWS; obstore would assume us-east-1
    settings["region"] = region or "us-east-1"
    key = options.get("key") or client.get("aws_access_key_id")
    secret = options.get("secret") or client.get("aws_secret_access_key")
    token = options.get("token") or client.get("aws_session_token")
    if options.get("anon"):
        settings["skip_signature"] = True
    elif key and secret:
        settings.update(access_key_id=key, secret_access_key=secret)
        if token:
            settings["session_token"] = token
    elif env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        settings.update(access_key_id=env["AWS_ACCESS_KEY_ID"], secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        if env.get("AWS_SESSION_TOKEN"):
            settings["session_token"] = env["AWS_SESSION_TOKEN"]
    else:
        return None
    connect = float(config.get("connect_timeout", CONNECT_TIMEOUT_S))
    read = float(config.get("read_timeout", READ_TIMEOUT_S))
    retries = config.get("retries") or {}
    attempts = int(retries.get("total_max_attempts", retries.get("max_attempts", 2)))
    settings["client_options"] = {
        "allow_http": bool(endpoint and endpoint.startswith("http://")),
        "connect_timeout": timedelta(seconds=connect),
        "read_timeout": timedelta(seconds=read),
        "timeout": timedelta(seconds=WHOLE_REQUEST_S),
    }
    settings["retry_config"] = {"max_retries": max(attempts - 1, 0), "retry_timeout": timedelta(seconds=attempts * (connect + 2 * read) + 2)}
    return settings


def obstore_ranges_for(fs: Any, importable: Callable[[], bool] = obstore_available) -> ObstoreRanges | None:
    """An obstore range reader equal to this s3fs filesystem, or None (obstore not `importable` or not able to run
    in this process, not S3, or options obstore cannot honour)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol not in ("s3", "s3a") or not importable() or not obstore_runs_here():
        return None
    settings = obstore_settings(getattr(fs, "storage_options", {}) or {})
    return None if settings is None else ObstoreRanges(settings)
