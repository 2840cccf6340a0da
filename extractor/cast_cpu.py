"""float32 activations to float16 storage on the CPU, with each row's NaN/Inf flag, in one compiled pass (numba).

On CPU the cast and the check were two torch passes plus a scratch buffer: ~1.2 MB of memory traffic per image
for two (768, 8, 8) layers, in a pipeline whose unpooled rate is bound by memory traffic. Here each value is
read once, rounded to float16 by integer arithmetic (round to nearest, ties to even, as IEEE 754 and torch's
conversion do; equal to torch's `.half()` for every one of the 2³² float32 inputs but NaNs, checked once over
all of them, and NaN stays NaN), stored, and folded into the row's largest magnitude (bits ≥ 0x7C00: Inf or NaN).
"""

from __future__ import annotations

import numba
import numpy as np

from extractor.jit import cached_njit

_U32 = np.uint32
_SIGN = _U32(0x80000000)
_AT_LEAST_65536 = _U32(0x47800000)  # float32 bits of 2¹⁶: from here on float16 overflows to Inf
_BELOW_NORMAL = _U32(0x38800000)  # float32 bits of 2⁻¹⁴, float16's smallest normal
_FLOAT32_INF = _U32(0x7F800000)
_HALF = np.float32(0.5)
_HALF_BITS = _U32(0x3F000000)
_REBIAS_AND_ROUND = _U32(0xC8000FFF)  # exponent −112 (127 → 15) plus 0xFFF, just under half of float16's last place


@numba.njit(inline="always", error_model="numpy")
def _half_bits(x: np.float32) -> np.uint16:  # pragma: no cover - runs compiled
    f = np.float32(x).view(np.uint32)
    sign = _U32(f & _SIGN)
    f = _U32(f ^ sign)
    if f >= _AT_LEAST_65536:
        out = _U32(0x7E00) if f > _FLOAT32_INF else _U32(0x7C00)  # NaN stays (a quiet) NaN; the rest is Inf
    elif f < _BELOW_NORMAL:
        # subnormal or zero: adding 0.5 puts float16's last place at float32's, where the float add rounds it
        out = _U32(np.float32(f.view(np.float32) + _HALF).view(np.uint32) - _HALF_BITS)
    else:
        odd = _U32((f >> _U32(13)) & _U32(1))  # the kept mantissa's last bit: ties go to even
        out = _U32(_U32(_U32(f + _REBIAS_AND_ROUND) + odd) >> _U32(13))
    return np.uint16(_U32(out | _U32(sign >> _U32(16))))


@cached_njit(nogil=True, error_model="numpy")  # nogil: worker threads run it in parallel
def _cast_rows(src: np.ndarray, dst: np.ndarray, nonfinite: np.ndarray) -> None:  # pragma: no cover - runs compiled
    n, m = src.shape
    for i in range(n):
        largest = np.uint16(0)
        for j in range(m):
            h = _half_bits(src[i, j])
            dst[i, j] = h
            largest = max(largest, np.uint16(h & np.uint16(0x7FFF)))
        nonfinite[i] = largest >= np.uint16(0x7C00)


def cast_to_float16(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """dst ← float16(src) for float32 [n, …] → float16 [n, …] (C-contiguous); returns each row's NaN/Inf flag (after
    the cast: finite values from 65520 up become Inf)."""
    n = src.shape[0]
    nonfinite = np.empty(n, np.bool_)
    _cast_rows(src.reshape(n, -1), dst.reshape(n, -1).view(np.uint16), nonfinite)
    return nonfinite
