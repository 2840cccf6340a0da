"""The `imzarr` command run as a user runs it: a child process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

from tests.support.locations import REPO


def checkout_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's environment) with this checkout first on PYTHONPATH, so that a child
    process runs the code under test even where another checkout is installed."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_imzarr(*args: object, cwd: object = None, env: Mapping[str, str] | None = None, timeout: float | None = 600) -> "subprocess.CompletedProcess[str]":
    """The `imzarr` command (`python -m schemas`, what the console script runs) in a child process, output
    captured. `env`: the child's environment (default: this process's), this checkout first on PYTHONPATH."""
    return subprocess.run([sys.executable, "-m", "schemas", *map(str, args)], cwd=cwd, env=checkout_env(env), capture_output=True, text=True, timeout=timeout)
