"""Object-storage settings (`--storage-options` of every command), parsed, checked and applied through fsspec's own configuration.

`--storage-options JSON` (or `@file.json`) holds keyword arguments for the filesystem of every remote URL the
command names (s3://, gs://, …): for S3, e.g. `{"endpoint_url": "http://127.0.0.1:9000", "anon": false}`.
They go into `fsspec.config.conf[protocol]`, which fsspec applies whenever it makes a filesystem of that
protocol in this process — so zarr, xarray, our readers and writers all get them without each passing them
on. The standard variables (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, FSSPEC_S3_ENDPOINT_URL, …) work as usual.
Given options go on top of the timeout defaults of schemas/remote_storage.py, key by key (`config_kwargs` too).
Values of the options whose type is known are checked here, so a wrong one is one line, not a library's traceback.
"""

from __future__ import annotations

import inspect
import json
import numbers
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import fsspec.config

from schemas.errors import ImzarrError
from schemas.output_paths import url_protocol
from schemas.remote_storage import install_remote_defaults, merged_options
from schemas.suggestions import did_you_mean
from schemas.vocabulary import PROTOCOLS_WITHOUT_STORAGE_OPTIONS



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
    check_storage_option_values(options)
    return options


# Options whose values have one type whatever the filesystem (s3fs, gcsfs, adlfs, HTTP all read them the same way).
TEXT_OPTIONS = ("key", "secret", "token", "region_name", "profile", "username", "password")
FLAG_OPTIONS = ("anon", "use_ssl", "requester_pays", "version_aware")
NESTED_OPTIONS = ("client_kwargs", "config_kwargs", "s3_additional_kwargs")
SECONDS_OPTIONS = ("connect_timeout", "read_timeout")


def check_storage_option_values(options: dict[str, Any], where: str = "") -> None:
    """Refuse a value of the wrong type for a well-known option (endpoint URLs, credentials, flags, timeouts)."""
    for name, value in options.items():
        shown = f"--storage-options {where}{name}"
        if name.endswith("_url"):
            parts = urlsplit(value) if isinstance(value, str) else None
            if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
                raise StorageOptionsError(f"{shown}: {json.dumps(value)} is not an http:// or https:// URL")
            try:
                parts.port
            except ValueError:
                raise StorageOptionsError(f"{shown}: {json.dumps(value)} has no valid port") from None
        elif name in TEXT_OPTIONS and not isinstance(value, str):
            raise StorageOptionsError(f"{shown}: {json.dumps(value)} must be text")
        elif name in FLAG_OPTIONS and not isinstance(value, bool):
            raise StorageOptionsError(f"{shown}: {json.dumps(value)} must be true or false")
        elif name in SECONDS_OPTIONS and (isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0):
            raise StorageOptionsError(f"{shown}: {json.dumps(value)} must be a number of seconds > 0")
        elif name in NESTED_OPTIONS:
            if not isinstance(value, dict):
                raise StorageOptionsError(f"{shown}: must be a JSON object")
            check_storage_option_values(value, f"{where}{name}.")


def remote_protocols(values: Iterable[Any]) -> set[str]:
    """Protocols of every remote URL among `values` (strings, or lists/tuples of strings)."""
    found = set()
    for value in values:
        for item in value if isinstance(value, (list, tuple)) else [value]:
            protocol = url_protocol(item)
            if protocol is not None and protocol not in PROTOCOLS_WITHOUT_STORAGE_OPTIONS:
                found.add(protocol)
    return found


def apply_storage_options(options: dict[str, Any], protocols: Iterable[str]) -> None:
    """Make `options` the defaults of every filesystem of these protocols made from now on in this process (on top
    of the timeout defaults, nested options merged key by key): `--storage-options` of every command, and from
    Python e.g. `schemas.apply_storage_options({"endpoint_url": "http://127.0.0.1:9000"}, ["s3"])` before opening
    or converting anything there. Values of well-known options are checked (StorageOptionsError)."""
    if not isinstance(options, dict):
        raise StorageOptionsError(f"storage options must be a dict of filesystem keyword arguments, got {type(options).__name__}")
    if isinstance(protocols, str):
        protocols = [protocols]
    check_storage_option_values(options)
    protocols = list(protocols)
    for protocol in protocols:
        check_option_names(options, protocol)
    install_remote_defaults()
    for protocol in protocols:
        fsspec.config.conf[protocol] = merged_options(fsspec.config.conf.get(protocol, {}), options)


class UnsupportedProtocolError(ImzarrError):
    """A URL whose protocol fsspec does not know, or whose filesystem package is not installed."""


# What fsspec's base class reads of any filesystem's keyword arguments (its listing cache, its instance cache).
FSSPEC_BASE_OPTIONS = frozenset({"use_listings_cache", "listings_expiry_time", "max_paths", "skip_instance_cache"})


def check_option_names(options: dict[str, Any], protocol: str) -> None:
    """Refuse a URL whose filesystem is not installed (gs:// without gcsfs), and for s3:// an option s3fs does
    not take: it hands those to aiobotocore's session, which refuses them only at the first request, as a bare
    TypeError. (Other filesystems differ in what they do with names they do not know; their options are left
    to them.)"""
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        raise UnsupportedProtocolError(f"{protocol}:// needs a filesystem package that is not installed ({exc})") from None
    except ValueError:
        raise UnsupportedProtocolError(f"{protocol}://: not a protocol fsspec knows (known: s3://, gs://, az://, http(s)://, memory://, file://, …)") from None
    if protocol not in ("s3", "s3a") or not options:
        return
    from aiobotocore.session import AioSession

    known = set(FSSPEC_BASE_OPTIONS)
    for init in (cls.__init__, AioSession.__init__):
        known |= {name for name, p in inspect.signature(init).parameters.items() if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    for name in options:
        if name not in known:
            raise StorageOptionsError(f"--storage-options {name}: not an option of s3:// (s3fs){did_you_mean(name, sorted(known))}")
