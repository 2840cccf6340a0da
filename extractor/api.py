"""The extractor from Python (a notebook): `extract` writes an activation store exactly as `imzarr extract` does
and `generate` an image store as `imzarr generate` does (same defaults, checks and resumability: the command line
builds its runs with `extract_options` and `generate_options`); `features` runs an in-memory batch through the
same forward path and returns a labelled `xr.Dataset`."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from extractor.extraction import ExtractOptions, ExtractResult
from extractor.extraction import extract as run_extraction
from extractor.forward import ForwardSettings, PreparedForward, RunOptions
from extractor.generate import GenerateOptions, GenerateResult
from extractor.generate import generate as run_generation
from extractor.models import ModelSpec
from extractor.preset_layers import check_preset_layers
from extractor.selection import SelectionSpec, class_entries, layer_entries, resolve_class
from schemas.vocabulary import PRESET_NAMES
from schemas.activation_store import layer_dims
from schemas.classes import class_table
from schemas.output_paths import local_file_url_to_path
from schemas.task_runner import SchedulerSpec, parse_resources


def model_spec(preset: str | None, checkpoint: str | None) -> ModelSpec:
    return ModelSpec(preset=preset) if checkpoint is None else ModelSpec(checkpoint=str(checkpoint))


def as_model_spec(model: str | ModelSpec) -> ModelSpec:
    """A preset name (`tiny-random`, `fid-inception`, …), a checkpoint path, or a ModelSpec."""
    if isinstance(model, ModelSpec):
        return model
    return ModelSpec(preset=model) if model in PRESET_NAMES else ModelSpec(checkpoint=str(model))


def run_options(
    batch_size: int | None = None,
    device: str = "auto",
    scheduler: str | None = None,
    workers: int = 2,
    resources: str | None = None,
    overwrite: bool = False,
    shard_size: int | None = None,
    compile: bool = False,
) -> RunOptions:
    """How an extraction or generation runs (values checked here, before anything is read or written)."""
    return RunOptions(
        batch_size=batch_size,
        device=device,
        scheduler=SchedulerSpec(scheduler, workers, parse_resources(resources)),
        overwrite=overwrite,
        shard_size=shard_size,
        compile=compile,
    )


def extract_options(
    store: str,
    output: str,
    *,
    layers: str | Sequence[str],
    preset: str | None = None,
    checkpoint: str | None = None,
    sigma: float | None = None,
    seed: int | None = None,
    noise: bool = True,
    class_free: bool = False,
    pool: str = "none",
    dtype: str = "float16",
    compute_dtype: str = "auto",
    reconstructions: bool = False,
    num_samples: int | None = None,
    indices: str | None = None,
    classes: str | int | Sequence[str | int] | None = None,
    per_class: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    scheduler: str | None = None,
    workers: int = 2,
    resources: str | None = None,
    overwrite: bool = False,
    shard_size: int | None = None,
    compile: bool = False,
) -> ExtractOptions:
    """One extraction's options from `imzarr extract`'s options as keywords (the command line builds its run here
    too, so both have the same defaults and meanings). One `seed` serves the noise and --per-class sampling."""
    store, output, checkpoint = local_file_url_to_path([str(store), str(output), checkpoint])  # file:// as the CLI takes it
    check_preset_layers(preset, layer_entries(layers))
    forward = ForwardSettings(
        model=model_spec(preset, checkpoint),
        layers=layer_entries(layers),
        sigma=sigma,
        noise_seed=seed,
        noise=noise,
        class_free=class_free,
        pool=pool,
        storage_dtype=dtype,
        compute_dtype=compute_dtype,
        reconstructions=reconstructions,
    )
    selection = SelectionSpec(
        num_samples=num_samples,
        indices_file=indices,
        classes=class_entries(classes),
        per_class=per_class,
        seed=seed or 0,
    )
    run = run_options(batch_size, device, scheduler, workers, resources, overwrite, shard_size, compile)
    return ExtractOptions(str(store), str(output), forward, selection, run)


def extract(store: str, output: str, **options: Any) -> ExtractResult:
    """Image store → activation store of the named layers; keywords and defaults as `imzarr extract`'s options
    (`extract_options` lists them: layers=[…] is required)."""
    return run_extraction(extract_options(store, output, **options))


# help(extractor.extract) and editors show the keywords themselves.
extract.__signature__ = inspect.signature(extract_options).replace(return_annotation="ExtractResult")  # type: ignore[attr-defined]


def generate_options(
    output: str,
    *,
    preset: str | None = None,
    checkpoint: str | None = None,
    per_class: int | None = None,
    num_samples: int | None = None,
    classes: str | int | Sequence[str | int] | None = None,
    seed: int | None = None,
    sigma: float | None = None,
    layers: str | Sequence[str] | None = None,
    activations_out: str | None = None,
    pool: str = "none",
    dtype: str = "float16",
    compute_dtype: str = "auto",
    batch_size: int | None = None,
    device: str = "auto",
    scheduler: str | None = None,
    workers: int = 2,
    resources: str | None = None,
    overwrite: bool = False,
    shard_size: int | None = None,
    compile: bool = False,
) -> GenerateOptions:
    """One generation's options from `imzarr generate`'s options as keywords (the command line builds its run here
    too). `classes`: WNIDs, class names or 0-based indices (default: every class)."""
    output, activations_out, checkpoint = local_file_url_to_path([str(output), activations_out, checkpoint])
    check_preset_layers(preset, layer_entries(layers))
    forward = ForwardSettings(
        model=model_spec(preset, checkpoint),
        layers=layer_entries(layers),
        sigma=sigma,
        noise_seed=seed,
        pool=pool,
        storage_dtype=dtype,
        compute_dtype=compute_dtype,
    )
    run = run_options(batch_size, device, scheduler, workers, resources, overwrite, shard_size, compile)
    return GenerateOptions(output, forward, per_class, num_samples, class_entries(classes), activations_out, run)


def generate(output: str, **options: Any) -> GenerateResult:
    """Sample the one-step generator into an image store at `output`; keywords and defaults as `imzarr generate`'s
    options (`generate_options` lists them: per_class=K or num_samples=N is required)."""
    return run_generation(generate_options(output, **options))


generate.__signature__ = inspect.signature(generate_options).replace(return_annotation="GenerateResult")  # type: ignore[attr-defined]


def class_labels(labels: np.ndarray | Sequence[int | str]) -> np.ndarray:
    """Labels as 0-based class indices (int64): ints as given (-1: unknown), or WNIDs / class names / index text."""
    listed = labels if isinstance(labels, np.ndarray) else list(labels)
    if isinstance(listed, np.ndarray) and listed.dtype.kind in "iu":
        return listed.astype(np.int64)
    table = class_table()
    resolved = [int(v) if isinstance(v, (int, np.integer)) else table.index_of_wnid(resolve_class(str(v))) for v in listed]
    return np.asarray(resolved, dtype=np.int64)


def features(
    images: np.ndarray,
    labels: np.ndarray | Sequence[int | str] | None = None,
    *,
    layers: Sequence[str],
    model: str | ModelSpec,
    pool: str = "none",
    device: str = "auto",
    batch_size: int = 64,
    **forward: Any,
) -> xr.Dataset:
    """uint8 images (N, 3, S, S) → {layer: activations} (float32) as an xr.Dataset on dim `sample`, labelled
    like a store. `model`: a preset name, a checkpoint path or a ModelSpec; `forward`: sigma, noise_seed, noise,
    class_free, compute_dtype as ForwardSettings takes them (None/unset: the same defaults as `extract`).

    Sample i gets the noise of `global_index` i (as row i of a store would), so the same images give the same
    values here and through `extract`."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (N, 3, S, S), got shape {images.shape}")
    n = images.shape[0]
    labels = np.full(n, -1, dtype=np.int64) if labels is None else class_labels(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must hold one label per image ({n}), got shape {labels.shape}")
    settings = ForwardSettings(model=as_model_spec(model), layers=layer_entries(layers), pool=pool, storage_dtype="float32", **forward)
    with PreparedForward.prepare(settings, device, images.shape[-1], batch_size=batch_size) as prepared:
        values = _run_features(prepared, images, labels)
    fwd, loaded, shapes, paths = prepared.settings, prepared.loaded, prepared.layer_shapes, prepared.paths
    table = class_table()
    known = labels >= 0
    synsets = np.where(known, table.synsets_of(np.maximum(labels, 0)), "")
    names = np.where(known, table.names_of(np.maximum(labels, 0)), "")
    data_vars = {
        name: (layer_dims(name, pooled=len(shapes[name]) == 1), values[name], {"module_path": paths[name], "pooling": fwd.pool})
        for name in fwd.layers
    }
    coords = {"label": ("sample", labels.astype(np.int16)), "synset": ("sample", synsets), "class_name": ("sample", names)}
    attrs = {"model": loaded.name, "trained": loaded.trained, "sha256": loaded.sha256, "sigma": fwd.sigma, "noise_seed": fwd.noise_seed}
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def _run_features(prepared: PreparedForward, images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Every image through the prepared forward, batch by batch; sample i gets the noise of global_index i."""
    import torch

    from extractor.shard_forward import ShardForward

    n = images.shape[0]
    runner = ShardForward(prepared, n, output_name=None)
    try:
        global_index = np.arange(n, dtype=np.int64)
        for a in range(0, n, prepared.batch_size):
            b = min(n, a + prepared.batch_size)
            runner.run(a, torch.from_numpy(images[a:b]), labels[a:b], global_index[a:b])
        runner.finish()
        return {name: np.array(runner.buffers[name]) for name in prepared.settings.layers}
    finally:
        runner.release()
