"""Seeded random weights whose bits depend on (seed, tensor, shape) alone: one rule for every preset family.

Rule: the tensor at position i of a network's `state_dict()` is drawn from the word
stream of extractor/noise.py's counter-based recipe with key(seed, i) = mix(mix(seed + γ) ^ i) and words
w_j = mix(key + (j + 1)·γ) (SplitMix64, all integer arithmetic modulo 2⁶⁴):

    standard normals: `noise.per_sample_noise(seed, [i], shape)`, the recipe's Box-Muller pairs in flat C order
    uniforms in [0, 1): u_j = (w_j >> 40) / 2²⁴ for j < numel, the top 24 bits of word j (exact in float32)

Each family then maps the draw to its weights with correctly rounded float32 operations only (+, −, ×, ÷, sqrt,
by Python-float constants rounded once to float32), never torch's exp/log/sin, whose last bits differ between
builds. torch's random number generators are never used (neither read nor advanced): torch's CPU `randn` takes
a different vectorised path, and so different bits, per build and CPU capability, where these draws do not.
So a preset's weights are bit-identical on every machine, CPU, torch build and Python version; the pinned
state-dict hashes in tests/extractor/test_seeded_weights.py (dmd2-imagenet64's in tests/extractor/test_edm_model.py) hold every lane
to it. ("Identical" covers the weights; activations computed from them still differ in the last bits between
builds and devices, as any float math does.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from extractor import noise_cpu
from extractor.noise import sample_keys

__all__ = ["draw", "standard_normal", "uniform"]


def standard_normal(seed: int, index: int, shape: Sequence[int]) -> torch.Tensor:
    """float32 CPU N(0, 1) draws of `shape` for state-dict tensor `index`: `per_sample_noise(seed, [index], shape)`.

    Called straight on the recipe's compiled kernel (one key, no per-call work buffers): the same bits as
    `per_sample_noise` (tested), without its set-up cost, which dominated for hundreds of small tensors.
    """
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    pairs = -(-numel // 2)
    keys = sample_keys(seed, torch.tensor([index], dtype=torch.int64)).numpy()
    flat = np.empty((1, pairs, 2), np.float32)
    noise_cpu.gaussian_pairs(keys, flat)
    return torch.from_numpy(flat.reshape(-1)[:numel].reshape(shape).copy() if numel % 2 else flat.reshape(shape))


def uniform(seed: int, index: int, shape: Sequence[int]) -> torch.Tensor:
    """float32 CPU U[0, 1) draws of `shape` for state-dict tensor `index`: word j's top 24 bits / 2²⁴."""
    shape = tuple(int(s) for s in shape)
    key = int(sample_keys(seed, torch.tensor([index], dtype=torch.int64))[0])
    out = torch.empty(shape, dtype=torch.float32)
    noise_cpu.uniform24(key, out.numpy())  # compiled; its bits are the torch ops' (tests/extractor/test_seeded_weights.py)
    return out


def draw(seed: int, index: int, shape: Sequence[int], distribution: str) -> torch.Tensor:
    """`standard_normal` ("normal") or `uniform` ("uniform") draws for state-dict tensor `index`."""
    if distribution == "normal":
        return standard_normal(seed, index, shape)
    if distribution == "uniform":
        return uniform(seed, index, shape)
    raise ValueError(f"distribution must be 'normal' or 'uniform', got {distribution!r}")
