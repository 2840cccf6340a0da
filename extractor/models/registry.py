"""Which network to run: a picklable `ModelSpec` (preset or checkpoint) and `load_model` / `cached_model`."""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from extractor.models.checkpoints import load_checkpoint, resolve_checkpoint_file
from extractor.models.edm import PRESETS, EDMPrecond

__all__ = [
    "PRESET_INIT",
    "LoadedModel",
    "ModelSpec",
    "PresetInit",
    "UnknownPresetError",
    "build_preset",
    "cached_model",
    "file_sha256",
    "load_model",
    "state_dict_sha256",
]


class UnknownPresetError(KeyError, ValueError):
    """A preset name not in PRESETS."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class PresetInit:
    """How a preset's random weights are drawn: EDM's init from CPU generator `seed`, zero-init layers scaled."""

    seed: int
    zero_init_scale: float


# All presets are random initialisations (never trained); weights are identical on every machine.
PRESET_INIT: dict[str, PresetInit] = {
    "dmd2-imagenet64": PresetInit(seed=0, zero_init_scale=0.0),  # EDM's own init: residual branches start at 0
    "tiny-random": PresetInit(seed=0, zero_init_scale=0.2),  # non-zero residual branches: every layer matters
}


@dataclass(frozen=True)
class ModelSpec:
    """Names a network: exactly one of a preset name or a checkpoint path (file or DMD2 checkpoint folder)."""

    preset: str | None = None
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.checkpoint is None):
            raise ValueError(f"ModelSpec needs exactly one of preset / checkpoint, got {self!r}")
        if self.checkpoint is not None and not isinstance(self.checkpoint, str):
            object.__setattr__(self, "checkpoint", os.fspath(self.checkpoint))
        if self.preset is not None and self.preset not in PRESETS:
            raise UnknownPresetError(f"unknown preset {self.preset!r}; presets: {sorted(PRESETS)}")

    @property
    def name(self) -> str:
        return self.preset if self.preset is not None else str(self.checkpoint)


@dataclass
class LoadedModel:
    """A network ready for inference plus what identifies it."""

    module: EDMPrecond  # eval mode, requires_grad False
    name: str  # preset name or checkpoint path
    config: dict[str, Any]
    trained: bool  # False for random presets
    sha256: str  # of the checkpoint file, or of the preset's state dict
    resolution: int
    label_dim: int


def build_preset(name: str, device: torch.device | str = "cpu") -> EDMPrecond:
    """The preset network with its deterministic random weights (drawn on CPU, then moved to `device`)."""
    if name not in PRESETS:
        raise UnknownPresetError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    init = PRESET_INIT[name]
    with torch.device("meta"):
        model = EDMPrecond(**PRESETS[name])
    # Built on meta then materialised, so the global RNG is neither used nor advanced.
    model.to_empty(device="cpu")
    model.reset_parameters(torch.Generator().manual_seed(init.seed), zero_init_scale=init.zero_init_scale)
    return model.to(device)


def state_dict_sha256(state_dict: Mapping[str, Tensor]) -> str:
    """sha256 over key names, dtypes, shapes and raw bytes of a state dict, in order."""
    digest = hashlib.sha256()
    for key, tensor in state_dict.items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 24) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _freeze(module: EDMPrecond) -> EDMPrecond:
    module.eval()
    module.requires_grad_(False)
    return module


def load_model(spec: ModelSpec, device: torch.device | str = "cpu") -> LoadedModel:
    """Build the network a spec names on `device`, frozen and in eval mode."""
    if spec.preset is not None:
        module = _freeze(build_preset(spec.preset, "cpu"))
        sha = state_dict_sha256(module.state_dict())
        module = module.to(device)
        trained = False
    else:
        file = resolve_checkpoint_file(spec.checkpoint)
        sha = file_sha256(file)
        module = _freeze(load_checkpoint(file, device=device))
        trained = True
    return LoadedModel(
        module=module,
        name=spec.name,
        config=dict(module.config),
        trained=trained,
        sha256=sha,
        resolution=module.img_resolution,
        label_dim=module.label_dim,
    )


@functools.lru_cache(maxsize=4)
def _cached(spec: ModelSpec, device: str) -> LoadedModel:
    return load_model(spec, device)


def cached_model(spec: ModelSpec, device: torch.device | str = "cpu") -> LoadedModel:
    """`load_model` memoised per process (keyed by spec and device), so a worker loads each network once."""
    return _cached(spec, str(torch.device(device)))
