"""The Makefile's commands as make would run them (`make -n`: printed, not run)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def planned(*args: str) -> list[list[str]]:
    """The imzarr command lines `make -n ARGS` would run, split as the shell splits them."""
    if shutil.which("make") is None:
        pytest.skip("no make here")
    done = subprocess.run(["make", "-n", *args, f"PYTHON={sys.executable}"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [shlex.split(line) for line in done.stdout.splitlines() if "/bin/imzarr " in line]


def test_a_checkpoint_path_with_spaces_is_one_argument_and_names_the_outputs():
    extract = next(cmd for cmd in planned("extract", "CHECKPOINT=/weights/run 7/checkpoint_model_001000/") if cmd[1] == "extract")
    assert extract[extract.index("--checkpoint") + 1] == "/weights/run 7/checkpoint_model_001000/"
    assert extract[extract.index("-o") + 1] == "data/sample_acts-checkpoint_model_001000.zarr"
