"""Input files at local paths or at fsspec URLs (s3://…): listing, size and fingerprint, opening, byte ranges.

Local paths keep the operating system's own calls (stat, open, pread) and their speed; a URL of any other
filesystem goes through fsspec, whose options (`--storage-options`) fsspec.config supplies in this process and
on every distributed worker. Nothing here ever writes: sources are inputs.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import fsspec
import numpy as np

from schemas.image_store import item_runs, pread_items

# What the JPEG-tree reader takes for an image file: extensions only decide that; decoding goes by content.
IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm"})
from schemas.output_paths import is_remote_url

# Reading a zip's directory and headers: small blocks, or fsspec's read-ahead would fetch tens of MB per seek.
SMALL_BLOCK = 1 << 16
# Long runs of rows are fetched as ranges of about this size, concurrently: one stream per range is slower.
RANGE_BYTES = 8 << 20
# What counts as remote is decided in one place for every package.
is_remote = is_remote_url


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of a URL and the path within it."""
    return fsspec.core.url_to_fs(url)


def fresh_filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """`filesystem`, with its cached listings of the URL and the folders above it forgotten (a recursive `find`
    lists afresh anyway): fsspec keeps one filesystem object per process, and a listing cached by an earlier
    conversion in this process would show an object rewritten since with its old size and ETag (a changed input
    taken for the same one; its reads then fail)."""
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    return fs, path


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A filesystem path as a full URL again (what messages and later reads use)."""
    return fs.unstrip_protocol(path)


def join(root: str, rel: str) -> str:
    """`rel` (POSIX) below `root`, a path or a URL."""
    return f"{root.rstrip('/')}/{rel}" if is_remote(root) else os.path.join(root, rel)


def basename(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    return posixpath.basename(text.rstrip("/")) if is_remote(text) else Path(text).name


def info(url: str) -> dict[str, Any] | None:
    """fsspec's description of a URL (`type` "file" or "directory", `size`, ETag, …); None where nothing is."""
    fs, path = fresh_filesystem(url)
    try:
        return fs.info(path)
    except FileNotFoundError:
        return None


def list_files(url: str) -> list[tuple[str, str]]:
    """(name, URL) of the files directly in a folder URL, in listing order."""
    fs, path = fresh_filesystem(url)
    return [
        (posixpath.basename(entry["name"].rstrip("/")), url_of(fs, entry["name"]))
        for entry in fs.ls(path, detail=True)
        if entry.get("type") == "file"
    ]


def find_below(url: str) -> dict[str, dict[str, Any]]:
    """Every file and folder below a folder URL, by POSIX path relative to it, in one listing."""
    fs, path = fresh_filesystem(url)
    prefix = path.rstrip("/") + "/"
    found = {}
    for name, entry in fs.find(path, withdirs=True, detail=True).items():
        if name.startswith(prefix) and name.rstrip("/") != path.rstrip("/"):
            found[name[len(prefix):].rstrip("/")] = entry
    return found


def file_size(path: str | os.PathLike[str]) -> int:
    if is_remote(path):
        fs, p = filesystem(path)
        return int(fs.size(p))
    return os.path.getsize(path)


def fingerprint(path: str | os.PathLike[str], entry: dict[str, Any] | None = None) -> str:
    """What changes when a file changes: size and mtime (ns) locally; size and ETag (else last-modified time)
    remotely, where `entry` is the file's listing entry when one is at hand (saves a request).

    Limit: a rewrite that keeps the size and then puts the old mtime back (`touch -d`, `cp -p` of other
    content) goes unnoticed; hashing every byte would cost a full read of 1.5 GB shards and trees of 140 GB."""
    if not is_remote(path):
        stat = os.stat(path)
        return f"size-mtime:{stat.st_size}:{stat.st_mtime_ns}"
    if entry is None:
        fs, p = filesystem(path)
        entry = fs.info(p)
    return remote_stamp(entry)


def remote_stamp(entry: dict[str, Any]) -> str:
    """Size and ETag of a listing entry, or size and last-modified time where the filesystem has no ETag."""
    size = int(entry.get("size") or 0)
    etag = entry.get("ETag") or entry.get("etag")
    if etag:
        return f"size-etag:{size}:{str(etag).strip(chr(34))}"
    modified = entry.get("LastModified") or entry.get("mtime") or entry.get("last_modified") or entry.get("updated")
    return f"size-modified:{size}:{modified}"


def open_input(path: str | os.PathLike[str], block_size: int | None = None) -> IO[bytes]:
    """A seekable binary file object; remotely, `block_size` bytes are fetched per request (default fsspec's)."""
    if not is_remote(path):
        return open(path, "rb")
    fs, p = filesystem(path)
    return fs.open(p, "rb", **({"block_size": block_size} if block_size else {}))


def read_range(path: str | os.PathLike[str], start: int, stop: int) -> bytes:
    """Bytes [start, stop) of a file (fewer at its end)."""
    if is_remote(path):
        fs, p = filesystem(path)
        return fs.cat_file(p, start=start, end=stop)
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(stop - start)


def read_blocks(path: str | os.PathLike[str], start: int, length: int, block: int) -> Iterator[bytes]:
    """Bytes [start, start + length) in blocks of at most `block`, in order; stops early at the file's end.

    Remotely, the next block is fetched while the caller works on the current one."""
    if not is_remote(path):
        with open(path, "rb") as f:
            f.seek(start)
            remaining = length
            while remaining > 0:
                chunk = f.read(min(block, remaining))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk
        return
    if length <= 0:
        return
    fs, p = filesystem(path)
    stops = list(range(start, start + length, block))[1:] + [start + length]
    starts = [start] + stops[:-1]
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(fs.cat_file, p, start=starts[0], end=stops[0])
        for i in range(len(starts)):
            chunk = pending.result()
            if i + 1 < len(starts):
                pending = pool.submit(fs.cat_file, p, start=starts[i + 1], end=stops[i + 1])
            if chunk:
                yield chunk
            if len(chunk) < stops[i] - starts[i]:
                return


def read_files(urls: list[str]) -> dict[str, bytes | Exception]:
    """Whole files by URL, fetched concurrently; a file that cannot be read maps to its exception."""
    if not urls:
        return {}
    fs, _ = filesystem(urls[0])
    paths = [fs._strip_protocol(u) for u in urls]
    got = fs.cat(paths, on_error="return")
    return {url: got.get(path, FileNotFoundError(url)) for url, path in zip(urls, paths)}


def read_text(path: str | os.PathLike[str], encoding: str = "utf-8") -> str:
    if not is_remote(path):
        with open(path, encoding=encoding) as f:
            return f.read()
    fs, p = filesystem(path)
    return fs.cat_file(p).decode(encoding)


def read_items_into(path: str, byte_pos: np.ndarray, item_bytes: int, flat: np.ndarray, dest: np.ndarray) -> None:
    """flat[dest[i]] = the item at sorted byte_pos[i]: `pread` locally; remotely one concurrent `cat_ranges` call
    for every run of adjacent items (as schemas.image_store.ShardRangeReader reads stores)."""
    if not is_remote(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            pread_items(fd, byte_pos, item_bytes, flat, dest)
        finally:
            os.close(fd)
        return
    runs = item_runs(byte_pos, item_bytes, max(1, RANGE_BYTES // item_bytes))
    if not runs:
        return
    starts = [int(byte_pos[a]) for a, _ in runs]
    stops = [int(byte_pos[a]) + (b - a) * item_bytes for a, b in runs]
    fs, p = filesystem(path)
    blobs = fs.cat_ranges([p] * len(starts), starts, stops)
    for (a, b), start, stop, blob in zip(runs, starts, stops, blobs):
        if isinstance(blob, Exception):
            raise blob
        if len(blob) != stop - start:
            raise OSError(f"{path}: file is shorter than expected: {len(blob)} of {stop - start} bytes at {start}")
        flat[dest[a:b]] = np.frombuffer(blob, dtype=np.uint8).reshape(b - a, item_bytes)


def other_format_hint(folder: str | os.PathLike[str], wanted: str) -> str:
    """'; it holds …: use `imzarr convert X`' when a local folder given to the `wanted` reader ("npz" or "jpeg")
    holds the other format's files (a peek at its top level and a few class folders), else ''."""
    root = Path(folder)
    if is_remote(str(folder)) or not root.is_dir():
        return ""
    try:
        entries = sorted(root.iterdir())
        below = [p for sub in [e for e in entries if e.is_dir()][:3] for p in sorted(sub.iterdir())[:20]]
    except OSError:
        return ""
    suffixes = {p.suffix.lower() for p in [*entries, *below] if p.is_file()}
    if wanted == "jpeg" and ".npz" in suffixes:
        return "; it holds .npz shards: use `imzarr convert npz`"
    if wanted == "npz" and suffixes & IMAGE_EXTENSIONS:
        return "; it holds image files: use `imzarr convert jpeg`"
    return ""
