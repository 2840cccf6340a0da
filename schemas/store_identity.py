"""A store a command reads cannot change under it unnoticed: a generation id per store, and readers' leases.

Design (README "Safety"):
- **Generation.** Every store gets a random id (`generation`, a UUID4) in its root attributes in the one write
  that makes it resumable (`store_lifecycle.prepare_store`). A resumed run keeps it; a rebuild (`--overwrite`, or
  a store whose creation was killed) gets a new one. A reader records the id (and settings fingerprint) of each
  input it opened, checks the input still carries it — and is still complete — before each task reads and again
  after it has read (before its unit is marked done), and once more before the output is marked complete. A
  store being rewritten fails the check at every stage of the rewrite (its root metadata is gone, under
  construction, incomplete, or carries another id), so whatever mixed rows a task read are never marked done
  and the output is never marked complete: it stays resumable, and a rerun, whose settings now name the new
  generation, is refused as made from other inputs (or rebuilt with `--overwrite`). An id drawn at random
  rather than derived from the settings is what makes a rewrite with identical settings visible too: its
  window, when shards are missing, would otherwise pass. Object stores have no locks, so this check is all
  there is there; a run that reads through a rewrite fails, naming the input.
- **Reader's lease** (local filesystems). A command reading a local store holds a shared `flock` on the store's
  root folder for its duration; a writer about to empty a store to rebuild it takes the exclusive `flock`
  first, without waiting, and is refused while any reader holds a lease — naming the readers' pids (from
  /proc/locks where the system has it) and this host. The folder itself is locked, so nothing is ever written
  into an input, and a lease dies with its process (the kernel drops it), so none is ever left behind. Where a
  filesystem offers no `flock` (some network mounts), leases are skipped and the generation check remains.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec

from schemas.errors import RunFailedError
from schemas.output_paths import local_path

GENERATION_ATTR = "generation"
ROOT_METADATA = "zarr.json"


class InputChangedError(RunFailedError):
    """An input store was rewritten or removed while a command was reading it."""


class StoreInUseError(RunFailedError):
    """A store cannot be rewritten: another process is reading it (or it is being rewritten while one starts)."""


def new_generation() -> str:
    """A fresh store generation id: random, so two creations never share one (even with identical settings)."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class StoreIdentity:
    """Which store a reader opened: its generation id and settings fingerprint (None in stores made before)."""

    url: str
    generation: str | None
    fingerprint: str | None

    @classmethod
    def of(cls, url: str, attrs: dict[str, Any]) -> "StoreIdentity":
        return cls(url, attrs.get(GENERATION_ATTR), attrs.get("settings_fingerprint"))

    def describe(self) -> str:
        return f"generation {self.generation}" if self.generation else f"settings fingerprint {str(self.fingerprint)[:12]}"


def _root_attrs(url: str) -> dict[str, Any] | None:
    """The root group's attributes, read from its zarr.json now (no cache); None if there is none readable."""
    fs, root = fsspec.core.url_to_fs(url)
    try:
        meta = json.loads(fs.cat_file(f"{root.rstrip('/')}/{ROOT_METADATA}"))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    return attrs if isinstance(attrs, dict) else None


def check_unchanged(identity: StoreIdentity) -> None:
    """Raise InputChangedError unless the store is still complete and still the generation that was opened."""
    attrs = _root_attrs(identity.url)
    if attrs is None:
        now = "it is gone"
    elif attrs.get("complete") is not True:
        now = "it is being rewritten (not complete)"
    elif StoreIdentity.of(identity.url, attrs) != identity:
        now = f"it is now {StoreIdentity.of(identity.url, attrs).describe()}"
    else:
        return
    raise InputChangedError(
        f"{identity.url}: the input store changed while this command read it ({identity.describe()} was opened; "
        f"{now}); the output was not marked complete — run again on the new input (with --overwrite)"
    )


class OutputReplacedError(RunFailedError):
    """A task's output store was replaced (rebuilt by another run) since the task's run prepared it."""


def check_output_generation(url: str, generation: str | None) -> None:
    """Raise OutputReplacedError unless the output store is still the generation its run prepared (None: no
    check). A task of a run that ended (Ctrl-C, a lost scheduler) may go on computing on a cluster worker; this
    keeps it from writing into the store a later `--overwrite` run made at the same path."""
    if generation is None:
        return
    attrs = _root_attrs(url) or {}
    if attrs.get(GENERATION_ATTR) != generation:
        raise OutputReplacedError(
            f"{url}: the store was replaced since this task's run prepared it (generation {generation}, now "
            f"{attrs.get(GENERATION_ATTR) or 'none'}): this task's work is dropped, the store is left as it is"
        )


# --- readers' leases and the rewriting writer ------------------------------------------------------------------

def _lock_folder(url: str, mode: int) -> tuple[int | None, bool]:
    """Open a local store's root folder and try `flock(mode)` without waiting: (fd, taken). fd None: no lease
    possible (not local, no folder, or no flock on this filesystem)."""
    root = local_path(url)
    if root is None or not os.path.isdir(root):
        return None, True
    try:
        fd = os.open(root, os.O_RDONLY)
    except OSError:
        return None, True
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return fd, False
    except OSError:
        os.close(fd)
        return None, True
    return fd, True


@contextlib.contextmanager
def reader_lease(*urls: str | None) -> Iterator[None]:
    """Hold a shared lease on each local input store while the body runs; refuse one that is being rewritten."""
    held: list[int] = []
    try:
        for url in urls:
            if url is None:
                continue
            fd, taken = _lock_folder(url, fcntl.LOCK_SH)
            if fd is None:
                continue
            if not taken:
                os.close(fd)
                raise StoreInUseError(f"{url}: is being rewritten by another imzarr process ({_writer_of(url)}); wait for it to finish")
            held.append(fd)
        yield
    finally:
        for fd in held:
            os.close(fd)  # drops the lease


@contextlib.contextmanager
def rewrite_guard(url: str) -> Iterator[None]:
    """While the body empties a store to rebuild it: refuse if a reader holds a lease on it, and keep new readers
    out (their lease is refused) until the body has left the store visibly unfinished."""
    fd, taken = _lock_folder(url, fcntl.LOCK_EX)
    if fd is not None and not taken:
        readers = _lease_holders(fd)
        os.close(fd)
        who = ", ".join(f"pid {pid} on {socket.gethostname()}" for pid in readers) or "a process this system does not name"
        raise StoreInUseError(f"{url}: another imzarr process is reading this store ({who}); it cannot be rewritten until that ends")
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _lease_holders(fd: int) -> list[int]:
    """Pids holding a flock on the file open at `fd`, from Linux's /proc/locks (empty where there is none)."""
    st = os.fstat(fd)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    try:
        with open("/proc/locks") as fh:
            for line in fh:
                fields = line.split()
                # "1: FLOCK  ADVISORY  READ  1234 08:01:5678 0 EOF"; waiters have a "->" field after the number
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == ident and fields[4].isdigit() and int(fields[4]) != os.getpid():
                    pids.append(int(fields[4]))
    except OSError:
        return []
    return sorted(set(pids))


def _writer_of(url: str) -> str:
    """'pid N on HOST' from the store's writer lock file, if there is one."""
    from schemas.store_lifecycle import LOCK_FILE  # the lifecycle owns the writer lock (and imports this module)

    root = local_path(url)
    try:
        with open(os.path.join(root or "", LOCK_FILE)) as fh:
            pid, host = fh.read().split()[:2]
        return f"pid {pid} on {host}"
    except (OSError, ValueError):
        return "writer unknown"
