"""numba's `njit` with its on-disk cache: a kernel is compiled once per machine, not in every process.

The cache sits beside the package, or in numba's user-wide cache where the package is read-only. Where neither
can be written (a read-only install and no writable home), numba refuses caching at import time: the kernels
then compile in each process instead, as they did before caching.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba


def cached_njit(**options: Any) -> Callable[[Callable], Callable]:
    """`numba.njit(cache=True, **options)`, falling back to `numba.njit(**options)` without a cache location."""

    def compile_kernel(function: Callable) -> Callable:
        try:
            return numba.njit(cache=True, **options)(function)
        except RuntimeError as exc:
            if "no locator available" not in str(exc):  # numba's words for "nowhere to keep a cache"
                raise
            return numba.njit(**options)(function)

    return compile_kernel
