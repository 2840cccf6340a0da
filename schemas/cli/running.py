"""Runs one command body: every error becomes one line `PROG: error: PATH: REASON` and an exit code.

Exit codes: 0 done; 2 bad input or options (ImzarrError, argparse); 1 a run that failed (RunFailedError, an
operating-system error such as a full disk or a read-only folder, an unexpected error); 130 interrupted.
A traceback is printed only with `--debug`.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Callable, NoReturn

from schemas.api import ImzarrError, RunInterruptedError, translate_remote_error


def resumed_note(total: int, before: int) -> str:
    """' (N in this run, resuming one that had written M)' for a run that resumed a killed one's store, else ''."""
    return f" ({total - before} in this run, resuming one that had written {before})" if before else ""


def run_command(prog: str, body: Callable[[], int | None], debug: bool = False) -> int:
    """Run `body`; turn what it raises into one line on stderr and an exit code."""
    try:
        return int(body() or 0)
    except ImzarrError as exc:
        if debug:
            raise
        _say(prog, str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        interrupted = RunInterruptedError()
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return interrupted.exit_code
    except BrokenPipeError:
        # The reader of our output went away (`imzarr layers … | head`): nothing more to say, nothing failed.
        _silence_stdout()
        return 0
    except OSError as exc:
        if debug:
            raise
        if exc.filename is None:
            _say(prog, str(exc))
        else:
            where = os.fsdecode(exc.filename) if isinstance(exc.filename, bytes) else exc.filename
            _say(prog, f"{where}: {exc.strerror or exc}")
        return 1
    except MemoryError:
        if debug:
            raise
        _say(prog, "out of memory (try a smaller --batch-size or --shard-size)")
        return 1
    except Exception as exc:  # noqa: BLE001 — the last line of defence: one line instead of a traceback
        if debug:
            raise
        remote = translate_remote_error(exc)  # an object store that timed out or cannot be reached
        if remote is not None:
            _say(prog, str(remote))
            return remote.exit_code
        _say(prog, f"unexpected {type(exc).__name__}: {exc} (re-run with --debug for the traceback)")
        return 1


def _say(prog: str, message: str) -> None:
    first, *rest = message.strip().splitlines() or [""]
    print(f"{prog}: error: {first}" + (" …" if rest else ""), file=sys.stderr)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def run_main(prog: str, main: Callable[[], int | None]) -> NoReturn:
    """Run a command's `main` and exit with its code; Ctrl-C while it is still importing and parsing (before
    `run_command` is in charge) is the same one line as later, not an import traceback."""
    try:
        code = main()
    except KeyboardInterrupt:
        interrupted = RunInterruptedError()
        print(f"{prog}: {interrupted}", file=sys.stderr)
        code = interrupted.exit_code
    exit_process(code)


def exit_process(code: int | None) -> NoReturn:
    """Exit a command's process with `code`, sparing it the interpreter's final garbage collections.

    Those walk every object numpy, zarr, dask and torch created at import (a noticeable share of a short command);
    frozen objects are left out, and nothing of ours relies on garbage collection at exit.
    """
    gc.freeze()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    sys.exit(code)
