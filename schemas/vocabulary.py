"""The words imzarr's commands offer and its stores record, each defined once and free of torch.

Both packages take their choices from here (converter and extractor never import each other; `schemas` imports
nothing of ours), and the modules that act on a word check against the same tuple, so a choice offered by
`--help` is always one the library accepts and a store's validator accepts what a writer wrote.
"""

from __future__ import annotations

# Built-in architectures with seeded random weights (never trained): `--preset NAME`. The registry in
# extractor/models/registry.py maps each to its family, and a test checks the lists agree with it.
# Diffusion networks (EDM/DMD2 U-Nets): they take σ and noise.
DIFFUSION_PRESET_NAMES: tuple[str, ...] = ("dmd2-imagenet64", "tiny-random")
# Feature networks (FID Inception-v3, DINOv2 ViTs): they see the clean image, no σ, no noise.
FEATURE_PRESET_NAMES: tuple[str, ...] = ("fid-inception", "dinov2-vits14", "dinov2-vitb14", "dinov2-vitl14", "dinov2-vitg14")
PRESET_NAMES: tuple[str, ...] = DIFFUSION_PRESET_NAMES + FEATURE_PRESET_NAMES

# Spatial reduction of a captured layer (on the device, before storing) or of a stored one (compare, stats).
POOL_MODES: tuple[str, ...] = ("none", "mean", "max")

# dtypes an activation store holds its layers in.
STORAGE_DTYPES: tuple[str, ...] = ("float16", "float32")

# Network precision by name: auto (bf16 autocast on CUDA for diffusion networks, fp32 otherwise), fp32, or
# bf16/fp16 autocast (CUDA). The torch dtype of each name lives torch-side (extractor/models/edm.py).
AUTO_COMPUTE_DTYPE = "auto"
COMPUTE_DTYPE_NAMES: tuple[str, ...] = (AUTO_COMPUTE_DTYPE, "fp32", "bf16", "fp16")

# fsspec protocols that name this machine's own filesystem: a URL of any other protocol is remote (a writer
# cannot rename files in it, a path check cannot resolve symlinks in it).
LOCAL_FILE_PROTOCOLS: tuple[str, ...] = ("file", "local")
# Protocols that need no `--storage-options` (credentials, endpoints): the local filesystem, and memory://,
# which lives in this process (the commands refuse it as an output anyway).
PROTOCOLS_WITHOUT_STORAGE_OPTIONS: tuple[str, ...] = (*LOCAL_FILE_PROTOCOLS, "memory")

__all__ = [
    "AUTO_COMPUTE_DTYPE",
    "COMPUTE_DTYPE_NAMES",
    "DIFFUSION_PRESET_NAMES",
    "FEATURE_PRESET_NAMES",
    "LOCAL_FILE_PROTOCOLS",
    "POOL_MODES",
    "PRESET_NAMES",
    "PROTOCOLS_WITHOUT_STORAGE_OPTIONS",
    "STORAGE_DTYPES",
]
