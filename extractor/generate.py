"""One-step sampling of the DMD2 generator into an image store (and, optionally, its own activations).

image = D(σ·ε; σ, one-hot(label)), ε seeded per sample from (seed, sample index), converted to uint8 as DMD2
does. The result is an ordinary `imzarr.images/1` store (source_format "generated") that `extract` reads like
real data; with layers, the generator's view of its own samples goes to an activation store as it samples.
"""

from __future__ import annotations

import time
from dataclasses import InitVar, dataclass, field, replace

import dask
import numpy as np

from extractor.activation_writer import ShardOutput, create_activation_arrays, default_shard_size
from extractor.extract import (
    ExtractionError,
    ForwardSettings,
    RunOptions,
    cached_model,
    check_noise_recipe,
    choose_batch_size,
    device_name,
    integrity_pass,
    model_attrs,
    probe_layers,
    run_attrs,
    versions,
)
from extractor.forward import (
    ShardForward,
    check_forward_settings,
    fold_run_keywords,
    prepare_module,
    resolve_compute,
    resolve_device,
)
from extractor.noise import NOISE_RECIPE, noise_attrs
from extractor.scheduling import SchedulerSpec, run_tasks
from schemas.activation_store import ACTIVATION_SCHEMA
from schemas.classes import NUM_CLASSES, class_table
from schemas.image_layout import create_image_arrays
from schemas.image_store import IMAGE_SCHEMA, IMAGE_VAR
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
    """One shard of samples, written to the stores that still lack it (None: that store has it already)."""

    output: str | None
    activations_out: str | None
    shard: int
    start: int
    labels: np.ndarray
    forward: ForwardSettings  # compute dtype resolved
    layer_shapes: dict[str, tuple[int, ...]]
    batch_size: int
    device: str
    compile: bool = False


def generate_shard(task: GenerateTask) -> dict:
    """Sample one output shard, write its images and/or activations, record it done in the stores written."""
    device = resolve_device(task.device)
    loaded = cached_model(task.forward.model, device)
    prepare_module(loaded.module, device, task.compile)
    # Only what a store still lacks is computed: no capture without activations, no decoder without images.
    fwd = task.forward if task.activations_out else replace(task.forward, layers=())
    n = task.labels.size
    index = np.arange(task.start, task.start + n, dtype=np.int64)
    runner = ShardForward(loaded, fwd, device, n, task.layer_shapes, IMAGE_VAR if task.output else None)
    outputs: dict[str, ShardOutput] = {}
    if task.output:
        outputs["images"] = ShardOutput(task.output, task.shard, task.start, {IMAGE_VAR: runner.buffers[IMAGE_VAR]})
    if task.activations_out:
        outputs["activations"] = ShardOutput(task.activations_out, task.shard, task.start, {name: runner.buffers[name] for name in fwd.layers})
    runner.on_ready = lambda first, stop, wait: [out.ready(first, stop, wait) for out in outputs.values()]
    table = class_table()
    coords = {
        "label": task.labels,
        "synset": table.synsets_of(task.labels),
        "class_name": table.names_of(task.labels),
        "global_index": index,
        "source_file": np.full(n, "", dtype=object),
    }
    try:
        for a in range(0, n, task.batch_size):
            b = min(n, a + task.batch_size)
            runner.run(a, None, task.labels[a:b], index[a:b])
        runner.finish()
        nonfinite = runner.nonfinite(task.start)
        if nonfinite:
            for out in outputs.values():
                out.abort()
            return {"images": n, "nonfinite": nonfinite}
        if "images" in outputs:
            outputs["images"].commit({**coords, "source_row": index})
        if "activations" in outputs:
            outputs["activations"].commit({**coords, "source_sample": index})
    except BaseException:
        for out in outputs.values():
            out.abort()
        raise
    finally:
        runner.release()  # the writer threads are done with the buffers either way
    if task.activations_out:
        mark_done(task.activations_out, task.shard)
    if task.output:
        mark_done(task.output, task.shard)
    return {"images": n}


def generate(options: GenerateOptions) -> GenerateResult:
    """Sample (or resume, or confirm) a generated image store; idempotent for the same settings."""
    started = time.monotonic()
    run = options.run
    device = resolve_device(run.device)
    fwd = resolve_compute(options.forward, device)
    if fwd.noise_seed is None:
        raise ExtractionError("generation needs a seed for its noise")
    if fwd.layers and not options.activations_out:
        raise ExtractionError("--layers needs --activations-out ACTS.zarr")
    if options.activations_out and not fwd.layers:
        raise ExtractionError("--activations-out needs --layers")
    check_forward_settings(fwd)
    labels = generation_labels(options.per_class, options.num_samples, options.classes, fwd.noise_seed)
    n = labels.size
    loaded = cached_model(fwd.model, device)
    shapes, paths = ({}, {})
    if fwd.layers:
        shapes, paths, _ = probe_layers(fwd, device)
    shard = run.shard_size or min(DEFAULT_GENERATE_SHARD, default_shard_size(shapes, fwd.storage_dtype))
    num_shards = -(-n // shard)
    selection = {"per_class": options.per_class, "num_samples": options.num_samples, "classes": list(options.classes) if options.classes else None, "count": int(n)}
    image_settings = {"schema": IMAGE_SCHEMA, "format": "generated", "model_sha256": loaded.sha256, "sigma": fwd.sigma, "seed": fwd.noise_seed,
                      "compute_dtype": fwd.compute_dtype, "selection": selection, "shard_size": shard,
                      "noise_recipe": NOISE_RECIPE}
    act_settings = {**image_settings, "schema": ACTIVATION_SCHEMA, "layers": list(fwd.layers), "pool": fwd.pool, "storage_dtype": fwd.storage_dtype}
    for url in (options.output, options.activations_out):
        if url:
            check_noise_recipe(url, fwd.noise_seed, run.overwrite)
    statuses = [inspect_existing(options.output, IMAGE_SCHEMA, image_settings, run.overwrite)]
    if options.activations_out:
        statuses.append(inspect_existing(options.activations_out, ACTIVATION_SCHEMA, act_settings, run.overwrite))
    if all(st == "complete" for st in statuses):
        return GenerateResult(options.output, options.activations_out, n, True, time.monotonic() - started, loaded.trained)
    model = model_attrs(fwd, loaded)
    image_state = prepare_store(
        options.output, IMAGE_SCHEMA, image_settings, num_shards,
        lambda g: create_image_arrays(g, n, loaded.resolution, shard, min(64, shard)), run.overwrite,
        initial_attrs={
            "source_format": "generated", "source_label_order": "sorted", "resolution": loaded.resolution,
            "shuffle_seed": None, "num_samples": int(n), "rejected": [],
            "sources": [{"path": loaded.name, "size": 0, "fingerprint": "sha256:" + loaded.sha256}],
            "versions": versions(), "model": model, "sigma": fwd.sigma, "seed": fwd.noise_seed, "selection": selection,
            "sampling": f"one step: D(sigma * eps; sigma, one-hot(label)), eps = {NOISE_RECIPE} noise of (seed, index)",
            "noise": noise_attrs(fwd.noise_seed),
            "device": device_name(device),
        },
    )
    image_pending = set(image_state.pending)
    act_pending: set[int] = set()
    act_state: StoreState | None = None
    if options.activations_out:
        act_state = prepare_store(
            options.activations_out, ACTIVATION_SCHEMA, act_settings, num_shards,
            lambda g: create_activation_arrays(g, n, shapes, fwd.storage_dtype, shard, None), run.overwrite,
            initial_attrs={**run_attrs(fwd, loaded, paths, device), "selection": selection,
                           "source": {"url": options.output, "schema": IMAGE_SCHEMA, "generated": True},
                           "input_scaling": "none: the generator's own input sigma * eps"},
        )
        act_pending = set(act_state.pending)
    pending = image_pending | act_pending
    batch = run.batch_size or choose_batch_size(loaded, fwd, shapes, device, run.compile)
    tasks = [
        dask.delayed(generate_shard, pure=False)(
            GenerateTask(options.output if k in image_pending else None, options.activations_out if k in act_pending else None,
                         k, k * shard, labels[k * shard : (k + 1) * shard], fwd, shapes, batch, run.device, run.compile)
        )
        for k in sorted(pending)
    ]
    done = n - sum(min(shard, n - k * shard) for k in pending)
    receipts = run_tasks(tasks, run.scheduler, ProgressReport(n, f"generating {options.output}"), done)
    # A store found complete (a crash can land between finishing one store and the other) is left as it is.
    if act_state is not None and not act_state.already_complete:
        integrity_pass(options.activations_out, num_shards, receipts)
        finalize_store(options.activations_out, {})
    if not image_state.already_complete:
        integrity_pass(options.output, num_shards, receipts)
        finalize_store(options.output, {})
    return GenerateResult(options.output, options.activations_out, n, False, time.monotonic() - started, loaded.trained)
