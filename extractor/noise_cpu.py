"""`extractor.noise`'s recipe as one compiled loop for the CPU (numba), bit-identical to its torch ops.

The torch implementation runs each of the recipe's ~110 elementwise steps as its own pass over memory; on CPU
that made noise most of an extraction's non-network time (measured: 9,500-11,000 img/s on one core at 64×64).
Here every step of one (cos, sin) pair happens in registers, in the same order and precision: the same
correctly rounded float32 operations with float32 constants, the same exact integer and float64-bit steps, so
the output bits equal the torch path's (tests/test_noise.py checks both against the pinned table and each other).
numba compiles without fast-math, so no multiply-add is fused and nothing is reordered.
"""

from __future__ import annotations

import math
import struct

import numpy as np

import numba

_F32 = np.float32
_U64 = np.uint64
_GAMMA = _U64(0x9E3779B97F4A7C15)
_MIX_1 = _U64(0xBF58476D1CE4E5B9)
_MIX_2 = _U64(0x94D049BB133111EB)
_SQRT2_MANTISSA = int.from_bytes(struct.pack("<d", math.sqrt(2.0)), "little") & ((1 << 52) - 1)
# The torch ops take Python floats, which become float32 for float32 tensors: the same float32 values here.
_HALF_PI = _F32(math.pi / 2)
_SQRT_HALF = _F32(math.sqrt(0.5))
_LN2 = _F32(math.log(2.0))
_SIN = tuple(_F32((-1) ** k / math.factorial(2 * k + 1)) for k in range(5))
_COS = tuple(_F32((-1) ** k / math.factorial(2 * k)) for k in range(6))
_ATANH = tuple(_F32(1.0 / (2 * k + 1)) for k in range(6))


# No fastmath anywhere: IEEE semantics, no contraction into fused multiply-adds.
@numba.njit(inline="always", error_model="numpy")
def _horner(t: np.float32, coefficients: tuple) -> np.float32:  # pragma: no cover - runs compiled
    """Σ cₖ tᵏ by Horner's rule, one rounded multiply and one rounded add per step (as the torch ops do)."""
    acc = coefficients[-1]
    for k in range(len(coefficients) - 2, -1, -1):
        acc = acc * t + coefficients[k]
    return acc


@numba.njit(nogil=True, error_model="numpy")  # nogil: worker threads run it in parallel
def _gaussian_pairs(keys: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - runs compiled
    """out[n, pairs, 2] float32 ← the recipe's (r cos θ, r sin θ) for SplitMix64 words 0..pairs−1 of each key."""
    one32, half32, two32 = _F32(1.0), _F32(0.5), _F32(2.0)
    scale22 = _F32(2.0**-22)
    mantissa = _U64((1 << 52) - 1)
    exponent_one = _U64(1023 << 52)
    above_sqrt2 = _U64((1 << 52) - _SQRT2_MANTISSA)
    n, pairs = out.shape[0], out.shape[1]
    # Two plain arrays, interleaved afterwards: stores of stride 2 kept LLVM from vectorizing the loop (measured).
    even = np.empty(pairs, np.float32)
    odd = np.empty(pairs, np.float32)
    for i in range(n):
        key = _U64(keys[i])
        for j in range(pairs):
            z = key + _U64(j + 1) * _GAMMA
            z = (z ^ (z >> _U64(30))) * _MIX_1
            z = (z ^ (z >> _U64(27))) * _MIX_2
            z = z ^ (z >> _U64(31))
            # angle
            x = _F32((z >> _U64(8)) & _U64((1 << 22) - 1))
            x = (((x + half32) * scale22) - half32) * _HALF_PI
            x2 = x * x
            s = _horner(x2, _SIN) * x
            c = _horner(x2, _COS)
            u = (c - s) * _SQRT_HALF
            v = (c + s) * _SQRT_HALF
            swap = (z >> _U64(30)) & _U64(1)
            w = _F32(swap)
            first = v * w
            second = u * w
            w = -(w - one32)
            first = first + u * w
            second = second + v * w
            high = (z >> _U64(31)) & _U64(1)
            first = first * (_F32(swap ^ high) * _F32(-2.0) + one32)
            second = second * (_F32(high) * _F32(-2.0) + one32)
            # radius
            a1 = ((z >> _U64(32)) & _U64(0xFFFFFFFF)) + _U64(1)
            bits = np.float64(a1).view(np.uint64)
            e = np.int64(bits >> _U64(52))
            frac = bits & mantissa
            halve = (frac + above_sqrt2) >> _U64(52)
            e = e + np.int64(halve) - np.int64(1023 + 32)
            f = _F32(_U64((frac | exponent_one) - (halve << _U64(52))).view(np.float64))
            t = (f - one32) / (f + one32)
            t2 = t * t
            a = _horner(t2, _ATANH) * t
            r = np.sqrt((_F32(e) * _LN2 + a * two32) * _F32(-2.0))
            even[j] = first * r
            odd[j] = second * r
        for j in range(pairs):
            out[i, j, 0] = even[j]
            out[i, j, 1] = odd[j]


def gaussian_pairs(keys: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Fill out[n, pairs, 2] (float32, C-contiguous) from int64 keys (uint64 bits); returns `out`."""
    _gaussian_pairs(np.ascontiguousarray(keys).view(np.uint64), out)
    return out
