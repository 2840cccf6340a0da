"""One-step sampling of the DMD2 generator into an image store (and, optionally, its own activations).

image = D(σ·ε; σ, one-hot(label)), ε seeded per sample from (seed, sample index), converted to uint8 as DMD2
does. The result is an ordinary `imzarr.images/1` store (source_format "generated") that `extract` reads like
real data; with layers, the generator's view of its own samples goes to an activation store as it samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np
import torch

from extractor.activation_writer import create_activation_arrays, default_shard_size, write_activation_shard
from extractor.extract import (
    ExtractionError,
    ForwardSettings,
    _model_lock,
    cached_model,
    check_forward_settings,
    device_name,
    find_nonfinite,
    integrity_pass,
    model_attrs,
    one_hot_labels,
    probe_layers,
    resolve_device,
    run_attrs,
    sample_noise,
    to_uint8_images,
    versions,
)
from extractor.models import autocast_context, capture_layers
from extractor.scheduling import SchedulerSpec, run_tasks
from schemas.activation_store import ACTIVATION_SCHEMA
from schemas.classes import NUM_CLASSES, class_table
from schemas.image_layout import create_image_arrays, write_image_shard
from schemas.image_store import IMAGE_SCHEMA
from schemas.progress_report import ProgressReport
from schemas.store_lifecycle import StoreState, finalize_store, inspect_existing, mark_done, prepare_store

DEFAULT_GENERATE_SHARD = 1024


@dataclass(frozen=True)
class GenerateOptions:
    output: str
    forward: ForwardSettings  # layers may be empty; noise_seed is the sampling seed
    per_class: int | None = None
    num_samples: int | None = None
    classes: tuple[str, ...] | None = None  # WNIDs; default: every class the model is conditioned on
    activations_out: str | None = None
    batch_size: int = 64
    device: str = "auto"
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    overwrite: bool = False
    shard_size: int | None = None


@dataclass(frozen=True)
class GenerateResult:
    url: str
    activations_url: str | None
    num_samples: int
    already_complete: bool
    seconds: float
    trained: bool


def generation_labels(per_class: int | None, num_samples: int | None, classes: tuple[str, ...] | None, seed: int) -> np.ndarray:
    """Sorted-order labels of the samples: class-major K per class, or N drawn uniformly (seeded)."""
    table = class_table()
    ids = np.arange(NUM_CLASSES) if not classes else np.array(sorted(table.index_of_wnid(w) for w in classes))
    if (per_class is None) == (num_samples is None):
        raise ExtractionError("give exactly one of --per-class K or --num-samples N")
    if per_class is not None:
        if per_class < 1:
            raise ExtractionError(f"--per-class must be ≥ 1, got {per_class}")
        return np.repeat(ids, per_class).astype(np.int16)
    if num_samples < 1:
        raise ExtractionError(f"--num-samples must be ≥ 1, got {num_samples}")
    return np.random.default_rng([seed, 1]).choice(ids, size=num_samples).astype(np.int16)


@dataclass(frozen=True)
class GenerateTask:
    output: str
    activations_out: str | None
    shard: int
    start: int
    labels: np.ndarray
    forward: ForwardSettings
    batch_size: int
    device: str


def generate_shard(task: GenerateTask) -> dict:
    """Sample one output shard, write its images (and activations), record it done in both stores."""
    device = resolve_device(task.device)
    loaded = cached_model(task.forward.model, device)
    fwd = task.forward
    n = task.labels.size
    index = np.arange(task.start, task.start + n, dtype=np.int64)
    s = loaded.resolution
    images, acts = [], {name: [] for name in fwd.layers}
    for a in range(0, n, task.batch_size):
        b = min(n, a + task.batch_size)
        x = fwd.sigma * torch.from_numpy(sample_noise(fwd.noise_seed, index[a:b], (3, s, s))).to(device)
        sigma = torch.full((b - a,), fwd.sigma, device=device)
        labels = one_hot_labels(task.labels[a:b], loaded.label_dim, device)
        with torch.no_grad(), _model_lock(device), autocast_context(device, fwd.compute_dtype):
            if fwd.layers:
                captured, out = capture_layers(loaded.module, x, sigma, labels, list(fwd.layers), fwd.pool, need_output=True)
                for name, value in captured.items():
                    acts[name].append(value.to(getattr(torch, fwd.storage_dtype)).cpu().numpy())
            else:
                out = loaded.module(x, sigma, labels)
            images.append(to_uint8_images(out))
    table = class_table()
    coords = {
        "label": task.labels,
        "synset": table.synsets_of(task.labels),
        "class_name": table.names_of(task.labels),
        "global_index": index,
    }
    variables = {name: np.concatenate(parts) for name, parts in acts.items()}
    nonfinite = find_nonfinite(variables, task.start)
    if nonfinite:
        return {"images": n, "nonfinite": nonfinite}
    empty = np.full(n, "", dtype=object)
    write_image_shard(task.output, task.start, np.concatenate(images), {**coords, "source_file": empty, "source_row": index})
    if task.activations_out:
        write_activation_shard(task.activations_out, task.start, variables, {**coords, "source_file": empty, "source_sample": index})
        mark_done(task.activations_out, task.shard)
    mark_done(task.output, task.shard)
    return {"images": n}


def generate(options: GenerateOptions) -> GenerateResult:
    """Sample (or resume, or confirm) a generated image store; idempotent for the same settings."""
    started = time.monotonic()
    fwd = options.forward
    if fwd.noise_seed is None:
        raise ExtractionError("generation needs a seed for its noise")
    if fwd.layers and not options.activations_out:
        raise ExtractionError("--layers needs --activations-out ACTS.zarr")
    if options.activations_out and not fwd.layers:
        raise ExtractionError("--activations-out needs --layers")
    check_forward_settings(fwd)
    device = resolve_device(options.device)
    labels = generation_labels(options.per_class, options.num_samples, options.classes, fwd.noise_seed)
    n = labels.size
    loaded = cached_model(fwd.model, device)
    shapes, paths = ({}, {})
    if fwd.layers:
        shapes, paths, _ = probe_layers(fwd, device)
    shard = options.shard_size or min(DEFAULT_GENERATE_SHARD, default_shard_size(shapes, fwd.storage_dtype))
    num_shards = -(-n // shard)
    selection = {"per_class": options.per_class, "num_samples": options.num_samples, "classes": list(options.classes) if options.classes else None, "count": int(n)}
    image_settings = {"schema": IMAGE_SCHEMA, "format": "generated", "model_sha256": loaded.sha256, "sigma": fwd.sigma, "seed": fwd.noise_seed,
                      "compute_dtype": fwd.compute_dtype, "selection": selection, "shard_size": shard}
    act_settings = {**image_settings, "schema": ACTIVATION_SCHEMA, "layers": list(fwd.layers), "pool": fwd.pool, "storage_dtype": fwd.storage_dtype}
    statuses = [inspect_existing(options.output, IMAGE_SCHEMA, image_settings, options.overwrite)]
    if options.activations_out:
        statuses.append(inspect_existing(options.activations_out, ACTIVATION_SCHEMA, act_settings, options.overwrite))
    if all(st == "complete" for st in statuses):
        return GenerateResult(options.output, options.activations_out, n, True, time.monotonic() - started, loaded.trained)
    model = model_attrs(fwd, loaded)
    image_state = prepare_store(
        options.output, IMAGE_SCHEMA, image_settings, num_shards,
        lambda g: create_image_arrays(g, n, loaded.resolution, shard, min(64, shard)), options.overwrite,
        initial_attrs={
            "source_format": "generated", "source_label_order": "sorted", "resolution": loaded.resolution,
            "shuffle_seed": None, "num_samples": int(n), "rejected": [],
            "sources": [{"path": loaded.name, "size": 0, "fingerprint": "sha256:" + loaded.sha256}],
            "versions": versions(), "model": model, "sigma": fwd.sigma, "seed": fwd.noise_seed, "selection": selection,
            "sampling": "one step: D(sigma * eps; sigma, one-hot(label)), eps ~ numpy default_rng([seed, index])",
            "device": device_name(device),
        },
    )
    pending = set(image_state.pending)
    if options.activations_out:
        act_state: StoreState = prepare_store(
            options.activations_out, ACTIVATION_SCHEMA, act_settings, num_shards,
            lambda g: create_activation_arrays(g, n, shapes, fwd.storage_dtype, shard, None), options.overwrite,
            initial_attrs={**run_attrs(fwd, loaded, paths, device), "selection": selection,
                           "source": {"url": options.output, "schema": IMAGE_SCHEMA, "generated": True},
                           "input_scaling": "none: the generator's own input sigma * eps"},
        )
        pending |= set(act_state.pending)
    tasks = [
        dask.delayed(generate_shard, pure=False)(
            GenerateTask(options.output, options.activations_out, k, k * shard, labels[k * shard : (k + 1) * shard], fwd, options.batch_size, options.device)
        )
        for k in sorted(pending)
    ]
    done = n - sum(min(shard, n - k * shard) for k in pending)
    receipts = run_tasks(tasks, options.scheduler, ProgressReport(n, f"generating {options.output}"), done)
    integrity_pass(options.output, num_shards, receipts)
    if options.activations_out:
        integrity_pass(options.activations_out, num_shards, receipts)
        finalize_store(options.activations_out, {})
    finalize_store(options.output, {})
    return GenerateResult(options.output, options.activations_out, n, False, time.monotonic() - started, loaded.trained)
