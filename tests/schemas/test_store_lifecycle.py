"""The one store lifecycle: absent, resumable or complete at every instant; one writer; inputs never touched."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from schemas.errors import StoreLockedError
from tests.support.commands import run_imzarr
from schemas.output_paths import OutputOverlapsInputError, UnsupportedOutputError, check_output_location, refuse_process_bound_output
from schemas.store_lifecycle import (
    LOCK_FILE,
    PROGRESS_GROUP,
    UNDER_CONSTRUCTION,
    StoreExistsError,
    acquire_writer_lock,
    claim_report_output,
    finalize_store,
    inspect_existing,
    mark_done,
    prepare_store,
    release_writer_lock,
)

SCHEMA = "imzarr.test/1"
SETTINGS = {"a": 1}


def _create(group: zarr.Group) -> None:
    group.create_array("x", shape=(8,), chunks=(4,), dtype="int32", fill_value=0)


def _prepare(url: str, overwrite: bool = False, inputs=()):
    return prepare_store(url, SCHEMA, SETTINGS, 2, _create, overwrite, {"extra": "y"}, inputs=inputs)


def _run_to_completion(url: str) -> None:
    state = _prepare(url)
    for unit in state.pending:
        zarr.open_array(url, path="x", mode="r+")[unit * 4 : unit * 4 + 4] = unit + 1
        mark_done(url, unit)
    finalize_store(url, {"final": True})


def test_fresh_run_resume_and_complete(tmp_path):
    url = str(tmp_path / "s.zarr")
    state = _prepare(url)
    assert state.pending == [0, 1] and (tmp_path / "s.zarr" / LOCK_FILE).exists()
    mark_done(url, 0)
    release_writer_lock(url)
    assert _prepare(url).pending == [1]
    finalize_store(url, {"final": True})
    assert not (tmp_path / "s.zarr" / LOCK_FILE).exists()
    attrs = dict(zarr.open_group(url, mode="r").attrs)
    assert attrs["complete"] is True and attrs["final"] is True and attrs["extra"] == "y" and UNDER_CONSTRUCTION not in attrs
    assert _prepare(url).already_complete


def test_killed_during_creation_is_rebuilt(tmp_path):
    """Only the marker (the group's first write) and some arrays exist: the rerun starts over, no crash."""
    url = str(tmp_path / "s.zarr")
    group = zarr.open_group(url, mode="w", zarr_format=3, attributes={UNDER_CONSTRUCTION: SCHEMA, "complete": False})
    _create(group)
    assert inspect_existing(url, SCHEMA, SETTINGS, overwrite=False) == "new"
    _run_to_completion(url)
    np.testing.assert_array_equal(zarr.open_array(url, path="x", mode="r")[:], [1, 1, 1, 1, 2, 2, 2, 2])


def test_resumable_store_without_done_record_is_rebuilt(tmp_path):
    url = str(tmp_path / "s.zarr")
    _prepare(url)
    release_writer_lock(url)
    del zarr.open_group(url, mode="r+", use_consolidated=False)[PROGRESS_GROUP]
    assert _prepare(url).pending == [0, 1]


def test_kill_between_complete_and_consolidation_is_tidied(tmp_path):
    """complete is set, but the progress record and consolidated metadata are not done: a rerun finishes them."""
    url = str(tmp_path / "s.zarr")
    state = _prepare(url)
    for unit in state.pending:
        mark_done(url, unit)
    zarr.open_group(url, mode="r+", use_consolidated=False).update_attributes({"complete": True})
    release_writer_lock(url)
    (tmp_path / "s.zarr" / "x" / "zarr.json.partial").write_bytes(b"half")
    assert inspect_existing(url, SCHEMA, SETTINGS, overwrite=False) == "complete"
    root = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())
    assert PROGRESS_GROUP not in zarr.open_group(url, mode="r", use_consolidated=False)
    assert "x" in root["consolidated_metadata"]["metadata"] and PROGRESS_GROUP not in root["consolidated_metadata"]["metadata"]
    assert not (tmp_path / "s.zarr" / "x" / "zarr.json.partial").exists()


def test_partial_files_removed_on_resume(tmp_path):
    url = str(tmp_path / "s.zarr")
    _prepare(url)
    release_writer_lock(url)
    leftover = tmp_path / "s.zarr" / "x" / "c" / "0.partial"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"x")
    _prepare(url)
    assert not leftover.exists()


def test_live_writer_lock_refuses_a_second_writer_and_stale_lock_is_taken_over(tmp_path):
    url = str(tmp_path / "s.zarr")
    lock = tmp_path / "s.zarr" / LOCK_FILE
    (tmp_path / "s.zarr").mkdir()
    # A writer holds its lock file's flock while it lives.
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl, os, sys, time; fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT); "
         f"os.write(fd, f'{{os.getpid()}} {os.uname().nodename}\\n'.encode()); fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid}"):
            _prepare(url)
    finally:
        holder.kill()
        holder.wait()
    # The holder is dead now: its lock is stale and is taken over.
    assert _prepare(url).pending == [0, 1]
    assert lock.read_text().split()[0] == str(os.getpid())


def test_a_lock_whose_pid_lives_on_without_its_flock_is_taken_over(tmp_path):
    """A killed writer not yet reaped (a zombie), or its pid given to another process since: the pid exists, but
    nobody holds the lock's flock, so the lock is stale."""
    url = str(tmp_path / "s.zarr")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "s.zarr").mkdir()
        (tmp_path / "s.zarr" / LOCK_FILE).write_text(f"{other.pid} {os.uname().nodename}\n")
        assert _prepare(url).pending == [0, 1]
        assert (tmp_path / "s.zarr" / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    finally:
        other.kill()
        other.wait()


def test_lock_is_reentrant_and_released(tmp_path):
    url = str(tmp_path / "s.zarr")
    acquire_writer_lock(url)
    acquire_writer_lock(url)
    release_writer_lock(url)
    assert not (tmp_path / "s.zarr" / LOCK_FILE).exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_folder_is_never_replaced(tmp_path, overwrite):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(StoreExistsError, match="not an imzarr store"):
        _prepare(str(folder), overwrite=overwrite)
    assert (folder / "notes.txt").read_text() == "keep me" and sorted(os.listdir(folder)) == ["notes.txt"]


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_store_of_another_kind_is_never_replaced(tmp_path, overwrite):
    other = tmp_path / "images.zarr"
    zarr.open_group(str(other), mode="w", zarr_format=3, attributes={"schema": "imzarr.images/1", "complete": True})
    before = _files(other)
    with pytest.raises(StoreExistsError, match=r"holds an imzarr.images/1 store, and this command writes imzarr.test stores; choose another output path"):
        _prepare(str(other), overwrite=overwrite)
    with pytest.raises(StoreExistsError, match="never replaced, even with --overwrite"):
        claim_report_output(str(other), SCHEMA, overwrite)
    assert _files(other) == before


def test_a_store_folder_that_also_holds_a_users_files_is_never_emptied(tmp_path):
    """`--overwrite` (and a report re-made) replace the store, not the notes and figures kept beside it in its folder."""
    url = str(tmp_path / "s.zarr")
    _run_to_completion(url)
    (tmp_path / "s.zarr" / "NOTES.md").write_text("keep me")
    (tmp_path / "s.zarr" / "figs").mkdir()
    (tmp_path / "s.zarr" / "figs" / "f.png").write_bytes(b"png")
    before = _files(tmp_path / "s.zarr")
    other = dict(SETTINGS, a=2)
    message = r"s\.zarr: also holds 2 entries that are not the store's \(NOTES\.md, figs\); replacing the store would delete them: move them out"
    with pytest.raises(StoreExistsError, match=message):
        prepare_store(url, SCHEMA, other, 2, _create, True)
    report = str(tmp_path / "r.zarr")
    zarr.open_group(report, mode="w", zarr_format=3, attributes={"schema": SCHEMA})
    (tmp_path / "r.zarr" / "mine.txt").write_text("keep me too")
    with pytest.raises(StoreExistsError, match=r"r\.zarr: also holds 1 entries that are not the store's \(mine\.txt\)"):
        claim_report_output(report, SCHEMA, False)
    assert _files(tmp_path / "s.zarr") == before and (tmp_path / "r.zarr" / "mine.txt").read_text() == "keep me too"
    # resuming or finding it complete touches nothing of theirs either
    assert _prepare(url).already_complete and _files(tmp_path / "s.zarr") == before
    os.remove(tmp_path / "s.zarr" / "NOTES.md")
    (tmp_path / "s.zarr" / "figs" / "f.png").unlink()
    (tmp_path / "s.zarr" / "figs").rmdir()
    # A node a killed writer left half-made (only zarr-python's temporary file in its folder) and a Finder file are not the user's.
    (tmp_path / "s.zarr" / "y").mkdir()
    (tmp_path / "s.zarr" / "y" / "zarr.3f2a.partial").write_bytes(b"{")
    (tmp_path / "s.zarr" / ".DS_Store").write_bytes(b"")
    assert prepare_store(url, SCHEMA, other, 2, _create, True).pending == [0, 1]  # only the store's own entries: replaced


def test_an_older_version_of_the_same_kind_is_replaced_only_with_overwrite(tmp_path):
    url = str(tmp_path / "s.zarr")
    zarr.open_group(url, mode="w", zarr_format=3, attributes={"schema": "imzarr.test/0", "complete": True})
    for check in (lambda: _prepare(url), lambda: claim_report_output(url, SCHEMA, False)):
        with pytest.raises(StoreExistsError, match="holds an imzarr.test/0 store, not imzarr.test/1; pass --overwrite"):
            check()
    claim_report_output(url, SCHEMA, True)
    assert _prepare(url, overwrite=True).pending == [0, 1]
    assert dict(zarr.open_group(url, mode="r").attrs)["schema"] == SCHEMA


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_overlapping_an_input_is_refused_before_anything_is_touched(tmp_path, overwrite):
    src = tmp_path / "in.zarr"
    _run_to_completion(str(src))
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    (tmp_path / "link.zarr").symlink_to(src)
    for output in (str(src), f"file://{src}", str(tmp_path / "link.zarr"), str(src / "inner.zarr"), str(tmp_path), str(tmp_path / "x" / ".." / "in.zarr")):
        with pytest.raises(OutputOverlapsInputError) as info:
            _prepare(output, overwrite=overwrite, inputs=[str(src)])
        assert "--overwrite" not in str(info.value)
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before


def test_memory_output_refused_where_it_would_vanish():
    with pytest.raises(UnsupportedOutputError, match="memory://"):
        refuse_process_bound_output("memory://x/y.zarr")
    check_output_location("memory://x/y.zarr")  # the Python API may use it


def test_mark_done_writes_the_chunk_zarr_would_write(tmp_path, monkeypatch):
    """Locally the done record's chunk file is written directly: the bytes zarr-python writes, read back by zarr."""
    import schemas.store_lifecycle as lifecycle
    from schemas.store_lifecycle import DONE_ARRAY, mark_done, read_done

    direct, via_zarr = str(tmp_path / "direct.zarr"), str(tmp_path / "zarr.zarr")
    for url in (direct, via_zarr):
        group = zarr.open_group(url, mode="w", zarr_format=3)
        group.create_array(DONE_ARRAY, shape=(6,), chunks=(1,), dtype="int8", fill_value=0, compressors=None)
    for unit in (4, 1):
        with monkeypatch.context() as direct_only:  # the local write must not go through zarr-python
            direct_only.setattr(lifecycle.zarr, "open_array", None)
            mark_done(direct, unit)
        zarr.open_array(via_zarr, path=DONE_ARRAY, mode="r+")[unit] = 1
    chunks = sorted(p.relative_to(tmp_path / "direct.zarr") for p in (tmp_path / "direct.zarr").rglob("c/*"))
    assert chunks == sorted(p.relative_to(tmp_path / "zarr.zarr") for p in (tmp_path / "zarr.zarr").rglob("c/*"))
    for chunk in chunks:
        assert (tmp_path / "direct.zarr" / chunk).read_bytes() == (tmp_path / "zarr.zarr" / chunk).read_bytes() == b"\x01"
    assert read_done(direct, 6).tolist() == [False, True, False, False, True, False]
    assert not list((tmp_path / "direct.zarr").rglob("*.partial"))
    memory = "memory://done-record.zarr"  # not local: zarr-python writes it
    zarr.open_group(memory, mode="w", zarr_format=3).create_array(DONE_ARRAY, shape=(2,), chunks=(1,), dtype="int8", fill_value=0, compressors=None)
    mark_done(memory, 1)
    assert read_done(memory, 2).tolist() == [False, True]


# Started 20 times at once: each process imports everything first, then waits for the go file and its own delay,
# so the `convert npz` runs start together or a few tens of ms apart — some inside every step of the first one's
# run (a lone run of this input takes about as long as the spread).
START_TOGETHER = r"""
import os, sys, time
go, delay, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
from schemas.cli.dispatch import main
import converter.convert, converter.sources.npz  # imported before the start, not during the race
open(go + f".{os.getpid()}.ready", "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
time.sleep(delay)
sys.exit(main(argv))
"""


def test_twenty_simultaneous_identical_converts_give_one_writer(tmp_path):
    """Exactly one of 20 identical `convert npz` started together converts; every other one is refused naming a
    live holder's pid, or finds the store complete; the store equals a lone run's. (The cause was a run that found
    the store complete once it held the lock, released the lock, then finished the store again and said
    "converted".)"""
    from converter.api import convert_npz
    from tests.support.store_equality import stores_identical
    from tests.support.synthetic import photo_like, write_npz_shard

    src = tmp_path / "src"
    src.mkdir()
    write_npz_shard(src / "train_data_batch_1.npz", photo_like(48, 16, seed=3), np.arange(48) % 7 + 1, compressed=True)
    convert_npz(str(src), str(tmp_path / "alone.zarr"), shard_size=16, workers=1)
    go = str(tmp_path / "go")
    args = ["convert", "npz", str(src), "-o", str(tmp_path / "out.zarr"), "--shard-size", "16", "--workers", "1"]
    procs = [subprocess.Popen([sys.executable, "-c", START_TOGETHER, go, str(0.04 * (i % 10)), *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(20)]
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("go.*.ready"))) < len(procs) and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None][:1]
            time.sleep(0.05)
        open(go, "w").close()
        results = [(p.pid, *p.communicate(timeout=120), p.returncode) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    pids = {pid for pid, *_ in results}
    converted = [pid for pid, out, _, rc in results if rc == 0 and "48 converted" in out]
    no_ops = [pid for pid, out, _, rc in results if rc == 0 and "already complete" in out]
    refused = [pid for pid, _, err, rc in results
               if rc == 1 and "is writing this store" in err and int(err.split("(pid ")[1].split()[0]) in pids - {pid}]
    assert len(converted) == 1 and len(no_ops) + len(refused) == 19, [(rc, out, err[-300:]) for _, out, err, rc in results]
    assert all("Traceback" not in err for _, _, err, _ in results)
    stores_identical(str(tmp_path / "alone.zarr"), str(tmp_path / "out.zarr"))
    assert not (tmp_path / "out.zarr" / LOCK_FILE).exists() and not list((tmp_path / "out.zarr").glob(f"{LOCK_FILE}*"))


# `imzarr convert` that, once its first look at the output is done, says so in a file and waits for the go file.
CONVERT_PAUSED_AFTER_FIRST_LOOK = r"""
import os, sys, time
signal_file, go, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
import converter.convert as convert
original, calls = convert.inspect_existing, []
def paused(*args, **kwargs):
    found = original(*args, **kwargs)
    if not calls:
        calls.append(found)
        open(signal_file, "w").close()
        while not os.path.exists(go):
            time.sleep(0.01)
    return found
convert.inspect_existing = paused
from schemas.cli.dispatch import main
sys.exit(main(argv))
"""


def test_a_run_that_finds_the_store_finished_by_another_does_nothing(tmp_path):
    """The cause of two "converted": a run saw no store, another run then made and finished it, and the first,
    taking the now free lock, found it complete — then released the lock, finished the store again and said
    "converted". It now says "already complete" and writes nothing."""
    from tests.support.synthetic import photo_like, write_npz_shard

    src = tmp_path / "src"
    src.mkdir()
    write_npz_shard(src / "train_data_batch_1.npz", photo_like(32, 16, seed=5), np.arange(32) % 5 + 1)
    args = ["convert", "npz", str(src), "-o", str(tmp_path / "out.zarr"), "--shard-size", "16", "--workers", "1"]
    looked, go = tmp_path / "looked", tmp_path / "go"
    late = subprocess.Popen([sys.executable, "-c", CONVERT_PAUSED_AFTER_FIRST_LOOK, str(looked), str(go), *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not looked.exists():
            assert late.poll() is None and time.monotonic() < deadline, late.communicate()
            time.sleep(0.05)
        first = run_imzarr(*args, cwd=tmp_path)
    finally:
        go.touch()
        out, err = late.communicate(timeout=120)
    assert first.returncode == 0 and "32 converted" in first.stdout, first.stderr
    assert late.returncode == 0 and "already complete" in out and "converted" not in out, (out, err)
    assert not list((tmp_path / "out.zarr").glob(f"{LOCK_FILE}*"))


def test_a_store_folder_without_metadata_says_whether_its_writer_runs(tmp_path):
    """A folder holding only a writer lock: a live writer's store is 'being made'; a dead writer's 'unfinished'."""
    from schemas.errors import StoreValidationError
    from schemas.remote_storage import read_store_root
    from schemas.store_lifecycle import LOCK_FILE, acquire_writer_lock, release_writer_lock

    url = str(tmp_path / "new.zarr")
    acquire_writer_lock(url)
    try:
        with pytest.raises(StoreValidationError, match="a store being made: a running command holds its writer lock"):
            read_store_root(url)
    finally:
        release_writer_lock(url)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "new.zarr" / LOCK_FILE).write_text(f"{gone.pid} {socket.gethostname()}\n")
    with pytest.raises(StoreValidationError, match="an unfinished store .*; re-run that command to resume it"):
        read_store_root(url)
