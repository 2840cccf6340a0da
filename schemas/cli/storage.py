"""Object-storage settings from the command line, applied through fsspec's own configuration.

`--storage-options JSON` (or `@file.json`) holds keyword arguments for the filesystem of every remote URL the
command names (s3://, gs://, …): for S3, e.g. `{"endpoint_url": "http://127.0.0.1:9000", "anon": false}`.
They go into `fsspec.config.conf[protocol]`, which fsspec applies whenever it makes a filesystem of that
protocol in this process — so zarr, xarray, our readers and writers all get them without each passing them
on. The standard variables (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, FSSPEC_S3_ENDPOINT_URL, …) work as usual.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import fsspec.config

from schemas.errors import ImzarrError
from schemas.output_paths import url_protocol

# Protocols that need no storage options (memory:// is refused by the commands anyway).
LOCAL_PROTOCOLS = frozenset({"file", "local", "memory"})


class StorageOptionsError(ImzarrError):
    """`--storage-options` that is not a JSON object."""


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """The JSON object given inline or as `@path`; {} for None."""
    if not text:
        return {}
    source = text
    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as fh:
                source = fh.read()
        except OSError as exc:
            raise StorageOptionsError(f"{text[1:]}: cannot read --storage-options file ({exc.strerror})") from None
    try:
        options = json.loads(source)
    except ValueError as exc:
        raise StorageOptionsError(f"--storage-options: not valid JSON ({exc})") from None
    if not isinstance(options, dict):
        raise StorageOptionsError("--storage-options: must be a JSON object of filesystem keyword arguments")
    return options


def remote_protocols(values: Iterable[Any]) -> set[str]:
    """Protocols of every remote URL among `values` (strings, or lists/tuples of strings)."""
    found = set()
    for value in values:
        for item in value if isinstance(value, (list, tuple)) else [value]:
            protocol = url_protocol(item)
            if protocol is not None and protocol not in LOCAL_PROTOCOLS:
                found.add(protocol)
    return found


def apply_storage_options(options: dict[str, Any], protocols: Iterable[str]) -> None:
    """Make `options` the defaults of every filesystem of these protocols made from now on in this process."""
    for protocol in protocols:
        fsspec.config.conf.setdefault(protocol, {}).update(options)


def local_file_url_to_path(value: Any) -> Any:
    """`file:///abs/x.zarr` → `/abs/x.zarr` (zarr and our writers treat plain paths as local folders)."""
    if isinstance(value, str) and value.startswith("file://"):
        return value[len("file://"):] or "/"
    if isinstance(value, list):
        return [local_file_url_to_path(v) for v in value]
    if isinstance(value, tuple):
        return tuple(local_file_url_to_path(v) for v in value)
    return value
