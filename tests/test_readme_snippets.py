"""README.md's Python blocks run as written: in order, in one namespace, next to sample stores made by the real CLI
(`imzarr sample`, `convert npz`, `extract --preset tiny-random`) at the paths the README uses; every reduction
they leave behind is finite."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from tests.conftest import REPO

README = REPO / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
SAMPLE_IMAGES = 200  # one train shard: enough for every class of the sample, quick through the tiny model
LAYERS = "encoder_bottleneck,midblock"


def python_blocks(markdown: str) -> list[str]:
    """The body of every ```python block, in document order."""
    return [m.group(1) for m in PYTHON_BLOCK.finditer(markdown)]


def imzarr(*args: str, cwd: Path) -> None:
    """Run the `imzarr` command (`python -m schemas` is the same entry point) and fail with its output."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "schemas", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"imzarr {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    """A folder holding data/sample.zarr and data/sample_acts.zarr, made as `make convert extract` makes them."""
    root = tmp_path_factory.mktemp("readme")
    imzarr("sample", "data/sample", "--per-shard", str(SAMPLE_IMAGES), "--train-shards", "1", "--val-size", "10", cwd=root)
    imzarr("convert", "npz", "data/sample/train", "-o", "data/sample.zarr", cwd=root)
    imzarr("extract", "data/sample.zarr", "-o", "data/sample_acts.zarr", "--preset", "tiny-random", "--layers", LAYERS, cwd=root)
    return root


def run_blocks(blocks: list[str], cwd: Path) -> dict:
    """Execute the blocks in one namespace with `cwd` as the working directory; return the namespace."""
    namespace: dict = {"__name__": "__readme__"}
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        for number, block in enumerate(blocks, 1):
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
    finally:
        os.chdir(previous)
    return namespace


def assert_reductions_finite(namespace: dict) -> None:
    """Every xarray result the blocks left behind, computed: no NaN or inf in any float variable."""
    for name, value in namespace.items():
        if isinstance(value, xr.DataArray):
            value = value.to_dataset(name=name if value.name is None else value.name)
        if not isinstance(value, xr.Dataset):
            continue
        for var_name, var in value.variables.items():
            if var.dtype.kind == "f":
                values = np.asarray(var.compute().values) if hasattr(var, "compute") else np.asarray(var.values)
                assert np.isfinite(values).all(), f"README leaves {name}.{var_name} with NaN/inf"


def test_readme_python_blocks_run(sample_dir):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README.md has no ```python blocks"
    namespace = run_blocks(blocks, sample_dir)
    assert_reductions_finite(namespace)


def test_block_extraction():
    text = "intro\n```python\na = 1\n```\n```sh\nls\n```\n```python\nb = a + 1\n```\n"
    assert python_blocks(text) == ["a = 1\n", "b = a + 1\n"]
    assert run_blocks(python_blocks(text), Path.cwd())["b"] == 2
