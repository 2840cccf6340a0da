"""Per-sample Gaussian noise that depends only on (seed, global_index), made on the compute device.

Recipe `NOISE_RECIPE` ("splitmix64-box-muller/2"), all integer arithmetic modulo 2⁶⁴, γ = 0x9E3779B97F4A7C15:

    mix(z)      = SplitMix64's output function: z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27;
                  z *= 0x94D049BB133111EB; z ^= z >> 31
    key(s, g)   = mix(mix(s + γ) ^ g)                       (s = seed, g = global_index, both as uint64)
    w_j         = mix(key + (j + 1)·γ)                      (the j-th output of SplitMix64 seeded with key)
    a, c        = w_j >> 32, (w_j >> 8) mod 2²⁴
    r           = sqrt(−2 ln u),  u = (a + 1) / 2³² ∈ (0, 1]
    θ           = 2π (c + ½) / 2²⁴
    noise[2j]   = r cos θ,  noise[2j + 1] = r sin θ          (flat C order of the per-sample shape)

The integers live in int64 tensors (torch has no uint64 arithmetic): the same bits, with multiplication wrapping
modulo 2⁶⁴ on CPU and CUDA alike, and right shifts masked to be logical. The float part uses only IEEE-754
correctly rounded operations (+, −, ×, ÷, sqrt, conversions; never a device's own log/sin/cos, which differ by
ULPs between CPU and CUDA), each as its own elementwise op, in float32 except one exact step: a + 1 is split into
f·2ᵉ through an integer view of its float64 bits, and f is then rounded once to float32. So the bits are the same
on every device, batch size, order and worker count (the pinned values in tests/extractor/test_noise.py hold any device to
it); they lie within 3e-6 of the exact values of the formula above.

torch's own float32 sqrt is not correctly rounded on x86 CPUs (it goes through MKL, whose results are sometimes
one ULP off; BENCHMARKS.md), so the radius's sqrt is made exact here (`sqrt_correctly_rounded_`). The recipe's
name carries a version because a store records it and a resume must add the same bits: a store of any other
recipe is refused on resume. On CPU the recipe runs compiled (`extractor.noise_cpu`, several times the torch
ops' speed; BENCHMARKS.md); its bits equal these ops' (tested).

    ln u  = (e − 32)·ln 2 + 2·atanh(t),  a + 1 = f·2ᵉ with f ∈ [√½, √2),  t = (f − 1)/(f + 1),
            atanh(t) = t·Σₖ₌₀⁵ t²ᵏ/(2k + 1)                       (|t| ≤ 0.172: truncation < 1e-10)
    θ     = q·π/2 + π/4 + x,  q = c >> 22,  x = ((c mod 2²² + ½)/2²² − ½)·π/2 ∈ (−π/4, π/4)
    sin x = x·Σₖ₌₀⁴ (−x²)ᵏ/(2k + 1)!,  cos x = Σₖ₌₀⁵ (−x²)ᵏ/(2k)!      (truncation < 3e-9)
    cos θ, sin θ = the quadrant-q rotation of ((cos x − sin x)·√½, (cos x + sin x)·√½)
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from extractor import noise_cpu

NOISE_RECIPE = "splitmix64-box-muller/2"
# Generation draws ε from another stream of the same recipe (generation_noise_seed): older generated stores
# record NOISE_RECIPE and are refused on resume.
GENERATION_NOISE_RECIPE = NOISE_RECIPE + ", generation stream"
GENERATION_STREAM = 0x67656E6572617465  # "generate" in ASCII
# What stores written before this recipe record in attrs["noise"]["per_sample"].
LEGACY_NOISE_RECIPE = "numpy default_rng([seed, global_index]).standard_normal"
NOISE_FORMULA = "pairs (r cos θ, r sin θ) from SplitMix64 words w_j of key mix(mix(seed+γ)^global_index); see extractor/noise.py"

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MIX_1 = 0xBF58476D1CE4E5B9
_MIX_2 = 0x94D049BB133111EB
_LN2 = math.log(2.0)
_HALF_PI = math.pi / 2
_SQRT_HALF = math.sqrt(0.5)
_SQRT2_MANTISSA = int.from_bytes(struct.pack("<d", math.sqrt(2.0)), "little") & ((1 << 52) - 1)
_ATANH_TERMS = tuple(1.0 / (2 * k + 1) for k in range(6))
_SIN_TERMS = tuple((-1) ** k / math.factorial(2 * k + 1) for k in range(5))
_COS_TERMS = tuple((-1) ** k / math.factorial(2 * k) for k in range(6))


def _signed(value: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _mix64_(z: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function in place on int64 bits (multiplications wrap modulo 2⁶⁴)."""
    for bits, factor in ((30, _MIX_1), (27, _MIX_2), (31, None)):
        torch.bitwise_right_shift(z, bits, out=scratch)
        scratch.bitwise_and_((1 << (64 - bits)) - 1)  # logical, not arithmetic, shift
        z.bitwise_xor_(scratch)
        if factor is not None:
            z.mul_(_signed(factor))
    return z


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on int64 tensors holding uint64 bits."""
    return _mix64_(z.clone(), torch.empty_like(z))


def sample_keys(seed: int, global_index: torch.Tensor) -> torch.Tensor:
    """key(s, g) = mix(mix(s + γ) ^ g) for every global index (int64 tensor of uint64 bits)."""
    seed_word = mix64(torch.tensor([_signed(seed + _GAMMA)], dtype=torch.int64, device=global_index.device))
    return mix64(seed_word ^ global_index.to(torch.int64))


def _counter_offsets(pairs: int, device: torch.device) -> torch.Tensor:
    """(j + 1)·γ mod 2⁶⁴ for j < pairs: the same for every sample."""
    return torch.arange(1, pairs + 1, dtype=torch.int64, device=device).mul_(_signed(_GAMMA))


def splitmix64_words(keys: torch.Tensor, pairs: int) -> torch.Tensor:
    """[n, pairs] words w_j = mix(key + (j + 1)·γ): outputs 0..pairs−1 of SplitMix64 seeded with each key."""
    words = keys[:, None] + _counter_offsets(pairs, keys.device)[None, :]
    return _mix64_(words, torch.empty_like(words))


def _horner_(acc: torch.Tensor, t: torch.Tensor, coefficients: tuple[float, ...]) -> torch.Tensor:
    """acc ← Σ cₖ tᵏ by Horner's rule, one correctly rounded op at a time."""
    acc.fill_(coefficients[-1])
    for c in reversed(coefficients[:-1]):
        acc.mul_(t).add_(c)
    return acc


def sqrt_correctly_rounded_(x: torch.Tensor, wide: torch.Tensor, wide2: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """x ← the correctly rounded float32 sqrt of x ≥ −0.0, in place, on any device (buffers: x's shape).

    y = float32(sqrt(float64 x)) is at most one ULP off whatever the device's float64 sqrt; it is then moved to
    the neighbour whose side of the rounding midpoint holds √x. The tests are exact: x, y and the midpoints m
    (25 significant bits) are float64 values, m² (≤ 50 bits) is exact in float64, and m² = x is impossible.
    """
    wide.copy_(x).sqrt_()
    x_wide = wide2.copy_(x)
    y = x.copy_(wide)
    for direction in (math.inf, 0.0):  # up: m² < x → the next float; down: m² > x → the previous one
        torch.nextafter(y, torch.full_like(y, direction), out=scratch)
        torch.add(wide.copy_(y), scratch, out=wide).mul_(0.5)  # the midpoint, exact in float64
        wide.mul_(wide)
        move = wide < x_wide if direction > 0 else wide > x_wide
        torch.where(move, scratch, y, out=y)
    return y


class NoiseGenerator:
    """Makes `NOISE_RECIPE` noise for one per-sample shape on one device, in reused work buffers.

    Every elementwise step writes into buffers made once (fresh memory is slow to touch on CPU, and allocation
    churn costs on CUDA too); samples go through in blocks so the buffers stay small. Not thread-safe: one per task.
    """

    def __init__(self, seed: int, shape: tuple[int, ...], device: torch.device | str, block: int | None = None, compiled: bool | None = None):
        self.seed = seed
        # compiled: the one-loop kernel of extractor.noise_cpu (None: on CPU); same bits as the torch ops
        self.compiled = torch.device(device).type == "cpu" if compiled is None else compiled
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.numel = int(np.prod(shape))
        self.pairs = -(-self.numel // 2)
        # CPU: 64 samples of work buffers (~20 MB) stay cache-friendly; CUDA: big blocks, few kernel launches.
        self.block = block or (1024 if self.device.type == "cuda" else 64)
        self.offsets = _counter_offsets(self.pairs, self.device)
        self._buffers: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, rows: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < rows:
            buf = self._buffers[name] = torch.empty((max(rows, min(self.block, rows * 2)), self.pairs), dtype=dtype, device=self.device)
        return buf[:rows]

    def __call__(self, global_index: torch.Tensor | np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """[n, *shape] float32 noise for these global indices (into `out` when given)."""
        index = torch.as_tensor(np.asarray(global_index, dtype=np.int64) if isinstance(global_index, np.ndarray) else global_index).to(self.device)
        n = index.shape[0]
        if out is None:
            out = torch.empty((n, *self.shape), dtype=torch.float32, device=self.device)
        flat = out.view(n, self.numel)
        keys = sample_keys(self.seed, index)
        for a in range(0, n, self.block):
            b = min(n, a + self.block)
            fill = self._compiled_pairs if self.compiled else self._gaussian_pairs
            if self.numel == 2 * self.pairs:
                fill(keys[a:b], flat[a:b].view(b - a, self.pairs, 2))
            else:
                padded = torch.empty((b - a, self.pairs, 2), dtype=torch.float32, device=self.device)  # odd sizes: rare
                fill(keys[a:b], padded)
                flat[a:b].copy_(padded.reshape(b - a, 2 * self.pairs)[:, : self.numel])
        return out

    @staticmethod
    def _compiled_pairs(keys: torch.Tensor, out: torch.Tensor) -> None:
        noise_cpu.gaussian_pairs(keys.numpy(), out.numpy())

    def _gaussian_pairs(self, keys: torch.Tensor, out: torch.Tensor) -> None:
        """out[n, pairs, 2] (float32) ← (r cos θ, r sin θ) per word; the module docstring gives the formula.

        Branches are integer bit arithmetic and exact ×0/×1 blends (torch.where and frexp cost 10-25× an
        arithmetic op on CPU, measured); float64 bits are read through an integer view, exact on every device.
        """
        n = keys.shape[0]
        i64 = torch.int64
        words, scratch, bits = (self._buffer(k, n, i64) for k in ("words", "scratch", "bits"))
        wide = self._buffer("wide", n, torch.float64)
        x, x2, sin_x, cos_x, u, v = (self._buffer(k, n, torch.float32) for k in ("x", "x2", "sin", "cos", "u", "v"))
        torch.add(keys[:, None], self.offsets[None, :], out=words)
        _mix64_(words, scratch)
        # angle: x = ((c + ½)/2²² − ½)·π/2 with c = bits 8..29 of the word (exact in float32), q = bits 30, 31
        torch.bitwise_right_shift(words, 8, out=scratch)
        scratch.bitwise_and_((1 << 22) - 1)
        x.copy_(scratch).add_(0.5).mul_(2.0**-22).sub_(0.5).mul_(_HALF_PI)
        torch.mul(x, x, out=x2)
        _horner_(sin_x, x2, _SIN_TERMS).mul_(x)
        _horner_(cos_x, x2, _COS_TERMS)
        torch.sub(cos_x, sin_x, out=u).mul_(_SQRT_HALF)  # cos(π/4 + x)
        torch.add(cos_x, sin_x, out=v).mul_(_SQRT_HALF)  # sin(π/4 + x)
        # rotate by q·π/2: (c, s) → (c, s), (−s, c), (−c, −s), (s, −c): swap when q is odd, negate the first
        # when q ∈ {1, 2} (bit 1 xor bit 0), the second when q ≥ 2 (bit 1); blends with exact 0/1 weights
        torch.bitwise_right_shift(words, 30, out=bits)
        bits.bitwise_and_(1)  # bit 0 of q: swap
        x.copy_(bits)  # s ∈ {0, 1}
        torch.mul(v, x, out=cos_x)
        torch.mul(u, x, out=sin_x)
        x.sub_(1.0).neg_()  # 1 − s
        cos_x.add_(u.mul_(x))  # first = s·v + (1 − s)·u: exactly v or u
        sin_x.add_(v.mul_(x))  # second = s·u + (1 − s)·v
        torch.bitwise_right_shift(words, 31, out=scratch)
        scratch.bitwise_and_(1)  # bit 1 of q
        bits.bitwise_xor_(scratch)  # bit 1 xor bit 0
        x.copy_(bits).mul_(-2.0).add_(1.0)
        cos_x.mul_(x)
        x.copy_(scratch).mul_(-2.0).add_(1.0)
        sin_x.mul_(x)
        # radius: a + 1 = f·2ᵉ (f ∈ [√½, √2), split exactly in float64 bits, then f rounded to float32);
        # −2 ln u = −2((e − 32)·ln 2 + 2 atanh t), t = (f − 1)/(f + 1)
        torch.bitwise_right_shift(words, 32, out=scratch)
        scratch.bitwise_and_(0xFFFFFFFF).add_(1)
        wide.copy_(scratch)  # exact: < 2⁵³
        ieee = wide.view(i64)  # sign 0, 11 exponent bits, 52 mantissa bits
        torch.bitwise_right_shift(ieee, 52, out=scratch)  # biased exponent of a + 1 ∈ [1, 2³²]
        ieee.bitwise_and_((1 << 52) - 1)
        torch.add(ieee, (1 << 52) - _SQRT2_MANTISSA, out=bits)
        bits.bitwise_right_shift_(52)  # 1 where the mantissa is ≥ √2: then halve it and add 1 to e
        ieee.bitwise_or_(1023 << 52)  # f ∈ [1, 2)
        scratch.add_(bits).sub_(1023 + 32)  # e − 32
        ieee.sub_(bits.bitwise_left_shift_(52))  # halving by the exponent field: exact
        u.copy_(wide)  # f, rounded once to float32
        torch.add(u, 1.0, out=v)
        u.sub_(1.0).div_(v)  # t
        torch.mul(u, u, out=x)
        _horner_(v, x, _ATANH_TERMS).mul_(u)  # atanh t
        x2.copy_(scratch)  # e − 32, exact
        # −2 ln u ≥ −0.0 without a clamp: e − 32 ≤ 0, and e − 32 = 0 only with f ≤ 1 (t ≤ 0, atanh t ≤ 0); for
        # e − 32 < 0 the ≤ −ln 2 of that term outweighs 2 atanh t ≤ 0.35. sqrt(−0.0) = −0.0 everywhere.
        x2.mul_(_LN2).add_(v.mul_(2.0)).mul_(-2.0)
        sqrt_correctly_rounded_(x2, self._buffer("wide", n, torch.float64), self._buffer("wide2", n, torch.float64), u)  # r
        out[..., 0].copy_(cos_x.mul_(x2))
        out[..., 1].copy_(sin_x.mul_(x2))


def per_sample_noise(seed: int, global_index: torch.Tensor | np.ndarray, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """[n, *shape] float32 standard normal noise on `device`, a function of (seed, global_index) alone."""
    return NoiseGenerator(seed, shape, device)(global_index)


def recorded_noise_recipe(attrs: dict) -> str | None:
    """The noise recipe a store's attributes record: activation stores' `noise`, generated image stores' `sampling`."""
    noise = attrs.get("noise")
    if isinstance(noise, dict):
        return noise.get("recipe") or noise.get("per_sample")
    sampling = attrs.get("sampling")
    if isinstance(sampling, str) and "default_rng" in sampling:
        return LEGACY_NOISE_RECIPE
    return None


def generation_noise_seed(seed: int) -> int:
    """The seed generation's ε is drawn with: s' = mix(s ^ GENERATION_STREAM) as uint64 (mix as in the recipe).

    Extraction keys its noise by (seed, global_index), and a generated store's global_index is its sample index:
    with one stream, extracting a generated store with the seed that made it (both default to 0) would add each
    sample's own generator input back, so the network would see x + σ·ε ≈ its generating input σ·ε (measured: the
    reconstruction equalled the generated image in 99.5 % of pixels), unlike any real image."""
    mixed = mix64(torch.tensor([_signed(seed ^ GENERATION_STREAM)], dtype=torch.int64)).item()
    return mixed & _MASK64  # the uint64 the int64 bits hold


def noise_attrs(seed: int, recipe: str = NOISE_RECIPE) -> dict:
    """How a store records its noise: the seed, the recipe's name, and the formula in one line."""
    formula = NOISE_FORMULA if recipe == NOISE_RECIPE else NOISE_FORMULA.replace("mix(mix(seed+γ)", "mix(mix(s'+γ)") + "; s' = mix(seed ^ 0x67656E6572617465), generation's stream"
    return {"seed": seed, "recipe": recipe, "per_sample": formula}
