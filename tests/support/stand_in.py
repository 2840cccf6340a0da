"""A zero-cost stand-in for the EDM network: the layer names and output shapes of a real one, no compute.

Used where the pipeline around the network is what is measured or tested (the ceiling benchmark, integrity
checks): every block returns a preallocated tensor, D(x) returns its input.
"""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import torch
from torch import nn

from extractor.models import LoadedModel, ModelSpec


class ConstantBlock(nn.Module):
    """Returns a fixed, contiguous [n, C, H, W] tensor (made once per batch size): no arithmetic per sample.

    Contiguous like a real layer's output: a broadcast view would send the copies after it down other paths.
    """

    def __init__(self, shape: tuple[int, ...], value: float):
        super().__init__()
        self.shape, self.value = shape, value
        self.outputs: dict[tuple[int, torch.device], torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape[0], x.device)
        if key not in self.outputs:
            self.outputs[key] = torch.full((x.shape[0], *self.shape), self.value, dtype=torch.float32, device=x.device)
        return self.outputs[key]


class StandInUNet(nn.Module):
    def __init__(self, encoder: dict[str, tuple[int, ...]], decoder: dict[str, tuple[int, ...]], value: float):
        super().__init__()
        self.enc = nn.ModuleDict({name: ConstantBlock(shape, value) for name, shape in encoder.items()})
        self.dec = nn.ModuleDict({name: ConstantBlock(shape, value) for name, shape in decoder.items()})


class StandInNetwork(nn.Module):
    """Called like EDMPrecond (x, σ, labels); its blocks are `model.enc.<name>` / `model.dec.<name>`."""

    def __init__(self, encoder: dict[str, tuple[int, ...]], decoder: dict[str, tuple[int, ...]], resolution: int = 64, value: float = 0.0):
        super().__init__()
        self.model = StandInUNet(encoder, decoder, value)
        self.img_resolution, self.img_channels, self.label_dim = resolution, 3, 1000

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        for block in [*self.model.enc.values(), *self.model.dec.values()]:
            block(x)
        return x


def stand_in_loaded(network: StandInNetwork) -> LoadedModel:
    return LoadedModel(module=network.eval(), name="stand-in", config={"stand_in": True}, trained=False,
                       sha256="0" * 64, resolution=network.img_resolution, label_dim=network.label_dim)


@contextmanager
def serving(network: StandInNetwork):
    """Within the block, extraction and generation load `network` for whatever model they are given."""
    loaded = stand_in_loaded(network)

    def load(spec: ModelSpec, device: torch.device | str = "cpu") -> LoadedModel:
        return loaded

    with mock.patch("extractor.forward.cached_model", load):
        yield loaded
