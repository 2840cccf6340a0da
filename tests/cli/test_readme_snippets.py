"""README.md's Python blocks run as written: each in a fresh namespace of its own (so no block leans on another's
variables), in document order, next to the stores the README's `make` steps make, made here by the real CLI
(`imzarr sample`, `convert npz`, `extract --preset tiny-random`, and `make compare`'s generate/extract/compare at
a smaller size) at the paths the README uses; every float result a block leaves behind is finite."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from converter.sample import SAMPLE_WNIDS
from tests.support.commands import checkout_env, run_imzarr
from tests.support.locations import REPO

README = REPO / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
SAMPLE_IMAGES = 200  # one train shard: enough for every class of the sample, quick through the tiny model
LAYERS = "encoder_bottleneck,midblock"
# `make compare` uses 100 per class of all 10 sample classes; 6 of 3 keep every per-class k-NN metric (k = 5)
# defined and the fixture quick (generation and feature extraction are most of its time).
PER_CLASS = 6
COMPARE_CLASSES = ",".join(SAMPLE_WNIDS[:3])


def python_blocks(markdown: str) -> list[str]:
    """The body of every ```python block, in document order."""
    return [m.group(1) for m in PYTHON_BLOCK.finditer(markdown)]


def imzarr(*args: str, cwd: Path) -> None:
    """Run the `imzarr` command (`python -m schemas` is the same entry point) and fail with its output."""
    imzarr_together([list(args)], cwd=cwd)


# Runs `imzarr` command lines one after another in one process, through the same entry point as the console
# script, stopping at the first that fails: one torch import for a whole chain of commands.
_CHAIN = """
import sys, json
from schemas.cli.dispatch import main
for argv in json.loads(sys.argv[1]):
    code = main(argv)
    if code:
        sys.exit(f"imzarr {' '.join(argv)}: exit code {code}")
"""


def imzarr_together(*chains: list[list[str]], cwd: Path) -> None:
    """Run chains of `imzarr` commands, the chains side by side and each chain's commands in order; fail with the
    output of any chain that failed."""
    env = checkout_env()
    running = [
        (chain, subprocess.Popen([sys.executable, "-c", _CHAIN, json.dumps(chain)], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for chain in chains
    ]
    for chain, process in running:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, f"{' ; '.join('imzarr ' + ' '.join(argv) for argv in chain)} failed:\n{out}\n{err}"


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    """A folder holding data/ as `make convert extract compare` leaves it (smaller): the sample, its image store,
    its activations, generated images, both feature stores and the compare report."""
    root = tmp_path_factory.mktemp("readme")
    model = ["--preset", "tiny-random"]
    features = [*model, "--layers", "midblock", "--sigma", "0.5", "--pool", "mean"]  # the Makefile's CMP_ARGS
    imzarr("sample", "data/sample", "--per-shard", str(SAMPLE_IMAGES), "--train-shards", "1", "--val-size", "10", cwd=root)
    imzarr("convert", "npz", "data/sample/train", "-o", "data/sample.zarr", cwd=root)
    imzarr_together(
        [["extract", "data/sample.zarr", "-o", "data/sample_acts.zarr", *model, "--layers", LAYERS]],
        [  # `make compare`, in its order
            ["generate", "-o", "data/generated.zarr", *model, "--per-class", str(PER_CLASS), "--classes", COMPARE_CLASSES],
            ["extract", "data/sample.zarr", "-o", "data/real_feats-own.zarr", *features, "--per-class", str(PER_CLASS), "--classes", COMPARE_CLASSES],
            ["extract", "data/generated.zarr", "-o", "data/generated_feats-own.zarr", *features],
            ["compare", "data/real_feats-own.zarr", "data/generated_feats-own.zarr", "--layer", "midblock", "-o", "data/compare-own.zarr"],
        ],
        cwd=root,
    )
    return root


def run_blocks(blocks: list[str], cwd: Path) -> list[dict]:
    """Execute each block in a fresh namespace with `cwd` as the working directory; return the namespaces."""
    namespaces = []
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        for number, block in enumerate(blocks, 1):
            namespace: dict = {"__name__": "__readme__"}
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
            namespaces.append(namespace)
    finally:
        os.chdir(previous)
    return namespaces


def assert_reductions_finite(namespace: dict, block: int) -> int:
    """Every xarray or numpy float result a block left behind, computed: no NaN or inf. Returns how many were
    checked."""
    checked = 0
    for name, value in namespace.items():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            assert np.isfinite(value).all(), f"README python block {block} leaves {name} with NaN/inf"
            checked += 1
            continue
        if isinstance(value, xr.DataArray):
            value = value.to_dataset(name=name if value.name is None else value.name)
        if not isinstance(value, xr.Dataset):
            continue
        for var_name, var in value.variables.items():
            if var.dtype.kind == "f":
                values = np.asarray(var.compute().values) if hasattr(var, "compute") else np.asarray(var.values)
                assert np.isfinite(values).all(), f"README python block {block} leaves {name}.{var_name} with NaN/inf"
                checked += 1
    return checked


def test_readme_python_blocks_run(sample_dir):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 6, "README.md lost its ```python blocks"
    namespaces = run_blocks(blocks, sample_dir)
    checked = [assert_reductions_finite(namespace, number) for number, namespace in enumerate(namespaces, 1)]
    # The check has something to check: the analysis and report blocks leave float results behind.
    assert sum(count > 0 for count in checked) >= 3, checked


def test_info_prints_non_ascii_text_as_itself(sample_dir):
    """`imzarr info` on an activation store: the noise formula reads `r cos θ` (not a JSON `\\u03b8` escape), and the
    model's sha256 is printed."""
    done = run_imzarr("info", "data/sample_acts.zarr", cwd=sample_dir, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "r cos θ" in done.stdout and "\\u" not in done.stdout
    recorded = xr.open_zarr(sample_dir / "data/sample_acts.zarr").attrs["model"]["sha256"]
    assert f"sha256       {recorded}  (of the preset state dict)" in done.stdout.splitlines()


def test_blocks_run_in_fresh_namespaces():
    text = "intro\n```python\na = 1\n```\n```sh\nls\n```\n```python\nb = 2\n```\n```python\nc = a + 1\n```\n"
    blocks = python_blocks(text)
    assert blocks == ["a = 1\n", "b = 2\n", "c = a + 1\n"]
    first, second = run_blocks(blocks[:2], Path.cwd())
    assert first["a"] == 1 and second["b"] == 2 and "a" not in second
    with pytest.raises(NameError):
        run_blocks(blocks, Path.cwd())  # a block that uses an earlier block's variable fails, as in a fresh session
