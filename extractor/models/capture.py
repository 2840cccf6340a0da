"""Layer names of an EDMPrecond and capture of their outputs with forward hooks.

Every encoder/decoder module path (`model.enc.16x16_block1`, `model.dec.8x8_in1`, ...) is a layer, plus two
aliases: `encoder_bottleneck` (the last encoder module) and `midblock` (the first decoder module).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from extractor.models.edm import EDMPrecond

__all__ = [
    "ALIASES",
    "POOL_MODES",
    "UnknownLayerError",
    "capture_layers",
    "describe_layers",
    "layer_names",
    "module_layers",
    "resolve_layer",
]

ALIASES: tuple[str, ...] = ("encoder_bottleneck", "midblock")
POOL_MODES: tuple[str, ...] = ("none", "mean", "max")
PoolMode = Literal["none", "mean", "max"]


class UnknownLayerError(KeyError, ValueError):
    """A layer name that is neither a module path of the network nor an alias."""

    def __init__(self, name: str, valid: Sequence[str]) -> None:
        self.name = name
        self.valid = list(valid)
        super().__init__(f"unknown layer {name!r}; valid layers: {', '.join(self.valid)}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class _StopForward(Exception):
    """Raised from a hook once every requested layer has run, to skip the rest of the network."""


def module_layers(model: EDMPrecond) -> list[str]:
    """Encoder then decoder module paths, in execution order."""
    unet = model.model
    return [f"model.enc.{name}" for name in unet.enc] + [f"model.dec.{name}" for name in unet.dec]


def layer_names(model: EDMPrecond) -> list[str]:
    """All layer names: module paths in execution order, then the aliases."""
    return module_layers(model) + list(ALIASES)


def resolve_layer(model: EDMPrecond, name: str) -> str:
    """The module path a layer name or alias refers to; UnknownLayerError (listing valid names) otherwise."""
    modules = module_layers(model)
    if name == "encoder_bottleneck":
        return f"model.enc.{list(model.model.enc)[-1]}"
    if name == "midblock":
        return f"model.dec.{next(iter(model.model.dec))}"
    if name in modules:
        return name
    raise UnknownLayerError(name, modules + list(ALIASES))


def _pool(output: Tensor, pool: str) -> Tensor:
    # Pooled statistics are accumulated in float32 even under autocast.
    if pool == "none":
        return output.detach()
    if pool == "mean":
        return output.detach().float().mean(dim=(2, 3))
    return output.detach().float().amax(dim=(2, 3))


def capture_layers(
    model: EDMPrecond,
    x: Tensor,
    sigma: Tensor | float,
    class_labels: Tensor | None,
    layers: Sequence[str],
    pool: PoolMode = "none",
    need_output: bool = False,
) -> tuple[dict[str, Tensor], Tensor | None]:
    """Run the network and return ({requested name: activation}, D(x) or None).

    Activations are [N, C, H, W] for pool "none", else [N, C] (float32 mean/max over H, W, computed on the
    tensor's device). With `need_output` False the forward stops right after the last requested layer runs, so
    later modules (usually the whole decoder) are never computed. Hooks are removed in all cases.
    """
    if pool not in POOL_MODES:
        raise ValueError(f"pool must be one of {POOL_MODES}, got {pool!r}")
    if not layers:
        raise ValueError("no layers requested")
    order = module_layers(model)
    wanted: dict[str, list[str]] = {}
    for name in layers:
        wanted.setdefault(resolve_layer(model, name), []).append(name)
    last = max(wanted, key=order.index)

    captured: dict[str, Tensor] = {}

    def make_hook(path: str):
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            pooled = _pool(output, pool)
            for name in wanted[path]:
                captured[name] = pooled
            if path == last and not need_output:
                raise _StopForward

        return hook

    handles = [model.get_submodule(path).register_forward_hook(make_hook(path)) for path in wanted]
    out: Tensor | None = None
    try:
        out = model(x, sigma, class_labels)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if name not in captured]
    if missing:  # only possible if the network's control flow skipped a module
        raise RuntimeError(f"layers {missing} did not run during the forward pass")
    return {name: captured[name] for name in layers}, (out if need_output else None)


def describe_layers(model: EDMPrecond, batch: int = 1) -> list[tuple[str, tuple[int, ...]]]:
    """Every layer name with its output shape [batch, C, H, W], from a shape-only forward on the meta device."""
    with torch.device("meta"):
        shadow = EDMPrecond(**model.config)
    x = torch.empty(batch, model.img_channels, model.img_resolution, model.img_resolution, device="meta")
    sigma = torch.empty(batch, device="meta")
    names = layer_names(shadow)
    with torch.no_grad():
        activations, _ = capture_layers(shadow, x, sigma, None, names, need_output=False)
    return [(name, tuple(activations[name].shape)) for name in names]
