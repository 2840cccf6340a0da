"""The CPU's one-pass float32 → float16 cast with NaN/Inf flags: torch's bits and torch's flags."""

import numpy as np
import torch

from extractor.cast_cpu import cast_to_float16
from extractor.shard_forward import nonfinite_rows


def every_exponent_with_edge_mantissas() -> np.ndarray:
    """float32 bit patterns: both signs, all 256 exponents, mantissas around float16's rounding points (ties, their
    neighbours, the carries into the next exponent) and random ones: 2 × 256 × 64 values."""
    rng = np.random.default_rng(0)
    low = np.array([0, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x2001, 0x3000, 0x7FFFFF, 0x7FE000, 0x7FF000, 0x7FEFFF, 0x400000, 0x3FF000, 0x3FEFFF], dtype=np.uint32)
    mantissas = np.concatenate([low, rng.integers(0, 1 << 23, 48, dtype=np.uint32)])
    exponents = np.arange(256, dtype=np.uint32) << 23
    bits = (exponents[:, None] | mantissas[None, :]).ravel()
    return np.concatenate([bits, bits | np.uint32(0x80000000)])


def test_bits_equal_torch_for_every_exponent_and_rounding_point():
    bits = every_exponent_with_edge_mantissas()
    src = bits.view(np.float32).reshape(128, -1)
    dst = np.empty(src.shape, np.float16)
    cast_to_float16(src, dst)
    want = torch.from_numpy(src).half().numpy()
    nan = np.isnan(src)
    np.testing.assert_array_equal(dst.view(np.uint16)[~nan], want.view(np.uint16)[~nan])
    assert np.isnan(dst[nan]).all()


def test_flags_equal_the_check_after_a_torch_cast():
    values = torch.randn(6, 3, 4, 4) * 1000
    values[1, 0, 0, 0] = 65519.0  # rounds to 65504: finite
    values[2, 1, 2, 3] = 65520.0  # the tie above 65504 rounds to Inf
    values[3, 2, 0, 1] = float("nan")
    values[4, 0, 3, 3] = -float("inf")
    values[5, 2, 2, 2] = -1e30
    dst = np.empty(values.shape, np.float16)
    flags = cast_to_float16(values.numpy(), dst)
    assert flags.tolist() == nonfinite_rows(values.half()).tolist() == [False, False, True, True, True, True]
    np.testing.assert_array_equal(dst[[0, 1]], values[[0, 1]].half().numpy())
