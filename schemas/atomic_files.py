"""Local files that appear complete or not at all: written under a temporary name next to the destination, then
renamed over it (`os.replace` is atomic within one filesystem), so a crash never leaves a half file under a name
a reader looks at.

Every temporary name is `<destination>.<32 hex digits>.partial`: the random part makes it the writer's own (two
runs, two threads or two hosts writing the same destination never share one), and the `.partial` ending is what
a store's tidying removes after a kill (schemas/store_lifecycle.py).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable
from pathlib import Path

from schemas.errors import OutputWriteError

PARTIAL_SUFFIX = ".partial"
_TEMPORARY_TAIL = re.compile(r"\.[0-9a-f]{32}" + re.escape(PARTIAL_SUFFIX))


def temporary_path(dest: str | os.PathLike) -> str:
    """A new temporary name, this writer's own, next to `dest`."""
    return f"{os.fspath(dest)}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}"


def remove_stale_temporaries(dest: str | os.PathLike) -> None:
    """Delete what killed writers left of `dest` (never read: no key points at them). Only for a destination
    with one writer at a time (a store's shard under its writer lock): another live writer's file would go too."""
    path = Path(dest)
    for stale in path.parent.glob(f"{glob_escape(path.name)}.*{PARTIAL_SUFFIX}"):
        if _TEMPORARY_TAIL.fullmatch(stale.name[len(path.name):]):
            stale.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    """`name` with glob's special characters taken literally."""
    return re.sub(r"([*?\[])", r"[\1]", name)


class AtomicFile:
    """One file filled at any offsets under a temporary name, renamed to `dest` by `commit`, dropped by `abort`.

    An error of the filesystem (full, read-only, over quota) becomes OutputWriteError naming the destination (the
    path the user gave or knows; the temporary name beside it would only puzzle).
    As a context manager: committed when the block ends normally, dropped when it raises.
    """

    def __init__(self, dest: str | os.PathLike) -> None:
        self.dest = os.fspath(dest)
        self.temp = temporary_path(self.dest)
        try:
            self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise OutputWriteError(self.dest, f"cannot write ({exc.strerror or exc})") from None

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        """Write all of `data` at byte `offset`."""
        view = memoryview(data).cast("B")
        try:
            while view:
                written = os.pwrite(self.fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as exc:
            raise OutputWriteError(self.dest, f"cannot write ({exc.strerror or exc})") from None

    def truncate(self, size: int) -> None:
        """Make the file exactly `size` bytes long."""
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise OutputWriteError(self.dest, f"cannot write ({exc.strerror or exc})") from None

    def close(self) -> None:
        """Close the file, keeping it under its temporary name (read it back, then `commit`)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def commit(self) -> None:
        """Close the file and rename it to its destination."""
        self.close()
        try:
            os.replace(self.temp, self.dest)
        except OSError as exc:
            raise OutputWriteError.from_os_error(self.dest, exc) from None

    def abort(self) -> None:
        """Close and delete the temporary file: nothing of it becomes visible."""
        try:
            self.close()
        finally:
            Path(self.temp).unlink(missing_ok=True)

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def write_atomically(dest: str | os.PathLike, chunks: Iterable[bytes | memoryview]) -> None:
    """Write byte-like chunks, in order, to `dest` through a temporary file (see the module docstring). Errors
    reading the chunks pass through as they are; errors writing become OutputWriteError naming the file."""
    with AtomicFile(dest) as file:
        offset = 0
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            file.write_at(offset, view)
            offset += len(view)
