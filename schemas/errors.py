"""The roots of every error imzarr raises on purpose; the CLI turns each into one clear line.

`exit_code` says what kind of error it is to a shell: 2 for bad input or options (the user can fix the
command: ImzarrError), 1 for a run that failed (a writer holds the store, values failed a check, the disk is
full: RunFailedError), 130 for a run interrupted by Ctrl-C (RunInterruptedError). Every exception class of
converter, extractor and schemas derives from one of these (README "Commands" holds the table; a test checks it).
"""

import contextlib
import errno
import os
from collections.abc import Iterator


class ImzarrError(Exception):
    """Base of every error imzarr reports to the user as one line; exit code 2 (bad input)."""

    exit_code = 2


class RunFailedError(ImzarrError):
    """The inputs were acceptable but the run could not finish; exit code 1."""

    exit_code = 1


class RunInterruptedError(ImzarrError):
    """The user stopped the run (Ctrl-C, SIGINT); what was written stays, and the same command resumes it.
    Exit code 130, the shell's code for a process ended by SIGINT (128 + 2)."""

    exit_code = 130

    def __init__(self, message: str = "interrupted; re-run the same command to resume") -> None:
        super().__init__(message)


def printable_path(path: object) -> str:
    """A path as valid UTF-8 text: bytes a file name holds that are not UTF-8 appear as `\\xNN` escapes.

    Python hands such names over as lone surrogates (`os.fsdecode`), which no UTF-8 string array or JSON
    attribute can hold. Limit: a name spelling a literal `\\xNN` looks the same as one holding that byte."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class PathError(ImzarrError):
    """An error about one file or folder: the message is `PATH: REASON`; both stay available as attributes."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{printable_path(path)}: {reason}")
        self.path, self.reason = path, reason


class StoreValidationError(ImzarrError):
    """A store does not follow its contract: the message names the store and what is wrong."""


class SampleIndexError(ImzarrError, IndexError):
    """Sample positions that name no sample: outside the store or dataset, or not whole numbers (an IndexError
    too, so `for item in dataset` stops at the end)."""


class StoreLockedError(RunFailedError):
    """Another live process is writing the same store."""


class OutputWriteError(RunFailedError, PathError):
    """The output or scratch location cannot be written (read-only, disk full); exit code 1."""

    @classmethod
    def from_os_error(cls, path: object, exc: OSError) -> "OutputWriteError":
        """Name the file the system refused (or `path`) and its reason, e.g. 'No space left on device'."""
        return cls(exc.filename or path, f"cannot write ({exc.strerror or exc})")


# What a filesystem says when it will take no more: full, over quota, read-only, or past the file size limit.
FULL_OR_READ_ONLY = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


@contextlib.contextmanager
def output_write_errors(url: object) -> Iterator[None]:
    """A full disk, quota or read-only filesystem while writing a store becomes one line naming the file the
    system refused, or the store `url` where the error does not say (a write through an open descriptor)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in FULL_OR_READ_ONLY:
            raise OutputWriteError.from_os_error(url, exc) from None
        raise
