"""Object stores never hang: default timeouts and bounded retries for s3:// (s3fs), and one-line errors for a
storage endpoint that stalls or cannot be reached.

The defaults go into `fsspec.config.conf["s3"]`, which fsspec applies whenever it makes an S3 filesystem in this
process (zarr, xarray, our readers and writers alike); options the user gives (`--storage-options`, their own
fsspec configuration) win, key by key, `config_kwargs` included. A dask.distributed run hands the same
configuration to every worker (schemas/task_runner.py).

Why each default, and the bound they give (botocore's client Config and aiohttp's timeouts):
- `connect_timeout` 5 s and `read_timeout` 5 s: no answer on a socket for that long counts as a failed attempt
  (S3 answers within a second; a slow store can be given more with `--storage-options`).
- `retries` {"mode": "standard", "total_max_attempts": 2}: botocore tries a request twice (5xx answers,
  throttling, timeouts); s3fs itself tries a request that timed out up to 5 times (`S3FileSystem.retries`, with 0.1–0.8 s
  pauses; botocore's own pause is under 1 s), so a stalled endpoint fails a request after at most
  5 × 2 × (5 s + 1 s) + 2 s ≈ 62 s (measured with 1 s timeouts: 16 s for a GET).
- aiohttp starts its read timeout only once a request's body is sent, and waits for S3's "100 Continue" with no
  timeout at all: a PUT to a stalled server would wait forever. `stall_bounded_session` (botocore's
  `http_session_cls`) bounds each request's send to connect + 2 × read timeout + 1 s per MiB of body, and fails it
  without retries (it was the server that stalled, not the network that blipped).
A command stops at the first failed request; requests already in flight on other threads end within the same
bounds, so a command gives up within about two minutes of an endpoint going silent, naming the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

from schemas.errors import ImzarrError, RunFailedError
from schemas.output_paths import is_remote_url

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 5.0
BOTOCORE_ATTEMPTS = 2
# The slowest upload a request is given time for, beyond its timeouts (bytes per second).
SLOWEST_UPLOAD_RATE = 1 << 20


class RemoteStorageError(RunFailedError):
    """An object store that timed out or could not be reached; the message names the URL (exit code 1)."""


class RemoteStorageCredentialsError(ImzarrError):
    """No credentials for an object store: a setting the user gives, so bad input (exit code 2), not a failed run."""


class RemoteStorageTimeoutError(RemoteStorageError):
    """A request to an object store that got no answer within its bound. Deliberately not a TimeoutError: s3fs
    retries those (socket.timeout is TimeoutError), which would multiply the bound."""


def s3_defaults() -> dict[str, Any]:
    """What every S3 filesystem made in this process gets unless told otherwise (see the module docstring)."""
    return {
        "config_kwargs": {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
            "retries": {"mode": "standard", "total_max_attempts": BOTOCORE_ATTEMPTS},
            "http_session_cls": stall_bounded_session,
        }
    }


def merged_options(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`, nested dicts (config_kwargs, client_kwargs) merged key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merged_options(merged[key], value)
        else:
            merged[key] = value
    return merged


def install_remote_defaults(conf: dict[str, dict[str, Any]] | None = None) -> None:
    """Put the S3 defaults under whatever `conf` (fsspec's configuration) already says for s3://."""
    if conf is None:
        import fsspec.config

        conf = fsspec.config.conf
    conf["s3"] = merged_options(s3_defaults(), conf.get("s3", {}))


def stall_bounded_session(**kwargs: Any) -> Any:
    """botocore's HTTP session for aiobotocore (its `http_session_cls` may be any callable): aiobotocore's own,
    with every request's send bounded (see the module docstring). aiobotocore is imported only when S3 is used."""
    return _bounded_session_class()(**kwargs)


@contextlib.contextmanager
def remote_storage_errors(*urls: str | None) -> Iterator[None]:
    """botocore's connection and timeout errors (after its and s3fs's retries) as one line naming the endpoint, or
    where the error names none (missing credentials), the first object-store URL among `urls`."""
    named = next((u for u in urls if u and is_remote_url(u)), None)
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - only botocore's connection errors are translated; the rest re-raised
        translated = translate_remote_error(exc, named)
        if translated is None:
            raise
        raise translated from None


def translate_remote_error(exc: BaseException, url: str | None = None) -> ImzarrError | None:
    """A RemoteStorageError for botocore's "timed out" and "cannot connect" errors, a RemoteStorageCredentialsError
    for "no credentials", else None (botocore is not imported: the classes are known by name)."""
    if not type(exc).__module__.startswith("botocore"):
        return None
    kind = type(exc).__name__
    where = getattr(exc, "kwargs", {}).get("endpoint_url") or url or "the storage endpoint"
    if kind in ("ReadTimeoutError", "ConnectTimeoutError"):
        phase = "reading from" if kind == "ReadTimeoutError" else "connecting to"
        return RemoteStorageTimeoutError(f"{where}: timed out {phase} the object store, after retries (the server stalled, or answers slowly: a slow "
            "server needs more time, e.g. storage options {\"config_kwargs\": {\"read_timeout\": 60}}); re-run the same command to resume")
    if kind in ("EndpointConnectionError", "ConnectionClosedError", "ProxyConnectionError"):
        return RemoteStorageError(
            f"{where}: cannot reach the object store ({exc}); check the endpoint (--storage-options "
            "'{\"endpoint_url\": \"http://HOST:PORT\"}', AWS_ENDPOINT_URL, or from Python "
            "schemas.apply_storage_options({\"endpoint_url\": …}, [\"s3\"])), then re-run the same command"
        )
    if kind in ("NoCredentialsError", "PartialCredentialsError"):
        # fsspec keeps the filesystem it made (keyed by its options, not the environment): forgotten here, the next
        # try from the same process (a notebook) reads credentials set since.
        import fsspec

        fsspec.get_filesystem_class("s3").clear_instance_cache()
        return RemoteStorageCredentialsError(
            f"{where}: no credentials for the object store; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or pass "
            "--storage-options '{\"key\": …, \"secret\": …, \"endpoint_url\": …}' (from Python: "
            "schemas.apply_storage_options({…}, [\"s3\"])) (README \"Object storage and clusters\")"
        )
    return None


_SESSION_CLASS: type | None = None


def _bounded_session_class() -> type:
    global _SESSION_CLASS
    if _SESSION_CLASS is None:
        from aiobotocore.httpsession import AIOHTTPSession

        class StallBoundedSession(AIOHTTPSession):
            async def send(self, request: Any) -> Any:
                timeout = self._timeout  # aiohttp.ClientTimeout(sock_connect, sock_read), from the client Config
                body = int(request.headers.get("Content-Length") or 0)
                bound = (timeout.sock_connect or CONNECT_TIMEOUT_S) + 2 * (timeout.sock_read or READ_TIMEOUT_S) + body / SLOWEST_UPLOAD_RATE
                try:
                    return await asyncio.wait_for(super().send(request), bound)
                except asyncio.TimeoutError as exc:
                    if type(exc) is not asyncio.TimeoutError:  # aiohttp's own timeouts, which botocore retries
                        raise
                    raise RemoteStorageTimeoutError(
                        f"{request.url}: timed out: the object store did not answer within {bound:.0f} s (the server "
                        "stalled?); re-run the same command to resume"
                    ) from None

        _SESSION_CLASS = StallBoundedSession
    return _SESSION_CLASS


def open_store_group(url: str) -> Any:
    """`zarr.open_group(url, mode="r")`, or one line: an unreachable object store or missing credentials say so
    (with the --storage-options hint); anything else is "not a Zarr group" naming `url`."""
    import zarr

    try:
        return zarr.open_group(url, mode="r", zarr_format=3)  # imzarr writes v3 only; a v2 probe would name .zattrs
    except Exception as exc:  # zarr raises several types for "nothing here"
        raise _not_opened(exc, url) from None


def read_store_root(url: str) -> dict[str, Any]:
    """The root group's parsed zarr.json (its `attributes`, and the consolidated metadata where written), read from
    the file itself (no zarr-python objects: 3 ms less per open), with open_store_group's one-line errors."""
    from schemas.errors import StoreValidationError
    from schemas.zarr_format import node_metadata_if_present

    try:
        root = node_metadata_if_present(url)
    except StoreValidationError:
        raise
    except Exception as exc:  # fsspec and botocore raise several types
        raise _not_opened(exc, url) from None
    if not isinstance(root, dict) or root.get("node_type") != "group":
        raise StoreValidationError(f"{url}: does not exist" if _absent(url) else _unfinished(url) or f"{url}: not a Zarr group (no Zarr v3 group zarr.json at its root)")
    return root


def _unfinished(url: str) -> str | None:
    """The message for a folder where an imzarr run started a store and stopped before its zarr.json (killed
    early): it holds the run's writer lock; None for anything else."""
    import fsspec

    from schemas.store_lifecycle import LOCK_FILE, abandoned_writer_lock

    try:
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.isfile(f"{path.rstrip('/')}/{LOCK_FILE}"):
            return None
        if not abandoned_writer_lock(url):
            return f"{url}: a store being made: a running command holds its writer lock and has not written its metadata yet; wait for it"
    except Exception:
        return None
    return f"{url}: an unfinished store (the run that made it stopped before writing its metadata); re-run that command to resume it"


def _absent(url: str) -> bool:
    """Nothing at all at `url` (asked only to word an error; False where the question itself fails)."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        return not fs.exists(path)
    except Exception:
        return False


def _not_opened(exc: BaseException, url: str) -> Exception:
    """One line for a store that could not be opened: an unreachable object store or missing credentials say so;
    anything else is "not a Zarr group"."""
    from schemas.errors import StoreValidationError

    translated = translate_remote_error(exc, url) or translate_remote_error(exc.__cause__ or exc.__context__ or exc, url)
    if translated is not None:
        return translated
    if isinstance(exc, FileNotFoundError) and _absent(url):
        return StoreValidationError(f"{url}: does not exist")
    return StoreValidationError(_unfinished(url) or f"{url}: not a Zarr group ({type(exc).__name__}: {exc})")
