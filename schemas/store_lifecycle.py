"""Crash-safety contract shared by every imzarr store writer.

A store is, at every instant, absent, resumable, or complete — whatever kills the writer:
1. Creation: the group is made with only an `imzarr_under_construction` marker, then its arrays and a per-unit
   done record (`_progress/done`, one chunk per unit, so concurrent tasks never share a chunk); only then are
   `schema`, settings and their fingerprint written, in one metadata write. A store still carrying the marker
   is one of ours that never finished being created: a rerun rebuilds it.
2. Work: tasks mark their unit done after their data is written. Zarr skips all-zero chunks by default, so which
   chunks exist never tells what work is finished: only the done record does. A rerun with the same settings
   resumes the units not marked; a store whose done record is missing is rebuilt.
3. Finish: the final attributes and `complete: true` are one write; then the done record is removed and metadata
   consolidated. A rerun that finds a complete store with either step missing (or zarr's `*.partial` temporary
   files) tidies it.
One writer at a time: a local store holds a lock file naming the writer's pid and host while it is written; a
lock left by a dead process on this host is taken over. A store is never emptied for a rebuild while a reader
holds its lease, and each creation gets a new generation id that readers check (schemas/store_identity.py).
Object stores offer no atomic create-if-absent through fsspec, so there one writer per store is the user's
responsibility (README "Safety").
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import fsspec
import numpy as np
import zarr

# zarr-python's local store and ours write each file under a `.partial` name, then rename it
from schemas.atomic_files import PARTIAL_SUFFIX, temporary_path
from schemas.errors import ImzarrError, StoreLockedError
from schemas.output_paths import check_output_location, local_path, write_output_file
from schemas.store_identity import GENERATION_ATTR, new_generation, rewrite_guard
from schemas.zarr_format import METADATA_FILE, chunk_key, read_node_metadata

PROGRESS_GROUP = "_progress"
DONE_ARRAY = f"{PROGRESS_GROUP}/done"
UNDER_CONSTRUCTION = "imzarr_under_construction"
LOCK_FILE = ".imzarr-writer.lock"


class StoreExistsError(ImzarrError):
    """The output path holds a store made with other settings, or something that is not an imzarr store."""


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """A stable sha256 of JSON-able settings (key order does not matter)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class StoreState:
    """What `prepare_store` found or made: the group, and which units are already done."""

    url: str
    done: np.ndarray  # bool [num_units]
    already_complete: bool
    generation: str | None = None  # the store's generation id: its tasks write only while it is still this one

    @property
    def pending(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.done)]


def path_state(url: str) -> str:
    """'missing' (nothing, or an empty folder), 'store' (a Zarr group) or 'foreign' (anything else)."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return "missing"
    if fs.isfile(path):
        return "foreign"
    # Our writer lock (and the lock file being made) may precede a store's first write.
    entries = [e for e in fs.ls(path, detail=False) if not e.rstrip("/").rsplit("/", 1)[-1].startswith(LOCK_FILE)]
    if not entries:
        return "missing"
    try:
        zarr.open_group(url, mode="r", use_consolidated=False)
    except Exception:
        return "foreign"
    return "store"


def inspect_existing(
    url: str, schema: str, settings: dict[str, Any], overwrite: bool, inputs: Iterable[str] = (), tidy: bool = True
) -> str:
    """'new' (nothing there, or replace it), 'resume' (same settings, unfinished) or 'complete'; refuse the rest.

    Refuses an output that overlaps an input first, so no message ever suggests a flag that would destroy one.
    A complete store with leftovers of an interrupted finish is tidied here, unless `tidy` is False (a dry run).
    """
    check_output_location(url, inputs)
    state = path_state(url)
    if state == "missing":
        return "new"
    if state == "foreign":
        raise StoreExistsError(f"{url}: exists and is not an imzarr store; choose another output path")
    attrs = dict(zarr.open_group(url, mode="r", use_consolidated=False).attrs)
    if "schema" not in attrs:
        if UNDER_CONSTRUCTION in attrs:
            # Ours, being created by another run now or killed while being created: nothing in it is finished work
            # (a user's files there are refused by prepare_store, under the lock, before anything is emptied).
            return "new"
        raise StoreExistsError(f"{url}: holds a Zarr group that is not an imzarr store; choose another output path")
    if attrs["schema"] == schema and attrs.get("settings_fingerprint") == settings_fingerprint(settings):
        if attrs.get("complete") is True:
            if tidy:
                tidy_complete_store(url)
            return "complete"
        return "resume"
    refuse_other_kind(url, attrs["schema"], schema)
    if overwrite:
        refuse_foreign_entries(url)
        return "new"
    if attrs["schema"] != schema:
        raise StoreExistsError(f"{url}: holds an {attrs['schema']} store, not {schema}; pass --overwrite to replace it")
    raise StoreExistsError(
        f"{url}: was made with other inputs or options ({_settings_diff(attrs.get('settings'), settings)}); "
        "re-run with the original ones to resume, or pass --overwrite to replace it"
    )


def foreign_entries(url: str) -> list[str]:
    """Names in a store's folder that are not the store's: not its zarr.json, not a child node (a folder with its
    zarr.json, or one being created), not our lock or zarr's temporary files. A user's notes or figures kept in
    a store folder are such entries; a rebuild that emptied the folder would delete them."""
    fs, path = fsspec.core.url_to_fs(url)
    found = []
    for entry in fs.ls(path, detail=True):
        full = entry["name"].rstrip("/")
        name = full.rsplit("/", 1)[-1]
        if name in (METADATA_FILE, ".DS_Store") or name.startswith(LOCK_FILE) or name.endswith(PARTIAL_SUFFIX):
            continue
        if entry["type"] == "directory" and _node_folder(fs, full):
            continue
        found.append(name)
    return sorted(found)


def _node_folder(fs: Any, path: str) -> bool:
    """A node's folder holds its zarr.json; while a writer creates or removes nodes, only temporary files or the
    folders of nodes below it (`_progress/` holding just `done/`)."""
    inside = fs.ls(path, detail=True)
    names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in inside]
    if METADATA_FILE in names:
        return True
    return all(n.endswith(PARTIAL_SUFFIX) or (e["type"] == "directory" and _node_folder(fs, e["name"].rstrip("/"))) for n, e in zip(names, inside))


def refuse_foreign_entries(url: str) -> None:
    """A store folder that also holds other files is never emptied for a rebuild, whatever the flags."""
    fs, path = fsspec.core.url_to_fs(url)
    found = foreign_entries(url) if fs.isdir(path) else []
    if found:
        shown = ", ".join(found[:5]) + (" …" if len(found) > 5 else "")
        raise StoreExistsError(
            f"{url}: also holds {len(found)} entries that are not the store's ({shown}); replacing the store would delete "
            "them: move them out of the folder (or choose another output path), then re-run"
        )


def claim_report_output(url: str, schema: str, overwrite: bool, inputs: Iterable[str] = ()) -> None:
    """Check that a store written whole in one go (a report) may be (re)written at `url`; refuse otherwise.

    Nothing there, or an earlier store of the same schema (a report is re-made from its inputs), may be
    replaced; another version of its kind only with `overwrite`; a store of another kind or anything else never.
    """
    check_output_location(url, inputs)
    state = path_state(url)
    if state == "missing":
        return
    if state == "foreign":
        raise StoreExistsError(f"{url}: exists and is not an imzarr store; choose another output path")
    found = dict(zarr.open_group(url, mode="r", use_consolidated=False).attrs).get("schema")
    if found is None:
        raise StoreExistsError(f"{url}: holds a Zarr group that is not an imzarr store; choose another output path")
    refuse_other_kind(url, found, schema)
    if found != schema and not overwrite:
        raise StoreExistsError(f"{url}: holds an {found} store, not {schema}; pass --overwrite to replace it")
    refuse_foreign_entries(url)


def store_kind(schema: str) -> str:
    """What a schema names, without its version: `imzarr.images/1` → `imzarr.images`."""
    return str(schema).split("/", 1)[0]


def refuse_other_kind(url: str, found: str, schema: str) -> None:
    """A store of another kind (an image store where a report would go) is never replaced, whatever the flags:
    no command made it, and one typo in an output path would cost, say, a whole conversion. An older version of
    the same kind may be replaced with --overwrite."""
    if store_kind(found) != store_kind(schema):
        raise StoreExistsError(
            f"{url}: holds an {found} store, and this command writes {store_kind(schema)} stores; "
            "choose another output path (a store of another kind is never replaced, even with --overwrite)"
        )


def prepare_store(
    url: str,
    schema: str,
    settings: dict[str, Any],
    num_units: int,
    create_arrays: Callable[[zarr.Group], None],
    overwrite: bool,
    initial_attrs: dict[str, Any] | None = None,
    inputs: Iterable[str] = (),
    inspected: str | None = None,
) -> StoreState:
    """Create the store, or reopen one made with the same settings to resume; refuse anything else.

    Takes the store's writer lock (held until `finalize_store` or the end of the process). `inspected`: the
    caller's `inspect_existing` answer, taken while it already held the lock (nothing can have changed since).
    """
    status = inspected
    if status is None:
        inputs = tuple(inputs)
        inspect_existing(url, schema, settings, overwrite, inputs)  # refuse before creating even a lock file
        acquire_writer_lock(url)
        status = inspect_existing(url, schema, settings, overwrite, inputs)  # again, now that no one else writes
    if status == "complete":
        release_writer_lock(url)
        return StoreState(url, np.ones(num_units, dtype=bool), already_complete=True)
    if status == "resume":
        if _has_done_record(url):
            remove_partial_files(url)
            generation = dict(zarr.open_group(url, mode="r", use_consolidated=False).attrs).get(GENERATION_ATTR)
            return StoreState(url, read_done(url, num_units), already_complete=False, generation=generation)
        # Same settings but no done record: nothing says which units finished, so start over (it is our store).
    refuse_foreign_entries(url)  # checked again under the lock: a user's files are never emptied with the store
    with rewrite_guard(url):  # refused while a reader holds a lease; new readers kept out until the marker is there
        clear_store(url)
        group = zarr.open_group(url, mode="a", zarr_format=3, attributes={UNDER_CONSTRUCTION: schema, "complete": False})
    create_arrays(group)
    group.create_array(
        DONE_ARRAY, shape=(max(num_units, 1),), chunks=(1,), dtype="int8", fill_value=0, compressors=None
    )
    # One metadata write that replaces the marker: from here on the store is resumable.
    generation = new_generation()
    group.attrs.put(
        {
            "schema": schema,
            "complete": False,
            "settings_fingerprint": settings_fingerprint(settings),
            "settings": settings,
            **(initial_attrs or {}),
            # Who reads this store checks it is still this one (schemas/store_identity.py); a rerun that resumes
            # keeps it, a rebuild gets a new one.
            GENERATION_ATTR: generation,
        }
    )
    return StoreState(url, np.zeros(num_units, dtype=bool), already_complete=False, generation=generation)


def _settings_diff(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return "settings unknown"
    changed = sorted(k for k in set(old) | set(new) if json.dumps(old.get(k), default=str) != json.dumps(new.get(k), default=str))
    return "changed: " + ", ".join(changed[:6]) if changed else "same settings, different fingerprint"


def _has_done_record(url: str) -> bool:
    try:
        zarr.open_array(url, path=DONE_ARRAY, mode="r")
    except Exception:  # zarr raises several types for "no such array"
        return False
    return True


def read_done(url: str, num_units: int) -> np.ndarray:
    arr = zarr.open_array(url, path=DONE_ARRAY, mode="r")
    return np.asarray(arr[:num_units]) == 1


def mark_done(url: str, unit: int) -> None:
    """Record one finished unit; call only after its data is fully written.

    In a local store the unit's one-byte chunk is written directly, per the array's zarr.json (chunk key, `bytes`
    codec), under a temporary name and renamed into place; zarr-python took ~4 ms per call, a tenth of a pooled
    extraction task (measured). Any other store or layout goes through zarr-python.
    """
    root = local_path(url)
    if root is not None:
        metadata = read_node_metadata(url, DONE_ARRAY)
        if _one_byte_chunks(metadata):
            write_output_file(os.path.join(root, *DONE_ARRAY.split("/"), *chunk_key(metadata, (unit,)).split("/")), b"\x01")
            return
    zarr.open_array(url, path=DONE_ARRAY, mode="r+")[unit] = 1


def _one_byte_chunks(metadata: dict[str, Any]) -> bool:
    """An int8 array of one-element chunks whose only codec is `bytes`: a chunk file is the value's one byte."""
    grid = metadata.get("chunk_grid") or {}
    return (
        metadata.get("data_type") == "int8"
        and grid.get("name") == "regular"
        and (grid.get("configuration") or {}).get("chunk_shape") == [1]
        and [c.get("name") for c in metadata.get("codecs") or []] == ["bytes"]
        and not metadata.get("storage_transformers")
    )


def finalize_store(url: str, final_attrs: dict[str, Any]) -> None:
    """Mark complete (with the final attributes, one write), drop the progress record, consolidate.

    Only the holder of the writer lock may: a run that found the store complete when it took the lock (and so
    released it) must return instead of finishing a store another process wrote."""
    if not holds_writer_lock(url):
        raise StoreLockedError(f"{url}: this process does not hold the store's writer lock; it cannot mark it complete")
    group = zarr.open_group(url, mode="r+", use_consolidated=False)
    group.update_attributes({**final_attrs, "complete": True})
    _drop_progress_and_consolidate(url, group)
    release_writer_lock(url)


def _drop_progress_and_consolidate(url: str, group: zarr.Group) -> None:
    if PROGRESS_GROUP in group:
        del group[PROGRESS_GROUP]
    with warnings.catch_warnings():
        # Consolidated metadata is not in the v3 spec yet; xarray opens v3 stores without warnings only with it.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        # Our writer lock is the one non-Zarr file in the store while it is written.
        warnings.filterwarnings("ignore", message=f"Object at {LOCK_FILE} is not recognized", category=UserWarning)
        zarr.consolidate_metadata(url)


def tidy_complete_store(url: str) -> None:
    """Finish what a kill during `finalize_store` left: the progress record, temp files, consolidated metadata,
    and its abandoned writer lock (a kill between consolidating and releasing the lock leaves only that)."""
    group = zarr.open_group(url, mode="r", use_consolidated=False)
    stale = PROGRESS_GROUP in group or not _consolidated_matches(url)
    partial = _partial_files(url)
    if not stale and not partial and not abandoned_writer_lock(url):
        return
    acquire_writer_lock(url)
    try:
        for path in partial:
            os.remove(path)
        if stale:
            _drop_progress_and_consolidate(url, zarr.open_group(url, mode="r+", use_consolidated=False))
    finally:
        release_writer_lock(url)


def _consolidated_matches(url: str) -> bool:
    fs, root = fsspec.core.url_to_fs(url)
    try:
        meta = json.loads(fs.cat_file(f"{root.rstrip('/')}/zarr.json"))
    except (FileNotFoundError, ValueError):
        return False
    listed = ((meta.get("consolidated_metadata") or {}).get("metadata")) or {}
    return bool(listed) and PROGRESS_GROUP not in listed and meta.get("attributes", {}).get("complete") is True


def _partial_files(url: str) -> list[str]:
    root = local_path(url)
    if root is None or not os.path.isdir(root):
        return []
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(PARTIAL_SUFFIX)]


def remove_partial_files(url: str) -> None:
    """Delete zarr's temporary `*.partial` files that a kill left inside one of our stores."""
    for path in _partial_files(url):
        os.remove(path)


def clear_store(url: str) -> None:
    """Empty a store we made (or an empty folder), keeping our writer lock; callers have checked it is ours."""
    root = local_path(url)
    if root is None:
        fs, path = fsspec.core.url_to_fs(url)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        return
    if not os.path.isdir(root):
        return
    for entry in os.scandir(root):
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.remove(entry.path)


# --- one writer at a time ------------------------------------------------------------------------------------
#
# The lock file is made whole under a temporary name and hard-linked into place (link fails if the name exists),
# so a second writer never reads a half-written lock; where links are not supported it is created O_EXCL. Its
# holder keeps an exclusive flock on it while it lives: a takeover of a lock left by a dead process first takes
# that flock (the kernel drops a dead holder's), then checks that the lock file is still the one it locked, so
# two late starters cannot both remove a stale lock and one of them the other's fresh one.

_HELD_LOCKS: dict[str, int | None] = {}  # store root → the open lock file whose flock we hold (None: no flock here)


def _lock_owner() -> str:
    return f"{os.getpid()} {socket.gethostname()}"


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the pid exists
    except PermissionError:  # it exists, owned by someone else
        pass
    except ProcessLookupError:
        return False
    return True


def _try_flock(fd: int, mode: int) -> bool | None:
    """Take a non-blocking flock: True taken, False held elsewhere, None where the filesystem has none."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _create_lock(lock: str, me: str) -> int | None:
    """Make the lock file whole and take its flock; return its fd (-1: made, no flock), or None if it exists."""
    temp = temporary_path(lock)  # while being made; tidied as any partial file
    fd = os.open(temp, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)
    try:
        locked = _try_flock(fd, fcntl.LOCK_EX)
        os.write(fd, (me + "\n").encode())
        try:
            os.link(temp, lock)
        except FileExistsError:
            os.close(fd)
            return None
        except OSError:  # no hard links here (some network and FUSE filesystems): exclusive create instead
            os.close(fd)
            return _create_lock_exclusive(lock, me)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
    return fd if locked else _no_flock(fd)


def _create_lock_exclusive(lock: str, me: str) -> int | None:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    except FileExistsError:
        return None
    locked = _try_flock(fd, fcntl.LOCK_EX)
    os.write(fd, (me + "\n").encode())
    return fd if locked else _no_flock(fd)


def _no_flock(fd: int) -> int:
    os.close(fd)
    return -1


def acquire_writer_lock(url: str) -> None:
    """Take the store's writer lock (re-entrant within a process); refuse while another live process holds it."""
    root = local_path(url)
    if root is None or root in _HELD_LOCKS:
        return
    os.makedirs(root, exist_ok=True)
    lock = os.path.join(root, LOCK_FILE)
    me = _lock_owner()
    for _ in range(20):
        fd = _create_lock(lock, me)
        if fd is not None:
            _HELD_LOCKS[root] = None if fd < 0 else fd
            return
        holder = _read_lock(lock)
        if holder is None:
            continue  # removed between our attempt and the read
        if _abandoned(root, holder) and _take_over(lock, holder):
            continue
        pid, host = holder
        raise StoreLockedError(
            f"{url}: another imzarr process (pid {pid} on {host}) is writing this store; wait for it to end "
            f"(or, if it is gone, remove {lock})"
        ) from None
    raise StoreLockedError(f"{url}: could not take the writer lock {lock}; another process keeps taking it")


def _take_over(lock: str, holder: tuple[int, str]) -> bool:
    """Remove an abandoned lock, unless it is held (its flock) or was replaced meanwhile; True if it is gone."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        if _try_flock(fd, fcntl.LOCK_EX) is False:
            return False  # alive after all, or another starter is taking it over right now
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            return True
        if same and _read_lock(lock) == holder:
            os.remove(lock)  # left by a dead process (or an earlier run in this one)
        return True  # gone, or replaced by a fresh lock: look again
    finally:
        os.close(fd)


def _read_lock(lock: str) -> tuple[int, str] | None:
    try:
        with open(lock) as fh:
            pid, host = fh.read().split()[:2]
        return int(pid), host
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return -1, "unknown"


def _abandoned(root: str, holder: tuple[int, str]) -> bool:
    """Whether a writer lock was left behind: by a process of this host that no longer runs, or no longer holds
    the lock's flock (a killed writer not yet reaped, or its pid since given to another process), or by an earlier
    run in this process that no longer holds it."""
    pid, host = holder
    if host != socket.gethostname():
        return False
    if pid == os.getpid():
        return root not in _HELD_LOCKS
    return not process_alive(pid) or _flock_released(os.path.join(root, LOCK_FILE))


def _flock_released(lock: str) -> bool:
    """Whether nobody holds the lock file's flock (False where the filesystem has no flock: the pid decides)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        return _try_flock(fd, fcntl.LOCK_SH) is True  # released again when fd closes
    finally:
        os.close(fd)


def abandoned_writer_lock(url: str) -> bool:
    """Whether the store's writer lock file is there and abandoned (`_abandoned`)."""
    root = local_path(url)
    holder = None if root is None else _read_lock(os.path.join(root, LOCK_FILE))
    return holder is not None and _abandoned(root, holder)


def holds_writer_lock(url: str) -> bool:
    """Whether this process holds the store's writer lock (always true of object stores, which have none)."""
    root = local_path(url)
    return root is None or root in _HELD_LOCKS


def take_writer_lock_early(url: str) -> bool:
    """Take the writer lock before work that precedes `prepare_store` (a converter's source reading), so a second
    writer is refused before it does any; True if taking it made the store's folder (see `give_back_early_lock`)."""
    root = local_path(url)
    made = root is not None and not os.path.lexists(root)
    acquire_writer_lock(url)
    return made


def give_back_early_lock(url: str, made_folder: bool) -> None:
    """After a failed run: release the lock, and remove the folder taking it made if it is still empty."""
    release_writer_lock(url)
    root = local_path(url)
    if made_folder and root is not None:
        with contextlib.suppress(OSError):
            os.rmdir(root)


def release_writer_lock(url: str) -> None:
    """Give up the store's writer lock if this process holds it."""
    root = local_path(url)
    if root is None or root not in _HELD_LOCKS:
        return
    fd = _HELD_LOCKS.pop(root)
    lock = os.path.join(root, LOCK_FILE)
    holder = _read_lock(lock)
    try:
        if holder is not None and holder == (os.getpid(), socket.gethostname()):
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock)
    finally:
        if fd is not None:
            os.close(fd)  # drops the flock, after the file is gone


@atexit.register
def _release_all_locks() -> None:
    for root in list(_HELD_LOCKS):
        release_writer_lock(root)
