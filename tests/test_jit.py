"""The compiled CPU kernels: cached on disk where numba can, still compiled where it cannot."""

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

