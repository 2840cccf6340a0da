"""The compiled CPU kernels: cached on disk where numba can, still compiled where it cannot."""

import os
import subprocess
import sys

import numba
import pytest

from extractor.jit import cached_njit


def test_numba_refuses_to_cache_a_function_without_a_source_file():
    namespace: dict = {}
    exec("def add_one(x):\n    return x + 1\n", namespace)
    with pytest.raises(RuntimeError, match="no locator available"):
        numba.njit(cache=True)(namespace["add_one"])


def test_cached_njit_compiles_where_numba_cannot_cache():
    namespace: dict = {}
    exec("def add_one(x):\n    return x + 1\n", namespace)  # no file beside it, so nowhere to cache
    assert cached_njit(nogil=True)(namespace["add_one"])(41) == 42


def test_shipped_kernels_leave_a_cache_a_later_process_loads(tmp_path):
    """The noise, uniform-weight, input and cast kernels, run once, leave numba's cache files (in NUMBA_CACHE_DIR, numba's own
    setting); a second process loads them instead of compiling."""
    run = (
        "import numpy as np, torch\n"
        "from extractor.cast_cpu import cast_to_float16, _cast_rows\n"
        "from extractor.noise_cpu import noised_input, uniform24, _gaussian_pairs, _noised_input, _uniform24\n"
        "from extractor.noise import NoiseGenerator\n"
        "noise = NoiseGenerator(0, (3, 8, 8), 'cpu', compiled=True)(np.arange(2), out=torch.empty(2, 3, 8, 8))\n"
        "noised_input(np.zeros((2, 3, 8, 8), np.uint8), noise.numpy(), 0.5, np.empty((2, 3, 8, 8), np.float32))\n"
        "cast_to_float16(np.ones((2, 4), np.float32), np.empty((2, 4), np.float16))\n"
        "uniform24(5, np.empty(6, np.float32))\n"
        "kernels = (_cast_rows, _gaussian_pairs, _noised_input, _uniform24)\n"
        "print(sum(k.stats.cache_hits.get(s, 0) for k in kernels for s in k.signatures))\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", run], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    cached = sorted(p.name.split("-")[0] for p in tmp_path.rglob("*.nbi"))
    assert cached == ["cast_cpu._cast_rows", "noise_cpu._gaussian_pairs", "noise_cpu._noised_input", "noise_cpu._uniform24"]
    second = subprocess.run([sys.executable, "-c", run], env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert (first.stdout.strip(), second.stdout.strip()) == ("0", "4")
