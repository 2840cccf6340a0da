"""The `imzarr` command run as a user runs it: a child process."""

from __future__ import annotations

import subprocess
import sys


def run_imzarr(*args: object, cwd: object = None) -> "subprocess.CompletedProcess[str]":
    """The `imzarr` command (`python -m schemas`, what the console script runs) in a child process, output captured."""
    return subprocess.run([sys.executable, "-m", "schemas", *map(str, args)], cwd=cwd, capture_output=True, text=True)
