"""Fault injection shared by the crash tests: a command that kills its own process at a named lifecycle step."""

# Runs one imzarr command, killing its own process at the named step (argv: step, count, the command's arguments).
# Fault injection wraps our lifecycle functions (and zarr's array creation, the first write after the group exists;
# the converter's stage-1 task, for a kill while sources are read into scratch); nothing is replaced. A named step
# is deterministic: the kill lands at the same point of every run, whatever the machine's speed.
KILL_AT_STEP = r"""
import os, signal, sys, threading
step, count, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
import zarr
import schemas.store_lifecycle as lifecycle

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def wrap(owner, name, before=None, after=None):
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        if before and before():
            die()
        result = original(*args, **kwargs)
        if after and after(result):
            die()
        return result
    setattr(owner, name, wrapper)

calls = {"n": 0}
def nth_call(*_):
    calls["n"] += 1
    return calls["n"] == count

if step == "after_group_create":
    wrap(zarr.Group, "create_array", before=lambda: True)
elif step == "after_attrs":
    wrap(lifecycle, "prepare_store", after=lambda state: not state.already_complete)
elif step == "after_shard":
    wrap(lifecycle, "mark_done", after=nth_call)
elif step == "after_complete":
    wrap(lifecycle, "_drop_progress_and_consolidate", before=lambda: True)
elif step == "before_consolidate":
    wrap(zarr, "consolidate_metadata", before=lambda: True)
elif step == "before_lock_release":
    wrap(lifecycle, "release_writer_lock", before=lambda: True)
elif step == "after_part":  # the count-th source part written to scratch, before the store exists
    import converter.convert
    wrap(converter.convert, "_materialize_one", after=nth_call)
elif step == "random":
    threading.Timer(count / 1000, die).start()
from schemas.cli.dispatch import main
sys.exit(main(argv))
"""
