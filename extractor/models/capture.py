"""Layer names of a network and capture of their outputs with forward hooks.

EDMPrecond: every encoder/decoder module path (`model.enc.16x16_block1`, `model.dec.8x8_in1`, ...) is a layer,
plus two aliases: `encoder_bottleneck` (the last encoder module) and `midblock` (the first decoder module).

Feature networks (anything implementing `FeatureNetwork`, e.g. `fid-inception`, `dinov2-*`) name their own
layers; each is read from one module's output, possibly reshaped (`pool3` flattens a pooled map, `cls` takes one
token). They take uint8 (or float 0..255) images and ignore σ and class labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from extractor.models.edm import EDMPrecond
from extractor.preset_layers import UnknownLayerError
from schemas.vocabulary import POOL_MODES
from schemas.errors import ImzarrError

__all__ = [
    "ALIASES",
    "FeatureNetwork",
    "InvalidImageBatchError",
    "LayerCapture",
    "UnknownLayerError",
    "capture_layers",
    "describe_layers",
    "images_as_float",
    "is_feature_network",
    "layer_names",
    "layer_paths",
    "module_layers",
    "resolve_layer",
]

ALIASES: tuple[str, ...] = ("encoder_bottleneck", "midblock")


class InvalidImageBatchError(ImzarrError, ValueError):
    """An image batch a feature network cannot take: not [N, 3, H, W], or neither uint8 nor floating point."""


@runtime_checkable
class FeatureNetwork(Protocol):
    """What capture needs from a feature network (an nn.Module whose forward takes [N, 3, H, W] 0..255 images)."""

    config: dict[str, Any]  # constructor kwargs: `type(net)(**net.config)` builds the same architecture
    resolution: int  # the side the network resizes every input to

    def layer_paths(self) -> dict[str, str]:
        """Layer name → module path whose forward output holds it, in execution order."""
        ...

    def layer_value(self, name: str, output: Tensor) -> Tensor:
        """The layer's activation, [N, C] or [N, C, H, W], from its module's forward output."""
        ...


def is_feature_network(model: nn.Module) -> bool:
    """True for feature networks (named layers, image input), False for EDMPrecond."""
    return isinstance(model, FeatureNetwork) and not isinstance(model, EDMPrecond)


def images_as_float(images: Tensor, network: str) -> Tensor:
    """A [N, 3, H, W] uint8 (or float 0..255) batch as float32 0..255; InvalidImageBatchError otherwise."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise InvalidImageBatchError(f"{network}: expected images [N, 3, H, W], got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise InvalidImageBatchError(f"{network}: expected uint8 or float 0..255 images, got {images.dtype}")
    return images.to(torch.float32)


class _StopForward(Exception):
    """Raised from a hook once every requested layer has run, to skip the rest of the network."""


def module_layers(model: nn.Module) -> list[str]:
    """Module paths of the layers, in execution order (EDM: encoder then decoder modules)."""
    if is_feature_network(model):
        return list(dict.fromkeys(model.layer_paths().values()))
    unet = model.model
    return [f"model.enc.{name}" for name in unet.enc] + [f"model.dec.{name}" for name in unet.dec]


def layer_paths(model: nn.Module) -> dict[str, str]:
    """Every layer name → the module path whose output it is: EDM's module paths in execution order (each its own
    path), then the aliases; a feature network's own table."""
    if is_feature_network(model):
        return dict(model.layer_paths())
    paths = {path: path for path in module_layers(model)}
    paths["encoder_bottleneck"] = f"model.enc.{list(model.model.enc)[-1]}"
    paths["midblock"] = f"model.dec.{next(iter(model.model.dec))}"
    return paths


def layer_names(model: nn.Module) -> list[str]:
    """All layer names: EDM's module paths in execution order then the aliases; a feature network's own names."""
    return list(layer_paths(model))


def resolve_layer(model: nn.Module, name: str) -> str:
    """The module path a layer name or alias refers to; UnknownLayerError (listing valid names) otherwise."""
    paths = layer_paths(model)
    if name not in paths:
        raise UnknownLayerError(name, list(paths))
    return paths[name]


def _pool(output: Tensor, pool: str) -> Tensor:
    # Pooled statistics are accumulated in float32 even under autocast.
    if pool == "none":
        return output.detach()
    if output.ndim == 2:  # already one vector per sample (e.g. pool3, cls): pooling leaves it as it is
        return output.detach().float()
    if pool == "mean":
        return output.detach().float().mean(dim=(2, 3))
    return output.detach().float().amax(dim=(2, 3))


class LayerCapture:
    """Forward hooks on the modules of named layers, registered once; `run` collects one batch's activations.

    Built once per run (in the spirit of torchvision's create_feature_extractor: the names are the API): each name
    is resolved to its module path here (UnknownLayerError lists the valid ones) and one hook is registered per
    module. The hooks do nothing outside `run`, so other forwards of the same (shared, cached) module are
    unaffected; `close` removes them. Callers serialise `run` per module (the per-device lock does).

    Activations are [N, C, H, W] for pool "none", else [N, C] (float32 mean/max over H, W, computed on the
    tensor's device); layers that are vectors ([N, C]) stay so under every pool mode. A feature network gets `x`
    as uint8 (or float 0..255) images and ignores `sigma` and `class_labels`; its output is what its forward
    returns (e.g. logits, the CLS token).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], pool: str = "none") -> None:
        if pool not in POOL_MODES:
            raise ValueError(f"pool must be one of {POOL_MODES}, got {pool!r}")
        if not layers:
            raise ValueError("no layers requested")
        self.model, self.layers, self.pool = model, tuple(layers), pool
        self.feature_net = is_feature_network(model)
        table = layer_paths(model)  # resolved once: every name is a key of one table
        unknown = [name for name in self.layers if name not in table]
        if unknown:
            raise UnknownLayerError(unknown[0], list(table))
        self.paths = {name: table[name] for name in self.layers}
        self._names_at: dict[str, list[str]] = {}  # module path → the requested names read from its output
        for name in self.layers:
            self._names_at.setdefault(self.paths[name], []).append(name)
        order = module_layers(model)
        self._last = max(self._names_at, key=order.index)
        self.vector_layers: set[str] = set()  # layers whose output is one vector per sample: no pooling applies
        self.has_run = False  # vector_layers is known once a forward ran through the hooks
        self._captured: dict[str, Tensor] | None = None  # None: not inside `run`, the hooks stay idle
        self._stop_after_last = False
        self._handles = [model.get_submodule(path).register_forward_hook(partial(self._collect, path)) for path in self._names_at]

    def _collect(self, path: str, _module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        """The forward hook of the module at `path`: its requested layers, pooled, into this run's capture."""
        captured = self._captured
        if captured is None:
            return
        names = self._names_at[path]
        if self.feature_net:
            for name in names:
                value = self.model.layer_value(name, output)
                if value.ndim == 2:
                    self.vector_layers.add(name)
                captured[name] = _pool(value, self.pool)
        else:
            if output.ndim == 2:
                self.vector_layers.update(names)
            pooled = _pool(output, self.pool)
            for name in names:
                captured[name] = pooled
        if path == self._last and self._stop_after_last:
            raise _StopForward

    def run(self, x: Tensor, sigma: Tensor | float | None, class_labels: Tensor | None, need_output: bool = False) -> tuple[dict[str, Tensor], Tensor | None]:
        """Run the network once and return ({requested name: activation}, its output or None).

        With `need_output` False the forward stops right after the last requested layer runs, so later modules
        (usually the whole decoder) are never computed."""
        self._captured, self._stop_after_last = {}, not need_output
        self.has_run = True
        out: Tensor | None = None
        try:
            out = self.model(x) if self.feature_net else self.model(x, sigma, class_labels)
        except _StopForward:
            pass
        finally:
            captured, self._captured = self._captured, None
        missing = [name for name in self.layers if name not in captured]
        if missing:  # only possible if the network's control flow skipped a module
            raise RuntimeError(f"layers {missing} did not run during the forward pass")
        return {name: captured[name] for name in self.layers}, (out if need_output else None)

    def close(self) -> None:
        """Remove the hooks from the network."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> LayerCapture:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def capture_layers(
    model: nn.Module,
    x: Tensor,
    sigma: Tensor | float | None,
    class_labels: Tensor | None,
    layers: Sequence[str],
    pool: str = "none",  # one of POOL_MODES, checked below
    need_output: bool = False,
) -> tuple[dict[str, Tensor], Tensor | None]:
    """One forward with hooks for this call only (a LayerCapture built, run once and closed): see LayerCapture."""
    with LayerCapture(model, layers, pool) as capture:
        return capture.run(x, sigma, class_labels, need_output)


def describe_layers(model: nn.Module, batch: int = 1) -> list[tuple[str, tuple[int, ...]]]:
    """Every layer name with its output shape ([batch, C, H, W] or [batch, C]), from a shape-only meta forward.

    Feature networks are probed with images at their own input resolution (other sizes give the same shapes:
    every input is resized first).
    """
    if is_feature_network(model):
        with torch.device("meta"):
            shadow = type(model)(**model.config)
        x = torch.empty(batch, 3, model.resolution, model.resolution, dtype=torch.uint8, device="meta")
        sigma = None
    else:
        with torch.device("meta"):
            shadow = EDMPrecond(**model.config)
        x = torch.empty(batch, model.img_channels, model.img_resolution, model.img_resolution, device="meta")
        sigma = torch.empty(batch, device="meta")
    names = layer_names(shadow)
    with torch.no_grad():
        activations, _ = capture_layers(shadow, x, sigma, None, names, need_output=False)
    return [(name, tuple(activations[name].shape)) for name in names]
