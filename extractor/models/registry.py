"""Which network to run: model families, a picklable `ModelSpec` (preset or checkpoint), `load_model` / `cached_model`.

A family is one kind of network: EDM's diffusion U-Net (`EDMPrecond`, kind "diffusion"), or a feature network
(kind "feature": `fid-inception`, `dinov2-*`). Every feature network file offers the same module-level interface
(see `ModelFamily.from_module`), so a new family is that one file plus one line in FAMILIES.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from extractor.models import dinov2, fid_inception
from extractor.models.checkpoints import (
    CheckpointError,
    UnsafeCheckpointError,
    check_state_dict,
    is_edm_network_pickle,
    load_checkpoint,
    local_checkpoint,
    read_plain_state_dict,
    reads_urls_too,
    resolve_checkpoint_file,
)
from extractor.models.edm import PRESETS, EDMPrecond
from schemas.errors import ImzarrError
from schemas.suggestions import did_you_mean

__all__ = [
    "EDM_FAMILY",
    "EDM_PREPROCESSING",
    "FAMILIES",
    "KINDS",
    "MODEL_PRESETS",
    "PRESET_INIT",
    "LoadedModel",
    "ModelFamily",
    "ModelSpec",
    "PresetInit",
    "UnknownPresetError",
    "build_preset",
    "cached_model",
    "family_of_checkpoint",
    "family_of_preset",
    "file_sha256",
    "load_model",
    "state_dict_sha256",
]

KINDS: tuple[str, ...] = ("diffusion", "feature")
# EDM networks get their input prepared by the caller; σ and class labels are inputs of the network.
EDM_PREPROCESSING = "by the caller: uint8 RGB x -> x/127.5 - 1 (+ sigma * noise when noised)"


class UnknownPresetError(KeyError, ValueError, ImzarrError):
    """A preset name not in MODEL_PRESETS (bad input: exit code 2)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class PresetInit:
    """How a preset's random weights are drawn: EDM's init by the seeded rule (extractor/models/seeded.py) from
    `seed`, zero-init layers scaled."""

    seed: int
    zero_init_scale: float


# All presets are random initialisations (never trained); weights are bit-identical on every machine, CPU and torch
# build (extractor/models/seeded.py: torch's RNG is not used).
PRESET_INIT: dict[str, PresetInit] = {
    "dmd2-imagenet64": PresetInit(seed=0, zero_init_scale=0.0),  # EDM's own init: residual branches start at 0
    "tiny-random": PresetInit(seed=0, zero_init_scale=0.2),  # non-zero residual branches: every layer matters
}


@dataclass(frozen=True)
class ModelFamily:
    """One family of networks: its presets and how to build, seed, recognise and load its networks."""

    name: str
    kind: str  # "diffusion" or "feature"
    presets: Mapping[str, Mapping[str, Any]]  # preset name → constructor kwargs
    preprocessing: str  # what happens to uint8 images before the network (recorded with activations)
    build: Callable[[Mapping[str, Any]], nn.Module]  # constructor kwargs → network (weights undefined)
    seeded: Callable[[str], nn.Module]  # preset name → CPU network with its seeded random weights
    claims: Callable[[Mapping[str, Tensor]], bool]  # does a plain state dict belong to this family?
    load: Callable[[Path, Mapping[str, Tensor] | None, torch.device | str], nn.Module]  # file (+ its state dict)

    @classmethod
    def from_module(cls, module: ModuleType) -> ModelFamily:
        """A feature-network family from its file's interface.

        The file defines FAMILY (name), PRESETS (preset → kwargs), PRESET_SEED, PREPROCESSING, `build(config)`,
        `random_state_dict(config, seed)`, `claims_state_dict(sd)`, `canonical_state_dict(sd)` and
        `config_from_state_dict(sd, path)`; its network has `config`, `resolution`, `layer_paths`, `layer_value`.
        """

        def seeded(preset: str) -> nn.Module:
            config = module.PRESETS[preset]
            with torch.device("meta"):
                net = module.build(config)
            # Assigning CPU tensors (seeded rule, extractor/models/seeded.py) to a meta-built network: torch's RNG
            # is neither used nor advanced.
            net.load_state_dict(module.random_state_dict(config, module.PRESET_SEED), strict=True, assign=True)
            return net

        def load(file: Path, state_dict: Mapping[str, Tensor] | None, device: torch.device | str) -> nn.Module:
            state = module.canonical_state_dict(state_dict if state_dict is not None else read_plain_state_dict(file))
            config = module.config_from_state_dict(state, file)
            with torch.device("meta"):
                net = module.build(config)
            check_state_dict(net, state, file)
            # Weights in float32 on `device`; integer buffers (BatchNorm's counters) keep their dtype.
            state = {k: v.to(device, torch.float32 if v.is_floating_point() else v.dtype) for k, v in state.items()}
            net.load_state_dict(state, strict=True, assign=True)
            return net

        return cls(
            name=module.FAMILY,
            kind="feature",
            presets=module.PRESETS,
            preprocessing=module.PREPROCESSING,
            build=module.build,
            seeded=seeded,
            claims=module.claims_state_dict,
            load=load,
        )

    def preset_of(self, config: Mapping[str, Any]) -> str | None:
        """The preset whose architecture a config describes, if any."""
        for preset, kwargs in self.presets.items():
            with torch.device("meta"):
                if dict(self.build(kwargs).config) == dict(config):
                    return preset
        return None


def _seeded_edm(name: str) -> EDMPrecond:
    init = PRESET_INIT[name]
    with torch.device("meta"):
        model = EDMPrecond(**PRESETS[name])
    # Built on meta then materialised and drawn by the seeded rule: torch's RNG is neither used nor advanced.
    model.to_empty(device="cpu")
    model.reset_parameters(zero_init_scale=init.zero_init_scale, seed=init.seed)
    return model


EDM_FAMILY = ModelFamily(
    name="edm",
    kind="diffusion",
    presets=PRESETS,
    preprocessing=EDM_PREPROCESSING,
    build=lambda config: EDMPrecond(**dict(config)),
    seeded=_seeded_edm,
    claims=lambda state_dict: False,  # EDM is what a checkpoint is taken for when no feature family claims it
    load=lambda file, _state_dict, device: load_checkpoint(file, device=device),
)

# Every family, EDM first; a checkpoint belongs to the first feature family that claims it, else to EDM.
FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        EDM_FAMILY,
        ModelFamily.from_module(fid_inception),
        ModelFamily.from_module(dinov2),
    )
}
MODEL_PRESETS: dict[str, str] = {preset: f.name for f in FAMILIES.values() for preset in f.presets}


def family_of_preset(preset: str) -> ModelFamily:
    """The family a preset belongs to; UnknownPresetError otherwise."""
    if preset not in MODEL_PRESETS:
        raise UnknownPresetError(f"unknown preset {preset!r}{did_you_mean(preset, MODEL_PRESETS) or ';'} presets: {sorted(MODEL_PRESETS)}")
    return FAMILIES[MODEL_PRESETS[preset]]


@reads_urls_too
def family_of_checkpoint(path: str | Path) -> tuple[ModelFamily, dict[str, Tensor] | None]:
    """The family of a checkpoint file or folder, from its state dict's keys, and that state dict (None for EDM)."""
    file = resolve_checkpoint_file(path)
    if is_edm_network_pickle(file):
        return EDM_FAMILY, None
    try:
        state_dict = read_plain_state_dict(file)
    except UnsafeCheckpointError:
        raise
    except CheckpointError:  # EDM's reader knows more container layouts and reports its own errors
        return EDM_FAMILY, None
    for family in FAMILIES.values():
        if family.claims(state_dict):
            return family, state_dict
    return EDM_FAMILY, None


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
        if self.preset is not None:
            family_of_preset(self.preset)

    @property
    def name(self) -> str:
        return self.preset if self.preset is not None else str(self.checkpoint)


@dataclass
class LoadedModel:
    """A network ready for inference plus what identifies it."""

    module: nn.Module  # EDMPrecond or a feature network; eval mode, requires_grad False
    name: str  # preset name or checkpoint path
    config: dict[str, Any]
    trained: bool  # False for random presets
    sha256: str  # of the checkpoint file, or of the preset's state dict
    resolution: int  # EDM: the image side it takes; feature network: the side it resizes every input to
    label_dim: int  # 0 for feature networks
    family: str = "edm"  # a key of FAMILIES
    kind: str = "diffusion"  # "diffusion" (takes noised [-1, 1] images, σ, labels) or "feature" (takes uint8 images)
    preprocessing: str = EDM_PREPROCESSING
    preset: str | None = None  # the preset whose architecture it has, also for checkpoints (None: no preset fits)


def preset_architecture(name: str) -> nn.Module:
    """The preset's network on torch's meta device: its modules and shapes, no weights (built in milliseconds)."""
    family = family_of_preset(name)
    with torch.device("meta"):
        return family.build(family.presets[name])


def build_preset(name: str, device: torch.device | str = "cpu") -> nn.Module:
    """The preset network with its deterministic random weights (drawn on CPU, then moved to `device`)."""
    return family_of_preset(name).seeded(name).to(device)


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


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def load_model(spec: ModelSpec, device: torch.device | str = "cpu") -> LoadedModel:
    """Build the network a spec names on `device`, frozen and in eval mode."""
    if spec.preset is not None:
        family = family_of_preset(spec.preset)
        module = _freeze(family.seeded(spec.preset))
        sha = state_dict_sha256(module.state_dict())
        module = module.to(device)
        trained = False
        preset: str | None = spec.preset
    else:
        # A checkpoint at a URL is read from a temporary local copy, removed once the network is built.
        with local_checkpoint(spec.checkpoint) as file:
            sha = file_sha256(file)
            family, state_dict = family_of_checkpoint(file)
            module = _freeze(family.load(file, state_dict, device))
        trained = True
        preset = family.preset_of(module.config)
    diffusion = family.kind == "diffusion"
    return LoadedModel(
        module=module,
        name=spec.name,
        config=dict(module.config),
        trained=trained,
        sha256=sha,
        resolution=module.img_resolution if diffusion else module.resolution,
        label_dim=module.label_dim if diffusion else 0,
        family=family.name,
        kind=family.kind,
        preprocessing=family.preprocessing,
        preset=preset,
    )


@functools.lru_cache(maxsize=4)
def _cached(spec: ModelSpec, device: str, stamp: tuple | None) -> LoadedModel:
    return load_model(spec, device)


def cached_model(spec: ModelSpec, device: torch.device | str = "cpu") -> LoadedModel:
    """`load_model` memoised per process (keyed by spec, device and the checkpoint file's identity), so a worker
    loads each network once, and a checkpoint rewritten at the same path (training's `latest.pt`) is read anew."""
    return _cached(spec, str(torch.device(device)), checkpoint_stamp(spec))


def checkpoint_stamp(spec: ModelSpec) -> tuple | None:
    """What changes when a spec's checkpoint file changes: its resolved path, size, mtime and inode locally; its
    listing entry's size and ETag (else modification time) in object storage. None for a preset."""
    if spec.checkpoint is None:
        return None
    file = resolve_checkpoint_file(spec.checkpoint)
    if isinstance(file, Path):
        found = file.stat()
        return (str(file.resolve()), found.st_size, found.st_mtime_ns, found.st_ino)
    import fsspec

    fs, path = fsspec.core.url_to_fs(file)
    entry = fs.info(path)
    return (file, entry.get("size"), entry.get("ETag") or entry.get("etag") or str(entry.get("LastModified") or entry.get("mtime")))
