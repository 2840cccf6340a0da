"""Streams an image store's samples through a model and writes the activations of named layers.

Each task owns one output shard of every variable: it reads its samples from the image store, runs them through
the run's PreparedForward (`extractor.forward`: built once per run and worker process, hooks registered once,
the per-device lock held around the forward only), streams the shard to disk from a writer thread, and records itself done once it is written.
Values depend only on the sample (noise is a function of (seed, global_index), `extractor.noise`), never on
batch size, chunking, order, device or worker count. Diffusion networks get the image scaled to [-1, 1] plus
σ·noise and the one-hot label; feature networks (`fid-inception`, `dinov2-*`) get the clean image and
preprocess it as their protocol says, so σ, noise, class labels and reconstructions are refused for them.
"""

from __future__ import annotations

import os
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
from extractor.selection import SelectionSpec, describe_selection, per_class_shortfall, select_samples
from extractor.shard_forward import ShardForward, pinned_images
from extractor.store_attrs import check_noise_recipe, extraction_attrs, record_batch_size, refuse_unfit_labels, unlabelled_note
from schemas.activation_store import (
    ACTIVATION_LAYOUT_VERSION,
    ACTIVATION_SCHEMA,
    FEATURE_KIND,
    RECONSTRUCTION_VAR,
    activation_array_attrs,
    activation_group_attrs,
)
from schemas.errors import output_write_errors
from schemas.image_store import ImageStore, validate_image_store
from schemas.progress_report import ProgressReport
from schemas.remote_storage import remote_storage_errors
from schemas.store_identity import StoreIdentity, check_output_generation, check_unchanged, reader_lease
from schemas.store_integrity import record_checksums, record_unit_checksums
from schemas.store_lifecycle import StoreExistsError, finalize_store, inspect_existing, mark_done, path_state, prepare_store
from schemas.task_runner import check_scheduler_reachable, refuse_memory_urls, run_stop, run_tasks, stop_if_interrupted


@dataclass(frozen=True)
class ExtractOptions:
    """One extraction: input image store, output activation store, what decides the values, how it runs."""

    store: str
    output: str
    forward: ForwardSettings
    selection: SelectionSpec = field(default_factory=SelectionSpec)
    run: RunOptions = field(default_factory=RunOptions)

    def to_dict(self, model_sha256: str, selection: dict, source_fingerprint: str | None, source_generation: str | None) -> dict[str, Any]:
        """The activation store's settings (its fingerprint: what decides its values and layout), from options
        whose forward is resolved. Keys that only some stores have come last, so stores without them keep theirs."""
        forward = self.forward.to_dict()
        optional = {key: forward.pop(key) for key in ("sigma", "noise_recipe") if key in forward}
        if source_generation is not None:
            optional["source_generation"] = source_generation
        return {
            "schema": ACTIVATION_SCHEMA,
            "layout": ACTIVATION_LAYOUT_VERSION,
            "model_sha256": model_sha256,
            **forward,
            "selection": selection,
            "source_fingerprint": source_fingerprint,
            "shard_size": self.run.shard_size,
            **optional,
        }


@dataclass(frozen=True)
class ExtractResult:
    url: str
    num_samples: int
    already_complete: bool
    seconds: float
    trained: bool
    written_before: int = 0  # samples an interrupted run had written (this run resumed it)
    notes: tuple[str, ...] = ()  # what the user may not expect of the selection (per_class_shortfall)


def network_input(loaded: LoadedModel, fwd: ForwardSettings) -> str:
    """What the network was fed, as schemas.activation_store.NETWORK_INPUTS names it (extraction)."""
    if loaded.kind == FEATURE_KIND:
        return "feature"
    return "noised" if fwd.noised else "clean"


def extract(options: ExtractOptions) -> ExtractResult:
    """Run (or resume, or confirm) one extraction; idempotent for the same inputs and settings.

    The input store is leased while the run reads it, and each task and the finish check it is still the store
    that was opened (schemas/store_identity.py): one rewritten meanwhile fails the run, never completing it."""
    started = time.monotonic()
    run = options.run
    # A full disk names the store (a shard's write names no file); a stalled object store names its URL.
    with output_write_errors(options.output), remote_storage_errors(options.store, options.output), reader_lease(options.store):
        resolve_compute_device(options.forward, run.device, run.compile)  # refused before anything is read
        refuse_memory_urls(run.scheduler, [options.store, options.output])
        check_scheduler_reachable(run.scheduler)  # before a model is built or any output exists
        if not options.forward.layers:
            raise ExtractionError("no layers requested (--layers L1,L2)")
        images = validate_image_store(options.store)
        source = StoreIdentity.of(options.store, images.attrs)
        chosen = select_samples(options.selection, images.coordinate("label"), images.coordinate("synset"))  # before the network: a bad selection is quick
        with PreparedForward(options.forward, run.device, images.resolution, run.compile, run.batch_size,
                                     seed_picks_samples=options.selection.per_class is not None, where=options.store) as forward:
            return _extract(options, forward, images, source, chosen, started)


def output_state(options: ExtractOptions, forward: PreparedForward, images: ImageStore, source: StoreIdentity, chosen: np.ndarray, tidy: bool = True) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """What the run does with its output, 'new', 'resume' or 'complete' (store_lifecycle.inspect_existing), the
    settings the output records and the selection's whole description (its provenance), once every refusal made
    before writing anything has passed (also `--dry-run`'s)."""
    fwd, loaded = forward.settings, forward.loaded
    refuse_unfit_labels(options.store, images, fwd, loaded, images.coordinate("label")[chosen])
    described = describe_selection(options.selection, chosen)
    check_noise_recipe(options.output, fwd.noise_seed, options.run.overwrite)
    # The positions decide the values, not how they were named: the same positions from a file spelt otherwise,
    # classes in another order or a list in Python are one setting. Stores made before this rule recorded the whole
    # description (kept in their attributes as provenance): theirs is tried when the store there has it.
    positions = {"count": described["count"], "sha256": described["sha256"]}
    selections = [described, positions] if _recorded_selection_is_described(options.output) else [positions, described]
    # Likewise the default shard size given by its number and given by no number.
    given, default = options.run.shard_size, default_shard_size(forward.layer_shapes, fwd.storage_dtype)
    spellings = [given] + ([default if given is None else None] if given in (None, default) else [])
    refusal: StoreExistsError | None = None
    for selection in selections:
        for shard_size in spellings:
            spelt = replace(options, forward=fwd, run=replace(options.run, shard_size=shard_size))
            settings = spelt.to_dict(loaded.sha256, selection, images.attrs.get("settings_fingerprint"), source.generation)
            try:
                return inspect_existing(options.output, ACTIVATION_SCHEMA, settings, options.run.overwrite, tidy=tidy), settings, described
            except StoreExistsError as exc:
                refusal = refusal or exc
    assert refusal is not None
    raise refusal


def _recorded_selection_is_described(url: str) -> bool:
    """Whether the activation store at `url` recorded its selection's whole description in its settings (stores
    made before the positions alone were recorded)."""
    if path_state(url) != "store":
        return False
    recorded = (dict(zarr.open_group(url, mode="r", use_consolidated=False).attrs).get("settings") or {}).get("selection")
    return isinstance(recorded, dict) and bool(set(recorded) - {"count", "sha256"})


def _extract(options: ExtractOptions, forward: PreparedForward, images: ImageStore, source: StoreIdentity, chosen: np.ndarray, started: float) -> ExtractResult:
    run, fwd, loaded, shapes = options.run, forward.settings, forward.loaded, forward.layer_shapes
    shortfall = per_class_shortfall(options.selection, images.coordinate("label"), images.coordinate("synset"))
    chosen_labels = images.coordinate("label")[chosen]
    notes = tuple(note for note in (shortfall, unlabelled_note(fwd, loaded, chosen_labels)) if note)
    state, settings, selection = output_state(options, forward, images, source, chosen)
    if state == "complete":
        return ExtractResult(options.output, int(chosen.size), True, time.monotonic() - started, loaded.trained, notes=notes)
    shard = run.shard_size or default_shard_size(shapes, fwd.storage_dtype)
    n = int(chosen.size)
    num_shards = -(-n // shard)
    rec_shape = (3, images.resolution, images.resolution) if fwd.reconstructions else None
    coords = {
        "label": chosen_labels.astype(np.int16),
        "synset": images.coordinate("synset")[chosen],
        "class_name": images.coordinate("class_name")[chosen],
        "global_index": images.coordinate("global_index")[chosen],
        "source_file": images.coordinate("source_file")[chosen],
        "source_sample": chosen,
    }
    array_attrs = activation_array_attrs(forward.paths, forward.layer_pooling, fwd.sigma, fwd.storage_dtype, fwd.reconstructions, network_input(loaded, fwd))
    state = prepare_store(
        options.output,
        ACTIVATION_SCHEMA,
        settings,
        num_shards,
        # The numeric coordinates are known for the whole selection: written once, whole, with the arrays.
        lambda g: create_activation_arrays(g, n, shapes, fwd.storage_dtype, shard, rec_shape, array_attrs, coordinates=coords),
        run.overwrite,
        initial_attrs={**extraction_attrs(options.store, fwd, images, loaded, forward.paths, selection, forward.device, int((chosen_labels < 0).sum())),
                       **activation_group_attrs(coords["label"], coords["synset"], coords["class_name"])},
    )
    if state.already_complete:  # another run finished it while this one started: nothing to do, nothing to finish
        return ExtractResult(options.output, n, True, time.monotonic() - started, loaded.trained, notes=notes)
    plan = forward.plan()  # the batch size is chosen here, once the store needs writing
    record_batch_size(options.output, plan.batch_size)
    tasks = [
        dask.delayed(extract_shard, pure=False)(
            ShardTask(options.store, options.output, k, k * shard, {c: v[k * shard : (k + 1) * shard] for c, v in coords.items()}, plan, source, state.generation)
        )
        for k in state.pending
    ]
    done = n - sum(min(shard, n - k * shard) for k in state.pending)
    receipts = run_tasks(tasks, run.scheduler, ProgressReport(n, f"extracting {options.output}", already=done))
    integrity_pass(options.output, num_shards, receipts)
    check_unchanged(source)  # what was read at the start (labels, coordinates) is still the store's too
    record_checksums(options.output)
    finalize_store(options.output, {})
    return ExtractResult(options.output, n, False, time.monotonic() - started, loaded.trained, done, notes)


@dataclass(frozen=True)
class ShardTask:
    """One unit of work, cheap to pickle: the model is named, never shipped."""

    store: str
    output: str
    shard: int
    start: int
    coords: dict[str, np.ndarray]
    forward: ForwardPlan  # settings resolved, layer shapes and batch size known
    source: StoreIdentity | None = None  # the image store as the run opened it: checked before and after reading
    output_generation: str | None = None  # the output store's, as the run prepared it: written only while it is that one

# The input stores this process has opened: zarr's open_group reads metadata through its event loop, which cost
# every task a few milliseconds that the other worker waited on (~5 % of a CPU extraction's worker time,
# measured), and each task read the shard indexes again. Keyed by the store's generation (else its settings
# fingerprint) as well, so a store converted anew in this process is opened anew.
# A store with neither (not made by imzarr) is opened per task; a forked process opens its own; the last few stay
# open.
_OPENED_IMAGE_STORES: dict[tuple[int, str, str], ImageStore] = {}
_KEPT_OPEN = 4


def opened_image_store(url: str, identity: StoreIdentity | None) -> ImageStore:
    """The image store at `url`, opened once per process and generation (its reads are thread-safe)."""
    which = None if identity is None else identity.generation or identity.fingerprint
    if which is None:
        return ImageStore(url, zarr.open_group(url, mode="r"))
    key = (os.getpid(), url, which)
    store = _OPENED_IMAGE_STORES.get(key)
    if store is None:
        store = _OPENED_IMAGE_STORES[key] = ImageStore(url, zarr.open_group(url, mode="r"))
        for stale in list(_OPENED_IMAGE_STORES)[:-_KEPT_OPEN]:
            _OPENED_IMAGE_STORES.pop(stale, None)
    return store


def extract_shard(task: ShardTask) -> dict:
    """Read one output shard's samples, run them in batches, write the shard (streamed), record it done."""
    forward = PreparedForward.for_plan(task.forward)
    device = forward.device
    if task.source is not None:
        check_unchanged(task.source)
    store = opened_image_store(task.store, task.source)
    coords = task.coords
    images = pinned_images(store.take(coords["source_sample"]), device)
    if task.source is not None:
        check_unchanged(task.source)  # the rows just read are the opened store's: only then may they be marked done
    labels, gidx = coords["label"], coords["global_index"]
    n = images.shape[0]
    runner = ShardForward(forward, n, RECONSTRUCTION_VAR if forward.settings.reconstructions else None)
    output = ShardOutput(task.output, task.shard, task.start, runner.buffers, task.output_generation)
    runner.on_ready = output.ready
    stop = run_stop()
    try:
        batch = forward.batch_size
        for a in range(0, n, batch):
            stop_if_interrupted(stop)
            b = min(n, a + batch)
            runner.run(a, images[a:b], labels[a:b], gidx[a:b])
        runner.finish()
        nonfinite = runner.nonfinite(task.start)
        if nonfinite:
            output.abort()
            return {"images": int(n), "nonfinite": nonfinite}
        output.commit({name: coords[name] for name in TEXT_COORDINATES})  # the numeric ones were written whole
    except BaseException:
        output.abort()
        raise
    finally:
        runner.release()  # the writer thread is done with the buffers either way
    check_output_generation(task.output, task.output_generation)  # a task that outlived its run marks nothing done
    record_unit_checksums(task.output, task.shard, output.checksums)
    mark_done(task.output, task.shard)
    return {"images": int(n)}
