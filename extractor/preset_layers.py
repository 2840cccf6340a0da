"""Every preset's layer names, known without building the network (or importing torch), so `--layers` typos are
refused at once. tests/extractor/test_preset_layers.py checks each table against the names of the built network."""

from __future__ import annotations

from collections.abc import Sequence

from schemas.errors import ImzarrError
from schemas.suggestions import did_you_mean

# Preset → layer names, in the order `imzarr layers` lists them (EDM: module paths, then the aliases).
PRESET_LAYERS: dict[str, tuple[str, ...]] = {
    "dmd2-imagenet64": (
        "model.enc.64x64_conv", "model.enc.64x64_block0", "model.enc.64x64_block1", "model.enc.64x64_block2",
        "model.enc.32x32_down", "model.enc.32x32_block0", "model.enc.32x32_block1", "model.enc.32x32_block2",
        "model.enc.16x16_down", "model.enc.16x16_block0", "model.enc.16x16_block1", "model.enc.16x16_block2",
        "model.enc.8x8_down", "model.enc.8x8_block0", "model.enc.8x8_block1", "model.enc.8x8_block2",
        "model.dec.8x8_in0", "model.dec.8x8_in1", "model.dec.8x8_block0", "model.dec.8x8_block1",
        "model.dec.8x8_block2", "model.dec.8x8_block3", "model.dec.16x16_up", "model.dec.16x16_block0",
        "model.dec.16x16_block1", "model.dec.16x16_block2", "model.dec.16x16_block3", "model.dec.32x32_up",
        "model.dec.32x32_block0", "model.dec.32x32_block1", "model.dec.32x32_block2", "model.dec.32x32_block3",
        "model.dec.64x64_up", "model.dec.64x64_block0", "model.dec.64x64_block1", "model.dec.64x64_block2",
        "model.dec.64x64_block3", "encoder_bottleneck", "midblock",
    ),
    "tiny-random": (
        "model.enc.64x64_conv", "model.enc.64x64_block0", "model.enc.32x32_down", "model.enc.32x32_block0",
        "model.enc.16x16_down", "model.enc.16x16_block0", "model.dec.16x16_in0", "model.dec.16x16_in1",
        "model.dec.16x16_block0", "model.dec.16x16_block1", "model.dec.32x32_up", "model.dec.32x32_block0",
        "model.dec.32x32_block1", "model.dec.64x64_up", "model.dec.64x64_block0", "model.dec.64x64_block1",
        "encoder_bottleneck", "midblock",
    ),
    "fid-inception": (
        "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "fid64", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
        "maxpool2", "fid192", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
        "Mixed_6e", "fid768", "Mixed_7a", "Mixed_7b", "Mixed_7c", "pool3", "fid2048", "logits",
    ),
    "dinov2-vits14": (
        "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.6", "blocks.7",
        "blocks.8", "blocks.9", "blocks.10", "blocks.11", "cls", "patch_mean",
    ),
    "dinov2-vitb14": (
        "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.6", "blocks.7",
        "blocks.8", "blocks.9", "blocks.10", "blocks.11", "cls", "patch_mean",
    ),
    "dinov2-vitl14": (
        "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.6", "blocks.7",
        "blocks.8", "blocks.9", "blocks.10", "blocks.11", "blocks.12", "blocks.13", "blocks.14", "blocks.15",
        "blocks.16", "blocks.17", "blocks.18", "blocks.19", "blocks.20", "blocks.21", "blocks.22", "blocks.23",
        "cls", "patch_mean",
    ),
    "dinov2-vitg14": (
        "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.6", "blocks.7",
        "blocks.8", "blocks.9", "blocks.10", "blocks.11", "blocks.12", "blocks.13", "blocks.14", "blocks.15",
        "blocks.16", "blocks.17", "blocks.18", "blocks.19", "blocks.20", "blocks.21", "blocks.22", "blocks.23",
        "blocks.24", "blocks.25", "blocks.26", "blocks.27", "blocks.28", "blocks.29", "blocks.30", "blocks.31",
        "blocks.32", "blocks.33", "blocks.34", "blocks.35", "blocks.36", "blocks.37", "blocks.38", "blocks.39",
        "cls", "patch_mean",
    ),
}


class UnknownLayerError(KeyError, ValueError, ImzarrError):
    """A layer name that is neither a module path of the network nor an alias (bad input: exit code 2)."""

    def __init__(self, name: str, valid: Sequence[str]) -> None:
        self.name = name
        self.valid = list(valid)
        hint = did_you_mean(name, self.valid) or ";"
        super().__init__(f"unknown layer {name!r}{hint} valid layers: {', '.join(self.valid)}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def check_preset_layers(preset: str | None, layers: Sequence[str]) -> None:
    """UnknownLayerError for the first name `preset` has no layer of; nothing to check without a preset (a
    checkpoint's layers are known once it is read) or for a preset not in the table (the registry refuses it)."""
    valid = PRESET_LAYERS.get(preset or "")
    if valid is None:
        return
    for name in layers:
        if name not in valid:
            raise UnknownLayerError(name, valid)
