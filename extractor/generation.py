"""One-step sampling of the DMD2 generator into an image store (and, optionally, its own activations).

image = D(σ·ε; σ, one-hot(label)), ε seeded per sample from (seed, sample index) in generation's own noise stream
(not the one `extract` adds with the same seed: extractor.noise.generation_noise_seed), converted to uint8 as DMD2
does. The result is an ordinary `imzarr.images/1` store (source_format "generated") that `extract` reads like
real data; with layers, the generator's view of its own samples goes to an activation store as it samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import dask
import numpy as np
import zarr

from extractor.activation_writer import TEXT_COORDINATES, create_activation_arrays, default_shard_size
from extractor.forward import ExtractionError, ForwardPlan, ForwardSettings, PreparedForward, RunOptions, resolve_compute_device
from extractor.integrity import integrity_pass
from extractor.models import LoadedModel
from schemas.shard_writer import ShardOutput
from extractor.noise import GENERATION_NOISE_RECIPE, generation_noise_seed, noise_attrs
from extractor.selection import resolve_classes
from extractor.shard_forward import ShardForward
from extractor.store_attrs import check_noise_recipe, device_name, model_attrs, model_source, record_batch_size, refuse_labels_beyond_network, run_attrs, versions
from schemas.activation_store import ACTIVATION_LAYOUT_VERSION, ACTIVATION_SCHEMA, DIFFUSION_KIND, activation_array_attrs, activation_group_attrs
from schemas.classes import NUM_CLASSES, class_table
from schemas.errors import output_write_errors
from schemas.image_layout import LAYOUT_VERSION, create_image_arrays
from schemas.image_layout import TEXT_COORDINATES as IMAGE_TEXT_COORDINATES
from schemas.image_store import IMAGE_SCHEMA, IMAGE_VAR, image_group_attrs
from schemas.option_values import whole_numbers
from schemas.output_paths import absolute_url
from schemas.progress_report import ProgressReport
from schemas.remote_storage import remote_storage_errors
from schemas.store_integrity import record_checksums, record_unit_checksums
from schemas.store_identity import GENERATION_ATTR, check_output_generation
from schemas.store_lifecycle import StoreState, finalize_store, inspect_existing, mark_done, prepare_store
from schemas.task_runner import check_scheduler_reachable, refuse_memory_urls, run_stop, run_tasks, stop_if_interrupted

DEFAULT_GENERATE_SHARD = 1024


@dataclass(frozen=True)
class GenerateOptions:
    """One generation: the image store (and optional activation store) written, and how it runs."""

    output: str
    forward: ForwardSettings  # layers may be empty; noise_seed is the sampling seed (None: DEFAULT_NOISE_SEED)
    per_class: int | None = None
    num_samples: int | None = None
    classes: tuple[str, ...] | None = None  # WNIDs, class names or 0-based indices (kept as WNIDs); default: every class
    activations_out: str | None = None
    run: RunOptions = field(default_factory=RunOptions)

    def __post_init__(self) -> None:
        if self.classes is not None:  # '0', 'tench' and 'n01440764' are one class, recorded as its WNID
            # in label order, the order its samples take: the same classes named in another order are one setting
            table = class_table()
            object.__setattr__(self, "classes", tuple(sorted(resolve_classes(self.classes), key=table.index_of_wnid)))
        counts = whole_numbers({"--per-class": (self.per_class, 1), "--num-samples": (self.num_samples, 1)}, ExtractionError)
        object.__setattr__(self, "per_class", counts["--per-class"])
        object.__setattr__(self, "num_samples", counts["--num-samples"])
        check_generate_options(self)

    def selection(self, count: int) -> dict[str, Any]:
        """How the samples were chosen, as the stores record it."""
        return {"per_class": self.per_class, "num_samples": self.num_samples, "classes": list(self.classes) if self.classes else None, "count": int(count)}

    def to_dict(self, model_sha256: str, count: int, shard_size: int, store: str = IMAGE_SCHEMA) -> dict[str, Any]:
        """The settings (fingerprint) of the generated image store, or with `store` ACTIVATION_SCHEMA of its
        activation store, from options whose forward is resolved."""
        fwd = self.forward
        settings: dict[str, Any] = {"schema": IMAGE_SCHEMA, "format": "generated", "layout": LAYOUT_VERSION, "model_sha256": model_sha256,
                                    "sigma": fwd.sigma, "seed": fwd.noise_seed, "compute_dtype": fwd.compute_dtype,
                                    "selection": self.selection(count), "shard_size": shard_size, "noise_recipe": GENERATION_NOISE_RECIPE}
        if store == ACTIVATION_SCHEMA:
            settings.update({"schema": ACTIVATION_SCHEMA, "layout": ACTIVATION_LAYOUT_VERSION, "layers": list(fwd.layers),
                             "pool": fwd.pool, "storage_dtype": fwd.storage_dtype})
        return settings


@dataclass(frozen=True)
class GenerateResult:
    url: str
    activations_url: str | None
    num_samples: int
    already_complete: bool
    seconds: float
    trained: bool
    written_before: int = 0  # samples an interrupted run had written (this run resumed it)


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


def unconditional_labels(loaded: LoadedModel, options: GenerateOptions, n: int) -> np.ndarray:
    """An unconditional network's samples belong to no class: label -1 each. Classes asked of it are refused,
    since the store would name classes the network never saw (a class-conditional checkpoint that lacks its
    label embedding, `model.map_label.weight`, loads as unconditional: this is where that shows)."""
    if options.per_class is not None or options.classes:
        raise ExtractionError(
            f"{loaded.name}: an unconditional network (label_dim 0: no class embedding) makes samples of no class, so "
            "--per-class and --classes cannot be honoured; use --num-samples N. If it should be class-conditional, "
            "its checkpoint lacks model.map_label.weight"
        )
    return np.full(n, -1, dtype=np.int16)


@dataclass(frozen=True)
class GenerateTask:
    """One shard of samples, written to the stores that still lack it (None: that store has it already)."""

    output: str | None
    activations_out: str | None
    shard: int
    start: int
    labels: np.ndarray
    forward: ForwardPlan  # settings resolved, layer shapes and batch size known
    generations: tuple[str | None, str | None] = (None, None)  # of the image and activation stores, as the run prepared them


def generate_shard(task: GenerateTask) -> dict:
    """Sample one output shard, write its images and/or activations, record it done in the stores written.

    Only the text arrays are written here: both stores got their numeric coordinates whole at creation. Rows
    whose D(x) or captured layers hold NaN/Inf leave the shard unwritten and unrecorded (the receipt says which).
    """
    # Only what a store still lacks is computed: no capture without activations, no decoder without images.
    forward = PreparedForward.for_plan(task.forward if task.activations_out else task.forward.without_layers())
    fwd = forward.settings
    n = task.labels.size
    index = np.arange(task.start, task.start + n, dtype=np.int64)
    runner = ShardForward(forward, n, IMAGE_VAR if task.output else None, noise_seed=generation_noise_seed(fwd.noise_seed))
    outputs: dict[str, ShardOutput] = {}
    if task.output:
        outputs["images"] = ShardOutput(task.output, task.shard, task.start, {IMAGE_VAR: runner.buffers[IMAGE_VAR]}, task.generations[0])
    if task.activations_out:
        outputs["activations"] = ShardOutput(task.activations_out, task.shard, task.start, {name: runner.buffers[name] for name in fwd.layers}, task.generations[1])
    runner.on_ready = lambda first, stop, wait: [out.ready(first, stop, wait) for out in outputs.values()]
    table = class_table()
    text = {"synset": table.synsets_of(task.labels), "class_name": table.names_of(task.labels), "source_file": np.full(n, "", dtype=object)}
    stop = run_stop()
    try:
        for a in range(0, n, forward.batch_size):
            stop_if_interrupted(stop)
            b = min(n, a + forward.batch_size)
            runner.run(a, None, task.labels[a:b], index[a:b])
        runner.finish()
        nonfinite = runner.nonfinite(task.start)
        if nonfinite:
            for out in outputs.values():
                out.abort()
            return {"images": n, "nonfinite": nonfinite}
        if "images" in outputs:
            outputs["images"].commit({name: text[name] for name in IMAGE_TEXT_COORDINATES})
        if "activations" in outputs:
            outputs["activations"].commit({name: text[name] for name in TEXT_COORDINATES})
    except BaseException:
        for out in outputs.values():
            out.abort()
        raise
    finally:
        runner.release()  # the writer threads are done with the buffers either way
    if task.activations_out:
        check_output_generation(task.activations_out, task.generations[1])  # a task that outlived its run marks nothing done
        record_unit_checksums(task.activations_out, task.shard, outputs["activations"].checksums)
        mark_done(task.activations_out, task.shard)
    if task.output:
        check_output_generation(task.output, task.generations[0])
        record_unit_checksums(task.output, task.shard, outputs["images"].checksums)
        mark_done(task.output, task.shard)
    return {"images": n}


def check_generator(loaded: LoadedModel) -> None:
    """Only diffusion networks generate: a feature network maps images to features, not noise to images."""
    if loaded.kind != DIFFUSION_KIND:
        raise ExtractionError(f"{loaded.name}: a {loaded.kind} network ({loaded.family}) cannot generate images; generate needs a diffusion network")


def check_generate_options(options: GenerateOptions) -> None:
    """Refuse option combinations generation cannot honour, one line each."""
    if (options.per_class is None) == (options.num_samples is None):
        raise ExtractionError("give exactly one of --per-class K or --num-samples N")
    if not options.forward.noise:
        raise ExtractionError("generation needs noise: the generator's input is σ·ε")
    if options.forward.layers and not options.activations_out:
        raise ExtractionError("--layers needs --activations-out ACTS.zarr")
    if options.activations_out and not options.forward.layers:
        raise ExtractionError("--activations-out needs --layers")


def generate(options: GenerateOptions) -> GenerateResult:
    """Sample (or resume, or confirm) a generated image store; idempotent for the same settings."""
    outputs = options.output + (f" or {options.activations_out}" if options.activations_out else "")
    # A full disk names the store(s) (a shard's write names no file); a stalled object store names its URL.
    with output_write_errors(outputs), remote_storage_errors(options.output, options.activations_out):
        return _generate(options)


def _generate(options: GenerateOptions) -> GenerateResult:
    check_generate_options(options)
    started = time.monotonic()
    run = options.run
    resolve_compute_device(options.forward, run.device, run.compile)  # refused before anything is written
    refuse_memory_urls(run.scheduler, [options.output, options.activations_out])
    check_scheduler_reachable(run.scheduler)  # before a model is built or any output exists
    with PreparedForward(options.forward, run.device, None, run.compile, run.batch_size, check_network=check_generator) as forward:
        return _generate_stores(replace(options, forward=forward.settings), forward, started)


def _generate_stores(options: GenerateOptions, forward: PreparedForward, started: float) -> GenerateResult:
    """Create (or confirm, or resume) the image store and the optional activation store; `options.forward` resolved."""
    run, fwd, loaded, shapes = options.run, forward.settings, forward.loaded, forward.layer_shapes
    labels = generation_labels(options.per_class, options.num_samples, options.classes, fwd.noise_seed)
    if not loaded.label_dim:
        labels = unconditional_labels(loaded, options, labels.size)
    refuse_labels_beyond_network("generate: ImageNet class", fwd, loaded, labels, class_free_hint=False)  # before any output exists
    n = labels.size
    shard = run.shard_size or min(DEFAULT_GENERATE_SHARD, default_shard_size(shapes, fwd.storage_dtype))
    num_shards = -(-n // shard)
    image_settings = options.to_dict(loaded.sha256, n, shard)
    act_settings = options.to_dict(loaded.sha256, n, shard, ACTIVATION_SCHEMA)
    for url in (options.output, options.activations_out):
        if url:
            check_noise_recipe(url, fwd.noise_seed, run.overwrite, GENERATION_NOISE_RECIPE)
    statuses = [inspect_existing(options.output, IMAGE_SCHEMA, image_settings, run.overwrite)]
    if options.activations_out:
        statuses.append(inspect_existing(options.activations_out, ACTIVATION_SCHEMA, act_settings, run.overwrite))
    if all(st == "complete" for st in statuses):
        return GenerateResult(options.output, options.activations_out, n, True, time.monotonic() - started, loaded.trained)
    image_state, act_state = _prepare_stores(options, forward, labels, shard, num_shards, image_settings, act_settings)
    if all(state is None or state.already_complete for state in (image_state, act_state)):  # another run finished them
        return GenerateResult(options.output, options.activations_out, n, True, time.monotonic() - started, loaded.trained)
    image_pending = set(image_state.pending)
    act_pending = set(act_state.pending) if act_state is not None else set()
    pending = image_pending | act_pending
    plan = forward.plan()  # the batch size is chosen here, once a store needs writing
    for state in (image_state, act_state):
        if state is not None and not state.already_complete:
            record_batch_size(state.url, plan.batch_size)
    tasks = [
        dask.delayed(generate_shard, pure=False)(
            GenerateTask(options.output if k in image_pending else None, options.activations_out if k in act_pending else None,
                         k, k * shard, labels[k * shard : (k + 1) * shard], plan,
                         (image_state.generation, act_state.generation if act_state is not None else None))
        )
        for k in sorted(pending)
    ]
    done = n - sum(min(shard, n - k * shard) for k in pending)
    receipts = run_tasks(tasks, run.scheduler, ProgressReport(n, f"generating {options.output}", already=done))
    # A store found complete (a crash can land between finishing one store and the other) is left as it is. Both
    # are checked before either is finished: NaN/Inf anywhere leaves both incomplete.
    unfinished = [url for url, state in ((options.output, image_state), (options.activations_out, act_state)) if state is not None and not state.already_complete]
    for url in unfinished:
        integrity_pass(url, num_shards, receipts, "the generator's D(x) (`image`) or its captured layers")
    for url in reversed(unfinished):  # the activation store first: the image store's completeness implies it
        record_checksums(url)
        finalize_store(url, {})
    return GenerateResult(options.output, options.activations_out, n, False, time.monotonic() - started, loaded.trained, done)


def _prepare_stores(
    options: GenerateOptions, forward: PreparedForward, labels: np.ndarray, shard: int, num_shards: int, image_settings: dict, act_settings: dict
) -> tuple[StoreState, StoreState | None]:
    """Create (or reopen) the image store and the optional activation store, every numeric coordinate written
    whole while each is created (all are known before sampling)."""
    run, fwd, loaded, shapes, res = options.run, forward.settings, forward.loaded, forward.layer_shapes, forward.resolution
    n = labels.size
    selection = options.selection(n)
    index = np.arange(n, dtype=np.int64)
    image_numeric = {"label": labels, "global_index": index, "source_row": index}
    image_state = prepare_store(
        options.output, IMAGE_SCHEMA, image_settings, num_shards,
        lambda g: create_image_arrays(g, n, res, shard, None, coordinates=image_numeric), run.overwrite,
        initial_attrs={
            "source_format": "generated", "source_label_order": "sorted", "resolution": res,
            "shuffle_seed": None, "num_samples": int(n), "rejected": [],
            "sources": [model_source(fwd, loaded)],
            "versions": versions(), "model": model_attrs(fwd, loaded), "sigma": fwd.sigma, "seed": fwd.noise_seed, "selection": selection,
            "sampling": f"one step: D(sigma * eps; sigma{', one-hot(label)' if loaded.label_dim else ''}), eps = {GENERATION_NOISE_RECIPE} noise of (seed, index)",
            "noise": noise_attrs(fwd.noise_seed, GENERATION_NOISE_RECIPE),
            "device": device_name(forward.device),
            **image_group_attrs(labels),
        },
    )
    if not options.activations_out:
        return image_state, None
    act_numeric = {"label": labels, "global_index": index, "source_sample": index}
    array_attrs = activation_array_attrs(forward.paths, forward.layer_pooling, fwd.sigma, fwd.storage_dtype, False, "generator")
    act_state = prepare_store(
        options.activations_out, ACTIVATION_SCHEMA, act_settings, num_shards,
        lambda g: create_activation_arrays(g, n, shapes, fwd.storage_dtype, shard, None, array_attrs, coordinates=act_numeric), run.overwrite,
        initial_attrs={**run_attrs(fwd, loaded, forward.paths, forward.device), "noise": noise_attrs(fwd.noise_seed, GENERATION_NOISE_RECIPE), "selection": selection,
                       "source": _image_store_source(options.output),
                       "input_scaling": "none: the generator's own input sigma * eps",
                       **activation_group_attrs(labels)},
    )
    return image_state, act_state


def _image_store_source(url: str) -> dict[str, Any]:
    """The image store an activation store's samples are, as `extract` records its source: with the store's
    settings fingerprint and generation id, by which `images()` and `imzarr report` tell a store since replaced."""
    attrs = dict(zarr.open_group(url, mode="r", use_consolidated=False).attrs)
    return {"url": absolute_url(url), "schema": IMAGE_SCHEMA, "generated": True, "fingerprint": attrs.get("settings_fingerprint"),
            "generation": attrs.get(GENERATION_ATTR), "source_format": attrs.get("source_format")}
