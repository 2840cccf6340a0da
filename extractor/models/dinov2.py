"""DINOv2 vision transformers (ViT-S/B/L/g, patch 14, LayerScale, no registers), state-dict compatible.

Architecture and parameter names follow facebookresearch/dinov2's `DinoVisionTransformer` as its hub builds it
(`img_size=518`, `patch_size=14`, `init_values=1.0`, `block_chunks=0`, no register tokens): `cls_token`
[1, 1, D], `pos_embed` [1, 1 + 37², D], `mask_token` [1, D], `patch_embed.proj` (14×14/14 conv),
`blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2 | mlp.w12, mlp.w3, ls2.gamma}`, `norm`.
LayerNorm eps 1e-6; pre-norm blocks x + γ₁·attn(norm1 x), then x + γ₂·ffn(norm2 x). FFN: GELU MLP of width
4D, or for ViT-g the fused SwiGLU w3(silu(a)·b) with [a, b] = w12(x) and hidden width
(⌊4D·2/3⌋ + 7) // 8 · 8 (4096 for D = 1536).

Position embeddings are resampled to the input's patch grid as the original does: when the grid differs from 37×37
(or the input is not square), the 37×37 table is resized bicubically (`align_corners=False`, no antialias) with
`scale_factor = ((h + 0.1) / 37, (w + 0.1) / 37)`, not `size=(h, w)`; the +0.1 makes the output h×w but also
shifts the sampling grid, and the original's numbers depend on it. The CLS entry is kept as is.

Input protocol (FD_DINOv2 as EDM2's `DINOv2Detector(resize_mode='torch')` computes it): uint8 RGB x as float
0..255 → bicubic resize to 224×224 (`antialias=True`, `align_corners=False`, no clamping) → /255 → subtract the
ImageNet mean (0.485, 0.456, 0.406), divide by its std (0.229, 0.224, 0.225). dgm-eval's original resizes with
PIL bicubic on uint8 instead (rounded); both upsample 64×64 inputs identically up to that rounding.

Layers: `blocks.N` (block N's output patch tokens as a [N, D, 16, 16] grid, before the final norm), `cls` (the CLS
token after the final norm: the FD_DINOv2 feature and what `forward` returns) and `patch_mean` (mean of the
normalised patch tokens).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from extractor.models import seeded
from extractor.models.capture import images_as_float
from extractor.models.checkpoints import CheckpointError, CheckpointMismatchError
from schemas.errors import ImzarrError

__all__ = [
    "FAMILY",
    "DinoV2",
    "DinoV2ConfigError",
    "INPUT_SIZE",
    "PREPROCESSING",
    "PRESETS",
    "PRESET_SEED",
    "UnsupportedDinoV2Error",
    "build",
    "canonical_state_dict",
    "claims_state_dict",
    "config_from_state_dict",
    "random_state_dict",
    "swiglu_hidden_features",
]

FAMILY = "dinov2"
INPUT_SIZE = 224
PATCH_SIZE = 14
TABLE_IMAGE_SIZE = 518  # pos_embed covers a 37×37 patch grid
HEAD_DIM = 64  # every published variant: 384/6, 768/12, 1024/16, 1536/24
POS_INTERPOLATION_OFFSET = 0.1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYER_NORM_EPS = 1e-6

_ARCHS = {
    "vits14": dict(embed_dim=384, depth=12, num_heads=6, ffn="mlp"),
    "vitb14": dict(embed_dim=768, depth=12, num_heads=12, ffn="mlp"),
    "vitl14": dict(embed_dim=1024, depth=24, num_heads=16, ffn="mlp"),
    "vitg14": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglufused"),
}
PRESETS: dict[str, dict[str, Any]] = {f"dinov2-{arch}": dict(kw) for arch, kw in _ARCHS.items()}
PRESET_SEED = 0
PREPROCESSING = (
    "FD_DINOv2 (EDM2 DINOv2Detector, resize_mode='torch'): uint8 RGB as float 0..255 -> bicubic resize to 224x224 "
    "(antialias=True, align_corners=False, no clamp) -> /255 -> (x - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)"
)
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


class DinoV2ConfigError(ImzarrError, ValueError):
    """Constructor arguments that do not describe a DINOv2 ViT this module implements."""


class UnsupportedDinoV2Error(CheckpointError):
    """A DINOv2 state dict this module does not implement (register tokens, chunked blocks, odd shapes)."""


def swiglu_hidden_features(embed_dim: int, mlp_ratio: float = 4.0) -> int:
    """DINOv2's fused SwiGLU width: two thirds of the MLP width, rounded up to a multiple of 8."""
    return (int(int(embed_dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size² patches → D-dim tokens, [N, h·w, D] in row-major grid order."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, softmax(q·kᵀ/√d)·v, then an output projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        # qkv's output channels are ordered (q|k|v, head, head_dim).
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))


class LayerScale(nn.Module):
    """Per-channel scale γ of a residual branch."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc2(GELU(fc1 x)), exact (erf) GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFused(nn.Module):
    """w3(silu(a)·b) where [a, b] are the two halves of w12 x."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches."""

    def __init__(self, dim: int, num_heads: int, ffn: str, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        if ffn == "mlp":
            self.mlp: nn.Module = Mlp(dim, int(dim * mlp_ratio))
        else:
            self.mlp = SwiGLUFused(dim, swiglu_hidden_features(dim, mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2(nn.Module):
    """DINOv2 ViT on [N, 3, H, W] uint8 (or float 0..255) images of any size; returns the normalised CLS token."""

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        ffn: str = "mlp",
        mlp_ratio: float = 4.0,
        patch_size: int = PATCH_SIZE,
        table_image_size: int = TABLE_IMAGE_SIZE,
        input_size: int = INPUT_SIZE,
    ) -> None:
        super().__init__()
        if ffn not in ("mlp", "swiglufused"):
            raise DinoV2ConfigError(f"ffn must be 'mlp' or 'swiglufused', got {ffn!r}")
        if embed_dim % num_heads:
            raise DinoV2ConfigError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        for name, size in (("table_image_size", table_image_size), ("input_size", input_size)):
            if size % patch_size:
                raise DinoV2ConfigError(f"{name} {size} is not a multiple of patch_size {patch_size}")
        self.config: dict[str, Any] = dict(
            embed_dim=int(embed_dim), depth=int(depth), num_heads=int(num_heads), ffn=ffn, mlp_ratio=float(mlp_ratio),
            patch_size=int(patch_size), table_image_size=int(table_image_size), input_size=int(input_size),
        )  # fmt: skip
        self.resolution = int(input_size)
        self.preprocessing = PREPROCESSING
        self.patch_size = patch_size
        table_patches = (table_image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + table_patches, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # used only in training; kept for strict loading
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, ffn, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)

    def preprocess(self, images: Tensor) -> Tensor:
        """FD_DINOv2's input: bicubic antialiased resize of 0..255 values to input_size², /255, ImageNet-normalised."""
        x = images_as_float(images, FAMILY)
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", antialias=True) / 255
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).reshape(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).reshape(1, 3, 1, 1)
        return (x - mean) / std

    def position_embedding(self, grid_h: int, grid_w: int) -> Tensor:
        """[1, 1 + grid_h·grid_w, D] position embeddings for a patch grid (the original's offset resampling)."""
        table = self.pos_embed.shape[1] - 1
        side = math.isqrt(table)
        if grid_h * grid_w == table and grid_h == grid_w:
            return self.pos_embed
        dim = self.pos_embed.shape[-1]
        pos = self.pos_embed.float()
        grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        scale = (float(grid_h + POS_INTERPOLATION_OFFSET) / side, float(grid_w + POS_INTERPOLATION_OFFSET) / side)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
        patches = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat([pos[:, :1], patches], dim=1).to(self.pos_embed.dtype)

    def tokens(self, x: Tensor) -> Tensor:
        """Preprocessed images → [N, 1 + h·w, D]: CLS token then patch tokens, plus position embeddings."""
        grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        patches = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        return tokens + self.position_embedding(grid_h, grid_w)

    def forward(self, images: Tensor) -> Tensor:
        x = self.tokens(self.preprocess(images))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]

    def layer_paths(self) -> dict[str, str]:
        """Layer name → module path, in execution order."""
        paths = {f"blocks.{i}": f"blocks.{i}" for i in range(len(self.blocks))}
        return {**paths, "cls": "norm", "patch_mean": "norm"}

    def layer_value(self, name: str, output: Tensor) -> Tensor:
        """`cls`: token 0 of the normalised tokens; `patch_mean`: mean of the rest; `blocks.N`: patch-token grid."""
        if name == "cls":
            return output[:, 0]
        if name == "patch_mean":
            return output[:, 1:].mean(dim=1)
        side = self.resolution // self.patch_size
        return output[:, 1:].reshape(output.shape[0], side, side, -1).permute(0, 3, 1, 2).contiguous()


def build(config: Mapping[str, Any]) -> DinoV2:
    """The network for a config (constructor kwargs)."""
    return DinoV2(**dict(config))


def random_state_dict(config: Mapping[str, Any], seed: int) -> dict[str, Tensor]:
    """Seeded random weights, bit-identical on every machine and torch build (extractor/models/seeded.py's rule).

    With z the seeded N(0, 1) draw of state-dict key i (`seeded.standard_normal(seed, i, shape)`): linear and
    patch-projection weights z·(1 / √fan_in), their biases 0.1·z, LayerNorm weights 1 + 0.1·z and biases 0.1·z,
    LayerScale γ 0.2·z, cls_token / pos_embed / mask_token 0.5·z (large enough that the position-embedding
    resampling shows in every output). Scale factors are Python floats, rounded once to float32.
    """
    with torch.device("meta"):
        shapes = {key: tuple(t.shape) for key, t in build(config).state_dict().items()}
    weights = {}
    for index, (key, shape) in enumerate(shapes.items()):
        z = seeded.standard_normal(seed, index, shape)
        leaf = key.rsplit(".", 1)[-1]
        is_norm = key == "norm.weight" or key == "norm.bias" or ".norm" in key
        # In place (fresh memory is slow to touch); each op is one correctly rounded float32 step.
        if key in ("cls_token", "pos_embed", "mask_token"):
            value = z.mul_(0.5)
        elif leaf == "gamma":
            value = z.mul_(0.2)
        elif is_norm and leaf == "weight":
            value = z.mul_(0.1).add_(1)
        elif leaf == "weight":
            value = z.mul_(1 / math.sqrt(math.prod(shape[1:])))
        else:  # biases
            value = z.mul_(0.1)
        weights[key] = value
    return weights


def claims_state_dict(state_dict: Mapping[str, Tensor]) -> bool:
    """True when the keys are a DINOv2 ViT state dict (original names): any of its own signature keys (not the
    generic norm.weight), so that one that lacks another key is told which (by the state dict check) instead of
    being taken for an EDM network."""
    return any(k in state_dict for k in ("cls_token", "pos_embed", "patch_embed.proj.weight"))


def canonical_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state dict as stored (the published files already carry every key)."""
    return dict(state_dict)


def config_from_state_dict(state_dict: Mapping[str, Tensor], path: str | Path = "<memory>") -> dict[str, Any]:
    """The config implied by a DINOv2 state dict's shapes (heads: D / 64, as in every published variant)."""
    if "register_tokens" in state_dict:
        raise UnsupportedDinoV2Error(f"{path}: DINOv2 with register tokens (the *_reg4 models) is not supported")
    if any(re.match(r"blocks\.\d+\.\d+\.", key) for key in state_dict):
        raise UnsupportedDinoV2Error(f"{path}: chunked blocks (blocks.C.N.*) are not supported (block_chunks=0 only)")
    missing = [key for key in ("cls_token", "pos_embed", "patch_embed.proj.weight") if key not in state_dict]
    if missing:  # the keys the shapes are read from
        raise CheckpointMismatchError(f"{path}: a DINOv2 state dict without {', '.join(missing)} (the network's shape is read from {'it' if len(missing) == 1 else 'them'})")
    embed_dim = int(state_dict["cls_token"].shape[-1])
    proj = state_dict["patch_embed.proj.weight"]
    patch_size = int(proj.shape[-1])
    table = int(state_dict["pos_embed"].shape[1]) - 1
    side = math.isqrt(table)
    if side * side != table or embed_dim % HEAD_DIM or tuple(proj.shape[1:]) != (3, patch_size, patch_size):
        raise UnsupportedDinoV2Error(
            f"{path}: unexpected DINOv2 shapes: pos_embed {tuple(state_dict['pos_embed'].shape)}, "
            f"patch_embed.proj.weight {tuple(proj.shape)}, embed_dim {embed_dim} (heads of {HEAD_DIM} channels)"
        )
    depth = 1 + max((int(m.group(1)) for key in state_dict if (m := _BLOCK_KEY.match(key))), default=-1)
    if "blocks.0.mlp.w12.weight" in state_dict:
        ffn, mlp_ratio = "swiglufused", 4.0  # the hidden width follows from the rule, checked on loading
    elif "blocks.0.mlp.fc1.weight" in state_dict:
        ffn, mlp_ratio = "mlp", state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    else:
        raise UnsupportedDinoV2Error(f"{path}: blocks.0.mlp has neither fc1 nor w12 weights")
    return dict(
        embed_dim=embed_dim, depth=depth, num_heads=embed_dim // HEAD_DIM, ffn=ffn, mlp_ratio=float(mlp_ratio),
        patch_size=patch_size, table_image_size=side * patch_size, input_size=INPUT_SIZE,
    )  # fmt: skip
