"""Streams an image store's samples through a model and writes the activations of named layers.

Each task owns one output shard of every variable: it reads its samples from the image store, runs them through
the one forward path (`extractor.forward`: one model per worker process, the per-device lock held around the
forward only), streams the shard to disk from a writer thread, and records itself done once it is written.
Values depend only on the sample (noise is a function of (seed, global_index), `extractor.noise`), never on
batch size, chunking, order, device or worker count.
"""

from __future__ import annotations

import time
from dataclasses import InitVar, dataclass, field
from importlib.metadata import version
from typing import Any

import dask
import numpy as np
import torch
import zarr

from extractor.activation_writer import ShardOutput, create_activation_arrays, default_shard_size
from extractor.forward import (
    ExtractionError,
    ForwardSettings,
    RunOptions,
    ShardForward,
    auto_batch_size,
    check_forward_settings,
    fold_run_keywords,
    forward_batch,
    measured_bytes_per_sample,
    per_sample_bytes,
    pinned_images,
    prepare_module,
    resolve_compute,
    resolve_device,
)
from extractor.models import cached_model, resolve_layer
from extractor.noise import NOISE_RECIPE, noise_attrs, recorded_noise_recipe
from extractor.scheduling import SchedulerSpec, run_tasks
from extractor.selection import SelectionSpec, describe_selection, select_samples
from schemas.activation_store import ACTIVATION_SCHEMA, RECONSTRUCTION_VAR
from schemas.errors import ImzarrError
from schemas.image_store import ImageStore, validate_image_store
from schemas.progress_report import ProgressReport
from schemas.store_lifecycle import finalize_store, inspect_existing, mark_done, path_state, prepare_store, read_done

class NoiseRecipeError(ImzarrError):
    """An existing store's noise was made with another recipe than this version's."""


@dataclass(frozen=True)
class ExtractOptions:
    store: str
    output: str
    forward: ForwardSettings
    selection: SelectionSpec = field(default_factory=SelectionSpec)
    run: RunOptions = field(default_factory=RunOptions)
    # Accepted while extractor/cli.py still passes run options one by one: folded into `run`, never stored.
    batch_size: InitVar[int | None] = None
    device: InitVar[str | None] = None
    scheduler: InitVar[SchedulerSpec | None] = None
    overwrite: InitVar[bool | None] = None
    shard_size: InitVar[int | None] = None

    def __post_init__(self, batch_size, device, scheduler, overwrite, shard_size) -> None:
        run = fold_run_keywords(self.run, batch_size=batch_size, device=device, scheduler=scheduler, overwrite=overwrite, shard_size=shard_size)
        object.__setattr__(self, "run", run)


@dataclass(frozen=True)
class ExtractResult:
    url: str
    num_samples: int
    already_complete: bool
    seconds: float
    trained: bool


def probe_layers(fwd: ForwardSettings, device: str, batch: int = 1) -> tuple[dict[str, tuple[int, ...]], dict[str, str], Any]:
    """Per-sample output shape and module path of every requested layer, from one real forward on `batch` samples."""
    loaded = cached_model(fwd.model, device)
    paths = {name: resolve_layer(loaded.module, name) for name in fwd.layers}  # UnknownLayerError lists valid names
    res = loaded.resolution
    x = torch.zeros(batch, 3, res, res, device=device)
    acts, _ = forward_batch(loaded.module, x, None, fwd, device, need_output=False)
    return {name: tuple(a.shape[1:]) for name, a in acts.items()}, paths, loaded


def choose_batch_size(loaded, fwd: ForwardSettings, shapes: dict[str, tuple[int, ...]], device: str, compile_blocks: bool = False) -> int:
    """The batch when none is given: 64 on CPU; on CUDA from free memory and a measured forward of a few samples."""
    if not device.startswith("cuda"):
        return auto_batch_size(0, device)
    module = prepare_module(loaded.module, device, compile_blocks)
    planned = measured_bytes_per_sample(module, fwd, loaded.resolution, loaded.label_dim, device) + per_sample_bytes(shapes, loaded.resolution, fwd.storage_dtype)
    return auto_batch_size(planned, device)


def check_noise_recipe(url: str, noise_seed: int | None, overwrite: bool) -> None:
    """Refuse to resume or confirm a store whose noise another recipe made (its values could not be matched)."""
    if overwrite or noise_seed is None or path_state(url) != "store":
        return
    recorded = recorded_noise_recipe(dict(zarr.open_group(url, mode="r", use_consolidated=False).attrs))
    if recorded is not None and recorded != NOISE_RECIPE:
        raise NoiseRecipeError(
            f"{url}: its noise was made with {recorded!r}, this version makes {NOISE_RECIPE!r}; "
            "it cannot be resumed or confirmed: pass --overwrite to replace it"
        )


def _settings(options: ExtractOptions, fwd: ForwardSettings, image_attrs: dict, selection: dict, model_sha: str) -> dict[str, Any]:
    settings = {
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
        "shard_size": options.run.shard_size,
    }
    if fwd.noise_seed is not None:  # only then: stores made without noise keep their fingerprint
        settings["noise_recipe"] = NOISE_RECIPE
    return settings


def extract(options: ExtractOptions) -> ExtractResult:
    """Run (or resume, or confirm) one extraction; idempotent for the same inputs and settings."""
    started = time.monotonic()
    run = options.run
    device = resolve_device(run.device)
    fwd = resolve_compute(options.forward, device)
    check_forward_settings(fwd)
    if not fwd.layers:
        raise ExtractionError("no layers requested (--layers L1,L2)")
    images = validate_image_store(options.store)
    labels, synsets = images.coordinate("label"), images.coordinate("synset")
    chosen = select_samples(options.selection, labels, synsets)
    shapes, paths, loaded = probe_layers(fwd, device)
    if loaded.resolution != images.resolution:
        raise ExtractionError(f"{options.store}: images are {images.resolution}×{images.resolution}, the model takes {loaded.resolution}×{loaded.resolution}")
    selection = describe_selection(options.selection, chosen)
    settings = _settings(options, fwd, images.attrs, selection, loaded.sha256)
    check_noise_recipe(options.output, fwd.noise_seed, run.overwrite)
    if inspect_existing(options.output, ACTIVATION_SCHEMA, settings, run.overwrite) == "complete":
        return ExtractResult(options.output, int(chosen.size), True, time.monotonic() - started, loaded.trained)
    shard = run.shard_size or default_shard_size(shapes, fwd.storage_dtype)
    n = int(chosen.size)
    num_shards = -(-n // shard)
    rec_shape = (3, images.resolution, images.resolution) if fwd.reconstructions else None
    state = prepare_store(
        options.output,
        ACTIVATION_SCHEMA,
        settings,
        num_shards,
        lambda g: create_activation_arrays(g, n, shapes, fwd.storage_dtype, shard, rec_shape),
        run.overwrite,
        initial_attrs=_attrs(options, fwd, images, loaded, paths, selection, device),
    )
    coords = {
        "label": labels[chosen].astype(np.int16),
        "synset": synsets[chosen],
        "class_name": images.coordinate("class_name")[chosen],
        "global_index": images.coordinate("global_index")[chosen],
        "source_file": images.coordinate("source_file")[chosen],
        "source_sample": chosen,
    }
    batch = run.batch_size or choose_batch_size(loaded, fwd, shapes, device, run.compile)
    tasks = [
        dask.delayed(extract_shard, pure=False)(
            ShardTask(options.store, options.output, k, k * shard, {c: v[k * shard : (k + 1) * shard] for c, v in coords.items()},
                      fwd, shapes, batch, run.device, run.compile)
        )
        for k in state.pending
    ]
    done = n - sum(min(shard, n - k * shard) for k in state.pending)
    receipts = run_tasks(tasks, run.scheduler, ProgressReport(n, f"extracting {options.output}"), done)
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
        "noise": None if fwd.noise_seed is None else noise_attrs(fwd.noise_seed),
        "class_conditioning": "none (zero labels)" if fwd.class_free else "one-hot of label",
        "pooling": fwd.pool,
        "dtypes": {"storage": fwd.storage_dtype, "compute": fwd.compute_dtype},
        "versions": versions(),
        "device": device_name(device),
    }


def _attrs(options: ExtractOptions, fwd: ForwardSettings, images: ImageStore, loaded, paths: dict[str, str], selection: dict, device: str) -> dict[str, Any]:
    return {
        **run_attrs(fwd, loaded, paths, device),
        "input_scaling": "uint8 / 127.5 - 1, then + sigma * noise",
        "selection": selection,
        "source": {"url": options.store, "schema": images.attrs.get("schema"), "fingerprint": images.attrs.get("settings_fingerprint"), "source_format": images.attrs.get("source_format")},
    }


@dataclass(frozen=True)
class ShardTask:
    """One unit of work, cheap to pickle: the model is named, never shipped."""

    store: str
    output: str
    shard: int
    start: int
    coords: dict[str, np.ndarray]
    forward: ForwardSettings  # compute dtype resolved
    layer_shapes: dict[str, tuple[int, ...]]
    batch_size: int
    device: str
    compile: bool = False


def extract_shard(task: ShardTask) -> dict:
    """Read one output shard's samples, run them in batches, write the shard (streamed), record it done."""
    device = resolve_device(task.device)
    loaded = cached_model(task.forward.model, device)
    prepare_module(loaded.module, device, task.compile)
    store = ImageStore(task.store, zarr.open_group(task.store, mode="r"))
    coords = task.coords
    images = pinned_images(store.take(coords["source_sample"]), device)
    labels, gidx = coords["label"], coords["global_index"]
    n = images.shape[0]
    runner = ShardForward(loaded, task.forward, device, n, task.layer_shapes, RECONSTRUCTION_VAR if task.forward.reconstructions else None)
    output = ShardOutput(task.output, task.shard, task.start, runner.buffers)
    runner.on_ready = output.ready
    try:
        for a in range(0, n, task.batch_size):
            b = min(n, a + task.batch_size)
            runner.run(a, images[a:b], labels[a:b], gidx[a:b])
        runner.finish()
        nonfinite = runner.nonfinite(task.start)
        if nonfinite:
            output.abort()
            return {"images": int(n), "nonfinite": nonfinite}
        output.commit(coords)
    except BaseException:
        output.abort()
        raise
    finally:
        runner.release()  # the writer thread is done with the buffers either way
    mark_done(task.output, task.shard)
    return {"images": int(n)}
