"""The extractor's words, in one place and free of torch: what the command line offers and the stores record.

The model modules check against these same tuples, so a choice offered by `--help` is always one they accept.
"""

from __future__ import annotations

from schemas.activation_store import STORAGE_DTYPES

# Built-in architectures with seeded random weights (never trained): `--preset NAME`. The diffusion networks
# (EDM/DMD2 U-Nets) first, then the feature networks (FID Inception-v3, DINOv2 ViTs); the registry in
# extractor/models/registry.py maps each to its family, and a test checks the two lists agree.
PRESET_NAMES: tuple[str, ...] = (
    "dmd2-imagenet64",
    "tiny-random",
    "fid-inception",
    "dinov2-vits14",
    "dinov2-vitb14",
    "dinov2-vitl14",
    "dinov2-vitg14",
)
# The presets of feature networks (they see the clean image: no σ, no noise).
FEATURE_PRESET_NAMES: tuple[str, ...] = PRESET_NAMES[2:]
# Spatial reduction of a captured layer, on the device, before storing.
POOL_MODES: tuple[str, ...] = ("none", "mean", "max")
# Network precision: auto (bf16 autocast on CUDA for diffusion networks, fp32 otherwise), fp32, or bf16/fp16
# autocast (CUDA).
COMPUTE_DTYPES: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")

__all__ = ["COMPUTE_DTYPES", "FEATURE_PRESET_NAMES", "POOL_MODES", "PRESET_NAMES", "STORAGE_DTYPES"]
