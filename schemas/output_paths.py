"""Where a command may write: never into, onto or around one of its inputs, never a URL that vanishes on exit.

Paths are compared after resolving symlinks, `file://` URLs and relative paths, so `-o ./in.zarr/../in.zarr`
and `-o file:///abs/in.zarr` are the input itself.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from schemas.atomic_files import write_atomically
from schemas.errors import ImzarrError, OutputWriteError, PathError
from schemas.vocabulary import LOCAL_FILE_PROTOCOLS


class OutputOverlapsInputError(ImzarrError):
    """The output equals, lies inside, or contains one of the command's inputs."""


class UnsupportedOutputError(ImzarrError):
    """An output URL that cannot hold a result past the end of the command (memory://)."""


def local_file_url_to_path(value: Any) -> Any:
    """`file:///abs/x.zarr` → `/abs/x.zarr` (zarr and our writers treat plain paths as local folders);
    lists and tuples item by item."""
    if isinstance(value, str) and value.startswith("file://"):
        return value[len("file://"):] or "/"
    if isinstance(value, list):
        return [local_file_url_to_path(v) for v in value]
    if isinstance(value, tuple):
        return tuple(local_file_url_to_path(v) for v in value)
    return value


def location(url: str) -> tuple[str, str]:
    """(protocol, absolute path) of a path or URL; local paths are resolved through symlinks."""
    fs, path = fsspec.core.url_to_fs(str(url))
    if isinstance(fs, LocalFileSystem):
        return "file", os.path.realpath(os.path.abspath(path))
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol, "/" + path.strip("/")


def url_protocol(path: object) -> str | None:
    """The protocol of a URL (the innermost of a chain such as `simplecache::s3://…`), lower case; None otherwise."""
    if not isinstance(path, str) or "://" not in path:
        return None
    protocol = path.split("://", 1)[0].split("::")[-1].lower()
    # A scheme's syntax (RFC 3986's): text that merely holds a URL (a JSON of storage options) names no protocol.
    return protocol if re.fullmatch(r"[a-z][a-z0-9+._-]*", protocol) else None  # fsspec's names add "_" (arrow_hdfs)


def is_remote_url(path: object) -> bool:
    """True for a URL of a filesystem other than the local one (s3://, gs://, memory://, …); `file://` is local."""
    protocol = url_protocol(path)
    return protocol is not None and protocol not in LOCAL_FILE_PROTOCOLS


def local_path(url: str) -> str | None:
    """The absolute local path of a `file://` URL or plain path; None for other filesystems."""
    fs, path = fsspec.core.url_to_fs(str(url))
    return os.path.abspath(path) if isinstance(fs, LocalFileSystem) else None


def is_relative_path(url: str) -> bool:
    """A plain path relative to the working folder: not a URL, not absolute (what stores written before
    provenance paths were made absolute may hold)."""
    return "://" not in url and not os.path.isabs(url)


def absolute_url(url: str | None) -> str | None:
    """A path that means the same from any working directory and on every worker of a cluster: local paths made
    absolute, URLs unchanged. What a store records of another store (its provenance) is written this way."""
    if url is None or "://" in url:
        return url
    return os.path.abspath(url)


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def refuse_process_bound_output(output: str | None) -> None:
    """An output that must outlive this process (a command's store, a plot, a file) cannot be memory://; the
    Python API may write a store there."""
    if output is not None and location(output)[0] == "memory":
        raise UnsupportedOutputError(f"{output}: memory:// lives only as long as this process; write to a path or a persistent URL")


def check_output_location(output: str, inputs: Iterable[str] = ()) -> None:
    """Refuse an output that equals, lies inside, or contains any input, or that cannot be written (before
    anything is touched, let alone computed)."""
    found = _overlap(output, inputs, contains_too=True)
    if found:
        source, how = found
        raise OutputOverlapsInputError(f"{output}: the output {how} the input {source}; choose an output path outside every input")
    refuse_unwritable_output(output)


def check_scratch_location(scratch: str, output: str | None, inputs: Iterable[str | None] = ()) -> None:
    """Refuse a scratch folder that is an input or lies inside one (its temporary files would be written among the
    inputs), or that is the output or lies inside it (the store would hold a folder not its own, and be refused)."""
    found = _overlap(scratch, inputs, contains_too=False)
    if found:
        source, how = found
        raise OutputOverlapsInputError(f"{scratch}: the scratch folder {how} the input {source}; choose a folder outside every input")
    found = _overlap(scratch, [output], contains_too=False)
    if found:
        raise OutputPathError(f"{scratch}: the scratch folder {found[1]} the output {output}; choose a folder outside it")


def _overlap(url: str, others: Iterable[str | None], contains_too: bool) -> tuple[str, str] | None:
    """The first of `others` (None skipped) that `url` is or lies inside (or, with `contains_too`, contains), and
    how: "is", "lies inside" or "contains"; None when it overlaps none. Paths compare resolved, by protocol."""
    protocol, path = location(url)
    for other in others:
        if other is None:
            continue
        other_protocol, other_path = location(other)
        if other_protocol != protocol:
            continue
        if path == other_path:
            return other, "is"
        if _inside(path, other_path):
            return other, "lies inside"
        if contains_too and _inside(other_path, path):
            return other, "contains"
    return None


class OutputPathError(ImzarrError):
    """An output path where no new output can go: inside an existing Zarr store (whose files a writer there
    would mix with ours), or below a file."""


def refuse_unwritable_output(output: str) -> None:
    """Refuse a new local output that cannot be made, before any work, so that a compare or statistics run fails
    at once rather than after computing: one inside an existing Zarr store (its group would gain a stray folder,
    and its `--overwrite` would then refuse it), or one whose nearest existing folder does not take new entries
    (a read-only mount, another user's folder, /sys). That folder is asked the only reliable way, by making and
    removing an empty file there: permission bits do not tell root about read-only or pseudo filesystems. An
    existing store folder is left to its writer's lock, the first thing it takes; remote outputs to the first
    write (no honest probe there that costs nothing)."""
    path = local_path(output)
    if path is None:
        return
    path = os.path.realpath(path)
    if os.path.isdir(path):
        return  # made before (a store resumed or replaced): its writer's lock and checks decide
    if os.path.lexists(path):
        # A file made before (a figure or reference file re-made; a store's path holding a file, which its writer
        # refuses): its folder is asked without writing there, so that a refused output leaves it untouched.
        folder = os.path.dirname(path)
        if not os.access(folder, os.W_OK) or os.statvfs(folder).f_flag & os.ST_RDONLY:
            raise OutputWriteError(output, f"cannot write: the folder {folder} takes no new files (read-only, or not yours)")
        return
    folder = os.path.dirname(path)
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    stores = [above for above in _folders_up(folder) if os.path.isfile(os.path.join(above, "zarr.json"))]
    if stores:
        raise OutputPathError(f"{output}: lies inside the Zarr store {stores[-1]}; choose a path outside it")
    if not os.path.isdir(folder):
        raise OutputPathError(f"{output}: {folder} is a file, not a folder; choose a path outside it")
    try:
        handle, probe = tempfile.mkstemp(prefix=".imzarr-probe-", dir=folder)
    except OSError as exc:
        raise OutputWriteError(output, f"cannot write: the folder {folder} takes no new files ({exc.strerror or exc})") from None
    os.close(handle)
    try:
        os.unlink(probe)
    except OSError as exc:
        raise OutputWriteError(probe, f"cannot remove the empty file made to test the folder ({exc.strerror or exc}); remove it") from None


def _folders_up(folder: str) -> Iterable[str]:
    """`folder` and every folder above it, up to the root."""
    while True:
        yield folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ExistingFileError(ImzarrError):
    """A file output's path holds a file of another kind, which writing there would destroy."""


def refuse_replacing_other_than_png(url: str) -> None:
    """An image output may replace an earlier PNG (a figure re-made), never a file of another kind: one typo in a
    `-o` or `--plot` would otherwise turn a dataset shard or a note into a picture."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.isfile(path):
        return
    with fs.open(path, "rb") as fh:
        head = fh.read(len(PNG_SIGNATURE))
    if head != PNG_SIGNATURE:
        raise ExistingFileError(f"{url}: exists and is not a PNG image; writing the figure there would destroy it: choose another file name")


def check_png_output(url: str, what: str, default_name: str, error: type[PathError] = PathError) -> None:
    """A figure's output (`what`, e.g. "a contact sheet") is a PNG file name: not a folder, not a name with another
    image format's suffix (the bytes would be PNG whatever the name says), not an existing file of another kind."""
    fs, path = fsspec.core.url_to_fs(url)
    if fs.isdir(path):
        raise error(url, f"is a folder; give a file name such as {url.rstrip('/')}/{default_name}")
    suffix = PurePosixPath(path).suffix
    if suffix.lower() != ".png" and suffix.lower() in _image_suffixes():
        raise error(url, f"names a {suffix} file, but {what} is written as PNG: name it {url[: -len(suffix)]}.png")
    refuse_replacing_other_than_png(url)


def _image_suffixes() -> set[str]:
    """File suffixes of the image formats Pillow knows (a name ending so promises that format)."""
    from PIL import Image

    return set(Image.registered_extensions())


def write_output_file(url: str, data: bytes) -> str:
    """Write a whole file (a PNG, a chunk) at a path or URL; local files appear complete or not at all."""
    local = local_path(url)
    if local is None:
        with fsspec.open(url, "wb") as fh:
            fh.write(data)
        return url
    os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    write_atomically(local, [data])
    return local
