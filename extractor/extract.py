"""Streams an image store's samples through a model and writes the activations of named layers.

Each task owns one output shard of every variable: it reads its samples from the image store, runs the model
in batches (one model per worker process, behind a per-device lock so hooks and threads never mix), writes its
region, and records itself done. Values depend only on the sample (noise is seeded per global index), never on
batch size, chunking, order or worker count.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import dask
import numpy as np
import torch
import zarr

from extractor.activation_writer import create_activation_arrays, default_shard_size, write_activation_shard
from extractor.models import (
    SMALLEST_TRAINING_SIGMA,
    ModelSpec,
    autocast_context,
    cached_model,
    capture_layers,
    resolve_compute_dtype,
    resolve_layer,
)
from extractor.selection import SelectionSpec, describe_selection, select_samples
from extractor.scheduling import SchedulerSpec, run_tasks
from schemas.activation_store import ACTIVATION_SCHEMA, RECONSTRUCTION_VAR, STORAGE_DTYPES
from schemas.errors import ImzarrError
from schemas.image_store import ImageStore, validate_image_store
from schemas.progress_report import ProgressReport
from schemas.store_lifecycle import finalize_store, inspect_existing, mark_done, prepare_store, read_done


class ExtractionError(ImzarrError):
    """Bad extraction settings, or values that failed the integrity pass."""


@dataclass(frozen=True)
class ForwardSettings:
    """Everything that decides the numbers for one sample (part of the settings fingerprint)."""

    model: ModelSpec
    layers: tuple[str, ...]
    sigma: float = 80.0
    noise_seed: int | None = 0  # None: feed the clean image
    class_free: bool = False
    pool: str = "none"
    storage_dtype: str = "float16"
    compute_dtype: str = "fp32"
    reconstructions: bool = False


@dataclass(frozen=True)
class ExtractOptions:
    store: str
    output: str
    forward: ForwardSettings
    selection: SelectionSpec = field(default_factory=SelectionSpec)
    batch_size: int = 64
    device: str = "auto"
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    overwrite: bool = False
    shard_size: int | None = None  # samples per output shard; default from the largest layer's bytes


@dataclass(frozen=True)
class ExtractResult:
    url: str
    num_samples: int
    already_complete: bool
    seconds: float
    trained: bool


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExtractionError(f"--device {device}: CUDA is not available on this machine (use cpu or auto)")
    return device


def check_forward_settings(fwd: ForwardSettings) -> None:
    if not fwd.sigma > 0:
        raise ExtractionError(
            f"--sigma {fwd.sigma}: σ must be > 0 (ln σ conditions the network; σ = 0 gives NaN everywhere); "
            f"for a nearly clean input use a small σ such as {SMALLEST_TRAINING_SIGMA}"
        )
    if fwd.pool not in ("none", "mean", "max"):
        raise ExtractionError(f"--pool {fwd.pool!r}: choose none, mean or max")
    if fwd.storage_dtype not in STORAGE_DTYPES:
        raise ExtractionError(f"--dtype {fwd.storage_dtype!r}: choose one of {STORAGE_DTYPES}")
    try:
        resolve_compute_dtype(fwd.compute_dtype)
    except ValueError as exc:
        raise ExtractionError(str(exc)) from None


def probe_layers(fwd: ForwardSettings, device: str, batch: int = 1) -> tuple[dict[str, tuple[int, ...]], dict[str, str], Any]:
    """Per-sample output shape and module path of every requested layer, from one real forward on `batch` samples."""
    loaded = cached_model(fwd.model, device)
    paths = {name: resolve_layer(loaded.module, name) for name in fwd.layers}  # UnknownLayerError lists valid names
    res = loaded.resolution
    x = torch.zeros(batch, 3, res, res, device=device)
    with torch.no_grad(), _model_lock(device):
        acts, _ = capture_layers(loaded.module, x, torch.full((batch,), fwd.sigma, device=device), None, list(fwd.layers), fwd.pool)
    return {name: tuple(a.shape[1:]) for name, a in acts.items()}, paths, loaded


def _settings(options: ExtractOptions, image_attrs: dict, selection: dict, model_sha: str) -> dict[str, Any]:
    fwd = options.forward
    return {
        "schema": ACTIVATION_SCHEMA,
        "model_sha256": model_sha,
        "layers": list(fwd.layers),
        "sigma": fwd.sigma,
        "noise_seed": fwd.noise_seed,
        "class_free": fwd.class_free,
        "pool": fwd.pool,
        "storage_dtype": fwd.storage_dtype,
        "compute_dtype": fwd.compute_dtype,
        "reconstructions": fwd.reconstructions,
        "selection": selection,
        "source_fingerprint": image_attrs.get("settings_fingerprint"),
        "shard_size": options.shard_size,
    }


def extract(options: ExtractOptions) -> ExtractResult:
    """Run (or resume, or confirm) one extraction; idempotent for the same inputs and settings."""
    started = time.monotonic()
    fwd = options.forward
    check_forward_settings(fwd)
    if not fwd.layers:
        raise ExtractionError("no layers requested (--layers L1,L2)")
    device = resolve_device(options.device)
    images = validate_image_store(options.store)
    labels, synsets = images.coordinate("label"), images.coordinate("synset")
    chosen = select_samples(options.selection, labels, synsets)
    shapes, paths, loaded = probe_layers(fwd, device)
    if loaded.resolution != images.resolution:
        raise ExtractionError(f"{options.store}: images are {images.resolution}×{images.resolution}, the model takes {loaded.resolution}×{loaded.resolution}")
    selection = describe_selection(options.selection, chosen)
    settings = _settings(options, images.attrs, selection, loaded.sha256)
    if inspect_existing(options.output, ACTIVATION_SCHEMA, settings, options.overwrite) == "complete":
        return ExtractResult(options.output, int(chosen.size), True, time.monotonic() - started, loaded.trained)
    shard = options.shard_size or default_shard_size(shapes, fwd.storage_dtype)
    n = int(chosen.size)
    num_shards = -(-n // shard)
    rec_shape = (3, images.resolution, images.resolution) if fwd.reconstructions else None
    state = prepare_store(
        options.output,
        ACTIVATION_SCHEMA,
        settings,
        num_shards,
        lambda g: create_activation_arrays(g, n, shapes, fwd.storage_dtype, shard, rec_shape),
        options.overwrite,
        initial_attrs=_attrs(options, images, loaded, paths, selection, device),
    )
    coords = {
        "label": labels[chosen].astype(np.int16),
        "synset": synsets[chosen],
        "class_name": images.coordinate("class_name")[chosen],
        "global_index": images.coordinate("global_index")[chosen],
        "source_file": images.coordinate("source_file")[chosen],
        "source_sample": chosen,
    }
    tasks = [
        dask.delayed(extract_shard, pure=False)(
            ShardTask(options.store, options.output, k, k * shard, {c: v[k * shard : (k + 1) * shard] for c, v in coords.items()}, fwd, options.batch_size, options.device)
        )
        for k in state.pending
    ]
    done = n - sum(min(shard, n - k * shard) for k in state.pending)
    receipts = run_tasks(tasks, options.scheduler, ProgressReport(n, f"extracting {options.output}"), done)
    integrity_pass(options.output, num_shards, receipts)
    finalize_store(options.output, {})
    return ExtractResult(options.output, n, False, time.monotonic() - started, loaded.trained)


def integrity_pass(url: str, num_shards: int, receipts: list[dict]) -> None:
    bad = [r for r in receipts if r.get("nonfinite")]
    if bad:
        lines = [f"{layer}: samples {samples[:10]}{' …' if len(samples) > 10 else ''}" for r in bad for layer, samples in r["nonfinite"].items()]
        raise ExtractionError(f"{url}: NaN/Inf in the activations, store left incomplete — " + "; ".join(lines[:5]))
    done = read_done(url, num_shards)
    if not done.all():
        raise ExtractionError(f"{url}: shards {np.flatnonzero(~done)[:10].tolist()} were not written; re-run to finish")


def model_attrs(fwd: ForwardSettings, loaded) -> dict[str, Any]:
    """How a store records the network that made its values."""
    return {
        "name": loaded.name,
        "preset": fwd.model.preset,
        "checkpoint": fwd.model.checkpoint,
        "sha256": loaded.sha256,
        "config": {k: (str(v) if isinstance(v, float) and not np.isfinite(v) else v) for k, v in loaded.config.items()},
        "trained": loaded.trained,
    }


def versions() -> dict[str, str]:
    return {"imzarr": version("imzarr"), "torch": torch.__version__, "zarr": zarr.__version__, "numpy": np.__version__}


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def run_attrs(fwd: ForwardSettings, loaded, paths: dict[str, str], device: str) -> dict[str, Any]:
    """Attributes every activation store carries: model, layers, σ, noise, pooling, dtypes, versions, device."""
    return {
        "model": model_attrs(fwd, loaded),
        "layers": paths,
        "sigma": fwd.sigma,
        "noise": None if fwd.noise_seed is None else {"seed": fwd.noise_seed, "per_sample": "numpy default_rng([seed, global_index]).standard_normal"},
        "class_conditioning": "none (zero labels)" if fwd.class_free else "one-hot of label",
        "pooling": fwd.pool,
        "dtypes": {"storage": fwd.storage_dtype, "compute": fwd.compute_dtype},
        "versions": versions(),
        "device": device_name(device),
    }


def _attrs(options: ExtractOptions, images: ImageStore, loaded, paths: dict[str, str], selection: dict, device: str) -> dict[str, Any]:
    return {
        **run_attrs(options.forward, loaded, paths, device),
        "input_scaling": "uint8 / 127.5 - 1, then + sigma * noise",
        "selection": selection,
        "source": {"url": options.store, "schema": images.attrs.get("schema"), "fingerprint": images.attrs.get("settings_fingerprint"), "source_format": images.attrs.get("source_format")},
    }


# One lock per device and process: hooks live on the shared module, and two CPU forwards would only fight for cores.
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _model_lock(device: str) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(device, threading.Lock())


@dataclass(frozen=True)
class ShardTask:
    """One unit of work, cheap to pickle: the model is named, never shipped."""

    store: str
    output: str
    shard: int
    start: int
    coords: dict[str, np.ndarray]
    forward: ForwardSettings
    batch_size: int
    device: str


def sample_noise(seed: int, global_index: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal noise per sample, seeded by (seed, global_index) alone."""
    return np.stack([np.random.default_rng([seed, int(g)]).standard_normal(shape, dtype=np.float32) for g in global_index])


def run_forward(loaded, images: np.ndarray, labels: np.ndarray, global_index: np.ndarray, fwd: ForwardSettings, device: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """One batch: uint8 images → host arrays of every requested layer (storage dtype) and reconstructions."""
    x = torch.from_numpy(images).to(device).float() / 127.5 - 1
    if fwd.noise_seed is not None:
        x = x + fwd.sigma * torch.from_numpy(sample_noise(fwd.noise_seed, global_index, images.shape[1:])).to(device)
    sigma = torch.full((images.shape[0],), fwd.sigma, device=device)
    one_hot = one_hot_labels(labels, loaded.label_dim, device, fwd.class_free)
    store_dtype = getattr(torch, fwd.storage_dtype)
    with torch.no_grad(), _model_lock(device), autocast_context(device, fwd.compute_dtype):
        acts, out = capture_layers(loaded.module, x, sigma, one_hot, list(fwd.layers), fwd.pool, need_output=fwd.reconstructions)
        host = {name: a.to(store_dtype).cpu().numpy() for name, a in acts.items()}
        recon = None if out is None else to_uint8_images(out)
    return host, recon


def find_nonfinite(variables: dict[str, np.ndarray], start: int) -> dict[str, list[int]]:
    """{layer: sample positions} of rows holding NaN or Inf."""
    found = {}
    for name, arr in variables.items():
        bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
        if bad.any():
            found[name] = (start + np.flatnonzero(bad)).tolist()
    return found


def one_hot_labels(labels: np.ndarray, label_dim: int, device: str, class_free: bool = False) -> torch.Tensor:
    """One-hot rows for labels ≥ 0; unknown labels (-1) and class-free runs get zero rows."""
    one_hot = torch.zeros(labels.shape[0], label_dim, device=device)
    if not class_free:
        known = np.flatnonzero(labels >= 0)
        one_hot[torch.from_numpy(known).to(device), torch.from_numpy(labels[known].astype(np.int64)).to(device)] = 1
    return one_hot


def to_uint8_images(d: torch.Tensor) -> np.ndarray:
    """DMD2's own conversion of D(x) to images: clamp((D + 1) · 127.5), then truncate (not round)."""
    return ((d.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()


def extract_shard(task: ShardTask) -> dict:
    """Read one output shard's samples, run them in batches, write the shard, record it done."""
    device = resolve_device(task.device)
    loaded = cached_model(task.forward.model, device)
    store = ImageStore(task.store, zarr.open_group(task.store, mode="r"))
    coords = task.coords
    images = store.take(coords["source_sample"])
    labels, gidx = coords["label"], coords["global_index"]
    n = images.shape[0]
    # Filled batch by batch: one shard-sized buffer per variable, no list of batches to concatenate (that copy
    # doubled a task's peak memory).
    variables: dict[str, np.ndarray] = {}
    for a in range(0, n, task.batch_size):
        b = a + task.batch_size
        host, recon = run_forward(loaded, images[a:b], labels[a:b], gidx[a:b], task.forward, device)
        if recon is not None:
            host[RECONSTRUCTION_VAR] = recon
        for name, arr in host.items():
            if name not in variables:
                variables[name] = np.empty((n, *arr.shape[1:]), dtype=arr.dtype)
            variables[name][a:b] = arr
    nonfinite = find_nonfinite({name: variables[name] for name in task.forward.layers}, task.start)
    if nonfinite:
        return {"images": int(n), "nonfinite": nonfinite}
    write_activation_shard(task.output, task.start, variables, coords)
    mark_done(task.output, task.shard)
    return {"images": int(n)}
